//! `iotgw simulate --instance hub` on an `azure_iot_hub` instance, with the `azure_iot_sdk`
//! device client (feature `azure_device_sim`). IoT Hub has no emulator, and the gateway
//! reads Azure telemetry through Event Hubs or Event Grid, not MQTT, so there is no loop
//! through the gateway here. What is checked is what the SDK device sends, against a
//! stand-in for the hub's MQTT endpoint: this test's TLS listener on 127.0.0.1:8883 (the
//! SDK always dials port 8883; its certificate is for `localhost`, issued by a test CA
//! that OpenSSL finds through `SSL_CERT_FILE`), which reads the device's CONNECT and then
//! passes every byte on to a plain Mosquitto, where the test's own client plays the hub:
//! - the CONNECT: client id the device id, username `{hub}/{device}/?api-version=...`,
//!   password a SAS token for `{hub}/devices/{device}` that the Azure provider's own
//!   `sas::token` computes identically from the device key;
//! - telemetry on `devices/{id}/messages/events/...`, the simulator's JSON reading;
//! - a direct method `$iothub/methods/POST/{name}/?$rid=N` answered on
//!   `$iothub/methods/res/200/?$rid=N` with `{"status": "ok"}`;
//! - reported properties on `$iothub/twin/PATCH/properties/reported/?$rid=N`;
//! - a cloud-to-device message on `devices/{id}/messages/devicebound/` counted as a command
//!   in the summary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec};
use iotgw_testkit::pki::Pki;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the stand-in read from a device's CONNECT.
#[derive(Clone, Debug, Default)]
struct Connect {
    client_id: String,
    username: Option<String>,
    password: Option<String>,
}

/// Reads one MQTT string (2-byte length, UTF-8) at `at`.
fn mqtt_string(body: &[u8], at: &mut usize) -> String {
    let len = u16::from_be_bytes([body[*at], body[*at + 1]]) as usize;
    let s = String::from_utf8_lossy(&body[*at + 2..*at + 2 + len]).into_owned();
    *at += 2 + len;
    s
}

/// The fields of an MQTT 3.1.1 CONNECT's variable header and payload.
fn parse_connect(body: &[u8]) -> Connect {
    let mut at = 0;
    let protocol = mqtt_string(body, &mut at);
    assert_eq!(protocol, "MQTT", "protocol name");
    assert_eq!(body[at], 4, "MQTT 3.1.1 (protocol level 4)");
    let flags = body[at + 1];
    at += 4; // level, flags, keep alive
    let client_id = mqtt_string(body, &mut at);
    if flags & 0x04 != 0 {
        mqtt_string(body, &mut at);
        mqtt_string(body, &mut at);
    }
    let username = (flags & 0x80 != 0).then(|| mqtt_string(body, &mut at));
    let password = (flags & 0x40 != 0).then(|| mqtt_string(body, &mut at));
    Connect {
        client_id,
        username,
        password,
    }
}

/// Reads one whole packet (fixed header, remaining length, body) from `r`: its bytes and
/// where its body starts.
async fn read_packet(r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<(Vec<u8>, usize)> {
    let mut raw = vec![r.read_u8().await?];
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = r.read_u8().await?;
        raw.push(b);
        len |= ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let start = raw.len();
    raw.resize(start + len, 0);
    r.read_exact(&mut raw[start..]).await?;
    Ok((raw, start))
}

/// The hub's MQTT endpoint stand-in: TLS on 127.0.0.1:8883 with `cert`/`key`, each
/// connection's CONNECT recorded, then everything passed on to `broker`.
async fn hub_stand_in(
    cert: &str,
    key: &str,
    broker: (String, u16),
    seen: Arc<Mutex<Vec<Connect>>>,
) -> tokio::task::JoinHandle<()> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(cert.as_bytes()).expect("server cert")];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:8883")
        .await
        .expect("127.0.0.1:8883 is free (the Azure device SDK always dials port 8883)");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, broker, seen) = (acceptor.clone(), broker.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut device) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok((connect, body_at)) = read_packet(&mut device).await else {
                    return;
                };
                assert_eq!(connect[0] >> 4, 1, "the device's first packet is a CONNECT");
                seen.lock()
                    .expect("lock")
                    .push(parse_connect(&connect[body_at..]));
                let mut upstream = tokio::net::TcpStream::connect(broker)
                    .await
                    .expect("the broker behind the stand-in");
                upstream
                    .write_all(&connect)
                    .await
                    .expect("CONNECT passed on");
                let _ = tokio::io::copy_bidirectional(&mut device, &mut upstream).await;
            });
        }
    })
}

/// Percent-decodes a query value (`+` as a space is not used by SAS signatures).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// The `name=` parts of a SAS token.
fn sas_parts(token: &str) -> std::collections::HashMap<String, String> {
    let rest = token
        .strip_prefix("SharedAccessSignature ")
        .unwrap_or_else(|| panic!("a SAS token: {token}"));
    rest.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_device_sdk_simulator_sends_what_iot_hub_expects_to_a_tls_stand_in() {
    if iotgw_testkit::require_docker("the azure_iot_hub simulate test (Mosquitto)").is_err() {
        return;
    }
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("mosquitto starts");
    let pki = Pki::new("iotgw-test-azure-hub").expect("test CA");
    let (cert, key) = pki.issue("localhost", &["localhost"]).expect("server cert");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stand_in = hub_stand_in(
        &cert,
        &key,
        (broker.host().to_owned(), broker.port()),
        seen.clone(),
    )
    .await;

    // The hub's side: telemetry, method answers and reported properties.
    let mut opts = MqttOptions::new("hub-side", broker.host(), broker.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (hub, mut events) = AsyncClient::new(opts, 100);
    for filter in [
        "devices/+/messages/events/#",
        "$iothub/methods/res/#",
        "$iothub/twin/PATCH/properties/reported/#",
    ] {
        hub.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    tokio::spawn(async move {
        while let Ok(ev) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });

    let device_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    assert!(device_key.ends_with('='), "a padded key: {device_key}");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("azure.toml");
    std::fs::write(
        &config,
        "[routing]\ndefault = \"hub\"\n\n[providers.hub]\nkind = \"azure_iot_hub\"\n\
         connection_string = \"HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=cmVwbGFjZS1tZS13aXRoLXRoZS1wb2xpY3kta2V5IQ==\"\n",
    )
    .expect("config");
    let sim = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotgw"))
        .args(["simulate", "--config"])
        .arg(&config)
        .args([
            "--instance",
            "hub",
            "--interval-ms",
            "200",
            "--duration-secs",
            "40",
        ])
        .arg("--connection-string")
        .arg(format!(
            "HostName=localhost;DeviceId=sim-001;SharedAccessKey={device_key}"
        ))
        .env("SSL_CERT_FILE", pki.ca_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("iotgw simulate starts");

    // Telemetry first: the device connected through the stand-in.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut telemetry = None;
    let mut reported = None;
    while telemetry.is_none() || reported.is_none() {
        let (topic, body) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("telemetry and reported properties within 30 s")
            .expect("hub side open");
        if topic.starts_with("devices/sim-001/messages/events/") {
            telemetry = Some(serde_json::from_slice::<serde_json::Value>(&body).expect("JSON"));
        } else if topic.starts_with("$iothub/twin/PATCH/properties/reported/?$rid=") {
            reported = Some(serde_json::from_slice::<serde_json::Value>(&body).expect("JSON"));
        }
    }
    let telemetry = telemetry.expect("telemetry");
    assert!(telemetry["temperature"].is_number(), "{telemetry}");
    assert_eq!(reported.expect("reported")["firmware"], "1.4.2");

    let connect = seen.lock().expect("lock")[0].clone();
    assert_eq!(connect.client_id, "sim-001");
    let username = connect.username.expect("a username");
    assert!(
        username.starts_with("localhost/sim-001/?api-version="),
        "{username}"
    );
    let password = connect.password.expect("a password: the SAS token");
    let parts = sas_parts(&password);
    assert_eq!(
        unescape(&parts["sr"]),
        "localhost/devices/sim-001",
        "{password}"
    );
    let expiry: u64 = parts["se"].parse().expect("se: seconds");
    let ours = iotgw_providers::azure_iot_hub::sas::token(
        "localhost/devices/sim-001",
        &device_key,
        None,
        expiry,
    )
    .expect("the provider's SAS");
    assert_eq!(
        unescape(&sas_parts(&ours)["sig"]),
        unescape(&parts["sig"]),
        "the device's signature is the one the provider's sas::token computes: {password} vs {ours}"
    );

    // A direct method, answered.
    hub.publish(
        "$iothub/methods/POST/cool_down/?$rid=42",
        QoS::AtLeastOnce,
        false,
        br#"{"minutes": 5}"#.to_vec(),
    )
    .await
    .expect("method call");
    let answer = loop {
        let (topic, body) = tokio::time::timeout_at(deadline + Duration::from_secs(10), rx.recv())
            .await
            .expect("the method's answer")
            .expect("hub side open");
        if topic.starts_with("$iothub/methods/res/") {
            break (topic, body);
        }
    };
    assert_eq!(answer.0, "$iothub/methods/res/200/?$rid=42");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&answer.1).expect("JSON"),
        serde_json::json!({"status": "ok"})
    );

    // A cloud-to-device message, then stop the simulator: its summary counts both.
    hub.publish(
        "devices/sim-001/messages/devicebound/",
        QoS::AtLeastOnce,
        false,
        br#"{"CommandName": "reboot"}"#.to_vec(),
    )
    .await
    .expect("C2D message");
    let pid = sim.id().expect("pid") as i32;
    // Wait for the C2D's reported-properties answer before stopping.
    loop {
        let (topic, _) = tokio::time::timeout_at(deadline + Duration::from_secs(20), rx.recv())
            .await
            .expect("reported properties after the C2D message")
            .expect("hub side open");
        if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
            break;
        }
    }
    // Ctrl-C, as a user stops it.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let out = tokio::time::timeout(Duration::from_secs(20), sim.wait_with_output())
        .await
        .expect("the simulator stops on Ctrl-C")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("commands"), "{stdout}\n{stderr}");
    stand_in.abort();
}
