//! strata as users run it: separate processes, SIGTERM, several processes in one group.

mod common;

use std::time::Duration;

use common::{terminate, TestEnv};

const CONFIG: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n[ingest]\nmax_batch_rows = 500\n[batch_writer]\nmax_batch_rows = 2000\nlinger_ms = 50\n";

async fn seq_stats(env: &TestEnv) -> (i64, i64) {
    let row = env
        .pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (tags->>'seq')::bigint) FROM {}",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

fn produce(env: &TestEnv, count: u64, rate: u64) -> common::Spawned {
    env.spawn(
        &[
            "produce",
            "--table",
            &env.table,
            "--count",
            &count.to_string(),
            "--rate",
            &rate.to_string(),
        ],
        "produce.log",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_a_restart_finishes() {
    let env = TestEnv::new("metrics", CONFIG).await;
    assert!(
        env.spawn(&["migrate"], "migrate.log")
            .wait()
            .unwrap()
            .success(),
        "{}",
        env.log("migrate.log")
    );
    let mut producer = produce(&env, 30_000, 10_000);
    let mut run = env.spawn(&["run"], "run1.log");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = terminate(&mut run);
    let log = env.log("run1.log");
    assert!(
        status.success(),
        "graceful exit 0 on SIGTERM, got {status}: {log}"
    );
    assert!(log.contains("shutdown requested"), "{log}");
    let landed_before = env.count().await;
    assert!(
        landed_before > 0 && landed_before < 30_000,
        "stopped mid-stream ({landed_before} rows)"
    );
    assert!(
        producer.wait().unwrap().success(),
        "{}",
        env.log("produce.log")
    );

    let mut run = env.spawn(&["run"], "run2.log");
    env.wait_landed(30_000, Duration::from_secs(90)).await;
    assert!(terminate(&mut run).success(), "{}", env.log("run2.log"));
    assert_eq!(
        seq_stats(&env).await,
        (30_000, 30_000),
        "every event exactly once"
    );
    assert!(env.dead_letters(&env.input()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_processes_in_one_group_share_the_work() {
    let env = TestEnv::new("metrics", CONFIG).await;
    assert!(
        env.spawn(&["migrate"], "migrate.log")
            .wait()
            .unwrap()
            .success(),
        "{}",
        env.log("migrate.log")
    );
    let names = [
        "ingest-a.log",
        "ingest-b.log",
        "writer-a.log",
        "writer-b.log",
    ];
    let mut procs = vec![
        env.spawn(&["ingest"], names[0]),
        env.spawn(&["ingest"], names[1]),
        env.spawn(&["batch-writer"], names[2]),
        env.spawn(&["batch-writer"], names[3]),
    ];
    // Let every consumer block on its group before the load starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut producer = produce(&env, 40_000, 10_000);
    assert!(
        producer.wait().unwrap().success(),
        "{}",
        env.log("produce.log")
    );
    env.wait_landed(40_000, Duration::from_secs(90)).await;
    for p in &mut procs {
        assert!(terminate(p).success());
    }
    assert_eq!(
        seq_stats(&env).await,
        (40_000, 40_000),
        "every event exactly once"
    );
    for name in names {
        let log = env.log(name);
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("consumer stopped"))
            .unwrap_or_else(|| panic!("{name}: {log}"));
        let acked: u64 = line
            .split("acked=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap();
        assert!(acked > 0, "{name} took a share of the work: {line}");
    }
}
