//! Per-device broker credentials with Mosquitto's dynamic-security plugin.

use iotgw_config::{MqttConfig, Secret};
use iotgw_ids::DeviceId;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use super::*;
use crate::mqtt::{DynsecAdmin, Topics};
use crate::DeviceSpec;

const GATEWAY_PASSWORD: &str = "gateway-test-pw";

/// Creates the gateway's own broker user (`gateway`) and returns a provider config using
/// it, with dynsec administration on.
async fn gateway_config(broker: &Mosquitto, client_id: &str) -> MqttConfig {
    let mut config = config(broker, client_id);
    config.dynsec = Some(dynsec_config());
    let topics = Topics::from_config(&config).expect("valid topics");
    let admin = DynsecAdmin::new("test", &config, &dynsec_config(), topics, None);
    let acl = |t: &str, topic: &str| json!({"acltype": t, "topic": topic, "allow": true});
    let rs = admin
        .execute(vec![
            json!({"command": "createRole", "rolename": "gateway", "acls": [
                acl("subscribePattern", "devices/#"),
                acl("subscribePattern", "$share/#"),
                acl("publishClientReceive", "devices/#"),
                acl("publishClientSend", "devices/+/commands"),
                acl("publishClientSend", "devices/+/settings"),
            ]}),
            json!({"command": "createClient", "username": "gateway", "password": GATEWAY_PASSWORD,
                   "roles": [{"rolename": "gateway"}]}),
        ])
        .await
        .expect("dynsec answers");
    assert!(rs.iter().all(|r| r.error.is_none()), "{rs:?}");
    config.username = Some("gateway".into());
    config.password = Some(Secret::new(GATEWAY_PASSWORD));
    config
}

fn spec(id: &str) -> DeviceSpec {
    DeviceSpec {
        device_id: DeviceId::parse(id).expect("valid id"),
        name: id.into(),
        category: None,
        tags: Default::default(),
        settings: None,
    }
}

fn creds(c: &serde_json::Value) -> DeviceOptions {
    let s = |k: &str| c[k].as_str().expect("credential field").to_owned();
    DeviceOptions {
        credentials: Some((s("username"), s("password"))),
        ..DeviceOptions::default()
    }
}

fn refused(r: Result<Device, ConnectionError>) -> ConnectReturnCode {
    match r {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("expected a CONNACK refusal, got {e}"),
        Ok(_) => panic!("expected the broker to refuse the connection"),
    }
}

#[tokio::test]
async fn dynsec_registration_creates_credentials_that_can_publish_only_own_topics() {
    let Some(broker) = dynsec_broker().await else {
        return;
    };
    let p = provider(&gateway_config(&broker, "gw-dynsec").await);
    let mut run = Running::start_connected(p.clone()).await;

    let reg = p.register(&spec("meter-1")).await.expect("registered");
    let c = reg.credentials.expect("credentials issued");
    assert_eq!(c["username"], "meter-1");
    assert_eq!(c["port"], broker.port());
    assert_eq!(c["telemetry_topic"], "devices/meter-1/telemetry");
    assert!(c["password"].as_str().expect("password").len() >= 24);
    // Other devices' credentials exist too, to show the ACLs keep them apart.
    p.register(&spec("meter-2")).await.expect("registered");

    let mut device = Device::connect(broker.port(), "meter-1", creds(&c))
        .await
        .expect("device connects");
    // Someone else's topic: the broker answers NotAuthorized and forwards nothing.
    device
        .client
        .publish(
            "devices/meter-2/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"message_id":"forged"}"#,
        )
        .await
        .expect("queued");
    let Packet::PubAck(ack) = device
        .next("PUBACK", |p| matches!(p, Packet::PubAck(_)))
        .await
    else {
        unreachable!()
    };
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    device
        .client
        .subscribe("devices/meter-2/commands", QoS::AtLeastOnce)
        .await
        .expect("queued");
    let Packet::SubAck(sub) = device
        .next("SUBACK", |p| matches!(p, Packet::SubAck(_)))
        .await
    else {
        unreachable!()
    };
    assert!(
        !matches!(sub.return_codes[0], SubscribeReasonCode::Success(_)),
        "{sub:?}"
    );

    // Its own topic reaches the provider.
    device
        .client
        .publish(
            "devices/meter-1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"message_id":"own"}"#,
        )
        .await
        .expect("queued");
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("meter-1", "own")
    );
    ack.ack();

    // A wrong password is refused.
    let mut wrong = creds(&c);
    if let Some((_, pw)) = wrong.credentials.as_mut() {
        pw.push('x');
    }
    let code = refused(Device::connect(broker.port(), "meter-1b", wrong).await);
    assert!(
        matches!(
            code,
            ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
        ),
        "{code:?}"
    );

    // Registering again is idempotent: a new password replaces the old one.
    device.kill();
    let again = p
        .register(&spec("meter-1"))
        .await
        .expect("registered again");
    assert!(
        again
            .message
            .as_deref()
            .is_some_and(|m| m.contains("existed")),
        "{again:?}"
    );
    let c2 = again.credentials.expect("new credentials");
    assert_ne!(c2["password"], c["password"]);
    refused(Device::connect(broker.port(), "meter-1", creds(&c)).await);
    Device::connect(broker.port(), "meter-1", creds(&c2))
        .await
        .expect("new password works");
    run.stop().await.expect("clean stop");
}

#[tokio::test]
async fn dynsec_unregister_removes_the_device_credentials() {
    let Some(broker) = dynsec_broker().await else {
        return;
    };
    let mut config = config(&broker, "gw-dynsec-unreg");
    config.dynsec = Some(dynsec_config());
    let p = provider(&config);
    let id = DeviceId::parse("meter-5").expect("valid id");

    let c = p
        .register(&spec("meter-5"))
        .await
        .expect("registered")
        .credentials
        .expect("credentials");
    Device::connect(broker.port(), "meter-5", creds(&c))
        .await
        .expect("device connects")
        .kill();

    p.unregister(&id).await.expect("unregistered");
    refused(Device::connect(broker.port(), "meter-5", creds(&c)).await);
    match p.unregister(&id).await {
        Err(ProviderError::NotFound { .. }) => {}
        other => panic!("expected NotFound for an unknown client, got {other:?}"),
    }
}

#[tokio::test]
async fn dynsec_with_a_wrong_admin_password_is_unauthorized() {
    let Some(broker) = dynsec_broker().await else {
        return;
    };
    let mut config = config(&broker, "gw-dynsec-bad");
    let mut admin = dynsec_config();
    admin.admin_password = Secret::new("not-the-password");
    config.dynsec = Some(admin);
    match provider(&config).register(&spec("meter-6")).await {
        Err(ProviderError::Unauthorized { message, .. }) => {
            assert!(message.contains("admin_password"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

#[tokio::test]
async fn run_with_credentials_the_broker_refuses_returns_unauthorized() {
    let Some(broker) = dynsec_broker().await else {
        return;
    };
    let mut config = config(&broker, "gw-refused");
    config.username = Some("nobody".into());
    config.password = Some(Secret::new("wrong"));
    let p = provider(&config);
    let run = Running::start(p.clone());
    let result = tokio::time::timeout(WAIT, run.task)
        .await
        .expect("run returns")
        .expect("no panic");
    match result {
        Err(ProviderError::Unauthorized { message, .. }) => {
            assert!(message.contains("nobody"), "{message}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
    assert!(
        p.health()
            .last_error
            .is_some_and(|e| e.contains("unauthorized")),
        "{:?}",
        p.health()
    );
}
