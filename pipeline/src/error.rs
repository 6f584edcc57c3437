//! Errors that carry a retry hint, so delivery is decided in one place (the runner).

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
///
/// `Display` says what failed (for an error with an underlying cause, only the operation, e.g.
/// "COPY into metrics"); the cause is [`source()`](std::error::Error::source) — the
/// `tokio_postgres::Error` or `RedisError` itself. [`StageError::reason`] is the one line for logs
/// and dead letters, with the cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    /// Decides what happens to the batch; see [`RetryHint`].
    pub hint: RetryHint,
    /// What went wrong, or the operation that failed when `source` says why.
    pub message: String,
    /// The SQLSTATE of a PostgreSQL failure, kept apart so dead letters can carry it.
    pub sqlstate: Option<SqlState>,
    /// The underlying error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub use tokio_postgres::error::SqlState;

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

    /// Keeps `source` as the cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Classifies a PostgreSQL error (see [`postgres_hint`]), keeps it as the source and its
    /// SQLSTATE apart. `context` names the operation.
    pub fn from_postgres(context: &str, err: tokio_postgres::Error) -> Self {
        let hint = postgres_hint(&err);
        let sqlstate = err.code().cloned();
        let mut e = Self::new(hint, context).with_source(err);
        e.sqlstate = sqlstate;
        e
    }

    /// The SQLSTATE as its five characters, for dead letters.
    pub fn sqlstate_code(&self) -> Option<String> {
        self.sqlstate.as_ref().map(|s| s.code().to_string())
    }

    /// The PostgreSQL error behind this one, if any.
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        self.source.as_deref()?.downcast_ref()
    }

    /// One line for logs and dead letters: what failed and why. A PostgreSQL server error reads
    /// `<operation>: SQLSTATE <code>: <message> (<detail>)`; any other cause is its error chain.
    pub fn reason(&self) -> String {
        match self.postgres().and_then(|e| e.as_db_error()) {
            Some(db) => {
                let mut s = format!(
                    "{}: SQLSTATE {}: {}",
                    self.message,
                    db.code().code(),
                    db.message()
                );
                if let Some(detail) = db.detail() {
                    s.push_str(" (");
                    s.push_str(detail);
                    s.push(')');
                }
                s
            }
            None => error_chain(self),
        }
    }
}

/// SQLSTATE classes (first two characters) of transient faults: connection exceptions (08),
/// insufficient resources (53), system errors such as I/O failures (58).
pub const TRANSIENT_CLASSES: [&str; 3] = ["08", "53", "58"];

/// Single SQLSTATEs of transient faults: the server shutting down or restarting (57P01
/// admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now), a statement cancelled by
/// `statement_timeout` (57014), serialization failures and deadlocks (40001, 40P01), a lock not
/// available under `lock_timeout` (55P03), a read-only transaction on a server that is not (or no
/// longer) the primary (25006), and an undefined table (42P01: a chunk dropped by the lifecycle
/// between lookup and use, or a table not migrated yet).
pub const TRANSIENT_CODES: [&str; 9] = [
    "57P01", "57P02", "57P03", "57014", "40001", "40P01", "55P03", "25006", "42P01",
];

/// SQLSTATE classes no retry and no input can mend: syntax or access rule violations (42:
/// permissions, a table whose columns do not match the schema), invalid authorization (28),
/// a missing database (3D) or schema (3F).
pub const FATAL_CLASSES: [&str; 4] = ["42", "28", "3D", "3F"];

/// Exceptions to [`FATAL_CLASSES`] that depend on the rows written: a partition that would
/// overlap another (42P17, raised when creating the partition for one row's time).
pub const DATA_CODES_IN_FATAL_CLASSES: [&str; 1] = ["42P17"];

/// What a PostgreSQL failure means for the batch that met it.
///
/// Transient only by an explicit list — connection loss and I/O errors (no SQLSTATE), the
/// classes in [`TRANSIENT_CLASSES`] and the codes in [`TRANSIENT_CODES`] — so a failure nobody
/// foresaw never wedges a table: it retries with backoff. Deployment faults
/// ([`FATAL_CLASSES`]) stop the process. Every other failure may depend on the data (a bad value,
/// a constraint, a stack depth or program limit, an internal error on one row): the writer
/// isolates the rows that fail on their own and dead-letters them with their SQLSTATE.
pub fn postgres_hint(err: &tokio_postgres::Error) -> RetryHint {
    let Some(db) = err.as_db_error() else {
        return RetryHint::Backoff;
    };
    let code = db.code().code();
    let class = &code[..code.len().min(2)];
    if TRANSIENT_CLASSES.contains(&class) || TRANSIENT_CODES.contains(&code) {
        RetryHint::Backoff
    } else if FATAL_CLASSES.contains(&class) && !DATA_CODES_IN_FATAL_CLASSES.contains(&code) {
        RetryHint::Fatal
    } else {
        RetryHint::DeadLetter
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

/// Redis error codes of transient conditions: memory full until consumers catch up and trimming
/// frees it (OOM), a script or load in progress (BUSY, LOADING), a cluster or replica
/// reconfiguring (TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY, NOREPLICAS), persistence
/// failing (MISCONF).
pub const REDIS_TRANSIENT_CODES: [&str; 11] = [
    "OOM",
    "BUSY",
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "NOREPLICAS",
    "MISCONF",
    // A cluster redirect the client did not follow (a pipeline sent while its slot migrates).
    "ASK",
    "MOVED",
];

/// Redis error codes of a deployment fault: the account lacks a permission or cannot log in.
pub const REDIS_FATAL_CODES: [&str; 3] = ["NOPERM", "NOAUTH", "WRONGPASS"];

/// What a failed Redis call means: a refused login (wrong user or password) is fatal;
/// connection and I/O faults and the codes in
/// [`REDIS_TRANSIENT_CODES`] are transient; [`REDIS_FATAL_CODES`] are fatal; any other error
/// reply (a script that refused its input, a command error) may depend on the entries and is
/// reported as `DeadLetter`, so the runner splits the batch instead of retrying it forever.
pub fn redis_hint(err: &redis::RedisError) -> RetryHint {
    // The client's own verdict on AUTH at connection setup (no code: Redis's reply is dropped).
    if err.kind() == redis::ErrorKind::AuthenticationFailed {
        return RetryHint::Fatal;
    }
    match err.code() {
        Some(code) if REDIS_TRANSIENT_CODES.contains(&code) => RetryHint::Backoff,
        Some(code) if REDIS_FATAL_CODES.contains(&code) => RetryHint::Fatal,
        Some(_) => RetryHint::DeadLetter,
        None => RetryHint::Backoff,
    }
}

/// A failed Redis call; the `RedisError` stays the [`source`]
/// (`std::error::Error::source`), so [`error_chain`] prints `redis: <Redis's error>`.
impl From<redis::RedisError> for StageError {
    /// Inside a stage, a Redis failure is not the input's fault: it waits and retries, unless
    /// it is a deployment fault ([`redis_hint`] says fatal). The error is kept as the source.
    fn from(err: redis::RedisError) -> Self {
        let hint = match redis_hint(&err) {
            RetryHint::Fatal => RetryHint::Fatal,
            _ => RetryHint::Backoff,
        };
        StageError::new(hint, "redis").with_source(err)
    }
}

/// What a failure to get a pooled Redis connection means: fatal when the server refused the
/// login or the account ([`redis_hint`]), transient otherwise (the server is away, the pool busy).
pub fn redis_pool_hint(err: &deadpool_redis::PoolError) -> RetryHint {
    match err {
        deadpool_redis::PoolError::Backend(e) if redis_hint(e) == RetryHint::Fatal => {
            RetryHint::Fatal
        }
        _ => RetryHint::Backoff,
    }
}

impl From<deadpool_redis::PoolError> for StageError {
    fn from(err: deadpool_redis::PoolError) -> Self {
        StageError::new(redis_pool_hint(&err), "redis pool").with_source(err)
    }
}

impl From<deadpool_postgres::PoolError> for StageError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        StageError::backoff("postgres pool").with_source(err)
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
    /// A secret (a URL or password from the environment or a file) could not be resolved.
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error Redis replies with `line` (`-CODE message`).
    fn redis_error(line: &str) -> redis::RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap() {
            redis::Value::ServerError(e) => e.into(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redis_errors_are_classified_by_code() {
        for line in [
            "OOM command not allowed when used memory > 'maxmemory'",
            "BUSY Redis is busy running a script",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica",
        ] {
            assert_eq!(redis_hint(&redis_error(line)), RetryHint::Backoff, "{line}");
        }
        assert_eq!(
            redis_hint(&redis_error(
                "NOPERM User strata has no permissions to run 'xadd'"
            )),
            RetryHint::Fatal
        );
        for line in [
            "STRATA_LIMIT entry 1 has 5000 fields",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR The stream has exhausted the last possible ID",
        ] {
            assert_eq!(
                redis_hint(&redis_error(line)),
                RetryHint::DeadLetter,
                "{line}"
            );
        }
        // Inside a stage, only a fatal Redis error is not retried.
        assert_eq!(
            StageError::from(redis_error("ERR x")).hint,
            RetryHint::Backoff
        );
        assert_eq!(
            StageError::from(redis_error("NOPERM x")).hint,
            RetryHint::Fatal
        );
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(redis_hint(&io), RetryHint::Backoff);
    }

    #[test]
    fn a_stage_error_keeps_its_cause_without_repeating_it() {
        let e = StageError::backoff("redis pool").with_source(std::io::Error::other("refused"));
        assert_eq!(e.to_string(), "redis pool");
        assert_eq!(e.reason(), "redis pool: refused");
        assert!(std::error::Error::source(&e).is_some());
    }
}
