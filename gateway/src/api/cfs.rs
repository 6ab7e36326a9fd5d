//! Field Service's IoT provider actions over HTTP (`/api/cfs/v1/...`), with the request and
//! response JSON Field Service sends and expects (Microsoft's "Configure IoT provider
//! actions"): register devices, pull device data, query device readings, aggregated
//! device readings, send command (to one device or to every connected one), send test
//! alert, register custom entity, update device data, and the JSON getters.
//!
//! Field Service names a device by its `msdyn_iotdeviceid` (the GUID of its record in
//! Dataverse). A request's entity may carry `msdyn_deviceid` too; without it the GUID
//! itself is the device's id here, so the actions that follow find it by that GUID again.
//! A measure is answered under its JSON pointer without the leading `/` (`Temperature`,
//! `engine/temp`), as Field Service shows measure names.

use std::collections::BTreeMap;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use iotgw_registry::{DeviceId, ReadingBucket, ReadingQuery, RegistrationStatus};
use serde::Deserialize;
use serde_json::{json, Value};

use super::readings::iso8601_seconds;
use super::schemas::{
    self, BadRequest, BadRequestOrProviderInvalid, Conflict, MisdirectedRequest, NotFound,
    PayloadTooLarge, ProviderFailed, StoreUnavailable, Throttled, Unauthorized, Unsupported,
};
use super::{ApiError, ApiState};
use crate::core::{GatewayError, RegisterRequest};

/// Devices one register or pull request may name.
const MAX_ENTITIES: usize = 1000;
/// Measures one aggregated-readings request may ask for.
const MAX_AGGREGATES: usize = 100;
/// Devices one send-to-all request may reach; narrow a larger fleet by instance or
/// category.
const MAX_SEND_TO_ALL: usize = 10_000;
/// The aggregates Field Service asks for (any case).
const AGGREGATES: [&str; 6] = ["min", "max", "avg", "average", "sum", "count"];

/// One entity of an `EntityCollection`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct Entity {
    /// The device record's GUID in Dataverse; the device's id here unless msdyn_deviceid is
    /// given.
    msdyn_iotdeviceid: String,
    #[serde(default)]
    msdyn_name: Option<String>,
    /// The device's id at the provider, when known.
    #[serde(default)]
    msdyn_deviceid: Option<String>,
    #[serde(rename = "@odata.type", default)]
    _odata_type: Option<String>,
}

impl Entity {
    /// The device's id here: `msdyn_deviceid`, else the record's GUID.
    fn device_id(&self) -> &str {
        self.msdyn_deviceid
            .as_deref()
            .unwrap_or(&self.msdyn_iotdeviceid)
    }
}

/// The entities of a Register Device or Pull Device Data request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct EntityCollection {
    /// At most 1,000 entities.
    #[serde(rename = "EntityCollection")]
    #[schema(max_items = 1000)]
    entities: Vec<Entity>,
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::invalid("request body", e.body_text()))
}

fn entities(b: Result<Json<EntityCollection>, JsonRejection>) -> Result<Vec<Entity>, ApiError> {
    let c = body(b)?;
    if c.entities.len() > MAX_ENTITIES {
        return Err(ApiError::invalid(
            "EntityCollection",
            format!(
                "{} entities: at most {MAX_ENTITIES} per request; send several",
                c.entities.len()
            ),
        ));
    }
    Ok(c.entities)
}

/// The measure name Field Service shows: the pointer without its leading `/`.
fn measure_name(pointer: &str) -> &str {
    pointer.strip_prefix('/').unwrap_or(pointer)
}

/// A registration's status and message as Field Service shows them: a device already
/// Registered is Registered (with why nothing changed), a refusal is Error with why.
fn registration_result(
    outcome: Result<crate::core::Registered, GatewayError>,
) -> (RegistrationStatus, String) {
    match outcome {
        Ok(r) => (
            r.device.registration_status,
            r.device.registration_message.unwrap_or_default(),
        ),
        Err(GatewayError::AlreadyRegistered(m)) => (RegistrationStatus::Registered, m),
        Err(GatewayError::Invalid { field, message }) => (
            RegistrationStatus::Error,
            format!("invalid {field}: {message}"),
        ),
        Err(other) => (RegistrationStatus::Error, other.to_string()),
    }
}

/// Register Custom Entity's input: records of one entity, each with its device (an empty
/// or missing one: a new device whose id is the record's id) and the name for a new
/// device.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CustomEntities {
    /// The records' ids, at most 1,000, each 1 to 100 bytes and not blank.
    #[serde(rename = "EntityIds")]
    #[schema(max_items = 1000, schema_with = entity_ids)]
    entity_ids: Vec<String>,
    /// The entity's logical name, e.g. msdyn_customerasset.
    #[serde(rename = "EntityLogicalName")]
    #[schema(pattern = "^[a-z0-9_]{1,100}$")]
    logical_name: String,
    /// One per record, or none.
    #[serde(rename = "DeviceIds", default)]
    device_ids: Vec<String>,
    /// One per record (the name of a new device), or none.
    #[serde(rename = "Names", default)]
    names: Vec<String>,
}

/// `EntityIds`: at most 1,000 record ids of 1 to 100 characters.
fn entity_ids() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .description(Some(
            "The records' ids: at most 1,000, each not blank and at most 100 bytes.",
        ))
        .max_items(Some(MAX_ENTITIES))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_ENTITY_KEY))
                .pattern(Some(r"\S")),
        )
        .into()
}

/// The longest entity logical name or record id kept.
const MAX_ENTITY_KEY: usize = 100;

impl CustomEntities {
    fn check(&self) -> Result<(), ApiError> {
        let n = self.entity_ids.len();
        if n > MAX_ENTITIES {
            return Err(ApiError::invalid(
                "EntityIds",
                format!("{n} records: at most {MAX_ENTITIES} per request; send several"),
            ));
        }
        let name_ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
        if self.logical_name.is_empty()
            || self.logical_name.len() > MAX_ENTITY_KEY
            || !self.logical_name.chars().all(name_ok)
        {
            return Err(ApiError::invalid(
                "EntityLogicalName",
                format!(
                    "{:?} is not a logical name: lowercase letters, digits and `_`, at most {MAX_ENTITY_KEY} (e.g. msdyn_customerasset)",
                    self.logical_name
                ),
            ));
        }
        if let Some((i, _)) = self
            .entity_ids
            .iter()
            .enumerate()
            .find(|(_, id)| id.trim().is_empty() || id.len() > MAX_ENTITY_KEY)
        {
            return Err(ApiError::invalid(
                &format!("EntityIds[{i}]"),
                format!("a record id must be non-blank and at most {MAX_ENTITY_KEY} bytes"),
            ));
        }
        for (field, list) in [("DeviceIds", &self.device_ids), ("Names", &self.names)] {
            if !list.is_empty() && list.len() != n {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "{} items for {n} EntityIds: give one per record, or none",
                        list.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Record `i`'s device id: its `DeviceIds` item, else the record's id.
    fn device(&self, i: usize) -> &str {
        self.device_ids
            .get(i)
            .map(|d| d.trim())
            .filter(|d| !d.is_empty())
            .unwrap_or(&self.entity_ids[i])
    }
}

/// Register Custom Entity: registers each record's device (as Register Device does, a
/// device already Registered stays as it is) and links the record to it. One result per
/// record, in order, shaped as Register Device's.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/register-custom-entity",
    tag = "field-service",
    operation_id = "cfs_register_custom_entity",
    summary = "Field Service's \"IoT – Register Custom Entity\" action.",
    description = "Registers each record's device as Register Device does (a device already \
Registered stays as it is) and links the record to it: `DeviceIds[i]` (empty or missing: a new \
device whose id is the record's id, named `Names[i]`). One result per record, in order, shaped \
as Register Device's. The links are listed by `GET /api/v1/entity-links`.",
    request_body = CustomEntities,
    responses(
        (status = 200, description = "`RegistrationResultsJSON`, one per record.", body = schemas::RegistrationResults),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn register_custom_entity(
    State(s): State<ApiState>,
    b: Result<Json<CustomEntities>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let c = body(b)?;
    c.check()?;
    let requests = (0..c.entity_ids.len())
        .map(|i| RegisterRequest {
            msdyn_deviceid: c.device(i).to_owned(),
            msdyn_name: c
                .names
                .get(i)
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            ..RegisterRequest::default()
        })
        .collect();
    let outcomes = s.core.register_many(requests).await;
    let mut results = Vec::with_capacity(c.entity_ids.len());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let existing = matches!(outcome, Err(GatewayError::AlreadyRegistered(_)));
        let (status, mut message) = registration_result(outcome);
        if existing {
            message = format!(
                "{} {} linked to device {}, already Registered",
                c.logical_name,
                c.entity_ids[i],
                c.device(i)
            );
        }
        if status == RegistrationStatus::Registered {
            let device = device_id("DeviceIds", c.device(i))?;
            s.core
                .store
                .link_entity(&c.logical_name, &c.entity_ids[i], &device)
                .await
                .map_err(GatewayError::from)?;
            if message.is_empty() {
                message = format!("{} {} linked", c.logical_name, c.entity_ids[i]);
            }
        }
        results.push(json!({
            "Id": c.entity_ids[i],
            "RegistrationStatus": {"Value": status.value()},
            "DeviceId": c.device(i),
            "Message": message,
        }));
    }
    Ok(Json(json!({ "RegistrationResultsJSON": results })))
}

/// Register Device: `RegistrationResultsJSON`, one result per entity, in order.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/register-devices",
    tag = "field-service",
    operation_id = "cfs_register_devices",
    summary = "Field Service's \"Register Device\" action.",
    description = "Registers each entity's device with its provider instance (routed as \
`POST /api/v1/devices` routes it). One result per entity, in order; a device already Registered \
answers Registered with why nothing changed; a refusal answers Error with the reason.",
    request_body = EntityCollection,
    responses(
        (status = 200, description = "`RegistrationResultsJSON`.", body = schemas::RegistrationResults),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn register_devices(
    State(s): State<ApiState>,
    b: Result<Json<EntityCollection>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let entities = entities(b)?;
    let requests = entities
        .iter()
        .map(|e| RegisterRequest {
            msdyn_deviceid: e.device_id().to_owned(),
            msdyn_name: e.msdyn_name.as_deref().map(str::trim).map(str::to_owned),
            ..RegisterRequest::default()
        })
        .collect();
    let outcomes = s.core.register_many(requests).await;
    let mut results = Vec::with_capacity(entities.len());
    for (e, outcome) in entities.iter().zip(outcomes) {
        let (status, message) = registration_result(outcome);
        results.push(json!({
            "Id": e.msdyn_iotdeviceid,
            "RegistrationStatus": {"Value": status.value()},
            "DeviceId": e.device_id(),
            "Message": message,
        }));
    }
    Ok(Json(json!({ "RegistrationResultsJSON": results })))
}

/// Pull Device Data: `PullDeviceDataResultsJSON`, from the registry (what the providers
/// reported and the gateway committed, so it survives a restart). A device not stored is
/// left out.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/pull-device-data",
    tag = "field-service",
    operation_id = "cfs_pull_device_data",
    summary = "Field Service's \"Pull Device Data\" action, from the registry.",
    description = "Each stored device's connection state, reported properties and last activity, \
as the providers reported them and the gateway committed them (so they survive a restart). An \
entity naming no stored device is left out.",
    request_body = EntityCollection,
    responses(
        (status = 200, description = "`PullDeviceDataResultsJSON`.", body = schemas::PullDeviceDataResults),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn pull_device_data(
    State(s): State<ApiState>,
    b: Result<Json<EntityCollection>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let mut results = Vec::new();
    for e in entities(b)? {
        let Ok(id) = DeviceId::parse(e.device_id()) else {
            continue;
        };
        let Some(d) = s
            .core
            .store
            .get_device(&id)
            .await
            .map_err(GatewayError::from)?
        else {
            continue;
        };
        results.push(json!({
            "Id": e.msdyn_iotdeviceid,
            "ConnectionState": d.connection_state,
            "ConnectionStateUpdatedTime": d.connection_state_updated_at,
            "DeviceReportedProperties": d.reported_properties.unwrap_or_else(|| json!({})),
            "LastActivityTime": d.last_activity_time,
        }));
    }
    Ok(Json(json!({ "PullDeviceDataResultsJSON": results })))
}

/// Query Device Readings' input.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct QueryReadings {
    #[serde(rename = "From")]
    from: DateTime<Utc>,
    #[serde(rename = "To")]
    to: DateTime<Utc>,
    #[serde(rename = "IoTDeviceId")]
    device: String,
    /// Bucket width, an ISO-8601 duration of whole seconds (a month is 30 days, a year
    /// 365).
    #[serde(rename = "Interval")]
    interval: String,
}

fn device_id(field: &str, raw: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(raw).map_err(|e| ApiError::invalid(field, e))
}

async fn buckets(s: &ApiState, q: ReadingQuery) -> Result<Vec<ReadingBucket>, ApiError> {
    Ok(s.core
        .store
        .query_readings(&q)
        .await
        .map_err(GatewayError::from)?)
}

/// Query Device Readings: `AggregatedDeviceReadings` = `{device: {measure: {start: {min,
/// max, avg, sum, count}}}}`.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/query-device-readings",
    tag = "field-service",
    operation_id = "cfs_query_device_readings",
    summary = "Field Service's \"Query Device Readings\" action.",
    description = "The device's readings in buckets of `Interval` (ISO-8601, whole seconds; a \
month is 30 days, a year 365), each measure under its JSON pointer without the leading `/`. See \
`GET /api/v1/devices/{id}/readings` for the bucket rules.",
    request_body = QueryReadings,
    responses(
        (status = 200, description = "`AggregatedDeviceReadings`: `{device: {measure: {bucket start: {min, max, avg, sum, count}}}}`.", body = schemas::AggregatedDeviceReadings),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn query_device_readings(
    State(s): State<ApiState>,
    b: Result<Json<QueryReadings>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let q = body(b)?;
    let id = device_id("IoTDeviceId", &q.device)?;
    let interval_s = iso8601_seconds(&q.interval).map_err(|e| ApiError::invalid("Interval", e))?;
    let found = buckets(
        &s,
        ReadingQuery {
            device_id: id,
            from: q.from,
            to: q.to,
            interval_s,
            measures: Vec::new(),
        },
    )
    .await?;
    let mut series: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
    for b in &found {
        series.entry(measure_name(&b.measure)).or_default().insert(
            b.start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            json!({"min": b.min, "max": b.max, "avg": b.avg(), "sum": b.sum, "count": b.count}),
        );
    }
    Ok(Json(
        json!({ "AggregatedDeviceReadings": { q.device: series } }),
    ))
}

/// One measure of an Aggregated Device Readings request.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AggregateMeasure {
    #[serde(rename = "Measure")]
    measure: String,
    /// Min, Max, Avg (or Average), Sum or Count, in any case.
    #[serde(rename = "Aggregate")]
    aggregate: String,
    /// Minutes, Hours, Days, Weeks, Months (of 30 days) or Years (of 365), in any case.
    #[serde(rename = "TimeRangeType")]
    range_type: String,
    /// How many of them, 1 to 36,500.
    #[serde(rename = "TimeRangeValue")]
    range_value: i64,
    #[serde(rename = "Unit", default)]
    unit: Option<String>,
}

/// Aggregated Device Readings' input; `measures` is the list, or the list as a JSON string
/// (as Field Service passes it).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AggregatedReadings {
    #[serde(rename = "deviceId")]
    device: String,
    #[schema(schema_with = aggregate_measures)]
    measures: Value,
}

/// `measures`: the list, or the list as JSON text.
fn aggregate_measures() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::openapi::Ref;
    OneOfBuilder::new()
        .description(Some(
            "The measures (at most 100), or the same list as JSON text (as Field Service passes it).",
        ))
        .item(
            ArrayBuilder::new()
                .max_items(Some(MAX_AGGREGATES))
                .items(Ref::from_schema_name("AggregateMeasure")),
        )
        .item(ObjectBuilder::new().schema_type(Type::String))
        .into()
}

/// Seconds in `value` units of `range_type` (a month is 30 days, a year 365).
fn range_seconds(range_type: &str, value: i64) -> Result<i64, String> {
    let unit = match range_type.to_ascii_lowercase().as_str() {
        "minutes" => 60,
        "hours" => 3600,
        "days" => 86_400,
        "weeks" => 7 * 86_400,
        "months" => 30 * 86_400,
        "years" => 365 * 86_400,
        other => {
            return Err(format!(
            "`{other}` is not a time range type: use Minutes, Hours, Days, Weeks, Months or Years"
        ))
        }
    };
    if !(1..=36_500).contains(&value) {
        return Err(format!("{value} is outside 1..=36500"));
    }
    Ok(unit * value)
}

/// Aggregated Device Readings: per measure, its aggregate over the last range, `Value` as
/// a string (empty when there is no reading in the range).
#[utoipa::path(
    post,
    path = "/api/cfs/v1/aggregated-device-readings",
    tag = "field-service",
    operation_id = "cfs_aggregated_device_readings",
    summary = "Field Service's \"Aggregated device readings\" action.",
    description = "Per measure, its aggregate (Min, Max, Avg, Sum, Count) over the last \
`TimeRangeValue` `TimeRangeType`s (Minutes, Hours, Days, Weeks, Months of 30 days, Years of \
365). `measures` is the list, or the list as a JSON string. `Value` is a string, empty when the \
range holds no reading.",
    request_body = AggregatedReadings,
    responses(
        (status = 200, description = "`measuresOutput`, one per measure, in order.", body = Vec<schemas::MeasureOutput>),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest, StoreUnavailable,
    )
)]
pub(super) async fn aggregated_device_readings(
    State(s): State<ApiState>,
    b: Result<Json<AggregatedReadings>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let req = body(b)?;
    let id = device_id("deviceId", &req.device)?;
    let measures = match req.measures {
        Value::String(text) => serde_json::from_str(&text),
        other => serde_json::from_value(other),
    };
    let measures: Vec<AggregateMeasure> = measures.map_err(|e| ApiError::invalid("measures", e))?;
    if measures.len() > MAX_AGGREGATES {
        return Err(ApiError::invalid(
            "measures",
            format!(
                "{} measures: at most {MAX_AGGREGATES} per request",
                measures.len()
            ),
        ));
    }
    for m in &measures {
        if !AGGREGATES.contains(&m.aggregate.to_ascii_lowercase().as_str()) {
            return Err(ApiError::invalid(
                "Aggregate",
                format!(
                    "`{}` is not an aggregate: use Min, Max, Avg, Sum or Count",
                    m.aggregate
                ),
            ));
        }
    }
    let now = Utc::now();
    let mut out = Vec::with_capacity(measures.len());
    for (position, m) in measures.into_iter().enumerate() {
        let secs = range_seconds(&m.range_type, m.range_value)
            .map_err(|e| ApiError::invalid("TimeRangeType", e))?;
        // Whole minutes (hours beyond a week) tile the range; the buckets are combined.
        let interval_s = if secs > 7 * 86_400 { 3600 } else { 60 };
        let pointer = if m.measure.starts_with('/') {
            m.measure.clone()
        } else {
            format!("/{}", m.measure)
        };
        let found = buckets(
            &s,
            ReadingQuery {
                device_id: id.clone(),
                from: now - chrono::Duration::seconds(secs),
                to: now,
                interval_s,
                measures: vec![pointer],
            },
        )
        .await?;
        let (min, max, sum, count) = found.iter().fold(
            (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0i64),
            |(lo, hi, sum, n), b| (lo.min(b.min), hi.max(b.max), sum + b.sum, n + b.count),
        );
        let value = match (m.aggregate.to_ascii_lowercase().as_str(), count) {
            ("count", _) => Some(count as f64),
            (_, 0) => None,
            ("min", _) => Some(min),
            ("max", _) => Some(max),
            ("sum", _) => Some(sum),
            _ => Some(sum / count as f64), // avg or average: checked above
        };
        out.push(json!({
            "Name": m.measure,
            "Aggregate": m.aggregate,
            "Unit": m.unit.unwrap_or_default(),
            "TimeRangeValue": m.range_value,
            "TimeRangeType": m.range_type,
            "Position": position + 1,
            "Value": value.map(|v| v.to_string()).unwrap_or_default(),
        }));
    }
    Ok(Json(Value::Array(out)))
}

/// Send Command's input: the `msdyn_iotdevicecommand` record Field Service creates.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendCommand {
    /// The record's GUID in Dataverse, echoed back.
    #[serde(default)]
    msdyn_iotdevicecommandid: Option<String>,
    #[serde(default)]
    msdyn_name: Option<String>,
    /// `{"CommandName": "...", "Parameters": {...}}` as JSON text (or as an object).
    #[serde(default)]
    #[schema(schema_with = command_message)]
    msdyn_message: Option<Value>,
    /// The target device's id (leave out with send-to-all).
    #[serde(default)]
    msdyn_deviceid: Option<String>,
    /// The command definition (`[definitions.commands.NAME]`) to check the parameters by.
    #[serde(default)]
    msdyn_command: Option<String>,
    /// One command to every Registered, connected device (at most 10,000).
    #[serde(default)]
    msdyn_sendtoallconnecteddevices: bool,
    /// Send-to-all only to this provider instance's devices.
    #[serde(default)]
    msdyn_iotproviderinstance: Option<String>,
    /// Send-to-all only to this category's devices.
    #[serde(default)]
    msdyn_category: Option<String>,
    #[serde(rename = "@odata.type", default)]
    _odata_type: Option<String>,
}

fn command_message() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    super::schemas::any_json(
        "`{\"CommandName\": \"...\", \"Parameters\": {...}}`, as JSON text or as an object.",
    )
}

/// The command name and parameters of a Send Command request: `msdyn_message`'s
/// `CommandName` and `Parameters`, the name falling back on `msdyn_command`, then
/// `msdyn_name`.
fn name_and_parameters(c: &SendCommand) -> Result<(String, Value), ApiError> {
    let message = match &c.msdyn_message {
        None => Value::Null,
        Some(Value::String(text)) if text.trim().is_empty() => Value::Null,
        Some(Value::String(text)) => serde_json::from_str(text).map_err(|e| {
            ApiError::invalid(
                "msdyn_message",
                format!(
                    "not JSON ({e}): send {{\"CommandName\": \"...\", \"Parameters\": {{...}}}}"
                ),
            )
        })?,
        Some(v) => v.clone(),
    };
    let named = message.get("CommandName").and_then(Value::as_str);
    let name = named
        .or(c.msdyn_command.as_deref())
        .or(c.msdyn_name.as_deref())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                "msdyn_message",
                "no command name: give CommandName in msdyn_message, or msdyn_command",
            )
        })?;
    let parameters = message.get("Parameters").cloned().unwrap_or(Value::Null);
    Ok((name.to_owned(), parameters))
}

/// Send Command: one command to `msdyn_deviceid`, or with
/// `msdyn_sendtoallconnecteddevices` one command per connected, registered device (all of
/// one request, `iotgw_requestid`). A command by definition (`msdyn_command`) is checked
/// against its parameters' types first; a wrong one is a 400 naming the parameter.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/send-command",
    tag = "field-service",
    operation_id = "cfs_send_command",
    summary = "Field Service's \"Send Command\" action, to one device or to every connected one.",
    description = "Takes the `msdyn_iotdevicecommand` record. The command name and parameters come \
from `msdyn_message` (`{\"CommandName\": \"...\", \"Parameters\": {...}}`, as JSON text or an \
object), the name falling back on `msdyn_command`, then `msdyn_name`. With `msdyn_command` the \
parameters are checked against that command definition (`[definitions.commands.NAME]`): every \
parameter's type, the required ones, and the device's category; a wrong one is a 400 naming the \
parameter (`invalid Parameters.settings.threshold: \"hot\" is not a Decimal`). With \
`msdyn_sendtoallconnecteddevices` one command goes to every Registered, connected device (of \
`msdyn_iotproviderinstance` and `msdyn_category` when given; at most 10,000), all of one request \
(`RequestId`, each command's `iotgw_requestid`); every device is checked before any command is \
stored. Commands are sent in the background: each starts In Progress.",
    request_body = SendCommand,
    responses(
        (status = 202, description = "The commands, In Progress.", body = schemas::SentCommands),
        BadRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge, MisdirectedRequest,
        StoreUnavailable,
    )
)]
pub(super) async fn send_command(
    State(s): State<ApiState>,
    b: Result<Json<SendCommand>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let c = body(b)?;
    let (name, parameters) = name_and_parameters(&c)?;
    let live = s.core.live();
    let defs = &live.config.definitions;
    let definition = c
        .msdyn_command
        .as_deref()
        .map(|d| crate::definitions::command(defs, d))
        .transpose()?;
    let check = |category: Option<&str>| match definition {
        Some(def) => crate::definitions::check_command(defs, &name, def, &parameters, category),
        None => Ok(()),
    };
    if !c.msdyn_sendtoallconnecteddevices {
        let raw = c.msdyn_deviceid.as_deref().ok_or_else(|| {
            ApiError::invalid(
                "msdyn_deviceid",
                "missing: name the device, or set msdyn_sendtoallconnecteddevices",
            )
        })?;
        let id = device_id("msdyn_deviceid", raw)?;
        let device = s
            .core
            .store
            .get_device(&id)
            .await
            .map_err(GatewayError::from)?
            .ok_or_else(|| {
                ApiError::not_found(format!("device {id} not found: register it first"))
            })?;
        check(device.category.as_deref())?;
        let cmd = s.core.send_command(raw, &name, &parameters).await?;
        return Ok((
            axum::http::StatusCode::ACCEPTED,
            Json(json!({
                "Id": c.msdyn_iotdevicecommandid,
                "Commands": [cmd],
            })),
        ));
    }
    if c.msdyn_deviceid.is_some() {
        return Err(ApiError::invalid(
            "msdyn_deviceid",
            "give either a device or msdyn_sendtoallconnecteddevices, not both",
        ));
    }
    let filter = iotgw_registry::DeviceFilter {
        provider_instance: c.msdyn_iotproviderinstance.clone(),
        category: c.msdyn_category.clone(),
        registration_status: Some(RegistrationStatus::Registered),
        connected: Some(true),
    };
    let mut targets = Vec::new();
    let mut page = iotgw_registry::PageRequest {
        after: None,
        limit: 1000,
    };
    loop {
        let got = s
            .core
            .store
            .list_devices(&filter, &page)
            .await
            .map_err(GatewayError::from)?;
        targets.extend(got.items);
        if targets.len() > MAX_SEND_TO_ALL {
            return Err(ApiError::invalid(
                "msdyn_sendtoallconnecteddevices",
                format!("more than {MAX_SEND_TO_ALL} connected devices: narrow the request with msdyn_iotproviderinstance or msdyn_category"),
            ));
        }
        match got.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    // Every device is checked before any command is stored: all or nothing.
    for d in &targets {
        check(d.category.as_deref()).map_err(|e| match e {
            GatewayError::Invalid { field, message } => {
                ApiError::invalid(&field, format!("device {}: {message}", d.device_id))
            }
            other => other.into(),
        })?;
    }
    let request = uuid::Uuid::now_v7();
    let mut commands = Vec::with_capacity(targets.len());
    for d in &targets {
        commands.push(
            s.core
                .send_command_of(d.device_id.as_str(), &name, &parameters, Some(request))
                .await?,
        );
    }
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(json!({
            "Id": c.msdyn_iotdevicecommandid,
            "RequestId": request,
            "Commands": commands,
        })),
    ))
}

/// Send Test Alert's input.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TestAlert {
    #[schema(value_type = super::schemas::DeviceId)]
    msdyn_deviceid: String,
    /// The alert's description (default "Test alert from DEVICE").
    #[serde(default)]
    msdyn_description: Option<String>,
    /// The data it carries, any JSON (default `{"test": true}`).
    #[serde(default)]
    #[schema(schema_with = alert_data)]
    msdyn_alertdata: Option<Value>,
}

fn alert_data() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    super::schemas::any_json("Any JSON, stored as text (default {\"test\": true}).")
}

/// Send Test Alert: an alert of type Test (192350003) from a Registered device, stored as
/// a rule's alert is (debounced per device as `DEVICE/test`, queued for every sink), so a
/// Field Service flow can be tried end to end without a device.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/send-test-alert",
    tag = "field-service",
    operation_id = "cfs_send_test_alert",
    summary = "Field Service's \"IoT – Send Test Alert\" action.",
    description = "An alert of type Test (192350003) from a Registered device, stored as a rule's \
alert is: debounced per device (`DEVICE/test`: a second test alert inside the window is a child \
of the first) and queued for every sink. The device's last activity moves to now, as with any \
alert from it.",
    request_body = TestAlert,
    responses(
        (status = 201, description = "The alert.", body = schemas::Alert),
        BadRequest, Unauthorized, NotFound, Conflict, PayloadTooLarge, MisdirectedRequest,
        StoreUnavailable,
    )
)]
pub(super) async fn send_test_alert(
    State(s): State<ApiState>,
    b: Result<Json<TestAlert>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let t = body(b)?;
    let id = device_id("msdyn_deviceid", &t.msdyn_deviceid)?;
    let device = s
        .core
        .store
        .get_device(&id)
        .await
        .map_err(GatewayError::from)?
        .ok_or_else(|| ApiError::not_found(format!("device {id} not found: register it first")))?;
    if device.registration_status != RegistrationStatus::Registered {
        return Err(GatewayError::Conflict(format!(
            "device {id} is {}: only a Registered device raises alerts",
            device.registration_status.label()
        ))
        .into());
    }
    let live = s.core.live();
    let now = Utc::now();
    let alert = iotgw_registry::NewAlert {
        description: t
            .msdyn_description
            .unwrap_or_else(|| format!("Test alert from {id}")),
        alert_data: t
            .msdyn_alertdata
            .unwrap_or_else(|| json!({"test": true}))
            .to_string(),
        alert_time: now,
        alert_token: format!("test-{}", uuid::Uuid::now_v7()),
        alert_type: iotgw_registry::AlertType::Test,
        priority_score: None,
        rule: "test".into(),
        debounce_key: format!("{id}/test"),
        command: None,
    };
    let commit = iotgw_registry::TelemetryCommit {
        device_id: id,
        received_at: now,
        alerts: vec![alert],
        debounce_window: chrono::Duration::seconds(
            i64::try_from(live.config.pipeline.debounce_window_secs).unwrap_or(60),
        ),
        sinks: live.sinks.clone(),
        readings: Box::default(),
    };
    commit.check().map_err(GatewayError::from)?;
    let committed = s
        .core
        .store
        .commit_telemetry(&commit)
        .await
        .map_err(GatewayError::from)?;
    let alert = committed
        .into_iter()
        .next()
        .map(|c| c.alert)
        .ok_or_else(|| ApiError::not_found("the test alert was not stored"))?;
    s.core.metrics.alert(
        &device.provider_instance,
        if alert.parent_alert.is_some() {
            "child"
        } else {
            "primary"
        },
    );
    Ok((axum::http::StatusCode::CREATED, Json(alert)))
}

/// Update Device Data's input: the device and its settings, a JSON object or the same
/// object as JSON text (as Dataverse keeps `msdyn_devicesettings`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateDeviceData {
    #[schema(value_type = super::schemas::DeviceId)]
    msdyn_deviceid: String,
    #[schema(schema_with = device_settings)]
    msdyn_devicesettings: Value,
    #[serde(rename = "@odata.type", default)]
    _odata_type: Option<String>,
}

fn device_settings() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .description(Some(
            "A JSON object of settings, or the same object as JSON text; at most 8 KiB (8192 bytes of compact JSON).",
        ))
        .item(ObjectBuilder::new().schema_type(Type::Object))
        .item(ObjectBuilder::new().schema_type(Type::String))
        .into()
}

/// Update Device Data: the device's provider hands it the settings (IoT Hub twin desired
/// properties, the AWS shadow's desired state, a retained MQTT settings message, a Pub/Sub
/// settings message), then they are stored as the device's `msdyn_devicesettings`.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/update-device-data",
    tag = "field-service",
    operation_id = "cfs_update_device_data",
    summary = "Field Service's \"Update Device Data\" action.",
    description = "The device's provider hands it the settings, then they are stored as the \
device's `msdyn_devicesettings`: Azure IoT Hub twin desired properties, the AWS IoT Core \
shadow's desired state, a retained QoS 1 message on the mqtt instance's `settings_topic` \
(default `devices/{device_id}/settings`), a message with attribute `iotgw_kind=settings` on the \
Pub/Sub command topic. The device must be Registered. The settings are a JSON object (or the \
same object as JSON text) of at most 8 KiB (8192 bytes of compact JSON). A provider that cannot \
take settings answers 501; nothing is stored when the provider fails.",
    request_body = UpdateDeviceData,
    responses(
        (status = 200, description = "The settings were handed to the device and stored.", body = schemas::UpdatedDeviceData),
        BadRequestOrProviderInvalid, Unauthorized, NotFound, Conflict, PayloadTooLarge,
        MisdirectedRequest, Throttled, Unsupported, ProviderFailed, StoreUnavailable,
    )
)]
pub(super) async fn update_device_data(
    State(s): State<ApiState>,
    b: Result<Json<UpdateDeviceData>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let u = body(b)?;
    let settings = match u.msdyn_devicesettings {
        Value::String(text) => serde_json::from_str(&text).map_err(|e| {
            ApiError::invalid(
                "msdyn_devicesettings",
                format!("the text is not JSON ({e}): give a JSON object of settings"),
            )
        })?,
        other => other,
    };
    let device = s
        .core
        .update_device_data(&u.msdyn_deviceid, &settings)
        .await?;
    Ok(Json(json!({
        "Id": device.device_id,
        "DeviceSettings": device.settings,
        "Message": format!(
            "settings sent to device {} through {}",
            device.device_id, device.provider_instance
        ),
    })))
}

/// The JSON getters' input: `Json` (a JSON document as text) and `Path` (a JSON pointer,
/// or a dotted path such as `engine.temp`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JsonGet {
    /// A JSON document, as text.
    #[serde(rename = "Json")]
    json: String,
    /// A JSON pointer (`/engine/temp`) or dotted keys with indexes (`axes[1].x`).
    #[serde(rename = "Path")]
    path: String,
}

/// The value at `path` (a JSON pointer, or dotted keys with `[n]` for array items).
fn json_at<'v>(doc: &'v Value, path: &str) -> Option<&'v Value> {
    if path.is_empty() || path.starts_with('/') {
        return doc.pointer(path);
    }
    let mut at = doc;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            at = at.get(key)?;
        }
        for index in indexes.split('[').skip(1) {
            at = at.get(index.strip_suffix(']')?.parse::<usize>().ok()?)?;
        }
    }
    Some(at)
}

/// `JsonGetBoolean`, `JsonGetNumber`, `JsonGetString`: `{"Value": ...}`, null when the
/// path leads nowhere or to another type (a string is returned as it is; a number or a
/// boolean as its JSON text).
fn json_get(kind: &str, b: Result<Json<JsonGet>, JsonRejection>) -> Result<Json<Value>, ApiError> {
    let q = body(b)?;
    let doc: Value = serde_json::from_str(&q.json)
        .map_err(|e| ApiError::invalid("Json", format!("not a JSON document: {e}")))?;
    let found = json_at(&doc, &q.path);
    let value = match kind {
        "boolean" => found.and_then(Value::as_bool).map(Value::Bool),
        "number" => found.filter(|v| v.is_number()).cloned(),
        _ => found.map(|v| match v {
            Value::String(s) => Value::String(s.clone()),
            other => Value::String(other.to_string()),
        }),
    };
    Ok(Json(json!({ "Value": value })))
}

/// `JsonGetBoolean`.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/json-get-boolean",
    tag = "field-service",
    operation_id = "cfs_json_get_boolean",
    summary = "Field Service's \"JSON-based Field Value – Get Boolean\" action.",
    description = "The value at `Path` in the JSON document `Json`: `Path` is a JSON pointer \
(`/engine/temp`) or dotted keys with indexes (`axes[1].x`). `Value` is null when the path leads \
nowhere or to another type.",
    request_body = JsonGet,
    responses(
        (status = 200, description = "`{\"Value\": ...}`.", body = schemas::JsonBoolean),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest,
    )
)]
pub(super) async fn json_get_boolean(
    b: Result<Json<JsonGet>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    json_get("boolean", b)
}

/// `JsonGetNumber`.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/json-get-number",
    tag = "field-service",
    operation_id = "cfs_json_get_number",
    summary = "Field Service's \"JSON-based Field Value – Get Number\" action.",
    description = "The value at `Path` in the JSON document `Json`: `Path` is a JSON pointer \
(`/engine/temp`) or dotted keys with indexes (`axes[1].x`). `Value` is null when the path leads \
nowhere or to another type.",
    request_body = JsonGet,
    responses(
        (status = 200, description = "`{\"Value\": ...}`.", body = schemas::JsonNumber),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest,
    )
)]
pub(super) async fn json_get_number(
    b: Result<Json<JsonGet>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    json_get("number", b)
}

/// `JsonGetString`.
#[utoipa::path(
    post,
    path = "/api/cfs/v1/json-get-string",
    tag = "field-service",
    operation_id = "cfs_json_get_string",
    summary = "Field Service's \"JSON-based Field Value – Get String\" action.",
    description = "The value at `Path` in the JSON document `Json`: `Path` is a JSON pointer \
(`/engine/temp`) or dotted keys with indexes (`axes[1].x`). `Value` is null when the path leads \
nowhere; a number or boolean is given as its JSON text.",
    request_body = JsonGet,
    responses(
        (status = 200, description = "`{\"Value\": ...}`.", body = schemas::JsonString),
        BadRequest, Unauthorized, PayloadTooLarge, MisdirectedRequest,
    )
)]
pub(super) async fn json_get_string(
    b: Result<Json<JsonGet>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    json_get("string", b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths_are_pointers_or_dotted_keys_with_indexes() {
        let doc = json!({"engine": {"temp": 71.5, "on": true}, "axes": [{"x": 1}, {"x": 2}]});
        assert_eq!(json_at(&doc, "/engine/temp"), Some(&json!(71.5)));
        assert_eq!(json_at(&doc, "engine.on"), Some(&json!(true)));
        assert_eq!(json_at(&doc, "axes[1].x"), Some(&json!(2)));
        assert_eq!(json_at(&doc, "axes[9].x"), None);
        assert_eq!(json_at(&doc, "engine.rpm"), None);
        assert_eq!(json_at(&doc, "axes[x]"), None);
    }

    #[test]
    fn a_command_name_comes_from_the_message_then_the_definition_then_the_record_name() {
        let parse = |v: Value| {
            let c: SendCommand = serde_json::from_value(v).expect("parses");
            name_and_parameters(&c)
        };
        let (name, params) = parse(json!({
            "msdyn_message": "{\"CommandName\": \"reboot\", \"Parameters\": {\"delay\": 5}}",
            "msdyn_name": "Reboot pump 7"
        }))
        .expect("named");
        assert_eq!((name.as_str(), params), ("reboot", json!({"delay": 5})));
        let (name, _) = parse(json!({"msdyn_command": "configure"})).expect("by definition");
        assert_eq!(name, "configure");
        assert!(parse(json!({"msdyn_message": "{"})).is_err());
        assert!(parse(json!({})).is_err());
    }

    #[test]
    fn time_ranges_count_a_month_as_30_days_and_refuse_unknown_units() {
        assert_eq!(range_seconds("Days", 7), Ok(7 * 86_400));
        assert_eq!(range_seconds("months", 1), Ok(30 * 86_400));
        assert_eq!(range_seconds("Years", 1), Ok(365 * 86_400));
        assert!(range_seconds("Fortnights", 1).is_err());
        assert!(range_seconds("Days", 0).is_err());
    }

    #[test]
    fn measure_names_drop_the_pointers_leading_slash() {
        assert_eq!(measure_name("/Temperature"), "Temperature");
        assert_eq!(measure_name("/engine/temp"), "engine/temp");
    }
}
