//! TLS end to end against servers the tests start: a TLS-only `redis-server` and a PostgreSQL
//! with `ssl = on`, with certificates generated per test (rcgen). The hot path over TLS to both
//! (verify-full, client certificates), and each failure case with its message: wrong CA, wrong
//! host name, expired certificate, plain client against a TLS-only server, TLS client against a
//! plain server; at start, in `/readyz`, and without a retry storm in the logs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_testkit::tls::{start_postgres_tls, OwnTlsRedis, RedisTls, TestCerts};
use strata_testkit::{free_port, OwnPostgres, OwnRedis};

/// A folder with `config.toml` and `schemas/metrics.toml`, and the `strata` processes run on it.
struct Setup {
    /// Holds the config, schemas, lake and logs.
    dir: tempfile::TempDir,
}

/// A `strata` child killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Setup {
    /// `redis` is the whole `[redis]` section's body, `pg_url` the `[postgres] url`.
    fn new(redis: &str, pg_url: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("schemas")).unwrap();
        let schema: String = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/metrics.toml"),
        )
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("archive_after") && !l.starts_with("drop_after_archive"))
        .map(|l| format!("{l}\n"))
        .collect();
        std::fs::write(dir.path().join("schemas/metrics.toml"), schema).unwrap();
        let config = format!(
            "[redis]\n{redis}\n[postgres]\nurl = \"{pg_url}\"\n[lake]\npath = \"{}\"\n\
             [streams]\nblock_ms = 200\nmax_backoff_ms = 2000\n",
            dir.path().join("lake").display()
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Setup { dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .args(args)
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .env_remove("PGSSLCERT")
            .env_remove("PGSSLKEY");
        c
    }

    /// Runs `strata <args>` to its end.
    fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run strata")
    }

    /// Starts `strata run` with the admin endpoint on `admin`, logging to `log`.
    fn serve(&self, admin: u16, log: &str) -> Proc {
        let log = std::fs::File::create(self.dir.path().join(log)).unwrap();
        let child = self
            .command(&["--admin-listen", &format!("127.0.0.1:{admin}"), "run"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn strata run");
        Proc(child)
    }

    fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default()
    }
}

fn redis_section(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut s = format!("url = \"{url}\"\ntls_ca_file = \"{}\"\n", ca.display());
    if let Some((cert, key)) = client {
        s.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    s
}

fn verify_full_url(port: u16, db: &str, certs: &TestCerts, ca: &Path) -> String {
    format!(
        "postgres://postgres@localhost:{port}/{db}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    )
}

const CERT_HBA: &str = "hostssl all all 127.0.0.1/32 cert\nhostssl all all ::1/128 cert";

/// `GET path` on the admin endpoint: status line and body (empty while it does not answer).
fn http_get(port: u16, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Polls `/readyz` until `pred` holds (or 20 s pass); returns the last answer.
fn readyz_until(port: u16, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = http_get(port, "/readyz");
        if pred(&answer) || Instant::now() > deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn rows(url: &str) -> i64 {
    let target = strata_pipeline::db::postgres_config(url).unwrap();
    let client = strata_pipeline::db::connect_postgres(&target, Default::default())
        .await
        .unwrap();
    client
        .query_one("SELECT count(*) FROM metrics", &[])
        .await
        .unwrap()
        .get(0)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_path_runs_over_tls_with_verify_full_and_client_certificates_to_both() {
    let certs = TestCerts::generate();
    let redis = OwnTlsRedis::start(&RedisTls {
        cert: &certs.server_cert,
        key: &certs.server_key,
        ca: &certs.ca,
        auth_clients: true,
        also_plain: false,
    });
    let pg = start_postgres_tls(&certs, &certs.server_cert, &certs.server_key, CERT_HBA);
    let url = verify_full_url(pg.port, "strata", &certs, &certs.ca);
    let setup = Setup::new(
        &redis_section(
            &redis.url(),
            &certs.ca,
            Some((&certs.client_cert, &certs.client_key)),
        ),
        &url,
    );
    let out = setup.run(&["migrate"]);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let admin = free_port();
    let _run = setup.serve(admin, "run.log");
    let out = setup.run(&["produce", "--table", "metrics", "--count", "2000"]);
    assert!(out.status.success(), "produce: {}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&url).await < 2000 {
        assert!(
            Instant::now() < deadline,
            "rows did not land: {}",
            setup.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rows(&url).await, 2000);
    let ready = readyz_until(admin, |a| a.contains("200 OK"));
    assert!(ready.contains("ready"), "{ready}");
    let status = setup.run(&["status"]);
    assert!(status.status.success(), "status: {}", stderr(&status));

    // Without the client certificate both servers refuse, and say so.
    let no_cert = Setup::new(
        &redis_section(&redis.url(), &certs.ca, None),
        &format!(
            "postgres://postgres@localhost:{}/strata?sslmode=verify-full&sslrootcert={}",
            pg.port,
            certs.ca.display()
        ),
    );
    let out = no_cert.run(&["migrate"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains(&format!("localhost:{}", pg.port)), "{err}");
    assert!(err.contains("certificate"), "{err}");
    let out = no_cert.run(&["status"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(
        text.contains(&format!("localhost:{}", redis.port)),
        "{text}"
    );
}

/// `strata migrate` with `url` fails; returns its stderr.
fn migrate_fails(url: &str) -> String {
    let setup = Setup::new("url = \"redis://127.0.0.1:1\"", url);
    let out = setup.run(&["migrate"]);
    assert!(!out.status.success(), "migrate succeeded with {url}");
    stderr(&out)
}

#[test]
fn postgres_failures_name_the_server_and_the_cause() {
    let certs = TestCerts::generate();
    let hba = "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust";
    let pg = start_postgres_tls(&certs, &certs.server_cert, &certs.server_key, hba);
    let server = format!("localhost:{}", pg.port);

    // Wrong CA.
    let err = migrate_fails(&verify_full_url(pg.port, "strata", &certs, &certs.other_ca));
    assert!(err.contains(&server), "{err}");
    assert!(err.contains("not signed by a trusted CA"), "{err}");

    // Wrong host name: the certificate names localhost only.
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/strata?sslmode=verify-full&sslrootcert={}",
        pg.port,
        certs.ca.display()
    );
    let err = migrate_fails(&url);
    assert!(err.contains(&format!("127.0.0.1:{}", pg.port)), "{err}");
    assert!(err.contains("not valid for this host name"), "{err}");
    // verify-ca checks the chain only: the same URL works with it.
    let ok = Setup::new(
        "url = \"redis://127.0.0.1:1\"",
        &url.replace("verify-full", "verify-ca"),
    )
    .run(&["migrate"]);
    assert!(ok.status.success(), "verify-ca: {}", stderr(&ok));

    // prefer and require without a root certificate: encrypted, not verified (any name, any
    // CA); require with sslrootcert acts as verify-ca, as in libpq.
    for mode in ["prefer", "require"] {
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/strata?sslmode={mode}",
            pg.port
        );
        let out = Setup::new("url = \"redis://127.0.0.1:1\"", &url).run(&["migrate"]);
        assert!(out.status.success(), "{mode}: {}", stderr(&out));
    }
    let err = migrate_fails(&format!(
        "postgres://postgres@127.0.0.1:{}/strata?sslmode=require&sslrootcert={}",
        pg.port,
        certs.other_ca.display()
    ));
    assert!(err.contains("not signed by a trusted CA"), "{err}");

    // A plain client against a server that has only hostssl rules.
    let err = migrate_fails(&format!(
        "postgres://postgres@127.0.0.1:{}/strata?sslmode=disable",
        pg.port
    ));
    assert!(err.contains(&format!("127.0.0.1:{}", pg.port)), "{err}");
    assert!(err.contains("refused a connection without TLS"), "{err}");
    // The key=value form and PGSSLMODE reach the same code.
    let setup = Setup::new(
        "url = \"redis://127.0.0.1:1\"",
        &format!(
            "host=localhost port={} user=postgres dbname=strata",
            pg.port
        ),
    );
    let out = setup
        .command(&["migrate"])
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", &certs.ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "PGSSLMODE: {}", stderr(&out));

    // An expired server certificate.
    let expired = start_postgres_tls(&certs, &certs.expired_cert, &certs.expired_key, hba);
    let err = migrate_fails(&verify_full_url(expired.port, "strata", &certs, &certs.ca));
    assert!(
        err.contains(&format!("localhost:{}", expired.port)),
        "{err}"
    );
    assert!(err.contains("expired"), "{err}");

    // While running: /readyz and the log say the same, calmly.
    let good = Setup::new(
        "url = \"redis://127.0.0.1:1\"",
        &verify_full_url(pg.port, "strata", &certs, &certs.ca),
    );
    let out = good.run(&["migrate"]);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let redis = OwnRedis::start();
    let wrong_ca = Setup::new(
        &format!("url = \"{}\"", redis.url()),
        &verify_full_url(pg.port, "strata", &certs, &certs.other_ca),
    );
    reported_while_running(
        &wrong_ca,
        "postgres wrong CA",
        &server,
        "not signed by a trusted CA",
    );

    // A TLS client against a server with ssl = off.
    let plain = OwnPostgres::start();
    let err = migrate_fails(&format!(
        "postgres://postgres@127.0.0.1:{}/strata?sslmode=require",
        plain.port
    ));
    assert!(err.contains(&format!("127.0.0.1:{}", plain.port)), "{err}");
    assert!(err.contains("does not speak TLS"), "{err}");
}

/// Runs `strata run` on `redis_cfg` (and a working plain PostgreSQL) for a few seconds: the
/// start log and `/readyz` must hold `expect`, and the log stays calm.
fn redis_failure(name: &str, redis_cfg: &str, server: &str, expect: &str) {
    let pg = OwnPostgres::start();
    let setup = Setup::new(redis_cfg, &pg.url("strata"));
    let out = setup.run(&["migrate"]);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    reported_while_running(&setup, name, server, expect);
}

/// `strata run` on `setup`: `/readyz` and the log name `server` and `expect`, and the log stays
/// calm for 4 s.
fn reported_while_running(setup: &Setup, name: &str, server: &str, expect: &str) {
    let admin = free_port();
    let _run = setup.serve(admin, "run.log");
    let ready = readyz_until(admin, |a| a.contains(expect));
    assert!(ready.contains("503"), "{name}: {ready}");
    assert!(ready.contains(server), "{name}: {ready}");
    assert!(ready.contains(expect), "{name}: {ready}");
    let before = setup.log("run.log").lines().count();
    std::thread::sleep(Duration::from_secs(4));
    let log = setup.log("run.log");
    let lines = log.lines().count();
    assert!(
        log.contains(server) && log.contains(expect),
        "{name}: {log}"
    );
    // Backoff: a handful of retries in 4 s (loops × a few), not hundreds.
    assert!(
        lines - before < 60,
        "{name}: retry storm, {} lines in 4 s:\n{log}",
        lines - before
    );
}

#[test]
fn redis_failures_name_the_server_and_the_cause_at_start_and_in_readyz() {
    let certs = TestCerts::generate();
    let tls = OwnTlsRedis::start(&RedisTls {
        cert: &certs.server_cert,
        key: &certs.server_key,
        ca: &certs.ca,
        auth_clients: false,
        also_plain: false,
    });
    let server = format!("localhost:{}", tls.port);
    redis_failure(
        "wrong CA",
        &redis_section(&tls.url(), &certs.other_ca, None),
        &server,
        "not signed by a trusted CA",
    );
    redis_failure(
        "wrong host name",
        &redis_section(&format!("rediss://127.0.0.1:{}", tls.port), &certs.ca, None),
        &format!("127.0.0.1:{}", tls.port),
        "not valid for this host name",
    );
    redis_failure(
        "plain client, TLS server",
        &format!("url = \"redis://localhost:{}\"", tls.port),
        &server,
        "may require TLS",
    );
    let expired = OwnTlsRedis::start(&RedisTls {
        cert: &certs.expired_cert,
        key: &certs.expired_key,
        ca: &certs.ca,
        auth_clients: false,
        also_plain: false,
    });
    redis_failure(
        "expired",
        &redis_section(&expired.url(), &certs.ca, None),
        &format!("localhost:{}", expired.port),
        "expired",
    );
    let plain = OwnRedis::start();
    redis_failure(
        "TLS client, plain server",
        &redis_section(
            &format!("rediss://localhost:{}", plain.port),
            &certs.ca,
            None,
        ),
        &format!("localhost:{}", plain.port),
        "may not speak TLS",
    );
}

#[test]
fn skipping_verification_is_explicit_and_warned() {
    let certs = TestCerts::generate();
    let tls = OwnTlsRedis::start(&RedisTls {
        cert: &certs.server_cert,
        key: &certs.server_key,
        ca: &certs.ca,
        auth_clients: false,
        also_plain: false,
    });
    let setup = Setup::new(
        &format!(
            "url = \"rediss://127.0.0.1:{}\"\ntls_insecure_skip_verify = true\n",
            tls.port
        ),
        "postgres://postgres@127.0.0.1:1/strata",
    );
    let out = setup.run(&["status"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("tls_insecure_skip_verify"), "{text}");
    assert!(!text.contains("not valid for this host name"), "{text}");
    let _: PathBuf = certs.dir().to_path_buf();
}
