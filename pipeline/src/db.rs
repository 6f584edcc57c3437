//! PostgreSQL and Redis connection pools built from the config.

use std::time::Duration;

use crate::config::Config;

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

/// A PostgreSQL pool of at most `size` connections; connections open lazily.
pub fn postgres_pool(config: &Config, size: usize) -> Result<deadpool_postgres::Pool, PoolError> {
    let pg: tokio_postgres::Config = config
        .postgres
        .url
        .parse()
        .map_err(PoolError::PostgresUrl)?;
    let manager = deadpool_postgres::Manager::from_config(
        pg,
        tokio_postgres::NoTls,
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
pub fn redis_response_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.streams.block_ms) + Duration::from_secs(10)
}

/// A Redis pool of at most `[redis] pool_size` connections.
pub fn redis_pool(config: &Config) -> Result<deadpool_redis::Pool, PoolError> {
    let conn = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(redis_response_timeout(config)));
    let manager = deadpool_redis::Manager::new_with_config(config.redis.url.as_str(), conn)
        .map_err(PoolError::RedisUrl)?;
    deadpool_redis::Pool::builder(manager)
        .max_size(config.redis.pool_size)
        .runtime(deadpool_redis::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(PoolError::Redis)
}
