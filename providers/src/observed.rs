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
    /// The size of `reported` counted against the book's budget (0 for a note).
    reported_bytes: usize,
}

/// How far after its arrival an event's own time may be (the gateway's default
/// `pipeline.max_clock_skew_secs`); later times count as arrival plus this.
pub(crate) const MAX_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(300);

/// How many devices a [`DeviceBook`] holds; beyond it, the device seen longest ago makes
/// room (junk traffic with ever new ids cannot grow it).
pub(crate) const MAX_DEVICES: usize = 100_000;
/// The largest reported-properties document kept per device (as JSON text); a larger one
/// is replaced by a note (the registry keeps the whole document).
pub(crate) const MAX_REPORTED_BYTES: usize = 16 * 1024;
/// The reported properties of all devices together, as JSON text; beyond it, new documents
/// are replaced by the note until older ones shrink or their devices make room.
pub(crate) const REPORTED_BUDGET: usize = 64 * 1024 * 1024;

/// Per device, what the inbound streams said since the provider started. Only valid device
/// ids are kept (the id rule every provider shares), at most `max_devices` of them, and
/// reported properties within a per-device and a total size: memory stays bounded whatever
/// a broker or a cloud delivers.
#[derive(Debug)]
pub(crate) struct DeviceBook {
    inner: Mutex<Book>,
    max_devices: usize,
    max_reported: usize,
    reported_budget: usize,
}

#[derive(Debug, Default)]
struct Book {
    devices: HashMap<String, Seen>,
    /// The JSON size of every kept reported document together.
    reported_bytes: usize,
}

impl Default for DeviceBook {
    fn default() -> Self {
        Self::with_limits(MAX_DEVICES, MAX_REPORTED_BYTES, REPORTED_BUDGET)
    }
}

impl DeviceBook {
    /// A book with its own limits (tests use small ones).
    pub(crate) fn with_limits(
        max_devices: usize,
        max_reported: usize,
        reported_budget: usize,
    ) -> Self {
        Self {
            inner: Mutex::new(Book::default()),
            max_devices: max_devices.max(1),
            max_reported,
            reported_budget,
        }
    }

    /// Folds an event in: connection state ordered by event time, reported properties,
    /// last activity. `received_at` dates events that carry no time of their own
    /// (command replies). Events of an invalid device id are left out (the gateway
    /// dead-letters them).
    pub(crate) fn observe(&self, kind: &EventKind, received_at: DateTime<Utc>) {
        // A device's clock may be far ahead (or a message forged): an event time later than
        // MAX_SKEW after its arrival counts as that, so it cannot pin the state for years.
        let latest = received_at + MAX_SKEW;
        let (id, activity) = match kind {
            EventKind::Telemetry(t) => (&t.device_id, t.received_at.min(latest)),
            EventKind::Connection { device_id, at, .. }
            | EventKind::ReportedProperties { device_id, at, .. } => (device_id, (*at).min(latest)),
            EventKind::CommandReply { device_id, .. } => (device_id, received_at),
            EventKind::Unusable { .. } => return,
        };
        if iotgw_ids::DeviceId::parse(id).is_err() {
            return;
        }
        let mut book = lock(&self.inner);
        if !book.devices.contains_key(id.as_str()) && book.devices.len() >= self.max_devices {
            book.evict_oldest();
        }
        let reported = match kind {
            EventKind::ReportedProperties { properties, .. } => {
                let old = book
                    .devices
                    .get(id.as_str())
                    .map_or(0, |e| e.reported_bytes);
                let size = json_size(properties);
                let kept = size <= self.max_reported
                    && book.reported_bytes - old + size <= self.reported_budget;
                book.reported_bytes -= old;
                Some(if kept {
                    book.reported_bytes += size;
                    (properties.clone(), size)
                } else {
                    let note = serde_json::json!({
                        "iotgw_not_kept": format!(
                            "reported properties of {size} bytes: the provider keeps at most {} bytes per device and {} in all in memory; the registry keeps the whole document",
                            self.max_reported, self.reported_budget
                        )
                    });
                    (note, 0)
                })
            }
            _ => None,
        };
        let e = book.devices.entry(id.clone()).or_default();
        if let EventKind::Connection { connected, .. } = kind {
            if e.connected.is_none_or(|(_, prev)| activity >= prev) {
                e.connected = Some((*connected, activity));
            }
        }
        if let Some((doc, counted)) = reported {
            e.reported = Some(doc);
            e.reported_bytes = counted;
        }
        if e.last_activity.is_none_or(|prev| activity > prev) {
            e.last_activity = Some(activity);
        }
    }

    /// How many devices are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).devices.len()
    }

    /// What was seen of `device_id`, if anything.
    pub(crate) fn seen(&self, device_id: &str) -> Option<Seen> {
        lock(&self.inner).devices.get(device_id).cloned()
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

impl Book {
    /// Drops the device whose last activity is the oldest (one scan; only when full).
    fn evict_oldest(&mut self) {
        let oldest = self
            .devices
            .iter()
            .min_by_key(|(_, e)| e.last_activity)
            .map(|(id, _)| id.clone());
        if let Some(e) = oldest.and_then(|id| self.devices.remove(&id)) {
            self.reported_bytes -= e.reported_bytes;
        }
    }
}

/// The size of `v` as JSON text.
fn json_size(v: &serde_json::Value) -> usize {
    serde_json::to_vec(v).map_or(0, |b| b.len())
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

    #[test]
    fn junk_ids_are_not_kept_and_new_ids_beyond_the_limit_push_out_the_oldest() {
        let book = DeviceBook::with_limits(3, 1024, 1 << 20);
        for bad in ["", "has space", "a/b", &"x".repeat(101)] {
            book.observe(&telemetry(bad, t(1)), t(1));
        }
        assert_eq!(book.len(), 0, "invalid ids are never kept");
        for (i, id) in ["d1", "d2", "d3", "d4", "d5"].iter().enumerate() {
            book.observe(&telemetry(id, t(i as i64)), t(i as i64));
        }
        assert_eq!(book.len(), 3);
        assert!(book.seen("d1").is_none() && book.seen("d2").is_none());
        assert_eq!(book.state("d5").last_activity, Some(t(4)));
    }

    #[test]
    fn reported_properties_above_the_per_device_or_total_size_are_replaced_by_a_note() {
        let book = DeviceBook::with_limits(10, 100, 150);
        let reported = |id: &str, v: serde_json::Value| EventKind::ReportedProperties {
            device_id: id.into(),
            properties: v,
            at: t(1),
        };
        book.observe(
            &reported("d1", serde_json::json!({"fw": "x".repeat(80)})),
            t(1),
        );
        assert_eq!(
            book.state("d1").reported_properties,
            Some(serde_json::json!({"fw": "x".repeat(80)}))
        );
        book.observe(
            &reported("d2", serde_json::json!({"fw": "y".repeat(500)})),
            t(1),
        );
        let note = book.state("d2").reported_properties.expect("a note");
        assert!(
            note["iotgw_not_kept"]
                .as_str()
                .is_some_and(|n| n.contains("at most 100 bytes per device")),
            "{note}"
        );
        // d1 holds ~90 of the 150 bytes: another 90 does not fit, until d1 shrinks.
        book.observe(
            &reported("d3", serde_json::json!({"fw": "z".repeat(80)})),
            t(1),
        );
        assert!(book.state("d3").reported_properties.expect("doc")["iotgw_not_kept"].is_string());
        book.observe(&reported("d1", serde_json::json!({})), t(2));
        book.observe(
            &reported("d3", serde_json::json!({"fw": "z".repeat(80)})),
            t(2),
        );
        assert_eq!(
            book.state("d3").reported_properties,
            Some(serde_json::json!({"fw": "z".repeat(80)}))
        );
    }

    fn telemetry(id: &str, at: DateTime<Utc>) -> EventKind {
        EventKind::Telemetry(crate::Telemetry {
            device_id: id.into(),
            message_id: "m".into(),
            payload: bytes::Bytes::new(),
            received_at: at,
        })
    }

    #[test]
    fn a_status_dated_far_ahead_counts_as_its_arrival_plus_the_skew_and_pins_nothing() {
        let book = DeviceBook::default();
        let year_2999 = DateTime::from_timestamp(32_503_680_000, 0).expect("time");
        book.observe(&conn(true, year_2999), t(100));
        assert_eq!(
            book.seen("d1").expect("seen").connected,
            Some((true, t(100) + MAX_SKEW))
        );
        // A genuine later event (past the clamped time) still wins.
        book.observe(
            &conn(false, t(100) + MAX_SKEW + chrono::TimeDelta::seconds(1)),
            t(500),
        );
        assert_eq!(book.state("d1").connected, Some(false));
    }
}
