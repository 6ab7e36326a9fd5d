//! The Google Pub/Sub emulator, from the Cloud SDK emulators image
//! (`gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators`), started as
//! `gcloud beta emulators pubsub start --project=<PROJECT> --host-port=0.0.0.0:8085`.
//!
//! Clients reach it through `PUBSUB_EMULATOR_HOST` ([`PubSub::emulator_host`]) or an
//! explicit `http://` endpoint ([`PubSub::endpoint`]). State is in memory: a restart
//! forgets every topic and subscription (a fixture re-creates what the real cloud would
//! have kept). Tests on the shared emulator keep apart by topic and subscription names of
//! their own.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use serde_json::{json, Value};
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::{GenericImage, ImageExt};
use tokio::sync::OnceCell;

use super::Running;

/// Image name (the public one; see `deploy/images/build-local-images.sh`).
pub const IMAGE: &str = "gcr.io/google.com/cloudsdktool/google-cloud-cli";
/// Image tag.
pub const TAG: &str = "emulators";
/// The emulator's port inside the container.
pub const PORT: u16 = 8085;
/// The project every test uses (the emulator accepts any).
pub const PROJECT: &str = "iotgw-test";

/// A running emulator.
#[derive(Debug)]
pub struct PubSub {
    running: Running,
}

impl PubSub {
    /// The emulator shared by every test of this binary (started on first use).
    pub async fn shared() -> anyhow::Result<&'static PubSub> {
        static SHARED: OnceCell<PubSub> = OnceCell::const_new();
        SHARED
            .get_or_try_init(|| Self::start(false, "pubsub/shared"))
            .await
    }

    /// The emulator the tests of a libtest binary share while any of them holds it
    /// (removed when the last one lets go).
    pub async fn leased() -> anyhow::Result<Arc<PubSub>> {
        static LEASED: tokio::sync::Mutex<Weak<PubSub>> =
            tokio::sync::Mutex::const_new(Weak::new());
        super::lease(&LEASED, || Self::start(false, "pubsub/leased")).await
    }

    /// An emulator of the caller's own, on a fixed host port that survives
    /// [`PubSub::restart`]. Remove it with [`PubSub::remove`].
    pub async fn dedicated() -> anyhow::Result<PubSub> {
        Self::start(true, "pubsub/dedicated").await
    }

    async fn start(fixed: bool, role: &str) -> anyhow::Result<Self> {
        let req = GenericImage::new(IMAGE, TAG)
            .with_exposed_port(PORT.tcp())
            .with_wait_for(WaitFor::message_on_stderr(format!(
                "Server started, listening on {PORT}"
            )))
            .with_cmd([
                "gcloud".to_owned(),
                "beta".into(),
                "emulators".into(),
                "pubsub".into(),
                "start".into(),
                format!("--project={PROJECT}"),
                format!("--host-port=0.0.0.0:{PORT}"),
            ]);
        let p = Self {
            running: Running::start(req, &[PORT], fixed, role).await?,
        };
        p.wait_ready().await?;
        Ok(p)
    }

    /// `127.0.0.1:<port>`: the value of `PUBSUB_EMULATOR_HOST`.
    pub fn emulator_host(&self) -> String {
        format!("127.0.0.1:{}", self.running.port(PORT))
    }

    /// `http://127.0.0.1:<port>`: the endpoint for clients configured explicitly.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.emulator_host())
    }

    /// The container.
    pub fn container(&self) -> &Running {
        &self.running
    }

    /// Stops the emulator, starts it again (empty) and waits until it answers.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.running.stop(5).await?;
        self.running.start_again().await?;
        self.wait_ready().await
    }

    /// Waits (60 s at most: a JVM starts) until the REST surface lists topics.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = format!("{}/v1/projects/{PROJECT}/topics", self.endpoint());
        let client = reqwest::Client::new();
        super::wait_ready(
            &format!("the Pub/Sub emulator at {url}"),
            Duration::from_secs(60),
            || {
                let req = client.get(&url).timeout(Duration::from_secs(2));
                async move {
                    match req.send().await {
                        Ok(r) if r.status().is_success() => Ok(()),
                        Ok(r) => Err(format!("answered {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await
    }

    /// The emulator's log so far.
    pub async fn logs(&self) -> String {
        self.running.logs().await
    }

    /// Removes a dedicated emulator.
    pub async fn remove(self) {
        self.running.remove().await;
    }
}

/// A message pulled from a subscription.
#[derive(Clone, Debug)]
pub struct Pulled {
    /// What acknowledges it.
    pub ack_id: String,
    /// The payload.
    pub data: Vec<u8>,
    /// The attributes.
    pub attributes: HashMap<String, String>,
}

/// The Pub/Sub REST API (`v1`, JSON over HTTP) of an emulator: what a device's bridge or
/// an operator would call. Test code, so it stays independent of the provider's client.
#[derive(Clone, Debug)]
pub struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    /// The REST surface of the emulator at `endpoint` (`http://HOST:PORT`).
    pub fn new(endpoint: &str) -> Self {
        Self {
            base: format!("{endpoint}/v1/projects/{PROJECT}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
        }
    }

    /// `projects/<PROJECT>/topics/<id>`.
    pub fn topic(id: &str) -> String {
        format!("projects/{PROJECT}/topics/{id}")
    }

    /// `projects/<PROJECT>/subscriptions/<id>`.
    pub fn subscription(id: &str) -> String {
        format!("projects/{PROJECT}/subscriptions/{id}")
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// Creates topic `id`; one that exists already is fine.
    pub async fn create_topic(&self, id: &str) -> anyhow::Result<()> {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("topics/{id}"),
                Some(json!({})),
            )
            .await?;
        anyhow::ensure!(
            status == 200 || status == 409,
            "creating topic {id}: {status} {body}"
        );
        Ok(())
    }

    /// Creates subscription `id` from its REST representation (`topic`,
    /// `ackDeadlineSeconds`, `filter`, ...); one that exists already is fine.
    pub async fn create_subscription(&self, id: &str, spec: &Value) -> anyhow::Result<()> {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("subscriptions/{id}"),
                Some(spec.clone()),
            )
            .await?;
        anyhow::ensure!(
            status == 200 || status == 409,
            "creating subscription {id}: {status} {body}"
        );
        Ok(())
    }

    /// The topics whose id starts with `prefix` (ids only).
    pub async fn topics(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let (status, body) = self
            .call(reqwest::Method::GET, "topics?pageSize=1000", None)
            .await?;
        anyhow::ensure!(status == 200, "listing topics: {status} {body}");
        let own = format!("projects/{PROJECT}/topics/{prefix}");
        Ok(body["topics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["name"].as_str())
            .filter(|n| n.starts_with(&own))
            .map(|n| n.rsplit('/').next().unwrap_or(n).to_owned())
            .collect())
    }

    /// The subscriptions whose id starts with `prefix`, as `(id, representation)`.
    pub async fn subscriptions(&self, prefix: &str) -> anyhow::Result<Vec<(String, Value)>> {
        let (status, body) = self
            .call(reqwest::Method::GET, "subscriptions?pageSize=1000", None)
            .await?;
        anyhow::ensure!(status == 200, "listing subscriptions: {status} {body}");
        let own = format!("projects/{PROJECT}/subscriptions/{prefix}");
        Ok(body["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with(&own)))
            .map(|s| {
                let name = s["name"].as_str().unwrap_or_default();
                (
                    name.rsplit('/').next().unwrap_or(name).to_owned(),
                    s.clone(),
                )
            })
            .collect())
    }

    /// One subscription's representation, if it exists.
    pub async fn get_subscription(&self, id: &str) -> anyhow::Result<Option<Value>> {
        let (status, body) = self
            .call(reqwest::Method::GET, &format!("subscriptions/{id}"), None)
            .await?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            _ => anyhow::bail!("getting subscription {id}: {status} {body}"),
        }
    }

    /// Publishes one message to topic `id`; its Pub/Sub message id.
    pub async fn publish(
        &self,
        topic: &str,
        data: &[u8],
        attributes: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let attributes: serde_json::Map<String, Value> = attributes
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
            .collect();
        let mut message = json!({"attributes": attributes});
        if !data.is_empty() {
            message["data"] = Value::String(base64::engine::general_purpose::STANDARD.encode(data));
        }
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("topics/{topic}:publish"),
                Some(json!({"messages": [message]})),
            )
            .await?;
        anyhow::ensure!(status == 200, "publishing to {topic}: {status} {body}");
        body["messageIds"][0]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("publishing to {topic}: no message id in {body}"))
    }

    /// Pulls what is there now (at most `max`) from subscription `id`, without waiting.
    pub async fn pull(&self, id: &str, max: u32) -> anyhow::Result<Vec<Pulled>> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("subscriptions/{id}:pull"),
                Some(json!({"maxMessages": max, "returnImmediately": true})),
            )
            .await?;
        anyhow::ensure!(status == 200, "pulling from {id}: {status} {body}");
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(body["receivedMessages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Pulled {
                ack_id: r["ackId"].as_str().unwrap_or_default().to_owned(),
                data: r["message"]["data"]
                    .as_str()
                    .and_then(|d| b64.decode(d).ok())
                    .unwrap_or_default(),
                attributes: r["message"]["attributes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
            })
            .collect())
    }

    /// Acknowledges pulled messages of subscription `id`.
    pub async fn ack(&self, id: &str, ack_ids: &[String]) -> anyhow::Result<()> {
        if ack_ids.is_empty() {
            return Ok(());
        }
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("subscriptions/{id}:acknowledge"),
                Some(json!({"ackIds": ack_ids})),
            )
            .await?;
        anyhow::ensure!(status == 200, "acking on {id}: {status} {body}");
        Ok(())
    }
}
