//! The moto server (`motoserver/moto:5.1.4`): AWS IoT (`iot`) and its data plane
//! (`iot-data`) on one HTTP port, picked by the SigV4 credential scope of each request.
//!
//! State is in memory: a restart forgets every thing, certificate and policy. Tests on the
//! [`Moto::shared`] (or [`Moto::leased`]) server keep apart by their own thing names; never
//! call [`Moto::reset`] on it.
//!
//! moto's request recorder ([`Moto::start_recording`], [`Moto::recording`]) shows what the
//! SDK sent, e.g. the `Publish` of a command, which moto does not forward to any broker.

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::{GenericImage, ImageExt};
use tokio::sync::OnceCell;

use super::Running;

/// Image name (the public one; see `deploy/images/build-local-images.sh`).
pub const IMAGE: &str = "motoserver/moto";
/// Image tag (the version the local build installs).
pub const TAG: &str = "5.1.4";
/// The HTTP port inside the container.
pub const PORT: u16 = 5000;
/// Region the tests use.
pub const REGION: &str = "us-east-1";
/// Access key moto accepts (any works; these are the SDKs' documented test values).
pub const ACCESS_KEY_ID: &str = "testing";
/// Secret key to go with it.
pub const SECRET_ACCESS_KEY: &str = "testing";

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    running: Running,
}

impl Moto {
    /// The server shared by every test of this binary (started on first use).
    pub async fn shared() -> anyhow::Result<&'static Moto> {
        static SHARED: OnceCell<Moto> = OnceCell::const_new();
        SHARED
            .get_or_try_init(|| Self::start(false, "moto/shared"))
            .await
    }

    /// The server the tests of a libtest binary share while any of them holds it (removed
    /// when the last one lets go).
    pub async fn leased() -> anyhow::Result<Arc<Moto>> {
        static LEASED: tokio::sync::Mutex<Weak<Moto>> = tokio::sync::Mutex::const_new(Weak::new());
        super::lease(&LEASED, || Self::start(false, "moto/leased")).await
    }

    /// A server of the caller's own, on a fixed host port that survives
    /// [`Moto::restart`]. Remove it with [`Moto::remove`].
    pub async fn dedicated() -> anyhow::Result<Moto> {
        Self::start(true, "moto/dedicated").await
    }

    async fn start(fixed: bool, role: &str) -> anyhow::Result<Self> {
        let req = GenericImage::new(IMAGE, TAG)
            .with_exposed_port(PORT.tcp())
            .with_wait_for(WaitFor::message_on_either_std("Running on"))
            .with_env_var("MOTO_PORT", PORT.to_string());
        let m = Self {
            running: Running::start(req, &[PORT], fixed, role).await?,
        };
        m.wait_ready().await?;
        Ok(m)
    }

    /// The endpoint URL for the AWS SDKs (`http://127.0.0.1:<port>`), for both the `iot`
    /// and the `iot-data` clients.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.running.port(PORT))
    }

    /// The container.
    pub fn container(&self) -> &Running {
        &self.running
    }

    /// Forgets everything (`POST /moto-api/reset`): only on a dedicated server.
    pub async fn reset(&self) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/moto-api/reset", self.endpoint()))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "moto reset answered {}",
            r.status()
        );
        Ok(())
    }

    /// Stops the server (SIGTERM), starts it again (empty) and waits until it answers.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.running.stop(5).await?;
        self.running.start_again().await?;
        self.wait_ready().await
    }

    /// Waits (30 s at most) until `GET /moto-api/` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let url = format!("{}/moto-api/", self.endpoint());
        let client = reqwest::Client::new();
        super::wait_ready(&format!("moto at {url}"), Duration::from_secs(30), || {
            let req = client.get(&url).timeout(Duration::from_secs(2));
            async move {
                match req.send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("answered {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await
    }

    /// Turns moto's request recorder on: it records every later API request, for
    /// [`Moto::recording`]. Process-wide on the server (turning it on twice is fine).
    pub async fn start_recording(&self) -> anyhow::Result<()> {
        let url = format!("{}/moto-api/recorder/start-recording", self.endpoint());
        let client = reqwest::Client::new();
        super::wait_ready(
            &format!("moto's recorder at {url}"),
            Duration::from_secs(10),
            || {
                let req = client.post(&url).timeout(Duration::from_secs(2));
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

    /// Every request moto recorded since [`Moto::start_recording`], oldest first.
    pub async fn recording(&self) -> anyhow::Result<Vec<Recorded>> {
        let url = format!("{}/moto-api/recorder/download-recording", self.endpoint());
        let text = reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await
            .with_context(|| format!("GET {url}: the body"))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("a line of moto's recording: {l}"))
            })
            .collect()
    }

    /// The server's log so far.
    pub async fn logs(&self) -> String {
        self.running.logs().await
    }

    /// Removes a dedicated server.
    pub async fn remove(self) {
        self.running.remove().await;
    }
}

/// One request moto's recorder kept.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Recorded {
    /// Request headers as moto saw them.
    #[serde(default)]
    pub headers: std::collections::HashMap<String, String>,
    /// HTTP method.
    pub method: String,
    /// Full URL (path percent-encoded as sent).
    pub url: String,
    /// Body, base64 when `body_encoded`.
    #[serde(default)]
    pub body: Option<String>,
    /// Whether `body` is base64.
    #[serde(default)]
    pub body_encoded: bool,
}

impl Recorded {
    /// The header `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The URL with its `%XX` escapes decoded.
    pub fn decoded_url(&self) -> String {
        let bytes = self.url.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let escaped = bytes
                .get(i + 1..i + 3)
                .filter(|_| bytes[i] == b'%')
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match escaped {
                Some(b) => {
                    out.push(b);
                    i += 3;
                }
                None => {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The body bytes (decoded when moto kept them as base64).
    pub fn body_bytes(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine as _;
        let body = self.body.clone().unwrap_or_default();
        if self.body_encoded {
            base64::engine::general_purpose::STANDARD
                .decode(body)
                .context("a recorded body marked base64 is not")
        } else {
            Ok(body.into_bytes())
        }
    }
}
