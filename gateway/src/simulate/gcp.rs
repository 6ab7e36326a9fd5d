//! Simulated gcp_pubsub devices, acting as the device's bridge to Pub/Sub (Google retired
//! Cloud IoT Core; devices reach Pub/Sub through a bridge) with the official client the
//! provider uses:
//! - readings go to the instance's `telemetry_topic` with the attributes the provider
//!   reads: the device id (`device_id_attribute`) and `message_id` (so a retried publish
//!   is one reading);
//! - connection events (`connected`, `event_time`) and reported properties
//!   (`{"reported": {...}, "at": ...}`) go to the `lifecycle_topic`, when the instance has
//!   one;
//! - commands are pulled from the device's own subscription
//!   (`<command_subscription_prefix><device id>`, created by registration when the
//!   instance has `command_subscriptions = true`), checked against the device id attribute
//!   (the emulator does not apply subscription filters), and answered on `reply_topic`
//!   with the attributes `device_id`, `correlation_id`, `status` and `reason`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use google_cloud_auth::credentials::{anonymous, service_account, Credentials};
use google_cloud_pubsub::client::{Publisher, Subscriber};
use google_cloud_pubsub::model::Message;
use iotgw_config::GcpPubSubConfig;
use tokio_util::sync::CancellationToken;

use super::device::{Behaviour, Counters};

/// The Pub/Sub clients every simulated device of one instance shares.
pub struct Clients {
    config: GcpPubSubConfig,
    telemetry: Publisher,
    replies: Option<Publisher>,
    lifecycle: Option<Publisher>,
    subscriber: Option<Subscriber>,
    /// Where they point, for messages.
    pub target: String,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn topic_name(project: &str, id: &str) -> String {
    format!("projects/{project}/topics/{id}")
}

fn subscription_name(project: &str, id: &str) -> String {
    format!("projects/{project}/subscriptions/{id}")
}

/// Why the simulated devices of `cfg` take no commands, if they take none.
pub fn no_commands_reason(cfg: &GcpPubSubConfig) -> Option<&'static str> {
    if !cfg.command_subscriptions {
        Some("the instance has command_subscriptions = false: no device has a subscription of its own to pull commands from")
    } else if cfg.reply_topic.is_empty() {
        Some("the instance has no reply_topic: commands are taken but not answered")
    } else {
        None
    }
}

impl Clients {
    /// Builds the clients for the instance `cfg` (no traffic yet).
    pub async fn build(cfg: &GcpPubSubConfig) -> anyhow::Result<Self> {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // The real service's TLS needs one; losing a race to another installer is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let emulator = cfg
            .emulator_host
            .clone()
            .or_else(|| std::env::var("PUBSUB_EMULATOR_HOST").ok())
            .filter(|h| !h.trim().is_empty())
            .map(|h| {
                let h = h.trim().trim_end_matches('/');
                if h.starts_with("http://") || h.starts_with("https://") {
                    h.to_owned()
                } else {
                    format!("http://{h}")
                }
            });
        let (endpoint, credentials, target): (Option<String>, Option<Credentials>, String) =
            match &emulator {
                Some(url) => (
                    Some(url.clone()),
                    Some(anonymous::Builder::new().build()),
                    format!("the Pub/Sub emulator at {url}"),
                ),
                None => {
                    let creds = match &cfg.credentials_file {
                        None => None,
                        Some(path) => {
                            let text = std::fs::read_to_string(path)
                                .with_context(|| format!("reading credentials_file {path}"))?;
                            let json: serde_json::Value = serde_json::from_str(&text)
                                .with_context(|| format!("credentials_file {path} is not JSON"))?;
                            Some(service_account::Builder::new(json).build().with_context(
                                || format!("{path} is not a usable service-account key"),
                            )?)
                        }
                    };
                    let e = cfg.endpoint.clone();
                    let shown = e
                        .clone()
                        .unwrap_or_else(|| "https://pubsub.googleapis.com".into());
                    (e, creds, format!("Pub/Sub at {shown}"))
                }
            };
        let project = &cfg.project_id;
        let publisher = |topic: &str| {
            let mut b = Publisher::builder(topic_name(project, topic))
                .set_delay_threshold(Duration::from_millis(5));
            if let Some(e) = &endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(c) = &credentials {
                b = b.with_credentials(c.clone());
            }
            b.build()
        };
        let what = |t: &str| format!("a publisher of {t} on {target}");
        let telemetry = publisher(&cfg.telemetry_topic)
            .await
            .with_context(|| what(&cfg.telemetry_topic))?;
        let replies = match cfg.reply_topic.as_str() {
            "" => None,
            t => Some(publisher(t).await.with_context(|| what(t))?),
        };
        let lifecycle = match cfg.lifecycle_topic.as_str() {
            "" => None,
            t => Some(publisher(t).await.with_context(|| what(t))?),
        };
        let subscriber = if cfg.command_subscriptions {
            let mut b = Subscriber::builder();
            if let Some(e) = &endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(c) = &credentials {
                b = b.with_credentials(c.clone());
            }
            Some(
                b.build()
                    .await
                    .with_context(|| format!("a streaming-pull client on {target}"))?,
            )
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            telemetry,
            replies,
            lifecycle,
            subscriber,
            target,
        })
    }

    fn attrs(&self, id: &str, more: &[(&str, &str)]) -> HashMap<String, String> {
        let mut a = HashMap::from([(self.config.device_id_attribute.clone(), id.to_owned())]);
        a.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        a
    }

    /// Publishes a connection event (when the instance has a lifecycle topic).
    async fn lifecycle_event(&self, id: &str, connected: bool) -> anyhow::Result<bool> {
        let Some(p) = &self.lifecycle else {
            return Ok(false);
        };
        let at = chrono::Utc::now().to_rfc3339();
        let flag = if connected { "true" } else { "false" };
        p.publish(
            Message::new()
                .set_attributes(self.attrs(id, &[("connected", flag), ("event_time", &at)])),
        )
        .await
        .with_context(|| {
            format!(
                "publishing a connection event to {}",
                self.config.lifecycle_topic
            )
        })?;
        Ok(true)
    }
}

/// Runs the device `id` until `shutdown`.
pub async fn run_device(
    clients: Arc<Clients>,
    id: String,
    mut b: Behaviour,
    interval: Duration,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let cfg = &clients.config;
    // Pub/Sub has no connection: the device counts as connected once its first publish
    // (the connection event, else its first reading) went through.
    let mut connected = match clients.lifecycle_event(&id, true).await {
        Ok(true) => {
            Counters::bump(&counters.connected);
            true
        }
        Ok(false) => false,
        Err(e) => {
            counters.error(&id, format!("{e:#}"));
            false
        }
    };
    // The stream runs in a task of its own: its `next()` is not cancel-safe (it opens
    // the stream), so it must not be raced against the reading ticks.
    let (tx, mut commands) = tokio::sync::mpsc::channel(16);
    if let Some(sub) = &clients.subscriber {
        let name = subscription_name(
            &cfg.project_id,
            &format!("{}{id}", cfg.command_subscription_prefix),
        );
        tokio::spawn(pull_commands(
            sub.clone(),
            name,
            tx,
            id.clone(),
            counters.clone(),
            shutdown.clone(),
        ));
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Err(e) = clients.lifecycle_event(&id, false).await {
                    counters.error(&id, format!("{e:#}"));
                }
                return;
            }
            _ = tick.tick() => {
                let body = b.next_reading();
                let message_id = body["message_id"].as_str().unwrap_or_default().to_owned();
                let msg = Message::new()
                    .set_data(body.to_string())
                    .set_attributes(clients.attrs(&id, &[("message_id", &message_id)]));
                match clients.telemetry.publish(msg).await {
                    Ok(_) => {
                        Counters::bump(&counters.sent);
                        if !connected {
                            connected = true;
                            Counters::bump(&counters.connected);
                        }
                    }
                    Err(e) => counters.error(&id, format!("publishing a reading to {}: {e}", cfg.telemetry_topic)),
                }
                if b.report_due() {
                    if let Some(p) = &clients.lifecycle {
                        let body = serde_json::json!({"reported": b.properties(), "at": chrono::Utc::now().to_rfc3339()});
                        match p.publish(Message::new().set_data(body.to_string()).set_attributes(clients.attrs(&id, &[]))).await {
                            Ok(_) => Counters::bump(&counters.reported),
                            Err(e) => counters.error(&id, format!("publishing reported properties to {}: {e}", cfg.lifecycle_topic)),
                        }
                    }
                }
            }
            Some(msg) = commands.recv() => {
                // The subscription's filter, applied here too: the emulator ignores it.
                if msg.attributes.get(&cfg.device_id_attribute) != Some(&id) {
                    continue;
                }
                Counters::bump(&counters.commands);
                let body: serde_json::Value = serde_json::from_slice(&msg.data).unwrap_or_default();
                let Some(correlation) = msg.attributes.get("correlation_id").filter(|c| !c.is_empty()) else {
                    counters.error(&id, "a command without a correlation_id attribute: cannot answer it");
                    continue;
                };
                let Some(replies) = &clients.replies else { continue };
                let answer = b.answer(&body);
                tracing::info!(device = %id, command = %body, status = answer.status(), "simulated device answers a command");
                let mut attrs = vec![("correlation_id", correlation.as_str()), ("status", answer.status())];
                if let Some(r) = answer.reason() {
                    attrs.push(("reason", r));
                }
                match replies.publish(Message::new().set_attributes(clients.attrs(&id, &attrs))).await {
                    Ok(_) => counters.answered(&answer),
                    Err(e) => counters.error(&id, format!("publishing a reply to {}: {e}", cfg.reply_topic)),
                }
            }
        }
    }
}

/// Streams the commands of `subscription` to `tx` (acked once taken) until `shutdown`,
/// opening the stream again a second after an error (the subscription may not exist yet).
async fn pull_commands(
    subscriber: Subscriber,
    subscription: String,
    tx: tokio::sync::mpsc::Sender<Message>,
    id: String,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    loop {
        let mut stream = subscriber.subscribe(subscription.clone()).build();
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                n = stream.next() => n,
            };
            match next {
                Some(Ok((msg, handler))) => {
                    handler.ack();
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    counters.error(&id, format!("pulling commands from {subscription}: {e}"));
                    break;
                }
                None => return,
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_full_resource_paths_and_a_device_without_a_subscription_is_explained() {
        assert_eq!(topic_name("p", "t"), "projects/p/topics/t");
        assert_eq!(subscription_name("p", "s"), "projects/p/subscriptions/s");
        let mut c = GcpPubSubConfig::default();
        assert!(no_commands_reason(&c)
            .expect("none by default")
            .contains("command_subscriptions"));
        c.command_subscriptions = true;
        assert_eq!(no_commands_reason(&c), None);
    }
}
