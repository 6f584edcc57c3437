//! Errors that carry a retry hint, so delivery is decided in one place (the runner).

use std::fmt;

/// What the runner does with the entries of a batch whose processing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    /// A transient fault (database or network outage): keep the entries pending and retry the
    /// same batch with capped exponential backoff. Never dead-letters.
    Backoff,
    /// A deterministic failure of the input itself: isolate the offending entries and send them
    /// to the dead-letter stream; the rest of the batch still goes through.
    DeadLetter,
    /// A fault no retry can mend (misconfiguration, a schema that does not match the table):
    /// stop the process with an error, leaving the entries pending for a fixed deployment.
    Fatal,
}

/// An error raised by a stage while turning a batch into an outcome.
#[derive(Debug, thiserror::Error)]
pub struct StageError {
    /// Decides what happens to the batch; see [`RetryHint`].
    pub hint: RetryHint,
    /// What went wrong, for logs and dead-letter `error` fields.
    pub message: String,
    /// The SQLSTATE of a PostgreSQL failure, kept apart so dead letters can carry it.
    pub sqlstate: Option<String>,
    /// The underlying error, when the message does not already say it.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StageError {
    pub fn new(hint: RetryHint, message: impl Into<String>) -> Self {
        Self {
            hint,
            message: message.into(),
            sqlstate: None,
            source: None,
        }
    }

    pub fn backoff(message: impl Into<String>) -> Self {
        Self::new(RetryHint::Backoff, message)
    }

    pub fn dead_letter(message: impl Into<String>) -> Self {
        Self::new(RetryHint::DeadLetter, message)
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(RetryHint::Fatal, message)
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Classifies a PostgreSQL error: data exceptions (class 22) and integrity constraint
    /// violations (class 23) are deterministic and dead-letter; everything else (connection
    /// loss, serialization failures, lock or statement timeouts, shutdown) waits and retries.
    pub fn from_postgres(context: &str, err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let hint = if code.starts_with("22") || code.starts_with("23") {
                    RetryHint::DeadLetter
                } else if code.starts_with("42") && code != "42P01" {
                    // Syntax or privilege errors and undefined columns will not mend by waiting.
                    RetryHint::Fatal
                } else {
                    RetryHint::Backoff
                };
                let mut message = format!("{context}: SQLSTATE {code}: {}", db.message());
                if let Some(detail) = db.detail() {
                    message.push_str(" (");
                    message.push_str(detail);
                    message.push(')');
                }
                let mut e = Self::new(hint, message);
                e.sqlstate = Some(code.to_string());
                e
            }
            None => Self::new(RetryHint::Backoff, format!("{context}: {err}")),
        }
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl From<redis::RedisError> for StageError {
    fn from(err: redis::RedisError) -> Self {
        StageError::backoff(format!("redis: {err}"))
    }
}

impl From<deadpool_redis::PoolError> for StageError {
    fn from(err: deadpool_redis::PoolError) -> Self {
        StageError::backoff(format!("redis pool: {err}"))
    }
}

impl From<deadpool_postgres::PoolError> for StageError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        StageError::backoff(format!("postgres pool: {err}"))
    }
}

/// Errors of configuration and schema files: always fatal, always naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid TOML or unknown field")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}
