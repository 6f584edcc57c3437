//! Secrets never printed: a run of the hot path with the Redis URL (an ACL user's password in
//! it) from `REDIS_URL_FILE` and a PostgreSQL password from `[postgres] password_file` (a cluster
//! of the test's own that requires it, scram-sha-256), `strata status` (text and JSON),
//! `strata inspect`, failing connections (wrong passwords), the `/metrics` body and the spans
//! exported over OTLP: the secrets appear in none of them. And the admin endpoint's bearer
//! token.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::acl::{admin_redis, AclUser};
use common::rand_suffix;
use strata_pipeline::streams;
use strata_testkit::OwnPostgres;

/// Runs `strata <args>` to its end (killed after 60 s) with `vars`; returns success and
/// stdout + stderr.
fn strata(config: &Path, args: &[&str], vars: &[(&str, &str)]) -> (bool, String) {
    common::run_to_end(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .envs(vars.iter().copied()),
    )
}

/// One HTTP/1.1 GET on loopback with optional headers; the whole response.
fn http_get(addr: &str, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin endpoint");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn wait_http(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The raw bodies an OTLP/HTTP receiver got (protobuf keeps strings as they are, so a secret
/// in any span would show in the bytes).
type Bodies = Arc<Mutex<Vec<Bytes>>>;

async fn receive(State(bodies): State<Bodies>, body: Bytes) -> &'static str {
    bodies.lock().unwrap().push(body);
    ""
}

/// A folder with config.toml (`config` appended) and the example `metrics` schema as `table`.
fn world(table: &str, config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("schemas")).unwrap();
    let src =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/metrics.toml"))
            .unwrap();
    let text: String = src
        .replace("table = \"metrics\"", &format!("table = \"{table}\""))
        .lines()
        .filter(|l| !l.starts_with("archive_after") && !l.starts_with("drop_after_archive"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.path().join(format!("schemas/{table}.toml")), text).unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!(
            "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n\
             [lake]\npath = \"{}\"\n{config}",
            dir.path().join("lake").display()
        ),
    )
    .unwrap();
    dir
}

/// Deletes the streams of `table`.
async fn delete_keys(table: &str) {
    let keys: Vec<String> = [
        streams::telemetry_stream(table),
        streams::rows_stream(table),
        streams::archive_stream(table),
        streams::archived_stream(table),
    ]
    .into_iter()
    .flat_map(|s| [streams::dlq_stream(&s), streams::claims_key(&s), s])
    .collect();
    let mut conn = admin_redis().await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_files_are_used_and_never_printed() {
    let pg_password = format!("pg-{}-{}", rand_suffix(), rand_suffix());
    let pg = OwnPostgres::start_with_password(&pg_password);
    let user = AclUser::create(&[]).await;
    let (wrong_redis, wrong_pg) = (
        format!("wrong-r-{}", rand_suffix()),
        format!("wrong-p-{}", rand_suffix()),
    );
    let table = format!("metrics_{}", rand_suffix());
    let port = common::free_port();
    let dir = world(
        &table,
        &format!(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n\
             [postgres]\nurl = \"{}\"\npassword_file = \"pg.pw\"\n\
             [admin]\nlisten = \"127.0.0.1:{port}\"\n",
            pg.url("strata_secrets")
        ),
    );
    let config = dir.path().join("config.toml");
    std::fs::write(dir.path().join("pg.pw"), format!("{pg_password}\n")).unwrap();
    let url_file = dir.path().join("redis-url");
    std::fs::write(&url_file, format!("{}\n", user.url())).unwrap();
    let url_file = url_file.display().to_string();
    let vars = [("REDIS_URL_FILE", url_file.as_str()), ("RUST_LOG", "debug")];
    let mut outputs = Vec::new();

    // Without the password file the server refuses: the password really is required.
    let nopw = dir.path().join("nopw.toml");
    std::fs::write(
        &nopw,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("password_file = \"pg.pw\"\n", ""),
    )
    .unwrap();
    let (ok, out) = strata(&nopw, &["migrate"], &vars);
    assert!(!ok, "migrate without the password: {out}");
    outputs.push(out);

    let (ok, out) = strata(&config, &["migrate"], &vars);
    assert!(ok, "migrate with the password file: {out}");
    outputs.push(out);

    let spans = Bodies::default();
    let otlp_port = common::free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", otlp_port))
        .await
        .unwrap();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let log_path = dir.path().join("run.log");
    let mut run = common::Spawned(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .envs(vars)
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{otlp_port}"),
            )
            .env("OTEL_TRACES_SAMPLER", "always_on")
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(std::fs::File::create(dir.path().join("run.out")).unwrap())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut producer = redis::Client::open(user.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..50u64 {
        pipe.cmd("XADD")
            .arg(streams::telemetry_stream(&table))
            .arg("*")
            .arg("time")
            .arg(1_793_491_200_000 + i)
            .arg("source")
            .arg("s")
            .arg("metric")
            .arg("m")
            .arg("value")
            .arg(i)
            .ignore();
    }
    let () = pipe.query_async(&mut producer).await.unwrap();
    let pg_url = format!(
        "postgres://postgres:{pg_password}@127.0.0.1:{}/strata_secrets",
        pg.port
    );
    let client = common::connect(&pg_url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} of 50 rows: {}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let addr = format!("127.0.0.1:{port}");
    outputs.push(http_get(&addr, "/metrics", ""));
    outputs.push(http_get(&addr, "/readyz", ""));
    let rows = streams::rows_stream(&table);
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["inspect", &rows],
    ] {
        let (ok, out) = strata(&config, &args, &vars);
        assert!(ok, "strata {args:?}: {out}");
        outputs.push(out);
    }

    // The Redis password from `[redis] password_file` instead, the URL naming only the user.
    std::fs::write(dir.path().join("redis.pw"), format!("{}\n", user.password)).unwrap();
    let with_file = dir.path().join("redis-pwfile.toml");
    std::fs::write(
        &with_file,
        std::fs::read_to_string(&config).unwrap().replace(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n",
            &format!(
                "[redis]\nurl = \"redis://{}@127.0.0.1:6379\"\npassword_file = \"redis.pw\"\n",
                user.name
            ),
        ),
    )
    .unwrap();
    for args in [vec!["status", "--json"], vec!["inspect", &rows]] {
        let (ok, out) = strata(&with_file, &args, &[("RUST_LOG", "debug")]);
        assert!(ok, "strata {args:?} with [redis] password_file: {out}");
        outputs.push(out);
    }

    // Failing connections: wrong passwords, in the URL file and in the password file.
    let wrong_url_file = dir.path().join("wrong-url");
    std::fs::write(
        &wrong_url_file,
        user.url().replace(&user.password, &wrong_redis),
    )
    .unwrap();
    let wrong_url_file = wrong_url_file.display().to_string();
    let wrong_vars = [
        ("REDIS_URL_FILE", wrong_url_file.as_str()),
        ("RUST_LOG", "debug"),
    ];
    for args in [vec!["status"], vec!["status", "--json"], vec!["ingest"]] {
        let (ok, out) = strata(&config, &args, &wrong_vars);
        println!(
            "wrong password, strata {args:?}: {}",
            out.lines().last().unwrap_or("")
        );
        assert!(!ok, "strata {args:?} with a wrong password: {out}");
        outputs.push(out);
    }
    std::fs::write(dir.path().join("pg.pw"), &wrong_pg).unwrap();
    let (ok, out) = strata(&config, &["migrate"], &vars);
    assert!(!ok, "migrate with a wrong password: {out}");
    assert!(out.contains("28P01") || out.contains("password"), "{out}");
    outputs.push(out);
    let (ok, out) = strata(&config, &["status", "--json"], &vars);
    assert!(
        out.contains("28P01") || out.contains("password authentication"),
        "{ok} {out}"
    );
    outputs.push(out);
    // Both forms of one variable: refused, naming both.
    let (ok, out) = strata(
        &config,
        &["status"],
        &[
            ("REDIS_URL_FILE", url_file.as_str()),
            ("REDIS_URL", "redis://x"),
        ],
    );
    assert!(!ok && out.contains("REDIS_URL and REDIS_URL_FILE"), "{out}");
    outputs.push(out);

    let status = common::terminate(&mut run);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "strata run: {status}: {log}");
    outputs.push(log);
    outputs.push(std::fs::read_to_string(dir.path().join("run.out")).unwrap());
    let spans = spans.lock().unwrap().clone();
    assert!(!spans.is_empty(), "no spans were exported");
    for body in &spans {
        outputs.push(String::from_utf8_lossy(body).into_owned());
    }
    for out in &outputs {
        for secret in [&user.password, &pg_password, &wrong_redis, &wrong_pg] {
            assert!(
                !out.contains(secret.as_str()),
                "a secret was printed:\n{out}"
            );
        }
    }
    delete_keys(&table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_metrics_and_readyz_and_an_open_endpoint_warns() {
    let table = format!("metrics_{}", rand_suffix());
    let (port, open_port) = (common::free_port(), common::free_port());
    let token = format!("tok-{}-{}", rand_suffix(), rand_suffix());
    let redis_url = common::redis_url();
    let dir = world(
        &table,
        &format!(
            "[redis]\nurl = \"{redis_url}\"\n[admin]\nlisten = \"0.0.0.0:{port}\"\ntoken_file = \"token\"\n"
        ),
    );
    std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
    let open = dir.path().join("open.toml");
    std::fs::write(
        &open,
        std::fs::read_to_string(dir.path().join("config.toml"))
            .unwrap()
            .replace("token_file = \"token\"\n", "")
            .replace(&format!("0.0.0.0:{port}"), &format!("0.0.0.0:{open_port}")),
    )
    .unwrap();
    let spawn = |config: &Path, log: &str| {
        common::Spawned(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .arg("--config")
                .arg(config)
                .arg("ingest")
                .env_remove("REDIS_URL")
                .env_remove("DATABASE_URL")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut guarded = spawn(&dir.path().join("config.toml"), "guarded.log");
    let mut unguarded = spawn(&open, "open.log");
    let addr = format!("127.0.0.1:{port}");
    wait_http(&addr);
    wait_http(&format!("127.0.0.1:{open_port}"));
    let bearer = format!("Authorization: Bearer {token}\r\n");
    assert!(http_get(&addr, "/healthz", "").starts_with("HTTP/1.1 200"));
    for path in ["/metrics", "/readyz"] {
        let none = http_get(&addr, path, "");
        assert!(
            none.starts_with("HTTP/1.1 401"),
            "{path} without a token: {none}"
        );
        let wrong = http_get(&addr, path, "Authorization: Bearer nope\r\n");
        assert!(
            wrong.starts_with("HTTP/1.1 401"),
            "{path} with a wrong token: {wrong}"
        );
        let right = http_get(&addr, path, &bearer);
        assert!(
            !right.starts_with("HTTP/1.1 401"),
            "{path} with the token: {right}"
        );
        assert!(!right.contains(&token));
    }
    assert!(http_get(&addr, "/metrics", &bearer).starts_with("HTTP/1.1 200"));
    common::terminate(&mut guarded);
    common::terminate(&mut unguarded);
    let guarded_log = std::fs::read_to_string(dir.path().join("guarded.log")).unwrap();
    let open_log = std::fs::read_to_string(dir.path().join("open.log")).unwrap();
    const WARNING: &str = "beyond loopback without a token";
    assert!(open_log.contains(WARNING), "{open_log}");
    assert!(!guarded_log.contains(WARNING), "{guarded_log}");
    assert!(!guarded_log.contains(&token), "{guarded_log}");
    delete_keys(&table).await;
}
