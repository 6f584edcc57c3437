//! `strata status [--json] [--watch]`: is it keeping up, where is the backlog, what failed.
//!
//! Per table (from `schemas/`) and per stream (`telemetry:{T}`, `rows:{T}`, `archive:{T}`,
//! `archived:{T}`): length, dead letters (length of its `:dlq`), and per consumer group the lag
//! (entries not yet delivered), pending entries (delivered, not acknowledged), the oldest
//! pending entry (its age from its ID, and how long since it was last delivered) and the
//! consumers with their idle times. Per table from PostgreSQL: rows whose time is within the
//! last minute, live chunks, chunks by lifecycle state and the newest archive (from
//! `strata.chunks`, when the lifecycle has created it).
//!
//! Nothing absent is an error: a stream or group not created yet shows as absent. PostgreSQL
//! being unreachable is reported in the output; Redis being unreachable is an error (in
//! `--watch`, a line that is retried every refresh).
//!
//! Output: an aligned table, coloured when stdout is a terminal (and `NO_COLOR` is unset);
//! `--json` prints one JSON document (field names in README, "Inspecting and replaying");
//! `--watch` refreshes every 2 s until Ctrl-C (one compact JSON document per line with `--json`).
//!
//! # Layout
//! - this file: the options, the snapshot (the `--json` document) and the command's loop.
//! - `collect.rs`: the snapshot from Redis (streams, groups, consumers, pending entries) and
//!   PostgreSQL (rows, chunks, archives).
//! - `render.rs`: the snapshot as an aligned, optionally coloured table.

mod collect;
mod render;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use crate::config::Config;
use serde::Serialize;
use strata_pipeline::error_chain;
use strata_pipeline::schema::SchemaRef;

use super::{redis_info, OpsError};
pub use collect::{collect, stream_status};
pub use render::human_ms;
use render::{render, Paint};

/// Options of `strata status`.
#[derive(Debug, Clone, Default)]
pub struct StatusOptions {
    /// One JSON document instead of a table.
    pub json: bool,
    /// Refresh every 2 s until interrupted.
    pub watch: bool,
}

/// How often `--watch` refreshes.
const REFRESH: Duration = Duration::from_secs(2);

/// One snapshot of the whole pipeline: the `--json` document.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// When the snapshot was taken (Redis server clock), RFC 3339.
    pub time: String,
    /// The Redis server asked (without its password).
    pub redis: RedisStatus,
    /// Whether PostgreSQL answered.
    pub postgres: PostgresStatus,
    /// One per schema, sorted by table name.
    pub tables: Vec<TableStatus>,
}

/// The Redis part of the header.
#[derive(Debug, Clone, Serialize)]
pub struct RedisStatus {
    /// Where the streams live (password removed).
    pub url: String,
}

/// The PostgreSQL part of the header.
#[derive(Debug, Clone, Serialize)]
pub struct PostgresStatus {
    /// False when no connection could be made; per-table figures are then null.
    pub ok: bool,
    /// Why not, when not.
    pub error: Option<String>,
}

/// One table.
#[derive(Debug, Clone, Serialize)]
pub struct TableStatus {
    /// The table (and the `{T}` of its stream keys).
    pub table: String,
    /// Dead letters over all of the table's streams.
    pub dead_letters: u64,
    /// Rows whose time column is within the last minute (null without PostgreSQL or table).
    pub rows_last_minute: Option<i64>,
    /// The table's chunks (null without PostgreSQL).
    pub chunks: Option<ChunkStatus>,
    /// The most recently archived chunk (null when none, or no lifecycle bookkeeping yet).
    pub newest_archive: Option<ArchiveInfo>,
    /// What went wrong reading this table's figures from PostgreSQL.
    pub postgres_error: Option<String>,
    /// Partitions the running stages read (the recorded count, else the schema's).
    pub partitions: u32,
    /// `telemetry:{T}`, `rows:{T}`, `archive:{T}`, `archived:{T}`, in pipeline order; a
    /// partitioned table lists each partition's `telemetry` and `rows` (`{T}`, `{T:1}`, …),
    /// and a partition removed by a shrink while it still holds entries or dead letters.
    pub streams: Vec<StreamStatus>,
    /// A partitioned table only: per partitioned stream kind, the sums over its partitions.
    pub totals: Vec<StreamTotal>,
}

/// One stream kind of a partitioned table, summed over its partitions.
#[derive(Debug, Clone, Serialize)]
pub struct StreamTotal {
    /// The streams summed, as a pattern: `telemetry:{T:*}`.
    pub streams: String,
    /// The group of the stage that reads them.
    pub group: String,
    /// Entries kept, over all partitions.
    pub length: u64,
    /// Dead letters, over all partitions.
    pub dead_letters: u64,
    /// Entries not yet delivered; null when Redis cannot tell for some partition.
    pub lag: Option<u64>,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
}

/// Chunks of one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChunkStatus {
    /// Chunks that exist in PostgreSQL now (hypertable chunks or native partitions).
    pub live: Option<i64>,
    /// Chunks per lifecycle state from `strata.chunks`; null while that table does not exist.
    pub by_state: Option<BTreeMap<String, i64>>,
}

/// Where the newest archive went.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveInfo {
    /// Its path in the lake.
    pub path: Option<String>,
    /// When it was archived, RFC 3339.
    pub archived_at: Option<String>,
}

/// One stream of a table.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    /// The stream key.
    pub stream: String,
    /// Its partition (0 for `{T}`).
    pub partition: u32,
    /// A partition beyond the table's count (removed by a shrink), listed because it still
    /// holds entries or dead letters.
    pub removed: bool,
    /// On a Redis Cluster: `host:port` of the master serving the stream's slot.
    pub node: Option<String>,
    /// False until something creates the stream (an XADD or a consumer group).
    pub exists: bool,
    /// XLEN: entries kept (trimming removes those every group acknowledged).
    pub length: u64,
    /// Its dead-letter stream's key.
    pub dlq: String,
    /// XLEN of the dead-letter stream.
    pub dead_letters: u64,
    /// The stage's group first (absent if not created yet), then any other group.
    pub groups: Vec<GroupStatus>,
}

/// One consumer group of a stream.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// The group (the stage name for strata's groups).
    pub group: String,
    /// False for the stage's group before the stage first ran.
    pub exists: bool,
    /// Entries not yet delivered to the group; null when Redis cannot tell (after deletions).
    pub lag: Option<u64>,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// The last ID delivered to the group.
    pub last_delivered_id: Option<String>,
    /// The pending entry with the smallest ID.
    pub oldest_pending: Option<OldestPending>,
    /// Every consumer of the group.
    pub consumers: Vec<ConsumerStatus>,
}

/// The oldest pending entry of a group.
#[derive(Debug, Clone, Serialize)]
pub struct OldestPending {
    /// Its stream ID.
    pub id: String,
    /// Who holds it.
    pub consumer: Option<String>,
    /// Milliseconds since it was added to the stream (from its ID).
    pub age_ms: u64,
    /// Milliseconds since it was last delivered.
    pub idle_ms: Option<u64>,
    /// How often it has been delivered.
    pub deliveries: Option<u64>,
}

/// One consumer of a group.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStatus {
    /// Its name (`<stage>-<host>-<pid>-<random>` for strata's processes).
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last read or claimed.
    pub idle_ms: u64,
    /// Milliseconds since it last got entries (Redis 7.2+; null before).
    pub inactive_ms: Option<u64>,
}

/// Prints the status of every table's streams and chunks to `out`.
pub async fn status(
    config: &Config,
    schemas: &[SchemaRef],
    opts: &StatusOptions,
    out: &mut (dyn std::io::Write + Send),
) -> Result<(), OpsError> {
    let tty = std::io::stdout().is_terminal();
    let paint = Paint {
        color: tty && !opts.json && std::env::var_os("NO_COLOR").is_none(),
    };
    if !opts.watch {
        let mut conn = redis_info::connect(config).await?;
        let s = collect(config, schemas, &mut conn).await?;
        if opts.json {
            let text = serde_json::to_string_pretty(&s).map_err(std::io::Error::from)?;
            writeln!(out, "{text}")?;
        } else {
            out.write_all(render(&s, paint).as_bytes())?;
        }
        out.flush()?;
        return Ok(());
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut conn: Option<crate::ops::redis_info::OpsConnection> = None;
    loop {
        let snapshot = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(redis_info::connect(config).await?),
            };
            collect(config, schemas, c).await
        };
        let result = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            r = snapshot => r,
        };
        let text = match (&result, opts.json) {
            (Ok(s), true) => serde_json::to_string(s).map_err(std::io::Error::from)? + "\n",
            (Ok(s), false) => render(s, paint),
            (Err(e), true) => serde_json::json!({ "error": error_chain(e) }).to_string() + "\n",
            (Err(e), false) => paint.red(&format!("strata status: {}\n", error_chain(e))),
        };
        if result.is_err() {
            conn = None;
        }
        if tty && !opts.json {
            out.write_all(b"\x1b[H\x1b[2J")?;
        }
        out.write_all(text.as_bytes())?;
        if tty && !opts.json {
            writeln!(
                out,
                "{}",
                paint.dim(&format!(
                    "refreshing every {} s; Ctrl-C to stop",
                    REFRESH.as_secs()
                ))
            )?;
        } else if !opts.json {
            writeln!(out)?;
        }
        out.flush()?;
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}
