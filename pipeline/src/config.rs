//! `config.toml`: one section per component, unknown fields rejected, units in names.
//!
//! `REDIS_URL` and `DATABASE_URL` in the environment override `[redis] url` and `[postgres] url`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ConfigError;
use crate::lifecycle_config::{ArchiverConfig, ChunkWatcherConfig, ConfirmerConfig, LakeConfig};

/// The whole configuration of a strata process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Folder of table schema files (`*.toml`), relative to the config file's folder.
    pub schemas_dir: PathBuf,
    /// Where the streams live.
    pub redis: RedisConfig,
    /// Where the tables live.
    pub postgres: PostgresConfig,
    /// Consumer-group reading and retry settings shared by every stage.
    pub streams: StreamsConfig,
    /// The ingest stage (validation, framing).
    pub ingest: IngestConfig,
    /// The batch-writer stage (COPY into PostgreSQL).
    pub batch_writer: BatchWriterConfig,
    /// The admin endpoint: /metrics, /healthz, /readyz.
    pub admin: AdminConfig,
    /// OpenTelemetry sampling (the exporter itself is configured by the standard OTEL_* variables).
    pub tracing: TracingConfig,
    /// Where archived chunks go.
    pub lake: LakeConfig,
    /// The chunk-watcher stage (finds closed chunks).
    pub chunk_watcher: ChunkWatcherConfig,
    /// The archiver stage (chunk → Parquet → object store).
    pub archiver: ArchiverConfig,
    /// The confirmer stage (verify, then drop).
    pub confirmer: ConfirmerConfig,
    /// How long a graceful stop may take.
    pub shutdown: ShutdownConfig,
}

/// Graceful shutdown on SIGTERM or SIGINT.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After the signal, how long the stages may take to finish the batches in flight
    /// (including retries of a commit or a database outage); then the process exits with
    /// status 3, leaving what is unfinished pending for another consumer to claim.
    pub timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout_ms: 10_000 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            schemas_dir: PathBuf::from("schemas"),
            redis: RedisConfig::default(),
            postgres: PostgresConfig::default(),
            streams: StreamsConfig::default(),
            ingest: IngestConfig::default(),
            batch_writer: BatchWriterConfig::default(),
            admin: AdminConfig::default(),
            tracing: TracingConfig::default(),
            lake: LakeConfig::default(),
            chunk_watcher: ChunkWatcherConfig::default(),
            archiver: ArchiverConfig::default(),
            confirmer: ConfirmerConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL; `REDIS_URL` overrides it.
    pub url: String,
    /// Connections in the shared pool (blocking reads hold one each).
    pub pool_size: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 32,
        }
    }
}

/// Whether to use the TimescaleDB extension for hypertables.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TimescaleMode {
    /// Use it when the server has it available, native partitions otherwise.
    Auto,
    /// Fail `migrate` when the extension is not available.
    Require,
    /// Always use native range partitions.
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL; `DATABASE_URL` overrides it. `strata migrate` creates the database.
    pub url: String,
    /// TimescaleDB hypertables or native partitions.
    pub timescaledb: TimescaleMode,
    /// Connections in each process's pool (the writer uses `batch_writer.connections` of them).
    pub pool_size: usize,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/strata".into(),
            timescaledb: TimescaleMode::Auto,
            pool_size: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Share of batch spans without a producer traceparent that are exported (0.0 to 1.0);
    /// `OTEL_TRACES_SAMPLER` overrides it.
    pub sample_ratio: f64,
    /// Per batch, at most this many events carrying a traceparent get spans of their own.
    pub max_event_spans_per_batch: usize,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            sample_ratio: 0.01,
            max_event_spans_per_batch: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the endpoint and record metrics (off: no recorder, metrics calls cost nothing).
    pub enabled: bool,
    /// Address of the admin endpoint. Port 0 picks a free port (logged); if the port is taken
    /// (another strata process on the box), a free one is used with a warning.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Entries asked for by one XREADGROUP.
    pub read_count: usize,
    /// How long one XREADGROUP waits for new entries.
    pub block_ms: u64,
    /// Entries pending longer than this on any consumer are claimed by XAUTOCLAIM.
    pub claim_idle_ms: u64,
    /// How often each stage runs XAUTOCLAIM.
    pub claim_interval_ms: u64,
    /// An entry delivered more often than this is dead-lettered with the reason.
    pub max_deliveries: u64,
    /// Ceiling of the exponential backoff after a transient fault.
    pub max_backoff_ms: u64,
    /// How often each stage trims its input stream of entries every group acknowledged.
    pub trim_interval_ms: u64,
    /// Consumers that own nothing and have been idle this long (dead processes) are removed.
    pub forget_consumer_after_ms: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            read_count: 1000,
            block_ms: 1000,
            claim_idle_ms: 30_000,
            claim_interval_ms: 5_000,
            max_deliveries: 10,
            max_backoff_ms: 10_000,
            trim_interval_ms: 1_000,
            forget_consumer_after_ms: 600_000,
        }
    }
}

/// Limits of one batch, read by the batcher every stage shares. (Kept as plain fields in each
/// section rather than flattened, because serde cannot flatten and deny unknown fields at once.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Flush once this many rows are gathered.
    pub max_batch_rows: usize,
    /// Flush once this many payload bytes are gathered.
    pub max_batch_bytes: usize,
    /// Flush this long after the first entry of a batch arrived, however small it is.
    pub linger_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Entries validated into one frame: flush at this many rows...
    pub max_batch_rows: usize,
    /// ...or this many bytes of entry fields...
    pub max_batch_bytes: usize,
    /// ...or this long after the first entry arrived.
    pub linger_ms: u64,
    /// An entry whose fields and values add up to more bytes than this is dead-lettered.
    pub max_event_bytes: usize,
    /// Batches validated at once per consumer.
    pub workers: usize,
    /// Consumers per table in each ingest process, each reading on its own connection.
    pub consumers: usize,
    /// zstd level of frames (1 is fast and already compact).
    pub zstd_level: i32,
    /// Back-pressure: while `rows:{T}` holds more entries (frames) than this, ingest stops reading.
    pub max_rows_backlog: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 2000,
            max_batch_bytes: 4 << 20,
            linger_ms: 20,
            max_event_bytes: 64 << 10,
            workers: 2,
            consumers: 1,
            zstd_level: 1,
            max_rows_backlog: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchWriterConfig {
    /// Rows of one COPY transaction: flush at this many rows...
    pub max_batch_rows: usize,
    /// ...or this many bytes of compressed frames...
    pub max_batch_bytes: usize,
    /// ...or this long after the first frame arrived.
    pub linger_ms: u64,
    /// COPY transactions in flight at once per table, each on its own connection.
    pub connections: usize,
    /// Record applied frame IDs with the rows, so a redelivered frame is never written twice.
    /// Turning it off gives that guarantee up; it exists to measure what it costs.
    pub exactly_once: bool,
}

impl Default for BatchWriterConfig {
    fn default() -> Self {
        Self {
            max_batch_rows: 20_000,
            max_batch_bytes: 16 << 20,
            linger_ms: 200,
            connections: 2,
            exactly_once: true,
        }
    }
}

impl IngestConfig {
    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_batch_rows: self.max_batch_rows,
            max_batch_bytes: self.max_batch_bytes,
            linger_ms: self.linger_ms,
        }
    }
}

impl BatchWriterConfig {
    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_batch_rows: self.max_batch_rows,
            max_batch_bytes: self.max_batch_bytes,
            linger_ms: self.linger_ms,
        }
    }
}

impl Config {
    /// Reads `path` (a missing default `./config.toml` means all defaults), then applies the
    /// environment overrides.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let mut config = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|source| ConfigError::Parse {
                path: display.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => Config::default(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: display,
                    source,
                })
            }
        };
        // Relative paths in the file are relative to the file.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            for p in [&mut config.schemas_dir, &mut config.lake.path] {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        config.apply_env(|k| std::env::var(k).ok());
        config.validate(&display)?;
        Ok(config)
    }

    /// Applies `REDIS_URL` and `DATABASE_URL`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(url) = var("REDIS_URL").filter(|s| !s.is_empty()) {
            self.redis.url = url;
        }
        if let Some(url) = var("DATABASE_URL").filter(|s| !s.is_empty()) {
            self.postgres.url = url;
        }
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_string(),
            message,
        };
        for (section, b) in [
            ("ingest", self.ingest.limits()),
            ("batch_writer", self.batch_writer.limits()),
        ] {
            if b.max_batch_rows == 0 || b.max_batch_bytes == 0 {
                return Err(invalid(format!(
                    "[{section}] max_batch_rows and max_batch_bytes must be > 0"
                )));
            }
        }
        if self.batch_writer.connections == 0
            || self.ingest.workers == 0
            || self.ingest.consumers == 0
        {
            return Err(invalid(
                "[batch_writer] connections, [ingest] workers and [ingest] consumers must be > 0"
                    .into(),
            ));
        }
        if self.streams.read_count == 0 {
            return Err(invalid("[streams] read_count must be > 0".into()));
        }
        self.chunk_watcher.validate().map_err(invalid)?;
        // A missing bucket or container is a mistake in the file, found when it loads rather
        // than when the first chunk is archived.
        self.lake.validate().map_err(invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lake_missing_its_bucket_is_refused_when_the_config_loads() {
        let dir = std::env::temp_dir().join(format!("strata-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "[lake]\nbackend = \"s3\"\n").unwrap();
        let err = Config::load(&path, true).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("[lake] bucket is required"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_unknown_fields_are_rejected() {
        let mut c: Config = toml::from_str("[redis]\nurl = \"redis://file:1\"\n").unwrap();
        c.apply_env(|k| (k == "REDIS_URL").then(|| "redis://env:2".to_string()));
        assert_eq!(c.redis.url, "redis://env:2");
        assert_eq!(c.postgres.url, PostgresConfig::default().url);
        let err = toml::from_str::<Config>("[batch_writer]\nlinger = 5\n").unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");
    }
}
