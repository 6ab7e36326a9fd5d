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
    /// Dynamics 365 Field Service: each new alert written to Dataverse's Web API as an
    /// `msdyn_iotalert` record (OAuth 2.0 client credentials).
    Dataverse(DataverseSinkConfig),
}

/// Standard output sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]); default
    /// `["msdyn_iotalert"]`, the new alerts only.
    #[serde(default = "default_entities")]
    pub entities: Vec<String>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
}

impl Default for StdoutSinkConfig {
    fn default() -> Self {
        Self {
            entities: default_entities(),
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
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]); default
    /// `["msdyn_iotalert"]`, the new alerts only.
    #[serde(default = "default_entities")]
    pub entities: Vec<String>,
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
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]); default
    /// `["msdyn_iotalert"]`, the new alerts only.
    #[serde(default = "default_entities")]
    pub entities: Vec<String>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
}

/// Dataverse sink: each new alert becomes an `msdyn_iotalert` record through the Web API
/// (v9.2), authenticated with the OAuth 2.0 client-credentials flow of the Microsoft
/// identity platform.
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
    /// `IOTGW_SINKS__<NAME>__CLIENT_SECRET`. Shown as `<redacted>` everywhere.
    pub client_secret: Secret,
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
    /// The change-feed entities this sink receives (see [`CHANGE_FEED_ENTITIES`]); default
    /// `["msdyn_iotalert"]`, the new alerts only.
    #[serde(default = "default_entities")]
    pub entities: Vec<String>,
    /// A device's connection-state changes are queued at most once per this many
    /// milliseconds for this sink: a newer change replaces the one still waiting (last state
    /// wins).
    #[serde(default = "default_coalesce_connection")]
    pub coalesce_connection_ms: u64,
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
    /// The entities the sink subscribes to.
    pub fn entities(&self) -> &[String] {
        match self {
            Self::Stdout(c) => &c.entities,
            Self::File(c) => &c.entities,
            Self::Webhook(c) => &c.entities,
            Self::Dataverse(c) => &c.entities,
        }
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
    for (i, e) in s.entities().iter().enumerate() {
        if !CHANGE_FEED_ENTITIES.contains(&e.as_str()) {
            out.push(Problem::new(
                format!("{base}.entities[{i}]"),
                format!("`{e}` is not a change-feed entity"),
                format!("use any of: {valid}"),
            ));
        } else if s.entities()[..i].contains(e) {
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
    if d.client_secret.expose().trim().is_empty() {
        out.push(Problem::new(
            format!("{base}.client_secret"),
            "empty client secret",
            "set the app registration's client secret, e.g. via IOTGW_SINKS__<NAME>__CLIENT_SECRET",
        ));
    }
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
            entities: default_entities(),
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
            client_secret: Secret::new("hunter2-secret"),
            token_url: None,
            scope: None,
            device_binding: DataverseDeviceBinding::Id,
            timeout_ms: 10_000,
            backoff_min_ms: 200,
            backoff_max_ms: 30_000,
            entities: default_entities(),
            coalesce_connection_ms: default_coalesce_connection(),
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
            d.entities = CHANGE_FEED_ENTITIES
                .iter()
                .map(|e| (*e).to_owned())
                .collect();
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
                Box::new(|c| c.client_secret = Secret::new("")),
            ),
            (
                "token_url",
                Box::new(|c| c.token_url = Some("ftp://login.example/token".into())),
            ),
            ("scope", Box::new(|c| c.scope = Some(String::new()))),
            ("backoff_min_ms", Box::new(|c| c.backoff_min_ms = 0)),
            ("timeout_ms", Box::new(|c| c.timeout_ms = 0)),
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

    #[test]
    fn a_dataverse_sink_rejects_unknown_keys_and_unknown_device_bindings() {
        let base = "kind = \"dataverse\"\nurl = \"https://c.crm.dynamics.com\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let ok: SinkConfig = toml::from_str(base).expect("minimal dataverse sink");
        let SinkConfig::Dataverse(d) = ok else {
            panic!("{ok:?}")
        };
        assert_eq!(d.device_binding, DataverseDeviceBinding::Id);
        assert_eq!(d.timeout_ms, 10_000);
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
            matches!(sink, SinkConfig::Dataverse(d) if d.url == "https://contoso.crm.dynamics.com")
        );
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
