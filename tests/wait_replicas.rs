//! `[redis] wait_replicas` for `strata produce` on a Redis of the test's own: a pipeline of
//! XADDs counts as sent only once a replica holds it, a shortfall is waited out (not resent),
//! and the events are there once, on the master and on the replica.

mod common;

use std::time::{Duration, Instant};

use common::servers::OwnRedis;
use common::{admin_url, TestEnv};

const EVENTS: u64 = 3_000;

async fn xlen(url: &str, stream: &str) -> u64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strata_produce_with_wait_replicas_finishes_only_once_a_replica_holds_every_event() {
    let master = OwnRedis::start_ephemeral();
    let env = TestEnv::on_servers("metrics", "", &master.url(), &admin_url()).await;
    let redis_line = format!("[redis]\nurl = \"{}\"\n", master.url());
    let text = std::fs::read_to_string(env.config_path()).unwrap();
    assert!(text.contains(&redis_line), "{text}");
    std::fs::write(
        env.config_path(),
        text.replace(
            &redis_line,
            &format!("{redis_line}wait_replicas = 1\nwait_timeout_ms = 200\n"),
        ),
    )
    .unwrap();
    env.migrate().await;
    let count = EVENTS.to_string();
    let mut produce = env.spawn(
        &[
            "produce",
            "--table",
            &env.table,
            "--count",
            &count,
            "--pipeline",
            "500",
            "--connections",
            "1",
        ],
        "produce.log",
    );

    // No replica yet: the first pipeline's WAIT keeps falling short, and produce neither
    // finishes nor sends more behind it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        produce.try_wait().unwrap().is_none(),
        "produce finished without a replica: {}",
        env.log("produce.log")
    );
    let sent = xlen(&master.url(), &env.input()).await;
    assert_eq!(sent, 500, "one pipeline, waiting for its replica");
    assert!(
        env.log("produce.log")
            .contains("events sent are not replicated yet, waiting again"),
        "produce says why it waits: {}",
        env.log("produce.log")
    );

    let replica = tokio::task::spawn_blocking(move || {
        let replica = master.start_replica();
        (master, replica)
    })
    .await
    .unwrap();
    let (master, replica) = replica;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = produce.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "produce did not finish once the replica was up: {}",
            env.log("produce.log")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{}", env.log("produce.log"));
    assert_eq!(
        xlen(&master.url(), &env.input()).await,
        EVENTS,
        "every event once: nothing resent after the shortfall"
    );
    assert_eq!(
        xlen(&replica.url(), &env.input()).await,
        EVENTS,
        "the replica holds every event produce counted as sent"
    );
}
