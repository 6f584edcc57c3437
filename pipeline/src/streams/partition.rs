//! Partitioned tables: which partition an event goes to, and how many partitions the running
//! stages of a table read.
//!
//! A table with `partitions = N` has N copies of its `telemetry` and `rows` streams (keys in
//! [`super::keys`]). Producers pick a partition with [`of_key`]: CRC-32 (ISO-HDLC, the
//! checksum of zlib, PNG and Ethernet) of the partition key's bytes, modulo N. strata reads
//! every partition and checks no event's placement: the hash is the producers' way to keep one
//! key's events in order (order holds within a partition).
//!
//! # The recorded count
//! The hash `partitions:{T}` ([`super::keys::partitions_key`]) holds `count`, the partitions
//! the running stages of `T` read, and `highest`, the most it ever had (what `strata status`
//! probes for leftovers). A process starting with `partitions = N` calls [`adopt`]:
//! - N above `count`: it records N; the processes already running see it within
//!   their poll ([`recorded`]) and start reading the new partitions (growing is online).
//! - N below `count`: it checks that partitions N.. hold nothing undelivered or pending in
//!   any stream (for the groups that read them) and then records N; else it refuses with
//!   [`PartitionError::Shrink`], naming the stream and what it holds.

use redis::aio::ConnectionLike;
use redis::RedisResult;

use super::group::{len, ConsumerGroup};
use super::keys::{partitions_key, StreamKind};

/// Hash field of `partitions:{T}`: the partitions the running stages read.
const COUNT_FIELD: &str = "count";
/// Hash field of `partitions:{T}`: the most partitions the table ever had.
const HIGHEST_FIELD: &str = "highest";

/// The partition (`0..partitions`) of an event whose partition key is `key`: CRC-32/ISO-HDLC
/// of the bytes (a text field as the producer sends it in XADD), modulo `partitions`.
/// `zlib.crc32(key) % partitions` in Python, `crc32.ChecksumIEEE(key) % partitions` in Go.
pub fn of_key(key: &[u8], partitions: u32) -> u32 {
    crc32fast::hash(key) % partitions.max(1)
}

/// The recorded partitions of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Partitions the running stages read.
    pub count: u32,
    /// The most partitions the table ever had (≥ `count`).
    pub highest: u32,
}

/// Why a process may not start with its schema's partition count.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Shrinking would leave entries unread.
    #[error("table `{table}`: partitions = {wanted} would stop reading partition {partition}, whose `{stream}` still holds {what}; let the stages drain it (with the larger count) first")]
    Shrink {
        /// The table.
        table: String,
        /// The count asked for.
        wanted: u32,
        /// The first partition that still holds work.
        partition: u32,
        /// Its stream holding it.
        stream: String,
        /// What it holds, for the message ("3 pending entries of group `ingest`").
        what: String,
    },
    /// Redis refused or failed a call.
    #[error("reading the partitions of `{table}`")]
    Redis {
        /// The table.
        table: String,
        /// The Redis error.
        #[source]
        source: redis::RedisError,
    },
}

impl PartitionError {
    /// A shrink is refused for good; Redis errors as [`crate::error::redis_hint`] says.
    pub fn retry_hint(&self) -> crate::RetryHint {
        match self {
            PartitionError::Shrink { .. } => crate::RetryHint::Fatal,
            PartitionError::Redis { source, .. } => crate::error::redis_hint(source),
        }
    }
}

/// The recorded partitions of `table`; None when no process recorded any (an unpartitioned
/// table, or one whose stages never started).
pub async fn recorded<C: ConnectionLike>(
    conn: &mut C,
    table: &str,
) -> RedisResult<Option<Recorded>> {
    let (count, highest): (Option<u32>, Option<u32>) = redis::cmd("HMGET")
        .arg(partitions_key(table))
        .arg(COUNT_FIELD)
        .arg(HIGHEST_FIELD)
        .query_async(conn)
        .await
        .map_err(super::acl::denied("HMGET", &partitions_key(table)))?;
    Ok(count.map(|count| Recorded {
        count,
        highest: highest.unwrap_or(count).max(count),
    }))
}

/// What a process starting with `wanted` partitions of `table` reads: records `wanted` (see the
/// module doc) and returns it, or refuses a shrink that would leave work unread. `readers`:
/// each partitioned stream kind with the consumer group that reads it.
pub async fn adopt<C: ConnectionLike>(
    conn: &mut C,
    table: &str,
    wanted: u32,
    readers: &[(StreamKind, &str)],
) -> Result<Recorded, PartitionError> {
    let redis = |source| PartitionError::Redis {
        table: table.to_string(),
        source,
    };
    let now = recorded(conn, table).await.map_err(redis)?;
    let current = now.map_or(1, |r| r.count);
    let highest = now.map_or(1, |r| r.highest).max(wanted);
    if wanted < current {
        for partition in wanted..current {
            for (kind, group) in readers {
                let stream = kind.partition_key(table, partition);
                if let Some(what) = unfinished(conn, &stream, group).await.map_err(redis)? {
                    return Err(PartitionError::Shrink {
                        table: table.to_string(),
                        wanted,
                        partition,
                        stream,
                        what,
                    });
                }
            }
        }
    }
    if now.is_some() || wanted != 1 {
        // Two processes starting at once with different counts: the last one's wins, and
        // both read at least what they started with (a grown count is seen by the poll).
        let key = partitions_key(table);
        let () = redis::cmd("HSET")
            .arg(&key)
            .arg(COUNT_FIELD)
            .arg(wanted)
            .arg(HIGHEST_FIELD)
            .arg(highest)
            .query_async(conn)
            .await
            .map_err(super::acl::denied("HSET", &key))
            .map_err(redis)?;
    }
    Ok(Recorded {
        count: wanted,
        highest,
    })
}

/// What `stream` still holds for `group`: entries not yet delivered to it, or delivered and
/// not acknowledged; None when it holds nothing the group has not finished with.
pub async fn unfinished<C: ConnectionLike>(
    conn: &mut C,
    stream: &str,
    group: &str,
) -> RedisResult<Option<String>> {
    let n = len(conn, stream).await?;
    if n == 0 {
        return Ok(None);
    }
    let g = ConsumerGroup::new(stream, group);
    let Some(info) = g.info(conn).await? else {
        return Ok(Some(format!("{n} entries never read by group `{group}`")));
    };
    if info.pending > 0 {
        return Ok(Some(format!(
            "{} pending entries of group `{group}`",
            info.pending
        )));
    }
    Ok(g.has_undelivered(conn, &info)
        .await?
        .then(|| format!("entries not yet delivered to group `{group}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_crc32_iso_hdlc_modulo_the_count() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(of_key(b"123456789", 1), 0);
        assert_eq!(of_key(b"123456789", 7), 0xCBF4_3926 % 7);
        assert_eq!(of_key(b"host-1", 0), 0, "no partitions: partition 0");
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|i| of_key(format!("host-{i}").as_bytes(), 6))
            .collect();
        assert_eq!(spread.len(), 6, "keys spread over every partition");
    }
}
