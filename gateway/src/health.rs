//! Liveness and readiness. Ready means the store answers and takes writes, and every
//! required provider instance is connected (or lost its connection less than the grace
//! period ago) — not merely that the process started. An instance listed in
//! `health.optional` may be down without making the gateway unready; `/ready` still names
//! it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::core::Core;

/// Whether the store takes the pipeline's writes: the outcome of its last commit. A store
/// that answers a ping but refuses writes (a full disk, a read-only volume) leaves the
/// telemetry unacknowledged at the provider; `/ready` says so and names the store's error.
#[derive(Debug, Default)]
pub struct Commits {
    /// A fast path for the hot one: nothing to clear while commits succeed.
    failing_now: AtomicBool,
    failing: Mutex<Option<(DateTime<Utc>, String)>>,
}

impl Commits {
    /// A commit went through: the store takes writes.
    pub fn succeeded(&self) {
        if self.failing_now.swap(false, Ordering::Relaxed) {
            *self
                .failing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    /// A commit failed with `error`; the first failure of a run gives the time.
    pub fn failed(&self, error: &str) {
        let mut failing = self
            .failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let since = failing.as_ref().map_or_else(Utc::now, |(since, _)| *since);
        *failing = Some((since, error.to_owned()));
        self.failing_now.store(true, Ordering::Relaxed);
    }

    /// Since when commits fail, and the last error; `None` while they succeed.
    pub fn failing(&self) -> Option<(DateTime<Utc>, String)> {
        if !self.failing_now.load(Ordering::Relaxed) {
            return None;
        }
        self.failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The `/ready` reason for commits failing since `since` with `error`, with what to do
/// when the cause is a full disk.
pub fn commits_failing_reason(since: DateTime<Utc>, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let full = [
        "disk is full",
        "no space left",
        "could not extend file",
        "disk full",
    ]
    .iter()
    .any(|s| lower.contains(s));
    format!(
        "store: commits failing since {}: {error}{}",
        since.format("%Y-%m-%dT%H:%M:%SZ"),
        if full {
            " (the disk holding the store is full: free space there; the telemetry stays \
             unacknowledged at the provider meanwhile and is committed once the store can write)"
        } else {
            " (the telemetry stays unacknowledged at the provider and is committed once the \
             store can write)"
        }
    )
}

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
    /// Optional instances that are down (they do not make the gateway unready).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

/// How long an instance has been unhealthy (not connected), `None` while it is healthy. An
/// instance without a receive connection (control plane only) is never unhealthy.
pub fn unhealthy_for(
    h: &iotgw_providers::ProviderHealth,
    now: chrono::DateTime<Utc>,
) -> Option<Duration> {
    (h.receiving && !h.connected).then(|| (now - h.since).to_std().unwrap_or_default())
}

/// Whether one provider counts as ready: connected now, or connected before and down for
/// less than `grace`. A provider that never connected is not ready, whatever the grace.
pub fn provider_ready(
    connected: bool,
    ever_connected: bool,
    down_for: Duration,
    grace: Duration,
) -> bool {
    connected || (ever_connected && down_for < grace)
}

impl Readiness {
    /// A provider may be disconnected for `grace` (after having been connected once) before
    /// the gateway reports not ready (`health.provider_grace_secs`).
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            ever_connected: std::sync::Mutex::default(),
        }
    }

    /// Checks the store and every provider.
    pub async fn check(&self, core: &Core) -> ReadyReport {
        let mut reasons = Vec::new();
        let mut store = match core.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                reasons.push(format!("store: {e}"));
                false
            }
        };
        if let Some((since, error)) = core.commits.failing() {
            reasons.push(commits_failing_reason(since, &error));
            store = false;
        }
        let mut providers = std::collections::BTreeMap::new();
        let mut degraded = Vec::new();
        let live = core.live();
        for (name, p) in &live.providers {
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
            // A control-plane-only instance (no receive connection configured) has nothing
            // to wait for: registration and commands work without it.
            let ok = !h.receiving
                || provider_ready(h.connected, seen.contains(name), down_for, self.grace);
            drop(seen);
            if !ok {
                let optional = live.config.health.optional.contains(name);
                let why = format!(
                    "provider {name}{}: not connected since {}{}",
                    if optional { " (optional)" } else { "" },
                    h.since.format("%Y-%m-%dT%H:%M:%SZ"),
                    h.last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                );
                if optional {
                    degraded.push(why);
                } else {
                    reasons.push(why);
                }
            }
            providers.insert(name.clone(), ok);
        }
        core.metrics.set_ready(reasons.is_empty());
        ReadyReport {
            ready: reasons.is_empty(),
            store,
            providers,
            reasons,
            degraded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn provider_that_never_connected_is_not_ready_even_within_the_grace() {
        assert!(!provider_ready(false, false, Duration::ZERO, GRACE));
        assert!(!provider_ready(false, false, Duration::from_secs(1), GRACE));
    }

    #[test]
    fn connected_provider_is_ready() {
        assert!(provider_ready(true, true, Duration::ZERO, GRACE));
        assert!(provider_ready(
            true,
            false,
            Duration::from_secs(999),
            Duration::ZERO
        ));
    }

    #[test]
    fn provider_that_lost_its_connection_stays_ready_until_the_grace_runs_out() {
        assert!(provider_ready(false, true, Duration::from_secs(29), GRACE));
        assert!(!provider_ready(false, true, GRACE, GRACE));
        assert!(!provider_ready(false, true, Duration::from_secs(31), GRACE));
    }

    #[test]
    fn commits_failing_are_reported_from_the_first_failure_until_one_succeeds() {
        let commits = Commits::default();
        assert!(commits.failing().is_none());
        commits.failed("database or disk is full");
        let (first, _) = commits.failing().expect("failing");
        commits.failed("(code: 13) database or disk is full");
        let (since, error) = commits.failing().expect("still failing");
        assert_eq!(since, first, "the run of failures keeps its start");
        assert_eq!(error, "(code: 13) database or disk is full");
        commits.succeeded();
        assert!(commits.failing().is_none());
    }

    #[test]
    fn a_full_disk_is_named_with_what_to_do() {
        let reason = commits_failing_reason(Utc::now(), "(code: 13) database or disk is full");
        assert!(reason.contains("database or disk is full"), "{reason}");
        assert!(reason.contains("free space"), "{reason}");
        let other = commits_failing_reason(Utc::now(), "pool timed out");
        assert!(!other.contains("free space"), "{other}");
    }

    #[test]
    fn zero_grace_turns_not_ready_as_soon_as_the_connection_drops() {
        assert!(!provider_ready(false, true, Duration::ZERO, Duration::ZERO));
    }
}
