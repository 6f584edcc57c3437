//! The batch-writer stage: frames from `rows:{T}` into the table with binary COPY, exactly once.
//!
//! A process reads every partition's `rows` stream of a table in one loop
//! ([`run_loop_over`]): a batch gathers the frames of all of them, so a COPY is as large with six
//! partitions as with one (its frames are acknowledged per partition, each in its slot).
//!
//! One transaction per batch: record the frame IDs in `strata.applied_frames` (frames already
//! there are skipped: they were written before a crash or by a consumer that lost them), COPY
//! the rows of the new frames, COMMIT. The runner acknowledges only after this returns.
//!
//! Any failure of a COPY that is not on the explicit transient or fatal lists
//! ([`strata_pipeline::error::postgres_hint`]) may depend on the rows, so the rows are bisected
//! under savepoints (at most 2n − 1 COPYs for n rows) and each row that fails on its own is
//! dead-lettered alone with its SQLSTATE; a transient fault met during bisection abandons the
//! transaction and retries the batch, dead-lettering nothing. A native partition that cannot be
//! created for a chunk isolates the rows of that chunk the same way. Dead letters are stored with
//! the frame ID (as bytes, so a row PostgreSQL refused can always be recorded) and a redelivery
//! re-emits them instead of losing them.
//!
//! # Layout
//! - [`STAGE`]: its registry entry (`rows:{T}` as group `batch-writer`, into table `T`) and
//!   [`BatchWriterConfig`], its `[batch_writer]` section.
//! - [`BatchWriter`]: the [`Stage`]: applied frames, COPY, bisection of refused rows.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::SinkExt;
use strata_pipeline::config::BatchLimits;
use strata_pipeline::error::SqlState;
use strata_pipeline::frame::{CellRef, Frame, FIRST_MS_FIELD, FRAME_FIELD, ROWS_FIELD};
use strata_pipeline::latency::LatencyHistogram;
use strata_pipeline::observe::WriterMetrics;
use strata_pipeline::pg_limits::{MAX_TIME_US, MIN_TIME_US};
use strata_pipeline::runner::{run_loop_over, Backoff, Batch, DeadLetter, Outcome, Stage, Tick};
use strata_pipeline::schema::{Cell, SchemaRef};
use strata_pipeline::streams::{Entry, Fields, StreamId, StreamKind};
use strata_pipeline::trace::TRACEPARENTS_FIELD;
use strata_pipeline::{RetryHint, StageError};

use crate::catalog::{self, ident, KnownPartitions, Partitioning, APPLIED_FRAMES};
use crate::config::Config;
use crate::copy;
use crate::registry::{StageSpec, StartContext, Tasks};

strata_pipeline::batched_section! {
    /// `[batch_writer]`. Its batch keys bound the rows of one COPY transaction: flush at
    /// `max_batch_rows` rows, or `max_batch_bytes` bytes of compressed frames, or `linger_ms`
    /// after the first frame arrived.
    pub struct BatchWriterConfig {
        /// COPY transactions in flight at once per table, each on its own connection.
        pub connections: usize,
        /// Record applied frame IDs with the rows, so a redelivered frame is never written twice.
        /// Turning it off gives that guarantee up; it exists to measure what it costs.
        pub exactly_once: bool,
    }
}

impl Default for BatchWriterConfig {
    fn default() -> Self {
        Self {
            batch: BatchLimits {
                max_batch_rows: 20_000,
                max_batch_bytes: 16 << 20,
                linger_ms: 200,
            },
            connections: 2,
            exactly_once: true,
        }
    }
}

/// The batch-writer's registry entry.
pub const STAGE: StageSpec = StageSpec {
    name: "batch-writer",
    about: "Run the batch-writer stage: rows:{T} → binary COPY into table T",
    input: Some(StreamKind::Rows),
    output: None,
    section: "batch_writer",
    validate: validate_config,
    needs_postgres: true,
    effects_outside_redis: true,
    // Per partition its reader's connection (held) and its housekeeping's, and one per COPY in
    // flight (one loop reads every partition).
    redis_connections: |c, partitions| 2 * partitions as usize + c.batch_writer.connections,
    // One per COPY in flight and one for partitions and pruning.
    postgres_connections: |c, _| 1 + c.batch_writer.connections,
    start,
};

fn validate_config(config: &Config) -> Result<(), String> {
    config.batch_writer.batch.validate(STAGE.section)?;
    if config.batch_writer.connections == 0 {
        return Err("[batch_writer] connections must be > 0".into());
    }
    Ok(())
}

/// Starts the writer of `partitions` of `schema`'s table, one loop over all of them (waiting out
/// PostgreSQL outages), and its pruning of applied frames.
fn start<'a>(
    ctx: &'a StartContext<'a>,
    schema: &'a SchemaRef,
    partitions: std::ops::Range<u32>,
    tasks: &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>> {
    Box::pin(async move {
        let config = &ctx.config.batch_writer;
        let specs: Vec<_> = partitions
            .map(|partition| {
                let mut spec = STAGE.loop_spec(
                    &schema.table,
                    partition,
                    config.batch,
                    config.connections,
                    ctx.config,
                );
                spec.read_from = Some(ctx.redis_read.clone());
                spec
            })
            .collect();
        let streams = specs.iter().map(|s| s.input.clone()).collect();
        let mut writer = connect_writer(schema, streams, ctx).await?;
        writer.max_event_spans = ctx.config.tracing.max_event_spans_per_batch;
        writer.exactly_once = config.exactly_once;
        writer.latency = ctx.stats.latency.clone();
        writer.rows_written = ctx.stats.rows_written.clone();
        // Its applied-frame pruning runs as the stage's tick (see `Stage::tick` below).
        let writer = Arc::new(writer);
        tasks.spawn(run_loop_over(
            writer,
            specs,
            ctx.redis.clone(),
            ctx.shutdown.clone(),
            ctx.stats.batch_writer.clone(),
        ));
        Ok(())
    })
}

/// Builds a writer, waiting out PostgreSQL outages (but not a missing migration).
async fn connect_writer(
    schema: &SchemaRef,
    streams: Vec<String>,
    ctx: &StartContext<'_>,
) -> Result<BatchWriter, StageError> {
    let mut backoff = Backoff::new(ctx.config.streams.max_backoff_ms);
    loop {
        match BatchWriter::new(schema.clone(), streams.clone(), ctx.pg.clone()).await {
            Ok(w) => return Ok(w),
            Err(e) if e.hint == RetryHint::Backoff => {
                tracing::warn!(table = %schema.table, error = %e.reason(), "waiting for PostgreSQL");
                if !backoff.wait(ctx.shutdown).await {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A frame of a batch: the input it came from ([`Entry::input`]) and its ID in that stream.
type FrameKey = (u16, StreamId);

/// Largest decompressed frame accepted (a frame is at most one ingest batch).
const MAX_FRAME_BYTES: usize = 256 << 20;

/// Writes frames into one table.
pub struct BatchWriter {
    /// The table written to.
    schema: SchemaRef,
    /// The input streams (one per partition read), indexed by [`Entry::input`]: an applied
    /// frame is recorded with its stream.
    streams: Vec<String>,
    /// The index of each of `streams`.
    input_of: HashMap<String, u16>,
    /// Connections; one per batch in flight.
    pool: deadpool_postgres::Pool,
    /// Native partitions this process created or saw (None for hypertables).
    partitions: Option<KnownPartitions>,
    /// `COPY "t" ("a", "b", …) FROM STDIN (FORMAT binary)`.
    copy_sql: String,
    /// End-to-end latency of committed rows.
    pub latency: Arc<LatencyHistogram>,
    /// Rows committed.
    pub rows_written: Arc<AtomicU64>,
    /// Prometheus handles: rows written, COPY duration, end-to-end latency.
    metrics: WriterMetrics,
    /// Per batch, at most this many traced events get a COPY span.
    pub max_event_spans: usize,
    /// Record applied frame IDs (off only to measure what exactly-once costs).
    pub exactly_once: bool,
}

/// Rows of a batch encoded for COPY.
struct Encoded {
    /// The whole COPY body: header, every tuple, trailer. Shared, not copied, when every row
    /// goes in one COPY (the common case).
    buf: Bytes,
    /// Each tuple: where it is in `buf` and where it came from.
    rows: Vec<Tuple>,
    /// Chunk starts the rows fall into.
    chunks: BTreeSet<i64>,
    /// Tuples whose time is outside the range strata accepts (no partition can be made for
    /// them): refused on their own, never copied. Ingest writes none; a frame from elsewhere may.
    out_of_range: Vec<usize>,
}

/// One encoded row of a batch.
struct Tuple {
    /// Byte range of the tuple in [`Encoded::buf`].
    bytes: std::ops::Range<usize>,
    /// Index of its entry (frame) in the batch.
    entry: usize,
    /// Its row number in that frame.
    row: usize,
    /// Start of the chunk its time falls into (None when the frame lacks the time column).
    chunk: Option<i64>,
}

/// A row PostgreSQL refused on its own: its tuple index, why, and the SQLSTATE.
struct Refused {
    tuple: usize,
    message: String,
    sqlstate: Option<String>,
}

impl BatchWriter {
    /// Builds a writer for `schema` reading `streams` (entry `input` i came from `streams[i]`),
    /// reading how the table was migrated.
    pub async fn new(
        schema: SchemaRef,
        streams: Vec<String>,
        pool: deadpool_postgres::Pool,
    ) -> Result<Self, StageError> {
        // More than u16 can index is refused by the runner (`run_loop_over`), whose readers
        // number the entries.
        if streams.is_empty() {
            return Err(StageError::fatal("a writer reads at least one stream"));
        }
        let client = pool.get().await?;
        let partitioning = catalog::partitioning(&client, &schema.table).await?;
        let columns: Vec<String> = schema.columns.iter().map(|c| ident(&c.name)).collect();
        let copy_sql = format!(
            "COPY {} ({}) FROM STDIN (FORMAT binary)",
            ident(&schema.table),
            columns.join(", ")
        );
        let metrics = WriterMetrics::new(&schema.table);
        Ok(Self {
            partitions: (partitioning == Partitioning::Native).then(KnownPartitions::default),
            schema,
            input_of: streams
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), i as u16))
                .collect(),
            streams,
            pool,
            copy_sql,
            latency: Arc::default(),
            rows_written: Arc::default(),
            metrics,
            max_event_spans: 0,
            exactly_once: true,
        })
    }

    /// Forgets applied frames of `stream` older than `oldest`, the oldest frame the group may
    /// still deliver again (every frame before it is acknowledged for good). Returns rows
    /// deleted.
    pub async fn prune_applied(&self, stream: &str, oldest: StreamId) -> Result<u64, StageError> {
        // PostgreSQL's bigint: an ID past it (never made by a real clock) prunes nothing.
        let (Ok(ms), Ok(seq)) = (i64::try_from(oldest.ms), i64::try_from(oldest.seq)) else {
            return Ok(0);
        };
        let client = self.pool.get().await?;
        client
            .execute(
                &format!(
                    "DELETE FROM {APPLIED_FRAMES} WHERE stream = $1
                     AND (split_part(frame_id, '-', 1)::bigint, split_part(frame_id, '-', 2)::bigint) < ($2::bigint, $3::bigint)"
                ),
                &[&stream, &ms, &seq],
            )
            .await
            .map_err(|e| StageError::from_postgres("pruning applied frames", e))
    }

    /// The stream of input `input` (as [`Entry::input`], always one of `streams`).
    fn stream_of(&self, input: u16) -> &str {
        &self.streams[usize::from(input)]
    }

    /// The frame a row of `strata.applied_frames` names by its first two columns (stream and
    /// frame ID); None for a stream this writer does not read or an ID that does not parse.
    fn frame_key(&self, row: &tokio_postgres::Row) -> Option<FrameKey> {
        let input = *self.input_of.get(row.get::<_, &str>(0))?;
        Some((input, row.get::<_, &str>(1).parse().ok()?))
    }

    /// Decodes every frame of the batch into COPY tuples in table column order. Entries that
    /// are not frames, or whose frames do not decode or do not fit the table, become dead
    /// letters of their own.
    fn encode(
        &self,
        batch: &Batch,
        frames: &mut Vec<Option<Frame>>,
        dead: &mut Vec<DeadLetter>,
    ) -> Encoded {
        let mut enc = Encoded {
            buf: Bytes::new(),
            rows: Vec::new(),
            chunks: BTreeSet::new(),
            out_of_range: Vec::new(),
        };
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(copy::HEADER);
        let mut last_chunk = None;
        for (i, entry) in batch.entries.iter().enumerate() {
            let frame_start = enc.rows.len();
            let buf_start = buf.len();
            let refused_start = enc.out_of_range.len();
            match self.encode_frame(entry, i, &mut buf, &mut enc, &mut last_chunk) {
                Ok(frame) => frames.push(Some(frame)),
                Err(error) => {
                    // Nothing of a frame that does not encode whole goes in.
                    enc.rows.truncate(frame_start);
                    enc.out_of_range.truncate(refused_start);
                    buf.truncate(buf_start);
                    dead.push(DeadLetter {
                        entry: i,
                        fields: None,
                        error,
                        sqlstate: None,
                    });
                    frames.push(None);
                }
            }
        }
        buf.extend_from_slice(copy::TRAILER);
        enc.buf = buf.freeze();
        enc
    }

    /// Appends the tuples of one frame entry; the error says why the entry is not a frame this
    /// table can take.
    fn encode_frame(
        &self,
        entry: &Entry,
        index: usize,
        buf: &mut BytesMut,
        enc: &mut Encoded,
        last_chunk: &mut Option<i64>,
    ) -> Result<Frame, String> {
        let bytes = entry
            .field(FRAME_FIELD)
            .ok_or_else(|| format!("no `{FRAME_FIELD}` field"))?;
        let frame = Frame::decode(bytes, MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
        let map = self.column_map(&frame)?;
        let time_at = map[self.schema.time_index];
        let ncols = self.schema.columns.len();
        let mut cells = Vec::with_capacity(ncols);
        let mut it = frame.rows();
        let mut row = 0;
        while it
            .next_row(&mut cells)
            .map_err(|e| format!("row {row}: {e}"))?
        {
            let start = buf.len();
            copy::begin_tuple(buf, ncols);
            for (col, m) in map.iter().enumerate() {
                let cell = m.map_or(CellRef::Null, |j| cells[j]);
                let column = &self.schema.columns[col];
                if copy::put_cell(buf, column.ty, cell, col).is_err() {
                    // A frame whose cells do not fit their columns is not a frame ingest wrote.
                    return Err(format!(
                        "row {row}: column `{}` does not hold a {}",
                        column.name,
                        column.ty.sql()
                    ));
                }
            }
            let chunk = match time_at.map(|j| cells[j]) {
                Some(CellRef::Int(us)) if !(MIN_TIME_US..=MAX_TIME_US).contains(&us) => {
                    enc.out_of_range.push(enc.rows.len());
                    None
                }
                Some(CellRef::Int(us)) => {
                    let chunk = catalog::chunk_start(us, self.schema.chunk_interval_us);
                    if *last_chunk != Some(chunk) {
                        enc.chunks.insert(chunk);
                        *last_chunk = Some(chunk);
                    }
                    Some(chunk)
                }
                _ => None,
            };
            enc.rows.push(Tuple {
                bytes: start..buf.len(),
                entry: index,
                row,
                chunk,
            });
            row += 1;
        }
        drop(cells); // it borrows `frame`, which moves out below
        Ok(frame)
    }

    /// For each table column, the frame column holding it. A frame column the table does not
    /// know (or knows with another type) means the frame was written under a different schema:
    /// the frame is dead-lettered (replay it once every stage runs the same `schemas/`), so
    /// one such entry cannot stop the table.
    fn column_map(&self, frame: &Frame) -> Result<Vec<Option<usize>>, String> {
        let mut map = vec![None; self.schema.columns.len()];
        for (j, (name, ty)) in frame.columns.iter().enumerate() {
            let Some(i) = self.schema.column_index(name) else {
                return Err(format!(
                    "the frame carries column `{name}` that this writer's schema of `{}` lacks: run the same schemas/ in every stage, then replay",
                    self.schema.table
                ));
            };
            if self.schema.columns[i].ty != *ty {
                return Err(format!(
                    "column `{name}` of `{}` is {} in the frame but {} in this writer's schema: run the same schemas/ in every stage, then replay",
                    self.schema.table,
                    ty.sql(),
                    self.schema.columns[i].ty.sql()
                ));
            }
            if map[i].replace(j).is_some() {
                return Err(format!("the frame carries column `{name}` twice"));
            }
        }
        Ok(map)
    }

    async fn copy(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        enc: &Encoded,
        rows: &[usize],
    ) -> Result<(), StageError> {
        let body = if rows.len() == enc.rows.len() {
            enc.buf.clone()
        } else {
            let tuples: usize = rows.iter().map(|&r| enc.rows[r].bytes.len()).sum();
            let mut b = BytesMut::with_capacity(copy::HEADER.len() + tuples + copy::TRAILER.len());
            b.extend_from_slice(copy::HEADER);
            for &r in rows {
                b.extend_from_slice(&enc.buf[enc.rows[r].bytes.clone()]);
            }
            b.extend_from_slice(copy::TRAILER);
            b.freeze()
        };
        let context = format!("COPY into {}", self.schema.table);
        let sink = tx
            .copy_in::<_, Bytes>(&self.copy_sql)
            .await
            .map_err(|e| StageError::from_postgres(&context, e))?;
        futures_util::pin_mut!(sink);
        sink.send(body)
            .await
            .map_err(|e| StageError::from_postgres(&context, e))?;
        sink.finish()
            .await
            .map_err(|e| StageError::from_postgres(&context, e))?;
        Ok(())
    }

    /// COPYs `rows`, isolating by bisection under savepoints every row that fails on its own
    /// for any reason that is neither transient nor fatal; returns those rows. At most 2n − 1
    /// COPYs for n rows, O(k log n) for k bad rows. A transient or fatal error stops the
    /// bisection and is returned: the caller abandons the transaction, nothing is dead-lettered.
    async fn copy_isolating(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        enc: &Encoded,
        rows: Vec<usize>,
    ) -> Result<Vec<Refused>, StageError> {
        let sp = |sql: &'static str| async move {
            tx.batch_execute(sql)
                .await
                .map_err(|e| StageError::from_postgres("savepoint", e))
        };
        let mut bad = Vec::new();
        let mut todo = vec![rows];
        while let Some(set) = todo.pop() {
            if set.is_empty() {
                continue;
            }
            sp("SAVEPOINT strata_copy").await?;
            match self.copy(tx, enc, &set).await {
                Ok(()) => sp("RELEASE SAVEPOINT strata_copy").await?,
                Err(e) if missing_partition(&e) => {
                    // A partition this process created (or saw) was dropped since: the chunk
                    // lifecycle archived it. Forget the cache; the retry creates it again.
                    if let Some(known) = &self.partitions {
                        known.forget_all();
                    }
                    return Err(StageError::backoff(format!(
                        "{} (the partition was dropped after archiving; creating it again)",
                        e.reason()
                    )));
                }
                Err(e) if e.hint == RetryHint::DeadLetter => {
                    sp("ROLLBACK TO SAVEPOINT strata_copy").await?;
                    if set.len() == 1 {
                        if bad.is_empty() {
                            tracing::warn!(table = %self.schema.table, error = %e.reason(), "a row failed on its own: dead-lettering it");
                        }
                        bad.push(Refused {
                            tuple: set[0],
                            message: e.reason(),
                            sqlstate: e.sqlstate_code(),
                        });
                    } else {
                        let mut left = set;
                        let right = left.split_off(left.len() / 2);
                        todo.push(right);
                        todo.push(left);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    /// The fields of each row of `frame`, as a producer would have sent them (for dead letters).
    fn frame_fields(frame: &Frame) -> Vec<Fields> {
        let Ok(rows) = frame.to_cells() else {
            return Vec::new();
        };
        rows.iter()
            .map(|cells| {
                frame
                    .columns
                    .iter()
                    .zip(cells)
                    .filter(|(_, c)| **c != Cell::Null)
                    .map(|((name, _), c)| (name.clone(), c.to_text().into_bytes()))
                    .collect()
            })
            .collect()
    }
}

/// PostgreSQL found no partition for a row: a check violation (23514) on the partitioned table
/// that names no constraint (a CHECK constraint you added has a name).
fn missing_partition(e: &StageError) -> bool {
    e.sqlstate == Some(SqlState::CHECK_VIOLATION)
        && e.postgres()
            .and_then(|pg| pg.as_db_error())
            .is_some_and(|db| db.constraint().is_none())
}

/// A dead letter as stored with its frame ID in `strata.applied_frames` (JSON in the bytea
/// column `dead_letter_data`, so any row can be recorded; older rows have the jsonb column).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDeadLetter {
    fields: Vec<(String, String)>,
    error: String,
    sqlstate: Option<String>,
}

/// How often a writer forgets applied frames that can no longer be redelivered.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Stage for BatchWriter {
    fn tick_interval(&self) -> Option<std::time::Duration> {
        Some(PRUNE_EVERY)
    }

    /// Keeps `strata.applied_frames` small: frames older than the oldest one the group may
    /// still deliver again are forgotten.
    async fn tick(&self, ctx: Tick<'_>) -> Result<(), StageError> {
        let Some(oldest) = ctx.group.oldest_unacknowledged(ctx.redis).await? else {
            return Ok(());
        };
        let stream = ctx.group.stream;
        let n = self.prune_applied(stream, oldest).await?;
        if n > 0 {
            tracing::debug!(%stream, pruned = n, "pruned applied frames");
        }
        Ok(())
    }

    fn weight(&self, entry: &Entry) -> usize {
        entry
            .field(ROWS_FIELD)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(1)
    }

    async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
        let mut outcome = Outcome::default();
        let mut frames = Vec::with_capacity(batch.entries.len());
        let enc = self.encode(batch, &mut frames, &mut outcome.dead_letters);
        // Chunks whose partition cannot be made: their rows are refused on their own below.
        let unmade = match &self.partitions {
            Some(known) => known.ensure(&self.pool, &self.schema, &enc.chunks).await?,
            None => HashMap::new(),
        };
        // A frame is known by its stream and ID: two partitions' streams may hold the same ID.
        let frame_ids: Vec<FrameKey> = batch
            .entries
            .iter()
            .zip(&frames)
            .filter(|(_, f)| f.is_some())
            .map(|(e, _)| (e.input, e.id))
            .collect();
        let ids: Vec<String> = frame_ids.iter().map(|(_, id)| id.to_string()).collect();
        let streams: Vec<&str> = frame_ids.iter().map(|k| self.stream_of(k.0)).collect();
        if ids.is_empty() {
            return Ok(outcome);
        }
        let pg = |context: &'static str| move |e| StageError::from_postgres(context, e);
        let mut client = self.pool.get().await?;
        let began = std::time::Instant::now();
        let tx = client.transaction().await.map_err(pg("BEGIN"))?;
        let new: HashSet<FrameKey> = if self.exactly_once {
            let rows = tx
                .query(
                    &format!("INSERT INTO {APPLIED_FRAMES} (stream, frame_id) SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING RETURNING stream, frame_id"),
                    &[&streams, &ids],
                )
                .await
                .map_err(pg("recording applied frames"))?;
            rows.iter().filter_map(|r| self.frame_key(r)).collect()
        } else {
            frame_ids.iter().copied().collect()
        };
        let index_of: HashMap<FrameKey, usize> = batch
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| ((e.input, e.id), i))
            .collect();
        if new.len() < ids.len() {
            // Frames applied before: acknowledge them unwritten, re-emitting their dead letters.
            let (dup_streams, dups): (Vec<&str>, Vec<String>) = frame_ids
                .iter()
                .filter(|k| !new.contains(k))
                .map(|k| (self.stream_of(k.0), k.1.to_string()))
                .unzip();
            tracing::info!(table = %self.schema.table, frames = dups.len(), "skipping frames already applied");
            let stored = tx
                .query(
                    &format!("SELECT stream, frame_id, dead_letter_data, dead_letters FROM {APPLIED_FRAMES} WHERE (stream, frame_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) AND (dead_letter_data IS NOT NULL OR dead_letters IS NOT NULL)"),
                    &[&dup_streams, &dups],
                )
                .await
                .map_err(pg("reading stored dead letters"))?;
            for row in stored {
                let Some(key) = self.frame_key(&row) else {
                    continue;
                };
                let data: Option<Vec<u8>> = row.get(2);
                let legacy: Option<serde_json::Value> = row.get(3);
                let list: Vec<StoredDeadLetter> = match (data, legacy) {
                    (Some(bytes), _) => serde_json::from_slice(&bytes).unwrap_or_default(),
                    (None, Some(json)) => serde_json::from_value(json).unwrap_or_default(),
                    (None, None) => Vec::new(),
                };
                for d in list {
                    outcome.dead_letters.push(DeadLetter {
                        entry: index_of[&key],
                        fields: Some(
                            d.fields
                                .into_iter()
                                .map(|(k, v)| (k, v.into_bytes()))
                                .collect(),
                        ),
                        error: d.error,
                        sqlstate: d.sqlstate,
                    });
                }
            }
        }
        // One COPY span under each traced event's ingest span, open until COMMIT.
        let spans: Vec<tracing::Span> = if strata_pipeline::trace::enabled() {
            batch
                .entries
                .iter()
                .filter(|e| new.contains(&(e.input, e.id)))
                .filter_map(|e| std::str::from_utf8(e.field(TRACEPARENTS_FIELD)?).ok())
                .flat_map(str::split_whitespace)
                .take(self.max_event_spans)
                .map(|tp| {
                    let span = tracing::info_span!("batch_writer.copy", table = %self.schema.table);
                    strata_pipeline::trace::set_remote_parent(&span, tp);
                    span
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut refused = Vec::new();
        let mut rows = Vec::with_capacity(enc.rows.len());
        let mut out_of_range = enc.out_of_range.iter().copied().peekable();
        for (r, t) in enc.rows.iter().enumerate() {
            let outside = out_of_range.next_if_eq(&r).is_some();
            let entry = &batch.entries[t.entry];
            if !new.contains(&(entry.input, entry.id)) {
                continue;
            }
            if outside {
                refused.push(Refused {
                    tuple: r,
                    message: format!(
                        "column `{}`: the time is outside the accepted range {} to {}",
                        self.schema.columns[self.schema.time_index].name,
                        strata_pipeline::pg_limits::MIN_TIME_TEXT,
                        strata_pipeline::pg_limits::MAX_TIME_TEXT
                    ),
                    sqlstate: None,
                });
                continue;
            }
            match t.chunk.and_then(|c| unmade.get(&c)) {
                Some(e) => refused.push(Refused {
                    tuple: r,
                    message: e.reason(),
                    sqlstate: e.sqlstate_code(),
                }),
                None => rows.push(r),
            }
        }
        let written = rows.len();
        let bad = self.copy_isolating(&tx, &enc, rows).await?;
        let committed = (written - bad.len()) as u64;
        refused.extend(bad);
        let mut stored: HashMap<usize, Vec<StoredDeadLetter>> = HashMap::new();
        let mut decoded: HashMap<usize, Vec<Fields>> = HashMap::new();
        for bad in refused {
            let Tuple { entry, row, .. } = enc.rows[bad.tuple];
            let fields = decoded
                .entry(entry)
                .or_insert_with(|| {
                    frames[entry]
                        .as_ref()
                        .map(Self::frame_fields)
                        .unwrap_or_default()
                })
                .get(row)
                .cloned()
                .unwrap_or_default();
            let error = format!("row {row} of the frame: {}", bad.message);
            stored.entry(entry).or_default().push(StoredDeadLetter {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect(),
                error: error.clone(),
                sqlstate: bad.sqlstate.clone(),
            });
            outcome.dead_letters.push(DeadLetter {
                entry,
                fields: Some(fields),
                error,
                sqlstate: bad.sqlstate,
            });
        }
        for (entry, list) in stored {
            let data = serde_json::to_vec(&list).expect("dead letters serialize");
            tx.execute(
                &format!("UPDATE {APPLIED_FRAMES} SET dead_letter_data = $3 WHERE stream = $1 AND frame_id = $2"),
                &[
                    &self.stream_of(batch.entries[entry].input),
                    &batch.entries[entry].id.to_string(),
                    &data,
                ],
            )
            .await
            .map_err(pg("storing dead letters"))?;
        }
        tx.commit().await.map_err(pg("COMMIT"))?;
        self.metrics
            .copy_duration
            .record(began.elapsed().as_secs_f64());
        drop(spans);
        self.rows_written.fetch_add(committed, Ordering::Relaxed);
        self.metrics.rows_written.increment(committed);
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for (entry, _) in batch
            .entries
            .iter()
            .zip(&frames)
            .filter(|(e, f)| f.is_some() && new.contains(&(e.input, e.id)))
        {
            let first_ms = entry
                .field(FIRST_MS_FIELD)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(entry.id.ms);
            let waited_ms = now_ms.saturating_sub(first_ms);
            self.latency.record(waited_ms, self.weight(entry) as u64);
            self.metrics.latency.record(waited_ms as f64 / 1000.0);
        }
        Ok(outcome)
    }
}
