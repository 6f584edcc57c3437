//! The batch-writer stage: frames from `rows:{T}` into the table with binary COPY, exactly once.
//!
//! One transaction per batch: record the frame IDs in `strata.applied_frames` (frames already
//! there are skipped: they were written before a crash or by a consumer that lost them), COPY
//! the rows of the new frames, COMMIT. The runner acknowledges only after this returns. A row
//! PostgreSQL rejects for its data (SQLSTATE classes 22 and 23) is isolated by bisection under
//! savepoints and dead-lettered alone; its dead letter is stored with the frame ID so a
//! redelivery re-emits it instead of losing it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use strata_pipeline::frame::{CellRef, Frame, FIRST_MS_FIELD, FRAME_FIELD, ROWS_FIELD};
use strata_pipeline::latency::LatencyHistogram;
use strata_pipeline::observe::WriterMetrics;
use strata_pipeline::runner::{Batch, DeadLetter, Outcome, Stage};
use strata_pipeline::schema::{Cell, SchemaRef};
use strata_pipeline::streams::{Entry, Fields};
use strata_pipeline::trace::TRACEPARENTS_FIELD;
use strata_pipeline::StageError;

use crate::catalog::{self, ident, KnownPartitions, Partitioning, APPLIED_FRAMES};
use crate::copy;

/// Largest decompressed frame accepted (a frame is at most one ingest batch).
const MAX_FRAME_BYTES: usize = 256 << 20;

/// Writes frames into one table.
pub struct BatchWriter {
    /// The table written to.
    schema: SchemaRef,
    /// The input stream, recorded with each applied frame ID.
    stream: String,
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
    /// Byte range in `buf` and origin (entry index, row index in its frame) of each tuple.
    rows: Vec<(std::ops::Range<usize>, usize, usize)>,
    /// Chunk starts the rows fall into.
    chunks: BTreeSet<i64>,
}

impl BatchWriter {
    /// Builds a writer for `schema`, reading how the table was migrated.
    pub async fn new(
        schema: SchemaRef,
        stream: String,
        pool: deadpool_postgres::Pool,
    ) -> Result<Self, StageError> {
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
            stream,
            pool,
            copy_sql,
            latency: Arc::default(),
            rows_written: Arc::default(),
            metrics,
            max_event_spans: 0,
            exactly_once: true,
        })
    }

    /// The input stream (`rows:{T}`).
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Forgets applied frames older than `oldest`, the oldest frame the group may still
    /// deliver again (every frame before it is acknowledged for good). Returns rows deleted.
    pub async fn prune_applied(&self, oldest: &str) -> Result<u64, StageError> {
        let Some((ms, seq)) = oldest
            .split_once('-')
            .and_then(|(m, s)| Some((m.parse::<i64>().ok()?, s.parse::<i64>().ok()?)))
        else {
            return Ok(0);
        };
        let client = self.pool.get().await?;
        client
            .execute(
                &format!(
                    "DELETE FROM {APPLIED_FRAMES} WHERE stream = $1
                     AND (split_part(frame_id, '-', 1)::bigint, split_part(frame_id, '-', 2)::bigint) < ($2::bigint, $3::bigint)"
                ),
                &[&self.stream, &ms, &seq],
            )
            .await
            .map_err(|e| StageError::from_postgres("pruning applied frames", e))
    }

    /// Decodes every frame of the batch into COPY tuples in table column order. Entries that
    /// are not frames become dead letters.
    fn encode(
        &self,
        batch: &Batch,
        frames: &mut Vec<Option<Frame>>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<Encoded, StageError> {
        let mut enc = Encoded {
            buf: Bytes::new(),
            rows: Vec::new(),
            chunks: BTreeSet::new(),
        };
        let mut buf = BytesMut::with_capacity(1 << 20);
        buf.extend_from_slice(copy::HEADER);
        let ncols = self.schema.columns.len();
        let mut last_chunk = None;
        for (i, entry) in batch.entries.iter().enumerate() {
            let frame = match entry
                .field(FRAME_FIELD)
                .ok_or_else(|| format!("no `{FRAME_FIELD}` field"))
                .and_then(|bytes| Frame::decode(bytes, MAX_FRAME_BYTES).map_err(|e| e.to_string()))
            {
                Ok(f) => f,
                Err(error) => {
                    dead.push(DeadLetter {
                        entry: i,
                        fields: None,
                        error,
                        sqlstate: None,
                    });
                    frames.push(None);
                    continue;
                }
            };
            let map = self.column_map(&frame)?;
            let time_at = map[self.schema.time_index];
            let mut cells = Vec::with_capacity(ncols);
            let mut it = frame.rows();
            let mut row_no = 0;
            let mut bad_row = None;
            let frame_start = enc.rows.len();
            let buf_start = buf.len();
            while it
                .next_row(&mut cells)
                .map_err(|e| StageError::dead_letter(e.to_string()))?
            {
                let start = buf.len();
                copy::begin_tuple(&mut buf, ncols);
                for (col, m) in map.iter().enumerate() {
                    let cell = m.map_or(CellRef::Null, |j| cells[j]);
                    if copy::put_cell(&mut buf, self.schema.columns[col].ty, cell, col).is_err() {
                        bad_row = Some((row_no, col));
                    }
                }
                if let Some(CellRef::Int(us)) = time_at.map(|j| cells[j]) {
                    let chunk = catalog::chunk_start(us, self.schema.chunk_interval_us);
                    if last_chunk != Some(chunk) {
                        enc.chunks.insert(chunk);
                        last_chunk = Some(chunk);
                    }
                }
                enc.rows.push((start..buf.len(), i, row_no));
                row_no += 1;
            }
            drop(cells); // it borrows `frame`, which moves below
            if let Some((row, col)) = bad_row {
                // A frame whose cells do not fit their columns is not a frame ingest wrote.
                enc.rows.truncate(frame_start);
                buf.truncate(buf_start);
                dead.push(DeadLetter {
                    entry: i,
                    fields: None,
                    error: format!(
                        "row {row}: column `{}` does not hold a {}",
                        self.schema.columns[col].name,
                        self.schema.columns[col].ty.sql()
                    ),
                    sqlstate: None,
                });
                frames.push(None);
                continue;
            }
            frames.push(Some(frame));
        }
        buf.extend_from_slice(copy::TRAILER);
        enc.buf = buf.freeze();
        Ok(enc)
    }

    /// For each table column, the frame column holding it. A frame column the table does not
    /// know means ingest runs a different schema: fatal until the schemas agree.
    fn column_map(&self, frame: &Frame) -> Result<Vec<Option<usize>>, StageError> {
        let mut map = vec![None; self.schema.columns.len()];
        for (j, (name, ty)) in frame.columns.iter().enumerate() {
            let Some(i) = self.schema.column_index(name) else {
                return Err(StageError::fatal(format!(
                    "frames for `{}` carry column `{name}` that this writer's schema lacks: run the same schemas/ in every stage",
                    self.schema.table
                )));
            };
            if self.schema.columns[i].ty != *ty {
                return Err(StageError::fatal(format!(
                    "column `{name}` of `{}` is {} in the frames but {} in this writer's schema",
                    self.schema.table,
                    ty.sql(),
                    self.schema.columns[i].ty.sql()
                )));
            }
            map[i] = Some(j);
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
            let tuples: usize = rows.iter().map(|&r| enc.rows[r].0.len()).sum();
            let mut b = BytesMut::with_capacity(copy::HEADER.len() + tuples + copy::TRAILER.len());
            b.extend_from_slice(copy::HEADER);
            for &r in rows {
                b.extend_from_slice(&enc.buf[enc.rows[r].0.clone()]);
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

    /// COPYs `rows`, isolating rows PostgreSQL rejects for their data by bisection under
    /// savepoints. Returns the rejected rows with their errors.
    async fn copy_isolating(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        enc: &Encoded,
        rows: Vec<usize>,
    ) -> Result<Vec<(usize, StageError)>, StageError> {
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
                        e.message
                    )));
                }
                Err(e) if e.hint == strata_pipeline::RetryHint::DeadLetter => {
                    sp("ROLLBACK TO SAVEPOINT strata_copy").await?;
                    if set.len() == 1 {
                        bad.push((set[0], e));
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

    /// The fields of one rejected row, as a producer would have sent them.
    fn row_fields(&self, frame: &Frame, row: usize) -> Fields {
        let Ok(rows) = frame.to_cells() else {
            return Vec::new();
        };
        let Some(cells) = rows.get(row) else {
            return Vec::new();
        };
        frame
            .columns
            .iter()
            .zip(cells)
            .filter(|(_, c)| **c != Cell::Null)
            .map(|((name, _), c)| (name.clone(), c.to_text().into_bytes()))
            .collect()
    }
}

/// PostgreSQL found no partition for a row (SQLSTATE 23514 with this message; a CHECK
/// violation has the same code and another message).
fn missing_partition(e: &StageError) -> bool {
    e.sqlstate.as_deref() == Some("23514") && e.message.contains("no partition of relation")
}

/// A dead letter as stored with its frame ID in `strata.applied_frames`.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredDeadLetter {
    fields: Vec<(String, String)>,
    error: String,
    sqlstate: Option<String>,
}

impl Stage for BatchWriter {
    fn weight(&self, entry: &Entry) -> usize {
        entry
            .field(ROWS_FIELD)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(1)
    }

    async fn process(&self, batch: &Batch) -> Result<Outcome, StageError> {
        let mut outcome = Outcome::default();
        let mut frames = Vec::with_capacity(batch.entries.len());
        let enc = self.encode(batch, &mut frames, &mut outcome.dead_letters)?;
        if let Some(known) = &self.partitions {
            known.ensure(&self.pool, &self.schema, &enc.chunks).await?;
        }
        let ids: Vec<&str> = batch
            .entries
            .iter()
            .zip(&frames)
            .filter(|(_, f)| f.is_some())
            .map(|(e, _)| e.id.as_str())
            .collect();
        if ids.is_empty() {
            return Ok(outcome);
        }
        let pg = |context: &'static str| move |e| StageError::from_postgres(context, e);
        let mut client = self.pool.get().await?;
        let began = std::time::Instant::now();
        let tx = client.transaction().await.map_err(pg("BEGIN"))?;
        let new: HashSet<String> = if self.exactly_once {
            tx.query(
                &format!("INSERT INTO {APPLIED_FRAMES} (stream, frame_id) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING RETURNING frame_id"),
                &[&self.stream, &ids],
            )
            .await
            .map_err(pg("recording applied frames"))?
            .iter()
            .map(|r| r.get(0))
            .collect()
        } else {
            ids.iter().map(|id| id.to_string()).collect()
        };
        let index_of: HashMap<&str, usize> = batch
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id.as_str(), i))
            .collect();
        if new.len() < ids.len() {
            // Frames applied before: acknowledge them unwritten, re-emitting their dead letters.
            let dups: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !new.contains(*id))
                .collect();
            tracing::info!(table = %self.schema.table, frames = dups.len(), "skipping frames already applied");
            let stored = tx
                .query(
                    &format!("SELECT frame_id, dead_letters FROM {APPLIED_FRAMES} WHERE stream = $1 AND frame_id = ANY($2) AND dead_letters IS NOT NULL"),
                    &[&self.stream, &dups],
                )
                .await
                .map_err(pg("reading stored dead letters"))?;
            for row in stored {
                let id: String = row.get(0);
                let json: serde_json::Value = row.get(1);
                let list: Vec<StoredDeadLetter> = serde_json::from_value(json).unwrap_or_default();
                for d in list {
                    outcome.dead_letters.push(DeadLetter {
                        entry: index_of[id.as_str()],
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
                .filter(|e| new.contains(&e.id))
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
        let rows: Vec<usize> = (0..enc.rows.len())
            .filter(|&r| new.contains(&batch.entries[enc.rows[r].1].id))
            .collect();
        let written = rows.len();
        let bad = self.copy_isolating(&tx, &enc, rows).await?;
        let mut stored: HashMap<usize, Vec<StoredDeadLetter>> = HashMap::new();
        for (r, e) in &bad {
            let (_, entry, row) = enc.rows[*r];
            let fields = frames[entry]
                .as_ref()
                .map(|f| self.row_fields(f, row))
                .unwrap_or_default();
            let error = format!("row {row} of the frame: {}", e.message);
            stored.entry(entry).or_default().push(StoredDeadLetter {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect(),
                error: error.clone(),
                sqlstate: e.sqlstate.clone(),
            });
            outcome.dead_letters.push(DeadLetter {
                entry,
                fields: Some(fields),
                error,
                sqlstate: e.sqlstate.clone(),
            });
        }
        for (entry, list) in stored {
            let json = serde_json::to_value(&list).expect("dead letters serialize");
            tx.execute(
                &format!("UPDATE {APPLIED_FRAMES} SET dead_letters = $3 WHERE stream = $1 AND frame_id = $2"),
                &[&self.stream, &batch.entries[entry].id, &json],
            )
            .await
            .map_err(pg("storing dead letters"))?;
        }
        tx.commit().await.map_err(pg("COMMIT"))?;
        self.metrics
            .copy_duration
            .record(began.elapsed().as_secs_f64());
        drop(spans);
        let committed = (written - bad.len()) as u64;
        self.rows_written.fetch_add(committed, Ordering::Relaxed);
        self.metrics.rows_written.increment(committed);
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for (entry, _) in batch
            .entries
            .iter()
            .zip(&frames)
            .filter(|(e, f)| f.is_some() && new.contains(&e.id))
        {
            let first_ms = entry
                .field(FIRST_MS_FIELD)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or_else(|| entry.ms());
            let waited_ms = now_ms.saturating_sub(first_ms);
            self.latency.record(waited_ms, self.weight(entry) as u64);
            self.metrics.latency.record(waited_ms as f64 / 1000.0);
        }
        Ok(outcome)
    }
}
