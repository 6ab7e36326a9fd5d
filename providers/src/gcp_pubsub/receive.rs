//! The receive side: one streaming pull per subscription (telemetry, and replies and
//! lifecycle when on), each its own task.
//!
//! - Start-up: the topics and subscriptions are checked (created with
//!   `create_if_missing`); temporary failures are retried with backoff, a missing resource
//!   or refused permission ends `run` with the error. Health turns connected when they are
//!   in place.
//! - Flow control: the server hands out at most `max_outstanding_messages` /
//!   `max_outstanding_bytes` unacked messages per stream; the stream itself hands the
//!   pipeline at most `max_outstanding_messages` messages awaiting their verdict (the
//!   emulator ignores the server-side limit), and the next message is only taken once the
//!   previous event went into the (bounded) event channel, so a slow pipeline slows the
//!   streams down.
//! - Acks: every event carries an [`AckHandle`] wrapping the message's lease. The gateway
//!   acks after commit; a nack (or a dropped handle) is held `nack_delay_ms` then nacked,
//!   Pub/Sub redelivers after the subscription's retry backoff (`retry_min_backoff_secs`
//!   on the subscriptions the gateway creates), and after `max_delivery_attempts` a
//!   configured dead-letter topic takes the
//!   message. While the pipeline holds a message its lease is extended (`ack_deadline_secs`
//!   at a time); if the gateway dies instead, the lease lapses and Pub/Sub redelivers. A
//!   redelivery carries the same `message_id` and publish time, which make the alert token
//!   ([`super::inbound::alert_token`]), so it never makes a second alert.
//! - Failures: the client library retries transient stream errors itself; an error it
//!   gives up on reopens the stream after `reconnect_min_ms`, doubling up to
//!   `reconnect_max_ms`. A subscription deleted under a running gateway is re-created with
//!   `create_if_missing`, otherwise it ends `run` with the error.
//! - Shutdown: each stream closes (health turns disconnected) and waits (at most
//!   [`SHUTDOWN_FLUSH`]) until the verdicts of the messages it handed out are sent, then
//!   `run` returns.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::ShutdownBehavior;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::client::{classify, is_fatal, Call};
use super::inbound::{self, Inbound, Received};
use super::names::{Stream, StreamKind};
use super::state::Shared;
use crate::{Ack, AckHandle, EventKind, EventSender, ProviderError, ProviderEvent, Shutdown};

/// How long shutdown waits for the verdicts of handed-out messages to be sent.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// Runs until `shutdown`; see the module docs.
pub(super) async fn run(
    shared: Arc<Shared>,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    let cfg = &shared.config;
    let min_delay = Duration::from_millis(cfg.reconnect_min_ms);
    let max_delay = Duration::from_millis(cfg.reconnect_max_ms);
    info!(instance = %shared.instance, target = %shared.clients.target.describe(), "gcp_pubsub: starting");

    let mut delay = min_delay;
    loop {
        let ensured = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            r = shared.ensure_resources() => r,
        };
        match ensured {
            Ok(()) => break,
            Err(e) if e.is_retryable() => {
                warn!(instance = %shared.instance, retry_in = ?delay, "gcp_pubsub: resources not checked: {e}");
                shared.health.set_error(e.to_string());
                if sleep_or_shutdown(&shutdown, delay).await {
                    return Ok(());
                }
                delay = (delay * 2).min(max_delay);
            }
            Err(e) => return Err(e),
        }
    }
    let subscriber = shared.clients.subscriber(&shared.instance).await?;
    shared.health.set_connected(true);

    // A fatal error in one stream stops the others.
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    for stream in shared.names.streams.clone() {
        tasks.spawn(stream_loop(
            shared.clone(),
            subscriber.clone(),
            stream,
            events.clone(),
            stop.clone(),
        ));
    }
    drop((events, subscriber));
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap_or_else(|e| {
            Err(shared.transient(format!("a receive task ended abnormally: {e}")))
        });
        if let Err(e) = outcome {
            if result.is_ok() {
                result = Err(e);
            }
            stop.cancel();
        }
    }
    info!(instance = %shared.instance, "gcp_pubsub: stopped");
    result
}

/// Sleeps `d`; true when `shutdown` fired first.
async fn sleep_or_shutdown(shutdown: &Shutdown, d: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// How one stream ended.
enum Ended {
    /// Shutdown, or the event receiver closed.
    Stop,
    /// The stream failed.
    Failed(ProviderError),
    /// The stream ended without an error.
    Closed,
}

/// Streams from one subscription until `stop`, reopening it after failures.
async fn stream_loop(
    shared: Arc<Shared>,
    subscriber: Subscriber,
    stream: Stream,
    events: EventSender,
    stop: Shutdown,
) -> Result<(), ProviderError> {
    let cfg = &shared.config;
    let min_delay = Duration::from_millis(cfg.reconnect_min_ms);
    let max_delay = Duration::from_millis(cfg.reconnect_max_ms);
    let mut delay = min_delay;
    let what = format!("streaming from subscription {}", stream.subscription);
    let outstanding = Arc::new(Semaphore::new(cfg.max_outstanding_messages as usize));
    loop {
        let mut messages = subscriber
            .subscribe(&stream.subscription)
            .set_max_lease_extension(Duration::from_secs(u64::from(cfg.ack_deadline_secs)))
            .set_max_outstanding_messages(i64::from(cfg.max_outstanding_messages))
            .set_max_outstanding_bytes(i64::try_from(cfg.max_outstanding_bytes).unwrap_or(i64::MAX))
            .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
            .build();
        let flush = messages.shutdown_token();
        debug!(instance = %shared.instance, subscription = %stream.subscription, "gcp_pubsub: stream open");
        let ended = loop {
            // Client-side flow control: a message is only taken while fewer than
            // max_outstanding_messages handed-out ones await their verdict (the server
            // applies the same limit, the emulator does not).
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => break Ended::Stop,
                p = outstanding.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break Ended::Stop,
                },
            };
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => break Ended::Stop,
                n = messages.next() => n,
            };
            match next {
                Some(Ok((msg, handler))) => {
                    delay = min_delay;
                    shared.health.set_connected(true);
                    let Some(event) = to_event(&shared, stream.kind, msg, handler, permit) else {
                        continue;
                    };
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => break Ended::Stop,
                        sent = events.send(event) => if sent.is_err() {
                            info!(instance = %shared.instance, "gcp_pubsub: event receiver closed, stopping");
                            break Ended::Stop;
                        },
                    }
                }
                Some(Err(e)) => {
                    break Ended::Failed(classify(
                        &shared.instance,
                        Call {
                            field: stream.subscription_key,
                            what: &what,
                        },
                        &e,
                    ))
                }
                None => break Ended::Closed,
            }
        };
        match ended {
            Ended::Stop => {
                // Close the stream first, so nothing more (a redelivery of a message nacked
                // meanwhile) is delivered to a consumer that stopped reading; then send the
                // verdicts of what was handed out (the pipeline is still committing),
                // bounded so shutdown cannot hang. What stays unanswered is nacked by the
                // client library once its handle is dropped.
                drop(messages);
                shared.health.set_connected(false);
                if tokio::time::timeout(SHUTDOWN_FLUSH, flush.shutdown())
                    .await
                    .is_err()
                {
                    debug!(instance = %shared.instance, subscription = %stream.subscription, "gcp_pubsub: verdicts still pending at shutdown; Pub/Sub redelivers what stays unacked");
                }
                return Ok(());
            }
            Ended::Failed(ProviderError::NotFound { .. }) if cfg.create_if_missing => {
                warn!(instance = %shared.instance, subscription = %stream.subscription, "gcp_pubsub: subscription gone; creating it again");
                if let Err(e) = shared.ensure_resources().await {
                    if is_fatal(&e) {
                        return Err(e);
                    }
                    shared.health.set_error(e.to_string());
                }
            }
            Ended::Failed(e) if is_fatal(&e) => {
                warn!(instance = %shared.instance, subscription = %stream.subscription, "gcp_pubsub: {e}");
                return Err(e);
            }
            Ended::Failed(e) => {
                warn!(instance = %shared.instance, subscription = %stream.subscription, retry_in = ?delay, "gcp_pubsub: stream failed: {e}");
                shared.health.set_error(e.to_string());
            }
            Ended::Closed => {
                debug!(instance = %shared.instance, subscription = %stream.subscription, "gcp_pubsub: stream closed; reopening");
            }
        }
        if sleep_or_shutdown(&stop, delay).await {
            return Ok(());
        }
        delay = (delay * 2).min(max_delay);
    }
}

/// Converts a wire timestamp.
fn timestamp(t: &google_cloud_wkt::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds(), u32::try_from(t.nanos()).unwrap_or(0))
}

/// Decodes a message into an event carrying its lease, or acks it at once when it is not
/// in the stream's format.
fn to_event(
    shared: &Shared,
    kind: StreamKind,
    msg: Message,
    handler: Handler,
    permit: OwnedSemaphorePermit,
) -> Option<ProviderEvent> {
    let received_at = Utc::now();
    let decoded = inbound::decode(
        kind,
        &shared.names.device_id_attribute,
        &Received {
            data: &msg.data,
            attributes: &msg.attributes,
            message_id: &msg.message_id,
            publish_time: msg.publish_time.as_ref().and_then(timestamp),
            received_at,
        },
    );
    let attempt = handler.delivery_attempt();
    let max_attempts = shared
        .names
        .dead_letter_topic
        .as_ref()
        .filter(|_| kind == StreamKind::Telemetry)
        .map(|t| (t.clone(), shared.config.max_delivery_attempts));
    let instance = shared.instance.clone();
    let message_id = msg.message_id.clone();
    let nack_delay = Duration::from_millis(shared.config.nack_delay_ms);
    if attempt.is_some_and(|a| a > 1) {
        debug!(%instance, %message_id, attempt, "gcp_pubsub: redelivery");
    }
    let ack = AckHandle::new(move |verdict| match verdict {
        // The flow-control permit goes with the verdict.
        Ack::Ack => {
            handler.ack();
            drop(permit);
        }
        Ack::Nack(reason) => {
            match (&max_attempts, attempt) {
                (Some((topic, max)), Some(a)) if i64::from(a) >= i64::from(*max) => warn!(
                    %instance, %message_id, attempt = a, %reason,
                    "gcp_pubsub: nacked on its last delivery attempt: Pub/Sub moves it to {topic}"
                ),
                _ => {
                    debug!(%instance, %message_id, %reason, "gcp_pubsub: nacked; Pub/Sub redelivers it")
                }
            }
            // Held a moment before the nack: Pub/Sub (and its emulator, which has no
            // retry policy) would redeliver at once, and a store that is down for a few
            // seconds would spend every delivery attempt. The flow-control permit is held
            // with it, so intake slows while commits fail.
            if nack_delay.is_zero() {
                handler.nack();
                drop(permit);
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(nack_delay).await;
                    handler.nack();
                    drop(permit);
                });
            }
        }
    });
    match decoded {
        Inbound::Event(event) => {
            if let EventKind::Telemetry(t) = &event {
                if t.device_id.is_empty() {
                    warn!(instance = %shared.instance, message_id = %t.message_id, attribute = %shared.names.device_id_attribute,
                        "gcp_pubsub: telemetry without the device id attribute; the gateway dead-letters it");
                }
            }
            shared.devices.observe(&event, received_at);
            Some(ProviderEvent {
                instance: shared.instance.clone(),
                kind: event,
                ack,
            })
        }
        Inbound::Unparsable(reason) => {
            warn!(instance = %shared.instance, message_id = %msg.message_id, stream = kind.as_str(), %reason, "gcp_pubsub: unparsable message; the gateway dead-letters it");
            shared.count_dropped();
            Some(ProviderEvent {
                instance: shared.instance.clone(),
                kind: EventKind::Unusable {
                    what: kind.as_str().into(),
                    device_id: msg
                        .attributes
                        .get(&shared.names.device_id_attribute)
                        .cloned()
                        .unwrap_or_default(),
                    reason: format!("{reason} (Pub/Sub message {})", msg.message_id),
                    payload: msg.data.clone(),
                },
                ack,
            })
        }
    }
}
