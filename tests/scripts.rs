//! strata's Lua steps against a real Redis: the commit step and `strata dlq replay` are all or
//! nothing and add nothing twice, whatever an entry holds (thousands of fields, 64 KiB binary
//! values, field names equal to strata's own), including when a write fails halfway.

mod common;

use std::time::{Duration, Instant};

use common::{start, stop, TestEnv};
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use strata_pipeline::streams::{
    self, CommitStep, Consumer, Entry, Fields, ScriptFailure, StreamId,
};
use strata_stages::ingest;
use strata_stages::ops::dlq::{dlq, DlqAction, DlqOptions};
use strata_stages::ops::OpsError;

/// The group read in these tests: ingest's.
const INGEST: &str = ingest::STAGE.name;

/// The largest stream ID: a stream whose last ID is this cannot take `XADD *` any more.
const MAX_ID: &str = "18446744073709551615-18446744073709551615";

/// `strata dlq …` through the library, returning what it printed.
async fn run_dlq(env: &TestEnv, action: DlqAction, stream: &str) -> Result<String, OpsError> {
    let opts = DlqOptions {
        action,
        stream: stream.to_string(),
        count: 10_000,
        id: None,
    };
    let mut out = Vec::new();
    dlq(&env.config, &opts, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

fn pairs<K: AsRef<str>, V: AsRef<[u8]>>(list: impl IntoIterator<Item = (K, V)>) -> Fields {
    list.into_iter()
        .map(|(k, v)| (k.as_ref().to_string(), v.as_ref().to_vec()))
        .collect()
}

/// `n` fields with a time, duplicate names, binary values and every name strata adds.
fn huge_event(n: usize, tag: &str) -> Fields {
    let mut f = pairs([
        ("time", b"1793491200000".to_vec()),
        ("tag", tag.as_bytes().to_vec()),
    ]);
    for name in [
        "error",
        "stage",
        "source_id",
        "deliveries",
        "sqlstate",
        "fields",
    ] {
        f.push((name.to_string(), format!("mine-{name}").into_bytes()));
    }
    let mut i = 0;
    while f.len() < n {
        f.push((format!("f{}", i % (n / 2)), vec![(i % 256) as u8, 0, 0xff]));
        i += 1;
    }
    f
}

async fn xadd(conn: &mut MultiplexedConnection, key: &str, id: &str, fields: &Fields) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key).arg(id);
    for (k, v) in fields {
        cmd.arg(k.as_str()).arg(v.as_slice());
    }
    cmd.query_async(conn).await.unwrap()
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    streams::len(conn, key).await.unwrap()
}

/// Every entry of `key`, fields as written.
async fn entries(conn: &mut MultiplexedConnection, key: &str) -> Vec<(String, Fields)> {
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    streams::parse_entries(reply, 0)
        .0
        .into_iter()
        .map(|e| (e.id.to_string(), e.fields.to_vec()))
        .collect()
}

async fn pending(conn: &mut MultiplexedConnection, stream: &str) -> u64 {
    streams::groups(conn, stream)
        .await
        .unwrap()
        .iter()
        .find(|g| g.name == INGEST)
        .map_or(0, |g| g.pending)
}

/// Makes `key` a stream that cannot take another `XADD *`: its last ID is the largest.
async fn exhaust(conn: &mut MultiplexedConnection, key: &str) {
    xadd(conn, key, MAX_ID, &pairs([("x", "y")])).await;
    let _: u64 = redis::cmd("XDEL")
        .arg(key)
        .arg(MAX_ID)
        .query_async(conn)
        .await
        .unwrap();
}

/// Adds `events` to the input and reads them as consumer `c` of ingest.
async fn read_events(
    env: &TestEnv,
    conn: &mut MultiplexedConnection,
    events: &[Fields],
) -> Vec<Entry> {
    streams::ConsumerGroup::new(&env.input(), INGEST)
        .ensure(conn)
        .await
        .unwrap();
    for e in events {
        xadd(conn, &env.input(), "*", e).await;
    }
    let (read, _) = streams::Consumer::new(&env.input(), INGEST, "c")
        .read_new(conn, 100, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), events.len());
    read
}

/// Ingest's commit step for `read`: one forward to `rows`, every entry dead-lettered.
fn step<'a>(input: &'a str, dlq: &'a str, rows: &'a str, read: &'a [Entry]) -> CommitStep<'a> {
    CommitStep {
        consumer: Consumer::new(input, INGEST, "c"),
        output: rows,
        dlq,
        ids: read.iter().map(|e| e.id).collect(),
        forward: vec![pairs([("frame", b"\x00frame".to_vec())])],
        dead_letters: read
            .iter()
            .map(|e| {
                streams::dead_letter_fields(
                    e.fields.to_vec(),
                    "no such column",
                    INGEST,
                    e.id,
                    1,
                    None,
                )
            })
            .collect(),
        verify: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5000_field_dead_letter_commits_once_and_a_retry_adds_nothing() {
    let env = TestEnv::new("metrics", "").await;
    let mut conn = env.redis().await;
    let (input, dlq, rows) = (env.input(), streams::dlq_stream(&env.input()), env.rows());
    let event = huge_event(5_000, "a");
    let read = read_events(&env, &mut conn, std::slice::from_ref(&event)).await;

    // Unpacked, the dead letter is more than one XADD from a script can take: refused before
    // any write, with a code.
    let mut raw = step(&input, &dlq, &rows, &read);
    raw.dead_letters[0] = event.clone();
    let err = raw.run(&mut conn).await.unwrap_err();
    assert_eq!(ScriptFailure::of(&err), Some(ScriptFailure::Limit), "{err}");
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (0, 0)
    );
    assert_eq!(pending(&mut conn, &env.input()).await, 1);

    // Packed, it commits: one dead letter, the forward once, everything acknowledged.
    let mut packed = step(&input, &dlq, &rows, &read);
    assert!(packed.run(&mut conn).await.unwrap().is_empty());
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (1, 1)
    );
    assert_eq!(pending(&mut conn, &env.input()).await, 0);
    let letters = entries(&mut conn, &dlq).await;
    assert_eq!(letters[0].1.len(), 5);
    assert_eq!(streams::unpack_fields(&letters[0].1[0].1), Some(event));

    // A retry of the same step (its reply lost) adds nothing.
    packed.verify = true;
    let lost = packed.run(&mut conn).await.unwrap();
    assert_eq!(lost, vec![read[0].id]);
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (1, 1)
    );
    // Nor does the same step sent again as it was (without verify), as a cluster client
    // resends a command after a dropped connection: its first ID is no longer pending.
    packed.verify = false;
    let lost = packed.run(&mut conn).await.unwrap();
    assert_eq!(lost, vec![read[0].id]);
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (1, 1)
    );
}

/// `[redis] wait_replicas`: the WAIT goes with the step in one round trip and its count comes
/// back; this Redis has no replica, so 1 is not reached (and the step is applied once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_step_with_wait_replicas_reports_the_replicas_that_acknowledged() {
    let env = TestEnv::new("metrics", "").await;
    let mut conn = env.redis().await;
    let replicas: i64 = {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (input, dlq, rows) = (env.input(), streams::dlq_stream(&env.input()), env.rows());
    let read = read_events(&env, &mut conn, &[huge_event(3, "a")]).await;
    let step = step(&input, &dlq, &rows, &read);
    let wait = strata_pipeline::db::ReplicaWait {
        replicas: (replicas + 1) as u32,
        timeout: Duration::from_millis(100),
    };
    let started = Instant::now();
    let (lost, acked) = step.run_then_wait(&mut conn, Some(wait)).await.unwrap();
    assert!(lost.is_empty());
    assert_eq!(
        acked,
        Some(replicas as u64),
        "one replica more than there are"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "WAIT waited"
    );
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (1, 1)
    );
    assert_eq!(pending(&mut conn, &env.input()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_dead_letters_a_5000_field_event_exactly_once() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let mut conn = env.redis().await;
    let dlq = streams::dlq_stream(&env.input());
    let event = huge_event(5_000, "a");
    let id = xadd(&mut conn, &env.input(), "*", &event).await;
    env.xadd(&[
        ("time", b"1793491200000"),
        ("source", b"h"),
        ("metric", b"m"),
        ("value", b"1"),
    ])
    .await;
    let running = start(&env, &[ingest::STAGE]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !streams::ConsumerGroup::new(&env.input(), INGEST)
        .drained(&mut conn)
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "ingest did not drain its input");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Long enough for a looping retry to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(running).await;
    assert_eq!(xlen(&mut conn, &dlq).await, 1);
    assert_eq!(xlen(&mut conn, &env.rows()).await, 1);

    let listed: Vec<Value> = run_dlq(&env, DlqAction::List, &env.input())
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    let d = &listed[0];
    assert_eq!(
        (d["stage"].as_str(), d["source_id"].as_str()),
        (Some(INGEST), Some(id.as_str()))
    );
    assert_eq!(d["packed"], true);
    assert!(
        d["error"].as_str().unwrap().contains("no such column"),
        "{d}"
    );
    let fields = d["fields"].as_array().expect("duplicate names: pairs");
    assert_eq!(fields.len(), 5_000);
    assert_eq!(fields[2], serde_json::json!(["error", "mine-error"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_second_write_fails_leaves_nothing_behind() {
    let env = TestEnv::new("metrics", "").await;
    let mut conn = env.redis().await;
    let (input, dlq, rows) = (env.input(), streams::dlq_stream(&env.input()), env.rows());
    let read = read_events(&env, &mut conn, &[pairs([("a", "1")]), pairs([("b", "2")])]).await;
    exhaust(&mut conn, &dlq).await;

    // The forward is added first, then the dead letters' XADD fails.
    let err = step(&input, &dlq, &rows, &read)
        .run(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        ScriptFailure::of(&err),
        Some(ScriptFailure::RolledBack),
        "{err}"
    );
    assert!(err.to_string().contains("exhausted"), "{err}");
    assert!(
        entries(&mut conn, &rows).await.is_empty(),
        "the forward was deleted again"
    );
    assert_eq!(xlen(&mut conn, &dlq).await, 0);
    assert_eq!(
        pending(&mut conn, &env.input()).await,
        2,
        "nothing acknowledged"
    );

    // An output that is not a stream is refused before any write.
    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&dlq)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = step(&input, &dlq, &rows, &read)
        .run(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        ScriptFailure::of(&err),
        Some(ScriptFailure::WrongType),
        "{err}"
    );
    assert!(entries(&mut conn, &rows).await.is_empty());
    assert_eq!(pending(&mut conn, &env.input()).await, 2);

    // Once the cause is gone, the same step goes through.
    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(step(&input, &dlq, &rows, &read)
        .run(&mut conn)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        (xlen(&mut conn, &rows).await, xlen(&mut conn, &dlq).await),
        (1, 2)
    );
    assert_eq!(pending(&mut conn, &env.input()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_restore_every_dead_letter_exactly_once() {
    let env = TestEnv::new("metrics", "").await;
    let mut conn = env.redis().await;
    let dlq = streams::dlq_stream(&env.input());
    // Originals: 250 ordinary ones (several script steps), two with 5,000 fields (one with a
    // 64 KiB binary value), each with a unique `tag` and names equal to strata's own.
    let mut originals: Vec<Fields> = Vec::new();
    for i in 0..252 {
        // The large ones first, so concurrent replays start on the same one.
        let mut f = if i < 2 {
            huge_event(5_000, &format!("t{i}"))
        } else {
            huge_event(12, &format!("t{i}"))
        };
        if i == 1 {
            f[10].1 = (0..65_536u32).map(|b| (b % 251) as u8).collect();
        }
        originals.push(f);
    }
    for (i, f) in originals.iter().enumerate() {
        let letter = streams::dead_letter_fields(
            f.clone(),
            "why",
            INGEST,
            StreamId::new(i as u64, 1),
            2,
            None,
        );
        xadd(&mut conn, &dlq, "*", &letter).await;
    }
    // Three replays at once, on threads of their own.
    let env = std::sync::Arc::new(env);
    let replays: Vec<_> = (0..3)
        .map(|_| {
            let env = env.clone();
            tokio::spawn(async move { run_dlq(&env, DlqAction::Replay, &env.input()).await })
        })
        .collect();
    let mut replayed = 0;
    for r in replays {
        let out = r.await.unwrap().unwrap();
        replayed += out.lines().filter(|l| l.contains(" → ")).count();
    }
    assert_eq!(replayed, 252);
    assert_eq!(xlen(&mut conn, &dlq).await, 0);
    let mut back: Vec<Fields> = entries(&mut conn, &env.input())
        .await
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    let tag = |f: &Fields| f[1].1.clone();
    back.sort_by_key(tag);
    originals.sort_by_key(tag);
    assert_eq!(back.len(), originals.len(), "each added once");
    assert!(
        back == originals,
        "fields restored exactly, in order, duplicates kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_second_write_fails_leaves_nothing_behind() {
    let env = TestEnv::new("metrics", "").await;
    let mut conn = env.redis().await;
    let dlq = streams::dlq_stream(&env.rows());
    // A frame goes back to rows:{T} (first), a row to telemetry:{T} (second, which fails).
    let frame = pairs([("frame", b"\x00zz".to_vec())]);
    let row = pairs([
        ("time", "1793491200000"),
        ("value", "-1"),
        ("error", "mine"),
    ]);
    for f in [&frame, &row] {
        let letter = streams::dead_letter_fields(
            f.clone(),
            "why",
            "batch-writer",
            StreamId::new(1, 1),
            1,
            None,
        );
        xadd(&mut conn, &dlq, "*", &letter).await;
    }
    exhaust(&mut conn, &env.input()).await;
    let err = run_dlq(&env, DlqAction::Replay, &env.rows())
        .await
        .unwrap_err();
    let OpsError::Redis(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(ScriptFailure::of(e), Some(ScriptFailure::RolledBack), "{e}");
    assert!(
        entries(&mut conn, &env.rows()).await.is_empty(),
        "the frame was deleted again"
    );
    assert_eq!(xlen(&mut conn, &dlq).await, 2, "no dead letter removed");

    // A large dead letter goes through the transaction: the failed XADD removes nothing.
    let _: () = redis::cmd("DEL")
        .arg(&dlq)
        .query_async(&mut conn)
        .await
        .unwrap();
    let big = huge_event(5_000, "big");
    let letter =
        streams::dead_letter_fields(big.clone(), "why", INGEST, StreamId::new(1, 1), 1, None);
    let tdlq = streams::dlq_stream(&env.input());
    let id = xadd(&mut conn, &tdlq, "*", &letter).await;
    let err = run_dlq(&env, DlqAction::Replay, &env.input())
        .await
        .unwrap_err();
    match &err {
        OpsError::ReplayFailed {
            id: failed, source, ..
        } => {
            assert_eq!(failed, &id);
            assert!(source.to_string().contains("exhausted"), "{source}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(xlen(&mut conn, &tdlq).await, 1, "the dead letter is kept");
    let markers: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{tdlq}:replaying:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(markers.is_empty(), "{markers:?}");

    // Once the target can take entries again, it is replayed exactly as it was.
    let _: () = redis::cmd("DEL")
        .arg(env.input())
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = run_dlq(&env, DlqAction::Replay, &env.input())
        .await
        .unwrap();
    assert!(out.contains(&format!("{id} → ")), "{out}");
    let back = entries(&mut conn, &env.input()).await;
    assert_eq!(back.len(), 1);
    assert!(back[0].1 == big);
    assert_eq!(xlen(&mut conn, &tdlq).await, 0);
}
