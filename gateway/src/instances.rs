//! The running provider instances: each one's receive loop (`Provider::run`) with its own
//! stop, fed into the pipeline's one event channel. Start-up starts them all; a
//! configuration reload adds one (built, given its checkpoints and ownership, started) or
//! removes one (drained, then stopped); shutdown stops them all.
//!
//! Removing an instance: the reload first swaps in a live state without it (no new device
//! is routed to it and no command goes out through it), then asks it to hand over what its
//! source already confirmed (`Provider::drain`), waits until every event it handed the
//! pipeline is committed and acknowledged (none in flight), and only then stops its loop.
//! Both waits are bounded by `shutdown.grace_secs`: an instance that keeps receiving at
//! full rate is stopped with events still in flight, which stay unacknowledged at their
//! source (redelivered if the instance comes back; the log says how many).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use iotgw_config::ProviderConfig;
use iotgw_providers::{Provider, ProviderEvent};
use iotgw_registry::Store;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::vitals::{panic_message, Vitals};

/// The first pause before a provider's receive loop is started again; it doubles on every
/// further end, up to [`RESTART_MAX`].
pub const RESTART_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between two starts of a receive loop.
pub const RESTART_MAX: Duration = Duration::from_secs(60);
/// A loop that ran this long before it ended starts the backoff over.
const RESTART_RESET_AFTER: Duration = Duration::from_secs(120);

/// The provider loops and the sending half of the pipeline's event channel.
pub struct Instances {
    /// None once closed (shutdown): the pipeline ends when the last sender is gone.
    events: std::sync::Mutex<Option<mpsc::Sender<ProviderEvent>>>,
    running: Mutex<BTreeMap<String, (CancellationToken, JoinHandle<()>)>>,
    store: Arc<dyn Store>,
    replica: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances")
            .field("replica", &self.replica)
            .finish()
    }
}

impl Instances {
    /// Feeding `events`.
    pub fn new(
        events: mpsc::Sender<ProviderEvent>,
        store: Arc<dyn Store>,
        replica: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            events: std::sync::Mutex::new(Some(events)),
            running: Mutex::new(BTreeMap::new()),
            store,
            replica,
            metrics,
        }
    }

    /// Builds instance `name` from `cfg` as this replica runs it, with its checkpoints and
    /// partition ownership in the store (not started yet).
    pub async fn build(
        &self,
        name: &str,
        cfg: &ProviderConfig,
    ) -> anyhow::Result<Arc<dyn Provider>> {
        let provider = crate::app::build_provider(name, cfg).await?;
        self.attach(name, &provider);
        Ok(provider)
    }

    /// Gives `provider` its checkpoints and partition ownership in the store.
    pub fn attach(&self, name: &str, provider: &Arc<dyn Provider>) {
        provider.set_checkpoints(Arc::new(crate::checkpoints::StoreCheckpoints::new(
            self.store.clone(),
            name,
        )));
        provider.set_ownership(
            Arc::new(crate::ownership::StoreOwnership::new(
                self.store.clone(),
                name,
            )),
            &self.replica,
        );
    }

    /// Starts `provider`'s receive loop under a supervisor that starts it again whenever
    /// it ends before it was asked to stop (see [`supervise`]); false when the instances
    /// are already closed.
    pub async fn start(
        &self,
        name: &str,
        provider: Arc<dyn Provider>,
        vitals: &Arc<Vitals>,
    ) -> bool {
        let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        else {
            return false;
        };
        let stop = CancellationToken::new();
        let task = vitals.spawn(
            format!("provider {name}"),
            Some(stop.clone()),
            supervise(
                name.to_owned(),
                provider,
                tx,
                stop.clone(),
                self.metrics.clone(),
                RESTART_FIRST,
            ),
        );
        self.running
            .lock()
            .await
            .insert(name.to_owned(), (stop, task));
        true
    }

    /// Drains instance `name` and stops it (see the module docs), within `grace`.
    pub async fn remove(&self, name: &str, provider: &Arc<dyn Provider>, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        match tokio::time::timeout_at(deadline, provider.drain()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(provider = %name, error = %e, "draining a removed instance failed")
            }
            Err(_) => {
                tracing::warn!(provider = %name, "draining a removed instance did not finish within shutdown.grace_secs")
            }
        }
        // None in flight twice in a row: what still sat in the event channel at the first
        // look has been taken in by the second.
        let mut quiet = 0;
        loop {
            let in_flight = self.metrics.in_flight_of(name);
            quiet = if in_flight == 0 { quiet + 1 } else { 0 };
            if quiet >= 2 {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(provider = %name, in_flight, "stopping a removed instance with events in flight; they stay unacknowledged at their source");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let entry = self.running.lock().await.remove(name);
        if let Some((stop, task)) = entry {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        tracing::info!(provider = %name, "provider instance removed");
    }

    /// Stops every loop (waiting until `deadline`) and closes the event channel, so the
    /// pipeline ends once it committed what it received.
    pub async fn stop_all(&self, deadline: tokio::time::Instant) {
        self.close();
        let running = std::mem::take(&mut *self.running.lock().await);
        for (stop, _) in running.values() {
            stop.cancel();
        }
        for (_, (_, task)) in running {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }

    /// Drops the channel's sender held here (no instance can be started after).
    pub fn close(&self) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// Runs `provider`'s receive loop until `stop`, starting it again after `first`, then
/// twice as long each time (at most [`RESTART_MAX`]) whenever it ends on its own: an error
/// (the broker refused the credentials, the cloud removed the subscription), a panic, or a
/// plain return. Each restart is logged with the reason and counted in
/// `iotgw_provider_restarts_total{provider,reason}`; the instance reports itself down
/// meanwhile (its health is not connected), so `/ready`, failover and commands see it.
pub async fn supervise(
    instance: String,
    provider: Arc<dyn Provider>,
    events: mpsc::Sender<ProviderEvent>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
    first: Duration,
) {
    use futures::FutureExt;
    let mut pause = first;
    loop {
        tracing::info!(provider = %instance, kind = %provider.kind(), "provider starting");
        let started = tokio::time::Instant::now();
        let ended = std::panic::AssertUnwindSafe(provider.run(events.clone(), stop.clone()))
            .catch_unwind()
            .await;
        if stop.is_cancelled() {
            return;
        }
        let (reason, why) = match ended {
            Ok(Ok(())) => ("returned", "its receive loop returned".to_owned()),
            Ok(Err(e)) => ("error", e.to_string()),
            Err(panic) => (
                "panic",
                format!("panicked: {}", panic_message(panic.as_ref())),
            ),
        };
        if started.elapsed() >= RESTART_RESET_AFTER {
            pause = first;
        }
        metrics.provider_restart(&instance, reason);
        tracing::error!(provider = %instance, error = %why, retry_in = ?pause, "provider receive loop ended; starting it again");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(RESTART_MAX);
    }
}

#[cfg(all(test, feature = "mqtt"))]
mod tests {
    use std::time::Duration;

    use iotgw_config::{MqttConfig, ProviderConfig, Secret};
    use iotgw_testkit::mosquitto::{Mosquitto, ADMIN_PASSWORD, ADMIN_USER};
    use iotgw_testkit::wait_for;

    use super::*;

    /// Runs `mosquitto_ctrl dynsec` with `args` on `broker`.
    async fn dynsec(broker: &Mosquitto, args: &str) {
        let script = format!(
            "mosquitto_ctrl -h 127.0.0.1 -u {ADMIN_USER} -P {ADMIN_PASSWORD} dynsec {args}"
        );
        let (code, out) = broker
            .container()
            .exec(vec!["sh".into(), "-c".into(), script])
            .await
            .expect("exec");
        assert_eq!(code, 0, "dynsec {args}: {out}");
    }

    #[tokio::test]
    async fn a_provider_the_broker_refuses_is_started_again_with_backoff_until_it_is_let_in() {
        iotgw_testkit::init();
        let broker = Mosquitto::shared().await.expect("mosquitto");
        let user = format!("late-{}", uuid::Uuid::new_v4().simple());
        let cfg = ProviderConfig::Mqtt(MqttConfig {
            host: broker.host().into(),
            port: broker.port(),
            client_id: user.clone(),
            username: Some(user.clone()),
            password: Some(Secret::new("late-password")),
            reconnect_max_ms: 200,
            ..MqttConfig::default()
        });
        let provider = crate::app::build_provider("edge", &cfg)
            .await
            .expect("provider");
        let metrics = Arc::new(Metrics::new());
        let (events, _rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(
            "edge".into(),
            provider.clone(),
            events,
            stop.clone(),
            metrics.clone(),
            Duration::from_millis(100),
        ));
        let restarts = |m: &Metrics| {
            m.encode()
                .lines()
                .find(|l| {
                    l.starts_with(
                        "iotgw_provider_restarts_total{provider=\"edge\",reason=\"error\"}",
                    )
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        wait_for(
            "two restarts after the broker refused the gateway",
            Duration::from_secs(20),
            || async { (restarts(&metrics) >= 2).then_some(()) },
            || metrics.encode(),
        )
        .await;
        assert!(!provider.health().connected);

        // The broker lets the user in: the next start connects, and the loop stays up.
        dynsec(broker, &format!("createClient {user} -p late-password")).await;
        dynsec(broker, &format!("addClientRole {user} admin")).await;
        wait_for(
            "the provider connected after the broker let it in",
            Duration::from_secs(30),
            || async { provider.health().connected.then_some(()) },
            || metrics.encode(),
        )
        .await;
        let settled = restarts(&metrics);
        tokio::time::sleep(Duration::from_millis(500)).await; // no restart while connected
        assert_eq!(restarts(&metrics), settled);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the supervisor ends when asked")
            .expect("joined");
        dynsec(broker, &format!("deleteClient {user}")).await;
    }
}
