//! What only operator commands ask Redis: a connection with timeouts that names the server
//! when it fails, key types, the server's clock. Stream, group and pending-entry queries are
//! in [`strata_pipeline::streams`], shared with the stages.

use std::time::Duration;

use crate::config::Config;
use redis::aio::MultiplexedConnection;

use super::{redact_url, OpsError};

/// One connection to the configured Redis, checked with PING; a failure names the server.
pub async fn connect(config: &Config) -> Result<MultiplexedConnection, OpsError> {
    let url = redact_url(&config.redis.url);
    let server = strata_pipeline::db::redis_server(&config.redis);
    let fail = |e: redis::RedisError| OpsError::RedisConnect {
        url: url.clone(),
        reason: strata_pipeline::admin::explain_redis(
            &server,
            strata_pipeline::db::redis_uses_tls(&config.redis),
            &e,
        ),
    };
    let client =
        strata_pipeline::db::redis_client(&config.redis).map_err(|e| OpsError::RedisConnect {
            url: url.clone(),
            reason: strata_pipeline::error_chain(&e),
        })?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(3)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(fail)?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(fail)?;
    Ok(conn)
}

/// What `TYPE key` says: `stream`, `none` (absent), `string`, …
pub async fn key_type<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<String, OpsError> {
    Ok(redis::cmd("TYPE").arg(key).query_async(conn).await?)
}

/// Fails unless `key` is a stream or absent; true when it exists.
pub async fn stream_exists<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> Result<bool, OpsError> {
    match key_type(conn, key).await?.as_str() {
        "stream" => Ok(true),
        "none" => Ok(false),
        other => Err(OpsError::NotAStream {
            key: key.to_string(),
            kind: other.to_string(),
        }),
    }
}

/// The server's clock in milliseconds (stream IDs come from it, so ages are computed with it).
pub async fn server_time_ms<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<u64, OpsError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}
