//! Operator commands: `strata status`, `strata inspect`, `strata dlq`.
//!
//! # Layout
//! - [`status`]: per table and stream, where the backlog is and what failed.
//! - [`inspect`]: stream entries as JSON lines, frames decoded into rows.
//! - [`dlq`]: list, replay and purge dead letters.
//! - [`redis_info`]: the read-only Redis queries they share (XINFO, XPENDING, XRANGE, …).
//! - [`render`]: how stream field values become JSON, so binary values stay readable.
//! - this file: errors, and the names of strata's streams.

pub mod dlq;
pub mod inspect;
pub mod redis_info;
pub mod render;
pub mod status;

use strata_pipeline::streams;

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

/// The four kinds of stream strata keeps per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `telemetry:{T}`: producer events, read by ingest.
    Telemetry,
    /// `rows:{T}`: frames, read by batch-writer.
    Rows,
    /// `archive:{T}`: closed chunks, read by the archiver.
    Archive,
    /// `archived:{T}`: archived chunks, read by the confirmer.
    Archived,
}

impl StreamKind {
    /// Every kind, in pipeline order.
    pub const ALL: [StreamKind; 4] = [
        StreamKind::Telemetry,
        StreamKind::Rows,
        StreamKind::Archive,
        StreamKind::Archived,
    ];

    /// The key prefix before `:{T}`.
    pub fn prefix(self) -> &'static str {
        match self {
            StreamKind::Telemetry => "telemetry",
            StreamKind::Rows => "rows",
            StreamKind::Archive => "archive",
            StreamKind::Archived => "archived",
        }
    }

    /// The stream key of this kind for `table`.
    pub fn key(self, table: &str) -> String {
        match self {
            StreamKind::Telemetry => streams::telemetry_stream(table),
            StreamKind::Rows => streams::rows_stream(table),
            StreamKind::Archive => streams::archive_stream(table),
            StreamKind::Archived => streams::archived_stream(table),
        }
    }

    /// The consumer group (stage) that reads this stream.
    pub fn group(self) -> &'static str {
        match self {
            StreamKind::Telemetry => streams::INGEST,
            StreamKind::Rows => streams::BATCH_WRITER,
            StreamKind::Archive => streams::ARCHIVER,
            StreamKind::Archived => streams::CONFIRMER,
        }
    }
}

/// A parsed strata stream key: `<kind>:{<table>}` with an optional `:dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName {
    /// Which of the table's streams.
    pub kind: StreamKind,
    /// The `{T}` of the key.
    pub table: String,
    /// True for the dead-letter stream of that stream.
    pub dlq: bool,
}

impl StreamName {
    /// Parses `key`; None when it is not a key strata uses.
    pub fn parse(key: &str) -> Option<StreamName> {
        let (base, dlq) = match key.strip_suffix(":dlq") {
            Some(base) => (base, true),
            None => (key, false),
        };
        let (prefix, rest) = base.split_once(':')?;
        let table = rest.strip_prefix('{')?.strip_suffix('}')?;
        if table.is_empty() || table.contains(['{', '}']) {
            return None;
        }
        let kind = StreamKind::ALL.into_iter().find(|k| k.prefix() == prefix)?;
        Some(StreamName {
            kind,
            table: table.to_string(),
            dlq,
        })
    }

    /// The stream itself (never the dead-letter stream).
    pub fn source(&self) -> String {
        self.kind.key(&self.table)
    }

    /// Its dead-letter stream.
    pub fn dlq_key(&self) -> String {
        streams::dlq_stream(&self.source())
    }

    /// The key this name was parsed from.
    pub fn key(&self) -> String {
        if self.dlq {
            self.dlq_key()
        } else {
            self.source()
        }
    }
}

/// What a well-formed strata stream key looks like, for error messages.
pub(crate) const STREAM_FORMS: &str =
    "expected telemetry:{T}, rows:{T}, archive:{T} or archived:{T}, or one of them followed by :dlq";

/// Checks `id` is a stream ID (`<ms>-<seq>` or `<ms>`), so Redis's own message is never needed.
pub(crate) fn check_id(id: &str) -> Result<(), OpsError> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    if digits(ms) && digits(seq) && ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok() {
        Ok(())
    } else {
        Err(OpsError::InvalidId(id.to_string()))
    }
}

/// `url` without a password, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            if user.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_parse_and_rebuild() {
        let n = StreamName::parse("rows:{metrics}:dlq").unwrap();
        assert_eq!(
            n,
            StreamName {
                kind: StreamKind::Rows,
                table: "metrics".into(),
                dlq: true
            }
        );
        assert_eq!(n.source(), "rows:{metrics}");
        assert_eq!(n.key(), "rows:{metrics}:dlq");
        assert_eq!(
            StreamName::parse("archived:{t_1}").unwrap().kind,
            StreamKind::Archived
        );
        for bad in [
            "metrics",
            "rows:metrics",
            "foo:{m}",
            "rows:{}",
            "rows:{m}:x",
        ] {
            assert_eq!(StreamName::parse(bad), None, "{bad}");
        }
    }

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
