//! Partitioned tables (`partitions = N` in a schema) on the shared standalone Redis: every
//! partition read, every event landing once, the producers' hash, growing the count under
//! running stages, refusing a shrink that would leave entries unread, and the operator
//! commands' view of partitions. (On a Redis Cluster: `tests/cluster.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::{run_to_end, start_stages, stop, terminate, TestEnv};
use strata_pipeline::schema::SchemaRef;
use strata_pipeline::streams::{self, partition, StreamKind};
use strata_stages::ops::status::{status, StatusOptions};
use strata_stages::{writer, HOT_PATH};

/// Config for quick polls and claims.
const CONFIG: &str =
    "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\npartition_poll_ms = 300\n";

/// XADDs events `from..to` (metrics: time, source `s<i % 20>`, value, tags with the sequence
/// number) to the partition of their source, as a producer following the documented hash does.
async fn produce_partitioned(env: &TestEnv, n: u32, from: u64, to: u64) {
    let mut conn = env.redis().await;
    let mut pipe = redis::pipe();
    for i in from..to {
        let source = format!("s{}", i % 20);
        let p = zlib_crc32(source.as_bytes()) % n;
        let stream = StreamKind::Telemetry.partition_key(&env.table, p);
        common::xadd_known(&mut pipe, &stream, "*", i, &source);
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
}

/// CRC-32/ISO-HDLC written out (as a producer in another language has it), so the test checks
/// the documented hash rather than strata's own call.
fn zlib_crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Waits until every partition's `telemetry` and `rows` are read and acknowledged and the table
/// holds `rows` rows.
async fn wait_landed(env: &TestEnv, n: u32, rows: i64, timeout: Duration) {
    let groups = env.hot_path_groups(n);
    env.wait_drained_on(&mut env.redis().await, &groups, rows, timeout)
        .await;
}

/// Rows per sequence number that appear other than exactly once.
async fn not_exactly_once(env: &TestEnv, n: i64) -> Vec<(i64, i64)> {
    env.pg()
        .await
        .query(
            &format!(
                "SELECT s, count(m.tags) FROM generate_series(0, {}) s \
                 LEFT JOIN {} m ON (m.tags->>'seq')::bigint = s GROUP BY s HAVING count(m.tags) <> 1",
                n - 1,
                env.table
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn status_json(env: &TestEnv) -> serde_json::Value {
    let mut out = Vec::new();
    let opts = StatusOptions {
        json: true,
        watch: false,
    };
    status(
        &env.config,
        std::slice::from_ref(&env.schema),
        &opts,
        &mut out,
    )
    .await
    .expect("status");
    serde_json::from_slice(&out).unwrap()
}

async fn recorded(env: &TestEnv) -> Option<partition::Recorded> {
    partition::recorded(&mut env.redis().await, &env.table)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_partition_is_read_and_every_event_lands_once() {
    const N: u64 = 6_000;
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(3);
    env.migrate().await;
    produce_partitioned(&env, 3, 0, N).await;
    let mut conn = env.redis().await;
    // Each partition got some of the events (20 sources over 3 partitions).
    let mut lengths = Vec::new();
    for p in 0..3 {
        lengths.push(
            streams::len(
                &mut conn,
                &StreamKind::Telemetry.partition_key(&env.table, p),
            )
            .await
            .unwrap(),
        );
    }
    assert!(lengths.iter().all(|&l| l > 0), "{lengths:?}");
    assert_eq!(lengths.iter().sum::<u64>(), N);
    // `strata inspect` reads a partition's stream.
    let one = StreamKind::Telemetry.partition_key(&env.table, 1);
    let (ok, text) = run_to_end(env.command().args(["inspect", &one, "--count", "2"]));
    assert!(ok, "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        let source = l["fields"]["source"]
            .as_str()
            .unwrap_or_else(|| panic!("{l}"));
        assert_eq!(zlib_crc32(source.as_bytes()) % 3, 1, "{l}");
    }
    let running = start_stages(&env.config, &env.schema, &HOT_PATH).await;
    wait_landed(&env, 3, N as i64, Duration::from_secs(60)).await;
    assert_eq!(not_exactly_once(&env, N as i64).await, vec![]);
    // Each partition's frames went through its own rows stream, and were recorded by it.
    for (p, len) in lengths.iter().enumerate() {
        let rows = StreamKind::Rows.partition_key(&env.table, p as u32);
        let g = streams::ConsumerGroup::new(&rows, writer::STAGE.group())
            .info(&mut conn)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no batch-writer group on {rows}"));
        assert!(g.last_delivered_id > streams::StreamId::ZERO, "{rows}");
        let applied: i64 = env
            .pg()
            .await
            .query_one(
                "SELECT count(*) FROM strata.applied_frames WHERE stream = $1",
                &[&rows],
            )
            .await
            .unwrap()
            .get(0);
        assert!(applied > 0, "{rows}: {len} events, no frame recorded");
    }
    // The recorded count, and status: a row per partition, the sums per table.
    assert_eq!(
        recorded(&env).await,
        Some(partition::Recorded {
            count: 3,
            highest: 3
        })
    );
    // One dead letter in partition 2, for the sums.
    let bad = StreamKind::Telemetry.partition_key(&env.table, 2);
    let () = redis::cmd("XADD")
        .arg(&bad)
        .arg("*")
        .arg("nonsense")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while streams::len(&mut conn, &streams::dlq_stream(&bad))
        .await
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "no dead letter on {bad}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(running).await;
    let s = status_json(&env).await;
    let t = &s["tables"][0];
    assert_eq!(t["partitions"], 3);
    assert_eq!(t["dead_letters"], 1);
    let listed: Vec<&str> = t["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    let table = &env.table;
    for p in ["", ":1", ":2"] {
        assert!(
            listed.contains(&format!("telemetry:{{{table}{p}}}").as_str()),
            "{listed:?}"
        );
        assert!(
            listed.contains(&format!("rows:{{{table}{p}}}").as_str()),
            "{listed:?}"
        );
    }
    assert!(listed.contains(&format!("archive:{{{table}}}").as_str()));
    assert!(!listed.contains(&format!("archive:{{{table}:1}}").as_str()));
    let totals = t["totals"].as_array().unwrap();
    assert_eq!(totals.len(), 2, "{totals:?}");
    assert_eq!(totals[0]["streams"], format!("telemetry:{{{table}:*}}"));
    assert_eq!(totals[0]["group"], "ingest");
    assert_eq!(totals[0]["dead_letters"], 1);
    assert_eq!(totals[0]["lag"], 0);
    assert_eq!(totals[0]["pending"], 0);
    assert_eq!(totals[1]["streams"], format!("rows:{{{table}:*}}"));
    let (ok, text) = run_to_end(env.command().arg("status"));
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Σ telemetry:{{{table}:*}} (3 partitions)")),
        "{text}"
    );
    // `strata dlq list` of a partition's dead-letter stream.
    let (ok, text) = run_to_end(
        env.command()
            .args(["dlq", "list", "--stream"])
            .arg(streams::dlq_stream(&bad)),
    );
    assert!(ok, "{text}");
    assert!(text.contains("nonsense"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strata_produce_sends_each_event_to_the_partition_of_its_key() {
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(4);
    env.migrate().await;
    let (ok, text) = run_to_end(
        env.command()
            .args(["produce", "--table", &env.table, "--count", "2000"]),
    );
    assert!(ok, "{text}");
    let mut total = 0;
    for p in 0..4u32 {
        let stream = StreamKind::Telemetry.partition_key(&env.table, p);
        let entries = env.entries(&stream).await;
        assert!(!entries.is_empty(), "{stream} got nothing");
        for (id, fields) in &entries {
            let source = &fields.iter().find(|(k, _)| k == "source").unwrap().1;
            assert_eq!(
                zlib_crc32(source.as_bytes()) % 4,
                p,
                "{stream} {id}: {source}"
            );
        }
        total += entries.len();
    }
    assert_eq!(total, 2000);
    let running = start_stages(&env.config, &env.schema, &HOT_PATH).await;
    wait_landed(&env, 4, 2000, Duration::from_secs(60)).await;
    stop(running).await;
    assert_eq!(env.count().await, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_stages_pick_up_partitions_another_process_adds() {
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.migrate().await;
    // Process A: the table unpartitioned.
    let mut a = env.spawn(&["run"], "a.log");
    produce_partitioned(&env, 1, 0, 500).await;
    wait_landed(&env, 1, 500, Duration::from_secs(60)).await;
    // Process B starts with partitions = 3 and records it; then it stops.
    env.partitioned(3);
    let mut b = env.spawn(&["ingest"], "b.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    while recorded(&env).await.map(|r| r.count) != Some(3) {
        assert!(
            Instant::now() < deadline,
            "B did not record 3: {}",
            env.log("b.log")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(terminate(&mut b).success(), "{}", env.log("b.log"));
    // Only A runs: it reads the new partitions, ingest and batch-writer alike.
    produce_partitioned(&env, 3, 500, 3_000).await;
    wait_landed(&env, 3, 3_000, Duration::from_secs(60)).await;
    assert_eq!(not_exactly_once(&env, 3_000).await, vec![]);
    let log = env.log("a.log");
    assert!(log.contains("partitions added"), "{log}");
    assert!(terminate(&mut a).success(), "{}", env.log("a.log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shrink_is_refused_while_a_removed_partition_holds_entries() {
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(3);
    env.migrate().await;
    let three: SchemaRef = env.schema.clone();
    let running = start_stages(&env.config, &three, &HOT_PATH).await;
    stop(running).await;
    // While no stage runs, events reach partition 2 (and 0).
    produce_partitioned(&env, 3, 0, 300).await;
    let held = StreamKind::Telemetry.partition_key(&env.table, 2);
    let mut conn = env.redis().await;
    assert!(streams::len(&mut conn, &held).await.unwrap() > 0);
    env.partitioned(2);
    let two = env.schema.clone();
    let refused = strata_stages::start(
        &env.config,
        std::slice::from_ref(&two),
        &HOT_PATH,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .err()
    .expect("shrinking over undelivered entries must be refused");
    let why = strata_pipeline::error_chain(&refused);
    assert!(why.contains(&format!("`{held}`")), "{why}");
    assert!(why.contains("partitions = 2"), "{why}");
    assert!(why.contains("not yet delivered"), "{why}");
    // The CLI says the same, and exits non-zero.
    let (ok, text) = run_to_end(env.command().arg("ingest"));
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("`{held}`")), "{text}");
    assert_eq!(
        recorded(&env).await.map(|r| r.count),
        Some(3),
        "nothing recorded"
    );
    // Drained with 3, the shrink goes through; status no longer lists partition 2.
    let running = start_stages(&env.config, &three, &HOT_PATH).await;
    wait_landed(&env, 3, 300, Duration::from_secs(60)).await;
    stop(running).await;
    let running = start_stages(&env.config, &two, &HOT_PATH).await;
    assert_eq!(
        recorded(&env).await,
        Some(partition::Recorded {
            count: 2,
            highest: 3
        })
    );
    stop(running).await;
    let s = status_json(&env).await;
    assert_eq!(s["tables"][0]["partitions"], 2);
    let listed = s["tables"][0]["streams"].to_string();
    assert!(
        !listed.contains(&held),
        "a drained removed partition is not listed: {listed}"
    );
    // A removed partition that still holds entries (a producer using the old count) is.
    produce_partitioned(&env, 3, 300, 600).await;
    let s = status_json(&env).await;
    let removed: Vec<_> = s["tables"][0]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["removed"] == true)
        .map(|s| s["stream"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(removed, vec![held.clone()]);
    assert_eq!(not_exactly_once(&env, 300).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_streams_of_partitions_beyond_any_count_the_table_had() {
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(2);
    env.migrate().await;
    let running = start_stages(&env.config, &env.schema, &HOT_PATH).await;
    stop(running).await;
    // A producer that computed with N = 8 wrote to partitions 5 and 7; nothing reads them.
    let mut conn = env.redis().await;
    let stray = |p| StreamKind::Telemetry.partition_key(&env.table, p);
    for (key, n) in [(stray(5), 2), (stray(7), 1)] {
        for _ in 0..n {
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("source")
                .arg("s")
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    // Keys that look alike but are no partition's stream: not listed.
    for key in [
        format!("telemetry:{{{}:05}}", env.table),
        format!("telemetry:{{{}:x}}", env.table),
        format!("telemetry:{{{}x:3}}", env.table),
    ] {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("f")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let s = status_json(&env).await;
    let listed: Vec<(String, bool, u64)> = s["tables"][0]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stream"].as_str().unwrap().starts_with("telemetry:"))
        .map(|s| {
            (
                s["stream"].as_str().unwrap().to_string(),
                s["removed"].as_bool().unwrap(),
                s["length"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (stray(0), false, 0),
            (stray(1), false, 0),
            (stray(5), true, 2),
            (stray(7), true, 1),
        ]
    );
    assert_eq!(s["tables"][0]["partitions"], 2);
    let (ok, text) = run_to_end(env.command().arg("status"));
    assert!(ok, "{text}");
    assert!(text.contains(&format!("{} (removed)", stray(7))), "{text}");
    for key in [
        format!("telemetry:{{{}:05}}", env.table),
        format!("telemetry:{{{}:x}}", env.table),
        format!("telemetry:{{{}x:3}}", env.table),
    ] {
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_batch_of_two_partitions_whose_frames_share_an_id_writes_each_once() {
    use strata_pipeline::runner::{Batch, Stage};
    const N: u64 = 400;
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(2);
    env.migrate().await;
    frames_waiting(&env, 2, N).await;
    let mut conn = env.redis().await;
    let rows: Vec<String> = (0..2)
        .map(|p| StreamKind::Rows.partition_key(&env.table, p))
        .collect();
    // Every frame of both partitions in one batch, partition 1's frames renumbered to the IDs of
    // partition 0's (streams on different masters can hand out the same IDs).
    let mut entries = Vec::new();
    for (p, stream) in rows.iter().enumerate() {
        let mut frames = streams::range(&mut conn, stream, "-", "+", 10_000)
            .await
            .unwrap();
        assert!(!frames.is_empty(), "no frame on {stream}");
        for (i, f) in frames.iter_mut().enumerate() {
            f.input = p as u16;
            f.id = streams::StreamId {
                ms: 1,
                seq: i as u64,
            };
        }
        entries.extend(frames);
    }
    let pool = strata_pipeline::db::postgres_pool(&env.config, 2).unwrap();
    let writer = writer::BatchWriter::new(env.schema.clone(), rows.clone(), pool)
        .await
        .unwrap();
    let batch = Batch { entries };
    let outcome = writer.process(&batch).await.unwrap();
    assert!(
        outcome.dead_letters.is_empty(),
        "{:?}",
        outcome.dead_letters
    );
    assert_eq!(
        not_exactly_once(&env, N as i64).await,
        vec![],
        "every event once"
    );
    // Recorded per stream: the same ID twice, once for each partition's stream.
    let recorded: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(DISTINCT stream) FROM strata.applied_frames WHERE frame_id = '1-0'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 2, "frame 1-0 recorded for both streams");
    // Delivered again (a writer that crashed before acknowledging): nothing written twice.
    let again = writer.process(&batch).await.unwrap();
    assert!(again.dead_letters.is_empty());
    assert_eq!(not_exactly_once(&env, N as i64).await, vec![], "still once");
}

/// Events `0..n` produced to the `partitions` partitions of their sources and validated by
/// ingest alone: their frames wait in each partition's `rows`, read by no writer yet.
async fn frames_waiting(env: &TestEnv, partitions: u32, n: u64) {
    produce_partitioned(env, partitions, 0, n).await;
    let running = start_stages(&env.config, &env.schema, &[strata_stages::ingest::STAGE]).await;
    let ingest: Vec<(String, &str)> = (0..partitions)
        .map(|p| (StreamKind::Telemetry.partition_key(&env.table, p), "ingest"))
        .collect();
    env.wait_drained_on(&mut env.redis().await, &ingest, 0, Duration::from_secs(30))
        .await;
    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_process_copies_the_frames_of_every_partition_in_one_transaction() {
    const N: u64 = 3_000;
    // A batch may wait 5 s: every partition's first read arrives well within it.
    let mut env = TestEnv::new(
        "metrics",
        &format!("{CONFIG}[batch_writer]\nlinger_ms = 5000\n"),
    )
    .await;
    env.partitioned(3);
    env.migrate().await;
    frames_waiting(&env, 3, N).await;
    let running = start_stages(&env.config, &env.schema, &[writer::STAGE]).await;
    let rows: Vec<(String, &str)> = (0..3)
        .map(|p| {
            (
                StreamKind::Rows.partition_key(&env.table, p),
                writer::STAGE.group(),
            )
        })
        .collect();
    env.wait_drained_on(
        &mut env.redis().await,
        &rows,
        N as i64,
        Duration::from_secs(30),
    )
    .await;
    stop(running).await;
    assert_eq!(not_exactly_once(&env, N as i64).await, vec![]);
    // Each row records the transaction that inserted it: one COPY for all three partitions'
    // frames (a writer loop per partition would have made at least three).
    let copies: i64 = env
        .pg()
        .await
        .query_one(
            &format!("SELECT count(DISTINCT xmin::text) FROM {}", env.table),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 1, "COPY transactions for {N} rows of 3 partitions");
}
