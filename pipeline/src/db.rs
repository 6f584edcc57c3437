//! Connections to PostgreSQL and Redis built from the config.
//!
//! [`connect_postgres`] (one connection) and [`postgres_pool`] (a pool of them) are the only
//! places strata opens a PostgreSQL connection: both go through [`open_postgres`], which takes
//! a [`PostgresTarget`] ([`postgres_config`]: the URL with libpq's TLS keys, see
//! [`crate::pg_tls`]) and uses its rustls connector. Redis: [`redis_client`] (`rediss://` with
//! `[redis] tls_*`), [`redis_pool`] over it, and [`redis_read_target`] for the hot loops' own
//! read connections, all from the one rustls setup of [`crate::tls`]. With `[redis] cluster =
//! true`, [`RedisPool`] holds Redis Cluster connections ([`redis_cluster_client`]) and the read
//! target follows `MOVED`/`ASK`; every key of a table carries its hash tag, so each script and
//! multi-key command stays in one slot.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::{RedisConfig, RuntimeConfig};
use crate::pg_tls::{PgTls, RustlsConnect, SslMode, SslParamError};
use crate::streams::ReadTarget;
use crate::tls::{Roots, TlsConfigError, TlsSettings, Verify};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    PostgresUrl(ConnectError),
    #[error("cannot build the PostgreSQL pool")]
    Postgres(#[source] deadpool_postgres::BuildError),
    #[error("invalid REDIS_URL / [redis] url")]
    RedisUrl(#[source] redis::RedisError),
    #[error("[redis] TLS settings")]
    RedisTls(#[source] TlsConfigError),
    #[error("cannot build the Redis pool")]
    Redis(#[source] deadpool_redis::BuildError),
    /// `[redis] cluster = true` with seeds the crate refuses (none, or different users).
    #[error("invalid [redis] nodes for the cluster")]
    RedisCluster(#[source] redis::RedisError),
}

/// Why [`connect_postgres`] returned no connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("invalid DATABASE_URL / [postgres] url")]
    Url(#[source] tokio_postgres::Error),
    /// `sslmode`, `sslrootcert`, `sslcert` or `sslkey` (URL or `PG*` variables) are unusable.
    #[error("invalid PostgreSQL TLS settings")]
    Tls(#[source] SslParamError),
    /// The server refused or could not be reached (the SQLSTATE, if any, is in the source).
    #[error("cannot connect to PostgreSQL at {server}{}", cause.map(|c| format!(": {c}")).unwrap_or_default())]
    Postgres {
        /// `host:port` (the first configured).
        server: String,
        /// What strata could tell beyond the source (TLS on one side only).
        cause: Option<PgCause>,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection within [`ConnectLimits::total`].
    #[error("no answer within {} s", .0.as_secs_f64())]
    TimedOut(Duration),
    /// The session setup ([`ConnectLimits::statement_timeout`]) failed.
    #[error("setting up the PostgreSQL session")]
    Setup(#[source] tokio_postgres::Error),
}

/// A connection failure that comes from TLS being used on one side only (handshake failures
/// themselves are [`crate::tls::TlsConnectError`]s in the source chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PgCause {
    /// A plain connection (`sslmode=disable`) refused by `pg_hba.conf` (SQLSTATE 28000): the
    /// server accepts only TLS (`hostssl`) for it.
    #[error("the server refused a connection without TLS (it may require TLS: set sslmode=verify-full or another TLS mode)")]
    ServerRequiresTls,
    /// The server answered `N` to the SSLRequest: it has `ssl = off`.
    #[error("the server does not speak TLS (it declined the SSLRequest) but sslmode requires it")]
    ServerHasNoTls,
}

impl ConnectError {
    /// The PostgreSQL error behind this one, if any (to read its SQLSTATE).
    pub fn postgres(&self) -> Option<&tokio_postgres::Error> {
        match self {
            ConnectError::Url(e)
            | ConnectError::Postgres { source: e, .. }
            | ConnectError::Setup(e) => Some(e),
            ConnectError::TimedOut(_) | ConnectError::Tls(_) => None,
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

/// A PostgreSQL server to connect to: tokio-postgres's config (derefs to it) and how TLS is
/// done ([`crate::pg_tls`]).
#[derive(Debug, Clone)]
pub struct PostgresTarget {
    /// Host, port, user, database, … (TLS keys taken out).
    config: tokio_postgres::Config,
    /// `sslmode` and the rustls config.
    pub tls: PgTls,
}

impl std::ops::Deref for PostgresTarget {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl std::ops::DerefMut for PostgresTarget {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }
}

impl PostgresTarget {
    /// `host:port` of the first host, to name the server in errors.
    pub fn server(&self) -> String {
        server_of(&self.config)
    }

    /// Explains `e` (a failed connection to this target) beyond what its chain says, when TLS
    /// was used on one side only. May probe the server once (an SSLRequest) to tell.
    pub async fn cause_of(&self, e: &tokio_postgres::Error) -> Option<PgCause> {
        if crate::tls::failure_of(e).is_some() {
            return None;
        }
        if let Some(db) = e.as_db_error() {
            let refused =
                db.code() == &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION;
            return (refused && self.tls.mode == SslMode::Disable)
                .then_some(PgCause::ServerRequiresTls);
        }
        // An unreachable server (an I/O error) is not probed.
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        if self.tls.mode < SslMode::Require || io {
            return None;
        }
        // tokio-postgres reports a declined SSLRequest only in words; ask the server directly.
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => return None,
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let probe = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            // Length 8, code 80877103 (the SSLRequest).
            s.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).await.ok()?;
            let mut answer = [0u8; 1];
            s.read_exact(&mut answer).await.ok()?;
            (answer[0] == b'N').then_some(PgCause::ServerHasNoTls)
        };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
    }
}

fn server_of(config: &tokio_postgres::Config) -> String {
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => format!("{h}:{port}"),
        Some(tokio_postgres::config::Host::Unix(p)) => format!("{}:{port}", p.display()),
        None => format!("localhost:{port}"),
    }
}

/// Parses `DATABASE_URL` / `[postgres] url` (a URL or a libpq key=value string) with its TLS
/// keys, the `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` variables filling what it
/// leaves unset ([`crate::pg_tls`]).
pub fn postgres_config(url: &str) -> Result<PostgresTarget, ConnectError> {
    postgres_config_with_env(url, |k| std::env::var(k).ok())
}

/// [`postgres_config`] with the environment given (for tests).
pub fn postgres_config_with_env(
    url: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Result<PostgresTarget, ConnectError> {
    let (rest, params) = crate::pg_tls::split_url(url);
    let params = params.with_env(var);
    let mut config: tokio_postgres::Config = rest.parse().map_err(ConnectError::Url)?;
    let tls = PgTls::from_params(&params).map_err(ConnectError::Tls)?;
    config.ssl_mode(tls.tokio_mode());
    Ok(PostgresTarget { config, tls })
}

/// Opens one connection to `target` and spawns the task driving it. The single place a
/// PostgreSQL connection is made: [`connect_postgres`] and every pool's connections come here.
pub async fn open_postgres(
    target: &PostgresTarget,
) -> Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error> {
    open_with(&target.config, &target.tls).await
}

async fn open_with(
    config: &tokio_postgres::Config,
    tls: &PgTls,
) -> Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error> {
    match &tls.config {
        None => {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            Ok((client, drive(connection)))
        }
        Some(rustls) => {
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let (client, connection) = config
                .connect(RustlsConnect::new(rustls.clone(), port))
                .await?;
            Ok((client, drive(connection)))
        }
    }
}

fn drive<F>(connection: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "postgres connection closed");
        }
    })
}

/// One PostgreSQL connection to `config` within `limits` (its driving task runs until the
/// client is dropped).
pub async fn connect_postgres(
    target: &PostgresTarget,
    limits: ConnectLimits,
) -> Result<tokio_postgres::Client, ConnectError> {
    let mut target = target.clone();
    if let Some(t) = limits.connect_timeout {
        target.connect_timeout(t);
    }
    let connect = async {
        let (client, _task) = match open_postgres(&target).await {
            Ok(c) => c,
            Err(source) => {
                return Err(ConnectError::Postgres {
                    server: target.server(),
                    cause: target.cause_of(&source).await,
                    source,
                })
            }
        };
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
struct PoolConnect(PgTls);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let pg_config = pg_config.clone();
        Box::pin(async move { open_with(&pg_config, &self.0).await })
    }
}

/// A PostgreSQL pool of at most `size` connections; connections open lazily (each within 10 s;
/// waiting for a free one at most 30 s).
pub fn postgres_pool(
    config: &impl RuntimeConfig,
    size: usize,
) -> Result<deadpool_postgres::Pool, PoolError> {
    let target = postgres_config(&config.postgres().url).map_err(PoolError::PostgresUrl)?;
    let manager = deadpool_postgres::Manager::from_connect(
        target.config,
        PoolConnect(target.tls),
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

/// The rustls config for `[redis]` when its URL is `rediss://` (`None` for plain TCP or a Unix
/// socket): `tls_ca_file` (else the OS store), `tls_cert_file` + `tls_key_file`, and no
/// verification only with `tls_insecure_skip_verify` (warned about once per process).
pub fn redis_tls(redis: &RedisConfig) -> Result<Option<Arc<rustls::ClientConfig>>, PoolError> {
    let info = redis::IntoConnectionInfo::into_connection_info(redis.primary_url())
        .map_err(PoolError::RedisUrl)?;
    if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
        let tls_keys = redis.tls_ca_file.is_some()
            || redis.tls_cert_file.is_some()
            || redis.tls_key_file.is_some()
            || redis.tls_insecure_skip_verify;
        if tls_keys {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                warn!("[redis] tls_* settings are ignored: the url is not rediss://");
            });
        }
        return Ok(None);
    }
    redis_tls_settings(redis)
        .and_then(|s| crate::tls::client_config(&s))
        .map(Some)
        .map_err(PoolError::RedisTls)
}

fn redis_tls_settings(redis: &RedisConfig) -> Result<TlsSettings, TlsConfigError> {
    let client_cert = match (&redis.tls_cert_file, &redis.tls_key_file) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        (Some(c), None) | (None, Some(c)) => return Err(TlsConfigError::HalfClientCert(c.clone())),
    };
    if redis.tls_insecure_skip_verify {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            warn!("[redis] tls_insecure_skip_verify = true: the Redis server's certificate is NOT verified (anyone on the path can impersonate it)");
        });
    }
    Ok(TlsSettings {
        roots: redis.tls_ca_file.clone().map_or(Roots::System, Roots::File),
        client_cert,
        verify: if redis.tls_insecure_skip_verify {
            Verify::None
        } else {
            Verify::Full
        },
    })
}

/// The `redis` crate's client for `[redis]`: `rediss://` with the CA and client certificate
/// of the config (same files, same checks as [`redis_tls`]; the crate builds its own rustls
/// config from them, with the process's crypto provider).
pub fn redis_client(redis: &RedisConfig) -> Result<redis::Client, PoolError> {
    let Some(_checked) = redis_tls(redis)? else {
        return redis::Client::open(redis.url.as_str()).map_err(PoolError::RedisUrl);
    };
    let mut url = redis.url.clone();
    if redis.tls_insecure_skip_verify && !url.contains('#') {
        url.push_str("#insecure");
    }
    redis::Client::build_with_tls(url.as_str(), redis_certificates(redis)?)
        .map_err(PoolError::RedisUrl)
}

/// The CA and client certificate files of `[redis]`, read for the `redis` crate.
fn redis_certificates(redis: &RedisConfig) -> Result<redis::TlsCertificates, PoolError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| {
            PoolError::RedisTls(TlsConfigError::Read {
                path: p.to_path_buf(),
                source,
            })
        })
    };
    let root_cert = redis.tls_ca_file.as_deref().map(read).transpose()?;
    let client_tls = match (&redis.tls_cert_file, &redis.tls_key_file) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read(c)?,
            client_key: read(k)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// The `redis` crate's cluster client for `[redis] cluster = true`: the seeds of
/// [`RedisConfig::seeds`] (user and password from the first), `rediss://` with the `tls_*`
/// files as [`redis_client`] does, and the pool's timeouts.
pub fn redis_cluster_client(
    redis: &RedisConfig,
    response_timeout: Duration,
) -> Result<redis::cluster::ClusterClient, PoolError> {
    let tls = redis_tls(redis)?;
    let mut builder = redis::cluster::ClusterClientBuilder::new(redis.seeds())
        .connection_timeout(Duration::from_secs(5))
        .response_timeout(response_timeout);
    if tls.is_some() {
        // Set before the certificates, which would otherwise make it `Secure`.
        if redis.tls_insecure_skip_verify {
            builder = builder.tls(redis::TlsMode::Insecure);
        }
        builder = builder.certs(redis_certificates(redis)?);
    }
    builder.build().map_err(PoolError::RedisCluster)
}

/// Where the hot loops' own read connections go: the URL and its TLS config.
/// With `cluster`, the first seed and the others, following redirects.
pub fn redis_read_target(config: &impl RuntimeConfig) -> Result<ReadTarget, PoolError> {
    let redis = config.redis();
    let tls = redis_tls(redis)?;
    if !redis.cluster {
        return Ok(ReadTarget {
            url: redis.url.clone(),
            tls,
            cluster: false,
            seeds: Vec::new(),
        });
    }
    let mut seeds = redis.seeds();
    let url = seeds.remove(0);
    Ok(ReadTarget {
        url,
        tls,
        cluster: true,
        seeds,
    })
}

/// Whether `[redis] url` is `rediss://`.
pub fn redis_uses_tls(redis: &RedisConfig) -> bool {
    redis::IntoConnectionInfo::into_connection_info(redis.primary_url())
        .is_ok_and(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }))
}

/// `host:port` of the configured Redis (the URL's, or its socket path), to name it in errors.
/// With `cluster`, the first seed's.
pub fn redis_server(redis: &RedisConfig) -> String {
    match redis::IntoConnectionInfo::into_connection_info(redis.primary_url()) {
        Ok(info) => match info.addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => {
                format!("{h}:{p}")
            }
            other => other.to_string(),
        },
        Err(_) => "?".into(),
    }
}

/// A Redis pool of at most `[redis] pool_size` connections: to one server, or with
/// `[redis] cluster = true` cluster connections (each routes a command by its key's slot to the
/// node serving it, follows `MOVED`/`ASK` and refreshes the slot map).
pub fn redis_pool(config: &impl RuntimeConfig) -> Result<RedisPool, PoolError> {
    let redis = config.redis();
    if redis.cluster {
        let client = redis_cluster_client(redis, redis_response_timeout(config))?;
        let pool = deadpool::managed::Pool::builder(ClusterManager { client })
            .max_size(redis.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(PoolError::Redis)?;
        return Ok(RedisPool::Cluster(pool));
    }
    let conn = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(redis_response_timeout(config)));
    let client = redis_client(redis)?;
    let manager =
        deadpool_redis::Manager::new_with_config(client.get_connection_info().clone(), conn)
            .map_err(PoolError::RedisUrl)?;
    deadpool_redis::Pool::builder(manager)
        .max_size(redis.pool_size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map(RedisPool::Single)
        .map_err(PoolError::Redis)
}

/// strata's Redis pool: one standalone server, or a Redis Cluster. Cheap to clone (a handle).
#[derive(Clone)]
pub enum RedisPool {
    /// `[redis] cluster = false`: connections to `[redis] url`.
    Single(deadpool_redis::Pool),
    /// `[redis] cluster = true`: cluster connections.
    Cluster(deadpool::managed::Pool<ClusterManager>),
}

impl From<deadpool_redis::Pool> for RedisPool {
    fn from(pool: deadpool_redis::Pool) -> Self {
        RedisPool::Single(pool)
    }
}

impl RedisPool {
    /// A connection, waiting for a free one (within the pool's timeouts).
    pub async fn get(&self) -> Result<RedisConnection, deadpool_redis::PoolError> {
        match self {
            RedisPool::Single(p) => p.get().await.map(RedisConnection::Single),
            RedisPool::Cluster(p) => p.get().await.map(RedisConnection::Cluster),
        }
    }

    /// Changes the most connections it holds (a process that starts more loops).
    pub fn resize(&self, max_size: usize) {
        match self {
            RedisPool::Single(p) => p.resize(max_size),
            RedisPool::Cluster(p) => p.resize(max_size),
        }
    }

    /// Whether this is a cluster pool.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisPool::Cluster(_))
    }
}

/// A connection of a [`RedisPool`]; commands go through it as `&mut conn`
/// ([`redis::aio::ConnectionLike`]). Back to the pool on drop.
pub enum RedisConnection {
    /// To the one server.
    Single(deadpool_redis::Connection),
    /// To the cluster (one connection per node inside, by slot).
    Cluster(deadpool::managed::Object<ClusterManager>),
}

impl redis::aio::ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => (**c).req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(c) => (**c).req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => (**c).get_db(),
        }
    }
}

/// `[redis] wait_replicas` and `wait_timeout_ms`: the `WAIT` strata sends after its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaWait {
    /// Replicas that must acknowledge the connection's writes.
    pub replicas: u32,
    /// How long one `WAIT` waits for them.
    pub timeout: Duration,
}

impl ReplicaWait {
    /// The `[redis]` setting; `None` when `wait_replicas = 0` (no WAIT).
    pub fn of(redis: &RedisConfig) -> Option<Self> {
        (redis.wait_replicas > 0).then(|| ReplicaWait {
            replicas: redis.wait_replicas,
            timeout: Duration::from_millis(redis.wait_timeout_ms.max(1)),
        })
    }
}

/// Makes and checks the cluster pool's connections.
pub struct ClusterManager {
    /// The client built from `[redis]` ([`redis_cluster_client`]).
    client: redis::cluster::ClusterClient,
}

impl deadpool::managed::Manager for ClusterManager {
    type Type = redis::cluster_async::ClusterConnection;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<Self::Type, redis::RedisError> {
        self.client.get_async_connection().await
    }

    async fn recycle(
        &self,
        conn: &mut Self::Type,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<redis::RedisError> {
        redis::cmd("PING").query_async::<()>(conn).await?;
        Ok(())
    }
}
