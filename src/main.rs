//! The `strata` binary: a thin command line over `strata-pipeline` and `strata-stages`.
//!
//! The `strata <stage>` subcommands are not written here: [`cli`] adds one per entry of
//! [`strata_stages::STAGES`] (its name and `about`), before `run`, which starts them all.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use strata_pipeline::config::TracingConfig;
use strata_pipeline::schema::{self, SchemaRef};
use strata_pipeline::streams;
use strata_stages::ops::dlq::{dlq, DlqAction, DlqOptions};
use strata_stages::ops::inspect::{inspect, InspectOptions};
use strata_stages::ops::status::{status, StatusOptions};
use strata_stages::produce::{produce, ProduceOptions};
use strata_stages::{ingest, writer, Config, StageSpec, StopError, HOT_PATH, STAGES};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Redis Streams → PostgreSQL/TimescaleDB telemetry pipeline"
)]
struct Cli {
    /// Configuration file; REDIS_URL and DATABASE_URL override its URLs.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Log format (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Admin endpoint address (/metrics, /healthz, /readyz); overrides [admin] listen.
    #[arg(long, global = true, env = "STRATA_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// None for a stage's subcommand (see [`cli`]).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database, strata's bookkeeping tables and every table in schemas/ (idempotent).
    Migrate {
        /// Then grant this runtime role what the stages need (the data tables go to a group
        /// role `<ROLE>_tables` it joins); run migrate itself as the owner role.
        #[arg(long, value_name = "ROLE")]
        grant: Option<String>,
    },
    /// Print the least-privilege Redis ACL rule of strata's processes (`ACL SETUSER …`); add
    /// the password with `ACL SETUSER <user> >password`.
    AclRule {
        /// The ACL user's name.
        #[arg(long, default_value = "strata")]
        user: String,
    },
    // One subcommand per stage goes here, from the registry (see `cli`).
    /// Run every stage in this process.
    Run,
    /// XADD synthetic events for a table (the reference producer and load generator).
    Produce {
        /// Table (a schema in schemas/).
        #[arg(long)]
        table: String,
        /// Events to send.
        #[arg(long)]
        count: u64,
        /// Events per second at most (default: as fast as Redis takes them).
        #[arg(long)]
        rate: Option<u64>,
        /// Events per pipelined round trip.
        #[arg(long, default_value_t = 1000)]
        pipeline: usize,
        /// Round trips in flight at once.
        #[arg(long, default_value_t = 2)]
        connections: usize,
        /// Wait while the stream holds more entries than this (0: never wait).
        #[arg(long, default_value_t = 2_000_000)]
        max_len: u64,
    },
    /// Per table and stream: length, lag, pending, consumers, dead letters, chunks.
    Status {
        /// One JSON document.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 s.
        #[arg(long)]
        watch: bool,
    },
    /// Print stream entries as JSON lines, decoding frames into rows.
    Inspect {
        /// Stream key, e.g. 'rows:{metrics}'.
        stream: String,
        /// Entries to print at most.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// First entry ID (inclusive).
        #[arg(long)]
        from: Option<String>,
    },
    /// List, replay or purge dead letters.
    Dlq {
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Migrate, run the pipeline, produce a load, wait until every event landed, and report.
    Demo {
        /// Table to load.
        #[arg(long, default_value = "metrics")]
        table: String,
        /// Events to send.
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print dead letters as JSON lines.
    List(DlqArgs),
    /// Re-add dead letters' original fields to their source stream, then remove them.
    Replay(DlqArgs),
    /// Delete dead letters.
    Purge(DlqArgs),
}

#[derive(clap::Args)]
struct DlqArgs {
    /// Source stream ('telemetry:{metrics}') or its dead-letter stream ('telemetry:{metrics}:dlq').
    #[arg(long)]
    stream: String,
    /// At most this many entries.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Only this dead-letter entry ID.
    #[arg(long)]
    id: Option<String>,
}

/// The command line: the derived [`Cli`] with one subcommand per registered stage, listed
/// after `migrate` and before `run`.
fn cli() -> clap::Command {
    let derived = Cli::command();
    let mut order = 0;
    let mut next = || {
        order += 1;
        order
    };
    let mut cli = derived
        .clone()
        .subcommand_required(true)
        .arg_required_else_help(true);
    for sub in derived.get_subcommands() {
        if sub.get_name() == "run" {
            for stage in STAGES {
                cli = cli.subcommand(
                    clap::Command::new(stage.name)
                        .about(stage.about)
                        .display_order(next()),
                );
            }
        }
        let n = next();
        cli = cli.mut_subcommand(sub.get_name(), |c| c.display_order(n));
    }
    cli
}

/// Parses the command line: the options and a derived command, or the stage to run.
fn parse() -> (Cli, Option<&'static StageSpec>) {
    let matches = cli().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let stage = matches
        .subcommand_name()
        .and_then(strata_stages::registry::find);
    (cli, stage)
}

fn main() -> ExitCode {
    // One crypto provider (aws-lc-rs) for every TLS connection: PostgreSQL, Redis, the lake and
    // the OTLP exporter, installed before any of them builds a rustls config.
    strata_pipeline::tls::install_crypto_provider();
    let (cli, stage) = parse();
    // Needs no config: printed where strata is to be deployed, before anything is set up.
    if let Some(Command::AclRule { user }) = &cli.command {
        print_acl_rule(user);
        return ExitCode::SUCCESS;
    }
    let (config, schemas) = match load(&cli) {
        Ok(loaded) => loaded,
        Err(e) => return fail(e.as_ref()),
    };
    let provider = init_logging(cli.log_format, &config.tracing);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(run(cli, stage, config, schemas));
    if let Some(p) = provider {
        // Flush the spans still batched.
        let _ = p.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if matches!(e.downcast_ref(), Some(StopError::Timeout { .. })) => {
            eprintln!("strata: {e}");
            ExitCode::from(EXIT_SHUTDOWN_TIMEOUT)
        }
        Err(e) => fail(e.as_ref()),
    }
}

/// Exit status when a graceful stop outlasted `[shutdown] timeout_ms` (nothing is lost: the
/// unfinished entries stay pending for another consumer). 0 is a clean stop, 1 an error, 130 a
/// second signal.
const EXIT_SHUTDOWN_TIMEOUT: u8 = 3;

/// Prints an error with its chain of causes.
fn fail(e: &(dyn std::error::Error + 'static)) -> ExitCode {
    eprintln!("strata: {}", strata_pipeline::error_chain(e));
    ExitCode::FAILURE
}

/// Logs to stderr (text or JSON, level from RUST_LOG) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `…_TRACES_ENDPOINT`) is set, exports spans over OTLP/HTTP.
fn init_logging(format: LogFormat, tracing_config: &TracingConfig) -> Option<SdkTracerProvider> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tokio_postgres=warn".into());
    let provider = otel_provider(tracing_config);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("strata")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    provider
}

fn otel_provider(tracing_config: &TracingConfig) -> Option<SdkTracerProvider> {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    if !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("strata: OpenTelemetry exporter disabled: {e}");
            return None;
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name("strata");
    }
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if !set("OTEL_TRACES_SAMPLER") {
        let ratio = tracing_config.sample_ratio.clamp(0.0, 1.0);
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    strata_pipeline::trace::set_enabled();
    Some(builder.build())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn load(cli: &Cli) -> Result<(Config, Vec<SchemaRef>), BoxError> {
    let explicit = cli.config.as_path() != std::path::Path::new("config.toml");
    let mut config = Config::load(&cli.config, explicit)?;
    if let Some(listen) = &cli.admin_listen {
        config.admin.listen = listen.clone();
    }
    let schemas = schema::load_dir(&config.schemas_dir)?;
    Ok((config, schemas))
}

async fn run(
    cli: Cli,
    stage: Option<&'static StageSpec>,
    config: Config,
    schemas: Vec<SchemaRef>,
) -> Result<(), BoxError> {
    let Some(command) = &cli.command else {
        let stage = stage.ok_or("no command")?;
        return serve(&config, &schemas, std::slice::from_ref(stage)).await;
    };
    match command {
        Command::AclRule { user } => {
            print_acl_rule(user);
            Ok(())
        }
        Command::Migrate { grant } => {
            for r in strata_stages::migrate::migrate(&config, &schemas).await? {
                let what = if r.created { "created" } else { "up to date" };
                let added = if r.added_columns.is_empty() {
                    String::new()
                } else {
                    format!(", added {}", r.added_columns.join(", "))
                };
                println!("{}: {what} ({}{added})", r.table, r.partitioning.as_str());
            }
            if let Some(role) = grant {
                let group = strata_stages::migrate::grant(&config, &schemas, role).await?;
                println!("granted {role} the runtime privileges (tables owned by {group})");
            }
            Ok(())
        }
        Command::Run => serve(&config, &schemas, STAGES).await,
        Command::Produce {
            table,
            count,
            rate,
            pipeline,
            connections,
            max_len,
        } => {
            let schema = find(&schemas, table)?;
            let redis = strata_pipeline::db::redis_pool(&config)?;
            let opts = ProduceOptions {
                count: *count,
                rate: *rate,
                pipeline: *pipeline,
                connections: *connections,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                max_len: (*max_len > 0).then_some(*max_len),
                replicas: strata_pipeline::db::ReplicaWait::of(&config.redis),
            };
            let report = produce(&redis, schema, &opts).await?;
            println!(
                "produced {} events to {} in {:.2} s ({:.0} events/s)",
                report.events,
                report.stream,
                report.elapsed.as_secs_f64(),
                report.per_second()
            );
            Ok(())
        }
        Command::Demo { table, count } => demo(&config, &schemas, table, *count).await,
        Command::Status { json, watch } => {
            let opts = StatusOptions {
                json: *json,
                watch: *watch,
            };
            Ok(status(&config, &schemas, &opts, &mut std::io::stdout()).await?)
        }
        Command::Inspect {
            stream,
            count,
            from,
        } => {
            let opts = InspectOptions {
                stream: stream.clone(),
                count: *count,
                from: from.clone(),
            };
            Ok(inspect(&config, &schemas, &opts, &mut std::io::stdout()).await?)
        }
        Command::Dlq { action } => {
            let (action, args) = match action {
                DlqCommand::List(a) => (DlqAction::List, a),
                DlqCommand::Replay(a) => (DlqAction::Replay, a),
                DlqCommand::Purge(a) => (DlqAction::Purge, a),
            };
            let opts = DlqOptions {
                action,
                stream: args.stream.clone(),
                count: args.count,
                id: args.id.clone(),
            };
            Ok(dlq(&config, &opts, &mut std::io::stdout()).await?)
        }
    }
}

/// `strata acl-rule`: the `ACL SETUSER` line of [`streams::acl`].
fn print_acl_rule(user: &str) {
    println!("{}", streams::acl::setuser_line(user));
}

fn find<'a>(schemas: &'a [SchemaRef], table: &str) -> Result<&'a SchemaRef, BoxError> {
    schemas.iter().find(|s| s.table == table).ok_or_else(|| {
        let known: Vec<&str> = schemas.iter().map(|s| s.table.as_str()).collect();
        format!(
            "no schema for table `{table}` (known: {})",
            known.join(", ")
        )
        .into()
    })
}

async fn serve(
    config: &Config,
    schemas: &[SchemaRef],
    stages: &[StageSpec],
) -> Result<(), BoxError> {
    let shutdown = strata_pipeline::shutdown::on_signals();
    if config.admin.enabled {
        let metrics = strata_pipeline::observe::install();
        let ready = strata_pipeline::admin::Readiness::new(
            config,
            stages.iter().any(|s| s.needs_postgres),
        )?;
        strata_pipeline::admin::serve(&config.admin, metrics, ready, shutdown.clone()).await?;
    }
    let running = strata_stages::start(config, schemas, stages, shutdown.clone()).await?;
    running.wait(&shutdown).await?;
    Ok(())
}

async fn demo(
    config: &Config,
    schemas: &[SchemaRef],
    table: &str,
    count: u64,
) -> Result<(), BoxError> {
    let schema = find(schemas, table)?.clone();
    for r in strata_stages::migrate::migrate(config, schemas).await? {
        println!(
            "migrate: {} {} ({})",
            r.table,
            if r.created { "created" } else { "up to date" },
            r.partitioning.as_str()
        );
    }
    let shutdown = strata_pipeline::shutdown::on_signals();
    let stop = CancellationToken::new();
    let running = strata_stages::start(
        config,
        std::slice::from_ref(&schema),
        &HOT_PATH,
        stop.clone(),
    )
    .await?;
    let stats = running.stats.clone();
    let waiter = tokio::spawn({
        let stop = stop.clone();
        async move { running.wait(&stop).await }
    });
    let redis = strata_pipeline::db::redis_pool(config)?;
    let before = stats.rows_written.load(Ordering::Relaxed);
    let start = Instant::now();
    let opts = ProduceOptions {
        count,
        rate: None,
        pipeline: 1000,
        connections: 2,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        max_len: Some(2_000_000),
        replicas: strata_pipeline::db::ReplicaWait::of(&config.redis),
    };
    let produced = produce(&redis, &schema, &opts).await?;
    println!(
        "produced {} events in {:.1} s ({:.0} events/s); waiting for the pipeline to drain…",
        produced.events,
        produced.elapsed.as_secs_f64(),
        produced.per_second()
    );
    let input = streams::telemetry_stream(table);
    let rows = streams::rows_stream(table);
    'drain: loop {
        if shutdown.is_cancelled() || waiter.is_finished() {
            break;
        }
        let mut conn = redis.get().await?;
        let mut drained = true;
        for p in 0..schema.partitions {
            for stage in [&ingest::STAGE, &writer::STAGE] {
                let stream = stage
                    .input_key(table, p)
                    .expect("a hot-path stage reads a stream");
                drained &= streams::ConsumerGroup::new(&stream, stage.group())
                    .drained(&mut conn)
                    .await?;
            }
        }
        if drained {
            break 'drain;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = start.elapsed();
    stop.cancel();
    waiter.await??;
    let written = stats.rows_written.load(Ordering::Relaxed) - before;
    let dead = stats.ingest.dead_lettered.load(Ordering::Relaxed)
        + stats.batch_writer.dead_lettered.load(Ordering::Relaxed);
    let q = |p| {
        stats
            .latency
            .quantile_ms(p)
            .map_or("n/a".to_string(), |ms| format!("≤ {ms} ms"))
    };
    println!();
    println!("strata demo: {count} events → {written} rows in table {table} in {:.1} s: {:.0} events/s end to end", elapsed.as_secs_f64(), written as f64 / elapsed.as_secs_f64());
    println!(
        "end-to-end latency (XADD → COMMIT): p50 {}, p99 {}",
        q(0.5),
        q(0.99)
    );
    println!("dead letters: {dead}");
    println!("where to look:");
    println!(
        "  table:        psql '{}' -c 'SELECT count(*), max(time) FROM {table}'",
        strata_pipeline::secrets::redact_url(&config.postgres.url)
    );
    println!("  streams:      redis-cli XINFO GROUPS '{input}'; redis-cli XINFO GROUPS '{rows}'");
    println!(
        "  dead letters: redis-cli XRANGE '{}' - + COUNT 10; redis-cli XRANGE '{}' - + COUNT 10",
        streams::dlq_stream(&input),
        streams::dlq_stream(&rows)
    );
    Ok(())
}
