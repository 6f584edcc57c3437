//! Shared test fixtures: each test gets its own PostgreSQL database and its own table name
//! (hence its own stream keys) on the real servers, and removes both when it ends.
//!
//! `REDIS_URL` and `DATABASE_URL` point the tests at other servers; the role in `DATABASE_URL`
//! needs CREATEDB.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_pipeline::schema::{Schema, SchemaRef};
use strata_pipeline::streams;
use strata_pipeline::Config;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The server's `postgres` database, from which tests create and drop their own.
fn admin_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    with_db(&url, "postgres")
}

/// `url` with its database replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
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
        let table = format!("{example}_{}", rand_suffix());
        let db = format!("strata_test_{}", rand_suffix());
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create test database");
        let db_url = with_db(&admin_url(), &db);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("schemas")).unwrap();
        let src = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas")
                .join(format!("{example}.toml")),
        )
        .unwrap();
        let text = src.replace(
            &format!("table = \"{example}\""),
            &format!("table = \"{table}\""),
        );
        std::fs::write(
            dir.path().join("schemas").join(format!("{table}.toml")),
            &text,
        )
        .unwrap();
        let config_text = format!(
            "[redis]\nurl = \"{}\"\n[postgres]\nurl = \"{db_url}\"\n{}\n",
            redis_url(),
            if config_extra.is_empty() {
                "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n"
            } else {
                config_extra
            }
        );
        std::fs::write(dir.path().join("config.toml"), config_text).unwrap();
        let config = Config::load(&dir.path().join("config.toml"), true).expect("config");
        let schema = Arc::new(Schema::from_toml("test", &text).expect("schema"));
        TestEnv {
            db,
            db_url,
            redis_url: redis_url(),
            table,
            dir,
            config,
            schema,
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

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn migrate(&self) {
        strata_stages::migrate::migrate(&self.config, &[self.schema.clone()])
            .await
            .expect("migrate");
    }

    /// XADDs one event; returns its ID.
    pub async fn xadd(&self, fields: &[(&str, &[u8])]) -> String {
        let mut conn = self.redis().await;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.input()).arg("*");
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
        let deadline = Instant::now() + timeout;
        let mut conn = self.redis().await;
        loop {
            let drained = streams::drained(&mut conn, &self.input(), streams::INGEST)
                .await
                .unwrap()
                && streams::drained(&mut conn, &self.rows(), streams::BATCH_WRITER)
                    .await
                    .unwrap();
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

    /// Dead letters of `stream`, as field maps.
    pub async fn dead_letters(&self, stream: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut conn = self.redis().await;
        let v: redis::Value = redis::cmd("XRANGE")
            .arg(streams::dlq_stream(stream))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (entries, _) = streams::parse_entries(v, 0);
        entries
            .into_iter()
            .map(|e| {
                (
                    e.id,
                    e.fields
                        .into_iter()
                        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                        .collect(),
                )
            })
            .collect()
    }

    /// Starts `strata <args>` with this environment's config, logging to a file in the env dir.
    pub fn spawn(&self, args: &[&str], log_name: &str) -> Child {
        let log = std::fs::File::create(self.dir.path().join(log_name)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strata")
    }

    pub fn log(&self, log_name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log_name)).unwrap_or_default()
    }
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
        let (db, table, redis_url) = (self.db.clone(), self.table.clone(), self.redis_url.clone());
        // Clean up on a thread of its own: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let admin = connect(&admin_url()).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await;
                if let Ok(client) = redis::Client::open(redis_url.as_str()) {
                    if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                        let t = streams::telemetry_stream(&table);
                        let r = streams::rows_stream(&table);
                        let keys = [streams::dlq_stream(&t), streams::dlq_stream(&r), t, r];
                        let _: redis::RedisResult<()> =
                            redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                    }
                }
            });
        })
        .join();
    }
}
