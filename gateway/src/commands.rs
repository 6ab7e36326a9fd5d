//! Command delivery: a command is created In Progress (by the API, the CLI or a rule), then
//! claimed, sent through its device's provider instance and recorded. What cannot be sent
//! now (the instance is down, or the attempt failed in a way a retry can fix) stays In
//! Progress, unpublished, with the reason; the sweeper tries it again every
//! `commands.retry_secs`. A command not sent within `commands.ttl_secs` of its creation
//! ends in Error with the reason ("instance X unreachable for N s").
//!
//! The store keeps the state, so delivery survives a crash: a command created but never
//! published (the process died between the insert and the publish) is found by the
//! sweeper after the restart and sent with its original correlation id, so a device that
//! did get it can tell the repeat. Before sending, a sender claims the command in the
//! store, so two replicas (or the sweeper and the pipeline) never send it at once; a
//! replica releases its own claims when it starts (it restarted under its id), and the
//! claim of a replica that died runs out after [`CLAIM`].

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use iotgw_providers::{CommandOutcome, CommandRequest, ProviderError};
use iotgw_registry::{AlertStatus, Command, CommandStatus};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::health::unhealthy_for;

/// How long a claim keeps other senders off a command: longer than any one send (an Azure
/// direct method waits for its device up to its response timeout).
pub const CLAIM: Duration = Duration::from_secs(120);
/// Commands the sweeper takes per round.
const SWEEP_BATCH: u32 = 100;
/// A claimed command is sent only while this much of its claim is left (a direct method
/// may take 30 s and more).
const CLAIM_MARGIN: Duration = Duration::from_secs(60);
/// Commands the sweeper sends at once.
const SWEEP_CONCURRENCY: usize = 16;

/// How many commands each provider instance is sending at once: at most
/// `commands.max_in_flight` per instance, so one slow instance (direct methods waiting for
/// their devices) holds only its own slots.
#[derive(Debug, Default)]
pub struct Slots {
    by_instance: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

impl Slots {
    /// Waits for a free slot of `instance` (`limit` slots; a changed limit applies to
    /// instances seen after the change).
    pub async fn acquire(&self, instance: &str, limit: usize) -> OwnedSemaphorePermit {
        let slots = self
            .by_instance
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(instance.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(limit.max(1))))
            .clone();
        slots
            .acquire_owned()
            .await
            .expect("the slots' semaphores are never closed")
    }
}

/// Waits for a slot of `instance` under the live `commands.max_in_flight`.
async fn slot(core: &Core, instance: &str) -> OwnedSemaphorePermit {
    let limit = core.live().config.commands.max_in_flight;
    core.command_slots.acquire(instance, limit).await
}

/// Claims a stored command and delivers it, unless another sender holds it or it is no
/// longer waiting to be sent (then nothing happens and `None` is returned). Waits for a
/// slot of the command's instance first, so a claim never runs out while it queues.
pub async fn claim_and_deliver(core: &Core, cmd: &Command) -> Option<Command> {
    let _slot = slot(core, &cmd.provider_instance).await;
    let now = Utc::now();
    match core
        .store
        .claim_command(cmd.id, &core.replica, now, now + chrono_of(CLAIM))
        .await
    {
        Ok(Some(claimed)) => Some(deliver(core, claimed).await),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(command = %cmd.id, error = %e, "claiming a command failed; the sweeper tries it again");
            None
        }
    }
}

/// Sends a command this replica claimed and records the outcome on the command and on its
/// parent alert: Command Sent once the provider took it (a direct method's answer makes
/// the command Sent at once), Command Failed when it ends in Error. Waits (stays In
/// Progress, retried by the sweeper) while the instance is down or a retryable error
/// comes back, until the command's deadline.
pub async fn deliver(core: &Core, cmd: Command) -> Command {
    let instance = cmd.provider_instance.clone();
    let live = core.live();
    let provider = live.providers.get(&instance);
    let now = Utc::now();
    let provider = match provider {
        None => Err(format!(
            "provider instance `{instance}` is not configured (a reload may bring it back)"
        )),
        Some(p) => match unhealthy_for(&p.health(), now) {
            Some(for_) => Err(format!(
                "instance {instance} unreachable for {} s",
                for_.as_secs()
            )),
            None => Ok(p),
        },
    };
    let deadline = deadline(core, &cmd);
    let provider = match provider {
        Ok(p) => p,
        Err(reason) if now >= deadline => return fail(core, cmd, reason, "expired").await,
        Err(reason) => return wait(core, cmd, reason, now).await,
    };
    let req = CommandRequest {
        id: cmd.id,
        device_id: cmd.device_id.clone(),
        name: cmd.name.clone(),
        message: cmd.message.clone(),
        correlation_id: cmd.correlation_id.clone(),
    };
    match provider.send_command(&req).await {
        Ok(CommandOutcome::Published) => published(core, cmd, None, "published").await,
        Ok(CommandOutcome::Delivered { .. }) => {
            published(core, cmd, Some(CommandStatus::Sent), "delivered").await
        }
        Ok(CommandOutcome::Refused { reason }) => {
            // The device got it and answered no: published, then Error with its reason,
            // as a refusing reply makes it on the other clouds.
            let cmd = mark_published(core, cmd).await;
            fail(core, cmd, reason, "refused").await
        }
        Err(e) if e.is_retryable() && Utc::now() < deadline => {
            let reason = format!("the last attempt failed, trying again: {e}");
            core.metrics.command(&instance, "retried");
            wait(core, cmd, reason, Utc::now()).await
        }
        Err(e) => fail(core, cmd, failure(&e, deadline), "failed").await,
    }
}

/// When a command must have been sent by.
pub fn deadline(core: &Core, cmd: &Command) -> DateTime<Utc> {
    cmd.created_at + chrono_of(Duration::from_secs(core.live().config.commands.ttl_secs))
}

fn failure(e: &ProviderError, deadline: DateTime<Utc>) -> String {
    if e.is_retryable() {
        format!("not sent by its deadline {deadline} (commands.ttl_secs): {e}")
    } else {
        e.to_string()
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Leaves the command for the sweeper's next round.
async fn wait(core: &Core, cmd: Command, reason: String, now: DateTime<Utc>) -> Command {
    let retry_at = now + chrono_of(Duration::from_secs(core.live().config.commands.retry_secs));
    match core
        .store
        .defer_command(cmd.id, &core.replica, retry_at, &reason)
        .await
    {
        Ok(_) => {
            tracing::debug!(command = %cmd.id, %reason, "command waits");
            core.metrics.command(&cmd.provider_instance, "waiting");
        }
        Err(e) => {
            tracing::warn!(command = %cmd.id, error = %e, "recording a waiting command failed")
        }
    }
    Command {
        status_reason: Some(reason),
        ..cmd
    }
}

/// The provider took it.
async fn published(
    core: &Core,
    mut cmd: Command,
    status: Option<CommandStatus>,
    outcome: &'static str,
) -> Command {
    core.metrics.command(&cmd.provider_instance, outcome);
    cmd = mark_published(core, cmd).await;
    if let Some(status) = status {
        match core.store.set_command_status(cmd.id, status, None).await {
            Ok(c) => cmd = c,
            Err(e) => {
                tracing::error!(command = %cmd.id, error = %e, "recording the command status failed")
            }
        }
    }
    alert_status(core, &cmd, AlertStatus::CommandSent).await;
    cmd
}

/// Records that the provider took the command (it is not sent again).
async fn mark_published(core: &Core, mut cmd: Command) -> Command {
    match core.store.command_published(cmd.id, &core.replica).await {
        Ok(_) => cmd.published_at = Some(Utc::now()),
        Err(e) => {
            tracing::error!(command = %cmd.id, error = %e, "recording a published command failed; it may be sent again (same correlation id)");
        }
    }
    cmd
}

/// It ends in Error.
async fn fail(core: &Core, mut cmd: Command, reason: String, outcome: &'static str) -> Command {
    core.metrics.command(&cmd.provider_instance, outcome);
    tracing::warn!(command = %cmd.id, device = %cmd.device_id, %reason, "command failed");
    match core
        .store
        .set_command_status(cmd.id, CommandStatus::Error, Some(reason))
        .await
    {
        Ok(c) => cmd = c,
        Err(e) => {
            tracing::error!(command = %cmd.id, error = %e, "recording the command status failed")
        }
    }
    alert_status(core, &cmd, AlertStatus::CommandFailed).await;
    cmd
}

async fn alert_status(core: &Core, cmd: &Command, status: AlertStatus) {
    if let Some(alert) = cmd.parent_alert {
        if let Err(e) = core
            .store
            .set_alert_status(alert, status, Some((cmd.id, Utc::now())))
            .await
        {
            tracing::error!(%alert, error = %e, "recording the alert's command status failed");
        }
    }
}

/// Starts the sweeper: it first releases this replica's claims (what it was sending when
/// it last stopped), then every `commands.retry_secs` claims the commands waiting to be
/// sent and delivers them, until `stop`.
/// Runs as a supervised task (`/live` fails if it ends before `stop`).
pub fn spawn_sweeper(core: Arc<Core>, stop: CancellationToken) -> JoinHandle<()> {
    let vitals = core.vitals.clone();
    vitals.spawn("command sweeper", Some(stop.clone()), async move {
        match core.store.release_command_claims(&core.replica).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(
                    commands = n,
                    "released the command claims of this replica's last run; they are sent again"
                )
            }
            Err(e) => tracing::warn!(error = %e, "releasing this replica's command claims failed"),
        }
        loop {
            sweep(&core).await;
            let every = Duration::from_secs(core.live().config.commands.retry_secs);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// One round: every command due, a bounded number at a time.
async fn sweep(core: &Arc<Core>) {
    loop {
        let now = Utc::now();
        let due = match core
            .store
            .claim_unpublished_commands(&core.replica, now, now + chrono_of(CLAIM), SWEEP_BATCH)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "claiming waiting commands failed; trying again next round");
                return;
            }
        };
        let full = due.len() == SWEEP_BATCH as usize;
        if !due.is_empty() {
            tracing::debug!(commands = due.len(), "sending waiting commands");
        }
        let claimed_until = now + chrono_of(CLAIM);
        stream::iter(due)
            .for_each_concurrent(SWEEP_CONCURRENCY, |cmd| async move {
                let _slot = slot(core, &cmd.provider_instance).await;
                // A claim that ran out while the command waited for a slot may already be
                // another sender's: sending now could send it twice. Left alone, the claim
                // lapses and a later round sends it.
                if Utc::now() + chrono_of(CLAIM_MARGIN) >= claimed_until {
                    tracing::debug!(command = %cmd.id, "its claim ran out while it waited for a slot; a later round sends it");
                    return;
                }
                deliver(core, cmd).await;
            })
            .await;
        if !full {
            return;
        }
    }
}
