//! Every Redis key strata uses, made here and nowhere else.
//!
//! A table `T` has four streams, `<kind>:{T}`; each stream `S` may have a dead-letter stream
//! `S:dlq` and a claims hash `S:claimed`. The braces are a Redis Cluster hash tag: every key
//! of one table lives in one slot, so one script can span a stage's input and output.
//!
//! A table with `partitions = N` (see [`crate::schema::Schema::partitions`]) has N copies of its
//! producer-facing streams (`telemetry`, `rows`, theirs dead letters and claims): partition 0
//! keeps the tag `{T}` (so an unpartitioned table's keys are its partition 0, and growing N
//! moves nothing), partition `p ≥ 1` uses `{T:p}` ([`partition_tag`]). Each partition's keys
//! share one slot; partitions spread over slots. The lifecycle streams (`archive`, `archived`)
//! concern whole chunks of the table and stay on `{T}`. [`partitions_key`] records the count
//! the running stages read.
//!
//! The kinds are the runtime's vocabulary of a table's streams, not stages: which stage reads
//! which kind, as which consumer group, is said by the stage's entry in `strata-stages`'
//! registry (`StageSpec::input`), and this crate knows no stage's name.

/// Suffix of a dead-letter stream.
const DLQ_SUFFIX: &str = ":dlq";
/// Suffix of a claims hash.
const CLAIMS_SUFFIX: &str = ":claimed";

/// The four kinds of stream strata keeps per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `telemetry:{T}`: producer events.
    Telemetry,
    /// `rows:{T}`: validated frames.
    Rows,
    /// `archive:{T}`: closed chunks to archive.
    Archive,
    /// `archived:{T}`: archived chunks to verify.
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
    pub const fn prefix(self) -> &'static str {
        match self {
            StreamKind::Telemetry => "telemetry",
            StreamKind::Rows => "rows",
            StreamKind::Archive => "archive",
            StreamKind::Archived => "archived",
        }
    }

    /// The stream key of this kind for `table` (its partition 0).
    pub fn key(self, table: &str) -> String {
        self.partition_key(table, 0)
    }

    /// The stream key of this kind for partition `partition` of `table`; kinds that are not
    /// [`partitioned`](Self::partitioned) have only partition 0.
    pub fn partition_key(self, table: &str, partition: u32) -> String {
        format!("{}:{{{}}}", self.prefix(), partition_tag(table, partition))
    }

    /// This kind's streams of every partition of `table` as one name, `telemetry:{T:*}`: the
    /// glob that matches partitions 1… (partition 0 is `telemetry:{T}`), and the label of what
    /// sums over all of them.
    pub fn all_partitions(self, table: &str) -> String {
        format!("{}:{{{table}:*}}", self.prefix())
    }

    /// Whether a table has one stream of this kind per partition (the streams producers write
    /// to and ingest forwards on) rather than one (the chunk lifecycle's, per whole chunk).
    pub const fn partitioned(self) -> bool {
        matches!(self, StreamKind::Telemetry | StreamKind::Rows)
    }
}

/// Most partitions a table may have (`partitions` in a schema).
pub const MAX_PARTITIONS: u32 = 1024;

/// The hash tag of partition `partition` of `table`: `T` for partition 0, `T:p` otherwise.
pub fn partition_tag(table: &str, partition: u32) -> String {
    if partition == 0 {
        table.to_string()
    } else {
        format!("{table}:{partition}")
    }
}

/// The string key holding how many partitions the running stages of `table` read (written by
/// a process that starts with a larger or, once the removed partitions are drained, smaller
/// `partitions`; polled by the others). Tagged `{T}`: it lives with partition 0.
pub fn partitions_key(table: &str) -> String {
    format!("{PARTITIONS_PREFIX}{{{table}}}")
}

/// The prefix of [`partitions_key`] (for the ACL rule's key pattern).
pub const PARTITIONS_PREFIX: &str = "partitions:";

/// A parsed strata stream key: `<kind>:{<table>}` or `<kind>:{<table>:<partition>}`, with an
/// optional `:dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamName {
    /// Which of the table's streams.
    pub kind: StreamKind,
    /// The table of the key's tag.
    pub table: String,
    /// The partition of the key's tag (0 for `{T}`).
    pub partition: u32,
    /// True for the dead-letter stream of that stream.
    pub dlq: bool,
}

impl StreamName {
    /// Parses `key`; None when it is not a key strata uses.
    pub fn parse(key: &str) -> Option<StreamName> {
        let (base, dlq) = match key.strip_suffix(DLQ_SUFFIX) {
            Some(base) => (base, true),
            None => (key, false),
        };
        let (prefix, rest) = base.split_once(':')?;
        let tag = rest.strip_prefix('{')?.strip_suffix('}')?;
        let kind = StreamKind::ALL.into_iter().find(|k| k.prefix() == prefix)?;
        let (table, partition) = match tag.split_once(':') {
            // `{T:p}` with p in canonical form (`{T:0}` and `{T:01}` are not strata's keys).
            Some((table, p)) if kind.partitioned() => {
                let partition: u32 = p.parse().ok()?;
                if partition == 0 || p != partition.to_string() || partition >= MAX_PARTITIONS {
                    return None;
                }
                (table, partition)
            }
            Some(_) => return None,
            None => (tag, 0),
        };
        if table.is_empty() || table.contains(['{', '}', ':']) {
            return None;
        }
        Some(StreamName {
            kind,
            table: table.to_string(),
            partition,
            dlq,
        })
    }

    /// The stream itself (never the dead-letter stream).
    pub fn source(&self) -> String {
        self.kind.partition_key(&self.table, self.partition)
    }

    /// Its dead-letter stream.
    pub fn dlq_key(&self) -> String {
        dlq_stream(&self.source())
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

/// The stream producers XADD to for table `table`.
pub fn telemetry_stream(table: &str) -> String {
    StreamKind::Telemetry.key(table)
}

/// The stream of validated frames between ingest and batch-writer.
pub fn rows_stream(table: &str) -> String {
    StreamKind::Rows.key(table)
}

/// One archival event per closed chunk, from chunk-watcher to archiver.
pub fn archive_stream(table: &str) -> String {
    StreamKind::Archive.key(table)
}

/// One confirmation per archived chunk, from archiver to confirmer.
pub fn archived_stream(table: &str) -> String {
    StreamKind::Archived.key(table)
}

/// The dead-letter stream of `stream`.
pub fn dlq_stream(stream: &str) -> String {
    format!("{stream}{DLQ_SUFFIX}")
}

/// The hash recording, per `<group> <consumer>`, how many of the consumer's entries were
/// claimed (by another consumer of `stream`, or back by itself). A consumer listed there
/// checks, when it commits, that it still owns each entry; one not listed has had nothing
/// taken (see [`super::Consumer::autoclaim`]). A record outlives its consumer's removal from
/// the group, so a process that stalled past `forget_consumer_after_ms` and wakes up still
/// checks; names are unique per process start, so the hash grows by one field per process that
/// ever lost entries.
pub fn claims_key(stream: &str) -> String {
    format!("{stream}{CLAIMS_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_table_hash_tag() {
        assert_eq!(telemetry_stream("m"), "telemetry:{m}");
        assert_eq!(rows_stream("m"), "rows:{m}");
        assert_eq!(archive_stream("m"), "archive:{m}");
        assert_eq!(archived_stream("m"), "archived:{m}");
        assert_eq!(dlq_stream("rows:{m}"), "rows:{m}:dlq");
        assert_eq!(claims_key("rows:{m}"), "rows:{m}:claimed");
        assert_eq!(StreamKind::Telemetry.partition_key("m", 0), "telemetry:{m}");
        assert_eq!(StreamKind::Rows.partition_key("m", 3), "rows:{m:3}");
        assert_eq!(partitions_key("m"), "partitions:{m}");
    }

    #[test]
    fn stream_names_parse_and_rebuild() {
        let n = StreamName::parse("rows:{metrics}:dlq").unwrap();
        assert_eq!(
            n,
            StreamName {
                kind: StreamKind::Rows,
                table: "metrics".into(),
                partition: 0,
                dlq: true
            }
        );
        let p = StreamName::parse("telemetry:{metrics:5}:dlq").unwrap();
        assert_eq!((p.table.as_str(), p.partition, p.dlq), ("metrics", 5, true));
        assert_eq!(p.source(), "telemetry:{metrics:5}");
        assert_eq!(p.key(), "telemetry:{metrics:5}:dlq");
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
            "rows:{m:0}",
            "rows:{m:01}",
            "rows:{m:x}",
            "rows:{m:1024}",
            "rows:{:1}",
            "archive:{m:1}",
            "rows:{m:1:2}",
        ] {
            assert_eq!(StreamName::parse(bad), None, "{bad}");
        }
    }
}
