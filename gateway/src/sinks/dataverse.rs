//! Dynamics 365 Field Service through the Dataverse Web API: each new alert becomes an
//! `msdyn_iotalert` record.
//!
//! # Authentication
//! OAuth 2.0 client credentials against the Microsoft identity platform: a form POST of
//! `grant_type=client_credentials`, `client_id`, `client_secret` and `scope` to the token
//! endpoint. The access token is cached and fetched again once less than 5 minutes (or,
//! for tokens living under 50 minutes, a tenth of their lifetime) are left; a 401 from
//! Dataverse drops the cached token and the request is sent once more with a fresh one.
//!
//! # The write
//! One request per outbox item (no `$batch` yet):
//! `PATCH {url}/api/data/v9.2/msdyn_iotalerts(<msdyn_iotalertid>)` with `If-None-Match: *`.
//! Field Service documents no alternate key for `msdyn_iotalert` (its entity reference lists
//! the primary key `msdyn_iotalertid` only; `msdyn_alerttoken` is a plain string column), so
//! the record is addressed by the alert's own id, which the gateway made and which is the
//! outbox idempotency key: a PATCH on a primary key that does not exist creates the record
//! with that id ("upsert"), and `If-None-Match: *` turns off the update half ("Prevent
//! update in upsert"). A redelivery of an item whose first attempt reached Dataverse (the
//! answer lost, a lease taken over) therefore gets `412 Precondition Failed`, which this sink
//! counts as delivered, and never overwrites what Field Service changed on the record since
//! (a case created, a status set).
//!
//! The body holds Dataverse's logical names and option values, the device as
//! `msdyn_Device@odata.bind` (how: [`DataverseDeviceBinding`]) and the primary alert as
//! `msdyn_ParentAlert@odata.bind: /msdyn_iotalerts(<its id>)` (delivered before, by this same
//! sink, in outbox order). Navigation properties from the `msdyn_iotalert` entity reference:
//! `msdyn_Device` (relationship `msdyn_msdyn_iotdevice_msdyn_iotalert_Device`) and
//! `msdyn_ParentAlert` (`msdyn_iotalert_msdyn_iotalert`).
//!
//! # Answers
//! 2xx and 412 are delivered. 429 (a service protection limit) and 503 wait at least their
//! `Retry-After`; after a 429 the sink sends nothing until that time has passed (every item
//! is retried then). Other 5xx, 408 and network errors are retried. A token endpoint that
//! refuses (a wrong or expired secret) and a 401 with a fresh token (no application user in
//! the environment) are retried too: every alert would fail the same way until an operator
//! fixes the app registration, so none is dead-lettered for it. Any other 4xx is permanent:
//! the dead letter names Dataverse's `error.code` and `error.message`.
//! `x-ms-ratelimit-burst-remaining-xrm-requests` and
//! `x-ms-ratelimit-time-remaining-xrm-requests` are logged (Microsoft: "intended for
//! debugging purposes", so they steer nothing).

use std::time::Duration;

use async_trait::async_trait;
use iotgw_config::{DataverseDeviceBinding, DataverseSinkConfig, Secret};
use iotgw_registry::{Alert, OutboxItem};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::{DeliveryError, Sink};

/// The Web API version the sink speaks.
pub const API_PATH: &str = "/api/data/v9.2";
/// Remaining requests for this connection (Dataverse, debugging only).
pub const BURST_REMAINING_HEADER: &str = "x-ms-ratelimit-burst-remaining-xrm-requests";
/// Remaining combined execution time for this user (Dataverse, debugging only).
pub const TIME_REMAINING_HEADER: &str = "x-ms-ratelimit-time-remaining-xrm-requests";

/// The Dataverse sink.
pub struct DataverseSink {
    name: String,
    api: String,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    scope: String,
    device_binding: DataverseDeviceBinding,
    client: reqwest::Client,
    backoff: (Duration, Duration),
    token: tokio::sync::Mutex<Option<CachedToken>>,
    throttled_until: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for DataverseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataverseSink")
            .field("name", &self.name)
            .field("api", &self.api)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// An access token and when to fetch the next one.
struct CachedToken {
    value: String,
    refresh_at: Instant,
}

/// How long before its expiry a token is replaced: 5 minutes, or a tenth of its lifetime
/// when that is shorter (a 60 s token is used for 54 s).
pub fn refresh_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(Duration::from_secs(300))
}

/// `column='value'` for a string key in a URL: single quotes doubled (an OData string
/// literal), then every byte outside RFC 3986's unreserved set, `'`, `:` and `@`
/// percent-encoded, so a `?`, `#`, `/` or `%` cannot end the path. (Canonical device ids are
/// `[A-Za-z0-9:_-]`, so they pass unchanged; the escaping guards any other key.)
pub fn string_key(column: &str, value: &str) -> String {
    let literal = value.replace('\'', "''");
    let mut out = String::with_capacity(literal.len() + column.len() + 3);
    out.push_str(column);
    out.push_str("='");
    for b in literal.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'\'' | b':' | b'@')
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push('\'');
    out
}

/// The `msdyn_iotalert` body for `alert`: logical names, option values, lookups bound.
pub fn record(alert: &Alert, binding: DataverseDeviceBinding) -> Value {
    let mut r = Map::new();
    r.insert("msdyn_description".into(), json!(alert.description));
    r.insert("msdyn_alertdata".into(), json!(alert.alert_data));
    r.insert(
        "msdyn_alerttime".into(),
        json!(alert
            .alert_time
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
    );
    r.insert("msdyn_alerttoken".into(), json!(alert.alert_token));
    r.insert("msdyn_alerttype".into(), json!(alert.alert_type.value()));
    if let Some(score) = alert.priority_score {
        r.insert("msdyn_alertpriorityscore".into(), json!(score));
    }
    r.insert("msdyn_deviceid".into(), json!(alert.device_id.as_str()));
    match binding {
        DataverseDeviceBinding::Id => {
            r.insert(
                "msdyn_Device@odata.bind".into(),
                json!(format!("/msdyn_iotdevices({})", alert.device)),
            );
        }
        DataverseDeviceBinding::DeviceId => {
            r.insert(
                "msdyn_Device@odata.bind".into(),
                json!(format!(
                    "/msdyn_iotdevices({})",
                    string_key("msdyn_deviceid", alert.device_id.as_str())
                )),
            );
        }
        DataverseDeviceBinding::None => {}
    }
    if let Some(parent) = alert.parent_alert {
        r.insert(
            "msdyn_ParentAlert@odata.bind".into(),
            json!(format!("/msdyn_iotalerts({parent})")),
        );
    }
    if let Some(token) = &alert.parent_alert_token {
        r.insert("msdyn_parentalerttoken".into(), json!(token));
    }
    // A new record is Active (0/1) by default; another state is sent with its status
    // reason, as the docs ask ("when you update the statecode property, always set the
    // desired statuscode").
    if alert.statecode != 0 {
        r.insert("statecode".into(), json!(alert.statecode));
        r.insert("statuscode".into(), json!(alert.statuscode));
    }
    Value::Object(r)
}

impl DataverseSink {
    /// Builds the sink and its HTTP client (the configured timeout, the public web roots).
    pub fn new(name: &str, cfg: &DataverseSinkConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("iotgw/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self::with_client(name, cfg, client))
    }

    /// The sink with a given HTTP client (tests: one trusting a test CA).
    pub fn with_client(name: &str, cfg: &DataverseSinkConfig, client: reqwest::Client) -> Self {
        Self {
            name: name.into(),
            api: format!("{}{API_PATH}", cfg.url.trim_end_matches('/')),
            token_url: cfg.token_endpoint(),
            client_id: cfg.client_id.trim().to_owned(),
            client_secret: cfg.client_secret.clone(),
            scope: cfg.oauth_scope(),
            device_binding: cfg.device_binding,
            client,
            backoff: (
                Duration::from_millis(cfg.backoff_min_ms),
                Duration::from_millis(cfg.backoff_max_ms),
            ),
            token: tokio::sync::Mutex::new(None),
            throttled_until: std::sync::Mutex::new(None),
        }
    }

    /// The record's URL: `{url}/api/data/v9.2/msdyn_iotalerts(<id>)`.
    pub fn alert_url(&self, id: uuid::Uuid) -> String {
        format!("{}/msdyn_iotalerts({id})", self.api)
    }

    /// A valid access token: the cached one, or a new one.
    async fn access_token(&self) -> Result<String, DeliveryError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *cached = Some(fresh);
        Ok(value)
    }

    /// Drops the cached token if it is still `used` (Dataverse refused it).
    async fn forget_token(&self, used: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == used) {
            *cached = None;
        }
    }

    /// The client-credentials request.
    async fn fetch_token(&self) -> Result<CachedToken, DeliveryError> {
        let retry = |message: String| DeliveryError::Retry {
            message,
            after: None,
        };
        let asked = Instant::now();
        let resp = self
            .client
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.as_str()),
                ("client_secret", self.client_secret.expose()),
                ("scope", self.scope.as_str()),
            ])
            .send()
            .await
            .map_err(|e| {
                retry(format!(
                    "token request to {}: {}",
                    self.token_url,
                    e.without_url()
                ))
            })?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            // {"error": "invalid_client", "error_description": "AADSTS7000215: ..."}: the
            // first line of the description names the cause; the rest is trace ids.
            let error = body["error"].as_str().unwrap_or("no OAuth error");
            let description = body["error_description"]
                .as_str()
                .and_then(|d| d.lines().next())
                .unwrap_or_default();
            return Err(retry(format!(
                "token endpoint {} answered {status}: {error}: {description} (check tenant_id, client_id and client_secret of the app registration; retried until it answers)",
                self.token_url
            )));
        }
        let Some(value) = body["access_token"].as_str().filter(|t| !t.is_empty()) else {
            return Err(retry(format!(
                "token endpoint {} answered {status} without an access_token",
                self.token_url
            )));
        };
        // expires_in is a number on v2.0 endpoints, a string on some older ones; an
        // answer without it is used for a minute.
        let lifetime = body["expires_in"]
            .as_u64()
            .or_else(|| body["expires_in"].as_str().and_then(|s| s.parse().ok()))
            .map_or(Duration::from_secs(60), Duration::from_secs);
        tracing::debug!(sink = %self.name, lifetime_secs = lifetime.as_secs(), "dataverse access token fetched");
        Ok(CachedToken {
            value: value.to_owned(),
            refresh_at: asked + lifetime.saturating_sub(refresh_margin(lifetime)),
        })
    }

    /// One PATCH of `body` to `url` with `token`.
    async fn patch(
        &self,
        url: &str,
        body: &[u8],
        token: &str,
    ) -> Result<reqwest::Response, DeliveryError> {
        self.client
            .patch(url)
            .bearer_auth(token)
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(reqwest::header::IF_NONE_MATCH, "*")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| DeliveryError::Retry {
                message: format!("PATCH {url}: {}", e.without_url()),
                after: None,
            })
    }

    /// The time left of a 429's `Retry-After`, if it has not passed.
    fn throttled_for(&self) -> Option<Duration> {
        let until = (*self.throttled_until.lock().expect("throttle lock"))?;
        until.checked_duration_since(Instant::now())
    }

    fn throttle(&self, after: Duration) {
        let until = Instant::now() + after;
        let mut t = self.throttled_until.lock().expect("throttle lock");
        if t.is_none_or(|old| old < until) {
            *t = Some(until);
        }
    }

    /// What Dataverse's answer means for the item.
    async fn outcome(&self, url: &str, resp: reqwest::Response) -> Result<(), DeliveryError> {
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let burst = header(BURST_REMAINING_HEADER);
        let time = header(TIME_REMAINING_HEADER);
        let after = header(reqwest::header::RETRY_AFTER.as_str())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        if status.is_success() {
            tracing::debug!(sink = %self.name, %url, burst_remaining = ?burst, time_remaining = ?time, "alert written to dataverse");
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let error = dataverse_error(&text);
        if status == reqwest::StatusCode::PRECONDITION_FAILED {
            // If-None-Match: * refused an update: the record exists, created by an earlier
            // attempt of this item (its id is the alert's own).
            tracing::debug!(sink = %self.name, %url, %error, "alert already in dataverse (412 on If-None-Match: *): delivered");
            return Ok(());
        }
        let message = format!("PATCH {url} answered {status}: {error}");
        let code = status.as_u16();
        if code == 429 || code == 503 {
            tracing::warn!(sink = %self.name, %url, status = code, retry_after = ?after, burst_remaining = ?burst, time_remaining = ?time, %error, "dataverse service protection limit");
            if code == 429 {
                self.throttle(after.unwrap_or(self.backoff.0));
            }
            return Err(DeliveryError::Retry {
                message: format!(
                    "{message} (service protection limit; x-ms-ratelimit burst remaining {}, time remaining {})",
                    burst.as_deref().unwrap_or("-"),
                    time.as_deref().unwrap_or("-")
                ),
                after,
            });
        }
        if status.is_server_error() || code == 408 {
            return Err(DeliveryError::Retry { message, after });
        }
        if code == 401 {
            return Err(DeliveryError::Retry {
                message: format!(
                    "{message} with a freshly issued token: is there an application user for client_id {} in the environment, with a security role that may create IoT alerts? (retried until there is)",
                    self.client_id
                ),
                after,
            });
        }
        Err(DeliveryError::Permanent(message))
    }
}

/// `Dataverse error <code>: <message>` from an `{"error": {"code", "message"}}` body, else
/// the start of the body.
pub fn dataverse_error(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (code, Some(message)) => format!(
            "Dataverse error {}: {message}",
            code.filter(|c| !c.is_empty()).unwrap_or("(no code)")
        ),
        _ if body.trim().is_empty() => "(empty body)".to_owned(),
        _ => body.chars().take(200).collect(),
    }
}

#[async_trait]
impl Sink for DataverseSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn backoff(&self) -> (Duration, Duration) {
        self.backoff
    }

    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        if let Some(wait) = self.throttled_for() {
            return Err(DeliveryError::Retry {
                message: format!(
                    "not sent: Dataverse asked to wait (429, Retry-After) {} s more",
                    wait.as_secs_f64().ceil()
                ),
                after: Some(wait),
            });
        }
        if let Some(entity) = super::change_entity(item) {
            return Err(DeliveryError::Permanent(format!(
                "the dataverse sink writes new msdyn_iotalert records only; {entity} change events are not written to Dataverse yet: remove {entity} from sinks.{}.entities",
                self.name
            )));
        }
        let alert: Alert = serde_json::from_value(item.payload.clone()).map_err(|e| {
            DeliveryError::Permanent(format!("the outbox payload is not an msdyn_iotalert: {e}"))
        })?;
        let url = self.alert_url(alert.id);
        let body = serde_json::to_vec(&record(&alert, self.device_binding))
            .map_err(|e| DeliveryError::Permanent(format!("record cannot be encoded: {e}")))?;
        let token = self.access_token().await?;
        let mut resp = self.patch(&url, &body, &token).await?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            // Expired or revoked before our refresh margin: once more with a new token.
            tracing::info!(sink = %self.name, %url, "dataverse refused the access token (401); fetching a new one");
            self.forget_token(&token).await;
            let token = self.access_token().await?;
            resp = self.patch(&url, &body, &token).await?;
        }
        self.outcome(&url, resp).await
    }
}

#[cfg(test)]
mod tests;
