//! OpenTelemetry traces cross the streams: an OTLP/HTTP receiver in the test decodes the real
//! protobuf the pipeline exports and finds ingest and batch-writer spans under the producer's
//! trace ID.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{free_port, terminate, TestEnv};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

/// (trace id hex, span name) of every span received.
type Received = Arc<Mutex<Vec<(String, String)>>>;

async fn receive(State(seen): State<Received>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
    let mut seen = seen.lock().unwrap();
    for rs in request.resource_spans {
        for ss in rs.scope_spans {
            for span in ss.spans {
                seen.push((hex::encode(&span.trace_id), span.name));
            }
        }
    }
    ""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_shows_ingest_and_copy_under_the_producers_trace_id() {
    let env = TestEnv::new("metrics", "").await;
    env.migrate().await;
    let seen = Received::default();
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut child = env
        .command()
        .args(["run", "--admin-listen", "127.0.0.1:0"])
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stderr(std::fs::File::create(env.dir.path().join("run.log")).unwrap())
        .spawn()
        .unwrap();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    env.xadd(&[
        ("source", b"traced"),
        ("metric", b"m"),
        ("value", b"1"),
        (
            "traceparent",
            format!("00-{trace_id}-00f067aa0ba902b7-01").as_bytes(),
        ),
    ])
    .await;
    for i in 0..200 {
        let v = i.to_string();
        env.xadd(&[
            ("source", b"untraced"),
            ("metric", b"m"),
            ("value", v.as_bytes()),
        ])
        .await;
    }
    env.wait_landed(201, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let names = |seen: &Received| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t == trace_id)
            .map(|(_, n)| n.clone())
            .collect()
    };
    while !(names(&seen).iter().any(|n| n == "ingest.event")
        && names(&seen).iter().any(|n| n == "batch_writer.copy"))
    {
        assert!(
            Instant::now() < deadline,
            "spans under the producer's trace: {:?}\n{}",
            names(&seen),
            env.log("run.log")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(terminate(&mut child).success(), "{}", env.log("run.log"));
    // Untraced events get no span of their own.
    let per_event = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| n == "ingest.event")
        .count();
    assert_eq!(
        per_event, 1,
        "only the traced event has an ingest.event span"
    );
}
