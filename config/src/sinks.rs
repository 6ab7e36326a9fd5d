//! The alert sinks' settings (`[sinks.<name>]`) and their validation.

use serde::{Deserialize, Serialize};

use crate::base::{Problem, Secret};

/// An alert sink: `kind` picks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// JSON lines appended to a file.
    File(FileSinkConfig),
    /// HTTP POST with retries, an idempotency key and an HMAC signature.
    Webhook(WebhookSinkConfig),
}

/// Standard output sink (no settings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {}

/// File sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to append JSON lines to (created with its directory).
    pub path: String,
}

/// Webhook sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    /// `http://` or `https://` URL to POST each alert to. Credentials in it (user info,
    /// `?code=`/`?token=`...) are redacted wherever it is shown.
    pub url: crate::SecretUrl,
    /// Shared secret: the body is signed with HMAC-SHA256 into `X-Iotgw-Signature: sha256=<hex>`.
    pub secret: Option<Secret>,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// First retry delay in milliseconds (doubles per attempt).
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// Longest retry delay in milliseconds; a sink that is down is retried forever at this pace.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Answers retried for `retry_statuses_for_secs` after the alert was queued, then
    /// dead-lettered: by default 401, 403 and 404, which a receiver mid-deploy or mid key
    /// rotation gives for a while. 408, 425, 429, 5xx and network errors are always retried;
    /// any other answer dead-letters at once (replay it with
    /// `POST /api/v1/dead-letters/{id}/replay`).
    #[serde(default = "default_retry_statuses")]
    pub retry_statuses: Vec<u16>,
    /// How long `retry_statuses` are retried, in seconds from when the alert was queued.
    #[serde(default = "default_retry_statuses_for")]
    pub retry_statuses_for_secs: u64,
}

fn default_retry_statuses() -> Vec<u16> {
    vec![401, 403, 404]
}
const fn default_retry_statuses_for() -> u64 {
    3600
}

const fn default_webhook_timeout() -> u64 {
    5_000
}
const fn default_backoff_min() -> u64 {
    200
}
const fn default_backoff_max() -> u64 {
    30_000
}

/// The checks serde cannot express for the sink at `base` (its name is checked with the
/// other names).
pub(crate) fn validate(base: &str, s: &SinkConfig, out: &mut Vec<Problem>) {
    match s {
        SinkConfig::Stdout(_) => {}
        SinkConfig::File(f) if f.path.trim().is_empty() => out.push(Problem::new(
            format!("{base}.path"),
            "empty path",
            "give a file to append JSON lines to",
        )),
        SinkConfig::File(_) => {}
        SinkConfig::Webhook(w) => {
            let url = w.url.expose();
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
                out.push(Problem::new(
                    format!("{base}.url"),
                    format!("`{}` is not an http(s) URL", w.url),
                    "give e.g. https://app.example.com/iot/alerts",
                ));
            }
            if w.backoff_min_ms == 0 || w.backoff_min_ms > w.backoff_max_ms {
                out.push(Problem::new(
                    format!("{base}.backoff_min_ms"),
                    "backoff_min_ms must be above 0 and not above backoff_max_ms",
                    "e.g. backoff_min_ms = 200, backoff_max_ms = 30000",
                ));
            }
            for (i, code) in w.retry_statuses.iter().enumerate() {
                if !(400..=499).contains(code) {
                    out.push(Problem::new(
                        format!("{base}.retry_statuses[{i}]"),
                        format!(
                            "{code} is not a 4xx status (5xx, 408, 425 and 429 are always retried)"
                        ),
                        "list 4xx statuses a receiver may answer for a while, e.g. [401, 403, 404]",
                    ));
                }
            }
            if w.retry_statuses_for_secs > 7 * 86_400 {
                out.push(Problem::new(
                    format!("{base}.retry_statuses_for_secs"),
                    format!("{} is above a week", w.retry_statuses_for_secs),
                    "use seconds up to 604800; 3600 (default) is an hour",
                ));
            }
            if w.timeout_ms == 0 {
                out.push(Problem::new(
                    format!("{base}.timeout_ms"),
                    "a zero timeout fails every request",
                    "use e.g. 5000",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_webhook_url_shows_without_its_credentials_wherever_it_is_printed() {
        let c = WebhookSinkConfig {
            url: crate::SecretUrl::new("https://crm:hunter2@app.example/hook?code=s3cr3t&t=1"),
            secret: None,
            timeout_ms: 5000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            retry_statuses: default_retry_statuses(),
            retry_statuses_for_secs: default_retry_statuses_for(),
        };
        let shown = [
            toml::to_string(&c).expect("config show serializes"),
            format!("{c:?}"),
            c.url.to_string(),
        ];
        for text in shown {
            assert!(
                !text.contains("hunter2") && !text.contains("s3cr3t"),
                "{text}"
            );
            assert!(text.contains("app.example/hook"), "{text}");
        }
        assert_eq!(
            c.url.expose(),
            "https://crm:hunter2@app.example/hook?code=s3cr3t&t=1"
        );
    }
}
