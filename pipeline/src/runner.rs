//! The consumer loop every stage shares: read (and claim), batch, process, commit.
//!
//! A stage only turns a batch into an [`Outcome`]; the runner decides delivery from the
//! outcome or from the error's [`RetryHint`]:
//! - `Ok(outcome)`: forward, dead-letter and acknowledge in one atomic Redis step;
//! - `Backoff`: keep the entries pending and retry the same batch with capped exponential
//!   backoff and jitter, however long it takes (until shutdown, which leaves them pending);
//! - `DeadLetter`: split the batch until the offending entry is alone, dead-letter it, and
//!   process the rest;
//! - `Fatal`: stop this process with the error; the entries stay pending.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::{BatchLimits, StreamsConfig};
use crate::error::{error_chain, RetryHint, StageError};
use crate::observe::{self, DeadLetterReason, LoopMetrics};
use crate::streams::{
    self, CommitStep, Consumer, ConsumerGroup, Entry, Fields, Held, ReadConnection, ReadSpan,
    StreamId,
};

/// A batch of entries handed to a stage.
#[derive(Debug)]
pub struct Batch {
    pub entries: Vec<Entry>,
}

/// A rejected input, by position in the batch.
#[derive(Debug)]
pub struct DeadLetter {
    /// Index of the entry in the batch it came from.
    pub entry: usize,
    /// Fields to dead-letter; `None` means the entry's original fields.
    pub fields: Option<Fields>,
    /// Why, naming the field or row.
    pub error: String,
    /// The SQLSTATE, when PostgreSQL rejected it.
    pub sqlstate: Option<String>,
}

/// What a stage made of a batch. Every entry of the batch is acknowledged with it.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Entries to add to the stage's output stream.
    pub forward: Vec<Fields>,
    /// Inputs (or parts of inputs) rejected for good.
    pub dead_letters: Vec<DeadLetter>,
}

/// One stage: turns a batch into an outcome.
pub trait Stage: Send + Sync + 'static {
    fn process(&self, batch: &Batch) -> impl Future<Output = Result<Outcome, StageError>> + Send;

    /// How many rows an entry carries, for `max_batch_rows`.
    fn weight(&self, _entry: &Entry) -> usize {
        1
    }
}

/// Counters of one stage loop, shared with whoever wants a summary.
#[derive(Debug, Default)]
pub struct LoopStats {
    /// Entries acknowledged (processed, forwarded or dead-lettered).
    pub acked: AtomicU64,
    /// Entries or rows sent to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Entries taken over from other consumers by XAUTOCLAIM.
    pub claimed: AtomicU64,
}

/// Where and how a stage loop runs.
#[derive(Clone)]
pub struct LoopSpec {
    /// Stage name, which is also the consumer group.
    pub stage: &'static str,
    /// Stream read from.
    pub input: String,
    /// Stream written to (the dead-letter stream when the stage forwards nothing).
    pub output: Option<String>,
    /// This process's unique consumer name.
    pub consumer: String,
    /// Batch limits of the shared batcher.
    pub limits: BatchLimits,
    /// Batches processed at once.
    pub workers: usize,
    /// Reading, claiming and retry settings.
    pub streams: StreamsConfig,
    /// Back-pressure: stop reading while `output` holds more entries than this.
    pub output_high_watermark: Option<u64>,
    /// Where new entries are read with a connection of the loop's own (see
    /// [`streams::ReadConnection`]);
    /// `None` reads through the pool, for loops where volume is low.
    pub read_url: Option<String>,
}

/// The reads whose entries are not all acknowledged yet: each entry holds its read's span, so
/// a span lives exactly as long as some entry of it is in flight.
type InFlight = Arc<std::sync::Mutex<Vec<std::sync::Weak<ReadSpan>>>>;

/// Registers a read as in flight and ties its entries to it. XREADGROUP and XAUTOCLAIM both
/// reply in ID order, so the first and last entries bound the read.
fn hold(in_flight: &InFlight, entries: &mut [Entry]) {
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
    }
}

impl LoopSpec {
    /// This loop's consumer of its group on its input.
    pub fn consumer(&self) -> Consumer<'_> {
        Consumer::new(&self.input, self.stage, &self.consumer)
    }

    /// A loop of `stage` (also its consumer group) from `input` to `output`, with a consumer
    /// name unique to this process and no back-pressure.
    pub fn new(
        stage: &'static str,
        input: String,
        output: Option<String>,
        limits: BatchLimits,
        workers: usize,
        streams: StreamsConfig,
    ) -> Self {
        Self {
            stage,
            input,
            output,
            consumer: streams::consumer_name(stage),
            limits,
            workers,
            streams,
            output_high_watermark: None,
            read_url: None,
        }
    }
}

/// Runs one stage loop until `shutdown` fires (then finishes what it read and returns Ok) or a
/// fatal error occurs.
pub async fn run_loop<S: Stage>(
    stage: Arc<S>,
    spec: LoopSpec,
    redis: deadpool_redis::Pool,
    shutdown: CancellationToken,
    stats: Arc<LoopStats>,
) -> Result<(), StageError> {
    let spec = Arc::new(spec);
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    loop {
        let mut conn = retry_redis(&redis, &shutdown, &spec).await?;
        match ConsumerGroup::new(&spec.input, spec.stage)
            .ensure(&mut conn)
            .await
        {
            Ok(()) => break,
            Err(e) if crate::error::redis_hint(&e) == RetryHint::Backoff => {
                warn!(stage = spec.stage, stream = %spec.input, error = %e, "cannot create the consumer group yet, retrying");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
            Err(e) => {
                return Err(StageError::fatal(format!(
                    "creating consumer group {} on {}: {e}",
                    spec.stage, spec.input
                )))
            }
        }
    }
    info!(stage = spec.stage, stream = %spec.input, consumer = %spec.consumer, "consumer started");
    let (read_tx, read_rx) = mpsc::channel::<Vec<Entry>>(2);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(spec.workers);
    // Fatal errors stop the reader too, so a failing worker does not keep claiming entries.
    let stop = shutdown.child_token();

    let in_flight = InFlight::default();
    let metrics = LoopMetrics::new(spec.stage, &spec.input);
    crate::admin::RUNNING_LOOPS.fetch_add(1, Ordering::Relaxed);
    let reader = tokio::spawn(read_loop(
        spec.clone(),
        redis.clone(),
        stop.clone(),
        read_tx,
        stats.clone(),
        in_flight.clone(),
        metrics.clone(),
    ));
    let keeper = tokio::spawn(housekeeping(
        spec.clone(),
        redis.clone(),
        stop.clone(),
        in_flight,
    ));
    let batcher = tokio::spawn(batch_loop(
        stage.clone(),
        spec.limits,
        read_rx,
        batch_tx,
        metrics.clone(),
    ));
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let mut workers = Vec::new();
    for _ in 0..spec.workers {
        let w = Worker {
            stage: stage.clone(),
            spec: spec.clone(),
            redis: redis.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
            metrics: metrics.clone(),
        };
        let rx = batch_rx.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(batch) = next else { return Ok(()) };
                if let Err(e) = w.handle(batch).await {
                    w.stop.cancel();
                    return Err(e);
                }
            }
        }));
    }
    let mut result = Ok(());
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(join) => result = Err(StageError::fatal(format!("worker panicked: {join}"))),
        }
    }
    // Workers end only when the batcher closed, i.e. the reader ended, or on a fatal error.
    stop.cancel();
    let _ = batcher.await;
    let _ = reader.await;
    let _ = keeper.await;
    crate::admin::RUNNING_LOOPS.fetch_sub(1, Ordering::Relaxed);
    if let Ok(mut conn) = redis.get().await {
        if let Err(e) = spec.consumer().remove_if_idle(&mut conn).await {
            debug!(error = %e, "could not remove consumer");
        }
    }
    info!(
        stage = spec.stage,
        stream = %spec.input,
        consumer = %spec.consumer,
        acked = stats.acked.load(Ordering::Relaxed),
        dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
        "consumer stopped"
    );
    result
}

async fn retry_redis(
    redis: &deadpool_redis::Pool,
    shutdown: &CancellationToken,
    spec: &LoopSpec,
) -> Result<deadpool_redis::Connection, StageError> {
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    loop {
        match redis.get().await {
            Ok(c) => return Ok(c),
            Err(e) => {
                warn!(stage = spec.stage, error = %e, "redis unavailable, retrying");
                if !backoff.wait(shutdown).await {
                    return Err(StageError::backoff("shutdown while waiting for redis"));
                }
            }
        }
    }
}

async fn read_loop(
    spec: Arc<LoopSpec>,
    redis: deadpool_redis::Pool,
    stop: CancellationToken,
    tx: mpsc::Sender<Vec<Entry>>,
    stats: Arc<LoopStats>,
    in_flight: InFlight,
    metrics: LoopMetrics,
) {
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    let mut pressure = BackPressure::default();
    let claim_every = Duration::from_millis(spec.streams.claim_interval_ms.max(1));
    let mut next_claim = Instant::now();
    let mut cursor = StreamId::ZERO;
    let mut conn: Option<deadpool_redis::Connection> = None;
    let mut reader: Option<ReadConnection> = None;
    while !stop.is_cancelled() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match redis.get().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    warn!(stage = spec.stage, error = %e, "redis unavailable, retrying");
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
                Err(e) => Err(error_chain(&e)),
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
                    metrics.read.increment(entries.len() as u64);
                    hold(&in_flight, &mut entries);
                    if tx.send(entries).await.is_err() {
                        break;
                    }
                }
            }
            Err(e) => {
                warn!(stage = spec.stage, stream = %spec.input, error = %e, "read failed, retrying");
                conn = None;
                backoff.wait(&stop).await;
            }
        }
    }
}

/// Reads new entries: over the loop's own connection when it has a `read_url` (reconnecting
/// after a failure), else over the pooled one.
async fn read_new(
    spec: &LoopSpec,
    pooled: &mut deadpool_redis::Connection,
    own: &mut Option<ReadConnection>,
    block_ms: u64,
) -> Result<Vec<Entry>, String> {
    let consumer = spec.consumer();
    let count = spec.streams.read_count;
    let Some(url) = spec.read_url.as_deref() else {
        return consumer
            .read_new(pooled, count, block_ms)
            .await
            .map(|(entries, _)| entries)
            .map_err(|e| error_chain(&e));
    };
    let conn = match own {
        Some(conn) => conn,
        None => own.insert(
            ReadConnection::connect(url)
                .await
                .map_err(|e| error_chain(&e))?,
        ),
    };
    let read = conn.read_new(&consumer, count, block_ms).await;
    read.map_err(|e| {
        *own = None;
        error_chain(&e)
    })
}

async fn batch_loop<S: Stage>(
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

struct Worker<S> {
    /// The stage that turns batches into outcomes.
    stage: Arc<S>,
    /// Streams, group, consumer, limits.
    spec: Arc<LoopSpec>,
    /// Connections for the commit step.
    redis: deadpool_redis::Pool,
    /// Stops retries at shutdown (or after a fatal error elsewhere).
    stop: CancellationToken,
    /// Counters for summaries.
    stats: Arc<LoopStats>,
    /// Per-batch counters and histograms.
    metrics: LoopMetrics,
}

/// Where the outcome of a batch came from, which decides its dead letters' `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The stage made it (its dead letters are classed by SQLSTATE).
    Stage,
    /// The runner dead-letters entries delivered more than `max_deliveries` times.
    MaxDeliveries,
    /// The runner dead-letters one entry whose commit step kept failing on its own.
    CommitFailed,
}

/// A batch waiting to be delivered, with its outcome when it is already known.
struct Todo {
    batch: Batch,
    outcome: Option<(Outcome, Origin)>,
}

/// Commit attempts that fail for a reason that is not transient before the batch is split.
pub const MAX_COMMIT_ATTEMPTS: u32 = 3;

/// Why a commit step did not apply.
enum CommitFailure {
    /// It failed [`MAX_COMMIT_ATTEMPTS`] times for a reason that is not transient.
    Stuck(StageError),
    /// Redis refused it in a way no retry mends (permissions): stop the process.
    Fatal(StageError),
}

impl<S: Stage> Worker<S> {
    /// Entries delivered more than `max_deliveries` times, each with its dead letter.
    fn over_delivered(&self, batch: Batch) -> Todo {
        let max = self.spec.streams.max_deliveries;
        let outcome = Outcome {
            forward: Vec::new(),
            dead_letters: batch
                .entries
                .iter()
                .enumerate()
                .map(|(i, e)| DeadLetter {
                    entry: i,
                    fields: None,
                    error: format!(
                        "delivered {} times, more than max_deliveries = {max}",
                        e.deliveries
                    ),
                    sqlstate: None,
                })
                .collect(),
        };
        Todo {
            batch,
            outcome: Some((outcome, Origin::MaxDeliveries)),
        }
    }

    /// Delivers one batch: Ok once every entry is acknowledged (or left pending at shutdown).
    async fn handle(&self, batch: Batch) -> Result<(), StageError> {
        let max = self.spec.streams.max_deliveries;
        let (over, fresh): (Vec<Entry>, Vec<Entry>) =
            if batch.entries.iter().any(|e| e.deliveries > max) {
                batch.entries.into_iter().partition(|e| e.deliveries > max)
            } else {
                (Vec::new(), batch.entries)
            };
        let mut todo = Vec::new();
        if !over.is_empty() {
            todo.push(self.over_delivered(Batch { entries: over }));
        }
        if !fresh.is_empty() {
            todo.push(Todo {
                batch: Batch { entries: fresh },
                outcome: None,
            });
        }
        let mut backoff = Backoff::new(self.spec.streams.max_backoff_ms);
        while let Some(Todo { mut batch, outcome }) = todo.pop() {
            let result = match outcome {
                Some(ready) => Ok(ready),
                None => {
                    let span = tracing::info_span!("process", stage = self.spec.stage, stream = %self.spec.input, entries = batch.entries.len());
                    self.stage
                        .process(&batch)
                        .instrument(span)
                        .await
                        .map(|o| (o, Origin::Stage))
                }
            };
            match result {
                Ok((outcome, origin)) => {
                    match self.commit(&batch, outcome, origin, &mut backoff).await {
                        Ok(lost) => {
                            if !lost.is_empty() {
                                info!(
                                    stage = self.spec.stage,
                                    count = lost.len(),
                                    "entries are no longer pending (claimed by another consumer, or acknowledged by an earlier attempt of this commit); redoing the rest"
                                );
                                batch.entries.retain(|e| !lost.contains(&e.id));
                                if !batch.entries.is_empty() {
                                    todo.push(Todo {
                                        batch,
                                        outcome: None,
                                    });
                                }
                            }
                        }
                        Err(CommitFailure::Fatal(e)) => return Err(e),
                        Err(CommitFailure::Stuck(e)) if origin == Origin::CommitFailed => {
                            // Even the entry's own dead letter cannot be written (the
                            // dead-letter stream is broken): leave the entry pending, so the rest
                            // keeps flowing; it is claimed and tried again after claim_idle_ms.
                            self.metrics.stuck.increment(1);
                            tracing::error!(stage = self.spec.stage, stream = %self.spec.input, entry = %batch.entries[0].id, dlq = %streams::dlq_stream(&self.spec.input), error = %e.reason(), "cannot dead-letter this entry: leaving it pending");
                        }
                        Err(CommitFailure::Stuck(e)) => {
                            self.metrics.splits.increment(1);
                            if batch.entries.len() > 1 {
                                warn!(stage = self.spec.stage, stream = %self.spec.input, error = %e.reason(), entries = batch.entries.len(), attempts = MAX_COMMIT_ATTEMPTS, "commit keeps failing: splitting the batch");
                                let right = Batch {
                                    entries: batch.entries.split_off(batch.entries.len() / 2),
                                };
                                for half in [right, batch] {
                                    todo.push(match origin {
                                        Origin::MaxDeliveries => self.over_delivered(half),
                                        _ => Todo {
                                            batch: half,
                                            outcome: None,
                                        },
                                    });
                                }
                            } else {
                                warn!(stage = self.spec.stage, stream = %self.spec.input, error = %e.reason(), entry = %batch.entries[0].id, "commit keeps failing for this entry alone: dead-lettering it");
                                let dl = DeadLetter {
                                    entry: 0,
                                    fields: None,
                                    error: format!(
                                        "the commit step failed {MAX_COMMIT_ATTEMPTS} times for this entry alone: {}",
                                        error_chain(&e)
                                    ),
                                    sqlstate: None,
                                };
                                todo.push(Todo {
                                    batch,
                                    outcome: Some((
                                        Outcome {
                                            forward: Vec::new(),
                                            dead_letters: vec![dl],
                                        },
                                        Origin::CommitFailed,
                                    )),
                                });
                            }
                        }
                    }
                    backoff.reset();
                }
                Err(e) => match e.hint {
                    RetryHint::Backoff => {
                        self.metrics.retries.increment(1);
                        warn!(stage = self.spec.stage, error = %e.reason(), entries = batch.entries.len(), "transient failure, retrying");
                        if !backoff.wait(&self.stop).await {
                            return Ok(()); // shutdown: the entries stay pending
                        }
                        todo.push(Todo {
                            batch,
                            outcome: None,
                        });
                    }
                    RetryHint::DeadLetter if batch.entries.len() > 1 => {
                        debug!(stage = self.spec.stage, error = %e.reason(), "splitting batch to isolate a poison entry");
                        let right = batch.entries.split_off(batch.entries.len() / 2);
                        todo.push(Todo {
                            batch: Batch { entries: right },
                            outcome: None,
                        });
                        todo.push(Todo {
                            batch,
                            outcome: None,
                        });
                    }
                    RetryHint::DeadLetter => {
                        let dl = DeadLetter {
                            entry: 0,
                            fields: None,
                            error: e.reason(),
                            sqlstate: e.sqlstate_code(),
                        };
                        todo.push(Todo {
                            batch,
                            outcome: Some((
                                Outcome {
                                    forward: Vec::new(),
                                    dead_letters: vec![dl],
                                },
                                Origin::Stage,
                            )),
                        });
                    }
                    RetryHint::Fatal => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// Runs the atomic commit step, retrying transient Redis faults for as long as it takes
    /// (a shutdown that outlasts `[shutdown] timeout_ms` abandons it: the entries stay pending
    /// and are claimed by another consumer). Returns entries lost to another consumer (nothing
    /// was written then).
    async fn commit(
        &self,
        batch: &Batch,
        outcome: Outcome,
        origin: Origin,
        backoff: &mut Backoff,
    ) -> Result<Vec<StreamId>, CommitFailure> {
        let mut reasons = Vec::with_capacity(outcome.dead_letters.len());
        let dlq = streams::dlq_stream(&self.spec.input);
        for d in &outcome.dead_letters {
            reasons.push(match origin {
                Origin::Stage => DeadLetterReason::of_sqlstate(d.sqlstate.as_deref()),
                Origin::MaxDeliveries => DeadLetterReason::MaxDeliveries,
                Origin::CommitFailed => DeadLetterReason::CommitFailed,
            });
        }
        let dead_letters: Vec<Fields> = outcome
            .dead_letters
            .iter()
            .map(|d| {
                let entry = &batch.entries[d.entry];
                streams::dead_letter_fields(
                    d.fields.clone().unwrap_or_else(|| entry.fields.to_vec()),
                    &d.error,
                    self.spec.stage,
                    entry.id,
                    entry.deliveries,
                    d.sqlstate.as_deref(),
                )
            })
            .collect();
        let mut step = CommitStep {
            consumer: self.spec.consumer(),
            output: self.spec.output.as_deref().unwrap_or(&dlq),
            dlq: &dlq,
            ids: batch.entries.iter().map(|e| e.id).collect(),
            forward: outcome.forward,
            dead_letters,
            verify: false,
        };
        let mut refused = 0;
        loop {
            let res = match self.redis.get().await {
                Ok(mut conn) => step.run(&mut conn).await.map_err(|e| {
                    // A step that acknowledged part of its entries must not be redone.
                    let hint = match streams::ScriptFailure::of(&e) {
                        Some(streams::ScriptFailure::Partial) => RetryHint::Fatal,
                        _ => crate::error::redis_hint(&e),
                    };
                    (StageError::from(e), hint)
                }),
                Err(e) => Err((StageError::from(e), RetryHint::Backoff)),
            };
            match res {
                Ok(lost) => {
                    if lost.is_empty() {
                        self.stats
                            .acked
                            .fetch_add(step.ids.len() as u64, Ordering::Relaxed);
                        self.stats
                            .dead_lettered
                            .fetch_add(step.dead_letters.len() as u64, Ordering::Relaxed);
                        self.metrics.acked.increment(step.ids.len() as u64);
                        for reason in &reasons {
                            self.metrics.dead_lettered(*reason, 1);
                        }
                        if !step.dead_letters.is_empty() {
                            warn!(stage = self.spec.stage, count = step.dead_letters.len(), dlq = %dlq, "dead-lettered");
                        }
                    }
                    return Ok(lost);
                }
                Err((e, RetryHint::Fatal)) => return Err(CommitFailure::Fatal(e)),
                Err((e, RetryHint::DeadLetter)) => {
                    refused += 1;
                    warn!(stage = self.spec.stage, error = %e.reason(), attempt = refused, "commit step refused");
                    if refused >= MAX_COMMIT_ATTEMPTS {
                        return Err(CommitFailure::Stuck(e));
                    }
                    step.verify = true;
                    backoff.wait(&CancellationToken::new()).await;
                }
                Err((e, RetryHint::Backoff)) => {
                    warn!(stage = self.spec.stage, error = %e.reason(), "commit failed, retrying");
                    // The step may have been applied with only its reply lost.
                    step.verify = true;
                    // The outcome is only in memory (and maybe committed to PostgreSQL): keep
                    // retrying during shutdown too, until the shutdown timeout gives up on it.
                    backoff.wait(&CancellationToken::new()).await;
                }
            }
        }
    }
}

/// Waits while the output stream is over its high watermark, checking at most every 200 ms.
#[derive(Default)]
struct BackPressure {
    /// When the output length was last read.
    checked: Option<Instant>,
    /// Whether we are currently holding back (to log once per episode).
    holding: bool,
}

impl BackPressure {
    async fn wait_below(
        &mut self,
        conn: &mut deadpool_redis::Connection,
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

/// Periodic upkeep of one loop: keeps the entries this consumer holds from looking idle, trims
/// the input of what every group acknowledged, and forgets consumers of dead processes that own
/// nothing.
async fn housekeeping(
    spec: Arc<LoopSpec>,
    redis: deadpool_redis::Pool,
    stop: CancellationToken,
    in_flight: InFlight,
) {
    let touch_every = Duration::from_millis((spec.streams.claim_idle_ms / 3).max(10));
    let trim_every = Duration::from_millis(spec.streams.trim_interval_ms.max(10));
    let forget_every = Duration::from_millis(spec.streams.claim_interval_ms.max(10));
    let tick = touch_every.min(trim_every).min(forget_every);
    let (mut last_touch, mut last_trim, mut last_forget) =
        (Instant::now(), Instant::now(), Instant::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
        let Ok(mut conn) = redis.get().await else {
            continue;
        };
        if last_touch.elapsed() >= touch_every {
            last_touch = Instant::now();
            let spans: Vec<Arc<ReadSpan>> = in_flight
                .lock()
                .expect("in-flight list")
                .iter()
                .filter_map(|w| w.upgrade())
                .collect();
            if let Err(e) = spec.consumer().touch(&mut conn, &spans).await {
                debug!(stage = spec.stage, error = %e, "touch failed");
            }
        }
        if last_trim.elapsed() >= trim_every {
            last_trim = Instant::now();
            if let Ok(groups) = streams::groups(&mut conn, &spec.input).await {
                for g in groups {
                    let (lag, pending) = observe::group_gauges(&spec.input, &g.name);
                    lag.set(g.lag.unwrap_or(0) as f64);
                    pending.set(g.pending as f64);
                }
            }
            if let Ok(n) = streams::len(&mut conn, &spec.input).await {
                observe::stream_length(&spec.input).set(n as f64);
            }
            match streams::trim_acknowledged(&mut conn, &spec.input).await {
                Ok(n) if n > 0 => {
                    debug!(stage = spec.stage, stream = %spec.input, trimmed = n, "trimmed")
                }
                Ok(_) => {}
                Err(e) => debug!(stage = spec.stage, error = %e, "trim failed"),
            }
        }
        if last_forget.elapsed() >= forget_every {
            last_forget = Instant::now();
            let group = spec.consumer().group;
            if let Ok(list) = group.consumers(&mut conn).await {
                for c in list {
                    if c.name != spec.consumer
                        && c.pending == 0
                        && c.idle_ms >= spec.streams.forget_consumer_after_ms
                    {
                        info!(stage = spec.stage, consumer = %c.name, idle_ms = c.idle_ms, "removing a gone consumer that owns nothing");
                        let _ = group.remove_consumer_if_idle(&mut conn, &c.name).await;
                    }
                }
            }
        }
    }
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    /// The next delay's ceiling.
    next_ms: u64,
    /// The cap.
    max_ms: u64,
}

impl Backoff {
    const START_MS: u64 = 50;

    pub fn new(max_ms: u64) -> Self {
        Self {
            next_ms: Self::START_MS,
            max_ms: max_ms.max(Self::START_MS),
        }
    }

    pub fn reset(&mut self) {
        self.next_ms = Self::START_MS;
    }

    /// Sleeps; false if `stop` fired first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let ms = self.next_ms / 2 + rand::random_range(0..=self.next_ms / 2);
        self.next_ms = (self.next_ms * 2).min(self.max_ms);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
            _ = stop.cancelled() => false,
        }
    }
}
