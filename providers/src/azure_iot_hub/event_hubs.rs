//! The hub's Event Hubs-compatible built-in endpoint: telemetry and the non-telemetry
//! events IoT Hub routes there (connection state, lifecycle, twin changes), one receiver
//! per partition this replica owns, checkpoints so a restart (or the replica taking a
//! partition over) resumes where the last reader stopped.
//!
//! The reading side is behind [`EventSource`] / [`PartitionReceiver`] so the consumer
//! logic (mapping, ordering, ack-then-checkpoint, redelivery after a nack) is tested with
//! injected events; where checkpoints live is behind [`Checkpoints`]: the gateway keeps
//! them in its store (table `checkpoints`, scoped by instance, so a restarted gateway
//! resumes where it stopped); [`MemoryCheckpoints`] keeps them for the life of the process.
//! Which partitions this replica reads is decided in [`super::partitions`] (claims in a
//! [`PartitionOwnership`], balanced by [`super::balance`]); this file reads one partition.
//!
//! What each event becomes (telemetry, connection states ordered by `sequenceNumber`,
//! reported properties) is decided by [`super::inbound::map_event`], pure; this file is
//! the I/O around it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use super::inbound::HubEvent;
use super::inbound::{map_event, Mapped};
use super::ordering::{compare_sequence, SharedConnectionSeqs};
use crate::{Ack, AckHandle, EventSender, ProviderError, ProviderEvent, Shutdown};

/// How many events of one partition may wait for the gateway's ack at once. Large enough
/// for a whole group commit (`pipeline.batch_max_events`, 512 by default) per partition:
/// with 64 the gateway waited for acks with its store mostly idle.
pub const IN_FLIGHT: usize = 1024;

/// A partition's checkpoint is saved once this many events settled since the last save...
pub const CHECKPOINT_EVERY: usize = 512;
/// ...or once the oldest unsaved settled event is this old, whichever comes first. A save
/// is a store write that competes with the commits; saving per settle round cost one write
/// per few events. A crash redelivers at most this much (at-least-once, as before), and
/// every way out of a receiver (nack, error, close, shutdown) saves what settled.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// The newest settled offset of a partition (with its sequence number, the checkpoint's
/// position) that is not saved yet, and when to save it.
#[derive(Debug, Default)]
pub(super) struct Unsaved {
    offset: Option<(String, i64)>,
    count: usize,
    since: Option<Instant>,
}

impl Unsaved {
    /// Records that every event up to `offset` (sequence number `position`) is settled.
    fn settled(&mut self, offset: String, position: i64, now: Instant) {
        self.offset = Some((offset, position));
        self.count += 1;
        self.since.get_or_insert(now);
    }

    /// Whether the unsaved offset should be saved now.
    fn due(&self, now: Instant) -> bool {
        self.offset.is_some()
            && (self.count >= CHECKPOINT_EVERY
                || self
                    .since
                    .is_some_and(|s| now.duration_since(s) >= CHECKPOINT_INTERVAL))
    }

    /// The offset and position to save, if any; afterwards nothing is unsaved.
    fn take(&mut self) -> Option<(String, i64)> {
        self.count = 0;
        self.since = None;
        self.offset.take()
    }
}

/// Where a partition starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Position {
    /// Everything retained.
    Earliest,
    /// New events only.
    Latest,
    /// The events after this offset (a checkpoint).
    After(String),
}

/// Reads the endpoint (the real one: `azure_messaging_eventhubs`; tests: injected events).
#[async_trait]
pub trait EventSource: Send + Sync {
    /// The partition ids.
    async fn partitions(&self) -> Result<Vec<String>, ProviderError>;
    /// Opens a receiver on `partition` from `from`.
    async fn open(
        &self,
        partition: &str,
        from: Position,
    ) -> Result<Box<dyn PartitionReceiver>, ProviderError>;
}

/// One partition's receiver.
#[async_trait]
pub trait PartitionReceiver: Send {
    /// The next event; `Ok(None)` when the receiver closed (it is reopened from the last
    /// checkpoint).
    async fn next(&mut self) -> Result<Option<HubEvent>, ProviderError>;
}

pub use crate::{
    Checkpoints, MemoryCheckpoints, MemoryOwnership, PartitionClaim, PartitionOwnership,
};

/// Consumes the partitions of `source` this replica owns until `shutdown`: maps events,
/// sends them, and saves a partition's checkpoint (the offset) once every event up to it
/// was acked. A nack, a closed receiver or an error reopens the partition after the last
/// checkpoint, so uncommitted events are delivered again. Which partitions it owns is
/// balanced with the other replicas sharing [`Consumer::ownership`]
/// ([`Consumer::run`], in [`super::partitions`]).
pub struct Consumer {
    /// Provider instance.
    pub instance: String,
    /// Checkpoint key prefix (`{instance}/{consumer group}`).
    pub key_prefix: String,
    /// Start of a partition without a checkpoint.
    pub start: Position,
    /// Where checkpoints live.
    pub checkpoints: Arc<dyn Checkpoints>,
    /// Newest committed connection sequence per device (shared with Event Grid).
    pub connection_seq: SharedConnectionSeqs,
    /// Pause before reopening a partition after an error.
    pub retry: Duration,
    /// Where the replicas claim partitions (keyed by checkpoint key).
    pub ownership: Arc<dyn PartitionOwnership>,
    /// This replica's identity in its claims.
    pub owner: String,
    /// How often claims are listed, renewed and balanced.
    pub balance_interval: Duration,
    /// How long a claim holds unless renewed: after a replica dies, its partitions are
    /// taken over within this plus one interval.
    pub claim_expiry: Duration,
}

impl Consumer {
    /// The checkpoint key of `partition`.
    pub fn key(&self, partition: &str) -> String {
        format!("{}/{partition}", self.key_prefix)
    }

    /// Reads `partition` until `shutdown` (the partition's own stop: shutdown, or the
    /// partition lost), reopening it after its last checkpoint after each error; ends with
    /// an error only for one retrying cannot fix.
    pub(super) async fn partition(
        &self,
        source: Arc<dyn EventSource>,
        partition: &str,
        events: EventSender,
        shutdown: Shutdown,
    ) -> Result<(), ProviderError> {
        let key = self.key(partition);
        while !shutdown.is_cancelled() {
            let from = match self.checkpoints.load(&key).await {
                Ok(Some(offset)) => Position::After(offset),
                Ok(None) => self.start.clone(),
                Err(e) => {
                    tracing::warn!(provider = %self.instance, partition, error = %e, "loading the checkpoint failed; retrying");
                    self.pause(&shutdown).await;
                    continue;
                }
            };
            match self
                .drain(source.as_ref(), partition, from, &key, &events, &shutdown)
                .await
            {
                Ok(()) => {}
                Err(e @ ProviderError::Unauthorized { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(provider = %self.instance, partition, error = %e, "partition receiver stopped; reopening after the last checkpoint");
                    self.pause(&shutdown).await;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn pause(&self, shutdown: &Shutdown) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(self.retry) => {}
        }
    }

    /// Reads one receiver until it closes, fails, a nack arrives, or shutdown, then saves
    /// the checkpoint of what settled and was not saved yet.
    async fn drain(
        &self,
        source: &dyn EventSource,
        partition: &str,
        from: Position,
        key: &str,
        events: &EventSender,
        shutdown: &Shutdown,
    ) -> Result<(), ProviderError> {
        let mut unsaved = Unsaved::default();
        let read = self
            .read(source, partition, from, key, events, shutdown, &mut unsaved)
            .await;
        if let Some((offset, position)) = unsaved.take() {
            self.save(key, &offset, position).await?;
        }
        read
    }

    /// Saves a checkpoint; one refused because a newer one is stored (another replica read
    /// further, having taken the partition over) is left as it is.
    async fn save(&self, key: &str, offset: &str, position: i64) -> Result<(), ProviderError> {
        if !self.checkpoints.save(key, offset, position).await? {
            tracing::debug!(provider = %self.instance, key, position, "a newer checkpoint is stored (another replica read further); kept");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn read(
        &self,
        source: &dyn EventSource,
        partition: &str,
        from: Position,
        key: &str,
        events: &EventSender,
        shutdown: &Shutdown,
        unsaved: &mut Unsaved,
    ) -> Result<(), ProviderError> {
        let mut rx = source.open(partition, from).await?;
        // Events sent and not yet acked, oldest first: (offset, sequence number, verdict,
        // connection seq).
        type Pending = (
            String,
            i64,
            Option<oneshot::Receiver<Ack>>,
            Option<(String, String, DateTime<Utc>)>,
        );
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // Newest connection sequence sent on this receiver (committed or not yet).
        let mut in_flight: HashMap<String, (String, DateTime<Utc>)> = HashMap::new();
        loop {
            // Settle what is acked, in order; checkpoint the newest settled offset when due.
            loop {
                let full = pending.len() >= IN_FLIGHT;
                let Some((_, _, verdict, _)) = pending.front_mut() else {
                    break;
                };
                let ready = match verdict {
                    None => Some(Ack::Ack),
                    Some(v) => match v.try_recv() {
                        Ok(a) => Some(a),
                        Err(oneshot::error::TryRecvError::Empty) if full => {
                            // Window full: wait for the oldest.
                            let v = verdict.take().expect("checked Some");
                            Some(
                                v.await
                                    .unwrap_or(Ack::Nack("dropped without a verdict".into())),
                            )
                        }
                        Err(oneshot::error::TryRecvError::Empty) => None,
                        Err(oneshot::error::TryRecvError::Closed) => {
                            Some(Ack::Nack("dropped without a verdict".into()))
                        }
                    },
                };
                match ready {
                    None => break,
                    Some(Ack::Ack) => {
                        let (offset, position, _, seq) = pending.pop_front().expect("front exists");
                        if let Some((device, s, at)) = seq {
                            let mut map = self
                                .connection_seq
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let newer = map.get(&device).is_none_or(|(prev, _)| {
                                compare_sequence(&s, prev) == std::cmp::Ordering::Greater
                            });
                            if newer {
                                map.insert(device, (s, at));
                            }
                        }
                        unsaved.settled(offset, position, Instant::now());
                    }
                    Some(Ack::Nack(why)) => {
                        return Err(ProviderError::Transient {
                            instance: self.instance.clone(),
                            message: format!("an event of partition {partition} was not committed ({why}); it will be delivered again"),
                        });
                    }
                }
            }
            if unsaved.due(Instant::now()) {
                if let Some((offset, position)) = unsaved.take() {
                    self.save(key, &offset, position).await?;
                }
            }
            let quiet_work = !pending.is_empty() || unsaved.offset.is_some();
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                n = rx.next() => n?,
                // Wake up to settle acks and save checkpoints while the partition is quiet.
                () = tokio::time::sleep(Duration::from_millis(50)), if quiet_work => continue,
            };
            let Some(event) = next else {
                return Err(ProviderError::Transient {
                    instance: self.instance.clone(),
                    message: format!("the receiver of partition {partition} closed"),
                });
            };
            let mapped = {
                let committed = self
                    .connection_seq
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                map_event(&event, |device| {
                    let c = committed.get(device);
                    let f = in_flight.get(device);
                    match (c, f) {
                        (Some(c), Some(f))
                            if compare_sequence(&f.0, &c.0) == std::cmp::Ordering::Greater =>
                        {
                            Some(f.clone())
                        }
                        (Some(c), _) => Some(c.clone()),
                        (None, f) => f.cloned(),
                    }
                })
            };
            match mapped {
                Mapped::Skip(why) => {
                    tracing::debug!(provider = %self.instance, partition, reason = %why, "event skipped");
                    pending.push_back((event.offset, event.sequence_number, None, None));
                }
                Mapped::Event { kind, seq } => {
                    let (tx, verdict) = oneshot::channel();
                    let ev = ProviderEvent {
                        instance: self.instance.clone().into(),
                        kind,
                        ack: AckHandle::new(move |a| {
                            let _ = tx.send(a);
                        }),
                    };
                    if events.send(ev).await.is_err() {
                        return Ok(()); // the pipeline is gone: shutting down
                    }
                    if let Some((device, s, at)) = &seq {
                        in_flight.insert(device.clone(), (s.clone(), *at));
                    }
                    pending.push_back((event.offset, event.sequence_number, Some(verdict), seq));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use bytes::Bytes;
    use chrono::TimeZone as _;
    use serde_json::{json, Value};
    use tokio::sync::mpsc;

    use super::*;
    use crate::EventKind;

    /// Partitions of injected events; `open` serves from a position like Event Hubs.
    struct Injected {
        partitions: BTreeMap<String, Vec<HubEvent>>,
        opened: Mutex<Vec<(String, Position)>>,
    }

    struct Replay(VecDeque<HubEvent>);

    #[async_trait]
    impl PartitionReceiver for Replay {
        async fn next(&mut self) -> Result<Option<HubEvent>, ProviderError> {
            match self.0.pop_front() {
                Some(e) => Ok(Some(e)),
                // Like a live partition: nothing more for now.
                None => std::future::pending().await,
            }
        }
    }

    #[async_trait]
    impl EventSource for Injected {
        async fn partitions(&self) -> Result<Vec<String>, ProviderError> {
            Ok(self.partitions.keys().cloned().collect())
        }

        async fn open(
            &self,
            partition: &str,
            from: Position,
        ) -> Result<Box<dyn PartitionReceiver>, ProviderError> {
            self.opened
                .lock()
                .expect("lock")
                .push((partition.to_owned(), from.clone()));
            let all = self.partitions.get(partition).cloned().unwrap_or_default();
            let events: VecDeque<HubEvent> = match from {
                Position::Earliest => all.into(),
                Position::Latest => VecDeque::new(),
                Position::After(o) => all
                    .into_iter()
                    .skip_while(|e| e.offset != o)
                    .skip(1)
                    .collect(),
            };
            Ok(Box::new(Replay(events)))
        }
    }

    fn telemetry(partition: &str, n: i64, device: &str, message_id: Option<&str>) -> HubEvent {
        HubEvent {
            partition: partition.into(),
            offset: format!("{}", n * 100),
            sequence_number: n,
            enqueued_time: Utc.timestamp_millis_opt(1_700_000_000_000 + n).single(),
            message_id: message_id.map(str::to_owned),
            system: BTreeMap::from([
                ("iothub-connection-device-id".to_owned(), device.to_owned()),
                ("iothub-message-source".to_owned(), "Telemetry".to_owned()),
            ]),
            application: BTreeMap::new(),
            body: Bytes::from(format!(r#"{{"n": {n}}}"#)),
        }
    }

    fn lifecycle(partition: &str, n: i64, source: &str, op: &str, body: Value) -> HubEvent {
        HubEvent {
            system: BTreeMap::from([
                ("iothub-connection-device-id".to_owned(), "d1".to_owned()),
                ("iothub-message-source".to_owned(), source.to_owned()),
            ]),
            application: BTreeMap::from([
                ("opType".to_owned(), op.to_owned()),
                (
                    "operationTimestamp".to_owned(),
                    format!("2024-05-01T12:00:{n:02}Z"),
                ),
                ("deviceId".to_owned(), "d1".to_owned()),
            ]),
            body: Bytes::from(body.to_string()),
            ..telemetry(partition, n, "d1", None)
        }
    }

    fn consumer(checkpoints: Arc<dyn Checkpoints>) -> Arc<Consumer> {
        Arc::new(Consumer {
            instance: "hub".into(),
            key_prefix: "hub/$Default".into(),
            start: Position::Earliest,
            checkpoints,
            connection_seq: Arc::default(),
            retry: Duration::from_millis(20),
            ownership: Arc::new(MemoryOwnership::default()),
            owner: "test".into(),
            balance_interval: Duration::from_millis(50),
            claim_expiry: Duration::from_millis(500),
        })
    }

    /// Runs the consumer until `n` events arrived, answering each with `verdict(i)`.
    async fn collect(
        c: Arc<Consumer>,
        source: Arc<Injected>,
        n: usize,
        verdict: impl Fn(usize) -> bool,
    ) -> Vec<EventKind> {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = Shutdown::new();
        let task = tokio::spawn(c.clone().run(source, tx, stop.clone()));
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < n {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("events within 10 s")
                .expect("an event");
            if verdict(got.len()) {
                got.push(ev.kind);
                ev.ack.ack();
            } else {
                got.push(ev.kind);
                ev.ack.nack("test nack");
            }
        }
        // Let the last acks settle into checkpoints before stopping.
        let key = c.key("0");
        let checkpoints = c.checkpoints.clone();
        let want_any = got.len();
        for _ in 0..200 {
            if want_any == 0 || checkpoints.load(&key).await.ok().flatten().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        task.await.expect("joined").expect("clean stop");
        got
    }

    #[tokio::test]
    async fn telemetry_is_mapped_from_system_properties_and_the_checkpoint_follows_the_acks() {
        let source = Arc::new(Injected {
            partitions: BTreeMap::from([(
                "0".into(),
                vec![
                    telemetry("0", 1, "pump-1", Some("m-1")),
                    telemetry("0", 2, "pump-2", None),
                ],
            )]),
            opened: Mutex::default(),
        });
        let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
        let got = collect(consumer(checkpoints.clone()), source.clone(), 2, |_| true).await;
        match &got[..] {
            [EventKind::Telemetry(a), EventKind::Telemetry(b)] => {
                assert_eq!(
                    (a.device_id.as_str(), a.message_id.as_str()),
                    ("pump-1", "m-1")
                );
                assert_eq!(
                    (b.device_id.as_str(), b.message_id.as_str()),
                    ("pump-2", "eh:0:2")
                );
                assert_eq!(&a.payload[..], br#"{"n": 1}"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            checkpoints.load("hub/$Default/0").await.expect("load"),
            Some("200".into())
        );
    }

    #[test]
    fn a_checkpoint_is_due_after_enough_events_or_enough_time_whichever_comes_first() {
        let t0 = Instant::now();
        let mut u = Unsaved::default();
        assert!(!u.due(t0), "nothing settled, nothing to save");
        for i in 0..CHECKPOINT_EVERY - 1 {
            u.settled(i.to_string(), i as i64, t0);
        }
        assert!(!u.due(t0 + Duration::from_millis(999)));
        assert!(
            u.due(t0 + CHECKPOINT_INTERVAL),
            "the oldest unsaved is 1 s old"
        );
        u.settled("last".into(), 600, t0);
        assert!(u.due(t0), "{CHECKPOINT_EVERY} settled since the last save");
        assert_eq!(u.take(), Some(("last".into(), 600)));
        assert!(
            !u.due(t0 + CHECKPOINT_INTERVAL * 2),
            "taken: nothing unsaved"
        );
        u.settled("next".into(), 601, t0 + CHECKPOINT_INTERVAL * 2);
        assert!(!u.due(t0 + CHECKPOINT_INTERVAL * 2 + Duration::from_millis(10)));
    }

    /// Counts the saves of an in-memory checkpoint store.
    #[derive(Default)]
    struct CountingCheckpoints {
        inner: MemoryCheckpoints,
        saves: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl Checkpoints for CountingCheckpoints {
        async fn load(&self, key: &str) -> Result<Option<String>, ProviderError> {
            self.inner.load(key).await
        }
        async fn save(&self, key: &str, value: &str, position: i64) -> Result<bool, ProviderError> {
            self.saves.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.save(key, value, position).await
        }
    }

    #[tokio::test]
    async fn checkpoints_are_saved_per_few_hundred_events_and_the_last_one_on_stop() {
        let n = 2_000;
        let events = (1..=n).map(|i| telemetry("0", i, "d", None)).collect();
        let source = Arc::new(Injected {
            partitions: BTreeMap::from([("0".into(), events)]),
            opened: Mutex::default(),
        });
        let counting = Arc::new(CountingCheckpoints::default());
        let checkpoints: Arc<dyn Checkpoints> = counting.clone();
        let got = collect(consumer(checkpoints.clone()), source, n as usize, |_| true).await;
        assert_eq!(got.len(), n as usize);
        let saves = counting.saves.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (1..=12).contains(&saves),
            "{n} events were checkpointed in {saves} saves; expected one per {CHECKPOINT_EVERY} events or second, plus the one on stop"
        );
        assert_eq!(
            checkpoints.load("hub/$Default/0").await.expect("load"),
            Some(format!("{}", n * 100)),
            "the stop saved the newest settled offset"
        );
    }

    #[tokio::test]
    async fn a_restart_resumes_after_the_last_checkpoint() {
        let events = vec![
            telemetry("0", 1, "d", None),
            telemetry("0", 2, "d", None),
            telemetry("0", 3, "d", None),
        ];
        let source = Arc::new(Injected {
            partitions: BTreeMap::from([("0".into(), events)]),
            opened: Mutex::default(),
        });
        let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
        checkpoints
            .save("hub/$Default/0", "100", 1)
            .await
            .expect("save");
        let got = collect(consumer(checkpoints.clone()), source.clone(), 2, |_| true).await;
        let ids: Vec<String> = got
            .iter()
            .map(|k| match k {
                EventKind::Telemetry(t) => t.message_id.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ids,
            ["eh:0:2", "eh:0:3"],
            "event 1 was checkpointed before the restart"
        );
        assert_eq!(
            source.opened.lock().expect("lock")[0],
            ("0".into(), Position::After("100".into()))
        );
    }

    #[tokio::test]
    async fn a_nacked_event_is_delivered_again_from_the_last_checkpoint() {
        let events = vec![telemetry("0", 1, "d", None), telemetry("0", 2, "d", None)];
        let source = Arc::new(Injected {
            partitions: BTreeMap::from([("0".into(), events)]),
            opened: Mutex::default(),
        });
        let checkpoints: Arc<dyn Checkpoints> = Arc::new(MemoryCheckpoints::default());
        // Ack event 1, nack event 2, then ack its redelivery.
        let got = collect(consumer(checkpoints.clone()), source.clone(), 3, |i| i != 1).await;
        let ids: Vec<String> = got
            .iter()
            .map(|k| match k {
                EventKind::Telemetry(t) => t.message_id.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, ["eh:0:1", "eh:0:2", "eh:0:2"]);
        let opened = source.opened.lock().expect("lock").clone();
        assert_eq!(
            opened[1],
            ("0".into(), Position::After("100".into())),
            "reopened after the acked event: {opened:?}"
        );
        assert_eq!(
            checkpoints.load("hub/$Default/0").await.expect("load"),
            Some("200".into())
        );
    }

    #[tokio::test]
    async fn non_telemetry_events_become_connection_states_and_reported_properties_in_sequence_order(
    ) {
        let seq = |n: u8| json!({"sequenceNumber": format!("{:064X}", n)});
        let events = vec![
            lifecycle(
                "0",
                1,
                "deviceLifecycleEvents",
                "createDeviceIdentity",
                json!({"deviceId": "d1", "properties": {"reported": {"fw": "1.0", "$version": 1}}}),
            ),
            lifecycle(
                "0",
                2,
                "deviceConnectionStateEvents",
                "deviceConnected",
                seq(5),
            ),
            // A late, older disconnect: skipped.
            lifecycle(
                "0",
                3,
                "deviceConnectionStateEvents",
                "deviceDisconnected",
                seq(4),
            ),
            lifecycle(
                "0",
                4,
                "twinChangeEvents",
                "updateTwin",
                json!({"version": 3, "properties": {"reported": {"fw": "1.1", "$metadata": {}}}}),
            ),
            lifecycle(
                "0",
                5,
                "twinChangeEvents",
                "updateTwin",
                json!({"version": 4, "properties": {"desired": {"x": 1}}}),
            ),
            HubEvent {
                system: BTreeMap::from([
                    ("iothub-connection-device-id".to_owned(), "d1".to_owned()),
                    ("iothub-connection-module-id".to_owned(), "m1".to_owned()),
                    (
                        "iothub-message-source".to_owned(),
                        "deviceConnectionStateEvents".to_owned(),
                    ),
                ]),
                ..lifecycle(
                    "0",
                    6,
                    "deviceConnectionStateEvents",
                    "deviceDisconnected",
                    seq(9),
                )
            },
            lifecycle(
                "0",
                7,
                "deviceLifecycleEvents",
                "deleteDeviceIdentity",
                json!({"deviceId": "d1"}),
            ),
        ];
        let source = Arc::new(Injected {
            partitions: BTreeMap::from([("0".into(), events)]),
            opened: Mutex::default(),
        });
        let got = collect(
            consumer(Arc::new(MemoryCheckpoints::default())),
            source,
            4,
            |_| true,
        )
        .await;
        let at = |s: u32| {
            Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, s)
                .single()
                .expect("time")
        };
        assert_eq!(
            got,
            vec![
                EventKind::ReportedProperties {
                    device_id: "d1".into(),
                    properties: json!({"fw": "1.0"}),
                    at: at(1)
                },
                EventKind::Connection {
                    device_id: "d1".into(),
                    connected: true,
                    at: at(2)
                },
                EventKind::ReportedProperties {
                    device_id: "d1".into(),
                    properties: json!({"fw": "1.1"}),
                    at: at(4)
                },
                EventKind::Connection {
                    device_id: "d1".into(),
                    connected: false,
                    at: at(7)
                },
            ]
        );
    }
}
