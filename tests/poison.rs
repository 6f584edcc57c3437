//! Poison that gets past ingest, or that breaks a commit step: the writer isolates every row
//! PostgreSQL refuses (whatever its SQLSTATE), a commit that keeps failing is split so the rest
//! of its batch flows, and SIGTERM during endless retries still ends the process in time.

mod common;

use std::time::{Duration, Instant};

use common::servers::OwnRedis;
use common::{admin_url, start, terminate, TestEnv};
use strata_pipeline::frame::{FrameBuilder, FIRST_MS_FIELD, FRAME_FIELD, ROWS_FIELD};
use strata_pipeline::runner::{Batch, Stage};
use strata_pipeline::schema::Cell;
use strata_pipeline::streams;
use strata_stages::{writer, HOT_PATH};

/// 2026-11-01T00:00:00Z in µs.
const T0_US: i64 = 1_793_491_200_000_000;

fn row(time_us: i64, source: &str, value: f64, tags: Option<&str>) -> Vec<Cell> {
    vec![
        Cell::Time(time_us),
        Cell::Text(source.into()),
        Cell::Text("m".into()),
        Cell::Float8(value),
        tags.map_or(Cell::Null, |t| Cell::Json(t.into())),
    ]
}

/// XADDs one frame of `rows` to `rows:{T}`, as a producer that bypasses ingest would.
async fn xadd_frame(env: &TestEnv, rows: &[Vec<Cell>]) -> String {
    let mut b = FrameBuilder::new(&env.schema);
    for r in rows {
        b.push_row(r);
    }
    let n = rows.len().to_string();
    env.xadd_to(
        &env.rows(),
        &[
            (ROWS_FIELD, n.as_bytes()),
            (FIRST_MS_FIELD, b"1"),
            (FRAME_FIELD, &b.finish(1)),
        ],
    )
    .await
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_postgres_refuses_for_any_reason_are_dead_lettered_alone() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    // (source marker, row): each refused by PostgreSQL for a reason outside classes 22/23 or
    // while storing its dead letter, or with no partition that can hold it.
    let poison: Vec<(&str, Vec<Cell>, Option<&str>)> = vec![
        (
            "deep-json",
            row(T0_US, "deep-json", 1.0, Some(&deep)),
            Some("54001"),
        ),
        (
            "nul-escape",
            row(T0_US, "nul-escape", 1.0, Some(r#"{"a":"\u0000"}"#)),
            Some("22P05"),
        ),
        (
            "nul-text",
            row(T0_US, "nul\0text", 1.0, None),
            Some("22021"),
        ),
        // Year 10000 and a time no calendar holds: refused before COPY.
        (
            "year-10000",
            row(253_402_300_800_000_000, "year-10000", 1.0, None),
            None,
        ),
        (
            "far-future",
            row(i64::MAX / 2, "far-future", 1.0, None),
            None,
        ),
    ];
    let mut first = Vec::new();
    for i in 0..1000 {
        if i % 200 == 17 {
            first.push(poison[i / 200].1.clone());
        }
        first.push(row(
            T0_US + i as i64,
            &format!("good-{i}"),
            i as f64,
            Some("{}"),
        ));
    }
    let second: Vec<_> = (0..500)
        .map(|i| row(T0_US + i, &format!("second-{i}"), 1.0, None))
        .collect();
    let ids = [
        xadd_frame(&env, &first).await,
        xadd_frame(&env, &second).await,
    ];

    let running = start(&env, &[writer::STAGE]).await;
    env.wait_rows_drained(1500, Duration::from_secs(60)).await;
    common::stop(running).await;
    assert_eq!(
        env.count().await,
        1500,
        "every good row of both frames landed"
    );

    let dead = env.dead_letters(&env.rows()).await;
    assert_eq!(
        dead.len(),
        poison.len(),
        "one dead letter per refused row: {dead:?}"
    );
    for (marker, _, sqlstate) in &poison {
        let mine: Vec<_> = dead
            .iter()
            .filter(|(_, f)| {
                field(f, "source")
                    .is_some_and(|s| s.replace('\0', "-") == marker.replace('\0', "-"))
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{marker}: dead-lettered exactly once: {dead:?}"
        );
        let f = &mine[0].1;
        assert_eq!(field(f, "sqlstate"), *sqlstate, "{marker}: {f:?}");
        assert_eq!(field(f, "source_id"), Some(ids[0].as_str()));
        assert!(
            field(f, "error").is_some_and(|e| e.starts_with("row ")),
            "{f:?}"
        );
    }

    // Redelivered after COMMIT (a writer that crashed before XACK): the stored dead letters
    // come back, the rows are not written again.
    let pool = strata_pipeline::db::postgres_pool(&env.config, 2).unwrap();
    let writer =
        strata_stages::writer::BatchWriter::new(env.schema.clone(), vec![env.rows()], pool)
            .await
            .unwrap();
    let mut conn = env.redis().await;
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(env.rows())
        .arg(&ids[0])
        .arg(&ids[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (entries, _) = streams::parse_entries(v, 2);
    let outcome = writer.process(&Batch { entries }).await.unwrap();
    assert_eq!(outcome.dead_letters.len(), poison.len());
    assert!(outcome
        .dead_letters
        .iter()
        .all(|d| d.error.starts_with("row ")));
    assert_eq!(env.count().await, 1500, "no row written twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_rows_that_are_not_frames_are_dead_lettered_alone_with_the_reason() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    // A zstd frame header that declares 1 GiB of content (single segment, 8-byte size), then
    // one raw block of one byte: refused from the header, before any buffer is sized for it.
    let mut declares_a_gib = vec![0x28, 0xb5, 0x2f, 0xfd, 0xe0];
    declares_a_gib.extend_from_slice(&(1u64 << 30).to_le_bytes());
    declares_a_gib.extend_from_slice(&[0x09, 0x00, 0x00, b'x']);
    let good = |from: usize, n: usize| -> Vec<Vec<Cell>> {
        (from..from + n)
            .map(|i| row(T0_US + i as i64, &format!("good-{i}"), 1.0, None))
            .collect()
    };
    xadd_frame(&env, &good(0, 2)).await;
    let bad = [
        (
            env.xadd_to(&env.rows(), &[(ROWS_FIELD, b"3"), (FIRST_MS_FIELD, b"1")])
                .await,
            "no `frame` field",
        ),
        (
            env.xadd_to(&env.rows(), &[(FRAME_FIELD, b"\x28\xb5\x2f\xfd garbage")])
                .await,
            "not valid zstd",
        ),
        (
            env.xadd_to(&env.rows(), &[(FRAME_FIELD, &declares_a_gib)])
                .await,
            "declares 1073741824 bytes of content",
        ),
        (
            env.xadd_to(
                &env.rows(),
                &[(FRAME_FIELD, &zstd::bulk::compress(b"\x93\x01", 1).unwrap())],
            )
            .await,
            "malformed",
        ),
    ];
    xadd_frame(&env, &good(2, 3)).await;

    let running = start(&env, &[writer::STAGE]).await;
    env.wait_rows_drained(5, Duration::from_secs(60)).await;
    common::stop(running).await;
    assert_eq!(env.count().await, 5, "both good frames landed whole");
    let dead = env.dead_letters(&env.rows()).await;
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for (id, reason) in &bad {
        let mine: Vec<_> = dead
            .iter()
            .filter(|(_, f)| field(f, "source_id") == Some(id.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "{reason}: dead-lettered once: {dead:?}");
        let f = &mine[0].1;
        assert!(
            field(f, "error").is_some_and(|e| e.contains(reason)),
            "{reason}: {f:?}"
        );
        assert_eq!(field(f, "stage"), Some("batch-writer"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_keeps_failing_is_split_and_the_rest_of_the_batch_lands() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let mut conn = env.redis().await;
    // The dead-letter stream is not a stream: every commit step with a dead letter fails.
    let dlq = streams::dlq_stream(&env.input());
    let _: () = redis::cmd("SET")
        .arg(&dlq)
        .arg("not a stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut bad_id = String::new();
    for i in 0..300 {
        if i == 150 {
            bad_id = env
                .xadd(&[
                    ("source", b"s"),
                    ("metric", b"m"),
                    ("value", b"1"),
                    ("colour", b"red"),
                ])
                .await;
        }
        let v = i.to_string();
        env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    // Every good event of the batch lands; the lone entry is left pending, not lost.
    let running = start(&env, &HOT_PATH).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.count().await < 300 {
        assert!(
            Instant::now() < deadline,
            "{} of 300 rows",
            env.count().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pending = streams::groups(&mut conn, &env.input()).await.unwrap();
    assert_eq!(pending[0].pending, 1, "the lone entry is pending");
    assert_eq!(
        env.count().await,
        300,
        "every good event of the batch landed once"
    );

    // Fixed: the entry is claimed again and dead-lettered once; nothing else moves.
    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    env.wait_landed(300, Duration::from_secs(30)).await;
    common::stop(running).await;
    let dead = env.dead_letters(&env.input()).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(field(&dead[0].1, "source_id"), Some(bad_id.as_str()));
    assert_eq!(env.count().await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_endless_commit_retries_exits_within_the_shutdown_timeout() {
    let redis = OwnRedis::start();
    let env = TestEnv::on_servers(
        "metrics",
        "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n[ingest]\nlinger_ms = 3000\n[shutdown]\ntimeout_ms = 2000\n[admin]\nenabled = false\n",
        &redis.url(),
        &admin_url(),
    )
    .await;
    env.migrate().await;
    let mut conn = env.redis().await;
    for i in 0..100 {
        let v = i.to_string();
        env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    // Ingest reads the events, then lingers before its commit step; meanwhile Redis starts
    // refusing every write (OOM, a transient fault), so the commit is retried for as long as it
    // takes.
    let mut ingest = env.spawn(&["ingest"], "ingest.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = streams::groups(&mut conn, &env.input()).await.unwrap();
        if groups.first().is_some_and(|g| g.pending == 100) {
            break;
        }
        assert!(Instant::now() < deadline, "{}", env.log("ingest.log"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    while !env.log("ingest.log").contains("commit failed, retrying") {
        assert!(Instant::now() < deadline, "{}", env.log("ingest.log"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let signalled = Instant::now();
    let status = terminate(&mut ingest);
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM"
    );
    assert_eq!(status.code(), Some(3), "{}", env.log("ingest.log"));
    assert!(env.log("ingest.log").contains("timeout_ms = 2000"));

    // Nothing was lost: once Redis takes writes again, another process finishes the work.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let running = start(&env, &HOT_PATH).await;
    env.wait_landed(100, Duration::from_secs(30)).await;
    common::stop(running).await;
    assert_eq!(env.count().await, 100);
}
