//! The telemetry pipeline: provider events in, committed effects out, then the ack.
//!
//! Each event is validated (device id, size, JSON), run through the rules and committed in
//! one store transaction with its alerts, debounce links, commands and outbox items; only
//! then is it acknowledged, and only after the ack are the rules' commands sent (a direct
//! method may wait for its device far longer than a cloud waits for an ack). Bad input
//! becomes a dead letter with the reason (then acked, so it is not redelivered forever); a
//! store failure leaves the event unacknowledged so the provider redelivers it. Events are
//! sharded by device so one device's events keep their order while different devices
//! proceed in parallel.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use chrono::Utc;
use iotgw_config::UnknownDevicePolicy;
use iotgw_providers::{EventKind, ProviderEvent, Telemetry};
use iotgw_registry::{CommandStatus, DeviceId, NewDeadLetter, StoreError, TelemetryCommit};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::core::Core;

/// Why a message was refused; the label of the `events_rejected` metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The device id breaks the canonical rules.
    InvalidDeviceId(String),
    /// Bigger than the provider accepts.
    Oversize {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON.
    Malformed(String),
}

impl Reject {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidDeviceId(_) => "invalid_device_id",
            Self::Oversize { .. } => "oversize",
            Self::Malformed(_) => "malformed_json",
        }
    }

    /// The reason written to the dead letter.
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidDeviceId(e) => e.clone(),
            Self::Oversize { size, limit } => format!("payload is {size} bytes; this provider instance accepts at most {limit} (providers.<name>.max_payload_bytes)"),
            Self::Malformed(e) => format!("payload is not JSON: {e}; devices must publish a JSON document"),
        }
    }
}

/// Parses and evaluates one telemetry message: everything before the commit, no I/O.
pub fn prepare(
    core_rules: &crate::rules::RuleSet,
    device_id: &DeviceId,
    t: &Telemetry,
    limit: usize,
) -> Result<Vec<iotgw_registry::NewAlert>, Reject> {
    if t.payload.len() > limit {
        return Err(Reject::Oversize {
            size: t.payload.len(),
            limit,
        });
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&t.payload).map_err(|e| Reject::Malformed(e.to_string()))?;
    let raw = std::str::from_utf8(&t.payload).map_err(|e| Reject::Malformed(e.to_string()))?;
    Ok(core_rules.evaluate(device_id, &t.message_id, raw, &doc, t.received_at))
}

/// The running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    tasks: JoinSet<()>,
}

impl Pipeline {
    /// Waits until every worker has drained its queue (after the providers stopped and the
    /// event channel closed).
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts `shards` workers fed from `events`.
pub fn spawn(
    core: Arc<Core>,
    mut events: mpsc::Receiver<ProviderEvent>,
    shards: usize,
) -> Pipeline {
    let mut tasks = JoinSet::new();
    let mut senders = Vec::with_capacity(shards);
    for _ in 0..shards.max(1) {
        let (tx, mut rx) = mpsc::channel::<ProviderEvent>(64);
        senders.push(tx);
        let core = core.clone();
        tasks.spawn(async move {
            while let Some(ev) = rx.recv().await {
                handle(&core, ev).await;
            }
        });
    }
    tasks.spawn(async move {
        while let Some(ev) = events.recv().await {
            let shard = shard_of(&ev, senders.len());
            if senders[shard].send(ev).await.is_err() {
                break;
            }
        }
    });
    Pipeline { tasks }
}

fn shard_of(ev: &ProviderEvent, n: usize) -> usize {
    let key = match &ev.kind {
        EventKind::Telemetry(t) => &t.device_id,
        EventKind::Connection { device_id, .. }
        | EventKind::CommandReply { device_id, .. }
        | EventKind::ReportedProperties { device_id, .. } => device_id,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % n as u64) as usize
}

async fn dead_letter(
    core: &Core,
    instance: &str,
    reason_label: &str,
    letter: NewDeadLetter,
) -> Result<(), StoreError> {
    core.metrics
        .rejected(instance, reason_label, &letter.reason);
    core.store.insert_dead_letter(&letter).await?;
    core.metrics.dead_letter(&letter.source, reason_label);
    Ok(())
}

/// Handles one event end to end, acking or nacking it.
pub async fn handle(core: &Core, ev: ProviderEvent) {
    let ProviderEvent {
        instance,
        kind,
        ack,
    } = ev;
    core.metrics.received(&instance);
    // The rules' commands, committed with the telemetry, are sent once it is acked: a
    // command answered synchronously (an Azure direct method waits for the device) must
    // not hold the cloud's delivery (Event Grid gives up after 30 s) or its redelivery.
    let mut commands = Vec::new();
    let result = match kind {
        EventKind::Telemetry(t) => telemetry(core, &instance, t)
            .await
            .map(|c| commands = c),
        EventKind::Connection { device_id, connected, at } => match known(core, &instance, &device_id).await {
            Ok(Some(id)) => core.store.set_connection_state(&id, connected, at).await.map(|applied| {
                if !applied {
                    tracing::debug!(device = %id, connected, %at, "older connection event ignored");
                }
            }),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        EventKind::ReportedProperties { device_id, properties, at } => match known(core, &instance, &device_id).await {
            Ok(Some(id)) => core.store.set_reported_properties(&id, &properties, at).await,
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        },
        EventKind::CommandReply { device_id, correlation_id, ok, reason } => command_reply(core, &instance, &device_id, &correlation_id, ok, reason).await,
    };
    match result {
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
    for cmd in commands {
        core.dispatch(cmd).await;
    }
}

/// A valid, registered device id, or None after recording why not (lifecycle events for
/// unknown devices are ignored and counted).
async fn known(core: &Core, instance: &str, raw: &str) -> Result<Option<DeviceId>, StoreError> {
    let Ok(id) = DeviceId::parse(raw) else {
        core.metrics.rejected(instance, "invalid_device_id", raw);
        return Ok(None);
    };
    if core.store.get_device(&id).await?.is_none() {
        core.metrics.rejected(instance, "unknown_device", raw);
        return Ok(None);
    }
    Ok(Some(id))
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

/// Validates, runs the rules and commits one message; returns the committed commands of
/// its new primary alerts, for the caller to send after the ack.
async fn telemetry(
    core: &Core,
    instance: &str,
    t: Telemetry,
) -> Result<Vec<iotgw_registry::Command>, StoreError> {
    let source = format!("telemetry:{instance}");
    let letter = |reason: String| NewDeadLetter {
        source: source.clone(),
        reason,
        device_id: Some(t.device_id.clone()),
        message_id: Some(t.message_id.clone()),
        payload: String::from_utf8_lossy(&t.payload).into_owned(),
    };
    let device_id = match DeviceId::parse(&t.device_id) {
        Ok(id) => id,
        Err(e) => {
            let r = Reject::InvalidDeviceId(e.to_string());
            return dead_letter(core, instance, r.label(), letter(r.reason()))
                .await
                .map(|()| Vec::new());
        }
    };
    match core.store.get_device(&device_id).await? {
        Some(_) => {}
        None => match core.config.pipeline.unknown_devices {
            UnknownDevicePolicy::DeadLetter => {
                let reason = format!("device {device_id} is not in the registry: register it (POST /api/v1/devices) or set pipeline.unknown_devices = \"auto_register\"");
                return dead_letter(core, instance, "unknown_device", letter(reason))
                    .await
                    .map(|()| Vec::new());
            }
            UnknownDevicePolicy::AutoRegister => {
                core.store
                    .ensure_unknown_device(&device_id, instance)
                    .await?;
            }
        },
    }
    let limit = core
        .providers
        .get(instance)
        .map_or(usize::MAX, |p| p.limits().max_telemetry_bytes);
    let alerts = match prepare(&core.rules, &device_id, &t, limit) {
        Ok(a) => a,
        Err(r) => {
            return dead_letter(core, instance, r.label(), letter(r.reason()))
                .await
                .map(|()| Vec::new())
        }
    };
    let has_alerts = !alerts.is_empty();
    let commit = TelemetryCommit {
        device_id,
        received_at: t.received_at,
        alerts,
        debounce_window: chrono::Duration::seconds(
            i64::try_from(core.config.pipeline.debounce_window_secs).unwrap_or(60),
        ),
        sinks: core.sinks.clone(),
    };
    let committed = core.store.commit_telemetry(&commit).await?;
    if has_alerts {
        core.outbox_wake.notify_waiters();
    }
    let mut commands = Vec::new();
    for c in committed {
        let kind = if c.duplicate {
            "duplicate"
        } else if c.alert.parent_alert.is_some() {
            "child"
        } else {
            "primary"
        };
        core.metrics.alert(instance, kind);
        tracing::info!(device = %c.alert.device_id, alert = %c.alert.id, token = %c.alert.alert_token, kind, description = %c.alert.description, "alert");
        commands.extend(c.command);
    }
    Ok(commands)
}
