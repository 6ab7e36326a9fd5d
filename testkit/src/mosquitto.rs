//! Mosquitto (`eclipse-mosquitto:2`) with the dynamic-security plugin.
//!
//! The container's command creates `/mosquitto/config/dynamic-security.json` with
//! `mosquitto_ctrl dynsec init` on first start (admin user [`ADMIN_USER`] with
//! [`ADMIN_PASSWORD`], whose role may administer dynsec and publish and subscribe
//! everywhere), then runs the broker with anonymous access off and persistence on, so
//! clients, roles and persistent sessions survive a restart of the container.
//!
//! [`Mosquitto::shared`] is one broker per test binary: tests keep apart with topic prefixes
//! and device ids of their own. [`Mosquitto::dedicated`] maps a fixed host port so the
//! broker comes back on the same address after [`Mosquitto::restart`] (or
//! [`Mosquitto::kill`] and [`Mosquitto::start_again`]); a whole config, extra config lines
//! and files go through [`MosquittoSpec`], which also has the two other brokers the tests
//! use: [`MosquittoSpec::anonymous`] (no authentication) and
//! [`MosquittoSpec::client_certificate_tls`] (the AWS IoT Core endpoint's stand-in).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::{GenericImage, ImageExt};
use tokio::sync::OnceCell;

use super::Running;

/// Image name (the public one; see `deploy/images/build-local-images.sh`).
pub const IMAGE: &str = "eclipse-mosquitto";
/// Image tag.
pub const TAG: &str = "2";
/// The MQTT port inside the container.
pub const PORT: u16 = 1883;
/// The dynsec admin user `mosquitto_ctrl dynsec init` creates.
pub const ADMIN_USER: &str = "admin";
/// Its password (test containers only).
pub const ADMIN_PASSWORD: &str = "iotgw-test-admin-pw";
/// The TLS listener of [`MosquittoSpec::client_certificate_tls`] inside the container.
pub const TLS_PORT: u16 = 8883;

const CONFIG_PATH: &str = "/mosquitto/config/mosquitto.conf";
const DYNSEC_PATH: &str = "/mosquitto/config/dynamic-security.json";

/// How a broker is set up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct MosquittoSpec {
    /// A whole `mosquitto.conf` in place of the default one (dynsec on [`PORT`]). It must
    /// still listen on [`PORT`] and accept the admin user there (readiness is a CONNECT
    /// of that user), e.g. `listener 1883` with `allow_anonymous true`.
    pub config: Option<String>,
    /// Lines appended to `mosquitto.conf` (e.g. a second `listener` with TLS settings).
    pub extra_config: Vec<String>,
    /// Files copied into the container before it starts: `(absolute path, contents)`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Further container ports to publish (e.g. 8883 for TLS).
    pub extra_ports: Vec<u16>,
}

/// A running broker.
#[derive(Debug)]
pub struct Mosquitto {
    running: Running,
    host: String,
}

impl MosquittoSpec {
    /// A broker without authentication (`allow_anonymous true`, no dynsec), persistence on.
    pub fn anonymous() -> Self {
        Self {
            config: Some(format!(
                "# iotgw test broker without authentication (testkit/src/mosquitto.rs)\n\
                 listener {PORT}\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location /mosquitto/data/\n\
                 max_queued_messages 100000\n\
                 log_dest stderr\n\
                 log_type all\n"
            )),
            ..Self::default()
        }
    }

    /// The AWS IoT Core MQTT endpoint's stand-in: on [`TLS_PORT`] (published), TLS with
    /// client certificates required, the certificate's CN as the client's identity, the
    /// server certificate `server_cert`/`server_key` issued by the CA `ca_pem` (PEM); on
    /// [`PORT`] a plain listener without authentication (AWS's own side: presence events,
    /// shadow documents; and the readiness probe). Persistence on.
    pub fn client_certificate_tls(ca_pem: &str, server_cert: &str, server_key: &str) -> Self {
        let config = format!(
            "# AWS IoT Core MQTT endpoint stand-in (testkit/src/mosquitto.rs)\n\
             per_listener_settings true\n\
             listener {PORT}\n\
             allow_anonymous true\n\
             listener {TLS_PORT}\n\
             cafile /mosquitto/config/ca.crt\n\
             certfile /mosquitto/config/server.crt\n\
             keyfile /mosquitto/config/server.key\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             allow_anonymous false\n\
             persistence true\n\
             persistence_location /mosquitto/data/\n\
             log_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        );
        Self {
            config: Some(config),
            files: vec![
                (
                    "/mosquitto/config/ca.crt".into(),
                    ca_pem.as_bytes().to_vec(),
                ),
                (
                    "/mosquitto/config/server.crt".into(),
                    server_cert.as_bytes().to_vec(),
                ),
                (
                    "/mosquitto/config/server.key".into(),
                    server_key.as_bytes().to_vec(),
                ),
            ],
            extra_ports: vec![TLS_PORT],
            ..Self::default()
        }
    }
}

fn config(spec: &MosquittoSpec) -> String {
    let mut c = spec.config.clone().unwrap_or_else(default_config);
    for line in &spec.extra_config {
        c.push_str(line);
        c.push('\n');
    }
    c
}

fn default_config() -> String {
    format!(
        "# iotgw test broker (testkit/src/mosquitto.rs)\n\
         per_listener_settings false\n\
         listener {PORT}\n\
         allow_anonymous false\n\
         plugin /usr/lib/mosquitto_dynamic_security.so\n\
         plugin_opt_config_file {DYNSEC_PATH}\n\
         persistence true\n\
         persistence_location /mosquitto/data/\n\
         max_queued_messages 100000\n\
         log_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    )
}

/// The container command: dynsec init on first start only (a restart keeps the file and
/// everything registered since), then the broker as PID 1 so `docker stop` lets it save.
fn command() -> String {
    format!(
        "[ -f {DYNSEC_PATH} ] || mosquitto_ctrl dynsec init {DYNSEC_PATH} {ADMIN_USER} {ADMIN_PASSWORD} >/dev/null \
         && chown mosquitto:mosquitto {DYNSEC_PATH} \
         && exec /usr/sbin/mosquitto -c {CONFIG_PATH}"
    )
}

impl Mosquitto {
    /// The broker shared by every test of this binary (started on first use).
    pub async fn shared() -> anyhow::Result<&'static Mosquitto> {
        static SHARED: OnceCell<Mosquitto> = OnceCell::const_new();
        SHARED
            .get_or_try_init(|| Self::start(MosquittoSpec::default(), false, "mosquitto/shared"))
            .await
    }

    /// A broker of the caller's own, on fixed host ports so [`Mosquitto::restart`] keeps
    /// its address. Remove it with [`Mosquitto::remove`].
    pub async fn dedicated(spec: MosquittoSpec) -> anyhow::Result<Mosquitto> {
        Self::start(spec, true, "mosquitto/dedicated").await
    }

    async fn start(spec: MosquittoSpec, fixed: bool, role: &str) -> anyhow::Result<Self> {
        let mut req = GenericImage::new(IMAGE, TAG)
            .with_exposed_port(PORT.tcp())
            .with_wait_for(WaitFor::message_on_stderr(" running"))
            .with_cmd(["sh", "-c", &command()])
            .with_copy_to(CONFIG_PATH, config(&spec).into_bytes());
        for (path, contents) in &spec.files {
            req = req.with_copy_to(path.clone(), contents.clone());
        }
        let ports: Vec<u16> = std::iter::once(PORT)
            .chain(spec.extra_ports.iter().copied())
            .collect();
        let running = Running::start(req, &ports, fixed, role).await?;
        let m = Self {
            running,
            host: "127.0.0.1".into(),
        };
        m.wait_ready().await?;
        Ok(m)
    }

    /// The host to connect to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The host port of the MQTT listener.
    pub fn port(&self) -> u16 {
        self.running.port(PORT)
    }

    /// The host port of another published container port (one of `extra_ports`).
    pub fn mapped_port(&self, container_port: u16) -> u16 {
        self.running.port(container_port)
    }

    /// The container.
    pub fn container(&self) -> &Running {
        &self.running
    }

    /// Stops the broker gracefully (SIGTERM: it saves clients, sessions and queued
    /// messages), starts it again and waits until it accepts the admin user.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.running.stop(10).await?;
        self.running.start_again().await?;
        self.wait_ready().await
    }

    /// Kills the broker (SIGKILL: nothing saved, no goodbye to clients); bring it back
    /// with [`Mosquitto::start_again`]. On a dedicated broker only.
    pub async fn kill(&self) -> anyhow::Result<()> {
        self.running.kill().await
    }

    /// Starts a stopped or killed broker again (same host port on a dedicated one) and
    /// waits until it accepts the admin user.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        self.running.start_again().await?;
        self.wait_ready().await
    }

    /// Waits (30 s at most) until the broker answers a CONNECT of the admin user.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let (host, port) = (self.host.clone(), self.port());
        super::wait_ready(
            &format!("mosquitto {host}:{port}"),
            Duration::from_secs(30),
            || connack(host.clone(), port),
        )
        .await
    }

    /// The broker's log so far.
    pub async fn logs(&self) -> String {
        self.running.logs().await
    }

    /// Removes a dedicated broker.
    pub async fn remove(self) {
        self.running.remove().await;
    }
}

/// One CONNECT as the admin user: `Ok` on a successful CONNACK.
async fn connack(host: String, port: u16) -> Result<(), String> {
    let id = format!("harness-probe-{}", uuid::Uuid::new_v4().simple());
    let mut o = MqttOptions::new(id, host, port);
    o.set_credentials(ADMIN_USER, ADMIN_PASSWORD);
    o.set_connection_timeout(5);
    let (client, mut events) = AsyncClient::new(o, 4);
    let answer = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no CONNACK within 5 s".into()));
    let _ = client.try_disconnect();
    answer
}
