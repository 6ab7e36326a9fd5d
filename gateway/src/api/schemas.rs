//! The shapes of the API's answers and of the records it hands out, for the OpenAPI
//! document only: the handlers answer with the registry's and the gateway's own types (or
//! JSON built in place); these types describe that JSON, field by field, in Field Service's
//! names. The schemathesis test (`gateway/tests/cli.rs`) checks the answers against them.
//!
//! Types the API deserializes itself (request bodies, query strings) derive their schema
//! where they are defined, in `handlers.rs`, `cfs.rs` and `readings.rs`.

// Doc-only types: never built, their fields never read.
#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use uuid::Uuid;

/// A string schema with a description.
fn described(schema_type: Type, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(schema_type)
        .description(Some(description))
}

/// An integer option set: its values, described.
fn int_enum(description: &str, values: &[i64]) -> RefOr<Schema> {
    described(Type::Integer, description)
        .enum_values(Some(values.iter().copied()))
        .into()
}

/// An option value (the schema named `value_schema`) or one of its labels.
fn value_or_label(description: &str, value_schema: &str, labels: &[&str]) -> RefOr<Schema> {
    AnyOfBuilder::new()
        .description(Some(description))
        .item(Ref::from_schema_name(value_schema))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(labels.iter().copied())),
        )
        .into()
}

/// Declares a doc-only type whose schema `$schema` builds.
macro_rules! hand_built {
    ($($(#[$meta:meta])* $name:ident => $schema:expr;)+) => {$(
        $(#[$meta])*
        pub struct $name;
        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                $schema
            }
        }
        impl ToSchema for $name {}
    )+};
}

hand_built! {
    /// `msdyn_deviceid`.
    DeviceId => described(
        Type::String,
        "A canonical device id, valid on every provider and in `msdyn_deviceid`: 1 to 100 characters from `A-Z a-z 0-9 : _ -`.",
    )
    .min_length(Some(1))
    .max_length(Some(100))
    .pattern(Some("^[A-Za-z0-9:_-]+$"))
    .into();
    /// `msdyn_registrationstatus`.
    RegistrationStatus => int_enum(
        "`msdyn_registrationstatus`: 192350000 Unknown (known only from its telemetry), 192350001 Unregistered, 192350002 In Progress, 192350003 Registered, 192350004 Error.",
        &[192350000, 192350001, 192350002, 192350003, 192350004],
    );
    /// A `msdyn_registrationstatus` filter.
    RegistrationStatusFilter => value_or_label(
        "A `msdyn_registrationstatus` option value or label.",
        "RegistrationStatus",
        &["Unknown", "Unregistered", "In Progress", "Registered", "Error"],
    );
    /// `msdyn_action`.
    RegistrationAction => int_enum(
        "`msdyn_action`: 192350000 Register, 192350001 Unregister, 192350002 Activate, 192350003 Deactivate.",
        &[192350000, 192350001, 192350002, 192350003],
    );
    /// `msdyn_commandstatus`.
    CommandStatus => int_enum(
        "`msdyn_commandstatus`: 192350000 In Progress, 192350001 Sent, 192350002 Error.",
        &[192350000, 192350001, 192350002],
    );
    /// A `msdyn_commandstatus` filter.
    CommandStatusFilter => value_or_label(
        "A `msdyn_commandstatus` option value or label.",
        "CommandStatus",
        &["In Progress", "Sent", "Error"],
    );
    /// `msdyn_alerttype`.
    AlertType => int_enum(
        "`msdyn_alerttype`: 192350000 Anomaly, 192350001 Info, 192350002 Preventive Maintenance, 192350003 Test.",
        &[192350000, 192350001, 192350002, 192350003],
    );
    /// A `msdyn_alerttype` filter.
    AlertTypeFilter => value_or_label(
        "A `msdyn_alerttype` option value or label.",
        "AlertType",
        &["Anomaly", "Info", "Preventive Maintenance", "Test"],
    );
    /// `msdyn_issimulated`.
    IsSimulated => int_enum(
        "`msdyn_issimulated`: 192350000 Yes, 192350001 No.",
        &[192350000, 192350001],
    );
    /// Any JSON value (the schema that accepts everything).
    AnyJson => Schema::Object(ObjectBuilder::new().schema_type(utoipa::openapi::schema::SchemaType::AnyValue).build()).into();
}

/// An alert's `statecode`.
fn statecode() -> RefOr<Schema> {
    int_enum(
        "0 Active, 1 Inactive, 2 In Progress, 3 Closed.",
        &[0, 1, 2, 3],
    )
}

/// An alert's `statuscode`.
fn statuscode() -> RefOr<Schema> {
    int_enum(
        "1 Active, 2 Inactive, 3 Case Created, 4 Work Order Created, 5 Command Sent, 6 Closed, 7 Command Failed.",
        &[1, 2, 3, 4, 5, 6, 7],
    )
}

/// Any JSON value, described.
pub(super) fn any_json(description: &str) -> RefOr<Schema> {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
            .description(Some(description))
            .build(),
    )
    .into()
}

fn reported_properties() -> RefOr<Schema> {
    any_json("Reported state, any JSON, or null.")
}

fn desired_settings() -> RefOr<Schema> {
    any_json("Desired settings, any JSON, or null.")
}

fn credentials() -> RefOr<Schema> {
    any_json("Device credentials from the provider (provider-specific JSON), shown this once and never stored; absent when the provider hands out none.")
}

/// Every error the API answers itself.
#[derive(ToSchema)]
pub struct Error {
    #[schema(inline)]
    error: ErrorBody,
}

/// The error.
#[derive(ToSchema)]
pub struct ErrorBody {
    /// Machine-readable class, e.g. `invalid_input`, `not_found`.
    code: String,
    /// What went wrong and what to do.
    message: String,
}

/// An error response: `Error` with its codes (and the message's pattern).
fn error_response(
    description: &str,
    codes: &[&str],
    message_pattern: Option<&str>,
    bearer: bool,
) -> utoipa::openapi::Response {
    let mut error = ObjectBuilder::new().schema_type(Type::Object).property(
        "code",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(codes.iter().copied())),
    );
    if let Some(pattern) = message_pattern {
        error = error.property(
            "message",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(pattern)),
        );
    }
    let schema = AllOfBuilder::new()
        .item(Ref::from_schema_name("Error"))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("error", error),
        );
    let mut response = ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new().schema(Some(schema)).build(),
    );
    if bearer {
        response = response.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(["Bearer"])),
                )
                .description(Some("Always `Bearer`."))
                .build(),
        );
    }
    response.build()
}

/// Declares the error responses: each a response component (`ToResponse`) and, for
/// `responses(...)` of an operation, its status referring to it (`IntoResponses`).
macro_rules! error_responses {
    ($($name:ident = $status:literal, $description:literal, [$($code:literal),+], $pattern:expr, $bearer:literal;)+) => {$(
        #[doc = $description]
        pub struct $name;
        impl<'r> utoipa::ToResponse<'r> for $name {
            fn response() -> (&'r str, RefOr<utoipa::openapi::Response>) {
                (
                    stringify!($name),
                    error_response($description, &[$($code),+], $pattern, $bearer).into(),
                )
            }
        }
        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                BTreeMap::from([(
                    $status.to_string(),
                    RefOr::Ref(Ref::from_response_name(stringify!($name))),
                )])
            }
        }
    )+};
}

error_responses! {
    BadRequest = 400, "Invalid input (`invalid_input`); the message names the field: `invalid <field>: <what is wrong and what to do>`.",
        ["invalid_input"], Some("^invalid [^:]+: "), false;
    BadRequestOrProviderInvalid = 400, "Invalid input (`invalid_input`); the message names the field: `invalid <field>: ...`, or, refused by the provider instance, `<instance>: invalid <field>: ...`.",
        ["invalid_input"], Some("invalid [^:]+: "), false;
    Unauthorized = 401, "Missing or wrong bearer token (`unauthorized`); only when `api.token` is configured.",
        ["unauthorized"], None, true;
    NotFound = 404, "No such record (`not_found`).", ["not_found"], None, false;
    Conflict = 409, "Conflicts with the record's current state (`conflict`).", ["conflict"], None, false;
    RegisterConflict = 409, "The device is already Registered (`already_registered`: unregister it first), or conflicts otherwise (`conflict`: e.g. In Progress, or the provider has it differently).",
        ["already_registered", "conflict"], None, false;
    PayloadTooLarge = 413, "The body is over the route's limit (`payload_too_large`).", ["payload_too_large"], None, false;
    MisdirectedRequest = 421, "Without `api.token` configured, the request's `Host` is not a loopback name (`host_not_allowed`).",
        ["host_not_allowed"], None, false;
    Throttled = 429, "The provider's cloud asks to slow down (`throttled`).", ["throttled"], None, false;
    Unsupported = 501, "The provider cannot do this (`unsupported`).", ["unsupported"], None, false;
    ProviderFailed = 502, "The provider failed: its credentials were refused (`provider_unauthorized`) or it is unavailable (`provider_unavailable`, retrying may help).",
        ["provider_unauthorized", "provider_unavailable"], None, false;
    StoreUnavailable = 503, "The store failed (`store_unavailable`); retrying may help.", ["store_unavailable"], None, false;
}

// Path and query parameters.

/// A device route's `{id}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeviceIdPath {
    /// The device id (`msdyn_deviceid`): 1 to 100 characters from `A-Z a-z 0-9 : _ -`.
    /// Anything else is a 400 naming `msdyn_deviceid` (`id` on the move and properties
    /// routes).
    id: DeviceId,
}

/// An alert route's `{id}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AlertIdPath {
    /// The alert's `msdyn_iotalertid` (a UUID; anything else is a 400 naming `alert id`).
    id: Uuid,
}

/// A command route's `{id}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CommandIdPath {
    /// The command's `msdyn_iotdevicecommandid` (a UUID; anything else is a 400 naming
    /// `command id`).
    id: Uuid,
}

/// A dead letter route's `{id}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeadLetterIdPath {
    /// The dead letter's `id` (a 64-bit integer; anything else is a 400 naming `id`).
    #[param(minimum = -9223372036854775808i64, maximum = 9223372036854775807i64)]
    id: i64,
}

/// Keyset paging.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Cursor: the `next` of the previous page. A value no listing gave out is a 400
    /// naming `after`.
    after: Option<String>,
    /// Page size; default 100, values outside 1..1000 are clamped into it.
    #[param(schema_with = page_limit)]
    limit: Option<u32>,
}

/// `limit`: any 32-bit unsigned number (clamped into 1..1000).
fn page_limit() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(4294967295u64))
        .default(Some(100.into()))
        .into()
}

/// `GET /api/v1/devices`'s filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceFilterParams {
    /// Only devices hosted on this provider instance.
    provider_instance: Option<String>,
    /// Only devices of this category.
    category: Option<String>,
    /// Only devices with this `msdyn_registrationstatus`: the option value or its label
    /// (matched case-insensitively, spaces and underscores ignored, e.g. `in_progress`).
    registration_status: Option<RegistrationStatusFilter>,
    /// Only connected (true) or disconnected (false) devices.
    connected: Option<bool>,
}

/// `GET /api/v1/commands`'s filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CommandFilterParams {
    /// Only commands to this device.
    device_id: Option<DeviceId>,
    /// Only commands with this `msdyn_commandstatus`: the option value or its label
    /// (matched case-insensitively, spaces and underscores ignored).
    status: Option<CommandStatusFilter>,
    /// Only commands caused by this alert.
    parent_alert: Option<Uuid>,
    /// Only the commands of this send-to-all request (`RequestId` of
    /// `POST /api/cfs/v1/send-command`).
    request_id: Option<Uuid>,
}

/// `GET /api/v1/alerts`'s filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertFilterParams {
    /// Only alerts of this device.
    device_id: Option<DeviceId>,
    /// Only alerts with this `statecode` (0 Active, 1 Inactive, 2 In Progress, 3 Closed;
    /// any other number matches nothing).
    #[param(minimum = -2147483648i64, maximum = 2147483647)]
    statecode: Option<i32>,
    /// Only children of this primary alert.
    parent_alert: Option<Uuid>,
    /// Only primary alerts (no parent) when true; only children when false.
    primary: Option<bool>,
    /// Only alerts of this `msdyn_alerttype`: the option value or its label (matched
    /// case-insensitively, spaces and underscores ignored).
    alert_type: Option<AlertTypeFilter>,
}

/// `GET /api/v1/entity-links`'s filters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EntityLinkFilterParams {
    /// Only this entity's logical name (`msdyn_customerasset`).
    entity_logical_name: Option<String>,
    /// Only this record.
    entity_id: Option<String>,
    /// Only this device.
    device_id: Option<DeviceId>,
}

// Requests the API reads through other crates' types.

/// A registration (shaped after `msdyn_iotdevice`). Unknown fields are refused.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    #[schema(value_type = DeviceId)]
    msdyn_deviceid: String,
    /// Display name; defaults to the device id.
    msdyn_name: Option<String>,
    /// Category name (created when it does not exist; a blank name is a 400 naming
    /// `name`).
    #[schema(pattern = r"\S")]
    msdyn_category: Option<String>,
    /// Owning customer account.
    msdyn_account: Option<String>,
    /// Tags, key to value.
    msdyn_tags: Option<BTreeMap<String, String>>,
    /// Desired settings, any JSON; at most 8000 bytes as compact JSON, else a 400 naming
    /// `msdyn_devicesettings`. Null is the same as absent.
    #[schema(schema_with = any_json_settings)]
    msdyn_devicesettings: Option<serde_json::Value>,
    /// The provider instance to register on; when absent the routing rules decide (a 400
    /// naming this field when none matches and `routing.default` is not set, or when the
    /// instance is not configured).
    msdyn_iotproviderinstance: Option<String>,
    /// A simulated device.
    #[schema(default = false)]
    msdyn_issimulated: Option<bool>,
}

fn any_json_settings() -> RefOr<Schema> {
    any_json("Desired settings, any JSON; at most 8000 bytes as compact JSON, else a 400 naming `msdyn_devicesettings`. Null is the same as absent.")
}

/// Which dead letters a bulk replay takes (all given conditions hold).
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Exactly this source, e.g. `telemetry:edge` or `sink:crm`.
    source: Option<String>,
    /// The reason contains this text.
    reason_contains: Option<String>,
    /// Exactly this device id (as received; not validated).
    device_id: Option<String>,
    /// At most this many (default and most 10,000; 0 counts as 1).
    #[schema(schema_with = replay_limit)]
    limit: Option<u64>,
}

/// `limit` of a bulk replay: any 64-bit unsigned number or null (clamped into 1..10,000).
/// Built by hand: the derived schema says `format: int64`, which bounds it at 2^63 - 1,
/// while the handler takes every `u64` (schemathesis sent 2^63 and saw it accepted).
fn replay_limit() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            Type::Integer,
            Type::Null,
        ]))
        .minimum(Some(0))
        .maximum(Some(18446744073709551615u64))
        .description(Some(
            "At most this many (default and most 10,000; 0 counts as 1).",
        ))
        .into()
}

// Records.

/// `msdyn_iotdevice`: a device and where it is registered.
#[derive(ToSchema)]
pub struct Device {
    /// Primary key.
    msdyn_iotdeviceid: Uuid,
    /// Display name.
    msdyn_name: String,
    msdyn_deviceid: DeviceId,
    /// The provider instance (config name) that hosts the device.
    msdyn_iotproviderinstance: String,
    #[schema(required = true)]
    msdyn_category: Option<String>,
    #[schema(required = true)]
    msdyn_account: Option<String>,
    /// True when connected.
    msdyn_connectionstate: bool,
    /// Event time of the connection state.
    #[schema(required = true)]
    msdyn_connectionstateupdatedtime: Option<DateTime<Utc>>,
    /// Last telemetry or lifecycle event.
    #[schema(required = true)]
    msdyn_lastactivitytime: Option<DateTime<Utc>>,
    #[schema(schema_with = reported_properties, required = true)]
    msdyn_devicereportedproperties: AnyJson,
    #[schema(schema_with = desired_settings, required = true)]
    msdyn_devicesettings: AnyJson,
    /// Tags, key to value.
    msdyn_tags: BTreeMap<String, String>,
    msdyn_registrationstatus: RegistrationStatus,
    /// Why the status is what it is.
    #[schema(required = true)]
    msdyn_registrationmessage: Option<String>,
    msdyn_issimulated: IsSimulated,
    createdon: DateTime<Utc>,
    modifiedon: DateTime<Utc>,
}

/// What a registration returns.
#[derive(ToSchema)]
pub struct Registered {
    device: Device,
    #[schema(schema_with = credentials)]
    credentials: Option<AnyJson>,
}

/// What a move did.
#[derive(ToSchema)]
pub struct Moved {
    device: Device,
    /// The provider instance the device was on.
    from: String,
    /// Commands that were In Progress and ended in Error.
    commands_ended: u64,
    /// Whether the source unregistered the device; false, see `source_error`.
    source_unregistered: bool,
    /// Why the source did not unregister it (retried in the background); absent when it
    /// did.
    #[schema(nullable = false)]
    source_error: Option<String>,
    #[schema(schema_with = credentials)]
    credentials: Option<AnyJson>,
}

/// What the provider knows of a device right now.
#[derive(ToSchema)]
pub struct DeviceState {
    /// Connected, if the provider knows.
    #[schema(required = true)]
    connected: Option<bool>,
    #[schema(schema_with = reported_or_none, required = true)]
    reported_properties: AnyJson,
    /// Last activity, if known.
    #[schema(required = true)]
    last_activity: Option<DateTime<Utc>>,
}

fn reported_or_none() -> RefOr<Schema> {
    any_json("Reported properties (any JSON), or null if the provider keeps none.")
}

/// `msdyn_iotdeviceregistrationhistory`.
#[derive(ToSchema)]
pub struct RegistrationHistory {
    msdyn_iotdeviceregistrationhistoryid: Uuid,
    /// The device record (`msdyn_iotdeviceid`).
    msdyn_device: Uuid,
    msdyn_deviceid: DeviceId,
    /// A readable name, e.g. "Register pump-01".
    msdyn_name: String,
    msdyn_action: RegistrationAction,
    /// The provider instance at the time.
    msdyn_iotproviderinstance: String,
    createdon: DateTime<Utc>,
}

/// `msdyn_iotdevicecategory`.
#[derive(ToSchema)]
pub struct Category {
    msdyn_iotdevicecategoryid: Uuid,
    /// Unique name.
    msdyn_name: String,
    #[schema(required = true)]
    msdyn_description: Option<String>,
    createdon: DateTime<Utc>,
}

/// `msdyn_iotdevicecommand`.
#[derive(ToSchema)]
pub struct Command {
    msdyn_iotdevicecommandid: Uuid,
    /// The command name.
    msdyn_name: String,
    /// The message sent, JSON text.
    msdyn_message: String,
    msdyn_commandstatus: CommandStatus,
    /// Why the status is what it is.
    #[schema(required = true)]
    msdyn_commandstatusreason: Option<String>,
    /// The device record (`msdyn_iotdeviceid`).
    msdyn_device: Uuid,
    msdyn_deviceid: DeviceId,
    /// The alert that caused it, if any.
    #[schema(required = true)]
    msdyn_parentalert: Option<Uuid>,
    /// The send-to-all request it is one of (`POST /api/cfs/v1/send-command`), if any.
    #[schema(required = true)]
    iotgw_requestid: Option<Uuid>,
    /// The id that ties the device's reply to this command.
    iotgw_correlationid: String,
    /// The provider instance it goes through.
    msdyn_iotproviderinstance: String,
    createdon: DateTime<Utc>,
    modifiedon: DateTime<Utc>,
    /// When the provider took the command; null while it waits to be sent.
    #[schema(required = true)]
    iotgw_publishedon: Option<DateTime<Utc>>,
}

/// `msdyn_iotalert`.
#[derive(ToSchema)]
pub struct Alert {
    msdyn_iotalertid: Uuid,
    /// Description (the store keeps at most 100 characters).
    msdyn_description: String,
    /// The data the device sent (the store keeps at most 8192 characters).
    msdyn_alertdata: String,
    /// When the alert was raised (the telemetry's time).
    msdyn_alerttime: DateTime<Utc>,
    /// The provider's unique event id, the idempotency key.
    msdyn_alerttoken: String,
    msdyn_alerttype: AlertType,
    #[schema(required = true, minimum = 0, maximum = 100)]
    msdyn_alertpriorityscore: Option<u8>,
    /// The device record (`msdyn_iotdeviceid`).
    msdyn_device: Uuid,
    msdyn_deviceid: DeviceId,
    /// The primary alert this one was folded into; null for a primary.
    #[schema(required = true)]
    msdyn_parentalert: Option<Uuid>,
    #[schema(required = true)]
    msdyn_parentalerttoken: Option<String>,
    /// The last command sent in response.
    #[schema(required = true)]
    msdyn_lastcommandsent: Option<Uuid>,
    #[schema(required = true)]
    msdyn_lastcommandsenttime: Option<DateTime<Utc>>,
    /// The Field Service case created from it (`POST /api/v1/alerts/{id}/case`).
    #[schema(required = true)]
    msdyn_case: Option<Uuid>,
    /// The work order created from it (`POST /api/v1/alerts/{id}/work-order`).
    #[schema(required = true)]
    msdyn_workorder: Option<Uuid>,
    #[schema(schema_with = statecode)]
    statecode: i32,
    #[schema(schema_with = statuscode)]
    statuscode: i32,
    /// The rule that raised it.
    iotgw_rule: String,
    /// The provider instance the telemetry came through.
    msdyn_iotproviderinstance: String,
    createdon: DateTime<Utc>,
}

/// A message or delivery that can never succeed, kept with the reason.
#[derive(ToSchema)]
pub struct DeadLetter {
    /// Sequence number (the `{id}` of the replay route).
    id: i64,
    /// Where it came from, e.g. `telemetry:<instance>` or `sink:<name>`.
    source: String,
    /// Why it cannot be processed.
    reason: String,
    /// The device id as received (may be invalid).
    #[schema(required = true)]
    device_id: Option<String>,
    /// Provider message id or outbox idempotency key.
    #[schema(required = true)]
    message_id: Option<String>,
    /// The payload, lossily decoded as UTF-8; beyond 64 KiB cut, ending in a note with its
    /// full size and SHA-256.
    payload: String,
    created_at: DateTime<Utc>,
}

/// A Field Service record linked to a device (Register Custom Entity).
#[derive(ToSchema)]
pub struct EntityLink {
    /// The entity's logical name (`msdyn_customerasset`).
    #[schema(rename = "EntityLogicalName")]
    entity_logical_name: String,
    /// The record's id.
    #[schema(rename = "EntityId")]
    entity_id: String,
    msdyn_deviceid: DeviceId,
    createdon: DateTime<Utc>,
}

/// Declares a page of `$item`s.
macro_rules! pages {
    ($($(#[$meta:meta])* $name:ident of $item:ty;)+) => {$(
        $(#[$meta])*
        #[derive(ToSchema)]
        pub struct $name {
            items: Vec<$item>,
            /// Cursor for the next page (`after`); null on the last page.
            #[schema(required = true)]
            next: Option<String>,
        }
    )+};
}

pages! {
    /// A page of devices, in device id order.
    DevicePage of Device;
    /// A page of commands, newest first.
    CommandPage of Command;
    /// A page of alerts, newest first.
    AlertPage of Alert;
    /// A page of dead letters, newest first.
    DeadLetterPage of DeadLetter;
}

/// Declares a `{"items": [...]}` answer.
macro_rules! item_lists {
    ($($(#[$meta:meta])* $name:ident of $item:ty;)+) => {$(
        $(#[$meta])*
        #[derive(ToSchema)]
        pub struct $name {
            items: Vec<$item>,
        }
    )+};
}

item_lists! {
    /// Every history row of the device.
    HistoryList of RegistrationHistory;
    /// All categories, by name.
    CategoryList of Category;
    /// The links, by entity then device.
    EntityLinkList of EntityLink;
    /// Every configured provider instance, by name.
    ProviderList of ProviderInstance;
}

/// A device's reported properties read through the property definitions.
#[derive(ToSchema)]
pub struct DeviceProperties {
    msdyn_deviceid: DeviceId,
    items: Vec<DeviceProperty>,
}

/// One `[definitions.properties.NAME]` and what the device reported for it.
#[derive(ToSchema)]
pub struct DeviceProperty {
    name: String,
    /// Where it sits in the reported properties (a JSON pointer).
    pointer: String,
    #[schema(rename = "type", inline)]
    property_type: PropertyType,
    #[schema(required = true)]
    unit: Option<String>,
    #[schema(schema_with = reported_value, required = true)]
    value: AnyJson,
    /// Why the value does not have the defined type; null when it does.
    #[schema(required = true)]
    type_error: Option<String>,
}

fn reported_value() -> RefOr<Schema> {
    any_json("The reported value, any JSON; null when not reported.")
}

/// A property definition's type.
#[derive(ToSchema)]
pub enum PropertyType {
    String,
    Object,
    DateTime,
    Boolean,
    #[schema(rename = "Whole Number")]
    WholeNumber,
    Decimal,
}

/// One bucket of readings.
#[derive(ToSchema)]
pub struct Bucket {
    min: f64,
    max: f64,
    avg: f64,
    sum: f64,
    count: i64,
}

/// `{measure: {bucket start: {min, max, avg, sum, count}}}`.
#[derive(ToSchema)]
pub struct MeasureSeries(BTreeMap<String, BTreeMap<String, Bucket>>);

/// `{device id: {measure: {bucket start: {min, max, avg, sum, count}}}}`.
#[derive(ToSchema)]
pub struct DeviceReadings(BTreeMap<String, MeasureSeries>);

hand_built! {
    /// What a replay came to, by `outcome`.
    Replayed => replayed();
}

fn replayed() -> RefOr<Schema> {
    let outcome = |name: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([name.to_owned()]))
    };
    utoipa::openapi::schema::OneOfBuilder::new()
        .description(Some("What a replay came to, by `outcome`."))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("outcome", outcome("committed"))
                .required("outcome")
                .property(
                    "alerts",
                    described(
                        Type::Integer,
                        "New alerts it made (duplicates not counted).",
                    )
                    .minimum(Some(0)),
                )
                .required("alerts"),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("outcome", outcome("dead_lettered_again"))
                .required("outcome")
                .property("reason", described(Type::String, "Why, today."))
                .required("reason"),
        )
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("outcome", outcome("requeued"))
                .required("outcome")
                .property("sink", ObjectBuilder::new().schema_type(Type::String))
                .required("sink")
                .property(
                    "queued",
                    described(
                        Type::Boolean,
                        "Whether a new item was queued (false, it already was).",
                    ),
                )
                .required("queued"),
        )
        .into()
}

/// What a bulk replay did.
#[derive(ToSchema)]
pub struct BulkReplay {
    selected: u64,
    committed: u64,
    dead_lettered_again: u64,
    requeued: u64,
    failed: Vec<ReplayFailure>,
}

/// One dead letter a bulk replay could not replay.
#[derive(ToSchema)]
pub struct ReplayFailure {
    id: i64,
    error: String,
}

/// A configured provider instance.
#[derive(ToSchema)]
pub struct ProviderInstance {
    /// The instance's config name.
    name: String,
    #[schema(inline)]
    kind: ProviderKind,
    /// Not unhealthy (an instance without a receive connection is always healthy).
    healthy: bool,
    /// Since when the health state holds.
    since: DateTime<Utc>,
    /// How long it has been unhealthy; null while healthy.
    #[schema(required = true)]
    down_for_secs: Option<u64>,
    /// Down for `health.failover_after_secs` or longer.
    failed_over: bool,
    /// Not listed in `health.optional`.
    required: bool,
    /// The devices it hosts (any status but Unregistered).
    devices: u64,
    health: ProviderHealth,
    limits: ProviderLimits,
}

/// A provider kind.
#[derive(ToSchema)]
#[allow(non_camel_case_types)]
pub enum ProviderKind {
    mqtt,
    aws_iot_core,
    gcp_pubsub,
    azure_iot_hub,
}

/// A provider instance's connection.
#[derive(ToSchema)]
pub struct ProviderHealth {
    connected: bool,
    since: DateTime<Utc>,
    #[schema(required = true)]
    last_error: Option<String>,
    /// False when configured without a receive connection (control plane only).
    receiving: bool,
}

/// A provider instance's size limits.
#[derive(ToSchema)]
pub struct ProviderLimits {
    max_telemetry_bytes: u64,
    max_command_bytes: u64,
}

/// A reload's outcome.
#[derive(ToSchema)]
#[allow(non_camel_case_types)]
pub enum ReloadOutcome {
    applied,
    unchanged,
    refused,
}

/// A configuration reload.
#[derive(ToSchema)]
pub struct Reload {
    at: DateTime<Utc>,
    /// What started it (`API`, `SIGHUP`, `file changed`).
    trigger: String,
    #[schema(inline)]
    outcome: ReloadOutcome,
    /// Why it was refused, one line per problem (key path, problem, fix); absent when
    /// none.
    #[schema(nullable = false)]
    problems: Option<Vec<String>>,
}

/// `Reload` with some outcomes only (and `problems` required, if so).
fn reload_with(description: &str, outcomes: &[&str], problems: bool) -> RefOr<Schema> {
    let mut narrowed = ObjectBuilder::new().schema_type(Type::Object).property(
        "outcome",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(outcomes.iter().copied())),
    );
    if problems {
        narrowed = narrowed.required("problems");
    }
    AllOfBuilder::new()
        .description(Some(description))
        .item(Ref::from_schema_name("Reload"))
        .item(narrowed)
        .into()
}

hand_built! {
    /// A reload that was applied, or found nothing to change.
    ReloadDone => reload_with("A reload that was applied, or meant what is live already.", &["applied", "unchanged"], false);
    /// A refused reload, with its problems.
    ReloadRefused => reload_with("A refused reload, with its problems; the running configuration stays.", &["refused"], true);
}

/// How the configuration reloads.
#[derive(ToSchema)]
pub enum Reloads {
    #[schema(rename = "on SIGHUP and when the file changes")]
    OnSighup,
    #[schema(rename = "off: no config file (embedded default)")]
    Off,
}

/// The live configuration's version.
#[derive(ToSchema)]
pub struct ConfigVersion {
    /// The live configuration's version (1 at start, +1 per applied reload).
    version: u64,
    loaded_at: DateTime<Utc>,
    /// The config file; null when running on the embedded default.
    #[schema(required = true)]
    file: Option<String>,
    #[schema(inline)]
    reloads: Reloads,
    /// The last reload; null when there was none.
    #[schema(required = true)]
    last_reload: Option<Reload>,
}

/// `/live`'s answer.
#[derive(ToSchema)]
pub struct Live {
    live: bool,
    #[schema(schema_with = ended, nullable = false)]
    ended: Option<AnyJson>,
    /// Present for a caller that is not authorized, when not live.
    #[schema(nullable = false)]
    details: Option<String>,
}

fn ended() -> RefOr<Schema> {
    utoipa::openapi::schema::OneOfBuilder::new()
        .description(Some("The tasks that ended before their time: task name to reason for an authorized caller, else the task names only. Absent while live."))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String))),
        )
        .item(
            utoipa::openapi::schema::ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String)),
        )
        .into()
}

/// The readiness verdict. An authorized caller gets `store`, `providers` and `reasons`
/// (and `degraded` when an optional instance is down); any other caller only `ready` and
/// `details`.
#[derive(ToSchema)]
pub struct Ready {
    ready: bool,
    /// The store answers and its last commit went through.
    #[schema(nullable = false)]
    store: Option<bool>,
    /// Per provider instance, whether it counts as connected.
    #[schema(nullable = false)]
    providers: Option<BTreeMap<String, bool>>,
    /// Why not ready.
    #[schema(nullable = false)]
    reasons: Option<Vec<String>>,
    /// Optional instances that are down (they do not make the gateway unready).
    #[schema(nullable = false)]
    degraded: Option<Vec<String>>,
    /// For a caller that is not authorized, how to see why.
    #[schema(nullable = false)]
    details: Option<String>,
}

// Field Service's actions (`/api/cfs/v1/...`).

/// `RegistrationResultsJSON`, one result per entity, in order.
#[derive(ToSchema)]
pub struct RegistrationResults {
    #[schema(rename = "RegistrationResultsJSON")]
    results: Vec<RegistrationResult>,
}

/// One entity's registration.
#[derive(ToSchema)]
pub struct RegistrationResult {
    #[schema(rename = "Id")]
    id: String,
    #[schema(rename = "RegistrationStatus", inline)]
    status: RegistrationStatusValue,
    #[schema(rename = "DeviceId")]
    device_id: String,
    #[schema(rename = "Message")]
    message: String,
}

/// `{"Value": <msdyn_registrationstatus>}`.
#[derive(ToSchema)]
pub struct RegistrationStatusValue {
    #[schema(rename = "Value")]
    value: RegistrationStatus,
}

/// `PullDeviceDataResultsJSON`.
#[derive(ToSchema)]
pub struct PullDeviceDataResults {
    #[schema(rename = "PullDeviceDataResultsJSON")]
    results: Vec<PulledDevice>,
}

/// One stored device's data.
#[derive(ToSchema)]
pub struct PulledDevice {
    #[schema(rename = "Id")]
    id: String,
    #[schema(rename = "ConnectionState")]
    connection_state: bool,
    #[schema(rename = "ConnectionStateUpdatedTime", required = true)]
    connection_state_updated_time: Option<DateTime<Utc>>,
    #[schema(rename = "DeviceReportedProperties", schema_with = reported_object)]
    device_reported_properties: AnyJson,
    #[schema(rename = "LastActivityTime", required = true)]
    last_activity_time: Option<DateTime<Utc>>,
}

fn reported_object() -> RefOr<Schema> {
    any_json("The reported properties (`{}` when none).")
}

/// Send Command's answer: the commands, In Progress.
#[derive(ToSchema)]
pub struct SentCommands {
    /// The request's `msdyn_iotdevicecommandid`, echoed.
    #[schema(rename = "Id", required = true)]
    id: Option<String>,
    /// The send-to-all request (`iotgw_requestid` of each command); absent for one device.
    #[schema(rename = "RequestId", nullable = false)]
    request_id: Option<Uuid>,
    #[schema(rename = "Commands")]
    commands: Vec<Command>,
}

/// Update Device Data's answer.
#[derive(ToSchema)]
pub struct UpdatedDeviceData {
    /// The device's id.
    #[schema(rename = "Id")]
    id: String,
    /// The settings as stored.
    #[schema(rename = "DeviceSettings", schema_with = settings_stored)]
    device_settings: AnyJson,
    #[schema(rename = "Message")]
    message: String,
}

fn settings_stored() -> RefOr<Schema> {
    described(Type::Object, "The settings as stored.").into()
}

/// `{"Value": ...}`: a boolean, null when the path leads nowhere or to another type.
#[derive(ToSchema)]
pub struct JsonBoolean {
    #[schema(rename = "Value", required = true)]
    value: Option<bool>,
}

/// `{"Value": ...}`: a number, null when the path leads nowhere or to another type.
#[derive(ToSchema)]
pub struct JsonNumber {
    #[schema(rename = "Value", required = true)]
    value: Option<f64>,
}

/// `{"Value": ...}`: a string, null when the path leads nowhere; a number or boolean is
/// given as its JSON text.
#[derive(ToSchema)]
pub struct JsonString {
    #[schema(rename = "Value", required = true)]
    value: Option<String>,
}

/// `AggregatedDeviceReadings`: `{device: {measure: {bucket start: {min, max, avg, sum,
/// count}}}}`.
#[derive(ToSchema)]
pub struct AggregatedDeviceReadings {
    #[schema(rename = "AggregatedDeviceReadings")]
    readings: DeviceReadings,
}

/// One measure's aggregate (`measuresOutput`).
#[derive(ToSchema)]
pub struct MeasureOutput {
    #[schema(rename = "Name")]
    name: String,
    #[schema(rename = "Aggregate")]
    aggregate: String,
    #[schema(rename = "Unit")]
    unit: String,
    #[schema(rename = "TimeRangeValue")]
    time_range_value: i64,
    #[schema(rename = "TimeRangeType")]
    time_range_type: String,
    /// 1 for the first measure asked for.
    #[schema(rename = "Position")]
    position: u64,
    /// The aggregate as a string; empty when the range holds no reading.
    #[schema(rename = "Value")]
    value: String,
}

hand_built! {
    /// An OpenAPI document.
    OpenApiDocument => ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("An OpenAPI 3.1 document."))
        .required("openapi")
        .required("info")
        .required("paths")
        .into();
}

/// `POST /api/v1/devices/batch`'s `devices`.
pub(super) fn batch_items() -> RefOr<Schema> {
    utoipa::openapi::schema::ArrayBuilder::new()
        .description(Some(
            "1 to 1,000 registrations. Each item is read on its own: an item that is not a valid \
             `RegisterRequest` (any other JSON value) is reported in `failed` with status 400, not \
             refused as a whole.",
        ))
        .min_items(Some(1))
        .max_items(Some(1000))
        .items(
            AnyOfBuilder::new()
                .item(Ref::from_schema_name("RegisterRequest"))
                .item(any_json("Any other JSON value (reported in `failed`).")),
        )
        .into()
}

/// `POST /api/v1/commands`'s `parameters`.
pub(super) fn command_parameters() -> RefOr<Schema> {
    any_json("The command's parameters, any JSON (default null). The whole message must fit the provider's limit and 8192 bytes, else a 400 naming `msdyn_message`.")
}
