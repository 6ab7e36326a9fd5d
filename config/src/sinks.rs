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
    /// Dynamics 365 Field Service: alerts and the other change-feed entities written to
    /// Dataverse's Web API as Field Service records (OAuth 2.0 client credentials).
    Dataverse(DataverseSinkConfig),
}

/// Standard output sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]), every
    /// change of each; when not given, the new alerts only (as before the change feed; see
    /// [`SinkConfig::alert_changes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
}

impl Default for StdoutSinkConfig {
    fn default() -> Self {
        Self {
            entities: None,
            coalesce_connection_ms: default_coalesce_connection(),
        }
    }
}

/// File sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to append JSON lines to (created with its directory).
    pub path: String,
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]), every
    /// change of each; when not given, the new alerts only (as before the change feed; see
    /// [`SinkConfig::alert_changes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
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
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]), every
    /// change of each; when not given, the new alerts only (as before the change feed; see
    /// [`SinkConfig::alert_changes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
}

/// Dataverse sink: the change feed written to Field Service's tables through the Web API
/// (v9.2), one record per item: a new alert creates its `msdyn_iotalert` (and a later change
/// of it updates the columns iotgw owns), devices, commands and categories are upserted by
/// their ids, registration history rows are created once; up to `batch_size` items travel
/// in one `$batch` change set. Authenticated with the OAuth 2.0 client-credentials flow of
/// the Microsoft identity platform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataverseSinkConfig {
    /// The environment's URL, e.g. `https://contoso.crm.dynamics.com` (without
    /// `/api/data/...`).
    pub url: String,
    /// The Microsoft Entra tenant (directory) id or domain of the app registration.
    pub tenant_id: String,
    /// The app registration's application (client) id; Dataverse needs an application user
    /// for it with a security role that may create IoT alerts.
    pub client_id: String,
    /// The app registration's client secret; set it via
    /// `IOTGW_SINKS__<NAME>__CLIENT_SECRET`. Shown as `<redacted>` everywhere. Give this or
    /// `client_certificate`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    /// Instead of `client_secret`: a PEM file with a certificate uploaded to the app
    /// registration (its first `CERTIFICATE` block) and its unencrypted RSA private key
    /// (`PRIVATE KEY` or `RSA PRIVATE KEY`, unless `client_certificate_key` names another
    /// file). Each token request then carries a fresh client assertion signed with the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    /// The PEM file of `client_certificate`'s private key, when it is not in the
    /// certificate's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_key: Option<String>,
    /// Token endpoint; default
    /// `https://login.microsoftonline.com/{tenant_id}/oauth2/v2.0/token` (give another for
    /// a sovereign cloud, e.g. `https://login.microsoftonline.us/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// OAuth scope; default `{url}/.default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// How an alert points at its device (`msdyn_Device@odata.bind`): `id` (default) binds
    /// the gateway's device record id, `/msdyn_iotdevices(<msdyn_iotdeviceid>)`;
    /// `device_id` binds `/msdyn_iotdevices(msdyn_deviceid='<device id>')`, which needs an
    /// alternate key on `msdyn_deviceid` defined in the environment (Field Service ships
    /// none); `none` binds no device and only fills the `msdyn_deviceid` text column.
    #[serde(default)]
    pub device_binding: DataverseDeviceBinding,
    /// Per-request timeout in milliseconds (token and Web API requests).
    #[serde(default = "default_dataverse_timeout")]
    pub timeout_ms: u64,
    /// First retry delay in milliseconds (doubles per attempt; never below Dataverse's
    /// `Retry-After`).
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// Longest retry delay in milliseconds.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]), every
    /// change of each; when not given, the new alerts only (as before the change feed; see
    /// [`SinkConfig::alert_changes`]). `msdyn_iotdevice`,
    /// `msdyn_iotdevicecommand` and `msdyn_iotdevicecategory` records are upserted,
    /// `msdyn_iotdeviceregistrationhistory` rows created once. A lookup to another entity is
    /// bound only when this sink writes that entity too: a device's `msdyn_Category` with
    /// `msdyn_iotdevicecategory`, a command's `msdyn_ParentAlert` with `msdyn_iotalert`, an
    /// alert's `msdyn_LastCommandSent` with `msdyn_iotdevicecommand`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities: Option<Vec<String>>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
    /// The most outbox items sent in one `POST {url}/api/data/v9.2/$batch` (one change set:
    /// all of them are written or none), 1..=1000 (Dataverse takes at most 1000 requests per
    /// batch); default 50. 1 sends every item as its own request.
    #[serde(default = "default_dataverse_batch_size")]
    pub batch_size: u32,
    /// The `msdyn_iotproviderinstance` record (its GUID in Dataverse) of each provider
    /// instance, by the instance's name in this config, e.g.
    /// `{ plant = "00000000-0000-0000-0000-000000000001" }`: a device of a named instance is
    /// bound to it (`msdyn_IoTProviderInstance@odata.bind`); a device of an instance not
    /// named here is written without that lookup. Default: none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub provider_instances: std::collections::BTreeMap<String, String>,
}

/// How the Dataverse sink binds an alert to its `msdyn_iotdevice`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataverseDeviceBinding {
    /// `/msdyn_iotdevices(<the gateway's msdyn_iotdeviceid>)`.
    #[default]
    Id,
    /// `/msdyn_iotdevices(msdyn_deviceid='<device id>')` (an alternate key the environment
    /// must define).
    DeviceId,
    /// No `msdyn_Device` lookup; only the `msdyn_deviceid` text.
    None,
}

/// The entities a sink may subscribe to (`sinks.<name>.entities`): Field Service's logical
/// names.
pub const CHANGE_FEED_ENTITIES: [&str; 5] = [
    "msdyn_iotalert",
    "msdyn_iotdevice",
    "msdyn_iotdevicecommand",
    "msdyn_iotdeviceregistrationhistory",
    "msdyn_iotdevicecategory",
];

/// `entities` when not given: the new alerts, as before the change feed.
pub fn default_entities() -> Vec<String> {
    vec!["msdyn_iotalert".to_owned()]
}

/// `coalesce_connection_ms` when not given.
pub const fn default_coalesce_connection() -> u64 {
    5_000
}

impl SinkConfig {
    /// The entities the sink subscribes to: as given, else [`default_entities`].
    pub fn entities(&self) -> Vec<String> {
        self.given_entities()
            .map_or_else(default_entities, <[String]>::to_vec)
    }

    /// `entities` as written in the config, if it was.
    pub fn given_entities(&self) -> Option<&[String]> {
        match self {
            Self::Stdout(c) => c.entities.as_deref(),
            Self::File(c) => c.entities.as_deref(),
            Self::Webhook(c) => c.entities.as_deref(),
            Self::Dataverse(c) => c.entities.as_deref(),
        }
    }

    /// Whether the sink takes an alert's later changes too (status, last command sent, case
    /// or work order, closed as a child): only when its `entities` are given and list
    /// `msdyn_iotalert`. Without `entities` it takes the new alerts alone, exactly what every
    /// sink took before the change feed.
    pub fn alert_changes(&self) -> bool {
        self.given_entities()
            .is_some_and(|e| e.iter().any(|e| e == "msdyn_iotalert"))
    }

    /// The sink's connection-state coalescing interval, in milliseconds.
    pub fn coalesce_connection_ms(&self) -> u64 {
        match self {
            Self::Stdout(c) => c.coalesce_connection_ms,
            Self::File(c) => c.coalesce_connection_ms,
            Self::Webhook(c) => c.coalesce_connection_ms,
            Self::Dataverse(c) => c.coalesce_connection_ms,
        }
    }
}

const fn default_dataverse_timeout() -> u64 {
    10_000
}

/// `batch_size` of a Dataverse sink when not given.
pub const fn default_dataverse_batch_size() -> u32 {
    50
}

/// Dataverse's limit of requests in one `$batch`.
pub const MAX_DATAVERSE_BATCH_SIZE: u32 = 1000;

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
    validate_entities(base, s, out);
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
        SinkConfig::Dataverse(d) => validate_dataverse(base, d, out),
    }
}

/// `entities` names only change-feed entities, each once; the coalescing interval is at
/// most an hour.
fn validate_entities(base: &str, s: &SinkConfig, out: &mut Vec<Problem>) {
    let valid = CHANGE_FEED_ENTITIES.join(", ");
    let entities = s.entities();
    for (i, e) in entities.iter().enumerate() {
        if !CHANGE_FEED_ENTITIES.contains(&e.as_str()) {
            out.push(Problem::new(
                format!("{base}.entities[{i}]"),
                format!("`{e}` is not a change-feed entity"),
                format!("use any of: {valid}"),
            ));
        } else if entities[..i].contains(e) {
            out.push(Problem::new(
                format!("{base}.entities[{i}]"),
                format!("`{e}` is listed twice"),
                "list each entity once",
            ));
        }
    }
    if s.coalesce_connection_ms() > 3_600_000 {
        out.push(Problem::new(
            format!("{base}.coalesce_connection_ms"),
            format!("{} is above an hour", s.coalesce_connection_ms()),
            "use milliseconds up to 3600000; 5000 (default) is five seconds",
        ));
    }
}

/// `http://` is accepted only on loopback (a local stand-in); Dataverse and the identity
/// platform answer on `https://` only.
fn web_url_problem(url: &str) -> Option<&'static str> {
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        let loopback = ["127.0.0.1", "localhost", "[::1]"].iter().any(|h| {
            r.strip_prefix(h)
                .is_some_and(|after| after.is_empty() || after.starts_with([':', '/']))
        });
        if !loopback {
            return Some("is http:// on a host other than loopback (only https:// is accepted)");
        }
        r
    } else {
        return Some("is not an https:// URL");
    };
    if rest.split('/').next().unwrap_or_default().is_empty() {
        return Some("has no host");
    }
    if url.contains(char::is_whitespace) || url.contains(['?', '#']) {
        return Some("has spaces, a query or a fragment");
    }
    None
}

fn validate_dataverse(base: &str, d: &DataverseSinkConfig, out: &mut Vec<Problem>) {
    if let Some(why) = web_url_problem(&d.url) {
        out.push(Problem::new(
            format!("{base}.url"),
            format!("`{}` {why}", d.url),
            "give the environment's URL, e.g. https://contoso.crm.dynamics.com",
        ));
    } else if d.url.contains("/api/") {
        out.push(Problem::new(
            format!("{base}.url"),
            format!("`{}` names an API path", d.url),
            "give the environment's root only, e.g. https://contoso.crm.dynamics.com (the sink adds /api/data/v9.2)",
        ));
    }
    for (key, value, fix) in [
        (
            "tenant_id",
            &d.tenant_id,
            "give the Microsoft Entra tenant id (a GUID) or domain, e.g. contoso.onmicrosoft.com",
        ),
        (
            "client_id",
            &d.client_id,
            "give the app registration's application (client) id",
        ),
    ] {
        if value.trim().is_empty() || value.contains(['/', ' ', '?', '#']) {
            out.push(Problem::new(
                format!("{base}.{key}"),
                format!("`{value}` is empty or has a space, `/`, `?` or `#`"),
                fix,
            ));
        }
    }
    validate_dataverse_credential(base, d, out);
    if let Some(url) = &d.token_url {
        if let Some(why) = web_url_problem(url) {
            out.push(Problem::new(
                format!("{base}.token_url"),
                format!("`{url}` {why}"),
                "give the token endpoint, e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token, or leave it out",
            ));
        }
    }
    if d.scope.as_deref().is_some_and(|s| s.trim().is_empty()) {
        out.push(Problem::new(
            format!("{base}.scope"),
            "empty scope",
            "leave it out for {url}/.default, or give e.g. https://contoso.crm.dynamics.com/.default",
        ));
    }
    if d.backoff_min_ms == 0 || d.backoff_min_ms > d.backoff_max_ms {
        out.push(Problem::new(
            format!("{base}.backoff_min_ms"),
            "backoff_min_ms must be above 0 and not above backoff_max_ms",
            "e.g. backoff_min_ms = 200, backoff_max_ms = 30000",
        ));
    }
    if d.timeout_ms == 0 {
        out.push(Problem::new(
            format!("{base}.timeout_ms"),
            "a zero timeout fails every request",
            "use e.g. 10000",
        ));
    }
    if !(1..=MAX_DATAVERSE_BATCH_SIZE).contains(&d.batch_size) {
        out.push(Problem::new(
            format!("{base}.batch_size"),
            format!("{} is not in 1..={MAX_DATAVERSE_BATCH_SIZE}", d.batch_size),
            "use 1 (no $batch) up to 1000 (Dataverse's limit per $batch); 50 is the default",
        ));
    }
    for (name, guid) in &d.provider_instances {
        if name.trim().is_empty() {
            out.push(Problem::new(
                format!("{base}.provider_instances"),
                "an empty provider instance name",
                "name an instance of [providers.*], e.g. plant = \"<its msdyn_iotproviderinstanceid>\"",
            ));
        } else if !is_guid(guid) {
            out.push(Problem::new(
                format!("{base}.provider_instances.{name}"),
                format!("`{guid}` is not a GUID"),
                "give the msdyn_iotproviderinstanceid of the instance's record in Dataverse, e.g. 00000000-0000-0000-0000-000000000001",
            ));
        }
    }
}

/// Exactly one of `client_secret` and `client_certificate`; the certificate's file (and
/// its key's) readable and holding PEM blocks of a certificate and an unencrypted key. (The
/// sink parses them when it is built: the DER, the key's algorithm, that the key is the
/// certificate's.)
fn validate_dataverse_credential(base: &str, d: &DataverseSinkConfig, out: &mut Vec<Problem>) {
    let key = |k: &str| format!("{base}.{k}");
    match (&d.client_secret, &d.client_certificate) {
        (Some(_), Some(_)) => {
            out.push(Problem::new(
                key("client_certificate"),
                "both client_secret and client_certificate are given",
                "give one: remove client_secret (or unset IOTGW_SINKS__<NAME>__CLIENT_SECRET) to authenticate with the certificate, or remove client_certificate to use the secret",
            ));
            return;
        }
        (None, None) => {
            out.push(Problem::new(
                key("client_secret"),
                "no client credential: neither client_secret nor client_certificate is given",
                "set the app registration's client secret, e.g. via IOTGW_SINKS__<NAME>__CLIENT_SECRET, or client_certificate = \"<PEM file with a certificate of the app registration and its private key>\"",
            ));
        }
        (Some(secret), None) => {
            if secret.expose().trim().is_empty() {
                out.push(Problem::new(
                    key("client_secret"),
                    "empty client secret",
                    "set the app registration's client secret, e.g. via IOTGW_SINKS__<NAME>__CLIENT_SECRET",
                ));
            }
        }
        (None, Some(_)) => {}
    }
    if d.client_certificate.is_none() {
        if d.client_certificate_key.is_some() {
            out.push(Problem::new(
                key("client_certificate_key"),
                "client_certificate_key is given without client_certificate",
                "give client_certificate = \"<PEM file of the certificate>\" too, or remove client_certificate_key",
            ));
        }
        return;
    }
    // Read as text (a PEM file); only the BEGIN lines are looked at here.
    let read = |k: &str, path: &str| match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) => Err(Problem::new(
            key(k),
            format!("`{path}` cannot be read: {e}"),
            "give the path of a readable PEM file",
        )),
    };
    let cert_path = d.client_certificate.as_deref().unwrap_or_default();
    let cert_pem = match read("client_certificate", cert_path) {
        Ok(pem) => pem,
        Err(p) => return out.push(p),
    };
    if !cert_pem.contains("-----BEGIN CERTIFICATE-----") {
        out.push(Problem::new(
            key("client_certificate"),
            format!("`{cert_path}` holds no -----BEGIN CERTIFICATE----- block"),
            "give a PEM file with the certificate uploaded to the app registration (convert a .pfx with `openssl pkcs12 -in app.pfx -nodes -out app.pem`)",
        ));
    }
    let (key_name, key_path, key_pem) = match d.client_certificate_key.as_deref() {
        Some(p) => match read("client_certificate_key", p) {
            Ok(pem) => ("client_certificate_key", p, pem),
            Err(p) => return out.push(p),
        },
        None => ("client_certificate", cert_path, cert_pem),
    };
    if key_pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        out.push(Problem::new(
            key(key_name),
            format!("the private key in `{key_path}` is encrypted"),
            "decrypt it, e.g. `openssl pkey -in key.pem -out plain.pem`, and keep the file readable by the gateway only",
        ));
    } else if !key_pem.contains("-----BEGIN PRIVATE KEY-----")
        && !key_pem.contains("-----BEGIN RSA PRIVATE KEY-----")
    {
        let fix = if d.client_certificate_key.is_some() {
            "give the PEM file of the certificate's RSA private key (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)"
        } else {
            "append the certificate's RSA private key (-----BEGIN PRIVATE KEY-----) to the file, or name its PEM file in client_certificate_key"
        };
        out.push(Problem::new(
            key(key_name),
            format!("`{key_path}` holds no unencrypted RSA private key"),
            fix,
        ));
    }
}

/// `8-4-4-4-12` hexadecimal digits (a Dataverse record id, without braces).
fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl DataverseSinkConfig {
    /// The token endpoint: `token_url`, else the global Microsoft identity platform's for
    /// `tenant_id`.
    pub fn token_endpoint(&self) -> String {
        self.token_url.clone().unwrap_or_else(|| {
            format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                self.tenant_id.trim()
            )
        })
    }

    /// The OAuth scope: `scope`, else `{url}/.default`.
    pub fn oauth_scope(&self) -> String {
        self.scope
            .clone()
            .unwrap_or_else(|| format!("{}/.default", self.url.trim_end_matches('/')))
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
            entities: None,
            coalesce_connection_ms: default_coalesce_connection(),
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

    fn dataverse() -> DataverseSinkConfig {
        DataverseSinkConfig {
            url: "https://contoso.crm.dynamics.com".into(),
            tenant_id: "contoso.onmicrosoft.com".into(),
            client_id: "11111111-1111-1111-1111-111111111111".into(),
            client_secret: Some(Secret::new("hunter2-secret")),
            client_certificate: None,
            client_certificate_key: None,
            token_url: None,
            scope: None,
            device_binding: DataverseDeviceBinding::Id,
            timeout_ms: 10_000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            entities: None,
            coalesce_connection_ms: default_coalesce_connection(),
            batch_size: default_dataverse_batch_size(),
            provider_instances: std::collections::BTreeMap::new(),
        }
    }

    fn problems(c: &DataverseSinkConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        validate("sinks.d365", &SinkConfig::Dataverse(c.clone()), &mut out);
        out
    }

    #[test]
    fn entities_default_to_alerts_and_unknown_ones_are_refused_with_the_valid_list() {
        let c: SinkConfig = toml::from_str("kind = \"stdout\"\n").expect("stdout");
        assert_eq!(c.entities(), ["msdyn_iotalert"]);
        assert!(
            !c.alert_changes(),
            "not given: the new alerts alone, as before"
        );
        let c: SinkConfig =
            toml::from_str("kind = \"stdout\"\nentities = [\"msdyn_iotalert\"]\n").expect("stdout");
        assert!(c.alert_changes(), "given: every change of an alert");
        assert_eq!(c.coalesce_connection_ms(), 5_000);
        let c: SinkConfig = toml::from_str(
            "kind = \"file\"\npath = \"x\"\nentities = [\"msdyn_iotdevice\", \"msdyn_iotdevicez\", \"msdyn_iotdevice\"]\n",
        )
        .expect("file");
        let mut out = Vec::new();
        validate("sinks.f", &c, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].path, "sinks.f.entities[1]");
        assert!(
            out[0].fix.contains("msdyn_iotalert, msdyn_iotdevice"),
            "{out:?}"
        );
        assert_eq!(out[1].path, "sinks.f.entities[2]");
        let mut ok = SinkConfig::Dataverse(dataverse());
        if let SinkConfig::Dataverse(d) = &mut ok {
            d.entities = Some(
                CHANGE_FEED_ENTITIES
                    .iter()
                    .map(|e| (*e).to_owned())
                    .collect(),
            );
        }
        let mut out = Vec::new();
        validate("sinks.d", &ok, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_dataverse_client_secret_shows_redacted_wherever_the_config_is_printed() {
        let c = SinkConfig::Dataverse(dataverse());
        for text in [
            toml::to_string(&c).expect("config show serializes"),
            format!("{c:?}"),
        ] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }

    #[test]
    fn dataverse_token_endpoint_and_scope_default_from_the_tenant_and_the_url() {
        let mut c = dataverse();
        c.url = "https://contoso.crm.dynamics.com/".into();
        assert_eq!(
            c.token_endpoint(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(c.oauth_scope(), "https://contoso.crm.dynamics.com/.default");
        c.token_url = Some("https://login.microsoftonline.us/t/oauth2/v2.0/token".into());
        c.scope = Some("https://contoso.crm.appsplatform.us/.default".into());
        assert_eq!(
            c.token_endpoint(),
            "https://login.microsoftonline.us/t/oauth2/v2.0/token"
        );
        assert_eq!(
            c.oauth_scope(),
            "https://contoso.crm.appsplatform.us/.default"
        );
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
    }

    #[test]
    fn dataverse_problems_name_the_key_and_the_fix() {
        type Breaks = Box<dyn Fn(&mut DataverseSinkConfig)>;
        let cases: Vec<(&str, Breaks)> = vec![
            (
                "url",
                Box::new(|c| c.url = "http://contoso.crm.dynamics.com".into()),
            ),
            (
                "url",
                Box::new(|c| c.url = "contoso.crm.dynamics.com".into()),
            ),
            (
                "url",
                Box::new(|c| c.url = "https://contoso.crm.dynamics.com/api/data/v9.2".into()),
            ),
            ("tenant_id", Box::new(|c| c.tenant_id = " ".into())),
            ("client_id", Box::new(|c| c.client_id = "a b".into())),
            (
                "client_secret",
                Box::new(|c| c.client_secret = Some(Secret::new(""))),
            ),
            (
                "token_url",
                Box::new(|c| c.token_url = Some("ftp://login.example/token".into())),
            ),
            ("scope", Box::new(|c| c.scope = Some(String::new()))),
            ("backoff_min_ms", Box::new(|c| c.backoff_min_ms = 0)),
            ("timeout_ms", Box::new(|c| c.timeout_ms = 0)),
            ("batch_size", Box::new(|c| c.batch_size = 0)),
            ("batch_size", Box::new(|c| c.batch_size = 1001)),
            (
                "provider_instances.plant",
                Box::new(|c| {
                    c.provider_instances
                        .insert("plant".into(), "{0000-not-a-guid}".into());
                }),
            ),
        ];
        for (key, break_it) in cases {
            let mut c = dataverse();
            break_it(&mut c);
            let found = problems(&c);
            assert_eq!(found.len(), 1, "{key}: {found:?}");
            assert_eq!(found[0].path, format!("sinks.d365.{key}"), "{found:?}");
            assert!(!found[0].fix.is_empty(), "{found:?}");
        }
        // A local stand-in on loopback may speak plain HTTP.
        let mut c = dataverse();
        c.url = "http://127.0.0.1:8080".into();
        c.token_url = Some("http://localhost:9/token".into());
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        c.url = "http://127.0.0.1.example.com".into();
        assert_eq!(problems(&c).len(), 1);
    }

    /// A PEM file in `dir` with `blocks` (only their BEGIN/END lines: what validation reads).
    fn pem_file(dir: &tempfile::TempDir, name: &str, blocks: &[&str]) -> String {
        let path = dir.path().join(name);
        let text: String = blocks
            .iter()
            .map(|b| format!("-----BEGIN {b}-----\nAAAA\n-----END {b}-----\n"))
            .collect();
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("a UTF-8 path").to_owned()
    }

    #[test]
    fn a_dataverse_sink_needs_exactly_one_of_client_secret_and_client_certificate() {
        let dir = tempfile::tempdir().expect("tmp");
        let both = pem_file(&dir, "app.pem", &["CERTIFICATE", "PRIVATE KEY"]);
        let with_cert = |c: &mut DataverseSinkConfig| {
            c.client_secret = None;
            c.client_certificate = Some(both.clone());
        };
        let mut c = dataverse();
        with_cert(&mut c);
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        // A PKCS#1 key in a file of its own.
        c.client_certificate = Some(pem_file(&dir, "cert.pem", &["CERTIFICATE"]));
        c.client_certificate_key = Some(pem_file(&dir, "key.pem", &["RSA PRIVATE KEY"]));
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        // Shown (config show) as the paths it names.
        let shown = toml::to_string(&SinkConfig::Dataverse(c.clone())).expect("toml");
        assert!(
            shown.contains("client_certificate = ") && !shown.contains("client_secret"),
            "{shown}"
        );

        type Breaks<'a> = Box<dyn Fn(&mut DataverseSinkConfig) + 'a>;
        let missing = dir.path().join("missing.pem").display().to_string();
        let cases: Vec<(&str, &str, Breaks)> = vec![
            (
                "client_certificate",
                "both client_secret and client_certificate",
                Box::new(|c| c.client_certificate = Some(both.clone())),
            ),
            (
                "client_secret",
                "neither client_secret nor client_certificate",
                Box::new(|c| c.client_secret = None),
            ),
            (
                "client_certificate",
                "cannot be read",
                Box::new(|c| {
                    with_cert(c);
                    c.client_certificate = Some(missing.clone());
                }),
            ),
            (
                "client_certificate_key",
                "cannot be read",
                Box::new(|c| {
                    with_cert(c);
                    c.client_certificate_key = Some(missing.clone());
                }),
            ),
            (
                "client_certificate",
                "no -----BEGIN CERTIFICATE-----",
                Box::new(|c| {
                    with_cert(c);
                    c.client_certificate = Some(pem_file(&dir, "k.pem", &["PRIVATE KEY"]));
                }),
            ),
            (
                "client_certificate",
                "no unencrypted RSA private key",
                Box::new(|c| {
                    with_cert(c);
                    c.client_certificate = Some(pem_file(&dir, "c.pem", &["CERTIFICATE"]));
                }),
            ),
            (
                "client_certificate_key",
                "is encrypted",
                Box::new(|c| {
                    with_cert(c);
                    c.client_certificate_key =
                        Some(pem_file(&dir, "e.pem", &["ENCRYPTED PRIVATE KEY"]));
                }),
            ),
            (
                "client_certificate_key",
                "without client_certificate",
                Box::new(|c| c.client_certificate_key = Some(both.clone())),
            ),
        ];
        for (key, what, break_it) in cases {
            let mut c = dataverse();
            break_it(&mut c);
            let found = problems(&c);
            assert_eq!(found.len(), 1, "{key}: {found:?}");
            assert_eq!(found[0].path, format!("sinks.d365.{key}"), "{found:?}");
            assert!(found[0].message.contains(what), "{what}: {found:?}");
            assert!(
                found[0].fix.contains("client_secret")
                    || found[0].fix.contains("client_certificate")
                    || found[0].fix.contains("PEM file")
                    || found[0].fix.contains("openssl"),
                "{found:?}"
            );
        }
        // From a file: `client_certificate` alone is a complete credential.
        let sink: SinkConfig = toml::from_str(&format!(
            "kind = \"dataverse\"\nurl = \"https://c.crm.dynamics.com\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_certificate = {both:?}\n"
        ))
        .expect("a dataverse sink with a certificate");
        let mut out = Vec::new();
        validate("sinks.d365", &sink, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_dataverse_sink_rejects_unknown_keys_and_unknown_device_bindings() {
        let base = "kind = \"dataverse\"\nurl = \"https://c.crm.dynamics.com\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let ok: SinkConfig = toml::from_str(base).expect("minimal dataverse sink");
        let SinkConfig::Dataverse(d) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(d.device_binding, DataverseDeviceBinding::Id);
        assert_eq!(d.timeout_ms, 10_000);
        assert_eq!(d.batch_size, 50);
        assert!(d.provider_instances.is_empty());
        let err = toml::from_str::<SinkConfig>(&format!("{base}secret = \"x\"\n"))
            .expect_err("unknown key");
        assert!(err.to_string().contains("secret"), "{err}");
        let err = toml::from_str::<SinkConfig>(&format!("{base}device_binding = \"name\"\n"))
            .expect_err("unknown binding");
        assert!(err.to_string().contains("device_id"), "{err}");
    }

    #[test]
    fn the_commented_dataverse_example_of_gateway_example_toml_is_valid() {
        let example = include_str!("../../gateway.example.toml");
        let start = example
            .find("# [sinks.d365]")
            .expect("the example documents a dataverse sink");
        let block: String = example[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed: std::collections::BTreeMap<
            String,
            std::collections::BTreeMap<String, SinkConfig>,
        > = toml::from_str(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let sink = &parsed["sinks"]["d365"];
        let mut out = Vec::new();
        validate("sinks.d365", sink, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert!(
            matches!(sink, SinkConfig::Dataverse(d) if d.url == "https://contoso.crm.dynamics.com"
                && d.batch_size == 50
                && d.provider_instances.get("plant").map(String::as_str)
                    == Some("22222222-2222-2222-2222-222222222222"))
        );
    }

    #[test]
    fn dataverse_provider_instances_map_instance_names_to_record_guids() {
        let c: SinkConfig = toml::from_str(
            "kind = \"dataverse\"\nurl = \"https://c.crm.dynamics.com\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nbatch_size = 1\nprovider_instances = { plant = \"0190A6F2-0000-7000-8000-0000000000AB\", lab = \"x\" }\n",
        )
        .expect("a dataverse sink");
        let mut out = Vec::new();
        validate("sinks.d365", &c, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].path, "sinks.d365.provider_instances.lab");
        let SinkConfig::Dataverse(d) = c else {
            panic!("{c:?}")
        };
        assert_eq!(d.batch_size, 1);
        // Shown (config show) only when given.
        let shown = toml::to_string(&SinkConfig::Dataverse(dataverse())).expect("toml");
        assert!(!shown.contains("provider_instances"), "{shown}");
    }

    #[test]
    fn a_dataverse_sink_in_a_file_loads_and_its_mistakes_come_back_with_their_keys() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("gw.toml");
        let sink = "[sinks.d365]\nkind = \"dataverse\"\nurl = \"https://contoso.crm.dynamics.com\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        std::fs::write(&file, sink).expect("write");
        let c = crate::load::load_file(&file, &["mqtt"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.sinks["d365"], SinkConfig::Dataverse(_)));

        std::fs::write(
            &file,
            format!("{sink}client_secrett = \"x\"\ntimeout_ms = \"soon\"\n").replace(
                "url = \"https://contoso.crm.dynamics.com\"",
                "url = \"http://contoso.crm.dynamics.com\"",
            ),
        )
        .expect("write");
        let err = crate::load::load_file(&file, &["mqtt"]).expect_err("refused");
        let paths: Vec<_> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(
            paths.contains(&"sinks.d365.client_secrett")
                && paths.contains(&"sinks.d365.timeout_ms"),
            "{err}"
        );
    }
}
