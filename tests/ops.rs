//! Operator commands against the real Redis and PostgreSQL: `status` (numbers exact with a
//! lagging group, pending entries and dead letters; PostgreSQL down; Redis down; plain when
//! piped), `inspect` (frames decode back into the rows sent), and `dlq` (list, replay after a
//! schema fix, `--id`, purge, rows dead letters replayed through ingest, clear errors).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_stages as start, stop, TestEnv};
use serde_json::{json, Value};
use strata_pipeline::schema::{Schema, SchemaRef};
use strata_pipeline::streams;
use strata_stages::ops::dlq::{dlq, DlqAction, DlqOptions};
use strata_stages::ops::inspect::{inspect, InspectOptions};
use strata_stages::ops::status::{status, StatusOptions};
use strata_stages::ops::OpsError;
use strata_stages::Config;
use strata_stages::{ingest, writer, HOT_PATH};

/// `strata dlq …` through the library, returning what it printed.
async fn run_dlq(
    config: &Config,
    action: DlqAction,
    stream: &str,
    id: Option<&str>,
) -> Result<String, OpsError> {
    let opts = DlqOptions {
        action,
        stream: stream.to_string(),
        count: 100,
        id: id.map(str::to_string),
    };
    let mut out = Vec::new();
    dlq(config, &opts, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn status_json(config: &Config, schema: &SchemaRef) -> Value {
    let mut out = Vec::new();
    let opts = StatusOptions {
        json: true,
        watch: false,
    };
    status(config, std::slice::from_ref(schema), &opts, &mut out)
        .await
        .expect("status");
    serde_json::from_slice(&out).expect("status --json is JSON")
}

async fn inspect_lines(
    env: &TestEnv,
    stream: &str,
    count: usize,
    from: Option<&str>,
) -> Result<Vec<Value>, OpsError> {
    let opts = InspectOptions {
        stream: stream.to_string(),
        count,
        from: from.map(str::to_string),
    };
    let mut out = Vec::new();
    inspect(
        &env.config,
        std::slice::from_ref(&env.schema),
        &opts,
        &mut out,
    )
    .await?;
    Ok(json_lines(&String::from_utf8(out).unwrap()))
}

async fn xlen(env: &TestEnv, stream: &str) -> u64 {
    let mut conn = env.redis().await;
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Appends `column` to the test's schema file; returns the new schema.
fn with_column(env: &TestEnv, column: &str) -> SchemaRef {
    let path = env
        .dir
        .path()
        .join("schemas")
        .join(format!("{}.toml", env.table));
    let text = std::fs::read_to_string(&path).unwrap() + column;
    std::fs::write(&path, &text).unwrap();
    Arc::new(Schema::from_toml("test", &text).unwrap())
}

/// A loopback port nothing listens on.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn find<'a>(list: &'a Value, key: &str, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v[key] == name)
        .unwrap_or_else(|| panic!("no {key} = {name} in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_counts_lag_pending_and_dead_letters_exactly() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let mut conn = env.redis().await;
    // telemetry: a group that has read nothing of 5 entries.
    streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    for i in 0..5 {
        let v = i.to_string();
        env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    // rows: 3 entries, 2 read by one consumer and not acknowledged.
    streams::ConsumerGroup::new(&env.rows(), writer::STAGE.name)
        .ensure(&mut conn)
        .await
        .unwrap();
    let mut row_ids = Vec::new();
    for _ in 0..3 {
        row_ids.push(env.xadd_to(&env.rows(), &[("rows", b"0")]).await);
    }
    let (read, _) = streams::Consumer::new(&env.rows(), writer::STAGE.name, "writer-a")
        .read_new(&mut conn, 2, 100)
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    // Dead letters: 2 on telemetry, 1 on rows.
    for _ in 0..2 {
        env.xadd_to(
            &streams::dlq_stream(&env.input()),
            &[("value", b"x"), ("error", b"bad")],
        )
        .await;
    }
    env.xadd_to(
        &streams::dlq_stream(&env.rows()),
        &[("value", b"-1"), ("error", b"check")],
    )
    .await;
    // 4 rows within the last minute, 1 older.
    let mut pg = env.pg().await;
    let now_us = chrono::Utc::now().timestamp_micros();
    for t in [now_us, now_us - 10 * 60_000_000] {
        let start = strata_stages::catalog::chunk_start(t, env.schema.chunk_interval_us);
        env.make_chunk(&mut pg, start).await;
    }
    pg.batch_execute(&format!(
        "INSERT INTO {t} (time, source, metric, value) SELECT now() - interval '1 second', 's', 'm', g FROM generate_series(1, 4) g;
         INSERT INTO {t} (time, source, metric, value) VALUES (now() - interval '10 minutes', 's', 'm', 0);",
        t = env.table
    ))
    .await
    .unwrap();
    let lifecycle: bool = pg
        .query_one("SELECT to_regclass('strata.chunks') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if lifecycle {
        pg.execute(
            "INSERT INTO strata.chunks (table_name, chunk_schema, chunk, chunk_oid, range_start, range_end, state, event_id, archived_at, lake_path)
             VALUES ($1, 'public', 'c1', 1, now() - interval '2 days', now() - interval '1 day', 'archived', $1 || '-1', '2026-11-01T00:00:00Z', 'lake/t/date=2026-10-30/c1.parquet'),
                    ($1, 'public', 'c2', 2, now() - interval '3 days', now() - interval '2 days', 'archived', $1 || '-2', '2026-10-31T00:00:00Z', 'lake/t/date=2026-10-29/c2.parquet'),
                    ($1, 'public', 'c3', 3, now() - interval '1 day', now(), 'pending', $1 || '-3', NULL, NULL),
                    ('other_table', 'public', 'c4', 4, now() - interval '1 day', now(), 'pending', 'other-4', NULL, NULL)",
            &[&env.table],
        )
        .await
        .expect("strata.chunks has the columns status reads (table_name, state, archived_at, lake_path)");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;

    let s = status_json(&env.config, &env.schema).await;
    assert_eq!(s["postgres"], json!({"ok": true, "error": null}), "{s:#}");
    let t = &s["tables"][0];
    assert_eq!(t["table"], env.table.as_str());
    assert_eq!(t["dead_letters"], 3);
    assert_eq!(t["rows_last_minute"], 4);
    assert!(t["postgres_error"].is_null(), "{t:#}");
    assert!(t["chunks"]["live"].as_i64().unwrap() >= 1, "{t:#}");
    if lifecycle {
        assert_eq!(
            t["chunks"]["by_state"],
            json!({"archived": 2, "pending": 1})
        );
        assert_eq!(
            t["newest_archive"],
            json!({"path": "lake/t/date=2026-10-30/c1.parquet", "archived_at": "2026-11-01T00:00:00+00:00"})
        );
    } else {
        assert!(t["chunks"]["by_state"].is_null());
    }

    let telemetry = find(&t["streams"], "stream", &env.input());
    assert_eq!(telemetry["exists"], true);
    assert_eq!(telemetry["length"], 5);
    assert_eq!(telemetry["dead_letters"], 2);
    assert_eq!(telemetry["dlq"], streams::dlq_stream(&env.input()).as_str());
    let ingest = find(&telemetry["groups"], "group", "ingest");
    assert_eq!(ingest["exists"], true);
    assert_eq!(ingest["lag"], 5);
    assert_eq!(ingest["pending"], 0);
    assert!(ingest["oldest_pending"].is_null());
    assert_eq!(ingest["consumers"], json!([]));

    let rows = find(&t["streams"], "stream", &env.rows());
    assert_eq!(rows["length"], 3);
    assert_eq!(rows["dead_letters"], 1);
    let writer = find(&rows["groups"], "group", "batch-writer");
    assert_eq!(writer["lag"], 1);
    assert_eq!(writer["pending"], 2);
    assert_eq!(writer["last_delivered_id"], row_ids[1].as_str());
    let oldest = &writer["oldest_pending"];
    assert_eq!(oldest["id"], row_ids[0].as_str());
    assert_eq!(oldest["consumer"], "writer-a");
    assert_eq!(oldest["deliveries"], 1);
    assert!(oldest["age_ms"].as_u64().unwrap() >= 20, "{oldest}");
    assert!(oldest["idle_ms"].as_u64().unwrap() >= 20, "{oldest}");
    let consumers = writer["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0]["name"], "writer-a");
    assert_eq!(consumers[0]["pending"], 2);
    assert!(consumers[0]["idle_ms"].as_u64().unwrap() >= 20);

    // Streams and groups not created yet are absent, not errors.
    let archive = find(
        &t["streams"],
        "stream",
        &format!("archive:{{{}}}", env.table),
    );
    assert_eq!(archive["exists"], false);
    assert_eq!(archive["length"], 0);
    assert_eq!(archive["dead_letters"], 0);
    assert_eq!(
        archive["groups"],
        json!([{"group": "archiver", "exists": false, "lag": null, "pending": 0,
                "last_delivered_id": null, "oldest_pending": null, "consumers": []}])
    );
    let archived = find(
        &t["streams"],
        "stream",
        &format!("archived:{{{}}}", env.table),
    );
    assert_eq!(archived["groups"][0]["group"], "confirmer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_postgres_down_and_fails_clearly_without_redis() {
    let env = TestEnv::new("metrics", "").await;
    env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", b"1")])
        .await;
    let mut config = env.config.clone();
    let closed = free_port();
    config.postgres.url = format!("postgres://postgres@127.0.0.1:{closed}/x");
    let s = status_json(&config, &env.schema).await;
    assert_eq!(s["postgres"]["ok"], false);
    assert!(
        !s["postgres"]["error"].as_str().unwrap().is_empty(),
        "{s:#}"
    );
    let t = &s["tables"][0];
    assert!(t["rows_last_minute"].is_null());
    assert!(t["chunks"].is_null());
    assert_eq!(find(&t["streams"], "stream", &env.input())["length"], 1);

    let mut config = env.config.clone();
    config.redis.url = format!("redis://127.0.0.1:{closed}");
    let err = status(
        &config,
        std::slice::from_ref(&env.schema),
        &StatusOptions::default(),
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot reach Redis at redis://127.0.0.1:{closed}: "
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_prints_plain_aligned_status_when_piped() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", b"bad")])
        .await;
    let running = start(&env.config, &env.schema, &[ingest::STAGE]).await;
    let mut conn = env.redis().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while xlen(&env, &streams::dlq_stream(&env.input())).await < 1 {
        assert!(Instant::now() < deadline, "ingest dead-lettered nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(running).await;
    // One entry held by a consumer, so a consumer line shows.
    env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", b"2")])
        .await;
    let (held, _) = streams::Consumer::new(&env.input(), ingest::STAGE.name, "op-test")
        .read_new(&mut conn, 10, 100)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    let strata = |args: &[&str]| {
        env.command()
            .args(args)
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .output()
            .expect("run strata")
    };
    let out = strata(&["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains('\x1b'),
        "no escape codes when piped:\n{text}"
    );
    assert!(text.contains("postgres ok"), "{text}");
    assert!(text.contains("1 dead letter ·"), "{text}");
    let line = |needle: &str| -> String {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}:\n{text}"))
            .to_string()
    };
    let header = line("STREAM");
    let telemetry = line(&format!("telemetry:{{{}}}", env.table));
    // Columns line up: the GROUP column starts at the same place on every row.
    let at = header.find("GROUP").unwrap();
    assert_eq!(&telemetry[at..at + "ingest".len()], "ingest", "\n{text}");
    assert_eq!(
        &line(&format!("rows:{{{}}}", env.table))[at..at + "batch-writer".len()],
        "batch-writer",
        "\n{text}"
    );
    assert!(
        line(&format!("archive:{{{}}}", env.table)).contains("archiver (absent)"),
        "{text}"
    );
    assert!(
        text.contains("    └ op-test  pending 1  idle "),
        "consumers listed:\n{text}"
    );

    let out = strata(&["status", "--json"]);
    assert!(out.status.success());
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["tables"][0]["dead_letters"], 1);

    let out = strata(&["inspect", &streams::dlq_stream(&env.input())]);
    assert!(out.status.success());
    let lines = json_lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["fields"]["value"], "bad");

    let out = strata(&["dlq", "list", "--stream", "nonsense"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown stream `nonsense`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_decodes_frames_back_into_the_rows_sent() {
    let env = TestEnv::new("metrics", "").await;
    let first = env
        .xadd(&[
            ("time", b"1793491200000"),
            ("source", b"host-1"),
            ("metric", b"cpu.user"),
            ("value", b"12.5"),
            ("tags", br#"{"region":"eu-1"}"#),
        ])
        .await;
    let second = env
        .xadd(&[
            ("time", b"2026-11-01T00:00:01.125Z"),
            ("source", b"host-2"),
            ("metric", b"mem"),
            ("value", b"-3"),
        ])
        .await;
    let mut packed = Vec::new();
    rmpv::encode::write_value(
        &mut packed,
        &rmpv::Value::Map(vec![
            ("time".into(), 1_793_491_202_000i64.into()),
            ("source".into(), "host-3".into()),
            ("metric".into(), "net".into()),
            ("value".into(), 7.into()),
            (
                "tags".into(),
                rmpv::Value::Map(vec![("a".into(), 1.into())]),
            ),
        ]),
    )
    .unwrap();
    env.xadd(&[("msgpack", &packed)]).await;

    let running = start(&env.config, &env.schema, &[ingest::STAGE]).await;
    let mut conn = env.redis().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .drained(&mut conn)
        .await
        .unwrap()
    {
        assert!(Instant::now() < deadline, "ingest did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop(running).await;

    let frames = inspect_lines(&env, &env.rows(), 100, None).await.unwrap();
    assert!(!frames.is_empty());
    let mut rows = Vec::new();
    let mut total = 0;
    for f in &frames {
        let frame = &f["fields"]["frame"];
        assert_eq!(
            frame["columns"],
            json!(["time", "source", "metric", "value", "tags"])
        );
        assert_eq!(
            frame["types"],
            json!(["timestamptz", "text", "text", "double precision", "jsonb"])
        );
        total += f["fields"]["rows"]
            .as_str()
            .unwrap()
            .parse::<usize>()
            .unwrap();
        rows.extend(frame["rows"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(total, 3);
    assert_eq!(
        rows,
        vec![
            json!({"time": "2026-11-01T00:00:00Z", "source": "host-1", "metric": "cpu.user", "value": 12.5, "tags": {"region": "eu-1"}}),
            json!({"time": "2026-11-01T00:00:01.125Z", "source": "host-2", "metric": "mem", "value": -3.0, "tags": null}),
            json!({"time": "2026-11-01T00:00:02Z", "source": "host-3", "metric": "net", "value": 7.0, "tags": {"a": 1}}),
        ]
    );

    // Producer events: text as strings, MessagePack decoded; --from and --count select.
    let events = inspect_lines(&env, &env.input(), 10, None).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["id"], first.as_str());
    assert_eq!(events[0]["fields"]["value"], "12.5");
    assert_eq!(
        events[2]["fields"]["msgpack"]["msgpack"]["source"],
        "host-3"
    );
    let one = inspect_lines(&env, &env.input(), 1, Some(&second))
        .await
        .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["id"], second.as_str());
    assert_eq!(one[0]["fields"]["source"], "host-2");

    // Binary values are shown safely, and a stream not created yet is simply empty.
    let dlq = streams::dlq_stream(&env.rows());
    env.xadd_to(&dlq, &[("frame", b"\x28\xb5\x2f\xfd garbage")])
        .await;
    let shown = inspect_lines(&env, &dlq, 10, None).await.unwrap();
    let frame = &shown[0]["fields"]["frame"];
    assert_eq!(frame["bytes"], 12);
    assert!(frame["base64"].as_str().unwrap().starts_with("KLUv/S"));
    assert!(frame["error"].as_str().unwrap().contains("zstd"), "{frame}");
    let empty = inspect_lines(&env, &format!("archive:{{{}}}", env.table), 10, None)
        .await
        .unwrap();
    assert!(empty.is_empty());

    let err = inspect_lines(&env, "no-such-stream", 10, None)
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::UnknownStream { .. }), "{err}");
    let err = inspect_lines(&env, &env.input(), 10, Some("yesterday"))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::InvalidId(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_after_a_schema_fix_land_with_their_original_time() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let with_time = env
        .xadd(&[
            ("time", b"1793491200000"),
            ("source", b"h1"),
            ("metric", b"m"),
            ("value", b"1"),
            ("unit", b"ms"),
        ])
        .await;
    let without_time = env
        .xadd(&[
            ("source", b"h2"),
            ("metric", b"m"),
            ("value", b"2"),
            ("unit", b"s"),
        ])
        .await;
    env.xadd(&[("source", b"h3"), ("metric", b"m"), ("value", b"3")])
        .await;
    let running = start(&env.config, &env.schema, &HOT_PATH).await;
    env.wait_landed(1, Duration::from_secs(30)).await;
    stop(running).await;

    let listed = json_lines(
        &run_dlq(&env.config, DlqAction::List, &env.input(), None)
            .await
            .unwrap(),
    );
    assert_eq!(listed.len(), 2);
    for (d, (source_id, unit)) in listed
        .iter()
        .zip([(&with_time, "ms"), (&without_time, "s")])
    {
        assert!(
            d["error"]
                .as_str()
                .unwrap()
                .contains("field `unit`: no such column"),
            "{d}"
        );
        assert_eq!(d["stage"], "ingest");
        assert_eq!(d["source_id"], source_id.as_str());
        assert_eq!(d["deliveries"], 1);
        assert_eq!(d["replay_to"], env.input().as_str());
        assert_eq!(d["fields"]["unit"], unit);
        assert!(d["fields"].get("error").is_none(), "{d}");
    }

    // The fix: a nullable `unit` column, migrated in place; ingest restarted with it.
    let schema = with_column(&env, "\n[[columns]]\nname = \"unit\"\ntype = \"text\"\n");
    strata_stages::migrate::migrate(&env.config, std::slice::from_ref(&schema))
        .await
        .unwrap();
    let summary = run_dlq(&env.config, DlqAction::Replay, &env.input(), None)
        .await
        .unwrap();
    assert!(
        summary.ends_with(&format!(
            "replayed 2 entries from {}:dlq to {}; 0 left\n",
            env.input(),
            env.input()
        )),
        "{summary}"
    );
    assert_eq!(xlen(&env, &streams::dlq_stream(&env.input())).await, 0);
    let running = start(&env.config, &schema, &HOT_PATH).await;
    env.wait_landed(3, Duration::from_secs(30)).await;
    stop(running).await;

    assert_eq!(env.count().await, 3);
    assert!(env.dead_letters(&env.input()).await.is_empty());
    let rows = env
        .pg()
        .await
        .query(
            &format!(
                "SELECT source, unit, (extract(epoch from time) * 1000)::bigint FROM {} ORDER BY source",
                env.table
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let ms = |id: &str| id.split('-').next().unwrap().parse::<i64>().unwrap();
    assert_eq!(got[0], ("h1".into(), Some("ms".into()), 1_793_491_200_000));
    assert_eq!(
        got[1],
        ("h2".into(), Some("s".into()), ms(&without_time)),
        "an event without a time keeps its original time"
    );
    assert_eq!(got[2].0, "h3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_id_selects_one_purge_deletes_and_errors_name_the_problem() {
    let env = TestEnv::new("metrics", "").await;
    let dlq_key = streams::dlq_stream(&env.input());
    let added: &[(&str, &[u8])] = &[
        ("error", b"field `value`: not a number"),
        ("stage", b"ingest"),
        ("source_id", b"1793491200123-0"),
        ("deliveries", b"1"),
    ];
    let mut ids = Vec::new();
    for value in [&b"a"[..], b"\xff\xfe", b"c"] {
        let mut fields: Vec<(&str, &[u8])> =
            vec![("source", b"h"), ("metric", b"m"), ("value", value)];
        fields.extend_from_slice(added);
        ids.push(env.xadd_to(&dlq_key, &fields).await);
    }

    let one = json_lines(
        &run_dlq(&env.config, DlqAction::List, &dlq_key, Some(&ids[1]))
            .await
            .unwrap(),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(
        one[0],
        json!({
            "id": ids[1], "error": "field `value`: not a number", "stage": "ingest",
            "source_id": "1793491200123-0", "deliveries": 1, "replay_to": env.input(),
            "fields": {"source": "h", "metric": "m", "value": {"base64": "//4=", "bytes": 2}},
        })
    );

    let out = run_dlq(&env.config, DlqAction::Replay, &env.input(), Some(&ids[1]))
        .await
        .unwrap();
    assert!(
        out.ends_with(&format!(
            "replayed 1 entry from {dlq_key} to {}; 2 left\n",
            env.input()
        )),
        "{out}"
    );
    let mut conn = env.redis().await;
    let v: redis::Value = redis::cmd("XRANGE")
        .arg(env.input())
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (replayed, _) = streams::parse_entries(v, 0);
    assert_eq!(replayed.len(), 1);
    assert_eq!(
        replayed[0].fields.to_vec(),
        vec![
            ("source".to_string(), b"h".to_vec()),
            ("metric".to_string(), b"m".to_vec()),
            ("value".to_string(), b"\xff\xfe".to_vec()),
            // No time field: the original time (from source_id) is added.
            ("time".to_string(), b"2026-11-01T00:00:00.123Z".to_vec()),
        ]
    );
    assert!(out.starts_with(&format!("{} → {} {}", ids[1], env.input(), replayed[0].id)));

    let out = run_dlq(&env.config, DlqAction::Purge, &dlq_key, Some(&ids[0]))
        .await
        .unwrap();
    assert_eq!(out, format!("purged 1 entry from {dlq_key}; 1 left\n"));
    let left = env.dead_letters(&env.input()).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, ids[2]);
    let out = run_dlq(&env.config, DlqAction::Purge, &env.input(), None)
        .await
        .unwrap();
    assert_eq!(out, format!("purged 1 entry from {dlq_key}; 0 left\n"));
    assert_eq!(xlen(&env, &dlq_key).await, 0);

    let err = run_dlq(&env.config, DlqAction::Replay, &dlq_key, Some(&ids[0]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), format!("no entry {} in {dlq_key}", ids[0]));
    let err = run_dlq(&env.config, DlqAction::List, "telemetry", None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("unknown stream `telemetry`: expected telemetry:{T}"),
        "{err}"
    );
    let err = run_dlq(
        &env.config,
        DlqAction::List,
        "telemetry:{no_such_table}",
        None,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("no schema in") && err.to_string().contains("`no_such_table`"),
        "{err}"
    );
    let err = run_dlq(&env.config, DlqAction::Purge, &dlq_key, Some("latest"))
        .await
        .unwrap_err();
    assert!(matches!(err, OpsError::InvalidId(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_dead_letters_are_replayed_through_ingest() {
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
    for i in 0..20 {
        let v = if i == 7 {
            "-1".to_string()
        } else {
            i.to_string()
        };
        env.xadd(&[
            ("time", b"1793491200000"),
            ("source", b"s"),
            ("metric", b"m"),
            ("value", v.as_bytes()),
            ("tags", br#"{"i":1}"#),
        ])
        .await;
    }
    let running = start(&env.config, &env.schema, &HOT_PATH).await;
    env.wait_landed(19, Duration::from_secs(30)).await;

    let listed = json_lines(
        &run_dlq(&env.config, DlqAction::List, &env.rows(), None)
            .await
            .unwrap(),
    );
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sqlstate"], "23514");
    assert_eq!(listed[0]["stage"], "batch-writer");
    assert_eq!(listed[0]["replay_to"], env.input().as_str());
    assert_eq!(
        listed[0]["fields"],
        json!({"time": "2026-11-01T00:00:00Z", "source": "s", "metric": "m", "value": "-1", "tags": "{\"i\":1}"})
    );

    env.pg()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {} DROP CONSTRAINT value_not_negative",
            env.table
        ))
        .await
        .unwrap();
    let out = run_dlq(&env.config, DlqAction::Replay, &env.rows(), None)
        .await
        .unwrap();
    assert!(
        out.ends_with(&format!(
            "replayed 1 entry from {}:dlq to {}; 0 left\n",
            env.rows(),
            env.input()
        )),
        "{out}"
    );
    env.wait_landed(20, Duration::from_secs(30)).await;
    stop(running).await;
    assert_eq!(env.count().await, 20);
    assert!(env.dead_letters(&env.rows()).await.is_empty());
    assert!(env.dead_letters(&env.input()).await.is_empty());
    let (value, tags): (f64, String) = {
        let r = env
            .pg()
            .await
            .query_one(
                &format!(
                    "SELECT value, tags::text FROM {} WHERE value < 0",
                    env.table
                ),
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((value, tags.as_str()), (-1.0, r#"{"i": 1}"#));
}
