//! The least-privilege Redis ACL rule of strata's processes, as data: the key patterns (made from
//! the same prefixes as every key in [`super::keys`]) and the commands strata sends, each named
//! with its subcommand where it has some. `strata acl-rule` prints it, the README shows that
//! output, and the tests run the whole pipeline under it.
//!
//! A refused command comes back as `NOPERM` without the key; [`denied`] adds the command and
//! key to the error (keeping its code, so it stays classified as fatal by
//! [`crate::error::redis_hint`]).

use super::keys::StreamKind;

/// Every command strata's stages and operator commands send, lowercase as ACL rules spell them.
/// Scripts need the commands they call too (Redis checks each `redis.call`, and the keys
/// declared in `KEYS` when the script starts).
pub const COMMANDS: [&str; 38] = [
    // Connections: readiness and operator checks, a database other than 0.
    "ping",
    "select",
    // Consumer groups: reading, acknowledging, claiming, inspecting, forgetting consumers.
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xclaim",
    "xpending",
    "xgroup|create",
    "xgroup|delconsumer",
    "xinfo|groups",
    "xinfo|consumers",
    // Whether a group is drained (the shrink check of partitions): the stream's last ID.
    "xinfo|stream",
    // Streams: writing outputs and dead letters, reading, trimming, deleting replayed entries.
    "xadd",
    "xlen",
    "xrange",
    "xtrim",
    "xdel",
    // The claims hash (`<stream>:claimed`) of claim.lua and commit.lua.
    "hincrby",
    "hexists",
    // The recorded partition count of a table (`partitions:{T}`, see `partition.rs`).
    "hmget",
    "hset",
    // Key types (scripts refuse to write to a key that is not a stream; operator commands).
    "type",
    // The replay marker of a large dead letter (mark.lua, unmark.lua).
    "get",
    "set",
    "del",
    // Scripts: the atomic steps, loaded on first use.
    "evalsha",
    "eval",
    "script|load",
    // `strata dlq replay` of a large dead letter: WATCH/MULTI/EXEC.
    "watch",
    "unwatch",
    "multi",
    "exec",
    // Operator commands: the server's clock for ages; `strata status` looking for streams of
    // partitions beyond a table's count (no key argument: the key patterns do not limit it).
    "time",
    "scan",
    // `[redis] wait_replicas`: WAIT after each step; `strata produce` names the node it wrote
    // to by `INFO server` (on a cluster, routed with its pipeline).
    "wait",
    "info",
    // Redis Cluster: the client's slot map, and `strata status`'s node of each partition.
    "cluster|slots",
    "cluster|keyslot",
];
// Not in the rule: `CLIENT SETINFO`, which the client sends on connecting and whose refusal it
// ignores (Redis before 7.2 does not know the command, so a rule naming it would not load).

/// The key patterns: every stream of every table and partition, with its dead-letter stream,
/// claims hash and replay markers (`telemetry:{T}`, `telemetry:{T:3}:dlq`, `rows:{T}:claimed`,
/// …), and each table's recorded partition count (`partitions:{T}`).
pub fn key_patterns() -> Vec<String> {
    StreamKind::ALL
        .iter()
        .map(|k| format!("{}:{{*", k.prefix()))
        .chain(std::iter::once(format!(
            "{}{{*",
            super::keys::PARTITIONS_PREFIX
        )))
        .collect()
}

/// The rule's words after `ACL SETUSER <user>`: enabled, only strata's keys, no channels, no
/// command but [`COMMANDS`]. The password is set apart (`>password`), so the rule holds none.
pub fn rule() -> Vec<String> {
    let mut words: Vec<String> = ["on", "resetkeys", "resetchannels", "-@all"]
        .iter()
        .map(|w| w.to_string())
        .collect();
    words.extend(key_patterns().into_iter().map(|p| format!("~{p}")));
    words.extend(COMMANDS.iter().map(|c| format!("+{c}")));
    words
}

/// The whole `ACL SETUSER <user> …` line, as `strata acl-rule` prints it.
pub fn setuser_line(user: &str) -> String {
    format!("ACL SETUSER {user} {}", rule().join(" "))
}

/// For `.map_err`: a `NOPERM` error gains the command and key it refused (`XACK on
/// `rows:{m}`: …`), keeping its code; any other error passes unchanged.
/// Costs nothing unless the call failed (it runs on the hot path's commits).
pub fn denied<'a>(
    command: &'a str,
    key: &'a str,
) -> impl FnOnce(redis::RedisError) -> redis::RedisError + 'a {
    move |e| {
        if e.code() != Some("NOPERM") {
            return e;
        }
        let detail = e.detail().unwrap_or("");
        redis::make_extension_error(
            "NOPERM".to_string(),
            Some(format!("{command} on `{key}`: {detail}")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_covers_every_key_kind_and_names_subcommands() {
        let line = setuser_line("strata");
        for k in StreamKind::ALL {
            assert!(line.contains(&format!(" ~{}:{{* ", k.prefix())), "{line}");
        }
        assert!(line.starts_with("ACL SETUSER strata on resetkeys resetchannels -@all ~"));
        assert!(line.contains(" +xgroup|create "), "{line}");
        assert!(!line.contains('>'), "no password in the rule: {line}");
    }

    #[test]
    fn a_refusal_names_command_and_key_and_stays_noperm() {
        let e = redis::make_extension_error(
            "NOPERM".to_string(),
            Some("this user has no permissions to run the 'xack' command".to_string()),
        );
        let e = denied("XACK", "rows:{m}")(e);
        assert_eq!(e.code(), Some("NOPERM"));
        assert_eq!(crate::error::redis_hint(&e), crate::RetryHint::Fatal);
        let text = e.to_string();
        assert!(text.contains("XACK on `rows:{m}`"), "{text}");
        assert!(text.contains("'xack' command"), "{text}");
        let other = redis::make_extension_error("BUSYGROUP".to_string(), None);
        assert_eq!(denied("X", "k")(other).code(), Some("BUSYGROUP"));
    }
}
