//! The store's decisions, written once for every backend: a backend reads the rows a
//! decision needs, asks here, and writes the answer. It must not decide on its own.
//!
//! - connection-state ordering: [`connection_applies`];
//! - CFS debounce: the window searched ([`debounce_range`]) and the parent of a match,
//!   flat hierarchy ([`debounce_parent`]);
//! - registration transitions: [`plan_begin`] (begin), [`finish_status`] and
//!   [`finish_rounds`] (finish), [`unregister_refusal`] (unregister).
//!
//! Dedupe by token and debounce for a whole batch of alerts are decided in `crate::fold`,
//! on top of [`debounce_range`] and [`debounce_parent`]; the unique index on
//! `alerts.alert_token` in every schema keeps a token from being stored twice.
//! The conformance scenarios (`crate::conformance`) run on every backend and check that
//! the SQL around these decisions keeps them.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::model::*;
use crate::store::StoreError;
use crate::DeviceId;

/// Whether a connection state observed at `at` replaces the stored one, observed at
/// `stored`: events are ordered by event time, never by arrival; an equal time applies (the
/// later report of the same instant wins).
pub fn connection_applies(stored: Option<DateTime<Utc>>, at: DateTime<Utc>) -> bool {
    stored.is_none_or(|s| at >= s)
}

/// The alert times a debounce lookup searches for an alert at `alert_time`: at most one
/// window before (the burst it belongs to) and one window after (an alert delivered late,
/// after later alerts of its burst, folds into that burst instead of opening a new
/// primary). `None` when debounce is off (a window of zero or less). A range that would
/// leave the representable times is cut at their ends: a time from the input, however
/// absurd, never panics here.
pub fn debounce_range(
    alert_time: DateTime<Utc>,
    window: Duration,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    (window > Duration::zero()).then(|| {
        (
            alert_time
                .checked_sub_signed(window)
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
            alert_time
                .checked_add_signed(window)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        )
    })
}

/// The latest alert with the same debounce key inside the range, as a lookup found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DebounceMatch {
    /// Its id.
    pub id: Uuid,
    /// Its token.
    pub token: String,
    /// Its alert time (as stored: to the microsecond).
    pub alert_time: DateTime<Utc>,
    /// Its parent, when it is itself a child.
    pub parent: Option<Uuid>,
    /// Its parent's token, when it is a child.
    pub parent_token: Option<String>,
}

/// The parent (id and token) a new alert gets from the match: the match itself when it is
/// a primary, the match's parent when it is a child (the hierarchy stays flat: one primary,
/// its children, never grandchildren). `(None, None)` without a match: a new primary.
pub fn debounce_parent(found: Option<DebounceMatch>) -> (Option<Uuid>, Option<String>) {
    match found {
        None => (None, None),
        Some(m) => match m.parent {
            Some(parent) => (Some(parent), m.parent_token),
            None => (Some(m.id), Some(m.token)),
        },
    }
}

/// What begin does with one device of a registration batch.
#[derive(Debug)]
pub enum BeginPlan<'a> {
    /// Refused, with this result for the device.
    Refused(StoreError),
    /// A new device: insert it In Progress.
    Insert(&'a NewDevice),
    /// A stored Unregistered, Unknown or Error device: back to In Progress with the new
    /// fields.
    Restart(&'a NewDevice, Box<Device>),
}

/// Decides begin for each device, in batch order as sequential calls would see them:
/// a new device is inserted; an Unregistered, Unknown or Error one restarts; a Registered
/// or In Progress one is a conflict naming its provider instance; an id begun earlier in
/// the same batch is In Progress by then (a conflict). `stored` holds the devices of the
/// batch that the database holds (taken out as they are decided); `check` refuses a device
/// on its own (e.g. JSON that cannot be written).
pub fn plan_begin<'a>(
    devices: &[&'a NewDevice],
    mut stored: HashMap<DeviceId, Device>,
    check: impl Fn(&NewDevice) -> Result<(), StoreError>,
) -> Vec<BeginPlan<'a>> {
    let mut begun: HashMap<&DeviceId, &str> = HashMap::new();
    let mut plans = Vec::with_capacity(devices.len());
    for &device in devices {
        let plan = if let Some(instance) = begun.get(&device.device_id) {
            BeginPlan::Refused(in_progress_conflict(&device.device_id, instance))
        } else {
            match (check(device), stored.remove(&device.device_id)) {
                (Err(e), _) => BeginPlan::Refused(e),
                (Ok(()), None) => BeginPlan::Insert(device),
                (Ok(()), Some(existing)) => match existing.registration_status {
                    RegistrationStatus::Registered | RegistrationStatus::InProgress => {
                        BeginPlan::Refused(StoreError::Conflict(format!(
                            "device {} is already {} on provider instance {}: unregister it first",
                            existing.device_id,
                            existing.registration_status.label(),
                            existing.provider_instance
                        )))
                    }
                    RegistrationStatus::Unregistered
                    | RegistrationStatus::Unknown
                    | RegistrationStatus::Error => BeginPlan::Restart(device, Box::new(existing)),
                },
            }
        };
        if matches!(plan, BeginPlan::Insert(..) | BeginPlan::Restart(..)) {
            begun.insert(&device.device_id, &device.provider_instance);
        }
        plans.push(plan);
    }
    plans
}

fn in_progress_conflict(id: &DeviceId, instance: &str) -> StoreError {
    StoreError::Conflict(format!(
        "device {id} is already {} on provider instance {instance}: unregister it first",
        RegistrationStatus::InProgress.label()
    ))
}

/// The status and message a finish outcome sets: `Ok(message)` is Registered (and gets a
/// Register history row), `Err(message)` is Error with the message (no history row).
pub fn finish_status(
    outcome: &Result<Option<String>, String>,
) -> (RegistrationStatus, Option<&str>) {
    match outcome {
        Ok(message) => (RegistrationStatus::Registered, message.as_deref()),
        Err(message) => (RegistrationStatus::Error, Some(message.as_str())),
    }
}

/// The order a finishing batch is applied in: rounds of indexes with distinct ids, an id
/// repeated in the batch applied in a later round than its first occurrence (as sequential
/// calls would).
pub fn finish_rounds<T>(outcomes: &[(DeviceId, T)]) -> Vec<Vec<usize>> {
    let mut rounds = Vec::new();
    let mut pending: Vec<usize> = (0..outcomes.len()).collect();
    while !pending.is_empty() {
        let mut seen = HashSet::new();
        let (round, later): (Vec<usize>, Vec<usize>) = pending
            .into_iter()
            .partition(|&i| seen.insert(&outcomes[i].0));
        rounds.push(round);
        pending = later;
    }
    rounds
}

/// Why a stored device cannot be unregistered, if it cannot (it already is).
pub fn unregister_refusal(existing: &Device) -> Option<StoreError> {
    (existing.registration_status == RegistrationStatus::Unregistered).then(|| {
        StoreError::Conflict(format!(
            "device {} is already Unregistered (last on provider instance {}): nothing to do",
            existing.device_id, existing.provider_instance
        ))
    })
}

/// Why a stored device cannot move from `from` to `to`, if it cannot: it must be
/// Registered (or Unknown: seen in telemetry) on `from`, and `to` must be another instance.
pub fn move_refusal(existing: &Device, from: &str, to: &str) -> Option<StoreError> {
    let id = &existing.device_id;
    if !matches!(
        existing.registration_status,
        RegistrationStatus::Registered | RegistrationStatus::Unknown
    ) {
        return Some(StoreError::Conflict(format!(
            "device {id} is {}: only a Registered device can move (register it first)",
            existing.registration_status.label()
        )));
    }
    if existing.provider_instance != from {
        return Some(StoreError::Conflict(format!(
            "device {id} is on provider instance {}, not {from}: it moved meanwhile; read it again",
            existing.provider_instance
        )));
    }
    (from == to).then(|| {
        StoreError::Conflict(format!(
            "device {id} is already on provider instance {to}: nothing to move"
        ))
    })
}

/// The status reason of a command that was In Progress when its device moved.
pub fn moved_command_reason(from: &str, to: &str) -> String {
    format!(
        "the device moved from provider instance {from} to {to} before the command was confirmed; \
         it is not re-sent (the old instance may have delivered it): send it again if it is still needed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debounce_range_at_the_ends_of_time_is_cut_there_instead_of_overflowing() {
        let hour = Duration::hours(1);
        assert_eq!(
            debounce_range(DateTime::<Utc>::MAX_UTC, hour),
            Some((DateTime::<Utc>::MAX_UTC - hour, DateTime::<Utc>::MAX_UTC))
        );
        assert_eq!(
            debounce_range(DateTime::<Utc>::MIN_UTC, hour),
            Some((DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MIN_UTC + hour))
        );
        assert_eq!(debounce_range(Utc::now(), Duration::zero()), None);
    }

    #[test]
    fn debounce_keeps_the_hierarchy_flat() {
        let (p, c) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(debounce_parent(None), (None, None));
        let primary = DebounceMatch {
            id: p,
            token: "t1".into(),
            alert_time: Utc::now(),
            parent: None,
            parent_token: None,
        };
        assert_eq!(debounce_parent(Some(primary)), (Some(p), Some("t1".into())));
        let child = DebounceMatch {
            id: c,
            token: "t2".into(),
            alert_time: Utc::now(),
            parent: Some(p),
            parent_token: Some("t1".into()),
        };
        assert_eq!(debounce_parent(Some(child)), (Some(p), Some("t1".into())));
    }

    #[test]
    fn connection_state_is_ordered_by_event_time() {
        let t = Utc::now();
        assert!(connection_applies(None, t));
        assert!(connection_applies(Some(t), t));
        assert!(!connection_applies(Some(t), t - Duration::seconds(1)));
        assert!(debounce_range(t, Duration::zero()).is_none());
    }

    #[test]
    fn a_repeated_id_finishes_in_a_later_round() {
        let a = DeviceId::parse("a").expect("id");
        let b = DeviceId::parse("b").expect("id");
        let outcomes = [(a.clone(), 1), (b, 2), (a.clone(), 3), (a, 4)];
        assert_eq!(finish_rounds(&outcomes), vec![vec![0, 1], vec![2], vec![3]]);
    }
}
