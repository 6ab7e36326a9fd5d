//! Typed internal events: one struct per thing that happened, whose
//! [`InternalEvent::emit`] writes the log line and bumps the metric in one call, so the
//! two cannot drift apart (Vector's `internal_events` habit, `../shared/STYLE.md`).
//!
//! Owns: the wording and fields of these log lines, and which counter each one bumps.
//! Must not touch: the store or the providers; it only reports what already happened.

use std::time::Duration;

use iotgw_registry::Alert;

use crate::metrics::Metrics;

/// Something worth both a log line and a metric.
pub trait InternalEvent {
    /// Logs the event and counts it.
    fn emit(self, metrics: &Metrics);
}

/// An alert was committed (or found to be a duplicate of one already stored).
#[derive(Debug)]
pub struct AlertCommitted<'a> {
    /// The provider instance whose event raised it.
    pub provider: &'a str,
    /// `primary`, `child` (debounced into a parent) or `duplicate`.
    pub kind: &'static str,
    /// The stored alert.
    pub alert: &'a Alert,
}

impl InternalEvent for AlertCommitted<'_> {
    fn emit(self, metrics: &Metrics) {
        let a = self.alert;
        metrics.alert(self.provider, self.kind);
        tracing::info!(device = %a.device_id, alert = %a.id, token = %a.alert_token, kind = self.kind, description = %a.description, "alert");
    }
}

/// An event was refused (and dead-lettered or ignored, then acked).
#[derive(Debug)]
pub struct EventRejected<'a> {
    /// The provider instance it came from (or `embedded_broker`).
    pub provider: &'a str,
    /// The metric's reason label, e.g. `invalid_device_id`.
    pub reason: &'a str,
    /// What exactly was wrong, for the log line only.
    pub detail: &'a str,
}

impl InternalEvent for EventRejected<'_> {
    fn emit(self, metrics: &Metrics) {
        let Self {
            provider,
            reason,
            detail,
        } = self;
        tracing::warn!(provider, reason, detail, "event refused");
        metrics.count_rejected(provider, reason);
    }
}

/// A sink delivery attempt failed.
#[derive(Debug)]
pub struct DeliveryFailed<'a> {
    /// The sink's name.
    pub sink: &'a str,
    /// The outbox item.
    pub item: i64,
    /// Whether it is retried or given up.
    pub outcome: DeliveryFailure<'a>,
}

/// What happens to an item whose delivery failed.
#[derive(Debug)]
pub enum DeliveryFailure<'a> {
    /// Retried after `retry_in`.
    Retry {
        /// Attempts so far, this one included.
        attempts: u32,
        /// When it is retried.
        retry_in: Duration,
        /// Why it failed.
        error: &'a str,
    },
    /// The sink refuses it for good: it moves to the dead letters.
    Permanent {
        /// Why the sink refused it.
        reason: &'a str,
    },
}

impl InternalEvent for DeliveryFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        let Self {
            sink,
            item,
            outcome,
        } = self;
        match outcome {
            DeliveryFailure::Retry {
                attempts,
                retry_in,
                error,
            } => {
                metrics.delivery(sink, "retry");
                let retry_in_ms = retry_in.as_millis() as u64;
                tracing::warn!(sink = %sink, item, attempts, retry_in_ms, error = %error, "delivery failed; will retry");
            }
            DeliveryFailure::Permanent { reason } => {
                metrics.delivery(sink, "dead_letter");
                metrics.dead_letter(&format!("sink:{sink}"), "rejected_by_sink");
                tracing::error!(sink = %sink, item, %reason, "the sink refuses this item for good: moved to the dead letters");
            }
        }
    }
}

impl Metrics {
    /// An event was refused (and dead-lettered or ignored, then acked): emits
    /// [`EventRejected`], its log line and its count. Kept as a method (defined here, so
    /// `metrics` does not import this module) so its callers did not have to move.
    pub fn rejected(&self, provider: &str, reason: &str, detail: &str) {
        EventRejected {
            provider,
            reason,
            detail,
        }
        .emit(self);
    }
}
