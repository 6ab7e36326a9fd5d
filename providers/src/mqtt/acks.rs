//! The ordered-acknowledgement state machine of an MQTT session, apart from the I/O
//! (as rumqttc keeps its protocol `state.rs` apart from its framing).
//!
//! Every QoS 1 publish is tagged on arrival with the session it arrived on and its place
//! in the order of arrival ([`SessionClock::tag`]). Its verdict comes back later, in any
//! order, from the pipeline; [`AckOrder`] hands the verdicts out again in arrival order
//! (MQTT requires PUBACKs in the order of the PUBLISHes, and some brokers drop the
//! connection otherwise) and says what to do with each ([`Step`]):
//! - an ack of the current session: send the PUBACK;
//! - an ack of an earlier session: drop it, its packet id now names another message;
//! - a nack: send nothing, and note when the first unresolved nack arrived, since MQTT
//!   redelivers unacknowledged messages only when a session resumes
//!   ([`SessionClock::resume_due`]).
//!
//! Nothing here does I/O or spawns: [`crate::mqtt::session`] drives it for both the
//! `mqtt` and the `aws_iot_core` receive loops.
//!
//! Owns: the session number, the arrival numbers, the reorder buffer, the nack clock.
//! Must not touch: the rumqttc client or event loop, the event channel.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::observed::lock;
use crate::Ack;

/// Where a publish belongs: its session and its place in the order of arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tag {
    /// Arrival number among the QoS 1 publishes of this run.
    pub(crate) seq: u64,
    /// The session it arrived on.
    pub(crate) session: u64,
}

/// A verdict on one publish, on its way to the acker.
#[derive(Debug)]
pub(crate) struct Verdict<P> {
    /// Where the publish belongs.
    pub(crate) tag: Tag,
    /// What the pipeline decided.
    pub(crate) verdict: Ack,
    /// The publish (what the PUBACK is built from).
    pub(crate) publish: P,
}

/// What to do with the next verdict in arrival order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<P> {
    /// Acked on the current session: send its PUBACK.
    Send(P),
    /// Acked, but on an earlier session: drop it.
    Stale(P),
    /// Nacked: send nothing; the session resume redelivers it.
    Nacked(P, String),
}

/// Session bookkeeping shared by the receive loop (which tags publishes and resumes the
/// session) and the acker (which resolves verdicts).
#[derive(Debug, Default)]
pub(crate) struct SessionClock {
    /// Bumped on every CONNACK without a present session.
    session: AtomicU64,
    /// When the first unresolved nack arrived (cleared by a session resume).
    nacked_since: Mutex<Option<Instant>>,
    /// Arrival number of the next QoS 1/2 publish (orders the PUBACKs).
    next_seq: AtomicU64,
}

impl SessionClock {
    /// A CONNACK arrived: a new session unless the broker kept the old one. Either way
    /// the session resumed, so pending nacks are being redelivered.
    pub(crate) fn connected(&self, session_present: bool) {
        if !session_present {
            self.session.fetch_add(1, Ordering::AcqRel);
        }
        *lock(&self.nacked_since) = None;
    }

    /// Tags a QoS 1 publish that just arrived.
    pub(crate) fn tag(&self) -> Tag {
        let session = self.session.load(Ordering::Acquire);
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        Tag { seq, session }
    }

    /// The number of the session now open.
    pub(crate) fn session(&self) -> u64 {
        self.session.load(Ordering::Acquire)
    }

    /// Whether `tag` belongs to the session now open.
    pub(crate) fn is_current(&self, tag: Tag) -> bool {
        self.session.load(Ordering::Acquire) == tag.session
    }

    /// Notes a nack at `now` (only the first unresolved one counts).
    pub(crate) fn note_nack(&self, now: Instant) {
        lock(&self.nacked_since).get_or_insert(now);
    }

    /// True, once, when `after` has passed since the first unresolved nack: the caller
    /// then resumes the session so the broker redelivers.
    pub(crate) fn resume_due(&self, now: Instant, after: Duration) -> bool {
        let mut nacked = lock(&self.nacked_since);
        if nacked.is_some_and(|since| now.saturating_duration_since(since) >= after) {
            *nacked = None;
            return true;
        }
        false
    }
}

/// The reorder buffer: verdicts in, steps out in arrival order.
#[derive(Debug)]
pub(crate) struct AckOrder<P> {
    /// The arrival number whose verdict goes out next.
    next: u64,
    /// Verdicts that came before their turn.
    waiting: BTreeMap<u64, Verdict<P>>,
}

impl<P> Default for AckOrder<P> {
    fn default() -> Self {
        Self {
            next: 0,
            waiting: BTreeMap::new(),
        }
    }
}

impl<P> AckOrder<P> {
    /// Takes a verdict, in any order.
    pub(crate) fn push(&mut self, verdict: Verdict<P>) {
        self.waiting.insert(verdict.tag.seq, verdict);
    }

    /// The next step in arrival order, if its verdict is in; a nack is noted on `clock`
    /// at `now`.
    pub(crate) fn pop(&mut self, clock: &SessionClock, now: Instant) -> Option<Step<P>> {
        let v = self.waiting.remove(&self.next)?;
        self.next += 1;
        Some(match v.verdict {
            Ack::Ack if clock.is_current(v.tag) => Step::Send(v.publish),
            Ack::Ack => Step::Stale(v.publish),
            Ack::Nack(reason) => {
                clock.note_nack(now);
                Step::Nacked(v.publish, reason)
            }
        })
    }

    /// Verdicts held back, waiting for an earlier one.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(tag: Tag, verdict: Ack) -> Verdict<u64> {
        Verdict {
            tag,
            verdict,
            publish: tag.seq,
        }
    }

    fn drain(order: &mut AckOrder<u64>, clock: &SessionClock) -> Vec<Step<u64>> {
        std::iter::from_fn(|| order.pop(clock, Instant::now())).collect()
    }

    #[test]
    fn acks_given_out_of_order_go_out_in_arrival_order() {
        let clock = SessionClock::default();
        clock.connected(false);
        let tags: Vec<Tag> = (0..3).map(|_| clock.tag()).collect();
        let mut order = AckOrder::default();
        order.push(verdict(tags[2], Ack::Ack));
        order.push(verdict(tags[1], Ack::Ack));
        assert!(drain(&mut order, &clock).is_empty(), "0 is not in yet");
        assert_eq!(order.held(), 2);
        order.push(verdict(tags[0], Ack::Ack));
        assert_eq!(
            drain(&mut order, &clock),
            vec![Step::Send(0), Step::Send(1), Step::Send(2)]
        );
        assert_eq!(order.held(), 0);
    }

    #[test]
    fn an_ack_of_an_earlier_session_is_dropped_but_a_resumed_session_keeps_its_acks() {
        let clock = SessionClock::default();
        clock.connected(false);
        let kept = clock.tag();
        clock.connected(true);
        let lost = clock.tag();
        clock.connected(false);
        let fresh = clock.tag();
        let mut order = AckOrder::default();
        for t in [kept, lost, fresh] {
            order.push(verdict(t, Ack::Ack));
        }
        assert_eq!(
            drain(&mut order, &clock),
            vec![Step::Stale(0), Step::Stale(1), Step::Send(2)]
        );
        assert_eq!(
            kept.session, lost.session,
            "a present session keeps its number"
        );
    }

    #[test]
    fn a_nack_holds_its_place_and_starts_the_resume_clock_once() {
        let clock = SessionClock::default();
        clock.connected(false);
        let (a, b) = (clock.tag(), clock.tag());
        let mut order = AckOrder::default();
        order.push(verdict(b, Ack::Ack));
        order.push(verdict(a, Ack::Nack("store down".into())));
        assert_eq!(
            drain(&mut order, &clock),
            vec![Step::Nacked(0, "store down".into()), Step::Send(1)]
        );
        let start = Instant::now();
        let after = Duration::from_secs(5);
        assert!(!clock.resume_due(start, after), "too early");
        assert!(clock.resume_due(start + after, after));
        assert!(!clock.resume_due(start + after * 2, after), "only once");
    }

    #[test]
    fn a_reconnect_clears_the_pending_resume() {
        let clock = SessionClock::default();
        let start = Instant::now();
        clock.note_nack(start);
        clock.connected(true);
        assert!(!clock.resume_due(start + Duration::from_secs(60), Duration::ZERO));
    }

    #[test]
    fn only_the_first_unresolved_nack_sets_the_resume_time() {
        let clock = SessionClock::default();
        let start = Instant::now();
        let after = Duration::from_secs(10);
        clock.note_nack(start);
        clock.note_nack(start + Duration::from_secs(9));
        assert!(clock.resume_due(start + after, after));
    }
}
