//! What only operator commands ask Redis: a connection with timeouts that names the server
//! when it fails, key types, the server's clock. Stream, group and pending-entry queries are
//! in [`strata_pipeline::streams`], shared with the stages.

use std::time::Duration;

use crate::config::Config;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;

use super::{redact_url, OpsError};

/// One connection to the configured Redis, checked with PING; a failure names the server.
/// The operator commands' own Redis connection: to the one server, or with `[redis] cluster =
/// true` a cluster connection (commands routed by their key's slot).
pub enum OpsConnection {
    /// `[redis] url`.
    Single(MultiplexedConnection),
    /// The cluster of `[redis] nodes`.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for OpsConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            OpsConnection::Single(c) => c.req_packed_command(cmd),
            OpsConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            OpsConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            OpsConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            OpsConnection::Single(c) => c.get_db(),
            OpsConnection::Cluster(c) => c.get_db(),
        }
    }
}

pub async fn connect(config: &Config) -> Result<OpsConnection, OpsError> {
    let url = redact_url(config.redis.primary_url());
    let server = strata_pipeline::db::redis_server(&config.redis);
    let fail = |e: redis::RedisError| OpsError::RedisConnect {
        url: url.clone(),
        reason: strata_pipeline::admin::explain_redis(
            &server,
            strata_pipeline::db::redis_uses_tls(&config.redis),
            &e,
        ),
    };
    let config_error = |e: strata_pipeline::db::PoolError| OpsError::RedisConnect {
        url: url.clone(),
        reason: strata_pipeline::error_chain(&e),
    };
    if config.redis.cluster {
        let client =
            strata_pipeline::db::redis_cluster_client(&config.redis, Duration::from_secs(10))
                .map_err(config_error)?;
        let mut conn = OpsConnection::Cluster(client.get_async_connection().await.map_err(fail)?);
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(fail)?;
        return Ok(conn);
    }
    let client = strata_pipeline::db::redis_client(&config.redis).map_err(config_error)?;
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
    Ok(OpsConnection::Single(conn))
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

/// Which master serves each slot range (`CLUSTER SLOTS`), for `status` on a cluster.
#[derive(Debug, Clone, Default)]
pub struct SlotMap {
    /// `(first slot, last slot, "host:port")`, as the cluster reported them.
    ranges: Vec<(u16, u16, String)>,
}

/// The cluster's slot map (one `CLUSTER SLOTS`).
pub async fn slot_map<C: redis::aio::ConnectionLike>(conn: &mut C) -> Result<SlotMap, OpsError> {
    let reply: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut ranges = Vec::new();
    for range in reply {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (Some(first), Some(last), Some(redis::Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let int = |v: &redis::Value| <u16 as redis::FromRedisValue>::from_redis_value_ref(v).ok();
        let host = master
            .first()
            .and_then(|h| <String as redis::FromRedisValue>::from_redis_value_ref(h).ok());
        let port = master.get(1).and_then(int);
        if let (Some(first), Some(last), Some(host), Some(port)) =
            (int(first), int(last), host, port)
        {
            ranges.push((first, last, format!("{host}:{port}")));
        }
    }
    Ok(SlotMap { ranges })
}

/// `host:port` of the master serving `key` (`CLUSTER KEYSLOT`, then `slots`).
pub async fn node_of<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    slots: &SlotMap,
    key: &str,
) -> Result<Option<String>, OpsError> {
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await?;
    Ok(slots
        .ranges
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, node)| node.clone()))
}

impl SlotMap {
    /// One slot of each master, in the order `CLUSTER SLOTS` gave them: a route to every master.
    fn one_slot_per_master(&self) -> Vec<u16> {
        let mut seen = std::collections::BTreeSet::new();
        self.ranges
            .iter()
            .filter(|(_, _, node)| seen.insert(node.as_str()))
            .map(|(first, _, _)| *first)
            .collect()
    }
}

/// Every stream whose key matches `pattern`, on the server or, on a cluster (`slots`), on every
/// master: `SCAN … MATCH pattern TYPE stream`, whose cursor is each node's own. It walks the
/// whole keyspace, so only `status` uses it, to find streams no stage reads.
pub async fn scan_streams(
    conn: &mut OpsConnection,
    slots: Option<&SlotMap>,
    pattern: &str,
) -> Result<Vec<String>, OpsError> {
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    let routes: Vec<Option<u16>> = match slots {
        Some(s) => s.one_slot_per_master().into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut keys = Vec::new();
    for route in routes {
        let mut cursor = 0u64;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream");
            let reply = match (route, &mut *conn) {
                (Some(slot), OpsConnection::Cluster(c)) => {
                    let to = Route::new(slot, SlotAddr::Master);
                    c.route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(to)),
                    )
                    .await?
                }
                (_, conn) => cmd.query_async(conn).await?,
            };
            let (next, found): (u64, Vec<String>) =
                redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(keys)
}
