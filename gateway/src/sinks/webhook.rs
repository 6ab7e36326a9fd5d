//! HTTP POST with retries, an idempotency key and an HMAC signature.
//!
//! Body: an alert as `{"type": "msdyn_iotalert", "idempotency_key", "data": <alert>}`; a
//! change event as it is queued, `{"entity", "key", "version", "state"}`, whose
//! `Idempotency-Key` is `<entity>:<key>:<version>`.
//!
//! Headers: `Idempotency-Key` (the same on every retry of one item, so the receiver can drop
//! duplicates) and, with a secret, `X-Iotgw-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//! 2xx is delivered; 408, 425, 429 and 5xx and network errors are retried (honouring
//! `Retry-After` in seconds); `retry_statuses` (401, 403, 404 by default: a receiver mid
//! deploy or mid key rotation) are retried until `retry_statuses_for_secs` after the item
//! was queued; any other answer is permanent and dead-letters the item.

use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use iotgw_config::WebhookSinkConfig;
use iotgw_registry::OutboxItem;
use sha2::Sha256;

use super::{DeliveryError, Sink};

/// Signature header name.
pub const SIGNATURE_HEADER: &str = "X-Iotgw-Signature";
/// Idempotency header name.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// The webhook sink.
#[derive(Debug)]
pub struct WebhookSink {
    name: String,
    url: iotgw_config::SecretUrl,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
    backoff: (Duration, Duration),
    retry_statuses: Vec<u16>,
    retry_statuses_for: chrono::Duration,
}

/// `sha256=<hex>` HMAC of `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    /// Builds the HTTP client with the configured timeout.
    pub fn new(name: &str, cfg: &WebhookSinkConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("iotgw/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            name: name.into(),
            url: cfg.url.clone(),
            secret: cfg.secret.as_ref().map(|s| s.expose().as_bytes().to_vec()),
            client,
            backoff: (
                Duration::from_millis(cfg.backoff_min_ms),
                Duration::from_millis(cfg.backoff_max_ms),
            ),
            retry_statuses: cfg.retry_statuses.clone(),
            retry_statuses_for: chrono::Duration::seconds(
                i64::try_from(cfg.retry_statuses_for_secs).unwrap_or(i64::MAX / 1000),
            ),
        })
    }
}

#[async_trait]
impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn backoff(&self) -> (Duration, Duration) {
        self.backoff
    }

    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        // A change event goes as it is; an alert in its envelope, as before the change feed.
        let body = if super::change_entity(item).is_some() {
            serde_json::to_vec(&item.payload)
        } else {
            serde_json::to_vec(&serde_json::json!({
                "type": "msdyn_iotalert",
                "idempotency_key": item.idempotency_key,
                "data": item.payload,
            }))
        }
        .map_err(|e| DeliveryError::Permanent(format!("payload cannot be encoded: {e}")))?;
        let mut req = self
            .client
            .post(self.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, &item.idempotency_key);
        if let Some(secret) = &self.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Retry {
                // reqwest's text names the URL: left out, the redacted one is shown.
                message: format!("POST {}: {}", self.url, e.without_url()),
                after: None,
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
        let message = format!(
            "POST {} answered {status}: {}",
            self.url,
            text.chars().take(200).collect::<String>()
        );
        match self.verdict(status.as_u16(), item.created_at, chrono::Utc::now()) {
            Verdict::Retry => Err(DeliveryError::Retry { message, after }),
            Verdict::RetryUntil(until) => Err(DeliveryError::Retry {
                message: format!("{message} (retried until {until}, then dead-lettered)"),
                after,
            }),
            Verdict::Permanent => Err(DeliveryError::Permanent(message)),
            Verdict::GaveUp => Err(DeliveryError::Permanent(format!(
                "{message}; retried for retry_statuses_for_secs ({} s) since the alert was queued: replay it with POST /api/v1/dead-letters/{{id}}/replay once the receiver accepts it",
                self.retry_statuses_for.num_seconds()
            ))),
        }
    }
}

/// What an answer that is not 2xx means for the item.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Retried whatever its age.
    Retry,
    /// Retried, until then.
    RetryUntil(chrono::DateTime<chrono::Utc>),
    /// Dead-lettered now.
    Permanent,
    /// A `retry_statuses` answer after `retry_statuses_for_secs`: dead-lettered now.
    GaveUp,
}

impl WebhookSink {
    fn verdict(
        &self,
        status: u16,
        queued: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Verdict {
        if (500..=599).contains(&status) || matches!(status, 408 | 425 | 429) {
            return Verdict::Retry;
        }
        if !self.retry_statuses.contains(&status) {
            return Verdict::Permanent;
        }
        let until = queued + self.retry_statuses_for;
        if now < until {
            Verdict::RetryUntil(until)
        } else {
            Verdict::GaveUp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_retry_always_for_a_while_or_never() {
        let sink = WebhookSink::new(
            "hook",
            &WebhookSinkConfig {
                url: iotgw_config::SecretUrl::new("http://127.0.0.1:9/alerts"),
                secret: None,
                timeout_ms: 1000,
                backoff_min_ms: 200,
                backoff_max_ms: 30_000,
                retry_statuses: vec![401, 403, 404],
                retry_statuses_for_secs: 3600,
                entities: None,
                coalesce_connection_ms: iotgw_config::default_coalesce_connection(),
            },
        )
        .expect("sink");
        let queued = chrono::Utc::now();
        let soon = queued + chrono::Duration::minutes(59);
        let late = queued + chrono::Duration::minutes(61);
        for status in [500, 503, 408, 425, 429] {
            assert_eq!(
                sink.verdict(status, queued, late),
                Verdict::Retry,
                "{status}"
            );
        }
        for status in [401, 403, 404] {
            assert!(
                matches!(sink.verdict(status, queued, soon), Verdict::RetryUntil(u) if u == queued + chrono::Duration::hours(1)),
                "{status}"
            );
            assert_eq!(
                sink.verdict(status, queued, late),
                Verdict::GaveUp,
                "{status}"
            );
        }
        for status in [400, 410, 413, 422] {
            assert_eq!(
                sink.verdict(status, queued, soon),
                Verdict::Permanent,
                "{status}"
            );
        }
    }

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
