//! The mqtt provider against a real Mosquitto (`eclipse-mosquitto:2` in Docker, started by
//! `iotgw_testkit::mosquitto` as everywhere else in the workspace): one broker per test,
//! removed when the test ends.
//!
//! Without Docker a test prints `SKIPPED: <why>` and returns; with `CI=true` it fails.

mod commands;
mod dynsec;
mod receive;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use iotgw_config::{DynsecConfig, MqttConfig, Secret};
use iotgw_testkit::mosquitto::{Mosquitto, MosquittoSpec, ADMIN_PASSWORD, ADMIN_USER};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::MqttProvider;
use crate::{EventKind, Provider, ProviderError, ProviderEvent, Shutdown};

/// The longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(5);

/// A broker of the test's own without authentication, or `None` (after `SKIPPED: ...`)
/// when Docker is unreachable outside CI.
async fn broker() -> Option<Mosquitto> {
    start_broker(MosquittoSpec::anonymous()).await
}

/// A broker of the test's own with the dynamic-security plugin: admin user
/// [`ADMIN_USER`] with [`ADMIN_PASSWORD`], no anonymous access. `None` as [`broker`].
async fn dynsec_broker() -> Option<Mosquitto> {
    start_broker(MosquittoSpec::default()).await
}

async fn start_broker(spec: MosquittoSpec) -> Option<Mosquitto> {
    iotgw_testkit::require_docker("this mqtt provider test (Mosquitto)").ok()?;
    Some(
        Mosquitto::dedicated(spec)
            .await
            .expect("a Mosquitto of the test's own starts"),
    )
}

/// A provider config for `broker` (fast reconnects for tests).
fn config(broker: &Mosquitto, client_id: &str) -> MqttConfig {
    MqttConfig {
        host: broker.host().to_owned(),
        port: broker.port(),
        client_id: client_id.into(),
        keep_alive_secs: 5,
        reconnect_min_ms: 50,
        reconnect_max_ms: 400,
        ..MqttConfig::default()
    }
}

/// The dynsec admin settings of a [`dynsec_broker`].
fn dynsec_config() -> DynsecConfig {
    DynsecConfig {
        admin_username: ADMIN_USER.into(),
        admin_password: Secret::new(ADMIN_PASSWORD),
        role_prefix: "iotgw-device-".into(),
    }
}

/// A provider whose `run` is going.
struct Running {
    provider: Arc<MqttProvider>,
    events: mpsc::Receiver<ProviderEvent>,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), ProviderError>>,
}

impl Running {
    fn start(provider: Arc<MqttProvider>) -> Self {
        let (tx, events) = mpsc::channel(16);
        let shutdown = Shutdown::new();
        let p = provider.clone();
        let s = shutdown.clone();
        let task = tokio::spawn(async move { p.run(tx, s).await });
        Self {
            provider,
            events,
            shutdown,
            task,
        }
    }

    /// Starts and waits until connected and subscribed.
    async fn start_connected(provider: Arc<MqttProvider>) -> Self {
        let r = Self::start(provider);
        r.wait_health(true).await;
        r
    }

    async fn wait_health(&self, connected: bool) {
        let p = self.provider.clone();
        wait_until(&format!("health connected={connected}"), || {
            let p = p.clone();
            async move { p.health().connected == connected }
        })
        .await;
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

    /// The next telemetry event.
    async fn telemetry(&mut self) -> (crate::Telemetry, crate::AckHandle) {
        let ev = self
            .next("telemetry", |k| matches!(k, EventKind::Telemetry(_)))
            .await;
        match ev.kind {
            EventKind::Telemetry(t) => (t, ev.ack),
            _ => unreachable!("filtered above"),
        }
    }

    /// Cancels `run` and waits for it to return.
    async fn stop(self) -> Result<(), ProviderError> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run stops promptly after shutdown")
            .expect("run does not panic")
    }
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device: a rumqttc v5 client whose incoming packets land in `packets`.
struct Device {
    client: AsyncClient,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

/// How a test device connects.
#[derive(Default)]
struct DeviceOptions {
    credentials: Option<(String, String)>,
    last_will: Option<LastWill>,
}

impl Device {
    /// Connects (clean session) and waits for the CONNACK; the broker's refusal is the error.
    async fn connect(
        port: u16,
        client_id: &str,
        opts: DeviceOptions,
    ) -> Result<Device, ConnectionError> {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5));
        if let Some((u, p)) = opts.credentials {
            o.set_credentials(u, p);
        }
        if let Some(will) = opts.last_will {
            o.set_last_will(will);
        }
        let (client, mut eventloop) = AsyncClient::new(o, 16);
        let connack: Result<(), ConnectionError> = tokio::time::timeout(WAIT, async {
            loop {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => return Ok(()),
                    _ => continue,
                }
            }
        })
        .await
        .expect("connect answered within the deadline");
        connack?;
        let (tx, packets) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Incoming(p) = ev {
                    let _ = tx.send(p);
                }
            }
        });
        Ok(Device {
            client,
            packets,
            task,
        })
    }

    /// The next incoming packet matching `pred`.
    async fn next(&mut self, what: &str, pred: impl Fn(&Packet) -> bool) -> Packet {
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.packets.recv()).await {
                Ok(Some(p)) if pred(&p) => return p,
                Ok(Some(_)) => {}
                Ok(None) => panic!("device connection ended while waiting for {what}"),
                Err(_) => panic!("device got no {what} within {WAIT:?}"),
            }
        }
    }

    /// Drops the connection without DISCONNECT (the broker then publishes the last will).
    fn kill(self) {
        self.task.abort();
    }
}

/// A provider on `config`.
fn provider(config: &MqttConfig) -> Arc<MqttProvider> {
    Arc::new(
        MqttProvider::new(&crate::InstanceName::from("test"), config).expect("valid test config"),
    )
}
