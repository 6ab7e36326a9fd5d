//! What a provider has observed, kept the same way by every provider: its own connection
//! health ([`HealthCell`]) and, per device, the latest connection state, reported
//! properties and activity its inbound streams carried ([`DeviceBook`]).
//!
//! Connection states are ordered by their event time, never by arrival: a late, older
//! "disconnected" never overrides a newer "connected" (the clouds deliver lifecycle events
//! out of order).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, Utc};

use crate::{DeviceState, EventKind, ProviderHealth};

/// Locks `m`, recovering the data if a panicking thread poisoned it (plain data that stays
/// consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A provider's connection health, as [`crate::Provider::health`] reports it.
#[derive(Debug)]
pub(crate) struct HealthCell(Mutex<ProviderHealth>);

impl HealthCell {
    /// Not connected (yet), no error, since now.
    pub(crate) fn new() -> Self {
        Self(Mutex::new(ProviderHealth {
            connected: false,
            since: Utc::now(),
            last_error: None,
            receiving: true,
        }))
    }

    /// This instance has no receive connection by configuration (control plane only);
    /// `why` says what is missing to receive.
    #[cfg_attr(not(feature = "aws_iot_core"), allow(dead_code))]
    pub(crate) fn set_control_plane_only(&self, why: String) {
        let mut h = lock(&self.0);
        h.connected = false;
        h.receiving = false;
        h.last_error = Some(why);
    }

    /// The health now.
    pub(crate) fn get(&self) -> ProviderHealth {
        lock(&self.0).clone()
    }

    /// Connected or not; `since` moves only when the state changes. Connecting clears the
    /// last error.
    pub(crate) fn set_connected(&self, connected: bool) {
        let mut h = lock(&self.0);
        if h.connected != connected {
            h.connected = connected;
            h.since = Utc::now();
        }
        if connected {
            h.last_error = None;
        }
    }

    /// Disconnected because of `error`.
    pub(crate) fn set_error(&self, error: String) {
        let mut h = lock(&self.0);
        if h.connected {
            h.connected = false;
            h.since = Utc::now();
        }
        h.last_error = Some(error);
    }

    /// Records an error without changing the connection state (a refused subscription, a
    /// failed call on a connection that still stands).
    pub(crate) fn note_error(&self, error: String) {
        lock(&self.0).last_error = Some(error);
    }
}

/// What the inbound streams said of one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Seen {
    /// The latest connection state by event time, with that time.
    pub(crate) connected: Option<(bool, DateTime<Utc>)>,
    /// The latest reported properties.
    pub(crate) reported: Option<serde_json::Value>,
    /// The latest activity (any event of the device).
    pub(crate) last_activity: Option<DateTime<Utc>>,
}

/// Per device, what the inbound streams said since the provider started.
#[derive(Debug, Default)]
pub(crate) struct DeviceBook(Mutex<HashMap<String, Seen>>);

impl DeviceBook {
    /// Folds an event in: connection state ordered by event time, reported properties,
    /// last activity. `received_at` dates events that carry no time of their own
    /// (command replies).
    pub(crate) fn observe(&self, kind: &EventKind, received_at: DateTime<Utc>) {
        let mut devices = lock(&self.0);
        let (id, activity) = match kind {
            EventKind::Telemetry(t) => (&t.device_id, t.received_at),
            EventKind::Connection { device_id, .. }
            | EventKind::ReportedProperties { device_id, .. }
                if device_id.is_empty() =>
            {
                return;
            }
            EventKind::Connection {
                device_id,
                connected,
                at,
            } => {
                let e = devices.entry(device_id.clone()).or_default();
                if e.connected.is_none_or(|(_, prev)| *at >= prev) {
                    e.connected = Some((*connected, *at));
                }
                (device_id, *at)
            }
            EventKind::CommandReply { device_id, .. } => (device_id, received_at),
            EventKind::ReportedProperties {
                device_id,
                properties,
                at,
            } => {
                devices.entry(device_id.clone()).or_default().reported = Some(properties.clone());
                (device_id, *at)
            }
        };
        if id.is_empty() {
            // A message without a device id: the gateway dead-letters it.
            return;
        }
        let e = devices.entry(id.clone()).or_default();
        if e.last_activity.is_none_or(|prev| activity > prev) {
            e.last_activity = Some(activity);
        }
    }

    /// What was seen of `device_id`, if anything.
    pub(crate) fn seen(&self, device_id: &str) -> Option<Seen> {
        lock(&self.0).get(device_id).cloned()
    }

    /// The device's state as seen (empty for a device never seen).
    pub(crate) fn state(&self, device_id: &str) -> DeviceState {
        self.seen(device_id)
            .map(|e| DeviceState {
                connected: e.connected.map(|(c, _)| c),
                reported_properties: e.reported,
                last_activity: e.last_activity,
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).expect("time")
    }

    fn conn(connected: bool, at: DateTime<Utc>) -> EventKind {
        EventKind::Connection {
            device_id: "d1".into(),
            connected,
            at,
        }
    }

    #[test]
    fn a_late_older_connection_event_does_not_override_a_newer_one() {
        let book = DeviceBook::default();
        book.observe(&conn(true, t(10)), t(20));
        book.observe(&conn(false, t(5)), t(21));
        let seen = book.seen("d1").expect("seen");
        assert_eq!(seen.connected, Some((true, t(10))));
        assert_eq!(seen.last_activity, Some(t(10)));
        book.observe(&conn(false, t(30)), t(31));
        assert_eq!(book.state("d1").connected, Some(false));
    }

    #[test]
    fn reported_properties_and_replies_count_as_activity() {
        let book = DeviceBook::default();
        book.observe(
            &EventKind::ReportedProperties {
                device_id: "d1".into(),
                properties: serde_json::json!({"fw": "1.2"}),
                at: t(3),
            },
            t(4),
        );
        book.observe(
            &EventKind::CommandReply {
                device_id: "d1".into(),
                correlation_id: "c".into(),
                ok: true,
                reason: None,
            },
            t(9),
        );
        let s = book.state("d1");
        assert_eq!(
            s.reported_properties,
            Some(serde_json::json!({"fw": "1.2"}))
        );
        assert_eq!(s.last_activity, Some(t(9)));
        assert_eq!(s.connected, None);
        assert_eq!(book.state("unknown"), DeviceState::default());
    }

    #[test]
    fn health_moves_since_only_on_a_change_and_connecting_clears_the_error() {
        let h = HealthCell::new();
        h.set_error("refused".into());
        assert!(!h.get().connected);
        assert_eq!(h.get().last_error.as_deref(), Some("refused"));
        h.set_connected(true);
        let since = h.get().since;
        h.set_connected(true);
        assert_eq!(h.get().since, since);
        assert_eq!(h.get().last_error, None);
        h.note_error("one subscription refused".into());
        assert!(h.get().connected, "note_error keeps the connection state");
        h.set_error("broker gone".into());
        assert!(!h.get().connected);
    }
}
