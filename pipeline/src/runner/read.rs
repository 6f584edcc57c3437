//! The reader of a loop: new entries (XREADGROUP), idle ones (XAUTOCLAIM), back-pressure, and
//! the reads still in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::error::{error_chain, redis_hint, RetryHint, StageError, REDIS_FATAL_CODES};
use crate::observe::LoopMetrics;
use crate::streams::{self, Entry, Held, ReadConnection, ReadError, ReadSpan, StreamId};

use super::{Backoff, LoopSpec, LoopStats};

/// The reads whose entries are not all acknowledged yet: each entry holds its read's span, so
/// a span lives exactly as long as some entry of it is in flight.
pub(super) type InFlight = Arc<std::sync::Mutex<Vec<std::sync::Weak<ReadSpan>>>>;

/// Registers a read of input `input` of its loop as in flight and ties its entries to it (and
/// marks them as of that input). XREADGROUP and XAUTOCLAIM both reply in ID order, so the first
/// and last entries bound the read.
pub(super) fn hold(in_flight: &InFlight, input: u16, entries: &mut [Entry]) {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return;
    };
    let span = Arc::new(ReadSpan {
        first: first.id,
        last: last.id,
    });
    let mut list = in_flight.lock().expect("in-flight list");
    list.retain(|w| w.strong_count() > 0);
    list.push(Arc::downgrade(&span));
    drop(list);
    for e in entries {
        e.held = Held(Some(span.clone()));
        e.input = input;
    }
}

/// A read that failed: why, and whether a retry can mend it.
pub(super) struct ReadFailure {
    /// The error with its causes, naming the command and key when Redis refused them.
    reason: String,
    /// The account may not read (NOPERM) or log in: no retry helps, the loop stops.
    fatal: bool,
}

impl ReadFailure {
    fn redis(e: &redis::RedisError) -> Self {
        Self {
            // A Redis error's Display already holds its detail.
            reason: e.to_string(),
            fatal: redis_hint(e) == RetryHint::Fatal,
        }
    }

    /// A failure of the loop's own read connection; an error reply is fatal by its code.
    fn own(e: &ReadError, spec: &LoopSpec) -> Self {
        let fatal = matches!(e, ReadError::Reply(r) if r.code().is_some_and(|c| REDIS_FATAL_CODES.contains(&c)));
        let reason = if fatal {
            format!("XREADGROUP on `{}`: {}", spec.input, error_chain(e))
        } else {
            error_chain(e)
        };
        Self { reason, fatal }
    }
}

/// Reads until `stop`, marking each entry as of input `index` of its loop; returns a fatal
/// error (the account may not read) after logging it, so the loop stops instead of retrying for
/// ever.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_loop(
    spec: Arc<LoopSpec>,
    index: u16,
    redis: crate::db::RedisPool,
    stop: CancellationToken,
    tx: mpsc::Sender<Vec<Entry>>,
    stats: Arc<LoopStats>,
    in_flight: InFlight,
    metrics: LoopMetrics,
) -> Result<(), StageError> {
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    let mut pressure = BackPressure::default();
    let claim_every = Duration::from_millis(spec.streams.claim_interval_ms.max(1));
    let mut next_claim = Instant::now();
    let mut cursor = StreamId::ZERO;
    let mut conn: Option<crate::db::RedisConnection> = None;
    let mut reader: Option<ReadConnection> = None;
    while !stop.is_cancelled() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match redis.get().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    super::warn_redis_unavailable(&spec, &e);
                    backoff.wait(&stop).await;
                    continue;
                }
            },
        };
        if let (Some(limit), Some(output)) = (spec.output_high_watermark, spec.output.as_deref()) {
            match pressure.wait_below(c, output, limit, &stop, &spec).await {
                Ok(()) => {}
                Err(e) => {
                    warn!(stage = spec.stage, error = %e, "back-pressure check failed, retrying");
                    conn = None;
                    backoff.wait(&stop).await;
                    continue;
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        let res = if Instant::now() >= next_claim {
            let r = spec
                .consumer()
                .autoclaim(
                    c,
                    spec.streams.claim_idle_ms,
                    cursor,
                    spec.streams.read_count,
                )
                .await;
            match r {
                Ok(streams::Claimed {
                    entries,
                    deleted,
                    next,
                }) => {
                    if next == StreamId::ZERO {
                        next_claim = Instant::now() + claim_every;
                    }
                    cursor = next;
                    if !entries.is_empty() {
                        info!(stage = spec.stage, stream = %spec.input, count = entries.len(), "claimed idle entries");
                        stats
                            .claimed
                            .fetch_add(entries.len() as u64, Ordering::Relaxed);
                        metrics.claimed.increment(entries.len() as u64);
                    }
                    Ok((entries, deleted))
                }
                Err(e) => Err(ReadFailure::redis(&e)),
            }
        } else {
            let block = spec
                .streams
                .block_ms
                .min(
                    next_claim
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64,
                )
                .max(1);
            read_new(&spec, c, &mut reader, block)
                .await
                .map(|entries| (entries, Vec::new()))
        };
        match res {
            Ok((mut entries, deleted)) => {
                backoff.reset();
                if !deleted.is_empty() {
                    // Trimmed while pending: there is nothing left to process.
                    warn!(
                        stage = spec.stage,
                        count = deleted.len(),
                        "pending entries were deleted from the stream"
                    );
                    let _ = spec.consumer().group.ack(c, &deleted).await;
                }
                if !entries.is_empty() {
                    if let (Some(wait), true) = (spec.replicas, spec.wait_before_apply) {
                        if !replicated(&spec, c, &entries, wait, &metrics, &stop).await {
                            // Not handed over and not in flight (so not touched): the entries
                            // stay pending and are claimed again after claim_idle_ms.
                            conn = None;
                            backoff.wait(&stop).await;
                            continue;
                        }
                    }
                    metrics.read.increment(entries.len() as u64);
                    hold(&in_flight, index, &mut entries);
                    if tx.send(entries).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) if e.fatal => {
                error!(stage = spec.stage, stream = %spec.input, error = %e.reason, "read refused: stopping");
                return Err(StageError::fatal(format!(
                    "reading {}: {}",
                    spec.input, e.reason
                )));
            }
            Err(e) => {
                warn!(stage = spec.stage, stream = %spec.input, error = %e.reason, "read failed, retrying");
                conn = None;
                backoff.wait(&stop).await;
            }
        }
    }
    Ok(())
}

/// `[redis] wait_replicas` for a stage whose effects leave Redis: true once the node serving
/// the stream holds every entry just read as pending for this consumer and replicas hold them
/// ([`streams::Consumer::touch_then_wait`], one span per entry, so the count it replies is
/// exactly the entries of the batch found there), waiting again after a shortfall (counted).
/// False, and the entries must not be applied, when the connection failed, at shutdown, or
/// when the node does not hold them all as ours: after a failover the promoted replica may
/// never have received them (lost: they are produced again under other IDs) or this read
/// (they are delivered again).
async fn replicated(
    spec: &LoopSpec,
    conn: &mut crate::db::RedisConnection,
    entries: &[Entry],
    wait: crate::db::ReplicaWait,
    metrics: &LoopMetrics,
    stop: &CancellationToken,
) -> bool {
    let spans: Vec<Arc<ReadSpan>> = entries
        .iter()
        .map(|e| {
            Arc::new(ReadSpan {
                first: e.id,
                last: e.id,
            })
        })
        .collect();
    loop {
        let (touched, acked) = match spec.consumer().touch_then_wait(conn, &spans, wait).await {
            Ok(r) => r,
            Err(e) => {
                warn!(stage = spec.stage, stream = %spec.input, error = %e, "waiting for replicas of the entries read failed");
                return false;
            }
        };
        if touched < entries.len() as u64 {
            warn!(stage = spec.stage, stream = %spec.input, held = touched, read = entries.len(), "the stream's node no longer holds entries read (a failover?): not applying them");
            return false;
        }
        if acked >= u64::from(wait.replicas) {
            return true;
        }
        metrics.replica_shortfalls.increment(1);
        warn!(stage = spec.stage, stream = %spec.input, acked, wanted = wait.replicas, "entries read are not replicated yet, waiting again");
        if stop.is_cancelled() {
            return false;
        }
    }
}

/// Reads new entries: over the loop's own connection when it has a `read_from` (reconnecting
/// after a failure), else over the pooled one.
pub(super) async fn read_new(
    spec: &LoopSpec,
    pooled: &mut crate::db::RedisConnection,
    own: &mut Option<ReadConnection>,
    block_ms: u64,
) -> Result<Vec<Entry>, ReadFailure> {
    let consumer = spec.consumer();
    let count = spec.streams.read_count;
    let Some(target) = spec.read_from.as_ref() else {
        return consumer
            .read_new(pooled, count, block_ms)
            .await
            .map(|(entries, _)| entries)
            .map_err(|e| ReadFailure::redis(&e));
    };
    let conn = match own {
        Some(conn) => conn,
        None => own.insert(
            ReadConnection::connect(target)
                .await
                .map_err(|e| ReadFailure::own(&e, spec))?,
        ),
    };
    let read = conn.read_new(&consumer, count, block_ms).await;
    read.map_err(|e| {
        *own = None;
        ReadFailure::own(&e, spec)
    })
}

/// Waits while the output stream is over its high watermark, checking at most every 200 ms.
#[derive(Default)]
pub(super) struct BackPressure {
    /// When the output length was last read.
    checked: Option<Instant>,
    /// Whether we are currently holding back (to log once per episode).
    holding: bool,
}

impl BackPressure {
    async fn wait_below(
        &mut self,
        conn: &mut crate::db::RedisConnection,
        output: &str,
        limit: u64,
        stop: &CancellationToken,
        spec: &LoopSpec,
    ) -> redis::RedisResult<()> {
        loop {
            if self
                .checked
                .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
                && !self.holding
            {
                return Ok(());
            }
            let len = streams::len(conn, output).await?;
            self.checked = Some(Instant::now());
            if len <= limit {
                if self.holding {
                    info!(stage = spec.stage, stream = %output, len, "back-pressure released");
                    self.holding = false;
                }
                return Ok(());
            }
            if !self.holding {
                warn!(stage = spec.stage, stream = %output, len, limit, "output backlog over its high watermark: pausing reads");
                self.holding = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }
}
