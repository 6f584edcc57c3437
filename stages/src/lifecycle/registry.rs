//! `strata.chunks`, the lifecycle table: one row per chunk incarnation, moved along
//! pending → archiving → archived → verified → dropped (or failed) by the three stages. Every
//! transition names the row's current `event_id`, so a stale event or confirmation changes
//! nothing.

use chrono::{DateTime, Utc};
use strata_pipeline::StageError;

use crate::catalog::{ident, CHUNKS};

use super::events::ArchivalEvent;

/// Where a chunk is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Recorded by the watcher; its archival event is on `archive:{T}`.
    Pending,
    /// An archiver is writing (or crashed while writing) the object at `lake_path`.
    Archiving,
    /// The object is complete; the confirmer has not verified it yet.
    Archived,
    /// The object was read back and matches the chunk.
    Verified,
    /// The chunk is gone from PostgreSQL; its archive is the only copy.
    Dropped,
    /// Given up: the reason is in `last_error`, the event in `archive:{T}:dlq`.
    Failed,
}

impl ChunkState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkState::Pending => "pending",
            ChunkState::Archiving => "archiving",
            ChunkState::Archived => "archived",
            ChunkState::Verified => "verified",
            ChunkState::Dropped => "dropped",
            ChunkState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => ChunkState::Pending,
            "archiving" => ChunkState::Archiving,
            "archived" => ChunkState::Archived,
            "verified" => ChunkState::Verified,
            "dropped" => ChunkState::Dropped,
            "failed" => ChunkState::Failed,
            _ => return None,
        })
    }
}

/// One row of `strata.chunks`.
#[derive(Debug, Clone)]
pub struct ChunkRow {
    /// Primary key, carried in events as `chunk_id`.
    pub id: i64,
    /// The table (hypertable or partitioned parent).
    pub table_name: String,
    /// Schema of the chunk relation.
    pub chunk_schema: String,
    /// Name of the chunk relation.
    pub chunk: String,
    /// OID of the chunk relation: tells this incarnation from one made again for late rows.
    pub chunk_oid: u32,
    /// Start of the time range (µs, inclusive).
    pub range_start_us: i64,
    /// End of the time range (µs, exclusive).
    pub range_end_us: i64,
    /// Where it is in its lifecycle.
    pub state: ChunkState,
    /// The current archival event; older events and confirmations are stale.
    pub event_id: String,
    /// Archive attempts started.
    pub attempts: i32,
    /// Archives that failed verification.
    pub verify_failures: i32,
    /// When the watcher recorded it (µs).
    pub created_at_us: i64,
    /// Object key of the current (or last started) archive.
    pub lake_path: Option<String>,
    /// Rows in the archive.
    pub rows: Option<i64>,
    /// Size of the archive in bytes.
    pub bytes: Option<i64>,
    /// SHA-256 of the archive, lowercase hex.
    pub sha256: Option<String>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Columns selected into a [`ChunkRow`], in order.
pub const ROW_COLUMNS: &str = "id, table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, state, event_id, attempts, verify_failures, created_at, lake_path, rows, bytes, sha256, last_error";

impl ChunkRow {
    pub fn from_row(row: &tokio_postgres::Row) -> Result<Self, StageError> {
        let state: String = row.get(7);
        let us = |i: usize| row.get::<_, DateTime<Utc>>(i).timestamp_micros();
        Ok(Self {
            id: row.get(0),
            table_name: row.get(1),
            chunk_schema: row.get(2),
            chunk: row.get(3),
            chunk_oid: row.get(4),
            range_start_us: us(5),
            range_end_us: us(6),
            state: ChunkState::parse(&state)
                .ok_or_else(|| StageError::fatal(format!("{CHUNKS}: unknown state {state:?}")))?,
            event_id: row.get(8),
            attempts: row.get(9),
            verify_failures: row.get(10),
            created_at_us: us(11),
            lake_path: row.get(12),
            rows: row.get(13),
            bytes: row.get(14),
            sha256: row.get(15),
            last_error: row.get(16),
        })
    }

    /// The chunk relation, quoted for SQL.
    pub fn relation(&self) -> String {
        format!("{}.{}", ident(&self.chunk_schema), ident(&self.chunk))
    }

    /// How events and logs name the chunk: the bare name for native partitions, `schema.name`
    /// for TimescaleDB chunks.
    pub fn display_name(&self) -> String {
        if self.chunk_schema == "public" {
            self.chunk.clone()
        } else {
            format!("{}.{}", self.chunk_schema, self.chunk)
        }
    }

    /// The archival event for the row's current `event_id`.
    pub fn event(&self) -> ArchivalEvent {
        ArchivalEvent {
            event_id: self.event_id.clone(),
            chunk_id: self.id,
            table: self.table_name.clone(),
            chunk: self.display_name(),
            range_start_us: self.range_start_us,
            range_end_us: self.range_end_us,
            created_at_us: self.created_at_us,
            attempt: self.verify_failures + 1,
        }
    }
}

/// Reads row `id`.
pub async fn load(
    client: &impl deadpool_postgres::GenericClient,
    id: i64,
) -> Result<Option<ChunkRow>, StageError> {
    client
        .query_opt(
            &format!("SELECT {ROW_COLUMNS} FROM {CHUNKS} WHERE id = $1"),
            &[&id],
        )
        .await
        .map_err(|e| StageError::from_postgres(&format!("reading {CHUNKS} row {id}"), e))?
        .map(|r| ChunkRow::from_row(&r))
        .transpose()
}

/// Marks row `id` failed for good (when its event is dead-lettered), if `event_id` is still
/// its current event.
pub async fn mark_failed(
    client: &impl deadpool_postgres::GenericClient,
    id: i64,
    event_id: &str,
    error: &str,
) -> Result<(), StageError> {
    client
        .execute(
            &format!("UPDATE {CHUNKS} SET state = 'failed', failed_at = now(), last_error = $3 WHERE id = $1 AND event_id = $2"),
            &[&id, &event_id, &error],
        )
        .await
        .map_err(|e| StageError::from_postgres(&format!("marking {CHUNKS} row {id} failed"), e))?;
    Ok(())
}
