//! What the Dataverse sink writes for each outbox item: the request path, its condition
//! (`If-None-Match: *`, `If-Match: *` or none) and the JSON body, in Field Service's logical
//! names and option values, lookups bound with `@odata.bind`.
//!
//! Entity set and navigation property names, from Microsoft's Dynamics 365 table/entity
//! reference (MicrosoftDocs/dynamics-365-customer-engagement,
//! `ce/developer/reference/entities/<logical name>.md`), "EntitySetName" and the many-to-one
//! relationships' "ReferencingEntityNavigationPropertyName":
//! - `msdyn_iotdevice`: EntitySetName `msdyn_iotdevices`; `msdyn_Category`
//!   (`msdyn_msdyn_iotdevicecategory_msdyn_iotdevice_Category`, ReferencingAttribute
//!   `msdyn_category`), `msdyn_IoTProviderInstance`
//!   (`msdyn_msdyn_iotproviderinstance_msdyn_iotdevice_IoTProviderInstance`,
//!   `msdyn_iotproviderinstance`).
//! - `msdyn_iotdevicecommand`: "`PATCH` /msdyn_iotdevicecommands(*msdyn_iotdevicecommandid*)";
//!   `msdyn_Device` (`msdyn_msdyn_iotdevice_msdyn_iotdevicecommand_Device`, `msdyn_device`),
//!   `msdyn_ParentAlert` (`msdyn_msdyn_iotalert_msdyn_iotdevicecommand_ParentAlert`,
//!   `msdyn_parentalert`).
//! - `msdyn_iotdeviceregistrationhistory`: EntitySetName
//!   `msdyn_iotdeviceregistrationhistories`; `msdyn_Device`
//!   (`msdyn_msdyn_iotdevice_msdyn_iotdeviceregistrationhistory_Device`, `msdyn_device`).
//! - `msdyn_iotdevicecategory`: EntitySetName `msdyn_iotdevicecategories`; writable columns
//!   `msdyn_name` (and system ones) only, so a category's description is not written.
//! - `msdyn_iotproviderinstance`: EntitySetName `msdyn_iotproviderinstances`.
//! - `msdyn_iotalert`: `msdyn_iotalerts`; `msdyn_Device`, `msdyn_ParentAlert`
//!   (`msdyn_iotalert_msdyn_iotalert`), `msdyn_LastCommandSent`
//!   (`msdyn_msdyn_iotdevicecommand_msdyn_iotalert_LastCommandSent`, `msdyn_lastcommandsent`).
//!
//! Column lengths from the same reference: `msdyn_devicereportedproperties`,
//! `msdyn_devicesettings` and `msdyn_tags` are Memo, MaxLength 8000;
//! `msdyn_registrationmessage` and `msdyn_commandstatusreason` Memo, MaxLength 2000;
//! `msdyn_message` Memo, MaxLength 8192; `msdyn_name` String, MaxLength 100.

use std::collections::BTreeMap;

use iotgw_config::DataverseDeviceBinding;
use iotgw_registry::{Alert, Category, Command, Device, DeviceId, RegistrationHistory};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::string_key;

/// `msdyn_iotalert`'s logical name.
pub const ALERT: &str = iotgw_registry::ENTITY_ALERT;
/// `msdyn_iotdevice`'s logical name.
pub const DEVICE: &str = iotgw_registry::ENTITY_DEVICE;
/// `msdyn_iotdevicecommand`'s logical name.
pub const COMMAND: &str = iotgw_registry::ENTITY_COMMAND;
/// `msdyn_iotdeviceregistrationhistory`'s logical name.
pub const REGISTRATION_HISTORY: &str = iotgw_registry::ENTITY_HISTORY;
/// `msdyn_iotdevicecategory`'s logical name.
pub const CATEGORY: &str = iotgw_registry::ENTITY_CATEGORY;

/// MaxLength of the JSON and tag memo columns of `msdyn_iotdevice`.
pub const DEVICE_MEMO_MAX: usize = 8000;
/// MaxLength of `msdyn_registrationmessage` and `msdyn_commandstatusreason`.
pub const REASON_MAX: usize = 2000;

/// What a write must find, as a precondition header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// A plain upsert: created or updated.
    Upsert,
    /// `If-None-Match: *` ("Prevent update in upsert"): created, never updated; 412 means an
    /// earlier attempt created it, so the item is delivered.
    CreateOnly,
    /// `If-Match: *` ("Prevent create in upsert"): updated, never created; 404 (and 412)
    /// means the record is gone from Dataverse.
    UpdateOnly,
}

impl Condition {
    /// The header that expresses it, if any.
    pub fn header(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Upsert => None,
            Self::CreateOnly => Some(("If-None-Match", "*")),
            Self::UpdateOnly => Some(("If-Match", "*")),
        }
    }
}

/// One request for one outbox item: `PATCH {api}/{path}` with `body`.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    /// The entity's logical name.
    pub entity: &'static str,
    /// The record's path below `{url}/api/data/v9.2/`, e.g. `msdyn_iotalerts(<id>)`.
    pub path: String,
    /// The precondition.
    pub condition: Condition,
    /// The JSON body.
    pub body: Value,
    /// Columns left out because their value is longer than Dataverse takes (logged).
    pub omitted: Vec<(&'static str, usize)>,
}

/// What the binds of a write depend on: the sink's settings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Binding {
    /// How a record points at its device.
    pub device: DataverseDeviceBinding,
    /// The entities the sink writes (a lookup is bound only to an entity it writes).
    pub entities: Vec<String>,
    /// `msdyn_iotproviderinstance` record ids by provider instance name.
    pub provider_instances: BTreeMap<String, Uuid>,
}

impl Binding {
    fn takes(&self, entity: &str) -> bool {
        self.entities.iter().any(|e| e == entity)
    }

    /// `/msdyn_iotdevices(<id>)`, `/msdyn_iotdevices(msdyn_deviceid='<id>')` or nothing.
    fn device_ref(&self, record: Uuid, device_id: &DeviceId) -> Option<String> {
        match self.device {
            DataverseDeviceBinding::Id => Some(format!("/msdyn_iotdevices({record})")),
            DataverseDeviceBinding::DeviceId => Some(format!(
                "/msdyn_iotdevices({})",
                string_key("msdyn_deviceid", device_id.as_str())
            )),
            DataverseDeviceBinding::None => None,
        }
    }

    fn bind_device(&self, r: &mut Map<String, Value>, record: Uuid, device_id: &DeviceId) {
        if let Some(path) = self.device_ref(record, device_id) {
            r.insert("msdyn_Device@odata.bind".into(), json!(path));
        }
    }
}

fn time(t: chrono::DateTime<chrono::Utc>) -> Value {
    json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// The length Dataverse counts (UTF-16 code units, as .NET strings do).
fn dataverse_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// `s` cut to at most `max` UTF-16 code units, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut n = 0;
    s.chars()
        .take_while(|c| {
            n += c.len_utf16();
            n <= max
        })
        .collect()
}

/// Puts `text` in `column` when it fits `max`; otherwise leaves the column out (the record
/// keeps what it had) and notes it.
fn memo(
    r: &mut Map<String, Value>,
    omitted: &mut Vec<(&'static str, usize)>,
    column: &'static str,
    text: Option<String>,
    max: usize,
) {
    match text {
        Some(t) if dataverse_len(&t) > max => omitted.push((column, dataverse_len(&t))),
        Some(t) => {
            r.insert(column.into(), json!(t));
        }
        None => {
            r.insert(column.into(), Value::Null);
        }
    }
}

/// The `msdyn_iotalert` body of a new alert: logical names, option values, lookups bound.
pub fn record(alert: &Alert, binding: DataverseDeviceBinding) -> Value {
    let mut r = Map::new();
    r.insert("msdyn_description".into(), json!(alert.description));
    r.insert("msdyn_alertdata".into(), json!(alert.alert_data));
    r.insert("msdyn_alerttime".into(), time(alert.alert_time));
    r.insert("msdyn_alerttoken".into(), json!(alert.alert_token));
    r.insert("msdyn_alerttype".into(), json!(alert.alert_type.value()));
    if let Some(score) = alert.priority_score {
        r.insert("msdyn_alertpriorityscore".into(), json!(score));
    }
    r.insert("msdyn_deviceid".into(), json!(alert.device_id.as_str()));
    let b = Binding {
        device: binding,
        ..Binding::default()
    };
    b.bind_device(&mut r, alert.device, &alert.device_id);
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

/// A new alert: create-only by its own id.
pub fn alert_create(alert: &Alert, binding: &Binding) -> Write {
    Write {
        entity: ALERT,
        path: format!("msdyn_iotalerts({})", alert.id),
        condition: Condition::CreateOnly,
        body: record(alert, binding.device),
        omitted: Vec::new(),
    }
}

/// A later change of an alert (change version 2 and up): update only, and only what iotgw
/// owns: `statecode` + `statuscode`, the parent (bind and token) and the last command sent
/// (bind, when the sink writes commands, and time). Never `msdyn_case`/`msdyn_workorder`:
/// Field Service sets those.
pub fn alert_update(alert: &Alert, binding: &Binding) -> Write {
    let mut r = Map::new();
    r.insert("statecode".into(), json!(alert.statecode));
    r.insert("statuscode".into(), json!(alert.statuscode));
    if let Some(parent) = alert.parent_alert {
        r.insert(
            "msdyn_ParentAlert@odata.bind".into(),
            json!(format!("/msdyn_iotalerts({parent})")),
        );
    }
    if let Some(token) = &alert.parent_alert_token {
        r.insert("msdyn_parentalerttoken".into(), json!(token));
    }
    if let Some(command) = alert.last_command_sent.filter(|_| binding.takes(COMMAND)) {
        r.insert(
            "msdyn_LastCommandSent@odata.bind".into(),
            json!(format!("/msdyn_iotdevicecommands({command})")),
        );
    }
    if let Some(t) = alert.last_command_sent_time {
        r.insert("msdyn_lastcommandsenttime".into(), time(t));
    }
    Write {
        entity: ALERT,
        path: format!("msdyn_iotalerts({})", alert.id),
        condition: Condition::UpdateOnly,
        body: Value::Object(r),
        omitted: Vec::new(),
    }
}

/// A device: upserted by its `msdyn_deviceid` alternate key (`device_binding = "device_id"`)
/// or by the gateway's record id. `category` is the category record's id (the change
/// event's `refs.msdyn_category`).
pub fn device(device: &Device, category: Option<Uuid>, binding: &Binding) -> Write {
    let mut r = Map::new();
    let mut omitted = Vec::new();
    r.insert("msdyn_name".into(), json!(device.name));
    r.insert("msdyn_deviceid".into(), json!(device.device_id.as_str()));
    r.insert(
        "msdyn_connectionstate".into(),
        json!(device.connection_state),
    );
    r.insert(
        "msdyn_lastactivitytime".into(),
        device.last_activity_time.map_or(Value::Null, time),
    );
    memo(
        &mut r,
        &mut omitted,
        "msdyn_devicereportedproperties",
        device.reported_properties.as_ref().map(Value::to_string),
        DEVICE_MEMO_MAX,
    );
    memo(
        &mut r,
        &mut omitted,
        "msdyn_devicesettings",
        device.settings.as_ref().map(Value::to_string),
        DEVICE_MEMO_MAX,
    );
    memo(
        &mut r,
        &mut omitted,
        "msdyn_tags",
        (!device.tags.is_empty()).then(|| json!(device.tags).to_string()),
        DEVICE_MEMO_MAX,
    );
    r.insert(
        "msdyn_registrationstatus".into(),
        json!(device.registration_status.value()),
    );
    r.insert(
        "msdyn_registrationmessage".into(),
        device
            .registration_message
            .as_deref()
            .map_or(Value::Null, |m| json!(cut(m, REASON_MAX))),
    );
    r.insert(
        "msdyn_issimulated".into(),
        json!(device.is_simulated.value()),
    );
    if let Some(category) = category.filter(|_| binding.takes(CATEGORY)) {
        r.insert(
            "msdyn_Category@odata.bind".into(),
            json!(format!("/msdyn_iotdevicecategories({category})")),
        );
    }
    if let Some(instance) = binding.provider_instances.get(&device.provider_instance) {
        r.insert(
            "msdyn_IoTProviderInstance@odata.bind".into(),
            json!(format!("/msdyn_iotproviderinstances({instance})")),
        );
    }
    let path = match binding.device {
        DataverseDeviceBinding::DeviceId => format!(
            "msdyn_iotdevices({})",
            string_key("msdyn_deviceid", device.device_id.as_str())
        ),
        DataverseDeviceBinding::Id | DataverseDeviceBinding::None => {
            format!("msdyn_iotdevices({})", device.id)
        }
    };
    Write {
        entity: DEVICE,
        path,
        condition: Condition::Upsert,
        body: Value::Object(r),
        omitted,
    }
}

/// A registration history row: created once (it never changes), by its own id.
pub fn registration_history(row: &RegistrationHistory, binding: &Binding) -> Write {
    let mut r = Map::new();
    r.insert("msdyn_name".into(), json!(row.name));
    r.insert("msdyn_action".into(), json!(row.action.value()));
    binding.bind_device(&mut r, row.device, &row.device_id);
    Write {
        entity: REGISTRATION_HISTORY,
        path: format!("msdyn_iotdeviceregistrationhistories({})", row.id),
        condition: Condition::CreateOnly,
        body: Value::Object(r),
        omitted: Vec::new(),
    }
}

/// A category: upserted by its id (its name only: the table has no description column).
pub fn category(category: &Category) -> Write {
    Write {
        entity: CATEGORY,
        path: format!("msdyn_iotdevicecategories({})", category.id),
        condition: Condition::Upsert,
        body: json!({ "msdyn_name": category.name }),
        omitted: Vec::new(),
    }
}

/// A command: upserted by its id; its parent alert bound when the sink writes alerts.
pub fn command(command: &Command, binding: &Binding) -> Write {
    let mut r = Map::new();
    r.insert("msdyn_name".into(), json!(command.name));
    r.insert("msdyn_message".into(), json!(command.message));
    r.insert("msdyn_commandstatus".into(), json!(command.status.value()));
    r.insert(
        "msdyn_commandstatusreason".into(),
        command
            .status_reason
            .as_deref()
            .map_or(Value::Null, |m| json!(cut(m, REASON_MAX))),
    );
    r.insert("msdyn_deviceid".into(), json!(command.device_id.as_str()));
    binding.bind_device(&mut r, command.device, &command.device_id);
    if let Some(parent) = command.parent_alert.filter(|_| binding.takes(ALERT)) {
        r.insert(
            "msdyn_ParentAlert@odata.bind".into(),
            json!(format!("/msdyn_iotalerts({parent})")),
        );
    }
    Write {
        entity: COMMAND,
        path: format!("msdyn_iotdevicecommands({})", command.id),
        condition: Condition::Upsert,
        body: Value::Object(r),
        omitted: Vec::new(),
    }
}

/// The write for an outbox payload: a new alert's `Alert` JSON (no change event), or a
/// change event `{"entity", "key", "version", "state", "refs"?}`. `Err` names why the
/// payload can never be written.
pub fn for_payload(
    change_entity: Option<&str>,
    payload: &Value,
    binding: &Binding,
) -> Result<Write, String> {
    fn state<T: serde::de::DeserializeOwned>(payload: &Value, entity: &str) -> Result<T, String> {
        serde_json::from_value(payload["state"].clone())
            .map_err(|e| format!("the {entity} change event's state is not an {entity}: {e}"))
    }
    let Some(entity) = change_entity else {
        let alert: Alert = serde_json::from_value(payload.clone())
            .map_err(|e| format!("the outbox payload is not an msdyn_iotalert: {e}"))?;
        return Ok(alert_create(&alert, binding));
    };
    match entity {
        ALERT => {
            let alert: Alert = state(payload, entity)?;
            if payload["version"].as_i64().unwrap_or(1) >= 2 {
                Ok(alert_update(&alert, binding))
            } else {
                Ok(alert_create(&alert, binding))
            }
        }
        DEVICE => {
            let d: Device = state(payload, entity)?;
            let category = match &payload["refs"]["msdyn_category"] {
                Value::Null => None,
                v => Some(
                    v.as_str()
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .ok_or_else(|| {
                            format!("refs.msdyn_category {v} of the msdyn_iotdevice change event is not a record id")
                        })?,
                ),
            };
            Ok(device(&d, category, binding))
        }
        COMMAND => Ok(command(&state(payload, entity)?, binding)),
        REGISTRATION_HISTORY => Ok(registration_history(&state(payload, entity)?, binding)),
        CATEGORY => Ok(category(&state(payload, entity)?)),
        other => Err(format!(
            "the dataverse sink does not write {other} records (it writes {ALERT}, {DEVICE}, {COMMAND}, {REGISTRATION_HISTORY} and {CATEGORY})"
        )),
    }
}
