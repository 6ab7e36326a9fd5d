//! Replaying dead letters: `POST /api/v1/dead-letters/{id}/replay` and the bulk
//! `POST /api/v1/dead-letters/replay` by filter.
//!
//! - A telemetry dead letter (`telemetry:<instance>`) goes through the pipeline again as
//!   the reading it was: the same instance, device, message id (so the same alert token:
//!   a reading that was committed meanwhile makes no second alert), payload and time. It
//!   commits, or becomes a dead letter again with today's reason (the device is still
//!   unknown, say).
//! - A sink's dead letter (`sink:<name>`) is queued for that sink again, due now, with its
//!   idempotency key.
//!
//! Either way the old dead letter is deleted once the replay is committed; a replay that
//! fails (the store is down) leaves it. A dead letter whose payload was cut (above 64 KiB)
//! cannot be replayed, nor one of another source.

use std::sync::Arc;

use bytes::Bytes;
use iotgw_providers::{AckHandle, EventKind, ProviderEvent, Telemetry};
use iotgw_registry::{BatchOutcome, BatchWrite, DeadLetter, PageRequest};
use serde::{Deserialize, Serialize};

use crate::core::{Core, GatewayError};
use crate::pipeline::{batch, prepare::Preparer};

/// What a replay came to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Replayed {
    /// The reading was committed (`alerts` new alerts, duplicates not counted).
    Committed {
        /// New alerts it made.
        alerts: usize,
    },
    /// The reading became a dead letter again.
    DeadLetteredAgain {
        /// Why, today.
        reason: String,
    },
    /// The sink's item is queued again (`false`: it already was).
    Requeued {
        /// The sink.
        sink: String,
        /// Whether a new item was queued.
        queued: bool,
    },
}

/// Which dead letters a bulk replay takes (all given conditions hold).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Exactly this source, e.g. `telemetry:edge` or `sink:crm`.
    pub source: Option<String>,
    /// The reason contains this text, e.g. `not in the registry`.
    pub reason_contains: Option<String>,
    /// Exactly this device id.
    pub device_id: Option<String>,
    /// At most this many (default and most 10000).
    pub limit: Option<usize>,
}

impl ReplayFilter {
    fn takes(&self, d: &DeadLetter) -> bool {
        self.source.as_ref().is_none_or(|s| &d.source == s)
            && self
                .reason_contains
                .as_ref()
                .is_none_or(|r| d.reason.contains(r.as_str()))
            && self
                .device_id
                .as_ref()
                .is_none_or(|id| d.device_id.as_ref() == Some(id))
    }
}

/// The most dead letters one bulk replay takes.
pub const MAX_BULK: usize = 10_000;

/// What a bulk replay did.
#[derive(Debug, Default, Serialize)]
pub struct BulkReplay {
    /// Dead letters the filter selected.
    pub selected: usize,
    /// Readings committed.
    pub committed: usize,
    /// Readings that became dead letters again.
    pub dead_lettered_again: usize,
    /// Sink items queued again.
    pub requeued: usize,
    /// The ones that could not be replayed, with why.
    pub failed: Vec<ReplayFailure>,
}

/// One dead letter a bulk replay could not replay.
#[derive(Debug, Serialize)]
pub struct ReplayFailure {
    /// The dead letter.
    pub id: i64,
    /// Why.
    pub error: String,
}

/// Replays dead letter `id`; see the module docs.
pub async fn replay(core: &Arc<Core>, id: i64) -> Result<Replayed, GatewayError> {
    let letter = core
        .store
        .get_dead_letter(id)
        .await?
        .ok_or_else(|| GatewayError::NotFound(format!("dead letter {id} not found")))?;
    let outcome = replay_letter(core, &letter).await?;
    core.store.delete_dead_letter(id).await?;
    core.metrics.replay(outcome_label(&outcome));
    tracing::info!(dead_letter = id, source = %letter.source, ?outcome, "dead letter replayed");
    Ok(outcome)
}

/// Replays every dead letter `filter` selects, oldest first.
pub async fn replay_many(
    core: &Arc<Core>,
    filter: &ReplayFilter,
) -> Result<BulkReplay, GatewayError> {
    let limit = filter.limit.unwrap_or(MAX_BULK).clamp(1, MAX_BULK);
    // The list is newest first: the oldest `limit` selected ones are the last seen, so only
    // those are kept while walking it (memory bounded by `limit`, not by the dead letters).
    let mut ids = std::collections::VecDeque::with_capacity(limit);
    let mut after = None;
    loop {
        let page = core
            .store
            .list_dead_letters(&PageRequest { after, limit: 1000 })
            .await?;
        for d in page.items.iter().filter(|d| filter.takes(d)) {
            if ids.len() == limit {
                ids.pop_front();
            }
            ids.push_back(d.id);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let ids: Vec<i64> = ids.into_iter().rev().collect();
    let mut out = BulkReplay {
        selected: ids.len(),
        ..BulkReplay::default()
    };
    for id in ids {
        match replay(core, id).await {
            Ok(Replayed::Committed { .. }) => out.committed += 1,
            Ok(Replayed::DeadLetteredAgain { .. }) => out.dead_lettered_again += 1,
            Ok(Replayed::Requeued { .. }) => out.requeued += 1,
            Err(e) => out.failed.push(ReplayFailure {
                id,
                error: e.to_string(),
            }),
        }
    }
    Ok(out)
}

async fn replay_letter(core: &Arc<Core>, letter: &DeadLetter) -> Result<Replayed, GatewayError> {
    if letter.payload.ends_with(']') && letter.payload.contains(" [iotgw: cut, ") {
        return Err(GatewayError::Conflict(format!(
            "dead letter {} kept only the first 64 KiB of its payload; it cannot be replayed: have the device or sink's source send it again",
            letter.id
        )));
    }
    if let Some(instance) = letter.source.strip_prefix("telemetry:") {
        return replay_reading(core, letter, instance).await;
    }
    if let Some(sink) = letter.source.strip_prefix("sink:") {
        if !core.live().sinks.iter().any(|s| s == sink) {
            return Err(GatewayError::Conflict(format!(
                "sink `{sink}` of dead letter {} is not configured; add it back to replay this alert",
                letter.id
            )));
        }
        let key = letter.message_id.as_deref().ok_or_else(|| {
            GatewayError::Conflict(format!("dead letter {} has no idempotency key", letter.id))
        })?;
        let payload: serde_json::Value = serde_json::from_str(&letter.payload).map_err(|e| {
            GatewayError::Conflict(format!(
                "dead letter {} holds no JSON alert ({e}); it cannot be queued again",
                letter.id
            ))
        })?;
        let queued = core.store.requeue_outbox(sink, key, &payload).await?;
        core.outbox_wake.notify_waiters();
        return Ok(Replayed::Requeued {
            sink: sink.to_owned(),
            queued,
        });
    }
    Err(GatewayError::Conflict(format!(
        "dead letter {} comes from `{}`; only telemetry:<instance> and sink:<name> dead letters can be replayed",
        letter.id, letter.source
    )))
}

async fn replay_reading(
    core: &Arc<Core>,
    letter: &DeadLetter,
    instance: &str,
) -> Result<Replayed, GatewayError> {
    let event = ProviderEvent {
        instance: instance.into(),
        kind: EventKind::Telemetry(Telemetry {
            device_id: letter.device_id.clone().unwrap_or_default(),
            message_id: letter
                .message_id
                .clone()
                .unwrap_or_else(|| format!("dead-letter-{}", letter.id)),
            payload: Bytes::from(letter.payload.clone().into_bytes()),
            received_at: letter.created_at,
        }),
        ack: AckHandle::new(|_| {}),
    };
    let mut prepared = batch::Batch::default();
    Preparer::new(core.live()).add(&core.metrics, &mut prepared, event);
    let committed = batch::commit_reporting(core, prepared).await;
    let outcomes = committed
        .outcomes
        .map_err(|e| GatewayError::Store(iotgw_registry::StoreError::Database(e)))?;
    let write = committed.writes.first();
    let outcome = outcomes.first();
    let replayed = match (write, outcome) {
        (Some(BatchWrite::Telemetry { .. }), Some(BatchOutcome::Telemetry { alerts, .. })) => {
            Replayed::Committed {
                alerts: alerts.iter().filter(|a| !a.duplicate).count(),
            }
        }
        (Some(BatchWrite::DeadLetter(again)), _) => Replayed::DeadLetteredAgain {
            reason: again.reason.clone(),
        },
        (Some(write), Some(other)) => Replayed::DeadLetteredAgain {
            reason: why(write, other),
        },
        _ => Replayed::DeadLetteredAgain {
            reason: "nothing was written".into(),
        },
    };
    for cmd in committed.commands {
        let core = core.clone();
        tokio::spawn(async move {
            crate::commands::claim_and_deliver(&core, &cmd).await;
        });
    }
    Ok(replayed)
}

/// Why a replayed reading became a dead letter again, as the new dead letter says.
fn why(write: &BatchWrite, outcome: &BatchOutcome) -> String {
    match (write, outcome) {
        (
            BatchWrite::Telemetry {
                if_unknown: iotgw_registry::IfUnknown::DeadLetter { reason },
                ..
            },
            BatchOutcome::DeadLettered,
        ) => reason.clone(),
        (_, BatchOutcome::NotRegistered { status }) => {
            format!("not_registered: the device is {}", status.label())
        }
        (_, BatchOutcome::WrongInstance { hosted_on }) => {
            format!("wrong_instance: the device is hosted on `{hosted_on}`")
        }
        (_, BatchOutcome::TokenConflict { owner }) => {
            format!("token_conflict: its alert token belongs to device `{owner}`")
        }
        (_, other) => format!("not committed as a reading ({other:?})"),
    }
}

fn outcome_label(r: &Replayed) -> &'static str {
    match r {
        Replayed::Committed { .. } => "committed",
        Replayed::DeadLetteredAgain { .. } => "dead_lettered_again",
        Replayed::Requeued { .. } => "requeued",
    }
}
