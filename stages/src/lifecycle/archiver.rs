//! The archiver stage: `archive:{T}` → one Parquet object per chunk in the lake →
//! a confirmation on `archived:{T}`.
//!
//! Per event, in one PostgreSQL transaction that holds an advisory lock on the chunk's row (so two
//! archivers never work on one chunk, and a crash releases it): check the row is still waiting
//! for this event, record `archiving` with the new object key (on a second connection, so it is
//! visible at once), COPY the chunk out and stream it to the lake, record `archived` with rows,
//! bytes and SHA-256, COMMIT; the runner then forwards the confirmation and acknowledges the
//! event in one atomic step. A redelivered event finds the row `archived` and forwards the same
//! confirmation again without writing anything. Leftovers of an attempt that crashed (a complete
//! but unrecorded object, local staging files) are removed before the next attempt.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use strata_pipeline::observe;
use strata_pipeline::runner::{run_loop, Batch, DeadLetter, LoopStats, Outcome, Stage};
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{Entry, Fields, StreamKind};
use strata_pipeline::{error_chain, RetryHint, StageError};
use tracing::{info, warn};

use crate::catalog::{ident, CachedPartitioning, Partitioning, CHUNKS};
use crate::registry::{own_postgres_pool, StageSpec, StartContext, Tasks, ONE_AT_A_TIME};

use super::events::{rfc3339_us, ArchivalConfirmation, ArchivalEvent, ArchivalStatus};
use super::export::{export, footer, writer_properties, ExportError};
use super::lake::{store_error, Lake, Upload};
use super::pg;
use super::registry::{self, Archive, ChunkRow, ChunkState, Key};

/// First key of the advisory lock an archiver holds on a chunk's row (the second is the row id).
pub const LOCK_CLASS: i32 = 0x5354_4131; // "STA1"

/// Archives the chunks of one table.
pub struct Archiver {
    /// The table's schema: the columns archived and their types.
    pub schema: SchemaRef,
    /// Connections of this stage (two per chunk in flight).
    pub pool: deadpool_postgres::Pool,
    /// Where archives go.
    pub lake: Arc<Lake>,
    /// Row groups, compression, parts.
    pub config: ArchiverConfig,
    /// Verification failures after which a chunk's event is dead-lettered instead of archived.
    pub max_rearchives: u32,
    /// How the table is partitioned, read once.
    pub partitioning: CachedPartitioning,
}

impl Archiver {
    async fn partitioning(&self) -> Result<Partitioning, StageError> {
        self.partitioning.get(&self.pool, &self.schema.table).await
    }

    /// `COPY (SELECT <columns> FROM <chunk>) TO STDOUT (FORMAT binary)`, each column cast to its
    /// schema type so the binary format is the one the decoder expects.
    fn copy_sql(&self, row: &ChunkRow, partitioning: Partitioning) -> String {
        let columns: Vec<String> = self
            .schema
            .columns
            .iter()
            .map(|c| format!("{}::{}", ident(&c.name), c.ty.sql()))
            .collect();
        let source = match partitioning {
            Partitioning::Native => row.relation(),
            // Through the hypertable, so compressed chunks are read transparently.
            Partitioning::Hypertable => format!(
                "{} WHERE {time} >= '{}'::timestamptz AND {time} < '{}'::timestamptz",
                ident(&self.schema.table),
                rfc3339_us(row.range_start_us),
                rfc3339_us(row.range_end_us),
                time = ident(&self.schema.columns[self.schema.time_index].name),
            ),
        };
        format!(
            "COPY (SELECT {} FROM {source}) TO STDOUT (FORMAT binary)",
            columns.join(", ")
        )
    }

    fn confirmation(&self, row: &ChunkRow) -> Fields {
        let key = row.lake_path.clone().unwrap_or_default();
        ArchivalConfirmation {
            event_id: row.event_id.clone(),
            chunk_id: row.id,
            table: row.table_name.clone(),
            chunk: row.display_name(),
            status: ArchivalStatus::Archived,
            completed_at_us: chrono::Utc::now().timestamp_micros(),
            lakehouse_path: self.lake.url(&key),
            rows: row.rows.unwrap_or(0),
            bytes: row.bytes.unwrap_or(0),
            sha256: row.sha256.clone().unwrap_or_default(),
            error_message: String::new(),
        }
        .to_fields()
    }

    /// Handles one event: `Ok(Some(confirmation))` to forward, `Ok(None)` to just acknowledge.
    async fn handle(&self, entry: &Entry) -> Result<Option<Fields>, StageError> {
        let table = &self.schema.table;
        let event = ArchivalEvent::from_entry(entry).map_err(|e| {
            StageError::dead_letter(format!("archival event {} for `{table}`: {e}", entry.id))
        })?;
        if event.table != *table {
            return Err(StageError::dead_letter(format!(
                "archival event {} names table `{}` but arrived on the stream of `{table}`",
                entry.id, event.table
            )));
        }
        let result = self.archive(&event).await;
        if let Err(e) = &result {
            if e.hint == RetryHint::DeadLetter {
                match self.pool.get().await {
                    Ok(client) => {
                        if let Err(me) =
                            registry::mark_failed(&client, Key::of_event(&event), &e.reason()).await
                        {
                            warn!(table = %table, chunk = %event.chunk, error = %me, "could not record the failure");
                        }
                    }
                    Err(pe) => {
                        warn!(table = %table, chunk = %event.chunk, error = %pe, "could not record the failure")
                    }
                }
            }
        }
        result
    }

    async fn archive(&self, event: &ArchivalEvent) -> Result<Option<Fields>, StageError> {
        let table = &self.schema.table;
        let chunk = &event.chunk;
        let pg = |what: &str| {
            let context = format!("archiving chunk {chunk} of `{table}`: {what}");
            pg::context(context)
        };
        let partitioning = self.partitioning().await?;
        let mut conn = self.pool.get().await?;
        let tx = pg::begin_with_lock_timeout(
            &mut conn,
            self.config.lock_timeout_ms,
            &format!("archiving chunk {chunk} of `{table}`"),
        )
        .await?;
        let key2 = (event.chunk_id % i32::MAX as i64) as i32;
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1, $2)",
                &[&LOCK_CLASS, &key2],
            )
            .await
            .map_err(pg("locking the chunk"))?
            .get(0);
        if !locked {
            return Err(StageError::backoff(format!(
                "chunk {chunk} of `{table}` is being archived by another archiver"
            )));
        }
        let row = registry::load(&tx, event.chunk_id).await?.ok_or_else(|| {
            StageError::dead_letter(format!(
                "chunk {chunk} of `{table}`: no row {} in {CHUNKS}",
                event.chunk_id
            ))
        })?;
        if row.event_id != event.event_id {
            info!(table = %table, chunk = %chunk, event_id = %event.event_id, "superseded archival event; ignoring it");
            return Ok(None);
        }
        let mut row = row;
        match row.state {
            ChunkState::Archived => return Ok(Some(self.confirmation(&row))),
            ChunkState::Verified | ChunkState::Dropped => return Ok(None),
            ChunkState::Failed => {
                // Nothing re-emits a failed chunk's event but `strata dlq replay`: the operator
                // fixed the cause, so the chunk gets a fresh verification budget.
                info!(table = %table, chunk = %chunk, "archival event of a failed chunk replayed; archiving it again");
                let c2 = self.pool.get().await?;
                row = registry::replay_failed(&c2, row.key()).await?;
            }
            ChunkState::Pending | ChunkState::Archiving => {}
        }
        if row.verify_failures as u32 > self.max_rearchives {
            return Err(StageError::dead_letter(format!(
                "chunk {chunk} of `{table}`: its archive failed verification {} times, more than [confirmer] max_rearchives = {} (last: {}); the chunk stays in PostgreSQL",
                row.verify_failures,
                self.max_rearchives,
                row.last_error.as_deref().unwrap_or("unknown")
            )));
        }
        let exists = tx
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 AND c.relname = $2 AND n.nspname = $3",
                &[&row.chunk_oid, &row.chunk, &row.chunk_schema],
            )
            .await
            .map_err(pg("looking up the chunk"))?
            .is_some();
        if !exists {
            return Err(StageError::dead_letter(format!(
                "chunk {chunk} of `{table}` no longer exists (dropped outside strata?); nothing to archive"
            )));
        }
        if let (ChunkState::Archiving, Some(previous)) = (row.state, &row.lake_path) {
            info!(table = %table, chunk = %chunk, path = %previous, "removing what an interrupted attempt left");
            self.lake
                .discard(previous)
                .await
                .map_err(|e| store_error(&format!("removing {previous}"), e))?;
        }
        let key = self.lake.new_key(table, &row.chunk, row.range_start_us);
        // On a second connection, so the attempt and its key are visible at once.
        let row = {
            let c2 = self.pool.get().await?;
            registry::begin_archiving(&c2, row.key(), &key).await?
        };
        info!(table = %table, chunk = %chunk, path = %key, attempt = row.attempts, "archiving chunk");
        let started = std::time::Instant::now();
        let copy = tx
            .copy_out(&self.copy_sql(&row, partitioning))
            .await
            .map_err(pg("COPY"))?;
        let kv = footer(
            table,
            &row.display_name(),
            &rfc3339_us(row.range_start_us),
            &rfc3339_us(row.range_end_us),
        );
        let props = writer_properties(&self.schema, &self.config, kv)
            .map_err(|e| StageError::fatal(format!("[archiver] settings: {e}")))?;
        let upload = Upload::new(
            self.lake.store.clone(),
            &key,
            self.config.part_size_bytes,
            self.config.max_concurrent_parts,
        );
        let exported = export(copy, &self.schema, props, self.config.batch_rows, upload)
            .await
            .map_err(|e| {
                let context = format!("archiving chunk {chunk} of `{table}` to {key}");
                match e {
                    ExportError::Postgres(e) => pg::error(&context, e),
                    ExportError::Store(e) => store_error(&context, e),
                    ExportError::Encoder(m) => StageError::backoff(format!("{context}: {m}")),
                    other => StageError::dead_letter(format!("{context}: {}", error_chain(&other))),
                }
            })?;
        let rows = exported.rows as i64;
        let bytes = exported.bytes as i64;
        let done = registry::mark_archived(
            &tx,
            row.key(),
            &Archive {
                rows,
                bytes,
                sha256: &exported.sha256,
                lake_path: &key,
            },
        )
        .await?;
        tx.commit().await.map_err(pg("COMMIT"))?;
        let labels = [("table", table.clone())];
        metrics::histogram!(observe::UPLOAD_DURATION, &labels)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(observe::ARCHIVED_BYTES, &labels).increment(exported.bytes);
        info!(
            table = %table,
            chunk = %chunk,
            path = %key,
            rows,
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "archived chunk"
        );
        Ok(Some(self.confirmation(&done)))
    }
}

impl Stage for Archiver {
    async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
        let mut outcome = Outcome::default();
        for (i, entry) in batch.entries.iter().enumerate() {
            match self.handle(entry).await {
                Ok(Some(fields)) => outcome.forward.push(fields),
                Ok(None) => {}
                Err(e) if e.hint == RetryHint::DeadLetter => {
                    // Tell the confirmer's stream too: a `failed` confirmation with the reason.
                    if let Ok(event) = ArchivalEvent::from_entry(entry) {
                        outcome.forward.push(
                            ArchivalConfirmation {
                                event_id: event.event_id,
                                chunk_id: event.chunk_id,
                                table: event.table,
                                chunk: event.chunk,
                                status: ArchivalStatus::Failed,
                                completed_at_us: chrono::Utc::now().timestamp_micros(),
                                lakehouse_path: String::new(),
                                rows: 0,
                                bytes: 0,
                                sha256: String::new(),
                                error_message: e.reason(),
                            }
                            .to_fields(),
                        );
                    }
                    outcome.dead_letters.push(DeadLetter {
                        entry: i,
                        fields: None,
                        error: e.reason(),
                        sqlstate: e.sqlstate_code(),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(outcome)
    }
}

/// `[archiver]`: chunk → Parquet → object store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiverConfig {
    /// Chunks archived at once per table (each holds two PostgreSQL connections).
    pub workers: usize,
    /// Rows of one Parquet row group: the unit memory is bounded by.
    pub row_group_rows: usize,
    /// Encoded bytes of one row group at most, whichever limit comes first.
    pub row_group_bytes: usize,
    /// Rows decoded from COPY into one Arrow record batch before encoding.
    pub batch_rows: usize,
    /// zstd level of Parquet pages (1 fast … 22 small).
    pub zstd_level: i32,
    /// Multipart upload part size; objects smaller than one part are written in one PUT.
    pub part_size_bytes: usize,
    /// Parts uploaded at once.
    pub max_concurrent_parts: usize,
    /// How long to wait for a lock on the chunk (another archiver, a writer's late rows).
    pub lock_timeout_ms: u64,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            row_group_rows: 1_048_576,
            row_group_bytes: 64 << 20,
            batch_rows: 65_536,
            zstd_level: 3,
            part_size_bytes: 16 << 20,
            max_concurrent_parts: 2,
            lock_timeout_ms: 10_000,
        }
    }
}

/// The archiver's registry entry.
pub const STAGE: StageSpec = StageSpec {
    name: "archiver",
    about: "Run the archiver stage: archive:{T} → Parquet in the lake → archived:{T}",
    input: Some(StreamKind::Archive),
    output: Some(StreamKind::Archived),
    section: "archiver",
    validate: |_| Ok(()),
    needs_postgres: true,
    effects_outside_redis: true,
    redis_connections: |_, _| 2,
    // Its own pool: two connections per chunk in flight.
    postgres_connections: |_, _| 0,
    start,
};

/// Starts the archiver loop of `schema`'s table with a PostgreSQL pool of its own.
fn start<'a>(
    ctx: &'a StartContext<'a>,
    schema: &'a SchemaRef,
    _partitions: std::ops::Range<u32>,
    tasks: &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>> {
    Box::pin(async move {
        let config = ctx.config;
        let workers = config.archiver.workers.max(1);
        let stage = Archiver {
            schema: schema.clone(),
            pool: own_postgres_pool(config, 2 * workers + 1)?,
            lake: Lake::open_shared(&config.lake)?,
            config: config.archiver.clone(),
            max_rearchives: config.confirmer.max_rearchives,
            partitioning: Default::default(),
        };
        let spec = STAGE.loop_spec(&schema.table, 0, ONE_AT_A_TIME, workers, config);
        tasks.spawn(run_loop(
            Arc::new(stage),
            spec,
            ctx.redis.clone(),
            ctx.shutdown.clone(),
            Arc::new(LoopStats::default()),
        ));
        Ok(())
    })
}
