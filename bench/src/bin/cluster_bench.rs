//! `cluster_bench`: the hot path (ingest → batch-writer) on a Redis Cluster of its own with the
//! `metrics` table split into partitions, against a standalone Redis.
//!
//! ```sh
//! cargo build --release -p strata --bin strata -p strata-bench --bin cluster_bench
//! target/release/cluster_bench [--events 500000] [--runs 3] [--partitions 1,3,6] [--processes 1,2] [--json]
//! ```
//!
//! It starts its own servers, all without persistence, on free loopback ports, removed at the
//! end: a Redis Cluster of 3 masters + 3 replicas ([`strata_testkit::OwnCluster`]), a
//! standalone `redis-server` ([`strata_testkit::OwnRedis::start_ephemeral`]) and another one
//! with a replica (`--no-standalone-replica` leaves it out): a cluster's masters each feed a
//! replica, so that one tells replication's cost from cluster mode's. PostgreSQL is the one of
//! `--database-url`, in a database of the benchmark's own (dropped and recreated per run; its
//! name must contain `bench`; dropped at the end).
//!
//! Per configuration (standalone, with and without a replica, with 1 partition; the cluster with
//! each `--partitions`; each with each `--processes` count of `strata ingest` and as many
//! `strata batch-writer` processes), the configurations interleaved in each of `--runs` rounds:
//!
//! 1. *Setup, not timed*: every master flushed, a fresh database, `strata migrate` with a copy
//!    of the `metrics` schema holding `partitions = P` and `partition_key = "source"`, then
//!    `strata produce --table metrics --count E` (each event to the partition of its source).
//!    On the cluster the partitions are first placed over the masters as an operator would
//!    (`--placement spread`, the default): their (still empty) slots are moved so that the
//!    masters get as even a share of the events as whole partitions allow (largest partition
//!    first onto the least loaded master; a partition stays where it is when that is as good).
//!    `--placement natural` keeps where CRC16 of the tags puts them.
//! 2. *Timed*: from spawning the stage processes until, for every partition, `telemetry` (group
//!    `ingest`) and `rows` (group `batch-writer`) are drained (no lag, nothing pending; polled
//!    every 100 ms through a cluster connection on the cluster) and the table holds E rows.
//! 3. *CPU* during the timed phase: each Redis node's `INFO cpu` (used_cpu_sys + used_cpu_user)
//!    delta, the stage processes' utime + stime (/proc, read before they are stopped; ingest's and
//!    the writers' apart), the
//!    PostgreSQL processes serving the database, and the whole machine.
//!
//! The report gives events/s, each master's CPU seconds and its share of the masters' total
//! (next to its share of the events), strata's, Redis's and PostgreSQL's CPU seconds per
//! million events, and the projection for one core per master: master m saturates at
//! E / C_m events/s (C_m: its CPU seconds for the E events), so the Redis tier saturates at
//! E / max_m C_m. See BENCHMARKS.md for the model and its limits.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use redis::aio::MultiplexedConnection;
use strata_bench::common::{
    checkpoint, connect, drop_database, fail, find_schema, redis_command_stats, redis_cpu_secs,
    redis_version, reset_database, tail, thousands, Context, Failure, Result,
};
use strata_bench::machine::{self, Machine};
use strata_pipeline::config::RedisConfig;
use strata_pipeline::db::{PostgresTarget, RedisConnection};
use strata_pipeline::schema::Schema;
use strata_pipeline::streams::{self, StreamKind};
use strata_stages::catalog::ident;
use strata_stages::{ingest, writer, StageSpec};
use strata_testkit::{OwnCluster, OwnRedis};
use tokio::process::{Child, Command};

/// The table the benchmark loads (a schema in `schemas/`).
const TABLE: &str = "metrics";
/// How often the drain is checked.
const POLL: Duration = Duration::from_millis(100);
/// How long a stage process may take to exit after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
/// Above this share of the available CPU, work outside strata, Redis and PostgreSQL marks a run
/// as not quiet.
const NOISY_SHARE: f64 = 0.15;

#[derive(Parser)]
#[command(
    name = "cluster_bench",
    version,
    about = "strata's hot path on a Redis Cluster of its own with partitioned streams, against \
             standalone Redis",
    long_about = "strata's hot path (ingest → batch-writer) on a Redis Cluster of its own (3 \
        masters + 3 replicas on loopback) with the metrics table split into partitions, against \
        one standalone redis-server: events/s, each master's CPU and share, CPU per million \
        events of strata, Redis and PostgreSQL, and the throughput projected for one core per \
        master.\n\nIt starts and removes its own Redis servers. WARNING: it DROPS and recreates \
        its PostgreSQL database (whose name must contain `bench`) for every run and drops it at \
        the end."
)]
struct Args {
    /// Events pre-loaded and pushed through the pipeline per run.
    #[arg(long, default_value_t = 500_000)]
    events: u64,
    /// Runs of the whole matrix (configurations interleaved); per configuration the run with
    /// the median events/s is reported, with every run's events/s.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Partition counts measured on the cluster.
    #[arg(long, value_delimiter = ',', default_value = "1,3,6")]
    partitions: Vec<u32>,
    /// Processes per stage (that many `strata ingest` and as many `strata batch-writer`).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    processes: Vec<u32>,
    /// Leave out the standalone Redis configurations.
    #[arg(long)]
    no_standalone: bool,
    /// Leave out the standalone redis-server with one replica (partitions 1), which tells the
    /// cost of replication (a cluster's masters feed a replica each) from that of cluster mode.
    #[arg(long)]
    no_standalone_replica: bool,
    /// How the partitions are placed over the cluster's masters.
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    placement: Placement,
    /// The strata binary [default: `strata` next to this executable].
    #[arg(long)]
    strata: Option<PathBuf>,
    /// strata configuration whose settings and `metrics` schema are used [default: the
    /// repository's config.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// The benchmark's own database, dropped and recreated (its name must contain `bench`).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/strata_cluster_bench"
    )]
    database_url: String,
    /// Give up on a run whose pipeline has not drained after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Also print the result as one JSON line (the last line of standard output).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Placement {
    /// Move the partitions' slots so the masters get as even a share of the events as whole
    /// partitions allow.
    Spread,
    /// Leave the slots where `redis-cli --cluster create` put them.
    Natural,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Spread => "spread",
            Placement::Natural => "natural",
        }
    }
}

/// Where the streams live in one configuration.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    /// One redis-server.
    Standalone,
    /// One redis-server with a replica (`--standalone-replica`): the replication a cluster's
    /// masters also pay, without cluster mode.
    Replicated,
    Cluster,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Standalone => "standalone",
            Backend::Replicated => "standalone+replica",
            Backend::Cluster => "cluster",
        }
    }
}

/// One configuration of the matrix.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Shape {
    backend: Backend,
    partitions: u32,
    /// Processes per stage.
    processes: u32,
}

impl Shape {
    fn label(&self) -> String {
        format!(
            "{} P={} {}+{}",
            self.backend.name(),
            self.partitions,
            self.processes,
            self.processes
        )
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cluster_bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(&args)) {
        Ok(report) => {
            print!("{}", report.text());
            if args.json {
                println!("{}", report.json());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cluster_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn step(what: &str) {
    eprintln!("cluster_bench: {what}…");
}

/// Runs `f` (a testkit call, which panics on failure) with the panic turned into a [`Failure`];
/// on a worker thread that may block.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    tokio::task::block_in_place(|| std::panic::catch_unwind(AssertUnwindSafe(f))).map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "it panicked".into());
        Failure(format!("{what}: {why}"))
    })
}

/// What every run shares: the strata binary, the configuration and schema it copies, the
/// database.
struct Ctx {
    strata: PathBuf,
    /// The configuration file, parsed, `schemas_dir` not yet replaced.
    config: toml::Table,
    /// The `metrics` schema, parsed as TOML.
    schema: toml::Table,
    pg: PostgresTarget,
    database_url: String,
    events: u64,
    timeout: Duration,
    placement: Placement,
}

impl Ctx {
    fn new(args: &Args) -> Result<Self> {
        let strata = match &args.strata {
            Some(p) => p.clone(),
            None => std::env::current_exe()
                .context(|| "cannot find this executable's folder".into())?
                .with_file_name("strata"),
        };
        if !strata.is_file() {
            return fail(format!(
                "no strata binary at {}: build it with `cargo build --release -p strata --bin \
                 strata` or pass --strata",
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
        let config: toml::Table =
            toml::from_str(&text).context(|| format!("parsing {}", config_src.display()))?;
        let schemas_dir = config
            .get("schemas_dir")
            .and_then(|v| v.as_str())
            .unwrap_or("schemas");
        let schemas_dir = config_src
            .parent()
            .unwrap_or(Path::new("."))
            .join(schemas_dir);
        let (schema_text, _) = find_schema(&schemas_dir, TABLE)?;
        let schema: toml::Table = toml::from_str(&schema_text)
            .context(|| format!("parsing the `{TABLE}` schema in {}", schemas_dir.display()))?;
        let pg = strata_pipeline::db::postgres_config(&args.database_url)
            .context(|| "invalid --database-url / DATABASE_URL".into())?;
        if !pg.get_dbname().is_some_and(|db| db.contains("bench")) {
            return fail(format!(
                "refusing database `{}`: the benchmark drops and recreates its database, so its \
                 name must contain `bench` (e.g. \
                 postgres://postgres@127.0.0.1:5432/strata_cluster_bench)",
                pg.get_dbname().unwrap_or("")
            ));
        }
        Ok(Ctx {
            strata,
            config,
            schema,
            pg,
            database_url: args.database_url.clone(),
            events: args.events,
            timeout: Duration::from_secs(args.timeout_secs),
            placement: args.placement,
        })
    }

    /// The schema with `partitions` and `partition_key = "source"`: its text and parsed form.
    fn schema(&self, partitions: u32) -> Result<(String, Schema)> {
        let mut t = self.schema.clone();
        t.insert("partitions".into(), i64::from(partitions).into());
        t.insert("partition_key".into(), "source".into());
        let text = t.to_string();
        let schema = Schema::from_toml(&format!("{TABLE}.toml"), &text)
            .context(|| format!("the `{TABLE}` schema with partitions = {partitions}"))?;
        Ok((text, schema))
    }
}

/// The servers of the benchmark's own.
struct Servers {
    standalone: Option<OwnRedis>,
    /// A master and its replica.
    replicated: Option<(OwnRedis, OwnRedis)>,
    cluster: Option<OwnCluster>,
}

impl Servers {
    /// The standalone server of `backend` and its replica's port.
    fn single(&self, backend: Backend) -> Result<(&OwnRedis, Option<u16>)> {
        match (backend, &self.standalone, &self.replicated) {
            (Backend::Standalone, Some(r), _) => Ok((r, None)),
            (Backend::Replicated, _, Some((m, r))) => Ok((m, Some(r.port))),
            _ => fail(format!("no {} redis-server", backend.name())),
        }
    }
}

/// A Redis node whose CPU is read.
struct Node {
    port: u16,
    master: bool,
    conn: MultiplexedConnection,
}

async fn node_conn(port: u16) -> Result<MultiplexedConnection> {
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str()).context(|| format!("Redis URL {url}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context(|| format!("connecting to Redis at {url}"))
}

/// What one run of one configuration measured.
struct Run {
    shape: Shape,
    events: u64,
    /// Pre-load (not timed).
    produce: Duration,
    /// Spawn → drained and counted.
    elapsed: Duration,
    /// utime + stime of the stage processes.
    strata_cpu: f64,
    /// The part of [`Self::strata_cpu`] the `strata ingest` processes used (the rest is the
    /// batch-writers'): which stage a change of cost per event is in.
    ingest_cpu: f64,
    /// Kernel time, page faults and wake-ups of the `strata ingest` processes, then of the
    /// `strata batch-writer` processes: where a change of [`Self::strata_cpu`] goes.
    usage: [machine::ProcessUsage; 2],
    /// PostgreSQL processes serving the database (and the server's own).
    postgres_cpu: f64,
    /// Every CPU of the machine, busy with anything.
    machine_cpu: f64,
    /// Masters (sorted by port), then replicas.
    nodes: Vec<NodeUse>,
    /// 1-minute load average just before the timed phase.
    load_before: f64,
    /// Transactions committed in the database during the timed phase (`pg_stat_database`,
    /// read once the stage processes have exited and flushed their statistics): about one per
    /// COPY batch, plus the benchmark's own few queries.
    postgres_commits: i64,
    /// Frames ingest wrote (entries added to every partition's `rows`): the events per frame
    /// is what each frame's costs (a commit step, a writer entry) are shared by.
    frames: u64,
    /// Per command, calls and microseconds over the masters in the timed phase (`INFO
    /// commandstats` after `CONFIG RESETSTAT`): what Redis's CPU per event went to.
    commands: std::collections::BTreeMap<String, (u64, u64)>,
    nproc: usize,
}

/// One Redis node's part in a run.
struct NodeUse {
    port: u16,
    master: bool,
    /// Partitions it serves (masters).
    partitions: Vec<u32>,
    /// Events pre-loaded into those partitions.
    events: u64,
    /// CPU seconds during the timed phase.
    cpu: f64,
}

impl Run {
    fn eps(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn masters(&self) -> impl Iterator<Item = &NodeUse> {
        self.nodes.iter().filter(|n| n.master)
    }

    fn redis_cpu(&self) -> f64 {
        self.masters().map(|n| n.cpu).fold(0.0, |a, b| a + b)
    }

    fn replicas_cpu(&self) -> f64 {
        self.nodes
            .iter()
            .filter(|n| !n.master)
            .map(|n| n.cpu)
            .fold(0.0, |a, b| a + b)
    }

    fn serving(&self) -> usize {
        self.masters().filter(|n| !n.partitions.is_empty()).count()
    }

    /// CPU seconds per million events.
    fn per_million(&self, cpu: f64) -> f64 {
        cpu * 1e6 / self.events as f64
    }

    /// Everything else: the benchmark's polling, the kernel, other processes.
    fn other(&self) -> f64 {
        let known = self.strata_cpu + self.redis_cpu() + self.replicas_cpu() + self.postgres_cpu;
        (self.machine_cpu - known).max(0.0)
    }

    fn available(&self) -> f64 {
        self.nproc as f64 * self.elapsed.as_secs_f64()
    }

    fn quiet(&self) -> bool {
        self.other() <= NOISY_SHARE * self.available()
    }

    /// One core per master: master m saturates at E / C_m events/s, so the Redis tier at
    /// E / max_m C_m.
    fn redis_ceiling(&self) -> f64 {
        let busiest = self.masters().map(|n| n.cpu).fold(0.0, f64::max);
        self.events as f64 / busiest.max(1e-9)
    }

    /// The same with the serving masters' CPU split perfectly evenly over them.
    fn even_ceiling(&self) -> f64 {
        let serving: f64 = self
            .masters()
            .filter(|n| !n.partitions.is_empty())
            .map(|n| n.cpu)
            .sum();
        self.serving().max(1) as f64 * self.events as f64 / serving.max(1e-9)
    }

    /// Events/s one core of strata processes handles (strata scales by more processes).
    fn strata_per_core(&self) -> f64 {
        self.events as f64 / self.strata_cpu.max(1e-9)
    }

    /// Events/s one core of PostgreSQL handles.
    fn postgres_per_core(&self) -> f64 {
        self.events as f64 / self.postgres_cpu.max(1e-9)
    }
}

/// All runs of one configuration; the median by events/s is the one reported.
struct ShapeReport {
    median: Run,
    all_eps: Vec<f64>,
    all_redis_ceilings: Vec<f64>,
    all_strata_per_m: Vec<f64>,
    all_redis_per_m: Vec<f64>,
}

struct Report {
    machine: Machine,
    redis_version: String,
    postgres_version: String,
    events: u64,
    runs: u32,
    placement: Placement,
    shapes: Vec<ShapeReport>,
}

async fn bench(args: &Args) -> Result<Report> {
    if args.events == 0 {
        return fail("--events must be at least 1");
    }
    if let Some(p) = args
        .partitions
        .iter()
        .find(|p| **p == 0 || **p > streams::keys::MAX_PARTITIONS)
    {
        return fail(format!(
            "--partitions: {p} is not between 1 and {}",
            streams::keys::MAX_PARTITIONS
        ));
    }
    if args.processes.contains(&0) {
        return fail("--processes: each count must be at least 1");
    }
    let ctx = Ctx::new(args)?;
    let mut shapes = Vec::new();
    let singles = [
        (Backend::Standalone, !args.no_standalone),
        (Backend::Replicated, !args.no_standalone_replica),
    ];
    for (backend, _) in singles.iter().filter(|(_, on)| *on) {
        for &k in &args.processes {
            shapes.push(Shape {
                backend: *backend,
                partitions: 1,
                processes: k,
            });
        }
    }
    for &p in &args.partitions {
        for &k in &args.processes {
            shapes.push(Shape {
                backend: Backend::Cluster,
                partitions: p,
                processes: k,
            });
        }
    }
    if shapes.is_empty() {
        return fail("nothing to measure");
    }

    let mut servers = Servers {
        standalone: None,
        replicated: None,
        cluster: None,
    };
    if shapes.iter().any(|s| s.backend == Backend::Standalone) {
        step("starting a standalone redis-server (no persistence)");
        servers.standalone = Some(guarded("starting redis-server", OwnRedis::start_ephemeral)?);
    }
    if shapes.iter().any(|s| s.backend == Backend::Replicated) {
        step("starting a standalone redis-server with a replica (no persistence)");
        servers.replicated = Some(guarded("starting redis-server and a replica", || {
            let master = OwnRedis::start_ephemeral();
            let replica = master.start_replica();
            (master, replica)
        })?);
    }
    if shapes.iter().any(|s| s.backend == Backend::Cluster) {
        step("starting a Redis Cluster: 3 masters + 3 replicas (no persistence)");
        servers.cluster = Some(guarded("starting the Redis Cluster", OwnCluster::start)?);
    }
    let any_port = servers
        .standalone
        .as_ref()
        .or(servers.replicated.as_ref().map(|(m, _)| m))
        .map(|r| r.port)
        .or_else(|| servers.cluster.as_ref().map(|c| c.ports()[0]))
        .unwrap_or_default();
    let redis_version = redis_version(&mut node_conn(any_port).await?).await?;

    let mut runs: Vec<Vec<Run>> = shapes.iter().map(|_| Vec::new()).collect();
    let result = async {
        for run in 1..=args.runs {
            for (i, shape) in shapes.iter().enumerate() {
                step(&format!(
                    "run {run} of {}: {} ({} events)",
                    args.runs,
                    shape.label(),
                    thousands(args.events)
                ));
                let r = one_run(&ctx, *shape, &servers).await?;
                step(&format!(
                    "{}: {} events/s, Redis ceiling {} events/s",
                    shape.label(),
                    thousands(r.eps().round() as u64),
                    thousands(r.redis_ceiling().round() as u64)
                ));
                runs[i].push(r);
            }
        }
        Ok::<_, Failure>(())
    }
    .await;
    let db = connect(&ctx.pg).await;
    let postgres_version = match &db {
        Ok(db) => db
            .query_one("SHOW server_version", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    drop(db);
    let dropped = drop_database(&ctx.pg).await;
    result?;
    dropped?;

    let shapes = runs
        .into_iter()
        .map(|mut rs| {
            let all_eps = rs.iter().map(Run::eps).collect();
            let all_redis_ceilings = rs.iter().map(Run::redis_ceiling).collect();
            let all_strata_per_m = rs.iter().map(|r| r.per_million(r.strata_cpu)).collect();
            let all_redis_per_m = rs.iter().map(|r| r.per_million(r.redis_cpu())).collect();
            rs.sort_by(|a, b| a.eps().total_cmp(&b.eps()));
            ShapeReport {
                median: rs.swap_remove(rs.len() / 2),
                all_eps,
                all_redis_ceilings,
                all_strata_per_m,
                all_redis_per_m,
            }
        })
        .collect();
    Ok(Report {
        machine: Machine::read(),
        redis_version,
        postgres_version,
        events: args.events,
        runs: args.runs,
        placement: args.placement,
        shapes,
    })
}

/// Events per partition that `strata produce --count events` sends: its own synthesis and
/// partition function, without sending anything.
fn predicted_counts(schema: &Schema, events: u64) -> Vec<u64> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    let mut counts = vec![0; schema.partitions.max(1) as usize];
    for seq in 0..events {
        let fields = strata_stages::produce::synthesize(schema, seq, &mut rng);
        counts[strata_stages::produce::partition_of(schema, seq, &fields) as usize] += 1;
    }
    counts
}

/// The master each partition should be on: largest partition first onto the least loaded
/// master, a partition staying on its current master when that one is among the least loaded.
fn spread(counts: &[u64], current: &[u16], masters: &[u16]) -> Vec<u16> {
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|a, b| counts[*b].cmp(&counts[*a]).then(a.cmp(b)));
    let mut load = vec![0u64; masters.len()];
    let mut placed = vec![0u16; counts.len()];
    for p in order {
        let least = load.iter().copied().min().unwrap_or(0);
        let m = masters
            .iter()
            .position(|m| *m == current[p])
            .filter(|&i| load[i] == least)
            .or_else(|| load.iter().position(|l| *l == least))
            .unwrap_or(0);
        load[m] += counts[p];
        placed[p] = masters[m];
    }
    placed
}

/// Empties every master; on the cluster, places the partitions; returns the nodes (masters
/// sorted by port, then replicas) and, per master port, the partitions it serves.
async fn prepare_redis(
    ctx: &Ctx,
    shape: Shape,
    schema: &Schema,
    servers: &Servers,
) -> Result<(Vec<Node>, Vec<u16>)> {
    match shape.backend {
        Backend::Standalone | Backend::Replicated => {
            let (r, replica) = servers.single(shape.backend)?;
            let mut conn = node_conn(r.port).await?;
            flushall(&mut conn, r.port).await?;
            let mut nodes = vec![Node {
                port: r.port,
                master: true,
                conn,
            }];
            if let Some(port) = replica {
                nodes.push(Node {
                    port,
                    master: false,
                    conn: node_conn(port).await?,
                });
            }
            Ok((nodes, vec![r.port; shape.partitions as usize]))
        }
        Backend::Cluster => {
            let Some(c) = &servers.cluster else {
                return fail("no Redis Cluster");
            };
            let mut masters = guarded("CLUSTER NODES", || c.masters())?;
            masters.sort_unstable();
            if masters.len() != 3 {
                return fail(format!("the cluster has {} masters, not 3", masters.len()));
            }
            let mut nodes = Vec::new();
            for port in c.ports() {
                let mut conn = node_conn(port).await?;
                let master = masters.contains(&port);
                if master {
                    flushall(&mut conn, port).await?;
                }
                nodes.push(Node { port, master, conn });
            }
            nodes.sort_by_key(|n| (!n.master, n.port));
            let slots: Vec<u16> = (0..shape.partitions)
                .map(|p| {
                    guarded("CLUSTER KEYSLOT", || {
                        c.keyslot(&StreamKind::Telemetry.partition_key(TABLE, p))
                    })
                })
                .collect::<Result<_>>()?;
            let current: Vec<u16> = slots
                .iter()
                .map(|s| guarded("CLUSTER NODES", || c.master_of(*s)))
                .collect::<Result<_>>()?;
            let placed = match ctx.placement {
                Placement::Natural => current,
                Placement::Spread => {
                    let counts = predicted_counts(schema, ctx.events);
                    let want = spread(&counts, &current, &masters);
                    for (p, (&to, &from)) in want.iter().zip(&current).enumerate() {
                        if to != from {
                            step(&format!(
                                "placing partition {p}: slot {} from :{from} to :{to}",
                                slots[p]
                            ));
                            guarded(&format!("moving slot {} to :{to}", slots[p]), || {
                                c.migrate_slot(slots[p], to, Duration::ZERO)
                            })?;
                        }
                    }
                    want
                }
            };
            Ok((nodes, placed))
        }
    }
}

async fn flushall(conn: &mut MultiplexedConnection, port: u16) -> Result<()> {
    redis::cmd("FLUSHALL")
        .arg("SYNC")
        .query_async::<()>(conn)
        .await
        .context(|| format!("FLUSHALL on :{port}"))
}

/// The folder the stage processes run in: a config whose `[redis]` points at this run's
/// servers and whose `schemas_dir` holds only the `metrics` schema.
struct RunDir {
    dir: PathBuf,
    config: PathBuf,
    redis_url: String,
    redis: RedisConfig,
}

fn write_run_dir(ctx: &Ctx, shape: Shape, schema_text: &str, servers: &Servers) -> Result<RunDir> {
    let dir = std::env::temp_dir().join(format!(
        "strata-cluster-bench-{}-{}-p{}-k{}",
        std::process::id(),
        shape.backend.name(),
        shape.partitions,
        shape.processes
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let schemas = dir.join("schemas");
    std::fs::create_dir_all(&schemas).context(|| format!("creating {}", schemas.display()))?;
    std::fs::write(schemas.join(format!("{TABLE}.toml")), schema_text)
        .context(|| format!("writing into {}", schemas.display()))?;
    let mut table = ctx.config.clone();
    table.insert("schemas_dir".into(), "schemas".into());
    let redis_entry = table
        .entry("redis")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    let Some(redis_table) = redis_entry.as_table_mut() else {
        return fail("[redis] of the configuration is not a table");
    };
    let (redis_url, redis) = match shape.backend {
        Backend::Standalone | Backend::Replicated => {
            let (r, _) = servers.single(shape.backend)?;
            let url = r.url();
            redis_table.insert("url".into(), url.clone().into());
            redis_table.insert("cluster".into(), false.into());
            redis_table.remove("nodes");
            let redis = RedisConfig {
                url: url.clone(),
                ..Default::default()
            };
            (url, redis)
        }
        Backend::Cluster => {
            let Some(c) = &servers.cluster else {
                return fail("no Redis Cluster");
            };
            let urls = c.urls();
            redis_table.insert("url".into(), urls[0].clone().into());
            redis_table.insert("cluster".into(), true.into());
            redis_table.insert(
                "nodes".into(),
                toml::Value::Array(urls.iter().map(|u| u.clone().into()).collect()),
            );
            let redis = RedisConfig {
                url: urls[0].clone(),
                cluster: true,
                nodes: urls.clone(),
                ..Default::default()
            };
            (urls[0].clone(), redis)
        }
    };
    let config = dir.join("config.toml");
    std::fs::write(&config, table.to_string())
        .context(|| format!("writing {}", config.display()))?;
    Ok(RunDir {
        dir,
        config,
        redis_url,
        redis,
    })
}

impl RunDir {
    /// `strata --config … <args>` with this run's URLs in its environment (overriding any the
    /// benchmark was started with) and an admin endpoint on a free port.
    fn strata(&self, ctx: &Ctx, args: &[&str]) -> Command {
        let mut cmd = Command::new(&ctx.strata);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .current_dir(&self.dir)
            .env("DATABASE_URL", &ctx.database_url)
            .env("REDIS_URL", &self.redis_url)
            .env_remove("DATABASE_URL_FILE")
            .env_remove("REDIS_URL_FILE")
            .env("STRATA_ADMIN_LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    async fn run_to_end(&self, ctx: &Ctx, args: &[&str]) -> Result<()> {
        let what = || format!("`strata {}`", args.join(" "));
        let out = self
            .strata(ctx, args)
            .output()
            .await
            .context(|| format!("starting {} ({})", what(), ctx.strata.display()))?;
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

/// A stage process of the timed phase.
struct Proc {
    name: String,
    /// The stage it runs (`ingest` or `batch-writer`).
    stage: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "last lines of {}'s log ({}):\n{}",
            self.name,
            self.log.display(),
            tail(&text, 20)
        )
    }
}

/// Every stream the timed phase waits on: (stream, stage) per partition.
fn drain_targets(partitions: u32) -> Vec<(String, &'static StageSpec)> {
    let mut out = Vec::new();
    for p in 0..partitions {
        for stage in [&ingest::STAGE, &writer::STAGE] {
            if let Some(key) = stage.input_key(TABLE, p) {
                out.push((key, stage));
            }
        }
    }
    out
}

/// Pre-load and timed phase of one configuration.
async fn one_run(ctx: &Ctx, shape: Shape, servers: &Servers) -> Result<Run> {
    let (schema_text, schema) = ctx.schema(shape.partitions)?;
    let (mut nodes, placed) = prepare_redis(ctx, shape, &schema, servers).await?;
    let run = write_run_dir(ctx, shape, &schema_text, servers)?;
    let result = measure(ctx, shape, &run, &mut nodes, &placed).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&run.dir);
    } else {
        eprintln!(
            "cluster_bench: the run's folder (config, logs) is kept: {}",
            run.dir.display()
        );
    }
    result
}

async fn measure(
    ctx: &Ctx,
    shape: Shape,
    run: &RunDir,
    nodes: &mut [Node],
    placed: &[u16],
) -> Result<Run> {
    let n = ctx.events;
    reset_database(&ctx.pg).await?;
    run.run_to_end(ctx, &["migrate"]).await?;
    let db = connect(&ctx.pg).await?;

    let config = strata_stages::Config {
        redis: run.redis.clone(),
        ..Default::default()
    };
    let pool = strata_pipeline::db::redis_pool(&config)
        .context(|| format!("a Redis connection to {}", run.redis_url))?;
    let mut redis: RedisConnection = pool
        .get()
        .await
        .context(|| format!("a Redis connection to {}", run.redis_url))?;

    let t = Instant::now();
    let count = n.to_string();
    run.run_to_end(ctx, &["produce", "--table", TABLE, "--count", &count])
        .await?;
    let produce = t.elapsed();
    // Events per partition, as produced.
    let mut per_partition = Vec::new();
    for p in 0..shape.partitions {
        let key = StreamKind::Telemetry.partition_key(TABLE, p);
        per_partition.push(
            streams::len(&mut redis, &key)
                .await
                .context(|| format!("XLEN {key}"))?,
        );
    }
    let loaded: u64 = per_partition.iter().sum();
    if loaded != n {
        return fail(format!(
            "`strata produce` left {loaded} events in the {} partitions, not {n}",
            shape.partitions
        ));
    }
    let mut uses: Vec<NodeUse> = nodes
        .iter()
        .map(|node| {
            let partitions: Vec<u32> = if node.master {
                (0..shape.partitions)
                    .filter(|p| placed[*p as usize] == node.port)
                    .collect()
            } else {
                Vec::new()
            };
            NodeUse {
                port: node.port,
                master: node.master,
                events: partitions.iter().map(|p| per_partition[*p as usize]).sum(),
                partitions,
                cpu: 0.0,
            }
        })
        .collect();
    checkpoint(&db).await;

    let targets = drain_targets(shape.partitions);
    let count_sql = format!("SELECT count(*) FROM {}", ident(TABLE));
    let database = ctx.pg.get_dbname().unwrap_or_default().to_string();
    let load_before = load_average();
    let commits_before = commits(&db).await?;
    let mut cpu_before = Vec::new();
    for node in nodes.iter_mut() {
        cpu_before.push(redis_cpu_secs(&mut node.conn).await?);
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut node.conn)
            .await
            .context(|| format!("CONFIG RESETSTAT on :{}", node.port))?;
    }
    let machine_before = machine::machine_busy_secs().unwrap_or(0.0);
    let postgres_before = machine::postgres_cpu_secs(&database);

    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..shape.processes {
        for stage in ["ingest", "batch-writer"] {
            let name = format!("{stage}-{i}");
            let log = run.dir.join(format!("{name}.log"));
            let file =
                std::fs::File::create(&log).context(|| format!("creating {}", log.display()))?;
            let child = run
                .strata(ctx, &[stage])
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .context(|| format!("starting `strata {stage}` ({})", ctx.strata.display()))?;
            let Some(pid) = child.id() else {
                return fail(format!("`strata {stage}` exited at once"));
            };
            procs.push(Proc {
                name,
                stage,
                child,
                pid,
                log,
            });
        }
    }

    let mut commands = std::collections::BTreeMap::new();
    let (elapsed, strata_cpu, ingest_cpu, usage, machine_cpu, postgres_cpu) = loop {
        for p in &mut procs {
            if let Some(status) = p
                .child
                .try_wait()
                .context(|| format!("waiting for {}", p.name))?
            {
                return fail(format!(
                    "{} exited before the pipeline drained ({status}); {}",
                    p.name,
                    p.log_tail()
                ));
            }
        }
        // Per partition, ingest's input first: ingest forwards and acknowledges in one atomic
        // step and the writer acknowledges only after COMMIT, so once both groups of every
        // partition are drained every row is committed.
        let mut drained = true;
        for (stream, stage) in &targets {
            let ok = streams::ConsumerGroup::new(stream, stage.group())
                .drained(&mut redis)
                .await
                .context(|| format!("XINFO GROUPS {stream}"))?;
            if !ok {
                drained = false;
                break;
            }
        }
        if drained {
            let elapsed = started.elapsed();
            let machine_cpu = machine::machine_busy_secs().unwrap_or(0.0) - machine_before;
            let mut usage = [machine::ProcessUsage::default(); 2];
            for p in &procs {
                let Some(u) = machine::process_usage(p.pid) else {
                    return fail(format!("could not read /proc/{}/stat of {}", p.pid, p.name));
                };
                let stage = usize::from(p.stage != "ingest");
                usage[stage] = usage[stage].plus(u);
            }
            let ingest_cpu = usage[0].cpu_secs();
            let strata_cpu = ingest_cpu + usage[1].cpu_secs();
            let postgres_cpu = (machine::postgres_cpu_secs(&database) - postgres_before).max(0.0);
            for ((node, before), u) in nodes.iter_mut().zip(&cpu_before).zip(&mut uses) {
                u.cpu = (redis_cpu_secs(&mut node.conn).await? - before).max(0.0);
                if node.master {
                    for (name, (calls, usec)) in redis_command_stats(&mut node.conn).await? {
                        let c = commands.entry(name).or_insert((0, 0));
                        (c.0, c.1) = (c.0 + calls, c.1 + usec);
                    }
                }
            }
            let rows: i64 = db
                .query_one(&count_sql, &[])
                .await
                .context(|| format!("counting the rows of {TABLE}"))?
                .get(0);
            if rows as u64 != n {
                let dead = dead_letters(&mut redis, shape.partitions).await?;
                return fail(format!(
                    "the pipeline drained but {TABLE} holds {rows} rows, not {n} (dead letters: \
                     {dead}); {}",
                    procs
                        .iter()
                        .map(Proc::log_tail)
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
            break (
                elapsed,
                strata_cpu,
                ingest_cpu,
                usage,
                machine_cpu,
                postgres_cpu,
            );
        }
        if started.elapsed() > ctx.timeout {
            return fail(format!(
                "the pipeline has not drained after {} s; raise --timeout-secs or look at the \
                 logs in {}",
                ctx.timeout.as_secs(),
                run.dir.display()
            ));
        }
        tokio::time::sleep(POLL).await;
    };

    for p in &procs {
        // SAFETY: kill(2) with the PID of our own child, not reaped yet (try_wait returned
        // None above), so the PID cannot have been reused.
        if unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGTERM) } != 0 {
            return fail(format!(
                "sending SIGTERM to {} (pid {}): {}",
                p.name,
                p.pid,
                std::io::Error::last_os_error()
            ));
        }
    }
    for p in &mut procs {
        let status = match tokio::time::timeout(SHUTDOWN_GRACE, p.child.wait()).await {
            Ok(status) => status.context(|| format!("waiting for {} to exit", p.name))?,
            Err(_) => {
                return fail(format!(
                    "{} did not exit within {} s of SIGTERM; {}",
                    p.name,
                    SHUTDOWN_GRACE.as_secs(),
                    p.log_tail()
                ));
            }
        };
        if !status.success() {
            return fail(format!(
                "{} exited with {status} after SIGTERM (expected 0); {}",
                p.name,
                p.log_tail()
            ));
        }
    }
    let dead = dead_letters(&mut redis, shape.partitions).await?;
    if dead != 0 {
        return fail(format!("{dead} dead letters after a clean run"));
    }
    // Backends send their statistics on exit; give the collector a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let postgres_commits = commits(&db).await? - commits_before;
    let frames = frames_written(&mut redis, shape.partitions).await?;
    Ok(Run {
        shape,
        events: n,
        produce,
        elapsed,
        strata_cpu,
        ingest_cpu,
        usage,
        postgres_cpu,
        machine_cpu,
        nodes: uses,
        load_before,
        postgres_commits,
        frames,
        commands,
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Entries ever added to every partition's `rows` stream (XINFO STREAM `entries-added`): the
/// frames ingest wrote.
async fn frames_written(redis: &mut RedisConnection, partitions: u32) -> Result<u64> {
    let mut total = 0;
    for p in 0..partitions {
        let key = StreamKind::Rows.partition_key(TABLE, p);
        let info: redis::Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&key)
            .query_async(redis)
            .await
            .context(|| format!("XINFO STREAM {key}"))?;
        total += streams::reply::field_pairs(info)
            .iter()
            .find(|(k, _)| k == "entries-added")
            .and_then(|(_, v)| streams::reply::count(v))
            .unwrap_or(0);
    }
    Ok(total)
}

/// Entries in the dead-letter streams of every partition.
async fn dead_letters(redis: &mut RedisConnection, partitions: u32) -> Result<u64> {
    let mut total = 0;
    for p in 0..partitions {
        for kind in [StreamKind::Telemetry, StreamKind::Rows] {
            let key = streams::dlq_stream(&kind.partition_key(TABLE, p));
            total += streams::len(redis, &key)
                .await
                .context(|| format!("XLEN {key}"))?;
        }
    }
    Ok(total)
}

/// `xact_commit` of the benchmark's database.
async fn commits(db: &tokio_postgres::Client) -> Result<i64> {
    db.query_one(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .context(|| "reading pg_stat_database".into())
    .map(|r| r.get(0))
}

/// The 1-minute load average (/proc/loadavg); 0 when unreadable.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn eps_text(x: f64) -> String {
    thousands(x.round() as u64)
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

fn list(xs: &[f64], f: impl Fn(f64) -> String) -> String {
    xs.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

impl Report {
    /// A heading, then one line per configuration: its label and what `line` says of it.
    fn section(&self, out: &mut String, heading: &str, line: impl Fn(&ShapeReport) -> String) {
        out.push_str(heading);
        for s in &self.shapes {
            out.push_str(&format!("  {:<27} {}\n", s.median.shape.label(), line(s)));
        }
    }

    fn text(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        out.push_str("\nstrata scale-out: partitions on a Redis Cluster (3 masters + 3 replicas) vs standalone Redis\n");
        out.push_str(&format!(
            "  machine   {} CPUs, {}, {:.1} GiB RAM; Redis {}, PostgreSQL {}\n",
            m.nproc,
            m.cpu,
            m.mem_total_mib as f64 / 1024.0,
            self.redis_version,
            self.postgres_version
        ));
        out.push_str(&format!(
            "  load      {} metrics events per run (pre-loaded, not timed); {} run(s), the median \
             by events/s shown; placement {}\n\n",
            thousands(self.events),
            self.runs,
            self.placement.name()
        ));
        out.push_str(
            "  configuration                 events/s   time s │ CPU-s per 1M events: strata  Redis  replicas  PostgreSQL │ Redis ceiling, 1 core/master\n",
        );
        for s in &self.shapes {
            let r = &s.median;
            let replicas = if r.shape.backend != Backend::Standalone {
                format!("{:.2}", r.per_million(r.replicas_cpu()))
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "  {:<27} {:>10} {:>8.2} │ {:>27.2} {:>6.2} {:>9} {:>11.2} │ {:>12} events/s{}\n",
                r.shape.label(),
                eps_text(r.eps()),
                r.elapsed.as_secs_f64(),
                r.per_million(r.strata_cpu),
                r.per_million(r.redis_cpu()),
                replicas,
                r.per_million(r.postgres_cpu),
                eps_text(r.redis_ceiling()),
                if r.quiet() { "" } else { "  (not quiet)" }
            ));
        }
        self.section(&mut out, "\n  per master in the timed phase: CPU-s (share of the masters' CPU) and the events of its partitions (share)\n", |s| {
            let r = &s.median;
            let total = r.redis_cpu();
            let masters: Vec<String> = r
                .masters()
                .map(|n| {
                    let parts = if n.partitions.is_empty() {
                        "-".to_string()
                    } else {
                        n.partitions
                            .iter()
                            .map(|p| format!("p{p}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    format!(
                        ":{} [{}] {:.2} s ({:.0} %), ev {:.0} %",
                        n.port,
                        parts,
                        n.cpu,
                        percent(n.cpu, total),
                        percent(n.events as f64, r.events as f64)
                    )
                })
                .collect();
            masters.join(" │ ")
        });
        self.section(&mut out, "\n  where the CPU went (median run): busy of available, strata (ingest + writer) / Redis masters / replicas / PostgreSQL / other\n", |s| {
            let r = &s.median;
            format!(
                "{:.1} of {:.1} CPU-s: {:.2} ({:.2} + {:.2}) / {:.2} / {:.2} / {:.2} / {:.2}; load avg before {:.2}; pre-load {:.1} s; PostgreSQL commits {}; frames {}",
                r.machine_cpu,
                r.available(),
                r.strata_cpu,
                r.ingest_cpu,
                r.strata_cpu - r.ingest_cpu,
                r.redis_cpu(),
                r.replicas_cpu(),
                r.postgres_cpu,
                r.other(),
                r.load_before,
                r.produce.as_secs_f64(),
                r.postgres_commits,
                r.frames
            )
        });
        self.section(&mut out, "\n  strata per million events (median run), ingest │ writer: user / system CPU-s, minor page faults, voluntary / involuntary context switches\n", |s| {
            let r = &s.median;
            let stages: Vec<String> = r
                .usage
                .iter()
                .map(|u| {
                    format!(
                        "{:.2} / {:.2}, {:.0}, {:.0} / {:.0}",
                        r.per_million(u.user_secs),
                        r.per_million(u.sys_secs),
                        r.per_million(u.minor_faults as f64),
                        r.per_million(u.voluntary_switches as f64),
                        r.per_million(u.involuntary_switches as f64)
                    )
                })
                .collect();
            stages.join(" │ ")
        });
        self.section(&mut out, "\n  Redis masters' commands (median run): calls / ms inside Redis (wall time: a busy box's preemption counts), the five costliest\n", |s| {
            let mut top: Vec<_> = s.median.commands.iter().collect();
            top.sort_by_key(|(_, (_, usec))| std::cmp::Reverse(*usec));
            let list: Vec<String> = top
                .iter()
                .take(5)
                .map(|(name, (calls, usec))| {
                    format!("{name} {calls} / {:.0}", *usec as f64 / 1000.0)
                })
                .collect();
            list.join(" · ")
        });
        self.section(&mut out, "\n  projection, one core per master (model: master m saturates at E / C_m events/s, C_m its CPU-s for the E events;\n  the Redis tier at E / max C_m; strata and PostgreSQL then bound it at their cores × E / their CPU-s)\n", |s| {
            let r = &s.median;
            format!(
                "Redis {} events/s ({} if perfectly even over {} master(s)); per core: strata {}, PostgreSQL {} events/s",
                eps_text(r.redis_ceiling()),
                eps_text(r.even_ceiling()),
                r.serving(),
                eps_text(r.strata_per_core()),
                eps_text(r.postgres_per_core()),
            )
        });
        if self.runs > 1 {
            self.section(
                &mut out,
                "\n  every run: events/s; strata / Redis CPU-s per 1M events; Redis ceiling\n",
                |s| {
                    format!(
                        "{}; strata {}; Redis {}; ceiling {}",
                        list(&s.all_eps, eps_text),
                        list(&s.all_strata_per_m, |x| format!("{x:.2}")),
                        list(&s.all_redis_per_m, |x| format!("{x:.2}")),
                        list(&s.all_redis_ceilings, eps_text),
                    )
                },
            );
        }
        if self.shapes.iter().any(|s| !s.median.quiet()) {
            out.push_str(&format!(
                "\n  note: runs marked (not quiet) had other work above {:.0} % of the CPU\n",
                NOISY_SHARE * 100.0
            ));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let shapes: Vec<serde_json::Value> = self
            .shapes
            .iter()
            .map(|s| {
                let r = &s.median;
                let total = r.redis_cpu();
                let masters: Vec<serde_json::Value> = r
                    .masters()
                    .map(|n| {
                        serde_json::json!({
                            "port": n.port,
                            "partitions": n.partitions,
                            "events": n.events,
                            "event_share": round3(n.events as f64 / r.events as f64),
                            "cpu_seconds": round3(n.cpu),
                            "cpu_share": round3(if total > 0.0 { n.cpu / total } else { 0.0 }),
                        })
                    })
                    .collect();
                let replicas: Vec<serde_json::Value> = r
                    .nodes
                    .iter()
                    .filter(|n| !n.master)
                    .map(|n| serde_json::json!({"port": n.port, "cpu_seconds": round3(n.cpu)}))
                    .collect();
                let usage: serde_json::Map<_, _> = ["ingest", "batch_writer"]
                    .iter()
                    .zip(&r.usage)
                    .map(|(stage, u)| {
                        let v = serde_json::json!({
                            "user_seconds": round3(u.user_secs),
                            "system_seconds": round3(u.sys_secs),
                            "minor_faults": u.minor_faults,
                            "voluntary_context_switches": u.voluntary_switches,
                            "involuntary_context_switches": u.involuntary_switches,
                        });
                        (stage.to_string(), v)
                    })
                    .collect();
                serde_json::json!({
                    "redis": r.shape.backend.name(),
                    "partitions": r.shape.partitions,
                    "processes_per_stage": r.shape.processes,
                    "events_per_s": r.eps().round(),
                    "seconds": round3(r.elapsed.as_secs_f64()),
                    "produce_seconds": round3(r.produce.as_secs_f64()),
                    "quiet_machine": r.quiet(),
                    "load_average_before": r.load_before,
                    "postgres_commits": r.postgres_commits,
                    "frames": r.frames,
                    "redis_commands": r.commands.iter().map(|(k, (calls, usec))| (k.clone(), serde_json::json!({"calls": calls, "usec": usec}))).collect::<serde_json::Map<_, _>>(),
                    "cpu_seconds": {
                        "machine": round3(r.machine_cpu),
                        "available": round3(r.available()),
                        "strata": round3(r.strata_cpu),
                        "strata_ingest": round3(r.ingest_cpu),
                        "redis_masters": round3(total),
                        "redis_replicas": round3(r.replicas_cpu()),
                        "postgres": round3(r.postgres_cpu),
                        "other": round3(r.other()),
                    },
                    "cpu_seconds_per_million_events": {
                        "strata": round3(r.per_million(r.strata_cpu)),
                        "strata_ingest": round3(r.per_million(r.ingest_cpu)),
                        "redis_masters": round3(r.per_million(total)),
                        "redis_replicas": round3(r.per_million(r.replicas_cpu())),
                        "postgres": round3(r.per_million(r.postgres_cpu)),
                    },
                    "strata_usage": usage,
                    "masters": masters,
                    "replicas": replicas,
                    "projection_one_core_per_master": {
                        "redis_ceiling_events_per_s": r.redis_ceiling().round(),
                        "redis_even_ceiling_events_per_s": r.even_ceiling().round(),
                        "serving_masters": r.serving(),
                        "strata_events_per_s_per_core": r.strata_per_core().round(),
                        "postgres_events_per_s_per_core": r.postgres_per_core().round(),
                    },
                    "runs": {
                        "events_per_s": s.all_eps.iter().map(|x| x.round()).collect::<Vec<_>>(),
                        "strata_cpu_seconds_per_million": s.all_strata_per_m.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                        "redis_cpu_seconds_per_million": s.all_redis_per_m.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
                        "redis_ceiling_events_per_s": s.all_redis_ceilings.iter().map(|x| x.round()).collect::<Vec<_>>(),
                    },
                })
            })
            .collect();
        serde_json::json!({
            "benchmark": "cluster_scale_out",
            "events": self.events,
            "runs": self.runs,
            "placement": self.placement.name(),
            "redis_version": self.redis_version,
            "postgres_version": self.postgres_version,
            "machine": {
                "nproc": self.machine.nproc,
                "cpu": self.machine.cpu,
                "mem_total_mb": self.machine.mem_total_mib,
            },
            "model": "one core per master: master m saturates at E / C_m events/s (C_m: its CPU \
                      seconds for the E events); the Redis tier at E / max_m C_m; strata and \
                      PostgreSQL bound it at (their cores) × E / (their CPU seconds)",
            "configurations": shapes,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_the_largest_partitions_first() {
        // 6 partitions of 16, 19, 16, 13, 20, 16 events over 3 masters: 20+13, 19+16, 16+16.
        let counts = [16, 19, 16, 13, 20, 16];
        let current = [3, 2, 2, 3, 1, 2];
        let placed = spread(&counts, &current, &[1, 2, 3]);
        let mut load = [0u64; 3];
        for (p, m) in placed.iter().enumerate() {
            load[*m as usize - 1] += counts[p];
        }
        load.sort_unstable();
        assert_eq!(load, [32, 33, 35]);
        // One partition stays where it is.
        assert_eq!(spread(&[100], &[3], &[1, 2, 3]), vec![3]);
        // Three partitions go to three masters, the one already alone keeps its place.
        let placed = spread(&[29, 39, 32], &[3, 2, 2], &[1, 2, 3]);
        let mut distinct = placed.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{placed:?}");
        assert_eq!(placed[1], 2);
    }

    #[test]
    fn reports_shares_and_the_ceiling() {
        let node = |port, master, partitions: Vec<u32>, events, cpu| NodeUse {
            port,
            master,
            partitions,
            events,
            cpu,
        };
        let r = Run {
            shape: Shape {
                backend: Backend::Cluster,
                partitions: 3,
                processes: 1,
            },
            events: 1_000_000,
            produce: Duration::from_secs(1),
            elapsed: Duration::from_secs(4),
            strata_cpu: 0.9,
            ingest_cpu: 0.5,
            usage: Default::default(),
            postgres_cpu: 2.0,
            machine_cpu: 7.0,
            nodes: vec![
                node(1, true, vec![0], 300_000, 0.5),
                node(2, true, vec![1], 400_000, 0.6),
                node(3, true, vec![2], 300_000, 0.4),
                node(4, false, vec![], 0, 0.1),
            ],
            load_before: 0.1,
            postgres_commits: 30,
            frames: 500,
            commands: Default::default(),
            nproc: 2,
        };
        assert_eq!(r.eps(), 250_000.0);
        assert!((r.redis_cpu() - 1.5).abs() < 1e-9);
        assert!((r.redis_ceiling() - 1_000_000.0 / 0.6).abs() < 1e-3);
        assert!((r.even_ceiling() - 2_000_000.0).abs() < 1e-3);
        assert!((r.other() - 2.5).abs() < 1e-9);
        assert!(!r.quiet());
        assert_eq!(r.serving(), 3);
        let report = Report {
            machine: Machine {
                nproc: 2,
                cpu: "cpu".into(),
                mem_total_mib: 1024,
            },
            redis_version: "7".into(),
            postgres_version: "15".into(),
            events: 1_000_000,
            runs: 1,
            placement: Placement::Spread,
            shapes: vec![ShapeReport {
                median: r,
                all_eps: vec![250_000.0],
                all_redis_ceilings: vec![1_666_667.0],
                all_strata_per_m: vec![0.9],
                all_redis_per_m: vec![1.5],
            }],
        };
        let text = report.text();
        assert!(text.contains(":2 [p1] 0.60 s (40 %), ev 40 %"), "{text}");
        assert!(text.contains("(not quiet)"), "{text}");
        let json = report.json();
        let c = &json["configurations"][0];
        assert_eq!(c["masters"][1]["cpu_share"], 0.4);
        assert_eq!(
            c["projection_one_core_per_master"]["redis_ceiling_events_per_s"],
            1_666_667.0
        );
        assert_eq!(c["cpu_seconds_per_million_events"]["strata"], 0.9);
    }
}
