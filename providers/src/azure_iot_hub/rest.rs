//! [`HubClient`]: IoT Hub's service REST API over HTTPS (reqwest on rustls), signed with
//! SAS tokens from [`super::sas::TokenCache`].
//!
//! Every request carries `?api-version=2021-04-12`, `Authorization: SharedAccessSignature
//! ...`, `Accept: application/json` and, with a body, `Content-Type: application/json;
//! charset=utf-8` — the same as the official service SDKs. Answers 429 and 503 are retried
//! after the hub's `Retry-After`; every other failure is classified into a
//! [`ProviderError`] naming the device and the operation.
//!
//! The JSON shapes iotgw sends and reads (device identities, bulk registry operations,
//! twins, direct methods) are at the end of this file. Field names follow the REST
//! reference (and the official SDKs' models); absent optional fields are left out of
//! requests, as the SDKs do, and unknown fields in answers are ignored.

use std::time::Duration;

use iotgw_config::azure_iot_hub::ServiceConnectionString;
use iotgw_config::AzureIotHubConfig;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_MATCH};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::sas::{quote, TokenCache};
use crate::ProviderError;

/// Most devices one bulk registry call may carry (IoT Hub's limit).
pub const BULK_MAX: usize = 100;

/// Content type of every request body (as the official SDKs send it).
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The `If-Match` value of unconditional twin updates and deletes (quoted, as the SDKs
/// send it).
pub const MATCH_ANY: &str = "\"*\"";

/// Shortest pause before retrying a 429/503 that announced no delay.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(500);

/// What the hub answered with, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubFailure {
    /// HTTP status.
    pub status: u16,
    /// IoT Hub's error code when it sent one (`404103`, `DeviceNotFound`, ...).
    pub code: Option<String>,
    /// The hub's message.
    pub message: String,
}

impl HubFailure {
    /// Whether the hub said the device is registered but not connected (404103).
    pub fn device_not_online(&self) -> bool {
        self.status == 404
            && self
                .code
                .as_deref()
                .is_some_and(|c| c == "404103" || c.eq_ignore_ascii_case("DeviceNotOnline"))
    }

    /// Whether the device is already registered (409001).
    pub fn already_exists(&self) -> bool {
        self.status == 409
    }
}

/// IoT Hub's service REST API for one hub.
pub struct HubClient {
    instance: String,
    host: String,
    base: String,
    http: reqwest::Client,
    tokens: TokenCache,
    max_retries: u32,
    max_retry_after: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("instance", &self.instance)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Builds the HTTPS client: the public web roots plus `ca_file`, rustls (ring), HTTP/1.1.
pub fn http_client(
    instance: &str,
    config: &AzureIotHubConfig,
) -> Result<reqwest::Client, ProviderError> {
    let invalid = |field: &str, message: String| ProviderError::InvalidInput {
        instance: instance.to_owned(),
        field: field.to_owned(),
        message,
    };
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("iotgw/", env!("CARGO_PKG_VERSION")));
    for cert in extra_roots_pem(instance, config)? {
        let c = reqwest::Certificate::from_pem(&cert)
            .map_err(|e| invalid("ca_file", format!("not a PEM certificate: {e}")))?;
        b = b.add_root_certificate(c);
    }
    b.build().map_err(|e| {
        invalid(
            "ca_file",
            format!("the HTTPS client could not be built: {e}"),
        )
    })
}

/// The PEM blocks of `ca_file`, one certificate each (empty without `ca_file`).
pub fn extra_roots_pem(
    instance: &str,
    config: &AzureIotHubConfig,
) -> Result<Vec<Vec<u8>>, ProviderError> {
    let Some(path) = &config.ca_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path).map_err(|e| ProviderError::InvalidInput {
        instance: instance.to_owned(),
        field: "ca_file".into(),
        message: format!("{path} cannot be read: {e}"),
    })?;
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END CERTIFICATE-----") {
            out.push(std::mem::take(&mut cur).into_bytes());
        }
    }
    if out.is_empty() {
        return Err(ProviderError::InvalidInput {
            instance: instance.to_owned(),
            field: "ca_file".into(),
            message: format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        });
    }
    Ok(out)
}

/// One request to send.
struct Call<'a> {
    method: Method,
    path: String,
    if_match: Option<&'a str>,
    body: Option<Vec<u8>>,
    extra_timeout: Duration,
    /// What the request is about, for error messages ("device pump-1").
    what: String,
}

impl HubClient {
    /// A client of the hub named by `cs`.
    pub fn new(
        instance: &str,
        cs: &ServiceConnectionString,
        config: &AzureIotHubConfig,
    ) -> Result<Self, ProviderError> {
        let tokens = TokenCache::new(
            &cs.host_name,
            cs.key.expose(),
            &cs.key_name,
            Duration::from_secs(config.sas_token_ttl_secs),
        )
        .map_err(|e| ProviderError::InvalidInput {
            instance: instance.to_owned(),
            field: "connection_string".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            instance: instance.to_owned(),
            host: cs.host_name.clone(),
            base: format!("https://{}", cs.host_name),
            http: http_client(instance, config)?,
            tokens,
            max_retries: config.max_retries,
            max_retry_after: Duration::from_secs(config.max_retry_after_secs),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    /// The hub's host name (with a port when the connection string has one).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The SAS tokens this client signs.
    pub fn tokens(&self) -> &TokenCache {
        &self.tokens
    }

    /// `/devices/{id}` with the id percent-encoded as the SDKs do (nothing kept).
    fn device_path(prefix: &str, id: &str, suffix: &str) -> String {
        format!("/{prefix}/{}{suffix}", quote(id, b""))
    }

    /// `PUT /devices/{id}` without `If-Match`: creates a device.
    pub async fn create_device(&self, device: &Device) -> Result<Device, HubError> {
        let body = to_body(device);
        self.json(Call {
            method: Method::PUT,
            path: Self::device_path("devices", &device.device_id, ""),
            if_match: None,
            body: Some(body),
            extra_timeout: Duration::ZERO,
            what: format!("device {}", device.device_id),
        })
        .await
    }

    /// `PUT /devices/{id}` with `If-Match: "<etag>"`: updates a device.
    pub async fn update_device(&self, device: &Device, etag: &str) -> Result<Device, HubError> {
        let quoted = ensure_quoted(etag);
        self.json(Call {
            method: Method::PUT,
            path: Self::device_path("devices", &device.device_id, ""),
            if_match: Some(&quoted),
            body: Some(to_body(device)),
            extra_timeout: Duration::ZERO,
            what: format!("device {}", device.device_id),
        })
        .await
    }

    /// `GET /devices/{id}`.
    pub async fn get_device(&self, id: &str) -> Result<Device, HubError> {
        self.json(Call {
            method: Method::GET,
            path: Self::device_path("devices", id, ""),
            if_match: None,
            body: None,
            extra_timeout: Duration::ZERO,
            what: format!("device {id}"),
        })
        .await
    }

    /// `DELETE /devices/{id}` with `If-Match: "*"`.
    pub async fn delete_device(&self, id: &str) -> Result<(), HubError> {
        self.send(Call {
            method: Method::DELETE,
            path: Self::device_path("devices", id, ""),
            if_match: Some(MATCH_ANY),
            body: None,
            extra_timeout: Duration::ZERO,
            what: format!("device {id}"),
        })
        .await
        .map(|_| ())
    }

    /// `POST /devices`: a bulk registry operation on at most [`BULK_MAX`] devices. The hub
    /// answers 200 when all succeeded and 400 with the per-device errors otherwise; both are
    /// returned as the result.
    pub async fn bulk(
        &self,
        devices: &[ExportImportDevice],
    ) -> Result<BulkRegistryOperationResult, HubError> {
        if devices.len() > BULK_MAX {
            return Err(HubError::Provider(ProviderError::InvalidInput {
                instance: self.instance.clone(),
                field: "devices".into(),
                message: format!(
                    "{} devices in one bulk call; IoT Hub takes at most {BULK_MAX}",
                    devices.len()
                ),
            }));
        }
        let call = Call {
            method: Method::POST,
            path: "/devices".into(),
            if_match: None,
            body: Some(to_body(devices)),
            extra_timeout: Duration::ZERO,
            what: format!("bulk registry operation on {} devices", devices.len()),
        };
        match self.send(call).await {
            Ok(body) => parse(&self.instance, &body, "bulk registry result"),
            Err(e) => match e.failure().filter(|f| f.status == 400) {
                Some(f) => serde_json::from_str::<BulkRegistryOperationResult>(&f.message)
                    .map_err(|_| e.clone()),
                None => Err(e),
            },
        }
    }

    /// `GET /twins/{id}`.
    pub async fn get_twin(&self, id: &str) -> Result<Twin, HubError> {
        self.json(Call {
            method: Method::GET,
            path: Self::device_path("twins", id, ""),
            if_match: None,
            body: None,
            extra_timeout: Duration::ZERO,
            what: format!("twin of device {id}"),
        })
        .await
    }

    /// `PATCH /twins/{id}` with `If-Match: "*"`: merges tags and desired properties.
    pub async fn update_twin(&self, id: &str, patch: &Twin) -> Result<Twin, HubError> {
        self.json(Call {
            method: Method::PATCH,
            path: Self::device_path("twins", id, ""),
            if_match: Some(MATCH_ANY),
            body: Some(to_body(patch)),
            extra_timeout: Duration::ZERO,
            what: format!("twin of device {id}"),
        })
        .await
    }

    /// `POST /twins/{id}/methods`: invokes a direct method and returns the device's answer.
    /// The request may take the method's connect and response timeouts on top of the usual
    /// request timeout.
    pub async fn invoke_method(
        &self,
        id: &str,
        method: &CloudToDeviceMethod,
    ) -> Result<CloudToDeviceMethodResult, HubError> {
        self.json(Call {
            method: Method::POST,
            path: Self::device_path("twins", id, "/methods"),
            if_match: None,
            body: Some(to_body(method)),
            extra_timeout: Duration::from_secs(
                method.response_timeout_in_seconds + method.connect_timeout_in_seconds,
            ),
            what: format!("direct method {} on device {id}", method.method_name),
        })
        .await
    }

    /// `GET /statistics/service`: a cheap authenticated call that proves the connection
    /// string works.
    pub async fn service_statistics(&self) -> Result<Value, HubError> {
        self.json(Call {
            method: Method::GET,
            path: "/statistics/service".into(),
            if_match: None,
            body: None,
            extra_timeout: Duration::ZERO,
            what: "service statistics".into(),
        })
        .await
    }

    async fn json<T: DeserializeOwned>(&self, call: Call<'_>) -> Result<T, HubError> {
        let what = call.what.clone();
        let body = self.send(call).await?;
        parse(&self.instance, &body, &what)
    }

    /// Sends `call`, retrying 429 and 503 after the announced delay. Returns the body of a
    /// 2xx answer.
    async fn send(&self, call: Call<'_>) -> Result<Vec<u8>, HubError> {
        let url = format!("{}{}?api-version={API_VERSION}", self.base, call.path);
        let mut attempt = 0u32;
        loop {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
            let auth = HeaderValue::from_str(&self.tokens.get()).map_err(|_| {
                HubError::Provider(ProviderError::InvalidInput {
                    instance: self.instance.clone(),
                    field: "connection_string".into(),
                    message: "the SharedAccessKeyName holds characters an HTTP header cannot carry"
                        .into(),
                })
            })?;
            headers.insert(AUTHORIZATION, auth);
            if let Some(m) = call.if_match {
                if let Ok(v) = HeaderValue::from_str(m) {
                    headers.insert(IF_MATCH, v);
                }
            }
            let mut req = self
                .http
                .request(call.method.clone(), &url)
                .headers(headers)
                .timeout(self.request_timeout + call.extra_timeout);
            if let Some(body) = &call.body {
                req = req.header(CONTENT_TYPE, JSON_UTF8).body(body.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    return Err(HubError::Provider(ProviderError::Transient {
                        instance: self.instance.clone(),
                        message: format!(
                            "{} {} for {}: {}",
                            call.method,
                            call.path,
                            call.what,
                            describe_reqwest(&e)
                        ),
                    }))
                }
            };
            let status = resp.status();
            let retry_after = retry_after(resp.headers());
            let code_header = resp
                .headers()
                .get("iothub-errorcode")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.bytes().await.map_err(|e| {
                HubError::Provider(ProviderError::Transient {
                    instance: self.instance.clone(),
                    message: format!(
                        "reading the answer for {}: {}",
                        call.what,
                        describe_reqwest(&e)
                    ),
                })
            })?;
            if status.is_success() {
                return Ok(body.to_vec());
            }
            let text = String::from_utf8_lossy(&body).into_owned();
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                let wait = retry_after
                    .unwrap_or_else(|| DEFAULT_BACKOFF.saturating_mul(1 << attempt.min(6)));
                if attempt < self.max_retries && wait <= self.max_retry_after {
                    tracing::debug!(
                        provider = %self.instance, status = status.as_u16(), ?wait, attempt,
                        what = %call.what, "IoT Hub asked to retry later"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    continue;
                }
                let message = format!(
                    "{} {} for {}: IoT Hub answered {} {} times{}",
                    call.method,
                    call.path,
                    call.what,
                    status.as_u16(),
                    attempt + 1,
                    if wait > self.max_retry_after {
                        format!(" and asked for {wait:?}, above max_retry_after_secs")
                    } else {
                        String::new()
                    }
                );
                return Err(HubError::Provider(
                    if status == StatusCode::TOO_MANY_REQUESTS {
                        ProviderError::Throttled {
                        instance: self.instance.clone(),
                        retry_after: wait,
                        message: format!("{message}: the hub's registry operation quota is used up (about 100 per minute per S1 unit); retry later or add units"),
                    }
                    } else {
                        ProviderError::Transient {
                            instance: self.instance.clone(),
                            message: format!("{message}: the hub is unavailable; retry later"),
                        }
                    },
                ));
            }
            let (code, message) = hub_error(&text);
            return Err(HubError::Hub(HubFailure {
                status: status.as_u16(),
                code: code.or(code_header),
                message: if message.is_empty() { text } else { message },
            })
            .with_what(call.what));
        }
    }

    /// Turns an error into a [`ProviderError`] about `what`.
    pub fn classify(&self, err: HubError) -> ProviderError {
        classify(&self.instance, err)
    }
}

/// A failed call: either the hub's answer (for the caller to interpret, e.g. 404103) or an
/// already classified error.
#[derive(Clone, Debug, PartialEq)]
pub enum HubError {
    /// The hub answered with a non-success status (429/503 after retries excluded).
    Hub(HubFailure),
    /// The hub answered with a failure about `what`.
    About(HubFailure, String),
    /// Classified already (network failure, throttling after retries, bad answer).
    Provider(ProviderError),
}

impl HubError {
    fn with_what(self, what: String) -> Self {
        match self {
            Self::Hub(f) => Self::About(f, what),
            other => other,
        }
    }

    /// The hub's answer, if the hub answered.
    pub fn failure(&self) -> Option<&HubFailure> {
        match self {
            Self::Hub(f) | Self::About(f, _) => Some(f),
            Self::Provider(_) => None,
        }
    }
}

/// Classifies a failed call for the gateway: 400 invalid input, 401/403 unauthorized,
/// 404 not found, 409/412 conflict, 429 throttled, 5xx transient.
pub fn classify(instance: &str, err: HubError) -> ProviderError {
    let (f, what) = match err {
        HubError::Provider(p) => return p,
        HubError::Hub(f) => (f, "the request".to_owned()),
        HubError::About(f, what) => (f, what),
    };
    let instance = instance.to_owned();
    let code = f
        .code
        .as_deref()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default();
    let detail = format!("{what}: IoT Hub answered {}{code}: {}", f.status, f.message);
    match f.status {
        400 | 413 => ProviderError::InvalidInput {
            instance,
            field: what,
            message: detail,
        },
        401 | 403 => ProviderError::Unauthorized {
            instance,
            message: format!("{detail}; check that the connection string's shared access policy has registry write and service connect permissions and that its key is current"),
        },
        404 => ProviderError::NotFound {
            instance,
            what: detail,
        },
        409 | 412 => ProviderError::Conflict {
            instance,
            message: detail,
        },
        429 => ProviderError::Throttled {
            instance,
            retry_after: DEFAULT_BACKOFF,
            message: detail,
        },
        _ => ProviderError::Transient {
            instance,
            message: detail,
        },
    }
}

fn to_body<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    // Serializing these plain structs and JSON values cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(instance: &str, body: &[u8], what: &str) -> Result<T, HubError> {
    // DELETE and some PATCH answers are empty; read them as JSON null.
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"null"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        HubError::Provider(ProviderError::Transient {
            instance: instance.to_owned(),
            message: format!("the hub's answer for {what} is not the documented JSON: {e}"),
        })
    })
}

/// `"etag"` as `If-Match` wants it (quoted once).
pub fn ensure_quoted(etag: &str) -> String {
    if etag.len() > 1 && etag.starts_with('"') && etag.ends_with('"') {
        etag.to_owned()
    } else {
        format!("\"{etag}\"")
    }
}

/// The delay a 429/503 announces: `Retry-After` in seconds or as an HTTP date, or
/// `x-ms-retry-after-ms`.
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("x-ms-retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    let v = h.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// IoT Hub's error code and message from an error body. The hub nests them differently
/// per API: `{"Message":"ErrorCode:DeviceNotFound;...","ExceptionMessage":"..."}`,
/// `{"errorCode":404103,"message":"..."}`, or a JSON string inside `Message`.
pub fn hub_error(body: &str) -> (Option<String>, String) {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return (None, body.trim().chars().take(500).collect());
    };
    let mut code = None;
    let mut message = String::new();
    walk(&v, &mut code, &mut message, 0);
    (code, message)
}

fn walk(v: &Value, code: &mut Option<String>, message: &mut String, depth: u8) {
    if depth > 4 {
        return;
    }
    let Value::Object(m) = v else { return };
    for (k, val) in m {
        match (k.to_ascii_lowercase().as_str(), val) {
            ("errorcode", Value::Number(n)) => *code = Some(n.to_string()),
            ("errorcode", Value::String(s)) if !s.is_empty() => *code = Some(s.clone()),
            ("message", Value::String(s)) => {
                if let Ok(inner @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                    walk(&inner, code, message, depth + 1);
                } else {
                    if let Some(rest) = s.strip_prefix("ErrorCode:") {
                        if let Some((c, m)) = rest.split_once(';') {
                            code.get_or_insert_with(|| c.to_owned());
                            *message = m.to_owned();
                            continue;
                        }
                    }
                    if message.is_empty() {
                        *message = s.clone();
                    }
                }
            }
            _ => {}
        }
    }
}

fn describe_reqwest(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

// --- the JSON shapes of the REST API (api-version 2021-04-12) ----------------------

/// The REST API version iotgw speaks.
pub const API_VERSION: &str = "2021-04-12";

/// A device identity (`/devices/{id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    /// The device id.
    pub device_id: String,
    /// Set by the hub; differs between two devices of the same id created one after the other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// The identity's etag (for `If-Match`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `Connected` or `Disconnected` (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why the status is what it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// When the connection state last changed (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    /// Last activity (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// Queued cloud-to-device messages (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<i64>,
    /// How the device authenticates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Edge or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// How a device authenticates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Authentication {
    /// Symmetric keys (type `sas`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    /// X.509 thumbprints (type `selfSigned`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<Value>,
    /// `sas`, `selfSigned`, `certificateAuthority` or `none`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Authentication {
    /// Symmetric-key authentication with these keys.
    pub fn sas(primary: &str, secondary: &str) -> Self {
        Self {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(primary.to_owned()),
                secondary_key: Some(secondary.to_owned()),
            }),
            x509_thumbprint: None,
            kind: Some("sas".into()),
        }
    }

    /// The primary key of a symmetric-key device.
    pub fn primary_key(&self) -> Option<&str> {
        if self
            .kind
            .as_deref()
            .is_some_and(|k| !k.eq_ignore_ascii_case("sas"))
        {
            return None;
        }
        self.symmetric_key.as_ref()?.primary_key.as_deref()
    }
}

/// A device's symmetric keys (base64).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SymmetricKey {
    /// Primary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// Device capabilities.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Capabilities {
    /// An IoT Edge device.
    pub iot_edge: bool,
}

/// One device of a bulk registry operation (`POST /devices`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExportImportDevice {
    /// The device id.
    pub id: String,
    /// `create`, `update`, `updateIfMatchETag`, `delete`, `deleteIfMatchETag`, ...
    pub import_mode: String,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// How the device authenticates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// The answer to a bulk registry operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BulkRegistryOperationResult {
    /// Whether every device succeeded.
    pub is_successful: bool,
    /// The devices that failed.
    pub errors: Vec<DeviceRegistryOperationError>,
    /// Warnings.
    pub warnings: Vec<Value>,
}

/// One failed device of a bulk operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceRegistryOperationError {
    /// The device.
    pub device_id: String,
    /// e.g. `DeviceAlreadyExists`.
    pub error_code: Value,
    /// The hub's explanation.
    pub error_status: String,
}

/// A device twin (`/twins/{id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Twin {
    /// The device id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The twin's etag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Twin version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Tags (solution back end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// Desired and reported properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `Connected` or `Disconnected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// Last activity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
}

/// A twin's properties.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TwinProperties {
    /// Written by the back end, read by the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    /// Written by the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported: Option<Map<String, Value>>,
}

/// A direct method call (`POST /twins/{id}/methods`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMethod {
    /// The method's name.
    pub method_name: String,
    /// Its JSON payload.
    pub payload: Value,
    /// Seconds the hub waits for the device's answer (5..=300).
    pub response_timeout_in_seconds: u64,
    /// Seconds the hub waits for an offline device to connect (0..=300).
    pub connect_timeout_in_seconds: u64,
}

/// The device's answer to a direct method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloudToDeviceMethodResult {
    /// The status the device answered with.
    pub status: i64,
    /// The payload the device answered with.
    pub payload: Value,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_sas_device_serializes_like_the_sdk_and_keys_stay_out_of_debug() {
        let d = Device {
            device_id: "d1".into(),
            status: Some("enabled".into()),
            authentication: Some(Authentication::sas("pk", "sk")),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        };
        assert_eq!(
            serde_json::to_value(&d).expect("json"),
            json!({"deviceId": "d1", "status": "enabled",
                   "authentication": {"symmetricKey": {"primaryKey": "pk", "secondaryKey": "sk"}, "type": "sas"},
                   "capabilities": {"iotEdge": false}})
        );
        assert!(!format!("{d:?}").contains("pk"));
    }

    #[test]
    fn error_bodies_of_every_documented_shape_yield_code_and_message() {
        let (c, m) = hub_error(
            r#"{"Message":"ErrorCode:DeviceNotFound;Device d1 not registered","ExceptionMessage":"Tracking ID:x"}"#,
        );
        assert_eq!(c.as_deref(), Some("DeviceNotFound"));
        assert_eq!(m, "Device d1 not registered");
        let (c, m) = hub_error(
            r#"{"errorCode":404103,"trackingId":"t","message":"Timed out waiting for device to connect.","info":{"timeout":"00:00:00"}}"#,
        );
        assert_eq!(c.as_deref(), Some("404103"));
        assert_eq!(m, "Timed out waiting for device to connect.");
        let nested = serde_json::json!({"Message": serde_json::json!({"errorCode": 404103, "message": "offline"}).to_string(), "ExceptionMessage": ""}).to_string();
        assert_eq!(
            hub_error(&nested),
            (Some("404103".into()), "offline".into())
        );
        assert_eq!(hub_error("plain text").1, "plain text");
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("x-ms-retry-after-ms", HeaderValue::from_static("150"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut d = HeaderMap::new();
        d.insert(
            reqwest::header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&d),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn failures_are_classified_for_the_gateway() {
        let f = |status, code: Option<&str>| {
            HubError::About(
                HubFailure {
                    status,
                    code: code.map(str::to_owned),
                    message: "m".into(),
                },
                "device d1".into(),
            )
        };
        assert_eq!(classify("hub", f(400, None)).class(), "invalid_input");
        assert_eq!(classify("hub", f(401, None)).class(), "unauthorized");
        assert_eq!(
            classify("hub", f(404, Some("DeviceNotFound"))).class(),
            "not_found"
        );
        assert_eq!(classify("hub", f(409, Some("409001"))).class(), "conflict");
        assert_eq!(classify("hub", f(412, None)).class(), "conflict");
        assert_eq!(classify("hub", f(500, None)).class(), "transient");
        let e = classify("hub", f(404, Some("DeviceNotFound"))).to_string();
        assert!(
            e.contains("device d1") && e.contains("DeviceNotFound"),
            "{e}"
        );
        assert!(HubFailure {
            status: 404,
            code: Some("404103".into()),
            message: String::new()
        }
        .device_not_online());
        assert_eq!(ensure_quoted("AAAA"), "\"AAAA\"");
        assert_eq!(ensure_quoted("\"AAAA\""), "\"AAAA\"");
    }
}
