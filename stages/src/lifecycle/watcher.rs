//! The chunk-watcher: a periodic scan of one table (not a stream consumer).
//!
//! Each scan:
//! 1. native partitions only: creates the current chunk's partition and `premake_chunks` after
//!    it, so the writer rarely has to;
//! 2. if the schema has `archive_after`: records every closed chunk whose range ended more than
//!    `archive_after` ago in `strata.chunks` with one `INSERT … SELECT … ON CONFLICT DO NOTHING
//!    RETURNING`, and XADDs an archival event for each row it inserted. The unique key (table,
//!    chunk, relation OID) makes exactly one of several concurrent watchers insert a chunk, so
//!    each chunk is emitted once; a partition made again for late rows has a new OID, hence a new
//!    row and a second archive;
//! 3. re-emits the event of any chunk still not archived `reemit_after_ms` after its last
//!    emission (a watcher that died between COMMIT and XADD, a lost stream entry); the UPDATE
//!    that moves `emitted_at` decides which watcher does it. The archiver ignores events of
//!    chunks already done.

use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_pipeline::lifecycle_config::ChunkWatcherConfig;
use strata_pipeline::observe;
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams;
use strata_pipeline::{RetryHint, StageError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::{self, ident, Partitioning, CHUNKS};

use super::registry::{ChunkRow, ROW_COLUMNS};
use super::COUNTERS;

/// Watches the chunks of one table.
pub struct Watcher {
    /// The table and its lifecycle policy.
    pub schema: SchemaRef,
    /// PostgreSQL (one connection per scan).
    pub pg: deadpool_postgres::Pool,
    /// Where archival events go.
    pub redis: deadpool_redis::Pool,
    /// Scan interval, partitions ahead, re-emission delay.
    pub config: ChunkWatcherConfig,
}

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Chunks newly recorded (and emitted).
    pub recorded: usize,
    /// Events emitted again.
    pub reemitted: usize,
}

impl Watcher {
    /// Scans every `interval_ms` until `shutdown`; transient faults are logged and retried at the
    /// next scan, a missing migration stops the process.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StageError> {
        let table = self.schema.table.clone();
        info!(table = %table, interval_ms = self.config.interval_ms, "chunk-watcher started");
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.config.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            match self.scan().await {
                Ok(scan) if scan != Scan::default() => {
                    info!(table = %table, recorded = scan.recorded, reemitted = scan.reemitted, "chunk-watcher emitted archival events")
                }
                Ok(_) => debug!(table = %table, "chunk-watcher: nothing to do"),
                Err(e) if e.hint == RetryHint::Fatal => return Err(e),
                Err(e) => {
                    warn!(table = %table, error = %e, "chunk-watcher scan failed; retrying at the next one")
                }
            }
        }
        info!(table = %table, "chunk-watcher stopped");
        Ok(())
    }

    /// One scan.
    pub async fn scan(&self) -> Result<Scan, StageError> {
        let table = &self.schema.table;
        let mut client = self.pg.get().await?;
        let partitioning = catalog::partitioning(&client, table).await?;
        if partitioning == Partitioning::Native {
            let interval = self.schema.chunk_interval_us;
            let now = chrono::Utc::now().timestamp_micros();
            let current = catalog::chunk_start(now, interval);
            for k in 0..=self.config.premake_chunks as i64 {
                let start = current + k * interval;
                catalog::create_partition(&mut client, &self.schema, start)
                    .await
                    .map_err(|e| {
                        StageError::from_postgres(
                            &format!(
                                "creating partition {} ahead of time",
                                catalog::partition_name(table, start)
                            ),
                            e,
                        )
                    })?;
            }
        }
        let Some(after_us) = self.schema.policy.archive_after_us else {
            return Ok(Scan::default());
        };
        let pg = |what: &'static str| move |e| StageError::from_postgres(what, e);
        let new_rows = match partitioning {
            Partitioning::Native => client
                .query(
                    &format!(
                        "INSERT INTO {CHUNKS} (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, event_id)
                         SELECT $1, n.nspname, c.relname, c.oid, b[1]::timestamptz, b[2]::timestamptz, gen_random_uuid()::text
                         FROM pg_inherits i
                         JOIN pg_class c ON c.oid = i.inhrelid
                         JOIN pg_namespace n ON n.oid = c.relnamespace
                         CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS b
                         WHERE i.inhparent = $2::text::regclass
                           AND b[2]::timestamptz <= now() - $3::bigint * interval '1 microsecond'
                         ORDER BY 5
                         ON CONFLICT DO NOTHING
                         RETURNING {ROW_COLUMNS}"
                    ),
                    &[table, &ident(table), &after_us],
                )
                .await
                .map_err(pg("recording closed partitions"))?,
            Partitioning::Hypertable => client
                .query(
                    &format!(
                        "INSERT INTO {CHUNKS} (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, event_id)
                         SELECT $1::text, ch.chunk_schema, ch.chunk_name, format('%I.%I', ch.chunk_schema, ch.chunk_name)::regclass::oid,
                                ch.range_start, ch.range_end, gen_random_uuid()::text
                         FROM timescaledb_information.chunks ch
                         WHERE ch.hypertable_schema = current_schema() AND ch.hypertable_name::text = $1::text
                           AND ch.range_end <= now() - $2::bigint * interval '1 microsecond'
                         ORDER BY ch.range_start
                         ON CONFLICT DO NOTHING
                         RETURNING {ROW_COLUMNS}"
                    ),
                    &[table, &after_us],
                )
                .await
                .map_err(pg("recording closed TimescaleDB chunks"))?,
        };
        let reemit_us = (self.config.reemit_after_ms as i64).saturating_mul(1000);
        let stale = client
            .query(
                &format!(
                    "UPDATE {CHUNKS} SET emitted_at = now()
                     WHERE table_name = $1 AND state IN ('pending', 'archiving', 'archived')
                       AND emitted_at < now() - $2::bigint * interval '1 microsecond'
                     RETURNING {ROW_COLUMNS}"
                ),
                &[table, &reemit_us],
            )
            .await
            .map_err(pg("finding chunks to emit again"))?;
        let by_state = client
            .query(
                &format!(
                    "SELECT state, count(*) FROM {CHUNKS} WHERE table_name = $1 GROUP BY state"
                ),
                &[table],
            )
            .await
            .map_err(pg("counting chunks by state"))?;
        drop(client);
        for state in [
            "pending",
            "archiving",
            "archived",
            "verified",
            "dropped",
            "failed",
        ] {
            let n = by_state
                .iter()
                .find(|r| r.get::<_, &str>(0) == state)
                .map_or(0, |r| r.get::<_, i64>(1));
            metrics::gauge!(observe::CHUNKS, "table" => table.clone(), "state" => state)
                .set(n as f64);
        }
        let new_rows: Vec<ChunkRow> = new_rows
            .iter()
            .map(ChunkRow::from_row)
            .collect::<Result<_, _>>()?;
        let stale: Vec<ChunkRow> = stale
            .iter()
            .map(ChunkRow::from_row)
            .collect::<Result<_, _>>()?;
        let scan = Scan {
            recorded: new_rows.len(),
            reemitted: stale.len(),
        };
        if new_rows.is_empty() && stale.is_empty() {
            return Ok(scan);
        }
        let stream = streams::archive_stream(table);
        let mut conn = self.redis.get().await?;
        let mut pipe = redis::pipe();
        for row in new_rows.iter().chain(&stale) {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&stream).arg("*");
            for (k, v) in row.event().to_fields() {
                cmd.arg(k).arg(v);
            }
            pipe.add_command(cmd).ignore();
        }
        // If this fails, the rows are recorded and emitted again after reemit_after_ms.
        let () = pipe.query_async(&mut *conn).await.map_err(|e| {
            StageError::backoff(format!(
                "emitting {} archival events to {stream}: {e} (they are emitted again after [chunk_watcher] reemit_after_ms)",
                new_rows.len() + stale.len()
            ))
        })?;
        COUNTERS
            .chunks_recorded
            .fetch_add(new_rows.len() as u64, Ordering::Relaxed);
        COUNTERS
            .events_reemitted
            .fetch_add(stale.len() as u64, Ordering::Relaxed);
        for row in &new_rows {
            info!(table = %table, chunk = %row.display_name(), range_end = %super::events::rfc3339_us(row.range_end_us), "chunk closed; archival event emitted");
        }
        Ok(scan)
    }
}
