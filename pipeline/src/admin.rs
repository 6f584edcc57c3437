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
    pub redis: crate::db::RedisPool,
    /// Must answer `SELECT 1`, for processes that write or read tables.
    pub postgres: Option<deadpool_postgres::Pool>,
    /// `host:port` of Redis, to name it in the answer.
    pub redis_server: String,
    /// Whether Redis is reached over TLS (`rediss://`), to explain a handshake left unanswered.
    pub redis_tls: bool,
    /// The PostgreSQL server, to name it and explain a refused connection
    /// ([`crate::db::PostgresTarget::cause_of`]).
    pub postgres_target: Option<crate::db::PostgresTarget>,
}

impl Readiness {
    /// The checks for `config`: its Redis, and its PostgreSQL when `postgres` (one pooled
    /// connection each, made as the stages make theirs).
    pub fn new(
        config: &impl crate::RuntimeConfig,
        postgres: bool,
    ) -> Result<Self, crate::db::PoolError> {
        let (postgres, postgres_target) = if postgres {
            let target = crate::db::postgres_config(&config.postgres().url)
                .map_err(crate::db::PoolError::PostgresUrl)?;
            (Some(crate::db::postgres_pool(config, 1)?), Some(target))
        } else {
            (None, None)
        };
        Ok(Self {
            redis: crate::db::redis_pool(config)?,
            postgres,
            redis_server: crate::db::redis_server(config.redis()),
            redis_tls: crate::db::redis_uses_tls(config.redis()),
            postgres_target,
        })
    }
}

/// Why Redis failed `/readyz` or the start check: the server and, for TLS, the cause.
pub fn explain_redis(server: &str, tls: bool, e: &(dyn std::error::Error + 'static)) -> String {
    let chain = crate::error_chain(e);
    match crate::tls::failure_of(e) {
        Some(f) => format!("{server}: TLS failed: {f} ({chain})"),
        None if tls && timed_out_in(e) => format!("{server}: {NO_TLS_ANSWER} ({chain})"),
        None if hang_up_in(e) => format!(
            "{server}: the server closed the connection at once (it may require TLS: use rediss://) ({chain})"
        ),
        None => format!("{server}: {chain}"),
    }
}

fn postgres_error_in<'a>(
    e: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a tokio_postgres::Error> {
    if let Some(p) = e.downcast_ref::<tokio_postgres::Error>() {
        return Some(p);
    }
    let mut cur = e.source();
    while let Some(x) = cur {
        if let Some(p) = x.downcast_ref::<tokio_postgres::Error>() {
            return Some(p);
        }
        cur = x.source();
    }
    None
}

/// What an unanswered TLS handshake suggests: a plain server waiting for a command's end.
const NO_TLS_ANSWER: &str = "no answer to the TLS handshake in time: the server may not speak TLS";

fn timed_out_in(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::tls::find_in_chain(e, &mut |e| {
        if let Some(p) = e.downcast_ref::<deadpool_redis::PoolError>() {
            return matches!(p, deadpool_redis::PoolError::Timeout(_)).then_some(true);
        }
        e.downcast_ref::<redis::RedisError>()
            .filter(|r| r.is_timeout())
            .map(|_| true)
    })
    .unwrap_or(false)
}

fn hang_up_in(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::tls::find_in_chain(e, &mut |e| {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(crate::tls::is_hang_up(io));
        }
        e.downcast_ref::<redis::RedisError>()
            .filter(|r| r.is_connection_dropped())
            .map(|_| true)
    })
    .unwrap_or(false)
}

/// Why PostgreSQL failed `/readyz` or the start check: the server and the cause.
pub async fn explain_postgres(
    target: &crate::db::PostgresTarget,
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> String {
    let chain = crate::error_chain(e);
    let server = target.server();
    if let Some(f) = crate::tls::failure_of(e) {
        return format!("{server}: TLS failed: {f} ({chain})");
    }
    match postgres_error_in(e) {
        Some(p) => match target.cause_of(p).await {
            Some(c) => format!("{server}: {c} ({chain})"),
            None => format!("{server}: {chain}"),
        },
        None => format!("{server}: {chain}"),
    }
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

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One PING over the pool.
pub async fn check_redis(pool: &crate::db::RedisPool) -> Result<(), BoxError> {
    let mut conn = pool.get().await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await?;
    Ok(())
}

/// One `SELECT 1` over the pool.
pub async fn check_postgres(pool: &deadpool_postgres::Pool) -> Result<(), BoxError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
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
    let ready = &state.ready;
    match tokio::time::timeout(Duration::from_secs(2), check_redis(&ready.redis)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!(
            "redis {}",
            explain_redis(&ready.redis_server, ready.redis_tls, &*e)
        )),
        Err(_) if ready.redis_tls => problems.push(format!(
            "redis {}: no answer within 2 s ({NO_TLS_ANSWER}?)",
            ready.redis_server
        )),
        Err(_) => problems.push(format!(
            "redis {}: no answer within 2 s",
            ready.redis_server
        )),
    }
    if let Some(pg) = &ready.postgres {
        let server = ready
            .postgres_target
            .as_ref()
            .map(|t| t.server())
            .unwrap_or_default();
        match tokio::time::timeout(Duration::from_secs(2), check_postgres(pg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let why = match &ready.postgres_target {
                    Some(t) => explain_postgres(t, &*e).await,
                    None => crate::error_chain(&*e),
                };
                problems.push(format!("postgres {why}"));
            }
            Err(_) => problems.push(format!("postgres {server}: no answer within 2 s")),
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
