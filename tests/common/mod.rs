//! Shared test fixtures: each test gets its own PostgreSQL database and its own table name
//! (hence its own stream keys) on the real servers, and removes both when it ends.
//!
//! `REDIS_URL` and `DATABASE_URL` point the tests at other servers; the role in `DATABASE_URL`
//! needs CREATEDB.

#![allow(dead_code)]

pub mod acl;
pub mod servers;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_pipeline::schema::{Schema, SchemaRef};
use strata_pipeline::streams;
use strata_stages::Config;
use strata_stages::{ingest, writer, StageSpec};
use tokio_util::sync::CancellationToken;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The server's `postgres` database, from which tests create and drop their own.
pub fn admin_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    with_db(&url, "postgres")
}

/// `url` with its database replaced by `db`.
pub fn with_db(url: &str, db: &str) -> String {
    let mut cfg: tokio_postgres::Config = url.parse().expect("DATABASE_URL");
    cfg.dbname(db);
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres");
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    format!("postgres://{user}{password}@{host}:{port}/{db}")
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

#[allow(unused_imports)]
pub use strata_testkit::free_port;

pub fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One test's world: a database, a table, a folder with `config.toml` and `schemas/`.
pub struct TestEnv {
    /// The test's own database.
    pub db: String,
    /// URL of that database.
    pub db_url: String,
    pub redis_url: String,
    /// The database tests create and drop theirs from.
    pub admin_url: String,
    /// The test's own table (the example schema's name plus a random suffix).
    pub table: String,
    /// Holds config.toml and schemas/.
    pub dir: tempfile::TempDir,
    /// The loaded configuration (URLs set).
    pub config: Config,
    pub schema: SchemaRef,
}

impl TestEnv {
    /// A fresh environment for the example schema `example` (`metrics` or `ticks`), with
    /// `config_extra` appended to config.toml (fast claims and small batches by default).
    pub async fn new(example: &str, config_extra: &str) -> TestEnv {
        Self::on_servers(example, config_extra, &redis_url(), &admin_url()).await
    }

    /// Like [`TestEnv::new`], on the given Redis and PostgreSQL (`admin` names a database to
    /// create the test's own from).
    pub async fn on_servers(
        example: &str,
        config_extra: &str,
        redis_url: &str,
        admin: &str,
    ) -> TestEnv {
        let table = format!("{example}_{}", rand_suffix());
        let db = format!("strata_test_{}", rand_suffix());
        connect(admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create test database");
        let db_url = with_db(admin, &db);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("schemas")).unwrap();
        let src = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas")
                .join(format!("{example}.toml")),
        )
        .unwrap();
        // The example's lifecycle policy is dropped: test data is dated weeks back and a test
        // running `strata run` must not see its chunks archived under it. Lifecycle tests set
        // their own policy.
        let text: String = src
            .replace(
                &format!("table = \"{example}\""),
                &format!("table = \"{table}\""),
            )
            .lines()
            .filter(|l| !l.starts_with("archive_after") && !l.starts_with("drop_after_archive"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(
            dir.path().join("schemas").join(format!("{table}.toml")),
            &text,
        )
        .unwrap();
        let extra = if config_extra.is_empty() {
            "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n"
        } else {
            config_extra
        };
        // The lake stays inside the test's folder unless the test brings its own.
        let lake = if extra.contains("[lake]") {
            String::new()
        } else {
            format!("[lake]\npath = \"{}\"\n", dir.path().join("lake").display())
        };
        let config_text = format!(
            "[redis]\nurl = \"{redis_url}\"\n[postgres]\nurl = \"{db_url}\"\n{lake}{extra}\n"
        );
        std::fs::write(dir.path().join("config.toml"), config_text).unwrap();
        // Not the process's environment: its REDIS_URL and DATABASE_URL name the servers the
        // tests use, not this test's own database, so the file's URLs stand.
        let config =
            Config::load_with_env(&dir.path().join("config.toml"), true, |_| None).expect("config");
        let schema = Arc::new(Schema::from_toml("test", &text).expect("schema"));
        TestEnv {
            db,
            db_url,
            redis_url: redis_url.to_string(),
            admin_url: admin.to_string(),
            table,
            dir,
            config,
            schema,
        }
    }

    pub fn producer(&self) -> Producer {
        Producer {
            redis_url: self.redis_url.clone(),
            input: self.input(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn input(&self) -> String {
        streams::telemetry_stream(&self.table)
    }

    pub fn rows(&self) -> String {
        streams::rows_stream(&self.table)
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        connect(&self.db_url).await
    }

    /// How `migrate` made the table: a TimescaleDB hypertable where the server has the
    /// extension, native range partitions otherwise.
    pub async fn partitioning(&self) -> strata_stages::catalog::Partitioning {
        strata_stages::catalog::partitioning(&self.pg().await, &self.table)
            .await
            .unwrap()
    }

    /// Makes the chunk starting at `start_us` ready for rows inserted by SQL: a native partition
    /// is created; a hypertable creates its chunks itself.
    pub async fn make_chunk(&self, pg: &mut tokio_postgres::Client, start_us: i64) {
        if self.partitioning().await == strata_stages::catalog::Partitioning::Native {
            strata_stages::catalog::create_partition(pg, &self.schema, start_us)
                .await
                .unwrap();
        }
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn migrate(&self) {
        strata_stages::migrate::migrate(&self.config, std::slice::from_ref(&self.schema))
            .await
            .expect("migrate");
    }

    /// XADDs one event to the table's input; returns its ID.
    pub async fn xadd(&self, fields: &[(&str, &[u8])]) -> String {
        self.xadd_to(&self.input(), fields).await
    }

    /// XADDs one entry of `fields` to `stream`; returns its ID.
    pub async fn xadd_to(&self, stream: &str, fields: &[(&str, &[u8])]) -> String {
        let mut conn = self.redis().await;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        cmd.query_async(&mut conn).await.unwrap()
    }

    pub async fn count(&self) -> i64 {
        self.pg()
            .await
            .query_one(&format!("SELECT count(*) FROM {}", self.table), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until both groups have read and acknowledged everything (and `rows` rows exist).
    pub async fn wait_landed(&self, rows: i64, timeout: Duration) {
        self.wait_drained(
            &[
                (&self.input(), ingest::STAGE.name),
                (&self.rows(), writer::STAGE.name),
            ],
            rows,
            timeout,
        )
        .await
    }

    /// Waits until batch-writer has read and acknowledged everything on `rows:{T}` (and `rows`
    /// rows exist): for tests that write frames themselves.
    pub async fn wait_rows_drained(&self, rows: i64, timeout: Duration) {
        self.wait_drained(&[(&self.rows(), writer::STAGE.name)], rows, timeout)
            .await
    }

    /// Waits until each (stream, group) has read and acknowledged everything and the table
    /// holds at least `rows` rows.
    async fn wait_drained(&self, groups: &[(&str, &str)], rows: i64, timeout: Duration) {
        let groups: Vec<(String, &str)> = groups.iter().map(|(s, g)| (s.to_string(), *g)).collect();
        self.wait_drained_on(&mut self.redis().await, &groups, rows, timeout)
            .await
    }

    /// [`TestEnv::wait_drained`] over `conn` (a cluster connection, say).
    pub async fn wait_drained_on<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        groups: &[(String, &str)],
        rows: i64,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut drained = true;
            for (stream, group) in groups {
                drained &= streams::ConsumerGroup::new(stream, group)
                    .drained(conn)
                    .await
                    .unwrap();
            }
            let count = self.count().await;
            if drained && count >= rows {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out: {count} of {rows} rows landed, drained = {drained}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rewrites the schema file (and [`TestEnv::schema`]) with `partitions = n` and
    /// `partition_key = "source"`.
    #[allow(dead_code)]
    pub fn partitioned(&mut self, n: u32) {
        let path = self
            .dir
            .path()
            .join("schemas")
            .join(format!("{}.toml", self.table));
        let text: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("partitions") && !l.starts_with("partition_key"))
            .map(|l| format!("{l}\n"))
            .collect();
        // Top-level keys go before the first table array.
        let at = text.find("[[columns]]").unwrap();
        let text = format!(
            "{}partitions = {n}\npartition_key = \"source\"\n{}",
            &text[..at],
            &text[at..]
        );
        std::fs::write(&path, &text).unwrap();
        self.schema = Arc::new(Schema::from_toml("test", &text).unwrap());
    }

    /// Each partition's hot-path streams of a table with `n` partitions, with their groups.
    #[allow(dead_code)]
    pub fn hot_path_groups(&self, n: u32) -> Vec<(String, &'static str)> {
        (0..n)
            .flat_map(|p| {
                [&ingest::STAGE, &writer::STAGE]
                    .map(|stage| (stage.input_key(&self.table, p).unwrap(), stage.group()))
            })
            .collect()
    }

    /// Dead letters of `stream`, as field lists.
    pub async fn dead_letters(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        self.entries(&streams::dlq_stream(stream)).await
    }

    /// Every entry of `stream` with its fields (values as text), read in pages.
    pub async fn entries(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut conn = self.redis().await;
        let mut out = Vec::new();
        let mut from = "-".to_string();
        loop {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(100)
                .query_async(&mut conn)
                .await
                .unwrap();
            let (entries, _) = streams::parse_entries(v, 0);
            let Some(last) = entries.last() else {
                return out;
            };
            from = format!("({}", last.id);
            out.extend(entries.into_iter().map(|e| {
                (
                    e.id.to_string(),
                    e.fields
                        .iter()
                        .map(|(k, v)| (k.into_owned(), String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                )
            }));
        }
    }

    /// `strata --config <this environment's config>`, without the REDIS_URL and DATABASE_URL of
    /// the test process (they name the shared servers, not this test's database).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
        cmd.arg("--config")
            .arg(self.config_path())
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL");
        cmd
    }

    /// Starts `strata <args>` with this environment's config, logging to a file in the env dir.
    pub fn spawn(&self, args: &[&str], log_name: &str) -> Spawned {
        let log = std::fs::File::create(self.dir.path().join(log_name)).unwrap();
        let child = self
            .command()
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strata");
        Spawned(child)
    }

    pub fn log(&self, log_name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log_name)).unwrap_or_default()
    }
}

/// A `strata` child process, killed when dropped so a failing test leaves none running.
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Stages running inside the test process: the token that stops them and the task awaiting them.
pub type InProcess = (CancellationToken, tokio::task::JoinHandle<()>);

/// Runs `kinds` for `schema` in this process until [`stop`].
pub async fn start_stages(config: &Config, schema: &SchemaRef, kinds: &[StageSpec]) -> InProcess {
    let stop = CancellationToken::new();
    let running = strata_stages::start(config, std::slice::from_ref(schema), kinds, stop.clone())
        .await
        .expect("start stages");
    let s = stop.clone();
    let handle = tokio::spawn(async move { running.wait(&s).await.expect("stages failed") });
    (stop, handle)
}

/// Runs `kinds` for the environment's table in this process until [`stop`].
pub async fn start(env: &TestEnv, kinds: &[StageSpec]) -> InProcess {
    start_stages(&env.config, &env.schema, kinds).await
}

/// Stops stages started by [`start`] and waits for them to finish.
pub async fn stop(running: InProcess) {
    running.0.cancel();
    running.1.await.unwrap();
}

/// Adds to `pipe` the XADD of known event `i` (a `metrics` row: time = 1793491200000 + i ms,
/// source `source`, value i, tags {"seq": i}) to `stream` with entry ID `id` (`*` or explicit).
#[allow(dead_code)]
pub fn xadd_known(pipe: &mut redis::Pipeline, stream: &str, id: &str, i: u64, source: &str) {
    pipe.cmd("XADD")
        .arg(stream)
        .arg(id)
        .arg("time")
        .arg(1_793_491_200_000u64 + i)
        .arg("source")
        .arg(source)
        .arg("metric")
        .arg("m")
        .arg("value")
        .arg(i as f64)
        .arg("tags")
        .arg(format!("{{\"seq\":{i}}}"))
        .ignore();
}

/// XADDs known events to one stream, surviving Redis restarts.
pub struct Producer {
    pub redis_url: String,
    pub input: String,
}

impl Producer {
    /// XADDs events `from..to` at `rate` per second; each event's contents follow from its
    /// sequence number: time = 1793491200000 + seq ms, value = seq × 0.5, tags = {"seq": seq}.
    /// The entry ID is `<time>-0`, so after a Redis restart the producer resumes right after
    /// the last entry Redis kept: nothing is sent twice, nothing skipped.
    pub async fn produce_known(&self, from: u64, to: u64, rate: u64) {
        const BASE_MS: u64 = 1_793_491_200_000;
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let start = Instant::now();
        let mut seq = from;
        while seq < to {
            let end = (seq + 500).min(to);
            let mut pipe = redis::pipe();
            for i in seq..end {
                pipe.cmd("XADD")
                    .arg(&self.input)
                    .arg(format!("{}-0", BASE_MS + i))
                    .arg("time")
                    .arg(BASE_MS + i)
                    .arg("source")
                    .arg(format!("s{}", i % 10))
                    .arg("metric")
                    .arg("m")
                    .arg("value")
                    .arg(i as f64 * 0.5)
                    .arg("tags")
                    .arg(format!("{{\"seq\":{i}}}"))
                    .ignore();
            }
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => seq = end,
                Err(_) => {
                    // Redis went away mid-batch: resume after the last entry it kept.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        continue;
                    };
                    let info: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
                        .arg("STREAM")
                        .arg(&self.input)
                        .query_async(&mut c)
                        .await;
                    conn = c;
                    let Ok(info) = info else { continue };
                    if let Some(last) = last_generated_ms(info) {
                        seq = (last + 1 - BASE_MS).max(from);
                    }
                }
            }
            let due = start + Duration::from_secs_f64((seq - from) as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

fn last_generated_ms(info: redis::Value) -> Option<u64> {
    let redis::Value::Array(flat) = info else {
        return None;
    };
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let (redis::Value::BulkString(k), redis::Value::BulkString(v)) = (k, v) {
            if k == b"last-generated-id" {
                return String::from_utf8(v).ok()?.split('-').next()?.parse().ok();
            }
        }
    }
    None
}

/// Sends SIGTERM and waits for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (db, table, redis_url, admin) = (
            self.db.clone(),
            self.table.clone(),
            self.redis_url.clone(),
            self.admin_url.clone(),
        );
        // Clean up on a thread of its own: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((admin, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await;
                if let Ok(client) = redis::Client::open(redis_url.as_str()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        // Every key under the table's tags, `{T}` and `{T:p}`: its streams,
                        // their dead letters and claims, its recorded count, and anything a
                        // test wrote there. The table's name is this test's own.
                        let mut keys: Vec<String> = Vec::new();
                        if let Ok(mut iter) = redis::AsyncCommands::scan_match::<_, String>(
                            &mut conn,
                            format!("*{{{table}[}}:]*"),
                        )
                        .await
                        {
                            while let Some(Ok(key)) = iter.next_item().await {
                                keys.push(key);
                            }
                        }
                        let _: redis::RedisResult<()> =
                            redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                    }
                }
            });
        })
        .join();
    }
}

/// Runs `cmd` to its end, stdout and stderr into one text (killed, and the test failed, after
/// 60 s); returns whether it succeeded, and the text.
pub fn run_to_end(cmd: &mut Command) -> (bool, String) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.reopen().unwrap())
        .stderr(out_file.reopen().unwrap())
        .spawn()
        .expect("run strata");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not end within 60 s: {}",
                std::fs::read_to_string(out_file.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out_file.path()).unwrap_or_default();
    (status.success(), text)
}
