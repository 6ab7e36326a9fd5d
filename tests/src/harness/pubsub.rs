//! The Google Pub/Sub emulator, from the Cloud SDK emulators image
//! (`gcr.io/google.com/cloudsdktool/google-cloud-cli:emulators`), started as
//! `gcloud beta emulators pubsub start --project=<PROJECT> --host-port=0.0.0.0:8085`.
//!
//! Clients reach it through `PUBSUB_EMULATOR_HOST` ([`PubSub::emulator_host`]) or an
//! explicit `http://` endpoint ([`PubSub::endpoint`]). State is in memory: a restart
//! forgets every topic and subscription (a fixture re-creates what the real cloud would
//! have kept). Tests on the shared emulator keep apart by topic and subscription names of
//! their own.

use std::time::Duration;

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
