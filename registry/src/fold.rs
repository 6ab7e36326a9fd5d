//! Dedupe and debounce for all the alerts of a batch at once, decided in memory, exactly as
//! one-by-one commits in batch order would decide them.
//!
//! A backend answers two questions once per batch, before anything of the batch is
//! written: which of the batch's tokens are already stored, and, for each alert, the
//! latest stored alert of its debounce key inside its window ([`Probe`]). [`plan`] then
//! walks the alerts in order. What one-by-one commits would see beyond those answers is the
//! batch's own earlier alerts, and those are known here:
//! - a token stored before the batch is a duplicate ([`Fate::Stored`]); a token inserted
//!   earlier in the batch is one too ([`Fate::Repeat`]); neither writes anything, and
//!   neither can be a debounce parent (it was not inserted);
//! - the parent candidate is the latest, by alert time, of the stored match and the batch's
//!   earlier inserted alerts with the same key inside the window. On equal alert times the
//!   batch's alert wins, and among the batch's the later one wins: the store orders by
//!   `alert_time, created_at, id`, and an alert of this batch was created after every
//!   stored one and after the batch's earlier ones (ids are time-ordered UUIDv7).
//!
//! Times are compared at the microsecond, the precision both schemas store.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, DurationRound, Utc};
use uuid::Uuid;

use crate::decide::{self, DebounceMatch};
use crate::model::NewAlert;

/// One alert of the batch, in batch order, with its reading's debounce window.
pub(crate) struct Pending<'a> {
    /// The alert a rule raised.
    pub new: &'a NewAlert,
    /// The debounce window of its reading (zero or less: debounce off).
    pub window: Duration,
    /// Its token as the store keeps it (a backend may replace characters it cannot hold),
    /// so that two tokens the store holds as one are one here too.
    pub token: Cow<'a, str>,
    /// Its debounce key as the store keeps it.
    pub key: Cow<'a, str>,
}

impl<'a> Pending<'a> {
    /// `new` with the token and key as they are.
    #[cfg(test)]
    pub fn plain(new: &'a NewAlert, window: Duration) -> Self {
        Self {
            new,
            window,
            token: Cow::Borrowed(&new.alert_token),
            key: Cow::Borrowed(&new.debounce_key),
        }
    }
}

/// A debounce lookup for the store: the latest stored alert with `key` whose alert time is
/// in `from..=to` (ordered by alert time, then creation, then id).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Probe<'a> {
    /// The debounce key.
    pub key: &'a str,
    /// Earliest alert time searched (inclusive).
    pub from: DateTime<Utc>,
    /// Latest alert time searched (inclusive).
    pub to: DateTime<Utc>,
}

/// What becomes of one alert of the batch.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Fate {
    /// A new row with this id, folded into `parent` when it has one.
    Insert {
        /// The new alert's id.
        id: Uuid,
        /// Its debounce parent.
        parent: Option<Uuid>,
        /// The parent's token.
        parent_token: Option<String>,
    },
    /// The token was stored before the batch: a redelivery; nothing is written.
    Stored,
    /// The token was inserted earlier in this batch, as the alert with this id.
    Repeat(Uuid),
}

/// `t` at the precision the schemas store.
pub(crate) fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::microseconds(1)).unwrap_or(t)
}

/// The store lookup an alert needs: `None` when debounce is off for it.
pub(crate) fn probe<'p>(alert: &'p Pending<'_>) -> Option<Probe<'p>> {
    decide::debounce_range(micros(alert.new.alert_time), alert.window).map(|(from, to)| Probe {
        key: &alert.key,
        from: micros(from),
        to: micros(to),
    })
}

/// An alert of this batch that was inserted: a parent candidate for later ones.
struct Inserted<'a> {
    key: &'a str,
    time: DateTime<Utc>,
    id: Uuid,
    token: &'a str,
    parent: Option<Uuid>,
    parent_token: Option<String>,
}

/// Decides every alert in batch order. `stored` holds the batch's tokens already in the
/// store; `matches[i]` is the store's answer to alert `i`'s [`probe`] (`None` without a
/// probe or without a match).
pub(crate) fn plan(
    alerts: &[Pending<'_>],
    stored: &HashSet<&str>,
    matches: &[Option<DebounceMatch>],
) -> Vec<Fate> {
    let mut inserted: Vec<Inserted<'_>> = Vec::new();
    let mut by_token: HashMap<&str, Uuid> = HashMap::new();
    let mut fates = Vec::with_capacity(alerts.len());
    for (i, alert) in alerts.iter().enumerate() {
        let token = alert.token.as_ref();
        if stored.contains(token) {
            fates.push(Fate::Stored);
            continue;
        }
        if let Some(&first) = by_token.get(token) {
            fates.push(Fate::Repeat(first));
            continue;
        }
        let found = probe(alert).and_then(|p| {
            // `max_by_key` keeps the last of equal maxima: the later alert of the batch.
            let in_batch = inserted
                .iter()
                .filter(|r| r.key == p.key && p.from <= r.time && r.time <= p.to)
                .max_by_key(|r| r.time);
            let stored_match = matches.get(i).cloned().flatten();
            match (in_batch, stored_match) {
                (Some(b), Some(s)) if micros(s.alert_time) > b.time => Some(s),
                (Some(b), _) => Some(DebounceMatch {
                    id: b.id,
                    token: b.token.to_owned(),
                    alert_time: b.time,
                    parent: b.parent,
                    parent_token: b.parent_token.clone(),
                }),
                (None, s) => s,
            }
        });
        let (parent, parent_token) = decide::debounce_parent(found);
        let id = Uuid::now_v7();
        inserted.push(Inserted {
            key: &alert.key,
            time: micros(alert.new.alert_time),
            id,
            token,
            parent,
            parent_token: parent_token.clone(),
        });
        by_token.insert(token, id);
        fates.push(Fate::Insert {
            id,
            parent,
            parent_token,
        });
    }
    fates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AlertType;

    fn alert(token: &str, key: &str, secs: i64) -> NewAlert {
        NewAlert {
            description: String::new(),
            alert_data: String::new(),
            alert_time: DateTime::from_timestamp(1_700_000_000 + secs, 0).expect("time"),
            alert_token: token.into(),
            alert_type: AlertType::Anomaly,
            priority_score: None,
            rule: "hot".into(),
            debounce_key: key.into(),
            command: None,
        }
    }

    fn pending(alerts: &[NewAlert]) -> Vec<Pending<'_>> {
        alerts
            .iter()
            .map(|new| Pending::plain(new, Duration::seconds(60)))
            .collect()
    }

    fn parent_of(fate: &Fate) -> Option<Uuid> {
        match fate {
            Fate::Insert { parent, .. } => *parent,
            other => panic!("not an insert: {other:?}"),
        }
    }

    fn id_of(fate: &Fate) -> Uuid {
        match fate {
            Fate::Insert { id, .. } => *id,
            other => panic!("not an insert: {other:?}"),
        }
    }

    #[test]
    fn a_second_alert_of_a_key_in_the_batch_folds_into_the_first_and_a_third_stays_flat() {
        let alerts = [alert("a", "k", 0), alert("b", "k", 10), alert("c", "k", 20)];
        let fates = plan(&pending(&alerts), &HashSet::new(), &[None, None, None]);
        assert_eq!(parent_of(&fates[0]), None);
        assert_eq!(parent_of(&fates[1]), Some(id_of(&fates[0])));
        assert_eq!(
            parent_of(&fates[2]),
            Some(id_of(&fates[0])),
            "no grandchild"
        );
    }

    #[test]
    fn stored_and_repeated_tokens_write_nothing_and_are_never_parents() {
        let alerts = [alert("old", "k", 0), alert("a", "k", 1), alert("a", "k", 2)];
        let stored = HashSet::from(["old"]);
        let fates = plan(&pending(&alerts), &stored, &[None, None, None]);
        assert_eq!(fates[0], Fate::Stored);
        assert_eq!(parent_of(&fates[1]), None, "the stored token is no parent");
        assert_eq!(fates[2], Fate::Repeat(id_of(&fates[1])));
    }

    #[test]
    fn a_later_stored_match_beats_an_earlier_alert_of_the_batch() {
        // "a" at 0 s cannot see the stored alert at 100 s (window 60 s); "b" at 50 s sees
        // both and folds into the later one, the stored alert.
        let alerts = [alert("a", "k", 0), alert("b", "k", 50)];
        let stored_id = Uuid::now_v7();
        let later = DebounceMatch {
            id: stored_id,
            token: "s".into(),
            alert_time: DateTime::from_timestamp(1_700_000_100, 0).expect("time"),
            parent: None,
            parent_token: None,
        };
        let fates = plan(&pending(&alerts), &HashSet::new(), &[None, Some(later)]);
        assert_eq!(parent_of(&fates[0]), None);
        assert_eq!(parent_of(&fates[1]), Some(stored_id));
    }

    #[test]
    fn on_equal_times_the_batch_alert_wins_over_the_stored_one() {
        let alerts = [alert("a", "k", 0), alert("b", "k", 0)];
        let same_time = DebounceMatch {
            id: Uuid::now_v7(),
            token: "s".into(),
            alert_time: DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
            parent: Some(Uuid::now_v7()),
            parent_token: Some("p".into()),
        };
        let fates = plan(&pending(&alerts), &HashSet::new(), &[None, Some(same_time)]);
        assert_eq!(parent_of(&fates[1]), Some(id_of(&fates[0])));
    }

    #[test]
    fn alerts_outside_the_window_or_of_another_key_open_their_own_burst() {
        let alerts = [alert("a", "k", 0), alert("b", "k", 61), alert("c", "j", 1)];
        let fates = plan(&pending(&alerts), &HashSet::new(), &[None, None, None]);
        assert!(fates.iter().all(|f| parent_of(f).is_none()), "{fates:?}");
    }
}
