//! The provider conformance suite: one set of scenarios, written once, run against every
//! provider that is built — the way Dapr certifies its components.
//!
//! Each scenario starts an in-process gateway (`iotgw::app::start`, SQLite in a temp dir,
//! the API on port 0) with one instance of the provider under test, drives a simulated
//! device through the provider's own cloud (an emulator or broker), and reads the Field
//! Service records back through the HTTP API. The records are normalised ([`normalize`]:
//! ids, timestamps, the instance name and provider-chosen tokens become placeholders) and
//! must equal the golden file `tests/conformance/golden/<scenario>.json`: every provider
//! is held to the same golden, so the records are identical across providers.
//!
//! # Layout
//! - this file: the traits a provider implements to join ([`ProviderFixture`],
//!   [`FixtureEnv`], [`SimDevice`]), the unique [`Names`] of one run of one scenario, and
//!   [`columns`], the list of providers (matrix columns).
//! - [`fixtures`]: one file per provider.
//! - [`scenarios`]: the scenarios.
//! - [`gateway`]: the in-process gateway of a scenario.
//! - [`normalize`]: normalisation and golden files.
//! - [`matrix`]: runs every scenario against every provider and prints the matrix.
//!
//! # Adding a provider
//! 1. Write `fixtures/<kind>.rs` with a type implementing [`ProviderFixture`] (and its
//!    [`FixtureEnv`] and [`SimDevice`]); `fixtures/mqtt.rs` is the model. Start emulators
//!    with `iotgw_testkit`: the shared container for ordinary scenarios, a dedicated
//!    one when `environment` is asked for a restartable environment, held in
//!    [`fixtures::Held`].
//! 2. Declare it in `fixtures/mod.rs` behind `#[cfg(feature = "<kind>")]` and put it in
//!    [`columns`] in place of [`Column::NoFixture`].
//! 3. Run `cargo test -p iotgw-tests --features <kind> --test conformance`.
//!    `scripts/test.sh` turns the feature on by itself once `fixtures/<kind>.rs` exists.
//!
//! Every name a fixture creates (topics, subscriptions, things, client ids) must come from
//! [`Names`], so scenarios running at the same time on a shared emulator never see each
//! other's data.

pub mod fixtures;
pub mod gateway;
pub mod matrix;
pub mod normalize;
pub mod scenarios;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use iotgw_config::{Config, ProviderConfig};
use serde_json::Value;

/// Payload of the poison message: not JSON, so the gateway must dead-letter it.
pub const POISON: &[u8] = b"{not json";

/// One provider under test: how to make an isolated environment for one scenario.
#[async_trait]
pub trait ProviderFixture: Send + Sync {
    /// The provider kind as the config spells it (`mqtt`, `aws_iot_core`, ...): the
    /// matrix column.
    fn kind(&self) -> &'static str;

    /// The emulator or broker behind the provider (for the matrix legend), or `None` when
    /// there is none to restart (then the restart scenario is "n/a" for this provider).
    fn emulator(&self) -> Option<&'static str>;

    /// What the provider runs against, for the matrix legend: by default the emulator;
    /// a provider without one says what stands in for its cloud.
    fn against(&self) -> &'static str {
        self.emulator().unwrap_or("no emulator")
    }

    /// Prepares what one scenario needs: cloud-side resources named after `names`
    /// (topics, subscriptions, broker users...). With `restartable`, the scenario will
    /// call [`FixtureEnv::restart_emulator`]: give it an emulator of its own
    /// (`iotgw_testkit::<emulator>::dedicated()`), never the shared one.
    async fn environment(
        &self,
        names: &Names,
        restartable: bool,
    ) -> anyhow::Result<Box<dyn FixtureEnv>>;
}

/// One scenario's environment for one provider.
#[async_trait]
pub trait FixtureEnv: Send + Sync {
    /// The provider instance's settings (the suite names the instance
    /// [`Names::instance`] and routes every device to it).
    fn provider_config(&self) -> ProviderConfig;

    /// Other changes to the gateway's config, if the provider needs any (a webhook
    /// endpoint, say). The default changes nothing.
    fn adjust_gateway(&self, _config: &mut Config) {}

    /// Connects a simulated device registered through the API; `device.registration` is
    /// the whole `201` body, credentials included. Return once the device can receive
    /// commands (subscribed, listening...).
    async fn connect_device(&self, device: DeviceContext<'_>)
        -> anyhow::Result<Box<dyn SimDevice>>;

    /// Stops the emulator or broker and starts it again (only asked of a restartable
    /// environment). Return once it answers again; the provider and the devices must
    /// find it back on their own. If the emulator forgets its state on restart, re-create
    /// what the real cloud would have kept (topics, subscriptions), as its operator would.
    async fn restart_emulator(&self) -> anyhow::Result<()>;

    /// What to show when a scenario fails, besides the records: the emulator's log lines
    /// about this scenario, say. The default shows nothing.
    async fn diagnostics(&self) -> String {
        String::new()
    }

    /// Removes what the environment created (dedicated containers, ...). The default
    /// does nothing; shared containers are removed by `iotgw_testkit::cleanup` at the end of the run.
    async fn teardown(self: Box<Self>) {}
}

/// What a fixture gets to connect a device.
#[derive(Clone, Copy, Debug)]
pub struct DeviceContext<'a> {
    /// The device id.
    pub device_id: &'a str,
    /// The registration response (`{"device": {...}, "credentials": {...}?}`).
    pub registration: &'a Value,
    /// The provider instance name.
    pub instance: &'a str,
    /// The gateway's API base URL (`http://127.0.0.1:port`), for providers that push to
    /// the gateway (Event Grid to `POST /hooks/{instance}`).
    pub gateway: &'a str,
}

/// A command as the device received it.
#[derive(Clone, Debug)]
pub struct ReceivedCommand {
    /// The command message as JSON (`{"CommandName": ..., "Parameters": ...}`).
    pub body: Value,
    /// What ties the reply to the command (correlation data, method call id...).
    pub correlation_id: String,
}

/// How the device answers a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Refused, with the device's reason.
    Error(String),
}

/// A simulated device, speaking the provider's device side (MQTT to the broker, publish to
/// Pub/Sub, events to the gateway's hook...). Every method returns once the cloud has
/// accepted what was sent (a PUBACK, a publish response, a 2xx), so a scenario can wait on
/// the gateway's records afterwards.
#[async_trait]
pub trait SimDevice: Send {
    /// Sends telemetry with the device-chosen `message_id` (carried the provider's way:
    /// an MQTT 5 user property, a message attribute...) and exactly `payload` as the body.
    /// Sending the same `(message_id, payload)` twice must reach the provider as two
    /// deliveries of one message (a redelivery), which the gateway dedupes.
    async fn publish_telemetry(&mut self, message_id: &str, payload: &[u8]) -> anyhow::Result<()>;

    /// Sends a message the gateway must refuse and dead-letter. The default sends
    /// [`POISON`] as telemetry; override only if the provider cannot carry it (the dead
    /// letter must still look the same).
    async fn publish_poison(&mut self, message_id: &str) -> anyhow::Result<()> {
        self.publish_telemetry(message_id, POISON).await
    }

    /// Reports the device's connection state with its event time.
    async fn report_connection(&mut self, connected: bool, at: DateTime<Utc>)
        -> anyhow::Result<()>;

    /// Reports the device's properties (a JSON object).
    async fn report_properties(&mut self, properties: &Value) -> anyhow::Result<()>;

    /// The next command sent to the device, within `limit`.
    async fn next_command(&mut self, limit: Duration) -> anyhow::Result<ReceivedCommand>;

    /// Answers a command.
    async fn reply(&mut self, command: &ReceivedCommand, reply: Reply) -> anyhow::Result<()>;

    /// Disconnects (cleanly) and stops any task of the device.
    async fn disconnect(self: Box<Self>);
}

/// The unique names of one scenario run against one provider.
#[derive(Clone, Debug)]
pub struct Names {
    /// The scenario.
    pub scenario: &'static str,
    /// The provider kind.
    pub kind: &'static str,
    /// Eight lowercase hex characters unique to this run of this scenario on this provider;
    /// normalisation turns it into `{n}`.
    pub nonce: String,
}

impl Names {
    /// Fresh names for `scenario` on `kind`.
    pub fn new(scenario: &'static str, kind: &'static str) -> Self {
        let nonce = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self {
            scenario,
            kind,
            nonce,
        }
    }

    /// A device id: `<role>-<nonce>` (valid on every cloud: letters, digits, `-`).
    pub fn device(&self, role: &str) -> String {
        format!("{role}-{}", self.nonce)
    }

    /// A prefix for everything else the fixture names (topics, subscriptions, client
    /// ids): `cf-<nonce>`. Starts with a letter, as Pub/Sub ids must.
    pub fn prefix(&self) -> String {
        format!("cf-{}", self.nonce)
    }

    /// The provider instance name in the gateway config (the kind).
    pub fn instance(&self) -> &'static str {
        self.kind
    }
}

/// A column of the matrix.
pub enum Column {
    /// The provider is compiled in and has a fixture.
    Built(Box<dyn ProviderFixture>),
    /// The provider's Cargo feature is off.
    NotBuilt(&'static str),
    /// The feature is on but nobody has written `fixtures/<kind>.rs` yet.
    NoFixture(&'static str),
}

impl Column {
    /// The provider kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Built(f) => f.kind(),
            Self::NotBuilt(k) | Self::NoFixture(k) => k,
        }
    }
}

/// Every provider, in matrix order.
pub fn columns() -> Vec<Column> {
    // A provider compiled into the gateway but without a fixture here is "no fixture";
    // one whose feature is off in this build is "not built".
    let built = iotgw::app::built_kinds();
    #[allow(unused_variables)]
    let absent = |kind: &'static str| {
        if built.contains(&kind) {
            Column::NoFixture(kind)
        } else {
            Column::NotBuilt(kind)
        }
    };
    vec![
        #[cfg(feature = "mqtt")]
        Column::Built(Box::new(fixtures::mqtt::MqttFixture)),
        #[cfg(not(feature = "mqtt"))]
        absent("mqtt"),
        #[cfg(feature = "aws_iot_core")]
        Column::Built(Box::new(fixtures::aws_iot_core::AwsIotCoreFixture)),
        #[cfg(not(feature = "aws_iot_core"))]
        absent("aws_iot_core"),
        #[cfg(feature = "gcp_pubsub")]
        Column::Built(Box::new(fixtures::gcp_pubsub::GcpPubSubFixture)),
        #[cfg(not(feature = "gcp_pubsub"))]
        absent("gcp_pubsub"),
        #[cfg(feature = "azure_iot_hub")]
        Column::Built(Box::new(fixtures::azure_iot_hub::AzureIotHubFixture)),
        #[cfg(not(feature = "azure_iot_hub"))]
        absent("azure_iot_hub"),
    ]
}
