//! Simulated devices (`iotgw simulate`, and the embedded default's fleet): N devices on
//! the cloud of one provider instance, registered through the gateway's API when asked,
//! publishing telemetry that sometimes crosses the sample rule, answering commands (ok,
//! or a refusal with a reason at a configurable rate) and reporting properties.
//!
//! # Layout
//! - [`device`]: what every device does whichever cloud carries it (readings, answers,
//!   properties) and the fleet's counters.
//! - [`mqtt`]: devices on MQTT 3.1.1 or 5 (the `mqtt` kind, and the transport of
//!   `aws_iot_core` devices); [`aws`] (feature `aws_iot_core`): mutual TLS with the
//!   registration's certificate; [`gcp`] (feature `gcp_pubsub`): the device's bridge to
//!   Pub/Sub; `azure` (feature `azure_device_sim`): the `azure_iot_sdk` device client;
//!   a build without it refuses an `azure_iot_hub` instance with [`AZURE_NOT_BUILT`].
//! - [`api`]: registration and alert counts through the gateway's HTTP API.
//! - this file: the run (register, connect with a progress line, wait, summary).

pub mod api;
#[cfg(feature = "azure_device_sim")]
pub mod azure;
pub mod device;
pub mod mqtt;

#[cfg(feature = "aws_iot_core")]
pub mod aws;
#[cfg(feature = "gcp_pubsub")]
pub mod gcp;
#[cfg(any(feature = "mqtt", feature = "aws_iot_core"))]
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use iotgw_config::{MqttConfig, ProviderConfig};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use api::Api;
pub use device::{reading, Answer, Behaviour, Counters};
pub use mqtt::{run_fleet, FleetConfig, Protocol};

/// Fleets up to this size have their alerts counted every 5 s while they run (one API
/// request per device); larger ones only at the end.
const LIVE_ALERT_POLL_MAX: usize = 100;

/// Simulated device ids `sim-001`, `sim-002`, ...
pub fn device_ids(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// Where the devices go.
#[derive(Clone, Debug)]
pub enum Target {
    /// A broker named by `--host/--port`, no instance: the topics of `config` (the first
    /// mqtt instance of `--config`, else the defaults), its host and port.
    Broker(MqttConfig),
    /// The cloud of a provider instance of the gateway's config.
    Instance {
        /// The instance's name.
        name: String,
        /// Its settings.
        provider: ProviderConfig,
    },
}

impl Target {
    fn kind(&self) -> &'static str {
        match self {
            Self::Broker(_) => "mqtt",
            Self::Instance { provider, .. } => provider.kind(),
        }
    }

    fn instance(&self) -> Option<&str> {
        match self {
            Self::Broker(_) => None,
            Self::Instance { name, .. } => Some(name),
        }
    }
}

/// What `iotgw simulate` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the devices go.
    pub target: Target,
    /// Their ids.
    pub device_ids: Vec<String>,
    /// Time between two readings of one device.
    pub interval: Duration,
    /// MQTT version of `mqtt` devices.
    pub protocol: Protocol,
    /// Share of commands refused (0 to 1).
    pub refuse_rate: f64,
    /// CA file the devices check the broker (AWS: the data endpoint) against, overriding
    /// the instance's.
    pub ca_file: Option<String>,
    /// Device connection strings of azure_iot_hub devices registered elsewhere.
    pub connection_strings: Vec<String>,
    /// The gateway's API: registration, and alert counts for the summary.
    pub api: Option<Api>,
    /// Register the devices first (needs `api`).
    pub register: bool,
    /// Stop after this long (else when the stop future passed to [`run`] completes).
    pub duration: Option<Duration>,
    /// Draw a progress line (on a terminal).
    pub progress: bool,
}

/// Why a run could not start.
#[derive(Debug)]
pub enum Failure {
    /// What was asked cannot work (exit 64): the message says what to change.
    Usage(String),
    /// Nothing could be reached (exit 1).
    Unavailable(String),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Where (e.g. `instance plant (mqtt, MQTT 5)`).
    pub target: String,
    /// Devices asked for.
    pub devices: usize,
    /// Devices registered now, or found registered (`None`: no registration asked).
    pub registered: Option<usize>,
    /// Devices connected at least once.
    pub connected: u64,
    /// Readings sent.
    pub sent: u64,
    /// Reported-property updates sent.
    pub reported: u64,
    /// Alerts of these devices raised during the run, and how many were debounced
    /// children (`None`: no API to ask).
    pub alerts: Option<(u64, u64)>,
    /// Commands received.
    pub commands: u64,
    /// Answered ok.
    pub answered_ok: u64,
    /// Refused with a reason.
    pub refused: u64,
    /// Errors, with the last one.
    pub errors: u64,
    /// The last error.
    pub last_error: Option<String>,
    /// How long it ran.
    pub elapsed: Duration,
    /// Why no command can reach these devices, when none can.
    pub commands_note: Option<String>,
}

impl Summary {
    /// The summary as printed on stdout.
    pub fn render(&self) -> String {
        let mut s = format!(
            "simulated {} device(s) on {} for {} s\n",
            self.devices,
            self.target,
            self.elapsed.as_secs()
        );
        if let Some(r) = self.registered {
            s.push_str(&format!("  registered  {r} of {}\n", self.devices));
        }
        s.push_str(&format!(
            "  connected   {} of {}\n  sent        {} readings, {} property reports\n",
            self.connected, self.devices, self.sent, self.reported
        ));
        match self.alerts {
            Some((all, children)) => s.push_str(&format!(
                "  alerts      {all} seen ({} primary, {children} debounced children)\n",
                all - children.min(all)
            )),
            None => s.push_str(
                "  alerts      not counted (no gateway API: give --url, or --config with api.listen)\n",
            ),
        }
        s.push_str(&format!(
            "  commands    {} received: {} answered ok, {} refused\n",
            self.commands, self.answered_ok, self.refused
        ));
        if let Some(n) = &self.commands_note {
            s.push_str(&format!("              ({n})\n"));
        }
        match &self.last_error {
            Some(e) => s.push_str(&format!("  errors      {} (last: {e})\n", self.errors)),
            None => s.push_str(&format!("  errors      {}\n", self.errors)),
        }
        s
    }

    /// Whether the run did what it should: every device connected.
    pub fn success(&self) -> bool {
        self.devices > 0 && self.connected as usize == self.devices
    }
}

/// The error for an `azure_iot_hub` instance in a build without its device client.
pub const AZURE_NOT_BUILT: &str =
    "simulating azure_iot_hub devices needs a build with --features azure_device_sim";

/// The devices of one run, ready to start.
enum Fleet {
    #[cfg(feature = "azure_device_sim")]
    Azure(Vec<(usize, azure::DeviceIdentity)>),
    Mqtt(Vec<(usize, String, mqtt::Link)>),
    #[cfg(feature = "gcp_pubsub")]
    Gcp(Arc<gcp::Clients>, Vec<(usize, String)>),
}

/// The error for a kind this build cannot simulate.
#[cfg(not(all(feature = "aws_iot_core", feature = "gcp_pubsub")))]
fn not_built(kind: &str) -> Failure {
    Failure::Usage(format!(
        "simulating {kind} devices needs a build with --features {kind}"
    ))
}

/// Builds each device's connection settings; a device that cannot have one is counted as
/// an error and left out.
async fn fleet(
    opts: &Options,
    creds: &HashMap<String, Option<Value>>,
    counters: &Counters,
) -> Result<Fleet, Failure> {
    let none = None;
    let cred = |id: &str| creds.get(id).unwrap_or(&none).as_ref();
    let mqtt_fleet = |cfg: &MqttConfig| -> Result<Fleet, Failure> {
        let mut out = Vec::new();
        for (i, id) in opts.device_ids.iter().enumerate() {
            let mut link = mqtt::Link::from_instance(cfg, id, opts.protocol)
                .map_err(|e| Failure::Usage(format!("{e:#}")))?;
            if let Some(c) = cred(id) {
                link = link.with_credentials(c);
            }
            if let (Some(ca), Some(_)) = (&opts.ca_file, &link.transport) {
                link.transport = Some(tls_to(ca)?);
            }
            out.push((i, id.clone(), link));
        }
        Ok(Fleet::Mqtt(out))
    };
    match &opts.target {
        Target::Broker(cfg) => mqtt_fleet(cfg),
        Target::Instance { provider, .. } => match provider {
            ProviderConfig::Mqtt(cfg) => mqtt_fleet(cfg),
            ProviderConfig::AwsIotCore(cfg) => {
                #[cfg(feature = "aws_iot_core")]
                {
                    let mut out = Vec::new();
                    for (i, id) in opts.device_ids.iter().enumerate() {
                        match aws::link(id, cred(id), cfg, opts.ca_file.as_deref()) {
                            Ok(l) => out.push((i, id.clone(), l)),
                            Err(e) => counters.error(id, format!("{e:#}")),
                        }
                    }
                    Ok(Fleet::Mqtt(out))
                }
                #[cfg(not(feature = "aws_iot_core"))]
                {
                    let _ = (cfg, counters);
                    Err(not_built("aws_iot_core"))
                }
            }
            ProviderConfig::GcpPubsub(cfg) => {
                #[cfg(feature = "gcp_pubsub")]
                {
                    let _ = counters;
                    let clients = gcp::Clients::build(cfg)
                        .await
                        .map_err(|e| Failure::Unavailable(format!("{e:#}")))?;
                    let ids = opts.device_ids.iter().cloned().enumerate().collect();
                    Ok(Fleet::Gcp(Arc::new(clients), ids))
                }
                #[cfg(not(feature = "gcp_pubsub"))]
                {
                    let _ = (cfg, counters);
                    Err(not_built("gcp_pubsub"))
                }
            }
            ProviderConfig::AzureIotHub(_) => {
                #[cfg(feature = "azure_device_sim")]
                {
                    azure_fleet(opts, &cred, counters)
                }
                #[cfg(not(feature = "azure_device_sim"))]
                {
                    Err(Failure::Usage(AZURE_NOT_BUILT.into()))
                }
            }
        },
    }
}

/// The Azure devices: each from the connection string registration returned, else from
/// `--connection-string`.
#[cfg(feature = "azure_device_sim")]
fn azure_fleet<'a>(
    opts: &Options,
    cred: &impl Fn(&str) -> Option<&'a Value>,
    counters: &Counters,
) -> Result<Fleet, Failure> {
    let given: HashMap<String, azure::DeviceIdentity> = opts
        .connection_strings
        .iter()
        .map(|cs| {
            azure::DeviceIdentity::parse(cs)
                .map(|who| (who.device_id.clone(), who))
                .map_err(|e| Failure::Usage(format!("--connection-string: {e:#}")))
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (i, id) in opts.device_ids.iter().enumerate() {
        let registered = cred(id)
            .and_then(|c| c["connection_string"].as_str())
            .map(azure::DeviceIdentity::parse);
        match (registered, given.get(id)) {
            (Some(Ok(who)), _) => out.push((i, who)),
            (Some(Err(e)), _) => counters.error(id, format!("its registration's connection string: {e:#}")),
            (None, Some(who)) => out.push((i, who.clone())),
            (None, None) => counters.error(
                id,
                "no connection string: run with --register (registration returns it once), or give \
                 --connection-string for a device registered elsewhere \
                 (az iot hub device-identity connection-string show)",
            ),
        }
    }
    Ok(Fleet::Azure(out))
}

#[cfg(any(feature = "mqtt", feature = "aws_iot_core"))]
fn tls_to(ca: &str) -> Result<rumqttc::Transport, Failure> {
    tls::transport(&tls::TlsSpec {
        ca_file: Some(ca),
        ..Default::default()
    })
    .map_err(|e| Failure::Usage(format!("--ca-file {ca}: {e:#}")))
}

#[cfg(not(any(feature = "mqtt", feature = "aws_iot_core")))]
fn tls_to(_ca: &str) -> Result<rumqttc::Transport, Failure> {
    Err(not_built("mqtt"))
}

/// Why no command reaches the devices of `target`, when none can.
fn commands_note(target: &Target) -> Option<String> {
    match target {
        #[cfg(feature = "gcp_pubsub")]
        Target::Instance {
            provider: ProviderConfig::GcpPubsub(cfg),
            ..
        } => gcp::no_commands_reason(cfg).map(str::to_owned),
        _ => None,
    }
}

/// Registers every device through the API (8 at a time): the credentials per device.
async fn register_all(
    http: &reqwest::Client,
    api: &Api,
    instance: Option<&str>,
    ids: &[String],
    counters: &Counters,
    bar: &indicatif::ProgressBar,
) -> Result<(HashMap<String, Option<Value>>, usize), Failure> {
    let answers: Vec<(String, Result<api::Registered, api::RegisterError>)> =
        futures::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let r = api::register(http, api, instance, &id).await;
                (id, r)
            })
            .buffer_unordered(8)
            .inspect(|_| bar.inc(1))
            .collect()
            .await;
    let mut creds = HashMap::new();
    let (mut ok, mut unreachable) = (0, None);
    for (id, r) in answers {
        match r {
            Ok(api::Registered::New(c)) => {
                ok += 1;
                creds.insert(id, c);
            }
            Ok(api::Registered::Already) => {
                ok += 1;
                tracing::info!(device = %id, "already registered; its credentials (if any) were shown at its registration");
                creds.insert(id, None);
            }
            Err(api::RegisterError::Unreachable(why)) => unreachable = Some(why),
            Err(api::RegisterError::Refused(why)) => counters.error(&id, why),
        }
    }
    match unreachable {
        Some(why) if ok == 0 => Err(Failure::Unavailable(why)),
        Some(why) => {
            counters.error("registration", why);
            Ok((creds, ok))
        }
        None => Ok((creds, ok)),
    }
}

fn bar(progress: bool, len: u64, template: &str) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

fn live_message(c: &Counters, alerts: Option<(u64, u64)>) -> String {
    let alerts = alerts.map_or(String::new(), |(a, ch)| {
        format!(", {a} alerts ({ch} children)")
    });
    format!(
        "sent {}{alerts}, commands {} ok / {} refused, errors {}",
        Counters::get(&c.sent),
        Counters::get(&c.answered_ok),
        Counters::get(&c.refused),
        Counters::get(&c.errors)
    )
}

/// Runs the simulation until `stop` completes or `opts.duration` passes, then stops every
/// device and returns the summary.
pub async fn run(opts: Options, stop: impl Future<Output = ()>) -> Result<Summary, Failure> {
    let started = Instant::now();
    let counters = Arc::new(Counters::default());
    let kind = opts.target.kind();
    let target = match (&opts.target, kind) {
        (Target::Broker(c), _) => format!(
            "broker {}:{} (MQTT {})",
            c.host,
            c.port,
            proto(opts.protocol)
        ),
        (Target::Instance { name, .. }, "mqtt") => {
            format!("instance {name} (mqtt, MQTT {})", proto(opts.protocol))
        }
        (Target::Instance { name, .. }, k) => format!("instance {name} ({k})"),
    };
    if kind == "azure_iot_hub" && cfg!(not(feature = "azure_device_sim")) {
        return Err(Failure::Usage(AZURE_NOT_BUILT.into()));
    }
    let http = match &opts.api {
        Some(_) => Some(api::client().map_err(Failure::Unavailable)?),
        None => None,
    };
    let mut summary = Summary {
        target,
        devices: opts.device_ids.len(),
        commands_note: commands_note(&opts.target),
        ..Summary::default()
    };

    let mut creds = HashMap::new();
    if opts.register {
        let (Some(api), Some(http)) = (&opts.api, &http) else {
            return Err(Failure::Usage(
                "--register needs the gateway's API: give --url, or --config with api.listen"
                    .into(),
            ));
        };
        let b = bar(
            opts.progress,
            opts.device_ids.len() as u64,
            "registering {pos}/{len} {bar:30} {elapsed}",
        );
        let (c, ok) = register_all(
            http,
            api,
            opts.target.instance(),
            &opts.device_ids,
            &counters,
            &b,
        )
        .await?;
        b.finish_and_clear();
        creds = c;
        summary.registered = Some(ok);
        eprintln!(
            "registered {ok} of {} device(s) through {}",
            opts.device_ids.len(),
            api.url
        );
    }
    let baseline = match (&opts.api, &http) {
        (Some(api), Some(http)) => api::alerts(http, api, &opts.device_ids).await,
        _ => None,
    };

    let fleet = fleet(&opts, &creds, &counters).await?;
    let shutdown = CancellationToken::new();
    let mut set = JoinSet::new();
    let mut started_devices = 0u64;
    match fleet {
        Fleet::Mqtt(links) => {
            for (i, _id, link) in links {
                let (c, s, b) = (
                    counters.clone(),
                    shutdown.clone(),
                    Behaviour::new(i, opts.refuse_rate),
                );
                let interval = opts.interval;
                set.spawn(mqtt::run_device(link, b, interval, c, s));
                started_devices += 1;
            }
        }
        #[cfg(feature = "azure_device_sim")]
        Fleet::Azure(devices) => {
            for (i, who) in devices {
                set.spawn(azure::run_device(
                    who,
                    i,
                    opts.refuse_rate,
                    opts.interval,
                    counters.clone(),
                    shutdown.clone(),
                ));
                started_devices += 1;
            }
        }
        #[cfg(feature = "gcp_pubsub")]
        Fleet::Gcp(clients, ids) => {
            for (i, id) in ids {
                let (c, s, b) = (
                    counters.clone(),
                    shutdown.clone(),
                    Behaviour::new(i, opts.refuse_rate),
                );
                set.spawn(gcp::run_device(clients.clone(), id, b, opts.interval, c, s));
                started_devices += 1;
            }
        }
    }
    if started_devices == 0 {
        return Err(Failure::Unavailable(format!(
            "no device could start: {}",
            counters
                .last_error()
                .unwrap_or_else(|| "no devices asked for".into())
        )));
    }
    eprintln!(
        "simulating {started_devices} device(s) on {} every {} ms; Ctrl-C stops",
        summary.target,
        opts.interval.as_millis()
    );

    let connecting = bar(
        opts.progress,
        started_devices,
        "{spinner} connected {pos}/{len} {wide_msg}",
    );
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let until = async {
        match deadline {
            Some(d) => tokio::select! {
                () = tokio::time::sleep_until(d) => {}
                () = stop => {}
            },
            None => stop.await,
        }
    };
    tokio::pin!(until);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut all_connected, mut last_poll, mut alerts) = (false, Instant::now(), None);
    loop {
        tokio::select! {
            () = &mut until => break,
            _ = tick.tick() => {
                let connected = Counters::get(&counters.connected);
                connecting.set_position(connected);
                if !all_connected && connected >= started_devices {
                    all_connected = true;
                    if !opts.progress {
                        eprintln!("all {started_devices} device(s) connected");
                    }
                }
                // Counted live for small fleets; a large one only at the end.
                if opts.device_ids.len() <= LIVE_ALERT_POLL_MAX && last_poll.elapsed() >= Duration::from_secs(5) {
                    last_poll = Instant::now();
                    if let (Some(api), Some(http)) = (&opts.api, &http) {
                        alerts = api::alerts(http, api, &opts.device_ids).await.map(|now| since(now, baseline));
                    }
                }
                connecting.set_message(live_message(&counters, alerts));
            }
        }
    }
    connecting.finish_and_clear();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while set.join_next().await.is_some() {}
    })
    .await;
    set.abort_all();
    if let (Some(api), Some(http)) = (&opts.api, &http) {
        summary.alerts = api::alerts(http, api, &opts.device_ids)
            .await
            .map(|now| since(now, baseline))
            .or(alerts);
    }
    let c = &counters;
    summary.connected = Counters::get(&c.connected);
    summary.sent = Counters::get(&c.sent);
    summary.reported = Counters::get(&c.reported);
    summary.commands = Counters::get(&c.commands);
    summary.answered_ok = Counters::get(&c.answered_ok);
    summary.refused = Counters::get(&c.refused);
    summary.errors = Counters::get(&c.errors);
    summary.last_error = c.last_error();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::V311 => "3.1.1",
        Protocol::V5 => "5",
    }
}

/// Alerts raised since `baseline`.
fn since(now: (u64, u64), baseline: Option<(u64, u64)>) -> (u64, u64) {
    let (a0, c0) = baseline.unwrap_or_default();
    (now.0.saturating_sub(a0), now.1.saturating_sub(c0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zero_padded_and_valid() {
        let ids = device_ids("sim", 3);
        assert_eq!(ids, ["sim-001", "sim-002", "sim-003"]);
        assert!(ids
            .iter()
            .all(|i| iotgw_registry::DeviceId::parse(i).is_ok()));
    }

    #[test]
    fn the_summary_names_what_happened_and_success_needs_every_device_connected() {
        let s = Summary {
            target: "instance plant (mqtt, MQTT 5)".into(),
            devices: 3,
            registered: Some(3),
            connected: 3,
            sent: 30,
            alerts: Some((4, 2)),
            commands: 2,
            answered_ok: 1,
            refused: 1,
            errors: 1,
            last_error: Some("sim-002: connection lost".into()),
            ..Summary::default()
        };
        let text = s.render();
        for want in [
            "simulated 3 device(s) on instance plant",
            "registered  3 of 3",
            "connected   3 of 3",
            "sent        30 readings",
            "alerts      4 seen (2 primary, 2 debounced children)",
            "commands    2 received: 1 answered ok, 1 refused",
            "errors      1 (last: sim-002: connection lost)",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert!(s.success());
        assert!(!Summary { connected: 2, ..s }.success());
    }

    #[cfg(not(feature = "azure_device_sim"))]
    #[tokio::test]
    async fn an_azure_instance_is_refused_with_the_feature_it_needs() {
        let opts = Options {
            target: Target::Instance {
                name: "hub".into(),
                provider: ProviderConfig::AzureIotHub(Default::default()),
            },
            device_ids: device_ids("sim", 1),
            interval: Duration::from_secs(1),
            protocol: Protocol::V5,
            refuse_rate: 0.0,
            ca_file: None,
            connection_strings: Vec::new(),
            api: None,
            register: false,
            duration: None,
            progress: false,
        };
        match run(opts, std::future::pending()).await {
            Err(Failure::Usage(m)) => assert_eq!(m, AZURE_NOT_BUILT),
            other => panic!("{other:?}"),
        }
    }
}
