//! The consumer loop every stage shares: read (and claim), batch, process, commit.
//!
//! A stage only turns a batch into an [`Outcome`]; the runner decides delivery from the
//! outcome or from the error's [`RetryHint`]:
//! - `Ok(outcome)`: forward, dead-letter and acknowledge in one atomic Redis step;
//! - `Backoff`: keep the entries pending and retry the same batch with capped exponential
//!   backoff and jitter, however long it takes (a shutdown leaves them pending);
//! - `DeadLetter`: split the batch until the offending entry is alone, dead-letter it, and
//!   process the rest;
//! - `Fatal`: stop this process with the error; the entries stay pending.
//!
//! # Layout
//! - this file: the [`Stage`] trait, what it is given and returns, [`LoopSpec`], and
//!   [`run_loop`], which wires the tasks of one loop together;
//! - [`read`]: the reader (XREADGROUP, XAUTOCLAIM, back-pressure) and the in-flight reads;
//! - [`batch`]: the one batcher every stage shares (`max_batch_rows`, `max_batch_bytes`,
//!   `linger_ms`);
//! - [`worker`]: processing a batch and the atomic commit step, splitting what keeps failing;
//! - [`housekeeping`]: periodic upkeep of a loop (touching in-flight entries, trimming,
//!   forgetting gone consumers, gauges) and the stage's own [`Stage::tick`];
//! - [`backoff`]: the pure, tested backoff.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BatchLimits, StreamsConfig};
use crate::error::{RetryHint, StageError};
use crate::observe::LoopMetrics;
use crate::streams::{self, Consumer, ConsumerGroup, Entry, Fields};

mod backoff;
mod batch;
mod housekeeping;
mod read;
mod worker;

pub use backoff::Backoff;
pub use worker::MAX_COMMIT_ATTEMPTS;

use batch::batch_loop;
use read::{read_loop, InFlight};
use worker::Worker;

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
    /// The one required method: what this batch comes to (or why it cannot be processed).
    fn process(&self, batch: &Batch) -> impl Future<Output = Result<Outcome, StageError>> + Send;

    /// How many rows an entry carries, for `max_batch_rows`.
    fn weight(&self, _entry: &Entry) -> usize {
        1
    }

    /// How often [`Stage::tick`] runs; `None` (the default): never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Periodic work the stage owns (as Arroyo's operator `tick`), run by the loop's
    /// housekeeping every [`Stage::tick_interval`] while the loop runs. A failure is logged and
    /// the next tick tries again.
    fn tick(&self, _ctx: Tick<'_>) -> impl Future<Output = Result<(), StageError>> + Send {
        async { Ok(()) }
    }
}

/// What a [`Stage::tick`] is given: a Redis connection and the loop's consumer group.
pub struct Tick<'a> {
    /// A pooled connection for the tick's own calls.
    pub redis: &'a mut crate::db::RedisConnection,
    /// The loop's consumer group on its input stream.
    pub group: ConsumerGroup<'a>,
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
    pub read_from: Option<streams::ReadTarget>,
    /// `[redis] wait_replicas`: WAIT after each commit step, so a step counts as done only once
    /// replicas hold it (a master killed before replicating would lose it). `None`: no WAIT.
    pub replicas: Option<crate::db::ReplicaWait>,
    /// With [`Self::replicas`]: before a batch goes to the stage, wait until replicas hold its
    /// entries, for a stage whose effects leave Redis (a COPY into PostgreSQL, an object store
    /// put): an entry it applied and a failover then lost would be produced again under
    /// another ID and applied twice. Off for a stage whose only effects are its commit step in
    /// the same slot (ingest): a lost entry loses its outputs with it.
    pub wait_before_apply: bool,
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
            read_from: None,
            replicas: None,
            wait_before_apply: false,
        }
    }
}

/// Runs one stage loop until `shutdown` fires (then finishes what it read and returns Ok) or a
/// fatal error occurs.
pub async fn run_loop<S: Stage>(
    stage: Arc<S>,
    spec: LoopSpec,
    redis: crate::db::RedisPool,
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
    let keeper = tokio::spawn(housekeeping::housekeeping(
        stage.clone(),
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
    // A read the account may not make stops the loop too (the workers ended for want of input).
    if let (Ok(()), Ok(Err(e))) = (&result, reader.await) {
        result = Err(e);
    }
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
    redis: &crate::db::RedisPool,
    shutdown: &CancellationToken,
    spec: &LoopSpec,
) -> Result<crate::db::RedisConnection, StageError> {
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    loop {
        match redis.get().await {
            Ok(c) => return Ok(c),
            Err(e) if crate::error::redis_pool_hint(&e) == RetryHint::Fatal => {
                return Err(StageError::fatal("connecting to redis").with_source(e));
            }
            Err(e) => {
                warn_redis_unavailable(spec, &e);
                if !backoff.wait(shutdown).await {
                    return Err(StageError::backoff("shutdown while waiting for redis"));
                }
            }
        }
    }
}

/// The runner against the real Redis (`REDIS_URL`, default 127.0.0.1:6379), with stages made for
/// the test; each test uses keys of its own and deletes them.
/// Logs a failed pool checkout; a TLS failure gets its cause (unknown CA, name mismatch, …) as a
/// field of its own (the start check and `/readyz` name the server).
pub(super) fn warn_redis_unavailable(spec: &LoopSpec, e: &deadpool_redis::PoolError) {
    match crate::tls::failure_of(e) {
        Some(tls) => {
            warn!(stage = spec.stage, error = %e, %tls, "redis unavailable (TLS failed), retrying")
        }
        None => warn!(stage = spec.stage, error = %e, "redis unavailable, retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::time::Instant;

    fn redis_pool() -> crate::db::RedisPool {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        deadpool_redis::Config::from_url(url)
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .unwrap()
            .into()
    }

    /// Forwards one entry per input entry; refuses (as poison) any batch holding a `bad` field,
    /// and fails transiently the first `flaky` times it is called.
    struct Echo {
        flaky: AtomicUsize,
    }

    impl Stage for Echo {
        async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
            if self
                .flaky
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StageError::backoff("the database is restarting"));
            }
            if batch.entries.iter().any(|e| e.field("bad").is_some()) {
                return Err(StageError::dead_letter("field `bad`: refused"));
            }
            Ok(Outcome {
                forward: batch
                    .entries
                    .iter()
                    .map(|e| vec![("of".to_string(), e.id.to_string().into_bytes())])
                    .collect(),
                dead_letters: Vec::new(),
            })
        }
    }

    /// Runs `stage` over 30 entries (one with a `bad` field) until its output holds 29 and the
    /// group is drained; returns the output's `of` values and the dead letters.
    async fn run(stage: Echo) -> (Vec<String>, Vec<Vec<(String, String)>>, String) {
        let key = format!("strata-runner-test-{:08x}", rand::random::<u32>());
        let (input, output) = (format!("{key}:in"), format!("{key}:out"));
        let dlq = streams::dlq_stream(&input);
        let redis = redis_pool();
        let mut conn = redis.get().await.unwrap();
        let mut bad = String::new();
        for i in 0..30 {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&input).arg("*").arg("n").arg(i);
            if i == 17 {
                cmd.arg("bad").arg(1);
            }
            let id: String = cmd.query_async(&mut conn).await.unwrap();
            if i == 17 {
                bad = id;
            }
        }
        let limits = BatchLimits {
            max_batch_rows: 100,
            max_batch_bytes: 1 << 20,
            linger_ms: 10,
        };
        let streams_config = StreamsConfig {
            block_ms: 50,
            ..StreamsConfig::default()
        };
        let spec = LoopSpec::new(
            "runner-test",
            input.clone(),
            Some(output.clone()),
            limits,
            1,
            streams_config,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_loop(
            Arc::new(stage),
            spec,
            redis.clone(),
            stop.clone(),
            Arc::default(),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        let group = ConsumerGroup::new(&input, "runner-test");
        while !(streams::len(&mut conn, &output).await.unwrap() == 29
            && group.drained(&mut conn).await.unwrap())
        {
            assert!(Instant::now() < deadline, "the loop did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        let text = |entries: Vec<Entry>| -> Vec<Vec<(String, String)>> {
            entries
                .iter()
                .map(|e| {
                    e.fields
                        .iter()
                        .map(|(k, v)| (k.into_owned(), String::from_utf8_lossy(v).into_owned()))
                        .collect()
                })
                .collect()
        };
        let forwarded = text(
            streams::range(&mut conn, &output, "-", "+", 100)
                .await
                .unwrap(),
        )
        .into_iter()
        .map(|f| f[0].1.clone())
        .collect();
        let dead = text(
            streams::range(&mut conn, &dlq, "-", "+", 100)
                .await
                .unwrap(),
        );
        let _: () = redis::cmd("DEL")
            .arg(&input)
            .arg(&output)
            .arg(&dlq)
            .arg(streams::claims_key(&input))
            .query_async(&mut conn)
            .await
            .unwrap();
        (forwarded, dead, bad)
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v)
    }

    #[tokio::test]
    async fn a_poison_entry_is_split_off_and_dead_lettered_alone() {
        let (forwarded, dead, bad) = run(Echo {
            flaky: AtomicUsize::new(0),
        })
        .await;
        assert_eq!(forwarded.len(), 29, "every other entry forwarded once");
        assert!(!forwarded.contains(&bad));
        let mut unique = forwarded.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 29, "nothing forwarded twice");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(field(&dead[0], streams::DLQ_SOURCE_ID), bad);
        assert_eq!(field(&dead[0], streams::DLQ_ERROR), "field `bad`: refused");
        assert_eq!(field(&dead[0], streams::DLQ_STAGE), "runner-test");
        assert_eq!(field(&dead[0], "n"), "17", "the original fields are kept");
    }

    #[tokio::test]
    async fn transient_failures_retry_the_batch_and_dead_letter_nothing_for_them() {
        let (forwarded, dead, _) = run(Echo {
            flaky: AtomicUsize::new(3),
        })
        .await;
        assert_eq!(forwarded.len(), 29);
        assert_eq!(dead.len(), 1, "only the poison entry: {dead:?}");
    }
}
