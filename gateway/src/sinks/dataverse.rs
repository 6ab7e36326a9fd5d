//! Dynamics 365 Field Service through the Dataverse Web API: the change feed written to
//! Field Service's IoT tables, one record per outbox item, up to `batch_size` items in one
//! `$batch` change set.
//!
//! # Authentication
//! OAuth 2.0 client credentials against the Microsoft identity platform: a form POST of
//! `grant_type=client_credentials`, `client_id`, `client_secret` and `scope` to the token
//! endpoint; with `client_certificate` instead of the secret,
//! `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer` and
//! `client_assertion`, a JWT made fresh for each request and signed `PS256` with the
//! certificate's key (header `x5t#S256`, `x5c`; claims `aud` = the token endpoint, `iss` =
//! `sub` = `client_id`, `jti`, `nbf`, `iat`, `exp` 10 minutes on: [`assertion`]). The access token is cached and fetched again once less than 5 minutes (or,
//! for tokens living under 50 minutes, a tenth of their lifetime) are left; a 401 from
//! Dataverse drops the cached token and the request is sent once more with a fresh one.
//!
//! # The writes
//! Each outbox item is one `PATCH {url}/api/data/v9.2/<entity set>(<key>)` ("upsert": a
//! PATCH on a key that does not exist creates the record with that key), its body in
//! Dataverse's logical names and option values (integers), lookups as
//! `<navigation property>@odata.bind: /<entity set>(<id>)` ([`records`] quotes the entity
//! references the names come from):
//! - a new alert (the `Alert` JSON queued before the change feed, or an `msdyn_iotalert`
//!   change event of version 1): `msdyn_iotalerts(<msdyn_iotalertid>)` with
//!   `If-None-Match: *` ("Prevent update in upsert"). Field Service documents no alternate key
//!   for `msdyn_iotalert` (its entity reference lists the primary key `msdyn_iotalertid`
//!   only; `msdyn_alerttoken` is a plain string column), so the record is addressed by the
//!   alert's own id, which the gateway made and which is the outbox idempotency key. A
//!   redelivery of an item whose first attempt reached Dataverse (the answer lost, a lease
//!   taken over) therefore gets `412 Precondition Failed`, which this sink counts as
//!   delivered, and never overwrites what Field Service changed on the record since (a case
//!   created, a status set). The device is bound as `msdyn_Device@odata.bind` (how:
//!   [`iotgw_config::DataverseDeviceBinding`]), the primary alert as `msdyn_ParentAlert@odata.bind`
//!   (delivered before, by this same sink, in outbox order).
//! - a later change of an alert (`msdyn_iotalert` change event, version 2 and up):
//!   `msdyn_iotalerts(<id>)` with `If-Match: *` ("Prevent create in upsert"), carrying only
//!   what iotgw owns: `statecode` + `statuscode`, the parent (bind and
//!   `msdyn_parentalerttoken`), `msdyn_LastCommandSent@odata.bind` (when the sink writes
//!   `msdyn_iotdevicecommand`) and `msdyn_lastcommandsenttime`. Never `msdyn_case` or
//!   `msdyn_workorder`: Field Service sets those. A record Field Service deleted is not
//!   re-created: 404 (or 412) is a permanent error that says so.
//! - a device: `msdyn_iotdevices(msdyn_deviceid='<id>')` (the alternate key, with
//!   `device_binding = "device_id"`) or `msdyn_iotdevices(<msdyn_iotdeviceid>)`, a plain
//!   upsert; `msdyn_Category` bound when the sink writes `msdyn_iotdevicecategory` (the
//!   change event's `refs.msdyn_category`), `msdyn_IoTProviderInstance` when
//!   `provider_instances` names the device's instance. A JSON or tags value longer than its
//!   8000-character column is left out (the record keeps its previous value) with a warning.
//! - a registration history row: `msdyn_iotdeviceregistrationhistories(<id>)`, create-only
//!   like a new alert (rows never change).
//! - a category: `msdyn_iotdevicecategories(<id>)`, upserted (`msdyn_name`).
//! - a command: `msdyn_iotdevicecommands(<id>)`, upserted; `msdyn_ParentAlert` bound when the
//!   sink writes `msdyn_iotalert`.
//!
//! # `$batch`
//! With `batch_size` above 1 the outbox worker hands the sink up to that many items (never
//! two of one record); two or more go as one `POST {url}/api/data/v9.2/$batch` holding one
//! change set, one part per item (`Content-ID` 1, 2, ... in item order) with the same
//! request line, precondition header and body as alone ([`batch`]). A change set is atomic:
//! all parts 2xx deliver every item; an error part names its item by `Content-ID`, and the
//! other items, rolled back, are retried. That item's answer counts as it would alone (412
//! on a create-only write: delivered, already there; another 4xx: dead-lettered with
//! Dataverse's error). A 5xx or 429 (of the batch or of a part) retries every item; an error
//! without a usable `Content-ID` retries every item of a batch of several.
//!
//! # Answers
//! 2xx is delivered, and 412 on a create-only write. 429 (a service protection limit) and
//! 503 wait at least their `Retry-After`; after a 429 the sink sends nothing until that time
//! has passed (every item is retried then). Other 5xx, 408 and network errors are retried. A
//! token endpoint that refuses (a wrong or expired secret) and a 401 with a fresh token (no
//! application user in the environment) are retried too: every item would fail the same way
//! until an operator fixes the app registration, so none is dead-lettered for it. Any other
//! 4xx is permanent: the dead letter names Dataverse's `error.code` and `error.message`.
//! `x-ms-ratelimit-burst-remaining-xrm-requests` and
//! `x-ms-ratelimit-time-remaining-xrm-requests` are logged (Microsoft: "intended for
//! debugging purposes", so they steer nothing).

use std::time::Duration;

use async_trait::async_trait;
use iotgw_config::DataverseSinkConfig;
use iotgw_registry::OutboxItem;
use serde_json::Value;
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
    credential: assertion::Credential,
    scope: String,
    client: reqwest::Client,
    backoff: (Duration, Duration),
    token: tokio::sync::Mutex<Option<CachedToken>>,
    throttled_until: std::sync::Mutex<Option<Instant>>,
    /// Rounds in a row that failed as a whole (the pause after the next one doubles).
    failures: std::sync::atomic::AtomicU32,
    /// How records point at each other (device binding, entities, provider instances).
    binding: records::Binding,
    /// The most items in one `$batch`.
    batch_size: usize,
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

#[cfg(test)]
use records::record;
use records::{Condition, Write};

impl DataverseSink {
    /// Builds the sink and its HTTP client (the configured timeout, the public web roots).
    pub fn new(name: &str, cfg: &DataverseSinkConfig) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("iotgw/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Self::with_client(name, cfg, client)
    }

    /// The sink with a given HTTP client (tests: one trusting a test CA). Fails when the
    /// certificate of `client_certificate` (or its key) cannot be read or used.
    pub fn with_client(
        name: &str,
        cfg: &DataverseSinkConfig,
        client: reqwest::Client,
    ) -> anyhow::Result<Self> {
        let credential = assertion::Credential::from_config(cfg)
            .map_err(|e| anyhow::anyhow!("sinks.{name}: {e:#}"))?;
        Ok(Self {
            name: name.into(),
            api: format!("{}{API_PATH}", cfg.url.trim_end_matches('/')),
            token_url: cfg.token_endpoint(),
            client_id: cfg.client_id.trim().to_owned(),
            credential,
            scope: cfg.oauth_scope(),
            client,
            backoff: (
                Duration::from_millis(cfg.backoff_min_ms),
                Duration::from_millis(cfg.backoff_max_ms),
            ),
            token: tokio::sync::Mutex::new(None),
            throttled_until: std::sync::Mutex::new(None),
            failures: std::sync::atomic::AtomicU32::new(0),
            binding: records::Binding {
                device: cfg.device_binding,
                entities: cfg
                    .entities
                    .clone()
                    .unwrap_or_else(iotgw_config::default_entities),
                provider_instances: cfg
                    .provider_instances
                    .iter()
                    .filter_map(|(name, id)| {
                        Some((name.clone(), uuid::Uuid::parse_str(id.trim()).ok()?))
                    })
                    .collect(),
            },
            batch_size: usize::try_from(cfg.batch_size).unwrap_or(1).max(1),
        })
    }

    /// A record's URL: `{url}/api/data/v9.2/<path>`, e.g. `.../msdyn_iotalerts(<id>)`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.api)
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
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", self.client_id.clone()),
        ];
        // client_secret, or a fresh client assertion.
        form.extend(
            self.credential
                .form_fields(&self.token_url, &self.client_id)
                .map_err(|e| retry(format!("{e:#}")))?,
        );
        form.push(("scope", self.scope.clone()));
        let resp = self
            .client
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
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
                "token endpoint {} answered {status}: {error}: {description} (check tenant_id, client_id and {} of the app registration; retried until it answers)",
                self.token_url,
                self.credential.hint()
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

    /// The write for `item`, or why it can never be written (a permanent error). Columns
    /// left out for their length are logged.
    fn write_for(&self, item: &OutboxItem) -> Result<Write, DeliveryError> {
        let write = records::for_payload(super::change_entity(item), &item.payload, &self.binding)
            .map_err(DeliveryError::Permanent)?;
        for (column, length) in &write.omitted {
            tracing::warn!(
                sink = %self.name,
                entity = write.entity,
                path = %write.path,
                column,
                length,
                max = records::DEVICE_MEMO_MAX,
                "value longer than its Dataverse column: left out, the record keeps its previous value"
            );
        }
        Ok(write)
    }

    /// One PATCH of `body` to `url` with `token`, with the write's precondition header.
    async fn patch(
        &self,
        url: &str,
        condition: Condition,
        body: &[u8],
        token: &str,
    ) -> Result<reqwest::Response, DeliveryError> {
        let mut request = self
            .client
            .patch(url)
            .bearer_auth(token)
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
        if let Some((name, value)) = condition.header() {
            request = request.header(name, value);
        }
        request
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| DeliveryError::Retry {
                message: format!("PATCH {url}: {}", e.without_url()),
                after: None,
            })
    }

    /// One `POST {url}/api/data/v9.2/$batch` of `body` (boundary `batch`) with `token`.
    async fn post_batch(
        &self,
        url: &str,
        batch: &str,
        body: &[u8],
        token: &str,
    ) -> Result<reqwest::Response, DeliveryError> {
        self.client
            .post(url)
            .bearer_auth(token)
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/mixed; boundary={batch}"),
            )
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| DeliveryError::Retry {
                message: format!("POST {url}: {}", e.without_url()),
                after: None,
            })
    }

    /// One write alone: its PATCH (once more with a fresh token after a 401) and what the
    /// answer means for its item.
    async fn deliver_one(&self, write: &Write) -> Result<(), DeliveryError> {
        let url = self.url(&write.path);
        let body = write.body.to_string().into_bytes();
        let token = self.access_token().await?;
        let mut resp = self.patch(&url, write.condition, &body, &token).await?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            // Expired or revoked before our refresh margin: once more with a new token.
            tracing::info!(sink = %self.name, %url, "dataverse refused the access token (401); fetching a new one");
            self.forget_token(&token).await;
            let token = self.access_token().await?;
            resp = self.patch(&url, write.condition, &body, &token).await?;
        }
        let answer = Answer::read(resp).await;
        self.outcome(write, &format!("PATCH {url}"), &answer)
    }

    /// Two or more writes as one `$batch` change set; one result per write, in order.
    async fn deliver_changeset(&self, writes: &[Write]) -> Vec<Result<(), DeliveryError>> {
        let n = writes.len();
        let url = format!("{}/$batch", self.api);
        let batch = format!("batch_{}", uuid::Uuid::new_v4());
        let changeset = format!("changeset_{}", uuid::Uuid::new_v4());
        let parts: Vec<batch::Part<'_>> = writes
            .iter()
            .map(|w| batch::Part {
                url: self.url(&w.path),
                write: w,
                body: w.body.to_string().into_bytes(),
            })
            .collect();
        let body = batch::request_body(&batch, &changeset, &parts);
        let sent = async {
            let token = self.access_token().await?;
            let mut resp = self.post_batch(&url, &batch, &body, &token).await?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
                tracing::info!(sink = %self.name, %url, "dataverse refused the access token (401); fetching a new one");
                self.forget_token(&token).await;
                let token = self.access_token().await?;
                resp = self.post_batch(&url, &batch, &body, &token).await?;
            }
            Ok::<_, DeliveryError>(Answer::read(resp).await)
        };
        match sent.await {
            Ok(answer) => self.batch_outcome(writes, &parts, &url, &answer),
            Err(e) => vec![Err(e); n],
        }
    }

    /// What a `$batch` answer means for each of its writes.
    fn batch_outcome(
        &self,
        writes: &[Write],
        parts: &[batch::Part<'_>],
        url: &str,
        answer: &Answer,
    ) -> Vec<Result<(), DeliveryError>> {
        let n = writes.len();
        let responses = answer
            .content_type
            .as_deref()
            .and_then(|ct| batch::parse_response(ct, &answer.body))
            .unwrap_or_default();
        let failed = responses.iter().find(|r| !(200..300).contains(&r.status));
        let Some(failed) = failed else {
            if (200..300).contains(&answer.status) {
                tracing::debug!(sink = %self.name, %url, items = n, burst_remaining = ?answer.burst, time_remaining = ?answer.time, "$batch change set written to dataverse");
                return vec![Ok(()); n];
            }
            // Refused as a whole, no part to tell which item.
            let what = format!("POST {url} ({n} items in one change set)");
            if n == 1 {
                return vec![self.outcome(&writes[0], &what, answer)];
            }
            let err = match self.answer_error(writes[0].entity, &what, answer) {
                DeliveryError::Permanent(message) => DeliveryError::Retry {
                    message: format!(
                        "{message}; the answer names no item (no Content-ID), so every item of the batch is retried"
                    ),
                    after: answer.retry_after,
                },
                retry => retry,
            };
            return vec![Err(err); n];
        };
        let part = Answer {
            status: failed.status,
            retry_after: failed
                .header(reqwest::header::RETRY_AFTER.as_str())
                .and_then(retry_after)
                .or(answer.retry_after),
            burst: answer.burst.clone(),
            time: answer.time.clone(),
            content_type: failed.header("content-type").map(str::to_owned),
            body: failed.body.clone(),
        };
        let index = failed
            .content_id
            .as_deref()
            .and_then(|id| id.trim().parse::<usize>().ok())
            .filter(|i| (1..=n).contains(i))
            .map(|i| i - 1)
            .or((n == 1).then_some(0));
        let code = part.status;
        let whole = code == 429 || code == 401 || (500..600).contains(&code);
        let Some(index) = index.filter(|_| !whole) else {
            let what = match failed.content_id.as_deref() {
                Some(id) => format!("POST {url}: the part with Content-ID {id}"),
                None => format!("POST {url}: a part without a Content-ID"),
            };
            let mut err = self.answer_error(writes[0].entity, &what, &part);
            if let DeliveryError::Permanent(message) = err {
                err = DeliveryError::Retry {
                    message: format!(
                        "{message}; no item of the {n} in the change set has that Content-ID, so all are retried"
                    ),
                    after: part.retry_after,
                };
            }
            return vec![Err(err); n];
        };
        let what = format!(
            "PATCH {} (Content-ID {} of a $batch of {n})",
            parts[index].url,
            index + 1
        );
        let own = self.outcome(&writes[index], &what, &part);
        let why = match &own {
            Ok(()) => format!(
                "{} {} was already in Dataverse (412 on its create-only write)",
                writes[index].entity, writes[index].path
            ),
            Err(e) => format!(
                "{} {} failed: {e}",
                writes[index].entity, writes[index].path
            ),
        };
        (0..n)
            .map(|i| {
                if i == index {
                    own.clone()
                } else {
                    Err(DeliveryError::Retry {
                        message: format!(
                            "rolled back: the $batch change set is atomic and Content-ID {} ({why}); sent again",
                            index + 1
                        ),
                        after: Some(Duration::ZERO),
                    })
                }
            })
            .collect()
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

    /// Every item waits while the sink is paused (a 429's `Retry-After`, or a round that
    /// failed as a whole).
    fn held_back(&self) -> Option<DeliveryError> {
        let wait = self.throttled_for()?;
        Some(DeliveryError::Retry {
            message: format!(
                "not sent: the sink is paused {} s more (Dataverse throttled or failed the last round)",
                wait.as_secs_f64().ceil()
            ),
            after: Some(wait),
        })
    }

    /// After a round: a retry other than a rolled-back write (`after` zero: go again at
    /// once) means Dataverse failed as a whole (throttled, 5xx, unreachable, token refused),
    /// so the sink pauses: for the answer's `Retry-After`, else a backoff doubling per
    /// round failed in a row. While it is paused every retried item is due again exactly
    /// when the pause ends, so the waiting items go out again in outbox order, and a record
    /// is written before the records naming it (a command's alert, a history row's device),
    /// which a backoff grown per item would reorder.
    fn settle_round(&self, results: &mut [Result<(), DeliveryError>]) {
        use std::sync::atomic::Ordering;
        let whole = results.iter().find_map(|r| match r {
            Err(DeliveryError::Retry { after, .. }) if *after != Some(Duration::ZERO) => {
                Some(*after)
            }
            _ => None,
        });
        match whole {
            Some(after) => {
                let k = self.failures.fetch_add(1, Ordering::Relaxed).min(20);
                let grown = self
                    .backoff
                    .0
                    .saturating_mul(2u32.saturating_pow(k))
                    .min(self.backoff.1);
                self.throttle(after.unwrap_or(grown));
            }
            None if results.iter().any(Result::is_ok) => {
                self.failures.store(0, Ordering::Relaxed);
            }
            None => {}
        }
        if let Some(wait) = self.throttled_for() {
            for r in results.iter_mut() {
                if let Err(DeliveryError::Retry { after, .. }) = r {
                    *after = Some(wait);
                }
            }
        }
    }

    /// What Dataverse's answer to `write` (sent as `what`) means for its item.
    fn outcome(&self, write: &Write, what: &str, answer: &Answer) -> Result<(), DeliveryError> {
        let status = answer.status;
        if (200..300).contains(&status) {
            tracing::debug!(sink = %self.name, %what, entity = write.entity, burst_remaining = ?answer.burst, time_remaining = ?answer.time, "written to dataverse");
            return Ok(());
        }
        match (status, write.condition) {
            (412, Condition::CreateOnly) => {
                // If-None-Match: * refused an update: the record exists, created by an
                // earlier attempt of this item (its id is the record's own).
                tracing::debug!(sink = %self.name, %what, entity = write.entity, error = %dataverse_error(&answer.body), "record already in dataverse (412 on If-None-Match: *): delivered");
                Ok(())
            }
            (404 | 412, Condition::UpdateOnly) => Err(DeliveryError::Permanent(format!(
                "{what} answered {}: {}: the {} record is not in Dataverse (deleted there?); iotgw only updates it (If-Match: *) and never re-creates a record Field Service removed",
                status_text(status),
                dataverse_error(&answer.body),
                write.entity
            ))),
            _ => Err(self.answer_error(write.entity, what, answer)),
        }
    }

    /// The error for a non-2xx answer (429, 503: throttled; 5xx, 408: retried; 401: retried,
    /// no application user; any other: permanent).
    fn answer_error(&self, entity: &str, what: &str, answer: &Answer) -> DeliveryError {
        let code = answer.status;
        let after = answer.retry_after;
        let error = dataverse_error(&answer.body);
        let message = format!("{what} answered {}: {error}", status_text(code));
        if code == 429 || code == 503 {
            tracing::warn!(sink = %self.name, %what, status = code, retry_after = ?after, burst_remaining = ?answer.burst, time_remaining = ?answer.time, %error, "dataverse service protection limit");
            if code == 429 {
                self.throttle(after.unwrap_or(self.backoff.0));
            }
            return DeliveryError::Retry {
                message: format!(
                    "{message} (service protection limit; x-ms-ratelimit burst remaining {}, time remaining {})",
                    answer.burst.as_deref().unwrap_or("-"),
                    answer.time.as_deref().unwrap_or("-")
                ),
                after,
            };
        }
        if (500..600).contains(&code) || code == 408 {
            return DeliveryError::Retry { message, after };
        }
        if code == 401 {
            return DeliveryError::Retry {
                message: format!(
                    "{message} with a freshly issued token: is there an application user for client_id {} in the environment, with a security role that may write {entity} records? (retried until there is)",
                    self.client_id
                ),
                after,
            };
        }
        DeliveryError::Permanent(message)
    }
}

/// `412 Precondition Failed`: the code and its reason phrase.
fn status_text(code: u16) -> String {
    reqwest::StatusCode::from_u16(code).map_or_else(|_| code.to_string(), |s| s.to_string())
}

/// A `Retry-After` of seconds.
fn retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// An answer of Dataverse, read whole: of a request, or of one part of a `$batch`.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    burst: Option<String>,
    time: Option<String>,
    content_type: Option<String>,
    body: String,
}

impl Answer {
    async fn read(resp: reqwest::Response) -> Self {
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let status = resp.status().as_u16();
        let retry = header(reqwest::header::RETRY_AFTER.as_str()).and_then(|v| retry_after(&v));
        let burst = header(BURST_REMAINING_HEADER);
        let time = header(TIME_REMAINING_HEADER);
        let content_type = header(reqwest::header::CONTENT_TYPE.as_str());
        let body = resp.text().await.unwrap_or_default();
        Self {
            status,
            retry_after: retry,
            burst,
            time,
            content_type,
            body,
        }
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

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError> {
        if let Some(held) = self.held_back() {
            return Err(held);
        }
        let write = self.write_for(item)?;
        let mut result = [self.deliver_one(&write).await];
        self.settle_round(&mut result);
        let [result] = result;
        result
    }

    async fn deliver_batch(&self, items: &[OutboxItem]) -> Vec<Result<(), DeliveryError>> {
        if let Some(held) = self.held_back() {
            return vec![Err(held); items.len()];
        }
        let mut results: Vec<Option<Result<(), DeliveryError>>> = vec![None; items.len()];
        let mut writes = Vec::with_capacity(items.len());
        let mut at = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match self.write_for(item) {
                Ok(w) => {
                    writes.push(w);
                    at.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let sent = match writes.as_slice() {
            [] => Vec::new(),
            [one] => vec![self.deliver_one(one).await],
            _ => self.deliver_changeset(&writes).await,
        };
        for (i, r) in at.into_iter().zip(sent) {
            results[i] = Some(r);
        }
        let mut results: Vec<_> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(DeliveryError::Retry {
                        message: "the dataverse sink gave no result for this item".into(),
                        after: None,
                    })
                })
            })
            .collect();
        self.settle_round(&mut results);
        results
    }
}

pub mod assertion;
pub mod batch;
pub mod records;

#[cfg(test)]
mod tests;
