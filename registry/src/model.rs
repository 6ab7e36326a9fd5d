//! The Field Service IoT entities (`msdyn_iot*` tables) as Rust types.
//!
//! Field names serialize as Dataverse's logical names and option sets as Dataverse's
//! option values, so a record the HTTP API or a sink hands out can be written to
//! Dataverse as it is, whatever cloud hosts the device.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::DeviceId;

macro_rules! option_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in option-set order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The Dataverse option value.
            pub const fn value(self) -> i32 {
                match self { $(Self::$variant => $value),+ }
            }

            /// The Dataverse label.
            pub const fn label(self) -> &'static str {
                match self { $(Self::$variant => $label),+ }
            }

            /// The variant for a Dataverse option value.
            pub fn from_value(v: i64) -> Option<Self> {
                match v { $($value => Some(Self::$variant),)+ _ => None }
            }

            /// The variant for a label, case-insensitively, spaces and underscores ignored.
            pub fn from_label(s: &str) -> Option<Self> {
                let norm = |x: &str| x.chars().filter(|c| c.is_alphanumeric()).collect::<String>().to_ascii_lowercase();
                let want = norm(s);
                Self::ALL.iter().copied().find(|v| norm(v.label()) == want)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_i32(self.value())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw { Num(i64), Text(String) }
                match Raw::deserialize(d)? {
                    Raw::Num(n) => Self::from_value(n).ok_or_else(|| serde::de::Error::custom(format!(
                        "{n} is not a {} option value; use one of {}", stringify!($name),
                        Self::ALL.iter().map(|v| format!("{} ({})", v.value(), v.label())).collect::<Vec<_>>().join(", ")))),
                    Raw::Text(t) => t.trim().parse::<i64>().ok().and_then(Self::from_value).or_else(|| Self::from_label(&t)).ok_or_else(|| serde::de::Error::custom(format!(
                        "{t:?} is not a {} label; use one of {}", stringify!($name),
                        Self::ALL.iter().map(|v| v.label()).collect::<Vec<_>>().join(", ")))),
                }
            }
        }
    };
}

option_set! {
    /// `msdyn_registrationstatus` of `msdyn_iotdevice`.
    RegistrationStatus {
        /// Known only from its telemetry; never registered through iotgw.
        Unknown = 192350000 => "Unknown",
        /// Removed from its provider.
        Unregistered = 192350001 => "Unregistered",
        /// The provider call is under way.
        InProgress = 192350002 => "In Progress",
        /// Registered with its provider.
        Registered = 192350003 => "Registered",
        /// The provider refused; see the registration message.
        Error = 192350004 => "Error",
    }
}

option_set! {
    /// `msdyn_action` of `msdyn_iotdeviceregistrationhistory`.
    RegistrationAction {
        /// The device was registered.
        Register = 192350000 => "Register",
        /// The device was unregistered.
        Unregister = 192350001 => "Unregister",
        /// The device was enabled.
        Activate = 192350002 => "Activate",
        /// The device was disabled.
        Deactivate = 192350003 => "Deactivate",
    }
}

option_set! {
    /// `msdyn_commandstatus` of `msdyn_iotdevicecommand`.
    CommandStatus {
        /// Created, not yet confirmed by the device.
        InProgress = 192350000 => "In Progress",
        /// The device confirmed it.
        Sent = 192350001 => "Sent",
        /// The provider or the device refused it; see the status reason.
        Error = 192350002 => "Error",
    }
}

option_set! {
    /// `msdyn_alerttype` of `msdyn_iotalert`.
    AlertType {
        /// Something is wrong (the default).
        Anomaly = 192350000 => "Anomaly",
        /// For information.
        Info = 192350001 => "Info",
        /// Maintenance is due.
        PreventiveMaintenance = 192350002 => "Preventive Maintenance",
        /// A test alert.
        Test = 192350003 => "Test",
    }
}

option_set! {
    /// `msdyn_issimulated` of `msdyn_iotdevice`.
    IsSimulated {
        /// A simulated device.
        Yes = 192350000 => "Yes",
        /// A real device.
        No = 192350001 => "No",
    }
}

/// The `statecode`/`statuscode` pair of an `msdyn_iotalert`, as Field Service combines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertStatus {
    /// statecode 0 Active, statuscode 1 Active.
    Active,
    /// statecode 1 Inactive, statuscode 2 Inactive.
    Inactive,
    /// statecode 2 In Progress, statuscode 3 Case Created.
    CaseCreated,
    /// statecode 2 In Progress, statuscode 4 Work Order Created.
    WorkOrderCreated,
    /// statecode 2 In Progress, statuscode 5 Command Sent.
    CommandSent,
    /// statecode 3 Closed, statuscode 6 Closed.
    Closed,
    /// statecode 2 In Progress, statuscode 7 Command Failed.
    CommandFailed,
}

impl AlertStatus {
    /// Every status.
    pub const ALL: &'static [Self] = &[
        Self::Active,
        Self::Inactive,
        Self::CaseCreated,
        Self::WorkOrderCreated,
        Self::CommandSent,
        Self::Closed,
        Self::CommandFailed,
    ];

    /// `statecode`.
    pub const fn statecode(self) -> i32 {
        match self {
            Self::Active => 0,
            Self::Inactive => 1,
            Self::CaseCreated
            | Self::WorkOrderCreated
            | Self::CommandSent
            | Self::CommandFailed => 2,
            Self::Closed => 3,
        }
    }

    /// `statuscode`.
    pub const fn statuscode(self) -> i32 {
        match self {
            Self::Active => 1,
            Self::Inactive => 2,
            Self::CaseCreated => 3,
            Self::WorkOrderCreated => 4,
            Self::CommandSent => 5,
            Self::Closed => 6,
            Self::CommandFailed => 7,
        }
    }

    /// The status for a `statuscode` (which determines the `statecode`).
    pub fn from_statuscode(code: i64) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|s| i64::from(s.statuscode()) == code)
    }
}

/// `msdyn_iotdevice`: a device and where it is registered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Primary key.
    #[serde(rename = "msdyn_iotdeviceid")]
    pub id: Uuid,
    /// Display name.
    #[serde(rename = "msdyn_name")]
    pub name: String,
    /// The id used with the provider.
    #[serde(rename = "msdyn_deviceid")]
    pub device_id: DeviceId,
    /// The provider instance (config name) that hosts the device.
    #[serde(rename = "msdyn_iotproviderinstance")]
    pub provider_instance: String,
    /// Category name.
    #[serde(rename = "msdyn_category")]
    pub category: Option<String>,
    /// Owning customer account.
    #[serde(rename = "msdyn_account")]
    pub account: Option<String>,
    /// True when connected.
    #[serde(rename = "msdyn_connectionstate")]
    pub connection_state: bool,
    /// Event time of the connection state (what orders lifecycle events).
    #[serde(rename = "msdyn_connectionstateupdatedtime")]
    pub connection_state_updated_at: Option<DateTime<Utc>>,
    /// Last telemetry or lifecycle event.
    #[serde(rename = "msdyn_lastactivitytime")]
    pub last_activity_time: Option<DateTime<Utc>>,
    /// Reported state (JSON).
    #[serde(rename = "msdyn_devicereportedproperties")]
    pub reported_properties: Option<serde_json::Value>,
    /// Desired settings (JSON).
    #[serde(rename = "msdyn_devicesettings")]
    pub settings: Option<serde_json::Value>,
    /// Tags, key to value.
    #[serde(rename = "msdyn_tags")]
    pub tags: BTreeMap<String, String>,
    /// Registration status.
    #[serde(rename = "msdyn_registrationstatus")]
    pub registration_status: RegistrationStatus,
    /// Why the status is what it is.
    #[serde(rename = "msdyn_registrationmessage")]
    pub registration_message: Option<String>,
    /// Simulated or real.
    #[serde(rename = "msdyn_issimulated")]
    pub is_simulated: IsSimulated,
    /// Created on.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
    /// Modified on.
    #[serde(rename = "modifiedon")]
    pub updated_at: DateTime<Utc>,
}

/// What a caller gives to register (or re-register) a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewDevice {
    /// Display name (defaults to the device id upstream).
    pub name: String,
    /// The device id.
    pub device_id: DeviceId,
    /// The provider instance chosen by the router.
    pub provider_instance: String,
    /// Category name.
    pub category: Option<String>,
    /// Customer account.
    pub account: Option<String>,
    /// Desired settings.
    pub settings: Option<serde_json::Value>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Simulated or real.
    pub is_simulated: IsSimulated,
}

/// `msdyn_iotdeviceregistrationhistory`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegistrationHistory {
    /// Primary key.
    #[serde(rename = "msdyn_iotdeviceregistrationhistoryid")]
    pub id: Uuid,
    /// The device record.
    #[serde(rename = "msdyn_device")]
    pub device: Uuid,
    /// The device id.
    #[serde(rename = "msdyn_deviceid")]
    pub device_id: DeviceId,
    /// A readable name, e.g. "Register pump-01".
    #[serde(rename = "msdyn_name")]
    pub name: String,
    /// What happened.
    #[serde(rename = "msdyn_action")]
    pub action: RegistrationAction,
    /// Provider instance at the time.
    #[serde(rename = "msdyn_iotproviderinstance")]
    pub provider_instance: String,
    /// When.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
}

/// `msdyn_iotdevicecategory`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Category {
    /// Primary key.
    #[serde(rename = "msdyn_iotdevicecategoryid")]
    pub id: Uuid,
    /// Unique name.
    #[serde(rename = "msdyn_name")]
    pub name: String,
    /// Free text.
    #[serde(rename = "msdyn_description")]
    pub description: Option<String>,
    /// Created on.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
}

/// `msdyn_iotdevicecommand`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Primary key.
    #[serde(rename = "msdyn_iotdevicecommandid")]
    pub id: Uuid,
    /// Name (the command name).
    #[serde(rename = "msdyn_name")]
    pub name: String,
    /// The message sent, JSON text, at most 8192 characters.
    #[serde(rename = "msdyn_message")]
    pub message: String,
    /// Status.
    #[serde(rename = "msdyn_commandstatus")]
    pub status: CommandStatus,
    /// Why the status is what it is.
    #[serde(rename = "msdyn_commandstatusreason")]
    pub status_reason: Option<String>,
    /// The device record.
    #[serde(rename = "msdyn_device")]
    pub device: Uuid,
    /// The device id.
    #[serde(rename = "msdyn_deviceid")]
    pub device_id: DeviceId,
    /// The alert that caused it, if any.
    #[serde(rename = "msdyn_parentalert")]
    pub parent_alert: Option<Uuid>,
    /// The send-to-all request it is one of (one command per connected device).
    #[serde(rename = "iotgw_requestid")]
    pub request_id: Option<Uuid>,
    /// The id that ties the device's reply to this command.
    #[serde(rename = "iotgw_correlationid")]
    pub correlation_id: String,
    /// Provider instance it went through.
    #[serde(rename = "msdyn_iotproviderinstance")]
    pub provider_instance: String,
    /// Created on.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
    /// Modified on.
    #[serde(rename = "modifiedon")]
    pub updated_at: DateTime<Utc>,
    /// When the provider took the command (published it, or the device answered a direct
    /// method); None while it waits to be sent.
    #[serde(rename = "iotgw_publishedon")]
    pub published_at: Option<DateTime<Utc>>,
}

/// A command to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCommand {
    /// Command name.
    pub name: String,
    /// JSON text to send.
    pub message: String,
    /// Target device.
    pub device_id: DeviceId,
    /// Causing alert.
    pub parent_alert: Option<Uuid>,
    /// Correlation id (unique).
    pub correlation_id: String,
    /// The send-to-all request it is one of.
    pub request_id: Option<Uuid>,
}

/// `msdyn_iotalert`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Primary key.
    #[serde(rename = "msdyn_iotalertid")]
    pub id: Uuid,
    /// Description, at most 100 characters.
    #[serde(rename = "msdyn_description")]
    pub description: String,
    /// The data the device sent, at most 8192 characters.
    #[serde(rename = "msdyn_alertdata")]
    pub alert_data: String,
    /// When the alert was raised (the telemetry's time).
    #[serde(rename = "msdyn_alerttime")]
    pub alert_time: DateTime<Utc>,
    /// The provider's unique event id: the idempotency key.
    #[serde(rename = "msdyn_alerttoken")]
    pub alert_token: String,
    /// Type.
    #[serde(rename = "msdyn_alerttype")]
    pub alert_type: AlertType,
    /// 0..=100.
    #[serde(rename = "msdyn_alertpriorityscore")]
    pub priority_score: Option<u8>,
    /// The device record.
    #[serde(rename = "msdyn_device")]
    pub device: Uuid,
    /// The device id.
    #[serde(rename = "msdyn_deviceid")]
    pub device_id: DeviceId,
    /// The primary alert this one was folded into.
    #[serde(rename = "msdyn_parentalert")]
    pub parent_alert: Option<Uuid>,
    /// Its token.
    #[serde(rename = "msdyn_parentalerttoken")]
    pub parent_alert_token: Option<String>,
    /// Last command sent in response.
    #[serde(rename = "msdyn_lastcommandsent")]
    pub last_command_sent: Option<Uuid>,
    /// When it was sent.
    #[serde(rename = "msdyn_lastcommandsenttime")]
    pub last_command_sent_time: Option<DateTime<Utc>>,
    /// The Field Service case created from it (a Dataverse record id).
    #[serde(rename = "msdyn_case")]
    pub case: Option<Uuid>,
    /// The work order created from it (a Dataverse record id).
    #[serde(rename = "msdyn_workorder")]
    pub work_order: Option<Uuid>,
    /// `statecode`.
    pub statecode: i32,
    /// `statuscode`.
    pub statuscode: i32,
    /// The rule that raised it.
    #[serde(rename = "iotgw_rule")]
    pub rule: String,
    /// Provider instance the telemetry came through.
    #[serde(rename = "msdyn_iotproviderinstance")]
    pub provider_instance: String,
    /// Created on.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
}

/// Connection state changes kept per device (the oldest go as new ones arrive).
pub const CONNECTION_EVENTS_KEPT: u32 = 100;

/// The most entity links one listing answers.
pub const MAX_ENTITY_LINKS: u32 = 1000;

/// A Field Service record linked to a device (Register Custom Entity): a customer asset
/// or any other entity, by logical name and record id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntityLink {
    /// The entity's logical name (`msdyn_customerasset`).
    #[serde(rename = "EntityLogicalName")]
    pub entity_logical_name: String,
    /// The record's id.
    #[serde(rename = "EntityId")]
    pub entity_id: String,
    /// The device.
    #[serde(rename = "msdyn_deviceid")]
    pub device_id: DeviceId,
    /// When it was linked.
    #[serde(rename = "createdon")]
    pub created_at: DateTime<Utc>,
}

/// Filters for listing entity links.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityLinkFilter {
    /// Only this entity's logical name.
    pub entity_logical_name: Option<String>,
    /// Only this record.
    pub entity_id: Option<String>,
    /// Only this device.
    pub device_id: Option<DeviceId>,
}

/// What Field Service made of an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceWork {
    /// A case (statuscode 3, In Progress – Case Created).
    Case(Uuid),
    /// A work order (statuscode 4, In Progress – Work Order Created).
    WorkOrder(Uuid),
}

impl ServiceWork {
    /// The status it gives the alert.
    pub const fn status(self) -> AlertStatus {
        match self {
            Self::Case(_) => AlertStatus::CaseCreated,
            Self::WorkOrder(_) => AlertStatus::WorkOrderCreated,
        }
    }
}

impl Alert {
    /// The combined state/status.
    pub fn status(&self) -> Option<AlertStatus> {
        AlertStatus::from_statuscode(i64::from(self.statuscode))
    }
}

/// An alert a rule raised, before debounce and storage.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAlert {
    /// Description (cut to 100 characters by the store if longer).
    pub description: String,
    /// The telemetry (cut to 8192 characters by the store if longer).
    pub alert_data: String,
    /// Telemetry time.
    pub alert_time: DateTime<Utc>,
    /// Unique token.
    pub alert_token: String,
    /// Type.
    pub alert_type: AlertType,
    /// Priority.
    pub priority_score: Option<u8>,
    /// Rule name.
    pub rule: String,
    /// Alerts with the same key inside the window fold into one parent.
    pub debounce_key: String,
    /// A command to create with this alert as parent, if the rule asks for one.
    pub command: Option<NewAlertCommand>,
}

/// A command a rule sends in response to its alert.
#[derive(Clone, Debug, PartialEq)]
pub struct NewAlertCommand {
    /// Command name.
    pub name: String,
    /// JSON text.
    pub message: String,
    /// Correlation id.
    pub correlation_id: String,
}

/// Everything one telemetry message changes, committed in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryCommit {
    /// The device (must exist).
    pub device_id: DeviceId,
    /// When the message was received.
    pub received_at: DateTime<Utc>,
    /// Alerts raised by rules.
    pub alerts: Vec<NewAlert>,
    /// Debounce window.
    pub debounce_window: chrono::Duration,
    /// Sinks that get an outbox item per new alert.
    pub sinks: Vec<String>,
    /// The message's measures, kept as readings (none when readings are off); boxed, as
    /// most of a batch's other writes do not carry it.
    pub readings: Box<crate::readings::Readings>,
}

/// The change-feed entity of a device record.
pub const ENTITY_DEVICE: &str = "msdyn_iotdevice";
/// The change-feed entity of an alert record.
pub const ENTITY_ALERT: &str = "msdyn_iotalert";
/// The change-feed entity of a device command record.
pub const ENTITY_COMMAND: &str = "msdyn_iotdevicecommand";
/// The change-feed entity of a registration history record (immutable: one event each).
pub const ENTITY_HISTORY: &str = "msdyn_iotdeviceregistrationhistory";
/// The change-feed entity of a device category record.
pub const ENTITY_CATEGORY: &str = "msdyn_iotdevicecategory";

/// What one sink takes from the change feed.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    /// Field Service logical names (`msdyn_iotalert`, `msdyn_iotdevice`, ...).
    pub entities: Vec<String>,
    /// A device's connection-state change is queued at most once per this interval: a
    /// newer one replaces the item still waiting (not leased) for the sink.
    pub coalesce_connection: chrono::Duration,
    /// Whether the sink takes an alert's changes after its creation (when `entities` lists
    /// `msdyn_iotalert`, a sink configured without `entities` takes the new alerts alone).
    pub alert_changes: bool,
}

/// Which sinks take which entities' change events, by sink name. The store is told once at
/// start-up and after each reload ([`crate::Store::set_subscriptions`]); a sink it was
/// never told about takes the new alerts only (the behaviour before the change feed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Subscriptions {
    sinks: std::collections::BTreeMap<String, Subscription>,
}

impl Subscriptions {
    /// `sink` takes `subscription`'s entities (replacing what it took before).
    pub fn insert(&mut self, sink: impl Into<String>, subscription: Subscription) {
        self.sinks.insert(sink.into(), subscription);
    }

    /// Whether `sink` takes `entity`'s change events.
    pub fn takes(&self, sink: &str, entity: &str) -> bool {
        match self.sinks.get(sink) {
            Some(s) => s.entities.iter().any(|e| e == entity),
            None => entity == ENTITY_ALERT,
        }
    }

    /// The sinks that take `entity`, with their subscriptions, by name.
    pub fn sinks_taking<'a>(
        &'a self,
        entity: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Subscription)> + 'a {
        self.sinks
            .iter()
            .filter(move |(_, s)| s.entities.iter().any(|e| e == entity))
            .map(|(n, s)| (n.as_str(), s))
    }

    /// The names of the sinks that take `entity`, in name order.
    pub fn sink_names<'a>(&'a self, entity: &'a str) -> Vec<&'a str> {
        self.sinks_taking(entity).map(|(n, _)| n).collect()
    }

    /// The sinks that take alerts' changes after their creation, by name.
    pub fn alert_change_sinks(&self) -> Vec<&str> {
        self.sinks_taking(ENTITY_ALERT)
            .filter(|(_, s)| s.alert_changes)
            .map(|(n, _)| n)
            .collect()
    }
}

/// The outbox idempotency key of a change event: `<entity>:<key>:<version>`.
pub fn change_key(entity: &str, key: &str, version: i64) -> String {
    format!("{entity}:{key}:{version}")
}

/// The outbox payload of a change event: `{"entity", "key", "version", "state"}`, the state
/// being the record as the API shows it (serialized with serde).
pub fn change_payload(
    entity: &str,
    key: &str,
    version: i64,
    state: &impl Serialize,
) -> crate::StoreResult<serde_json::Value> {
    Ok(serde_json::json!({
        "entity": entity,
        "key": key,
        "version": version,
        "state": serde_json::to_value(state).map_err(|e| {
            crate::StoreError::Database(format!("serializing a {entity} record: {e}"))
        })?,
    }))
}

/// The outbox payload of a device's change event: the entity, its key (`msdyn_deviceid`),
/// its change version and the record as the API shows it, plus `"refs": {"msdyn_category":
/// <id>}` when the device names a category that exists (`category_id`; no `refs` otherwise).
pub fn device_change_payload(
    device: &Device,
    version: i64,
    category_id: Option<Uuid>,
) -> crate::StoreResult<serde_json::Value> {
    let mut payload = change_payload(ENTITY_DEVICE, device.device_id.as_str(), version, device)?;
    if let (Some(id), Some(fields)) = (category_id, payload.as_object_mut()) {
        fields.insert(
            "refs".into(),
            serde_json::json!({ "msdyn_category": id.to_string() }),
        );
    }
    Ok(payload)
}

/// One change event to queue for every sink taking its entity (see `change_payload`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ChangeEvent {
    /// The record, `<entity>:<key>` (the outbox `change_of`).
    pub change_of: String,
    /// The idempotency key, `<entity>:<key>:<version>` ([`change_key`]).
    pub key: String,
    /// The payload.
    pub payload: serde_json::Value,
}

impl ChangeEvent {
    /// The change event of version `version` of record `key` of `entity`, whose state is
    /// `state`.
    pub(crate) fn new(
        entity: &str,
        key: &str,
        version: i64,
        state: &impl Serialize,
    ) -> crate::StoreResult<Self> {
        Ok(Self {
            change_of: format!("{entity}:{key}"),
            key: change_key(entity, key, version),
            payload: change_payload(entity, key, version, state)?,
        })
    }
}

/// One alert after commit.
#[derive(Clone, Debug, PartialEq)]
pub struct CommittedAlert {
    /// The stored alert.
    pub alert: Alert,
    /// True when the token was already stored: nothing was written for it.
    pub duplicate: bool,
    /// The command created with it, if any (None for duplicates).
    pub command: Option<Command>,
}

/// An item waiting for delivery to a sink.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutboxItem {
    /// Sequence number (delivery order per sink).
    pub id: i64,
    /// Sink name.
    pub sink: String,
    /// The JSON to deliver.
    pub payload: serde_json::Value,
    /// Stable key for the receiver to drop duplicates.
    pub idempotency_key: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Last error.
    pub last_error: Option<String>,
    /// Created on.
    pub created_at: DateTime<Utc>,
    /// The fencing token of the claim that handed this item out: every claim increments
    /// it, and only the holder of the newest claim can mark the item.
    pub lease_token: i64,
    /// The record a change event (or a new alert) is about, `<entity>:<key>`: a sink gets
    /// one record's items in outbox order, none claimed while an earlier one of the same
    /// record waits for its retry or is leased ([`crate::Store::claim_outbox`]).
    pub change_of: Option<String>,
}

impl OutboxItem {
    /// The lease this item was claimed under.
    pub fn lease(&self) -> OutboxLease {
        OutboxLease {
            id: self.id,
            token: self.lease_token,
        }
    }
}

/// One claim on an outbox item: the item and the claim's fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutboxLease {
    /// The item.
    pub id: i64,
    /// The claim's fencing token ([`OutboxItem::lease_token`]).
    pub token: i64,
}

/// A message or delivery that can never succeed, kept with the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Sequence number.
    pub id: i64,
    /// Where it came from: `telemetry:<provider>` or `sink:<name>`.
    pub source: String,
    /// Why it cannot be processed.
    pub reason: String,
    /// Device id as received (may be invalid).
    pub device_id: Option<String>,
    /// Provider message id or outbox idempotency key.
    pub message_id: Option<String>,
    /// The payload, lossily decoded as UTF-8; beyond [`MAX_DEAD_LETTER_PAYLOAD`] bytes cut,
    /// ending in a note with its full size and SHA-256.
    pub payload: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// The most of a dead letter's payload the store keeps (bytes of UTF-8).
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 64 * 1024;
/// The most of a dead letter's device id or message id the store keeps (they come from
/// input: a device may send any string).
pub const MAX_DEAD_LETTER_ID: usize = 256;

/// A dead letter to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewDeadLetter {
    /// See [`DeadLetter::source`].
    pub source: String,
    /// See [`DeadLetter::reason`].
    pub reason: String,
    /// See [`DeadLetter::device_id`].
    pub device_id: Option<String>,
    /// See [`DeadLetter::message_id`].
    pub message_id: Option<String>,
    /// See [`DeadLetter::payload`].
    pub payload: String,
}

impl NewDeadLetter {
    /// The payload as stored: whole up to [`MAX_DEAD_LETTER_PAYLOAD`] bytes, else its
    /// beginning and a note with the full size and the SHA-256 of the whole payload, so a
    /// flood of big junk cannot grow the store by more than that per letter and the
    /// original can still be matched.
    pub fn stored_payload(&self) -> std::borrow::Cow<'_, str> {
        cut_noting(&self.payload, MAX_DEAD_LETTER_PAYLOAD)
    }

    /// The device id as stored (at most [`MAX_DEAD_LETTER_ID`] bytes, then a note).
    pub fn stored_device_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.device_id
            .as_deref()
            .map(|s| cut_noting(s, MAX_DEAD_LETTER_ID))
    }

    /// The message id as stored (at most [`MAX_DEAD_LETTER_ID`] bytes, then a note).
    pub fn stored_message_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.message_id
            .as_deref()
            .map(|s| cut_noting(s, MAX_DEAD_LETTER_ID))
    }
}

/// `s` whole when it has at most `max` bytes, else its first `max` bytes (on a character
/// boundary) and ` [iotgw: cut, <n> bytes, sha256 <hex>]`.
fn cut_noting(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    use sha2::Digest;
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{} [iotgw: cut, {} bytes, sha256 {}]",
        &s[..end],
        s.len(),
        hex::encode(sha2::Sha256::digest(s.as_bytes()))
    ))
}

/// A replica's claim on one partition of a provider's stream (an Event Hubs partition):
/// while it has not expired, its owner alone reads the partition; the owner renews it
/// before it expires, and once expired any replica may take it over. Written with
/// optimistic concurrency on `version` ([`crate::Store::claim_ownership`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// The provider instance.
    pub scope: String,
    /// The partition, in the provider's own terms.
    pub partition: String,
    /// The replica that claimed it.
    pub owner: String,
    /// Bumped by every write; a claim names the version it read.
    pub version: i64,
    /// Until when the claim holds unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl Ownership {
    /// Whether the claim no longer holds at `now` (an expired claim is nobody's).
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// Filters for listing devices.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct DeviceFilter {
    /// Only this provider instance.
    pub provider_instance: Option<String>,
    /// Only this category.
    pub category: Option<String>,
    /// Only this registration status.
    pub registration_status: Option<RegistrationStatus>,
    /// Only connected (true) or disconnected (false).
    pub connected: Option<bool>,
}

/// Filters for listing alerts.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct AlertFilter {
    /// Only this device.
    pub device_id: Option<DeviceId>,
    /// Only this statecode.
    pub statecode: Option<i32>,
    /// Only alerts with this parent.
    pub parent_alert: Option<Uuid>,
    /// Only primary alerts (no parent) when true; only children when false.
    pub primary: Option<bool>,
    /// Only this type.
    pub alert_type: Option<AlertType>,
}

/// Filters for listing commands.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CommandFilter {
    /// Only this device.
    pub device_id: Option<DeviceId>,
    /// Only this status.
    pub status: Option<CommandStatus>,
    /// Only commands caused by this alert.
    pub parent_alert: Option<Uuid>,
    /// Only the commands of this send-to-all request.
    pub request_id: Option<Uuid>,
}

/// Keyset paging: items after `after` (an opaque cursor from the previous page), at most `limit`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct PageRequest {
    /// Cursor from the previous page's `next`.
    pub after: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            after: None,
            limit: 100,
        }
    }
}

/// A page of results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor for the next page; None on the last page.
    pub next: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_sets_carry_dataverse_values_and_labels() {
        assert_eq!(RegistrationStatus::Registered.value(), 192350003);
        assert_eq!(
            RegistrationStatus::from_label("in progress"),
            Some(RegistrationStatus::InProgress)
        );
        assert_eq!(
            CommandStatus::from_value(192350002),
            Some(CommandStatus::Error)
        );
        assert_eq!(
            AlertType::from_label("Preventive_Maintenance"),
            Some(AlertType::PreventiveMaintenance)
        );
        assert_eq!(
            serde_json::to_string(&AlertType::Test).expect("json"),
            "192350003"
        );
        assert_eq!(
            serde_json::from_str::<AlertType>("\"Info\"").expect("label"),
            AlertType::Info
        );
        let err = serde_json::from_str::<AlertType>("7")
            .expect_err("bad")
            .to_string();
        assert!(err.contains("192350000 (Anomaly)"), "{err}");
    }

    #[test]
    fn alert_status_pairs_match_field_service() {
        let pairs: Vec<(i32, i32)> = AlertStatus::ALL
            .iter()
            .map(|s| (s.statecode(), s.statuscode()))
            .collect();
        assert_eq!(
            pairs,
            vec![(0, 1), (1, 2), (2, 3), (2, 4), (2, 5), (3, 6), (2, 7)]
        );
        assert_eq!(
            AlertStatus::from_statuscode(7),
            Some(AlertStatus::CommandFailed)
        );
    }
}

/// What retention may delete, by age (`created_at` before the time; `None` keeps the table
/// whole). See [`crate::Store::purge`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeBefore {
    /// Dead letters.
    pub dead_letters: Option<DateTime<Utc>>,
    /// Commands that are no longer In Progress.
    pub commands: Option<DateTime<Utc>>,
    /// Alerts that are Inactive or Closed and have no child left.
    pub alerts: Option<DateTime<Utc>>,
    /// Readings measured before.
    pub readings: Option<DateTime<Utc>>,
    /// Per-minute reading rollups whose minute started before.
    pub minute_rollups: Option<DateTime<Utc>>,
    /// Hourly reading rollups whose hour started before.
    pub hour_rollups: Option<DateTime<Utc>>,
}

/// How many rows one [`crate::Store::purge`] deleted, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Dead letters.
    pub dead_letters: u64,
    /// Commands.
    pub commands: u64,
    /// Alerts.
    pub alerts: u64,
    /// Readings.
    pub readings: u64,
    /// Reading rollups, both resolutions.
    pub rollups: u64,
}
