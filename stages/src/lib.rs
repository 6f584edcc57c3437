//! strata's stages, each a [`Stage`](strata_pipeline::runner::Stage) run by the shared runner,
//! each declared once in [`registry`].
//!
//! # Layout
//! - [`registry`]: [`StageSpec`], one entry per stage (name and group, streams, config section,
//!   start function), and [`STAGES`], the list everything else derives from.
//! - [`config`]: [`Config`], the whole `config.toml` (the stages' sections are defined with the
//!   stages).
//! - [`ingest`]: `telemetry:{T}` → validated frames on `rows:{T}`.
//! - [`writer`]: `rows:{T}` → binary COPY into table `T`, exactly once.
//! - [`copy`]: the binary COPY encoding.
//! - [`catalog`]: strata's bookkeeping tables and native partitions.
//! - [`lifecycle`]: chunk-watcher, archiver and confirmer (closed chunks → Parquet → verified → dropped).
//! - [`migrate`]: `strata migrate`.
//! - [`produce`]: `strata produce`, the reference producer.
//! - [`ops`]: operator commands: `status`, `inspect`, `dlq`.
//! - this file: [`start`], starting the stages of a process for every table (and every
//!   partition of a partitioned table) through their registry entries, recording the partition
//!   counts and following those other processes record.

pub mod catalog;
pub mod config;
pub mod copy;
pub mod ingest;
pub mod lifecycle;
pub mod migrate;
pub mod ops;
pub mod produce;
pub mod registry;
pub mod writer;

pub use config::Config;
pub use registry::{StageSpec, HOT_PATH, STAGES};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use strata_pipeline::latency::LatencyHistogram;
use strata_pipeline::runner::LoopStats;
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::StageError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Counters shared by every loop of a process, for summaries.
#[derive(Debug, Default, Clone)]
pub struct ProcessStats {
    /// Per stage: entries acknowledged, dead-lettered, claimed.
    pub ingest: Arc<LoopStats>,
    pub batch_writer: Arc<LoopStats>,
    /// Rows committed to PostgreSQL.
    pub rows_written: Arc<AtomicU64>,
    /// End-to-end latency of committed rows.
    pub latency: Arc<LatencyHistogram>,
}

/// The stage loops of one process.
pub struct Running {
    /// One task per (stage, table) loop.
    tasks: JoinSet<Result<(), StageError>>,
    /// Live counters.
    pub stats: ProcessStats,
    /// How long a shutdown may take before the loops still busy are abandoned.
    shutdown_timeout: std::time::Duration,
}

/// Why a process's stages stopped other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// A stage failed fatally (the others were stopped).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The shutdown took longer than `[shutdown] timeout_ms`: the loops still busy (retrying a
    /// commit, waiting for a server) were abandoned. Nothing is lost: their entries stay pending
    /// and another consumer claims them after `claim_idle_ms`.
    #[error("shutdown took longer than [shutdown] timeout_ms = {timeout_ms}: abandoned {busy} busy stage loop(s); their entries stay pending and another consumer claims them")]
    Timeout {
        /// Loops still running at the deadline.
        busy: usize,
        /// The configured timeout.
        timeout_ms: u64,
    },
}

impl Running {
    /// Waits for every loop; the first fatal error stops the others. Once `shutdown` fires,
    /// waits at most `[shutdown] timeout_ms` for the loops to finish their batches in flight.
    pub async fn wait(mut self, shutdown: &CancellationToken) -> Result<(), StopError> {
        let mut result = Ok(());
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = self.tasks.join_next() => {
                    let Some(r) = joined else { break };
                    let r = r.unwrap_or_else(|e| {
                        Err(StageError::fatal(format!("stage task panicked: {e}")))
                    });
                    if let Err(e) = r {
                        if result.is_ok() {
                            tracing::error!(error = %e.reason(), "stage failed; stopping the process");
                            shutdown.cancel();
                            result = Err(StopError::Stage(e));
                        }
                    }
                }
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + self.shutdown_timeout);
                }
                _ = expired => {
                    let busy = self.tasks.len();
                    let e = StopError::Timeout {
                        busy,
                        timeout_ms: self.shutdown_timeout.as_millis() as u64,
                    };
                    tracing::warn!(error = %e, "shutdown timed out");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    if result.is_ok() {
                        result = Err(e);
                    }
                    break;
                }
            }
        }
        result
    }
}

/// Checks once, at start, that Redis and (if used) PostgreSQL answer, and logs why not, naming
/// the server and the cause (a TLS failure, a server requiring TLS, …). Not fatal: the loops
/// retry with backoff, and `/readyz` reports the same cause until the server answers.
async fn check_servers(
    config: &Config,
    redis: &strata_pipeline::db::RedisPool,
    pg: Option<&deadpool_postgres::Pool>,
) {
    use strata_pipeline::admin;
    let limit = std::time::Duration::from_secs(10);
    let server = strata_pipeline::db::redis_server(&config.redis);
    match tokio::time::timeout(limit, admin::check_redis(redis)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(
            redis = %server,
            error = %admin::explain_redis(&server, strata_pipeline::db::redis_uses_tls(&config.redis), &*e),
            "cannot connect to Redis (retrying with backoff)"
        ),
        Err(_) => tracing::error!(redis = %server, "Redis did not answer within 10 s"),
    }
    let Some(pg) = pg else { return };
    let Ok(target) = strata_pipeline::db::postgres_config(&config.postgres.url) else {
        return;
    };
    match tokio::time::timeout(limit, admin::check_postgres(pg)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(
            postgres = %target.server(),
            error = %admin::explain_postgres(&target, &*e).await,
            "cannot connect to PostgreSQL (retrying with backoff)"
        ),
        Err(_) => {
            tracing::error!(postgres = %target.server(), "PostgreSQL did not answer within 10 s")
        }
    }
}

/// Starts `stages` for every table in `schemas` (every partition of a partitioned table, see
/// [`strata_pipeline::streams::partition`]), in this process, until `shutdown`. A process
/// running partitioned stages records its schemas' partition counts (refusing a shrink that
/// would leave entries unread) and follows the counts other processes record.
pub async fn start(
    config: &Config,
    schemas: &[SchemaRef],
    stages: &[StageSpec],
    shutdown: CancellationToken,
) -> Result<Running, StageError> {
    let stats = ProcessStats::default();
    let counts: Vec<u32> = schemas.iter().map(|s| s.partitions).collect();
    let (redis_size, pg_size) = pool_sizes(config, stages, &counts);
    let mut redis_config = config.clone();
    redis_config.redis.pool_size = config.redis.pool_size.max(redis_size);
    let redis = strata_pipeline::db::redis_pool(&redis_config)
        .map_err(|e| StageError::fatal("creating the Redis pool").with_source(e))?;
    let pg = strata_pipeline::db::postgres_pool(config, pg_size.max(config.postgres.pool_size))
        .map_err(|e| StageError::fatal("creating the PostgreSQL pool").with_source(e))?;
    check_servers(config, &redis, (pg_size > 0).then_some(&pg)).await;
    let redis_read = strata_pipeline::db::redis_read_target(config)
        .map_err(|e| StageError::fatal("setting up Redis TLS").with_source(e))?;
    let partitioned = stages.iter().any(StageSpec::partitioned);
    if partitioned {
        adopt_partitions(config, &redis, schemas, &shutdown).await?;
    }
    let mut tasks = JoinSet::new();
    let ctx = registry::StartContext {
        config,
        redis: &redis,
        redis_read: &redis_read,
        pg: &pg,
        shutdown: &shutdown,
        stats: &stats,
    };
    for stage in stages {
        for schema in schemas {
            let partitions = 0..stage.partitions_read(schema.partitions);
            (stage.start)(&ctx, schema, partitions, &mut tasks).await?;
        }
    }
    if partitioned {
        tasks.spawn(follow_partitions(Owned {
            config: config.clone(),
            schemas: schemas.to_vec(),
            stages: stages.to_vec(),
            redis,
            redis_read,
            pg,
            shutdown: shutdown.clone(),
            stats: stats.clone(),
            reading: counts,
            pool_needs: (redis_size, pg_size),
        }));
    }
    Ok(Running {
        tasks,
        stats,
        shutdown_timeout: std::time::Duration::from_millis(config.shutdown.timeout_ms),
    })
}

/// Redis and PostgreSQL connections `stages` need for tables with `counts` partitions.
fn pool_sizes(config: &Config, stages: &[StageSpec], counts: &[u32]) -> (usize, usize) {
    let mut redis = 2;
    let mut pg = 0;
    for stage in stages {
        for &n in counts {
            let n = stage.partitions_read(n);
            redis += (stage.redis_connections)(config, n);
            pg += (stage.postgres_connections)(config, n);
        }
    }
    (redis, pg)
}

/// Records each table's partition count as this process's schema says
/// ([`partition::adopt`](strata_pipeline::streams::partition::adopt)), waiting out Redis
/// outages; a refused shrink is fatal.
async fn adopt_partitions(
    config: &Config,
    redis: &strata_pipeline::db::RedisPool,
    schemas: &[SchemaRef],
    shutdown: &CancellationToken,
) -> Result<(), StageError> {
    use strata_pipeline::streams::partition;
    let readers = registry::partitioned_readers();
    let mut backoff = strata_pipeline::runner::Backoff::new(config.streams.max_backoff_ms);
    for schema in schemas {
        loop {
            let result = match redis.get().await {
                Ok(mut conn) => {
                    partition::adopt(&mut conn, &schema.table, schema.partitions, &readers).await
                }
                Err(e)
                    if strata_pipeline::error::redis_pool_hint(&e)
                        == strata_pipeline::RetryHint::Fatal =>
                {
                    return Err(StageError::fatal("connecting to redis").with_source(e));
                }
                Err(e) => {
                    tracing::warn!(error = %strata_pipeline::error_chain(&e), "no Redis connection to record the partitions; retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            match result {
                Ok(r) => {
                    if r.count > 1 {
                        tracing::info!(table = %schema.table, partitions = r.count, "reading every partition");
                    }
                    break;
                }
                Err(e) if e.retry_hint() == strata_pipeline::RetryHint::Fatal => {
                    return Err(StageError::fatal("recording the partitions").with_source(e));
                }
                Err(e) => {
                    tracing::warn!(error = %strata_pipeline::error_chain(&e), "retrying");
                    if !backoff.wait(shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// What [`follow_partitions`] holds to start loops after [`start`] returned.
struct Owned {
    /// The process's configuration.
    config: Config,
    /// The tables.
    schemas: Vec<SchemaRef>,
    /// The stages this process runs.
    stages: Vec<StageSpec>,
    /// The process's Redis pool (grown with the loops).
    redis: strata_pipeline::db::RedisPool,
    /// Where read connections go.
    redis_read: strata_pipeline::streams::ReadTarget,
    /// The process's PostgreSQL pool (grown with the loops).
    pg: deadpool_postgres::Pool,
    /// The process's shutdown.
    shutdown: CancellationToken,
    /// The process's counters.
    stats: ProcessStats,
    /// Per table (as `schemas`), the partitions read so far.
    reading: Vec<u32>,
    /// Redis and PostgreSQL connections the loops started so far need (the pools are at least
    /// this large).
    pool_needs: (usize, usize),
}

/// Every `[streams] partition_poll_ms`, reads each table's recorded partition count and
/// starts this process's partitioned stages on partitions another process added. Its loops are
/// its children: a fatal error of one ends it (and so the process); at shutdown it waits for
/// them. A count that went down is not followed: the partitions dropped were drained, and
/// reading them costs one idle read each until the process restarts.
async fn follow_partitions(mut o: Owned) -> Result<(), StageError> {
    use strata_pipeline::streams::partition;
    let every = std::time::Duration::from_millis(o.config.streams.partition_poll_ms.max(100));
    let mut children: registry::Tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = o.shutdown.cancelled() => break,
            Some(joined) = children.join_next() => {
                joined.unwrap_or_else(|e| Err(StageError::fatal(format!("stage task panicked: {e}"))))?;
                continue;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let Ok(mut conn) = o.redis.get().await else {
            continue;
        };
        for i in 0..o.schemas.len() {
            let schema = o.schemas[i].clone();
            let recorded = match partition::recorded(&mut conn, &schema.table).await {
                Ok(Some(r)) => r.count.min(strata_pipeline::streams::MAX_PARTITIONS),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(table = %schema.table, error = %strata_pipeline::error_chain(&e), "reading the partition count");
                    continue;
                }
            };
            let from = o.reading[i];
            if recorded <= from {
                continue;
            }
            // The added partitions get loops of their own (next to the running ones).
            for stage in o.stages.iter().filter(|s| s.partitioned()) {
                o.pool_needs.0 += (stage.redis_connections)(&o.config, recorded - from);
                o.pool_needs.1 += (stage.postgres_connections)(&o.config, recorded - from);
            }
            o.redis.resize(o.config.redis.pool_size.max(o.pool_needs.0));
            o.pg.resize(o.config.postgres.pool_size.max(o.pool_needs.1));
            let ctx = registry::StartContext {
                config: &o.config,
                redis: &o.redis,
                redis_read: &o.redis_read,
                pg: &o.pg,
                shutdown: &o.shutdown,
                stats: &o.stats,
            };
            for stage in o.stages.iter().filter(|s| s.partitioned()) {
                (stage.start)(&ctx, &schema, from..recorded, &mut children).await?;
            }
            tracing::info!(table = %schema.table, from, to = recorded, "partitions added: reading them");
            o.reading[i] = recorded;
        }
    }
    while let Some(joined) = children.join_next().await {
        joined.unwrap_or_else(|e| Err(StageError::fatal(format!("stage task panicked: {e}"))))?;
    }
    Ok(())
}
