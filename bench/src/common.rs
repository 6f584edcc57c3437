//! Helpers every benchmark binary uses: a [`Failure`] with context instead of panics, number
//! formatting, the benchmark's own database (dropped and recreated, refused unless its name says
//! `bench`), and what a benchmark reads from a Redis server (`INFO`).

use std::fmt::Display;
use std::path::{Path, PathBuf};

use redis::aio::ConnectionLike;
use strata_pipeline::db::PostgresTarget;
use strata_pipeline::schema::Schema;
use strata_stages::catalog::ident;

/// A failure, with what was being done when it happened.
#[derive(Debug)]
pub struct Failure(pub String);

impl Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

pub type Result<T, E = Failure> = std::result::Result<T, E>;

pub fn fail<T>(message: impl Into<String>) -> Result<T> {
    Err(Failure(message.into()))
}

/// Adds what was being done to an error, with the error's whole source chain.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            let mut msg = format!("{}: {e}", what());
            let mut source = e.source();
            while let Some(s) = source {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                source = s.source();
            }
            msg
        })
        .map_err(Failure)
    }
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let first = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let (head, rest) = digits.split_at(first);
    let mut out = head.to_string();
    for group in rest.as_bytes().chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|&b| b as char));
    }
    out
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The schema file of `table` in `dir`: its text and the parsed schema.
pub fn find_schema(dir: &Path, table: &str) -> Result<(String, Schema)> {
    let entries = std::fs::read_dir(dir).context(|| format!("reading {}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let text =
            std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
        let schema = Schema::from_toml(&path.display().to_string(), &text)
            .context(|| "invalid schema".into())?;
        if schema.table == table {
            return Ok((text, schema));
        }
    }
    fail(format!(
        "no schema for table `{table}` in {}",
        dir.display()
    ))
}

/// Connects to PostgreSQL as strata does (TLS included); the connection is driven by its own
/// task.
pub async fn connect(pg: &PostgresTarget) -> Result<tokio_postgres::Client> {
    let (client, _task) = strata_pipeline::db::open_postgres(pg).await.context(|| {
        format!(
            "connecting to PostgreSQL database `{}` at {}",
            pg.get_dbname().unwrap_or("?"),
            pg.server()
        )
    })?;
    Ok(client)
}

/// The benchmark's database name, refused unless it says `bench` (the benchmark drops it).
fn bench_database(pg: &PostgresTarget) -> Result<&str> {
    let Some(db) = pg.get_dbname() else {
        return fail("--database-url / DATABASE_URL names no database");
    };
    if !db.contains("bench") {
        return fail(format!(
            "refusing to drop database `{db}`: the benchmark drops and recreates its database, so \
             its name must contain `bench` (e.g. postgres://postgres@127.0.0.1:5432/strata_bench); \
             pass --database-url or unset DATABASE_URL"
        ));
    }
    Ok(db)
}

/// `DROP DATABASE IF EXISTS db WITH (FORCE)` over a connection to another database.
async fn drop_if_exists(client: &tokio_postgres::Client, db: &str) -> Result<()> {
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            ident(db)
        ))
        .await
        .context(|| format!("dropping database `{db}`"))
}

/// Drops and recreates the benchmark's database, which must be named as one.
pub async fn reset_database(pg: &PostgresTarget) -> Result<()> {
    let db = bench_database(pg)?;
    let client = connect(&admin_target(pg)).await?;
    drop_if_exists(&client, db).await?;
    client
        .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
        .await
        .context(|| format!("creating database `{db}`"))?;
    Ok(())
}

/// Drops the benchmark's database (at the end of a benchmark that made it).
pub async fn drop_database(pg: &PostgresTarget) -> Result<()> {
    if pg.get_dbname().is_none() {
        return Ok(());
    }
    let db = bench_database(pg)?;
    let client = connect(&admin_target(pg)).await?;
    drop_if_exists(&client, db).await
}

/// The same server's `postgres` database, to create and drop the benchmark's.
fn admin_target(pg: &PostgresTarget) -> PostgresTarget {
    let mut admin = pg.clone();
    admin.dbname("postgres");
    admin
}

/// So that neither timed phase pays for the other's dirty buffers. Needs superuser rights or
/// pg_checkpoint; without them the run goes on with a note.
pub async fn checkpoint(db: &tokio_postgres::Client) {
    if let Err(e) = db.batch_execute("CHECKPOINT").await {
        eprintln!("note: CHECKPOINT failed ({e}); timings may include checkpoint I/O");
    }
}

/// One section of a Redis server's `INFO`.
async fn redis_info<C: ConnectionLike>(redis: &mut C, section: &str) -> Result<String> {
    redis::cmd("INFO")
        .arg(section)
        .query_async(redis)
        .await
        .context(|| format!("Redis INFO {section}"))
}

/// `redis_version` of `INFO server`.
pub async fn redis_version<C: ConnectionLike>(redis: &mut C) -> Result<String> {
    Ok(redis_info(redis, "server")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

/// CPU seconds (user + system) the Redis server has used, from INFO cpu.
pub async fn redis_cpu_secs<C: ConnectionLike>(redis: &mut C) -> Result<f64> {
    Ok(parse_cpu(&redis_info(redis, "cpu").await?))
}

/// Per command, the calls and microseconds a Redis server counted since its last
/// `CONFIG RESETSTAT` (`INFO commandstats`), by command name.
pub async fn redis_command_stats<C: ConnectionLike>(
    redis: &mut C,
) -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    Ok(parse_command_stats(
        &redis_info(redis, "commandstats").await?,
    ))
}

/// `cmdstat_<name>:calls=<n>,usec=<n>,…` lines of an `INFO commandstats` reply.
fn parse_command_stats(info: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut out = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_string(), (field("calls"), field("usec")));
    }
    out
}

/// used_cpu_sys + used_cpu_user of an `INFO cpu` reply (the whole server process).
fn parse_cpu(info: &str) -> f64 {
    info.lines()
        .filter_map(|l| {
            l.strip_prefix("used_cpu_user:")
                .or_else(|| l.strip_prefix("used_cpu_sys:"))
        })
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_stats_are_read_per_command() {
        let info = "# Commandstats\r\ncmdstat_xreadgroup:calls=12,usec=340,usec_per_call=28.33,rejected_calls=0,failed_calls=0\r\ncmdstat_config|resetstat:calls=1,usec=5,usec_per_call=5.00\r\n";
        let stats = parse_command_stats(info);
        assert_eq!(stats["xreadgroup"], (12, 340));
        assert_eq!(stats["config|resetstat"], (1, 5));
        assert_eq!(stats.len(), 2);
    }

    use super::*;

    #[test]
    fn formats_thousands_and_tails() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(round2(1.236), 1.24);
    }

    #[test]
    fn reads_info_cpu() {
        let info = "# CPU\r\nused_cpu_sys:1.250000\r\nused_cpu_user:2.500000\r\n\
                    used_cpu_sys_children:9.000000\r\nused_cpu_user_main_thread:2.0\r\n";
        assert_eq!(parse_cpu(info), 3.75);
    }
}
