//! The sections of `config.toml` the shared runtime reads: `[redis]`, `[postgres]`, `[streams]`,
//! `[admin]`, `[tracing]`, `[shutdown]`, and [`BatchLimits`], the batch keys of any stage's
//! section. Unknown fields are rejected; units are in the names.
//!
//! The file itself is `strata_stages::Config`: it lists every section, these and the stages'
//! own (`[ingest]`, `[batch_writer]`, … defined next to each stage), and implements
//! [`RuntimeConfig`] so the runtime's functions ([`crate::db`]) take it whole. This crate knows no
//! stage's section.
//!
//! # Layout
//! - [`RuntimeConfig`]: what the runtime reads of the file.
//! - the shared sections: [`RedisConfig`], [`PostgresConfig`], [`StreamsConfig`],
//!   [`AdminConfig`], [`TracingConfig`], [`ShutdownConfig`].
//! - [`BatchLimits`] and [`batched_section!`](crate::batched_section), which gives a stage's
//!   section its flat batch keys.

use std::path::PathBuf;

use serde::Deserialize;

use crate::secrets::redact_url;

/// The sections of the file the runtime reads, whatever else the file holds.
pub trait RuntimeConfig {
    /// `[redis]`.
    fn redis(&self) -> &RedisConfig;
    /// `[postgres]`.
    fn postgres(&self) -> &PostgresConfig;
    /// `[streams]`.
    fn streams(&self) -> &StreamsConfig;
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL, `redis://user:password@host:port/db` (an ACL user and its password);
    /// `REDIS_URL` or `REDIS_URL_FILE` overrides it. Shown only redacted.
    pub url: String,
    /// Connections in the shared pool (blocking reads hold one each).
    pub pool_size: usize,
    /// `rediss://` only: PEM file of the CA(s) the server's certificate must chain to, for a
    /// private CA (unset: the OS store).
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://` only: PEM client certificate, for servers with `tls-auth-clients yes`.
    pub tls_cert_file: Option<PathBuf>,
    /// `rediss://` only: PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// `rediss://` only: accept any server certificate (test setups only; warned at start).
    pub tls_insecure_skip_verify: bool,
    /// A file holding the password, put into `url` when the config loads (so the password
    /// need not be in the file or the environment); relative to the config file. With
    /// `cluster`, it goes into every `nodes` URL too.
    pub password_file: Option<PathBuf>,
    /// A Redis Cluster: the pool holds cluster connections (routed by slot, following
    /// `MOVED`/`ASK`) and the hot loops' read connections follow redirects to the stream's
    /// node. Off: one standalone server (the default).
    pub cluster: bool,
    /// Cluster only: seed node URLs (`redis://user:password@host:port`, `rediss://` for TLS);
    /// any one that answers finds the rest. Empty: `url` is the one seed. The `tls_*` keys
    /// apply to every node. Shown only redacted.
    pub nodes: Vec<String>,
    /// Replicas that must hold a step's writes before strata relies on it. Redis replicates
    /// asynchronously: a master killed (kill -9, a crashed host) before its replicas received a
    /// write loses that write when a replica is promoted. With `n > 0`, every commit step (the
    /// script that XADDs a stage's outputs and XACKs its inputs) and every `strata produce`
    /// pipeline is followed by `WAIT n wait_timeout_ms` on the node that ran it, and a stage
    /// whose effects leave Redis (the batch-writer's COPY, the lifecycle's object store and
    /// chunk drops) waits the same way for the entries it read before applying them. Fewer
    /// replicas in time is a transient fault: waited for again, counted in
    /// `strata_replica_wait_shortfalls_total`. 0 (the default): no WAIT.
    pub wait_replicas: u32,
    /// How long one `WAIT` of [`Self::wait_replicas`] waits for the replicas, in ms (> 0:
    /// Redis's 0 would wait for ever).
    pub wait_timeout_ms: u64,
}

impl RedisConfig {
    /// The URL that names the Redis in use (in messages, and to tell TLS): `url`, or with
    /// `cluster` the first of `nodes`.
    pub fn primary_url(&self) -> &str {
        match self.nodes.first() {
            Some(first) if self.cluster => first,
            _ => &self.url,
        }
    }

    /// The cluster's seed URLs: `nodes`, or `url` when it is empty.
    pub fn seeds(&self) -> Vec<String> {
        if self.nodes.is_empty() {
            vec![self.url.clone()]
        } else {
            self.nodes.clone()
        }
    }
}

/// The URL redacted: the config may be logged or printed, its password never.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_insecure_skip_verify", &self.tls_insecure_skip_verify)
            .field("password_file", &self.password_file)
            .field("cluster", &self.cluster)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| redact_url(n)).collect::<Vec<_>>(),
            )
            .field("wait_replicas", &self.wait_replicas)
            .field("wait_timeout_ms", &self.wait_timeout_ms)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 32,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_insecure_skip_verify: false,
            password_file: None,
            cluster: false,
            nodes: Vec::new(),
            wait_replicas: 0,
            wait_timeout_ms: 1_000,
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

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (or libpq key=value string); `DATABASE_URL` or `DATABASE_URL_FILE`
    /// overrides it. `strata migrate` creates the database. Shown only redacted.
    pub url: String,
    /// TimescaleDB hypertables or native partitions.
    pub timescaledb: TimescaleMode,
    /// Connections in each process's pool (the writer uses `batch_writer.connections` of them).
    pub pool_size: usize,
    /// A file holding the password, put into `url` when the config loads; relative to the
    /// config file.
    pub password_file: Option<PathBuf>,
}

/// The URL redacted: the config may be logged or printed, its password never.
impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("timescaledb", &self.timescaledb)
            .field("pool_size", &self.pool_size)
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/strata".into(),
            timescaledb: TimescaleMode::Auto,
            pool_size: 8,
            password_file: None,
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
    /// (another strata process on the box), a free one is used with a warning. Loopback by
    /// default: anything else warns at start unless `token_file` is set.
    pub listen: String,
    /// A file holding a bearer token that `/metrics` and `/readyz` then require
    /// (`Authorization: Bearer <token>`); `/healthz` stays open. Read once when the config loads,
    /// relative to the config file.
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` (never from the TOML itself).
    #[serde(skip)]
    pub token: Option<AdminToken>,
}

/// The admin endpoint's bearer token; its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(
    /// The token a request must carry after `Bearer `.
    pub String,
);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            token_file: None,
            token: None,
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
    /// How often a running process reads each partitioned table's recorded partition count
    /// (`partitions:{T}`), to start reading partitions another process added.
    pub partition_poll_ms: u64,
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
            partition_poll_ms: 5_000,
        }
    }
}

/// Limits of one batch, read by the batcher every stage shares.
///
/// A stage's section holds them as three flat keys, `max_batch_rows`, `max_batch_bytes` and
/// `linger_ms` (`[ingest] linger_ms = 20`), read into one `batch: BatchLimits` field by
/// [`batched_section!`](crate::batched_section): serde cannot `flatten` a struct into a section
/// that denies unknown fields, so the macro derives the section's deserializer from a private
/// struct with the flat keys, which keeps serde's own errors (an unknown key named, with its
/// line) and converts it into the section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Flush once this many rows are gathered.
    pub max_batch_rows: usize,
    /// Flush once this many payload bytes are gathered.
    pub max_batch_bytes: usize,
    /// Flush this long after the first entry of a batch arrived, however small it is.
    pub linger_ms: u64,
}

impl BatchLimits {
    /// Refuses limits that would never flush; `Err` names the section's keys.
    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.max_batch_rows == 0 || self.max_batch_bytes == 0 {
            return Err(format!(
                "[{section}] max_batch_rows and max_batch_bytes must be > 0"
            ));
        }
        Ok(())
    }
}

/// Declares a stage's config section with the flat batch keys of [`BatchLimits`] read into a
/// field `batch`, beside the section's own fields:
///
/// ```
/// strata_pipeline::batched_section! {
///     /// `[example]`.
///     pub struct ExampleConfig {
///         /// Workers.
///         pub workers: usize,
///     }
/// }
///
/// impl Default for ExampleConfig {
///     fn default() -> Self {
///         Self {
///             batch: strata_pipeline::config::BatchLimits {
///                 max_batch_rows: 10,
///                 max_batch_bytes: 1 << 20,
///                 linger_ms: 5,
///             },
///             workers: 1,
///         }
///     }
/// }
///
/// fn main() {
///     let c: ExampleConfig = toml::from_str("linger_ms = 7\nworkers = 2\n").unwrap();
///     assert_eq!((c.batch.linger_ms, c.batch.max_batch_rows, c.workers), (7, 10, 2));
///     let err = toml::from_str::<ExampleConfig>("linger = 7\n").unwrap_err();
///     assert!(err.to_string().contains("unknown field `linger`"));
/// }
/// ```
///
/// The section must implement `Default` (missing keys take its values) and the calling crate
/// must depend on `serde`; invoke it at module level (not inside a function). The private struct has the section's name, so serde's messages read
/// as before ("unknown field `linger`, expected one of `max_batch_rows`, …"). One invocation per
/// module (it adds a private module `batched_section_keys`).
#[macro_export]
macro_rules! batched_section {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        $vis struct $name {
            /// The batch limits: this section's `max_batch_rows`, `max_batch_bytes`, `linger_ms`.
            pub batch: $crate::config::BatchLimits,
            $( $(#[$fmeta])* $fvis $field : $ty, )*
        }

        /// The flat keys of the section, as serde reads them.
        mod batched_section_keys {
            #[allow(unused_imports)]
            use super::*;

            #[derive(::serde::Deserialize)]
            #[serde(deny_unknown_fields, default)]
            pub(super) struct $name {
                max_batch_rows: usize,
                max_batch_bytes: usize,
                linger_ms: u64,
                $( $field : $ty, )*
            }

            impl ::std::default::Default for $name {
                fn default() -> Self {
                    let d = <super::$name as ::std::default::Default>::default();
                    Self {
                        max_batch_rows: d.batch.max_batch_rows,
                        max_batch_bytes: d.batch.max_batch_bytes,
                        linger_ms: d.batch.linger_ms,
                        $( $field : d.$field, )*
                    }
                }
            }

            impl ::std::convert::From<$name> for super::$name {
                fn from(k: $name) -> Self {
                    Self {
                        batch: $crate::config::BatchLimits {
                            max_batch_rows: k.max_batch_rows,
                            max_batch_bytes: k.max_batch_bytes,
                            linger_ms: k.linger_ms,
                        },
                        $( $field : k.$field, )*
                    }
                }
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                <batched_section_keys::$name as ::serde::Deserialize>::deserialize(d).map(Self::from)
            }
        }
    };
}
