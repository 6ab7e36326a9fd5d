//! HTTP POST with retries, an idempotency key and an HMAC signature.
//!
//! Headers: `Idempotency-Key` (the same on every retry of one item, so the receiver can drop
//! duplicates) and, with a secret, `X-Iotgw-Signature: sha256=<hex HMAC-SHA256 of the body>`.
//! 2xx is delivered; 408, 425, 429 and 5xx and network errors are retried (honouring
//! `Retry-After` in seconds); any other answer is permanent and dead-letters the item.

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
    url: String,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
    backoff: (Duration, Duration),
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
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "msdyn_iotalert",
            "idempotency_key": item.idempotency_key,
            "data": item.payload,
        }))
        .map_err(|e| DeliveryError::Permanent(format!("payload cannot be encoded: {e}")))?;
        let mut req = self
            .client
            .post(&self.url)
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
                message: format!("POST {}: {e}", self.url),
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
        if status.is_server_error() || matches!(status.as_u16(), 408 | 425 | 429) {
            Err(DeliveryError::Retry { message, after })
        } else {
            Err(DeliveryError::Permanent(message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
