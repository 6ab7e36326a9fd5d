//! The mqtt provider over TLS on Mosquitto (`MosquittoSpec::client_certificate_tls`: a TLS
//! listener that requires client certificates, next to a plain one for the devices): the
//! broker's certificate is verified against the configured CA, the gateway presents its
//! own, and without either the connection is refused with the reason in the health.

use iotgw_config::MqttTlsConfig;
use iotgw_testkit::mosquitto::TLS_PORT;
use iotgw_testkit::pki::Pki;

use super::*;

#[tokio::test]
async fn over_tls_the_provider_verifies_the_broker_shows_its_certificate_and_receives() {
    iotgw_testkit::require_docker("this mqtt TLS test (Mosquitto)").expect("docker");
    let pki = Pki::new("iotgw mqtt TLS test CA").expect("a test CA");
    let (server_cert, server_key) = pki
        .issue("mosquitto", &["localhost", "127.0.0.1"])
        .expect("the broker's certificate");
    let broker = Mosquitto::dedicated(MosquittoSpec::client_certificate_tls(
        &pki.ca_pem,
        &server_cert,
        &server_key,
    ))
    .await
    .expect("the TLS Mosquitto starts");
    let (cert, key) = pki.client_files("iotgw-gateway").expect("client files");
    let tls = MqttTlsConfig {
        ca_file: Some(pki.ca_path()),
        client_cert_file: Some(cert),
        client_key_file: Some(key),
    };
    let with = |tls: MqttTlsConfig, id: &str| MqttConfig {
        port: broker.mapped_port(TLS_PORT),
        tls: Some(tls),
        ..config(&broker, id)
    };

    let mut run = Running::start_connected(provider(&with(tls.clone(), "gw-tls"))).await;
    let device = Device::connect(broker.port(), "pump-tls", DeviceOptions::default())
        .await
        .expect("the device connects on the plain listener");
    device
        .client
        .publish(
            "devices/pump-tls/telemetry",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"message_id":"over-tls"}"#,
        )
        .await
        .expect("publish queued");
    let (t, ack) = run.telemetry().await;
    assert_eq!(
        (t.device_id.as_str(), t.message_id.as_str()),
        ("pump-tls", "over-tls")
    );
    ack.ack();
    run.stop().await.expect("clean stop");

    // Without a client certificate the broker refuses the handshake; with a CA that did
    // not sign the broker, the gateway refuses the broker. Neither connects, and the
    // health says why.
    let other = Pki::new("someone else's CA").expect("another CA");
    for (what, tls) in [
        (
            "no client certificate",
            MqttTlsConfig {
                ca_file: Some(pki.ca_path()),
                ..MqttTlsConfig::default()
            },
        ),
        (
            "an unknown broker certificate",
            MqttTlsConfig {
                ca_file: Some(other.ca_path()),
                ..tls.clone()
            },
        ),
    ] {
        let p = provider(&with(tls, "gw-refused"));
        let run = Running::start(p.clone());
        let error = wait_for_error(&p).await;
        assert!(!p.health().connected, "{what}: {error}");
        run.stop().await.expect("clean stop");
    }
}

#[test]
fn unreadable_tls_files_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem").display().to_string();
    let refused = |tls: MqttTlsConfig| match MqttProvider::new(
        &crate::InstanceName::from("edge"),
        &MqttConfig {
            tls: Some(tls),
            ..MqttConfig::default()
        },
    ) {
        Err(ProviderError::InvalidInput { field, .. }) => field,
        Err(other) => panic!("expected InvalidInput, got {other}"),
        Ok(_) => panic!("expected the TLS files to be refused"),
    };
    assert_eq!(
        refused(MqttTlsConfig {
            ca_file: Some(missing.clone()),
            ..MqttTlsConfig::default()
        }),
        "tls.ca_file"
    );
    let pki = Pki::new("a CA").expect("CA");
    assert_eq!(
        refused(MqttTlsConfig {
            ca_file: Some(pki.ca_path()),
            client_cert_file: Some(missing.clone()),
            client_key_file: Some(missing),
        }),
        "tls.client_cert_file"
    );
}

/// Waits until the provider's health names an error.
async fn wait_for_error(p: &Arc<MqttProvider>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = p.health().last_error {
            return e;
        }
        assert!(Instant::now() < deadline, "no connection error within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
