//! The delivery guarantees, proven by breaking things: killed stages, a PostgreSQL outage, a
//! Redis restart, a dead consumer, a lagging group under trimming, an entry delivered too often.

mod common;

use std::time::{Duration, Instant};

use common::servers::{rss_kb, OwnPostgres, OwnRedis};
use common::{terminate, TestEnv};
use strata_pipeline::streams;
use strata_stages::{ingest, HOT_PATH};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\nmax_backoff_ms = 1000\ntrim_interval_ms = 200\n[ingest]\nmax_batch_rows = 500\n[batch_writer]\nmax_batch_rows = 2000\nlinger_ms = 50\n";

/// Every event `0..n` exactly once, with its own contents.
async fn assert_exactly_once(env: &TestEnv, n: u64) {
    let row = env
        .pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (tags->>'seq')::bigint), sum(value)::float8,
                        count(*) FILTER (WHERE value <> (tags->>'seq')::bigint * 0.5
                                           OR time <> to_timestamp((1793491200000 + (tags->>'seq')::bigint) / 1000.0))
                 FROM {}",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    let (count, distinct, sum, wrong): (i64, i64, f64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (count, distinct),
        (n as i64, n as i64),
        "every event exactly once"
    );
    assert_eq!(
        sum,
        (0..n).map(|i| i as f64 * 0.5).sum::<f64>(),
        "content checksum"
    );
    assert_eq!(wrong, 0, "no row with another event's contents");
}

async fn migrate(env: &TestEnv) {
    assert!(
        env.spawn(&["migrate"], "migrate.log")
            .wait()
            .unwrap()
            .success(),
        "{}",
        env.log("migrate.log")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_stages_at_random_moments_loses_and_duplicates_nothing() {
    const N: u64 = 200_000;
    let env = TestEnv::new("metrics", CONFIG).await;
    migrate(&env).await;
    let stages = ["ingest", "batch-writer"];
    let mut procs: Vec<common::Spawned> = stages
        .iter()
        .map(|s| env.spawn(&[s], &format!("{s}-0.log")))
        .collect();
    let producer = env.producer();
    let producer = tokio::spawn(async move { producer.produce_known(0, N, 25_000).await });
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !producer.is_finished() || kills < 6 {
        tokio::time::sleep(Duration::from_millis(700 + rand::random::<u64>() % 1300)).await;
        let i = rand::random_range(0..stages.len());
        procs[i].kill().unwrap(); // SIGKILL: no chance to finish anything
        procs[i].wait().unwrap();
        kills += 1;
        procs[i] = env.spawn(&[stages[i]], &format!("{}-{kills}.log", stages[i]));
        assert!(Instant::now() < deadline, "load did not finish");
    }
    producer.await.unwrap();
    env.wait_landed(N as i64, Duration::from_secs(120)).await;
    for p in &mut procs {
        assert!(terminate(p).success());
    }
    assert_exactly_once(&env, N).await;
    assert!(
        env.dead_letters(&env.input()).await.is_empty(),
        "crashes dead-letter nothing"
    );
    assert!(env.dead_letters(&env.rows()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_waits_without_dead_letters_or_growing_memory() {
    const N: u64 = 60_000;
    let pg = OwnPostgres::start();
    let env =
        TestEnv::on_servers("metrics", CONFIG, &common::redis_url(), &pg.url("postgres")).await;
    migrate(&env).await;
    let mut run = env.spawn(&["run"], "run.log");
    let producer = env.producer();
    let producer = tokio::spawn(async move { producer.produce_known(0, N, 2_500).await });
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.stop();
    let before = rss_kb(run.id()).unwrap();
    let mut peak = before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak = peak.max(rss_kb(run.id()).expect("strata run survived the outage"));
    }
    pg.start_again();
    producer.await.unwrap();
    env.wait_landed(N as i64, Duration::from_secs(120)).await;
    let log = env.log("run.log");
    assert!(terminate(&mut run).success(), "{log}");
    assert!(
        log.contains("transient failure, retrying") || log.contains("waiting for PostgreSQL"),
        "the outage was seen: {log}"
    );
    assert_exactly_once(&env, N).await;
    assert!(
        env.dead_letters(&env.input()).await.is_empty(),
        "an outage dead-letters nothing"
    );
    assert!(
        env.dead_letters(&env.rows()).await.is_empty(),
        "an outage dead-letters nothing"
    );
    assert!(
        peak < before + 64 * 1024,
        "memory while waiting: {before} kB → peak {peak} kB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_and_duplicates_nothing() {
    const N: u64 = 40_000;
    let mut redis = OwnRedis::start();
    assert!(redis.port > 0);
    let env = TestEnv::on_servers("metrics", CONFIG, &redis.url(), &common::admin_url()).await;
    migrate(&env).await;
    let mut run = env.spawn(&["run"], "run.log");
    let producer = env.producer();
    let producer = tokio::spawn(async move { producer.produce_known(0, N, 5_000).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let redis = tokio::task::spawn_blocking(move || {
        redis.restart(Duration::from_secs(3));
        redis
    })
    .await
    .unwrap();
    producer.await.unwrap();
    env.wait_landed(N as i64, Duration::from_secs(120)).await;
    let log = env.log("run.log");
    assert!(terminate(&mut run).success(), "{log}");
    assert_exactly_once(&env, N).await;
    assert!(env.dead_letters(&env.input()).await.is_empty());
    assert!(env.dead_letters(&env.rows()).await.is_empty());
    drop(env);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_consumers_entries_are_claimed_and_the_consumer_forgotten() {
    let env = TestEnv::new("metrics", "[streams]\nclaim_idle_ms = 1000\nclaim_interval_ms = 300\nblock_ms = 200\nforget_consumer_after_ms = 2000\n").await;
    env.migrate().await;
    env.producer().produce_known(0, 1000, 100_000).await;
    let mut conn = env.redis().await;
    streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    let (held, _) = streams::Consumer::new(&env.input(), ingest::STAGE.name, "doomed")
        .read_new(&mut conn, 600, 100)
        .await
        .unwrap();
    assert_eq!(held.len(), 600, "the dead consumer holds 600 entries");
    let stop = CancellationToken::new();
    let running = strata_stages::start(
        &env.config,
        std::slice::from_ref(&env.schema),
        &HOT_PATH,
        stop.clone(),
    )
    .await
    .unwrap();
    let stats = running.stats.clone();
    env.wait_landed(1000, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .consumers(&mut conn)
        .await
        .unwrap()
        .iter()
        .any(|c| c.name == "doomed")
    {
        assert!(
            Instant::now() < deadline,
            "the dead consumer was not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    running.wait(&stop).await.unwrap();
    assert_exactly_once(&env, 1000).await;
    assert!(
        stats
            .ingest
            .claimed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 600,
        "the held entries were claimed"
    );
    assert!(env.dead_letters(&env.input()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_delivered_more_than_max_deliveries_is_dead_lettered_with_the_reason() {
    let env = TestEnv::new("metrics", "[streams]\nclaim_idle_ms = 500\nclaim_interval_ms = 200\nblock_ms = 200\nmax_deliveries = 3\n").await;
    env.migrate().await;
    let id = env
        .xadd(&[("source", b"s"), ("metric", b"m"), ("value", b"1")])
        .await;
    env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", b"2")])
        .await;
    let mut conn = env.redis().await;
    streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    let _ = streams::Consumer::new(&env.input(), ingest::STAGE.name, "flaky")
        .read_new(&mut conn, 1, 100)
        .await
        .unwrap();
    for _ in 0..3 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(env.input())
            .arg(ingest::STAGE.name)
            .arg("flaky")
            .arg(0)
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let stop = CancellationToken::new();
    let running = strata_stages::start(
        &env.config,
        std::slice::from_ref(&env.schema),
        &HOT_PATH,
        stop.clone(),
    )
    .await
    .unwrap();
    env.wait_landed(1, Duration::from_secs(30)).await;
    stop.cancel();
    running.wait(&stop).await.unwrap();
    let dead = env.dead_letters(&env.input()).await;
    assert_eq!(dead.len(), 1);
    let get = |k: &str| {
        dead[0]
            .1
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("source_id").as_ref(), Some(&id));
    assert_eq!(get("deliveries").as_deref(), Some("5"));
    assert!(
        get("error")
            .unwrap()
            .contains("more than max_deliveries = 3"),
        "{:?}",
        get("error")
    );
    assert_eq!(env.count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_streams_bounded_while_a_lagging_group_gets_every_entry() {
    const N: u64 = 30_000;
    let env = TestEnv::new("metrics", CONFIG).await;
    env.migrate().await;
    let mut conn = env.redis().await;
    streams::ConsumerGroup::new(&env.input(), "laggard")
        .ensure(&mut conn)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let running = strata_stages::start(
        &env.config,
        std::slice::from_ref(&env.schema),
        &HOT_PATH,
        stop.clone(),
    )
    .await
    .unwrap();
    let producer = env.producer();
    let producer = tokio::spawn(async move { producer.produce_known(0, N, 6_000).await });
    // The laggard reads about half as fast as events arrive.
    let mut seen = std::collections::HashSet::new();
    let (mut max_rows_len, mut worst_excess) = (0u64, 0i64);
    while seen.len() < N as usize {
        let (entries, deleted) = streams::Consumer::new(&env.input(), "laggard", "slow")
            .read_new(&mut conn, 60, 100)
            .await
            .unwrap();
        assert!(
            deleted.is_empty(),
            "an entry the laggard had not acknowledged was trimmed"
        );
        let ids: Vec<streams::StreamId> = entries.iter().map(|e| e.id).collect();
        streams::ConsumerGroup::new(&env.input(), "laggard")
            .ack(&mut conn, &ids)
            .await
            .unwrap();
        seen.extend(ids);
        let len = streams::len(&mut conn, &env.input()).await.unwrap();
        let lag = streams::groups(&mut conn, &env.input())
            .await
            .unwrap()
            .into_iter()
            .find(|g| g.name == "laggard")
            .unwrap()
            .lag
            .unwrap_or(0);
        // The stream holds what the laggard has not read, plus what was acknowledged since the
        // last trim (trim_interval_ms = 200).
        worst_excess = worst_excess.max(len as i64 - lag as i64);
        max_rows_len = max_rows_len.max(streams::len(&mut conn, &env.rows()).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.await.unwrap();
    env.wait_landed(N as i64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let final_len = streams::len(&mut conn, &env.input()).await.unwrap();
    let final_rows = streams::len(&mut conn, &env.rows()).await.unwrap();
    stop.cancel();
    running.wait(&stop).await.unwrap();
    assert_eq!(seen.len(), N as usize, "the lagging group got every entry");
    assert!(
        worst_excess < 3_000,
        "acknowledged entries were trimmed promptly (excess {worst_excess})"
    );
    assert!(
        max_rows_len < 100,
        "rows stream stayed bounded (max {max_rows_len})"
    );
    assert!(
        final_len <= 1 && final_rows <= 1,
        "everything acknowledged was trimmed ({final_len}, {final_rows})"
    );
    assert_exactly_once(&env, N).await;
}
