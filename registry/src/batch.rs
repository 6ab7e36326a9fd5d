//! Group commit: the writes of many provider events applied in one store transaction.
//!
//! The gateway decides what each event means (a reading, a dead letter, a connection
//! change) and hands the store an ordered list of [`BatchWrite`]s; the store applies them in
//! that order inside one transaction, so a later write sees every earlier one (a second
//! alert of a device in the same batch becomes the child of the first, a redelivered token
//! in the same batch writes nothing). Either every write of a batch is committed or none
//! is: the caller acknowledges the events only after [`crate::Store::commit_batch`]
//! returned `Ok`.
//!
//! What a backend may refuse for one write alone (a rule's priority out of range, a command
//! message too long) is checked by [`TelemetryCommit::check`] before the transaction, so
//! the caller can dead-letter that event instead of failing the batch.
//!
//! This module owns the batch vocabulary and the backend-neutral limits; it must not know
//! any backend or any cloud.

use chrono::{DateTime, Utc};

use crate::error::{StoreError, StoreResult};
use crate::model::{CommittedAlert, NewDeadLetter, TelemetryCommit};
use crate::DeviceId;

/// Longest `msdyn_alertdata` and `msdyn_message` (characters).
pub const MAX_DATA_CHARS: usize = 8192;
/// Longest `msdyn_description` (characters).
pub(crate) const MAX_DESCRIPTION_CHARS: usize = 100;

/// One write of a batch, applied in order.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchWrite {
    /// A reading: last activity, alerts, debounce, commands, outbox.
    Telemetry {
        /// What the reading changes when its device is registered.
        commit: TelemetryCommit,
        /// Where it arrived, and the message as a dead letter keeps it.
        from: Arrival,
        /// What to do when the device is not in the registry.
        if_unknown: IfUnknown,
    },
    /// A message that cannot be processed, kept with the reason.
    DeadLetter(NewDeadLetter),
    /// A connection state change (ordered by `at`, never by arrival).
    Connection {
        /// The device.
        device_id: DeviceId,
        /// Connected or not.
        connected: bool,
        /// When the provider saw the change.
        at: DateTime<Utc>,
    },
    /// Reported properties (device twin / shadow).
    Reported {
        /// The device.
        device_id: DeviceId,
        /// The reported document.
        properties: serde_json::Value,
        /// When they were reported.
        at: DateTime<Utc>,
    },
}

/// Where a reading arrived. A registered device's readings are taken only from the
/// provider instance that hosts it: one arriving through another instance (a device
/// spoofing an id hosted on another cloud, or one still publishing to its old instance
/// after a move) becomes a dead letter, checked inside the batch transaction so that a
/// move cannot race it.
#[derive(Clone, Debug, PartialEq)]
pub struct Arrival {
    /// The provider instance it came through.
    pub instance: String,
    /// The message as a dead letter keeps it; the store writes the reason.
    pub message: NewDeadLetter,
}

/// The gateway's policy for a reading from a device the registry does not hold; the store
/// applies it inside the batch transaction, so the check and the action cannot race.
#[derive(Clone, Debug, PartialEq)]
pub enum IfUnknown {
    /// Keep the reading as a dead letter with this reason.
    DeadLetter {
        /// Why, and what to do.
        reason: String,
    },
    /// Register the device (status Unknown) on the instance it arrived on, then commit.
    Register,
}

/// What one [`BatchWrite`] did, at the same index.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchOutcome {
    /// The reading was committed; its alerts (duplicates flagged).
    Telemetry {
        /// The alerts, in rule order.
        alerts: Vec<CommittedAlert>,
        /// True when the device was registered by this write (policy `Register`).
        registered: bool,
    },
    /// The write became (or was) a dead letter.
    DeadLettered,
    /// A reading of a device that is stored but not Registered (nor Unknown): Unregistered,
    /// In Progress or Error. Kept as a dead letter with reason `not_registered`, nothing
    /// else written: no alert, no command for a device the business app took out.
    NotRegistered {
        /// Its registration status.
        status: crate::model::RegistrationStatus,
    },
    /// A reading of a device hosted on another provider instance: kept as a dead letter
    /// with reason `wrong_instance`, nothing else written.
    WrongInstance {
        /// The instance that hosts the device.
        hosted_on: String,
    },
    /// A reading with an alert token that belongs to another device's reading: kept as a
    /// dead letter with reason `token_conflict`, nothing else written.
    TokenConflict {
        /// The device the token belongs to.
        owner: crate::DeviceId,
    },
    /// A connection change; `applied` is false when a newer state was already stored.
    Connection {
        /// Whether the stored state changed.
        applied: bool,
    },
    /// Reported properties were stored.
    Reported,
    /// A lifecycle write for a device the registry does not hold: nothing was written.
    UnknownDevice,
}

impl TelemetryCommit {
    /// The checks a backend would fail this reading alone on, made before the transaction
    /// so that the caller can dead-letter the reading instead of failing its batch.
    pub fn check(&self) -> StoreResult<()> {
        for alert in &self.alerts {
            if let Some(p) = alert.priority_score.filter(|p| *p > 100) {
                return Err(StoreError::Invalid {
                    field: "priority_score",
                    message: format!(
                        "{p} is outside 0..=100 (alert token {}): fix the rule",
                        alert.alert_token
                    ),
                });
            }
            if let Some(command) = &alert.command {
                check_command_message(&command.message)?;
            }
        }
        self.readings.check()
    }
}

/// A command message must fit `msdyn_message`.
pub fn check_command_message(message: &str) -> StoreResult<()> {
    let len = message.chars().count();
    if len > MAX_DATA_CHARS {
        return Err(StoreError::Invalid {
            field: "message",
            message: format!(
                "the command message is {len} characters; msdyn_message holds at most {MAX_DATA_CHARS}: send less"
            ),
        });
    }
    Ok(())
}
