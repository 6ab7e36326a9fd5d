//! The MQTT side against Mosquitto standing in for the AWS IoT Core endpoint (TLS, client
//! certificates required): telemetry, replies, presence events ordered by their time,
//! shadow documents, and what health says about a certificate the server refuses.

use std::sync::Arc;

use iotgw_ids::DeviceId;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{env_or_skip, unique, wait_until, Env, WAIT};
use crate::aws_iot_core::AwsIotCoreProvider;
use crate::{DeviceSpec, EventKind, Provider, ProviderError, ProviderEvent, Shutdown};

/// A provider whose `run` is going.
struct Running {
    provider: Arc<AwsIotCoreProvider>,
    events: mpsc::Receiver<ProviderEvent>,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), ProviderError>>,
}

impl Running {
    fn start(provider: Arc<AwsIotCoreProvider>) -> Self {
        let (tx, events) = mpsc::channel(16);
        let shutdown = Shutdown::new();
        let (p, s) = (provider.clone(), shutdown.clone());
        let task = tokio::spawn(async move { p.run(tx, s).await });
        Self {
            provider,
            events,
            shutdown,
            task,
        }
    }

    /// Starts and waits until connected and subscribed.
    async fn start_connected(provider: Arc<AwsIotCoreProvider>) -> Self {
        let r = Self::start(provider);
        let p = r.provider.clone();
        wait_until("the gateway connected and subscribed", || {
            let p = p.clone();
            async move { p.health().connected }
        })
        .await;
        r
    }

    /// The next event matching `pred` (others are acked and skipped).
    async fn next(&mut self, what: &str, pred: impl Fn(&EventKind) -> bool) -> ProviderEvent {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if pred(&ev.kind) => return ev,
                Ok(Some(ev)) => ev.ack.ack(),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    async fn stop(self) -> Result<(), ProviderError> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run stops promptly after shutdown")
            .expect("run does not panic")
    }
}

/// An MQTT 5 client with a certificate of the test CA (a device, or the stand-in for
/// AWS publishing its reserved topics).
struct Client {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn connect(env: &Env, client_id: &str) -> Self {
        let tls = env
            .pki
            .client_tls(client_id)
            .expect("TLS with a client certificate of the test CA");
        let mut o = MqttOptions::new(client_id, env.host.clone(), env.mqtt_port);
        o.set_keep_alive(std::time::Duration::from_secs(5))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        let (client, mut eventloop) = AsyncClient::new(o, 16);
        let connack = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("connect answered within the deadline");
        connack.unwrap_or_else(|e| panic!("client {client_id} could not connect: {e}"));
        let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        Self { client, task }
    }

    async fn publish(&self, topic: &str, payload: &str, props: Option<PublishProperties>) {
        let done = match props {
            Some(p) => {
                self.client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_owned(), p)
                    .await
            }
            None => {
                self.client
                    .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
                    .await
            }
        };
        done.expect("publish queued");
    }
}

#[tokio::test]
async fn telemetry_and_replies_from_a_device_arrive_over_mutual_tls_and_are_acked() {
    let env = env_or_skip!();
    let gw = unique("gw");
    let mut r = Running::start_connected(env.provider(&gw).await).await;
    let id = unique("tele");
    let device = Client::connect(&env, &id).await;

    device
        .publish(
            &format!("dt/iotgw/{id}/telemetry"),
            r#"{"message_id":"m-1","temperature":81.5}"#,
            None,
        )
        .await;
    let ev = r
        .next(
            "telemetry",
            |k| matches!(k, EventKind::Telemetry(t) if t.device_id == id),
        )
        .await;
    let EventKind::Telemetry(t) = &ev.kind else {
        unreachable!("filtered above")
    };
    assert_eq!(t.message_id, "m-1", "the device-chosen id");
    assert_eq!(
        t.payload.as_ref(),
        br#"{"message_id":"m-1","temperature":81.5}"#
    );
    ev.ack.ack();

    let props = PublishProperties {
        correlation_data: Some("c-42".into()),
        ..PublishProperties::default()
    };
    device
        .publish(
            &format!("cmd/iotgw/{id}/res"),
            r#"{"status":"error","reason":"valve stuck"}"#,
            Some(props),
        )
        .await;
    let ev = r
        .next(
            "command reply",
            |k| matches!(k, EventKind::CommandReply { device_id, .. } if *device_id == id),
        )
        .await;
    assert_eq!(
        ev.kind,
        EventKind::CommandReply {
            device_id: id.clone(),
            correlation_id: "c-42".into(),
            ok: false,
            reason: Some("valve stuck".into()),
        }
    );
    ev.ack.ack();
    r.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_late_disconnect_does_not_override_a_newer_connect_because_presence_is_ordered_by_its_timestamp(
) {
    let env = env_or_skip!();
    let gw = unique("gw");
    let provider = env.provider(&gw).await;
    let id = unique("pres");
    let spec = DeviceSpec {
        device_id: DeviceId::parse(&id).expect("valid id"),
        name: id.clone(),
        category: None,
        tags: Default::default(),
        settings: None,
    };
    provider.register(&spec).await.expect("registered in moto");
    let mut r = Running::start_connected(provider.clone()).await;
    let aws = Client::connect(&env, &unique("aws-iot")).await;
    let t0 = chrono::Utc::now().timestamp_millis();
    let presence = |kind: &str, at: i64| {
        format!(
            r#"{{"clientId":"{id}","timestamp":{at},"eventType":"{kind}","sessionIdentifier":"s-1","principalIdentifier":"p","ipAddress":"192.0.2.1","versionNumber":1}}"#
        )
    };
    aws.publish(
        &format!("$aws/events/presence/connected/{id}"),
        &presence("connected", t0 + 2_000),
        None,
    )
    .await;
    let ev = r
        .next("connected event", |k| {
            matches!(k, EventKind::Connection { device_id, connected: true, .. } if *device_id == id)
        })
        .await;
    let EventKind::Connection { at, .. } = ev.kind else {
        unreachable!("filtered above")
    };
    assert_eq!(at.timestamp_millis(), t0 + 2_000, "the event's own time");
    ev.ack.ack();

    // Arrives later, happened earlier.
    aws.publish(
        &format!("$aws/events/presence/disconnected/{id}"),
        &presence("disconnected", t0 + 1_000),
        None,
    )
    .await;
    let ev = r
        .next("disconnected event", |k| {
            matches!(k, EventKind::Connection { device_id, connected: false, .. } if *device_id == id)
        })
        .await;
    let EventKind::Connection { at, .. } = ev.kind else {
        unreachable!("filtered above")
    };
    assert_eq!(
        at.timestamp_millis(),
        t0 + 1_000,
        "emitted with its own (older) time"
    );
    ev.ack.ack();
    let state = provider.device_state(&spec.device_id).await.expect("state");
    assert_eq!(state.connected, Some(true), "the newer connect wins");

    aws.publish(
        &format!("$aws/things/{id}/shadow/update/documents"),
        &format!(
            r#"{{"previous":null,"current":{{"state":{{"reported":{{"rpm":1200}}}},"version":2}},"timestamp":{}}}"#,
            t0 / 1000 + 3
        ),
        None,
    )
    .await;
    let ev = r
        .next(
            "reported properties",
            |k| matches!(k, EventKind::ReportedProperties { device_id, .. } if *device_id == id),
        )
        .await;
    let EventKind::ReportedProperties { properties, .. } = &ev.kind else {
        unreachable!("filtered above")
    };
    assert_eq!(properties, &serde_json::json!({"rpm": 1200}));
    ev.ack.ack();
    r.stop().await.expect("clean stop");
    provider
        .unregister(&spec.device_id)
        .await
        .expect("unregistered");
}

#[tokio::test]
async fn a_gateway_certificate_the_endpoint_does_not_trust_shows_in_health_as_a_tls_error() {
    let env = env_or_skip!();
    let gw = unique("gw");
    let mut c = env.config(&gw);
    // A certificate from another CA: the stand-in refuses it, as AWS refuses an
    // unregistered certificate.
    let other = iotgw_testkit::pki::Pki::new("another CA").expect("a second CA");
    let (cert, key) = other
        .client_files(&gw)
        .expect("a certificate of the other CA");
    c.client_cert_path = Some(cert);
    c.client_key_path = Some(key);
    let provider = Arc::new(
        AwsIotCoreProvider::new(&crate::InstanceName::from("aws-test"), &c)
            .await
            .expect("valid config"),
    );
    let r = Running::start(provider.clone());
    let p = provider.clone();
    wait_until("health reports the refused certificate", || {
        let p = p.clone();
        async move {
            let h = p.health();
            !h.connected
                && h.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("client_cert_path"))
        }
    })
    .await;
    let h = provider.health();
    assert!(
        h.last_error
            .as_deref()
            .is_some_and(|e| e.contains(&env.mqtt_port.to_string())),
        "{h:?}"
    );
    r.stop()
        .await
        .expect("a refused TLS handshake is retried, not fatal");
}
