//! PostgreSQL helpers the lifecycle stages share: a transaction whose lock waits are bounded,
//! and errors that keep their `tokio_postgres::Error` as `source()`.

use strata_pipeline::StageError;

/// A PostgreSQL failure while doing `context` ([`StageError::from_postgres`]: classified, the
/// `tokio_postgres::Error` kept as `source()`).
pub fn error(context: &str, err: tokio_postgres::Error) -> StageError {
    StageError::from_postgres(context, err)
}

/// `map_err` for PostgreSQL calls: `.map_err(pg::context("archiving …: COPY"))`.
pub fn context(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> StageError {
    let context = context.into();
    move |err| error(&context, err)
}

/// BEGIN with `lock_timeout` set for the transaction, so waiting for a chunk's lock is bounded.
/// Errors read "<what>: BEGIN" / "<what>: SET lock_timeout".
pub async fn begin_with_lock_timeout<'a>(
    conn: &'a mut deadpool_postgres::Object,
    lock_timeout_ms: u64,
    what: &str,
) -> Result<deadpool_postgres::Transaction<'a>, StageError> {
    let tx = conn
        .transaction()
        .await
        .map_err(context(format!("{what}: BEGIN")))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {lock_timeout_ms}"))
        .await
        .map_err(context(format!("{what}: SET lock_timeout")))?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[tokio::test]
    async fn a_connection_failure_keeps_its_cause_and_retries() {
        // Nothing listens on port 1: a connection error without SQLSTATE.
        let err = tokio_postgres::connect("host=127.0.0.1 port=1 user=x", tokio_postgres::NoTls)
            .await
            .err()
            .expect("no server on port 1");
        let e = error("archiving chunk c", err);
        assert_eq!(e.hint, strata_pipeline::RetryHint::Backoff);
        assert_eq!(e.message, "archiving chunk c");
        assert!(
            e.reason().starts_with("archiving chunk c: "),
            "{}",
            e.reason()
        );
        let source = e.source().expect("source kept");
        assert!(source.is::<tokio_postgres::Error>());
    }
}
