//! strata's own bookkeeping tables in PostgreSQL, and native partitions ("chunks").

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use chrono::{TimeZone, Utc};
use strata_pipeline::schema::Schema;
use strata_pipeline::{RetryHint, StageError};

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
-- Dead letters as JSON bytes: a row PostgreSQL refused (a NUL, a `\u0000`) can still be recorded.
ALTER TABLE strata.applied_frames ADD COLUMN IF NOT EXISTS dead_letter_data bytea;
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

/// How one table is partitioned, read from [`TABLES`] once and then cached (a table's
/// partitioning never changes after `strata migrate`).
#[derive(Debug, Default)]
pub struct CachedPartitioning(tokio::sync::OnceCell<Partitioning>);

impl CachedPartitioning {
    /// The partitioning of `table`, read with a connection from `pool` the first time.
    pub async fn get(
        &self,
        pool: &deadpool_postgres::Pool,
        table: &str,
    ) -> Result<Partitioning, StageError> {
        self.0
            .get_or_try_init(|| async {
                let client = pool.get().await?;
                partitioning(&client, table).await
            })
            .await
            .copied()
    }
}

/// Name of the native partition starting at `start_us`.
pub fn partition_name(table: &str, start_us: i64) -> String {
    let start = Utc.timestamp_micros(start_us).single().unwrap_or_default();
    format!("{table}_p{}", start.format("%Y%m%d_%H%M%S"))
}

/// A timestamptz literal PostgreSQL reads for any year chrono can hold: `YYYY-MM-DD
/// HH:MM:SS.ffffff+00`, with ` BC` for years before 1 (chrono's year 0 is PostgreSQL's 1 BC), so
/// partitions at both ends of the accepted time range can be made.
pub fn pg_timestamp_literal(us: i64) -> String {
    use chrono::{Datelike, Timelike};
    let t = Utc.timestamp_micros(us).single().unwrap_or_default();
    let (year, era) = match t.year() {
        y if y >= 1 => (y, ""),
        y => (1 - y, " BC"),
    };
    format!(
        "{year:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00{era}",
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.timestamp_subsec_micros()
    )
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
        pg_timestamp_literal(start_us),
        pg_timestamp_literal(start_us.saturating_add(schema.chunk_interval_us))
    ))
    .await?;
    // Made by a runtime role (`strata migrate --grant`), the partition belongs to it; hand it to
    // the table's owner (a group the role is a member of), so the owner role can still alter
    // the table and every runtime role can drop the partition.
    let owner: Option<String> = tx
        .query_one(
            "SELECT CASE WHEN p.relowner = c.relowner THEN NULL ELSE pg_get_userbyid(p.relowner)::text END
             FROM pg_class c, pg_class p WHERE c.oid = to_regclass($1) AND p.oid = to_regclass($2)",
            &[&ident(&name), &ident(&schema.table)],
        )
        .await?
        .get(0);
    if let Some(owner) = owner {
        tx.batch_execute(&format!(
            "ALTER TABLE {} OWNER TO {}",
            ident(&name),
            ident(&owner)
        ))
        .await?;
    }
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

    /// Creates whichever of `starts` this process has not seen yet. Returns the chunks whose
    /// partition cannot be made for a reason that may depend on their rows' times (their rows
    /// are then refused on their own); a transient or fatal failure is returned as the error.
    pub async fn ensure(
        &self,
        pool: &deadpool_postgres::Pool,
        schema: &Schema,
        starts: &BTreeSet<i64>,
    ) -> Result<HashMap<i64, StageError>, StageError> {
        let missing: Vec<i64> = {
            let known = self.starts.lock().expect("partition cache poisoned");
            starts
                .iter()
                .copied()
                .filter(|s| !known.contains(s))
                .collect()
        };
        let mut unmade = HashMap::new();
        if missing.is_empty() {
            return Ok(unmade);
        }
        let mut client = pool.get().await?;
        for start in missing {
            let made = create_partition(&mut client, schema, start).await;
            if let Err(e) = made {
                let e = StageError::from_postgres(
                    &format!(
                        "creating partition {}",
                        partition_name(&schema.table, start)
                    ),
                    e,
                );
                if e.hint != RetryHint::DeadLetter {
                    return Err(e);
                }
                unmade.insert(start, e);
                continue;
            }
            self.starts
                .lock()
                .expect("partition cache poisoned")
                .insert(start);
        }
        Ok(unmade)
    }
}
