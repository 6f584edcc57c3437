//! `strata-bench`: the hot path (ingest → batch-writer) against the PostgreSQL COPY ceiling.
//!
//! What is measured, in one run on one machine:
//!
//! 1. **strata**: `N` synthetic `metrics` events are pre-loaded into `telemetry:{metrics}` with
//!    `strata produce` (not timed). Then `strata run` is spawned as a child process and timed
//!    from spawn until the pipeline has drained: both consumer groups (`ingest` on
//!    `telemetry:{metrics}`, `batch-writer` on `rows:{metrics}`) have no lag and nothing pending,
//!    and `SELECT count(*) FROM metrics` is `N`. The figure therefore includes process start-up,
//!    validation, framing (MessagePack + zstd), the Redis hop, binary COPY, the exactly-once
//!    bookkeeping and every acknowledgement. The child's peak RSS (VmHWM) is sampled meanwhile.
//! 2. **the ceiling**: the committed rows are read back with binary `COPY … TO STDOUT`, split in
//!    two halves and COPYed back into the same table by two sessions in parallel, each in its
//!    own committed transaction: what this PostgreSQL can ingest on this machine with the same
//!    parallelism as the writer's default (`[batch_writer] connections = 2`), with no Redis, no
//!    validation and no encoding. Ceiling events/s = `N` / wall time of the two COPYs.
//! 3. **where the CPU went** in each timed phase: the whole machine, `strata run`, Redis and the
//!    PostgreSQL processes serving the benchmark's database, from /proc and `INFO cpu`. Work by
//!    anything else beyond 15 % of the CPU marks the run as not quiet.
//!
//! The ratio strata/ceiling is the figure of merit; the targets are ratio ≥ 0.5 (goal 0.7) and
//! a peak RSS ≤ 256 MiB. Missing a target is reported, not an error: the exit status is non-zero
//! only when something failed (a child exited non-zero, rows are missing, …).
//!
//! The benchmark owns its database (dropped and recreated; its name must contain `bench`) and
//! the four `metrics` streams of its Redis (deleted at the start): never point it at production.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures_util::{SinkExt, TryStreamExt};
use redis::aio::MultiplexedConnection;
use strata_pipeline::db::PostgresTarget;
use strata_pipeline::schema::Schema;
use strata_pipeline::streams;
use strata_stages::catalog::ident;
use strata_stages::{ingest, writer};
use tokio::process::Command;

use strata_bench::common::{
    checkpoint, connect, fail, find_schema, redis_cpu_secs, redis_version, reset_database, round2,
    tail, thousands, Context, Failure, Result,
};
use strata_bench::machine::{self, Machine};

/// The table the benchmark loads (a schema in `schemas/`).
const TABLE: &str = "metrics";
/// Ratio strata/ceiling required by the issue...
const RATIO_MIN: f64 = 0.5;
/// ...and the one aimed for.
const RATIO_GOAL: f64 = 0.7;
/// Peak RSS allowed for `strata run`, in MiB.
const RSS_MAX_MIB: f64 = 256.0;
/// How often the drain is checked and the RSS sampled.
const POLL: Duration = Duration::from_millis(100);
/// Size of the CopyData messages the ceiling sends.
const COPY_CHUNK: usize = 1 << 20;
/// How long `strata run` may take to exit after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// Above this share of the available CPU, work outside strata, Redis and PostgreSQL is noise
/// worth a warning.
const NOISY_SHARE: f64 = 0.15;
/// A consumer of the benchmark's streams seen this recently means a live strata process.
const LIVE_CONSUMER_IDLE_MS: u64 = 10_000;

#[derive(Parser)]
#[command(
    name = "strata-bench",
    version,
    about = "strata's hot path (ingest → batch-writer) against the PostgreSQL COPY ceiling",
    long_about = "strata's hot path (ingest → batch-writer) against the PostgreSQL COPY ceiling.\n\n\
        WARNING: the benchmark DROPS and recreates its database (whose name must contain \
        `bench`) and DELETES the streams telemetry:{metrics}, rows:{metrics} and their :dlq on \
        its Redis. Never point it at a production Redis or database."
)]
struct Args {
    /// Metrics events pushed through the pipeline.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// The strata binary [default: `strata` next to this executable].
    #[arg(long)]
    strata: Option<PathBuf>,
    /// The benchmark's own database, dropped and recreated (its name must contain `bench`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/strata_bench"
    )]
    database_url: String,
    /// Redis whose telemetry:{metrics}, rows:{metrics} and their :dlq streams are deleted.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// strata configuration whose settings and `metrics` schema are used [default: the
    /// repository's config.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up when the pipeline has not drained after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Also print the result as one JSON line (the last line of standard output).
    #[arg(long)]
    json: bool,
    /// Whole runs (fresh database, pre-load, strata, ceiling); the run with the median ratio is
    /// reported, with every run's ratio. On a shared machine single runs vary by ±20 %.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Run the hot path twice per run, over plain TCP and over TLS to both Redis and PostgreSQL
    /// (verify-full, certificates generated for the run), on servers of the benchmark's own
    /// (one redis-server with a plain and a TLS port, one PostgreSQL with `ssl = on` accepting
    /// both), and report how much slower TLS is (target ≤ 15 %). --database-url and --redis-url
    /// are not used then.
    #[arg(long)]
    tls: bool,
}

/// TLS may cost at most this share of the plain hot path's throughput.
const TLS_SLOWDOWN_MAX: f64 = 0.15;

/// The servers one measurement talks to.
#[derive(Clone)]
struct Servers {
    /// The benchmark's database (TLS keys in the URL, as strata reads them).
    database_url: String,
    /// `[redis]` as strata reads it: URL and, for TLS, the CA file.
    redis: strata_pipeline::config::RedisConfig,
}

impl Servers {
    fn of(args: &Args) -> Self {
        Servers {
            database_url: args.database_url.clone(),
            redis: strata_pipeline::config::RedisConfig {
                url: args.redis_url.clone(),
                ..Default::default()
            },
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.tls {
        return match runtime.block_on(bench_tls(&args)) {
            Ok(report) => {
                print!("{}", report.text());
                if args.json {
                    println!("{}", report.json());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("strata-bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(bench(&args)) {
        Ok(report) => {
            print!("{}", report.text());
            if args.json {
                println!("{}", report.json());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("strata-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Everything one run measured.
struct Report {
    events: u64,
    machine: Machine,
    postgres_version: String,
    postgres_mode: String,
    redis_version: String,
    produce: Duration,
    strata: Duration,
    strata_peak_rss_kib: u64,
    /// CPU seconds spent during the strata run.
    strata_cpu: CpuUse,
    ceiling: Duration,
    ceiling_sessions: usize,
    /// CPU seconds spent during the ceiling COPYs (strata and Redis are idle then).
    ceiling_cpu: CpuUse,
    /// Every run's ratio, in the order run (this report is the median one).
    ratios: Vec<f64>,
}

/// Where the CPU went while strata ran, in CPU seconds.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    /// The `strata run` process.
    strata: f64,
    /// The Redis server (its own count, so it is right only for a Redis on this machine).
    redis: f64,
    /// PostgreSQL on this machine for the benchmark's database (0 for a remote one).
    postgres: f64,
    /// Every CPU of the machine, busy with anything.
    machine: f64,
}

impl CpuUse {
    /// The rest: the benchmark's polling, the kernel, other databases' backends, any other
    /// process.
    fn other(&self) -> f64 {
        (self.machine - self.strata - self.redis - self.postgres).max(0.0)
    }
}

impl Report {
    fn per_second(&self, d: Duration) -> f64 {
        self.events as f64 / d.as_secs_f64().max(1e-9)
    }

    fn strata_eps(&self) -> f64 {
        self.per_second(self.strata)
    }

    fn ceiling_eps(&self) -> f64 {
        self.per_second(self.ceiling)
    }

    fn ratio(&self) -> f64 {
        self.strata_eps() / self.ceiling_eps()
    }

    fn rss_mib(&self) -> f64 {
        self.strata_peak_rss_kib as f64 / 1024.0
    }

    /// CPU seconds the machine had during `d`.
    fn available(&self, d: Duration) -> f64 {
        self.machine.nproc as f64 * d.as_secs_f64()
    }

    /// False when other processes took a share of the CPU large enough to skew the figures.
    fn quiet(&self) -> bool {
        self.strata_cpu.other() <= NOISY_SHARE * self.available(self.strata)
            && self.ceiling_cpu.other() <= NOISY_SHARE * self.available(self.ceiling)
    }

    fn text(&self) -> String {
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        let ratio = self.ratio();
        let m = &self.machine;
        let mut out = String::new();
        out.push_str("\nstrata hot path: ingest → batch-writer vs the COPY ceiling\n");
        out.push_str(&format!(
            "  machine        {} CPUs, {}, {:.1} GiB RAM\n",
            m.nproc,
            m.cpu,
            m.mem_total_mib as f64 / 1024.0
        ));
        out.push_str(&format!(
            "  servers        PostgreSQL {} ({}), Redis {}\n",
            self.postgres_version
                .split_whitespace()
                .next()
                .unwrap_or(&self.postgres_version),
            mode_label(&self.postgres_mode),
            self.redis_version
        ));
        out.push_str(&format!(
            "  events         {} metrics events (pre-loaded in {:.1} s, not timed)\n",
            thousands(self.events),
            self.produce.as_secs_f64()
        ));
        out.push_str(&format!(
            "  strata run     {:>10} events/s   {:>7.2} s from spawn until drained and counted\n",
            thousands(self.strata_eps().round() as u64),
            self.strata.as_secs_f64()
        ));
        out.push_str(&format!(
            "  COPY ceiling   {:>10} events/s   {:>7.2} s for {} parallel binary COPYs, committed\n",
            thousands(self.ceiling_eps().round() as u64),
            self.ceiling.as_secs_f64(),
            self.ceiling_sessions
        ));
        let c = &self.strata_cpu;
        out.push_str(&format!(
            "  CPU (run)      {:.1} s busy of {:.1} s: strata {:.1}, Redis {:.1}, PostgreSQL {:.1}, other {:.1}\n",
            c.machine,
            self.available(self.strata),
            c.strata,
            c.redis,
            c.postgres,
            c.other()
        ));
        out.push_str(&format!(
            "  CPU (ceiling)  {:.1} s busy of {:.1} s: PostgreSQL {:.1}, other {:.1}\n",
            self.ceiling_cpu.machine,
            self.available(self.ceiling),
            self.ceiling_cpu.postgres,
            self.ceiling_cpu.other()
        ));
        if !self.quiet() {
            out.push_str(
                "  note           other processes used a large share of the CPU: the machine \
                 was not quiet, so the figures are pessimistic; rerun on a quiet machine\n",
            );
        }
        out.push_str(&format!(
            "  ratio          {ratio:.2}   target ≥ {RATIO_MIN}: {}   goal ≥ {RATIO_GOAL}: {}\n",
            verdict(ratio >= RATIO_MIN),
            verdict(ratio >= RATIO_GOAL)
        ));
        if self.ratios.len() > 1 {
            let all: Vec<String> = self.ratios.iter().map(|r| format!("{r:.2}")).collect();
            out.push_str(&format!(
                "  runs           {}, ratios {} (this is the median run)\n",
                self.ratios.len(),
                all.join(", ")
            ));
        }
        out.push_str(&format!(
            "  peak RSS       {:.1} MiB   target ≤ {RSS_MAX_MIB} MiB: {}\n",
            self.rss_mib(),
            verdict(self.rss_mib() <= RSS_MAX_MIB)
        ));
        out
    }

    fn json(&self) -> serde_json::Value {
        let ratio = self.ratio();
        serde_json::json!({
            "benchmark": "hot_path",
            "events": self.events,
            "strata_events_per_s": self.strata_eps().round(),
            "strata_seconds": self.strata.as_secs_f64(),
            "ceiling_events_per_s": self.ceiling_eps().round(),
            "ceiling_seconds": self.ceiling.as_secs_f64(),
            "ceiling_sessions": self.ceiling_sessions,
            "quiet_machine": self.quiet(),
            "cpu_seconds": {
                "strata_run": {
                    "machine": round2(self.strata_cpu.machine),
                    "strata": round2(self.strata_cpu.strata),
                    "redis": round2(self.strata_cpu.redis),
                    "postgres": round2(self.strata_cpu.postgres),
                    "other": round2(self.strata_cpu.other()),
                },
                "ceiling": {
                    "machine": round2(self.ceiling_cpu.machine),
                    "postgres": round2(self.ceiling_cpu.postgres),
                    "other": round2(self.ceiling_cpu.other()),
                },
            },
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "ratios": self.ratios.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            "strata_peak_rss_mb": (self.rss_mib() * 10.0).round() / 10.0,
            "postgres_mode": self.postgres_mode,
            "postgres_version": self.postgres_version,
            "redis_version": self.redis_version,
            "machine": {
                "nproc": self.machine.nproc,
                "cpu": self.machine.cpu,
                "mem_total_mb": self.machine.mem_total_mib,
            },
            "targets": {
                "ratio_min": RATIO_MIN,
                "ratio_goal": RATIO_GOAL,
                "rss_max_mb": RSS_MAX_MIB,
                "ratio_pass": ratio >= RATIO_MIN,
                "ratio_goal_pass": ratio >= RATIO_GOAL,
                "rss_pass": self.rss_mib() <= RSS_MAX_MIB,
            },
        })
    }
}

fn mode_label(mode: &str) -> &str {
    match mode {
        "native" => "native range partitions",
        "hypertable" => "TimescaleDB hypertable",
        other => other,
    }
}

/// Where the children run: a scratch folder holding a copy of the configuration whose
/// `schemas_dir` holds only the `metrics` schema, so `strata run` touches no other table's
/// streams.
struct Setup {
    strata: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    schema: Schema,
    servers: Servers,
}

impl Setup {
    fn new(args: &Args, servers: &Servers) -> Result<Self> {
        let strata = match &args.strata {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context(|| "cannot find this executable's folder".into())?
                .with_file_name("strata"),
        };
        if !strata.is_file() {
            return fail(format!(
                "no strata binary at {}: build it with `cargo build --release -p strata` or pass --strata",
                strata.display()
            ));
        }
        let config_src = args.config.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("config.toml")
        });
        let text = std::fs::read_to_string(&config_src)
            .context(|| format!("reading {}", config_src.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).context(|| format!("parsing {}", config_src.display()))?;
        let schemas_dir = table
            .get("schemas_dir")
            .and_then(|v| v.as_str())
            .unwrap_or("schemas");
        let schemas_dir = config_src
            .parent()
            .unwrap_or(Path::new("."))
            .join(schemas_dir);
        let (schema_text, schema) = find_schema(&schemas_dir, TABLE)?;

        let dir = std::env::temp_dir().join(format!("strata-bench-{}", std::process::id()));
        let schemas = dir.join("schemas");
        std::fs::create_dir_all(&schemas).context(|| format!("creating {}", schemas.display()))?;
        std::fs::write(schemas.join(format!("{TABLE}.toml")), schema_text)
            .context(|| format!("writing into {}", schemas.display()))?;
        table.insert("schemas_dir".into(), "schemas".into());
        if let Some(ca) = &servers.redis.tls_ca_file {
            let redis = table
                .entry("redis")
                .or_insert_with(|| toml::Value::Table(Default::default()));
            if let Some(redis) = redis.as_table_mut() {
                redis.insert("tls_ca_file".into(), ca.display().to_string().into());
            }
        }
        let config = dir.join("config.toml");
        std::fs::write(&config, table.to_string())
            .context(|| format!("writing {}", config.display()))?;
        Ok(Self {
            strata,
            dir,
            config,
            schema,
            servers: servers.clone(),
        })
    }

    /// Where `strata run` logs.
    fn run_log(&self) -> PathBuf {
        self.dir.join("strata-run.log")
    }

    /// `strata --config … <args>` with the benchmark's URLs in its environment.
    fn strata(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.strata);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(&self.dir)
            .env("DATABASE_URL", &self.servers.database_url)
            .env("REDIS_URL", &self.servers.redis.url)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `strata <args>` to completion; an error (with its stderr) unless it exits 0.
    async fn run_to_end(&self, args: &[&str]) -> Result<()> {
        let what = || format!("`strata {}`", args.join(" "));
        let out = self
            .strata(args)
            .output()
            .await
            .context(|| format!("starting {} ({})", what(), self.strata.display()))?;
        if !out.status.success() {
            return fail(format!(
                "{} failed ({}):\n{}",
                what(),
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 20)
            ));
        }
        Ok(())
    }
}

async fn bench(args: &Args) -> Result<Report> {
    if args.events < 2 {
        return fail("--events must be at least 2 (the ceiling splits the rows in two halves)");
    }
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        if args.runs > 1 {
            step(&format!("run {run} of {}", args.runs));
        }
        reports.push(one_run(args, &Servers::of(args)).await?);
        if args.runs > 1 {
            step(&format!(
                "run {run}: ratio {:.3}",
                reports[reports.len() - 1].ratio()
            ));
        }
    }
    Ok(median(reports))
}

/// One whole run on `servers` (fresh database, pre-load, strata, ceiling).
async fn one_run(args: &Args, servers: &Servers) -> Result<Report> {
    let setup = Setup::new(args, servers)?;
    let result = measure(args, &setup).await;
    // The scratch folder is kept only when `strata run`'s log may explain a failure.
    if result.is_ok() || !setup.run_log().exists() {
        let _ = std::fs::remove_dir_all(&setup.dir);
    }
    result
}

/// The run with the median ratio, holding every run's ratio.
fn median(mut reports: Vec<Report>) -> Report {
    let ratios: Vec<f64> = reports.iter().map(Report::ratio).collect();
    reports.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let mut median = reports.swap_remove(reports.len() / 2);
    median.ratios = ratios;
    median
}

/// `--tls`: plain and TLS runs, alternating, on the same servers of the benchmark's own.
struct TlsReport {
    /// The median plain run.
    plain: Report,
    /// The median TLS run.
    tls: Report,
    /// Per run: TLS's slowdown of strata's events/s against the plain run just before it.
    slowdowns: Vec<f64>,
}

impl TlsReport {
    /// 1 − TLS events/s ÷ plain events/s, of the medians.
    fn slowdown(&self) -> f64 {
        1.0 - self.tls.strata_eps() / self.plain.strata_eps()
    }

    fn text(&self) -> String {
        let mut out = String::from("\n== plain TCP to Redis and PostgreSQL ==");
        out.push_str(&self.plain.text());
        out.push_str(
            "\n== TLS to Redis (rediss://, CA file) and PostgreSQL (sslmode=verify-full) ==",
        );
        out.push_str(&self.tls.text());
        let s = self.slowdown();
        out.push_str(&format!(
            "\nTLS vs plain   {} vs {} events/s: {:.1} % slower   target ≤ {:.0} %: {}\n",
            thousands(self.tls.strata_eps().round() as u64),
            thousands(self.plain.strata_eps().round() as u64),
            s * 100.0,
            TLS_SLOWDOWN_MAX * 100.0,
            if s <= TLS_SLOWDOWN_MAX {
                "PASS"
            } else {
                "MISS"
            }
        ));
        if self.slowdowns.len() > 1 {
            let all: Vec<String> = self
                .slowdowns
                .iter()
                .map(|r| format!("{:.1} %", r * 100.0))
                .collect();
            out.push_str(&format!("  per run      {}\n", all.join(", ")));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "benchmark": "hot_path_tls",
            "plain": self.plain.json(),
            "tls": self.tls.json(),
            "tls_slowdown": (self.slowdown() * 1000.0).round() / 1000.0,
            "tls_slowdowns": self.slowdowns.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            "tls_slowdown_max": TLS_SLOWDOWN_MAX,
            "tls_pass": self.slowdown() <= TLS_SLOWDOWN_MAX,
        })
    }
}

async fn bench_tls(args: &Args) -> Result<TlsReport> {
    use strata_testkit::tls::{start_postgres_tls, OwnTlsRedis, RedisTls, TestCerts};
    if args.events < 2 {
        return fail("--events must be at least 2 (the ceiling splits the rows in two halves)");
    }
    step("starting a redis-server (plain and TLS ports) and a PostgreSQL with ssl = on");
    let certs = TestCerts::generate();
    let redis = OwnTlsRedis::start(&RedisTls {
        cert: &certs.server_cert,
        key: &certs.server_key,
        ca: &certs.ca,
        auth_clients: false,
        also_plain: true,
    });
    let pg = start_postgres_tls(
        &certs,
        &certs.server_cert,
        &certs.server_key,
        "host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust",
    );
    let plain = Servers {
        database_url: format!("postgres://postgres@127.0.0.1:{}/strata_bench", pg.port),
        redis: strata_pipeline::config::RedisConfig {
            url: format!("redis://127.0.0.1:{}", redis.plain_port.unwrap_or_default()),
            ..Default::default()
        },
    };
    let tls = Servers {
        database_url: format!(
            "postgres://postgres@localhost:{}/strata_bench?sslmode=verify-full&sslrootcert={}",
            pg.port,
            certs.ca.display()
        ),
        redis: strata_pipeline::config::RedisConfig {
            url: redis.url(),
            tls_ca_file: Some(certs.ca.clone()),
            ..Default::default()
        },
    };
    let (mut plains, mut tlss, mut slowdowns) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        step(&format!("run {run} of {}: plain TCP", args.runs));
        let p = one_run(args, &plain).await?;
        step(&format!("run {run} of {}: TLS", args.runs));
        let t = one_run(args, &tls).await?;
        slowdowns.push(1.0 - t.strata_eps() / p.strata_eps());
        plains.push(p);
        tlss.push(t);
    }
    Ok(TlsReport {
        plain: median(plains),
        tls: median(tlss),
        slowdowns,
    })
}

/// Every step of one run, in the scratch folder of `setup`.
async fn measure(args: &Args, setup: &Setup) -> Result<Report> {
    let machine = Machine::read();
    let pg = strata_pipeline::db::postgres_config(&setup.servers.database_url)
        .context(|| "invalid --database-url / DATABASE_URL".into())?;
    let n = args.events;

    step(&format!(
        "resetting database `{}` and the {TABLE} streams",
        pg.get_dbname().unwrap_or("?")
    ));
    reset_database(&pg).await?;
    let mut redis = connect_redis(&setup.servers.redis).await?;
    let redis_version = redis_version(&mut redis).await?;
    reset_streams(&mut redis).await?;

    step("strata migrate");
    setup.run_to_end(&["migrate"]).await?;
    let db = connect(&pg).await?;
    let postgres_mode: String = db
        .query_one(
            "SELECT partitioning FROM strata.tables WHERE name = $1",
            &[&TABLE],
        )
        .await
        .context(|| format!("reading how `{TABLE}` was migrated from strata.tables"))?
        .get(0);
    let postgres_version: String = db
        .query_one("SHOW server_version", &[])
        .await
        .context(|| "reading the PostgreSQL version".into())?
        .get(0);

    step(&format!("pre-loading {} events", thousands(n)));
    let t = Instant::now();
    let count = n.to_string();
    setup
        .run_to_end(&["produce", "--table", TABLE, "--count", &count])
        .await?;
    let produce = t.elapsed();

    checkpoint(&db).await;
    step("strata run: timing until the pipeline has drained");
    let database = pg.get_dbname().unwrap_or_default();
    let run = time_pipeline(setup, &mut redis, &db, database, n, args).await?;

    step("ceiling: COPY the committed rows back in two parallel sessions");
    let ceiling = ceiling(&pg, &db, &setup.schema, n).await?;

    Ok(Report {
        events: n,
        machine,
        postgres_version,
        postgres_mode,
        redis_version,
        produce,
        strata: run.elapsed,
        strata_peak_rss_kib: run.peak_rss_kib,
        strata_cpu: run.cpu,
        ceiling: ceiling.elapsed,
        ceiling_sessions: ceiling.sessions,
        ceiling_cpu: ceiling.cpu,
        ratios: Vec::new(),
    })
}

fn step(what: &str) {
    eprintln!("strata-bench: {what}…");
}

async fn connect_redis(
    redis: &strata_pipeline::config::RedisConfig,
) -> Result<MultiplexedConnection> {
    let url = &redis.url;
    let client = strata_pipeline::db::redis_client(redis)
        .context(|| "invalid --redis-url / REDIS_URL".into())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context(|| format!("connecting to Redis at {url}"))
}

/// The benchmark's streams: the metrics table's input, frames and their dead letters.
fn bench_streams() -> [String; 4] {
    let input = streams::telemetry_stream(TABLE);
    let rows = streams::rows_stream(TABLE);
    [
        streams::dlq_stream(&input),
        streams::dlq_stream(&rows),
        input,
        rows,
    ]
}

/// Deletes the benchmark's streams, unless a strata process has consumed from them lately.
async fn reset_streams(redis: &mut MultiplexedConnection) -> Result<()> {
    let [_, _, input, rows] = bench_streams();
    for stream in [&input, &rows] {
        let groups = streams::groups(redis, stream)
            .await
            .context(|| format!("XINFO GROUPS {stream}"))?;
        for g in groups.iter().filter(|g| g.consumers > 0) {
            let reply: redis::Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(stream)
                .arg(&g.name)
                .query_async(redis)
                .await
                .context(|| format!("XINFO CONSUMERS {stream} {}", g.name))?;
            if let Some((name, idle)) = consumers(reply)
                .into_iter()
                .find(|(_, idle)| *idle < LIVE_CONSUMER_IDLE_MS)
            {
                return fail(format!(
                    "consumer `{name}` of group `{}` on {stream} was active {idle} ms ago: another \
                     strata process is using the benchmark's streams on this Redis; stop it or \
                     point --redis-url at a Redis of its own",
                    g.name
                ));
            }
        }
    }
    let mut keys = bench_streams().to_vec();
    keys.extend([streams::claims_key(&input), streams::claims_key(&rows)]);
    let _: i64 = redis::cmd("UNLINK")
        .arg(&keys)
        .query_async(redis)
        .await
        .context(|| format!("deleting {}", keys.join(", ")))?;
    Ok(())
}

/// Names the consumers of the benchmark's streams that are not `strata run` (PID `pid`), as a
/// clause for an error message: a strata process started elsewhere against this Redis takes
/// entries from the benchmark (an idle one is invisible to the check before the run, since
/// Redis 7.0 lists a consumer only once it has been delivered something).
async fn foreign_consumers(redis: &mut MultiplexedConnection, pid: u32) -> String {
    let ours = format!("-{pid}-");
    let mut foreign = Vec::new();
    for stream in [
        streams::telemetry_stream(TABLE),
        streams::rows_stream(TABLE),
    ] {
        for g in streams::groups(redis, &stream).await.unwrap_or_default() {
            let reply: redis::Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&stream)
                .arg(&g.name)
                .query_async(redis)
                .await
                .unwrap_or(redis::Value::Nil);
            foreign.extend(
                consumers(reply)
                    .into_iter()
                    .map(|(name, _)| name)
                    .filter(|name| !name.contains(&ours)),
            );
        }
    }
    if foreign.is_empty() {
        String::new()
    } else {
        format!(
            "; other processes consumed the benchmark's streams: {} (stop them, or give the \
             benchmark a Redis of its own)",
            foreign.join(", ")
        )
    }
}

/// (name, idle ms) of each consumer in an XINFO CONSUMERS reply.
fn consumers(reply: redis::Value) -> Vec<(String, u64)> {
    use redis::Value;
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            let pairs: Vec<(Value, Value)> = match item {
                Value::Map(m) => m,
                Value::Array(flat) => flat
                    .chunks_exact(2)
                    .map(|kv| (kv[0].clone(), kv[1].clone()))
                    .collect(),
                _ => Vec::new(),
            };
            let (mut name, mut idle) = (String::new(), u64::MAX);
            for (k, v) in &pairs {
                match (text(k).as_str(), v) {
                    ("name", v) => name = text(v),
                    ("idle" | "inactive", Value::Int(ms)) if *ms >= 0 => {
                        idle = idle.min(*ms as u64)
                    }
                    _ => {}
                }
            }
            (name, idle)
        })
        .collect()
}

/// What the timed strata run measured.
struct PipelineRun {
    /// From spawn until drained and counted.
    elapsed: Duration,
    /// VmHWM of `strata run`, in kB.
    peak_rss_kib: u64,
    cpu: CpuUse,
}

/// Spawns `strata run`, waits until the `N` events are in the table, stops it with SIGTERM.
async fn time_pipeline(
    setup: &Setup,
    redis: &mut MultiplexedConnection,
    db: &tokio_postgres::Client,
    database: &str,
    n: u64,
    args: &Args,
) -> Result<PipelineRun> {
    let log_path = setup.run_log();
    let log =
        std::fs::File::create(&log_path).context(|| format!("creating {}", log_path.display()))?;
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        format!(
            "last lines of its log ({}):\n{}",
            log_path.display(),
            tail(&text, 20)
        )
    };
    let input = streams::telemetry_stream(TABLE);
    let rows = streams::rows_stream(TABLE);
    let count_sql = format!("SELECT count(*) FROM {}", ident(TABLE));
    let timeout = Duration::from_secs(args.timeout_secs);

    let redis_cpu_before = redis_cpu_secs(redis).await?;
    let machine_before = machine::machine_busy_secs().unwrap_or(0.0);
    let postgres_before = machine::postgres_cpu_secs(database);
    let started = Instant::now();
    let mut child = setup
        .strata(&["run"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context(|| format!("starting `strata run` ({})", setup.strata.display()))?;
    let Some(pid) = child.id() else {
        return fail("`strata run` exited at once");
    };
    let mut peak_kib = 0;
    let (elapsed, cpu) = loop {
        if let Some(kb) = machine::peak_rss_kib(pid) {
            peak_kib = peak_kib.max(kb);
        }
        if let Some(status) = child
            .try_wait()
            .context(|| "waiting for `strata run`".into())?
        {
            return fail(format!(
                "`strata run` exited before the pipeline drained ({status}); {}",
                log_tail()
            ));
        }
        // Ingest forwards and acknowledges in one atomic step, and the writer acknowledges only
        // after COMMIT, so once both groups are drained (checked in this order) every row is
        // committed. The count runs only then, to keep a full scan off the timed CPUs.
        let drained = streams::ConsumerGroup::new(&input, ingest::STAGE.group())
            .drained(redis)
            .await
            .context(|| format!("XINFO GROUPS {input}"))?
            && streams::ConsumerGroup::new(&rows, writer::STAGE.group())
                .drained(redis)
                .await
                .context(|| format!("XINFO GROUPS {rows}"))?;
        if drained {
            let elapsed = started.elapsed();
            let machine_cpu = machine::machine_busy_secs().unwrap_or(0.0) - machine_before;
            let strata_cpu = machine::process_cpu_secs(pid).unwrap_or(0.0);
            let postgres_cpu = machine::postgres_cpu_secs(database) - postgres_before;
            let redis_cpu = redis_cpu_secs(redis).await? - redis_cpu_before;
            let count: i64 = db
                .query_one(&count_sql, &[])
                .await
                .context(|| format!("counting the rows of {TABLE}"))?
                .get(0);
            if count as u64 == n {
                let cpu = CpuUse {
                    strata: strata_cpu,
                    redis: redis_cpu,
                    postgres: postgres_cpu.max(0.0),
                    machine: machine_cpu,
                };
                break (elapsed, cpu);
            }
            let dead = dead_letters(redis).await?;
            return fail(format!(
                "the pipeline drained but {TABLE} holds {count} rows, not {n} (dead letters: \
                 {dead}){}; {}",
                foreign_consumers(redis, pid).await,
                log_tail()
            ));
        }
        if started.elapsed() > timeout {
            let groups = streams::groups(redis, &input).await.unwrap_or_default();
            return fail(format!(
                "the pipeline has not drained after {} s (ingest group: {groups:?}){}; raise \
                 --timeout-secs or look at {}",
                args.timeout_secs,
                foreign_consumers(redis, pid).await,
                log_path.display()
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    if let Some(kb) = machine::peak_rss_kib(pid) {
        peak_kib = peak_kib.max(kb);
    }

    // SAFETY: kill(2) with a PID of our own child, which has not been reaped yet (try_wait
    // returned None above), so the PID cannot have been reused.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        return fail(format!(
            "sending SIGTERM to `strata run` (pid {pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let status = match tokio::time::timeout(SHUTDOWN_GRACE, child.wait()).await {
        Ok(status) => status.context(|| "waiting for `strata run` to exit".into())?,
        Err(_) => {
            let _ = child.kill().await;
            return fail(format!(
                "`strata run` did not exit within {} s of SIGTERM; {}",
                SHUTDOWN_GRACE.as_secs(),
                log_tail()
            ));
        }
    };
    if !status.success() {
        return fail(format!(
            "`strata run` exited with {status} after SIGTERM (expected 0); {}",
            log_tail()
        ));
    }
    let dead = dead_letters(redis).await?;
    if dead != 0 {
        return fail(format!(
            "{dead} dead letters after a clean run; {}",
            log_tail()
        ));
    }
    if peak_kib == 0 {
        return fail(format!(
            "could not read /proc/{pid}/status for the peak RSS"
        ));
    }
    Ok(PipelineRun {
        elapsed,
        peak_rss_kib: peak_kib,
        cpu,
    })
}

/// Entries in the two dead-letter streams of the benchmark's table.
async fn dead_letters(redis: &mut MultiplexedConnection) -> Result<u64> {
    let [input_dlq, rows_dlq, ..] = bench_streams();
    let mut total = 0;
    for key in [input_dlq, rows_dlq] {
        let len: u64 = redis::cmd("XLEN")
            .arg(&key)
            .query_async(redis)
            .await
            .context(|| format!("XLEN {key}"))?;
        total += len;
    }
    Ok(total)
}

/// What the ceiling measured.
struct Ceiling {
    /// Wall time of the parallel COPYs, from the first BEGIN to the last COMMIT.
    elapsed: Duration,
    /// Sessions COPYing at once.
    sessions: usize,
    /// CPU seconds spent meanwhile.
    cpu: CpuUse,
}

/// Reads the committed rows back and times COPYing them into the table again in two parallel
/// sessions.
async fn ceiling(
    pg: &PostgresTarget,
    db: &tokio_postgres::Client,
    schema: &Schema,
    n: u64,
) -> Result<Ceiling> {
    let database = pg.get_dbname().unwrap_or_default();
    let columns: Vec<String> = schema.columns.iter().map(|c| ident(&c.name)).collect();
    let columns = columns.join(", ");
    let out = db
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM {}) TO STDOUT (FORMAT binary)",
            ident(TABLE)
        ))
        .await
        .context(|| format!("COPY {TABLE} TO STDOUT"))?;
    let data = out
        .try_fold(BytesMut::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .context(|| format!("reading {TABLE} back with COPY"))?;
    let tuples =
        strata_stages::copy::decode::split(&data).context(|| format!("COPY {TABLE} TO STDOUT"))?;
    if tuples.len() as u64 != n {
        return fail(format!(
            "COPY {TABLE} TO STDOUT returned {} rows, not {n}",
            tuples.len()
        ));
    }
    let half = tuples.len() / 2;
    let halves = [0..half, half..tuples.len()].map(|range| {
        let span = tuples.span(range);
        let mut body = BytesMut::with_capacity(tuples.header_len + span.len() + 2);
        body.extend_from_slice(&data[..tuples.header_len]);
        body.extend_from_slice(&data[span]);
        body.extend_from_slice(strata_stages::copy::TRAILER);
        body.freeze()
    });
    drop(data);

    let sql = format!(
        "COPY {} ({columns}) FROM STDIN (FORMAT binary)",
        ident(TABLE)
    );
    let mut sessions = Vec::new();
    for _ in &halves {
        sessions.push(connect(pg).await?);
    }
    checkpoint(db).await;
    let sessions_n = sessions.len();
    let machine_before = machine::machine_busy_secs().unwrap_or(0.0);
    let postgres_before = machine::postgres_cpu_secs(database);
    let started = Instant::now();
    let tasks: Vec<_> = sessions
        .into_iter()
        .zip(halves)
        .map(|(client, body)| tokio::spawn(copy_in(client, sql.clone(), body)))
        .collect();
    let mut copied = 0;
    // Kept open until the CPU is read: an exiting backend takes its CPU time with it.
    let mut open = Vec::new();
    for task in tasks {
        let (rows, client) = task
            .await
            .map_err(|e| Failure(format!("a ceiling COPY task failed: {e}")))??;
        copied += rows;
        open.push(client);
    }
    let elapsed = started.elapsed();
    let cpu = CpuUse {
        machine: machine::machine_busy_secs().unwrap_or(0.0) - machine_before,
        postgres: (machine::postgres_cpu_secs(database) - postgres_before).max(0.0),
        ..CpuUse::default()
    };
    drop(open);
    if copied != n {
        return fail(format!("the ceiling COPYs wrote {copied} rows, not {n}"));
    }
    let total: i64 = db
        .query_one(&format!("SELECT count(*) FROM {}", ident(TABLE)), &[])
        .await
        .context(|| format!("counting the rows of {TABLE}"))?
        .get(0);
    if total as u64 != 2 * n {
        return fail(format!(
            "after the ceiling COPYs {TABLE} holds {total} rows, not {}",
            2 * n
        ));
    }
    Ok(Ceiling {
        elapsed,
        sessions: sessions_n,
        cpu,
    })
}

/// One ceiling session: BEGIN, COPY `body` in 1 MiB messages, COMMIT. Returns the rows copied
/// and the session.
async fn copy_in(
    mut client: tokio_postgres::Client,
    sql: String,
    body: Bytes,
) -> Result<(u64, tokio_postgres::Client)> {
    let what = || format!("ceiling {sql}");
    let tx = client.transaction().await.context(what)?;
    let sink = tx.copy_in::<_, Bytes>(&sql).await.context(what)?;
    futures_util::pin_mut!(sink);
    let mut at = 0;
    while at < body.len() {
        let end = (at + COPY_CHUNK).min(body.len());
        sink.send(body.slice(at..end)).await.context(what)?;
        at = end;
    }
    let rows = sink.finish().await.context(what)?;
    tx.commit().await.context(what)?;
    Ok((rows, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xinfo_consumers_in_resp2_and_resp3() {
        use redis::Value;
        let s = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let resp2 = Value::Array(vec![Value::Array(vec![
            s("name"),
            s("ingest-a"),
            s("pending"),
            Value::Int(0),
            s("idle"),
            Value::Int(42),
        ])]);
        assert_eq!(consumers(resp2), vec![("ingest-a".to_string(), 42)]);
        let resp3 = Value::Array(vec![Value::Map(vec![
            (s("name"), s("w")),
            (s("idle"), Value::Int(90_000)),
            (s("inactive"), Value::Int(-1)),
        ])]);
        assert_eq!(consumers(resp3), vec![("w".to_string(), 90_000)]);
    }

    #[test]
    fn report_says_pass_and_miss() {
        let report = Report {
            events: 1000,
            machine: Machine {
                nproc: 2,
                cpu: "cpu".into(),
                mem_total_mib: 2048,
            },
            postgres_version: "15".into(),
            postgres_mode: "native".into(),
            redis_version: "7".into(),
            produce: Duration::from_secs(1),
            strata: Duration::from_secs(2),
            strata_peak_rss_kib: 300 * 1024,
            strata_cpu: CpuUse {
                strata: 1.0,
                redis: 1.5,
                postgres: 0.25,
                machine: 3.0,
            },
            ceiling: Duration::from_secs(1),
            ceiling_sessions: 2,
            ceiling_cpu: CpuUse {
                postgres: 1.8,
                machine: 1.9,
                ..CpuUse::default()
            },
            ratios: vec![0.4, 0.5, 0.6],
        };
        let text = report.text();
        assert!(
            text.contains("runs           3, ratios 0.40, 0.50, 0.60 (this is the median run)"),
            "{text}"
        );
        assert!(
            text.contains("ratio          0.50   target ≥ 0.5: PASS   goal ≥ 0.7: MISS"),
            "{text}"
        );
        assert!(
            text.contains("300.0 MiB   target ≤ 256 MiB: MISS"),
            "{text}"
        );
        let json = report.json();
        assert_eq!(json["ratio"], 0.5);
        assert_eq!(json["ratios"], serde_json::json!([0.4, 0.5, 0.6]));
        assert_eq!(json["targets"]["rss_pass"], false);
        assert_eq!(json["postgres_mode"], "native");
        assert_eq!(json["quiet_machine"], true);
        assert_eq!(json["cpu_seconds"]["strata_run"]["other"], 0.25);
        assert!(
            text.contains("3.0 s busy of 4.0 s: strata 1.0, Redis 1.5, PostgreSQL 0.2, other 0.2"),
            "{text}"
        );
    }
}
