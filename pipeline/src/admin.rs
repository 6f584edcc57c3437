//! The admin endpoint every strata process serves: `/metrics` (Prometheus text), `/healthz`
//! (alive) and `/readyz` (Redis and, where used, PostgreSQL answer, and the consumer loops run).
//!
//! It listens on loopback unless `[admin] listen` says otherwise. With `[admin] token_file`,
//! `/metrics` and `/readyz` answer 401 without `Authorization: Bearer <token>` (compared in
//! constant time); `/healthz` stays open, for liveness probes that carry no credentials. Bound
//! beyond loopback without a token, the endpoint warns at start.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AdminConfig, AdminToken};
use crate::secrets::constant_time_eq;

/// Consumer loops running in this process (incremented by the runner).
pub static RUNNING_LOOPS: AtomicUsize = AtomicUsize::new(0);

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    /// Must answer PING.
    pub redis: deadpool_redis::Pool,
    /// Must answer `SELECT 1`, for processes that write or read tables.
    pub postgres: Option<deadpool_postgres::Pool>,
}

#[derive(Clone)]
struct AppState {
    /// Renders the metrics.
    metrics: PrometheusHandle,
    /// Dependencies to check.
    ready: Arc<Readiness>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid [admin] listen address `{0}`")]
    Address(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds `[admin] listen` (if the port is taken, a free one, with a warning) and serves until
/// `shutdown`, requiring `[admin] token_file`'s token on `/metrics` and `/readyz` when set.
/// Returns the bound address; port 0 picks a free port.
pub async fn serve(
    config: &AdminConfig,
    metrics: PrometheusHandle,
    ready: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    let listen = config.listen.as_str();
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| AdminError::Address(listen.to_string()))?;
    if !addr.ip().is_loopback() && config.token.is_none() {
        warn!(%addr, "the admin endpoint listens beyond loopback without a token: anyone who reaches it reads /metrics and /readyz; set [admin] token_file");
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            warn!(%addr, "admin port in use (another strata process?): using a free port instead");
            let any = SocketAddr::new(addr.ip(), 0);
            tokio::net::TcpListener::bind(any)
                .await
                .map_err(|source| AdminError::Bind {
                    addr: any.to_string(),
                    source,
                })?
        }
        Err(source) => {
            return Err(AdminError::Bind {
                addr: addr.to_string(),
                source,
            })
        }
    };
    let bound = listener.local_addr().map_err(|source| AdminError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    info!(admin = %bound, "serving /metrics, /healthz, /readyz");
    let upkeep = metrics.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
                _ = stop.cancelled() => return,
            }
        }
    });
    let guarded = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/readyz", get(readyz))
        .route_layer(middleware::from_fn_with_state(
            Arc::new(config.token.clone()),
            require_token,
        ));
    let app = guarded
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(AppState {
            metrics,
            ready: Arc::new(ready),
        });
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            warn!(error = %e, "admin server stopped");
        }
    });
    Ok(bound)
}

/// Lets a request through when no token is configured or it carries `Bearer <token>`.
async fn require_token(
    State(token): State<Arc<Option<AdminToken>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(AdminToken(token)) = token.as_ref() else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match given {
        Some(given) if constant_time_eq(given, token.as_bytes()) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response(),
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let mut problems = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = state.ready.redis.get().await.map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut *conn)
            .await
            .map_err(|e| e.to_string())
    })
    .await
    {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => problems.push(format!("redis: {e}")),
        Err(_) => problems.push("redis: no answer within 2 s".into()),
    }
    if let Some(pg) = &state.ready.postgres {
        match tokio::time::timeout(Duration::from_secs(2), async {
            let client = pg.get().await.map_err(|e| e.to_string())?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| e.to_string())
        })
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("postgres: {e}")),
            Err(_) => problems.push("postgres: no answer within 2 s".into()),
        }
    }
    if RUNNING_LOOPS.load(Ordering::Relaxed) == 0 {
        problems.push("no consumer loop is running".into());
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
    }
}
