//! Liveness and readiness. Ready means the store answers and every configured provider is
//! connected (or lost its connection less than the grace period ago) — not merely that the
//! process started.

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;

use crate::core::Core;

/// Readiness policy.
#[derive(Debug)]
pub struct Readiness {
    grace: Duration,
    ever_connected: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The readiness verdict with its reasons.
#[derive(Debug, Serialize)]
pub struct ReadyReport {
    /// Overall.
    pub ready: bool,
    /// Store reachable.
    pub store: bool,
    /// Per provider: connected (within grace).
    pub providers: std::collections::BTreeMap<String, bool>,
    /// Why not ready.
    pub reasons: Vec<String>,
}

impl Readiness {
    /// A provider may be disconnected for `grace` (after having been connected once) before
    /// the gateway reports not ready.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            ever_connected: std::sync::Mutex::default(),
        }
    }

    /// Checks the store and every provider.
    pub async fn check(&self, core: &Core) -> ReadyReport {
        let mut reasons = Vec::new();
        let store = match core.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                reasons.push(format!("store: {e}"));
                false
            }
        };
        let mut providers = std::collections::BTreeMap::new();
        for (name, p) in &core.providers {
            let h = p.health();
            core.metrics.set_provider_connected(name, h.connected);
            let down_for = (Utc::now() - h.since).to_std().unwrap_or_default();
            let mut seen = self
                .ever_connected
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if h.connected {
                seen.insert(name.clone());
            }
            let ok = h.connected || (seen.contains(name) && down_for < self.grace);
            drop(seen);
            if !ok {
                reasons.push(format!(
                    "provider {name}: not connected{}",
                    h.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                ));
            }
            providers.insert(name.clone(), ok);
        }
        ReadyReport {
            ready: reasons.is_empty(),
            store,
            providers,
            reasons,
        }
    }
}
