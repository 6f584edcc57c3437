//! strata's shared runtime. Stages are thin: they turn a batch into an outcome, and this crate
//! does everything else.
//!
//! # Layout
//! - [`config`]: the sections of `config.toml` the runtime reads, [`config::BatchLimits`] and
//!   the macro giving a stage's section its batch keys (the file and the stages' sections live
//!   in `strata-stages`).
//! - [`schema`]: table schemas from `schemas/*.toml`, and typed cells parsed from events.
//! - [`pg_limits`]: what PostgreSQL refuses for its data (NUL, jsonb, time range, index size).
//! - [`frame`]: the MessagePack + zstd frames ingest writes to `rows:{T}`.
//! - [`streams`]: the one Redis Streams layer: IDs, keys, entries, replies, groups, reads, claims,
//!   the atomic commit step and its Lua scripts.
//! - [`runner`]: the consumer loop (read, claim, batch, process, commit) and the [`runner::Stage`] trait.
//! - [`error`]: errors carrying a [`error::RetryHint`] that decides delivery.
//! - [`db`]: PostgreSQL connection pools.
//! - [`tls`]: the one rustls client setup (roots, client certificates, verification, failure
//!   causes); [`pg_tls`]: libpq's `sslmode`/`sslrootcert`/`sslcert`/`sslkey` for PostgreSQL.
//! - [`secrets`]: URLs and passwords from the environment or files; URLs shown redacted.
//! - [`latency`]: the end-to-end latency histogram (for summaries).
//! - [`observe`]: metric names, the Prometheus recorder, per-loop metric handles.
//! - [`admin`]: the `/metrics`, `/healthz`, `/readyz` endpoint.
//! - [`trace`]: W3C trace context carried across the streams.
//! - [`shutdown`]: SIGTERM/SIGINT → graceful stop.

pub mod admin;
pub mod config;
pub mod db;
pub mod error;
pub mod frame;
pub mod latency;
pub mod observe;
pub mod pg_limits;
pub mod pg_tls;
pub mod runner;
pub mod schema;
pub mod secrets;
pub mod shutdown;
pub mod streams;
pub mod tls;
pub mod trace;

pub use config::RuntimeConfig;
pub use error::{error_chain, ConfigError, RetryHint, StageError};
