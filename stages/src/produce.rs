//! `strata produce`: the reference producer and load generator. Synthesizes events for any
//! schema and XADDs them with pipelining, showing a progress bar. For a partitioned table it
//! sends each event to the partition of its `partition_key` value
//! ([`strata_pipeline::streams::partition::of_key`]), round-robin without a key column, one
//! pipeline per partition (a partition's keys share one cluster slot).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use strata_pipeline::schema::{ColumnType, Schema};
use strata_pipeline::streams::{partition, StreamKind};

/// What to produce.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Events to send.
    pub count: u64,
    /// Events per second at most (None: as fast as Redis takes them).
    pub rate: Option<u64>,
    /// Events per pipelined round trip.
    pub pipeline: usize,
    /// Round trips in flight at once.
    pub connections: usize,
    /// Show a progress bar (off when not on a terminal or in tests).
    pub progress: bool,
    /// Back-pressure: wait while a partition's `telemetry:{T}` holds more entries than this.
    pub max_len: Option<u64>,
    /// `[redis] wait_replicas`: each pipeline of XADDs ends with `WAIT`, and is done only once
    /// the replicas hold it (a master killed before replicating would lose events that Redis
    /// had already acknowledged). `None`: no WAIT.
    pub replicas: Option<strata_pipeline::db::ReplicaWait>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("no Redis connection")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("XADD failed")]
    Redis(#[from] redis::RedisError),
    /// `[redis] wait_replicas`: the stream's master changed (a failover) before its replicas
    /// confirmed a pipeline. Its events may or may not be in the stream: resending them (with
    /// `*` IDs) could add them twice, so `strata produce` stops.
    #[error("the master of `{stream}` changed before its replicas confirmed the last pipeline: its events may or may not be in the stream")]
    FailedOver {
        /// The stream.
        stream: String,
    },
}

/// What was produced.
#[derive(Debug, Clone)]
pub struct ProduceReport {
    /// The stream written to (`telemetry:{T:*}` for a partitioned table).
    pub stream: String,
    pub events: u64,
    pub elapsed: Duration,
}

impl ProduceReport {
    pub fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One synthetic event for `schema`: field/value pairs as `redis-cli` would send them. The time
/// is now (as an integer epoch in ms), so end-to-end latency is meaningful.
pub fn synthesize(schema: &Schema, seq: u64, rng: &mut impl Rng) -> Vec<(String, String)> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let v = match c.ty {
                ColumnType::Timestamptz if i == schema.time_index => now_ms.to_string(),
                ColumnType::Timestamptz => chrono::Utc::now().to_rfc3339(),
                ColumnType::Text => format!("{}-{}", c.name, seq % 100),
                ColumnType::Float8 => format!("{:.3}", rng.random_range(0.0..1000.0)),
                ColumnType::Int8 => rng.random_range(0..1_000_000i64).to_string(),
                ColumnType::Int4 => rng.random_range(0..10_000i32).to_string(),
                ColumnType::Bool => seq.is_multiple_of(2).to_string(),
                ColumnType::Jsonb => format!("{{\"region\":\"eu-{}\",\"seq\":{seq}}}", seq % 3),
            };
            (c.name.clone(), v)
        })
        .collect()
}

/// The partition event `seq` with `fields` goes to: its partition key's value hashed, else
/// round-robin by `seq`.
pub fn partition_of(schema: &Schema, seq: u64, fields: &[(String, String)]) -> u32 {
    let n = schema.partitions.max(1);
    match schema.partition_key {
        Some(col) => {
            let name = &schema.columns[col].name;
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0, |(_, v)| partition::of_key(v.as_bytes(), n))
        }
        None => (seq % u64::from(n)) as u32,
    }
}

/// Sends `pipe` (one pipeline of XADDs to `stream`) with `WAIT` behind it, and returns once
/// `wait.replicas` replicas hold it. On a cluster the pipeline goes to the stream's master,
/// WAIT with it, and asks that server's `run_id` (`INFO server`); after a shortfall (counted in
/// `strata_replica_wait_shortfalls_total{stage="produce"}`) WAIT is sent again behind a read
/// of the stream, which takes it to the stream's master, and counts only if that is still the
/// node that took the XADDs (a connection's WAIT covers its earlier writes there); a new
/// master is [`ProduceError::FailedOver`].
async fn replicated(
    conn: &mut strata_pipeline::db::RedisConnection,
    pipe: &mut redis::Pipeline,
    stream: &str,
    wait: strata_pipeline::db::ReplicaWait,
    cluster: bool,
) -> Result<(), ProduceError> {
    let ask = |pipe: &mut redis::Pipeline| {
        if cluster {
            // Routed with the pipeline (`CLUSTER MYID` would be routed on its own and make
            // the pipeline cross slots); its `run_id` names the server process.
            pipe.cmd("INFO").arg("server");
        }
        pipe.cmd("WAIT")
            .arg(wait.replicas)
            .arg(u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX));
    };
    ask(pipe);
    let (node, mut acked) = send_and_wait(pipe, conn).await?;
    while acked < u64::from(wait.replicas) {
        metrics::counter!(
            strata_pipeline::observe::REPLICA_WAIT_SHORTFALLS,
            "stage" => "produce",
            "stream" => stream.to_string()
        )
        .increment(1);
        tracing::warn!(
            stream,
            acked,
            wanted = wait.replicas,
            "events sent are not replicated yet, waiting again"
        );
        let mut again = redis::pipe();
        again.cmd("XLEN").arg(stream).ignore();
        ask(&mut again);
        let (now, a) = send_and_wait(&again, conn).await?;
        if now != node {
            return Err(ProduceError::FailedOver {
                stream: stream.to_string(),
            });
        }
        acked = a;
    }
    Ok(())
}

/// Sends a pipeline ending in `[INFO server,] WAIT`; replies the server's `run_id` (if asked)
/// and how many replicas acknowledged.
async fn send_and_wait(
    pipe: &redis::Pipeline,
    conn: &mut strata_pipeline::db::RedisConnection,
) -> redis::RedisResult<(Option<String>, u64)> {
    let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let acked: u64 = redis::from_redis_value(replies.pop().unwrap_or(redis::Value::Nil))?;
    let node = match replies.pop() {
        Some(v) => {
            let info = redis::from_redis_value::<String>(v)?;
            let id = info.lines().find_map(|l| l.trim().strip_prefix("run_id:"));
            Some(id.unwrap_or_default().to_string())
        }
        None => None,
    };
    Ok((node, acked))
}

/// XADDs `count` synthetic events to `telemetry:{T}` (to each event's partition).
pub async fn produce(
    redis: &strata_pipeline::db::RedisPool,
    schema: &Schema,
    opts: &ProduceOptions,
) -> Result<ProduceReport, ProduceError> {
    let streams: Vec<String> = (0..schema.partitions.max(1))
        .map(|p| StreamKind::Telemetry.partition_key(&schema.table, p))
        .collect();
    let stream = if schema.partitions > 1 {
        StreamKind::Telemetry.all_partitions(&schema.table)
    } else {
        streams[0].clone()
    };
    let bar = if opts.progress {
        ProgressBar::new(opts.count)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(stream.clone());
    let start = Instant::now();
    let chunk = opts.pipeline.max(1) as u64;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let (redis, schema, streams, bar, next) = (
            redis.clone(),
            schema.clone(),
            streams.clone(),
            bar.clone(),
            next.clone(),
        );
        let (count, rate, max_len, replicas) = (opts.count, opts.rate, opts.max_len, opts.replicas);
        let cluster = redis.is_cluster();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::from_rng(&mut rand::rng());
            let mut conn = redis.get().await?;
            loop {
                let from = next.fetch_add(chunk, std::sync::atomic::Ordering::Relaxed);
                if from >= count {
                    return Ok::<_, ProduceError>(());
                }
                let to = (from + chunk).min(count);
                if let Some(rate) = rate {
                    // Pace so that event `from` is not sent before from/rate seconds.
                    let due = start + Duration::from_secs_f64(from as f64 / rate.max(1) as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut pipes: Vec<Option<redis::Pipeline>> = vec![None; streams.len()];
                for seq in from..to {
                    let fields = synthesize(&schema, seq, &mut rng);
                    let p = partition_of(&schema, seq, &fields) as usize;
                    let cmd = pipes[p]
                        .get_or_insert_with(redis::pipe)
                        .cmd("XADD")
                        .arg(&streams[p])
                        .arg("*");
                    for (k, v) in fields {
                        cmd.arg(k).arg(v);
                    }
                    cmd.ignore();
                }
                for (p, pipe) in pipes.iter_mut().enumerate() {
                    let Some(pipe) = pipe else { continue };
                    if let Some(limit) = max_len {
                        // Entries leave the stream once every group acknowledged them (ingest
                        // trims).
                        while strata_pipeline::streams::len(&mut conn, &streams[p]).await? > limit {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    match replicas {
                        None => {
                            let () = pipe.query_async(&mut conn).await?;
                        }
                        Some(wait) => {
                            replicated(&mut conn, pipe, &streams[p], wait, cluster).await?;
                        }
                    }
                }
                bar.inc(to - from);
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer task panicked")?;
    }
    bar.finish();
    Ok(ProduceReport {
        stream,
        events: opts.count,
        elapsed: start.elapsed(),
    })
}
