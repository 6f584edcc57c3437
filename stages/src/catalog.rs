//! strata's own bookkeeping tables in PostgreSQL, and native partitions ("chunks").

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use chrono::{TimeZone, Utc};
use strata_pipeline::schema::Schema;
use strata_pipeline::StageError;

/// Frames already applied, recorded in the transaction that wrote their rows, so a
/// redelivered frame is acknowledged without being written again.
pub const APPLIED_FRAMES: &str = "strata.applied_frames";
/// One row per migrated table: how it is partitioned.
pub const TABLES: &str = "strata.tables";

/// The bookkeeping DDL, idempotent.
pub const BOOKKEEPING_DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS strata;
CREATE TABLE IF NOT EXISTS strata.tables (
    name text PRIMARY KEY,
    partitioning text NOT NULL CHECK (partitioning IN ('hypertable', 'native')),
    time_column text NOT NULL,
    chunk_interval_us bigint NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS strata.applied_frames (
    stream text NOT NULL,
    frame_id text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    dead_letters jsonb,
    PRIMARY KEY (stream, frame_id)
);
CREATE TABLE IF NOT EXISTS strata.chunks (
    id bigserial PRIMARY KEY,
    table_name text NOT NULL,
    chunk_schema text NOT NULL,
    chunk text NOT NULL,
    chunk_oid oid NOT NULL,
    range_start timestamptz NOT NULL,
    range_end timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'archiving', 'archived', 'verified', 'dropped', 'failed')),
    event_id text NOT NULL UNIQUE,
    attempts integer NOT NULL DEFAULT 0,
    verify_failures integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    emitted_at timestamptz NOT NULL DEFAULT now(),
    archiving_at timestamptz,
    archived_at timestamptz,
    verified_at timestamptz,
    dropped_at timestamptz,
    failed_at timestamptz,
    last_error text,
    lake_path text,
    rows bigint,
    bytes bigint,
    sha256 text,
    UNIQUE (table_name, chunk_schema, chunk, chunk_oid)
);
CREATE INDEX IF NOT EXISTS chunks_open_idx ON strata.chunks (table_name, emitted_at)
    WHERE state IN ('pending', 'archiving', 'archived');
"#;

/// The chunk lifecycle: one row per chunk (per incarnation: a partition dropped and made again
/// for late rows is a new row), pending → archiving → archived → verified → dropped, or failed.
pub const CHUNKS: &str = "strata.chunks";

/// How a table's chunks are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// TimescaleDB creates chunks itself.
    Hypertable,
    /// Native range partitions, created on demand by the writer.
    Native,
}

impl Partitioning {
    pub fn as_str(self) -> &'static str {
        match self {
            Partitioning::Hypertable => "hypertable",
            Partitioning::Native => "native",
        }
    }
}

/// Double-quotes an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Reads how `table` was migrated; a fatal error if it was not.
pub async fn partitioning(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Partitioning, StageError> {
    let row = client
        .query_opt(&format!("SELECT partitioning FROM {TABLES} WHERE name = $1"), &[&table])
        .await
        .map_err(|e| {
            if e.as_db_error().is_some_and(|d| d.code().code() == "42P01") {
                StageError::fatal(format!("strata's bookkeeping tables are missing: run `strata migrate` (table `{table}`)"))
            } else {
                StageError::from_postgres("reading strata.tables", e)
            }
        })?
        .ok_or_else(|| StageError::fatal(format!("table `{table}` is not migrated: run `strata migrate`")))?;
    let p: String = row.get(0);
    Ok(if p == "hypertable" {
        Partitioning::Hypertable
    } else {
        Partitioning::Native
    })
}

/// Name of the native partition starting at `start_us`.
pub fn partition_name(table: &str, start_us: i64) -> String {
    let start = Utc.timestamp_micros(start_us).single().unwrap_or_default();
    format!("{table}_p{}", start.format("%Y%m%d_%H%M%S"))
}

fn rfc3339(us: i64) -> String {
    Utc.timestamp_micros(us)
        .single()
        .unwrap_or_default()
        .to_rfc3339()
}

/// The start of the chunk holding `time_us`.
pub fn chunk_start(time_us: i64, interval_us: i64) -> i64 {
    time_us.div_euclid(interval_us) * interval_us
}

/// Creates the partition of `schema.table` starting at `start_us`, if missing; safe to run
/// from several processes at once (an advisory lock serializes creators).
pub async fn create_partition(
    client: &mut tokio_postgres::Client,
    schema: &Schema,
    start_us: i64,
) -> Result<(), tokio_postgres::Error> {
    let name = partition_name(&schema.table, start_us);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&name])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ('{}') TO ('{}')",
        ident(&name),
        ident(&schema.table),
        rfc3339(start_us),
        rfc3339(start_us + schema.chunk_interval_us)
    ))
    .await?;
    tx.commit().await
}

/// The partitions this process knows exist, so each is created at most once per process.
#[derive(Debug, Default)]
pub struct KnownPartitions {
    /// Chunk starts (µs since the Unix epoch) known to exist.
    starts: Mutex<HashSet<i64>>,
}

impl KnownPartitions {
    /// Forgets every partition: a chunk archived and dropped by the lifecycle may receive late
    /// rows, and its partition must then be created again.
    pub fn forget_all(&self) {
        self.starts
            .lock()
            .expect("partition cache poisoned")
            .clear();
    }

    /// Creates whichever of `starts` this process has not seen yet.
    pub async fn ensure(
        &self,
        pool: &deadpool_postgres::Pool,
        schema: &Schema,
        starts: &BTreeSet<i64>,
    ) -> Result<(), StageError> {
        let missing: Vec<i64> = {
            let known = self.starts.lock().expect("partition cache poisoned");
            starts
                .iter()
                .copied()
                .filter(|s| !known.contains(s))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut client = pool.get().await?;
        for start in missing {
            create_partition(&mut client, schema, start)
                .await
                .map_err(|e| {
                    StageError::from_postgres(
                        &format!(
                            "creating partition {}",
                            partition_name(&schema.table, start)
                        ),
                        e,
                    )
                })?;
            self.starts
                .lock()
                .expect("partition cache poisoned")
                .insert(start);
        }
        Ok(())
    }
}
