//! One MQTT session driver for every MQTT-speaking provider (`mqtt`, `aws_iot_core`): the
//! only code that polls a rumqttc event loop. What differs per provider (its
//! subscriptions, how a publish becomes an event, which refusals are fatal) comes in
//! through [`Hooks`]; the ack ordering itself is the pure state machine of
//! [`super::acks`].
//!
//! - Manual acks: every QoS 1 message becomes an event whose [`AckHandle`] hands the
//!   publish to the acker task; only [`crate::Ack::Ack`] sends the PUBACK, in arrival
//!   order and only on the session it belongs to. A nack or a dropped handle leaves the
//!   message unacknowledged, and MQTT redelivers unacknowledged messages only when a
//!   session resumes. So after a nack the loop resumes the session (closes and reopens the
//!   connection) once `reconnect_max_ms` have passed, checked at the next packet or
//!   keep-alive ping.
//! - The verdict channel is bounded: a handle reserves its slot when its publish arrives,
//!   so giving a verdict never blocks nor fails, and a pipeline sitting on more verdicts
//!   than the channel holds slows the receive loop down instead of growing a queue.
//! - Subscriptions are (re)made on every CONNACK ([`Hooks::on_connack`]).
//! - On a connection error: health disconnected with the error, wait `reconnect_min_ms`
//!   doubling up to `reconnect_max_ms` (reset by a CONNACK), poll again. A refusal
//!   retrying cannot fix ([`Hooks::fatal`]) ends the loop with an error.
//! - On shutdown: send the acks already given, DISCONNECT (the session stays), return.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubAck};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::acks::{AckOrder, SessionClock, Step, Tag, Verdict};
use crate::observed::HealthCell;
use crate::{AckHandle, EventSender, InstanceName, ProviderError, ProviderEvent, Shutdown};

/// How long shutdown waits to flush acks and the DISCONNECT.
pub(crate) const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// What one provider adds to the shared session driver.
pub(crate) trait Hooks: Send {
    /// The provider kind, as log lines start (`mqtt`, `aws_iot_core`).
    fn name(&self) -> &'static str;
    /// Who redelivers nacked messages, for the log line (`the broker`, `AWS`).
    fn peer(&self) -> &'static str;
    /// The instance this session belongs to.
    fn instance(&self) -> &InstanceName;
    /// Where connection health goes.
    fn health(&self) -> &HealthCell;
    /// A CONNACK arrived: queue the subscriptions at the front of `eventloop`.
    fn on_connack(&mut self, eventloop: &mut EventLoop);
    /// A SUBACK arrived: turn healthy, report refused filters.
    fn on_suback(&mut self, suback: &SubAck);
    /// Decodes a publish into an event carrying `handle`, or resolves `handle` at once
    /// when there is nothing to report.
    fn to_event(&self, publish: &Publish, handle: AckHandle) -> Option<ProviderEvent>;
    /// A refusal retrying cannot fix, as the error `run` returns.
    fn fatal(&self, e: &ConnectionError) -> Option<ProviderError>;
    /// A connection error in words an operator can act on.
    fn describe(&self, e: &ConnectionError) -> String;
}

/// How the driver runs one session.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// First reconnect delay.
    pub(crate) reconnect_min: Duration,
    /// Longest reconnect delay, and how long a nack waits for its session resume.
    pub(crate) reconnect_max: Duration,
    /// Verdicts that may be on their way to the acker at once.
    pub(crate) ack_capacity: usize,
}

/// Runs the session until `shutdown`; see the module docs.
pub(crate) async fn drive<H: Hooks>(
    hooks: &mut H,
    client: AsyncClient,
    mut eventloop: EventLoop,
    settings: Settings,
    events: EventSender,
    shutdown: Shutdown,
) -> Result<(), ProviderError> {
    let name = hooks.name();
    let clock = Arc::new(SessionClock::default());
    let (ack_tx, ack_rx) = mpsc::channel(settings.ack_capacity.max(1));
    let acker_stop = shutdown.child_token();
    let acker = tokio::spawn(acker(
        client.clone(),
        ack_rx,
        clock.clone(),
        acker_stop.clone(),
        name,
    ));
    let min_delay = settings.reconnect_min;
    let max_delay = settings.reconnect_max;
    let mut delay = min_delay;

    let result = loop {
        let polled = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                delay = min_delay;
                clock.connected(connack.session_present);
                info!(instance = %hooks.instance(), session_present = connack.session_present, "{name}: connected, subscribing");
                hooks.on_connack(&mut eventloop);
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => hooks.on_suback(&suback),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let handle = if publish.qos == QoS::AtMostOnce {
                    AckHandle::none()
                } else {
                    let tag = clock.tag();
                    let permit = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break Ok(()),
                        permit = ack_tx.clone().reserve_owned() => permit.ok(),
                    };
                    verdict_handle(permit, tag, publish.clone())
                };
                if let Some(event) = hooks.to_event(&publish, handle) {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break Ok(()),
                        sent = events.send(event) => if sent.is_err() {
                            info!(instance = %hooks.instance(), "{name}: event receiver closed, stopping");
                            break Ok(());
                        },
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(fatal) = hooks.fatal(&e) {
                    hooks.health().set_error(fatal.to_string());
                    break Err(fatal);
                }
                let msg = hooks.describe(&e);
                warn!(instance = %hooks.instance(), retry_in = ?delay, "{name}: connection lost: {msg}");
                hooks.health().set_error(msg);
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max_delay);
                continue;
            }
        }
        // Nacked messages come back only when the session resumes: drop the connection
        // (the next poll reconnects with the same session) once `max_delay` has passed
        // since the first nack.
        if clock.resume_due(Instant::now(), max_delay) {
            info!(instance = %hooks.instance(), "{name}: resuming the session so {} redelivers nacked messages", hooks.peer());
            eventloop.clean();
        }
    };

    acker_stop.cancel();
    if tokio::time::timeout(SHUTDOWN_FLUSH, acker).await.is_err() {
        debug!(instance = %hooks.instance(), "{name}: acker did not finish in time");
    }
    disconnect(&client, &mut eventloop).await;
    info!(instance = %hooks.instance(), "{name}: stopped");
    result
}

/// The handle of a QoS 1 publish: its verdict goes to the acker through the slot
/// reserved for it. Without a slot (the acker is gone once run stopped) the verdict is
/// dropped and the broker redelivers, as for a nack.
fn verdict_handle(
    permit: Option<mpsc::OwnedPermit<Verdict<Publish>>>,
    tag: Tag,
    publish: Publish,
) -> AckHandle {
    AckHandle::new(move |verdict| {
        if let Some(permit) = permit {
            permit.send(Verdict {
                tag,
                verdict,
                publish,
            });
        }
    })
}

/// How often the acker retries PUBACKs the client's request channel had no room for.
const ACK_RETRY: Duration = Duration::from_millis(2);

/// Sends the PUBACK of acked publishes of the current session, in arrival order (see
/// [`super::acks`]); notes nacks. On stop it drains the acks already given, then ends.
///
/// It never waits for room in the client's request channel: that channel is emptied only
/// while the receive loop polls the event loop, and the receive loop may itself be
/// waiting for a verdict slot, which only this task frees by receiving. Waiting here
/// deadlocked the session after a burst of nacks (PostgreSQL restarting under load). So
/// PUBACKs the channel cannot take now wait in `unsent` (in order, at most one per
/// unacknowledged publish) and are retried every [`ACK_RETRY`] while verdicts keep
/// being received.
async fn acker(
    client: AsyncClient,
    mut rx: mpsc::Receiver<Verdict<Publish>>,
    clock: Arc<SessionClock>,
    stop: Shutdown,
    name: &'static str,
) {
    let mut order = AckOrder::default();
    let mut unsent: std::collections::VecDeque<(u64, Publish)> = std::collections::VecDeque::new();
    loop {
        flush(&client, &clock, &mut unsent, name);
        let verdict = tokio::select! {
            biased;
            verdict = rx.recv() => verdict,
            () = tokio::time::sleep(ACK_RETRY), if !unsent.is_empty() => continue,
            _ = stop.cancelled() => {
                while let Ok(verdict) = rx.try_recv() {
                    order.push(verdict);
                }
                while let Some(step) = order.pop(&clock, Instant::now()) {
                    if let Step::Send(publish) = step {
                        unsent.push_back((clock.session(), publish));
                    }
                }
                // The event loop is no longer polled: what does not fit now is redelivered.
                flush(&client, &clock, &mut unsent, name);
                return;
            }
        };
        let Some(verdict) = verdict else { return };
        order.push(verdict);
        while let Some(step) = order.pop(&clock, Instant::now()) {
            match step {
                Step::Send(publish) => unsent.push_back((clock.session(), publish)),
                Step::Stale(publish) => {
                    debug!(
                        pkid = publish.pkid,
                        "{name}: ack of an earlier session dropped"
                    );
                }
                Step::Nacked(publish, reason) => {
                    debug!(pkid = publish.pkid, %reason, "{name}: nack, redelivered on the next session resume");
                }
            }
        }
    }
}

/// Hands the waiting PUBACKs to the client in order, as far as its request channel has
/// room; drops those of a session that ended meanwhile (their packet ids name other
/// messages now).
fn flush(
    client: &AsyncClient,
    clock: &SessionClock,
    unsent: &mut std::collections::VecDeque<(u64, Publish)>,
    name: &'static str,
) {
    while let Some((session, publish)) = unsent.front() {
        if *session != clock.session() {
            debug!(
                pkid = publish.pkid,
                "{name}: ack of an earlier session dropped"
            );
            unsent.pop_front();
            continue;
        }
        if client.try_ack(publish).is_err() {
            return;
        }
        unsent.pop_front();
    }
}

/// Sends DISCONNECT (normal: the broker keeps the session) after what is queued, then
/// reads until the broker closes the connection, within [`SHUTDOWN_FLUSH`]. Closing our
/// side with unread input would reset the connection, and the broker could lose the
/// last acks and the DISCONNECT.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
        // Until the broker's EOF (an error); incoming publishes stay unacked for the next run.
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::MqttOptions;

    use super::*;
    use crate::Ack;

    /// The deadlock this guards against: the receive loop waits for a verdict slot, which
    /// only the acker frees by receiving, while the acker waits for room in the client's
    /// request channel, which only the receive loop empties. With the event loop never
    /// polled and a request channel of one, the acker must still take every verdict.
    #[tokio::test]
    async fn the_acker_keeps_taking_verdicts_while_the_request_channel_is_full() {
        let (client, _eventloop) =
            AsyncClient::new(MqttOptions::new("acker-test", "127.0.0.1", 1), 1);
        let clock = Arc::new(SessionClock::default());
        clock.connected(false);
        let (tx, rx) = mpsc::channel(1);
        let stop = Shutdown::new();
        let acker = tokio::spawn(acker(client, rx, clock.clone(), stop.clone(), "test"));
        let sent = tokio::time::timeout(Duration::from_secs(5), async {
            for n in 0..100u16 {
                let mut publish = Publish::new("devices/d/telemetry", QoS::AtLeastOnce, "x", None);
                publish.pkid = n + 1;
                let verdict = Verdict {
                    tag: clock.tag(),
                    verdict: Ack::Ack,
                    publish,
                };
                tx.send(verdict).await.expect("the acker is running");
            }
        })
        .await;
        assert!(
            sent.is_ok(),
            "the acker stopped taking verdicts while its PUBACKs could not be queued"
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), acker)
            .await
            .expect("the acker stops")
            .expect("no panic");
    }
}
