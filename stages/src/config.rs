//! `config.toml`: the whole file, one section per component, unknown fields rejected, units in
//! names.
//!
//! `REDIS_URL` and `DATABASE_URL` in the environment (or `REDIS_URL_FILE` and
//! `DATABASE_URL_FILE`, naming files that hold them) override `[redis] url` and
//! `[postgres] url`; `[redis] password_file` and `[postgres] password_file` put a password into
//! them, and `[admin] token_file` is read (see [`strata_pipeline::secrets`]).
//!
//! Each section's type lives with the code that reads it: the runtime's (`[redis]`,
//! `[postgres]`, `[streams]`, `[admin]`, `[tracing]`, `[shutdown]`) in
//! [`strata_pipeline::config`], each stage's next to the stage ([`IngestConfig`] in
//! [`crate::ingest`], [`BatchWriterConfig`] in [`crate::writer`], the lifecycle's in
//! [`crate::lifecycle`]'s stage files, `[lake]` in [`crate::lifecycle::lake`]). [`Config`] only
//! lists them, as one derived struct, so serde's own errors (an unknown key named, with its
//! line) are those of every section. It lives here, in the lowest crate that knows every
//! section, and hands the runtime its part through [`RuntimeConfig`]; each stage checks its own
//! section through its registry entry ([`crate::registry::StageSpec::validate`]).
//!
//! # Layout
//! - [`Config`]: the file; [`Config::load`] reads it, applies the environment, validates.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use strata_pipeline::config::{
    AdminConfig, AdminToken, PostgresConfig, RedisConfig, RuntimeConfig, ShutdownConfig,
    StreamsConfig, TracingConfig,
};
use strata_pipeline::{secrets, ConfigError};

pub use crate::ingest::IngestConfig;
pub use crate::lifecycle::archiver::ArchiverConfig;
pub use crate::lifecycle::confirmer::ConfirmerConfig;
pub use crate::lifecycle::lake::{LakeBackend, LakeConfig};
pub use crate::lifecycle::watcher::ChunkWatcherConfig;
pub use crate::writer::BatchWriterConfig;

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

impl RuntimeConfig for Config {
    fn redis(&self) -> &RedisConfig {
        &self.redis
    }
    fn postgres(&self) -> &PostgresConfig {
        &self.postgres
    }
    fn streams(&self) -> &StreamsConfig {
        &self.streams
    }
}

impl Config {
    /// Reads `path` (a missing default `./config.toml` means all defaults), then applies the
    /// environment overrides.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        Self::load_with_env(path, must_exist, |k| std::env::var(k).ok())
    }

    /// [`Config::load`] with the environment read through `var` (tests give their own).
    pub fn load_with_env(
        path: &Path,
        must_exist: bool,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
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
            let redis = &mut config.redis;
            let tls_files = [
                &mut redis.tls_ca_file,
                &mut redis.tls_cert_file,
                &mut redis.tls_key_file,
            ];
            let files = tls_files.into_iter().flatten();
            for p in [&mut config.schemas_dir, &mut config.lake.path]
                .into_iter()
                .chain(files)
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
            for p in [
                &mut config.redis.password_file,
                &mut config.postgres.password_file,
                &mut config.admin.token_file,
                &mut config.lake.tls_ca_file,
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        config.apply_env(var)?;
        config.validate(&display)?;
        Ok(config)
    }

    /// Applies `REDIS_URL` / `REDIS_URL_FILE` and `DATABASE_URL` / `DATABASE_URL_FILE`, then the
    /// password files, and reads the admin token: the one place secrets are resolved.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = secrets::resolve_env("REDIS_URL", &var)? {
            self.redis.url = url;
        }
        if let Some(url) = secrets::resolve_env("DATABASE_URL", &var)? {
            self.postgres.url = url;
        }
        if let Some(file) = &self.redis.password_file {
            let password = secrets::read_secret_file(file, "[redis] password_file")?;
            self.redis.url = secrets::with_password(&self.redis.url, &password);
            for node in &mut self.redis.nodes {
                *node = secrets::with_password(node, &password);
            }
        }
        if let Some(file) = &self.postgres.password_file {
            let password = secrets::read_secret_file(file, "[postgres] password_file")?;
            self.postgres.url = secrets::with_password(&self.postgres.url, &password);
        }
        if let Some(file) = &self.admin.token_file {
            let token = secrets::read_secret_file(file, "[admin] token_file")?;
            self.admin.token = Some(AdminToken(token));
        }
        Ok(())
    }

    /// Checks what serde cannot: the runtime's sections here, each stage's own section through
    /// its registry entry, then `[lake]`.
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_string(),
            message,
        };
        if self.streams.read_count == 0 {
            return Err(invalid("[streams] read_count must be > 0".into()));
        }
        if self.redis.wait_replicas > 0 && self.redis.wait_timeout_ms == 0 {
            return Err(invalid(
                "[redis] wait_timeout_ms must be > 0 when wait_replicas > 0".into(),
            ));
        }
        for stage in crate::registry::STAGES {
            (stage.validate)(self).map_err(invalid)?;
        }
        // A missing bucket or container is a mistake in the file, found when it loads rather
        // than when the first chunk is archived.
        self.lake.validate().map_err(invalid)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests' environment: none (the process's REDIS_URL/DATABASE_URL would override the
    /// files under test, e.g. on a machine where scripts/services.sh exported DATABASE_URL).
    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_lake_missing_its_bucket_is_refused_when_the_config_loads() {
        let dir = std::env::temp_dir().join(format!("strata-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "[lake]\nbackend = \"s3\"\n").unwrap();
        let err = Config::load_with_env(&path, true, no_env)
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("[lake] bucket is required"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_unknown_fields_are_rejected() {
        let mut c: Config = toml::from_str("[redis]\nurl = \"redis://file:1\"\n").unwrap();
        c.apply_env(|k| (k == "REDIS_URL").then(|| "redis://env:2".to_string()))
            .unwrap();
        assert_eq!(c.redis.url, "redis://env:2");
        assert_eq!(c.postgres.url, PostgresConfig::default().url);
        let err = toml::from_str::<Config>("[batch_writer]\nlinger = 5\n").unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");
    }

    #[test]
    fn cluster_keys_default_off_and_the_password_file_reaches_every_seed() {
        let c: Config = toml::from_str("").unwrap();
        assert!(!c.redis.cluster);
        assert_eq!(c.redis.seeds(), vec![c.redis.url.clone()]);
        let dir = std::env::temp_dir().join(format!("strata-config-cl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
        let mut c: Config = toml::from_str(&format!(
            "[redis]\ncluster = true\nnodes = [\"redis://u@a:7000\", \"redis://u@b:7001\"]\npassword_file = \"{}\"\n",
            dir.join("pw").display()
        ))
        .unwrap();
        c.apply_env(|_| None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            c.redis.seeds(),
            vec!["redis://u:s3cret@a:7000", "redis://u:s3cret@b:7001"]
        );
        assert_eq!(c.redis.primary_url(), "redis://u:s3cret@a:7000");
        assert!(!format!("{:?}", c.redis).contains("s3cret"));
    }

    #[test]
    fn wait_replicas_defaults_off_and_needs_a_timeout() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!((c.redis.wait_replicas, c.redis.wait_timeout_ms), (0, 1000));
        assert_eq!(strata_pipeline::db::ReplicaWait::of(&c.redis), None);
        let c: Config =
            toml::from_str("[redis]\nwait_replicas = 2\nwait_timeout_ms = 250\n").unwrap();
        assert_eq!(
            strata_pipeline::db::ReplicaWait::of(&c.redis),
            Some(strata_pipeline::db::ReplicaWait {
                replicas: 2,
                timeout: std::time::Duration::from_millis(250)
            })
        );
        let dir = std::env::temp_dir().join(format!("strata-config-wait-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "[redis]\nwait_replicas = 1\nwait_timeout_ms = 0\n").unwrap();
        let err = Config::load_with_env(&path, true, no_env)
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("wait_timeout_ms must be > 0"), "{err}");
    }

    #[test]
    fn batch_keys_stay_flat_in_each_section_and_unknown_sections_are_named() {
        let c: Config = toml::from_str(
            "[ingest]\nmax_batch_rows = 500\nlinger_ms = 3\n[batch_writer]\nmax_batch_bytes = 7\nconnections = 4\n",
        )
        .unwrap();
        assert_eq!(c.ingest.batch.max_batch_rows, 500);
        assert_eq!(c.ingest.batch.linger_ms, 3);
        assert_eq!(
            c.ingest.batch.max_batch_bytes,
            IngestConfig::default().batch.max_batch_bytes
        );
        assert_eq!(c.batch_writer.batch.max_batch_bytes, 7);
        assert_eq!(c.batch_writer.connections, 4);
        let err = toml::from_str::<Config>("[ingest]\nlinger = 5\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field `linger`"), "{text}");
        assert!(text.contains("line 2"), "{text}");
        assert!(text.contains("`max_batch_rows`"), "{text}");
        let err = toml::from_str::<Config>("[ingestt]\nlinger_ms = 5\n").unwrap_err();
        assert!(err.to_string().contains("ingestt"), "{err}");
    }

    #[test]
    fn redis_tls_files_are_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("strata-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(
            &path,
            "[redis]\nurl = \"rediss://r:6380\"\ntls_ca_file = \"ca.pem\"\ntls_cert_file = \"/abs/c.pem\"\n",
        )
        .unwrap();
        let c = Config::load_with_env(&path, true, no_env).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.redis.tls_ca_file, Some(dir.join("ca.pem")));
        assert_eq!(c.redis.tls_cert_file, Some(PathBuf::from("/abs/c.pem")));
        assert_eq!(c.redis.tls_key_file, None);
        assert!(!c.redis.tls_insecure_skip_verify);
    }

    #[test]
    fn password_files_go_into_the_urls_and_debug_redacts_them() {
        let dir = std::env::temp_dir().join(format!("strata-pwfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("redis.pw"), "r3d1s-s3cret\n").unwrap();
        std::fs::write(dir.join("pg.pw"), "pg-s3cret").unwrap();
        std::fs::write(dir.join("token"), "t0ken\n").unwrap();
        std::fs::write(
            dir.join("config.toml"),
            "[redis]\nurl = \"redis://strata@h:6379\"\npassword_file = \"redis.pw\"\n\
             [postgres]\nurl = \"postgres://app@h/db\"\npassword_file = \"pg.pw\"\n\
             [admin]\ntoken_file = \"token\"\n",
        )
        .unwrap();
        let c = Config::load_with_env(&dir.join("config.toml"), true, no_env).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(c.redis.url, "redis://strata:r3d1s-s3cret@h:6379");
        assert_eq!(c.postgres.url, "postgres://app:pg-s3cret@h/db");
        assert_eq!(c.admin.token, Some(AdminToken("t0ken".into())));
        let debug = format!("{c:?}");
        for secret in ["r3d1s-s3cret", "pg-s3cret", "t0ken"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let mut c = Config::default();
        let err = c
            .apply_env(|k| k.starts_with("DATABASE_URL").then(|| "x".into()))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("DATABASE_URL and DATABASE_URL_FILE"),
            "{err}"
        );
    }

    #[test]
    fn the_repository_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.toml");
        let c = Config::load_with_env(&path, true, no_env).expect("config.toml");
        assert!(c.ingest.batch.max_batch_rows > 0);
    }
}
