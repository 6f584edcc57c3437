//! The archive benchmark: one 1M-row chunk of `metrics` archived to local disk by the real
//! archiver stage, against the ceiling of `COPY (SELECT * FROM chunk) TO STDOUT (FORMAT binary)`
//! of the same chunk in the same run; the archiver's peak RSS; the file's size against DuckDB's
//! zstd Parquet of the same rows (when the `duckdb` Python package is installed).
//!
//! ```sh
//! cargo run --release -p strata-bench --bin archive_bench -- [--rows 1000000] [--runs 3]
//! ```
//!
//! Needs PostgreSQL (`DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; the
//! role needs CREATEDB). It makes its own database and lake folder and removes both afterwards.
//! Each archive runs in a child process of its own, so its peak RSS (VmHWM) is the archiver's
//! alone.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use strata_pipeline::runner::{Batch, Stage};

use strata_pipeline::schema::Schema;
use strata_pipeline::streams::Entry;
use strata_stages::catalog;
use strata_stages::lifecycle::archiver::Archiver;
use strata_stages::lifecycle::lake::Lake;
use strata_stages::lifecycle::registry;
use strata_stages::Config;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Options, from `--name value` pairs.
struct Args {
    /// Rows in the chunk.
    rows: i64,
    /// Archive runs (the median is reported).
    runs: usize,
    /// Internal: run one archive in this process and report (`--child <db url> <chunk id> <lake>`).
    child: Option<(String, i64, PathBuf)>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rows: 1_000_000,
        runs: 3,
        child: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--rows" => args.rows = value()?.parse().map_err(|_| "--rows: a number")?,
            "--runs" => args.runs = value()?.parse().map_err(|_| "--runs: a number")?,
            "--child" => {
                let url = value()?;
                let id = value()?.parse().map_err(|_| "--child: chunk id")?;
                let lake = PathBuf::from(value()?);
                args.child = Some((url, id, lake));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn metrics_schema() -> Result<Schema, BoxError> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/metrics.toml");
    let text = std::fs::read_to_string(&path)?;
    Ok(Schema::from_toml(&path.display().to_string(), &text)?)
}

fn config(db_url: &str, lake: &Path) -> Config {
    let mut c = Config::default();
    c.postgres.url = db_url.to_string();
    c.lake.path = lake.to_path_buf();
    c
}

/// Connects as strata does (TLS keys in the URL or PGSSL* included).
async fn connect(url: &str) -> Result<tokio_postgres::Client, BoxError> {
    let target = strata_pipeline::db::postgres_config(url)?;
    let (client, _task) = strata_pipeline::db::open_postgres(&target).await?;
    Ok(client)
}

/// `url` naming database `db` (its `?…` parameters, e.g. `sslmode`, kept).
fn with_db(url: &str, db: &str) -> Result<String, BoxError> {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (url, String::new()),
    };
    let (base, _) = url.rsplit_once('/').ok_or("DATABASE_URL has no database")?;
    Ok(format!("{base}/{db}{query}"))
}

/// VmHWM (peak resident set) of this process, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The child: one archive of chunk `id` by the archiver stage; prints `rows bytes seconds kib`.
async fn child(url: &str, id: i64, lake: &Path) -> Result<(), BoxError> {
    let config = config(url, lake);
    let schema = Arc::new(metrics_schema()?);
    let stage = Archiver {
        schema,
        pool: strata_pipeline::db::postgres_pool(&config, 3)?,
        lake: Arc::new(Lake::open(&config.lake)?),
        config: config.archiver.clone(),
        max_rearchives: config.confirmer.max_rearchives,
        partitioning: Default::default(),
    };
    let row = {
        let client = stage.pool.get().await?;
        registry::load(&client, id)
            .await?
            .ok_or("no strata.chunks row")?
    };
    let batch = Batch {
        entries: vec![Entry::new("1-0", row.event().to_fields())],
    };
    let started = Instant::now();
    let outcome = stage.process(&batch).await?;
    let seconds = started.elapsed().as_secs_f64();
    let fields = outcome
        .forward
        .first()
        .ok_or("the archiver forwarded nothing")?;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    println!(
        "{} {} {seconds} {} {}",
        get("rows"),
        get("bytes"),
        peak_rss_kib(),
        get("lakehouse_path")
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

const DUCKDB_SCRIPT: &str = r#"
import os, sys, duckdb
src, dst = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute(f"COPY (SELECT * FROM read_parquet('{src}')) TO '{dst}' (FORMAT parquet, COMPRESSION zstd)")
print(os.path.getsize(dst), duckdb.__version__)
"#;

/// Size of DuckDB's zstd Parquet of the rows in `ours`, and DuckDB's version.
fn duckdb_size(ours: &Path, dir: &Path) -> Option<(u64, String)> {
    let dst = dir.join("duckdb.parquet");
    let out = Command::new("python3")
        .arg("-c")
        .arg(DUCKDB_SCRIPT)
        .arg(ours)
        .arg(&dst)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "DuckDB comparison skipped: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("python3 failed")
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    Some((parts.next()?.parse().ok()?, parts.next()?.to_string()))
}

async fn bench(args: &Args) -> Result<(), BoxError> {
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = format!("{:x}{nanos:x}", std::process::id());
    let db = format!("strata_bench_archive_{tag}");
    let lake = std::env::temp_dir().join(format!("strata-archive-bench-{tag}"));
    let admin = connect(&admin_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = with_db(&admin_url, &db)?;
    let result = run(args, &url, &lake).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
    let _ = std::fs::remove_dir_all(&lake);
    result
}

async fn run(args: &Args, url: &str, lake: &Path) -> Result<(), BoxError> {
    let mut config = config(url, lake);
    config.postgres.timescaledb = strata_pipeline::config::TimescaleMode::Off;
    let schema = metrics_schema()?;
    strata_stages::migrate::migrate(&config, &[Arc::new(schema.clone())]).await?;
    let mut client = connect(url).await?;
    // A closed chunk: 2026-01-01, rows as `strata produce` makes them (100 sources, 100 metrics,
    // a random value with 3 decimals, {"region", "seq"} tags), 80 ms apart.
    let start_us = 1_767_225_600_000_000i64;
    catalog::create_partition(&mut client, &schema, start_us).await?;
    let chunk = catalog::partition_name(&schema.table, start_us);
    eprintln!("filling {chunk} with {} rows…", args.rows);
    client
        .execute(
            "INSERT INTO metrics (time, source, metric, value, tags)
             SELECT to_timestamp($1::bigint / 1e6 + i * 0.08), 'source-' || (i % 100), 'metric-' || (i % 100),
                    round((random() * 1000)::numeric, 3)::float8,
                    jsonb_build_object('region', 'eu-' || (i % 3), 'seq', i)
             FROM generate_series(0, $2::bigint - 1) AS i",
            &[&start_us, &args.rows],
        )
        .await?;
    client
        .batch_execute(&format!("VACUUM (FREEZE, ANALYZE) {chunk}"))
        .await?;
    let id: i64 = client
        .query_one(
            "INSERT INTO strata.chunks (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, event_id)
             SELECT 'metrics', 'public', $1::text, $1::text::regclass::oid, to_timestamp($2::bigint / 1e6), to_timestamp($2::bigint / 1e6 + 86400), gen_random_uuid()::text
             RETURNING id",
            &[&chunk, &start_us],
        )
        .await?
        .get(0);

    // The ceiling: the same chunk out of PostgreSQL, bytes drained and dropped.
    let mut ceiling = Vec::new();
    let mut copy_bytes = 0usize;
    for _ in 0..args.runs + 1 {
        let started = Instant::now();
        let stream = client
            .copy_out(&format!(
                "COPY (SELECT * FROM {chunk}) TO STDOUT (FORMAT binary)"
            ))
            .await?;
        futures_util::pin_mut!(stream);
        copy_bytes = 0;
        while let Some(piece) = stream.next().await {
            copy_bytes += piece?.len();
        }
        ceiling.push(started.elapsed().as_secs_f64());
    }
    ceiling.remove(0); // warm-up
    let ceiling_s = median(&mut ceiling);

    // The archiver, each run in a child process.
    let exe = std::env::current_exe()?;
    let mut times = Vec::new();
    let mut peak_kib = 0u64;
    let (mut rows, mut bytes, mut path) = (0u64, 0u64, String::new());
    for run in 0..args.runs {
        client
            .execute(
                "UPDATE strata.chunks SET state = 'pending', lake_path = NULL, rows = NULL, bytes = NULL, sha256 = NULL WHERE id = $1",
                &[&id],
            )
            .await?;
        if !path.is_empty() && run > 0 {
            let _ = std::fs::remove_file(path.trim_start_matches("file://"));
        }
        let out = Command::new(&exe)
            .arg("--child")
            .arg(url)
            .arg(id.to_string())
            .arg(lake)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "archive run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() < 5 {
            return Err(format!("unexpected child output: {text}").into());
        }
        rows = f[0].parse()?;
        bytes = f[1].parse()?;
        times.push(f[2].parse::<f64>()?);
        peak_kib = peak_kib.max(f[3].parse()?);
        path = f[4].to_string();
    }
    let archive_s = median(&mut times);
    let file = PathBuf::from(path.trim_start_matches("file://"));
    let duck = duckdb_size(&file, lake);

    let ceiling_rps = rows as f64 / ceiling_s;
    let archive_rps = rows as f64 / archive_s;
    let ratio = archive_rps / ceiling_rps;
    let rss_mib = peak_kib as f64 / 1024.0;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pg_version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    println!("\n## Archive benchmark ({rows} rows of `metrics`, one chunk, local disk)\n");
    println!("| measure | value | target |");
    println!("| --- | --- | --- |");
    println!(
        "| COPY (SELECT * FROM chunk) TO STDOUT (FORMAT binary), the ceiling | {ceiling_s:.3} s, {:.0} rows/s ({:.1} MiB) | |",
        ceiling_rps,
        copy_bytes as f64 / 1048576.0
    );
    println!(
        "| archiver: COPY → Arrow → Parquet (zstd) → object_store, the stage's own path | {archive_s:.3} s, {archive_rps:.0} rows/s | |"
    );
    println!(
        "| ratio archive / ceiling | {ratio:.2} | ≥ 0.5 {} |",
        if ratio >= 0.5 { "✓" } else { "✗" }
    );
    println!(
        "| archiver peak RSS (VmHWM of its process) | {rss_mib:.0} MiB | ≤ 256 MiB {} |",
        if rss_mib <= 256.0 { "✓" } else { "✗" }
    );
    match &duck {
        Some((size, version)) => {
            let r = bytes as f64 / *size as f64;
            println!(
                "| file size: strata / DuckDB {version} zstd | {:.2} MiB / {:.2} MiB = {r:.2} | ≤ 1.1 {} |",
                bytes as f64 / 1048576.0,
                *size as f64 / 1048576.0,
                if r <= 1.1 { "✓" } else { "✗" }
            );
        }
        None => println!(
            "| file size: strata / DuckDB | {:.2} MiB / n/a (pip install duckdb) | ≤ 1.1 |",
            bytes as f64 / 1048576.0
        ),
    }
    println!(
        "\nMedian of {} runs after a warm-up COPY; PostgreSQL {pg_version}; {cpus} CPUs.",
        args.runs
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("archive_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = match &args.child {
        Some((url, id, lake)) => runtime.block_on(child(url, *id, lake)),
        None => runtime.block_on(bench(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("archive_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
