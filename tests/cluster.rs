//! `[redis] cluster = true` against a Redis Cluster of its own (3 masters + 3 replicas,
//! [`OwnCluster`]): the hot path end to end for tables whose slots live on different masters,
//! a busy table's slot migrated mid-stream and a master failed over mid-stream, each with
//! every event landing exactly once; the operator commands on the cluster.

mod common;

use std::time::{Duration, Instant};

use common::{terminate, TestEnv};
use strata_pipeline::streams;
use strata_stages::{ingest, writer};
use strata_testkit::OwnCluster;

const BASE_MS: u64 = 1_793_491_200_000;
const CONFIG: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\nmax_backoff_ms = 1000\n[ingest]\nmax_batch_rows = 500\n[batch_writer]\nmax_batch_rows = 2000\nlinger_ms = 50\n";

/// A test environment on `cluster` with `n` tables (the first is the environment's own); with
/// `spread`, each table's slot is on a different master. The config says `cluster = true` and
/// lists every node as a seed.
async fn cluster_env(
    cluster: &OwnCluster,
    how: &Seeds,
    n: usize,
    spread: bool,
) -> (TestEnv, Vec<String>) {
    cluster_env_with(cluster, how, n, spread, "").await
}

/// [`cluster_env`] with `redis_extra` (lines of `[redis]` keys) in the config.
async fn cluster_env_with(
    cluster: &OwnCluster,
    how: &Seeds,
    n: usize,
    spread: bool,
    redis_extra: &str,
) -> (TestEnv, Vec<String>) {
    let seeds = how.urls.clone();
    let env = TestEnv::on_servers("metrics", CONFIG, &seeds[0], &common::admin_url()).await;
    let slot = |t: &str| cluster.keyslot(&streams::telemetry_stream(t));
    let mut tables = vec![env.table.clone()];
    let mut masters = vec![cluster.master_of(slot(&env.table))];
    while tables.len() < n {
        let t = format!("metrics_{}", common::rand_suffix());
        let m = cluster.master_of(slot(&t));
        if spread && masters.contains(&m) {
            continue;
        }
        tables.push(t);
        masters.push(m);
    }
    let schemas = env.dir.path().join("schemas");
    let text = std::fs::read_to_string(schemas.join(format!("{}.toml", env.table))).unwrap();
    for t in &tables[1..] {
        let other = text.replace(
            &format!("table = \"{}\"", env.table),
            &format!("table = \"{t}\""),
        );
        std::fs::write(schemas.join(format!("{t}.toml")), other).unwrap();
    }
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    let redis_line = format!("[redis]\nurl = \"{}\"\n", seeds[0]);
    assert!(config.contains(&redis_line), "{config}");
    let nodes: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let config = config.replace(
        &redis_line,
        &format!(
            "{redis_line}cluster = true\nnodes = [{}]\n{redis_extra}{}",
            nodes.join(", "),
            how.ca
                .as_ref()
                .map(|ca| format!("tls_ca_file = \"{}\"\n", ca.display()))
                .unwrap_or_default()
        ),
    );
    std::fs::write(env.config_path(), config).unwrap();
    let migrated = env.spawn(&["migrate"], "migrate.log").wait().unwrap();
    assert!(migrated.success(), "{}", env.log("migrate.log"));
    (env, tables)
}

/// `strata run`, logging the read connections' redirects (debug) to `run.log`.
fn run(env: &TestEnv) -> common::Spawned {
    let log = std::fs::File::create(env.dir.path().join("run.log")).unwrap();
    let child = env
        .command()
        .arg("run")
        .env("RUST_LOG", "info,strata_pipeline::streams::read=debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    common::Spawned(child)
}

/// How many redirects the read connections followed (by the log of [`run`]).
fn redirects(env: &TestEnv) -> usize {
    env.log("run.log")
        .lines()
        .filter(|l| l.contains("following a cluster redirect"))
        .count()
}

/// How the test itself reaches the cluster: the seeds and, for TLS, the CA.
#[derive(Clone)]
struct Seeds {
    /// Seed URLs.
    urls: Vec<String>,
    /// TLS: the CA of the nodes' certificates.
    ca: Option<std::path::PathBuf>,
}

impl Seeds {
    fn plain(cluster: &OwnCluster) -> Self {
        Seeds {
            urls: cluster.urls(),
            ca: None,
        }
    }

    fn client(&self) -> redis::cluster::ClusterClient {
        // Generous: six TLS handshakes of a debug build on a busy machine.
        let mut b = redis::cluster::ClusterClientBuilder::new(self.urls.clone())
            .connection_timeout(Duration::from_secs(10));
        if let Some(ca) = &self.ca {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(ca).unwrap()),
            });
        }
        b.build().unwrap()
    }
}

async fn cluster_conn(seeds: &Seeds) -> redis::cluster_async::ClusterConnection {
    seeds.client().get_async_connection().await.unwrap()
}

/// Waits (at most `secs`) until every event `0..n` of each table has landed, checks `run` is
/// still running, and that each event is in its table once.
async fn landed_once_while_running(
    env: &TestEnv,
    conn: &mut redis::cluster_async::ClusterConnection,
    run: &mut common::Spawned,
    tables: &[String],
    n: u64,
    secs: u64,
) {
    wait_landed(env, conn, tables, n as i64, Duration::from_secs(secs)).await;
    assert!(
        run.try_wait().unwrap().is_none(),
        "strata run exited: {}",
        env.log("run.log")
    );
    for t in tables {
        assert_exactly_once(env, t, n).await;
    }
}

/// XADDs events `from..to` of [`common::Producer::produce_known`]'s kind to `stream` at `rate`
/// per second through a cluster client, with explicit IDs: after a failed batch it resumes
/// right after the last entry the stream holds, so nothing is sent twice or skipped.
async fn produce(seeds: Seeds, stream: String, from: u64, to: u64, rate: u64) {
    let client = seeds.client();
    let mut conn = client.get_async_connection().await.unwrap();
    let start = Instant::now();
    let mut seq = from;
    while seq < to {
        let end = (seq + 100).min(to);
        let mut pipe = redis::pipe();
        for i in seq..end {
            pipe.cmd("XADD")
                .arg(&stream)
                .arg(format!("{}-0", BASE_MS + i))
                .arg("time")
                .arg(BASE_MS + i)
                .arg("source")
                .arg(format!("s{}", i % 10))
                .arg("metric")
                .arg("m")
                .arg("value")
                .arg(i as f64 * 0.5)
                .arg("tags")
                .arg(format!("{{\"seq\":{i}}}"))
                .ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => seq = end,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let last: redis::RedisResult<Vec<(String, redis::Value)>> = redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await;
                if let Ok(Some((id, _))) = last.map(|v| v.into_iter().next()) {
                    let ms: u64 = id.split('-').next().unwrap().parse().unwrap();
                    seq = (ms + 1 - BASE_MS).max(from);
                }
            }
        }
        let due = start + Duration::from_secs_f64((seq - from) as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Waits until every table holds `rows` rows and both groups of each have read and
/// acknowledged everything.
async fn wait_landed(
    env: &TestEnv,
    conn: &mut redis::cluster_async::ClusterConnection,
    tables: &[String],
    rows: i64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let pg = env.pg().await;
    for t in tables {
        loop {
            let mut drained = true;
            for (stream, group) in [
                (streams::telemetry_stream(t), ingest::STAGE.name),
                (streams::rows_stream(t), writer::STAGE.name),
            ] {
                drained &= streams::ConsumerGroup::new(&stream, group)
                    .drained(conn)
                    .await
                    .unwrap_or(false);
            }
            let count: i64 = pg
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .unwrap()
                .get(0);
            if drained && count >= rows {
                break;
            }
            if Instant::now() >= deadline {
                let mut groups = Vec::new();
                for stream in [streams::telemetry_stream(t), streams::rows_stream(t)] {
                    groups.push(
                        streams::groups(conn, &stream)
                            .await
                            .map(|g| format!("{stream}: {g:?}")),
                    );
                }
                panic!(
                    "{t}: timed out: {count} of {rows} rows landed, drained = {drained}\n{groups:?}\n{}",
                    env.log("run.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every one of events `0..n` is in `table` exactly once, with its own contents.
async fn assert_exactly_once(env: &TestEnv, table: &str, n: u64) {
    assert_exactly_once_or(env, table, n, "").await
}

/// [`assert_exactly_once`], with `context` in the message of a failure.
async fn assert_exactly_once_or(env: &TestEnv, table: &str, n: u64, context: &str) {
    let row = env
        .pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (tags->>'seq')::bigint), \
                 count(*) FILTER (WHERE value <> (tags->>'seq')::bigint * 0.5 \
                   OR time <> to_timestamp(({BASE_MS} + (tags->>'seq')::bigint) / 1000.0)) \
                 FROM {table}"
            ),
            &[],
        )
        .await
        .unwrap();
    let (rows, distinct, wrong): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(distinct, n as i64, "{table}: events lost{context}");
    assert_eq!(rows, n as i64, "{table}: events duplicated{context}");
    assert_eq!(
        wrong, 0,
        "{table}: a row with another event's contents{context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_path_on_a_cluster_lands_every_event_once_for_tables_on_every_master() {
    const N: u64 = 6_000;
    let cluster = OwnCluster::start();
    let (env, tables) = cluster_env(&cluster, &Seeds::plain(&cluster), 3, true).await;
    let masters: std::collections::HashSet<u16> = tables
        .iter()
        .map(|t| cluster.master_of(cluster.keyslot(&streams::telemetry_stream(t))))
        .collect();
    assert_eq!(masters.len(), 3, "one table per master");
    let mut run = run(&env);
    let producers: Vec<_> = tables
        .iter()
        .map(|t| {
            tokio::spawn(produce(
                Seeds::plain(&cluster),
                streams::telemetry_stream(t),
                0,
                N,
                3_000,
            ))
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    // One event naming no column: a dead letter, for `strata dlq` to find.
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    let () = redis::cmd("XADD")
        .arg(streams::telemetry_stream(&tables[1]))
        .arg("*")
        .arg("nonsense")
        .arg("1")
        .query_async::<String>(&mut conn)
        .await
        .map(|_| ())
        .unwrap();
    landed_once_while_running(&env, &mut conn, &mut run, &tables, N, 90).await;
    // The read connections start at the first seed: the tables on the other masters are read
    // after a MOVED.
    assert!(redirects(&env) >= 2, "{}", env.log("run.log"));

    // The operator commands read through the cluster too.
    let out = env.command().args(["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = status.to_string();
    for t in &tables {
        assert!(text.contains(t.as_str()), "status lists {t}: {text}");
    }
    let dlq = env
        .command()
        .args([
            "dlq",
            "list",
            "--stream",
            &streams::telemetry_stream(&tables[1]),
        ])
        .output()
        .unwrap();
    assert!(
        dlq.status.success(),
        "{}",
        String::from_utf8_lossy(&dlq.stderr)
    );
    let letters = String::from_utf8_lossy(&dlq.stdout);
    assert_eq!(letters.lines().count(), 1, "{letters}");
    assert!(letters.contains("nonsense"), "{letters}");
    let inspect = env
        .command()
        .args(["inspect", &streams::rows_stream(&tables[2]), "--count", "3"])
        .output()
        .unwrap();
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );

    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_tables_slot_migrated_mid_stream_loses_and_duplicates_nothing() {
    const N: u64 = 24_000;
    let cluster = OwnCluster::start();
    let (env, tables) = cluster_env(&cluster, &Seeds::plain(&cluster), 2, true).await;
    let busy = &tables[0];
    let slot = cluster.keyslot(&streams::telemetry_stream(busy));
    let from = cluster.master_of(slot);
    let to = *cluster.masters().iter().find(|m| **m != from).unwrap();
    let mut run = run(&env);
    let producers: Vec<_> = tables
        .iter()
        .map(|t| {
            tokio::spawn(produce(
                Seeds::plain(&cluster),
                streams::telemetry_stream(t),
                0,
                N,
                2_000,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // IMPORTING/MIGRATING, MIGRATE of every key (the stream, its group and pending entries, the
    // rows stream…), SETSLOT NODE: a second in each state while events keep coming.
    let before = redirects(&env);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.migrate_slot(slot, to, Duration::from_secs(1));
        cluster
    })
    .await
    .unwrap();
    assert_eq!(cluster.master_of(slot), to);
    for p in producers {
        p.await.unwrap();
    }
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    landed_once_while_running(&env, &mut conn, &mut run, &tables, N, 120).await;
    // The busy table's read connections followed the slot (ASK while it moved, or MOVED).
    assert!(redirects(&env) > before, "{}", env.log("run.log"));
    for t in &tables {
        for s in [streams::telemetry_stream(t), streams::rows_stream(t)] {
            assert!(
                env_dead_letters(&mut conn, &s).await == 0,
                "no dead letters on {s}"
            );
        }
    }
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failed_over_mid_stream_loses_and_duplicates_nothing() {
    const N: u64 = 16_000;
    let cluster = OwnCluster::start();
    let (env, tables) = cluster_env(&cluster, &Seeds::plain(&cluster), 1, false).await;
    let slot = cluster.keyslot(&streams::telemetry_stream(&tables[0]));
    let master = cluster.master_of(slot);
    let replica = cluster.replica_of(master);
    let mut run = run(&env);
    let producer = tokio::spawn(produce(
        Seeds::plain(&cluster),
        streams::telemetry_stream(&tables[0]),
        0,
        N,
        2_000,
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.failover(replica);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.master_of(slot),
        replica,
        "the replica serves the slot now"
    );
    producer.await.unwrap();
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    wait_landed(&env, &mut conn, &tables, N as i64, Duration::from_secs(120)).await;
    assert!(
        run.try_wait().unwrap().is_none(),
        "strata run exited: {}",
        env.log("run.log")
    );
    assert_exactly_once(&env, &tables[0], N).await;
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

/// `rediss://` seeds with `tls_ca_file`: the pool, the read connections (after their MOVED,
/// to the host name the nodes announce) and the operator commands all verify each node's
/// certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_path_on_a_tls_cluster_verifies_every_node() {
    const N: u64 = 3_000;
    strata_pipeline::tls::install_crypto_provider();
    let certs = strata_testkit::tls::TestCerts::generate();
    let cluster = OwnCluster::start_tls(&certs);
    let seeds = Seeds {
        urls: cluster.tls_urls(),
        ca: Some(certs.ca.clone()),
    };
    let (env, tables) = cluster_env(&cluster, &seeds, 2, true).await;
    let mut run = run(&env);
    let producers: Vec<_> = tables
        .iter()
        .map(|t| {
            tokio::spawn(produce(
                seeds.clone(),
                streams::telemetry_stream(t),
                0,
                N,
                3_000,
            ))
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let mut conn = cluster_conn(&seeds).await;
    landed_once_while_running(&env, &mut conn, &mut run, &tables, N, 90).await;
    assert!(redirects(&env) >= 1, "{}", env.log("run.log"));
    let out = env.command().args(["status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

/// The read connection itself: a read at a node that does not serve the slot follows MOVED;
/// while the slot migrates (keys already moved) it follows ASK to the importing node and
/// sends ASKING; after the move it reads there; nothing is delivered twice or skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_connection_follows_moved_and_ask() {
    let cluster = OwnCluster::start();
    let stream = format!("telemetry:{{t_{}}}", common::rand_suffix());
    let slot = cluster.keyslot(&stream);
    let home = cluster.master_of(slot);
    let other = *cluster.masters().iter().find(|m| **m != home).unwrap();
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    let group = streams::ConsumerGroup::new(&stream, "g");
    group.ensure(&mut conn).await.unwrap();
    // One command at a time: the crate's cluster pipelines do not follow ASK.
    async fn add(conn: &mut redis::cluster_async::ClusterConnection, stream: &str, n: u64) {
        for i in 0..n {
            let _: String = redis::cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("i")
                .arg(i)
                .query_async(conn)
                .await
                .unwrap();
        }
    }
    add(&mut conn, &stream, 3).await;
    // Seeded at a master that does not serve the slot.
    let target = streams::ReadTarget {
        url: format!("redis://127.0.0.1:{other}"),
        tls: None,
        cluster: true,
        seeds: cluster.urls(),
    };
    let mut reader = streams::ReadConnection::connect(&target).await.unwrap();
    let consumer = group.consumer("c");
    let read = reader.read_new(&consumer, 100, 100).await.unwrap();
    assert_eq!(read.len(), 3, "read after MOVED");
    assert_eq!(
        reader.cluster_node(),
        Some(format!("127.0.0.1:{home}")),
        "moved to the slot's master"
    );

    // Keys moved, slot still MIGRATING: the source answers ASK.
    let (cluster, m) = tokio::task::spawn_blocking(move || {
        let m = cluster.begin_migration(slot, other);
        cluster.move_keys(&m);
        (cluster, m)
    })
    .await
    .unwrap();
    add(&mut conn, &stream, 2).await;
    let read = reader.read_new(&consumer, 100, 100).await.unwrap();
    assert_eq!(read.len(), 2, "read after ASK");
    assert_eq!(reader.cluster_node(), Some(format!("127.0.0.1:{other}")));
    // Still importing: the next read asks again (ASKING) and gets what is new.
    add(&mut conn, &stream, 1).await;
    let read = reader.read_new(&consumer, 100, 100).await.unwrap();
    assert_eq!(read.len(), 1, "second read while importing");

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.end_migration(&m);
        cluster
    })
    .await
    .unwrap();
    add(&mut conn, &stream, 4).await;
    let read = reader.read_new(&consumer, 100, 100).await.unwrap();
    assert_eq!(read.len(), 4, "read after the move");
    let read = reader.read_new(&consumer, 100, 50).await.unwrap();
    assert!(read.is_empty(), "nothing twice");
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(
        summary[0],
        redis::Value::Int(10),
        "each entry delivered once"
    );
    drop(cluster);
}

async fn env_dead_letters(conn: &mut redis::cluster_async::ClusterConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(streams::dlq_stream(stream))
        .query_async(conn)
        .await
        .unwrap()
}

/// Rows in `table` now.
async fn count(env: &TestEnv, table: &str) -> i64 {
    env.pg()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until `table` holds at least `rows` rows.
async fn wait_rows(env: &TestEnv, table: &str, rows: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count(env, table).await < rows {
        assert!(
            Instant::now() < deadline,
            "{rows} rows did not land in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// kill -9 of the master serving a busy table's slot, mid-stream, with `wait_replicas = 1`:
/// its replica is promoted (`CLUSTER FAILOVER TAKEOVER`), and until the killed node is back
/// (restarted empty, it resyncs as the new master's replica) the promoted master has no
/// replica, so no step completes and not one more row is applied: strata waits rather than
/// act on writes a second failure would lose. Then every event lands exactly once and strata
/// never exits.
///
/// What this asserts: 0 lost and 0 duplicated rows. The producer here resends, after an
/// error, from the last entry the stream holds (explicit IDs), so it also resends what the
/// failover lost of its own XADDs; what is tested is that strata neither loses nor repeats
/// anything of what the stream held across the kill (its stage steps and reads lost with the
/// master are redone, its frames applied to PostgreSQL were replicated first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_stream_with_wait_replicas_loses_and_duplicates_nothing() {
    const N: u64 = 16_000;
    let mut cluster = OwnCluster::start();
    let (env, tables) = cluster_env_with(
        &cluster,
        &Seeds::plain(&cluster),
        1,
        false,
        "wait_replicas = 1\nwait_timeout_ms = 300\n",
    )
    .await;
    let table = tables[0].clone();
    let slot = cluster.keyslot(&streams::telemetry_stream(&table));
    let master = cluster.master_of(slot);
    let replica = cluster.replica_of(master);
    let mut run = run(&env);
    let producer = tokio::spawn(produce(
        Seeds::plain(&cluster),
        streams::telemetry_stream(&table),
        0,
        N,
        2_000,
    ));
    wait_rows(&env, &table, 2_000, Duration::from_secs(60)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill(master);
        cluster.takeover(replica);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.master_of(slot),
        replica,
        "the replica serves the slot"
    );
    let landed = count(&env, &table).await;
    assert!(
        landed < N as i64,
        "killed mid-stream: {landed} rows had landed"
    );
    // No replica now: whatever was read after the promotion waits, nothing more is applied
    // (after a grace for a batch that was replicated and in flight at the kill).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled = count(&env, &table).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&env, &table).await,
        stalled,
        "rows applied while no replica held them: {}",
        env.log("run.log")
    );
    assert!(
        run.try_wait().unwrap().is_none(),
        "strata run exited: {}",
        env.log("run.log")
    );
    let mut cluster = cluster;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(master);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(
        cluster.replica_of(replica),
        master,
        "the killed node is a replica now"
    );
    producer.await.unwrap();
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    wait_landed(&env, &mut conn, &tables, N as i64, Duration::from_secs(120)).await;
    assert!(
        run.try_wait().unwrap().is_none(),
        "strata run exited: {}",
        env.log("run.log")
    );
    let log = env.log("run.log");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_exactly_once_or(&env, &table, N, &format!("\n{}", warnings.join("\n"))).await;
    assert!(
        log.contains("not replicated"),
        "the WAIT held steps back while no replica existed: {log}"
    );
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

/// kill -9 of `strata run` (every stage of the process at once) mid-stream on the cluster,
/// twice; the next one claims what the dead ones held and every event lands exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_processes_killed_mid_stream_on_a_cluster_lose_and_duplicate_nothing() {
    const N: u64 = 12_000;
    let cluster = OwnCluster::start();
    let (env, tables) = cluster_env(&cluster, &Seeds::plain(&cluster), 2, true).await;
    let producers: Vec<_> = tables
        .iter()
        .map(|t| {
            tokio::spawn(produce(
                Seeds::plain(&cluster),
                streams::telemetry_stream(t),
                0,
                N,
                2_000,
            ))
        })
        .collect();
    for round in 1..=2 {
        let mut victim = run(&env);
        wait_rows(&env, &tables[0], 2_500 * round, Duration::from_secs(60)).await;
        victim.kill().unwrap(); // SIGKILL: batches in flight, COPYs and steps half done
        victim.wait().unwrap();
    }
    let landed = count(&env, &tables[0]).await;
    assert!(
        landed < N as i64,
        "killed mid-stream: {landed} rows had landed"
    );
    let mut survivor = run(&env);
    for p in producers {
        p.await.unwrap();
    }
    let mut conn = cluster_conn(&Seeds::plain(&cluster)).await;
    wait_landed(&env, &mut conn, &tables, N as i64, Duration::from_secs(120)).await;
    for t in &tables {
        assert_exactly_once(&env, t, N).await;
    }
    assert!(terminate(&mut survivor).success(), "{}", env.log("run.log"));
}
