//! The one batcher every stage shares: entries are gathered until `max_batch_rows` (by
//! [`Stage::weight`]) or `max_batch_bytes`, or `linger_ms` after the first one arrived.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::BatchLimits;
use crate::observe::LoopMetrics;
use crate::streams::Entry;

use super::{Batch, Stage};

/// Gathers the reader's entries into batches for the workers until the reader ends (then
/// flushes what it holds) or the workers are gone.
pub(super) async fn batch_loop<S: Stage>(
    stage: Arc<S>,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<Vec<Entry>>,
    tx: mpsc::Sender<Batch>,
    metrics: LoopMetrics,
) {
    let linger = Duration::from_millis(limits.linger_ms);
    // Hands the gathered entries to the workers (false once they are gone) and records the
    // batch's size, once per batch.
    let flush = |current: &mut Vec<Entry>, rows: usize, bytes: usize| {
        metrics.batch_rows.record(rows as f64);
        metrics.batch_bytes.record(bytes as f64);
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
    let mut deadline: Option<Instant> = None;
    loop {
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
                for e in entries {
                    if current.is_empty() {
                        deadline = Some(Instant::now() + linger);
                    }
                    rows += stage.weight(&e);
                    bytes += e.size();
                    current.push(e);
                    if rows >= limits.max_batch_rows || bytes >= limits.max_batch_bytes {
                        if !flush(&mut current, rows, bytes).await {
                            return;
                        }
                        (rows, bytes, deadline) = (0, 0, None);
                    }
                }
                if deadline.is_some_and(|d| d > Instant::now()) {
                    continue;
                }
            }
        }
        if !current.is_empty() && deadline.is_some_and(|d| d <= Instant::now()) {
            if !flush(&mut current, rows, bytes).await {
                return;
            }
            (rows, bytes, deadline) = (0, 0, None);
        }
    }
    if !current.is_empty() {
        flush(&mut current, rows, bytes).await;
    }
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
        let metrics = LoopMetrics::new("test", "batch-test");
        tokio::spawn(batch_loop(
            Arc::new(Rows),
            limits,
            read_rx,
            batch_tx,
            metrics,
        ));
        (read_tx, batch_rx)
    }

    fn ids(batch: &Batch) -> Vec<u64> {
        batch.entries.iter().map(|e| e.id.seq).collect()
    }

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
}
