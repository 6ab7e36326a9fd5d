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
//! broker comes back on the same address after [`Mosquitto::restart`]; extra config lines
//! and files (a TLS listener with its certificates, for instance) go through
//! [`MosquittoSpec`].

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
        "# iotgw test broker (tests/src/harness/mosquitto.rs)\n\
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
