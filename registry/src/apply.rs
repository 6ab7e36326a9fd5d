//! Group commit's one loop, written once for every backend: the order of the writes, what
//! an unknown device means (a dead letter, or a registration), the alerts of the whole
//! batch (dedupe, debounce, commands, outbox) and the once-per-device last-activity bump.
//! A backend opens its transaction, hands this loop its statements through [`BatchWriter`],
//! and commits.
//!
//! A batch costs a handful of statements, not a few per event: every statement is a round
//! trip to the database (a thread hand-off on SQLite, the network on PostgreSQL), and at
//! thousands of events a second those round trips, not the work, set the latency.
//! - the devices of the batch are read in one statement; a device registered by the
//!   batch (`auto_register`) is inserted and read back on its own;
//! - dead letters, connection states and reported properties are written in order, one
//!   statement each (they are rare next to readings);
//! - the alerts of all readings are decided in memory (`crate::fold`) from two reads (the
//!   tokens already stored, the debounce match of each alert) and written in one insert,
//!   then the primaries' commands (one each) and the outbox items (one insert);
//! - each device's last activity is bumped once, at the end, to the latest reception time
//!   of its readings in the batch (the stored value is "the later of", so order does not
//!   matter), in one statement.
//!
//! Alerts are written after the batch's other writes. Nothing else in a batch reads or
//! writes alerts, so this changes no result: a later write still sees every earlier one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::batch::{
    Arrival, BatchOutcome, BatchWrite, IfUnknown, MAX_DATA_CHARS, MAX_DESCRIPTION_CHARS,
};
use crate::decide::DebounceMatch;
use crate::error::{StoreError, StoreResult};
use crate::fold::{self, Fate, Pending, Probe};
use crate::model::{
    Alert, Command, CommittedAlert, Device, NewAlert, NewAlertCommand, NewDeadLetter,
    RegistrationStatus, Subscriptions, TelemetryCommit, ENTITY_ALERT,
};
use crate::readings::{self, ReadingRow, RollupRow};
use crate::DeviceId;

/// A new alert row, decided; the backend binds these fields as they are.
pub(crate) struct AlertRow<'a> {
    /// The new alert's id.
    pub id: Uuid,
    /// What the rule raised.
    pub new: &'a NewAlert,
    /// The device it belongs to.
    pub device: &'a Device,
    /// The description, cut to what `msdyn_description` holds.
    pub description: String,
    /// The telemetry, cut to what `msdyn_alertdata` holds.
    pub alert_data: String,
    /// The debounce parent.
    pub parent: Option<Uuid>,
    /// The parent's token.
    pub parent_token: Option<String>,
    /// Creation time (the same for the whole batch; the ids order it).
    pub created_at: DateTime<Utc>,
    /// The sinks that get an outbox item for it (its reading's).
    pub sinks: &'a [String],
}

/// One outbox item: an alert for a sink.
pub(crate) struct OutboxRow<'a> {
    /// The sink.
    pub sink: &'a str,
    /// The alert, as stored.
    pub alert: &'a Alert,
}

/// The statements of one backend, inside the transaction of one batch.
#[async_trait]
pub(crate) trait BatchWriter: Send {
    /// `s` as this backend stores text (PostgreSQL cannot hold NUL, say); tokens and
    /// debounce keys are compared in this form.
    fn stored_text<'s>(&self, s: &'s str) -> Cow<'s, str> {
        Cow::Borrowed(s)
    }
    /// The registered devices among `ids`, by id (the unregistered ones are missing).
    async fn fetch_devices(&mut self, ids: &[&DeviceId]) -> StoreResult<HashMap<DeviceId, Device>>;
    /// Registers a device first seen in telemetry (`auto_register`).
    async fn insert_unknown_device(
        &mut self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<()>;
    /// Keeps a dead letter.
    async fn write_dead_letter(&mut self, letter: &NewDeadLetter) -> StoreResult<()>;
    /// Applies a connection state unless a newer one is stored; `None`: unknown device.
    async fn write_connection_state(
        &mut self,
        id: &DeviceId,
        connected: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<bool>>;
    /// Stores reported properties; `false`: unknown device.
    async fn write_reported(
        &mut self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// The stored alerts with any of these tokens.
    async fn alerts_by_token(&mut self, tokens: &[&str]) -> StoreResult<Vec<Alert>>;
    /// The answer to each probe, in probe order (see [`Probe`]).
    async fn debounce_matches(
        &mut self,
        probes: &[Probe<'_>],
    ) -> StoreResult<Vec<Option<DebounceMatch>>>;
    /// Inserts the rows (no token of them is stored) and returns them as stored, in any
    /// order.
    async fn insert_alerts(&mut self, rows: &[AlertRow<'_>]) -> StoreResult<Vec<Alert>>;
    /// Creates the command a primary alert's rule asks for, queueing its change event for
    /// each sink in `subs` taking commands.
    async fn insert_alert_command(
        &mut self,
        device: &Device,
        command: &NewAlertCommand,
        alert: Uuid,
        subs: &Subscriptions,
    ) -> StoreResult<Command>;
    /// Queues outbox items, each naming its alert's record (`msdyn_iotalert:<id>`) so the
    /// alert's later change events follow it (an item already queued for its sink and alert
    /// is kept as is).
    async fn queue_outbox(&mut self, items: &[OutboxRow<'_>]) -> StoreResult<()>;
    /// Queues the device's change event for each sink in `subs` taking devices, bumping its
    /// change version (`connection`: a connection-state change, coalesced per sink).
    async fn device_changed(
        &mut self,
        id: &DeviceId,
        connection: bool,
        subs: &Subscriptions,
    ) -> StoreResult<()>;
    /// Moves each device's last activity to its time unless it is already later.
    async fn bump_activity(&mut self, devices: &[(Uuid, DateTime<Utc>)]) -> StoreResult<()>;
    /// The keys among these rows' that are stored already (a message delivered again);
    /// usually none, so little comes back (each row read back is a hand-off on SQLite).
    async fn stored_readings(
        &mut self,
        rows: &[ReadingRow],
    ) -> StoreResult<HashSet<readings::ReadingKey>>;
    /// Inserts reading rows whose keys are not stored (the rows have distinct keys).
    async fn insert_readings(&mut self, rows: &[ReadingRow]) -> StoreResult<()>;
    /// Inserts the rows if none of their keys is stored, answering true; else writes
    /// nothing (a savepoint undoes the rows that went in) and answers false.
    async fn insert_readings_if_all_new(&mut self, rows: &[ReadingRow]) -> StoreResult<bool>;
    /// Adds each row to its stored rollup (min of mins, max of maxes, sums), creating it
    /// when missing (the rows have distinct keys).
    async fn add_rollups(&mut self, rows: &[RollupRow]) -> StoreResult<()>;
}

/// What a backend refuses for one write alone, checked before its transaction opens.
pub(crate) fn check(writes: &[BatchWrite]) -> StoreResult<()> {
    for write in writes {
        if let BatchWrite::Telemetry { commit, .. } = write {
            commit.check()?;
        }
    }
    Ok(())
}

/// A reading whose device is registered: its alerts are written after the loop.
struct Reading<'a> {
    /// Its place in the outcomes.
    slot: usize,
    device: Device,
    commit: &'a TelemetryCommit,
}

/// Applies `writes` in order through `w`; the caller commits the transaction after.
pub(crate) async fn apply<W: BatchWriter + ?Sized>(
    w: &mut W,
    writes: &[BatchWrite],
    subs: &Subscriptions,
) -> StoreResult<Vec<BatchOutcome>> {
    let mut ids: Vec<&DeviceId> = Vec::new();
    let mut seen = HashSet::new();
    for write in writes {
        if let BatchWrite::Telemetry { commit, .. } = write {
            if seen.insert(&commit.device_id) {
                ids.push(&commit.device_id);
            }
        }
    }
    let mut devices: HashMap<DeviceId, Device> = if ids.is_empty() {
        HashMap::new()
    } else {
        w.fetch_devices(&ids).await?
    };

    let stored = stored_alerts(
        w,
        writes.iter().filter_map(|write| match write {
            BatchWrite::Telemetry { commit, .. } => Some(commit),
            _ => None,
        }),
    )
    .await?;
    // Which device each token accepted so far in this batch belongs to.
    let mut claimed: HashMap<String, DeviceId> = HashMap::new();

    let mut activity: BTreeMap<Uuid, DateTime<Utc>> = BTreeMap::new();
    let mut readings = Vec::new();
    let mut out = Vec::with_capacity(writes.len());
    for write in writes {
        let outcome = match write {
            BatchWrite::Telemetry {
                commit,
                from,
                if_unknown,
            } => {
                let id = &commit.device_id;
                let mut registered = false;
                let owner = token_owner(w, commit, &stored, &claimed);
                if let Some(device) = devices.get(id) {
                    let status = device.registration_status;
                    if !matches!(
                        status,
                        RegistrationStatus::Registered | RegistrationStatus::Unknown
                    ) {
                        w.write_dead_letter(&not_registered(id, status, from))
                            .await?;
                        out.push(BatchOutcome::NotRegistered { status });
                        continue;
                    }
                    if device.provider_instance != from.instance {
                        let hosted_on = device.provider_instance.clone();
                        w.write_dead_letter(&wrong_instance(id, &hosted_on, from))
                            .await?;
                        out.push(BatchOutcome::WrongInstance { hosted_on });
                        continue;
                    }
                } else if let IfUnknown::DeadLetter { reason } = if_unknown {
                    let letter = NewDeadLetter {
                        reason: reason.clone(),
                        ..from.message.clone()
                    };
                    w.write_dead_letter(&letter).await?;
                    out.push(BatchOutcome::DeadLettered);
                    continue;
                }
                if let Some((token, owner)) = owner {
                    w.write_dead_letter(&token_conflict(id, &token, &owner, from))
                        .await?;
                    out.push(BatchOutcome::TokenConflict { owner });
                    continue;
                }
                if !devices.contains_key(id) {
                    // Unknown, under `IfUnknown::Register` (`DeadLetter` ended above).
                    w.insert_unknown_device(id, &from.instance).await?;
                    w.device_changed(id, false, subs).await?;
                    let device = w.fetch_devices(&[id]).await?.remove(id).ok_or_else(|| {
                        StoreError::Database(format!(
                            "device {id} was inserted but cannot be read back"
                        ))
                    })?;
                    devices.insert(id.clone(), device);
                    registered = true;
                }
                for alert in &commit.alerts {
                    claimed.insert(w.stored_text(&alert.alert_token).into_owned(), id.clone());
                }
                let device = devices[id].clone();
                activity
                    .entry(device.id)
                    .and_modify(|t| *t = (*t).max(commit.received_at))
                    .or_insert(commit.received_at);
                readings.push(Reading {
                    slot: out.len(),
                    device,
                    commit,
                });
                BatchOutcome::Telemetry {
                    alerts: Vec::new(),
                    registered,
                }
            }
            BatchWrite::DeadLetter(letter) => {
                w.write_dead_letter(letter).await?;
                BatchOutcome::DeadLettered
            }
            BatchWrite::Connection {
                device_id,
                connected,
                at,
            } => match w.write_connection_state(device_id, *connected, *at).await? {
                Some(applied) => {
                    if applied {
                        w.device_changed(device_id, true, subs).await?;
                    }
                    BatchOutcome::Connection { applied }
                }
                None => BatchOutcome::UnknownDevice,
            },
            BatchWrite::Reported {
                device_id,
                properties,
                at,
            } => {
                if w.write_reported(device_id, properties, *at).await? {
                    BatchOutcome::Reported
                } else {
                    BatchOutcome::UnknownDevice
                }
            }
        };
        out.push(outcome);
    }

    let committed = commit_alerts(
        w,
        subs,
        &readings
            .iter()
            .map(|r| (&r.device, r.commit))
            .collect::<Vec<_>>(),
        stored,
    )
    .await?;
    for (reading, alerts) in readings.iter().zip(committed) {
        if let BatchOutcome::Telemetry { alerts: slot, .. } = &mut out[reading.slot] {
            *slot = alerts;
        }
    }
    keep_readings(
        w,
        readings
            .iter()
            .map(|r| (&r.commit.device_id, &*r.commit.readings)),
    )
    .await?;
    bump(w, activity).await?;
    Ok(out)
}

/// The dead letter of a reading of a device that is not Registered.
fn not_registered(id: &DeviceId, status: RegistrationStatus, from: &Arrival) -> NewDeadLetter {
    NewDeadLetter {
        reason: format!(
            "not_registered: device {id} is {}; readings count only for Registered devices (register it again with POST /api/v1/devices if it is back in service)",
            status.label()
        ),
        ..from.message.clone()
    }
}

/// The stored alerts whose tokens these readings' alerts carry, by token as stored.
async fn stored_alerts<'c, W: BatchWriter + ?Sized>(
    w: &mut W,
    commits: impl Iterator<Item = &'c TelemetryCommit>,
) -> StoreResult<HashMap<String, Alert>> {
    let mut tokens: Vec<String> = commits
        .flat_map(|c| &c.alerts)
        .map(|a| w.stored_text(&a.alert_token).into_owned())
        .collect();
    if tokens.is_empty() {
        return Ok(HashMap::new());
    }
    tokens.sort_unstable();
    tokens.dedup();
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    Ok(w.alerts_by_token(&tokens)
        .await?
        .into_iter()
        .map(|a| (a.alert_token.clone(), a))
        .collect())
}

/// The first token of `commit`'s alerts that belongs to another device, stored or taken
/// earlier in this batch, with that device. A token is the idempotency key of one
/// reading of one device: the same token from another device is a collision (a provider
/// or an older token scheme that did not tell the two apart), not a redelivery, and
/// counting it as one would lose the reading silently.
fn token_owner<W: BatchWriter + ?Sized>(
    w: &W,
    commit: &TelemetryCommit,
    stored: &HashMap<String, Alert>,
    claimed: &HashMap<String, DeviceId>,
) -> Option<(String, DeviceId)> {
    commit.alerts.iter().find_map(|a| {
        let token = w.stored_text(&a.alert_token);
        let owner = stored
            .get(token.as_ref())
            .map(|s| &s.device_id)
            .or_else(|| claimed.get(token.as_ref()))?;
        (owner != &commit.device_id).then(|| (token.into_owned(), owner.clone()))
    })
}

/// The dead letter of a reading whose alert token belongs to another device's reading.
fn token_conflict(id: &DeviceId, token: &str, owner: &DeviceId, from: &Arrival) -> NewDeadLetter {
    NewDeadLetter {
        reason: format!(
            "token_conflict: alert token {token} of a reading of device `{id}` is already the token of a reading of device `{owner}`; a token must name one reading of one device (the provider's message ids must be unique per device): nothing was written for this reading"
        ),
        ..from.message.clone()
    }
}

/// The dead letter of a reading that arrived through an instance that does not host its
/// device.
fn wrong_instance(id: &DeviceId, hosted_on: &str, from: &Arrival) -> NewDeadLetter {
    NewDeadLetter {
        reason: format!(
            "wrong_instance: device {id} is hosted on provider instance `{hosted_on}`, but this reading arrived through `{}`; readings are taken only from the hosting instance (a device that moved must publish to `{hosted_on}`; move it back with POST /api/v1/devices/{id}/move if this is where it belongs)",
            from.instance
        ),
        ..from.message.clone()
    }
}

/// One reading of a registered device, on its own (`Store::commit_telemetry`): the same
/// statements as a batch of one.
pub(crate) async fn telemetry<W: BatchWriter + ?Sized>(
    w: &mut W,
    device: &Device,
    commit: &TelemetryCommit,
    subs: &Subscriptions,
) -> StoreResult<Vec<CommittedAlert>> {
    let stored = stored_alerts(w, std::iter::once(commit)).await?;
    if let Some((token, owner)) = token_owner(w, commit, &stored, &HashMap::new()) {
        return Err(StoreError::Conflict(format!(
            "alert token {token} of a reading of device `{}` is already the token of a reading of device `{owner}`",
            commit.device_id
        )));
    }
    let alerts = commit_alerts(w, subs, &[(device, commit)], stored)
        .await?
        .pop()
        .unwrap_or_default();
    keep_readings(w, std::iter::once((&commit.device_id, &*commit.readings))).await?;
    bump(w, BTreeMap::from([(device.id, commit.received_at)])).await?;
    Ok(alerts)
}

/// Keeps the measures of these readings: the rows not stored yet (a message delivered
/// again with the same time writes nothing), then what those new rows add to the rollups.
/// Usually every row is new: one insert, then the rollups. When the insert finds a key
/// stored (a redelivery), it is undone and only the rows not stored go in; the batch's
/// write lock (and on PostgreSQL its device locks) keeps the stored set true until then.
async fn keep_readings<'a, W: BatchWriter + ?Sized>(
    w: &mut W,
    of: impl IntoIterator<Item = (&'a DeviceId, &'a readings::Readings)>,
) -> StoreResult<()> {
    let rows = readings::rows(of);
    if rows.is_empty() {
        return Ok(());
    }
    if w.insert_readings_if_all_new(&rows).await? {
        return w.add_rollups(&readings::rollups(&rows)).await;
    }
    let stored = w.stored_readings(&rows).await?;
    let new: Vec<ReadingRow> = rows
        .into_iter()
        .filter(|r| !stored.contains(&r.key()))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    w.insert_readings(&new).await?;
    w.add_rollups(&readings::rollups(&new)).await
}

async fn bump<W: BatchWriter + ?Sized>(
    w: &mut W,
    activity: BTreeMap<Uuid, DateTime<Utc>>,
) -> StoreResult<()> {
    if activity.is_empty() {
        return Ok(());
    }
    w.bump_activity(&activity.into_iter().collect::<Vec<_>>())
        .await
}

/// The alerts of these readings, in order: dedupe, debounce, one insert, the primaries'
/// commands, the outbox. One list of committed alerts per reading.
async fn commit_alerts<W: BatchWriter + ?Sized>(
    w: &mut W,
    subs: &Subscriptions,
    readings: &[(&Device, &TelemetryCommit)],
    stored: HashMap<String, Alert>,
) -> StoreResult<Vec<Vec<CommittedAlert>>> {
    // Every alert of the batch, in order, with the reading it belongs to.
    let mut owner = Vec::new();
    let mut pending = Vec::new();
    for (r, (_, commit)) in readings.iter().enumerate() {
        for new in &commit.alerts {
            owner.push(r);
            pending.push(Pending {
                new,
                window: commit.debounce_window,
                token: w.stored_text(&new.alert_token),
                key: w.stored_text(&new.debounce_key),
            });
        }
    }
    if pending.is_empty() {
        return Ok(vec![Vec::new(); readings.len()]);
    }

    let stored_tokens: HashSet<&str> = stored.keys().map(String::as_str).collect();

    // A redelivered alert needs no lookup: it writes nothing.
    let mut probes = Vec::new();
    let mut probe_of = Vec::with_capacity(pending.len());
    for p in &pending {
        let probe = fold::probe(p).filter(|_| !stored_tokens.contains(p.token.as_ref()));
        probe_of.push(probe.as_ref().map(|_| probes.len()));
        probes.extend(probe);
    }
    let answers = if probes.is_empty() {
        Vec::new()
    } else {
        w.debounce_matches(&probes).await?
    };
    let matches: Vec<Option<DebounceMatch>> = probe_of
        .iter()
        .map(|k| k.and_then(|k| answers.get(k).cloned().flatten()))
        .collect();
    let fates = fold::plan(&pending, &stored_tokens, &matches);

    let created_at = fold::micros(Utc::now());
    let rows: Vec<AlertRow<'_>> = fates
        .iter()
        .zip(&pending)
        .zip(&owner)
        .filter_map(|((fate, p), &r)| match fate {
            Fate::Insert {
                id,
                parent,
                parent_token,
            } => Some(AlertRow {
                id: *id,
                new: p.new,
                device: readings[r].0,
                description: cut(&p.new.description, MAX_DESCRIPTION_CHARS),
                alert_data: cut(&p.new.alert_data, MAX_DATA_CHARS),
                parent: *parent,
                parent_token: parent_token.clone(),
                created_at,
                sinks: &readings[r].1.sinks,
            }),
            Fate::Stored | Fate::Repeat(_) => None,
        })
        .collect();
    let inserted: HashMap<Uuid, Alert> = if rows.is_empty() {
        HashMap::new()
    } else {
        w.insert_alerts(&rows)
            .await?
            .into_iter()
            .map(|a| (a.id, a))
            .collect()
    };
    if inserted.len() != rows.len() {
        return Err(StoreError::Database(format!(
            "{} alerts were inserted but {} were read back",
            rows.len(),
            inserted.len()
        )));
    }

    // The new alerts are queued before their commands' change events: a sink writing
    // records (Dataverse) gets an alert before the command that names it as its parent.
    let outbox: Vec<OutboxRow<'_>> = rows
        .iter()
        .flat_map(|row| {
            let alert = &inserted[&row.id];
            row.sinks
                .iter()
                .filter(|sink| subs.takes(sink, ENTITY_ALERT))
                .map(move |sink| OutboxRow { sink, alert })
        })
        .collect();
    if !outbox.is_empty() {
        w.queue_outbox(&outbox).await?;
    }

    // A debounced child does not repeat its parent's command.
    let mut commands: HashMap<Uuid, Command> = HashMap::new();
    for row in &rows {
        if let (None, Some(command)) = (row.parent, &row.new.command) {
            let created = w
                .insert_alert_command(row.device, command, row.id, subs)
                .await?;
            commands.insert(row.id, created);
        }
    }
    let mut out = vec![Vec::new(); readings.len()];
    for ((fate, p), &r) in fates.iter().zip(&pending).zip(&owner) {
        let committed = match fate {
            Fate::Insert { id, .. } => CommittedAlert {
                alert: inserted[id].clone(),
                duplicate: false,
                command: commands.remove(id),
            },
            Fate::Repeat(id) => CommittedAlert {
                alert: inserted[id].clone(),
                duplicate: true,
                command: None,
            },
            Fate::Stored => CommittedAlert {
                alert: stored
                    .get(p.token.as_ref())
                    .ok_or_else(|| {
                        StoreError::Database(format!(
                            "alert token {} was found stored but cannot be read back",
                            p.token
                        ))
                    })?
                    .clone(),
                duplicate: true,
                command: None,
            },
        };
        out[r].push(committed);
    }
    Ok(out)
}

/// `s` cut to at most `max` characters, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::cut;

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo", 2), "hé");
        assert_eq!(cut("héllo", 10), "héllo");
        assert_eq!(cut("", 3), "");
    }
}
