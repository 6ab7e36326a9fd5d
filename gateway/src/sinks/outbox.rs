//! One delivery worker per sink, draining the outbox.
//!
//! Several replicas may drain one outbox. A worker claims a round of items under a lease
//! (a fencing token per claim), renews the lease of what it has not finished every third
//! of the lease while it delivers, and marks each item with its claim's token: once a
//! lease ran out and another replica claimed the item, this worker can no longer mark it
//! (the store says so, it is counted as `lease_lost`, and the holder delivers it; the
//! receiver sees the same idempotency key twice at worst).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use iotgw_registry::{OutboxLease, Store};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{DeliveryError, Sink};
use crate::internal_events::{DeliveryFailed, DeliveryFailure, InternalEvent};
use crate::metrics::Metrics;

/// Items claimed per round.
const BATCH: u32 = 64;
/// Poll interval when nothing wakes the worker (other replicas may have written).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Who claims outbox items and for how long (`[replica]` in the config).
#[derive(Clone, Debug)]
pub struct Leasing {
    /// The replica id, stored with each lease for operators.
    pub holder: String,
    /// How long a claim lasts unless renewed.
    pub lease: Duration,
}

/// The running workers, one per sink; a configuration reload starts and stops single
/// ones.
#[derive(Debug)]
pub struct OutboxWorkers {
    ctx: WorkerContext,
    running: std::collections::BTreeMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// What every worker shares.
#[derive(Clone)]
struct WorkerContext {
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    drain: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    leasing: Leasing,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("leasing", &self.leasing)
            .finish()
    }
}

impl OutboxWorkers {
    /// Starts the worker of `sink`, stopping one of the same name first (a changed sink).
    pub fn start(&mut self, sink: Arc<dyn Sink>) {
        let name = sink.name().to_owned();
        self.stop(&name);
        let worker = Worker {
            store: self.ctx.store.clone(),
            sink,
            metrics: self.ctx.metrics.clone(),
            leasing: self.ctx.leasing.clone(),
        };
        let stop = self.ctx.shutdown.child_token();
        let (wake, drain, token) = (self.ctx.wake.clone(), self.ctx.drain.clone(), stop.clone());
        let task = tokio::spawn(async move { worker.run(wake, token, drain).await });
        self.running.insert(name, (stop, task));
    }

    /// Stops the worker of sink `name` after the round it is delivering (a removed sink:
    /// its undelivered items stay in the outbox, delivered if it comes back).
    pub fn stop(&mut self, name: &str) {
        if let Some((stop, _task)) = self.running.remove(name) {
            stop.cancel();
        }
    }

    /// No workers, the same context (what is left behind when the workers are taken to be
    /// joined).
    pub fn empty_like(other: &Self) -> Self {
        Self {
            ctx: other.ctx.clone(),
            running: std::collections::BTreeMap::new(),
        }
    }

    /// The sinks with a worker.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }

    /// Waits for every worker to stop.
    pub async fn join(self) {
        for (_, (_, task)) in self.running {
            let _ = task.await;
        }
    }
}

/// The delay before attempt `attempts + 1`: doubling from `min`, capped at `max`, with
/// +-20 % jitter so many items do not retry in lock-step; or, when the receiver announced
/// one, exactly its `Retry-After` (at least `min`). A throttled sink's items are then all
/// due again at the moment it named, and are claimed in outbox order: a record's lookups
/// (a command's alert, a history row's device) are written before the records naming them,
/// which a backoff grown per item would reorder.
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
    announced.map_or(d, |a| a.max(min))
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
    leasing: Leasing,
) -> OutboxWorkers {
    let mut workers = OutboxWorkers {
        ctx: WorkerContext {
            store,
            wake,
            metrics,
            shutdown,
            drain,
            leasing,
        },
        running: std::collections::BTreeMap::new(),
    };
    for sink in sinks {
        workers.start(sink);
    }
    workers
}

/// One sink's worker.
struct Worker {
    store: Arc<dyn Store>,
    sink: Arc<dyn Sink>,
    metrics: Arc<Metrics>,
    leasing: Leasing,
}

impl Worker {
    async fn run(
        self,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        drain: tokio::sync::watch::Receiver<Option<tokio::time::Instant>>,
    ) {
        let name = self.sink.name().to_string();
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
            let items = match self
                .store
                .claim_outbox(&name, &self.leasing.holder, now, self.lease_until(), BATCH)
                .await
            {
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
            self.deliver_round(&name, items).await;
        }
    }

    fn lease_until(&self) -> chrono::DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.leasing.lease).unwrap_or_default()
    }

    /// Delivers one claimed round in order, in chunks of the sink's batch size holding at
    /// most one item per record, renewing the leases of what is not finished every third
    /// of the lease, and skipping items whose lease was taken over. Once an item of a
    /// record failed, the round's later items of that record are handed back unsent, so a
    /// record's changes never overtake each other.
    async fn deliver_round(&self, name: &str, items: Vec<iotgw_registry::OutboxItem>) {
        let mut held: Vec<OutboxLease> = items.iter().map(|i| i.lease()).collect();
        let renew_every = self.leasing.lease / 3;
        let mut next_renewal = tokio::time::Instant::now() + renew_every;
        let batch = self.sink.batch_size().max(1);
        let mut failed: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut queue = items.into_iter().peekable();
        while queue.peek().is_some() {
            let mut chunk = Vec::with_capacity(batch);
            let mut records = std::collections::HashSet::new();
            while chunk.len() < batch {
                let Some(next) = queue.peek() else { break };
                if next.change_of.as_ref().is_some_and(|r| records.contains(r)) {
                    break;
                }
                let item = queue.next().expect("peeked");
                if !held.contains(&item.lease()) {
                    self.lost(name, item.id, "before delivery");
                    continue;
                }
                if let Some(record) = item.change_of.as_ref().filter(|r| failed.contains(*r)) {
                    held.retain(|l| l.id != item.id);
                    self.hand_back(name, &item, record).await;
                    continue;
                }
                if let Some(record) = &item.change_of {
                    records.insert(record.clone());
                }
                chunk.push(item);
            }
            if chunk.is_empty() {
                continue;
            }
            let results = {
                let deliver = self.sink.deliver_batch(&chunk);
                tokio::pin!(deliver);
                loop {
                    tokio::select! {
                        r = &mut deliver => break r,
                        () = tokio::time::sleep_until(next_renewal) => {
                            self.renew(name, &mut held).await;
                            next_renewal = tokio::time::Instant::now() + renew_every;
                        }
                    }
                }
            };
            for (i, item) in chunk.iter().enumerate() {
                let result = results.get(i).cloned().unwrap_or_else(|| {
                    Err(DeliveryError::Retry {
                        message: format!("sink {name} gave no result for this item"),
                        after: None,
                    })
                });
                held.retain(|l| l.id != item.id);
                if result.is_err() {
                    if let Some(record) = &item.change_of {
                        failed.insert(record.clone());
                    }
                }
                self.settle(name, item, result).await;
            }
        }
    }

    /// Hands an item back unsent, due at once: an earlier change of its record failed in
    /// this round, and the claim holds it until that one is delivered or dead-lettered. (It
    /// is recorded as a retry, so its attempts count one more.)
    async fn hand_back(&self, name: &str, item: &iotgw_registry::OutboxItem, record: &str) {
        let message = format!("held: an earlier change of {record} is waiting for its retry");
        if let Err(e) = self
            .store
            .outbox_retry(item.lease(), Utc::now(), &message)
            .await
        {
            tracing::warn!(sink = %name, item = item.id, error = %e, "handing an item back failed; its lease will run out");
        }
    }

    /// Renews `held`, keeping only the leases the store still gives this worker.
    async fn renew(&self, name: &str, held: &mut Vec<OutboxLease>) {
        match self.store.renew_outbox(held, self.lease_until()).await {
            Ok(renewed) => held.retain(|l| renewed.contains(&l.id)),
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "renewing outbox leases failed; the marks are fenced if they ran out");
            }
        }
    }

    fn lost(&self, name: &str, item: i64, when: &str) {
        self.metrics.delivery(name, "lease_lost");
        tracing::warn!(sink = %name, item, replica = %self.leasing.holder, "outbox lease taken over by another replica {when}; the holder delivers it");
    }

    /// Records the outcome of one delivery under the item's own claim.
    async fn settle(
        &self,
        name: &str,
        item: &iotgw_registry::OutboxItem,
        result: Result<(), DeliveryError>,
    ) {
        let (min, max) = self.sink.backoff();
        let marked = match result {
            Ok(()) => {
                self.metrics.delivery(name, "delivered");
                self.store.outbox_delivered(item.lease()).await.map_err(|e| {
                    tracing::error!(sink = %name, item = item.id, error = %e, "delivered but not marked; it may be delivered again (same idempotency key)");
                })
            }
            Err(DeliveryError::Retry { message, after }) => {
                let delay = backoff(item.attempts, min, max, after);
                DeliveryFailed {
                    sink: name,
                    item: item.id,
                    outcome: DeliveryFailure::Retry {
                        attempts: item.attempts + 1,
                        retry_in: delay,
                        error: &message,
                    },
                }
                .emit(&self.metrics);
                let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                self.store
                    .outbox_retry(item.lease(), next, &message)
                    .await
                    .map_err(|e| {
                        tracing::error!(sink = %name, item = item.id, error = %e, "recording the retry failed; the lease will expire and it is retried");
                    })
            }
            Err(DeliveryError::Permanent(reason)) => {
                DeliveryFailed {
                    sink: name,
                    item: item.id,
                    outcome: DeliveryFailure::Permanent { reason: &reason },
                }
                .emit(&self.metrics);
                self.store
                    .outbox_dead_letter(item.lease(), &reason)
                    .await
                    .map_err(|e| {
                        tracing::error!(sink = %name, item = item.id, error = %e, "dead-lettering failed; it will be retried");
                    })
            }
        };
        if marked == Ok(false) {
            self.lost(name, item.id, "while it was delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use iotgw_registry::{
        DeviceId, IsSimulated, NewDevice, OutboxItem, SqliteStore, Subscription, Subscriptions,
        ENTITY_DEVICE,
    };
    use std::sync::Mutex;

    /// A sink that refuses the first attempt of each item whose key is in `fail_once`, and
    /// records what it accepted, in order.
    struct FlakySink {
        batch: usize,
        fail_once: Mutex<Vec<String>>,
        accepted: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Sink for FlakySink {
        fn name(&self) -> &str {
            "s"
        }
        fn backoff(&self) -> (Duration, Duration) {
            (Duration::from_millis(100), Duration::from_millis(100))
        }
        fn batch_size(&self) -> usize {
            self.batch
        }
        async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
            let mut fail = self.fail_once.lock().expect("lock");
            if let Some(i) = fail.iter().position(|k| *k == item.idempotency_key) {
                fail.remove(i);
                return Err(DeliveryError::Retry {
                    message: "refused once".into(),
                    after: None,
                });
            }
            self.accepted
                .lock()
                .expect("lock")
                .push(item.idempotency_key.clone());
            Ok(())
        }
    }

    /// Two devices, each registered (versions 1 and 2) and unregistered (3), queued for a
    /// sink taking devices.
    async fn store_with_two_records() -> Arc<dyn Store> {
        let store = SqliteStore::memory().await.expect("store");
        let mut subs = Subscriptions::default();
        subs.insert(
            "s",
            Subscription {
                entities: vec![ENTITY_DEVICE.into()],
                alert_changes: false,
                coalesce_connection: chrono::Duration::zero(),
            },
        );
        store.set_subscriptions(subs);
        for id in ["a", "b"] {
            let device_id = DeviceId::parse(id).expect("id");
            store
                .begin_registration(&NewDevice {
                    name: id.into(),
                    device_id: device_id.clone(),
                    provider_instance: "local".into(),
                    category: None,
                    account: None,
                    settings: None,
                    tags: Default::default(),
                    is_simulated: IsSimulated::No,
                })
                .await
                .expect("begin");
            store
                .finish_registration(&device_id, Ok(None))
                .await
                .expect("finish");
            store
                .mark_unregistered(&device_id, None)
                .await
                .expect("unregister");
        }
        Arc::new(store)
    }

    /// Runs one worker on `sink` until it accepted `n` items (or 10 s passed).
    async fn run_until(store: Arc<dyn Store>, sink: Arc<FlakySink>, n: usize) -> Vec<String> {
        let shutdown = CancellationToken::new();
        let (_drain_tx, drain) = tokio::sync::watch::channel(None);
        let workers = spawn_workers(
            store,
            vec![sink.clone() as Arc<dyn Sink>],
            Arc::new(Notify::new()),
            Arc::new(Metrics::new()),
            shutdown.clone(),
            drain,
            Leasing {
                holder: "test".into(),
                lease: Duration::from_secs(30),
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sink.accepted.lock().expect("lock").len() < n
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        workers.join().await;
        let accepted = sink.accepted.lock().expect("lock").clone();
        accepted
    }

    #[tokio::test]
    async fn a_records_later_changes_wait_for_its_earlier_one_that_failed_and_others_go_on() {
        for batch in [1, 64] {
            let store = store_with_two_records().await;
            let sink = Arc::new(FlakySink {
                batch,
                fail_once: Mutex::new(vec!["msdyn_iotdevice:a:1".into()]),
                accepted: Mutex::new(Vec::new()),
            });
            let accepted = run_until(store, sink, 6).await;
            assert_eq!(accepted.len(), 6, "batch {batch}: {accepted:?}");
            let of = |dev: &str| -> Vec<String> {
                accepted
                    .iter()
                    .filter(|k| k.starts_with(&format!("msdyn_iotdevice:{dev}:")))
                    .cloned()
                    .collect()
            };
            assert_eq!(
                of("a"),
                [
                    "msdyn_iotdevice:a:1",
                    "msdyn_iotdevice:a:2",
                    "msdyn_iotdevice:a:3"
                ],
                "batch {batch}: a's versions in order after its first one failed"
            );
            assert_eq!(
                of("b"),
                [
                    "msdyn_iotdevice:b:1",
                    "msdyn_iotdevice:b:2",
                    "msdyn_iotdevice:b:3"
                ]
            );
            let first_a = accepted.iter().position(|k| k == "msdyn_iotdevice:a:1");
            let last_b = accepted.iter().position(|k| k == "msdyn_iotdevice:b:3");
            assert!(
                last_b < first_a,
                "batch {batch}: b was not held behind a's retry: {accepted:?}"
            );
        }
    }

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
        assert_eq!(
            backoff(6, min, max, Some(Duration::from_secs(1))),
            Duration::from_secs(1),
            "the receiver's Retry-After, not a backoff grown per item"
        );
        assert_eq!(backoff(0, min, max, Some(Duration::ZERO)), min);
    }
}
