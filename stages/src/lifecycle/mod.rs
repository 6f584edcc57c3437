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
//! - [`registry`]: `strata.chunks` and the chunk state machine (pending → archiving → archived →
//!   verified → dropped, or failed): the only writer of that table, one typed function per
//!   transition.
//! - [`events`]: the stream entries (ArchivalEvent, ArchivalConfirmation).
//! - [`columnar`]: binary COPY → Arrow; [`export`]: Arrow → Parquet → upload.
//! - [`lake`]: the object stores and the bounded multipart upload.
//! - `pg`: the transaction with a bounded lock wait, PostgreSQL errors that keep their cause.
//! - this file: wiring only ([`spawn`] starts a lifecycle stage of one table).

pub mod archiver;
pub mod columnar;
pub mod confirmer;
pub mod events;
pub mod export;
pub mod lake;
mod pg;
pub mod registry;
pub mod watcher;

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
