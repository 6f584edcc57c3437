//! `outage_rss`: the memory of `strata batch-writer` (and `strata ingest`) while PostgreSQL is
//! down for 60 s under a steady load of 20,000 events/s.
//!
//! The benchmark starts a PostgreSQL cluster of its own (`strata_testkit::OwnPostgres`: initdb + pg_ctl from Debian's
//! PostgreSQL packages, on a free loopback port, run as `postgres` when we are root) so it can
//! stop it, and uses the Redis at `--redis-url` with a table of its own (`metrics_outage_<pid>`,
//! whose streams it deletes at the end). Timeline: 20 s of load, PostgreSQL stopped
//! (`pg_ctl stop -m immediate`, like a crash) for `--outage-s`, started again, then the load
//! ends and the pipeline drains. RSS (VmRSS) of both stage processes is sampled every second;
//! the result is the RSS before the outage, the peak during it, and after recovery, plus an
//! exact count of the rows that landed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};
use strata_testkit::OwnPostgres;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Events per second produced throughout.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds PostgreSQL stays down.
    #[arg(long, default_value_t = 60)]
    outage_s: u64,
    /// Redis to use (the benchmark only touches its own table's streams).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The strata binary (default: next to this one).
    #[arg(long)]
    strata: Option<PathBuf>,
}

fn rss_mib(pid: u32) -> f64 {
    strata_testkit::rss_kb(pid).map_or(0.0, |kb| kb as f64 / 1024.0)
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let strata = args
        .strata
        .clone()
        .unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("strata"));
    let work = std::env::temp_dir().join(format!("strata-outage-{}", std::process::id()));
    let cluster = OwnPostgres::start();
    let table = format!("metrics_outage_{}", std::process::id());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let schema = std::fs::read_to_string(repo.join("schemas/metrics.toml"))
        .unwrap()
        .replace("table = \"metrics\"", &format!("table = \"{table}\""));
    std::fs::create_dir_all(work.join("schemas")).unwrap();
    std::fs::write(work.join("schemas").join(format!("{table}.toml")), schema).unwrap();
    std::fs::write(
        work.join("config.toml"),
        format!(
            "[redis]\nurl = \"{}\"\n[postgres]\nurl = \"{}\"\n[admin]\nenabled = false\n",
            args.redis_url,
            cluster.url("strata")
        ),
    )
    .unwrap();
    let strata_cmd = |sub: &[&str], log: &str| {
        Command::new(&strata)
            .arg("--config")
            .arg(work.join("config.toml"))
            .args(sub)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join(log)).unwrap())
            .spawn()
            .expect("strata binary (cargo build --release)")
    };
    assert!(
        strata_cmd(&["migrate"], "migrate.log")
            .wait()
            .unwrap()
            .success(),
        "migrate failed"
    );
    let mut writer = strata_cmd(&["batch-writer"], "writer.log");
    let mut ingest = strata_cmd(&["ingest"], "ingest.log");
    let total_s = 20 + args.outage_s + 20;
    let count = args.rate * total_s;
    let rate = args.rate.to_string();
    let count_s = count.to_string();
    let mut producer = strata_cmd(
        &[
            "produce", "--table", &table, "--count", &count_s, "--rate", &rate,
        ],
        "produce.log",
    );

    let start = Instant::now();
    let mut samples: Vec<(f64, &str, f64, f64)> = Vec::new();
    let mut phase = "load";
    let mut down = false;
    while start.elapsed() < Duration::from_secs(total_s) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = start.elapsed().as_secs_f64();
        if !down && t >= 20.0 && t < 20.0 + args.outage_s as f64 {
            cluster.stop();
            down = true;
            phase = "outage";
        } else if down && t >= 20.0 + args.outage_s as f64 {
            cluster.start_again();
            down = false;
            phase = "recovery";
        }
        samples.push((t, phase, rss_mib(writer.id()), rss_mib(ingest.id())));
    }
    assert!(producer.wait().unwrap().success(), "produce failed");
    let (client, conn) = tokio_postgres::connect(&cluster.url("strata"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let drained_by = Instant::now() + Duration::from_secs(300);
    let landed = loop {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        if n as u64 >= count || Instant::now() > drained_by {
            break n;
        }
        samples.push((
            start.elapsed().as_secs_f64(),
            "drain",
            rss_mib(writer.id()),
            rss_mib(ingest.id()),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    stop(&mut ingest);
    stop(&mut writer);
    let stat = |p: &str, pick: fn(&(f64, &str, f64, f64)) -> f64| {
        let v: Vec<f64> = samples.iter().filter(|s| s.1 == p).map(pick).collect();
        let max = v.iter().cloned().fold(0.0, f64::max);
        let last = v.last().copied().unwrap_or(0.0);
        (max, last)
    };
    println!(
        "outage_rss: {} events/s for {total_s} s, PostgreSQL down from 20 s to {} s",
        args.rate,
        20 + args.outage_s
    );
    println!(
        "rows landed: {landed} of {count} ({})",
        if landed as u64 == count {
            "exact"
        } else {
            "MISSING/EXTRA"
        }
    );
    println!(
        "{:<10} {:>22} {:>22}",
        "phase", "batch-writer RSS MiB", "ingest RSS MiB"
    );
    for p in ["load", "outage", "recovery", "drain"] {
        if !samples.iter().any(|s| s.1 == p) {
            println!("{p:<10} {:>22} {:>22}", "(no samples)", "");
            continue;
        }
        let (wmax, wlast) = stat(p, |s| s.2);
        let (imax, ilast) = stat(p, |s| s.3);
        println!(
            "{p:<10} {:>12.1} (last {:>5.1}) {:>12.1} (last {:>5.1})",
            wmax, wlast, imax, ilast
        );
    }
    println!("samples (t s, phase, writer MiB, ingest MiB):");
    for s in samples.iter().step_by(5) {
        println!("  {:6.1} {:<9} {:7.1} {:7.1}", s.0, s.1, s.2, s.3);
    }
    let redis = strata_pipeline::config::RedisConfig {
        url: args.redis_url.clone(),
        ..Default::default()
    };
    if let Ok(client) = strata_pipeline::db::redis_client(&redis) {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let t = format!("telemetry:{{{table}}}");
            let r = format!("rows:{{{table}}}");
            let _: redis::RedisResult<()> = redis::cmd("DEL")
                .arg(&[format!("{t}:dlq"), format!("{r}:dlq"), t, r])
                .query_async(&mut c)
                .await;
        }
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&work);
    if landed as u64 != count {
        std::process::exit(1);
    }
}
