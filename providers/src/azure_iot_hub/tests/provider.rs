//! The provider's behaviour against the fake hub: retries after `Retry-After`, error
//! classification, offline devices, re-registration, bulk splitting, device state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use iotgw_config::azure_iot_hub::AzureCommandDelivery;
use iotgw_config::Secret;
use iotgw_ids::DeviceId;
use serde_json::{json, Value};

use super::fake_hub::FakeHub;
use super::registry::config;
use crate::azure_iot_hub::AzureIotHubProvider;
use crate::{CommandOutcome, CommandRequest, DeviceSpec, Provider, ProviderError, Shutdown};

fn spec(id: &str) -> DeviceSpec {
    DeviceSpec {
        device_id: DeviceId::parse(id).expect("id"),
        name: id.into(),
        category: None,
        tags: BTreeMap::new(),
        settings: None,
    }
}

fn command(device: &str, name: &str) -> CommandRequest {
    CommandRequest {
        id: uuid::Uuid::new_v4(),
        device_id: DeviceId::parse(device).expect("id"),
        name: name.into(),
        message: json!({"CommandName": name, "Parameters": {}}).to_string(),
        correlation_id: "c-1".into(),
    }
}

#[tokio::test]
async fn a_429_is_retried_after_the_announced_delay_and_then_succeeds() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    fake.fail_next(429, Some("1"));
    let started = Instant::now();
    p.register(&spec("retry-1"))
        .await
        .expect("registered after one retry");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the announced second"
    );
    let puts = fake
        .take()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, 2);
}

#[tokio::test]
async fn throttling_beyond_the_retries_or_the_cap_fails_as_throttled_with_the_delay() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.max_retries = 1;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    fake.fail_next(429, Some("0"));
    fake.fail_next(429, Some("0"));
    let e = p
        .register(&spec("thr-1"))
        .await
        .expect_err("throttled twice");
    assert!(matches!(e, ProviderError::Throttled { .. }), "{e}");
    assert_eq!(fake.take().len(), 2, "one try and one retry");
    fake.fail_next(429, Some("3600"));
    match p.register(&spec("thr-2")).await {
        Err(ProviderError::Throttled {
            retry_after,
            message,
            ..
        }) => {
            assert_eq!(retry_after, Duration::from_secs(3600));
            assert!(message.contains("max_retry_after_secs"), "{message}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(
        fake.take().len(),
        1,
        "a delay above the cap is not waited for"
    );
    fake.fail_next(503, Some("0"));
    fake.fail_next(503, Some("0"));
    let e = p
        .unregister(&DeviceId::parse("thr-3").expect("id"))
        .await
        .expect_err("unavailable");
    assert_eq!(e.class(), "transient", "{e}");
}

#[tokio::test]
async fn hub_errors_are_classified_and_name_the_device() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    let missing = DeviceId::parse("ghost-1").expect("id");
    let e = p.unregister(&missing).await.expect_err("unknown device");
    assert_eq!(e.class(), "not_found");
    assert!(
        e.to_string().contains("ghost-1") && e.to_string().contains("DeviceNotFound"),
        "{e}"
    );
    let e = p.device_state(&missing).await.expect_err("unknown device");
    assert_eq!(e.class(), "not_found");
    let big = CommandRequest {
        message: "x".repeat(9000),
        ..command("ghost-1", "big")
    };
    match p.send_command(&big).await {
        Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "msdyn_message"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let bad_settings = DeviceSpec {
        settings: Some(json!([1, 2])),
        ..spec("bad-settings")
    };
    match p.register(&bad_settings).await {
        Err(ProviderError::InvalidInput { field, .. }) => assert_eq!(field, "msdyn_devicesettings"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(
        fake.take()
            .iter()
            .all(|r| r.path != "/devices/bad-settings"),
        "refused before any request"
    );
}

#[tokio::test]
async fn a_wrong_key_makes_run_fail_as_unauthorized() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.connection_string = Some(Secret::new(format!(
        "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey=d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktIQ==",
        fake.host()
    )));
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let r = tokio::time::timeout(super::DEADLINE, p.run(tx, Shutdown::new()))
        .await
        .expect("run returns");
    match r {
        Err(ProviderError::Unauthorized { message, .. }) => {
            assert!(message.contains("registry write"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(!p.health().connected);
    assert!(p.health().last_error.is_some());
}

#[tokio::test]
async fn run_proves_the_credentials_reports_health_and_stops_on_shutdown() {
    let fake = FakeHub::start().await;
    let p = std::sync::Arc::new(
        AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
            .expect("provider"),
    );
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let stop = Shutdown::new();
    let task = tokio::spawn({
        let (p, stop) = (p.clone(), stop.clone());
        async move { p.run(tx, stop).await }
    });
    let deadline = Instant::now() + super::DEADLINE;
    while !p.health().connected {
        assert!(Instant::now() < deadline, "connected within the deadline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx2, _rx2) = tokio::sync::mpsc::channel(1);
    assert_eq!(
        p.run(tx2, Shutdown::new())
            .await
            .expect_err("second run")
            .class(),
        "conflict"
    );
    stop.cancel();
    task.await.expect("joined").expect("clean stop");
    assert!(!p.health().connected);
    assert_eq!(fake.take()[0].path, "/statistics/service");
}

#[tokio::test]
async fn a_direct_method_to_an_offline_device_fails_with_the_reason() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    p.register(&spec("off-1")).await.expect("registered");
    match p.send_command(&command("off-1", "reboot")).await {
        Err(ProviderError::NotFound { what, .. }) => {
            assert!(
                what.contains("not online") && what.contains("404103") && what.contains("reboot"),
                "{what}"
            );
        }
        other => panic!("expected NotFound (offline), got {other:?}"),
    }
}

#[tokio::test]
async fn a_direct_method_the_device_refuses_is_refused_with_the_devices_own_reason() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    p.register(&spec("no-1")).await.expect("registered");
    fake.answer_methods("no-1", 500, json!({"reason": "valve stuck"}));
    assert_eq!(
        p.send_command(&command("no-1", "reboot"))
            .await
            .expect("answered"),
        CommandOutcome::Refused {
            reason: "valve stuck".into()
        }
    );
    fake.answer_methods("no-1", 409, json!(42));
    assert_eq!(
        p.send_command(&command("no-1", "reboot"))
            .await
            .expect("answered"),
        CommandOutcome::Refused {
            reason: "the device answered status 409: 42".into()
        }
    );
    assert!(
        p.health().last_error.is_none(),
        "a refusal is no hub failure"
    );
}

#[tokio::test]
async fn queued_delivery_retries_an_offline_device_until_it_connects() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.direct_method.offline_retry_secs = 10;
    cfg.direct_method.offline_retry_interval_secs = 1;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    p.register(&spec("late-1")).await.expect("registered");
    fake.online_after("late-1", 1);
    fake.take();
    match p
        .send_command(&command("late-1", "reboot"))
        .await
        .expect("delivered on the second try")
    {
        CommandOutcome::Delivered { response } => {
            assert_eq!(
                response.expect("the device's answer")["method"],
                json!("reboot")
            );
        }
        other => panic!("expected Delivered, got {other:?}"),
    }
    let calls = fake
        .take()
        .into_iter()
        .filter(|r| r.path.ends_with("/methods"))
        .count();
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn registering_an_existing_device_returns_its_existing_keys() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    let cs =
        |r: crate::Registration| r.credentials.expect("credentials")["connection_string"].clone();
    let first = cs(p.register(&spec("twice-1")).await.expect("first"));
    fake.take();
    let second = p.register(&spec("twice-1")).await.expect("second");
    assert!(
        second
            .message
            .as_deref()
            .is_some_and(|m| m.contains("already registered")),
        "{:?}",
        second.message
    );
    assert_eq!(cs(second), first, "same keys, same connection string");
    let seq: Vec<String> = fake
        .take()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(seq, ["PUT /devices/twice-1", "GET /devices/twice-1"]);
}

#[tokio::test]
async fn bulk_registration_sends_at_most_100_devices_per_call() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    p.register(&spec("bulk-007"))
        .await
        .expect("one exists already");
    fake.take();
    let specs: Vec<DeviceSpec> = (0..150).map(|i| spec(&format!("bulk-{i:03}"))).collect();
    let results = p.register_many(&specs).await;
    assert_eq!(results.len(), 150);
    assert!(
        results.iter().all(Result::is_ok),
        "{:?}",
        results.iter().find(|r| r.is_err())
    );
    let calls = fake.take();
    let bulk: Vec<usize> = calls
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/devices")
        .map(|r| r.json().as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(bulk, [100, 50]);
    assert!(
        calls
            .iter()
            .any(|r| r.path == "/devices/bulk-007" && r.method == "GET"),
        "the existing one went through register"
    );
    assert!(fake.has_device("bulk-149"));
}

#[tokio::test]
async fn device_state_comes_from_the_twin() {
    let fake = FakeHub::start().await;
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &config(&fake))
        .expect("provider");
    p.register(&spec("state-1")).await.expect("registered");
    let id = DeviceId::parse("state-1").expect("id");
    let offline = p.device_state(&id).await.expect("state");
    assert_eq!(offline.connected, Some(false));
    assert_eq!(
        offline.last_activity, None,
        "the hub's 0001-01-01 means never"
    );
    fake.set_online("state-1");
    fake.set_reported("state-1", json!({"firmware": "1.2.3", "temperature": 21.5}));
    let online = p.device_state(&id).await.expect("state");
    assert_eq!(online.connected, Some(true));
    assert_eq!(
        online.reported_properties,
        Some(json!({"firmware": "1.2.3", "temperature": 21.5}))
    );
    assert!(online.last_activity.is_some());
}

#[tokio::test]
async fn a_twin_command_writes_the_configured_desired_property() {
    let fake = FakeHub::start().await;
    let mut cfg = config(&fake);
    cfg.command_delivery = AzureCommandDelivery::TwinDesired;
    cfg.twin_command.property = "gw_cmd".into();
    let p = AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider");
    p.register(&spec("twin-1")).await.expect("registered");
    fake.take();
    let cmd = command("twin-1", "set_mode");
    assert_eq!(
        p.send_command(&cmd).await.expect("written"),
        CommandOutcome::Published
    );
    let calls = fake.take();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        ("PATCH", "/twins/twin-1")
    );
    assert_eq!(
        calls[0].headers.get("if-match").map(String::as_str),
        Some("\"*\"")
    );
    let desired = calls[0]
        .json()
        .pointer("/properties/desired/gw_cmd")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(desired["name"], json!("set_mode"));
    assert_eq!(desired["correlation_id"], json!("c-1"));
    assert_eq!(desired["id"], json!(cmd.id.to_string()));
    assert_eq!(desired["message"]["CommandName"], json!("set_mode"));
}

mod event_hubs_in_run {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use async_trait::async_trait;
    use bytes::Bytes;
    use iotgw_config::azure_iot_hub::EventHubsConfig;
    use iotgw_config::Secret;

    use super::super::fake_hub::FakeHub;
    use super::super::registry::config;
    use crate::azure_iot_hub::event_hubs::{EventSource, HubEvent, PartitionReceiver, Position};
    use crate::azure_iot_hub::AzureIotHubProvider;
    use crate::{EventKind, Provider, ProviderError, Shutdown};

    struct OneEvent;
    struct Once(Option<HubEvent>);

    #[async_trait]
    impl PartitionReceiver for Once {
        async fn next(&mut self) -> Result<Option<HubEvent>, ProviderError> {
            match self.0.take() {
                Some(e) => Ok(Some(e)),
                None => std::future::pending().await,
            }
        }
    }

    #[async_trait]
    impl EventSource for OneEvent {
        async fn partitions(&self) -> Result<Vec<String>, ProviderError> {
            Ok(vec!["0".into()])
        }
        async fn open(
            &self,
            partition: &str,
            from: Position,
        ) -> Result<Box<dyn PartitionReceiver>, ProviderError> {
            let event = (from == Position::Latest).then(|| HubEvent {
                partition: partition.into(),
                offset: "10".into(),
                sequence_number: 1,
                system: BTreeMap::from([(
                    "iothub-connection-device-id".to_owned(),
                    "eh-1".to_owned(),
                )]),
                body: Bytes::from_static(br#"{"temperature": 70}"#),
                ..HubEvent::default()
            });
            Ok(Box::new(Once(event)))
        }
    }

    fn with_event_hubs(fake: &FakeHub) -> AzureIotHubProvider {
        let mut cfg = config(fake);
        cfg.event_hubs = Some(EventHubsConfig {
            connection_string: Secret::new("Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=h"),
            consumer_group: "iotgw".into(),
            start: Default::default(),
            custom_endpoint: None,
            load_balancing_interval_ms: iotgw_config::azure_iot_hub::default_load_balancing_interval(),
            ownership_expiry_ms: iotgw_config::azure_iot_hub::default_ownership_expiry(),
        });
        AzureIotHubProvider::new(&crate::InstanceName::from("hub"), &cfg).expect("provider")
    }

    #[tokio::test]
    async fn run_consumes_the_event_hubs_endpoint_through_the_injected_source() {
        let fake = FakeHub::start().await;
        let p = Arc::new(with_event_hubs(&fake));
        p.set_event_source(Arc::new(OneEvent));
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let stop = Shutdown::new();
        let task = tokio::spawn({
            let (p, stop) = (p.clone(), stop.clone());
            async move { p.run(tx, stop).await }
        });
        let ev = tokio::time::timeout(super::super::DEADLINE, rx.recv())
            .await
            .expect("an event in time")
            .expect("an event");
        match &ev.kind {
            EventKind::Telemetry(t) => assert_eq!(
                (t.device_id.as_str(), t.message_id.as_str()),
                ("eh-1", "eh:0:1")
            ),
            other => panic!("{other:?}"),
        }
        ev.ack.ack();
        stop.cancel();
        task.await.expect("joined").expect("clean stop");
    }

    #[cfg(not(feature = "azure_event_hubs"))]
    #[tokio::test]
    async fn event_hubs_without_a_client_stops_run_saying_so() {
        let fake = FakeHub::start().await;
        let p = with_event_hubs(&fake);
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        match tokio::time::timeout(super::super::DEADLINE, p.run(tx, Shutdown::new()))
            .await
            .expect("returns")
        {
            Err(ProviderError::Unsupported { what, .. }) => {
                assert!(what.contains("event_hubs"), "{what}")
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }
}
