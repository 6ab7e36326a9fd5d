//! Differential tests: IoT Hub has no emulator, so a recording fake of its HTTPS endpoint
//! ([`fake_hub`]) and of its AMQP endpoint ([`fake_amqp`]) stands in for it (both in
//! [`super::fakes`], shared with the conformance suite), and the
//! official Python service SDK (`azure-iot-hub`, driven by `testdata/sdk_driver.py`
//! through [`sdk`]) and iotgw perform the same operations against it. The tests assert
//! that method, path, query, the headers that matter and the bodies are equivalent, and
//! that our SAS tokens equal the SDK's for the same key, resource and expiry.
//!
//! The fakes answer with the documented response shapes and check every SAS token's
//! signature against the policy key, so a wrongly signed request fails like on a real hub.
//!
//! Without the SDK (`scripts/install-azure-test-deps.sh` not run) the SDK side prints
//! `SKIPPED: ...` and the iotgw-only assertions still run; under `CI=true` a missing SDK
//! fails the test.

pub use super::fakes::{fake_amqp, fake_hub, pki};
pub mod sdk;

mod c2d;
mod event_grid;
#[cfg(feature = "azure_event_hubs")]
mod event_hubs;
mod provider;
mod registry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::AzureIotHubProvider;
use crate::{Provider, ProviderError, ProviderEvent, Shutdown};

/// How long any wait in these tests may take. Generous: every wait ends as soon as its
/// condition holds, and a reconnect after dropped connections waits out the receiver's
/// backoff, which a loaded CI machine stretched past 20 s once.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Waits until `check` holds, at most [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One `run` of a provider on its own task, with the events it sends.
pub struct Run {
    rx: mpsc::Receiver<ProviderEvent>,
    stop: Shutdown,
    task: JoinHandle<Result<(), ProviderError>>,
}

impl Run {
    /// Starts `provider.run` on a task of its own.
    pub fn spawn(provider: Arc<AzureIotHubProvider>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let stop = Shutdown::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { provider.run(tx, stop).await }
        });
        Self { rx, stop, task }
    }

    /// The next event, within [`DEADLINE`].
    pub async fn next(&mut self, what: &str) -> ProviderEvent {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} within {DEADLINE:?}"))
            .unwrap_or_else(|| panic!("{what}: run ended"))
    }

    /// The next event if one comes within `wait` (`None` also when the run ended).
    pub async fn next_within(&mut self, wait: Duration) -> Option<ProviderEvent> {
        tokio::time::timeout(wait, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Ends the run the way `kill -9` ends a gateway: its task is dropped where it is,
    /// nothing is stopped, saved or released.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Shuts the run down; it must end cleanly within [`DEADLINE`].
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("run stops in time")
            .expect("joined")
            .expect("clean stop");
    }
}
