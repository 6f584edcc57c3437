//! Metrics: every name in one place, a Prometheus recorder, and per-loop handles so the hot path
//! records once per batch without building labels each time.
//!
//! Names follow `strata_<what>_<unit>`; labels are `stage`, `stream`, `table`, `group`, `reason`.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Entries read from a stage's input stream (XREADGROUP and XAUTOCLAIM).
pub const ENTRIES_READ: &str = "strata_entries_read_total";
/// Entries acknowledged after their outcome was applied.
pub const ENTRIES_ACKED: &str = "strata_entries_acked_total";
/// Entries (or rows) sent to a dead-letter stream, by reason class.
pub const DEAD_LETTERS: &str = "strata_dead_letters_total";
/// Entries taken over from other consumers by XAUTOCLAIM.
pub const CLAIMED: &str = "strata_entries_claimed_total";
/// Batches retried after a transient fault.
pub const RETRIES: &str = "strata_retries_total";
/// Rows per processed batch.
pub const BATCH_ROWS: &str = "strata_batch_rows";
/// Entry bytes per processed batch.
pub const BATCH_BYTES: &str = "strata_batch_bytes";
/// Rows committed to PostgreSQL.
pub const ROWS_WRITTEN: &str = "strata_rows_written_total";
/// Duration of one COPY transaction (BEGIN … COMMIT).
pub const COPY_DURATION: &str = "strata_copy_duration_seconds";
/// From the producer's XADD (the entry ID's time) to COMMIT, per frame.
pub const END_TO_END_LATENCY: &str = "strata_end_to_end_latency_seconds";
/// Entries of a stream not yet delivered to a group.
pub const GROUP_LAG: &str = "strata_group_lag_entries";
/// Entries of a stream delivered to a group and not acknowledged.
pub const GROUP_PENDING: &str = "strata_group_pending_entries";
/// Entries held in a stream (XLEN).
pub const STREAM_LENGTH: &str = "strata_stream_length_entries";
/// Duration of one object store upload (archiver).
pub const UPLOAD_DURATION: &str = "strata_upload_duration_seconds";
/// Bytes archived to the lake.
pub const ARCHIVED_BYTES: &str = "strata_archived_bytes_total";
/// Chunks by lifecycle state.
pub const CHUNKS: &str = "strata_chunks";
/// Archives that failed verification (each sends its chunk back to archiving), by table.
/// Dead-lettered archival events are counted by `strata_dead_letters_total{stage="archiver"}`.
pub const VERIFY_FAILURES: &str = "strata_archive_verify_failures_total";
/// Chunks dropped after their archive was verified, by table.
pub const CHUNKS_DROPPED: &str = "strata_chunks_dropped_total";

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const ROWS_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0,
];
const BYTES_BUCKETS: &[f64] = &[
    1024.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), ROWS_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_BYTES.into()), BYTES_BUCKETS)
                })
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // A second install (tests running stages twice in one process) keeps the first.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Batches split because their commit step kept failing for a reason that is not transient.
pub const BATCH_SPLITS: &str = "strata_commit_splits_total";

/// `[redis] wait_replicas`: WAITs that got fewer replica acknowledgements than asked in time
/// (each is waited for again), by stage and stream.
pub const REPLICA_WAIT_SHORTFALLS: &str = "strata_replica_wait_shortfalls_total";

/// Entries left pending because even their dead letter could not be written.
pub const STUCK_ENTRIES: &str = "strata_stuck_entries_total";

/// Why an entry (or row) was dead-lettered: the `reason` label of [`DEAD_LETTERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The stage refused the input itself (validation, a malformed frame or event).
    InvalidInput,
    /// PostgreSQL refused a row for a constraint (SQLSTATE class 23).
    Constraint,
    /// PostgreSQL refused a row's data (class 22).
    Data,
    /// PostgreSQL refused a row for another reason (e.g. 54001, XX000).
    Database,
    /// Delivered more than `max_deliveries` times.
    MaxDeliveries,
    /// Its commit step kept failing on its own.
    CommitFailed,
}

impl DeadLetterReason {
    /// The class of a dead letter the stage made, from the SQLSTATE PostgreSQL gave (if any).
    pub fn of_sqlstate(sqlstate: Option<&str>) -> Self {
        match sqlstate {
            Some(s) if s.starts_with("23") => DeadLetterReason::Constraint,
            Some(s) if s.starts_with("22") => DeadLetterReason::Data,
            Some(_) => DeadLetterReason::Database,
            None => DeadLetterReason::InvalidInput,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::InvalidInput => "invalid_input",
            DeadLetterReason::Constraint => "constraint",
            DeadLetterReason::Data => "data",
            DeadLetterReason::Database => "database",
            DeadLetterReason::MaxDeliveries => "max_deliveries",
            DeadLetterReason::CommitFailed => "commit_failed",
        }
    }
}

/// Handles of one stage loop's metrics.
#[derive(Clone)]
pub struct LoopMetrics {
    pub read: Counter,
    pub acked: Counter,
    pub claimed: Counter,
    pub retries: Counter,
    /// Batches split (or single entries dead-lettered) after repeated commit failures.
    pub splits: Counter,
    /// Entries left pending because their dead letter could not be written.
    pub stuck: Counter,
    /// `[redis] wait_replicas` shortfalls of this loop's commit steps and reads.
    pub replica_shortfalls: Counter,
    /// Labels for dead letters, whose reason varies.
    stage: &'static str,
    stream: String,
}

/// The labels naming a stream: `stream` (the key), and for strata's keys its `table` and
/// `partition`, so a partitioned table's series sum with `sum by (table)`.
fn stream_labels(stream: &str) -> Vec<(&'static str, String)> {
    let mut labels = vec![("stream", stream.to_string())];
    if let Some(name) = crate::streams::StreamName::parse(stream) {
        labels.push(("table", name.table));
        labels.push(("partition", name.partition.to_string()));
    }
    labels
}

impl LoopMetrics {
    pub fn new(stage: &'static str, stream: &str) -> Self {
        let mut labels = stream_labels(stream);
        labels.push(("stage", stage.to_string()));
        Self {
            read: counter!(ENTRIES_READ, &labels),
            acked: counter!(ENTRIES_ACKED, &labels),
            claimed: counter!(CLAIMED, &labels),
            retries: counter!(RETRIES, &labels),
            splits: counter!(BATCH_SPLITS, &labels),
            stuck: counter!(STUCK_ENTRIES, &labels),
            replica_shortfalls: counter!(REPLICA_WAIT_SHORTFALLS, &labels),
            stage,
            stream: stream.to_string(),
        }
    }

    pub fn dead_lettered(&self, reason: DeadLetterReason, n: u64) {
        counter!(DEAD_LETTERS, "stage" => self.stage, "stream" => self.stream.clone(), "reason" => reason.label()).increment(n);
    }
}

/// Handles of one loop's batch sizes, recorded once per batch. A loop over one stream is
/// labelled as that stream; a loop over several partitions of a table (the batch-writer's,
/// whose batches span them) as all of them: `stream="rows:{T:*}"` with its `table`, no
/// `partition`.
#[derive(Clone)]
pub struct BatchMetrics {
    pub rows: Histogram,
    pub bytes: Histogram,
}

impl BatchMetrics {
    pub fn new(stage: &'static str, streams: &[&str]) -> Self {
        let mut labels = match streams {
            [one] => stream_labels(one),
            _ => match streams
                .first()
                .and_then(|s| crate::streams::StreamName::parse(s))
            {
                Some(name) => vec![
                    ("stream", name.kind.all_partitions(&name.table)),
                    ("table", name.table),
                ],
                None => vec![("stream", streams.join(","))],
            },
        };
        labels.push(("stage", stage.to_string()));
        Self {
            rows: histogram!(BATCH_ROWS, &labels),
            bytes: histogram!(BATCH_BYTES, &labels),
        }
    }
}

/// Gauges of one stream and group, refreshed by housekeeping.
pub fn group_gauges(stream: &str, group: &str) -> (Gauge, Gauge) {
    let mut labels = stream_labels(stream);
    labels.push(("group", group.to_string()));
    (gauge!(GROUP_LAG, &labels), gauge!(GROUP_PENDING, &labels))
}

/// The XLEN gauge of a stream.
pub fn stream_length(stream: &str) -> Gauge {
    gauge!(STREAM_LENGTH, &stream_labels(stream))
}

/// Handles of one table's writer metrics.
#[derive(Clone)]
pub struct WriterMetrics {
    pub rows_written: Counter,
    pub copy_duration: Histogram,
    pub latency: Histogram,
}

impl WriterMetrics {
    pub fn new(table: &str) -> Self {
        let labels = [("table", table.to_string())];
        Self {
            rows_written: counter!(ROWS_WRITTEN, &labels),
            copy_duration: histogram!(COPY_DURATION, &labels),
            latency: histogram!(END_TO_END_LATENCY, &labels),
        }
    }
}
