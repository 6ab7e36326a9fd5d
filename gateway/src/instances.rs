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

    /// Starts `provider`'s receive loop; false when the instances are already closed.
    pub async fn start(&self, name: &str, provider: Arc<dyn Provider>) -> bool {
        let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        else {
            return false;
        };
        let stop = CancellationToken::new();
        let (token, instance) = (stop.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            tracing::info!(provider = %instance, kind = %provider.kind(), "provider starting");
            if let Err(e) = provider.run(tx, token).await {
                tracing::error!(provider = %instance, error = %e, "provider stopped with an error it cannot recover from; fix the configuration and restart");
            }
        });
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
