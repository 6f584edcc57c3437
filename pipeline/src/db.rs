//! Connections to PostgreSQL and Redis built from the config.
//!
//! [`connect_postgres`] (one connection) and [`postgres_pool`] (a pool of them) are the only
//! places strata opens a PostgreSQL connection: both go through [`open_postgres`], so the TLS
//! connector (issue "Production connectivity") goes there and nowhere else.

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::RuntimeConfig;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("invalid DATABASE_URL / [postgres] url")]
    PostgresUrl(#[source] tokio_postgres::Error),
    #[error("cannot build the PostgreSQL pool")]
    Postgres(#[source] deadpool_postgres::BuildError),
    #[error("invalid REDIS_URL / [redis] url")]
    RedisUrl(#[source] redis::RedisError),
    #[error("cannot build the Redis pool")]
    Redis(#[source] deadpool_redis::BuildError),
}

/// Why [`connect_postgres`] returned no connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("invalid DATABASE_URL / [postgres] url")]
    Url(#[source] tokio_postgres::Error),
    /// The server refused or could not be reached (the SQLSTATE, if any, is in the source).
    #[error("cannot connect to PostgreSQL")]
    Postgres(#[source] tokio_postgres::Error),
    /// No connection within [`ConnectLimits::total`].
    #[error("no answer within {} s", .0.as_secs_f64())]
    TimedOut(Duration),
    /// The session setup ([`ConnectLimits::statement_timeout`]) failed.
    #[error("setting up the PostgreSQL session")]
    Setup(#[source] tokio_postgres::Error),
}

impl ConnectError {
    /// The PostgreSQL error behind this one, if any (to read its SQLSTATE).
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ConnectError::Url(e) | ConnectError::Postgres(e) | ConnectError::Setup(e) => Some(e),
            ConnectError::TimedOut(_) => None,
        }
    }
}

/// How long making one connection, and then each statement on it, may take. `None`: no limit
/// beyond the operating system's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectLimits {
    /// Per host tried: TCP connect and the startup handshake (libpq's `connect_timeout`).
    pub connect_timeout: Option<Duration>,
    /// The whole of [`connect_postgres`], every host and the session setup included.
    pub total: Option<Duration>,
    /// `SET statement_timeout` for the session.
    pub statement_timeout: Option<Duration>,
}

/// Parses `DATABASE_URL` / `[postgres] url` (a URL or a libpq key=value string).
pub fn postgres_config(url: &str) -> Result<tokio_postgres::Config, ConnectError> {
    url.parse().map_err(ConnectError::Url)
}

/// Opens one connection to `config` and spawns the task driving it. The single place a
/// PostgreSQL connection is made: [`connect_postgres`] and every pool's connections come here.
pub async fn open_postgres(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    });
    Ok((client, task))
}

/// One PostgreSQL connection to `config` within `limits` (its driving task runs until the
/// client is dropped).
pub async fn connect_postgres(
    config: &tokio_postgres::Config,
    limits: ConnectLimits,
) -> Result<tokio_postgres::Client, ConnectError> {
    let mut config = config.clone();
    if let Some(t) = limits.connect_timeout {
        config.connect_timeout(t);
    }
    let connect = async {
        let (client, _task) = open_postgres(&config)
            .await
            .map_err(ConnectError::Postgres)?;
        if let Some(t) = limits.statement_timeout {
            client
                .batch_execute(&format!("SET statement_timeout = {}", t.as_millis()))
                .await
                .map_err(ConnectError::Setup)?;
        }
        Ok(client)
    };
    match limits.total {
        Some(total) => tokio::time::timeout(total, connect)
            .await
            .map_err(|_| ConnectError::TimedOut(total))?,
        None => connect.await,
    }
}

/// The pool's way of making a connection: [`open_postgres`].
struct PoolConnect;

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let pg_config = pg_config.clone();
        Box::pin(async move { open_postgres(&pg_config).await })
    }
}

/// A PostgreSQL pool of at most `size` connections; connections open lazily (each within 10 s;
/// waiting for a free one at most 30 s).
pub fn postgres_pool(
    config: &impl RuntimeConfig,
    size: usize,
) -> Result<deadpool_postgres::Pool, PoolError> {
    let pg: tokio_postgres::Config = config
        .postgres()
        .url
        .parse()
        .map_err(PoolError::PostgresUrl)?;
    let manager = deadpool_postgres::Manager::from_connect(
        pg,
        PoolConnect,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(PoolError::Postgres)
}

/// How long a Redis reply may take. Longer than any XREADGROUP BLOCK, so blocking reads are not
/// cut short; a dead server is still noticed.
pub fn redis_response_timeout(config: &impl RuntimeConfig) -> Duration {
    Duration::from_millis(config.streams().block_ms) + Duration::from_secs(10)
}

/// A Redis pool of at most `[redis] pool_size` connections.
pub fn redis_pool(config: &impl RuntimeConfig) -> Result<deadpool_redis::Pool, PoolError> {
    let conn = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(redis_response_timeout(config)));
    let manager = deadpool_redis::Manager::new_with_config(config.redis().url.as_str(), conn)
        .map_err(PoolError::RedisUrl)?;
    deadpool_redis::Pool::builder(manager)
        .max_size(config.redis().pool_size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(PoolError::Redis)
}
