//! `strata migrate`: creates the database, strata's bookkeeping tables and every table of
//! `schemas/`, idempotently. A new nullable column is added in place.
//!
//! `strata migrate --grant ROLE` then gives the runtime role `ROLE` what the stages need and no
//! more ([`grant`]). Migrate runs as an owner role (it creates tables and indexes); the stages
//! run as `ROLE`. PostgreSQL lets only a table's owner create a partition of it, detach one or
//! drop one (and TimescaleDB's `drop_chunks` likewise), so the data tables are handed to a
//! NOLOGIN group role `<ROLE>_tables` of which both the owner role and `ROLE` are members; a
//! partition the writer creates is handed to that group too ([`crate::catalog::create_partition`]),
//! so a later migration can still alter the table. `ROLE` gets on strata's bookkeeping tables
//! only the rows it reads and writes (no DDL), and CREATE on the data tables' schema for
//! partitions.

use strata_pipeline::config::TimescaleMode;
use strata_pipeline::db::{self, ConnectError, ConnectLimits};
use strata_pipeline::schema::Schema;
use tracing::{info, warn};

use crate::catalog::{ident, Partitioning, APPLIED_FRAMES, BOOKKEEPING_DDL, CHUNKS, TABLES};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{context}")]
    Sql {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("table `{table}`: {message}")]
    Incompatible { table: String, message: String },
    #[error("[postgres] timescaledb = \"require\", but the timescaledb extension is not available on this server")]
    TimescaleMissing,
    #[error("[postgres] timescaledb = \"require\", but the timescaledb extension is installed and not loaded: add it to shared_preload_libraries and restart PostgreSQL")]
    TimescaleNotPreloaded,
}

fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> MigrateError {
    let context = context.into();
    move |source| MigrateError::Sql { context, source }
}

/// What `migrate` did to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: String,
    pub partitioning: Partitioning,
    pub created: bool,
    pub added_columns: Vec<String>,
}

/// Connects to the configured database, creating it first if it does not exist.
pub async fn connect_creating(url: &str) -> Result<tokio_postgres::Client, MigrateError> {
    let config = db::postgres_config(url)?;
    match connect(&config).await {
        Err(MigrateError::Connect(e))
            if e.postgres()
                .and_then(|e| e.as_db_error())
                .is_some_and(|d| d.code().code() == "3D000") =>
        {
            let db = config.get_dbname().unwrap_or("postgres").to_string();
            let mut admin = config.clone();
            admin.dbname("postgres");
            let client = connect(&admin).await?;
            match client
                .batch_execute(&format!("CREATE DATABASE {}", ident(&db)))
                .await
            {
                Ok(()) => info!(database = %db, "created database"),
                // Another migrate created it meanwhile.
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42P04") => {}
                Err(e) => return Err(sql(format!("creating database {db}"))(e)),
            }
            connect(&config).await
        }
        other => other,
    }
}

/// A migration waits for the server as long as it takes (no time limits).
async fn connect(config: &db::PostgresTarget) -> Result<tokio_postgres::Client, MigrateError> {
    Ok(db::connect_postgres(config, ConnectLimits::default()).await?)
}

/// Applies every schema. Runs under an advisory lock, so concurrent migrations queue.
pub async fn migrate(
    config: &Config,
    schemas: &[impl AsRef<Schema>],
) -> Result<Vec<TableReport>, MigrateError> {
    let client = connect_creating(&config.postgres.url).await?;
    client
        .batch_execute("SELECT pg_advisory_lock(hashtext('strata.migrate'))")
        .await
        .map_err(sql("taking the migration lock"))?;
    let result = migrate_locked(&client, config.postgres.timescaledb, schemas).await;
    let _ = client
        .batch_execute("SELECT pg_advisory_unlock(hashtext('strata.migrate'))")
        .await;
    result
}

/// Grants the runtime role `role` what the stages need (see the module documentation); returns
/// the group role owning the data tables. Idempotent; the connecting role needs CREATEROLE (or
/// to be a superuser) the first time.
pub async fn grant(
    config: &Config,
    schemas: &[impl AsRef<Schema>],
    role: &str,
) -> Result<String, MigrateError> {
    let client = connect_creating(&config.postgres.url).await?;
    let group = format!("{role}_tables");
    let (r, g) = (ident(role), ident(&group));
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&group])
        .await
        .map_err(sql(format!("looking for role {group}")))?
        .is_some();
    if !exists {
        match client
            .batch_execute(&format!("CREATE ROLE {g} NOLOGIN"))
            .await
        {
            // Another migrate created it meanwhile.
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42710") => {}
            other => other.map_err(sql(format!("creating role {group}")))?,
        }
    }
    let schema: String = client
        .query_one("SELECT current_schema()", &[])
        .await
        .map_err(sql("reading the current schema"))?
        .get(0);
    client
        .batch_execute(&format!(
            "GRANT {g} TO CURRENT_USER;
             GRANT {g} TO {r};
             GRANT USAGE, CREATE ON SCHEMA {} TO {g};
             GRANT USAGE ON SCHEMA strata TO {r};
             GRANT SELECT ON {TABLES} TO {r};
             GRANT SELECT, INSERT, UPDATE, DELETE ON {APPLIED_FRAMES}, {CHUNKS} TO {r};
             GRANT USAGE, SELECT ON SEQUENCE strata.chunks_id_seq TO {r};",
            ident(&schema)
        ))
        .await
        .map_err(sql(format!("granting {role} the runtime privileges")))?;
    for schema in schemas {
        let table = &schema.as_ref().table;
        let partitions: Vec<String> = client
            .query(
                "SELECT c.oid::regclass::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1)",
                &[&ident(table)],
            )
            .await
            .map_err(sql(format!("listing the partitions of {table}")))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut ddl = format!("ALTER TABLE {} OWNER TO {g};", ident(table));
        for p in partitions {
            ddl.push_str(&format!("ALTER TABLE {p} OWNER TO {g};"));
        }
        client
            .batch_execute(&ddl)
            .await
            .map_err(sql(format!("handing {table} to {group}")))?;
    }
    info!(role = %role, group = %group, "granted the runtime privileges");
    Ok(group)
}

async fn migrate_locked(
    client: &tokio_postgres::Client,
    mode: TimescaleMode,
    schemas: &[impl AsRef<Schema>],
) -> Result<Vec<TableReport>, MigrateError> {
    let timescale = timescale_available(client, mode).await?;
    client
        .batch_execute(BOOKKEEPING_DDL)
        .await
        .map_err(sql("creating strata's bookkeeping tables"))?;
    let mut reports = Vec::new();
    for schema in schemas {
        reports.push(migrate_table(client, schema.as_ref(), timescale).await?);
    }
    Ok(reports)
}

async fn timescale_available(
    client: &tokio_postgres::Client,
    mode: TimescaleMode,
) -> Result<bool, MigrateError> {
    if mode == TimescaleMode::Off {
        return Ok(false);
    }
    let available = client
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .map_err(sql("looking for timescaledb"))?
        .is_some();
    if !available {
        if mode == TimescaleMode::Require {
            return Err(MigrateError::TimescaleMissing);
        }
        info!("timescaledb is not available: tables use native range partitions");
        return Ok(false);
    }
    // Without the preload, CREATE EXTENSION fails with a FATAL error that closes the session,
    // so look first. Not through `shared_preload_libraries`, which only superusers (and
    // pg_read_all_settings) may read, and managed services' owner roles are neither: the
    // preloaded loader defines `timescaledb.disable_load` in every session, readable by all.
    let created_or_loadable = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
                 OR current_setting('timescaledb.disable_load', true) IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql("looking for the preloaded timescaledb loader"))?
        .get::<_, bool>(0);
    if !created_or_loadable {
        if mode == TimescaleMode::Require {
            return Err(MigrateError::TimescaleNotPreloaded);
        }
        warn!("timescaledb is installed but not in shared_preload_libraries: tables use native range partitions");
        return Ok(false);
    }
    match client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if mode == TimescaleMode::Auto => {
            warn!(error = %e, "timescaledb is installed but cannot be loaded (shared_preload_libraries?): using native partitions");
            Ok(false)
        }
        Err(e) => Err(sql("CREATE EXTENSION timescaledb")(e)),
    }
}

async fn migrate_table(
    client: &tokio_postgres::Client,
    schema: &Schema,
    timescale: bool,
) -> Result<TableReport, MigrateError> {
    let table = &schema.table;
    let incompatible = |message: String| MigrateError::Incompatible {
        table: table.clone(),
        message,
    };
    let existing: Vec<(String, String)> = client
        .query(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
            &[table],
        )
        .await
        .map_err(sql(format!("reading columns of {table}")))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut report = TableReport {
        table: table.clone(),
        partitioning: Partitioning::Native,
        created: false,
        added_columns: Vec::new(),
    };
    if existing.is_empty() {
        let defs: Vec<String> = schema
            .columns
            .iter()
            .map(|c| {
                format!(
                    "{} {}{}",
                    ident(&c.name),
                    c.ty.sql(),
                    if c.required { " NOT NULL" } else { "" }
                )
            })
            .collect();
        let time = ident(&schema.columns[schema.time_index].name);
        if timescale {
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {} ({})",
                    ident(table),
                    defs.join(", ")
                ))
                .await
                .map_err(sql(format!("creating {table}")))?;
            client
                .execute(
                    &"SELECT create_hypertable($1::text::regclass, $2::name, chunk_time_interval => ($3::bigint * interval '1 microsecond'), if_not_exists => true)".to_string(),
                    &[&ident(table), &schema.columns[schema.time_index].name, &schema.chunk_interval_us],
                )
                .await
                .map_err(sql(format!("making {table} a hypertable")))?;
            report.partitioning = Partitioning::Hypertable;
        } else {
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {} ({}) PARTITION BY RANGE ({time})",
                    ident(table),
                    defs.join(", ")
                ))
                .await
                .map_err(sql(format!("creating {table}")))?;
        }
        report.created = true;
        info!(table = %table, partitioning = report.partitioning.as_str(), "created table");
    } else {
        report.partitioning = existing_partitioning(client, table).await?;
        for c in &schema.columns {
            match existing.iter().find(|(n, _)| *n == c.name) {
                Some((_, ty)) if ty != c.ty.information_schema_name() => {
                    return Err(incompatible(format!(
                        "column `{}` is {ty} in the database but {} in the schema; strata migrates only additive changes",
                        c.name,
                        c.ty.sql()
                    )))
                }
                Some(_) => {}
                None if c.required => {
                    return Err(incompatible(format!(
                        "new column `{}` is required; add it as nullable (required = false) to migrate without downtime",
                        c.name
                    )))
                }
                None => {
                    client
                        .batch_execute(&format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}", ident(table), ident(&c.name), c.ty.sql()))
                        .await
                        .map_err(sql(format!("adding column {} to {table}", c.name)))?;
                    info!(table = %table, column = %c.name, "added column");
                    report.added_columns.push(c.name.clone());
                }
            }
        }
    }
    for index in &schema.indexes {
        let name = format!("{table}_{}_idx", index.columns.join("_"));
        let cols: Vec<String> = index.columns.iter().map(|c| ident(c)).collect();
        client
            .batch_execute(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {} ({})",
                ident(&name),
                ident(table),
                cols.join(", ")
            ))
            .await
            .map_err(sql(format!("creating index {name}")))?;
    }
    if report.partitioning == Partitioning::Hypertable {
        if let Some(after_us) = schema.policy.compress_after_us {
            apply_compression_policy(client, schema, after_us).await?;
        }
    }
    client
        .execute(
            &format!(
                "INSERT INTO {TABLES} (name, partitioning, time_column, chunk_interval_us) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET partitioning = EXCLUDED.partitioning, time_column = EXCLUDED.time_column,
                 chunk_interval_us = EXCLUDED.chunk_interval_us, migrated_at = now()"
            ),
            &[table, &report.partitioning.as_str(), &schema.columns[schema.time_index].name, &schema.chunk_interval_us],
        )
        .await
        .map_err(sql(format!("recording {table} in {TABLES}")))?;
    Ok(report)
}

async fn existing_partitioning(
    client: &tokio_postgres::Client,
    table: &str,
) -> Result<Partitioning, MigrateError> {
    let native = client
        .query_opt(
            "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid WHERE c.oid = to_regclass($1)",
            &[&ident(table)],
        )
        .await
        .map_err(sql(format!("inspecting {table}")))?
        .is_some();
    if native {
        return Ok(Partitioning::Native);
    }
    let hyper = client
        .query_opt(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb' AND EXISTS (SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_name = $1)",
            &[&table],
        )
        .await;
    match hyper {
        Ok(Some(_)) => Ok(Partitioning::Hypertable),
        _ => Err(MigrateError::Incompatible {
            table: table.to_string(),
            message: "exists but is neither partitioned nor a hypertable; rename it or choose another table name".into(),
        }),
    }
}

/// TimescaleDB only: enables compression on the hypertable (segmented by its first index's
/// leading non-time column, ordered by time) and adds the policy compressing chunks older than
/// `compress_after`. Idempotent. The archiver reads compressed chunks through the hypertable.
async fn apply_compression_policy(
    client: &tokio_postgres::Client,
    schema: &Schema,
    after_us: i64,
) -> Result<(), MigrateError> {
    let table = &schema.table;
    let time = &schema.columns[schema.time_index].name;
    let segment_by = schema
        .indexes
        .iter()
        .filter_map(|i| i.columns.first())
        .find(|c| *c != time)
        .map(|c| format!(", timescaledb.compress_segmentby = '{c}'"))
        .unwrap_or_default();
    client
        .batch_execute(&format!(
            "ALTER TABLE {} SET (timescaledb.compress, timescaledb.compress_orderby = '{time} DESC'{segment_by})",
            ident(table)
        ))
        .await
        .map_err(sql(format!("enabling compression on {table}")))?;
    client
        .execute(
            "SELECT add_compression_policy($1::text::regclass, compress_after => ($2::bigint * interval '1 microsecond'), if_not_exists => true)",
            &[&ident(table), &after_us],
        )
        .await
        .map_err(sql(format!("adding the compression policy of {table}")))?;
    info!(table = %table, "compression policy applied");
    Ok(())
}
