//! The JSON shapes of IoT Hub's service REST API (api-version 2021-04-12) that iotgw sends
//! and reads: device identities, bulk registry operations, twins, direct methods.
//!
//! Field names follow the REST reference (and the official SDKs' models); absent optional
//! fields are left out of requests, as the SDKs do, and unknown fields in answers are
//! ignored.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The REST API version iotgw speaks.
pub const API_VERSION: &str = "2021-04-12";

/// A device identity (`/devices/{id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Device {
    /// The device id.
    pub device_id: String,
    /// Set by the hub; differs between two devices of the same id created one after the other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
    /// The identity's etag (for `If-Match`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// `Connected` or `Disconnected` (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Why the status is what it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// When the connection state last changed (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state_updated_time: Option<String>,
    /// Last activity (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
    /// Queued cloud-to-device messages (read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_to_device_message_count: Option<i64>,
    /// How the device authenticates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
    /// Edge or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

/// How a device authenticates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Authentication {
    /// Symmetric keys (type `sas`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    /// X.509 thumbprints (type `selfSigned`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<Value>,
    /// `sas`, `selfSigned`, `certificateAuthority` or `none`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl Authentication {
    /// Symmetric-key authentication with these keys.
    pub fn sas(primary: &str, secondary: &str) -> Self {
        Self {
            symmetric_key: Some(SymmetricKey {
                primary_key: Some(primary.to_owned()),
                secondary_key: Some(secondary.to_owned()),
            }),
            x509_thumbprint: None,
            kind: Some("sas".into()),
        }
    }

    /// The primary key of a symmetric-key device.
    pub fn primary_key(&self) -> Option<&str> {
        if self
            .kind
            .as_deref()
            .is_some_and(|k| !k.eq_ignore_ascii_case("sas"))
        {
            return None;
        }
        self.symmetric_key.as_ref()?.primary_key.as_deref()
    }
}

/// A device's symmetric keys (base64).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SymmetricKey {
    /// Primary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey(<redacted>)")
    }
}

/// Device capabilities.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Capabilities {
    /// An IoT Edge device.
    pub iot_edge: bool,
}

/// One device of a bulk registry operation (`POST /devices`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ExportImportDevice {
    /// The device id.
    pub id: String,
    /// `create`, `update`, `updateIfMatchETag`, `delete`, `deleteIfMatchETag`, ...
    pub import_mode: String,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// How the device authenticates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// The answer to a bulk registry operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BulkRegistryOperationResult {
    /// Whether every device succeeded.
    pub is_successful: bool,
    /// The devices that failed.
    pub errors: Vec<DeviceRegistryOperationError>,
    /// Warnings.
    pub warnings: Vec<Value>,
}

/// One failed device of a bulk operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceRegistryOperationError {
    /// The device.
    pub device_id: String,
    /// e.g. `DeviceAlreadyExists`.
    pub error_code: Value,
    /// The hub's explanation.
    pub error_status: String,
}

/// A device twin (`/twins/{id}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Twin {
    /// The device id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The twin's etag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// Twin version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Tags (solution back end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Map<String, Value>>,
    /// Desired and reported properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<TwinProperties>,
    /// `enabled` or `disabled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `Connected` or `Disconnected`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// Last activity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_time: Option<String>,
}

/// A twin's properties.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TwinProperties {
    /// Written by the back end, read by the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired: Option<Map<String, Value>>,
    /// Written by the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported: Option<Map<String, Value>>,
}

/// A direct method call (`POST /twins/{id}/methods`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceMethod {
    /// The method's name.
    pub method_name: String,
    /// Its JSON payload.
    pub payload: Value,
    /// Seconds the hub waits for the device's answer (5..=300).
    pub response_timeout_in_seconds: u64,
    /// Seconds the hub waits for an offline device to connect (0..=300).
    pub connect_timeout_in_seconds: u64,
}

/// The device's answer to a direct method.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloudToDeviceMethodResult {
    /// The status the device answered with.
    pub status: i64,
    /// The payload the device answered with.
    pub payload: Value,
}

/// Parses a hub timestamp (`2024-05-01T12:00:00.123Z`, also without the `Z` as in some
/// documented samples). The hub's "never" (`0001-01-01T00:00:00`) is `None`.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
                .ok()
                .map(|n| n.and_utc())
        })?;
    (t.timestamp() > 0).then_some(t)
}

/// Drops the twin bookkeeping (`$metadata`, `$version`) from a property set.
pub fn without_metadata(props: &Map<String, Value>) -> Map<String, Value> {
    props
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sas_device_serializes_like_the_sdk_and_keys_stay_out_of_debug() {
        let d = Device {
            device_id: "d1".into(),
            status: Some("enabled".into()),
            authentication: Some(Authentication::sas("pk", "sk")),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        };
        assert_eq!(
            serde_json::to_value(&d).expect("json"),
            json!({"deviceId": "d1", "status": "enabled",
                   "authentication": {"symmetricKey": {"primaryKey": "pk", "secondaryKey": "sk"}, "type": "sas"},
                   "capabilities": {"iotEdge": false}})
        );
        assert!(!format!("{d:?}").contains("pk"));
    }

    #[test]
    fn hub_timestamps_parse_with_or_without_zone_and_never_is_none() {
        assert!(parse_time("2019-01-07T20:58:30.48Z").is_some());
        assert!(parse_time("2018-01-02T19:17:44.4383997Z").is_some());
        assert!(parse_time("2018-01-02T19:17:44.4383997").is_some());
        assert_eq!(parse_time("0001-01-01T00:00:00"), None);
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_time("soon"), None);
    }
}
