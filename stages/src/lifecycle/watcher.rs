//! The chunk-watcher: a periodic scan of one table (not a stream consumer).
//!
//! Each scan:
//! 1. native partitions only: creates the current chunk's partition and `premake_chunks` after
//!    it, so the writer rarely has to;
//! 2. if the schema has `archive_after`: reads the write counter of every chunk whose range ended
//!    more than `archive_after` ago and that is not recorded yet, and keeps those that are
//!    *quiet* (below);
//! 3. records the quiet ones in `strata.chunks` with one `INSERT … SELECT … ON CONFLICT DO
//!    NOTHING RETURNING`, and XADDs an archival event for each row it inserted. The unique key
//!    (table, chunk, relation OID) makes exactly one of several concurrent watchers insert a
//!    chunk, so each chunk is emitted once; a partition made again for late rows has a new OID,
//!    hence a new row and a second archive;
//! 4. re-emits the event of any chunk still not archived `reemit_after_ms` after its last
//!    emission (a watcher that died between COMMIT and XADD, a lost stream entry); the UPDATE
//!    that moves `emitted_at` decides which watcher does it. The archiver ignores events of
//!    chunks already done.
//!
//! # The quiet period
//! A producer replaying last month's events writes into chunks long past `archive_after`.
//! Closing such a chunk mid-backfill would archive and drop it while rows still arrive: the
//! next rows create the partition again (a new incarnation, another file) and the drop contends
//! with the writer. So a chunk is closed only once it has had no writes for
//! `[chunk_watcher] quiet_period_ms`.
//!
//! Writes are read from PostgreSQL's cumulative statistics, `n_tup_ins + n_tup_upd + n_tup_del`
//! of the chunk relation in `pg_stat_user_tables` (the native partition, or the TimescaleDB
//! chunk table the hypertable routes rows to), which costs the hot path nothing. The watcher
//! remembers, per chunk OID, the counter it last saw and when it first saw that value; a chunk
//! is quiet once the value has not changed for the quiet period. The memory is per process:
//! after a restart every chunk waits the full period again (conservative). An empty chunk that
//! nobody touches is quiet after one period, like any other.
//!
//! Assumptions and limits:
//! - `track_counts = on` (PostgreSQL's default). With it off the counters never move and every
//!   chunk looks quiet: the behaviour without a quiet period.
//! - The counters lag the writes. A transaction's counts are published after it ends, and a
//!   backend flushes them at most once a second (`PGSTAT_MIN_INTERVAL`) when it goes idle; a
//!   backend that goes idle within that second flushes [`STATS_IDLE_FLUSH_MS`] later, and one
//!   whose flush meets lock contention keeps them pending up to 60 s (`PGSTAT_MAX_INTERVAL`).
//!   The quiet period must be well above that (the default is 5 min; the watcher warns below
//!   10 s). One transaction writing into an old chunk for longer than the quiet period is not
//!   seen until it commits.
//! - A write after the chunk was closed is still possible (the quiet period is an observation,
//!   not a lock): the archiver copies what is committed, and the confirmer counts the chunk
//!   again under its lock before dropping it, so late rows are archived again, never lost.
//! - TimescaleDB: only the chunk table's own counters are read; rows a TimescaleDB version
//!   writes straight into a compressed chunk's internal relation are not seen.
//! - `pg_stat_reset()` or a crash recovery resets the counters: a change, so the clock restarts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Deserialize;
use strata_pipeline::observe;
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{self, StreamKind};
use strata_pipeline::{RetryHint, StageError};
use tokio_postgres::types::ToSql;

use crate::registry::{StageSpec, StartContext, Tasks};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::catalog::{self, ident, Partitioning, CHUNKS};

use super::registry;

/// How long a PostgreSQL backend that has gone idle may keep its statistics pending before it
/// flushes them (`PGSTAT_IDLE_INTERVAL`, PostgreSQL 15 and later): a quiet period shorter than
/// this may take a chunk still being written for a quiet one.
pub const STATS_IDLE_FLUSH_MS: u64 = 10_000;

/// Watches the chunks of one table.
pub struct Watcher {
    /// The table and its lifecycle policy.
    pub schema: SchemaRef,
    /// PostgreSQL (one connection per scan).
    pub pg: deadpool_postgres::Pool,
    /// Where archival events go.
    pub redis: strata_pipeline::db::RedisPool,
    /// Scan interval, partitions ahead, re-emission delay, quiet period.
    pub config: ChunkWatcherConfig,
    /// The write counters this watcher has seen, to tell a quiet chunk from one still written.
    quiet: Mutex<QuietTracker>,
}

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Chunks newly recorded (and emitted).
    pub recorded: usize,
    /// Events emitted again.
    pub reemitted: usize,
    /// Chunks past `archive_after` not closed yet: written to (or first seen) less than
    /// `quiet_period_ms` ago.
    pub waiting: usize,
}

impl Watcher {
    /// A watcher that has seen no chunk yet: each closed chunk must be observed quiet for the
    /// full `quiet_period_ms` before it is recorded.
    pub fn new(
        schema: SchemaRef,
        pg: deadpool_postgres::Pool,
        redis: strata_pipeline::db::RedisPool,
        config: ChunkWatcherConfig,
    ) -> Self {
        Self {
            schema,
            pg,
            redis,
            config,
            quiet: Mutex::new(QuietTracker::default()),
        }
    }

    /// Scans every `interval_ms` until `shutdown`; transient faults are logged and retried at the
    /// next scan, a missing migration stops the process.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StageError> {
        let table = self.schema.table.clone();
        info!(table = %table, interval_ms = self.config.interval_ms, quiet_period_ms = self.config.quiet_period_ms, "chunk-watcher started");
        if self.config.quiet_period_ms < STATS_IDLE_FLUSH_MS {
            warn!(table = %table, quiet_period_ms = self.config.quiet_period_ms, "[chunk_watcher] quiet_period_ms is below PostgreSQL's statistics delay ({STATS_IDLE_FLUSH_MS} ms for a writer that goes idle): a chunk still being written may look quiet");
        }
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.config.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            match self.scan().await {
                Ok(scan) if scan.recorded > 0 || scan.reemitted > 0 => {
                    info!(table = %table, recorded = scan.recorded, reemitted = scan.reemitted, waiting = scan.waiting, "chunk-watcher emitted archival events")
                }
                Ok(_) => debug!(table = %table, "chunk-watcher: nothing to do"),
                Err(e) if e.hint == RetryHint::Fatal => return Err(e),
                Err(e) => {
                    warn!(table = %table, error = %e.reason(), "chunk-watcher scan failed; retrying at the next one")
                }
            }
        }
        info!(table = %table, "chunk-watcher stopped");
        Ok(())
    }

    /// One scan.
    pub async fn scan(&self) -> Result<Scan, StageError> {
        let table = &self.schema.table;
        let regclass = ident(table);
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
        let closed = closed_chunks_sql(partitioning);
        let params: Vec<&(dyn ToSql + Sync)> = match partitioning {
            Partitioning::Native => vec![table, &regclass, &after_us],
            Partitioning::Hypertable => vec![table, &after_us],
        };
        let counters: Vec<(u32, i64)> = client
            .query(
                &format!("SELECT chunk_oid, writes FROM ({closed}) q"),
                &params,
            )
            .await
            .map_err(pg("reading the write counters of closed chunks"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let quiet_period = Duration::from_millis(self.config.quiet_period_ms);
        let quiet = self.quiet.lock().expect("quiet tracker poisoned").observe(
            Instant::now(),
            &counters,
            quiet_period,
        );
        let waiting = counters.len() - quiet.len();
        if waiting > 0 {
            debug!(table = %table, waiting, quiet_period_ms = self.config.quiet_period_ms, "chunks past archive_after wait for their quiet period");
        }
        let new_rows = if quiet.is_empty() {
            Vec::new()
        } else {
            registry::record_closed(&client, &closed, &params, &quiet).await?
        };
        let reemit_us = (self.config.reemit_after_ms as i64).saturating_mul(1000);
        let stale = registry::claim_reemission(&client, table, reemit_us).await?;
        let by_state = registry::count_by_state(&client, table).await?;
        drop(client);
        for (state, n) in by_state {
            metrics::gauge!(observe::CHUNKS, "table" => table.clone(), "state" => state.as_str())
                .set(n as f64);
        }
        let scan = Scan {
            recorded: new_rows.len(),
            reemitted: stale.len(),
            waiting,
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
        let () = pipe.query_async(&mut conn).await.map_err(|e| {
            StageError::backoff(format!(
                "emitting {} archival events to {stream}: {e} (they are emitted again after [chunk_watcher] reemit_after_ms)",
                new_rows.len() + stale.len()
            ))
        })?;
        for row in &new_rows {
            info!(table = %table, chunk = %row.display_name(), range_end = %super::events::rfc3339_us(row.range_end_us), "chunk closed; archival event emitted");
        }
        Ok(scan)
    }
}

/// The chunks of the table whose range ended more than `archive_after` ago and that are not
/// recorded in `strata.chunks` yet, with their write counters: columns `chunk_schema`, `chunk`,
/// `chunk_oid`, `range_start`, `range_end`, `writes`. Parameters: native `$1` table, `$2` the
/// table as a regclass literal, `$3` `archive_after` in µs; TimescaleDB `$1` table, `$2`
/// `archive_after` in µs.
fn closed_chunks_sql(partitioning: Partitioning) -> String {
    let writes = "coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, 0)::bigint";
    match partitioning {
        Partitioning::Native => format!(
            "SELECT n.nspname::text AS chunk_schema, c.relname::text AS chunk, c.oid AS chunk_oid,
                    b[1]::timestamptz AS range_start, b[2]::timestamptz AS range_end, {writes} AS writes
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') AS b
             LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
             WHERE i.inhparent = $2::text::regclass
               AND b[2]::timestamptz <= now() - $3::bigint * interval '1 microsecond'
               AND NOT EXISTS (SELECT 1 FROM {CHUNKS} k WHERE k.table_name = $1::text AND k.chunk_schema = n.nspname::text AND k.chunk = c.relname::text AND k.chunk_oid = c.oid)"
        ),
        Partitioning::Hypertable => format!(
            "SELECT ch.chunk_schema::text AS chunk_schema, ch.chunk_name::text AS chunk, r.oid AS chunk_oid,
                    ch.range_start AS range_start, ch.range_end AS range_end, {writes} AS writes
             FROM timescaledb_information.chunks ch
             CROSS JOIN LATERAL (SELECT format('%I.%I', ch.chunk_schema, ch.chunk_name)::regclass::oid AS oid) r
             LEFT JOIN pg_stat_user_tables s ON s.relid = r.oid
             WHERE ch.hypertable_schema = current_schema() AND ch.hypertable_name::text = $1::text
               AND ch.range_end <= now() - $2::bigint * interval '1 microsecond'
               AND NOT EXISTS (SELECT 1 FROM {CHUNKS} k WHERE k.table_name = $1::text AND k.chunk_schema = ch.chunk_schema::text AND k.chunk = ch.chunk_name::text AND k.chunk_oid = r.oid)"
        ),
    }
}

/// What this watcher saw of one chunk's write counter.
#[derive(Debug, Clone, Copy)]
struct Observation {
    /// `n_tup_ins + n_tup_upd + n_tup_del` at the last scan.
    writes: i64,
    /// When this watcher first saw that value: the chunk is quiet a quiet period later.
    since: Instant,
}

/// The write counters of the chunks waiting to be closed, per relation OID (a chunk made again
/// for late rows has a new OID, so it starts over).
#[derive(Debug, Default)]
struct QuietTracker {
    /// Chunks seen at the last scan.
    seen: HashMap<u32, Observation>,
}

impl QuietTracker {
    /// Takes one scan's `(oid, writes)` counters at `now` and returns the OIDs whose counter
    /// has not changed for `period`. Chunks missing from `counters` (recorded, or gone) are
    /// forgotten, so the map holds only the chunks still waiting.
    fn observe(&mut self, now: Instant, counters: &[(u32, i64)], period: Duration) -> Vec<u32> {
        let mut next = HashMap::with_capacity(counters.len());
        let mut quiet = Vec::new();
        for &(oid, writes) in counters {
            let seen = match self.seen.get(&oid) {
                Some(o) if o.writes == writes => *o,
                _ => Observation { writes, since: now },
            };
            if now.saturating_duration_since(seen.since) >= period {
                quiet.push(oid);
            }
            next.insert(oid, seen);
        }
        self.seen = next;
        quiet
    }
}

/// `[chunk_watcher]`: finds closed chunks and emits one archival event per chunk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkWatcherConfig {
    /// Time between two scans of a table.
    pub interval_ms: u64,
    /// Native partitions only: partitions created ahead of time after the current one, so the
    /// writer rarely creates one on the hot path.
    pub premake_chunks: u32,
    /// A chunk whose archive has not been recorded this long after its event was emitted gets
    /// its event emitted again (covers a crash between recording a chunk and emitting its event,
    /// and lost stream entries). The archiver ignores events for chunks already done.
    pub reemit_after_ms: u64,
    /// A chunk past `archive_after` is closed only once this watcher has seen its write
    /// counter (`n_tup_ins + n_tup_upd + n_tup_del` in `pg_stat_user_tables`) stay unchanged
    /// this long, so a backfill still writing an old range does not get it archived and dropped
    /// under it (which would split the range over several incarnations and files). Counted from
    /// this watcher's first observation: after a restart every chunk waits the full period
    /// again. Keep it well above PostgreSQL's statistics delay (up to 10 s for a writer that
    /// goes idle; see the chunk-watcher's documentation).
    pub quiet_period_ms: u64,
}

impl Default for ChunkWatcherConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            premake_chunks: 1,
            reemit_after_ms: 900_000,
            quiet_period_ms: 300_000,
        }
    }
}

impl ChunkWatcherConfig {
    /// Checks the keys that would make the watcher spin or close chunks without watching them;
    /// `Err` names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval_ms == 0 {
            return Err("[chunk_watcher] interval_ms must be > 0".into());
        }
        if self.quiet_period_ms == 0 {
            return Err("[chunk_watcher] quiet_period_ms must be > 0: a chunk is closed only after it has had no writes for that long (the default is 300000, 5 min)".into());
        }
        Ok(())
    }
}

/// The chunk-watcher's registry entry: not a stream consumer, it writes `archive:{T}`.
pub const STAGE: StageSpec = StageSpec {
    name: "chunk-watcher",
    about: "Run the chunk-watcher stage: closed chunks → archival events on archive:{T}",
    input: None,
    output: Some(StreamKind::Archive),
    section: "chunk_watcher",
    validate: |c| c.chunk_watcher.validate(),
    needs_postgres: true,
    effects_outside_redis: true,
    redis_connections: |_, _| 2,
    postgres_connections: |_, _| 1,
    start,
};

/// Starts the periodic scan of `schema`'s table.
fn start<'a>(
    ctx: &'a StartContext<'a>,
    schema: &'a SchemaRef,
    _partitions: std::ops::Range<u32>,
    tasks: &'a mut Tasks,
) -> BoxFuture<'a, Result<(), StageError>> {
    Box::pin(async move {
        let watcher = Watcher::new(
            schema.clone(),
            ctx.pg.clone(),
            ctx.redis.clone(),
            ctx.config.chunk_watcher.clone(),
        );
        tasks.spawn(watcher.run(ctx.shutdown.clone()));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn quiet_period_defaults_to_five_minutes_and_must_not_be_zero() {
        let w: ChunkWatcherConfig = toml::from_str("interval_ms = 1000\n").unwrap();
        assert_eq!(w.quiet_period_ms, 300_000);
        assert!(w.validate().is_ok());
        let w: ChunkWatcherConfig = toml::from_str("quiet_period_ms = 0\n").unwrap();
        assert!(w.validate().unwrap_err().contains("quiet_period_ms"));
        let w: ChunkWatcherConfig = toml::from_str("interval_ms = 0\n").unwrap();
        assert!(w.validate().unwrap_err().contains("interval_ms"));
        assert!(toml::from_str::<ChunkWatcherConfig>("quiet_period = 5\n").is_err());
    }

    use super::*;

    #[test]
    fn a_chunk_is_quiet_only_after_its_counter_stood_still_for_the_period() {
        let period = Duration::from_secs(5);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut q = QuietTracker::default();
        // First sight: never quiet at once, even untouched (a restarted watcher waits again).
        assert!(q.observe(at(0), &[(1, 0), (2, 10)], period).is_empty());
        // Chunk 2 keeps being written (a backfill): its clock restarts at every change.
        assert!(q.observe(at(3), &[(1, 0), (2, 20)], period).is_empty());
        assert_eq!(q.observe(at(5), &[(1, 0), (2, 30)], period), [1]);
        assert!(q.observe(at(9), &[(2, 30)], period).is_empty());
        assert_eq!(q.observe(at(10), &[(2, 30)], period), [2]);
        // Chunk 1 was recorded (no longer listed) and forgotten; a new incarnation starts over.
        assert!(!q.seen.contains_key(&1));
        assert!(q.observe(at(11), &[(3, 0)], period).is_empty());
        assert_eq!(q.observe(at(16), &[(3, 0)], period), [3]);
    }
}
