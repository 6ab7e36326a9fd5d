//! One delivery worker per sink, draining the outbox.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use iotgw_registry::Store;
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{DeliveryError, Sink};
use crate::internal_events::{DeliveryFailed, DeliveryFailure, InternalEvent};
use crate::metrics::Metrics;

/// How long a claimed item stays leased to this worker.
const LEASE: Duration = Duration::from_secs(30);
/// Items claimed per round.
const BATCH: u32 = 64;
/// Poll interval when nothing wakes the worker (other replicas may have written).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// The running workers.
#[derive(Debug)]
pub struct OutboxWorkers {
    tasks: JoinSet<()>,
}

impl OutboxWorkers {
    /// Waits for every worker to stop.
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The delay before attempt `attempts + 1`: doubling from `min`, capped at `max`, with
/// +-20 % jitter so many items do not retry in lock-step; never below the receiver's
/// `Retry-After`.
pub fn backoff(
    attempts: u32,
    min: Duration,
    max: Duration,
    announced: Option<Duration>,
) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(attempts.min(20)));
    let base = exp.min(max);
    let jitter = rand::thread_rng().gen_range(0.8..1.2);
    let d = base.mul_f64(jitter).min(max);
    announced.map_or(d, |a| d.max(a))
}

/// Starts one worker per sink. They run until `shutdown` fires; `drain_deadline` then
/// gives them until that moment to empty the outbox (graceful shutdown).
pub fn spawn_workers(
    store: Arc<dyn Store>,
    sinks: Vec<Arc<dyn Sink>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
) -> OutboxWorkers {
    let mut tasks = JoinSet::new();
    for sink in sinks {
        let (store, wake, metrics, shutdown, drain) = (
            store.clone(),
            wake.clone(),
            metrics.clone(),
            shutdown.clone(),
            drain.clone(),
        );
        tasks.spawn(async move { run(store, sink, wake, metrics, shutdown, drain).await });
    }
    OutboxWorkers { tasks }
}

async fn run(
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
) {
    let name = sink.name().to_string();
    let (min, max) = sink.backoff();
    loop {
        let stopping = shutdown.is_cancelled();
        if stopping {
            // Draining: keep going while items are due and the deadline allows.
            let deadline = *drain.borrow();
            if deadline.is_none_or(|d| tokio::time::Instant::now() >= d) {
                break;
            }
        }
        let now = Utc::now();
        let lease_until = now + chrono::Duration::from_std(LEASE).unwrap_or_default();
        let items = match store.claim_outbox(&name, now, lease_until, BATCH).await {
            Ok(items) => items,
            Err(e) => {
                tracing::error!(sink = %name, error = %e, "claiming outbox items failed; retrying");
                Vec::new()
            }
        };
        if items.is_empty() {
            if stopping {
                break;
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(IDLE_POLL) => {}
                () = shutdown.cancelled() => {}
            }
            continue;
        }
        for item in items {
            match sink.deliver(&item).await {
                Ok(()) => {
                    metrics.delivery(&name, "delivered");
                    if let Err(e) = store.outbox_delivered(item.id).await {
                        tracing::error!(sink = %name, item = item.id, error = %e, "delivered but not marked; it may be delivered again (same idempotency key)");
                    }
                }
                Err(DeliveryError::Retry { message, after }) => {
                    let delay = backoff(item.attempts, min, max, after);
                    DeliveryFailed {
                        sink: &name,
                        item: item.id,
                        outcome: DeliveryFailure::Retry {
                            attempts: item.attempts + 1,
                            retry_in: delay,
                            error: &message,
                        },
                    }
                    .emit(&metrics);
                    let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                    if let Err(e) = store.outbox_retry(item.id, next, &message).await {
                        tracing::error!(sink = %name, item = item.id, error = %e, "recording the retry failed; the lease will expire and it is retried");
                    }
                }
                Err(DeliveryError::Permanent(reason)) => {
                    DeliveryFailed {
                        sink: &name,
                        item: item.id,
                        outcome: DeliveryFailure::Permanent { reason: &reason },
                    }
                    .emit(&metrics);
                    if let Err(e) = store.outbox_dead_letter(item.id, &reason).await {
                        tracing::error!(sink = %name, item = item.id, error = %e, "dead-lettering failed; it will be retried");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_respects_retry_after() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let d0 = backoff(0, min, max, None);
        assert!(
            d0 >= Duration::from_millis(80) && d0 <= Duration::from_millis(120),
            "{d0:?}"
        );
        let d3 = backoff(3, min, max, None);
        assert!(
            d3 >= Duration::from_millis(640) && d3 <= Duration::from_millis(960),
            "{d3:?}"
        );
        assert!(backoff(30, min, max, None) <= max);
        assert_eq!(
            backoff(0, min, max, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
    }
}
