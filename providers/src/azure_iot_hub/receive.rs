//! The receive paths of an IoT Hub instance, both feeding the pipeline with events it
//! acknowledges only after commit:
//! - [`run`]: proves the credentials (`GET /statistics/service`, retried while the hub is
//!   unreachable), then keeps the event sender for the Event Grid endpoint and runs the
//!   Event Hubs consumer ([`super::event_hubs`], when `event_hubs` is configured) and, with
//!   `command_delivery = "c2d"`, the C2D delivery feedback receiver ([`super::c2d`]) until
//!   shutdown;
//! - [`EventGridEndpoint`]: Event Grid pushing IoT Hub events (`POST|OPTIONS
//!   /hooks/{instance}`): the subscription validation handshake
//!   (`SubscriptionValidationEvent` → `{"validationResponse": code}`; CloudEvents'
//!   `OPTIONS` with `WebHook-Request-Origin` → `WebHook-Allowed-Origin`), a shared secret
//!   (query parameter `secret` or header `X-Iotgw-Secret`, constant-time), the batch
//!   decoded by [`super::inbound`], and 200 only after every event of the batch was acked
//!   by the gateway (committed), otherwise 503 so Event Grid retries the batch.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use iotgw_config::azure_iot_hub::EventHubsStart;
use serde_json::{json, Value};
use tokio::sync::oneshot;

#[cfg(feature = "azure_event_hubs")]
use super::event_hubs::EventSource;
use super::event_hubs::{Consumer, Position};
use super::inbound::{map_batch, parse_batch, types, GridEvent, Mapped};
use super::ordering::compare_sequence;
use super::state::{lock, Shared};
use crate::{
    Ack, AckHandle, EventSender, ProviderError, ProviderEvent, PushEndpoint, PushRequest,
    PushResponse, Shutdown,
};

/// Delay between two credential probes while the hub is unreachable at start.
const PROBE_RETRY: Duration = Duration::from_secs(5);

/// Query parameter carrying the shared secret.
pub const SECRET_QUERY: &str = "secret";
/// Header carrying the shared secret (an Event Grid delivery property).
pub const SECRET_HEADER: &str = "x-iotgw-secret";

/// Runs until `shutdown`; see the module docs. Returns `Err` when the hub refuses the
/// credentials (retrying cannot fix that).
pub(super) async fn run(
    s: &Shared,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    *lock(&s.events) = Some(events);
    let result = async {
        loop {
            match s.hub.service_statistics().await {
                Ok(_) => {
                    s.set_connected(true);
                    tracing::info!(provider = %s.instance, host = %s.hub.host(), "IoT Hub reachable, credentials accepted");
                    break;
                }
                Err(e) => {
                    let e = s.fail(e);
                    if matches!(e, ProviderError::Unauthorized { .. }) {
                        return Err(e);
                    }
                    tracing::warn!(provider = %s.instance, error = %e, "IoT Hub not reachable yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(PROBE_RETRY) => {}
                    }
                }
            }
        }
        // C2D delivery feedback beside the Event Hubs consumer; either one failing for
        // good (refused credentials) ends `run`.
        let stop = shutdown.child_token();
        let feedback = async {
            let sender = lock(&s.events).clone();
            let r = match (&s.c2d, sender) {
                (Some(c2d), Some(tx)) => c2d.run_feedback(tx, stop.clone()).await,
                _ => Ok(()),
            };
            if r.is_err() {
                stop.cancel();
            }
            r
        };
        let consume = async {
            let r = consume_event_hubs(s, &stop).await;
            stop.cancel();
            r
        };
        let (consumed, fed) = tokio::join!(consume, feedback);
        consumed.and(fed)
    }
    .await;
    *lock(&s.events) = None;
    result
}

/// Reads the Event Hubs-compatible endpoint until `stop` (or waits for `stop` when
/// `event_hubs` is not configured).
async fn consume_event_hubs(s: &Shared, stop: &Shutdown) -> Result<(), ProviderError> {
    let Some(eh) = &s.config.event_hubs else {
        stop.cancelled().await;
        return Ok(());
    };
    let injected = lock(&s.event_source).clone();
    #[cfg(feature = "azure_event_hubs")]
    let source: Arc<dyn EventSource> = injected.unwrap_or_else(|| {
        Arc::new(super::event_hubs_client::AmqpEventSource::new(
            &s.instance,
            eh,
        ))
    });
    #[cfg(not(feature = "azure_event_hubs"))]
    let Some(source) = injected
    else {
        return Err(ProviderError::Unsupported {
            instance: s.instance.to_string(),
            what: "event_hubs: this build has no Event Hubs client; rebuild with `--features azure_event_hubs` (cargo build -p iotgw --features azure_event_hubs), or remove event_hubs and use event_grid".into(),
        });
    };
    let (ownership, owner) = lock(&s.ownership).clone();
    let consumer = Arc::new(Consumer {
        instance: s.instance.to_string(),
        key_prefix: format!("{}/{}", s.instance, eh.consumer_group),
        start: match eh.start {
            EventHubsStart::Earliest => Position::Earliest,
            EventHubsStart::Latest => Position::Latest,
        },
        checkpoints: lock(&s.checkpoints).clone(),
        connection_seq: s.connection_seq.clone(),
        retry: PROBE_RETRY,
        ownership,
        owner,
        balance_interval: Duration::from_millis(eh.load_balancing_interval_ms),
        claim_expiry: Duration::from_millis(eh.ownership_expiry_ms),
    });
    let sender = lock(&s.events).clone();
    match sender {
        Some(tx) => consumer.run(source, tx, stop.clone()).await,
        None => Ok(()),
    }
}

/// The Event Grid endpoint of one provider instance.
pub struct EventGridEndpoint {
    shared: Arc<Shared>,
}

impl EventGridEndpoint {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn secret_ok(&self, req: &PushRequest) -> bool {
        let Some(cfg) = &self.shared.config.event_grid else {
            return false;
        };
        let want = cfg.secret.expose().as_bytes();
        let given = req
            .query_param(SECRET_QUERY)
            .or_else(|| req.header(SECRET_HEADER))
            .unwrap_or_default()
            .as_bytes();
        constant_time_eq(given, want)
    }

    async fn deliver(&self, events: Vec<GridEvent>) -> PushResponse {
        let s = &self.shared;
        let Some(sender) = lock(&s.events).clone() else {
            return reply(
                503,
                json!({"error": "the provider is not running yet; Event Grid will retry"}),
            );
        };
        let mapped = {
            let committed = lock(&s.connection_seq);
            map_batch(&events, &committed, Utc::now())
        };
        let timeout = Duration::from_secs(
            s.config
                .event_grid
                .as_ref()
                .map_or(20, |c| c.commit_timeout_secs),
        );
        let work = async {
            let mut pending = Vec::new();
            let (mut skipped, mut accepted) = (0usize, 0usize);
            for m in mapped {
                match m {
                    Mapped::Skip(why) => {
                        skipped += 1;
                        tracing::debug!(provider = %s.instance, reason = %why, "Event Grid event skipped");
                    }
                    Mapped::Event { kind, seq } => {
                        let (tx, rx) = oneshot::channel();
                        let ev = ProviderEvent {
                            instance: s.instance.clone(),
                            kind,
                            ack: AckHandle::new(move |a| {
                                let _ = tx.send(a);
                            }),
                        };
                        if sender.send(ev).await.is_err() {
                            return Err("the pipeline is shut down".to_owned());
                        }
                        accepted += 1;
                        pending.push((rx, seq));
                    }
                }
            }
            let mut committed_seqs = Vec::new();
            let mut failure = None;
            for (rx, seq) in pending {
                match rx.await {
                    Ok(Ack::Ack) => committed_seqs.extend(seq),
                    Ok(Ack::Nack(why)) => {
                        failure.get_or_insert(why);
                    }
                    Err(_) => {
                        failure.get_or_insert_with(|| "dropped without a verdict".to_owned());
                    }
                }
            }
            {
                let mut map = lock(&s.connection_seq);
                for (device, seq, at) in committed_seqs {
                    let newer = map
                        .get(&device)
                        .is_none_or(|(prev, _)| compare_sequence(&seq, prev) == Ordering::Greater);
                    if newer {
                        map.insert(device, (seq, at));
                    }
                }
            }
            match failure {
                None => Ok((accepted, skipped)),
                Some(why) => Err(format!("an event was not committed: {why}")),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok((accepted, skipped))) => {
                reply(200, json!({"accepted": accepted, "skipped": skipped}))
            }
            Ok(Err(why)) => {
                tracing::warn!(provider = %s.instance, reason = %why, "Event Grid batch not committed; answering 503 so it is retried");
                reply(503, json!({"error": why}))
            }
            Err(_) => {
                tracing::warn!(provider = %s.instance, ?timeout, "Event Grid batch not committed in time; answering 503 so it is retried");
                reply(
                    503,
                    json!({"error": format!("not committed within {timeout:?}; retry")}),
                )
            }
        }
    }
}

fn reply(status: u16, body: Value) -> PushResponse {
    PushResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_string()),
    }
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl PushEndpoint for EventGridEndpoint {
    fn authorize(&self, head: &PushRequest) -> Option<PushResponse> {
        (!self.secret_ok(head)).then(|| {
            tracing::warn!(provider = %self.shared.instance, "Event Grid request refused before its body was read: missing or wrong shared secret");
            reply(
                401,
                json!({"error": "missing or wrong secret: put ?secret=<event_grid.secret> in the subscription's endpoint URL or send it as the X-Iotgw-Secret delivery header"}),
            )
        })
    }

    async fn handle(&self, req: PushRequest) -> PushResponse {
        if !self.secret_ok(&req) {
            tracing::warn!(provider = %self.shared.instance, "Event Grid request refused: missing or wrong shared secret");
            return reply(
                401,
                json!({"error": "missing or wrong secret: put ?secret=<event_grid.secret> in the subscription's endpoint URL or send it as the X-Iotgw-Secret delivery header"}),
            );
        }
        match req.method.to_ascii_uppercase().as_str() {
            "OPTIONS" => {
                // CloudEvents 1.0 webhook abuse protection.
                let Some(origin) = req.header("webhook-request-origin") else {
                    return reply(
                        400,
                        json!({"error": "OPTIONS without WebHook-Request-Origin"}),
                    );
                };
                PushResponse {
                    status: 200,
                    headers: vec![
                        ("webhook-allowed-origin".into(), origin.to_owned()),
                        ("webhook-allowed-rate".into(), "*".into()),
                        ("allow".into(), "POST, OPTIONS".into()),
                    ],
                    body: Bytes::new(),
                }
            }
            "POST" => {
                let events = match parse_batch(&req.body) {
                    Ok(e) => e,
                    Err(e) => return reply(400, json!({"error": e.0})),
                };
                if let Some(v) = events.iter().find(|e| e.event_type == types::VALIDATION) {
                    let Some(code) = v.data.get("validationCode").and_then(Value::as_str) else {
                        return reply(
                            400,
                            json!({"error": "SubscriptionValidationEvent without data.validationCode"}),
                        );
                    };
                    tracing::info!(provider = %self.shared.instance, "Event Grid subscription validated");
                    return reply(200, json!({"validationResponse": code}));
                }
                if events
                    .iter()
                    .all(|e| e.event_type == types::SUBSCRIPTION_DELETED)
                    && !events.is_empty()
                {
                    tracing::warn!(provider = %self.shared.instance, "Event Grid says the subscription was deleted");
                    return reply(200, json!({}));
                }
                self.deliver(events).await
            }
            other => PushResponse {
                status: 405,
                headers: vec![("allow".into(), "POST, OPTIONS".into())],
                body: Bytes::from(json!({"error": format!("{other} is not accepted")}).to_string()),
            },
        }
    }
}
