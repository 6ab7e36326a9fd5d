//! The committing half of the pipeline: one store transaction per batch, then the verdicts.
//!
//! Every event of a batch is acknowledged only after the batch's commit returned; when the
//! commit fails, every event of it is left unacknowledged (nacked), so the provider
//! redelivers and nothing is half done. Command replies are settled after the commit, one
//! by one (they read the command they answer). The rules' commands go to the dispatcher
//! only after their telemetry was acked.

use chrono::Utc;
use iotgw_providers::AckHandle;
use iotgw_registry::{BatchOutcome, BatchWrite, Command, CommandStatus, StoreError};

use crate::core::Core;
use crate::internal_events::{AlertCommitted, InternalEvent};

/// Events prepared for one commit, in arrival order.
#[derive(Default)]
pub(crate) struct Batch {
    /// One entry per event (the ack order).
    pub(crate) entries: Vec<Entry>,
    /// The store writes, referenced by the entries.
    pub(crate) writes: Vec<BatchWrite>,
}

/// One event of a batch.
pub(crate) struct Entry {
    /// The provider instance it came from.
    pub(crate) instance: String,
    /// Its acknowledgement.
    pub(crate) ack: AckHandle,
    /// What committing it means.
    pub(crate) step: Step,
}

/// What an event needs from the commit.
pub(crate) enum Step {
    /// `writes[index]`; `rejected` is the reject label when the pipeline chose a dead letter.
    Write {
        index: usize,
        rejected: Option<&'static str>,
    },
    /// A command reply, settled after the batch commit.
    Reply {
        device_id: String,
        correlation_id: String,
        ok: bool,
        reason: Option<String>,
    },
    /// Nothing to write (already counted): acked with the batch.
    Nothing,
}

impl Batch {
    /// Appends a write and returns the step that refers to it.
    pub(crate) fn push_write(&mut self, write: BatchWrite, rejected: Option<&'static str>) -> Step {
        self.writes.push(write);
        Step::Write {
            index: self.writes.len() - 1,
            rejected,
        }
    }

    /// Number of events.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no event.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Commits `batch`, gives every event its verdict and returns the commands of the new
/// primary alerts, to be sent now that their telemetry is acked.
pub(crate) async fn commit(core: &Core, batch: Batch) -> Vec<Command> {
    commit_reporting(core, batch).await.commands
}

/// What [`commit_reporting`] did: the commands to send, and each write with its outcome
/// (or why the commit failed).
pub(crate) struct Committed {
    pub(crate) commands: Vec<Command>,
    pub(crate) writes: Vec<BatchWrite>,
    pub(crate) outcomes: Result<Vec<BatchOutcome>, String>,
}

/// [`commit`], also telling what each write came to (a dead letter replayed asks).
pub(crate) async fn commit_reporting(core: &Core, batch: Batch) -> Committed {
    let Batch { entries, writes } = batch;
    injected_commit_panic(&writes);
    let started = std::time::Instant::now();
    let committed = core.store.commit_batch(&writes).await;
    core.metrics.batch_store(started.elapsed());
    let outcomes = match committed {
        Ok(o) => {
            core.commits.succeeded();
            o
        }
        Err(e) => {
            let reason = e.to_string();
            core.commits.failed(&reason);
            tracing::warn!(events = entries.len(), error = %reason, "a batch commit failed; its events are left for redelivery");
            for entry in entries {
                core.metrics.nacked(&entry.instance, "store_error", &reason);
                entry.ack.nack(reason.clone());
            }
            return Committed {
                commands: Vec::new(),
                writes,
                outcomes: Err(reason),
            };
        }
    };
    let mut commands = Vec::new();
    let mut new_alerts = false;
    let mut replies = Vec::new();
    for entry in entries {
        match entry.step {
            Step::Write { index, rejected } => {
                account(
                    core,
                    &entry.instance,
                    &writes[index],
                    &outcomes[index],
                    rejected,
                    &mut commands,
                    &mut new_alerts,
                );
                entry.ack.ack();
                core.metrics.acked(&entry.instance);
            }
            Step::Nothing => {
                entry.ack.ack();
                core.metrics.acked(&entry.instance);
            }
            Step::Reply {
                device_id,
                correlation_id,
                ok,
                reason,
            } => replies.push((
                entry.instance,
                entry.ack,
                device_id,
                correlation_id,
                ok,
                reason,
            )),
        }
    }
    if new_alerts {
        core.outbox_wake.notify_waiters();
    }
    for (instance, ack, device_id, correlation_id, ok, reason) in replies {
        match command_reply(core, &instance, &device_id, &correlation_id, ok, reason).await {
            Ok(()) => {
                ack.ack();
                core.metrics.acked(&instance);
            }
            Err(e) => {
                core.metrics
                    .nacked(&instance, "store_error", &e.to_string());
                ack.nack(e.to_string());
            }
        }
    }
    Committed {
        commands,
        writes,
        outcomes: Ok(outcomes),
    }
}

/// Counts and logs what one committed write did.
fn account(
    core: &Core,
    instance: &str,
    write: &BatchWrite,
    outcome: &BatchOutcome,
    rejected: Option<&'static str>,
    commands: &mut Vec<Command>,
    new_alerts: &mut bool,
) {
    match (write, outcome) {
        (BatchWrite::DeadLetter(letter), BatchOutcome::DeadLettered) => {
            core.metrics
                .dead_letter(&letter.source, rejected.unwrap_or("rejected"));
        }
        (
            BatchWrite::Telemetry {
                if_unknown: iotgw_registry::IfUnknown::DeadLetter { reason },
                from,
                ..
            },
            BatchOutcome::DeadLettered,
        ) => {
            core.metrics.rejected(instance, "unknown_device", reason);
            core.metrics
                .dead_letter(&from.message.source, "unknown_device");
        }
        (BatchWrite::Telemetry { commit, from, .. }, BatchOutcome::NotRegistered { status }) => {
            core.metrics.rejected(
                instance,
                "not_registered",
                &format!("device {} is {}", commit.device_id, status.label()),
            );
            core.metrics
                .dead_letter(&from.message.source, "not_registered");
        }
        (BatchWrite::Telemetry { commit, from, .. }, BatchOutcome::WrongInstance { hosted_on }) => {
            core.metrics.rejected(
                instance,
                "wrong_instance",
                &format!("device {} is hosted on `{hosted_on}`", commit.device_id),
            );
            core.metrics
                .dead_letter(&from.message.source, "wrong_instance");
        }
        (BatchWrite::Telemetry { commit, from, .. }, BatchOutcome::TokenConflict { owner }) => {
            core.metrics.rejected(
                instance,
                "token_conflict",
                &format!(
                    "a reading of device {} carries the alert token of device {owner}",
                    commit.device_id
                ),
            );
            core.metrics
                .dead_letter(&from.message.source, "token_conflict");
        }
        (BatchWrite::Telemetry { commit, .. }, BatchOutcome::Telemetry { alerts, registered }) => {
            if *registered {
                tracing::info!(device = %commit.device_id, provider = %instance, "unknown device registered from its telemetry (pipeline.unknown_devices = auto_register)");
            }
            for c in alerts {
                let kind = if c.duplicate {
                    "duplicate"
                } else if c.alert.parent_alert.is_some() {
                    "child"
                } else {
                    "primary"
                };
                *new_alerts |= !c.duplicate;
                AlertCommitted {
                    provider: instance,
                    kind,
                    alert: &c.alert,
                }
                .emit(&core.metrics);
                commands.extend(c.command.clone());
            }
        }
        (
            BatchWrite::Connection {
                device_id,
                connected,
                at,
            },
            BatchOutcome::Connection { applied: false },
        ) => {
            tracing::debug!(device = %device_id, connected, %at, "older connection event ignored");
        }
        (
            BatchWrite::Connection { device_id, .. } | BatchWrite::Reported { device_id, .. },
            BatchOutcome::UnknownDevice,
        ) => core
            .metrics
            .rejected(instance, "unknown_device", device_id.as_str()),
        _ => {}
    }
}

async fn command_reply(
    core: &Core,
    instance: &str,
    device_id: &str,
    correlation_id: &str,
    ok: bool,
    reason: Option<String>,
) -> Result<(), StoreError> {
    // A reply names its command by correlation id; C2D delivery feedback names it by the
    // message id, which is the command's id.
    let mut found = core
        .store
        .get_command_by_correlation(correlation_id)
        .await?;
    if found.is_none() {
        if let Ok(id) = uuid::Uuid::parse_str(correlation_id) {
            found = core.store.get_command(id).await?;
        }
    }
    let Some(cmd) = found else {
        core.metrics
            .rejected(instance, "unknown_command", correlation_id);
        return Ok(());
    };
    if cmd.device_id.as_str() != device_id {
        core.metrics.rejected(
            instance,
            "reply_from_wrong_device",
            &format!("{device_id} answered {correlation_id} of {}", cmd.device_id),
        );
        return Ok(());
    }
    let status = if ok {
        CommandStatus::Sent
    } else {
        CommandStatus::Error
    };
    core.store
        .set_command_status(
            cmd.id,
            status,
            reason.or_else(|| (!ok).then(|| "the device reported an error".to_string())),
        )
        .await?;
    core.metrics
        .command(instance, if ok { "confirmed" } else { "refused_by_device" });
    if let (false, Some(alert)) = (ok, cmd.parent_alert) {
        core.store
            .set_alert_status(
                alert,
                iotgw_registry::AlertStatus::CommandFailed,
                Some((cmd.id, Utc::now())),
            )
            .await?;
    }
    Ok(())
}

/// Fault injection for tests: configured `return(<device id>)`, a batch holding a reading
/// of that device panics before its transaction. Compiled out unless the
/// `fail/failpoints` feature is on (tests only).
fn injected_commit_panic(writes: &[BatchWrite]) {
    let _ = writes; // unused when the points are compiled out
    fail::fail_point!("pipeline-commit", |device: Option<String>| {
        let hit = writes.iter().any(|w| {
            matches!(w, BatchWrite::Telemetry { commit, .. } if Some(commit.device_id.as_str()) == device.as_deref())
        });
        if hit {
            panic!("injected panic committing a batch with a reading of {device:?}");
        }
    });
}
