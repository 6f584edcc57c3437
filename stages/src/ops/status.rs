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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::Serialize;
use strata_pipeline::config::Config;
use strata_pipeline::error_chain;
use strata_pipeline::schema::{Schema, SchemaRef};
use strata_pipeline::streams;

use super::{redact_url, redis_info, OpsError, StreamKind};
use crate::catalog::ident;

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
    /// `telemetry:{T}`, `rows:{T}`, `archive:{T}`, `archived:{T}`, in pipeline order.
    pub streams: Vec<StreamStatus>,
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
    let mut conn: Option<MultiplexedConnection> = None;
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

/// Takes one snapshot: Redis for every stream, PostgreSQL (if it answers) for every table.
pub async fn collect(
    config: &Config,
    schemas: &[SchemaRef],
    conn: &mut MultiplexedConnection,
) -> Result<Status, OpsError> {
    let now_ms = redis_info::server_time_ms(conn).await?;
    let mut tables = Vec::with_capacity(schemas.len());
    for schema in schemas {
        let mut t = TableStatus {
            table: schema.table.clone(),
            dead_letters: 0,
            rows_last_minute: None,
            chunks: None,
            newest_archive: None,
            postgres_error: None,
            streams: Vec::new(),
        };
        for kind in StreamKind::ALL {
            let s = stream_status(conn, &kind.key(&schema.table), kind.group(), now_ms).await?;
            t.dead_letters += s.dead_letters;
            t.streams.push(s);
        }
        tables.push(t);
    }
    let postgres = match pg_connect(config).await {
        Ok(client) => {
            let lifecycle = ChunksTable::discover(&client).await;
            for (t, schema) in tables.iter_mut().zip(schemas) {
                table_figures(&client, schema, &lifecycle, t).await;
            }
            PostgresStatus {
                ok: true,
                error: None,
            }
        }
        Err(e) => PostgresStatus {
            ok: false,
            error: Some(e),
        },
    };
    let time = i64::try_from(now_ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    Ok(Status {
        time,
        redis: RedisStatus {
            url: redact_url(&config.redis.url),
        },
        postgres,
        tables,
    })
}

/// Length, dead letters and groups of one stream; `stage_group` is listed even when absent.
pub async fn stream_status(
    conn: &mut MultiplexedConnection,
    stream: &str,
    stage_group: &str,
    now_ms: u64,
) -> Result<StreamStatus, OpsError> {
    let dlq = streams::dlq_stream(stream);
    let exists = redis_info::stream_exists(conn, stream).await?;
    let length = if exists {
        redis_info::xlen(conn, stream).await?
    } else {
        0
    };
    let dead_letters = if redis_info::stream_exists(conn, &dlq).await? {
        redis_info::xlen(conn, &dlq).await?
    } else {
        0
    };
    let mut infos = if exists {
        streams::groups(conn, stream).await?
    } else {
        Vec::new()
    };
    // The stage's group first.
    infos.sort_by_key(|g| (g.name != stage_group, g.name.clone()));
    let mut groups = Vec::with_capacity(infos.len() + 1);
    if infos.first().is_none_or(|g| g.name != stage_group) {
        groups.push(GroupStatus {
            group: stage_group.to_string(),
            exists: false,
            lag: None,
            pending: 0,
            last_delivered_id: None,
            oldest_pending: None,
            consumers: Vec::new(),
        });
    }
    for g in infos {
        let oldest_pending = if g.pending > 0 {
            oldest_pending(conn, stream, &g.name, now_ms).await?
        } else {
            None
        };
        let consumers = redis_info::consumers(conn, stream, &g.name)
            .await?
            .into_iter()
            .map(|c| ConsumerStatus {
                name: c.name,
                pending: c.pending,
                idle_ms: c.idle_ms,
                inactive_ms: c.inactive_ms,
            })
            .collect();
        groups.push(GroupStatus {
            group: g.name,
            exists: true,
            lag: g.lag,
            pending: g.pending,
            last_delivered_id: Some(g.last_delivered_id).filter(|id| !id.is_empty()),
            oldest_pending,
            consumers,
        });
    }
    Ok(StreamStatus {
        stream: stream.to_string(),
        exists,
        length,
        dlq,
        dead_letters,
        groups,
    })
}

/// XPENDING summary → smallest ID → that entry's idle time and deliveries.
async fn oldest_pending(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
    now_ms: u64,
) -> Result<Option<OldestPending>, OpsError> {
    let summary = redis_info::pending_summary(conn, stream, group).await?;
    let Some(id) = summary.smallest else {
        return Ok(None);
    };
    let entry = redis_info::pending_entry(conn, stream, group, &id).await?;
    Ok(Some(OldestPending {
        age_ms: now_ms.saturating_sub(redis_info::id_ms(&id).unwrap_or(now_ms)),
        consumer: entry.as_ref().map(|e| e.consumer.clone()),
        idle_ms: entry.as_ref().map(|e| e.idle_ms),
        deliveries: entry.as_ref().map(|e| e.deliveries),
        id,
    }))
}

/// A PostgreSQL connection for one snapshot, or why there is none. Short timeouts: a status
/// must come back quickly.
async fn pg_connect(config: &Config) -> Result<tokio_postgres::Client, String> {
    use strata_pipeline::db::{connect_postgres, postgres_config, ConnectError, ConnectLimits};
    let limits = ConnectLimits {
        connect_timeout: Some(Duration::from_secs(3)),
        total: Some(Duration::from_secs(5)),
        statement_timeout: Some(Duration::from_secs(5)),
    };
    let pg = postgres_config(&config.postgres.url).map_err(|e| error_chain(&e))?;
    let client = connect_postgres(&pg, limits).await.map_err(|e| match &e {
        ConnectError::Postgres(pe) | ConnectError::Setup(pe) => pg_error(pe),
        _ => error_chain(&e),
    })?;
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .map_err(|e| pg_error(&e))?;
    Ok(client)
}

/// A PostgreSQL error with the server's message, or the cause of a connection failure.
fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    error_chain(e)
}

/// Which columns of `strata.chunks` hold what, found from its catalog entry so this keeps
/// working while the lifecycle's bookkeeping evolves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunksTable {
    /// `strata.chunks` does not exist (yet).
    Absent,
    /// It exists, but no column looks like a table name or a state.
    Unrecognized(String),
    /// The columns to query.
    Columns {
        /// Names the table a chunk belongs to.
        table: String,
        /// The lifecycle state.
        state: String,
        /// When the chunk was archived.
        archived_at: Option<String>,
        /// Where the archive is in the lake.
        path: Option<String>,
    },
}

impl ChunksTable {
    async fn discover(client: &tokio_postgres::Client) -> ChunksTable {
        let columns: Vec<String> = match client
            .query(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'strata' AND table_name = 'chunks' ORDER BY ordinal_position",
                &[],
            )
            .await
        {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) => return ChunksTable::Unrecognized(pg_error(&e)),
        };
        if columns.is_empty() {
            return ChunksTable::Absent;
        }
        let pick = |candidates: &[&str]| {
            candidates
                .iter()
                .find(|c| columns.iter().any(|col| col == *c))
                .map(|c| c.to_string())
        };
        let table = pick(&[
            "table_name",
            "hypertable_name",
            "table",
            "tablename",
            "relation",
        ]);
        let state = pick(&["state", "status", "lifecycle_state", "phase"]);
        match (table, state) {
            (Some(table), Some(state)) => ChunksTable::Columns {
                table,
                state,
                archived_at: pick(&["archived_at", "uploaded_at", "verified_at"]),
                path: pick(&[
                    "lake_path",
                    "archive_path",
                    "path",
                    "object_path",
                    "uri",
                    "url",
                ]),
            },
            _ => ChunksTable::Unrecognized(format!(
                "strata.chunks has no recognizable table and state columns (it has {})",
                columns.join(", ")
            )),
        }
    }
}

/// Fills the PostgreSQL figures of one table; failures go to `postgres_error`.
async fn table_figures(
    client: &tokio_postgres::Client,
    schema: &Schema,
    lifecycle: &ChunksTable,
    t: &mut TableStatus,
) {
    let mut errors = Vec::new();
    let table = ident(&schema.table);
    let exists = match client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
    {
        Ok(row) => row.get::<_, bool>(0),
        Err(e) => {
            t.postgres_error = Some(pg_error(&e));
            return;
        }
    };
    let mut chunks = ChunkStatus::default();
    if exists {
        let time = ident(&schema.columns[schema.time_index].name);
        match client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {time} > now() - interval '1 minute'"),
                &[],
            )
            .await
        {
            Ok(row) => t.rows_last_minute = Some(row.get(0)),
            Err(e) => errors.push(format!("rows in the last minute: {}", pg_error(&e))),
        }
        match live_chunks(client, &schema.table).await {
            Ok(n) => chunks.live = n,
            Err(e) => errors.push(format!("live chunks: {}", pg_error(&e))),
        }
    } else {
        errors.push(format!(
            "table `{}` does not exist: run `strata migrate`",
            schema.table
        ));
    }
    match lifecycle {
        ChunksTable::Absent => {}
        ChunksTable::Unrecognized(why) => errors.push(why.clone()),
        ChunksTable::Columns {
            table: table_col,
            state,
            archived_at,
            path,
        } => {
            let (tc, sc) = (ident(table_col), ident(state));
            let belongs = format!("({tc}::text = $1 OR {tc}::text = 'public.' || $1)");
            match client
                .query(
                    &format!(
                        "SELECT {sc}::text, count(*) FROM strata.chunks WHERE {belongs} GROUP BY 1 ORDER BY 1"
                    ),
                    &[&schema.table],
                )
                .await
            {
                Ok(rows) => {
                    chunks.by_state = Some(
                        rows.iter()
                            .map(|r| (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1)))
                            .collect(),
                    )
                }
                Err(e) => errors.push(format!("strata.chunks: {}", pg_error(&e))),
            }
            let newest = match (archived_at, path) {
                (Some(at), path) => {
                    let at = ident(at);
                    let path = path
                        .as_deref()
                        .map_or("NULL".into(), |p| format!("{}::text", ident(p)));
                    Some(format!(
                        "SELECT {path}, to_json({at}) #>> '{{}}' FROM strata.chunks \
                         WHERE {belongs} AND {at} IS NOT NULL ORDER BY {at} DESC LIMIT 1"
                    ))
                }
                (None, Some(path)) => {
                    let path = ident(path);
                    Some(format!(
                        "SELECT {path}::text, NULL::text FROM strata.chunks \
                         WHERE {belongs} AND {path} IS NOT NULL ORDER BY {path} DESC LIMIT 1"
                    ))
                }
                (None, None) => None,
            };
            if let Some(sql) = newest {
                match client.query_opt(&sql, &[&schema.table]).await {
                    Ok(row) => {
                        t.newest_archive = row.map(|r| ArchiveInfo {
                            path: r.get(0),
                            archived_at: r.get(1),
                        })
                    }
                    Err(e) => errors.push(format!("newest archive: {}", pg_error(&e))),
                }
            }
        }
    }
    t.chunks = Some(chunks);
    if !errors.is_empty() {
        t.postgres_error = Some(errors.join("; "));
    }
}

/// Chunks in PostgreSQL now: TimescaleDB's chunks of a hypertable, or a native table's
/// partitions. None when the table is not in `strata.tables`.
async fn live_chunks(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let bookkeeping: bool = client
        .query_one("SELECT to_regclass('strata.tables') IS NOT NULL", &[])
        .await?
        .get(0);
    if !bookkeeping {
        return Ok(None);
    }
    let partitioning = client
        .query_opt(
            "SELECT partitioning FROM strata.tables WHERE name = $1",
            &[&table],
        )
        .await?;
    let Some(row) = partitioning else {
        return Ok(None);
    };
    let sql = if row.get::<_, String>(0) == "hypertable" {
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = $1"
    } else {
        "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass(quote_ident($1))"
    };
    Ok(Some(client.query_one(sql, &[&table]).await?.get(0)))
}

/// ANSI styling, or none.
#[derive(Debug, Clone, Copy)]
struct Paint {
    /// Whether to emit escape codes at all.
    color: bool,
}

impl Paint {
    fn wrap(self, code: &str, s: &str) -> String {
        if self.color && !s.is_empty() {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(self, s: &str) -> String {
        self.wrap("1", s)
    }
    fn dim(self, s: &str) -> String {
        self.wrap("2", s)
    }
    fn red(self, s: &str) -> String {
        self.wrap("31", s)
    }
    fn green(self, s: &str) -> String {
        self.wrap("32", s)
    }
    fn yellow(self, s: &str) -> String {
        self.wrap("33", s)
    }
}

/// A cell: its text and how to colour it (padding is computed on the plain text).
type Cell = (String, fn(Paint, &str) -> String);

fn plain(p: Paint, s: &str) -> String {
    let _ = p;
    s.to_string()
}

/// Human-readable milliseconds: `850ms`, `4.1s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// The snapshot as an aligned table per table.
fn render(s: &Status, p: Paint) -> String {
    let mut o = String::new();
    let pg = if s.postgres.ok {
        p.green("ok")
    } else {
        p.red(&format!(
            "unreachable: {}",
            s.postgres.error.as_deref().unwrap_or("?")
        ))
    };
    let _ = writeln!(
        o,
        "{}  {}  redis {}  postgres {pg}",
        p.bold("strata status"),
        s.time,
        s.redis.url
    );
    if s.tables.is_empty() {
        let _ = writeln!(o, "\nno schemas: nothing to show");
    }
    for t in &s.tables {
        o.push('\n');
        o.push_str(&render_table(t, p));
    }
    o
}

fn render_table(t: &TableStatus, p: Paint) -> String {
    let mut o = String::new();
    let mut facts = Vec::new();
    facts.push(match t.rows_last_minute {
        Some(n) => format!("{n} rows in the last minute"),
        None => p.dim("rows in the last minute: n/a"),
    });
    facts.push(if t.dead_letters > 0 {
        p.red(&format!(
            "{} dead letter{}",
            t.dead_letters,
            if t.dead_letters == 1 { "" } else { "s" }
        ))
    } else {
        p.green("no dead letters")
    });
    if let Some(c) = &t.chunks {
        let mut text = match c.live {
            Some(n) => format!("{n} live chunks"),
            None => "live chunks: n/a".into(),
        };
        if let Some(by_state) = &c.by_state {
            let states: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = write!(
                text,
                " (lifecycle: {})",
                if states.is_empty() {
                    "none yet".to_string()
                } else {
                    states.join(", ")
                }
            );
        }
        facts.push(text);
    }
    let _ = writeln!(o, "{}  {}", p.bold(&t.table), facts.join(" · "));
    if let Some(a) = &t.newest_archive {
        let _ = writeln!(
            o,
            "  newest archive: {}{}",
            a.path.as_deref().unwrap_or("?"),
            a.archived_at
                .as_deref()
                .map(|at| format!(" at {at}"))
                .unwrap_or_default()
        );
    }
    if let Some(e) = &t.postgres_error {
        let _ = writeln!(o, "  {}", p.yellow(&format!("postgres: {e}")));
    }
    let header: Vec<Cell> = [
        "STREAM",
        "LENGTH",
        "DLQ",
        "GROUP",
        "LAG",
        "PENDING",
        "OLDEST PENDING",
        "CONSUMERS",
    ]
    .iter()
    .map(|h| (h.to_string(), Paint::bold as fn(Paint, &str) -> String))
    .collect();
    let mut rows: Vec<Vec<Cell>> = vec![header];
    // Lines printed under a row, outside the alignment.
    let mut notes: Vec<Vec<String>> = vec![Vec::new()];
    for s in &t.streams {
        for (i, g) in s.groups.iter().enumerate() {
            let first = i == 0;
            let stream: Cell = if first {
                (s.stream.clone(), if s.exists { plain } else { Paint::dim })
            } else {
                (String::new(), plain)
            };
            let length: Cell = match (first, s.exists) {
                (false, _) => (String::new(), plain),
                (true, true) => (s.length.to_string(), plain),
                (true, false) => ("absent".into(), Paint::dim),
            };
            let dlq: Cell = match (first, s.dead_letters) {
                (false, _) => (String::new(), plain),
                (true, 0) => ("0".into(), plain),
                (true, n) => (n.to_string(), Paint::red),
            };
            let group: Cell = if g.exists {
                (g.group.clone(), plain)
            } else {
                (format!("{} (absent)", g.group), Paint::dim)
            };
            let lag: Cell = match (g.exists, g.lag) {
                (false, _) => ("-".into(), Paint::dim),
                (true, None) => ("?".into(), Paint::yellow),
                (true, Some(0)) => ("0".into(), plain),
                (true, Some(n)) => (n.to_string(), Paint::yellow),
            };
            let pending: Cell = match (g.exists, g.pending) {
                (false, _) => ("-".into(), Paint::dim),
                (true, 0) => ("0".into(), plain),
                (true, n) => (n.to_string(), Paint::yellow),
            };
            let oldest: Cell = match &g.oldest_pending {
                None => ("-".into(), Paint::dim),
                Some(o) => (
                    format!(
                        "{} old{}",
                        human_ms(o.age_ms),
                        o.idle_ms
                            .map(|i| format!(", idle {}", human_ms(i)))
                            .unwrap_or_default()
                    ),
                    Paint::yellow,
                ),
            };
            let consumers: Cell = if g.exists {
                (g.consumers.len().to_string(), plain)
            } else {
                ("-".into(), Paint::dim)
            };
            rows.push(vec![
                stream, length, dlq, group, lag, pending, oldest, consumers,
            ]);
            notes.push(
                g.consumers
                    .iter()
                    .map(|c| {
                        let mut line = format!(
                            "    └ {}  pending {}  idle {}",
                            c.name,
                            c.pending,
                            human_ms(c.idle_ms)
                        );
                        if let Some(i) = c.inactive_ms {
                            let _ = write!(line, "  inactive {}", human_ms(i));
                        }
                        p.dim(&line)
                    })
                    .collect(),
            );
        }
    }
    let ncols = rows[0].len();
    let widths: Vec<usize> = (0..ncols)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].0.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    // Numbers right-aligned.
    let right = [false, true, true, false, true, true, false, true];
    for (row, notes) in rows.iter().zip(&notes) {
        let mut line = String::from("  ");
        for (c, (text, style)) in row.iter().enumerate() {
            let pad = " ".repeat(widths[c] - text.chars().count());
            let styled = style(p, text);
            if right[c] {
                line.push_str(&pad);
                line.push_str(&styled);
            } else {
                line.push_str(&styled);
                if c + 1 < ncols {
                    line.push_str(&pad);
                }
            }
            if c + 1 < ncols {
                line.push_str("  ");
            }
        }
        let _ = writeln!(o, "{}", line.trim_end());
        for n in notes {
            let _ = writeln!(o, "{n}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(4_120), "4.1s");
        assert_eq!(human_ms(192_000), "3m12s");
        assert_eq!(human_ms(7_500_000), "2h05m");
        assert_eq!(human_ms(273_600_000), "3d04h");
    }

    #[test]
    fn plain_output_has_no_escape_codes_and_aligns() {
        let s = Status {
            time: "2026-11-23T10:00:00.000Z".into(),
            redis: RedisStatus {
                url: "redis://h".into(),
            },
            postgres: PostgresStatus {
                ok: false,
                error: Some("connection refused".into()),
            },
            tables: vec![TableStatus {
                table: "m".into(),
                dead_letters: 2,
                rows_last_minute: None,
                chunks: None,
                newest_archive: None,
                postgres_error: None,
                streams: vec![StreamStatus {
                    stream: "telemetry:{m}".into(),
                    exists: true,
                    length: 12345,
                    dlq: "telemetry:{m}:dlq".into(),
                    dead_letters: 2,
                    groups: vec![GroupStatus {
                        group: "ingest".into(),
                        exists: true,
                        lag: Some(3),
                        pending: 1,
                        last_delivered_id: None,
                        oldest_pending: None,
                        consumers: vec![],
                    }],
                }],
            }],
        };
        let text = render(&s, Paint { color: false });
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("unreachable: connection refused"), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        let header = lines.iter().position(|l| l.contains("STREAM")).unwrap();
        // Right-aligned LENGTH: the number ends where the header ends.
        let end = lines[header].find("LENGTH").unwrap() + "LENGTH".len();
        assert_eq!(&lines[header + 1][end - 5..end], "12345");
        let coloured = render(&s, Paint { color: true });
        assert!(coloured.contains("\x1b[31m2 dead letters\x1b[0m"));
    }
}
