//! The chunk lifecycle against real Redis, PostgreSQL and object stores: closed chunks are
//! archived to Parquet, read back, verified and dropped; the files equal the source rows exactly;
//! a killed archiver leaves nothing visible and a restart finishes; corrupt or truncated archives
//! are caught and nothing is dropped; late rows for a dropped range become a second file; several
//! watchers emit each chunk once. The same scenarios run on local disk, S3 (moto) and Azure
//! Blob (Azurite); TimescaleDB's path runs where the extension exists.

mod common;
mod lifecycle_support;

use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_stages::catalog::Partitioning;

use common::{start, stop, TestEnv};
use lifecycle_support::{Backend, BackendKind};
use strata_pipeline::config::TimescaleMode;
use strata_pipeline::schema::Schema;
use strata_pipeline::streams;
use strata_stages::lifecycle::deps::arrow_array::cast::AsArray;
use strata_stages::lifecycle::deps::arrow_array::types::{Float64Type, TimestampMicrosecondType};
use strata_stages::lifecycle::deps::arrow_array::Array;
use strata_stages::lifecycle::deps::arrow_schema::{DataType, TimeUnit};
use strata_stages::lifecycle::deps::bytes::Bytes;
use strata_stages::lifecycle::deps::futures_util::{self, StreamExt};
use strata_stages::lifecycle::deps::object_store::path::Path;
use strata_stages::lifecycle::deps::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use strata_stages::lifecycle::deps::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use strata_stages::lifecycle::deps::parquet::file::reader::{FileReader, SerializedFileReader};
use strata_stages::lifecycle::lake::{Lake, LakeBackend, LakeConfig};
use strata_stages::lifecycle::{archiver, confirmer, watcher};
use strata_stages::{ingest, writer, StageSpec, HOT_PATH};

const HOUR_US: i64 = 3_600_000_000;

const STREAMS: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n";

/// The watcher of most scenarios: fast scans, and a quiet period short enough for chunks
/// filled by SQL just before to close within a second (the mechanism still applies: each chunk
/// must be seen unchanged for that long).
const WATCHER: &str =
    "[chunk_watcher]\ninterval_ms = 200\nreemit_after_ms = 600000\nquiet_period_ms = 600\n";

/// One scenario's world: a TestEnv whose table has 1-hour chunks archived once they ended an
/// hour ago (and dropped once verified), the lake, and cleanup of the lifecycle streams.
struct Lc {
    env: TestEnv,
    lake: Lake,
}

impl Drop for Lc {
    fn drop(&mut self) {
        let (table, url) = (self.env.table.clone(), self.env.redis_url.clone());
        let _ = std::thread::spawn(move || {
            let client = redis::Client::open(url.as_str()).unwrap();
            if let Ok(mut conn) = client.get_connection() {
                let a = streams::archive_stream(&table);
                let b = streams::archived_stream(&table);
                let keys = [streams::dlq_stream(&a), streams::dlq_stream(&b), a, b];
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
            }
        })
        .join();
    }
}

async fn setup(backend: &Backend, extra: &str) -> Lc {
    setup_with(backend, WATCHER, TimescaleMode::Auto, extra).await
}

/// [`setup`] with its own `[chunk_watcher]` section and TimescaleDB mode.
async fn setup_with(backend: &Backend, watcher: &str, mode: TimescaleMode, extra: &str) -> Lc {
    let config = format!("{STREAMS}{watcher}{extra}{}", backend.lake_toml);
    let mut env = TestEnv::new("metrics", &config).await;
    env.config.postgres.timescaledb = mode;
    let path = env
        .dir
        .path()
        .join("schemas")
        .join(format!("{}.toml", env.table));
    // 1-hour chunks, archived an hour after they end, dropped once verified (whatever policy the
    // example schema carries).
    let mut text = String::new();
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if [
            "chunk_interval",
            "archive_after",
            "drop_after_archive",
            "compress_after",
        ]
        .contains(&key)
        {
            continue;
        }
        text.push_str(line);
        text.push('\n');
        if key == "table" {
            text.push_str("chunk_interval = \"1 hour\"\narchive_after = \"1 hour\"\ndrop_after_archive = true\n");
        }
    }
    std::fs::write(&path, &text).unwrap();
    env.schema = Arc::new(Schema::from_toml("test", &text).unwrap());
    env.migrate().await;
    let lake = Lake::open(&env.config.lake).expect("open the lake");
    Lc { env, lake }
}

const LIFECYCLE: [StageSpec; 3] = [watcher::STAGE, archiver::STAGE, confirmer::STAGE];

/// A row of `strata.chunks`, as the tests look at it.
#[derive(Debug, Clone)]
struct Chunk {
    chunk: String,
    /// The schema of the chunk's table: `public` for native partitions here, TimescaleDB's own
    /// for hypertable chunks.
    chunk_schema: String,
    range_start_us: i64,
    state: String,
    verify_failures: i32,
    lake_path: Option<String>,
    rows: Option<i64>,
    sha256: Option<String>,
    last_error: Option<String>,
}

impl Chunk {
    /// How events, footers and logs name the chunk: schema-qualified outside `public`.
    fn display(&self) -> String {
        if self.chunk_schema == "public" {
            self.chunk.clone()
        } else {
            format!("{}.{}", self.chunk_schema, self.chunk)
        }
    }
}

async fn chunks(env: &TestEnv) -> Vec<Chunk> {
    env.pg()
        .await
        .query(
            "SELECT chunk, (extract(epoch from range_start) * 1000000)::bigint, state, verify_failures, lake_path, rows, sha256, last_error, chunk_schema FROM strata.chunks WHERE table_name = $1 ORDER BY id",
            &[&env.table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Chunk {
            chunk: r.get(0),
            range_start_us: r.get(1),
            state: r.get(2),
            verify_failures: r.get(3),
            lake_path: r.get(4),
            rows: r.get(5),
            sha256: r.get(6),
            last_error: r.get(7),
            chunk_schema: r.get(8),
        })
        .collect()
}

/// Waits until the table's chunks satisfy `done`.
async fn wait_chunks(
    env: &TestEnv,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Chunk]) -> bool,
) -> Vec<Chunk> {
    let deadline = Instant::now() + timeout;
    loop {
        let c = chunks(env).await;
        if done(&c) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {c:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn states(c: &[Chunk]) -> Vec<&str> {
    c.iter().map(|c| c.state.as_str()).collect()
}

/// Objects under `<prefix>/<folder>/`, sorted by key.
async fn objects(lake: &Lake, backend: &Backend, folder: &str) -> Vec<(String, Bytes)> {
    let prefix = Path::from(format!("{}/{folder}", backend.prefix));
    let mut keys: Vec<String> = lake
        .store
        .list(Some(&prefix))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let bytes = lake
            .store
            .get(&Path::from(k.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        out.push((k, bytes));
    }
    out
}

/// A metrics row: time (µs), source, metric, value (bits, so NaN and -0 compare exactly), tags.
type Row = (i64, String, String, u64, Option<String>);

async fn pg_rows(env: &TestEnv, filter: &str) -> Vec<Row> {
    let mut rows: Vec<Row> = env
        .pg()
        .await
        .query(
            &format!(
                "SELECT (extract(epoch from time) * 1000000)::bigint, source, metric, value, tags::text FROM {} {filter}",
                env.table
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get::<_, f64>(3).to_bits(), r.get(4)))
        .collect();
    rows.sort();
    rows
}

/// Every row of a Parquet file, checking the Arrow types on the way.
fn parquet_rows(bytes: &Bytes) -> Vec<Row> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
    let schema = builder.schema().clone();
    let types: Vec<(&str, &DataType, bool)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().as_str(), f.data_type(), f.is_nullable()))
        .collect();
    assert_eq!(
        types,
        vec![
            (
                "time",
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false
            ),
            ("source", &DataType::Utf8, false),
            ("metric", &DataType::Utf8, false),
            ("value", &DataType::Float64, false),
            ("tags", &DataType::Utf8, true),
        ]
    );
    let mut rows = Vec::new();
    for batch in builder.build().unwrap() {
        let b = batch.unwrap();
        let time = b.column(0).as_primitive::<TimestampMicrosecondType>();
        let source = b.column(1).as_string::<i32>();
        let metric = b.column(2).as_string::<i32>();
        let value = b.column(3).as_primitive::<Float64Type>();
        let tags = b.column(4).as_string::<i32>();
        for i in 0..b.num_rows() {
            rows.push((
                time.value(i),
                source.value(i).to_string(),
                metric.value(i).to_string(),
                value.value(i).to_bits(),
                (!tags.is_null(i)).then(|| tags.value(i).to_string()),
            ));
        }
    }
    rows
}

/// Footer key-value metadata of a Parquet file.
fn footer(bytes: &Bytes) -> (i64, Vec<(String, String)>) {
    let reader = SerializedFileReader::new(bytes.clone()).unwrap();
    let meta = reader.metadata().file_metadata();
    let kv = meta
        .key_value_metadata()
        .map(|kvs| {
            kvs.iter()
                .filter(|k| k.key.starts_with("strata."))
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    (meta.num_rows(), kv)
}

fn rfc3339(us: i64) -> String {
    strata_stages::lifecycle::events::rfc3339_us(us)
}

/// The start of the current hour, in µs.
fn this_hour() -> i64 {
    let now = chrono::Utc::now().timestamp_micros();
    now - now.rem_euclid(HOUR_US)
}

async fn xlen(env: &TestEnv, key: &str) -> i64 {
    let mut conn = env.redis().await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Creates the partition starting at `start_us` and fills it with `n` rows by SQL (for volumes
/// the hot path would take long to carry in a debug build); `random` makes the text and values
/// incompressible, so the archive is large.
async fn fill_chunk(env: &TestEnv, start_us: i64, n: i64) {
    let mut client = env.pg().await;
    env.make_chunk(&mut client, start_us).await;
    client
        .execute(
            &format!(
                "INSERT INTO {} (time, source, metric, value, tags)
                 SELECT to_timestamp($1::bigint / 1e6 + i * (3000.0 / greatest($2::bigint, 1))), 'host-' || (i % 97), md5(i::text || random()::text), random(),
                        CASE WHEN i % 3 = 0 THEN NULL ELSE jsonb_build_object('i', i) END
                 FROM generate_series(0, $2::bigint - 1) AS i",
                env.table
            ),
            &[&start_us, &n],
        )
        .await
        .unwrap();
}

/// Events of three hours land through the hot path; the three closed chunks are archived,
/// verified and dropped; the files equal the rows exactly, types included. Then late rows for
/// the first (dropped) hour land in a new partition, which becomes a second file.
async fn full_lifecycle_and_late_data(backend: &Backend) {
    let lc = setup(backend, "").await;
    let env = &lc.env;
    let base_ms = (this_hour() - 5 * HOUR_US) / 1000;
    let mut conn = env.redis().await;
    let mut pipe = redis::pipe();
    let specials = ["NaN", "-0", "1e308", "5e-324", "-inf"];
    for i in 0..900i64 {
        let value = if (i as usize) < specials.len() {
            specials[i as usize].to_string()
        } else {
            format!("{}", i as f64 * 0.25 - 100.0)
        };
        let mut cmd = redis::cmd("XADD");
        cmd.arg(env.input())
            .arg("*")
            .arg("time")
            .arg(base_ms + i * 12_000 + i % 7)
            .arg("source")
            .arg(format!("host-{}-ü✓", i % 5))
            .arg("metric")
            .arg(if i % 2 == 0 { "cpu.user" } else { "mem" })
            .arg("value")
            .arg(value);
        if i % 4 != 0 {
            cmd.arg("tags").arg(format!(
                "{{\"seq\":{i},\"tag\":\"ä\\n\",\"nested\":[1,{{\"x\":null}}]}}"
            ));
        }
        pipe.add_command(cmd).ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let hot = start(env, &HOT_PATH).await;
    env.wait_landed(900, Duration::from_secs(60)).await;
    let source = pg_rows(env, "").await;
    assert_eq!(source.len(), 900);

    let lifecycle = start(env, &LIFECYCLE).await;
    let done = wait_chunks(
        env,
        "3 chunks archived, verified and dropped",
        Duration::from_secs(90),
        |c| c.len() == 3 && c.iter().all(|c| c.state == "dropped"),
    )
    .await;
    stop(lifecycle).await;
    assert_eq!(env.count().await, 0, "every closed chunk was dropped");
    let h0 = this_hour() - 5 * HOUR_US;
    for (i, c) in done.iter().enumerate() {
        assert_eq!(c.range_start_us, h0 + i as i64 * HOUR_US);
        assert_eq!(c.verify_failures, 0);
    }
    if env.partitioning().await == Partitioning::Native {
        let partitions: i64 = env
            .pg()
            .await
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass",
                &[&env.table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            partitions, 2,
            "only the premade current and next hours remain"
        );
    } else {
        let chunks: i64 = env
            .pg()
            .await
            .query_one(
                "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name::text = $1",
                &[&env.table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(chunks, 0, "every hypertable chunk was dropped");
    }

    let files = objects(&lc.lake, backend, &env.table).await;
    assert_eq!(
        files.len(),
        3,
        "one file per chunk: {:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let mut archived = Vec::new();
    for ((key, bytes), c) in files.iter().zip(&done) {
        let date = chrono::DateTime::from_timestamp_micros(c.range_start_us)
            .unwrap()
            .format("%Y-%m-%d");
        assert!(
            key.starts_with(&format!(
                "{}/{}/date={date}/{}-",
                backend.prefix, env.table, c.chunk
            )) && key.ends_with(".parquet"),
            "{key}"
        );
        assert_eq!(c.lake_path.as_deref(), Some(key.as_str()));
        let (rows, kv) = footer(bytes);
        assert_eq!(Some(rows), c.rows);
        assert_eq!(
            kv,
            vec![
                ("strata.table".to_string(), env.table.clone()),
                ("strata.chunk".to_string(), c.display()),
                ("strata.range_start".to_string(), rfc3339(c.range_start_us)),
                (
                    "strata.range_end".to_string(),
                    rfc3339(c.range_start_us + HOUR_US)
                ),
                ("strata.rows".to_string(), rows.to_string()),
            ]
        );
        let sha = strata_stages::lifecycle::lake::hex(
            &<strata_stages::lifecycle::deps::sha2::Sha256 as strata_stages::lifecycle::deps::sha2::Digest>::digest(bytes),
        );
        assert_eq!(c.sha256.as_deref(), Some(sha.as_str()));
        let rows_in_file = parquet_rows(bytes);
        assert!(rows_in_file
            .iter()
            .all(|r| r.0 >= c.range_start_us && r.0 < c.range_start_us + HOUR_US));
        archived.extend(rows_in_file);
    }
    archived.sort();
    assert_eq!(
        archived, source,
        "the archives hold exactly the source rows"
    );

    // Late rows for the first hour, after its chunk was dropped: a new partition, a second file.
    for (i, t) in [base_ms + 1_000, base_ms + 2_000].iter().enumerate() {
        env.xadd(&[
            ("time", t.to_string().as_bytes()),
            ("source", b"late"),
            ("metric", b"m"),
            ("value", i.to_string().as_bytes()),
        ])
        .await;
    }
    env.wait_landed(2, Duration::from_secs(60)).await;
    stop(hot).await;
    let late = pg_rows(env, "").await;
    let lifecycle = start(env, &LIFECYCLE).await;
    let after = wait_chunks(
        env,
        "the late chunk archived and dropped",
        Duration::from_secs(60),
        |c| c.len() == 4 && c.iter().all(|c| c.state == "dropped"),
    )
    .await;
    stop(lifecycle).await;
    assert_eq!(
        after[3].range_start_us, done[0].range_start_us,
        "the same hour, a new chunk"
    );
    if env.partitioning().await == Partitioning::Native {
        assert_eq!(
            after[3].chunk, done[0].chunk,
            "same partition name, new incarnation"
        );
    }
    assert_eq!(after[3].rows, Some(2));
    let files_after = objects(&lc.lake, backend, &env.table).await;
    assert_eq!(files_after.len(), 4);
    for (key, bytes) in &files {
        let still = files_after
            .iter()
            .find(|(k, _)| k == key)
            .expect("first archives kept");
        assert_eq!(&still.1, bytes, "no archive is ever overwritten");
    }
    let second = files_after
        .iter()
        .find(|(k, _)| Some(k.as_str()) == after[3].lake_path.as_deref())
        .unwrap();
    assert_eq!(parquet_rows(&second.1), late);
    assert!(env.dead_letters(&env.rows()).await.is_empty());
}

/// SIGKILL of a `strata archiver` process in the middle of a multipart upload: nothing visible,
/// nothing dropped; a restarted archiver (after the claim delay) finishes and the chunk is
/// dropped with exactly one file.
async fn killed_archiver_leaves_nothing_and_a_restart_finishes(backend: &Backend) {
    let lc = setup(
        backend,
        "[archiver]\npart_size_bytes = 5242880\nrow_group_rows = 16384\nbatch_rows = 4096\n",
    )
    .await;
    let env = &lc.env;
    let h0 = this_hour() - 4 * HOUR_US;
    let n = 300_000;
    fill_chunk(env, h0, n).await;
    let watcher = start(env, &[watcher::STAGE]).await;
    wait_chunks(env, "the chunk recorded", Duration::from_secs(30), |c| {
        c.len() == 1
    })
    .await;
    stop(watcher).await;

    let mut archiver = env.spawn(&["archiver"], "archiver1.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = chunks(env).await;
        assert!(
            c[0].state == "pending" || c[0].state == "archiving",
            "the archiver finished before it could be killed (make the chunk larger): {c:?}\n{}",
            env.log("archiver1.log")
        );
        if c[0].state == "archiving" && backend.upload_in_progress() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no upload in progress within 120 s: {}",
            env.log("archiver1.log")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    archiver.kill().unwrap(); // SIGKILL, mid-upload
    archiver.wait().unwrap();
    let c = chunks(env).await;
    assert_eq!(
        states(&c),
        ["archiving"],
        "killed before recording the archive"
    );
    assert!(
        objects(&lc.lake, backend, &env.table).await.is_empty(),
        "no partial object is visible"
    );
    assert_eq!(env.count().await, n, "nothing dropped");

    let lifecycle = start(env, &[archiver::STAGE, confirmer::STAGE]).await;
    let done = wait_chunks(
        env,
        "the restarted archiver to finish",
        Duration::from_secs(180),
        |c| c[0].state == "dropped",
    )
    .await;
    stop(lifecycle).await;
    let files = objects(&lc.lake, backend, &env.table).await;
    assert_eq!(files.len(), 1, "exactly one archive");
    assert_eq!(Some(files[0].0.as_str()), done[0].lake_path.as_deref());
    assert_eq!(footer(&files[0].1).0, n);
    assert_eq!(env.count().await, 0);
    assert!(
        backend.local_staging_files().is_empty(),
        "staging files of the killed upload were removed: {:?}",
        backend.local_staging_files()
    );
}

/// A corrupted and a truncated archive are caught by the confirmer: nothing is dropped, the
/// objects move to `_rejected/`, the chunks are archived again; one that keeps failing past
/// `max_rearchives` ends in `archive:{T}:dlq`, still in PostgreSQL.
async fn corrupt_or_truncated_archives_are_caught(backend: &Backend) {
    let lc = setup(backend, "[confirmer]\nmax_rearchives = 1\n").await;
    let env = &lc.env;
    let h0 = this_hour() - 4 * HOUR_US;
    fill_chunk(env, h0, 1000).await;
    fill_chunk(env, h0 + HOUR_US, 1000).await;
    let count = |start: i64| {
        let table = env.table.clone();
        async move {
            env.pg()
                .await
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE time >= to_timestamp($1::bigint / 1e6) AND time < to_timestamp($1::bigint / 1e6 + 3600)"),
                    &[&start],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };

    let running = start(env, &[watcher::STAGE, archiver::STAGE]).await;
    let c = wait_chunks(env, "both chunks archived", Duration::from_secs(60), |c| {
        c.len() == 2 && c.iter().all(|c| c.state == "archived")
    })
    .await;
    stop(running).await;
    let (a, b) = (
        Path::from(c[0].lake_path.clone().unwrap()),
        Path::from(c[1].lake_path.clone().unwrap()),
    );
    let corrupt = |bytes: Bytes| {
        let mut v = bytes.to_vec();
        let mid = v.len() / 2;
        v[mid] ^= 0xff;
        v
    };
    let truncate = |bytes: Bytes| bytes[..bytes.len() / 2].to_vec();
    let get = |p: Path| {
        let store = lc.lake.store.clone();
        async move { store.get(&p).await.unwrap().bytes().await.unwrap() }
    };
    let bytes_a = get(a.clone()).await;
    lc.lake
        .store
        .put(&a, PutPayload::from(corrupt(bytes_a)))
        .await
        .unwrap();
    let bytes_b = get(b.clone()).await;
    lc.lake
        .store
        .put(&b, PutPayload::from(truncate(bytes_b)))
        .await
        .unwrap();

    let running = start(env, &[confirmer::STAGE]).await;
    let c = wait_chunks(
        env,
        "both archives rejected",
        Duration::from_secs(60),
        |c| {
            c.iter()
                .all(|c| c.state == "pending" && c.verify_failures == 1)
        },
    )
    .await;
    stop(running).await;
    assert!(
        c[0].last_error.as_deref().unwrap().contains("SHA-256"),
        "{:?}",
        c[0].last_error
    );
    assert!(
        c[1].last_error.as_deref().unwrap().contains("bytes"),
        "{:?}",
        c[1].last_error
    );
    assert_eq!(
        (count(h0).await, count(h0 + HOUR_US).await),
        (1000, 1000),
        "nothing dropped"
    );
    assert!(objects(&lc.lake, backend, &env.table).await.is_empty());
    assert_eq!(objects(&lc.lake, backend, "_rejected").await.len(), 2);
    let pending_events: Vec<String> = {
        let mut conn = env.redis().await;
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(streams::archive_stream(&env.table))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        streams::parse_entries(v, 0)
            .0
            .iter()
            .filter_map(|e| {
                e.field("event_id")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .collect()
    };
    let current: Vec<String> = env
        .pg()
        .await
        .query(
            "SELECT event_id FROM strata.chunks WHERE table_name = $1 ORDER BY id",
            &[&env.table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        current.iter().all(|id| pending_events.contains(id)),
        "one new archival event per rejected archive: {current:?} in {pending_events:?}"
    );

    let running = start(env, &[archiver::STAGE]).await;
    let c = wait_chunks(env, "both archived again", Duration::from_secs(60), |c| {
        c.iter().all(|c| c.state == "archived")
    })
    .await;
    stop(running).await;
    let b = Path::from(c[1].lake_path.clone().unwrap());
    let bytes_b = get(b.clone()).await;
    lc.lake
        .store
        .put(&b, PutPayload::from(truncate(bytes_b)))
        .await
        .unwrap();

    let running = start(env, &[archiver::STAGE, confirmer::STAGE]).await;
    let c = wait_chunks(env, "A dropped, B given up", Duration::from_secs(60), |c| {
        states(c) == ["dropped", "failed"]
    })
    .await;
    stop(running).await;
    assert_eq!(count(h0).await, 0);
    assert_eq!(
        count(h0 + HOUR_US).await,
        1000,
        "a chunk whose archive keeps failing stays"
    );
    let dlq = env.dead_letters(&streams::archive_stream(&env.table)).await;
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let field = |name: &str| {
        dlq[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(field("chunk"), c[1].display());
    assert_eq!(field("stage"), "archiver");
    assert!(
        field("error").contains("failed verification 2 times"),
        "{}",
        field("error")
    );
    assert_eq!(objects(&lc.lake, backend, &env.table).await.len(), 1);
    assert_eq!(objects(&lc.lake, backend, "_rejected").await.len(), 3);

    // The operator replays the dead letter: the chunk gets a fresh budget and, with nothing
    // corrupting it now, is archived, verified and dropped.
    let dlq = streams::dlq_stream(&streams::archive_stream(&env.table));
    let status = env
        .spawn(&["dlq", "replay", "--stream", &dlq], "replay.log")
        .wait()
        .unwrap();
    assert!(status.success(), "{}", env.log("replay.log"));
    let running = start(env, &[archiver::STAGE, confirmer::STAGE]).await;
    wait_chunks(
        env,
        "B archived after the replay",
        Duration::from_secs(60),
        |c| states(c) == ["dropped", "dropped"],
    )
    .await;
    stop(running).await;
    assert_eq!(count(h0 + HOUR_US).await, 0);
    assert_eq!(objects(&lc.lake, backend, &env.table).await.len(), 2);
}

async fn suite(kind: BackendKind) {
    let backend = Backend::start(kind);
    full_lifecycle_and_late_data(&backend).await;
    killed_archiver_leaves_nothing_and_a_restart_finishes(&backend).await;
    corrupt_or_truncated_archives_are_caught(&backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_local_disk() {
    suite(BackendKind::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_s3_moto() {
    suite(BackendKind::S3).await;
}

/// The lake over HTTPS: moto with a certificate of a private CA, trusted by `[lake] tls_ca_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_s3_over_https_with_a_private_ca() {
    suite(BackendKind::S3Tls).await;
}

/// Without `tls_ca_file` the same server is refused, and the error says which endpoint and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_lake_certificate_is_a_clear_error() {
    let backend = Backend::start(BackendKind::S3Tls);
    let port = backend.addr.as_ref().unwrap().rsplit(':').next().unwrap();
    let mut lake_config = LakeConfig {
        backend: LakeBackend::S3,
        bucket: Some(backend.bucket.clone()),
        endpoint: Some(format!("https://localhost:{port}")),
        region: Some("us-east-1".into()),
        ..LakeConfig::default()
    };
    for key in ["aws_access_key_id", "aws_secret_access_key"] {
        lake_config.options.insert(key.into(), "test".into());
    }
    let lake = Lake::open(&lake_config).expect("open the lake");
    let err = lake
        .store
        .put(&Path::from("probe"), Bytes::from_static(b"x").into())
        .await
        .expect_err("an untrusted certificate must be refused");
    let text = strata_pipeline::error_chain(&err);
    assert!(text.contains(&format!("localhost:{port}")), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    // A CA file that is not PEM is refused when the lake opens, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("ca.pem");
    std::fs::write(&bogus, "not a certificate\n").unwrap();
    lake_config.tls_ca_file = Some(bogus.clone());
    let err = Lake::open(&lake_config).expect_err("a CA file without certificates");
    assert!(
        strata_pipeline::error_chain(&err).contains(&bogus.display().to_string()),
        "{}",
        strata_pipeline::error_chain(&err)
    );
}

/// GCS against `gcp-storage-emulator` (PyPI), the emulator the issue names. strata's `[lake]`
/// reaches it (the endpoint as base URL, OAuth off by a service-account file), but the emulator
/// cannot serve object_store's GCS client, which speaks GCS's XML API: the emulator's PUT reply
/// has no `ETag` and its GET reply no `Last-Modified` (object_store refuses both replies), and
/// listing a bucket (`GET /<bucket>?list-type=2`), HEAD and DELETE answer 501. No archive can be
/// written, read, listed or discarded, so GCS is not in the lifecycle suite (README, "Chunk
/// lifecycle"). This test pins that: when it fails because a call succeeds, try
/// `BackendKind::Gcs` in the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_emulator_cannot_serve_object_stores_client() {
    let backend = Backend::start(BackendKind::Gcs);
    let addr = backend.addr.clone().unwrap();
    let mut config = LakeConfig {
        backend: LakeBackend::Gcs,
        bucket: Some(backend.bucket.clone()),
        endpoint: Some(format!("http://{addr}")),
        allow_http: true,
        prefix: backend.prefix.clone(),
        ..LakeConfig::default()
    };
    let account = backend
        .lake_toml
        .lines()
        .find_map(|l| l.strip_prefix("google_service_account = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    config
        .options
        .insert("google_service_account".into(), account);
    let lake = Lake::open(&config).expect("open the GCS lake");
    // An object stored through the emulator's own (JSON) upload API, there to be read.
    let name = format!("{}/t/date=1970-01-01/c.parquet", backend.prefix);
    let (status, body) = lifecycle_support::http(
        &addr,
        "POST",
        &format!(
            "/upload/storage/v1/b/{}/o?uploadType=media&name={name}",
            backend.bucket
        ),
        &[("Content-Type".into(), "application/octet-stream".into())],
        b"an archive",
    );
    assert_eq!(status, 200, "upload to the emulator: {body}");
    let key = Path::from(name.as_str());
    let works = "works on the GCS emulator now: try BackendKind::Gcs in the lifecycle suite";
    let put = lake.store.put(&key, Bytes::from_static(b"x").into()).await;
    assert!(put.is_err(), "PUT {works}");
    assert!(lake.store.get(&key).await.is_err(), "GET {works}");
    let prefix = Path::from(backend.prefix.as_str());
    let listed: Vec<_> = lake.store.list(Some(&prefix)).collect().await;
    assert!(listed.iter().any(|r| r.is_err()), "LIST {works}");
    assert!(lake.store.head(&key).await.is_err(), "HEAD {works}");
    assert!(lake.store.delete(&key).await.is_err(), "DELETE {works}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_azure_azurite() {
    suite(BackendKind::Azure).await;
}

/// Several watchers scanning at once emit each closed chunk exactly once, and create the
/// current and next partitions ahead of time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_watchers_emit_each_chunk_once() {
    let backend = Backend::start(BackendKind::Local);
    let lc = setup(&backend, "").await;
    let env = &lc.env;
    let h0 = this_hour() - 6 * HOUR_US;
    for k in 0..3 {
        fill_chunk(env, h0 + k * HOUR_US, 10).await;
    }
    let watchers: Vec<_> = (0..3)
        .map(|_| {
            strata_stages::lifecycle::watcher::Watcher::new(
                env.schema.clone(),
                strata_pipeline::db::postgres_pool(&env.config, 2).unwrap(),
                strata_pipeline::db::redis_pool(&env.config).unwrap(),
                env.config.chunk_watcher.clone(),
            )
        })
        .collect();
    // All three scan together until the chunks are quiet (each watcher times the quiet period
    // itself, so they record at about the same scan), then three rounds more.
    let scan_all = || async {
        let scans = futures_util::future::join_all(watchers.iter().map(|w| w.scan())).await;
        scans
            .into_iter()
            .map(|s| s.expect("scan").recorded)
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut recorded = 0;
    while recorded < 3 {
        assert!(
            Instant::now() < deadline,
            "the chunks were never quiet: {recorded} recorded"
        );
        recorded += scan_all().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        recorded += scan_all().await;
    }
    assert_eq!(recorded, 3, "each chunk recorded by one watcher");
    assert_eq!(xlen(env, &streams::archive_stream(&env.table)).await, 3);
    assert_eq!(states(&chunks(env).await), ["pending"; 3]);
    if env.partitioning().await == Partitioning::Hypertable {
        return; // TimescaleDB makes its chunks itself: nothing is premade
    }
    let names: Vec<String> = env
        .pg()
        .await
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::text::regclass ORDER BY 1",
            &[&env.table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for start in [this_hour(), this_hour() + HOUR_US] {
        let name = strata_stages::catalog::partition_name(&env.table, start);
        assert!(names.contains(&name), "{name} premade: {names:?}");
    }
}

/// Rows that arrive for a chunk after it was archived but before it is dropped make the
/// confirmer's count differ: nothing is dropped, the chunk is archived again with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_before_the_drop_are_archived_again() {
    let backend = Backend::start(BackendKind::Local);
    let lc = setup(&backend, "").await;
    let env = &lc.env;
    let h0 = this_hour() - 4 * HOUR_US;
    fill_chunk(env, h0, 500).await;
    let running = start(env, &[watcher::STAGE, archiver::STAGE]).await;
    wait_chunks(env, "the chunk archived", Duration::from_secs(60), |c| {
        states(c) == ["archived"]
    })
    .await;
    stop(running).await;
    env.pg()
        .await
        .execute(
            &format!(
                "INSERT INTO {} (time, source, metric, value) VALUES (to_timestamp($1::bigint / 1e6 + 1), 'late', 'm', 1)",
                env.table
            ),
            &[&h0],
        )
        .await
        .unwrap();
    let running = start(env, &[confirmer::STAGE]).await;
    let c = wait_chunks(env, "the archive rejected", Duration::from_secs(60), |c| {
        c[0].verify_failures == 1
    })
    .await;
    stop(running).await;
    assert_eq!(c[0].state, "pending");
    assert!(
        c[0].last_error
            .as_deref()
            .unwrap()
            .contains("501 rows now, the archive 500"),
        "{:?}",
        c[0].last_error
    );
    assert_eq!(env.count().await, 501, "nothing dropped");
    let running = start(env, &LIFECYCLE).await;
    let c = wait_chunks(
        env,
        "the chunk archived again and dropped",
        Duration::from_secs(60),
        |c| states(c) == ["dropped"],
    )
    .await;
    stop(running).await;
    assert_eq!(c[0].rows, Some(501));
    let files = objects(&lc.lake, &backend, &env.table).await;
    assert_eq!(files.len(), 1, "the stale archive was moved aside");
    assert_eq!(footer(&files[0].1).0, 501);
    assert_eq!(objects(&lc.lake, &backend, "_rejected").await.len(), 1);
}

/// A closed partition that never got a row (made ahead of time) is archived as a valid
/// Parquet file of zero rows, verified and dropped like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_chunk_is_archived_as_an_empty_file() {
    let backend = Backend::start(BackendKind::Local);
    let lc = setup(&backend, "").await;
    let env = &lc.env;
    if env.partitioning().await == Partitioning::Hypertable {
        eprintln!("SKIP an_empty_chunk_is_archived_as_an_empty_file: a hypertable has no empty chunks (TimescaleDB makes them for rows), so this native-partition case does not arise");
        return;
    }
    fill_chunk(env, this_hour() - 3 * HOUR_US, 0).await;
    let running = start(env, &LIFECYCLE).await;
    let c = wait_chunks(
        env,
        "the empty chunk dropped",
        Duration::from_secs(60),
        |c| states(c) == ["dropped"],
    )
    .await;
    stop(running).await;
    assert_eq!(c[0].rows, Some(0));
    let files = objects(&lc.lake, &backend, &env.table).await;
    assert_eq!(files.len(), 1);
    assert_eq!(footer(&files[0].1).0, 0);
    assert!(parquet_rows(&files[0].1).is_empty());
}

/// The TimescaleDB path: hypertable chunks from timescaledb_information.chunks, archived,
/// verified and dropped with drop_chunks. Skipped where the extension is not installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timescaledb_chunks_are_archived_and_dropped() {
    let probe = common::TestEnv::new("metrics", STREAMS).await;
    let available = probe
        .pg()
        .await
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .unwrap()
        .is_some();
    drop(probe);
    if !available {
        eprintln!("SKIP timescaledb_chunks_are_archived_and_dropped: the timescaledb extension is not installed on this PostgreSQL (the native-partition suite covers the same lifecycle)");
        return;
    }
    let backend = Backend::start(BackendKind::Local);
    let lc = setup(&backend, "").await;
    let env = &lc.env;
    let pg = env.pg().await;
    if env.partitioning().await != Partitioning::Hypertable {
        eprintln!("SKIP timescaledb_chunks_are_archived_and_dropped: timescaledb is installed but could not be loaded (shared_preload_libraries?)");
        return;
    }
    let h0 = this_hour() - 5 * HOUR_US;
    pg.execute(
        &format!(
            "INSERT INTO {} (time, source, metric, value) SELECT to_timestamp($1::bigint / 1e6 + i * 36), 'h', 'm', i FROM generate_series(0, 299) AS i",
            env.table
        ),
        &[&h0],
    )
    .await
    .unwrap();
    let source = pg_rows(env, "").await;
    let lifecycle = start(env, &LIFECYCLE).await;
    let done = wait_chunks(
        env,
        "3 hypertable chunks dropped",
        Duration::from_secs(90),
        |c| c.len() == 3 && c.iter().all(|c| c.state == "dropped"),
    )
    .await;
    stop(lifecycle).await;
    assert_eq!(env.count().await, 0);
    let mut archived: Vec<Row> = objects(&lc.lake, &backend, &env.table)
        .await
        .iter()
        .flat_map(|(_, b)| parquet_rows(b))
        .collect();
    archived.sort();
    assert_eq!(archived, source);
    assert_eq!(done.len(), 3);
}

/// Watcher of the backfill scenario: scans every half second, closes a chunk after 3 s without
/// writes (long enough for a busy writer's statistics, which flush about once a second).
const BACKFILL_WATCHER: &str =
    "[chunk_watcher]\ninterval_ms = 500\nreemit_after_ms = 600000\nquiet_period_ms = 3000\n";
/// How long the producer keeps replaying old events: ten watcher intervals.
const BACKFILL_FOR: Duration = Duration::from_secs(5);
/// Events per producer step (one step every 100 ms).
const BACKFILL_STEP: u64 = 40;

/// A producer replays events of two closed hours (older than `archive_after`) for ten watcher
/// intervals, interleaved, through `strata run` (every stage, one process). The watcher must wait
/// for the chunks to be quiet: each range is recorded once, after the last write, archived as
/// one file holding every event, and dropped; no deadlock, retry or failure on the way.
async fn backfill_is_archived_once_per_chunk(mode: TimescaleMode) {
    let backend = Backend::start(BackendKind::Local);
    let lc = setup_with(
        &backend,
        BACKFILL_WATCHER,
        mode,
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let env = &lc.env;
    if mode == TimescaleMode::Require {
        assert_eq!(env.partitioning().await, Partitioning::Hypertable);
    }
    let h0 = this_hour() - 5 * HOUR_US;
    let mut run = env.spawn(&["run"], "run.log");
    let mut conn = env.redis().await;
    let started = Instant::now();
    let mut produced = 0u64;
    while started.elapsed() < BACKFILL_FOR {
        let mut pipe = redis::pipe();
        for i in produced..produced + BACKFILL_STEP {
            // Even events to the first hour, odd to the second, 2 s apart within each.
            let time_ms =
                (h0 + (i % 2) as i64 * HOUR_US) / 1000 + (i / 2) as i64 * 2_000 % 3_600_000;
            pipe.cmd("XADD")
                .arg(env.input())
                .arg("*")
                .arg("time")
                .arg(time_ms)
                .arg("source")
                .arg("backfill")
                .arg("metric")
                .arg("m")
                .arg("value")
                .arg(i)
                .arg("tags")
                .arg(format!("{{\"seq\":{i}}}"))
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        produced += BACKFILL_STEP;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let produced_until: chrono::DateTime<chrono::Utc> = env
        .pg()
        .await
        .query_one("SELECT now()", &[])
        .await
        .unwrap()
        .get(0);
    let done = wait_chunks(
        env,
        "both backfilled hours archived and dropped",
        Duration::from_secs(60),
        |c| c.len() >= 2 && c.iter().all(|c| c.state == "dropped"),
    )
    .await;
    // Everything produced has gone through (nothing pending that could make another
    // incarnation), and the table is empty again.
    let mut conn = env.redis().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
        .drained(&mut conn)
        .await
        .unwrap()
        && streams::ConsumerGroup::new(&env.rows(), writer::STAGE.name)
            .drained(&mut conn)
            .await
            .unwrap())
    {
        assert!(Instant::now() < deadline, "the hot path never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = common::terminate(&mut run);
    let log = env.log("run.log");
    assert!(status.success(), "strata run exited with {status}: {log}");
    let after = chunks(env).await;
    assert_eq!(
        after.iter().map(|c| c.range_start_us).collect::<Vec<_>>(),
        [h0, h0 + HOUR_US],
        "one incarnation per backfilled hour: {after:#?}"
    );
    assert!(
        after.iter().all(|c| c.verify_failures == 0),
        "no chunk was archived under a writer: {after:#?}"
    );
    assert_eq!(env.count().await, 0);
    let recorded_at: Vec<chrono::DateTime<chrono::Utc>> = env
        .pg()
        .await
        .query(
            "SELECT created_at FROM strata.chunks WHERE table_name = $1 ORDER BY id",
            &[&env.table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        recorded_at.iter().all(|t| *t > produced_until),
        "chunks recorded at {recorded_at:?}, while the backfill ran until {produced_until}"
    );
    let files = objects(&lc.lake, &backend, &env.table).await;
    assert_eq!(
        files.len(),
        2,
        "one file per hour: {:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let mut seqs = Vec::new();
    for ((key, bytes), c) in files.iter().zip(&done) {
        assert_eq!(c.lake_path.as_deref(), Some(key.as_str()));
        let rows = parquet_rows(bytes);
        assert_eq!(Some(rows.len() as i64), c.rows);
        assert!(rows
            .iter()
            .all(|r| r.0 >= c.range_start_us && r.0 < c.range_start_us + HOUR_US));
        seqs.extend(rows.iter().map(|r| {
            let tags: serde_json::Value = serde_json::from_str(r.4.as_deref().unwrap()).unwrap();
            tags["seq"].as_u64().unwrap()
        }));
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (0..produced).collect::<Vec<_>>(),
        "every produced event is in the lake, once"
    );
    assert!(objects(&lc.lake, &backend, "_rejected").await.is_empty());
    for bad in ["40P01", "55P03", "deadlock", "transient failure"] {
        assert!(
            !log.contains(bad),
            "`{bad}` in the log of strata run:\n{log}"
        );
    }
    assert!(env.dead_letters(&env.input()).await.is_empty());
    assert!(env.dead_letters(&env.rows()).await.is_empty());
    assert!(env
        .dead_letters(&streams::archive_stream(&env.table))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_is_archived_once_per_chunk_on_native_partitions() {
    backfill_is_archived_once_per_chunk(TimescaleMode::Off).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_is_archived_once_per_chunk_on_timescaledb() {
    let probe = common::TestEnv::new("metrics", STREAMS).await;
    let pg = probe.pg().await;
    let loaded = pg
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
        && pg
            .batch_execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .await
            .is_ok();
    drop(pg);
    drop(probe);
    if !loaded {
        eprintln!("SKIP a_backfill_is_archived_once_per_chunk_on_timescaledb: the timescaledb extension is not installed (or not preloaded) on this PostgreSQL; the native-partition test covers the same backfill");
        return;
    }
    backfill_is_archived_once_per_chunk(TimescaleMode::Require).await;
}

/// A writer holding the table (a COPY in flight) that then writes a late row into the chunk
/// being dropped: the drop waits for it instead of deadlocking (it locks the parent before the
/// partition, as the writer does), the writer's transaction commits, and the late row makes
/// the confirmer archive the chunk again instead of dropping it under the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_waits_for_a_writer_instead_of_deadlocking() {
    let backend = Backend::start(BackendKind::Local);
    let lc = setup_with(&backend, WATCHER, TimescaleMode::Off, "").await;
    let env = &lc.env;
    let h0 = this_hour() - 4 * HOUR_US;
    fill_chunk(env, h0, 100).await;
    let running = start(env, &[watcher::STAGE, archiver::STAGE]).await;
    wait_chunks(env, "the chunk archived", Duration::from_secs(60), |c| {
        states(c) == ["archived"]
    })
    .await;
    stop(running).await;
    // The writer: a transaction with a row in the current hour (ROW EXCLUSIVE on the table).
    // Its deadlock check runs first (50 ms), so a cycle would abort it, not the confirmer.
    let mut writer = env.pg().await;
    let tx = writer.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL deadlock_timeout = '50ms'")
        .await
        .unwrap();
    let insert = format!(
        "INSERT INTO {} (time, source, metric, value) VALUES (to_timestamp($1::bigint / 1e6), 'writer', 'm', 1)",
        env.table
    );
    tx.execute(&insert, &[&(this_hour() + 1_000_000)])
        .await
        .unwrap();
    let running = start(env, &[confirmer::STAGE]).await;
    // Wait until the confirmer's drop is blocked behind the writer.
    let monitor = env.pg().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = monitor
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the confirmer never came to drop the chunk: {:?}",
            states(&chunks(env).await)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The late row for the chunk being dropped: must not deadlock.
    tx.execute(&insert, &[&(h0 + 1_000_000)])
        .await
        .expect("the writer's late row (a 40P01 here is the drop deadlocking with the writer)");
    tx.commit().await.unwrap();
    let c = wait_chunks(
        env,
        "the drop noticed the late row",
        Duration::from_secs(60),
        |c| c[0].verify_failures == 1,
    )
    .await;
    stop(running).await;
    assert_eq!(c[0].state, "pending");
    assert!(
        c[0].last_error
            .as_deref()
            .unwrap_or("")
            .contains("101 rows now, the archive 100"),
        "{:?}",
        c[0].last_error
    );
    let running = start(env, &LIFECYCLE).await;
    let c = wait_chunks(
        env,
        "the chunk archived again with the late row and dropped",
        Duration::from_secs(60),
        |c| states(c) == ["dropped"],
    )
    .await;
    stop(running).await;
    assert_eq!(c[0].rows, Some(101));
    assert_eq!(env.count().await, 1, "only the current hour's row is left");
}
