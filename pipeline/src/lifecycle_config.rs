//! Configuration of the chunk lifecycle: `[lake]`, `[chunk_watcher]`, `[archiver]`, `[confirmer]`.
//!
//! Credentials never live here: each object store backend reads them from the environment
//! (`AWS_*`, `AZURE_*`, `GOOGLE_*`, as `object_store`'s `from_env` builders do). `[lake.options]`
//! passes any further `object_store` builder key (e.g. `aws_virtual_hosted_style_request`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// Which object store holds the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LakeBackend {
    /// A folder on local disk (`path`).
    #[default]
    Local,
    /// Amazon S3 or an S3-compatible server (`bucket`, optional `endpoint`).
    S3,
    /// Azure Blob Storage or ADLS Gen2 (`container`, `account`).
    Azure,
    /// Google Cloud Storage (`bucket`).
    Gcs,
}

impl LakeBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            LakeBackend::Local => "local",
            LakeBackend::S3 => "s3",
            LakeBackend::Azure => "azure",
            LakeBackend::Gcs => "gcs",
        }
    }
}

/// Where archives go (`[lake]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// The object store: `local`, `s3`, `azure` or `gcs`.
    pub backend: LakeBackend,
    /// `local` only: the lake's root folder, created if missing (relative to the config file).
    pub path: PathBuf,
    /// `s3` and `gcs`: the bucket.
    pub bucket: Option<String>,
    /// `azure`: the blob container.
    pub container: Option<String>,
    /// `azure`: the storage account (else `AZURE_STORAGE_ACCOUNT_NAME`).
    pub account: Option<String>,
    /// Key prefix inside the bucket, container or folder; files go to
    /// `<prefix>/<table>/date=YYYY-MM-DD/<chunk>-<uuid>.parquet`.
    pub prefix: String,
    /// `s3` and `azure`: a custom endpoint URL (S3-compatible servers, Azurite, private links).
    pub endpoint: Option<String>,
    /// `s3`: the region (else `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Allow plain `http://` endpoints (test servers on loopback); off for real clouds.
    pub allow_http: bool,
    /// Further `object_store` builder keys for the chosen backend (`aws_*`, `azure_*`,
    /// `google_*`), applied after the environment.
    pub options: BTreeMap<String, String>,
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            backend: LakeBackend::Local,
            path: PathBuf::from("./lake"),
            bucket: None,
            container: None,
            account: None,
            prefix: String::new(),
            endpoint: None,
            region: None,
            allow_http: false,
            options: BTreeMap::new(),
        }
    }
}

/// `[chunk_watcher]`: finds closed chunks and emits one archival event per chunk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkWatcherConfig {
    /// Time between two scans of a table.
    pub interval_ms: u64,
    /// Native partitions only: partitions created ahead of time after the current one, so the
    /// writer rarely creates one on the hot path.
    pub premake_chunks: u32,
    /// A chunk whose archive has not been recorded this long after its event was emitted gets
    /// its event emitted again (covers a crash between recording a chunk and emitting its event,
    /// and lost stream entries). The archiver ignores events for chunks already done.
    pub reemit_after_ms: u64,
    /// A chunk past `archive_after` is closed only once this watcher has seen its write
    /// counter (`n_tup_ins + n_tup_upd + n_tup_del` in `pg_stat_user_tables`) stay unchanged
    /// this long, so a backfill still writing an old range does not get it archived and dropped
    /// under it (which would split the range over several incarnations and files). Counted from
    /// this watcher's first observation: after a restart every chunk waits the full period
    /// again. Keep it well above PostgreSQL's statistics delay (up to 10 s for a writer that
    /// goes idle; see the chunk-watcher's documentation).
    pub quiet_period_ms: u64,
}

impl Default for ChunkWatcherConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            premake_chunks: 1,
            reemit_after_ms: 900_000,
            quiet_period_ms: 300_000,
        }
    }
}

/// `[archiver]`: chunk → Parquet → object store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// Chunks archived at once per table (each holds two PostgreSQL connections).
    pub workers: usize,
    /// Rows of one Parquet row group: the unit memory is bounded by.
    pub row_group_rows: usize,
    /// Encoded bytes of one row group at most, whichever limit comes first.
    pub row_group_bytes: usize,
    /// Rows decoded from COPY into one Arrow record batch before encoding.
    pub batch_rows: usize,
    /// zstd level of Parquet pages (1 fast … 22 small).
    pub zstd_level: i32,
    /// Multipart upload part size; objects smaller than one part are written in one PUT.
    pub part_size_bytes: usize,
    /// Parts uploaded at once.
    pub max_concurrent_parts: usize,
    /// How long to wait for a lock on the chunk (another archiver, a writer's late rows).
    pub lock_timeout_ms: u64,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            row_group_rows: 1_048_576,
            row_group_bytes: 64 << 20,
            batch_rows: 65_536,
            zstd_level: 3,
            part_size_bytes: 16 << 20,
            max_concurrent_parts: 2,
            lock_timeout_ms: 10_000,
        }
    }
}

/// `[confirmer]`: reads each archive back, verifies it, then drops the chunk if the policy says so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfirmerConfig {
    /// Confirmations verified at once per table.
    pub workers: usize,
    /// Read the whole object back and compare its SHA-256 with the archiver's; without it only
    /// the size, the footer and the row count are checked.
    pub verify_sha256: bool,
    /// A chunk whose archive fails verification is archived again at most this many times;
    /// after that its archival event goes to `archive:{T}:dlq` and the chunk stays.
    pub max_rearchives: u32,
    /// How long dropping a chunk waits for its lock (writers of late rows hold it briefly).
    pub lock_timeout_ms: u64,
}

impl Default for ConfirmerConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            verify_sha256: true,
            max_rearchives: 3,
            lock_timeout_ms: 10_000,
        }
    }
}

impl ChunkWatcherConfig {
    /// Checks the keys that would make the watcher spin or close chunks without watching them;
    /// `Err` names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("[chunk_watcher] interval_ms must be > 0".into());
        }
        if self.quiet_period_ms == 0 {
            return Err("[chunk_watcher] quiet_period_ms must be > 0: a chunk is closed only after it has had no writes for that long (the default is 300000, 5 min)".into());
        }
        Ok(())
    }
}

impl LakeConfig {
    /// Checks the keys the chosen backend needs; `Err` names the missing key.
    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            LakeBackend::Local if self.path.as_os_str().is_empty() => {
                Err("[lake] path must not be empty for backend = \"local\"".into())
            }
            LakeBackend::S3 | LakeBackend::Gcs
                if self.bucket.as_deref().unwrap_or("").is_empty() =>
            {
                Err(format!(
                    "[lake] bucket is required for backend = \"{}\"",
                    self.backend.as_str()
                ))
            }
            LakeBackend::Azure if self.container.as_deref().unwrap_or("").is_empty() => {
                Err("[lake] container is required for backend = \"azure\"".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lake_sections_parse_and_name_missing_keys() {
        let lake: LakeConfig = toml::from_str(
            "backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n[options]\naws_access_key_id = \"k\"\n",
        )
        .unwrap();
        assert_eq!(lake.backend, LakeBackend::S3);
        assert_eq!(lake.options["aws_access_key_id"], "k");
        assert!(lake.validate().is_ok());
        let lake: LakeConfig = toml::from_str("backend = \"azure\"\n").unwrap();
        assert!(lake.validate().unwrap_err().contains("container"));
        assert!(toml::from_str::<LakeConfig>("root = \"x\"\n").is_err());
        assert_eq!(LakeConfig::default().path, PathBuf::from("./lake"));
        let a: ArchiverConfig = toml::from_str("zstd_level = 5\n").unwrap();
        assert_eq!((a.zstd_level, a.workers), (5, 1));
    }

    #[test]
    fn quiet_period_defaults_to_five_minutes_and_must_not_be_zero() {
        let w: ChunkWatcherConfig = toml::from_str("interval_ms = 1000\n").unwrap();
        assert_eq!(w.quiet_period_ms, 300_000);
        assert!(w.validate().is_ok());
        let w: ChunkWatcherConfig = toml::from_str("quiet_period_ms = 0\n").unwrap();
        assert!(w.validate().unwrap_err().contains("quiet_period_ms"));
        let w: ChunkWatcherConfig = toml::from_str("interval_ms = 0\n").unwrap();
        assert!(w.validate().unwrap_err().contains("interval_ms"));
        assert!(toml::from_str::<ChunkWatcherConfig>("quiet_period = 5\n").is_err());
    }
}
