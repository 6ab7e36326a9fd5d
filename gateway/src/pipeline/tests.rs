//! Group commit against a real SQLite store: a batch commits exactly what one commit per
//! event would, every event is acknowledged only after the commit, and a failing commit
//! acknowledges none.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Duration, TimeZone, Utc};
use iotgw_config::Config;
use iotgw_providers::{Ack, AckHandle, EventKind, ProviderEvent, Telemetry};
use iotgw_registry::{
    AlertFilter, DeviceId, IsSimulated, NewDevice, PageRequest, SqliteStore, Store,
};
use proptest::prelude::*;
use tokio::sync::Notify;

use super::batch::{self, Batch};
use super::prepare::Preparer;
use crate::core::Core;
use crate::live::Live;
use crate::metrics::Metrics;

type Verdicts = Arc<Mutex<Vec<(String, Ack)>>>;

fn core(store: Arc<dyn Store>) -> Core {
    let config = Config::embedded_default();
    Core::new(
        store,
        Arc::new(Metrics::new()),
        Arc::new(Notify::new()),
        "test".into(),
        Live::new(1, Arc::new(config), BTreeMap::new()),
    )
}

async fn registered(store: &dyn Store, ids: &[&str]) {
    for id in ids {
        let id = DeviceId::parse(id).expect("id");
        store
            .begin_registration(&NewDevice {
                device_id: id.clone(),
                name: id.to_string(),
                provider_instance: "local".into(),
                category: None,
                account: None,
                settings: None,
                tags: BTreeMap::new(),
                is_simulated: IsSimulated::No,
            })
            .await
            .expect("begin");
        store
            .finish_registration(&id, Ok(None))
            .await
            .expect("finish");
    }
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0)
        .single()
        .expect("time")
        + Duration::seconds(secs)
}

/// One reading; `payload` is sent as given.
fn reading(
    device: &str,
    message_id: &str,
    payload: &str,
    secs: i64,
    verdicts: &Verdicts,
) -> ProviderEvent {
    let (seen, tag) = (verdicts.clone(), format!("{device}/{message_id}"));
    ProviderEvent {
        instance: "local".into(),
        kind: EventKind::Telemetry(Telemetry {
            device_id: device.into(),
            message_id: message_id.into(),
            payload: Bytes::from(payload.to_owned()),
            received_at: at(secs),
        }),
        ack: AckHandle::new(move |a| seen.lock().expect("verdicts").push((tag, a))),
    }
}

fn temperature(t: f64) -> String {
    format!(r#"{{"temperature":{t}}}"#)
}

/// Prepares `events` as one batch and commits it, as the pipeline does.
async fn commit_as_one_batch(core: &Core, events: Vec<ProviderEvent>) {
    let preparer = Preparer::new(core.live());
    let mut b = Batch::default();
    for ev in events {
        preparer.add(&core.metrics, &mut b, ev);
    }
    batch::commit(core, b).await;
}

/// Everything a commit leaves in the registry, without ids and wall-clock times.
#[derive(Debug, PartialEq)]
struct Snapshot {
    alerts: Vec<(String, Option<String>, String, String)>,
    commands: Vec<(String, String, String)>,
    outbox: Vec<(String, u64)>,
    dead_letters: Vec<(String, String, Option<String>, Option<String>)>,
    devices: Vec<(String, i32, Option<DateTime<Utc>>)>,
}

async fn snapshot(store: &dyn Store) -> Snapshot {
    let page = PageRequest {
        after: None,
        limit: 1000,
    };
    let alerts = store
        .list_alerts(&AlertFilter::default(), &page)
        .await
        .expect("alerts")
        .items;
    let token_of: BTreeMap<_, _> = alerts
        .iter()
        .map(|a| (a.id, a.alert_token.clone()))
        .collect();
    let mut a: Vec<_> = alerts
        .iter()
        .map(|a| {
            (
                a.alert_token.clone(),
                a.parent_alert_token.clone(),
                a.device_id.to_string(),
                a.description.clone(),
            )
        })
        .collect();
    a.sort();
    let mut commands: Vec<_> = store
        .list_commands(&Default::default(), &page)
        .await
        .expect("commands")
        .items
        .iter()
        .map(|c| {
            (
                c.device_id.to_string(),
                c.name.clone(),
                c.parent_alert
                    .and_then(|p| token_of.get(&p).cloned())
                    .unwrap_or_default(),
            )
        })
        .collect();
    commands.sort();
    let mut dead: Vec<_> = store
        .list_dead_letters(&page)
        .await
        .expect("dead letters")
        .items
        .into_iter()
        .map(|d| (d.source, d.reason, d.device_id, d.message_id))
        .collect();
    dead.sort();
    let devices = store
        .list_devices(&Default::default(), &page)
        .await
        .expect("devices")
        .items
        .into_iter()
        .map(|d| {
            (
                d.device_id.to_string(),
                d.registration_status.value(),
                d.last_activity_time,
            )
        })
        .collect();
    let mut outbox = store.outbox_depth().await.expect("outbox");
    outbox.sort();
    Snapshot {
        alerts: a,
        commands,
        outbox,
        dead_letters: dead,
        devices,
    }
}

async fn memory_store() -> Arc<dyn Store> {
    Arc::new(SqliteStore::memory().await.expect("store"))
}

#[tokio::test]
async fn a_batch_with_a_redelivery_a_child_and_a_poison_event_commits_what_single_commits_would_and_acks_all(
) {
    let events = |v: &Verdicts| {
        vec![
            reading("pump-1", "m-1", &temperature(80.0), 0, v),
            reading("pump-1", "m-1", &temperature(80.0), 0, v), // redelivery
            reading("pump-1", "m-2", &temperature(81.0), 5, v), // child of m-1
            reading("pump-1", "m-3", "{not json", 6, v),        // poison
            reading("ghost-9", "m-4", &temperature(90.0), 7, v), // unknown device
            reading("pump-2", "m-5", &temperature(85.0), 8, v), // another device
            reading("pump-2", "m-6", &temperature(20.0), 9, v), // no alert
        ]
    };
    let batched = core(memory_store().await);
    registered(batched.store.as_ref(), &["pump-1", "pump-2"]).await;
    let batch_verdicts = Verdicts::default();
    commit_as_one_batch(&batched, events(&batch_verdicts)).await;

    let single = core(memory_store().await);
    registered(single.store.as_ref(), &["pump-1", "pump-2"]).await;
    let single_verdicts = Verdicts::default();
    for ev in events(&single_verdicts) {
        commit_as_one_batch(&single, vec![ev]).await;
    }

    let got = snapshot(batched.store.as_ref()).await;
    assert_eq!(got, snapshot(single.store.as_ref()).await);
    assert_eq!(
        got.alerts
            .iter()
            .map(|(t, p, _, _)| (t.as_str(), p.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            ("local/pump-1/m-1", None),
            ("local/pump-1/m-2", Some("local/pump-1/m-1")),
            ("local/pump-2/m-5", None)
        ],
        "one alert per token, m-2 folded into m-1"
    );
    assert_eq!(
        got.commands.len(),
        2,
        "the primaries' commands only: {:?}",
        got.commands
    );
    let mut dead: Vec<_> = got.dead_letters.iter().map(|d| d.3.as_deref()).collect();
    dead.sort();
    assert_eq!(
        dead,
        vec![Some("m-3"), Some("m-4")],
        "the poison and the unknown device: {:?}",
        got.dead_letters
    );
    let verdicts = batch_verdicts.lock().expect("verdicts").clone();
    assert_eq!(verdicts.len(), 7);
    assert!(verdicts.iter().all(|(_, a)| *a == Ack::Ack), "{verdicts:?}");
}

#[tokio::test]
async fn times_from_the_far_future_are_clamped_to_the_allowed_skew_and_counted() {
    let core = core(memory_store().await);
    registered(core.store.as_ref(), &["pump-1"]).await;
    let v = Verdicts::default();
    let far = |year: i32| {
        Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0)
            .single()
            .expect("time")
    };
    let mut hot = reading("pump-1", "m-1", &temperature(90.0), 0, &v);
    if let EventKind::Telemetry(t) = &mut hot.kind {
        t.received_at = far(2999);
    }
    // The end of chrono's calendar: adding the debounce window to it used to overflow.
    let mut last = reading("pump-1", "m-2", &temperature(91.0), 0, &v);
    if let EventKind::Telemetry(t) = &mut last.kind {
        t.received_at = DateTime::<Utc>::MAX_UTC;
    }
    let status = ProviderEvent {
        instance: "local".into(),
        kind: EventKind::Connection {
            device_id: "pump-1".into(),
            connected: true,
            at: far(2999),
        },
        ack: AckHandle::new(|_| {}),
    };
    let before = Utc::now();
    commit_as_one_batch(&core, vec![hot, last, status]).await;
    let limit = Utc::now() + Duration::seconds(300);
    let device = core
        .store
        .get_device(&DeviceId::parse("pump-1").expect("id"))
        .await
        .expect("get")
        .expect("pump-1");
    for (what, t) in [
        ("last activity", device.last_activity_time),
        ("connection state time", device.connection_state_updated_at),
    ] {
        let t = t.unwrap_or_else(|| panic!("{what} set"));
        assert!(
            t <= limit && t >= before + Duration::seconds(299),
            "{what} {t} is clamped to about now + 300 s"
        );
    }
    let alerts = snapshot(core.store.as_ref()).await.alerts;
    assert_eq!(alerts.len(), 2, "both readings committed: {alerts:?}");
    let metrics = core.metrics.encode();
    assert!(
        metrics.contains(r#"iotgw_times_clamped_total{provider="local",reason="received_at"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"iotgw_times_clamped_total{provider="local",reason="connection"} 1"#),
        "{metrics}"
    );
    assert!(v
        .lock()
        .expect("verdicts")
        .iter()
        .all(|(_, a)| *a == Ack::Ack));
}

#[tokio::test]
async fn a_store_failure_in_the_middle_of_a_batch_commits_nothing_and_acks_no_event() {
    let dir = tempfile::tempdir().expect("dir");
    let file = SqliteStore::open(&dir.path().join("registry.db"))
        .await
        .expect("store");
    // A real failure inside the transaction, after earlier writes of the batch succeeded.
    sqlx_exec(
        &file,
        "CREATE TRIGGER refuse_boom BEFORE INSERT ON alerts WHEN NEW.alert_token = 'local/pump-2/boom' \
         BEGIN SELECT RAISE(ABORT, 'disk on fire'); END",
    )
    .await;
    let c = core(Arc::new(file));
    registered(c.store.as_ref(), &["pump-1", "pump-2"]).await;
    let before = snapshot(c.store.as_ref()).await;
    let v = Verdicts::default();
    commit_as_one_batch(
        &c,
        vec![
            reading("pump-1", "ok-1", &temperature(80.0), 0, &v),
            reading("pump-1", "bad json", "{", 1, &v),
            reading("pump-2", "boom", &temperature(90.0), 2, &v),
            reading("pump-2", "ok-2", &temperature(91.0), 3, &v),
        ],
    )
    .await;
    let verdicts = v.lock().expect("verdicts").clone();
    assert_eq!(verdicts.len(), 4);
    assert!(
        verdicts
            .iter()
            .all(|(_, a)| matches!(a, Ack::Nack(r) if r.contains("disk on fire"))),
        "{verdicts:?}"
    );
    assert_eq!(
        snapshot(c.store.as_ref()).await,
        before,
        "nothing of the batch was committed"
    );
}

async fn sqlx_exec(store: &SqliteStore, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.expect("sql");
}

/// A random event: device (one of them unknown), message id from a small pool (so
/// redeliveries happen), temperature (alerting or not, or a malformed payload), time.
fn event_strategy() -> impl Strategy<Value = (usize, u8, u8, i64)> {
    (0usize..3, 0u8..12, 0u8..10, 0i64..200)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn batch_commits_and_single_commits_leave_the_same_registry(
        events in prop::collection::vec(event_strategy(), 1..40),
        cuts in prop::collection::vec(1usize..8, 1..10),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let make = |v: &Verdicts| -> Vec<ProviderEvent> {
                events
                    .iter()
                    .map(|(d, m, kind, secs)| {
                        let device = ["pump-1", "pump-2", "ghost-3"][*d];
                        let payload = match kind {
                            0 => "{broken".to_string(),
                            1..=4 => temperature(80.0 + f64::from(*kind)),
                            _ => temperature(20.0),
                        };
                        reading(device, &format!("m-{m}"), &payload, *secs, v)
                    })
                    .collect()
            };
            let batched = core(memory_store().await);
            registered(batched.store.as_ref(), &["pump-1", "pump-2"]).await;
            let bv = Verdicts::default();
            let mut pending = make(&bv);
            let mut cut = cuts.iter().cycle();
            while !pending.is_empty() {
                let n = (*cut.next().expect("cycle")).min(pending.len());
                let rest = pending.split_off(n);
                commit_as_one_batch(&batched, pending).await;
                pending = rest;
            }

            let single = core(memory_store().await);
            registered(single.store.as_ref(), &["pump-1", "pump-2"]).await;
            let sv = Verdicts::default();
            for ev in make(&sv) {
                commit_as_one_batch(&single, vec![ev]).await;
            }
            assert_eq!(snapshot(batched.store.as_ref()).await, snapshot(single.store.as_ref()).await);
            let bv = bv.lock().expect("verdicts").clone();
            assert_eq!(bv.len(), events.len());
            assert!(bv.iter().all(|(_, a)| *a == Ack::Ack));
        });
    }
}

/// Starts the whole pipeline (collector, writer, dispatcher) on a fresh store with two
/// registered devices.
async fn running(
    batching: super::Batching,
) -> (tokio::sync::mpsc::Sender<ProviderEvent>, super::Pipeline) {
    let store = memory_store().await;
    registered(store.as_ref(), &["pump-1", "pump-2"]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    (tx, super::spawn(Arc::new(core(store)), rx, batching))
}

/// Waits (with a deadline) until `n` verdicts arrived.
async fn verdicts_reach(verdicts: &Verdicts, n: usize) -> Vec<(String, Ack)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = verdicts.lock().expect("verdicts").clone();
        if seen.len() >= n {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} verdicts within 10 s: {seen:?}",
            seen.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_full_batch_is_committed_without_waiting_out_the_batch_wait() {
    let (tx, _pipeline) = running(super::Batching {
        max_events: 3,
        max_wait: std::time::Duration::from_secs(3600),
    })
    .await;
    let v = Verdicts::default();
    for (i, device) in ["pump-1", "pump-2", "pump-1"].into_iter().enumerate() {
        let id = format!("m-{i}");
        let secs = i64::try_from(i).expect("small");
        tx.send(reading(device, &id, &temperature(20.0), secs, &v))
            .await
            .expect("send");
    }
    let seen = verdicts_reach(&v, 3).await;
    assert!(seen.iter().all(|(_, a)| *a == Ack::Ack), "{seen:?}");
}

#[tokio::test]
async fn closing_the_input_commits_the_batch_that_is_not_full_and_ends_the_pipeline() {
    let (tx, pipeline) = running(super::Batching {
        max_events: 512,
        max_wait: std::time::Duration::from_secs(3600),
    })
    .await;
    let v = Verdicts::default();
    tx.send(reading("pump-1", "m-1", &temperature(99.0), 0, &v))
        .await
        .expect("send");
    tx.send(reading("pump-2", "m-2", &temperature(20.0), 1, &v))
        .await
        .expect("send");
    drop(tx);
    tokio::time::timeout(std::time::Duration::from_secs(10), pipeline.join())
        .await
        .expect("the pipeline ends within 10 s of its input closing");
    let seen = v.lock().expect("verdicts").clone();
    assert_eq!(
        seen,
        [
            ("pump-1/m-1".to_owned(), Ack::Ack),
            ("pump-2/m-2".to_owned(), Ack::Ack)
        ]
    );
}

#[tokio::test]
async fn with_no_batch_wait_a_lone_event_is_committed_at_once() {
    let (tx, _pipeline) = running(super::Batching {
        max_events: 512,
        max_wait: std::time::Duration::ZERO,
    })
    .await;
    let v = Verdicts::default();
    tx.send(reading("pump-1", "m-1", &temperature(20.0), 0, &v))
        .await
        .expect("send");
    let seen = verdicts_reach(&v, 1).await;
    assert_eq!(seen, [("pump-1/m-1".to_owned(), Ack::Ack)]);
}

// Supervision: a panic, injected at the pipeline's fault points (`fail`, keyed on a device
// or instance no other test uses), costs the event it hit and nothing else.

/// The running pipeline over `core`, fed through the returned sender.
fn pipeline_on(core: &Arc<Core>) -> tokio::sync::mpsc::Sender<ProviderEvent> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // Dropping the pipeline handle leaves its tasks running; the test ends them.
    drop(super::spawn(
        core.clone(),
        rx,
        super::Batching {
            max_events: 64,
            max_wait: std::time::Duration::from_millis(5),
        },
    ));
    tx
}

/// Waits until `n` verdicts are in and returns them by tag.
async fn verdicts_of(v: &Verdicts, n: usize) -> BTreeMap<String, Ack> {
    verdicts_reach(v, n).await.into_iter().collect()
}

#[tokio::test]
async fn a_panic_preparing_one_reading_leaves_it_for_redelivery_and_the_others_commit() {
    fail::cfg("pipeline-prepare", "return(bug-prepare)").expect("fail point");
    let c = Arc::new(core(memory_store().await));
    registered(c.store.as_ref(), &["pump-1", "bug-prepare"]).await;
    let tx = pipeline_on(&c);
    let v = Verdicts::default();
    for ev in [
        reading("pump-1", "m-1", &temperature(80.0), 0, &v),
        reading("bug-prepare", "m-2", &temperature(80.0), 1, &v),
        reading("pump-1", "m-3", &temperature(20.0), 2, &v),
    ] {
        tx.send(ev).await.expect("pipeline takes events");
    }
    let got = verdicts_of(&v, 3).await;
    fail::remove("pipeline-prepare");
    assert!(matches!(got["pump-1/m-1"], Ack::Ack), "{got:?}");
    assert!(matches!(got["pump-1/m-3"], Ack::Ack), "{got:?}");
    assert!(
        matches!(&got["bug-prepare/m-2"], Ack::Nack(_)),
        "the event that hit the panic is left for redelivery: {got:?}"
    );

    // The collector goes on.
    tx.send(reading("pump-1", "m-4", &temperature(20.0), 3, &v))
        .await
        .expect("pipeline takes events");
    assert!(matches!(verdicts_of(&v, 4).await["pump-1/m-4"], Ack::Ack));
    assert!(c.vitals.ended().is_empty(), "{:?}", c.vitals.ended());
    let alerts = snapshot(c.store.as_ref()).await.alerts;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(c
        .metrics
        .encode()
        .contains("iotgw_panics_total{task=\"prepare\"} 1"));
}

#[tokio::test]
async fn a_panic_committing_a_batch_leaves_its_events_for_redelivery_and_the_writer_goes_on() {
    fail::cfg("pipeline-commit", "return(bug-commit)").expect("fail point");
    let c = Arc::new(core(memory_store().await));
    registered(c.store.as_ref(), &["pump-1", "bug-commit"]).await;
    let tx = pipeline_on(&c);
    let v = Verdicts::default();
    tx.send(reading("bug-commit", "m-1", &temperature(80.0), 0, &v))
        .await
        .expect("pipeline takes events");
    let got = verdicts_of(&v, 1).await;
    fail::remove("pipeline-commit");
    assert!(matches!(&got["bug-commit/m-1"], Ack::Nack(_)), "{got:?}");
    assert!(snapshot(c.store.as_ref()).await.alerts.is_empty());

    tx.send(reading("pump-1", "m-2", &temperature(80.0), 1, &v))
        .await
        .expect("pipeline takes events");
    assert!(matches!(verdicts_of(&v, 2).await["pump-1/m-2"], Ack::Ack));
    assert_eq!(snapshot(c.store.as_ref()).await.alerts.len(), 1);
    assert!(c.vitals.ended().is_empty(), "{:?}", c.vitals.ended());
    assert!(c
        .metrics
        .encode()
        .contains("iotgw_panics_total{task=\"commit\"} 1"));
}

#[tokio::test]
async fn a_collector_that_dies_is_named_by_vitals_and_its_event_is_left_for_redelivery() {
    fail::cfg("pipeline-collector", "return(doomed)").expect("fail point");
    let c = Arc::new(core(memory_store().await));
    let tx = pipeline_on(&c);
    let v = Verdicts::default();
    let mut ev = reading("pump-1", "m-1", &temperature(80.0), 0, &v);
    ev.instance = "doomed".into();
    tx.send(ev).await.expect("pipeline takes events");
    let got = verdicts_of(&v, 1).await;
    fail::remove("pipeline-collector");
    assert!(matches!(&got["pump-1/m-1"], Ack::Nack(_)), "{got:?}");
    let ended = iotgw_testkit::wait_for(
        "the collector recorded as ended",
        std::time::Duration::from_secs(10),
        || async {
            let e = c.vitals.ended();
            (!e.is_empty()).then_some(e)
        },
        String::new,
    )
    .await;
    assert!(
        ended["pipeline collector"].starts_with("panicked: injected panic in the collector"),
        "{ended:?}"
    );
}

/// One instance's commands never hold up telemetry nor other instances: 1,100 rule commands
/// become direct methods on IoT Hub (the recording fake) to devices that do not answer
/// (the hub waits 30 s for each), then readings of another instance keep being acked at
/// once, and the hub sees at most `commands.max_in_flight` calls at a time.
#[cfg(feature = "azure_fakes")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_direct_methods_hold_only_their_instances_slots_and_never_delay_telemetry() {
    use iotgw_config::{AzureIotHubConfig, ProviderConfig, Secret};
    use iotgw_providers::azure_iot_hub::fakes::{fake_hub::FakeHub, pki::pki};

    const SLOW: usize = 1_100;
    let hub = FakeHub::start().await;
    let provider = crate::app::build_provider(
        "hub",
        &ProviderConfig::AzureIotHub(AzureIotHubConfig {
            connection_string: Some(Secret::new(hub.connection_string())),
            ca_file: Some(pki().ca_file.display().to_string()),
            ..AzureIotHubConfig::default()
        }),
    )
    .await
    .expect("azure provider");
    let (events, _unused) = tokio::sync::mpsc::channel(8);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = {
        let (p, stop) = (provider.clone(), stop.clone());
        tokio::spawn(async move { p.run(events, stop).await })
    };
    let mut config = Config::embedded_default();
    config.commands.max_in_flight = 4;
    let c = Arc::new(Core::new(
        memory_store().await,
        Arc::new(Metrics::new()),
        Arc::new(Notify::new()),
        "test".into(),
        Live::new(
            1,
            Arc::new(config),
            BTreeMap::from([("hub".to_owned(), provider.clone())]),
        ),
    ));
    iotgw_testkit::wait_for(
        "the hub provider connected",
        std::time::Duration::from_secs(20),
        || async { provider.health().connected.then_some(()) },
        String::new,
    )
    .await;
    registered(c.store.as_ref(), &["pump-1"]).await;
    let ids: Vec<String> = (0..SLOW).map(|i| format!("slow-{i}")).collect();
    let answers = c
        .register_many(
            ids.iter()
                .map(|id| crate::core::RegisterRequest {
                    msdyn_deviceid: id.clone(),
                    msdyn_iotproviderinstance: Some("hub".into()),
                    ..Default::default()
                })
                .collect(),
        )
        .await;
    assert!(answers.iter().all(Result::is_ok), "registered on the hub");
    // Every slow device takes its direct methods and never answers.
    let mut calls: Vec<_> = ids.iter().map(|id| hub.route_methods(id)).collect();

    let tx = pipeline_on(&c);
    let v = Verdicts::default();
    for (i, id) in ids.iter().enumerate() {
        let mut ev = reading(id, "hot", &temperature(90.0), i as i64, &v);
        ev.instance = "hub".into();
        tx.send(ev).await.expect("pipeline takes events");
    }
    verdicts_reach(&v, SLOW).await;

    // 200 readings of another instance, one per millisecond, while the hub's calls hang.
    let local = Verdicts::default();
    let started = std::time::Instant::now();
    for i in 0..200 {
        tx.send(reading(
            "pump-1",
            &format!("m-{i}"),
            &temperature(20.0),
            i,
            &local,
        ))
        .await
        .expect("pipeline takes events");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let acked = verdicts_reach(&local, 200).await;
    assert!(acked.iter().all(|(_, a)| *a == Ack::Ack), "{acked:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the readings were acked while the direct methods hung: {:?}",
        started.elapsed()
    );

    // The hub holds exactly the instance's slots, no more.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let held: usize = calls
        .iter_mut()
        .map(|rx| std::iter::from_fn(|| rx.try_recv().ok()).count())
        .sum();
    assert_eq!(held, 4, "commands.max_in_flight calls at the hub at once");
    stop.cancel();
    run.abort();
}
