//! Settings of the `azure_iot_hub` provider (Azure IoT Hub), and the parser of the hub's
//! service connection string shared by the config checks and the provider.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::base::{Problem, Secret};

/// Azure IoT Hub provider settings.
///
/// The hub is reached with a shared access policy's connection string (registry write and
/// service connect permissions). Telemetry and lifecycle events come from the hub's
/// Event Hubs-compatible endpoint (`event_hubs`), from Event Grid pushing to iotgw
/// (`event_grid`), or both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureIotHubConfig {
    /// The hub's service connection string,
    /// `HostName=<hub>.azure-devices.net;SharedAccessKeyName=<policy>;SharedAccessKey=<base64 key>`,
    /// from a shared access policy with *registry write* and *service connect*
    /// (e.g. `iothubowner` or `registryReadWrite` + `service`). Better set through
    /// `IOTGW_PROVIDERS__<NAME>__CONNECTION_STRING` than written in the file; never logged.
    pub connection_string: Option<Secret>,
    /// Lifetime in seconds of the SAS tokens iotgw signs with the key (60..=86400). A token
    /// is reused until a fifth of its lifetime is left, then a new one is signed.
    pub sas_token_ttl_secs: u64,
    /// Timeout in milliseconds of one HTTPS request to the hub (a direct method's own
    /// timeouts are added to it).
    pub request_timeout_ms: u64,
    /// How many times an answer 429 (throttled) or 503 (unavailable) is retried after the
    /// delay the hub announces (`Retry-After`) before the operation fails as throttled.
    pub max_retries: u32,
    /// Longest announced delay in seconds iotgw waits before retrying; a longer one fails
    /// the operation at once as throttled, with the delay, so the caller can come back.
    pub max_retry_after_secs: u64,
    /// PEM file of extra CA certificates to trust for the hub's TLS (HTTPS and AMQP), for
    /// TLS-inspecting proxies and test hubs. The public web roots are always trusted.
    pub ca_file: Option<String>,
    /// How `send_command` reaches the device: `direct_method` (synchronous, the device's
    /// answer makes the command Sent or Error), `twin_desired` (a desired property the
    /// device picks up when it connects), or `c2d` (a cloud-to-device message over AMQP,
    /// queued by the hub for up to `c2d.ttl_secs`).
    pub command_delivery: AzureCommandDelivery,
    /// Direct method settings (`command_delivery = "direct_method"`).
    pub direct_method: DirectMethodConfig,
    /// Desired-property command settings (`command_delivery = "twin_desired"`).
    pub twin_command: TwinCommandConfig,
    /// Cloud-to-device message settings (`command_delivery = "c2d"`).
    pub c2d: C2dConfig,
    /// Largest telemetry payload processed, in bytes (IoT Hub's device-to-cloud limit is
    /// 256 KiB); larger ones are dead-lettered.
    pub max_telemetry_bytes: usize,
    /// Event Grid pushing telemetry and lifecycle events to iotgw's
    /// `POST /hooks/<instance>` endpoint. Absent: the endpoint answers 404.
    pub event_grid: Option<EventGridConfig>,
    /// The hub's Event Hubs-compatible built-in endpoint, read by iotgw.
    pub event_hubs: Option<EventHubsConfig>,
}

impl Default for AzureIotHubConfig {
    fn default() -> Self {
        Self {
            connection_string: None,
            sas_token_ttl_secs: 3600,
            request_timeout_ms: 30_000,
            max_retries: 5,
            max_retry_after_secs: 60,
            ca_file: None,
            command_delivery: AzureCommandDelivery::DirectMethod,
            direct_method: DirectMethodConfig::default(),
            twin_command: TwinCommandConfig::default(),
            c2d: C2dConfig::default(),
            max_telemetry_bytes: 256 * 1024,
            event_grid: None,
            event_hubs: None,
        }
    }
}

/// How commands reach an Azure IoT Hub device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AzureCommandDelivery {
    /// `POST /twins/{id}/methods`: the method name is the command name, the payload the
    /// command message (JSON).
    #[default]
    DirectMethod,
    /// `PATCH /twins/{id}`: the command is written to a desired property.
    TwinDesired,
    /// A cloud-to-device message over AMQP (`/messages/devicebound`).
    C2d,
}

/// Direct method settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectMethodConfig {
    /// Seconds the hub waits for the device's answer (5..=300).
    pub response_timeout_secs: u64,
    /// Seconds the hub waits for an offline device to connect before answering 404
    /// "device not online" (0..=300; 0 answers at once).
    pub connect_timeout_secs: u64,
    /// Queued delivery: while the device is offline, retry the method for up to this many
    /// seconds (the command's time to live) before the command becomes Error. 0: an
    /// offline device makes the command Error at once with the reason.
    pub offline_retry_secs: u64,
    /// Seconds between two attempts while the device is offline.
    pub offline_retry_interval_secs: u64,
}

impl Default for DirectMethodConfig {
    fn default() -> Self {
        Self {
            response_timeout_secs: 30,
            connect_timeout_secs: 0,
            offline_retry_secs: 0,
            offline_retry_interval_secs: 10,
        }
    }
}

/// Desired-property command settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TwinCommandConfig {
    /// The desired property written: `{"<property>": {"name", "id", "correlation_id",
    /// "message"}}` (the last command wins; the device reports back on its own terms).
    pub property: String,
}

impl Default for TwinCommandConfig {
    fn default() -> Self {
        Self {
            property: "iotgw_command".into(),
        }
    }
}

/// Cloud-to-device message settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct C2dConfig {
    /// AMQPS port of the hub (5671).
    pub amqp_port: u16,
    /// Seconds the hub keeps an undelivered message (1..=172800, IoT Hub's 48 h maximum).
    pub ttl_secs: u64,
}

impl Default for C2dConfig {
    fn default() -> Self {
        Self {
            amqp_port: 5671,
            ttl_secs: 3600,
        }
    }
}

/// Event Grid webhook delivery to `POST /hooks/<instance>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventGridConfig {
    /// Shared secret (at least 16 characters) the event subscription must send, as the
    /// query parameter `secret` in its endpoint URL or as the delivery header
    /// `X-Iotgw-Secret`. Better set through
    /// `IOTGW_PROVIDERS__<NAME>__EVENT_GRID__SECRET`.
    pub secret: Secret,
    /// Seconds a pushed batch may wait for the gateway to commit its events; past it the
    /// answer is 503 and Event Grid retries (keep it below Event Grid's 30 s).
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout_secs: u64,
}

const fn default_commit_timeout() -> u64 {
    20
}

/// The hub's Event Hubs-compatible built-in endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventHubsConfig {
    /// The endpoint's connection string from the hub's *Built-in endpoints* page,
    /// `Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=<name>`.
    /// Better set through `IOTGW_PROVIDERS__<NAME>__EVENT_HUBS__CONNECTION_STRING`.
    pub connection_string: Secret,
    /// Consumer group read by this gateway (give each deployment its own).
    #[serde(default = "default_consumer_group")]
    pub consumer_group: String,
    /// Where a partition without a checkpoint starts: `latest` (new events only) or
    /// `earliest` (everything the hub retains).
    #[serde(default)]
    pub start: EventHubsStart,
    /// Where to open the AMQP connection instead of the connection string's host, keeping
    /// that host as the AMQP hostname and token audience: an AMQP proxy
    /// (`amqps://proxy.example.com:5671`), or a local endpoint without TLS
    /// (`amqp://127.0.0.1:5672`, as the Event Hubs emulator and iotgw's tests use).
    /// Unset: the connection string's `Endpoint` on port 5671 with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_endpoint: Option<String>,
    /// Milliseconds between two rounds of partition balancing: the replicas sharing the
    /// store each list the partition claims, renew their own and claim their fair share
    /// (Microsoft's event processors balance every 10 s, too).
    #[serde(default = "default_load_balancing_interval")]
    pub load_balancing_interval_ms: u64,
    /// Milliseconds a partition claim holds unless its owner renews it: a replica that dies
    /// loses its partitions to the others within this plus one interval. At least twice the
    /// interval, so one missed renewal does not lose a partition.
    #[serde(default = "default_ownership_expiry")]
    pub ownership_expiry_ms: u64,
}

fn default_consumer_group() -> String {
    "$Default".into()
}

/// Default of [`EventHubsConfig::load_balancing_interval_ms`].
pub const fn default_load_balancing_interval() -> u64 {
    10_000
}

/// Default of [`EventHubsConfig::ownership_expiry_ms`].
pub const fn default_ownership_expiry() -> u64 {
    30_000
}

/// Where a partition without a checkpoint starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventHubsStart {
    /// Only events enqueued from now on.
    #[default]
    Latest,
    /// Every event the hub still retains.
    Earliest,
}

/// A parsed IoT Hub service connection string. The key is kept as a [`Secret`]; `Debug`
/// never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    /// `HostName`: the hub's host, e.g. `myhub.azure-devices.net` (an explicit `:port` is
    /// kept, for private endpoints and test hubs).
    pub host_name: String,
    /// `SharedAccessKeyName`: the shared access policy.
    pub key_name: String,
    /// `SharedAccessKey`: the policy's base64 key.
    pub key: Secret,
}

impl fmt::Debug for ServiceConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// What is wrong with a connection string: the part named, never the key's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{part}: {message}")]
pub struct ConnectionStringError {
    /// The part at fault (`HostName`, `SharedAccessKeyName`, `SharedAccessKey`, or the
    /// string's syntax).
    pub part: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ServiceConnectionString {
    /// Parses `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...` (any order, a
    /// trailing `;` allowed). Errors name the part that is wrong.
    pub fn parse(s: &str) -> Result<Self, ConnectionStringError> {
        let err = |part, message: &str| ConnectionStringError {
            part,
            message: message.to_owned(),
        };
        let (mut host, mut key_name, mut key) = (None, None, None);
        for item in s.trim().split(';').filter(|i| !i.trim().is_empty()) {
            let Some((k, v)) = item.split_once('=') else {
                return Err(err(
                    "syntax",
                    "every part must be Name=value, separated by `;` (copy the connection string of a shared access policy from the hub's page)",
                ));
            };
            let slot = match k.trim() {
                "HostName" => &mut host,
                "SharedAccessKeyName" => &mut key_name,
                "SharedAccessKey" => &mut key,
                "DeviceId" | "ModuleId" => {
                    return Err(err(
                        "DeviceId",
                        "this is a device connection string; iotgw needs the hub's service connection string of a shared access policy (HostName, SharedAccessKeyName, SharedAccessKey)",
                    ))
                }
                "Endpoint" | "EntityPath" => {
                    return Err(err(
                        "Endpoint",
                        "this is an Event Hubs connection string; give it as event_hubs.connection_string and the hub's service connection string here",
                    ))
                }
                _ => {
                    return Err(err(
                        "syntax",
                        "unknown part: only HostName, SharedAccessKeyName and SharedAccessKey belong in a service connection string",
                    ))
                }
            };
            if slot.is_some() {
                return Err(err("syntax", "a part is given twice"));
            }
            *slot = Some(v.trim().to_owned());
        }
        let host = host
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("HostName", "missing, e.g. HostName=myhub.azure-devices.net"))?;
        if !valid_host(&host) {
            return Err(err(
                "HostName",
                "must be a host name such as myhub.azure-devices.net (letters, digits, `-`, `.`, optionally `:port`), without a scheme or path",
            ));
        }
        let key_name = key_name.filter(|k| !k.is_empty()).ok_or_else(|| {
            err(
                "SharedAccessKeyName",
                "missing, e.g. SharedAccessKeyName=iothubowner",
            )
        })?;
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| err("SharedAccessKey", "missing: copy the policy's primary key"))?;
        if !is_base64(&key) {
            return Err(err(
                "SharedAccessKey",
                "is not base64: copy the policy's primary or secondary key as shown by the portal",
            ));
        }
        Ok(Self {
            host_name: host,
            key_name,
            key: Secret::new(key),
        })
    }
}

fn valid_host(h: &str) -> bool {
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

fn is_base64(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    s.len() & 3 == 0 // a multiple of 4
        && s.len() - body.len() <= 2
        && !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}

fn problem(path: String, message: String, fix: &str) -> Problem {
    Problem {
        path,
        message,
        fix: fix.into(),
        source: None,
    }
}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(base: &str, c: &AzureIotHubConfig, out: &mut Vec<Problem>) {
    match &c.connection_string {
        None => out.push(problem(
            format!("{base}.connection_string"),
            "missing: iotgw needs the hub's service connection string".into(),
            &format!(
                "set IOTGW_{}__CONNECTION_STRING=\"HostName=...;SharedAccessKeyName=...;SharedAccessKey=...\" (a shared access policy with registry write and service connect)",
                base.replace('.', "__").to_uppercase()
            ),
        )),
        Some(cs) => {
            if let Err(e) = ServiceConnectionString::parse(cs.expose()) {
                out.push(problem(
                    format!("{base}.connection_string"),
                    format!("the connection string's {e}"),
                    "copy the connection string of a shared access policy from the hub's page (Security settings > Shared access policies)",
                ));
            }
        }
    }
    if !(60..=86_400).contains(&c.sas_token_ttl_secs) {
        out.push(problem(
            format!("{base}.sas_token_ttl_secs"),
            format!("{} is outside 60..=86400", c.sas_token_ttl_secs),
            "use e.g. 3600 (one hour)",
        ));
    }
    if c.request_timeout_ms < 100 {
        out.push(problem(
            format!("{base}.request_timeout_ms"),
            format!(
                "{} ms is too short for an HTTPS round trip",
                c.request_timeout_ms
            ),
            "use e.g. 30000",
        ));
    }
    if let Some(f) = &c.ca_file {
        if f.trim().is_empty() {
            out.push(problem(
                format!("{base}.ca_file"),
                "empty path".into(),
                "give a PEM file of CA certificates, or remove the key",
            ));
        }
    }
    let dm = &c.direct_method;
    if !(5..=300).contains(&dm.response_timeout_secs) {
        out.push(problem(
            format!("{base}.direct_method.response_timeout_secs"),
            format!("{} is outside IoT Hub's 5..=300", dm.response_timeout_secs),
            "use e.g. 30",
        ));
    }
    if dm.connect_timeout_secs > 300 {
        out.push(problem(
            format!("{base}.direct_method.connect_timeout_secs"),
            format!("{} is above IoT Hub's 300", dm.connect_timeout_secs),
            "use 0..=300",
        ));
    }
    if dm.offline_retry_secs > 0 && dm.offline_retry_interval_secs == 0 {
        out.push(problem(
            format!("{base}.direct_method.offline_retry_interval_secs"),
            "0 would retry an offline device without pause".into(),
            "use e.g. 10",
        ));
    }
    let prop = &c.twin_command.property;
    if prop.is_empty() || prop.starts_with('$') || prop.contains(['.', ' ']) || prop.len() > 128 {
        out.push(problem(
            format!("{base}.twin_command.property"),
            format!("`{prop}` is not a usable desired property name"),
            "use 1-128 characters without `.`, spaces or a leading `$`, e.g. iotgw_command",
        ));
    }
    if c.c2d.amqp_port == 0 {
        out.push(problem(
            format!("{base}.c2d.amqp_port"),
            "port 0".into(),
            "use 5671 (AMQPS)",
        ));
    }
    if !(1..=172_800).contains(&c.c2d.ttl_secs) {
        out.push(problem(
            format!("{base}.c2d.ttl_secs"),
            format!("{} is outside IoT Hub's 1..=172800 (48 h)", c.c2d.ttl_secs),
            "use e.g. 3600",
        ));
    }
    if c.max_telemetry_bytes == 0 {
        out.push(problem(
            format!("{base}.max_telemetry_bytes"),
            "0 would dead-letter every message".into(),
            "use 262144 (IoT Hub's device-to-cloud limit)",
        ));
    }
    if let Some(eg) = &c.event_grid {
        if eg.secret.expose().len() < 16 {
            out.push(problem(
                format!("{base}.event_grid.secret"),
                "shorter than 16 characters".into(),
                "use a long random value, e.g. from `openssl rand -hex 24`",
            ));
        }
        if !(1..=28).contains(&eg.commit_timeout_secs) {
            out.push(problem(
                format!("{base}.event_grid.commit_timeout_secs"),
                format!("{} is outside 1..=28", eg.commit_timeout_secs),
                "Event Grid gives up after 30 s: use e.g. 20",
            ));
        }
    }
    if let Some(eh) = &c.event_hubs {
        let cs = eh.connection_string.expose();
        if !cs.contains("Endpoint=sb://") || !cs.contains("SharedAccessKey") {
            out.push(problem(
                format!("{base}.event_hubs.connection_string"),
                "not an Event Hubs connection string (Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...)".into(),
                "copy it from the hub's Built-in endpoints page",
            ));
        }
        if let Some(ep) = &eh.custom_endpoint {
            let ok = ["amqp://", "amqps://"].iter().any(|p| {
                ep.strip_prefix(p)
                    .is_some_and(|rest| !rest.trim_matches('/').is_empty())
            });
            if !ok {
                out.push(problem(
                    format!("{base}.event_hubs.custom_endpoint"),
                    format!("`{ep}` is not an amqp:// or amqps:// address"),
                    "give amqps://HOST:PORT for a TLS proxy or amqp://HOST:PORT for a local endpoint without TLS, or remove the key",
                ));
            }
        }
        if eh.consumer_group.trim().is_empty() {
            out.push(problem(
                format!("{base}.event_hubs.consumer_group"),
                "empty".into(),
                "use $Default or a consumer group created for this gateway",
            ));
        }
        if !(100..=300_000).contains(&eh.load_balancing_interval_ms) {
            out.push(problem(
                format!("{base}.event_hubs.load_balancing_interval_ms"),
                format!("{} is outside 100..=300000", eh.load_balancing_interval_ms),
                "use e.g. 10000 (ten seconds)",
            ));
        }
        if eh.ownership_expiry_ms < eh.load_balancing_interval_ms.saturating_mul(2) {
            out.push(problem(
                format!("{base}.event_hubs.ownership_expiry_ms"),
                format!(
                    "{} is less than twice load_balancing_interval_ms ({}): one late renewal would lose the partition to another replica",
                    eh.ownership_expiry_ms, eh.load_balancing_interval_ms
                ),
                &format!(
                    "use at least {} (e.g. three intervals; 30000 with the default 10000 interval)",
                    eh.load_balancing_interval_ms.saturating_mul(2)
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Config, ProviderConfig};

    const CS: &str = "HostName=myhub.azure-devices.net;SharedAccessKeyName=iothubowner;SharedAccessKey=c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU=";

    #[test]
    fn a_service_connection_string_parses_into_host_policy_and_key() {
        let cs = ServiceConnectionString::parse(CS).expect("valid");
        assert_eq!(cs.host_name, "myhub.azure-devices.net");
        assert_eq!(cs.key_name, "iothubowner");
        assert!(cs.key.expose().starts_with("c2Vj"));
        let shown = format!("{cs:?}");
        assert!(!shown.contains("c2Vj"), "{shown}");
        let with_port = ServiceConnectionString::parse(
            "SharedAccessKey=AAAA;HostName=127.0.0.1:8443;SharedAccessKeyName=p;",
        )
        .expect("any order, a port and a trailing ; are fine");
        assert_eq!(with_port.host_name, "127.0.0.1:8443");
    }

    #[test]
    fn a_bad_connection_string_names_the_part_that_is_wrong_and_never_the_key() {
        let part = |s: &str| ServiceConnectionString::parse(s).expect_err("bad").part;
        assert_eq!(
            part("SharedAccessKeyName=p;SharedAccessKey=AAAA"),
            "HostName"
        );
        assert_eq!(
            part("HostName=https://h/;SharedAccessKeyName=p;SharedAccessKey=AAAA"),
            "HostName"
        );
        assert_eq!(
            part("HostName=h;SharedAccessKey=AAAA"),
            "SharedAccessKeyName"
        );
        assert_eq!(part("HostName=h;SharedAccessKeyName=p"), "SharedAccessKey");
        let e = ServiceConnectionString::parse(
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not*base64!",
        )
        .expect_err("bad key");
        assert_eq!(e.part, "SharedAccessKey");
        assert!(!e.to_string().contains("not*base64"), "{e}");
        assert_eq!(
            part("HostName=h;DeviceId=d;SharedAccessKey=AAAA"),
            "DeviceId"
        );
        assert_eq!(part("garbage"), "syntax");
    }

    fn with(c: AzureIotHubConfig) -> Vec<Problem> {
        let mut out = Vec::new();
        validate("providers.hub", &c, &mut out);
        out
    }

    #[test]
    fn validation_reports_every_bad_setting_with_its_key() {
        let probs = with(AzureIotHubConfig {
            connection_string: Some(Secret::new(
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=%%%",
            )),
            sas_token_ttl_secs: 5,
            direct_method: DirectMethodConfig {
                response_timeout_secs: 1,
                ..DirectMethodConfig::default()
            },
            c2d: C2dConfig {
                amqp_port: 5671,
                ttl_secs: 200_000,
            },
            event_grid: Some(EventGridConfig {
                secret: Secret::new("short"),
                commit_timeout_secs: 20,
            }),
            ..AzureIotHubConfig::default()
        });
        let paths: Vec<&str> = probs.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "providers.hub.connection_string",
            "providers.hub.sas_token_ttl_secs",
            "providers.hub.direct_method.response_timeout_secs",
            "providers.hub.c2d.ttl_secs",
            "providers.hub.event_grid.secret",
        ] {
            assert!(paths.contains(&want), "{want} missing from {paths:?}");
        }
        let cs = &probs[0];
        assert!(cs.message.contains("SharedAccessKey"), "{cs}");
        assert!(!cs.message.contains("%%%"), "{cs}");
        let missing = with(AzureIotHubConfig::default());
        assert_eq!(missing[0].path, "providers.hub.connection_string");
        assert!(
            missing[0]
                .fix
                .contains("IOTGW_PROVIDERS__HUB__CONNECTION_STRING"),
            "{}",
            missing[0]
        );
    }

    #[test]
    fn the_example_file_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/examples/azure_iot_hub.toml");
        let c = crate::load::load_file(&path, &["azure_iot_hub"]).unwrap_or_else(|e| panic!("{e}"));
        let Some(ProviderConfig::AzureIotHub(hub)) = c.providers.get("hub") else {
            panic!(
                "the example names an azure_iot_hub instance `hub`: {:?}",
                c.providers.keys()
            );
        };
        assert_eq!(hub.command_delivery, AzureCommandDelivery::DirectMethod);
        assert!(hub.event_grid.is_some());
        assert!(
            hub.event_hubs.is_none(),
            "commented out: it needs the azure_event_hubs build and a real endpoint"
        );
    }

    #[test]
    fn a_claim_expiry_shorter_than_two_balancing_intervals_is_refused_with_a_fix() {
        let c: AzureIotHubConfig = toml::from_str(
            "connection_string = \"x\"\n[event_hubs]\nconnection_string = \"Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=h\"\nload_balancing_interval_ms = 50\nownership_expiry_ms = 15000\n",
        )
        .expect("parses");
        let mut out = Vec::new();
        validate("providers.hub", &c, &mut out);
        let p = out
            .iter()
            .find(|p| p.path == "providers.hub.event_hubs.load_balancing_interval_ms")
            .unwrap_or_else(|| panic!("no problem names the interval: {out:?}"));
        assert!(p.fix.contains("10000"), "{p:?}");
        let mut short = c.clone();
        if let Some(eh) = short.event_hubs.as_mut() {
            eh.load_balancing_interval_ms = 10_000;
        }
        let mut out = Vec::new();
        validate("providers.hub", &short, &mut out);
        let p = out
            .iter()
            .find(|p| p.path == "providers.hub.event_hubs.ownership_expiry_ms")
            .unwrap_or_else(|| panic!("no problem names the expiry: {out:?}"));
        assert!(p.fix.contains("20000"), "{p:?}");
    }

    #[test]
    fn a_custom_endpoint_that_is_not_amqp_is_refused_naming_the_key() {
        let c: AzureIotHubConfig = toml::from_str(
            "connection_string = \"x\"\n[event_hubs]\nconnection_string = \"Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=h\"\ncustom_endpoint = \"http://127.0.0.1:5672\"\n",
        )
        .expect("parses");
        let mut out = Vec::new();
        validate("providers.hub", &c, &mut out);
        let p = out
            .iter()
            .find(|p| p.path == "providers.hub.event_hubs.custom_endpoint")
            .unwrap_or_else(|| panic!("no problem names custom_endpoint: {out:?}"));
        assert!(p.fix.contains("amqp://"), "{p:?}");
    }

    #[test]
    fn an_event_hubs_section_parses_with_its_defaults() {
        let c: AzureIotHubConfig = toml::from_str(
            "connection_string = \"x\"\n[event_hubs]\nconnection_string = \"Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=s;SharedAccessKey=k;EntityPath=h\"\n",
        )
        .expect("parses");
        let eh = c.event_hubs.clone().expect("present");
        assert_eq!(
            (eh.consumer_group.as_str(), eh.start),
            ("$Default", EventHubsStart::Latest)
        );
        assert_eq!(
            (eh.load_balancing_interval_ms, eh.ownership_expiry_ms),
            (10_000, 30_000),
            "balanced like Microsoft's event processors by default"
        );
        let mut out = Vec::new();
        validate(
            "providers.hub",
            &AzureIotHubConfig {
                connection_string: None,
                ..c.clone()
            },
            &mut out,
        );
        assert!(
            !out.iter().any(|p| p.path.contains("event_hubs")),
            "{out:?}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
    fn the_connection_string_is_accepted_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("gw.toml", "[providers.hub]\nkind = \"azure_iot_hub\"\n")?;
            jail.set_env("IOTGW_PROVIDERS__HUB__CONNECTION_STRING", CS);
            let c: Config = crate::load::load(&crate::load::LoadOptions {
                file: Some("gw.toml".into()),
                env: true,
                built_kinds: vec!["azure_iot_hub"],
            })
            .unwrap_or_else(|e| panic!("{e}"));
            let Some(ProviderConfig::AzureIotHub(hub)) = c.providers.get("hub") else {
                panic!("hub missing");
            };
            let cs = hub
                .connection_string
                .as_ref()
                .expect("from the environment");
            assert_eq!(cs.expose(), CS);
            Ok(())
        });
    }
}
