//! `iotgw simulate --instance NAME -n 3 --register` (the real binary) against a real
//! gateway (`iotgw run`) and each cloud's emulator: the devices register through the API,
//! each gets an alert and its debounced child, a command sent through the API is answered
//! (Sent, or Error with the device's reason), and Ctrl-C (SIGTERM) prints the summary.
//!
//! - mqtt: Mosquitto, one simulator speaking MQTT 3.1.1 and one MQTT 5 (refusing every
//!   command), on one instance with `command_correlation = "both"`.
//! - gcp_pubsub: the Pub/Sub emulator; commands through each device's subscription.
//! - aws_iot_core: moto (things, certificates, iot-data) and a Mosquitto with TLS on its
//!   second listener standing in for the data endpoint. moto's certificates are signed by
//!   no CA a broker can check, so that listener does not ask for a client certificate (the
//!   devices still load the certificate and key registration returned); and moto does not
//!   forward `Publish` to any broker, so the test does AWS's part: it takes the command from
//!   moto's request recording and publishes it on the broker, as AWS IoT would.
//!
//! Without Docker: fails under `CI=true`, elsewhere prints `SKIPPED: ...`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec};
use iotgw_testkit::wait_for;
use serde_json::Value;

use super::{common, mqtt_instance, write, Gateway};

/// Longest wait for any one condition.
const DEADLINE: Duration = Duration::from_secs(60);
/// Command status option values.
const SENT: i64 = 192_350_001;
const ERROR: i64 = 192_350_002;

/// One `iotgw simulate` process.
struct Sim {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Sim {
    fn start(dir: &Path, config: &Path, name: &str, args: &[&str]) -> Self {
        let out = dir.join(format!("simulate-{name}.out"));
        let err = dir.join(format!("simulate-{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_iotgw"))
            .args(["simulate", "--config"])
            .arg(config)
            .args(args)
            .env("IOTGW_LOG", "info")
            .env_remove("IOTGW_API_TOKEN")
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("iotgw simulate starts");
        Self {
            child: Some(child),
            out,
            err,
        }
    }

    fn logs(&self) -> String {
        let text = std::fs::read_to_string(&self.err).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- simulate log (last lines) ---\n{}",
            lines[from..].join("\n")
        )
    }

    /// SIGTERM (what Ctrl-C does), then its exit status and the summary it printed.
    async fn stop(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(term.success(), "kill -TERM failed");
        let until = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                Instant::now() < until,
                "simulate did not stop within 30 s of SIGTERM\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        (
            status,
            std::fs::read_to_string(&self.out).unwrap_or_default(),
        )
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The number before `label` on the summary line starting with `line`.
fn count(summary: &str, line: &str, label: &str) -> u64 {
    let l = summary
        .lines()
        .find(|l| l.trim_start().starts_with(line))
        .unwrap_or_else(|| panic!("no `{line}` line in\n{summary}"));
    let at = l
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in {l:?}"));
    l[..at]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no number before `{label}` in {l:?}"))
}

/// Waits until `id` has an alert with a debounced child.
async fn alert_with_child(gw: &Gateway, sim: &Sim, id: &str) {
    wait_for(
        &format!("an alert of {id} with its debounced child"),
        DEADLINE,
        || async {
            let alerts = gw.items(&format!("/api/v1/alerts?device_id={id}")).await;
            let primary = alerts.iter().find(|a| a["msdyn_parentalert"].is_null())?;
            alerts
                .iter()
                .any(|a| a["msdyn_parentalert"] == primary["msdyn_iotalertid"])
                .then_some(())
        },
        || format!("{}\n{}", gw.logs(), sim.logs()),
    )
    .await;
}

/// Sends a command to `id` through the API and waits until its status is `want`.
async fn command_ends(gw: &Gateway, sim: &Sim, id: &str, want: i64) -> Value {
    let cmd = gw.command(id, "reboot").await;
    let cid = cmd["msdyn_iotdevicecommandid"]
        .as_str()
        .expect("command id")
        .to_owned();
    wait_for(
        &format!("the command to {id} to reach status {want}"),
        DEADLINE,
        || async {
            let (_, c) = gw.get(&format!("/api/v1/commands/{cid}")).await;
            (c["msdyn_commandstatus"] == want).then_some(c)
        },
        || format!("{}\n{}", gw.logs(), sim.logs()),
    )
    .await
}

/// Every device of `prefix` registered on `instance` (with the properties it reported,
/// when the cloud carries them to the gateway), an alert with a child each, and a command
/// answered with `want`.
async fn check_fleet(gw: &Gateway, sim: &Sim, prefix: &str, instance: &str, want: i64) {
    check_fleet_with(gw, sim, prefix, instance, want, true).await;
}

async fn check_fleet_with(
    gw: &Gateway,
    sim: &Sim,
    prefix: &str,
    instance: &str,
    want: i64,
    properties: bool,
) {
    let ids: Vec<String> = (1..=3).map(|i| format!("{prefix}-{i:03}")).collect();
    for id in &ids {
        let d = wait_for(
            &format!("{id} registered (and its reported properties)"),
            DEADLINE,
            || async {
                let (status, d) = gw.get(&format!("/api/v1/devices/{id}")).await;
                let reported = d["msdyn_devicereportedproperties"]["model"] == "sim-chiller-2";
                (status == 200 && (reported || !properties)).then_some(d)
            },
            || format!("{}\n{}", gw.logs(), sim.logs()),
        )
        .await;
        assert_eq!(d["msdyn_iotproviderinstance"], instance, "{d}");
        assert_eq!(d["msdyn_issimulated"], 192_350_000, "simulated: Yes; {d}");
    }
    for id in &ids {
        alert_with_child(gw, sim, id).await;
    }
    let c = command_ends(gw, sim, &ids[0], want).await;
    if want == ERROR {
        let reason = c["msdyn_commandstatusreason"].as_str().unwrap_or_default();
        assert!(
            ["interlock", "defrost", "valve", "out of range"]
                .iter()
                .any(|r| reason.contains(r)),
            "the device's refusal reason is on the command: {c}"
        );
    }
}

/// Stops `sim` and checks its summary: every device connected, readings sent, alerts
/// counted, commands answered as `ok`/`refused` say (at least one where true).
async fn check_summary(sim: Sim, answered: bool, refused: bool) -> String {
    let logs = sim.logs();
    let (status, summary) = sim.stop().await;
    eprintln!("{summary}");
    assert!(status.success(), "exit {status}\n{summary}\n{logs}");
    assert!(
        summary.contains("connected   3 of 3") && summary.contains("registered  3 of 3"),
        "{summary}"
    );
    assert!(count(&summary, "sent", "readings") >= 3, "{summary}");
    assert!(count(&summary, "alerts", "seen") >= 6, "{summary}");
    assert_eq!(
        count(&summary, "commands", "answered ok") > 0,
        answered,
        "{summary}"
    );
    assert_eq!(
        count(&summary, "commands", "refused") > 0,
        refused,
        "{summary}"
    );
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_mqtt_devices_on_3_1_1_and_5_register_alert_and_answer_commands() {
    if iotgw_testkit::require_docker("the mqtt simulate test (Mosquitto)").is_err() {
        return;
    }
    let broker = Mosquitto::dedicated(MosquittoSpec::anonymous())
        .await
        .expect("mosquitto starts");
    let dir = tempfile::tempdir().expect("dir");
    let port = iotgw_testkit::free_port();
    let config = write(
        dir.path(),
        &format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\n{common}{plant}command_correlation = \"both\"\n[routing]\ndefault = \"plant\"\n",
            common = common(dir.path()),
            // "both" (set after it) serves 3.1.1 and 5 devices alike.
            plant = mqtt_instance("plant", broker.port()).replace("command_correlation = \"payload\"\n", ""),
        ),
    );
    let gw = Gateway::start(&config, dir.path(), port).await;
    gw.wait_connected("plant").await;

    let common_args = [
        "--instance",
        "plant",
        "-n",
        "3",
        "--register",
        "--interval-ms",
        "300",
    ];
    let v3 = Sim::start(
        dir.path(),
        &config,
        "v3",
        &[&common_args[..], &["--prefix", "v3", "--protocol", "3.1.1"]].concat(),
    );
    let v5 = Sim::start(
        dir.path(),
        &config,
        "v5",
        &[
            &common_args[..],
            &["--prefix", "v5", "--protocol", "5", "--refuse-rate", "1"],
        ]
        .concat(),
    );
    check_fleet(&gw, &v3, "v3", "plant", SENT).await;
    check_fleet(&gw, &v5, "v5", "plant", ERROR).await;
    check_summary(v3, true, false).await;
    check_summary(v5, false, true).await;
    broker.remove().await;
}

// The binary must be built with the gcp_pubsub provider (scripts/test.sh builds every one).
#[cfg(feature = "gcp_pubsub")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_gcp_pubsub_devices_register_alert_and_answer_commands_from_their_subscription() {
    use iotgw_testkit::pubsub::PubSub;
    if iotgw_testkit::require_docker("the gcp_pubsub simulate test (Pub/Sub emulator)").is_err() {
        return;
    }
    let pubsub = PubSub::leased().await.expect("pub/sub emulator");
    let tag = format!("sim{}", std::process::id());
    let dir = tempfile::tempdir().expect("dir");
    let port = iotgw_testkit::free_port();
    let config = write(
        dir.path(),
        &format!(
            r#"[api]
listen = "127.0.0.1:{port}"
{common}
[providers.cloud]
kind = "gcp_pubsub"
project_id = "{project}"
emulator_host = "{emulator}"
create_if_missing = true
command_subscriptions = true
telemetry_topic = "{tag}-telemetry"
telemetry_subscription = "{tag}-telemetry"
commands_topic = "{tag}-commands"
command_subscription_prefix = "{tag}-cmd-"
reply_topic = "{tag}-replies"
reply_subscription = "{tag}-replies"
lifecycle_topic = "{tag}-lifecycle"
lifecycle_subscription = "{tag}-lifecycle"
reconnect_max_ms = 500
[routing]
default = "cloud"
"#,
            common = common(dir.path()),
            project = iotgw_testkit::pubsub::PROJECT,
            emulator = pubsub.emulator_host(),
        ),
    );
    let gw = Gateway::start(&config, dir.path(), port).await;
    gw.wait_connected("cloud").await;
    let sim = Sim::start(
        dir.path(),
        &config,
        "gcp",
        &[
            "--instance",
            "cloud",
            "-n",
            "3",
            "--register",
            "--interval-ms",
            "300",
            "--prefix",
            "gsim",
        ],
    );
    check_fleet(&gw, &sim, "gsim", "cloud", SENT).await;
    check_summary(sim, true, false).await;
}

/// Decodes standard base64 (the correlation data header moto records).
#[cfg(feature = "aws_iot_core")]
fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// AWS IoT's part moto does not play: every `Publish` moto recorded to a topic under
/// `prefix` goes out on the broker's plain listener, with its MQTT 5 correlation data, as
/// AWS IoT would deliver it to the device. Runs until dropped (aborted).
#[cfg(feature = "aws_iot_core")]
fn forward_commands(
    moto: std::sync::Arc<iotgw_testkit::moto::Moto>,
    broker_port: u16,
    prefix: String,
) -> tokio::task::JoinHandle<()> {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    tokio::spawn(async move {
        let opts = MqttOptions::new(format!("aws-service-{prefix}"), "127.0.0.1", broker_port);
        let (client, mut events) = AsyncClient::new(opts, 64);
        tokio::spawn(async move {
            loop {
                if events.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        let mut seen = 0;
        loop {
            let publishes: Vec<_> = moto
                .recording()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|r| {
                    r.method == "POST" && r.decoded_url().contains(&format!("/topics/{prefix}/"))
                })
                .collect();
            for r in publishes.iter().skip(seen) {
                let url = r.decoded_url();
                let topic = url
                    .split("/topics/")
                    .nth(1)
                    .and_then(|t| t.split('?').next())
                    .unwrap_or_default()
                    .to_owned();
                let correlation = r
                    .header("x-amz-mqtt5-correlation-data")
                    .map(base64_decode)
                    .unwrap_or_default();
                let props = PublishProperties {
                    correlation_data: Some(correlation.into()),
                    ..PublishProperties::default()
                };
                let body = r.body_bytes().unwrap_or_default();
                let _ = client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, body, props)
                    .await;
            }
            seen = publishes.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

// The binary must be built with the aws_iot_core provider (scripts/test.sh builds every one).
#[cfg(feature = "aws_iot_core")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_aws_iot_core_devices_connect_with_their_registration_certificate_alert_and_answer_commands(
) {
    use iotgw_testkit::mosquitto::{PORT, TLS_PORT};
    use iotgw_testkit::moto::{self, Moto};
    use iotgw_testkit::pki::Pki;
    if iotgw_testkit::require_docker("the aws_iot_core simulate test (moto, Mosquitto)").is_err() {
        return;
    }
    let moto = Moto::leased().await.expect("moto");
    moto.start_recording().await.expect("moto records requests");
    let pki = Pki::new("iotgw simulate test CA").expect("a CA");
    let (server_cert, server_key) = pki
        .issue("mosquitto", &["localhost", "127.0.0.1"])
        .expect("a server certificate");
    // The data endpoint's stand-in: TLS on TLS_PORT without asking for a client
    // certificate (moto's are signed by no CA), AWS's own side on the plain PORT.
    let spec = MosquittoSpec {
        config: Some(format!(
            "per_listener_settings true\n\
             listener {PORT}\n\
             allow_anonymous true\n\
             listener {TLS_PORT}\n\
             cafile /mosquitto/config/ca.crt\n\
             certfile /mosquitto/config/server.crt\n\
             keyfile /mosquitto/config/server.key\n\
             require_certificate false\n\
             allow_anonymous true\n\
             log_dest stderr\n\
             log_type all\n"
        )),
        files: vec![
            (
                "/mosquitto/config/ca.crt".into(),
                pki.ca_pem.clone().into_bytes(),
            ),
            (
                "/mosquitto/config/server.crt".into(),
                server_cert.into_bytes(),
            ),
            (
                "/mosquitto/config/server.key".into(),
                server_key.into_bytes(),
            ),
        ],
        extra_ports: vec![TLS_PORT],
        ..MosquittoSpec::default()
    };
    let broker = Mosquitto::dedicated(spec).await.expect("mosquitto starts");
    let tag = format!("asim{}", std::process::id());
    let client_id = format!("iotgw-{tag}");
    let (cert, key) = pki
        .client_files(&client_id)
        .expect("the gateway's certificate");
    let dir = tempfile::tempdir().expect("dir");
    let port = iotgw_testkit::free_port();
    let config = write(
        dir.path(),
        &format!(
            r#"[api]
listen = "127.0.0.1:{port}"
{common}
[providers.aws]
kind = "aws_iot_core"
region = "{region}"
access_key_id = "{access}"
secret_access_key = "{secret}"
endpoint_url = "{endpoint}"
mqtt_host = "127.0.0.1"
mqtt_port = {tls_port}
client_id = "{client_id}"
client_cert_path = "{cert}"
client_key_path = "{key}"
ca_cert_path = "{ca}"
telemetry_topics = ["{tag}/dt/{{device_id}}/telemetry"]
command_topic = "{tag}/cmd/{{device_id}}/req"
reply_topic = "{tag}/cmd/{{device_id}}/res"
shared_group = ""
reconnect_min_ms = 50
reconnect_max_ms = 500
policy_prefix = "{tag}-"
[routing]
default = "aws"
"#,
            common = common(dir.path()),
            region = moto::REGION,
            access = moto::ACCESS_KEY_ID,
            secret = moto::SECRET_ACCESS_KEY,
            endpoint = moto.endpoint(),
            tls_port = broker.mapped_port(TLS_PORT),
            ca = pki.ca_path(),
        ),
    );
    let gw = Gateway::start(&config, dir.path(), port).await;
    gw.wait_connected("aws").await;
    let forwarder = forward_commands(moto.clone(), broker.port(), tag.clone());
    let sim = Sim::start(
        dir.path(),
        &config,
        "aws",
        &[
            "--instance",
            "aws",
            "-n",
            "3",
            "--register",
            "--interval-ms",
            "300",
            "--prefix",
            &tag,
        ],
    );
    // No shadow service on the stand-in: reported properties never reach the gateway.
    check_fleet_with(&gw, &sim, &tag, "aws", SENT, false).await;
    check_summary(sim, true, false).await;
    forwarder.abort();
    broker.remove().await;
}
