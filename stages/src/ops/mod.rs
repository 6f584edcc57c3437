//! Operator commands: `strata status`, `strata inspect`, `strata dlq`.
//!
//! # Layout
//! - [`status`]: per table and stream, where the backlog is and what failed.
//! - [`inspect`]: stream entries as JSON lines, frames decoded into rows.
//! - [`dlq`]: list, replay and purge dead letters.
//! - [`redis_info`]: what only they ask Redis (a connection that names the server, key types,
//!   the clock); stream and group queries come from [`strata_pipeline::streams`].
//! - [`render`]: how stream field values become JSON, so binary values stay readable.
//! - this file: errors, stream-ID and URL checks; strata's stream names are
//!   [`strata_pipeline::streams::keys`]' [`StreamKind`] and [`StreamName`].

pub mod dlq;
pub mod inspect;
pub mod redis_info;
pub mod render;
pub mod status;

use strata_pipeline::streams::StreamId;
pub use strata_pipeline::streams::{StreamKind, StreamName};

/// Errors of operator commands.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("Redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("cannot reach Redis at {url}: {reason}")]
    RedisConnect {
        /// The server asked for, without its password.
        url: String,
        /// Redis's error (kept as text: its source would repeat it).
        reason: String,
    },
    #[error("no Redis connection")]
    RedisPool(#[from] deadpool_redis::PoolError),
    #[error("PostgreSQL query failed")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no PostgreSQL connection")]
    PostgresPool(#[from] deadpool_postgres::PoolError),
    #[error("cannot write output")]
    Io(#[from] std::io::Error),
    #[error("unknown stream `{stream}`: {reason}")]
    UnknownStream {
        /// The key as given on the command line.
        stream: String,
        /// What is wrong with it, and what would be right.
        reason: String,
    },
    #[error("`{key}` is a Redis {kind}, not a stream")]
    NotAStream {
        /// The key as given.
        key: String,
        /// What `TYPE` says it is.
        kind: String,
    },
    #[error("invalid stream ID `{0}`: expected <milliseconds>-<sequence>, e.g. 1793491200000-0")]
    InvalidId(String),
    #[error("no entry {id} in {stream}")]
    NoSuchEntry {
        /// The stream looked in.
        stream: String,
        /// The ID asked for.
        id: String,
    },
    #[error("dead letter {id} of {stream} was not replayed (nothing was added or removed)")]
    ReplayFailed {
        /// The dead-letter stream.
        stream: String,
        /// The dead letter's ID.
        id: String,
        /// What Redis replied to the write that failed.
        #[source]
        source: redis::RedisError,
    },
    #[error("dead letter {id} of {stream} was not replayed: {stream} changed during each of {attempts} attempts; run replay again")]
    ReplayContended {
        /// The dead-letter stream.
        stream: String,
        /// The dead letter's ID.
        id: String,
        /// How many times it was tried.
        attempts: usize,
    },
    #[error("{0}")]
    Usage(String),
}

/// What a well-formed strata stream key looks like, for error messages.
pub(crate) const STREAM_FORMS: &str =
    "expected telemetry:{T}, rows:{T}, archive:{T} or archived:{T} (telemetry:{T:p} and rows:{T:p} for partition p of a partitioned table), or one of them followed by :dlq";

/// Checks `id` is a stream ID (`<ms>-<seq>` or `<ms>`), so Redis's own message is never needed.
pub(crate) fn check_id(id: &str) -> Result<StreamId, OpsError> {
    StreamId::parse_loose(id).map_err(|_| OpsError::InvalidId(id.to_string()))
}

/// `url` without a password, for messages.
pub(crate) use strata_pipeline::secrets::redact_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_urls() {
        assert!(check_id("1793491200000-0").is_ok());
        assert!(check_id("1793491200000").is_ok());
        assert!(check_id("abc").is_err());
        assert!(check_id("1-").is_err());
        assert_eq!(
            redact_url("redis://:secret@h:6379/0"),
            "redis://h:6379/0".to_string()
        );
        assert_eq!(redact_url("redis://u:p@h"), "redis://u@h");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
