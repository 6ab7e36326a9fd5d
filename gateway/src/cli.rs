//! The command line: `run`, `check-config`, `config show`, `simulate`, `healthcheck`,
//! `devices import`, `devices move`, `status`, `completions`, `man`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use iotgw_config::{Config, LoadOptions, ProviderConfig};

use crate::app;

/// Exit code for a configuration the gateway cannot use (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

const ABOUT: &str = "One registry and one alert pipeline for IoT devices, whichever cloud hosts them \
(Azure IoT Hub, AWS IoT Core, GCP Pub/Sub, plain MQTT), with records shaped like Dynamics 365 Field Service's.";

const AFTER: &str = "\
Quick start:
  iotgw run                          embedded broker + SQLite + 3 simulated devices; alerts on stdout
  iotgw check-config gateway.toml    every problem in a config file, with its key and a fix
  iotgw config show -c gateway.toml  the effective config (file + IOTGW_* env), secrets redacted
  iotgw devices import fleet.csv     register a file of devices through the running gateway
  iotgw status                       the running gateway at a glance: ready?, instances, outbox
  iotgw completions bash             tab completion for your shell (bash, zsh, fish, ...)

Configuration layers: built-in defaults, then the TOML file, then IOTGW_* environment variables
with `__` between levels (IOTGW_API__LISTEN=0.0.0.0:8080, IOTGW_PROVIDERS__LOCAL__PORT=1884).
See gateway.example.toml for every key.";

/// iotgw command line.
#[derive(Debug, Parser)]
#[command(name = "iotgw", version, about = ABOUT, after_help = AFTER)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info`, `debug`, `info,iotgw_providers=debug`.
    /// The embedded broker (rumqttd) logs only warnings unless named.
    #[arg(
        long,
        global = true,
        env = "IOTGW_LOG",
        default_value = "info,rumqttd=warn"
    )]
    pub log: String,
    /// Log format on stderr.
    #[arg(long, global = true, env = "IOTGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C, then drain and stop.
    ///
    /// Without --config it runs the embedded default: an in-process MQTT broker on
    /// 127.0.0.1 (MQTT 5 devices on port 1883, MQTT 3.1.1 devices on 1884), the mqtt
    /// provider on it, SQLite in ./data, the API on 127.0.0.1:8080, a sample rule
    /// (temperature over 75 C) and three simulated devices. Alerts are printed on stdout as
    /// JSON lines, logs go to stderr. On SIGTERM or Ctrl-C it closes the device side first
    /// and commits every reading the broker already confirmed before it exits.
    ///
    /// With --config FILE it reloads FILE when it changes and on SIGHUP: rules, routing,
    /// sinks, [commands], the failover settings and added or removed provider instances
    /// apply without a restart; a file that does not validate, or that changes what is
    /// bound at start-up (api, store, replica, a running instance's settings), is refused
    /// whole and the running configuration stays (see GET /api/v1/config/version).
    Run(RunArgs),
    /// Check a config file: every problem at once, each with its key path and a fix.
    /// Exit 0 when valid, 64 when not.
    CheckConfig(CheckArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run simulated devices on the cloud of a provider instance (mqtt, aws_iot_core,
    /// gcp_pubsub) or a plain MQTT broker: telemetry that sometimes crosses the sample rule,
    /// reported properties, answers to commands, and a summary at the end.
    #[command(long_about = SIMULATE_ABOUT, after_help = SIMULATE_AFTER)]
    Simulate(SimulateArgs),
    /// Probe a running gateway's `/live` (or `/ready`) endpoint: exit 0 when it answers
    /// 200, 1 otherwise. For container HEALTHCHECKs and Kubernetes exec probes, where there
    /// is no curl. Without --url it probes `api.listen` of the effective config (IOTGW_CONFIG
    /// and IOTGW_* env), a wildcard address replaced by loopback.
    Healthcheck(HealthcheckArgs),
    /// Manage the devices of a running gateway through its API.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Work with a running gateway's dead letters through its API.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Show a running gateway at a glance: readiness, provider instances with their devices
    /// and events, outbox depth per sink, dead letters.
    #[command(long_about = STATUS_ABOUT, after_help = STATUS_AFTER)]
    Status(StatusArgs),
    /// Print a shell completion script for iotgw on stdout (bash, zsh, fish, powershell,
    /// elvish).
    #[command(after_help = COMPLETIONS_AFTER)]
    Completions(CompletionsArgs),
    /// Print iotgw's man page (roff) on stdout; `iotgw man COMMAND` prints a command's.
    #[command(after_help = MAN_AFTER)]
    Man(ManArgs),
}

const STATUS_ABOUT: &str = "\
Show a running gateway at a glance, read from its HTTP API: whether it is ready and why not
(GET /ready), each provider instance's health, the devices it hosts and how many of them are
connected (GET /api/v1/providers, GET /api/v1/devices), the events each instance received,
acked and nacked since the gateway started and the outbox depth per sink (GET /metrics), and
the dead letters (the first page of GET /api/v1/dead-letters: up to 1000, by reason).

Without --url the gateway is found at api.listen of the effective config (--config /
IOTGW_CONFIG and IOTGW_* variables, as for `iotgw run`), and the token is api.token of that
config unless --token or IOTGW_API_TOKEN gives one. Without its token a gateway tells only
whether it is ready; the other parts show why they could not be read.";

const STATUS_AFTER: &str = "\
Examples:
  iotgw status
  iotgw status --url http://10.0.0.5:8080 --token \"$TOKEN\"
  watch -n 5 iotgw status -c gateway.toml

Exit status: 0 when the gateway is ready and every part was read, 1 when it is not ready or a
part could not be read (a refused token, for one), 69 when the gateway cannot be reached.";

const COMPLETIONS_AFTER: &str = "\
Examples:
  iotgw completions bash > ~/.local/share/bash-completion/completions/iotgw
  iotgw completions zsh > \"${fpath[1]}/_iotgw\"
  iotgw completions fish > ~/.config/fish/completions/iotgw.fish
  iotgw completions powershell >> $PROFILE
  iotgw completions elvish >> ~/.config/elvish/rc.elv

Open a new shell afterwards; `iotgw <TAB>` then offers the commands and options.";

const MAN_AFTER: &str = "\
Examples:
  iotgw man | man -l -
  iotgw man devices import | man -l -
  iotgw man > /usr/local/share/man/man1/iotgw.1   (then: man iotgw)";

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway's API base URL, e.g. http://127.0.0.1:8080; overrides --config.
    #[arg(long, visible_alias = "api")]
    pub url: Option<String>,
    /// TOML config file whose api.listen (and api.token) reach the gateway; omit for the
    /// embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bearer token of the API; defaults to api.token of the config.
    #[arg(long, env = "IOTGW_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

/// `completions` options.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `man` options.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print, e.g. `status` or `devices import`; omit for iotgw's
    /// own page.
    pub command: Vec<String>,
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Replay the dead letters a filter selects (a reading goes through the pipeline again,
    /// a sink's item is queued again), with a progress bar and a summary.
    #[command(long_about = REPLAY_ABOUT, after_long_help = REPLAY_AFTER)]
    Replay(ReplayArgs),
}

const REPLAY_ABOUT: &str = "\
Replay the dead letters that --source, --reason-contains and --device select (all that are
given must hold; none: every dead letter), at most --limit, through a running gateway's API
(POST /api/v1/dead-letters/{id}/replay), one at a time. A reading goes through today's
pipeline again: committed, or a dead letter again (under a new id) with today's reason. A
sink's item is queued again. Fix the cause first (register the device, correct the sink),
then replay.

A progress bar with the rate and the time left is drawn on stderr (on a terminal); a
summary is printed on stdout: committed, queued again, dead-lettered again by reason,
failed.";

const REPLAY_AFTER: &str = "\
Examples:
  iotgw dead-letters replay --reason-contains \"not in the registry\"
  iotgw dead-letters replay --source sink:crm --url http://10.0.0.5:8080 --token \"$TOKEN\"
  iotgw dead-letters replay --device pump-001 --limit 100

Exit status: 0 when every selected dead letter was committed or queued again, 1 otherwise
(or when the gateway could not be reached).";

/// `dead-letters replay` options.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Only this source, e.g. telemetry:edge or sink:crm.
    #[arg(long)]
    pub source: Option<String>,
    /// Only dead letters whose reason contains this text.
    #[arg(long)]
    pub reason_contains: Option<String>,
    /// Only this device's.
    #[arg(long)]
    pub device: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
    /// The gateway's API base URL, e.g. http://127.0.0.1:8080; overrides --config.
    #[arg(long)]
    pub url: Option<String>,
    /// TOML config file whose api.listen (and api.token) reach the gateway; omit for the
    /// embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bearer token of the API; defaults to api.token of the config.
    #[arg(long, env = "IOTGW_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// `devices` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Register every device listed in a CSV or JSON Lines file through a running gateway.
    #[command(long_about = IMPORT_ABOUT, after_long_help = IMPORT_AFTER)]
    Import(ImportArgs),
    /// Move a device, or every device a filter selects, to another provider instance.
    #[command(long_about = MOVE_ABOUT, after_long_help = MOVE_AFTER)]
    Move(MoveArgs),
}

const MOVE_ABOUT: &str = "\
Move a device, or every device that --from, --category and --tag select, to provider
instance --to, through a running gateway's API (POST /api/v1/devices/{id}/move). For each
device the target registers it first (if that fails, the device stays where it was), then
one store transaction cuts over (history: Deactivate on the old instance, Register on the
new one; its commands still In Progress end in Error and are not re-sent, since the old
instance may have delivered them), then the old instance unregisters it (if that fails, the
gateway keeps trying and the summary says so). From the cut-over on, readings that still
arrive through the old instance are dead letters with reason wrong_instance.

A bulk move shows a progress bar on stderr (on a terminal) and prints a summary: moved,
already on the target, failed by reason with examples.";

const MOVE_AFTER: &str = "\
Examples:
  iotgw devices move pump-001 --to aws-eu
  iotgw devices move --category chiller --from mqtt-plant --to aws-eu
  iotgw devices move --tag site=north --to gcp --url http://10.0.0.5:8080 --token \"$TOKEN\"

Exit status: 0 when every selected device is on the target, 1 when some are not (or the
gateway could not be reached), 64 for bad arguments.";

/// `devices move` options.
#[derive(Debug, Args)]
pub struct MoveArgs {
    /// The device to move; leave it out to move every device the filters select.
    pub device_id: Option<String>,
    /// The provider instance to move to.
    #[arg(long)]
    pub to: String,
    /// Select the devices now on this instance.
    #[arg(long, conflicts_with = "device_id")]
    pub from: Option<String>,
    /// Select the devices of this category.
    #[arg(long, conflicts_with = "device_id")]
    pub category: Option<String>,
    /// Select the devices with this tag: `key` or `key=value`.
    #[arg(long, conflicts_with = "device_id")]
    pub tag: Option<String>,
    /// The gateway's API base URL, e.g. http://127.0.0.1:8080; overrides --config.
    #[arg(long)]
    pub url: Option<String>,
    /// TOML config file whose api.listen (and api.token) reach the gateway; omit for the
    /// embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bearer token of the API; defaults to api.token of the config.
    #[arg(long, env = "IOTGW_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Moves in flight at once (1 to 64).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub parallel: u8,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

const IMPORT_ABOUT: &str = "\
Register every device listed in FILE through a running gateway's API (POST
/api/v1/devices/batch), --batch-size devices per request, with a progress bar on stderr
(drawn only on a terminal) and a summary on stdout: registered, already registered, and the
failures grouped by reason with their first examples.

The whole file is checked before anything is sent: a line that is not a device, an invalid
id or an id listed twice is reported with its line number and the fix, and nothing is
imported (exit 64). Importing the same file again is safe: devices registered the first time
are reported as already registered.

Without --url the gateway is found at api.listen of the effective config (--config /
IOTGW_CONFIG and IOTGW_* variables, as for `iotgw run`), and the token is api.token of that
config unless --token or IOTGW_API_TOKEN gives one.";

const IMPORT_AFTER: &str = "\
FILE formats, told by the extension:

  .csv    a header row naming the columns, then one device per row. Columns:
          msdyn_deviceid (required), msdyn_name, msdyn_category,
          msdyn_iotproviderinstance (else routing decides), and tag.KEY for a tag KEY.
          An empty cell leaves the field out; quote a value that holds a comma.

            msdyn_deviceid,msdyn_name,msdyn_category,tag.site,tag.floor
            pump-001,Pump 1,chiller,north,2
            pump-002,,chiller,\"south, east\",

  .jsonl  one registration request per line, the body of POST /api/v1/devices (every
          field of it, msdyn_devicesettings and msdyn_issimulated included):

            {\"msdyn_deviceid\": \"pump-001\", \"msdyn_tags\": {\"site\": \"north\"}}
            {\"msdyn_deviceid\": \"pump-002\", \"msdyn_iotproviderinstance\": \"plant\"}

Examples:
  iotgw devices import fleet.csv
  iotgw devices import --url http://10.0.0.5:8080 --token \"$TOKEN\" fleet.jsonl
  iotgw devices import -c gateway.toml --batch-size 1000 --credentials-out creds.jsonl fleet.csv

Exit status: 0 when every device is registered (now or before), 1 when some were not (or
the gateway could not be reached), 64 when the file is bad.";

/// `devices import` options.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The devices: a .csv or .jsonl file (`--help` shows both formats).
    pub file: PathBuf,
    /// The gateway's API base URL, e.g. http://127.0.0.1:8080; overrides --config.
    #[arg(long)]
    pub url: Option<String>,
    /// TOML config file whose api.listen (and api.token) reach the gateway; omit for the
    /// embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Bearer token of the API; defaults to api.token of the config.
    #[arg(long, env = "IOTGW_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Devices per request (1 to 1000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch_size: u16,
    /// Requests in flight at once: while the gateway commits one batch, the next ones
    /// travel and are parsed.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub parallel: u8,
    /// Write the credentials providers hand out (shown once, never stored by the gateway)
    /// to this file, one JSON line per device, readable only by you.
    #[arg(long)]
    pub credentials_out: Option<PathBuf>,
    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// `run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file, reloaded when it changes; omit for the embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `healthcheck` options.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Full URL to probe, e.g. http://127.0.0.1:8080/ready; overrides --config and --path.
    #[arg(long)]
    pub url: Option<String>,
    /// Path probed on the configured API address: `/live` (the process serves) or `/ready`
    /// (store open and every provider connected).
    #[arg(long, default_value = "/live")]
    pub path: String,
    /// TOML config file whose `api.listen` is probed; omit for the embedded default.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Give up after this many milliseconds (connect and answer).
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// `check-config` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The TOML file to check.
    pub file: PathBuf,
    /// Ignore IOTGW_* environment variables (check the file alone).
    #[arg(long)]
    pub no_env: bool,
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (defaults + file + environment), secrets redacted.
    Show {
        /// TOML config file; omit for the embedded default.
        #[arg(short, long, env = "IOTGW_CONFIG")]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ShowFormat::Toml)]
        format: ShowFormat,
    },
}

/// `config show` formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ShowFormat {
    /// TOML, like the config file.
    Toml,
    /// JSON.
    Json,
}

/// `simulate` options.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The provider instance (of --config) whose cloud the devices go to; its kind picks
    /// how they connect. Without it: plain MQTT on --host/--port.
    #[arg(short, long)]
    pub instance: Option<String>,
    /// The gateway's TOML config: it defines --instance, and its api.listen / api.token
    /// reach the gateway for --register and the alert count. Without --instance, the
    /// topics of its first mqtt instance.
    #[arg(short, long, env = "IOTGW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Number of devices.
    #[arg(short = 'n', long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub devices: u32,
    /// Milliseconds between readings of one device.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Device id prefix (ids are PREFIX-001, PREFIX-002, ...).
    #[arg(long, default_value = "sim")]
    pub prefix: String,
    /// MQTT version of mqtt devices (aws_iot_core devices speak 5).
    #[arg(long, value_enum, default_value_t = crate::simulate::Protocol::V5)]
    pub protocol: crate::simulate::Protocol,
    /// Share of commands a device refuses, with a reason (0 to 1), e.g. 0.1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub refuse_rate: f64,
    /// Register the devices through the gateway's API first (and use the credentials it
    /// returns). The API is --url, else api.listen of --config; an older form names the
    /// URL here: --register http://127.0.0.1:8080.
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "URL")]
    pub register: Option<String>,
    /// The gateway's API base URL, e.g. http://127.0.0.1:8080; overrides --config.
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer token of the API; defaults to api.token of --config.
    #[arg(long, env = "IOTGW_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Broker host (plain MQTT); with an mqtt --instance, overrides its host (e.g. when
    /// the gateway reaches the broker by another name).
    #[arg(long)]
    pub host: Option<String>,
    /// Broker port (plain MQTT); with an mqtt --instance, overrides its port.
    #[arg(long)]
    pub port: Option<u16>,
    /// PEM file of the CAs the devices check the broker against (AWS: the data endpoint),
    /// instead of the instance's (ca_cert_path, tls.ca_file) or the system's roots.
    #[arg(long)]
    pub ca_file: Option<String>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_secs: Option<u64>,
    /// An azure_iot_hub device registered elsewhere, by its connection string
    /// (HostName=...;DeviceId=...;SharedAccessKey=...); repeat for more devices. Their
    /// DeviceIds are the devices simulated (-n and --prefix do not apply).
    #[arg(long = "connection-string", value_name = "CONNECTION_STRING")]
    pub connection_strings: Vec<String>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a share from 0 to 1 (e.g. 0.1)")),
    }
}

const SIMULATE_ABOUT: &str = "\
Run simulated devices on the cloud of one provider instance: each publishes a reading every
--interval-ms (a temperature that drifts and spikes over 75 C twice in a row early on, so the
sample rule raises an alert and its debounced child within seconds), reports its properties,
and answers commands: ok, or a refusal with a reason at --refuse-rate.

--instance NAME picks the instance of --config; its kind decides how the devices connect:
  mqtt           MQTT 3.1.1 or 5 (--protocol) to the instance's broker, on its topics (telemetry,
                 status with a last will, commands, replies, reported). With dynsec the devices
                 use the user, password and topics registration returns (needs --register).
                 3.1.1 devices read the correlation id from the command's payload: the instance
                 needs command_correlation = \"payload\" or \"both\".
  aws_iot_core   MQTT 5 over mutual TLS to the instance's data endpoint, with the certificate and
                 key registration returns once (needs --register); telemetry on the first
                 telemetry topic, replies on the reply topic, properties to the thing's shadow.
                 The endpoint is checked against --ca-file, else ca_cert_path, else the system's
                 roots (which hold Amazon Root CA 1).
  gcp_pubsub     the device's bridge to Pub/Sub: readings to telemetry_topic with the device id
                 and message_id attributes, connection events and properties to lifecycle_topic
                 (if set), commands pulled from the device's own subscription (the instance needs
                 command_subscriptions = true) and answered on reply_topic. Credentials: the
                 instance's emulator_host, else credentials_file, else Application Default
                 Credentials; the account needs pubsub.publisher and pubsub.subscriber.
  azure_iot_hub  the azure_iot_sdk device client (a build with --features azure_device_sim):
                 MQTT on the hub's port 8883 with a SAS token signed by the device key, from the
                 connection string registration returns (--register) or --connection-string
                 for devices registered elsewhere; telemetry as device-to-cloud messages, direct
                 methods answered (200, or 400 with the refusal's reason), cloud-to-device
                 messages and desired-property patches answered with reported properties. TLS
                 is OpenSSL (built in) with the system's CAs; SSL_CERT_FILE names others. The
                 gateway itself reads the hub's telemetry through Event Hubs or Event Grid.

Without --instance the devices speak plain MQTT to --host/--port (default 127.0.0.1:1883), on
the topics of the first mqtt instance of --config, else the default ones.

--register registers the devices first through the gateway's API (--url, else api.listen of
--config; token --token, IOTGW_API_TOKEN or api.token). A progress line shows devices
connecting and what they sent; Ctrl-C or --duration-secs stops them and prints a summary:
readings sent, alerts the gateway raised for them (GET /api/v1/alerts), commands answered and
refused, errors.";

const SIMULATE_AFTER: &str = "\
Examples:
  iotgw simulate                                   3 MQTT 5 devices on 127.0.0.1:1883 (iotgw run's broker)
  iotgw simulate -c gateway.toml --instance plant -n 10 --register --protocol 3.1.1
  iotgw simulate -c gateway.toml --instance aws --register --refuse-rate 0.1
  iotgw simulate -c gateway.toml --instance gcp -n 5 --register --duration-secs 60
  iotgw simulate -c gateway.toml --instance hub --register   (build with --features azure_device_sim)

Exit status: 0 when every device connected, 1 when some did not or the gateway or cloud could
not be reached, 64 when the instance cannot be simulated (unknown, or its kind not built).";

fn load(file: Option<PathBuf>, env: bool) -> Result<Config, iotgw_config::ConfigError> {
    iotgw_config::load(&LoadOptions {
        file,
        env,
        built_kinds: app::built_kinds(),
    })
}

fn init_logs(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!(
            "iotgw: --log {:?} is not a valid filter ({e}); using `info`",
            cli.log
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    // Colours only on a terminal: container logs (docker logs, kubectl logs) stay plain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Parses arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iotgw: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(dispatch(cli.command))
}

async fn dispatch(cmd: Command) -> ExitCode {
    match cmd {
        Command::CheckConfig(a) => match load(Some(a.file.clone()), !a.no_env) {
            Ok(c) => {
                println!(
                    "{}: valid ({} provider instance(s), {} rule(s), {} sink(s))",
                    a.file.display(),
                    c.providers.len(),
                    c.rules.len(),
                    c.sinks.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{}: {e}", a.file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Config(ConfigCommand::Show { config, format }) => match load(config, true) {
            Ok(c) => {
                let text = match format {
                    ShowFormat::Toml => toml::to_string_pretty(&c).map_err(|e| e.to_string()),
                    ShowFormat::Json => serde_json::to_string_pretty(&c).map_err(|e| e.to_string()),
                };
                match text {
                    Ok(t) => {
                        println!("{t}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("iotgw: cannot print the config: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run(a) => run(a).await,
        Command::Simulate(a) => simulate(a).await,
        Command::Healthcheck(a) => healthcheck(a).await,
        Command::Devices(DevicesCommand::Import(a)) => import(a).await,
        Command::Devices(DevicesCommand::Move(a)) => move_devices(a).await,
        Command::DeadLetters(DeadLettersCommand::Replay(a)) => replay_dead_letters(a).await,
        Command::Status(a) => status(a).await,
        Command::Completions(a) => {
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut Cli::command(), "iotgw", &mut script);
            write_stdout(&script, "completions")
        }
        Command::Man(a) => man(&a.command),
    }
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotgw {what}: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The man page of iotgw, or of the command `path` names (`["devices", "import"]`).
pub fn man_page(path: &[String]) -> Result<String, String> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut page = &cmd;
    for name in path {
        page = match page.find_subcommand(name) {
            Some(sub) => sub,
            None => {
                let names: Vec<&str> = page.get_subcommands().map(|c| c.get_name()).collect();
                return Err(if names.is_empty() {
                    format!(
                        "`{}` has no commands; its page is `iotgw man {}`",
                        page.get_bin_name().unwrap_or("iotgw"),
                        path[..path.len() - 1].join(" ")
                    )
                } else {
                    format!(
                        "`{name}` is not a command of `{}`; these are: {}",
                        page.get_bin_name().unwrap_or("iotgw"),
                        names.join(", ")
                    )
                });
            }
        };
    }
    let mut roff = Vec::new();
    clap_mangen::Man::new(page.clone())
        .source(format!("iotgw {}", env!("CARGO_PKG_VERSION")))
        .manual("iotgw manual")
        .render(&mut roff)
        .map_err(|e| format!("cannot render the page: {e}"))?;
    Ok(title_first(&String::from_utf8_lossy(&roff)))
}

/// Moves the `.TH` line to the top: roff's apostrophe preamble (two requests defining the
/// string `Aq`, used only further down the page) comes before it as generated, and man(7)
/// pages begin with `.TH`.
pub fn title_first(page: &str) -> String {
    let Some(at) = page.find("\n.TH ") else {
        return page.to_owned();
    };
    let (preamble, rest) = page.split_at(at + 1);
    if !preamble
        .lines()
        .all(|l| l.starts_with(".ie ") || l.starts_with(".el "))
    {
        return page.to_owned();
    }
    let end = rest.find('\n').map_or(rest.len(), |i| i + 1);
    format!("{}{preamble}{}", &rest[..end], &rest[end..])
}

fn man(path: &[String]) -> ExitCode {
    match man_page(path) {
        Ok(page) => write_stdout(page.as_bytes(), "man"),
        Err(why) => {
            eprintln!("iotgw man: {why}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

async fn status(a: StatusArgs) -> ExitCode {
    let (url, config_token) = api_target(a.url, a.config, "status");
    let opts = crate::status::Options {
        url,
        token: a.token.or(config_token),
        timeout: Duration::from_secs(a.timeout_secs.max(1)),
    };
    match crate::status::fetch(&opts).await {
        Ok(overview) => {
            print!("{}", overview.render());
            ExitCode::from(overview.exit_code())
        }
        Err(why) => {
            eprintln!("{why}");
            ExitCode::from(crate::status::EXIT_UNAVAILABLE)
        }
    }
}

pub use crate::errors::error_chain;

/// The URL that reaches an API listening on `listen` from the same network namespace:
/// a wildcard address (`0.0.0.0`, `[::]`) becomes loopback.
pub fn probe_url(listen: &str, path: &str) -> String {
    let authority = match listen.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, addr.port()).to_string()
        }
        Ok(addr) => addr.to_string(),
        Err(_) => listen.to_string(),
    };
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    format!("http://{authority}{path}")
}

async fn healthcheck(a: HealthcheckArgs) -> ExitCode {
    let url = match a.url {
        Some(u) => u,
        None => {
            let listen = match load(a.config, true) {
                Ok(c) => c.api.listen,
                Err(e) => {
                    let fallback = iotgw_config::ApiConfig::default().listen;
                    eprintln!("iotgw healthcheck: the config does not load ({} problem(s)); probing the default {fallback}", e.problems.len());
                    fallback
                }
            };
            probe_url(&listen, &a.path)
        }
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_millis(a.timeout_ms.max(1)))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iotgw healthcheck: cannot build an HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(r) if r.status() == reqwest::StatusCode::OK => {
            println!("healthy: {url} answered 200");
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            println!(
                "unhealthy: {url} answered {status}: {}",
                body.chars().take(500).collect::<String>()
            );
            ExitCode::FAILURE
        }
        Err(e) if e.is_timeout() => {
            println!("unhealthy: {url} did not answer within {} ms", a.timeout_ms);
            ExitCode::FAILURE
        }
        Err(e) => {
            let cause = error_chain(&e);
            println!("unhealthy: cannot reach {url} ({cause}); is the gateway running and is api.listen right?");
            ExitCode::FAILURE
        }
    }
}

/// The gateway's API base URL and token: --url, else api.listen (and api.token) of the
/// config.
fn api_target(
    url: Option<String>,
    config: Option<PathBuf>,
    what: &str,
) -> (String, Option<String>) {
    match url {
        Some(u) => (u, None),
        None => match load(config, true) {
            Ok(c) => (
                probe_url(&c.api.listen, ""),
                c.api.token.map(|t| t.expose().to_owned()),
            ),
            Err(e) => {
                let fallback = iotgw_config::ApiConfig::default().listen;
                eprintln!("iotgw {what}: the config does not load ({} problem(s)); trying the default {fallback}", e.problems.len());
                (probe_url(&fallback, ""), None)
            }
        },
    }
}

async fn replay_dead_letters(a: ReplayArgs) -> ExitCode {
    let (url, config_token) = api_target(a.url, a.config, "dead-letters replay");
    let opts = crate::replay_cli::Options {
        url,
        token: a.token.or(config_token),
        source: a.source,
        reason_contains: a.reason_contains,
        device_id: a.device,
        limit: a.limit.max(1),
        timeout: Duration::from_secs(a.timeout_secs.max(1)),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = crate::replay_cli::run(&opts).await;
    print!("{}", summary.render());
    if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn move_devices(a: MoveArgs) -> ExitCode {
    let selection = match a.device_id {
        Some(id) => crate::move_cli::Selection::One(id),
        None if a.from.is_none() && a.category.is_none() && a.tag.is_none() => {
            eprintln!("iotgw devices move: name a device, or select devices with --from, --category or --tag");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        None => crate::move_cli::Selection::Filter {
            from: a.from,
            category: a.category,
            tag: a.tag,
        },
    };
    let (url, config_token) = api_target(a.url, a.config, "devices move");
    let opts = crate::move_cli::Options {
        url,
        token: a.token.or(config_token),
        to: a.to,
        parallel: usize::from(a.parallel),
        timeout: Duration::from_secs(a.timeout_secs.max(1)),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let summary = crate::move_cli::run(&opts, &selection).await;
    print!("{}", summary.render(&opts.to));
    if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn import(a: ImportArgs) -> ExitCode {
    let checked = crate::import::check(&a.file);
    if !checked.problems.is_empty() {
        crate::import::report_problems(&a.file, &checked.problems, &mut std::io::stderr());
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let (url, config_token) = api_target(a.url, a.config, "devices import");
    let opts = crate::import::Options {
        file: a.file.clone(),
        url,
        token: a.token.or(config_token),
        batch_size: usize::from(a.batch_size),
        parallel: usize::from(a.parallel),
        credentials_out: a.credentials_out,
        timeout: Duration::from_secs(a.timeout_secs.max(1)),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    match crate::import::import(&opts, checked.devices).await {
        Ok(summary) => {
            print!("{}", summary.render(&a.file, opts.batch_size));
            if summary.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(p) => {
            crate::import::report_problems(&a.file, &[p], &mut std::io::stderr());
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM; Ctrl-C still works");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(a: RunArgs) -> ExitCode {
    let embedded = a.config.is_none();
    let config = match load(a.config.clone(), true) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if embedded {
        tracing::info!("no --config given: running the embedded default (broker on 127.0.0.1: MQTT 5 on {}, MQTT 3.1.1 on {}; SQLite at {}; {} simulated devices)", config.embedded_broker.port, config.embedded_broker.v311_port, config.store.path, config.simulate.devices);
    }
    let grace = Duration::from_secs(config.shutdown.grace_secs);
    let options = app::StartOptions {
        config_file: a.config.clone(),
        ..app::StartOptions::default()
    };
    let gw = match app::start(config, options).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("iotgw: cannot start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(api = %format!("http://{}", gw.api_addr), "iotgw running; try: curl http://{}/api/v1/alerts", gw.api_addr);
    shutdown_signal().await;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "stopping: draining in-flight events and the outbox"
    );
    gw.stop(grace).await;
    ExitCode::SUCCESS
}

async fn simulate(a: SimulateArgs) -> ExitCode {
    use crate::simulate::{Failure, Target};
    let config = match &a.config {
        None => None,
        Some(path) => match load(Some(path.clone()), true) {
            Ok(c) => Some(c),
            Err(e) => {
                eprint!("{e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
    };
    let target = match (&a.instance, &config) {
        (Some(name), None) => {
            eprintln!("iotgw simulate: --instance {name} needs --config FILE, the gateway config that defines it");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
        (Some(name), Some(c)) => match c.providers.get(name) {
            Some(ProviderConfig::Mqtt(m)) => {
                let mut m = m.clone();
                m.host = a.host.clone().unwrap_or(m.host);
                m.port = a.port.unwrap_or(m.port);
                Target::Instance {
                    name: name.clone(),
                    provider: ProviderConfig::Mqtt(m),
                }
            }
            Some(p) => Target::Instance {
                name: name.clone(),
                provider: p.clone(),
            },
            None => {
                let known: Vec<&str> = c.providers.keys().map(String::as_str).collect();
                eprintln!(
                    "iotgw simulate: {} has no provider instance `{name}`; it has: {}",
                    a.config
                        .as_deref()
                        .map_or_else(String::new, |p| p.display().to_string()),
                    known.join(", ")
                );
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        (None, c) => {
            let mut topics = c
                .as_ref()
                .and_then(|c| {
                    c.providers.values().find_map(|p| match p {
                        ProviderConfig::Mqtt(m) => Some(m.clone()),
                        _ => None,
                    })
                })
                .unwrap_or_default();
            topics.host = a.host.clone().unwrap_or_else(|| "127.0.0.1".into());
            topics.port = a.port.unwrap_or(1883);
            topics.tls = None;
            Target::Broker(topics)
        }
    };
    // The API: --register URL (the older form), --url, else api.listen of --config.
    let from_config = config.as_ref().map(|c| {
        (
            probe_url(&c.api.listen, ""),
            c.api.token.as_ref().map(|t| t.expose().to_owned()),
        )
    });
    let url = a
        .register
        .clone()
        .filter(|u| !u.is_empty())
        .or(a.url.clone())
        .or_else(|| from_config.as_ref().map(|(u, _)| u.clone()))
        .or_else(|| {
            a.register
                .is_some()
                .then(|| probe_url(&iotgw_config::ApiConfig::default().listen, ""))
        });
    let api = url.map(|url| crate::simulate::Api {
        url: url.trim_end_matches('/').to_owned(),
        token: a
            .token
            .clone()
            .or_else(|| from_config.as_ref().and_then(|(_, t)| t.clone())),
    });
    // Devices named by their connection strings are the ones simulated.
    let mut device_ids = crate::simulate::device_ids(&a.prefix, a.devices);
    if !a.connection_strings.is_empty() {
        device_ids.clear();
        for cs in &a.connection_strings {
            match cs
                .split(';')
                .find_map(|p| p.trim().strip_prefix("DeviceId="))
                .filter(|id| !id.is_empty())
            {
                Some(id) => device_ids.push(id.to_owned()),
                None => {
                    eprintln!("iotgw simulate: --connection-string has no DeviceId=... (expected HostName=...;DeviceId=...;SharedAccessKey=...)");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            }
        }
    }
    let opts = crate::simulate::Options {
        target,
        device_ids,
        interval: Duration::from_millis(a.interval_ms.max(10)),
        protocol: a.protocol,
        refuse_rate: a.refuse_rate,
        ca_file: a.ca_file.clone(),
        connection_strings: a.connection_strings.clone(),
        api,
        register: a.register.is_some(),
        duration: a.duration_secs.map(Duration::from_secs),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    match crate::simulate::run(opts, shutdown_signal()).await {
        Ok(summary) => {
            print!("{}", summary.render());
            if summary.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(Failure::Usage(why)) => {
            eprintln!("iotgw simulate: {why}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(Failure::Unavailable(why)) => {
            eprintln!("iotgw simulate: {why}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_man_page_begins_with_its_title_and_keeps_the_apostrophe_string() {
        let page = man_page(&[]).expect("the page renders");
        assert!(page.starts_with(".TH iotgw 1 "), "{}", &page[..200]);
        assert!(page.contains("\n.ie \\n(.g .ds Aq"), "{}", &page[..200]);
        let sub = man_page(&["devices".into(), "import".into()]).expect("renders");
        assert!(
            sub.starts_with(".TH iotgw-devices-import 1 "),
            "{}",
            &sub[..200]
        );
        assert!(sub.contains("batch\\-size"), "{sub}");
        let bad = man_page(&["devices".into(), "imprt".into()]).expect_err("no such command");
        assert!(bad.contains("import, move"), "{bad}");
    }

    #[test]
    fn probe_url_replaces_a_wildcard_listen_address_with_loopback() {
        assert_eq!(
            probe_url("0.0.0.0:9090", "/live"),
            "http://127.0.0.1:9090/live"
        );
        assert_eq!(probe_url("[::]:8080", "ready"), "http://[::1]:8080/ready");
        assert_eq!(
            probe_url("127.0.0.1:8080", "/ready"),
            "http://127.0.0.1:8080/ready"
        );
        assert_eq!(
            probe_url("localhost:8080", "/live"),
            "http://localhost:8080/live"
        );
    }
}
