//! Periodic upkeep of one loop, and the stage's own tick.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::observe;
use crate::streams::{self, ConsumerGroup, ReadSpan};

use super::read::InFlight;
use super::{LoopSpec, Stage, Tick};

/// Periodic upkeep of one loop: keeps the entries this consumer holds from looking idle, trims
/// the input of what every group acknowledged, forgets consumers of dead processes that own
/// nothing, and runs the stage's own [`Stage::tick`].
pub(super) async fn housekeeping<S: Stage>(
    stage: Arc<S>,
    spec: Arc<LoopSpec>,
    redis: crate::db::RedisPool,
    stop: CancellationToken,
    in_flight: InFlight,
) {
    let touch_every = Duration::from_millis((spec.streams.claim_idle_ms / 3).max(10));
    let trim_every = Duration::from_millis(spec.streams.trim_interval_ms.max(10));
    let forget_every = Duration::from_millis(spec.streams.claim_interval_ms.max(10));
    let stage_every = stage.tick_interval();
    let tick = touch_every.min(trim_every).min(forget_every).min(
        stage_every
            .unwrap_or(Duration::MAX)
            .max(Duration::from_millis(10)),
    );
    let (mut last_touch, mut last_trim, mut last_forget, mut last_stage_tick) = (
        Instant::now(),
        Instant::now(),
        Instant::now(),
        Instant::now(),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
        let Ok(mut conn) = redis.get().await else {
            continue;
        };
        if stage_every.is_some_and(|every| last_stage_tick.elapsed() >= every) {
            last_stage_tick = Instant::now();
            let ctx = Tick {
                redis: &mut conn,
                group: ConsumerGroup::new(&spec.input, spec.stage),
            };
            if let Err(e) = stage.tick(ctx).await {
                tracing::warn!(stage = spec.stage, stream = %spec.input, error = %e.reason(), "periodic work failed; trying again at the next tick");
            }
        }
        if last_touch.elapsed() >= touch_every {
            last_touch = Instant::now();
            let spans: Vec<Arc<ReadSpan>> = in_flight
                .lock()
                .expect("in-flight list")
                .iter()
                .filter_map(|w| w.upgrade())
                .collect();
            if let Err(e) = spec.consumer().touch(&mut conn, &spans).await {
                debug!(stage = spec.stage, error = %e, "touch failed");
            }
        }
        if last_trim.elapsed() >= trim_every {
            last_trim = Instant::now();
            if let Ok(groups) = streams::groups(&mut conn, &spec.input).await {
                for g in groups {
                    let (lag, pending) = observe::group_gauges(&spec.input, &g.name);
                    lag.set(g.lag.unwrap_or(0) as f64);
                    pending.set(g.pending as f64);
                }
            }
            if let Ok(n) = streams::len(&mut conn, &spec.input).await {
                observe::stream_length(&spec.input).set(n as f64);
            }
            match streams::trim_acknowledged(&mut conn, &spec.input).await {
                Ok(n) if n > 0 => {
                    debug!(stage = spec.stage, stream = %spec.input, trimmed = n, "trimmed")
                }
                Ok(_) => {}
                Err(e) => debug!(stage = spec.stage, error = %e, "trim failed"),
            }
        }
        if last_forget.elapsed() >= forget_every {
            last_forget = Instant::now();
            let group = spec.consumer().group;
            if let Ok(list) = group.consumers(&mut conn).await {
                for c in list {
                    if c.name != spec.consumer
                        && c.pending == 0
                        && c.idle_ms >= spec.streams.forget_consumer_after_ms
                    {
                        info!(stage = spec.stage, consumer = %c.name, idle_ms = c.idle_ms, "removing a gone consumer that owns nothing");
                        let _ = group.remove_consumer_if_idle(&mut conn, &c.name).await;
                    }
                }
            }
        }
    }
}
