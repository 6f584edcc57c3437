//! The hot path against the real Redis and PostgreSQL: exact arrival for both example schemas,
//! every kind of bad input, and exactly-once on redelivery.

mod common;

use std::time::Duration;

use common::{start, TestEnv};
use strata_pipeline::runner::{Batch, Stage};
use strata_pipeline::streams;
use strata_stages::{ingest, writer, HOT_PATH};

fn msgpack(v: rmpv::Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &v).unwrap();
    buf
}

fn map(pairs: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_events_arrive_exactly_in_every_producer_format() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    env.xadd(&[
        ("time", b"1793491200000"),
        ("source", b"host-1"),
        ("metric", b"cpu.user"),
        ("value", b"12.5"),
        ("tags", br#"{"region":"eu-1"}"#),
    ])
    .await;
    env.xadd(&[
        ("time", b"2026-11-01T01:00:01.5+01:00"),
        ("source", b"host-2"),
        ("metric", b"mem"),
        ("value", b"-3"),
    ])
    .await;
    let no_time = env
        .xadd(&[
            ("source", b"host-3"),
            ("metric", b"disk"),
            ("value", b"1e3"),
            ("tags", b"{}"),
        ])
        .await;
    env.xadd(&[(
        "msgpack",
        &msgpack(map(vec![
            ("time", 1_793_491_202_000i64.into()),
            ("source", "host-4".into()),
            ("metric", "net".into()),
            ("value", 7.into()),
            (
                "tags",
                map(vec![("a", rmpv::Value::Array(vec![1.into(), 2.into()]))]),
            ),
        ])),
    )])
    .await;
    env.xadd(&[(
        "msgpack",
        &msgpack(rmpv::Value::Array(vec![
            map(vec![
                ("time", "2026-11-01T00:00:03Z".into()),
                ("source", "host-5".into()),
                ("metric", "a".into()),
                ("value", 0.25.into()),
            ]),
            map(vec![
                ("time", 1_793_491_204_000i64.into()),
                ("source", "host-6".into()),
                ("metric", "b".into()),
                ("value", (-1).into()),
                ("tags", rmpv::Value::Nil),
            ]),
        ])),
    )])
    .await;
    // A bulk load on top, to cross batch and frame boundaries.
    let mut conn = env.redis().await;
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        pipe.cmd("XADD")
            .arg(env.input())
            .arg("*")
            .arg("time")
            .arg(1_793_491_300_000i64 + i)
            .arg("source")
            .arg(format!("bulk-{}", i % 7))
            .arg("metric")
            .arg("m")
            .arg("value")
            .arg(i)
            .arg("tags")
            .arg(format!("{{\"seq\":{i}}}"))
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();

    let (stop, handle) = start(&env, &HOT_PATH).await;
    env.wait_landed(5006, Duration::from_secs(60)).await;
    stop.cancel();
    handle.await.unwrap();

    let pg = env.pg().await;
    let rows = pg
        .query(
            &format!(
                "SELECT (extract(epoch from time) * 1000000)::bigint, source, metric, value, tags::text FROM {} WHERE source NOT LIKE 'bulk-%' ORDER BY source",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(i64, String, String, f64, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let id_ms: i64 = no_time.split('-').next().unwrap().parse().unwrap();
    let s = |x: &str| x.to_string();
    assert_eq!(
        got,
        vec![
            (
                1_793_491_200_000_000,
                s("host-1"),
                s("cpu.user"),
                12.5,
                Some(s(r#"{"region": "eu-1"}"#))
            ),
            (1_793_491_201_500_000, s("host-2"), s("mem"), -3.0, None),
            (id_ms * 1000, s("host-3"), s("disk"), 1000.0, Some(s("{}"))),
            (
                1_793_491_202_000_000,
                s("host-4"),
                s("net"),
                7.0,
                Some(s(r#"{"a": [1, 2]}"#))
            ),
            (1_793_491_203_000_000, s("host-5"), s("a"), 0.25, None),
            (1_793_491_204_000_000, s("host-6"), s("b"), -1.0, None),
        ]
    );
    let bulk = pg
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT (tags->>'seq')::int), sum(value)::bigint, sum((extract(epoch from time) * 1000)::bigint - 1793491300000 - (tags->>'seq')::int)::bigint
                 FROM {} WHERE source LIKE 'bulk-%'",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(bulk.get::<_, i64>(0), 5000, "every bulk event exactly once");
    assert_eq!(bulk.get::<_, i64>(1), 5000);
    assert_eq!(
        bulk.get::<_, i64>(2),
        (0..5000).sum::<i64>(),
        "values intact"
    );
    assert_eq!(bulk.get::<_, i64>(3), 0, "each row kept its own time");
    assert!(env.dead_letters(&env.input()).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_schema_lands_with_its_own_types() {
    let env = TestEnv::new("ticks", "").await;
    env.migrate().await;
    env.xadd(&[
        ("time", b"1793491200000123"),
        ("symbol", b"ACME"),
        ("bid", b"101.25"),
        ("ask", b"101.27"),
        ("volume", b"300"),
        ("venue_seq", b"17"),
        ("halted", b"false"),
        ("feed", b"x"),
    ])
    .await;
    env.xadd(&[
        ("time", b"2026-11-01T02:00:00.000001Z"),
        ("symbol", b"INIT"),
        ("bid", b""),
        ("volume", b"9000000000"),
        ("halted", b"t"),
    ])
    .await;
    env.xadd(&[
        ("time", b"2026-11-01T05:30:00Z"),
        ("symbol", b"LATE"),
        ("volume", b"1"),
    ])
    .await;
    let (stop, handle) = start(&env, &HOT_PATH).await;
    env.wait_landed(3, Duration::from_secs(30)).await;
    stop.cancel();
    handle.await.unwrap();
    let pg = env.pg().await;
    let rows = pg
        .query(
            &format!("SELECT (extract(epoch from time) * 1000000)::bigint, symbol, bid, ask, volume, venue_seq, halted FROM {} ORDER BY time", env.table),
            &[],
        )
        .await
        .unwrap();
    type Tick = (
        i64,
        String,
        Option<f64>,
        Option<f64>,
        i64,
        Option<i32>,
        Option<bool>,
    );
    let got: Vec<Tick> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                1_793_491_200_000_123,
                "ACME".into(),
                Some(101.25),
                Some(101.27),
                300,
                Some(17),
                Some(false)
            ),
            (
                1_793_498_400_000_001,
                "INIT".into(),
                None,
                None,
                9_000_000_000,
                None,
                Some(true)
            ),
            (
                1_793_511_000_000_000,
                "LATE".into(),
                None,
                None,
                1,
                None,
                None
            ),
        ]
    );
    // One-hour chunks: three rows in three hours make three chunks (native partitions the
    // writer creates on demand, or hypertable chunks), named by their hour when native.
    let t = &env.table;
    let chunks = |sql: String| {
        let pg = &pg;
        async move {
            pg.query(&sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<String>>()
        }
    };
    match env.partitioning().await {
        strata_stages::catalog::Partitioning::Native => assert_eq!(
            chunks(format!("SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '{t}'::regclass ORDER BY 1")).await,
            vec![
                format!("{t}_p20261101_000000"),
                format!("{t}_p20261101_020000"),
                format!("{t}_p20261101_050000")
            ]
        ),
        strata_stages::catalog::Partitioning::Hypertable => assert_eq!(
            chunks(format!("SELECT to_char(range_start AT TIME ZONE 'UTC', 'YYYYMMDD_HH24MISS') FROM timescaledb_information.chunks WHERE hypertable_name = '{t}' ORDER BY 1")).await,
            ["20261101_000000", "20261101_020000", "20261101_050000"]
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_dead_lettered_with_the_reason_and_the_rest_lands() {
    let env = TestEnv::new(
        "metrics",
        "[ingest]\nmax_event_bytes = 1024\n[streams]\nblock_ms = 200\n",
    )
    .await;
    env.migrate().await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    // (the event's fields, what its dead letter's `error` must say)
    type Case<'a> = (Vec<(&'a str, Vec<u8>)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("source", b"h".to_vec()),
                ("metric", b"m".to_vec()),
                ("value", b"abc".to_vec()),
            ],
            "field `value`: not a number: \"abc\"",
        ),
        (
            vec![
                ("time", b"yesterday".to_vec()),
                ("source", b"h".to_vec()),
                ("metric", b"m".to_vec()),
                ("value", b"1".to_vec()),
            ],
            "field `time`: not RFC 3339 or an integer epoch in ms",
        ),
        (
            vec![("metric", b"m".to_vec()), ("value", b"1".to_vec())],
            "missing required field `source`",
        ),
        (
            vec![
                ("source", b"h".to_vec()),
                ("metric", b"m".to_vec()),
                ("value", b"1".to_vec()),
                ("tags", b"{bad".to_vec()),
            ],
            "field `tags`: invalid JSON",
        ),
        (
            vec![
                ("source", b"h".to_vec()),
                ("metric", b"m".to_vec()),
                ("value", b"1".to_vec()),
                ("colour", b"red".to_vec()),
            ],
            "field `colour`: no such column",
        ),
        (
            vec![("msgpack", b"\xdc\x00\x20ab".to_vec())],
            "field `msgpack`: not valid MessagePack",
        ),
        (
            vec![
                ("source", b"h".to_vec()),
                ("metric", b"m".to_vec()),
                ("value", b"1".to_vec()),
                ("tags", big.into_bytes()),
            ],
            "more than max_event_bytes = 1024",
        ),
    ];
    let mut expected = Vec::new();
    for (i, (fields, error)) in cases.iter().enumerate() {
        let refs: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let id = env.xadd(&refs).await;
        expected.push((id, fields.clone(), *error));
        // Valid neighbours in the same read batch.
        let v = i.to_string();
        env.xadd(&[("source", b"ok"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    let (stop, handle) = start(&env, &HOT_PATH).await;
    env.wait_landed(cases.len() as i64, Duration::from_secs(30))
        .await;
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(
        env.count().await,
        cases.len() as i64,
        "all valid neighbours landed"
    );
    let dead = env.dead_letters(&env.input()).await;
    assert_eq!(dead.len(), cases.len());
    for ((_, fields), (id, original, error)) in dead.iter().zip(&expected) {
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        assert!(
            get("error").unwrap().contains(error),
            "{:?} should contain {error:?}",
            get("error")
        );
        assert_eq!(get("stage").as_deref(), Some("ingest"));
        assert_eq!(get("source_id").as_ref(), Some(id));
        assert_eq!(get("deliveries").as_deref(), Some("1"));
        for (k, v) in original {
            assert_eq!(
                get(k).map(String::into_bytes),
                Some(String::from_utf8_lossy(v).into_owned().into_bytes()),
                "original field {k} kept"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_redelivered_after_commit_is_not_written_twice() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    for i in 0..300 {
        let v = i.to_string();
        env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    // Ingest only, until every event is framed.
    let (stop, handle) = start(&env, &[ingest::STAGE]).await;
    let mut conn = env.redis().await;
    while !streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .drained(&mut conn)
        .await
        .unwrap()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    handle.await.unwrap();

    // A writer that commits and then "crashes" before XACK.
    streams::ConsumerGroup::new(&env.rows(), writer::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    let (entries, _) = streams::Consumer::new(&env.rows(), writer::STAGE.name, "crashed-writer")
        .read_new(&mut conn, 1000, 100)
        .await
        .unwrap();
    assert!(!entries.is_empty());
    let pool = strata_pipeline::db::postgres_pool(&env.config, 2).unwrap();
    let writer =
        strata_stages::writer::BatchWriter::new(env.schema.clone(), vec![env.rows()], pool)
            .await
            .unwrap();
    let outcome = writer
        .process(&Batch {
            entries: entries.clone(),
        })
        .await
        .unwrap();
    assert!(outcome.dead_letters.is_empty());
    assert_eq!(env.count().await, 300);

    // A live writer claims the idle frames, finds them applied, and acknowledges them unwritten.
    let (stop, handle) = start(&env, &[writer::STAGE]).await;
    env.wait_landed(300, Duration::from_secs(30)).await;
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(env.count().await, 300, "no row written twice");
    let groups = streams::groups(&mut conn, &env.rows()).await.unwrap();
    assert_eq!(
        groups[0].pending, 0,
        "the redelivered frames were acknowledged"
    );
    let applied: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM strata.applied_frames WHERE stream = $1",
            &[&env.rows()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, entries.len() as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_violating_a_constraint_is_dead_lettered_alone_and_the_rest_commits() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    env.pg()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {} ADD CONSTRAINT value_not_negative CHECK (value >= 0)",
            env.table
        ))
        .await
        .unwrap();
    for i in 0..500 {
        let v = if i == 321 {
            "-1".to_string()
        } else {
            i.to_string()
        };
        env.xadd(&[
            ("time", b"1793491200000"),
            ("source", b"s"),
            ("metric", b"m"),
            ("value", v.as_bytes()),
        ])
        .await;
    }
    let (stop, handle) = start(&env, &HOT_PATH).await;
    env.wait_landed(499, Duration::from_secs(30)).await;
    stop.cancel();
    handle.await.unwrap();
    assert_eq!(
        env.count().await,
        499,
        "every other row of the batch committed"
    );
    let dead = env.dead_letters(&env.rows()).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let get = |k: &str| {
        dead[0]
            .1
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("sqlstate").as_deref(), Some("23514"));
    assert_eq!(get("value").as_deref(), Some("-1"));
    assert_eq!(get("source").as_deref(), Some("s"));
    assert_eq!(get("stage").as_deref(), Some("batch-writer"));
    assert!(
        get("error").unwrap().contains("value_not_negative"),
        "{:?}",
        get("error")
    );
    assert!(env.dead_letters(&env.input()).await.is_empty());
}

/// The commit step's ownership check: a consumer whose entries were claimed by another one
/// forwards none of them (the claim is recorded in `<stream>:claimed`), while the new owner does,
/// and a consumer nothing was taken from commits without the per-entry check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_claimed_by_another_consumer_are_forwarded_by_the_new_owner_only() {
    let env = TestEnv::new("metrics", "").await;
    let mut ids = Vec::new();
    for v in [b"1", b"2", b"3"] {
        ids.push(env.xadd(&[("source", b"s"), ("value", v)]).await);
    }
    let (input, output) = (env.input(), env.rows());
    let dlq = streams::dlq_stream(&input);
    let mut conn = env.redis().await;
    streams::ConsumerGroup::new(&input, ingest::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    let (read, _) = streams::Consumer::new(&input, ingest::STAGE.name, "slow")
        .read_new(&mut conn, 10, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 3);
    // "fast" takes over everything idle for 0 ms, as a live process does with a stalled one.
    let streams::Claimed {
        entries: claimed, ..
    } = streams::Consumer::new(&input, ingest::STAGE.name, "fast")
        .autoclaim(&mut conn, 0, streams::StreamId::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    let recorded: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(streams::claims_key(&input))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(recorded, [("ingest slow".to_string(), 3)].into());

    let env_ref = &env;
    let commit_step = |consumer: &'static str, ids: Vec<String>, verify: bool| {
        let (input, output, dlq) = (input.clone(), output.clone(), dlq.clone());
        async move {
            let mut conn = env_ref.redis().await;
            streams::CommitStep {
                consumer: streams::Consumer::new(&input, ingest::STAGE.name, consumer),
                output: &output,
                dlq: &dlq,
                ids: ids.iter().map(|id| id.parse().unwrap()).collect(),
                forward: vec![vec![("frame".to_string(), consumer.as_bytes().to_vec())]],
                dead_letters: Vec::new(),
                verify,
            }
            .run(&mut conn)
            .await
            .unwrap()
        }
    };
    let commit = |consumer, ids| commit_step(consumer, ids, false);
    let lost = commit("slow", ids[..2].to_vec()).await;
    assert_eq!(
        lost,
        ids[..2].to_vec(),
        "the old owner is told what it lost"
    );
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 0);
    assert!(commit("fast", ids.clone()).await.is_empty());
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 1);
    // A retried commit (its reply lost after it was applied) checks, and writes nothing twice.
    assert_eq!(commit_step("fast", ids.clone(), true).await, ids);
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 1);
    // Even once "slow" owns nothing and is forgotten by the group (as a process stalled past
    // forget_consumer_after_ms is), its record stays, so waking up it still checks.
    streams::ConsumerGroup::new(&input, ingest::STAGE.name)
        .remove_consumer_if_idle(&mut conn, "slow")
        .await
        .unwrap();
    assert_eq!(
        streams::ConsumerGroup::new(&input, ingest::STAGE.name)
            .consumers(&mut conn)
            .await
            .unwrap()
            .len(),
        1
    );
    let lost = commit("slow", ids[2..].to_vec()).await;
    assert_eq!(lost, ids[2..].to_vec(), "acknowledged by the new owner");
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 1);

    // The recorded consumer still commits what it does own, after the per-entry check.
    let id = env.xadd(&[("source", b"s"), ("value", b"4")]).await;
    let (read, _) = streams::Consumer::new(&input, ingest::STAGE.name, "slow")
        .read_new(&mut conn, 10, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert!(commit("slow", vec![id]).await.is_empty());
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 2);
    let groups = streams::groups(&mut conn, &input).await.unwrap();
    assert_eq!(groups[0].pending, 0);
    let frames: Vec<String> = env
        .entries(&output)
        .await
        .into_iter()
        .map(|(_, f)| f[0].1.clone())
        .collect();
    assert_eq!(frames, ["fast", "slow"]);

    // A consumer that claims back its own entry (idle after a Redis restart, while its first
    // copy is still in flight) is recorded too, so only one of the two copies is forwarded.
    let id = env.xadd(&[("source", b"s"), ("value", b"5")]).await;
    let (read, _) = streams::Consumer::new(&input, ingest::STAGE.name, "again")
        .read_new(&mut conn, 10, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    let streams::Claimed {
        entries: claimed, ..
    } = streams::Consumer::new(&input, ingest::STAGE.name, "again")
        .autoclaim(&mut conn, 0, streams::StreamId::ZERO, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let recorded: Option<u64> = redis::cmd("HGET")
        .arg(streams::claims_key(&input))
        .arg("ingest again")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(recorded, Some(1));
    assert!(commit("again", vec![id.clone()]).await.is_empty());
    assert_eq!(commit("again", vec![id.clone()]).await, vec![id]);
    assert_eq!(streams::len(&mut conn, &output).await.unwrap(), 3);
}
