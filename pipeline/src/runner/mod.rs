//! The consumer loop every stage shares: read (and claim), batch, process, commit.
//!
//! A stage only turns a batch into an [`Outcome`]; the runner decides delivery from the
//! outcome or from the error's [`RetryHint`]:
//! - `Ok(outcome)`: forward, dead-letter and acknowledge in one atomic Redis step (one per input
//!   the batch holds entries of, in a loop over several inputs);
//! - `Backoff`: keep the entries pending and retry the same batch with capped exponential
//!   backoff and jitter, however long it takes (a shutdown leaves them pending);
//! - `DeadLetter`: split the batch until the offending entry is alone, dead-letter it, and
//!   process the rest;
//! - `Fatal`: stop this process with the error; the entries stay pending.
//!
//! # Layout
//! - this file: the [`Stage`] trait, what it is given and returns, [`LoopSpec`], and
//!   [`run_loop`], which wires the tasks of one loop together ([`run_loop_over`]: one loop over
//!   several inputs, a reader each, one batcher and the workers shared);
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
use crate::observe::{BatchMetrics, LoopMetrics};
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
    run_loop_over(stage, vec![spec], redis, shutdown, stats).await
}

/// Why [`run_loop_over`] refuses its inputs: the caller built them wrong (a bug, not a fault).
fn check_inputs(inputs: &[LoopSpec]) -> Result<(), StageError> {
    let Some(first) = inputs.first() else {
        return Err(StageError::fatal("a stage loop needs at least one input"));
    };
    if inputs.len() > usize::from(u16::MAX) + 1 {
        return Err(StageError::fatal(format!(
            "a stage loop reads at most {} inputs, not {}",
            usize::from(u16::MAX) + 1,
            inputs.len()
        )));
    }
    if inputs.len() > 1 && inputs.iter().any(|s| s.output.is_some()) {
        // Forwarded entries belong to no one input, so they could not keep their input's
        // order or slot: a stage that forwards runs one loop per input.
        return Err(StageError::fatal(format!(
            "stage {}: a loop over several inputs is only for a stage that forwards nothing",
            first.stage
        )));
    }
    if inputs.iter().any(|s| s.stage != first.stage) {
        return Err(StageError::fatal(
            "the inputs of one stage loop must belong to one stage",
        ));
    }
    Ok(())
}

/// Runs one stage loop over several inputs (the partitions of a table): each input has its own
/// reader and housekeeping, and the batcher and workers are shared, so a batch gathers the
/// entries of every input as they arrive (no input waits for another) and fills as fast as
/// all of them together; each input's share of a batch is acknowledged in its own atomic commit
/// step (each input's keys may live in a slot of their own). The batch limits, workers and
/// stream settings are the first input's. Only for a stage that forwards nothing (its output
/// is each input's dead-letter stream); a stage that forwards runs one [`run_loop`] per input.
pub async fn run_loop_over<S: Stage>(
    stage: Arc<S>,
    inputs: Vec<LoopSpec>,
    redis: crate::db::RedisPool,
    shutdown: CancellationToken,
    stats: Arc<LoopStats>,
) -> Result<(), StageError> {
    check_inputs(&inputs)?;
    let inputs: Arc<[Arc<LoopSpec>]> = inputs.into_iter().map(Arc::new).collect();
    let spec = inputs[0].clone();
    for input in inputs.iter() {
        if !ensure_group(input, &redis, &shutdown).await? {
            return Ok(());
        }
        info!(stage = input.stage, stream = %input.input, consumer = %input.consumer, "consumer started");
    }
    let (read_tx, read_rx) = mpsc::channel::<Vec<Entry>>(2.max(inputs.len()));
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(spec.workers);
    // Fatal errors stop the readers too, so a failing worker does not keep claiming entries.
    let stop = shutdown.child_token();

    let metrics: Arc<[LoopMetrics]> = inputs
        .iter()
        .map(|s| LoopMetrics::new(s.stage, &s.input))
        .collect();
    let mut readers = Vec::new();
    let mut keepers = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let in_flight = InFlight::default();
        crate::admin::RUNNING_LOOPS.fetch_add(1, Ordering::Relaxed);
        readers.push(tokio::spawn(read_loop(
            input.clone(),
            i as u16,
            redis.clone(),
            stop.clone(),
            read_tx.clone(),
            stats.clone(),
            in_flight.clone(),
            metrics[i].clone(),
        )));
        keepers.push(tokio::spawn(housekeeping::housekeeping(
            stage.clone(),
            input.clone(),
            redis.clone(),
            stop.clone(),
            in_flight,
        )));
    }
    // The batcher ends once every reader dropped its sender.
    drop(read_tx);
    let reads = batch::Reads {
        count: spec.streams.read_count,
        next_within: Duration::from_millis(spec.streams.block_ms),
    };
    let batcher = tokio::spawn(batch_loop(
        stage.clone(),
        spec.limits,
        reads,
        read_rx,
        batch_tx,
        BatchMetrics::new(
            spec.stage,
            &inputs.iter().map(|s| s.input.as_str()).collect::<Vec<_>>(),
        ),
    ));
    let batch_rx = Arc::new(Mutex::new(batch_rx));
    let mut workers = Vec::new();
    for _ in 0..spec.workers {
        let w = Worker {
            stage: stage.clone(),
            inputs: inputs.clone(),
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
    // Workers end only when the batcher closed, i.e. the readers ended, or on a fatal error.
    stop.cancel();
    let _ = batcher.await;
    for reader in readers {
        // A read the account may not make stops the loop too (the workers ended for want of
        // input).
        if let (Ok(()), Ok(Err(e))) = (&result, reader.await) {
            result = Err(e);
        }
    }
    for keeper in keepers {
        let _ = keeper.await;
    }
    for input in inputs.iter() {
        crate::admin::RUNNING_LOOPS.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut conn) = redis.get().await {
            if let Err(e) = input.consumer().remove_if_idle(&mut conn).await {
                debug!(error = %e, "could not remove consumer");
            }
        }
        info!(
            stage = input.stage,
            stream = %input.input,
            consumer = %input.consumer,
            acked = stats.acked.load(Ordering::Relaxed),
            dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
            "consumer stopped"
        );
    }
    result
}

/// Creates `spec`'s consumer group on its input if it is missing, waiting out Redis faults:
/// false when the shutdown came first.
async fn ensure_group(
    spec: &LoopSpec,
    redis: &crate::db::RedisPool,
    shutdown: &CancellationToken,
) -> Result<bool, StageError> {
    let mut backoff = Backoff::new(spec.streams.max_backoff_ms);
    loop {
        let mut conn = retry_redis(redis, shutdown, spec).await?;
        match ConsumerGroup::new(&spec.input, spec.stage)
            .ensure(&mut conn)
            .await
        {
            Ok(()) => return Ok(true),
            Err(e) if crate::error::redis_hint(&e) == RetryHint::Backoff => {
                warn!(stage = spec.stage, stream = %spec.input, error = %e, "cannot create the consumer group yet, retrying");
                if !backoff.wait(shutdown).await {
                    return Ok(false);
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
        let mut config = deadpool_redis::Config::from_url(url);
        // Each input's reader holds a connection; its housekeeping and the workers need more
        // (as `strata_stages::start` sizes a process's pool).
        config.pool = Some(deadpool_redis::PoolConfig::new(16));
        config
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

    /// Records every entry it is given (by input and ID) and how many inputs each batch held;
    /// dead-letters (in its outcome) every entry with a `bad` field.
    #[derive(Default)]
    struct Recorder {
        seen: std::sync::Mutex<Vec<(u16, StreamId)>>,
        inputs_per_batch: std::sync::Mutex<Vec<usize>>,
    }

    impl Stage for Recorder {
        async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
            let inputs: std::collections::HashSet<u16> =
                batch.entries.iter().map(|e| e.input).collect();
            self.inputs_per_batch.lock().unwrap().push(inputs.len());
            self.seen
                .lock()
                .unwrap()
                .extend(batch.entries.iter().map(|e| (e.input, e.id)));
            Ok(Outcome {
                forward: Vec::new(),
                dead_letters: batch
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.field("bad").is_some())
                    .map(|(i, _)| DeadLetter {
                        entry: i,
                        fields: None,
                        error: "field `bad`: refused".into(),
                        sqlstate: None,
                    })
                    .collect(),
            })
        }
    }

    use crate::streams::StreamId;

    /// Three input streams holding entries with the same IDs (`1-1` … `1-10`, as streams on
    /// different nodes can), entry `1-5` of input 1 carrying a `bad` field.
    async fn three_inputs(
        conn: &mut crate::db::RedisConnection,
    ) -> (String, Vec<String>, StreamId) {
        let key = format!("strata-runner-test-{:08x}", rand::random::<u32>());
        let inputs: Vec<String> = (0..3).map(|i| format!("{key}:in{i}")).collect();
        for (i, input) in inputs.iter().enumerate() {
            for seq in 1..=10 {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(input).arg(format!("1-{seq}")).arg("n").arg(seq);
                if i == 1 && seq == 5 {
                    cmd.arg("bad").arg(1);
                }
                let _: String = cmd.query_async(conn).await.unwrap();
            }
        }
        (key, inputs, "1-5".parse().unwrap())
    }

    fn specs_over(inputs: &[String], linger_ms: u64) -> Vec<LoopSpec> {
        let limits = BatchLimits {
            max_batch_rows: 1000,
            max_batch_bytes: 1 << 20,
            linger_ms,
        };
        let streams_config = StreamsConfig {
            block_ms: 50,
            claim_idle_ms: 600_000,
            ..StreamsConfig::default()
        };
        inputs
            .iter()
            .map(|input| {
                LoopSpec::new(
                    "runner-test",
                    input.clone(),
                    None,
                    limits,
                    1,
                    streams_config.clone(),
                )
            })
            .collect()
    }

    /// A [`Recorder`] running over `inputs` with linger_ms 1 s (every input's first read
    /// arrives within it); stop it with the token.
    fn spawn_over(
        inputs: &[String],
        redis: &crate::db::RedisPool,
    ) -> (
        Arc<Recorder>,
        CancellationToken,
        tokio::task::JoinHandle<Result<(), StageError>>,
    ) {
        let stage = Arc::new(Recorder::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_loop_over(
            stage.clone(),
            specs_over(inputs, 1000),
            redis.clone(),
            stop.clone(),
            Arc::default(),
        ));
        (stage, stop, task)
    }

    async fn delete_inputs(conn: &mut crate::db::RedisConnection, inputs: &[String]) {
        for input in inputs {
            let _: () = redis::cmd("DEL")
                .arg(input)
                .arg(streams::dlq_stream(input))
                .arg(streams::claims_key(input))
                .query_async(conn)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_loop_over_several_inputs_batches_them_together_and_acknowledges_each_on_its_own_stream(
    ) {
        let redis = redis_pool();
        let mut conn = redis.get().await.unwrap();
        let (_, inputs, bad) = three_inputs(&mut conn).await;
        let (stage, stop, task) = spawn_over(&inputs, &redis);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut drained = true;
            for input in &inputs {
                drained &= ConsumerGroup::new(input, "runner-test")
                    .drained(&mut conn)
                    .await
                    .unwrap();
            }
            if drained {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the loop did not drain its inputs; batches {:?}",
                stage.inputs_per_batch.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();

        let mut seen = stage.seen.lock().unwrap().clone();
        seen.sort();
        let expected: Vec<(u16, StreamId)> = (0..3u16)
            .flat_map(|i| (1..=10).map(move |seq| (i, StreamId { ms: 1, seq })))
            .collect();
        assert_eq!(
            seen, expected,
            "every entry of every input, once, marked with its input"
        );
        let per_batch = stage.inputs_per_batch.lock().unwrap().clone();
        assert!(
            per_batch.iter().any(|&n| n > 1),
            "one batch gathers several inputs: {per_batch:?}"
        );
        for (i, input) in inputs.iter().enumerate() {
            let dead = streams::range(&mut conn, &streams::dlq_stream(input), "-", "+", 100)
                .await
                .unwrap();
            if i == 1 {
                assert_eq!(
                    dead.len(),
                    1,
                    "the bad entry, in its own input's dead-letter stream"
                );
                let source = dead[0].field(streams::DLQ_SOURCE_ID).unwrap();
                assert_eq!(source, bad.to_string().as_bytes());
            } else {
                assert!(dead.is_empty(), "input {i} has no dead letters: {dead:?}");
            }
        }
        delete_inputs(&mut conn, &inputs).await;
    }

    #[tokio::test]
    async fn a_commit_step_that_keeps_failing_on_one_input_leaves_the_other_inputs_committed_once()
    {
        let redis = redis_pool();
        let mut conn = redis.get().await.unwrap();
        let (_, inputs, bad) = three_inputs(&mut conn).await;
        // Input 1's dead-letter stream is not a stream: its step with the dead letter fails.
        let _: () = redis::cmd("SET")
            .arg(streams::dlq_stream(&inputs[1]))
            .arg("not a stream")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (stage, stop, task) = spawn_over(&inputs, &redis);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut left = Vec::new();
            for input in &inputs {
                let groups = streams::groups(&mut conn, input).await.unwrap();
                left.push(groups.first().map(|g| (g.pending, g.lag)));
            }
            if left == [Some((0, Some(0))), Some((1, Some(0))), Some((0, Some(0)))] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pending, lag per input: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        task.await.unwrap().unwrap();
        let pending_ids = ConsumerGroup::new(&inputs[1], "runner-test")
            .oldest_unacknowledged(&mut conn)
            .await
            .unwrap();
        assert_eq!(pending_ids, Some(bad), "only the bad entry is left pending");
        let seen = stage.seen.lock().unwrap().clone();
        for input in [0u16, 2] {
            let mut ids: Vec<StreamId> = seen
                .iter()
                .filter(|(i, _)| *i == input)
                .map(|(_, id)| *id)
                .collect();
            ids.sort();
            assert_eq!(
                ids,
                (1..=10)
                    .map(|seq| StreamId { ms: 1, seq })
                    .collect::<Vec<_>>(),
                "input {input}: committed in the first step, never processed again"
            );
        }
        delete_inputs(&mut conn, &inputs).await;
    }

    #[tokio::test]
    async fn a_loop_over_several_inputs_refuses_a_stage_that_forwards() {
        let inputs = [
            "strata-runner-test-forward:in0",
            "strata-runner-test-forward:in1",
        ];
        let mut specs = specs_over(&inputs.map(String::from), 10);
        for s in &mut specs {
            s.output = Some(format!("{}:out", s.input));
        }
        let e = run_loop_over(
            Arc::new(Recorder::default()),
            specs,
            redis_pool(),
            CancellationToken::new(),
            Arc::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.hint, RetryHint::Fatal);
        assert!(e.reason().contains("forwards nothing"), "{}", e.reason());
    }
}
