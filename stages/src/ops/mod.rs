//! Operator commands: `strata status`, `strata inspect`, `strata dlq`.

pub mod dlq;
pub mod inspect;
pub mod status;

/// Errors of operator commands.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("redis")]
    Redis(#[from] redis::RedisError),
    #[error("no Redis connection")]
    RedisPool(#[from] deadpool_redis::PoolError),
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no PostgreSQL connection")]
    PostgresPool(#[from] deadpool_postgres::PoolError),
    #[error("cannot write output")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}
