//! Least privilege against the real servers: the whole pipeline (hot path, chunk lifecycle,
//! `status`, `inspect`, `dlq list|replay`) runs as a Redis ACL user holding exactly the rule
//! `strata acl-rule` prints, and as a PostgreSQL runtime role (LOGIN, no superuser) granted by
//! `strata migrate --grant`, run by an owner role that is no superuser either (CREATEROLE, owning
//! the database); Redis's ACL log records no refusal. A user lacking one permission
//! stops the stage with an error naming the command and the key.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::acl::{admin_redis, AclUser};
use common::{rand_suffix, TestEnv};
use strata_pipeline::schema::Schema;
use strata_pipeline::streams;
use strata_stages::{ingest, writer};

const HOUR_US: i64 = 3_600_000_000;

/// A PostgreSQL LOGIN role without superuser, dropped (with the group `strata migrate --grant`
/// made for it) when dropped; drop it after the test's database.
pub struct PgRole {
    pub name: String,
}

impl PgRole {
    /// A role `<prefix>_<random>` with `attributes` besides LOGIN NOSUPERUSER.
    pub async fn create(prefix: &str, attributes: &str) -> PgRole {
        let name = format!("{prefix}_{}", rand_suffix());
        common::connect(&common::admin_url())
            .await
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN NOSUPERUSER {attributes}"
            ))
            .await
            .expect("create the role");
        PgRole { name }
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok((client, conn)) =
                    tokio_postgres::connect(&common::admin_url(), tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let _ = client
                    .batch_execute(&format!(
                        "DROP ROLE IF EXISTS {name}; DROP ROLE IF EXISTS {name}_tables;"
                    ))
                    .await;
            });
        })
        .join();
    }
}

/// Runs `strata <args>` to its end (killed after 60 s) with `vars`; returns success and
/// stdout + stderr.
fn strata(env: &TestEnv, args: &[&str], vars: &[(&str, &str)]) -> (bool, String) {
    common::run_to_end(env.command().args(args).envs(vars.iter().copied()))
}

/// Starts `strata <args>` with `env`, stderr to `log` in the env's folder.
fn spawn(env: &TestEnv, args: &[&str], vars: &[(&str, &str)], log: &str) -> common::Spawned {
    let file = std::fs::File::create(env.dir.path().join(log)).unwrap();
    let child = env
        .command()
        .args(args)
        .envs(vars.iter().copied())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn strata");
    common::Spawned(child)
}

/// `url` with its user replaced by `role` (and no password: the tests' server trusts loopback).
fn as_role(url: &str, role: &str) -> String {
    let mut cfg: tokio_postgres::Config = url.parse().unwrap();
    cfg.user(role);
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{role}@{host}:{port}/{}",
        cfg.get_dbname().unwrap()
    )
}

/// A TestEnv whose table has 1-hour chunks archived an hour after they end and dropped once
/// verified, with a fast watcher.
async fn lifecycle_env(extra: &str) -> TestEnv {
    let config = format!(
        "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n\
         [chunk_watcher]\ninterval_ms = 300\nreemit_after_ms = 600000\nquiet_period_ms = 3000\n{extra}"
    );
    let mut env = TestEnv::new("metrics", &config).await;
    let path = env
        .dir
        .path()
        .join("schemas")
        .join(format!("{}.toml", env.table));
    let mut text = String::new();
    for line in std::fs::read_to_string(&path).unwrap().lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        if ["chunk_interval", "archive_after", "drop_after_archive"].contains(&key) {
            continue;
        }
        text.push_str(line);
        text.push('\n');
        if key == "table" {
            text.push_str(
                "chunk_interval = \"1 hour\"\narchive_after = \"1 hour\"\ndrop_after_archive = true\n",
            );
        }
    }
    std::fs::write(&path, &text).unwrap();
    env.schema = Arc::new(Schema::from_toml("test", &text).unwrap());
    env
}

fn this_hour_ms() -> i64 {
    let now = chrono::Utc::now().timestamp_micros();
    (now - now.rem_euclid(HOUR_US)) / 1000
}

/// Deletes the lifecycle streams of `table` (TestEnv deletes the hot path's).
async fn delete_lifecycle_keys(table: &str) {
    let mut conn = admin_redis().await;
    let a = streams::archive_stream(table);
    let b = streams::archived_stream(table);
    let keys = [
        streams::dlq_stream(&a),
        streams::dlq_stream(&b),
        streams::claims_key(&a),
        streams::claims_key(&b),
        a,
        b,
    ];
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
}

/// One HTTP/1.1 GET on loopback; the status line and body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn chunk_states(env: &TestEnv) -> Vec<String> {
    env.pg()
        .await
        .query(
            "SELECT state FROM strata.chunks WHERE table_name = $1 ORDER BY id",
            &[&env.table],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_pipeline_runs_under_the_acl_rule_and_the_runtime_role() {
    // The owner: no superuser, as on a managed service, owning the database.
    let owner = PgRole::create("strata_own", "NOCREATEDB CREATEROLE").await;
    let role = PgRole::create("strata_rt", "NOCREATEDB NOCREATEROLE").await;
    let user = AclUser::create(&[]).await;
    let port = common::free_port();
    let env = lifecycle_env(&format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n")).await;
    let mut outputs = Vec::new();
    env.pg()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} OWNER TO {}",
            env.db, owner.name
        ))
        .await
        .unwrap();
    let owner_url = as_role(&env.db_url, &owner.name);
    let owner_vars = [("DATABASE_URL", owner_url.as_str())];

    // The owner migrates and grants the runtime role.
    let (ok, out) = strata(&env, &["migrate", "--grant", &role.name], &owner_vars);
    assert!(ok, "migrate --grant: {out}");
    assert!(out.contains(&format!("granted {}", role.name)), "{out}");
    let (ok, out) = strata(&env, &["migrate", "--grant", &role.name], &owner_vars);
    assert!(ok, "migrate --grant again (idempotent): {out}");
    let is_super: bool = common::connect(&common::admin_url())
        .await
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
            &[&role.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!is_super);

    // Every process below: the ACL user (its URL in a file) and the runtime role.
    let url_file = env.dir.path().join("redis-url");
    std::fs::write(&url_file, format!("{}\n", user.url())).unwrap();
    let url_file = url_file.display().to_string();
    let db_url = as_role(&env.db_url, &role.name);
    let vars = [
        ("REDIS_URL_FILE", url_file.as_str()),
        ("DATABASE_URL", db_url.as_str()),
    ];
    let mut run = spawn(&env, &["run"], &vars, "run.log");

    // Two hours of events, five hours back (their chunks close at once), and one bad event.
    let mut producer = redis::Client::open(user.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the ACL user connects");
    let h0 = this_hour_ms() - 5 * 3_600_000;
    let mut pipe = redis::pipe();
    for i in 0..200i64 {
        pipe.cmd("XADD")
            .arg(env.input())
            .arg("*")
            .arg("time")
            .arg(h0 + (i % 2) * 3_600_000 + i * 1000)
            .arg("source")
            .arg("acl")
            .arg("metric")
            .arg("m")
            .arg("value")
            .arg(i)
            .arg("tags")
            .arg(format!("{{\"seq\":{i}}}"))
            .ignore();
    }
    pipe.cmd("XADD")
        .arg(env.input())
        .arg("*")
        .arg("time")
        .arg(h0)
        .arg("source")
        .arg("acl")
        .arg("metric")
        .arg("m")
        .arg("value")
        .arg("not a number")
        .ignore();
    let () = pipe.query_async(&mut producer).await.unwrap();

    // The hot path drains, with the bad event dead-lettered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admin = env.redis().await;
    loop {
        let drained = streams::ConsumerGroup::new(&env.input(), ingest::STAGE.name)
            .drained(&mut admin)
            .await
            .unwrap()
            && streams::ConsumerGroup::new(&env.rows(), writer::STAGE.name)
                .drained(&mut admin)
                .await
                .unwrap();
        if drained && !env.dead_letters(&env.input()).await.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hot path did not drain as the ACL user and runtime role: {}",
            env.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Operator commands under the same accounts.
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["inspect", env.rows().as_str()],
        vec!["dlq", "list", "--stream", env.input().as_str()],
        vec!["dlq", "replay", "--stream", env.input().as_str()],
    ] {
        let (ok, out) = strata(&env, &args, &vars);
        assert!(
            ok,
            "strata {args:?} as the ACL user and runtime role: {out}"
        );
        outputs.push(out);
    }
    assert!(outputs[1].contains(&env.table), "{}", outputs[1]);

    // The lifecycle: both hours archived, verified and dropped.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let states = chunk_states(&env).await;
        if states.len() >= 2 && states.iter().all(|s| s == "dropped") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chunks {states:?} not all dropped as the runtime role: {}",
            env.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    outputs.push(metrics);
    let status = common::terminate(&mut run);
    let log = env.log("run.log");
    assert!(status.success(), "strata run exited with {status}: {log}");
    let parquet = walk(&env.dir.path().join("lake"))
        .into_iter()
        .filter(|p| p.ends_with(".parquet"))
        .count();
    assert!(parquet >= 2, "archives in the lake: {parquet}");
    assert_eq!(env.count().await, 0, "the dropped chunks' rows are gone");
    for bad in ["NOPERM", "permission denied", "must be owner", "can't"] {
        assert!(!log.contains(bad), "`{bad}` in the log:\n{log}");
    }
    let denials = user.denials().await;
    assert!(
        denials.is_empty(),
        "Redis refused the ACL user: {denials:#?}"
    );
    outputs.push(log);
    for out in &outputs {
        assert!(
            !out.contains(&user.password),
            "the password was printed: {out}"
        );
    }
    // The runtime role made partitions (native: the watcher's premade ones remain) and dropped some;
    // the owner can still alter the table, partitions included.
    let partitions: i64 = env
        .pg()
        .await
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)",
            &[&env.table],
        )
        .await
        .unwrap()
        .get(0);
    // (A hypertable has no premade chunks: there, every chunk may be dropped by now.)
    if env.partitioning().await == strata_stages::catalog::Partitioning::Native {
        assert!(partitions > 0, "no partition left to alter");
    }
    let schema_file = env
        .dir
        .path()
        .join("schemas")
        .join(format!("{}.toml", env.table));
    let mut text = std::fs::read_to_string(&schema_file).unwrap();
    text.push_str("\n[[columns]]\nname = \"added_later\"\ntype = \"text\"\n");
    std::fs::write(&schema_file, text).unwrap();
    let (ok, out) = strata(&env, &["migrate"], &owner_vars);
    assert!(ok, "migrate as the owner after the lifecycle ran: {out}");
    assert!(out.contains("added added_later"), "{out}");
    delete_lifecycle_keys(&env.table).await;
    drop(env);
    drop(role);
    drop(owner);
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_stops_the_stage_naming_the_command_and_the_key() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    // The input stream exists (status reads the groups of existing streams only).
    env.xadd(&[
        ("time", b"1793491200000"),
        ("source", b"s"),
        ("metric", b"m"),
        ("value", b"1"),
    ])
    .await;
    let archive = streams::archive_stream(&env.table);
    for (extra, args, command, key) in [
        // Every stage starts by creating its group.
        ("-xgroup|create", "ingest", "XGROUP CREATE", env.input()),
        // The hot path reads over its own connection, the lifecycle over the pool.
        ("-xreadgroup", "ingest", "XREADGROUP", env.input()),
        ("-xreadgroup", "archiver", "XREADGROUP", archive.clone()),
        // Operator commands name it too.
        ("-xinfo|groups", "status", "XINFO GROUPS", env.input()),
    ] {
        let user = AclUser::create(&[extra]).await;
        let redis_url = user.url();
        let vars = [
            ("REDIS_URL", redis_url.as_str()),
            ("DATABASE_URL", env.db_url.as_str()),
        ];
        let (ok, out) = strata(&env, &[args], &vars);
        println!("without {extra}, strata {args}: {out}");
        assert!(!ok, "strata {args} kept running without {extra}: {out}");
        assert!(out.contains("NOPERM"), "{extra}: {out}");
        assert!(
            out.contains(&format!("{command} on `{key}`")),
            "{extra}: the error names the command and the key: {out}"
        );
        assert!(!out.contains(&user.password), "{out}");
    }
    // Without one key pattern, the first command on such a key is refused, naming it.
    let user = AclUser::create(&[
        "resetkeys",
        "~telemetry:{*",
        "~archive:{*",
        "~archived:{*",
        "~partitions:{*",
    ])
    .await;
    let redis_url = user.url();
    let vars = [
        ("REDIS_URL", redis_url.as_str()),
        ("DATABASE_URL", env.db_url.as_str()),
    ];
    let (ok, out) = strata(&env, &["batch-writer"], &vars);
    assert!(!ok, "the stage kept running without its key: {out}");
    assert!(
        out.contains(&format!("XGROUP CREATE on `{}`", env.rows())) && out.contains("NOPERM"),
        "{out}"
    );
    delete_lifecycle_keys(&env.table).await;
}

#[test]
fn the_readme_shows_the_rule_the_cli_prints() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let line = strata_pipeline::streams::acl::setuser_line("strata");
    assert!(
        readme.contains(&format!("$ strata acl-rule\n{line}\n")),
        "README.md's rule differs from `strata acl-rule`: {line}"
    );
}
