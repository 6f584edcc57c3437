//! strata's Lua scripts, each in its own file here, and the error codes they reply with.
//!
//! # Layout
//! - `prelude.lua`: error codes, limits and helpers shared by the scripts that use
//!   [`script`] (commit, claim, and `strata dlq replay`).
//! - `commit.lua`: the atomic commit step ([`super::CommitStep`]).
//! - `claim.lua`: XAUTOCLAIM that records whose entries it took ([`super::Consumer::autoclaim`]).
//! - `touch.lua`: keeps held entries from looking idle ([`super::Consumer::touch`]).
//! - `trim.lua`: trims what every group acknowledged ([`super::trim_acknowledged`]).
//! - `remove_consumer.lua`: removes a consumer that owns nothing
//!   ([`super::ConsumerGroup::remove_consumer_if_idle`]).

use std::sync::LazyLock;

/// The most values strata's scripts pass to one `redis.call` (command name included). Lua in
/// Redis refuses more than about 8,000 (LUAI_MAXCSTACK: "too many results to unpack").
pub const MAX_SCRIPT_CALL_ARGS: usize = 7_900;

/// The most field pairs of one entry a script can XADD (`XADD key * f v …`).
pub const MAX_SCRIPT_FIELDS: usize = (MAX_SCRIPT_CALL_ARGS - 3) / 2;

/// Error code of a script step refused before any write because it exceeds a script limit or
/// its arguments are malformed (an entry without fields or with more than
/// [`MAX_SCRIPT_FIELDS`], an invalid ID). Not transient: the same step is refused again.
pub const ERR_LIMIT: &str = "STRATA_LIMIT";
/// Error code of a script step refused before any write because a key it writes exists and is
/// not a stream. Not transient until an operator removes or renames the key.
pub const ERR_WRONGTYPE: &str = "STRATA_WRONGTYPE";
/// Error code of a script step in which a write failed: every entry it had added was deleted
/// again and nothing was acknowledged or removed, so it may be retried as it is. Whether a
/// retry can succeed depends on Redis's error, which follows the code.
pub const ERR_ROLLBACK: &str = "STRATA_ROLLBACK";
/// Error code of a commit step whose second or later XACK failed after an earlier one
/// succeeded (every ID is checked first, so this is not expected to happen): the outputs stay,
/// some entries are acknowledged. Not transient; nothing can be undone.
pub const ERR_PARTIAL: &str = "STRATA_PARTIAL";

/// Why one of strata's scripts refused or undid a step, from its reply's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptFailure {
    /// [`ERR_LIMIT`]: refused, nothing written.
    Limit,
    /// [`ERR_WRONGTYPE`]: refused, nothing written.
    WrongType,
    /// [`ERR_ROLLBACK`]: a write failed and was undone; nothing remains of the step.
    RolledBack,
    /// [`ERR_PARTIAL`]: partly applied.
    Partial,
}

impl ScriptFailure {
    /// Every failure, for lookups by code.
    pub const ALL: [ScriptFailure; 4] = [
        ScriptFailure::Limit,
        ScriptFailure::WrongType,
        ScriptFailure::RolledBack,
        ScriptFailure::Partial,
    ];

    /// The error code the scripts reply with.
    pub const fn code(self) -> &'static str {
        match self {
            ScriptFailure::Limit => ERR_LIMIT,
            ScriptFailure::WrongType => ERR_WRONGTYPE,
            ScriptFailure::RolledBack => ERR_ROLLBACK,
            ScriptFailure::Partial => ERR_PARTIAL,
        }
    }

    /// The failure a script's error reply reports, by its code; None for any other error.
    pub fn of(err: &redis::RedisError) -> Option<ScriptFailure> {
        let code = err.code()?;
        Self::ALL.into_iter().find(|f| f.code() == code)
    }
}

/// The Lua source of a strata script: `body` after the shared prelude (the error codes and
/// [`MAX_SCRIPT_CALL_ARGS`] as locals, and helpers `refuse`, `err_text`, `not_a_stream`,
/// `valid_id`; see `prelude.lua`).
pub fn script_source(body: &str) -> String {
    let transient: Vec<String> = crate::error::REDIS_TRANSIENT_CODES
        .iter()
        .map(|c| format!("['{c}'] = true"))
        .collect();
    format!(
        "local E_LIMIT, E_WRONGTYPE, E_ROLLBACK, E_PARTIAL, MAX_ARGS = '{ERR_LIMIT}', '{ERR_WRONGTYPE}', '{ERR_ROLLBACK}', '{ERR_PARTIAL}', {MAX_SCRIPT_CALL_ARGS}\nlocal TRANSIENT = {{{}}}\n{}\n{body}",
        transient.join(", "),
        include_str!("prelude.lua")
    )
}

/// A strata script: `body` after the shared prelude (see [`script_source`]).
pub fn script(body: &str) -> redis::Script {
    redis::Script::new(&script_source(body))
}

/// Runs `inv` and, with `wait`, `WAIT replicas timeout` right behind it in one pipeline: one
/// round trip, and on a cluster the pipeline goes to the slot of the script's keys over one
/// connection, so the WAIT covers exactly the node and connection that ran the script (a
/// `WAIT` sent on its own could be routed elsewhere after a failover). Replies the script's
/// reply and, with `wait`, how many replicas acknowledged. A script error keeps its code.
pub(crate) async fn invoke_then_wait<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    inv: &redis::ScriptInvocation<'_>,
    wait: Option<crate::db::ReplicaWait>,
) -> redis::RedisResult<(redis::Value, Option<u64>)> {
    let Some(wait) = wait else {
        return inv.invoke_async(conn).await.map(|v| (v, None));
    };
    let mut pipe = redis::pipe();
    pipe.invoke_script(inv)
        .cmd("WAIT")
        .arg(wait.replicas)
        .arg(u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX))
        .ignore_errors();
    let mut loaded = false;
    loop {
        let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
        let [script, waited]: [redis::Value; 2] = replies.try_into().map_err(|r: Vec<_>| {
            redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "a script and WAIT replied with other than two replies",
                format!("{r:?}"),
            ))
        })?;
        match script.extract_error() {
            Err(e)
                if !loaded
                    && e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                inv.load_async(conn).await?;
                loaded = true;
            }
            Err(e) => return Err(e),
            Ok(reply) => {
                let acked = match waited.extract_error()? {
                    redis::Value::Int(n) => u64::try_from(n).unwrap_or(0),
                    other => {
                        return Err(redis::RedisError::from((
                            redis::ErrorKind::UnexpectedReturnType,
                            "WAIT did not reply with an integer",
                            format!("{other:?}"),
                        )))
                    }
                };
                return Ok((reply, Some(acked)));
            }
        }
    }
}

/// `commit.lua`, after the prelude.
pub(crate) static COMMIT: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("commit.lua")));

/// `claim.lua`, after the prelude.
pub(crate) static CLAIM: LazyLock<redis::Script> =
    LazyLock::new(|| script(include_str!("claim.lua")));

/// `touch.lua`.
pub(crate) static TOUCH: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("touch.lua")));

/// `trim.lua`.
pub(crate) static TRIM: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("trim.lua")));

/// `remove_consumer.lua`.
pub(crate) static REMOVE_CONSUMER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("remove_consumer.lua")));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_failures_are_classified_by_code() {
        for f in ScriptFailure::ALL {
            let e = redis::make_extension_error(f.code().to_string(), Some("detail".into()));
            assert_eq!(ScriptFailure::of(&e), Some(f));
        }
        assert_eq!(MAX_SCRIPT_FIELDS, 3_948);
    }
}
