//! The pure half of the pipeline: a provider event becomes the store write it asks for
//! (or a dead letter naming why not), with no I/O. Runs before the batch is committed.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use iotgw_config::UnknownDevicePolicy;
use iotgw_providers::{EventKind, ProviderEvent, Telemetry};
use iotgw_registry::{
    Arrival, BatchWrite, DeviceId, IfUnknown, NewDeadLetter, Readings, TelemetryCommit,
};

use super::batch::{Batch, Entry, Step};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::rules::RuleSet;

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
    /// A rule produced something the registry cannot hold (e.g. a priority over 100).
    InvalidAlert(String),
}

impl Reject {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidDeviceId(_) => "invalid_device_id",
            Self::Oversize { .. } => "oversize",
            Self::Malformed(_) => "malformed_json",
            Self::InvalidAlert(_) => "invalid_alert",
        }
    }

    /// The reason written to the dead letter.
    pub fn reason(&self) -> String {
        match self {
            Self::InvalidDeviceId(e) => e.clone(),
            Self::Oversize { size, limit } => format!("payload is {size} bytes; this provider instance accepts at most {limit} (providers.<name>.max_payload_bytes)"),
            Self::Malformed(e) => format!("payload is not JSON: {e}; devices must publish a JSON document"),
            Self::InvalidAlert(e) => format!("a rule's alert cannot be stored: {e}"),
        }
    }
}

/// Parses and evaluates one telemetry message: everything before the commit, no I/O.
pub fn prepare(
    core_rules: &RuleSet,
    instance: &str,
    device_id: &DeviceId,
    t: &Telemetry,
    limit: usize,
) -> Result<Vec<iotgw_registry::NewAlert>, Reject> {
    prepare_parsed(core_rules, instance, device_id, t, limit).map(|(alerts, _)| alerts)
}

/// [`prepare`], also handing back the parsed document.
fn prepare_parsed(
    core_rules: &RuleSet,
    instance: &str,
    device_id: &DeviceId,
    t: &Telemetry,
    limit: usize,
) -> Result<(Vec<iotgw_registry::NewAlert>, serde_json::Value), Reject> {
    if t.payload.len() > limit {
        return Err(Reject::Oversize {
            size: t.payload.len(),
            limit,
        });
    }
    let doc: serde_json::Value =
        serde_json::from_slice(&t.payload).map_err(|e| Reject::Malformed(e.to_string()))?;
    let raw = std::str::from_utf8(&t.payload).map_err(|e| Reject::Malformed(e.to_string()))?;
    let alerts = core_rules.evaluate(instance, device_id, &t.message_id, raw, &doc, t.received_at);
    Ok((alerts, doc))
}

/// What the pure half needs, read once when the pipeline starts (the providers' limits are
/// not asked per message). Built from one live version; the collector builds a new one
/// when a reload swapped the live state.
pub(crate) struct Preparer {
    live: Arc<Live>,
    limits: HashMap<String, usize>,
    unknown_devices: UnknownDevicePolicy,
    debounce_window: chrono::Duration,
    max_skew: chrono::Duration,
    sinks: Vec<String>,
    measures: super::measures::Measures,
}

impl Preparer {
    pub(crate) fn new(live: Arc<Live>) -> Self {
        Self {
            limits: live
                .providers
                .iter()
                .map(|(name, p)| (name.clone(), p.limits().max_telemetry_bytes))
                .collect(),
            unknown_devices: live.config.pipeline.unknown_devices,
            debounce_window: chrono::Duration::seconds(
                i64::try_from(live.config.pipeline.debounce_window_secs).unwrap_or(60),
            ),
            max_skew: chrono::Duration::seconds(
                i64::try_from(live.config.pipeline.max_clock_skew_secs).unwrap_or(300),
            ),
            sinks: live.sinks.clone(),
            measures: super::measures::Measures::new(&live.config.readings),
            live,
        }
    }

    /// The live version it was built from.
    pub(crate) fn version(&self) -> u64 {
        self.live.version
    }

    /// Adds one event to `batch`: its write (if any) and its place in the ack order.
    pub(crate) fn add(&self, metrics: &Metrics, batch: &mut Batch, ev: ProviderEvent) {
        let ProviderEvent {
            instance,
            kind,
            ack,
        } = ev;
        metrics.received(&instance);
        let latest = Utc::now() + self.max_skew;
        let clamp = |at: DateTime<Utc>, field: &'static str| {
            if at > latest {
                metrics.clamped(&instance, field);
                latest
            } else {
                at
            }
        };
        let step = match kind {
            EventKind::Telemetry(mut t) => {
                t.received_at = clamp(t.received_at, "received_at");
                let (write, rejected) = self.telemetry(&self.live.rules, &instance, t);
                if let Some(r) = &rejected {
                    metrics.rejected(&instance, r.label(), &r.reason());
                }
                batch.push_write(write, rejected.map(|r| r.label()))
            }
            EventKind::Connection {
                device_id,
                connected,
                at,
            } => match lifecycle_id(metrics, &instance, &device_id) {
                Some(device_id) => batch.push_write(
                    BatchWrite::Connection {
                        device_id,
                        connected,
                        at: clamp(at, "connection"),
                    },
                    None,
                ),
                None => Step::Nothing,
            },
            EventKind::ReportedProperties {
                device_id,
                properties,
                at,
            } => match lifecycle_id(metrics, &instance, &device_id) {
                Some(device_id) => batch.push_write(
                    BatchWrite::Reported {
                        device_id,
                        properties,
                        at: clamp(at, "reported"),
                    },
                    None,
                ),
                None => Step::Nothing,
            },
            EventKind::CommandReply {
                device_id,
                correlation_id,
                ok,
                reason,
            } => Step::Reply {
                device_id,
                correlation_id,
                ok,
                reason,
            },
            EventKind::Unusable {
                what,
                device_id,
                reason,
                payload,
            } => {
                metrics.rejected(&instance, "unusable", &reason);
                batch.push_write(
                    BatchWrite::DeadLetter(NewDeadLetter {
                        source: format!("{what}:{instance}"),
                        reason: format!("unusable: {reason}"),
                        device_id: (!device_id.is_empty()).then_some(device_id),
                        message_id: None,
                        payload: String::from_utf8_lossy(&payload).into_owned(),
                    }),
                    Some("unusable"),
                )
            }
        };
        batch.entries.push(Entry {
            instance: instance.into(),
            ack,
            step,
        });
    }

    /// A reading's write, and the reason when it is a dead letter chosen here.
    fn telemetry(
        &self,
        rules: &RuleSet,
        instance: &str,
        t: Telemetry,
    ) -> (BatchWrite, Option<Reject>) {
        injected_prepare_panic(&t.device_id);
        let letter = |t: &Telemetry, reason: String| NewDeadLetter {
            source: format!("telemetry:{instance}"),
            reason,
            device_id: Some(t.device_id.clone()),
            message_id: Some(t.message_id.clone()),
            payload: String::from_utf8_lossy(&t.payload).into_owned(),
        };
        let refuse =
            |t: &Telemetry, r: Reject| (BatchWrite::DeadLetter(letter(t, r.reason())), Some(r));
        let device_id = match DeviceId::parse(&t.device_id) {
            Ok(id) => id,
            Err(e) => return refuse(&t, Reject::InvalidDeviceId(e.to_string())),
        };
        let limit = self.limits.get(instance).copied().unwrap_or(usize::MAX);
        let (alerts, doc) = match prepare_parsed(rules, instance, &device_id, &t, limit) {
            Ok(parsed) => parsed,
            Err(r) => return refuse(&t, r),
        };
        // Nothing to keep (readings off, or no number in the message): no time to read,
        // no id to copy on the hot path.
        let measures = self.measures.of(&doc);
        let readings = Box::new(if measures.is_empty() {
            Readings::default()
        } else {
            Readings {
                at: self
                    .measures
                    .time(&doc, t.received_at, Utc::now() + self.max_skew),
                message_id: t.message_id.clone(),
                measures,
            }
        });
        let if_unknown = match self.unknown_devices {
            UnknownDevicePolicy::DeadLetter => IfUnknown::DeadLetter { reason: format!(
                "device {device_id} is not in the registry: register it (POST /api/v1/devices) or set pipeline.unknown_devices = \"auto_register\""
            ) },
            UnknownDevicePolicy::AutoRegister => IfUnknown::Register,
        };
        let from = Arrival {
            instance: instance.to_owned(),
            message: letter(&t, String::new()),
        };
        let commit = TelemetryCommit {
            device_id,
            received_at: t.received_at,
            alerts,
            debounce_window: self.debounce_window,
            sinks: self.sinks.clone(),
            readings,
        };
        if let Err(e) = commit.check() {
            return refuse(&t, Reject::InvalidAlert(e.to_string()));
        }
        (
            BatchWrite::Telemetry {
                commit,
                from,
                if_unknown,
            },
            None,
        )
    }
}

/// A lifecycle event's device id, or None after counting why it is ignored.
fn lifecycle_id(metrics: &Metrics, instance: &str, raw: &str) -> Option<DeviceId> {
    match DeviceId::parse(raw) {
        Ok(id) => Some(id),
        Err(_) => {
            metrics.rejected(instance, "invalid_device_id", raw);
            None
        }
    }
}

/// Fault injection for tests: configured `return(<device id>)`, preparing a reading of
/// that device panics. Compiled out unless the `fail/failpoints` feature is on (tests
/// only).
fn injected_prepare_panic(device_id: &str) {
    let _ = device_id; // unused when the points are compiled out
    fail::fail_point!("pipeline-prepare", |device: Option<String>| {
        if device.as_deref() == Some(device_id) {
            panic!("injected panic preparing a reading of {device_id}");
        }
    });
}
