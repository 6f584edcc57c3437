//! strata's stages, each a [`Stage`](strata_pipeline::runner::Stage) run by the shared runner.
//!
//! # Layout
//! - [`ingest`]: `telemetry:{T}` → validated frames on `rows:{T}`.
//! - [`writer`]: `rows:{T}` → binary COPY into table `T`, exactly once.
//! - [`copy`]: the binary COPY encoding.
//! - [`catalog`]: strata's bookkeeping tables and native partitions.
//! - [`lifecycle`]: chunk-watcher, archiver and confirmer (closed chunks → Parquet → verified → dropped).
//! - [`migrate`]: `strata migrate`.
//! - [`produce`]: `strata produce`, the reference producer.
//! - [`ops`]: operator commands: `status`, `inspect`, `dlq`.
//! - this file: starting the stages of a process for every table.

pub mod catalog;
pub mod copy;
pub mod ingest;
pub mod lifecycle;
pub mod migrate;
pub mod ops;
pub mod produce;
pub mod writer;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use strata_pipeline::config::Config;
use strata_pipeline::latency::LatencyHistogram;
use strata_pipeline::runner::{run_loop, Backoff, LoopSpec, LoopStats};
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{self, BATCH_WRITER, INGEST};
use strata_pipeline::{RetryHint, StageError};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The stages a process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Ingest,
    BatchWriter,
    ChunkWatcher,
    Archiver,
    Confirmer,
}

impl StageKind {
    /// The hot path, in order.
    pub const HOT_PATH: [StageKind; 2] = [StageKind::Ingest, StageKind::BatchWriter];
    /// Every stage: what `strata run` starts.
    pub const ALL: &'static [StageKind] = &[
        StageKind::Ingest,
        StageKind::BatchWriter,
        StageKind::ChunkWatcher,
        StageKind::Archiver,
        StageKind::Confirmer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Ingest => INGEST,
            StageKind::BatchWriter => BATCH_WRITER,
            StageKind::ChunkWatcher => streams::CHUNK_WATCHER,
            StageKind::Archiver => streams::ARCHIVER,
            StageKind::Confirmer => streams::CONFIRMER,
        }
    }
}

/// Counters shared by every loop of a process, for summaries.
#[derive(Debug, Default, Clone)]
pub struct ProcessStats {
    /// Per stage: entries acknowledged, dead-lettered, claimed.
    pub ingest: Arc<LoopStats>,
    pub batch_writer: Arc<LoopStats>,
    /// Rows committed to PostgreSQL.
    pub rows_written: Arc<AtomicU64>,
    /// End-to-end latency of committed rows.
    pub latency: Arc<LatencyHistogram>,
}

/// The stage loops of one process.
pub struct Running {
    /// One task per (stage, table) loop.
    tasks: JoinSet<Result<(), StageError>>,
    /// Live counters.
    pub stats: ProcessStats,
    /// How long a shutdown may take before the loops still busy are abandoned.
    shutdown_timeout: std::time::Duration,
}

/// Why a process's stages stopped other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// A stage failed fatally (the others were stopped).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The shutdown took longer than `[shutdown] timeout_ms`: the loops still busy (retrying a
    /// commit, waiting for a server) were abandoned. Nothing is lost: their entries stay pending
    /// and another consumer claims them after `claim_idle_ms`.
    #[error("shutdown took longer than [shutdown] timeout_ms = {timeout_ms}: abandoned {busy} busy stage loop(s); their entries stay pending and another consumer claims them")]
    Timeout {
        /// Loops still running at the deadline.
        busy: usize,
        /// The configured timeout.
        timeout_ms: u64,
    },
}

impl Running {
    /// Waits for every loop; the first fatal error stops the others. Once `shutdown` fires,
    /// waits at most `[shutdown] timeout_ms` for the loops to finish their batches in flight.
    pub async fn wait(mut self, shutdown: &CancellationToken) -> Result<(), StopError> {
        let mut result = Ok(());
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = self.tasks.join_next() => {
                    let Some(r) = joined else { break };
                    let r = r.unwrap_or_else(|e| {
                        Err(StageError::fatal(format!("stage task panicked: {e}")))
                    });
                    if let Err(e) = r {
                        if result.is_ok() {
                            tracing::error!(error = %e.reason(), "stage failed; stopping the process");
                            shutdown.cancel();
                            result = Err(StopError::Stage(e));
                        }
                    }
                }
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                _ = expired => {
                    let busy = self.tasks.len();
                    let e = StopError::Timeout {
                        busy,
                        timeout_ms: self.shutdown_timeout.as_millis() as u64,
                    };
                    tracing::warn!(error = %e, "shutdown timed out");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    if result.is_ok() {
                        result = Err(e);
                    }
                    break;
                }
            }
        }
        result
    }
}

/// Starts `kinds` for every table in `schemas`, in this process, until `shutdown`.
pub async fn start(
    config: &Config,
    schemas: &[SchemaRef],
    kinds: &[StageKind],
    shutdown: CancellationToken,
) -> Result<Running, StageError> {
    let stats = ProcessStats::default();
    let loops_per_table: usize = kinds
        .iter()
        .map(|k| match k {
            StageKind::Ingest => config.ingest.consumers * (1 + config.ingest.workers),
            StageKind::BatchWriter => 1 + config.batch_writer.connections,
            _ => 2,
        })
        .sum();
    let mut redis_config = config.clone();
    redis_config.redis.pool_size = config
        .redis
        .pool_size
        .max(loops_per_table * schemas.len() + 2);
    let redis = strata_pipeline::db::redis_pool(&redis_config)
        .map_err(|e| StageError::fatal("creating the Redis pool").with_source(e))?;
    let pg_size = (config.batch_writer.connections + 1) * schemas.len();
    let pg = strata_pipeline::db::postgres_pool(config, pg_size.max(config.postgres.pool_size))
        .map_err(|e| StageError::fatal("creating the PostgreSQL pool").with_source(e))?;
    let mut tasks = JoinSet::new();
    for kind in kinds {
        for schema in schemas {
            let table = &schema.table;
            match kind {
                StageKind::Ingest => {
                    let stage = Arc::new(ingest::Ingest {
                        schema: schema.clone(),
                        max_event_bytes: config.ingest.max_event_bytes,
                        zstd_level: config.ingest.zstd_level,
                        max_event_spans: config.tracing.max_event_spans_per_batch,
                    });
                    // Several consumers per process read (and parse) in parallel.
                    for _ in 0..config.ingest.consumers {
                        let mut spec = LoopSpec::new(
                            INGEST,
                            streams::telemetry_stream(table),
                            Some(streams::rows_stream(table)),
                            config.ingest.limits(),
                            config.ingest.workers,
                            config.streams.clone(),
                        );
                        spec.output_high_watermark = Some(config.ingest.max_rows_backlog);
                        spec.read_url = Some(config.redis.url.clone());
                        tasks.spawn(run_loop(
                            stage.clone(),
                            spec,
                            redis.clone(),
                            shutdown.clone(),
                            stats.ingest.clone(),
                        ));
                    }
                }
                StageKind::BatchWriter => {
                    let input = streams::rows_stream(table);
                    let mut writer = connect_writer(schema, &input, &pg, config, &shutdown).await?;
                    writer.max_event_spans = config.tracing.max_event_spans_per_batch;
                    writer.exactly_once = config.batch_writer.exactly_once;
                    writer.latency = stats.latency.clone();
                    writer.rows_written = stats.rows_written.clone();
                    let writer = Arc::new(writer);
                    tasks.spawn(prune_applied_frames(
                        writer.clone(),
                        redis.clone(),
                        shutdown.clone(),
                    ));
                    let mut spec = LoopSpec::new(
                        BATCH_WRITER,
                        input,
                        None,
                        config.batch_writer.limits(),
                        config.batch_writer.connections,
                        config.streams.clone(),
                    );
                    spec.read_url = Some(config.redis.url.clone());
                    tasks.spawn(run_loop(
                        writer,
                        spec,
                        redis.clone(),
                        shutdown.clone(),
                        stats.batch_writer.clone(),
                    ));
                }
                StageKind::ChunkWatcher | StageKind::Archiver | StageKind::Confirmer => {
                    let ctx = lifecycle::Context {
                        config,
                        schema,
                        redis: &redis,
                        pg: &pg,
                        shutdown: &shutdown,
                    };
                    lifecycle::spawn(*kind, ctx, &mut tasks).await?;
                }
            }
        }
    }
    Ok(Running {
        tasks,
        stats,
        shutdown_timeout: std::time::Duration::from_millis(config.shutdown.timeout_ms),
    })
}

/// How often each writer forgets applied frames that can no longer be redelivered.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Keeps `strata.applied_frames` small: frames acknowledged for good are forgotten.
async fn prune_applied_frames(
    writer: Arc<writer::BatchWriter>,
    redis: deadpool_redis::Pool,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let Ok(mut conn) = redis.get().await else {
            continue;
        };
        let group = streams::ConsumerGroup::new(writer.stream(), BATCH_WRITER);
        if let Ok(Some(oldest)) = group.oldest_unacknowledged(&mut conn).await {
            match writer.prune_applied(oldest).await {
                Ok(n) if n > 0 => tracing::debug!(
                    stream = writer.stream(),
                    pruned = n,
                    "pruned applied frames"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e.reason(), "pruning applied frames failed"),
            }
        }
    }
}

/// Builds a writer, waiting out PostgreSQL outages (but not a missing migration).
async fn connect_writer(
    schema: &SchemaRef,
    input: &str,
    pg: &deadpool_postgres::Pool,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<writer::BatchWriter, StageError> {
    let mut backoff = Backoff::new(config.streams.max_backoff_ms);
    loop {
        match writer::BatchWriter::new(schema.clone(), input.to_string(), pg.clone()).await {
            Ok(w) => return Ok(w),
            Err(e) if e.hint == RetryHint::Backoff => {
                tracing::warn!(table = %schema.table, error = %e.reason(), "waiting for PostgreSQL");
                if !backoff.wait(shutdown).await {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}
