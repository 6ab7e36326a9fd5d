//! The gcp_pubsub provider against the official Pub/Sub emulator (in Docker, started by
//! `iotgw_testkit::pubsub`: shared by the tests running at the same time, each test with
//! topics and subscriptions of its own; removed when the last test lets go). Without
//! Docker a test prints `SKIPPED: <why>` and returns; with `CI=true` it fails.
//!
//! The device side (a bridge publishing telemetry, replies and lifecycle messages, and
//! pulling its commands) uses the same `google-cloud-pubsub` crate.
//!
//! What the emulator (0.8.20, as in the public image) does differently from the service,
//! found by these tests:
//! - it stores subscription filters but does not apply them (the tests check the filter);
//! - it ignores the server-side flow control of streaming pull (the provider applies
//!   `max_outstanding_messages` itself);
//! - a streaming pull the client closes (RST_STREAM) hits a bug in the emulator
//!   (`NoSuchMethodError` in grpc's `onRstStreamRead`): the messages that stream held come
//!   back only after their ack deadline lapsed, nacks sent for them later are ignored, and
//!   while the client's connection stays open it may keep handing that dead stream new
//!   messages. So each `run` uses a connection of its own, and the restart test allows
//!   for the lapse;
//! - dead-lettering works over streaming pull (its REST `pull` throws instead);
//! - message ids restart at 1 with the emulator, hence alert tokens qualified by the
//!   publish time.

mod commands;
mod receive;
mod replicas;
mod resources;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use google_cloud_auth::credentials::anonymous;
use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin};
use google_cloud_pubsub::model::Message;
use iotgw_config::GcpPubSubConfig;
use iotgw_testkit::pubsub::{PubSub, PROJECT};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::names::topic_path;
use super::GcpPubSubProvider;
use crate::{AckHandle, EventKind, Provider, ProviderError, ProviderEvent, Shutdown, Telemetry};

/// The longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(15);

/// The emulator the tests share, or `None` (after `SKIPPED: ...`) when Docker is
/// unreachable outside CI.
async fn emulator() -> Option<Arc<PubSub>> {
    iotgw_testkit::require_docker("this gcp_pubsub provider test").ok()?;
    Some(PubSub::leased().await.expect("the Pub/Sub emulator starts"))
}

/// An emulator of the test's own, which it may restart; `None` as [`emulator`].
async fn dedicated_emulator() -> Option<PubSub> {
    iotgw_testkit::require_docker("this gcp_pubsub provider test").ok()?;
    Some(
        PubSub::dedicated()
            .await
            .expect("the Pub/Sub emulator starts"),
    )
}

/// A test config on `emu`: every topic and subscription named after `tag` plus a random
/// suffix, created on start-up, short ack deadline and fast reconnects.
fn config(emu: &PubSub, tag: &str) -> GcpPubSubConfig {
    let u = format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    GcpPubSubConfig {
        project_id: PROJECT.into(),
        emulator_host: Some(emu.emulator_host()),
        create_if_missing: true,
        telemetry_topic: format!("{u}-telemetry"),
        telemetry_subscription: format!("{u}-telemetry"),
        commands_topic: format!("{u}-commands"),
        command_subscription_prefix: format!("{u}-cmd-"),
        reply_topic: format!("{u}-replies"),
        reply_subscription: format!("{u}-replies"),
        lifecycle_topic: format!("{u}-lifecycle"),
        lifecycle_subscription: format!("{u}-lifecycle"),
        ack_deadline_secs: 10,
        request_timeout_secs: 10,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        ..GcpPubSubConfig::default()
    }
}

/// A TCP proxy in front of the emulator whose connections can be cut at once, as a crash
/// of the process holding them would: the emulator sees them reset, so no stream of the
/// "crashed" gateway stays registered and nothing it would have sent (a nack, a lease
/// extension) arrives.
struct CutProxy {
    host: String,
    tasks: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy port");
        let host = listener.local_addr().expect("proxy address").to_string();
        let target = target.trim_start_matches("http://").to_owned();
        let tasks: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>> = Arc::default();
        let t = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                t.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
            }
        });
        Self {
            host,
            tasks,
            accept,
        }
    }

    /// Stops accepting and closes every connection.
    fn cut(&self) {
        self.accept.abort();
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .abort_all();
    }
}

async fn provider(config: &GcpPubSubConfig) -> Arc<GcpPubSubProvider> {
    Arc::new(
        GcpPubSubProvider::new(&crate::InstanceName::from("gcp-test"), config)
            .await
            .expect("valid test config"),
    )
}

/// A provider whose `run` is going.
struct Running {
    provider: Arc<GcpPubSubProvider>,
    events: mpsc::Receiver<ProviderEvent>,
    shutdown: Shutdown,
    task: JoinHandle<Result<(), ProviderError>>,
}

impl Running {
    fn start(provider: Arc<GcpPubSubProvider>) -> Self {
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

    /// Starts and waits until the resources are in place (health connected).
    async fn start_connected(provider: Arc<GcpPubSubProvider>) -> Self {
        let r = Self::start(provider);
        let p = r.provider.clone();
        wait_until("health connected", || {
            let p = p.clone();
            async move { p.health().connected }
        })
        .await;
        r
    }

    /// The next event matching `pred` (others are acked and skipped).
    async fn next(&mut self, what: &str, pred: impl Fn(&EventKind) -> bool) -> ProviderEvent {
        self.next_within(what, WAIT, pred).await
    }

    /// [`Running::next`] with a deadline of its own.
    async fn next_within(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&EventKind) -> bool,
    ) -> ProviderEvent {
        let deadline = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) if pred(&ev.kind) => return ev,
                Ok(Some(ev)) => ev.ack.ack(),
                Ok(None) => panic!("event channel closed while waiting for {what}"),
                Err(_) => panic!("no {what} within {limit:?}"),
            }
        }
    }

    /// The next telemetry event.
    async fn telemetry(&mut self) -> (Telemetry, AckHandle) {
        self.telemetry_within(WAIT).await
    }

    /// The next telemetry event within `limit`.
    async fn telemetry_within(&mut self, limit: Duration) -> (Telemetry, AckHandle) {
        let ev = self
            .next_within("telemetry", limit, |k| matches!(k, EventKind::Telemetry(_)))
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

/// The Pub/Sub message id inside an alert token (`<message_id>@<publish time>`).
fn pubsub_id(token: &str) -> &str {
    token.split('@').next().unwrap_or(token)
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

/// The device side: a bridge publishing to the instance's topics.
struct Bridge {
    emu_endpoint: String,
    config: GcpPubSubConfig,
}

impl Bridge {
    fn new(emu: &PubSub, config: &GcpPubSubConfig) -> Self {
        Self {
            emu_endpoint: emu.endpoint(),
            config: config.clone(),
        }
    }

    async fn publisher(&self, topic_id: &str) -> Publisher {
        Publisher::builder(topic_path(PROJECT, topic_id))
            .with_endpoint(&self.emu_endpoint)
            .with_credentials(anonymous::Builder::new().build())
            .set_delay_threshold(Duration::from_millis(1))
            .build()
            .await
            .expect("a publisher on the emulator")
    }

    /// Publishes `data` with `attributes` to topic `topic_id`; Pub/Sub's message id.
    async fn publish(&self, topic_id: &str, data: &str, attributes: &[(&str, &str)]) -> String {
        let p = self.publisher(topic_id).await;
        let attrs: HashMap<String, String> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        p.publish(
            Message::new()
                .set_data(data.to_owned())
                .set_attributes(attrs),
        )
        .await
        .expect("published to the emulator")
    }

    /// Telemetry of `device`.
    async fn telemetry(&self, device: &str, data: &str) -> String {
        let topic = self.config.telemetry_topic.clone();
        let attr = self.config.device_id_attribute.clone();
        self.publish(&topic, data, &[(attr.as_str(), device)]).await
    }

    async fn subscription_admin(&self) -> SubscriptionAdmin {
        SubscriptionAdmin::builder()
            .with_endpoint(&self.emu_endpoint)
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("an admin client on the emulator")
    }

    async fn subscriber(&self) -> Subscriber {
        Subscriber::builder()
            .with_endpoint(&self.emu_endpoint)
            .with_credentials(anonymous::Builder::new().build())
            .build()
            .await
            .expect("a subscriber on the emulator")
    }
}
