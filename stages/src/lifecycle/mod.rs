//! The chunk lifecycle: chunk-watcher → archiver → confirmer. Closed chunks become Parquet
//! objects in the lake, are read back and verified, and only then dropped.
//!
//! ```text
//! chunk-watcher ──XADD──▶ archive:{T} ──archiver──▶ lake (Parquet) + archived:{T} ──confirmer──▶ verified, dropped
//!                              ▲                                                        │ mismatch
//!                              └──────────────────── archive again (bounded) ◀──────────┘
//! ```
//!
//! # Layout
//! - [`watcher`]: the periodic scan that records closed chunks and emits archival events.
//! - [`archiver`]: the [`Stage`](strata_pipeline::runner::Stage) writing one object per chunk.
//! - [`confirmer`]: the stage verifying archives and dropping chunks.
//! - [`registry`]: `strata.chunks`, the lifecycle table.
//! - [`events`]: the stream entries (ArchivalEvent, ArchivalConfirmation).
//! - [`columnar`]: binary COPY → Arrow; [`export`]: Arrow → Parquet → upload.
//! - [`lake`]: the object stores and the bounded multipart upload.

pub mod archiver;
pub mod columnar;
pub mod confirmer;
pub mod events;
pub mod export;
pub mod lake;
pub mod registry;
pub mod watcher;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use strata_pipeline::config::{BatchLimits, Config};
use strata_pipeline::runner::{run_loop, LoopSpec, LoopStats};
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams;
use strata_pipeline::StageError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::StageKind;

/// The crates archives are made with, for callers that read them back (tests, benchmarks)
/// with exactly the versions strata writes with.
pub mod deps {
    pub use arrow_array;
    pub use arrow_schema;
    pub use bytes;
    pub use futures_util;
    pub use object_store;
    pub use parquet;
    pub use sha2;
}

/// What a lifecycle stage of one table is started with.
pub struct Context<'a> {
    /// The whole configuration (`[lake]`, `[chunk_watcher]`, `[archiver]`, `[confirmer]`).
    pub config: &'a Config,
    /// The table and its lifecycle policy.
    pub schema: &'a SchemaRef,
    /// The process's Redis pool (the watcher's XADDs, the stage loops).
    pub redis: &'a deadpool_redis::Pool,
    /// The process's PostgreSQL pool (the watcher; archiver and confirmer make their own).
    pub pg: &'a deadpool_postgres::Pool,
    /// Fires on SIGTERM/SIGINT: stop after the work in flight.
    pub shutdown: &'a CancellationToken,
}

/// Process-wide lifecycle counters (all tables), for logs, tests and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Chunks the watcher recorded and emitted.
    pub chunks_recorded: AtomicU64,
    /// Archival events the watcher emitted again.
    pub events_reemitted: AtomicU64,
    /// Archives written.
    pub archived: AtomicU64,
    /// Rows in archives written.
    pub archived_rows: AtomicU64,
    /// Bytes of archives written.
    pub archived_bytes: AtomicU64,
    /// Archives verified.
    pub verified: AtomicU64,
    /// Chunks dropped after verification.
    pub dropped: AtomicU64,
    /// Archives that failed verification (each sends its chunk back to archiving).
    pub verify_failures: AtomicU64,
    /// Archival events dead-lettered to `archive:{T}:dlq` (verification kept failing, or the
    /// chunk cannot be archived).
    pub dead_lettered: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Self {
            chunks_recorded: AtomicU64::new(0),
            events_reemitted: AtomicU64::new(0),
            archived: AtomicU64::new(0),
            archived_rows: AtomicU64::new(0),
            archived_bytes: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
        }
    }
}

/// The lifecycle counters of this process.
pub static COUNTERS: Counters = Counters::new();

pub use strata_pipeline::observe::{CHUNKS_DROPPED, VERIFY_FAILURES};

/// How `table` is partitioned, read once and cached in `cell`.
async fn cached_partitioning(
    cell: &tokio::sync::OnceCell<crate::catalog::Partitioning>,
    pool: &deadpool_postgres::Pool,
    table: &str,
) -> Result<crate::catalog::Partitioning, StageError> {
    cell.get_or_try_init(|| async {
        let client = pool.get().await?;
        crate::catalog::partitioning(&client, table).await
    })
    .await
    .copied()
}

/// BEGIN with `lock_timeout` set for the transaction, so waiting for a chunk's lock is bounded.
/// Errors read "<context>: BEGIN" / "<context>: SET lock_timeout".
async fn begin_with_lock_timeout<'a>(
    conn: &'a mut deadpool_postgres::Object,
    lock_timeout_ms: u64,
    context: &str,
) -> Result<deadpool_postgres::Transaction<'a>, StageError> {
    let tx = conn
        .transaction()
        .await
        .map_err(|e| StageError::from_postgres(&format!("{context}: BEGIN"), e))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {lock_timeout_ms}"))
        .await
        .map_err(|e| StageError::from_postgres(&format!("{context}: SET lock_timeout"), e))?;
    Ok(tx)
}

/// One entry per batch: each event is a whole chunk, processed and acknowledged on its own.
const ONE_AT_A_TIME: BatchLimits = BatchLimits {
    max_batch_rows: 1,
    max_batch_bytes: usize::MAX,
    linger_ms: 0,
};

/// Starts lifecycle stage `kind` for one table, adding its task(s) to `tasks`.
pub async fn spawn(
    kind: StageKind,
    ctx: Context<'_>,
    tasks: &mut JoinSet<Result<(), StageError>>,
) -> Result<(), StageError> {
    let config = ctx.config;
    let table = &ctx.schema.table;
    match kind {
        StageKind::ChunkWatcher => {
            let watcher = watcher::Watcher::new(
                ctx.schema.clone(),
                ctx.pg.clone(),
                ctx.redis.clone(),
                config.chunk_watcher.clone(),
            );
            tasks.spawn(watcher.run(ctx.shutdown.clone()));
        }
        StageKind::Archiver => {
            let workers = config.archiver.workers.max(1);
            let stage = archiver::Archiver {
                schema: ctx.schema.clone(),
                pool: stage_pool(config, 2 * workers + 1)?,
                lake: open_lake(config)?,
                config: config.archiver.clone(),
                max_rearchives: config.confirmer.max_rearchives,
                partitioning: Default::default(),
            };
            let spec = LoopSpec::new(
                streams::ARCHIVER,
                streams::archive_stream(table),
                Some(streams::archived_stream(table)),
                ONE_AT_A_TIME,
                workers,
                config.streams.clone(),
            );
            tasks.spawn(run_loop(
                Arc::new(stage),
                spec,
                ctx.redis.clone(),
                ctx.shutdown.clone(),
                Arc::new(LoopStats::default()),
            ));
        }
        StageKind::Confirmer => {
            let workers = config.confirmer.workers.max(1);
            let stage = confirmer::Confirmer {
                schema: ctx.schema.clone(),
                pool: stage_pool(config, 2 * workers)?,
                lake: open_lake(config)?,
                config: config.confirmer.clone(),
                partitioning: Default::default(),
            };
            let spec = LoopSpec::new(
                streams::CONFIRMER,
                streams::archived_stream(table),
                Some(streams::archive_stream(table)),
                ONE_AT_A_TIME,
                workers,
                config.streams.clone(),
            );
            tasks.spawn(run_loop(
                Arc::new(stage),
                spec,
                ctx.redis.clone(),
                ctx.shutdown.clone(),
                Arc::new(LoopStats::default()),
            ));
        }
        other => {
            return Err(StageError::fatal(format!(
                "{} is not a lifecycle stage",
                other.name()
            )))
        }
    }
    Ok(())
}

fn open_lake(config: &Config) -> Result<Arc<lake::Lake>, StageError> {
    lake::Lake::open(&config.lake)
        .map(Arc::new)
        .map_err(|e| StageError::fatal(strata_pipeline::error_chain(&e)))
}

/// A pool of its own, so a stage holding two connections per chunk never starves the others.
fn stage_pool(config: &Config, size: usize) -> Result<deadpool_postgres::Pool, StageError> {
    strata_pipeline::db::postgres_pool(config, size)
        .map_err(|e| StageError::fatal(strata_pipeline::error_chain(&e)))
}
