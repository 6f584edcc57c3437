//! The one batcher every stage shares: entries are gathered until `max_batch_rows` (by
//! [`Stage::weight`]) or `max_batch_bytes`, or `linger_ms` after the first one arrived —
//! except while the reads come back full: the stream then holds more than one read, so the
//! batch waits for the next read (at most the read's own `block_ms`) instead of going out
//! part-filled because a read was slow (a busy host, many partitions' loops on few cores).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchLimits;
use crate::observe::BatchMetrics;
use crate::streams::Entry;

use super::{Batch, Stage};

/// When a read counts as full, and how long the next one may take.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reads {
    /// `[streams] read_count`: a read that returned this many entries left more in the stream.
    pub(super) count: usize,
    /// `[streams] block_ms`: the longest a read waits for entries, so the longest a batch
    /// waits for the read after a full one.
    pub(super) next_within: Duration,
}

/// Gathers the readers' entries into batches for the workers until the readers end (then
/// flushes what it holds) or the workers are gone.
pub(super) async fn batch_loop<S: Stage>(
    stage: Arc<S>,
    limits: BatchLimits,
    reads: Reads,
    mut rx: mpsc::Receiver<Vec<Entry>>,
    tx: mpsc::Sender<Batch>,
    metrics: BatchMetrics,
) {
    let linger = Duration::from_millis(limits.linger_ms);
    // Hands the gathered entries to the workers (false once they are gone) and records the
    // batch's size, once per batch.
    let flush = |current: &mut Vec<Entry>, rows: usize, bytes: usize| {
        metrics.rows.record(rows as f64);
        metrics.bytes.record(bytes as f64);
        // The next batch will likely be as long: no regrowing it entry by entry.
        let next = Vec::with_capacity(current.len());
        let batch = Batch {
            entries: std::mem::replace(current, next),
        };
        let tx = tx.clone();
        async move { tx.send(batch).await.is_ok() }
    };
    let mut current: Vec<Entry> = Vec::new();
    let (mut rows, mut bytes) = (0usize, 0usize);
    // `linger_ms` after the batch's first entry.
    let mut lingered: Option<Instant> = None;
    // After a full read: when the next read is due at the latest.
    let mut more_due: Option<Instant> = None;
    loop {
        let deadline = due(lingered, more_due);
        let received = match deadline {
            Some(d) => tokio::select! {
                r = rx.recv() => r.map(Some),
                _ = tokio::time::sleep_until(d) => Some(None),
            },
            None => rx.recv().await.map(Some),
        };
        match received {
            None => break,
            Some(None) => {}
            Some(Some(entries)) => {
                more_due =
                    (entries.len() >= reads.count).then(|| Instant::now() + reads.next_within);
                for e in entries {
                    if current.is_empty() {
                        lingered = Some(Instant::now() + linger);
                    }
                    rows += stage.weight(&e);
                    bytes += e.size();
                    current.push(e);
                    if rows >= limits.max_batch_rows || bytes >= limits.max_batch_bytes {
                        if !flush(&mut current, rows, bytes).await {
                            return;
                        }
                        (rows, bytes, lingered) = (0, 0, None);
                    }
                }
            }
        }
        if !current.is_empty() && due(lingered, more_due).is_some_and(|d| d <= Instant::now()) {
            if !flush(&mut current, rows, bytes).await {
                return;
            }
            (rows, bytes, lingered) = (0, 0, None);
        }
    }
    if !current.is_empty() {
        flush(&mut current, rows, bytes).await;
    }
}

/// When a batch started at `lingered` (its first entry plus `linger_ms`) goes out by time: then,
/// or once the read after a full one is overdue (`more_due`), whichever is later; None while
/// the batch is empty.
fn due(lingered: Option<Instant>, more_due: Option<Instant>) -> Option<Instant> {
    let lingered = lingered?;
    Some(more_due.map_or(lingered, |m| lingered.max(m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::Outcome;
    use crate::StageError;

    /// A stage whose entries weigh what their `rows` field says.
    struct Rows;

    impl Stage for Rows {
        async fn process(&self, _batch: &Batch) -> Result<Outcome, StageError> {
            Ok(Outcome::default())
        }

        fn weight(&self, entry: &Entry) -> usize {
            entry
                .field("rows")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(1)
        }
    }

    fn entry(seq: u64, rows: usize, pad: usize) -> Entry {
        Entry::new(
            format!("1-{seq}"),
            [
                ("rows", rows.to_string().into_bytes()),
                ("pad", vec![b'p'; pad]),
            ],
        )
    }

    /// Runs the batcher with `limits`; returns the reader's sender and the batches' receiver.
    fn start(limits: BatchLimits) -> (mpsc::Sender<Vec<Entry>>, mpsc::Receiver<Batch>) {
        let (read_tx, read_rx) = mpsc::channel(4);
        let (batch_tx, batch_rx) = mpsc::channel(4);
        let metrics = BatchMetrics::new("test", &["batch-test"]);
        tokio::spawn(batch_loop(
            Arc::new(Rows),
            limits,
            READS,
            read_rx,
            batch_tx,
            metrics,
        ));
        (read_tx, batch_rx)
    }

    fn ids(batch: &Batch) -> Vec<u64> {
        batch.entries.iter().map(|e| e.id.seq).collect()
    }

    /// Reads of 3 entries are full; the next read is due within 500 ms.
    const READS: Reads = Reads {
        count: 3,
        next_within: Duration::from_millis(500),
    };

    const LIMITS: BatchLimits = BatchLimits {
        max_batch_rows: 10,
        max_batch_bytes: 1000,
        linger_ms: 50,
    };

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_batch_rows_by_weight() {
        let (tx, mut rx) = start(LIMITS);
        tx.send(vec![
            entry(1, 4, 0),
            entry(2, 4, 0),
            entry(3, 4, 0),
            entry(4, 1, 0),
        ])
        .await
        .unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(ids(&first), [1, 2, 3], "4 + 4 + 4 rows reach 10");
        let started = Instant::now();
        let second = rx.recv().await.unwrap();
        assert_eq!(ids(&second), [4]);
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "the rest lingers"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_at_max_batch_bytes() {
        let (tx, mut rx) = start(LIMITS);
        tx.send(vec![entry(1, 1, 600), entry(2, 1, 600), entry(3, 1, 10)])
            .await
            .unwrap();
        assert_eq!(ids(&rx.recv().await.unwrap()), [1, 2]);
        assert_eq!(ids(&rx.recv().await.unwrap()), [3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_batch_waits_linger_ms_from_its_first_entry_then_goes() {
        let (tx, mut rx) = start(LIMITS);
        let started = Instant::now();
        tx.send(vec![entry(1, 1, 0)]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send(vec![entry(2, 1, 0)]).await.unwrap();
        let batch = rx.recv().await.unwrap();
        assert_eq!(ids(&batch), [1, 2]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(50) && waited < Duration::from_millis(80),
            "{waited:?}: linger counts from the first entry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_gathered_is_flushed_when_the_reader_ends() {
        let (tx, mut rx) = start(BatchLimits {
            linger_ms: 60_000,
            ..LIMITS
        });
        tx.send(vec![entry(1, 1, 0)]).await.unwrap();
        drop(tx);
        assert_eq!(ids(&rx.recv().await.unwrap()), [1]);
        assert!(rx.recv().await.is_none(), "then the batcher ends");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_full_read_a_batch_waits_for_the_next_read_past_linger_ms() {
        let (tx, mut rx) = start(LIMITS);
        let started = Instant::now();
        // A full read (3 entries), then the next one 200 ms later: past linger_ms (50).
        tx.send(vec![entry(1, 1, 0), entry(2, 1, 0), entry(3, 1, 0)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send(vec![entry(4, 1, 0)]).await.unwrap();
        let batch = rx.recv().await.unwrap();
        assert_eq!(ids(&batch), [1, 2, 3, 4], "one batch, not cut at linger_ms");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(260),
            "{waited:?}: the read after it was short, so linger_ms from the first entry applies"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_full_read_a_batch_waits_at_most_block_ms_for_the_next() {
        let (tx, mut rx) = start(LIMITS);
        let started = Instant::now();
        tx.send(vec![entry(1, 1, 0), entry(2, 1, 0), entry(3, 1, 0)])
            .await
            .unwrap();
        // No next read (the reader paused, Redis is down): out after next_within.
        let batch = rx.recv().await.unwrap();
        assert_eq!(ids(&batch), [1, 2, 3]);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_millis(560),
            "{waited:?}"
        );
        drop(tx);
    }
}
