//! The Redis queries operator commands share: a connection with timeouts, key types, lengths,
//! ranges, pending-entry summaries and consumers. All read-only; replies in RESP2 or RESP3.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use strata_pipeline::config::Config;
use strata_pipeline::streams::{self, Entry};

use super::{redact_url, OpsError};

/// One connection to the configured Redis, checked with PING; a failure names the server.
pub async fn connect(config: &Config) -> Result<MultiplexedConnection, OpsError> {
    let url = redact_url(&config.redis.url);
    let fail = |e: redis::RedisError| OpsError::RedisConnect {
        url: url.clone(),
        reason: e.to_string(),
    };
    let client = redis::Client::open(config.redis.url.as_str()).map_err(fail)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(fail)?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(fail)?;
    Ok(conn)
}

/// What `TYPE key` says: `stream`, `none` (absent), `string`, …
pub async fn key_type<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<String, OpsError> {
    Ok(redis::cmd("TYPE").arg(key).query_async(conn).await?)
}

/// Fails unless `key` is a stream or absent; true when it exists.
pub async fn stream_exists<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<bool, OpsError> {
    match key_type(conn, key).await?.as_str() {
        "stream" => Ok(true),
        "none" => Ok(false),
        other => Err(OpsError::NotAStream {
            key: key.to_string(),
            kind: other.to_string(),
        }),
    }
}

/// XLEN; 0 for an absent stream.
pub async fn xlen<C: redis::aio::ConnectionLike>(conn: &mut C, key: &str) -> Result<u64, OpsError> {
    Ok(redis::cmd("XLEN").arg(key).query_async(conn).await?)
}

/// XRANGE `key` `start` `end` COUNT `count`.
pub async fn xrange<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Result<Vec<Entry>, OpsError> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(conn)
        .await?;
    Ok(streams::parse_entries(reply, 0).0)
}

/// The server's clock in milliseconds (stream IDs come from it, so ages are computed with it).
pub async fn server_time_ms<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<u64, OpsError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// The milliseconds part of a stream ID.
pub fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// XPENDING's summary form for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingSummary {
    /// Entries delivered and not acknowledged.
    pub count: u64,
    /// The smallest pending ID: the oldest entry still in flight.
    pub smallest: Option<String>,
    /// The largest pending ID.
    pub largest: Option<String>,
    /// Pending entries per consumer that holds any.
    pub per_consumer: Vec<(String, u64)>,
}

/// `XPENDING stream group`; empty when the stream or group is absent.
pub async fn pending_summary<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> Result<PendingSummary, OpsError> {
    let reply = match redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async::<Value>(conn)
        .await
    {
        Ok(v) => v,
        Err(e) if missing(&e) => return Ok(PendingSummary::default()),
        Err(e) => return Err(e.into()),
    };
    let Value::Array(parts) = reply else {
        return Ok(PendingSummary::default());
    };
    let mut it = parts.into_iter();
    let count = it.next().as_ref().and_then(int).unwrap_or(0);
    let smallest = it.next().and_then(text);
    let largest = it.next().and_then(text);
    let mut per_consumer = Vec::new();
    if let Some(Value::Array(rows)) = it.next() {
        for row in rows {
            if let Value::Array(cols) = row {
                let mut c = cols.into_iter();
                if let (Some(name), Some(n)) = (c.next().and_then(text), c.next()) {
                    // The count comes as a bulk string.
                    let n = int(&n)
                        .or_else(|| text(n).and_then(|s| s.parse().ok()))
                        .unwrap_or(0);
                    per_consumer.push((name, n));
                }
            }
        }
    }
    Ok(PendingSummary {
        count,
        smallest,
        largest,
        per_consumer,
    })
}

/// One pending entry, from XPENDING's extended form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEntry {
    /// The entry's stream ID.
    pub id: String,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How often it has been delivered.
    pub deliveries: u64,
}

/// The pending entry `id` of `group`, if it is pending.
pub async fn pending_entry<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
    id: &str,
) -> Result<Option<PendingEntry>, OpsError> {
    let reply = match redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async::<Value>(conn)
        .await
    {
        Ok(v) => v,
        Err(e) if missing(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Value::Array(rows) = reply else {
        return Ok(None);
    };
    let Some(Value::Array(cols)) = rows.into_iter().next() else {
        return Ok(None);
    };
    let mut c = cols.into_iter();
    let (Some(id), Some(consumer), Some(idle), Some(n)) = (
        c.next().and_then(text),
        c.next().and_then(text),
        c.next(),
        c.next(),
    ) else {
        return Ok(None);
    };
    Ok(Some(PendingEntry {
        id,
        consumer,
        idle_ms: int(&idle).unwrap_or(0),
        deliveries: int(&n).unwrap_or(0),
    }))
}

/// One consumer of a group, from XINFO CONSUMERS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// The consumer name (`<stage>-<host>-<pid>-<random>` for strata's stages).
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last asked for entries (read or claim).
    pub idle_ms: u64,
    /// Milliseconds since it last got entries; Redis 7.2 and later, None before (or never).
    pub inactive_ms: Option<u64>,
}

/// XINFO CONSUMERS; empty when the stream or group is absent.
pub async fn consumers<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> Result<Vec<ConsumerInfo>, OpsError> {
    let reply = match redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async::<Value>(conn)
        .await
    {
        Ok(v) => v,
        Err(e) if missing(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in items {
        let mut c = ConsumerInfo {
            name: String::new(),
            pending: 0,
            idle_ms: 0,
            inactive_ms: None,
        };
        for (k, v) in pairs(item) {
            match k.as_str() {
                "name" => c.name = text(v).unwrap_or_default(),
                "pending" => c.pending = int(&v).unwrap_or(0),
                "idle" => c.idle_ms = int(&v).unwrap_or(0),
                // -1 means the consumer never got an entry.
                "inactive" => c.inactive_ms = signed(&v).and_then(|n| u64::try_from(n).ok()),
                _ => {}
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// True for the errors of a stream or group that does not exist (yet).
fn missing(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("no such key")
}

/// A map reply as (key, value) pairs, in RESP2 (flat array) or RESP3 (map).
fn pairs(v: Value) -> Vec<(String, Value)> {
    let flat = match v {
        Value::Map(m) => {
            return m
                .into_iter()
                .filter_map(|(k, v)| Some((text(k)?, v)))
                .collect()
        }
        Value::Array(flat) => flat,
        _ => return Vec::new(),
    };
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Some(k) = text(k) {
            out.push((k, v));
        }
    }
    out
}

fn signed(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn int(v: &Value) -> Option<u64> {
    signed(v).and_then(|n| u64::try_from(n).ok())
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}
