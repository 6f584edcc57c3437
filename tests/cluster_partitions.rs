//! A partitioned table on a Redis Cluster of its own (3 masters + 3 replicas,
//! [`OwnCluster`]): its partitions spread over the masters, `strata status` names the master of
//! each, and a busy partition's slot migrated mid-stream loses and duplicates nothing.

mod common;

use std::time::{Duration, Instant};

use common::{run_to_end, terminate, TestEnv};
use strata_pipeline::streams::{partition, StreamKind};
use strata_testkit::OwnCluster;

const PARTITIONS: u32 = 6;
const BASE_MS: u64 = 1_793_491_200_000;
const CONFIG: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\nmax_backoff_ms = 1000\n[ingest]\nmax_batch_rows = 500\n[batch_writer]\nmax_batch_rows = 2000\nlinger_ms = 50\n";

/// XADDs events `from..to` to the partition of their source (`s<i % 24>`) through a cluster
/// client, at about `rate` per second, with explicit IDs per partition; a failed batch is sent
/// again from its first event the stream does not hold yet.
async fn produce(urls: Vec<String>, table: String, from: u64, to: u64, rate: u64) {
    let client = redis::cluster::ClusterClient::new(urls).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let start = Instant::now();
    let mut seq = from;
    while seq < to {
        let end = (seq + 200).min(to);
        let mut by_partition: Vec<Vec<u64>> = vec![Vec::new(); PARTITIONS as usize];
        for i in seq..end {
            let source = format!("s{}", i % 24);
            by_partition[partition::of_key(source.as_bytes(), PARTITIONS) as usize].push(i);
        }
        for (p, events) in by_partition.iter().enumerate() {
            let stream = StreamKind::Telemetry.partition_key(&table, p as u32);
            let mut pending: &[u64] = events;
            while !pending.is_empty() {
                let mut pipe = redis::pipe();
                for &i in pending {
                    let id = format!("{}-0", BASE_MS + i);
                    common::xadd_known(&mut pipe, &stream, &id, i, &format!("s{}", i % 24));
                }
                if pipe.query_async::<()>(&mut conn).await.is_ok() {
                    break;
                }
                // Mid-migration: keep what the stream already holds, send the rest again.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let last: Option<String> = redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async::<Vec<(String, Vec<(String, String)>)>>(&mut conn)
                    .await
                    .ok()
                    .and_then(|v| v.into_iter().next().map(|(id, _)| id));
                if let Some(last_ms) = last.and_then(|id| id.split('-').next()?.parse::<u64>().ok())
                {
                    pending = &pending[pending.partition_point(|&i| BASE_MS + i <= last_ms)..];
                }
            }
        }
        seq = end;
        let due = start + Duration::from_secs_f64((seq - from) as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_spreads_over_the_masters_and_survives_a_slot_migration() {
    const N: u64 = 24_000;
    let cluster = OwnCluster::start();
    let seeds = cluster.urls();
    let mut env = TestEnv::on_servers("metrics", CONFIG, &seeds[0], &common::admin_url()).await;
    env.partitioned(PARTITIONS);
    let config = std::fs::read_to_string(env.config_path()).unwrap();
    let redis_line = format!("[redis]\nurl = \"{}\"\n", seeds[0]);
    let nodes: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let config = config.replace(
        &redis_line,
        &format!(
            "{redis_line}cluster = true\nnodes = [{}]\n",
            nodes.join(", ")
        ),
    );
    std::fs::write(env.config_path(), config).unwrap();
    let (ok, text) = run_to_end(env.command().arg("migrate"));
    assert!(ok, "{text}");
    let table = env.table.clone();
    let master_of = |p: u32| {
        cluster.master_of(cluster.keyslot(&StreamKind::Telemetry.partition_key(&table, p)))
    };
    let masters: std::collections::HashSet<u16> = (0..PARTITIONS).map(master_of).collect();
    assert!(
        masters.len() >= 2,
        "6 partitions on one master: {masters:?}"
    );

    let log = std::fs::File::create(env.dir.path().join("run.log")).unwrap();
    let mut run = common::Spawned(
        env.command()
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let producer = tokio::spawn(produce(seeds.clone(), table.clone(), 0, N, 4_000));
    // Mid-stream, partition 1's slot moves to another master.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slot = cluster.keyslot(&StreamKind::Telemetry.partition_key(&table, 1));
    let from = cluster.master_of(slot);
    let to = *cluster.masters().iter().find(|m| **m != from).unwrap();
    tokio::task::block_in_place(|| cluster.migrate_slot(slot, to, Duration::from_millis(500)));
    assert_eq!(cluster.master_of(slot), to);
    producer.await.unwrap();

    // Every event lands once; every partition was read by both stages.
    let client = redis::cluster::ClusterClient::new(seeds.clone()).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let groups = env.hot_path_groups(PARTITIONS);
    env.wait_drained_on(&mut conn, &groups, N as i64, Duration::from_secs(120))
        .await;
    let wrong: i64 = env
        .pg()
        .await
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT s FROM generate_series(0, {}) s LEFT JOIN {table} m \
                 ON (m.tags->>'seq')::bigint = s GROUP BY s HAVING count(m.tags) <> 1) x",
                N - 1
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0, "events lost or duplicated");
    assert!(run.try_wait().unwrap().is_none(), "{}", env.log("run.log"));

    // A producer that computes with a larger N writes to partitions no stage reads: status
    // finds them on whichever master holds them.
    let strays: Vec<u32> = vec![PARTITIONS + 3, PARTITIONS + 10];
    for p in &strays {
        let _: String = redis::cmd("XADD")
            .arg(StreamKind::Telemetry.partition_key(&table, *p))
            .arg("*")
            .arg("source")
            .arg("stray")
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    // status: a row per partition with the master serving it, the sums per table.
    let (ok, text) = run_to_end(env.command().args(["status", "--json"]));
    assert!(ok, "{text}");
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = &s["tables"][0];
    assert_eq!(t["partitions"], PARTITIONS);
    // Partition p's row: read (p below the count) or a stray's, on the master serving it.
    let row_of = |p: u32| {
        let key = StreamKind::Telemetry.partition_key(&table, p);
        let row = t["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} not in status: {t}"));
        assert_eq!(row["partition"], p, "{row}");
        assert_eq!(row["removed"], p >= PARTITIONS, "{row}");
        assert_eq!(row["node"], format!("127.0.0.1:{}", master_of(p)), "{row}");
        row
    };
    for p in 0..PARTITIONS {
        row_of(p);
    }
    for p in &strays {
        assert_eq!(row_of(*p)["length"], 1);
    }
    // The table's sum counts what no stage reads: the strays' events.
    assert_eq!(t["totals"][0]["lag"], strays.len());
    assert_eq!(t["totals"][0]["pending"], 0);
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}
