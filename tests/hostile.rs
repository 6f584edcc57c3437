//! The generative hostile-input suite: random hostile events (arbitrary bytes, NULs, invalid
//! UTF-8, extreme and malformed numbers and times, deep and broken JSON, MessagePack that lies,
//! thousands of fields, duplicate fields, strata's own field names, oversize entries)
//! interleaved with good ones, through `strata run`, for both shipped schemas.
//!
//! For every run: each good event lands exactly once; each hostile event ends either in the
//! table — and then what was stored is what PostgreSQL itself makes of the text that was sent —
//! or alone in a dead-letter stream, exactly once, with a reason; the table never stalls; the
//! process's peak RSS stays bounded.
//!
//! Seeds: `STRATA_HOSTILE_SEEDS=1,2,3` (default: a fixed list), so a failure is reproducible.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_pipeline::schema::ColumnType;
use strata_pipeline::streams;
use strata_stages::{ingest, writer};

/// 2026-11-01T00:00:00Z in ms: when the good events happened.
const T0_MS: u64 = 1_793_491_200_000;

/// Good events per seed, and hostile ones among them.
const GOOD: usize = 1500;
const HOSTILE: usize = 150;
/// Peak RSS `strata run` may reach on this input.
const MAX_RSS_KIB: u64 = 512 * 1024;

fn seeds() -> Vec<u64> {
    std::env::var("STRATA_HOSTILE_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3, 4])
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One generated event.
struct Event {
    fields: Fields,
    /// Its marker: the value of the marker column, unique per event (one per MessagePack map).
    markers: Vec<String>,
    /// What was done to it (None: a good event).
    hostility: Option<String>,
    /// Set once it is XADDed.
    id: String,
}

/// The shape of one of the shipped schemas, for generating events.
struct Shape {
    example: &'static str,
    /// Column holding each event's unique marker (never mutated).
    marker: &'static str,
    /// Whether the marker column is text (`metric`) or an integer (`volume`).
    marker_is_text: bool,
    /// The indexed text column (B-tree entry size limit).
    indexed_text: &'static str,
}

const METRICS: Shape = Shape {
    example: "metrics",
    marker: "metric",
    marker_is_text: true,
    indexed_text: "source",
};
const TICKS: Shape = Shape {
    example: "ticks",
    marker: "volume",
    marker_is_text: false,
    indexed_text: "symbol",
};

fn marker_value(shape: &Shape, seed: u64, n: usize, j: usize) -> String {
    let k = seed as usize * 10_000_000 + n * 10 + j;
    if shape.marker_is_text {
        format!("m-{k}")
    } else {
        k.to_string()
    }
}

fn good_fields(shape: &Shape, seed: u64, n: usize) -> Fields {
    let marker = marker_value(shape, seed, n, 0);
    let f = |k: &str, v: String| (k.as_bytes().to_vec(), v.into_bytes());
    match shape.example {
        "metrics" => vec![
            f("time", (T0_MS + n as u64).to_string()),
            f("source", format!("host-{}", n % 7)),
            f("metric", marker),
            f("value", format!("{}", n as f64 * 0.5)),
            f("tags", format!("{{\"n\":{n}}}")),
        ],
        _ => vec![
            f("time", format!("2026-11-01T09:30:{:02}.{:06}Z", n % 60, n)),
            f("symbol", format!("SYM{}", n % 5)),
            f("bid", format!("{}.25", n % 1000)),
            f("ask", format!("{}.75", n % 1000)),
            f("volume", marker),
            f("venue_seq", n.to_string()),
            f("halted", "false".into()),
        ],
    }
}

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

fn random_bytes(rng: &mut StdRng, len: std::ops::Range<usize>) -> Vec<u8> {
    let n = rng.random_range(len);
    (0..n).map(|_| rng.random()).collect()
}

fn random_text(rng: &mut StdRng, len: std::ops::Range<usize>) -> String {
    let n = rng.random_range(len);
    (0..n)
        .map(|_| char::from_u32(rng.random_range(0x20..0x2FFFF)).unwrap_or('x'))
        .collect()
}

fn msgpack(v: &rmpv::Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).unwrap();
    buf
}

/// Hostile values for a column of type `ty`.
fn hostile_value(rng: &mut StdRng, ty: ColumnType) -> Vec<u8> {
    let common: [&[u8]; 8] = [
        b"",
        b" ",
        b"\0",
        b"\xff\xfe",
        b"\xed\xa0\x80", // a UTF-16 surrogate encoded as UTF-8 (CESU-8)
        b"null",
        b"\xc3\x28",
        b"1\x002",
    ];
    if rng.random_bool(0.2) {
        return pick(rng, &common).to_vec();
    }
    let v: &str = match ty {
        ColumnType::Float8 => pick(
            rng,
            &[
                "1e309",
                "-1e309",
                "1e-400",
                "NaN",
                "nan",
                "-nan",
                "inf",
                "-inf",
                "+inf",
                "Infinity",
                "infinity",
                "1_000",
                "0x10",
                " 12.5 ",
                "1e",
                ".5",
                "5.",
                "-0",
                "１２",
                "1.7976931348623157e308",
                "4.9e-324",
                "12,5",
                "+-1",
            ],
        ),
        ColumnType::Int8 | ColumnType::Int4 => pick(
            rng,
            &[
                "9223372036854775807",
                "9223372036854775808",
                "-9223372036854775808",
                "-9223372036854775809",
                "2147483647",
                "2147483648",
                "-2147483649",
                "+5",
                "-0",
                "1e3",
                "1.0",
                " 7 ",
                "0x1F",
                "007",
                "٣",
            ],
        ),
        ColumnType::Bool => pick(
            rng,
            &[
                "true", "FALSE", "t", "yes", "on", "1", "0", "off", "tru", "2", "T ", "ja",
            ],
        ),
        ColumnType::Timestamptz => pick(
            rng,
            &[
                "0",
                "-1",
                "253402300799999",
                "253402300800000",
                "-62135596800000",
                "-62135596800001",
                "9223372036854775807",
                "-9223372036854775808",
                "9999-12-31T23:59:59.999999Z",
                "10000-01-01T00:00:00Z",
                "0001-01-01T00:00:00Z",
                "0000-12-31T23:59:59Z",
                "2016-12-31T23:59:60Z",
                "2026-11-01t09:30:00z",
                "2026-11-01 09:30:00Z",
                "2026-11-01T09:30:00+23:59",
                "2026-11-01T09:30:00-23:59",
                "2026-02-30T00:00:00Z",
                "2026-11-01T24:00:00Z",
                "2026-11-01",
                "yesterday",
                "1793491200000.5",
                "+1793491200000",
                "2026-11-01T09:30:00.1234567891Z",
            ],
        ),
        ColumnType::Jsonb => {
            let depth = rng.random_range(100..30_000);
            return match rng.random_range(0..10) {
                0 => format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
                1 => format!("{}1{}", "{\"a\":".repeat(depth / 2), "}".repeat(depth / 2)),
                2 => r#"{"a":"\u0000"}"#.into(),
                3 => r#"{"a":"\ud800"}"#.into(),
                4 => r#"["\udc00\ud800"]"#.into(),
                5 => pick(
                    rng,
                    &[
                        "1e1000000",
                        "-1e-1000000",
                        "1e131072",
                        "1e-16384",
                        "[1e400]",
                    ],
                )
                .to_string(),
                6 => r#"{"a":1,"a":2}"#.into(),
                7 => pick(
                    rng,
                    &["NaN", "{bad", "[1,]", "'x'", "{\"a\":01}", "\"\\x\""],
                )
                .to_string(),
                8 => format!("{{\"k\":\"{}\"}}", random_text(rng, 1..3000)),
                _ => {
                    let n = rng.random_range(1..5000);
                    format!("[{}]", vec!["{}"; n].join(","))
                }
            }
            .into_bytes();
        }
        ColumnType::Text => {
            return match rng.random_range(0..5) {
                0 => random_bytes(rng, 1..200),
                1 => random_text(rng, 1..200).into_bytes(),
                2 => format!("a{}b", "\0".repeat(rng.random_range(1..3))).into_bytes(),
                3 => vec![b'x'; rng.random_range(1..60_000)],
                _ => random_text(rng, 3..4).into_bytes(),
            };
        }
    };
    v.as_bytes().to_vec()
}

/// A hostile MessagePack payload carrying `marker` where it can.
fn hostile_msgpack(rng: &mut StdRng, shape: &Shape, env: &TestEnv, good: &Fields) -> Vec<u8> {
    use rmpv::Value as V;
    let typed = |name: &[u8], v: &[u8]| -> V {
        let ty = env
            .schema
            .columns
            .iter()
            .find(|c| c.name.as_bytes() == name)
            .map(|c| c.ty);
        let text = String::from_utf8_lossy(v).into_owned();
        match ty {
            Some(ColumnType::Float8) => text.parse::<f64>().map(V::F64).unwrap_or(V::from(text)),
            Some(ColumnType::Int8 | ColumnType::Int4) => {
                text.parse::<i64>().map(V::from).unwrap_or(V::from(text))
            }
            _ => V::from(text),
        }
    };
    let map: Vec<(V, V)> = good
        .iter()
        .map(|(k, v)| {
            (
                V::from(String::from_utf8_lossy(k).into_owned()),
                typed(k, v),
            )
        })
        .collect();
    let mutate = |rng: &mut StdRng, mut map: Vec<(V, V)>| -> Vec<(V, V)> {
        let i = rng.random_range(0..map.len());
        if map[i].0.as_str() == Some(shape.marker) {
            return map;
        }
        map[i].1 = match rng.random_range(0..9) {
            0 => V::F64(f64::NAN),
            1 => V::F64(f64::INFINITY),
            2 => V::Ext(-1, vec![0xff; 12]),
            3 => V::Ext(5, vec![1, 2, 3]),
            4 => V::Binary(vec![0, 1, 2]),
            5 => V::from(u64::MAX),
            6 => V::Map(vec![(V::from(1), V::from(2))]),
            7 => V::from("\0"),
            _ => V::Array(vec![V::F64(f64::NAN)]),
        };
        map
    };
    match rng.random_range(0..6) {
        0 => random_bytes(rng, 0..300),
        // An array32 that claims 2^31 elements, a str32 that claims 4 GiB.
        1 => vec![0xdd, 0x80, 0, 0, 0, 0xc0],
        2 => vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
        3 => msgpack(&V::Map(mutate(rng, map))),
        4 => {
            let mut bytes = msgpack(&V::Map(map));
            bytes.push(0xc0); // trailing bytes
            bytes
        }
        _ => {
            // Deep nesting inside a jsonb column, where there is one.
            let mut v = V::from(1);
            let depth = rng.random_range(100..600);
            for _ in 0..depth {
                v = V::Array(vec![v]);
            }
            let mut map = map;
            map.push((V::from("tags"), v));
            msgpack(&V::Map(map))
        }
    }
}

/// A hostile event derived from a good one; never touches the marker field (except where it
/// cannot survive, in a broken MessagePack payload).
fn hostile_event(rng: &mut StdRng, shape: &Shape, env: &TestEnv, good: Fields) -> (Fields, String) {
    let mut fields = good;
    let kind = rng.random_range(0..10);
    let what = match kind {
        0..=3 => {
            // A hostile value in one column.
            let cols: Vec<_> = env
                .schema
                .columns
                .iter()
                .filter(|c| c.name != shape.marker)
                .collect();
            let col = pick(rng, &cols);
            let value = hostile_value(rng, col.ty);
            let what = format!(
                "{} = {:?}",
                col.name,
                String::from_utf8_lossy(&value[..value.len().min(40)])
            );
            match fields.iter_mut().find(|(k, _)| k == col.name.as_bytes()) {
                Some(f) => f.1 = value,
                None => fields.push((col.name.as_bytes().to_vec(), value)),
            }
            what
        }
        4 => {
            // An indexed text value too big for a B-tree entry (incompressible).
            let v = random_text(rng, 2000..4000).into_bytes();
            let f = fields
                .iter_mut()
                .find(|(k, _)| k == shape.indexed_text.as_bytes())
                .unwrap();
            f.1 = v;
            format!("{} of 2000..4000 random characters", shape.indexed_text)
        }
        5 => {
            let n = rng.random_range(1000..6000);
            for i in 0..n {
                fields.push((format!("x{i}").into_bytes(), b"1".to_vec()));
            }
            format!("{n} extra fields")
        }
        6 => {
            // A field twice, or a field named like one strata adds or reads.
            let name: &[u8] = pick(
                rng,
                &[
                    b"time" as &[u8],
                    b"error",
                    b"stage",
                    b"source_id",
                    b"deliveries",
                    b"sqlstate",
                    b"frame",
                    b"rows",
                    b"first_ms",
                    b"traceparent",
                    b"traceparents",
                    b"fields",
                    b"\xff\x00",
                    b"",
                ],
            );
            fields.push((name.to_vec(), random_bytes(rng, 8..9)));
            format!("extra field {:?}", String::from_utf8_lossy(name))
        }
        7 => {
            fields.retain(|(k, _)| k != b"time");
            "no time (the entry ID's)".into()
        }
        8 => {
            let payload = hostile_msgpack(rng, shape, env, &fields);
            fields = vec![(b"msgpack".to_vec(), payload)];
            "hostile MessagePack".into()
        }
        _ => {
            // Just over max_event_bytes (64 KiB by default).
            fields.push((b"pad".to_vec(), vec![b'p'; 65_536]));
            "over max_event_bytes".into()
        }
    };
    (fields, what)
}

fn generate(shape: &Shape, env: &TestEnv, seed: u64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = Vec::new();
    let every = GOOD / HOSTILE;
    for n in 0..GOOD + HOSTILE {
        let good = good_fields(shape, seed, n);
        let marker = marker_value(shape, seed, n, 0);
        if n % (every + 1) == every {
            let (fields, what) = hostile_event(&mut rng, shape, env, good);
            events.push(Event {
                fields,
                markers: vec![marker],
                hostility: Some(what),
                id: String::new(),
            });
        } else {
            events.push(Event {
                fields: good,
                markers: vec![marker],
                hostility: None,
                id: String::new(),
            });
        }
    }
    events
}

async fn xadd_all(env: &TestEnv, events: &mut [Event]) {
    let mut conn = env.redis().await;
    for chunk in events.chunks_mut(200) {
        let mut pipe = redis::pipe();
        for e in chunk.iter() {
            let cmd = pipe.cmd("XADD").arg(env.input()).arg("*");
            for (k, v) in &e.fields {
                cmd.arg(k.as_slice()).arg(v.as_slice());
            }
        }
        let ids: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
        for (e, id) in chunk.iter_mut().zip(ids) {
            e.id = id;
        }
    }
}

/// Where each marker and entry ID ended: rows in the table, dead letters of either stream.
struct Outcomes {
    rows: HashMap<String, usize>,
    /// Ingest dead letters by source entry ID, with their error.
    ingest_dead: HashMap<String, Vec<String>>,
    /// Writer dead letters by marker, with their error.
    writer_dead: HashMap<String, Vec<String>>,
}

async fn outcomes(env: &TestEnv, shape: &Shape) -> Outcomes {
    let pg = env.pg().await;
    let mut rows = HashMap::new();
    for r in pg
        .query(
            &format!(
                "SELECT {}::text, count(*) FROM {} GROUP BY 1",
                shape.marker, env.table
            ),
            &[],
        )
        .await
        .unwrap()
    {
        rows.insert(r.get::<_, String>(0), r.get::<_, i64>(1) as usize);
    }
    // Strata's added fields are the last ones of a dead letter.
    let last = |fields: &[(String, String)], name: &str| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut ingest_dead: HashMap<String, Vec<String>> = HashMap::new();
    for (_, f) in env.dead_letters(&env.input()).await {
        ingest_dead
            .entry(last(&f, streams::DLQ_SOURCE_ID))
            .or_default()
            .push(last(&f, streams::DLQ_ERROR));
    }
    let mut writer_dead: HashMap<String, Vec<String>> = HashMap::new();
    for (_, f) in env.dead_letters(&env.rows()).await {
        writer_dead
            .entry(last(&f, shape.marker))
            .or_default()
            .push(last(&f, streams::DLQ_ERROR));
    }
    Outcomes {
        rows,
        ingest_dead,
        writer_dead,
    }
}

/// For an event that landed: each column it sent as text holds what PostgreSQL itself makes
/// of that text (so strata's parsing agrees with the server's). Returns the mismatches.
async fn round_trip(env: &TestEnv, shape: &Shape, e: &Event) -> Vec<String> {
    if e.fields.iter().any(|(k, _)| k == b"msgpack") {
        return Vec::new();
    }
    let pg = env.pg().await;
    let mut problems = Vec::new();
    for (name, value) in &e.fields {
        let Some(col) = env
            .schema
            .columns
            .iter()
            .find(|c| c.name.as_bytes() == name)
        else {
            continue;
        };
        if col.name == shape.marker {
            continue;
        }
        let Ok(text) = std::str::from_utf8(value) else {
            problems.push(format!("{}: landed although not UTF-8", col.name));
            continue;
        };
        let trimmed = text.trim();
        let column = format!("\"{}\"", col.name);
        let cond = match col.ty {
            ColumnType::Text => format!("{column} = $2::text"),
            _ if trimmed.is_empty() => format!("{column} IS NULL AND $2::text = ''"),
            ColumnType::Timestamptz if trimmed.parse::<i64>().is_ok() => {
                let unit_us = if shape.example == "metrics" { 1000 } else { 1 };
                format!("extract(epoch FROM {column}) * 1000000 = $2::text::numeric * {unit_us}")
            }
            ty => format!("{column} = $2::text::{}", ty.sql()),
        };
        let arg = if col.ty == ColumnType::Text {
            text
        } else {
            trimmed
        };
        let sql = format!(
            "SELECT ({cond}) IS TRUE FROM {} WHERE {}::text = $1",
            env.table, shape.marker
        );
        match pg.query_one(&sql, &[&e.markers[0], &arg]).await {
            Ok(r) if r.get::<_, bool>(0) => {}
            Ok(_) => problems.push(format!("{}: stored value differs from {arg:?}", col.name)),
            // PostgreSQL's text input refuses UTC offsets beyond ±15:59, which RFC 3339 allows
            // (up to ±23:59): there the instant itself is compared.
            Err(_)
                if col.ty == ColumnType::Timestamptz
                    && chrono::DateTime::parse_from_rfc3339(arg).is_ok() =>
            {
                let us = chrono::DateTime::parse_from_rfc3339(arg)
                    .unwrap()
                    .timestamp_micros();
                let sql = format!(
                    "SELECT (extract(epoch FROM {column}) * 1000000 = $2::text::numeric) IS TRUE FROM {} WHERE {}::text = $1",
                    env.table, shape.marker
                );
                let same: bool = pg
                    .query_one(&sql, &[&e.markers[0], &us.to_string()])
                    .await
                    .unwrap()
                    .get(0);
                if !same {
                    problems.push(format!("{}: stored instant differs from {arg:?}", col.name));
                }
            }
            Err(err) => problems.push(format!(
                "{}: PostgreSQL cannot read the sent text {arg:?} ({err})",
                col.name
            )),
        }
    }
    problems
}

async fn run_suite(shape: &Shape) {
    let env = TestEnv::new(shape.example, "").await;
    env.migrate().await;
    let mut events = Vec::new();
    for seed in seeds() {
        events.extend(generate(shape, &env, seed));
    }
    // Last (an explicit ID moves the stream's last ID): no time field and an entry ID whose
    // milliseconds no calendar holds.
    let mut conn = env.redis().await;
    let mut child = env.spawn(&["run"], "run.log");
    xadd_all(&env, &mut events).await;
    let mut tail = good_fields(shape, 0, 999_999);
    tail.retain(|(k, _)| k != b"time");
    let mut cmd = redis::cmd("XADD");
    cmd.arg(env.input()).arg("18446744073709551615-0");
    for (k, v) in &tail {
        cmd.arg(k.as_slice()).arg(v.as_slice());
    }
    let tail_id: String = cmd.query_async(&mut conn).await.unwrap();
    events.push(Event {
        fields: tail,
        markers: vec![marker_value(shape, 0, 999_999, 0)],
        hostility: Some("entry ID 18446744073709551615-0 as the time".into()),
        id: tail_id,
    });

    // The table never stalls: every good event lands, and both groups drain.
    let good = events.iter().filter(|e| e.hostility.is_none()).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak_kib = 0;
    loop {
        if let Some(kib) = common::servers::rss_kb(child.id()) {
            peak_kib = peak_kib.max(kib);
        }
        let drained = streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
            .drained(&mut conn)
            .await
            .unwrap_or(false)
            && streams::ConsumerGroup::new(&env.rows(), writer::STAGE.name)
                .drained(&mut conn)
                .await
                .unwrap_or(false);
        if drained && env.count().await >= good as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the table stalled: {} rows of {good} good events after 120 s\n{}",
            env.count().await,
            env.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = common::terminate(&mut child);
    assert!(status.success(), "{status}: {}", env.log("run.log"));
    assert!(peak_kib < MAX_RSS_KIB, "peak RSS {peak_kib} KiB");

    let out = outcomes(&env, shape).await;
    let mut problems = Vec::new();
    let (mut landed, mut dead) = (0, 0);
    for e in &events {
        let rows: usize = e
            .markers
            .iter()
            .map(|m| out.rows.get(m).copied().unwrap_or(0))
            .sum();
        let ingest = out.ingest_dead.get(&e.id).map_or(0, Vec::len);
        let writer: usize = e
            .markers
            .iter()
            .map(|m| out.writer_dead.get(m).map_or(0, Vec::len))
            .sum();
        let what = e.hostility.as_deref().unwrap_or("good");
        match (&e.hostility, rows, ingest + writer) {
            (None, 1, 0) => {}
            (None, ..) => problems.push(format!("good event {}: {rows} rows, {ingest}+{writer} dead letters", e.id)),
            (Some(_), 1, 0) => {
                landed += 1;
                for p in round_trip(&env, shape, e).await {
                    problems.push(format!("{what} ({}): {p}", e.id));
                }
            }
            (Some(_), 0, 1) => {
                dead += 1;
                let errors = out
                    .ingest_dead
                    .get(&e.id)
                    .into_iter()
                    .chain(e.markers.iter().filter_map(|m| out.writer_dead.get(m)))
                    .flatten();
                if errors.clone().any(|err| err.is_empty()) {
                    problems.push(format!("{what} ({}): a dead letter without a reason", e.id));
                }
            }
            (Some(_), ..) => problems.push(format!(
                "{what} ({}): {rows} rows and {ingest}+{writer} dead letters, not exactly one outcome",
                e.id
            )),
        }
    }
    println!(
        "{}: {} events, {good} good; hostile: {landed} landed and round-tripped, {dead} dead-lettered; peak RSS {} MiB",
        shape.example,
        events.len(),
        peak_kib / 1024
    );
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_metrics_events_never_stall_the_table_and_end_exactly_once() {
    run_suite(&METRICS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ticks_events_never_stall_the_table_and_end_exactly_once() {
    run_suite(&TICKS).await;
}
