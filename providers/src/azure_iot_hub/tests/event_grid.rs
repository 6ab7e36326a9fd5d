//! The Event Grid endpoint with the documented sample events (`testdata/event_grid`), in
//! both schemas: accepted, ordered by sequence number, turned into telemetry, connection
//! states and registry updates; 200 only after every event was acked.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use iotgw_config::azure_iot_hub::EventGridConfig;
use iotgw_config::Secret;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::fake_hub::FakeHub;
use super::registry::config;
use crate::azure_iot_hub::AzureIotHubProvider;
use crate::{EventKind, Provider, PushEndpoint, PushRequest, PushResponse, Shutdown};

const SECRET: &str = "event-grid-secret-for-tests";

fn sample(name: &str) -> Value {
    let path = format!(
        "{}/src/azure_iot_hub/testdata/event_grid/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).expect("sample file"))
        .expect("sample JSON")
}

/// What the test's pipeline does with each event.
#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Ack,
    Nack,
}

struct Harness {
    endpoint: Arc<dyn PushEndpoint>,
    seen: Arc<Mutex<Vec<EventKind>>>,
    verdict: Arc<Mutex<Verdict>>,
    stop: Shutdown,
    _fake: FakeHub,
    _provider: Arc<AzureIotHubProvider>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn harness(commit_timeout_secs: u64) -> Harness {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.event_grid = Some(EventGridConfig {
        secret: Secret::new(SECRET),
        commit_timeout_secs,
    });
    let provider = Arc::new(
        AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider"),
    );
    let endpoint = provider.push_endpoint().expect("an Event Grid endpoint");
    let (tx, mut rx) = mpsc::channel(16);
    let stop = Shutdown::new();
    tokio::spawn({
        let (p, stop) = (provider.clone(), stop.clone());
        async move { p.run(tx, stop).await }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verdict = Arc::new(Mutex::new(Verdict::Ack));
    tokio::spawn({
        let (seen, verdict) = (seen.clone(), verdict.clone());
        async move {
            while let Some(ev) = rx.recv().await {
                let v = *verdict.lock().expect("lock");
                if v == Verdict::Ack {
                    seen.lock().expect("lock").push(ev.kind);
                    ev.ack.ack();
                } else {
                    ev.ack.nack("store down (test)");
                }
            }
        }
    });
    // Until run() took the sender the endpoint answers 503: wait for a 200 to a no-op.
    let deadline = tokio::time::Instant::now() + super::DEADLINE;
    loop {
        let r = endpoint.handle(post(&json!([]), Some(SECRET), None)).await;
        if r.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the endpoint never accepted: {r:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Harness {
        endpoint,
        seen,
        verdict,
        stop,
        _fake: fake,
        _provider: provider,
    }
}

fn post(body: &Value, secret_query: Option<&str>, secret_header: Option<&str>) -> PushRequest {
    PushRequest {
        method: "POST".into(),
        headers: secret_header
            .map(|s| vec![("x-iotgw-secret".to_owned(), s.to_owned())])
            .unwrap_or_default(),
        query: secret_query
            .map(|s| vec![("secret".to_owned(), s.to_owned())])
            .unwrap_or_default(),
        body: Bytes::from(body.to_string()),
    }
}

fn body_json(r: &PushResponse) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .with_timezone(&Utc)
}

fn with_type(mut sample: Value, event_type: &str, seq: Option<&str>) -> Value {
    let ev = &mut sample[0];
    let key = if ev.get("specversion").is_some() {
        "type"
    } else {
        "eventType"
    };
    ev[key] = json!(event_type);
    if let Some(seq) = seq {
        ev["data"]["deviceConnectionStateEventInfo"]["sequenceNumber"] = json!(seq);
    }
    ev["id"] = json!(format!(
        "{}-{}",
        ev["id"].as_str().unwrap_or_default(),
        event_type
    ));
    sample
}

async fn documented_samples_become_events(prefix: &str) {
    let h = harness(5).await;
    let connected = sample(&format!("{prefix}_device_connected"));
    let disconnected = with_type(
        connected.clone(),
        "Microsoft.Devices.DeviceDisconnected",
        Some("000000000000000001D4132452F67CE200000002000000000000000000000002"),
    );
    let created = sample(&format!("{prefix}_device_created"));
    let deleted = with_type(created.clone(), "Microsoft.Devices.DeviceDeleted", None);
    for batch in [
        sample(&format!("{prefix}_device_telemetry")),
        connected,
        disconnected,
        created,
        deleted,
    ] {
        let r = h.endpoint.handle(post(&batch, Some(SECRET), None)).await;
        assert_eq!(r.status, 200, "{prefix}: {batch} -> {:?}", body_json(&r));
        assert_eq!(body_json(&r)["accepted"], json!(1), "{batch}");
    }
    let seen = h.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    match &seen[0] {
        EventKind::Telemetry(t) => {
            assert_eq!(t.device_id, "d1", "from iothub-connection-device-id");
            assert_eq!(t.message_id, "9af86784-8d40-fe2g-8b2a-bab65e106785");
            assert_eq!(
                serde_json::from_slice::<Value>(&t.payload).expect("JSON"),
                json!({"Weather": {"Temperature": 900}, "Location": "USA"})
            );
            assert_eq!(t.received_at, time("2019-01-07T20:58:30.48Z"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        seen[1],
        EventKind::Connection {
            device_id: "LogicAppTestDevice".into(),
            connected: true,
            at: time("2018-06-02T19:17:44.4383997Z")
        }
    );
    match &seen[2] {
        EventKind::Connection {
            device_id,
            connected,
            at,
        } => {
            assert_eq!(
                (device_id.as_str(), *connected),
                ("LogicAppTestDevice", false)
            );
            assert!(
                *at > time("2018-06-02T19:17:44.4383997Z"),
                "a later sequence never goes back in time"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        seen[3],
        EventKind::ReportedProperties {
            device_id: "LogicAppTestDevice".into(),
            properties: json!({}),
            at: time("2018-01-02T19:17:44.4383997Z")
        }
    );
    assert_eq!(
        seen[4],
        EventKind::Connection {
            device_id: "LogicAppTestDevice".into(),
            connected: false,
            at: time("2018-01-02T19:17:44.4383997Z")
        }
    );
}

#[tokio::test]
async fn the_documented_event_grid_schema_samples_become_telemetry_connection_and_registry_events()
{
    documented_samples_become_events("eventgrid").await;
}

#[tokio::test]
async fn the_documented_cloudevents_samples_become_the_same_events() {
    documented_samples_become_events("cloudevents").await;
}

#[tokio::test]
async fn connection_states_follow_the_sequence_number_not_the_arrival_order() {
    let h = harness(5).await;
    let base = sample("eventgrid_device_connected");
    let ev = |t: &str, seq: &str, time: &str| {
        let mut e = with_type(base.clone(), t, Some(seq))[0].clone();
        e["eventTime"] = json!(time);
        e["id"] = json!(format!("id-{seq}"));
        e
    };
    // One batch, out of order: disconnected (seq ..03) arrives before connected (seq ..02),
    // and the later event carries the earlier time.
    let batch = json!([
        ev(
            "Microsoft.Devices.DeviceDisconnected",
            "0000000000000000000000000000000000000003",
            "2024-05-01T12:00:00Z"
        ),
        ev(
            "Microsoft.Devices.DeviceConnected",
            "0000000000000000000000000000000000000002",
            "2024-05-01T12:00:05Z"
        ),
    ]);
    assert_eq!(
        h.endpoint
            .handle(post(&batch, Some(SECRET), None))
            .await
            .status,
        200
    );
    // A late retry of an older event, and a duplicate of the newest: both dropped.
    let late = json!([
        ev(
            "Microsoft.Devices.DeviceConnected",
            "0000000000000000000000000000000000000001",
            "2024-05-01T11:59:00Z"
        ),
        ev(
            "Microsoft.Devices.DeviceDisconnected",
            "0000000000000000000000000000000000000003",
            "2024-05-01T12:00:00Z"
        )
    ]);
    let r = h.endpoint.handle(post(&late, Some(SECRET), None)).await;
    assert_eq!(
        (r.status, body_json(&r)["skipped"].clone()),
        (200, json!(2))
    );
    let seen = h.seen.lock().expect("lock").clone();
    let states: Vec<(bool, DateTime<Utc>)> = seen
        .iter()
        .map(|k| match k {
            EventKind::Connection { connected, at, .. } => (*connected, *at),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(states.len(), 2, "{states:?}");
    assert!(states[0].0, "sequence 2 (connected) first");
    assert!(!states[1].0, "sequence 3 (disconnected) last");
    assert!(
        states[1].1 > states[0].1,
        "times follow the sequence, so the store orders them the same way: {states:?}"
    );
}

#[tokio::test]
async fn an_uncommitted_batch_is_answered_503_and_its_retry_is_accepted() {
    let h = harness(5).await;
    let batch = with_type(
        sample("eventgrid_device_connected"),
        "Microsoft.Devices.DeviceConnected",
        Some("0000000000000000000000000000000000000009"),
    );
    *h.verdict.lock().expect("lock") = Verdict::Nack;
    let r = h.endpoint.handle(post(&batch, Some(SECRET), None)).await;
    assert_eq!(r.status, 503, "{:?}", body_json(&r));
    assert!(body_json(&r)["error"]
        .as_str()
        .unwrap_or_default()
        .contains("store down"));
    *h.verdict.lock().expect("lock") = Verdict::Ack;
    let r = h.endpoint.handle(post(&batch, Some(SECRET), None)).await;
    assert_eq!(
        (r.status, body_json(&r)["accepted"].clone()),
        (200, json!(1)),
        "the nacked sequence number was not recorded, so the retry counts"
    );
}

#[tokio::test]
async fn a_batch_not_committed_in_time_is_answered_503() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.event_grid = Some(EventGridConfig {
        secret: Secret::new(SECRET),
        commit_timeout_secs: 1,
    });
    let provider = Arc::new(
        AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider"),
    );
    let endpoint = provider.push_endpoint().expect("endpoint");
    let before = endpoint
        .handle(post(
            &sample("eventgrid_device_telemetry"),
            Some(SECRET),
            None,
        ))
        .await;
    assert_eq!(before.status, 503, "not running yet");
    let (tx, _rx_never_read) = mpsc::channel(16);
    let stop = Shutdown::new();
    tokio::spawn({
        let (p, stop) = (provider.clone(), stop.clone());
        async move { p.run(tx, stop).await }
    });
    let deadline = tokio::time::Instant::now() + super::DEADLINE;
    loop {
        let r = endpoint
            .handle(post(
                &sample("eventgrid_device_telemetry"),
                Some(SECRET),
                None,
            ))
            .await;
        if r.status == 503
            && body_json(&r)["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not committed within")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn the_subscription_validation_handshakes_of_both_schemas_are_answered() {
    let h = harness(5).await;
    let r = h
        .endpoint
        .handle(post(
            &sample("eventgrid_subscription_validation"),
            Some(SECRET),
            None,
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        body_json(&r),
        json!({"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})
    );
    let options = PushRequest {
        method: "OPTIONS".into(),
        headers: vec![(
            "webhook-request-origin".into(),
            "eventgrid.azure.net".into(),
        )],
        query: vec![("secret".into(), SECRET.into())],
        body: Bytes::new(),
    };
    let r = h.endpoint.handle(options).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers.contains(&(
            "webhook-allowed-origin".to_owned(),
            "eventgrid.azure.net".to_owned()
        )),
        "{:?}",
        r.headers
    );
    assert!(
        h.seen.lock().expect("lock").is_empty(),
        "handshakes make no events"
    );
}

#[tokio::test]
async fn a_missing_or_wrong_secret_is_refused_and_the_header_form_is_accepted() {
    let h = harness(5).await;
    let telemetry = sample("eventgrid_device_telemetry");
    assert_eq!(
        h.endpoint.handle(post(&telemetry, None, None)).await.status,
        401
    );
    assert_eq!(
        h.endpoint
            .handle(post(&telemetry, Some("event-grid-secret-for-testz"), None))
            .await
            .status,
        401
    );
    assert_eq!(
        h.endpoint
            .handle(post(
                &sample("eventgrid_subscription_validation"),
                None,
                None
            ))
            .await
            .status,
        401,
        "no validation without the secret"
    );
    assert_eq!(
        h.endpoint
            .handle(post(&telemetry, None, Some(SECRET)))
            .await
            .status,
        200
    );
    assert_eq!(h.seen.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_telemetry_body_iot_hub_could_not_mark_as_json_is_base64_decoded() {
    let h = harness(5).await;
    let mut t = sample("eventgrid_device_telemetry");
    t[0]["data"]["body"] = json!("eyJ0ZW1wZXJhdHVyZSI6IDgwfQ==");
    t[0]["data"]["systemProperties"]["iothub-content-type"] = json!("application/octet-stream");
    assert_eq!(
        h.endpoint.handle(post(&t, Some(SECRET), None)).await.status,
        200
    );
    let seen = h.seen.lock().expect("lock").clone();
    match &seen[..] {
        [EventKind::Telemetry(t)] => assert_eq!(&t.payload[..], br#"{"temperature": 80}"#),
        other => panic!("{other:?}"),
    }
    let r = h
        .endpoint
        .handle(PushRequest {
            body: Bytes::from_static(b"not json"),
            ..post(&json!([]), Some(SECRET), None)
        })
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn without_event_grid_settings_there_is_no_endpoint() {
    let fake = FakeHub::start().await;
    let provider = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    assert!(provider.push_endpoint().is_none());
}
