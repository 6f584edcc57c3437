//! What `[redis] wait_replicas` costs, on a Redis Cluster of its own (`OwnCluster`: 3 masters
//! + 3 replicas on loopback, no persistence) and the PostgreSQL of `DATABASE_URL`.
//!
//! Each run, for `wait_replicas` 0 and 1 in turn (alternating, so drift hits both alike): a
//! fresh table and database, `strata migrate`, then two timed phases, each a `strata` child:
//! 1. `strata produce --count N` (pipelines of 1,000 XADDs; with `wait_replicas = 1` each
//!    pipeline ends with `WAIT 1 …`);
//! 2. `strata run` from spawn until both groups (ingest, batch-writer) have drained and the
//!    table holds N rows (with `wait_replicas = 1`: WAIT after every commit step, and the
//!    batch-writer waits for its entries' replicas before each COPY). The CPU `strata run`
//!    used is read from `/proc` before it is stopped.
//!
//! ```sh
//! cargo build --release -p strata -p strata-bench
//! target/release/wait_bench --events 200000 --runs 3
//! ```
//! Prints one line per run and the medians.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use strata_pipeline::streams;
use strata_stages::{ingest, writer};
use strata_testkit::OwnCluster;

#[path = "../machine.rs"]
#[allow(dead_code)]
mod machine;

/// Command line: `--events N`, `--runs R`, `--strata PATH`.
struct Args {
    /// Events per run.
    events: u64,
    /// Runs per setting.
    runs: usize,
    /// The `strata` binary.
    strata: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        events: 200_000,
        runs: 3,
        strata: std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("strata")))
            .unwrap_or_else(|| "strata".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--events" => a.events = v.parse().expect("--events N"),
            "--runs" => a.runs = v.parse().expect("--runs R"),
            "--strata" => a.strata = v.into(),
            other => panic!("unknown argument {other} (--events, --runs, --strata)"),
        }
    }
    a
}

/// One timed run.
#[derive(Clone, Copy)]
struct Run {
    /// `strata produce` events/s.
    produce: f64,
    /// `strata run` events/s, spawn to drained.
    pipeline: f64,
    /// CPU seconds of `strata run` per million events.
    cpu_per_million: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args = args();
    assert!(
        args.strata.exists(),
        "no strata binary at {} (cargo build --release -p strata, or --strata)",
        args.strata.display()
    );
    strata_pipeline::tls::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = OwnCluster::start();
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut results: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
    for run in 0..args.runs {
        for wait in [0u32, 1] {
            let r = rt.block_on(one_run(&cluster, &admin, &args, run, wait));
            println!(
                "run {run} wait_replicas = {wait}: produce {:>9.0} events/s, strata run {:>9.0} events/s, {:.2} CPU s per million events",
                r.produce, r.pipeline, r.cpu_per_million
            );
            results[wait as usize].push(r);
        }
    }
    for (wait, rs) in results.iter().enumerate() {
        println!(
            "median wait_replicas = {wait}: produce {:.0} events/s, strata run {:.0} events/s, {:.2} CPU s per million events ({} runs of {} events)",
            median(rs.iter().map(|r| r.produce).collect()),
            median(rs.iter().map(|r| r.pipeline).collect()),
            median(rs.iter().map(|r| r.cpu_per_million).collect()),
            rs.len(),
            args.events
        );
    }
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// `admin` with its database replaced by `db`.
fn with_db(admin: &str, db: &str) -> String {
    match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("DATABASE_URL {admin} is not a URL"),
    }
}

fn strata(args: &Args, dir: &Path) -> Command {
    let mut c = Command::new(&args.strata);
    c.arg("--config")
        .arg(dir.join("config.toml"))
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null());
    c
}

async fn one_run(cluster: &OwnCluster, admin: &str, args: &Args, run: usize, wait: u32) -> Run {
    let table = format!("wait_bench_{run}_{wait}");
    let db = format!("strata_{table}");
    let admin_pg = pg(admin).await;
    admin_pg
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    let schema = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/metrics.toml"),
    )
    .unwrap()
    .replace("table = \"metrics\"", &format!("table = \"{table}\""));
    std::fs::write(dir.path().join(format!("schemas/{table}.toml")), schema).unwrap();
    let seeds = cluster.urls();
    let nodes: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "schemas_dir = \"schemas\"\n[redis]\nurl = \"{}\"\ncluster = true\nnodes = [{}]\nwait_replicas = {wait}\n[postgres]\nurl = \"{}\"\n",
            seeds[0],
            nodes.join(", "),
            with_db(admin, &db)
        ),
    )
    .unwrap();
    let out = strata(args, dir.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "strata migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let n = args.events.to_string();
    let started = Instant::now();
    let out = strata(args, dir.path())
        .args(["produce", "--table", &table, "--count", &n])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let produce = args.events as f64 / started.elapsed().as_secs_f64();

    let client = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut redis = client.get_async_connection().await.unwrap();
    let data = pg(&with_db(admin, &db)).await;
    let input = streams::telemetry_stream(&table);
    let rows = streams::rows_stream(&table);
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let started = Instant::now();
    let mut child = strata(args, dir.path())
        .arg("run")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let (elapsed, cpu) = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "strata run exited: {}",
            std::fs::read_to_string(dir.path().join("run.log")).unwrap_or_default()
        );
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "strata run did not drain in 600 s"
        );
        let drained = streams::ConsumerGroup::new(&input, ingest::STAGE.group())
            .drained(&mut redis)
            .await
            .unwrap_or(false)
            && streams::ConsumerGroup::new(&rows, writer::STAGE.group())
                .drained(&mut redis)
                .await
                .unwrap_or(false);
        if drained {
            let elapsed = started.elapsed();
            let cpu = machine::process_cpu_secs(pid).unwrap_or(0.0);
            let count: i64 = data
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0);
            if count as u64 == args.events {
                break (elapsed, cpu);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    drop(data);
    let _: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(&input)
        .arg(&rows)
        .query_async(&mut redis)
        .await;
    admin_pg
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    Run {
        produce,
        pipeline: args.events as f64 / elapsed.as_secs_f64(),
        cpu_per_million: cpu / (args.events as f64 / 1e6),
    }
}
