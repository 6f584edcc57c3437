//! The confirmer stage: `archived:{T}` → the archive read back and checked → the chunk marked
//! verified and, if the table's policy says so, dropped.
//!
//! Checks, in order: the object exists and has the size the archiver recorded; (with
//! `verify_sha256`) its content hashes to the recorded SHA-256; its Parquet footer parses, its
//! row count equals the recorded one, the row groups add up, `strata.*` footer keys name this
//! table and chunk; its Arrow schema equals the chunk's columns in PostgreSQL (names and types);
//! and the chunk's `count(*)` equals the row count. Only then is the row `verified`. Dropping
//! happens in one transaction that locks the chunk, counts it again (late rows may have arrived),
//! detaches and drops it (native) or calls `drop_chunks` (TimescaleDB), and records `dropped`.
//!
//! A failed check never drops anything: the object moves to `<prefix>/_rejected/`, the row goes
//! back to `pending` with a new event id and one more `verify_failures`, and a new archival event
//! is forwarded to `archive:{T}`. Past `[confirmer] max_rearchives` the archiver dead-letters
//! that event to `archive:{T}:dlq`.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::file::metadata::ParquetMetaDataReader;
use serde::Deserialize;
use strata_pipeline::error::SqlState;
use strata_pipeline::observe;
use strata_pipeline::runner::{run_loop, Batch, DeadLetter, LoopStats, Outcome, Stage};
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{Entry, Fields, StreamKind};
use strata_pipeline::{RetryHint, StageError};
use tracing::{info, warn};

use crate::catalog::{ident, CachedPartitioning, Partitioning, CHUNKS};
use crate::registry::{own_postgres_pool, StageSpec, StartContext, Tasks, ONE_AT_A_TIME};

use super::columnar::{arrow_type, column_type_from_sql};
use super::events::{rfc3339_us, ArchivalConfirmation, ArchivalStatus};
use super::export::{META_CHUNK, META_ROWS, META_TABLE};
use super::lake::{store_error, Lake};
use super::pg;
use super::registry::{self, ChunkRow, ChunkState, Found};
use strata_pipeline::error_chain;

/// Verifies archives of one table and drops their chunks.
pub struct Confirmer {
    /// The table's schema.
    pub schema: SchemaRef,
    /// Connections of this stage.
    pub pool: deadpool_postgres::Pool,
    /// Where archives are.
    pub lake: Arc<Lake>,
    /// What to verify, how often to re-archive.
    pub config: ConfirmerConfig,
    /// How the table is partitioned, read once.
    pub partitioning: CachedPartitioning,
}

/// The outcome of checking one archive.
enum Check {
    /// Everything matches.
    Good,
    /// A deterministic mismatch: the archive must not be trusted.
    Bad(String),
}

impl Confirmer {
    async fn partitioning(&self) -> Result<Partitioning, StageError> {
        self.partitioning.get(&self.pool, &self.schema.table).await
    }

    async fn handle(&self, entry: &Entry) -> Result<Option<Fields>, StageError> {
        let table = &self.schema.table;
        let conf = ArchivalConfirmation::from_entry(entry).map_err(|e| {
            StageError::dead_letter(format!(
                "archival confirmation {} for `{table}`: {e}",
                entry.id
            ))
        })?;
        let client = self.pool.get().await?;
        let Some(row) = registry::load(&client, conf.chunk_id).await? else {
            return Err(StageError::dead_letter(format!(
                "archival confirmation {} for `{table}`: no row {} in {CHUNKS}",
                entry.id, conf.chunk_id
            )));
        };
        drop(client);
        if row.event_id != conf.event_id {
            info!(table = %table, chunk = %row.display_name(), "confirmation of a superseded archive; ignoring it");
            return Ok(None);
        }
        let drop_after = self.schema.policy.drop_after_archive;
        match (row.state, conf.status) {
            (ChunkState::Archived, ArchivalStatus::Archived) => {}
            (ChunkState::Verified, _) if drop_after => return self.drop_chunk(&row).await,
            (_, ArchivalStatus::Failed) => {
                warn!(table = %table, chunk = %row.display_name(), error = %conf.error_message, "archiver reported a failure");
                return Ok(None);
            }
            _ => return Ok(None),
        }
        match self.check(&row).await? {
            Check::Bad(reason) => return self.rearchive(&row, &reason).await,
            Check::Good => {}
        }
        let client = self.pool.get().await?;
        match registry::mark_verified(&client, row.key()).await {
            Ok(_) => {}
            // Another confirmer verified it meanwhile (a redelivered confirmation): go on to
            // the drop, which checks the state again under the chunk's lock.
            Err(e) if e.found() == Some(&Found::State(ChunkState::Verified)) => {}
            Err(e) if e.found().is_some() => {
                info!(table = %table, chunk = %row.display_name(), reason = %e, "the chunk moved on meanwhile; nothing to verify");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        drop(client);
        info!(table = %table, chunk = %row.display_name(), rows = row.rows.unwrap_or(0), "archive verified");
        if drop_after {
            return self.drop_chunk(&row).await;
        }
        Ok(None)
    }

    /// Reads the archive back and compares it with the chunk. Transient faults are errors;
    /// mismatches are [`Check::Bad`].
    async fn check(&self, row: &ChunkRow) -> Result<Check, StageError> {
        let chunk = row.display_name();
        let table = &self.schema.table;
        let (Some(key), Some(rows), Some(bytes), Some(sha)) =
            (&row.lake_path, row.rows, row.bytes, &row.sha256)
        else {
            return Ok(Check::Bad("the archive is not fully recorded".into()));
        };
        let path = Path::from(key.as_str());
        let context = |what: &str| format!("verifying chunk {chunk} of `{table}`: {what} {key}");
        let meta = match self.lake.store.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Check::Bad(format!("the object {key} does not exist")))
            }
            Err(e) => return Err(store_error(&context("HEAD"), e)),
        };
        if meta.size != bytes as u64 {
            return Ok(Check::Bad(format!(
                "the object {key} is {} bytes, the archiver wrote {bytes}",
                meta.size
            )));
        }
        if self.config.verify_sha256 {
            let (got, size) = match self.lake.digest(key).await {
                Ok(d) => d,
                Err(object_store::Error::NotFound { .. }) => {
                    return Ok(Check::Bad(format!("the object {key} does not exist")))
                }
                Err(e) => return Err(store_error(&context("reading"), e)),
            };
            if got != *sha || size != bytes as u64 {
                return Ok(Check::Bad(format!(
                    "the object {key} has SHA-256 {got} ({size} bytes), the archiver wrote {sha} ({bytes} bytes)"
                )));
            }
        }
        let footer = match self.read_footer(&path, meta.size).await {
            Ok(Ok(f)) => f,
            Ok(Err(reason)) => {
                return Ok(Check::Bad(format!(
                    "the object {key} has no readable Parquet footer: {reason}"
                )))
            }
            Err(e) => return Err(store_error(&context("reading the footer of"), e)),
        };
        let file = footer.metadata().file_metadata();
        if file.num_rows() != rows {
            return Ok(Check::Bad(format!(
                "the object {key} holds {} rows, the archiver wrote {rows}",
                file.num_rows()
            )));
        }
        let in_groups: i64 = footer
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .sum();
        if in_groups != rows {
            return Ok(Check::Bad(format!(
                "the row groups of {key} hold {in_groups} rows, its footer says {rows}"
            )));
        }
        let kv = |name: &str| {
            file.key_value_metadata()
                .and_then(|kvs| kvs.iter().find(|k| k.key == name))
                .and_then(|k| k.value.clone())
        };
        for (name, want) in [
            (META_TABLE, table.clone()),
            (META_CHUNK, chunk.clone()),
            (META_ROWS, rows.to_string()),
        ] {
            if kv(name).as_deref() != Some(want.as_str()) {
                return Ok(Check::Bad(format!(
                    "the footer of {key} has {name} = {:?}, expected {want:?}",
                    kv(name)
                )));
            }
        }
        // The chunk in PostgreSQL: its columns and its row count.
        let partitioning = self.partitioning().await?;
        let client = self.pool.get().await?;
        let pg = |what: &str| {
            let context = format!("verifying chunk {chunk} of `{table}`: {what}");
            pg::context(context)
        };
        let columns = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&row.chunk_oid],
            )
            .await
            .map_err(pg("reading its columns"))?;
        if columns.is_empty() {
            return Err(StageError::dead_letter(format!(
                "chunk {chunk} of `{table}` no longer exists; nothing to verify against"
            )));
        }
        let file_fields = footer.schema().fields();
        let pg_fields: Vec<(String, String)> =
            columns.iter().map(|r| (r.get(0), r.get(1))).collect();
        if pg_fields.len() != file_fields.len() {
            return Ok(Check::Bad(format!(
                "the object {key} has {} columns, the chunk has {}",
                file_fields.len(),
                pg_fields.len()
            )));
        }
        for ((name, sql_type), field) in pg_fields.iter().zip(file_fields.iter()) {
            let want = column_type_from_sql(sql_type).map(arrow_type);
            if field.name() != name || want.as_ref() != Some(field.data_type()) {
                return Ok(Check::Bad(format!(
                    "column `{}` of {key} is {}, the chunk's column `{name}` is {sql_type}",
                    field.name(),
                    field.data_type()
                )));
            }
        }
        let count = self.count(&client, row, partitioning).await?;
        if count != rows {
            return Ok(Check::Bad(format!(
                "the chunk holds {count} rows now, the archive {rows} (rows arrived late?)"
            )));
        }
        Ok(Check::Good)
    }

    /// Reads and decodes the Parquet footer of the object at `path` (`size` bytes): two ranged
    /// reads, the 8-byte tail then the metadata. `Ok(Err(reason))` when it is not valid Parquet.
    async fn read_footer(
        &self,
        path: &Path,
        size: u64,
    ) -> Result<Result<ArrowReaderMetadata, String>, object_store::Error> {
        if size < 12 {
            return Ok(Err(format!("{size} bytes is too small for Parquet")));
        }
        let tail = self.lake.store.get_range(path, size - 8..size).await?;
        if &tail[4..] != b"PAR1" {
            return Ok(Err("the file does not end with PAR1".into()));
        }
        let len = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
        if len + 12 > size {
            return Ok(Err(format!(
                "footer length {len} does not fit in {size} bytes"
            )));
        }
        let buf = self
            .lake
            .store
            .get_range(path, size - 8 - len..size - 8)
            .await?;
        Ok(ParquetMetaDataReader::decode_metadata(&buf)
            .and_then(|m| ArrowReaderMetadata::try_new(Arc::new(m), ArrowReaderOptions::new()))
            .map_err(|e| error_chain(&e)))
    }

    async fn count(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        row: &ChunkRow,
        partitioning: Partitioning,
    ) -> Result<i64, StageError> {
        let r = match partitioning {
            Partitioning::Native => {
                client
                    .query_one(&format!("SELECT count(*) FROM {}", row.relation()), &[])
                    .await
            }
            Partitioning::Hypertable => {
                let time = ident(&self.schema.columns[self.schema.time_index].name);
                client
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {} WHERE {time} >= $1::text::timestamptz AND {time} < $2::text::timestamptz",
                            ident(&self.schema.table)
                        ),
                        &[&rfc3339_us(row.range_start_us), &rfc3339_us(row.range_end_us)],
                    )
                    .await
            }
        };
        r.map(|r| r.get(0)).map_err(|e| {
            pg::error(
                &format!(
                    "counting chunk {} of `{}`",
                    row.display_name(),
                    self.schema.table
                ),
                e,
            )
        })
    }

    /// Drops a verified chunk, counting it again under its lock first. Losing a lock race
    /// (deadlock victim, `lock_timeout`) leaves the chunk `verified` and is retried.
    async fn drop_chunk(&self, row: &ChunkRow) -> Result<Option<Fields>, StageError> {
        self.drop_chunk_once(row)
            .await
            .map_err(lock_conflict_is_transient)
    }

    /// One attempt of [`Confirmer::drop_chunk`], in one transaction.
    async fn drop_chunk_once(&self, row: &ChunkRow) -> Result<Option<Fields>, StageError> {
        let table = &self.schema.table;
        let chunk = row.display_name();
        let pg = |what: &str| {
            let context = format!("dropping chunk {chunk} of `{table}`: {what}");
            pg::context(context)
        };
        let partitioning = self.partitioning().await?;
        let mut conn = self.pool.get().await?;
        let tx = pg::begin_with_lock_timeout(
            &mut conn,
            self.config.lock_timeout_ms,
            &format!("dropping chunk {chunk} of `{table}`"),
        )
        .await?;
        let same = tx
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 AND c.relname = $2 AND n.nspname = $3",
                &[&row.chunk_oid, &row.chunk, &row.chunk_schema],
            )
            .await
            .map_err(pg("looking it up"))?
            .is_some();
        if !same {
            registry::mark_dropped(
                &tx,
                row.key(),
                Some("the chunk was gone when strata came to drop it"),
            )
            .await?;
            tx.commit().await.map_err(pg("COMMIT"))?;
            warn!(table = %table, chunk = %chunk, "verified chunk was already gone");
            return Ok(None);
        }
        // Locks in the writer's order, parent before chunk. A COPY into the table holds ROW
        // EXCLUSIVE on the parent and then takes it on the chunk a row routes to; DETACH needs
        // ACCESS EXCLUSIVE on the parent. Locking the chunk first would wait for the parent
        // while holding the chunk, and a writer with late rows for the chunk would close the
        // cycle (40P01). Taking the parent first (ONLY: not every partition) waits for the
        // writers in flight, under lock_timeout, and holds new ones back until COMMIT.
        // TimescaleDB's drop_chunks needs only ACCESS SHARE on the hypertable, which no writer
        // conflicts with, so there the chunk is locked first as before.
        if partitioning == Partitioning::Native {
            tx.batch_execute(&format!(
                "LOCK TABLE ONLY {} IN ACCESS EXCLUSIVE MODE",
                ident(table)
            ))
            .await
            .map_err(pg("locking its table"))?;
        }
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            row.relation()
        ))
        .await
        .map_err(pg("locking it"))?;
        let count = self.count(&tx, row, partitioning).await?;
        let rows = row.rows.unwrap_or(-1);
        if count != rows {
            drop(tx);
            return self
                .rearchive(
                    row,
                    &format!(
                        "the chunk holds {count} rows now, the archive {rows} (rows arrived late)"
                    ),
                )
                .await;
        }
        match partitioning {
            Partitioning::Native => {
                tx.batch_execute(&format!(
                    "ALTER TABLE {} DETACH PARTITION {}; DROP TABLE {};",
                    ident(table),
                    row.relation(),
                    row.relation()
                ))
                .await
                .map_err(pg("DETACH and DROP"))?;
            }
            Partitioning::Hypertable => {
                let dropped: Vec<String> = tx
                    .query(
                        "SELECT drop_chunks($1::text::regclass, older_than => $2::text::timestamptz, newer_than => $3::text::timestamptz)::text",
                        &[&ident(table), &rfc3339_us(row.range_end_us), &rfc3339_us(row.range_start_us)],
                    )
                    .await
                    .map_err(pg("drop_chunks"))?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let name = format!("{}.{}", row.chunk_schema, row.chunk);
                if !dropped
                    .iter()
                    .any(|d| d == &name || d.ends_with(&format!(".{}", row.chunk)))
                {
                    return Err(StageError::dead_letter(format!(
                        "dropping chunk {chunk} of `{table}`: drop_chunks dropped {dropped:?}, not this chunk"
                    )));
                }
            }
        }
        registry::mark_dropped(&tx, row.key(), None).await?;
        tx.commit().await.map_err(pg("COMMIT"))?;
        metrics::counter!(observe::CHUNKS_DROPPED, "table" => table.clone()).increment(1);
        info!(table = %table, chunk = %chunk, rows, "dropped chunk; its archive is the only copy now");
        Ok(None)
    }

    /// The archive failed a check: move it aside, send the chunk back to `pending` with a new
    /// event, and forward that event to `archive:{T}`.
    async fn rearchive(&self, row: &ChunkRow, reason: &str) -> Result<Option<Fields>, StageError> {
        let table = &self.schema.table;
        let chunk = row.display_name();
        let mut moved = None;
        if let Some(key) = &row.lake_path {
            moved =
                self.lake.reject(key).await.map_err(|e| {
                    store_error(&format!("moving the rejected archive {key} aside"), e)
                })?;
        }
        let client = self.pool.get().await?;
        let updated = match registry::send_back_to_pending(&client, row.key(), reason).await {
            Ok(updated) => updated,
            Err(e) if e.found().is_some() => {
                // Another confirmer got there first.
                info!(table = %table, chunk = %chunk, reason = %e, "chunk already sent back");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        metrics::counter!(observe::VERIFY_FAILURES, "table" => table.clone()).increment(1);
        warn!(
            table = %table,
            chunk = %chunk,
            reason = %reason,
            rejected_object = moved.as_deref().unwrap_or("-"),
            failures = updated.verify_failures,
            "archive failed verification; nothing dropped, archiving again"
        );
        Ok(Some(updated.event().to_fields()))
    }
}

/// SQLSTATEs of a lost lock race: chosen as a deadlock victim (40P01), or `lock_timeout`
/// reached while a writer held the table (55P03).
const LOCK_CONFLICTS: [SqlState; 2] = [
    SqlState::T_R_DEADLOCK_DETECTED,
    SqlState::LOCK_NOT_AVAILABLE,
];

/// A lost lock race while dropping is transient whatever its class says elsewhere: the chunk
/// stays `verified` and the drop is retried with backoff, never counted against the chunk.
fn lock_conflict_is_transient(mut e: StageError) -> StageError {
    if e.sqlstate
        .as_ref()
        .is_some_and(|code| LOCK_CONFLICTS.contains(code))
    {
        e.hint = RetryHint::Backoff;
        e.message
            .push_str(" (the chunk stays verified; the drop is retried)");
    }
    e
}

impl Stage for Confirmer {
    async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
        let mut outcome = Outcome::default();
        for (i, entry) in batch.entries.iter().enumerate() {
            match self.handle(entry).await {
                Ok(Some(fields)) => outcome.forward.push(fields),
                Ok(None) => {}
                Err(e) if e.hint == RetryHint::DeadLetter => {
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

/// `[confirmer]`: reads each archive back, verifies it, then drops the chunk if the policy says so.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConfirmerConfig {
    /// Confirmations verified at once per table.
    pub workers: usize,
    /// Read the whole object back and compare its SHA-256 with the archiver's; without it only
    /// the size, the footer and the row count are checked.
    pub verify_sha256: bool,
    /// A chunk whose archive fails verification is archived again at most this many times;
    /// after that its archival event goes to `archive:{T}:dlq` and the chunk stays.
    pub max_rearchives: u32,
    /// How long dropping a chunk waits for its lock (writers of late rows hold it briefly).
    pub lock_timeout_ms: u64,
}

impl Default for ConfirmerConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            verify_sha256: true,
            max_rearchives: 3,
            lock_timeout_ms: 10_000,
        }
    }
}

/// The confirmer's registry entry: a failed check sends the chunk back to `archive:{T}`.
pub const STAGE: StageSpec = StageSpec {
    name: "confirmer",
    about: "Run the confirmer stage: archived:{T} → verified (and dropped) chunks",
    input: Some(StreamKind::Archived),
    output: Some(StreamKind::Archive),
    section: "confirmer",
    validate: |_| Ok(()),
    needs_postgres: true,
    effects_outside_redis: true,
    redis_connections: |_, _| 2,
    // Its own pool: two connections per archive in flight.
    postgres_connections: |_, _| 0,
    start,
};

/// Starts the confirmer loop of `schema`'s table with a PostgreSQL pool of its own.
fn start<'a>(
    ctx: &'a StartContext<'a>,
    schema: &'a SchemaRef,
    _partitions: std::ops::Range<u32>,
    tasks: &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>> {
    Box::pin(async move {
        let config = ctx.config;
        let workers = config.confirmer.workers.max(1);
        let stage = Confirmer {
            schema: schema.clone(),
            pool: own_postgres_pool(config, 2 * workers)?,
            lake: Lake::open_shared(&config.lake)?,
            config: config.confirmer.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_lock_race_while_dropping_is_retried() {
        for code in &LOCK_CONFLICTS {
            let mut e = StageError::dead_letter("dropping chunk c: DETACH and DROP");
            e.sqlstate = Some(code.clone());
            let e = lock_conflict_is_transient(e);
            assert_eq!(e.hint, RetryHint::Backoff, "{}", code.code());
            assert!(e.message.contains("retried"), "{}", e.message);
        }
        let mut other = StageError::dead_letter("dropping chunk c: bad");
        other.sqlstate = Some(SqlState::INVALID_TEXT_REPRESENTATION);
        assert_eq!(
            lock_conflict_is_transient(other).hint,
            RetryHint::DeadLetter
        );
    }
}
