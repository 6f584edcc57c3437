//! One snapshot of the pipeline: Redis for every stream, PostgreSQL (if it answers) for every
//! table. Nothing here formats output.

use std::time::Duration;

use crate::config::Config;
use strata_pipeline::error_chain;
use strata_pipeline::schema::{Schema, SchemaRef};
use strata_pipeline::streams::{self, partition, ConsumerGroup, StreamName};

use super::{
    ArchiveInfo, ChunkStatus, ConsumerStatus, GroupStatus, OldestPending, PostgresStatus,
    RedisStatus, Status, StreamStatus, StreamTotal, TableStatus,
};
use crate::catalog::ident;
use crate::ops::{redact_url, redis_info, OpsError};

/// Takes one snapshot: Redis for every stream, PostgreSQL (if it answers) for every table.
pub async fn collect(
    config: &Config,
    schemas: &[SchemaRef],
    conn: &mut crate::ops::redis_info::OpsConnection,
) -> Result<Status, OpsError> {
    let now_ms = redis_info::server_time_ms(conn).await?;
    let mut tables = Vec::with_capacity(schemas.len());
    let slots = match conn {
        redis_info::OpsConnection::Cluster(_) => Some(redis_info::slot_map(conn).await?),
        redis_info::OpsConnection::Single(_) => None,
    };
    let partition_streams = partition_streams(conn, slots.as_ref()).await;
    for schema in schemas {
        let recorded = partition::recorded(conn, &schema.table).await?;
        let count = recorded.map_or(schema.partitions, |r| r.count);
        let highest = recorded.map_or(count, |r| r.highest.max(count));
        let mut t = TableStatus {
            table: schema.table.clone(),
            dead_letters: 0,
            rows_last_minute: None,
            chunks: None,
            newest_archive: None,
            postgres_error: None,
            partitions: count,
            streams: Vec::new(),
            totals: Vec::new(),
        };
        // Each stage that reads a stream says which, and as which group.
        for stage in crate::registry::STAGES {
            if stage.input.is_none() {
                continue;
            }
            let first = t.streams.len();
            for p in 0..stage.partitions_read(highest) {
                let Some(input) = stage.input_key(&schema.table, p) else {
                    continue;
                };
                let mut s = stream_status(conn, &input, stage.group(), now_ms).await?;
                s.partition = p;
                s.removed = p >= count;
                // A removed partition is listed while it holds something: dead letters, or
                // entries its stage's group has not finished with.
                let unfinished = s.groups.iter().any(|g| {
                    g.group == stage.group()
                        && if g.exists {
                            g.pending > 0 || g.lag != Some(0)
                        } else {
                            s.length > 0
                        }
                });
                if s.removed && !unfinished && s.dead_letters == 0 {
                    continue;
                }
                list(conn, slots.as_ref(), &mut t, s).await?;
            }
            // Streams of partitions beyond any count the table had: a producer that computed
            // with a larger N wrote them, and no stage reads them.
            let mut strays: Vec<&StreamName> = partition_streams
                .iter()
                .filter(|n| {
                    Some(n.kind) == stage.input && n.table == schema.table && n.partition >= highest
                })
                .collect();
            strays.sort_by_key(|n| n.partition);
            for name in strays {
                let mut s = stream_status(conn, &name.source(), stage.group(), now_ms).await?;
                (s.partition, s.removed) = (name.partition, true);
                list(conn, slots.as_ref(), &mut t, s).await?;
            }
            if stage.partitioned() && count > 1 {
                t.totals
                    .push(total(&t.streams[first..], stage, &schema.table));
            }
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
            url: redact_url(config.redis.primary_url()),
        },
        postgres,
        tables,
    })
}

/// Adds `s` to the table's streams and dead letters, with the master serving it on a cluster.
async fn list(
    conn: &mut crate::ops::redis_info::OpsConnection,
    slots: Option<&redis_info::SlotMap>,
    t: &mut TableStatus,
    mut s: StreamStatus,
) -> Result<(), OpsError> {
    if let Some(slots) = slots {
        s.node = redis_info::node_of(conn, slots, &s.stream).await?;
    }
    t.dead_letters += s.dead_letters;
    t.streams.push(s);
    Ok(())
}

/// Every stream of a partition 1… (`<kind>:{T:p}`) on the server or on every master, of every
/// table: one walk of the keyspace per snapshot, which `status` matches against each table's
/// count. A server that refuses `SCAN` (an ACL rule from before `status` needed it) leaves
/// them out, with a warning.
async fn partition_streams(
    conn: &mut crate::ops::redis_info::OpsConnection,
    slots: Option<&redis_info::SlotMap>,
) -> Vec<StreamName> {
    // A tag with a partition that closes the key: not the `:dlq` and `:claimed` keys.
    let pattern = "*:{*:*}";
    match redis_info::scan_streams(conn, slots, pattern).await {
        Ok(keys) => keys.iter().filter_map(|k| StreamName::parse(k)).collect(),
        Err(e) => {
            tracing::warn!(pattern, error = %error_chain(&e), "could not look for streams of partitions beyond the count");
            Vec::new()
        }
    }
}

/// The sums of one stage's streams over the partitions of `table`.
fn total(streams: &[StreamStatus], stage: &crate::StageSpec, table: &str) -> StreamTotal {
    let mut t = StreamTotal {
        streams: stage
            .input
            .map(|k| k.all_partitions(table))
            .unwrap_or_default(),
        group: stage.group().to_string(),
        length: 0,
        dead_letters: 0,
        lag: Some(0),
        pending: 0,
    };
    for s in streams {
        t.length += s.length;
        t.dead_letters += s.dead_letters;
        let g = s.groups.iter().find(|g| g.group == t.group);
        t.pending += g.map_or(0, |g| g.pending);
        // An absent group has all of its stream still to read.
        let lag = match g {
            Some(g) if g.exists => g.lag,
            _ => Some(s.length),
        };
        t.lag = t.lag.zip(lag).map(|(a, b)| a + b);
    }
    t
}

/// Length, dead letters and groups of one stream; `stage_group` is listed even when absent.
pub async fn stream_status(
    conn: &mut crate::ops::redis_info::OpsConnection,
    stream: &str,
    stage_group: &str,
    now_ms: u64,
) -> Result<StreamStatus, OpsError> {
    let dlq = streams::dlq_stream(stream);
    let exists = redis_info::stream_exists(conn, stream).await?;
    let length = if exists {
        streams::len(conn, stream).await?
    } else {
        0
    };
    let dead_letters = if redis_info::stream_exists(conn, &dlq).await? {
        streams::len(conn, &dlq).await?
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
        let consumers = ConsumerGroup::new(stream, &g.name)
            .consumers(conn)
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
            last_delivered_id: Some(g.last_delivered_id.to_string()),
            oldest_pending,
            consumers,
        });
    }
    Ok(StreamStatus {
        stream: stream.to_string(),
        partition: 0,
        removed: false,
        node: None,
        exists,
        length,
        dlq,
        dead_letters,
        groups,
    })
}

/// XPENDING summary → smallest ID → that entry's idle time and deliveries.
async fn oldest_pending(
    conn: &mut crate::ops::redis_info::OpsConnection,
    stream: &str,
    group: &str,
    now_ms: u64,
) -> Result<Option<OldestPending>, OpsError> {
    let group = ConsumerGroup::new(stream, group);
    let summary = group.pending_summary(conn).await?;
    let Some(id) = summary.smallest else {
        return Ok(None);
    };
    let entry = group.pending_entry(conn, id).await?;
    Ok(Some(OldestPending {
        age_ms: now_ms.saturating_sub(id.ms),
        consumer: entry.as_ref().map(|e| e.consumer.clone()),
        idle_ms: entry.as_ref().map(|e| e.idle_ms),
        deliveries: entry.as_ref().map(|e| e.deliveries),
        id: id.to_string(),
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
        ConnectError::Postgres {
            cause: None,
            source: pe,
            server,
        } => format!("{server}: {}", pg_error(pe)),
        ConnectError::Setup(pe) => pg_error(pe),
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
