//! Metrics as Prometheus sees them (a real `prometheus` scraping a running pipeline) and
//! readiness that follows PostgreSQL.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::OwnPostgres;
use common::{free_port, terminate, TestEnv};

const CONFIG: &str = "[streams]\nclaim_idle_ms = 2000\nclaim_interval_ms = 500\nblock_ms = 200\n";

/// A plain HTTP GET on loopback: (status, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server of the test's own, scraping `target` every second.
struct Prometheus {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: strata\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (apt install prometheus; scripts/test.sh installs it)");
        Prometheus {
            port,
            child,
            _dir: dir,
        }
    }

    /// The value of an instant query with one result, if Prometheus has it.
    fn query(&self, q: &str) -> Option<f64> {
        let (status, body) =
            http_get(self.port, &format!("/api/v1/query?query={}", url_encode(q)))?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Waits until `q` equals `want` (values are scraped every second).
    fn wait_for(&self, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(q);
            if last == Some(want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("prometheus: {q} = {last:?}, want {want}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_counters_that_match_what_was_sent() {
    let env = TestEnv::new("metrics", CONFIG).await;
    env.migrate().await;
    let admin = free_port();
    let mut run = env.spawn(
        &["run", "--admin-listen", &format!("127.0.0.1:{admin}")],
        "run.log",
    );
    for i in 0..1000 {
        let v = i.to_string();
        env.xadd(&[("source", b"s"), ("metric", b"m"), ("value", v.as_bytes())])
            .await;
    }
    for _ in 0..5 {
        env.xadd(&[
            ("source", b"s"),
            ("metric", b"m"),
            ("value", b"not-a-number"),
        ])
        .await;
    }
    env.wait_landed(1000, Duration::from_secs(30)).await;
    let prometheus = tokio::task::spawn_blocking(move || Prometheus::start(admin))
        .await
        .unwrap();
    let (t, input, rows) = (env.table.clone(), env.input(), env.rows());
    tokio::task::spawn_blocking(move || {
        prometheus.wait_for(
            &format!("strata_entries_read_total{{stage=\"ingest\",stream=\"{input}\"}}"),
            1005.0,
        );
        prometheus.wait_for(
            &format!("strata_entries_acked_total{{stage=\"ingest\",stream=\"{input}\"}}"),
            1005.0,
        );
        // Stream series carry their table and partition, for sums per table.
        prometheus.wait_for(
            &format!("sum by (table) (strata_entries_read_total{{stage=\"ingest\",table=\"{t}\",partition=\"0\"}})"),
            1005.0,
        );
        prometheus.wait_for(
            &format!("strata_dead_letters_total{{stream=\"{input}\",reason=\"invalid_input\"}}"),
            5.0,
        );
        prometheus.wait_for(
            &format!("strata_rows_written_total{{table=\"{t}\"}}"),
            1000.0,
        );
        prometheus.wait_for(
            &format!("strata_group_pending_entries{{stream=\"{rows}\",group=\"batch-writer\"}}"),
            0.0,
        );
        let frames = prometheus
            .query(&format!(
                "strata_entries_acked_total{{stage=\"batch-writer\",stream=\"{rows}\"}}"
            ))
            .unwrap();
        prometheus.wait_for(
            &format!("strata_end_to_end_latency_seconds_count{{table=\"{t}\"}}"),
            frames,
        );
        prometheus.wait_for(
            &format!("sum(strata_batch_rows_sum{{stage=\"ingest\",stream=\"{input}\"}})"),
            1005.0,
        );
    })
    .await
    .unwrap();
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

/// The sum of the `name` series in a `/metrics` body whose labels include every one of
/// `labels` (`key="value"`); None when there is none.
fn series_sum(body: &str, name: &str, labels: &[String]) -> Option<f64> {
    let values: Vec<f64> = body
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.rsplit_once("} "))
        .filter(|(set, _)| labels.iter().all(|want| set.split(',').any(|l| l == want)))
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A batch-writer batch spans the table's partitions: its size is recorded once, under
/// `stream="rows:{T:*}"` (no partition), not under one partition's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_batch_sizes_over_partitions_are_labelled_with_all_of_them() {
    let mut env = TestEnv::new("metrics", CONFIG).await;
    env.partitioned(3);
    env.migrate().await;
    let admin = free_port();
    let mut run = env.spawn(
        &["run", "--admin-listen", &format!("127.0.0.1:{admin}")],
        "run.log",
    );
    let (ok, text) = common::run_to_end(
        env.command()
            .args(["produce", "--table", &env.table, "--count", "600"]),
    );
    assert!(ok, "{text}");
    let groups = env.hot_path_groups(3);
    let mut conn = env.redis().await;
    env.wait_drained_on(&mut conn, &groups, 600, Duration::from_secs(60))
        .await;
    let (_, body) = http_get(admin, "/metrics").expect("/metrics answers");
    let all = format!(
        "stream=\"{}\"",
        strata_pipeline::streams::StreamKind::Rows.all_partitions(&env.table)
    );
    let writer = "stage=\"batch-writer\"".to_string();
    assert_eq!(
        series_sum(
            &body,
            "strata_batch_rows_sum",
            &[all.clone(), writer.clone()]
        ),
        Some(600.0),
        "{body}"
    );
    assert!(
        series_sum(
            &body,
            "strata_batch_rows_count",
            &[writer.clone(), "partition=\"0\"".into()]
        )
        .is_none(),
        "no writer batch recorded under partition 0: {body}"
    );
    // Ingest's loops are one per partition, each labelled with its own.
    for p in 0..3u32 {
        let stream = strata_pipeline::streams::StreamKind::Telemetry.partition_key(&env.table, p);
        assert!(
            series_sum(
                &body,
                "strata_batch_rows_count",
                &[format!("stream=\"{stream}\""), "stage=\"ingest\"".into()]
            )
            .is_some_and(|n| n > 0.0),
            "{stream}: {body}"
        );
    }
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_postgres_is_down_and_ready_when_it_returns() {
    let pg = OwnPostgres::start();
    let env =
        TestEnv::on_servers("metrics", CONFIG, &common::redis_url(), &pg.url("postgres")).await;
    env.migrate().await;
    let admin = free_port();
    let mut run = env.spawn(
        &["run", "--admin-listen", &format!("127.0.0.1:{admin}")],
        "run.log",
    );
    let wait_status = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = http_get(admin, "/readyz");
            if got.as_ref().map(|(s, _)| *s) == Some(want) {
                return got.unwrap().1;
            }
            assert!(Instant::now() < deadline, "/readyz: {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_status(200);
    assert_eq!(http_get(admin, "/healthz").map(|(s, _)| s), Some(200));
    pg.stop();
    let body = wait_status(503);
    assert!(body.contains("postgres"), "{body}");
    assert_eq!(
        http_get(admin, "/healthz").map(|(s, _)| s),
        Some(200),
        "alive while unready"
    );
    pg.start_again();
    wait_status(200);
    assert!(terminate(&mut run).success(), "{}", env.log("run.log"));
}
