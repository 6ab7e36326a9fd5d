//! The control plane of an IoT Hub instance: its identity registry over the service REST
//! API ([`super::rest::HubClient`]): symmetric-key devices created with generated keys
//! (one at a time, or in bulk), their tags and desired settings written to the twin, and
//! their deletion. The device connection string is returned once, in the
//! [`Registration`], and never kept.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use iotgw_ids::DeviceId;
use rand::RngCore as _;
use serde_json::{json, Map, Value};

use super::rest::{
    Authentication, Capabilities, Device, DeviceRegistryOperationError, ExportImportDevice, Twin,
    TwinProperties, BULK_MAX,
};
use super::state::Shared;
use crate::{DeviceSpec, ProviderError, Registration};

/// 32 random bytes, base64: a device key as the portal generates them.
fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    base64::engine::general_purpose::STANDARD.encode(k)
}

fn code_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Shared {
    /// Creates a symmetric-key device with generated keys (`PUT /devices/{id}`, no
    /// `If-Match`), then writes tags and desired settings to its twin (`PATCH /twins/{id}`).
    /// A device that exists already keeps its keys (re-enabled with `If-Match` on its etag
    /// if it was disabled). The device connection string is returned once in
    /// `credentials.connection_string` and not kept.
    pub(super) async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        let s = self;
        let id = spec.device_id.as_str();
        let patch = s.twin_patch(spec)?;
        let device = Device {
            device_id: id.to_owned(),
            status: Some("enabled".into()),
            authentication: Some(Authentication::sas(&generate_key(), &generate_key())),
            capabilities: Some(Capabilities { iot_edge: false }),
            ..Device::default()
        };
        let (created, note) = match s.hub.create_device(&device).await {
            Ok(d) => (d, "registered in IoT Hub"),
            Err(e) if e.failure().is_some_and(|f| f.already_exists()) => {
                let existing = s.hub.get_device(id).await.map_err(|e| s.fail(e))?;
                if existing
                    .authentication
                    .as_ref()
                    .and_then(Authentication::primary_key)
                    .is_none()
                {
                    return Err(ProviderError::Conflict {
                        instance: s.instance.to_string(),
                        message: format!(
                            "device {id} exists in IoT Hub without symmetric keys (X.509 or none); iotgw registers symmetric-key devices: delete it or use another id"
                        ),
                    });
                }
                if existing.status.as_deref() == Some("disabled") {
                    let etag = existing.etag.clone().unwrap_or_else(|| "*".into());
                    let update = Device {
                        device_id: id.to_owned(),
                        status: Some("enabled".into()),
                        authentication: existing.authentication.clone(),
                        capabilities: existing.capabilities.clone(),
                        ..Device::default()
                    };
                    (
                        s.hub
                            .update_device(&update, &etag)
                            .await
                            .map_err(|e| s.fail(e))?,
                        "re-enabled in IoT Hub with its existing keys",
                    )
                } else {
                    (
                        existing,
                        "already registered in IoT Hub; its existing keys are returned",
                    )
                }
            }
            Err(e) => return Err(s.fail(e)),
        };
        s.ok();
        let key = created
            .authentication
            .as_ref()
            .and_then(Authentication::primary_key)
            .or_else(|| {
                device
                    .authentication
                    .as_ref()
                    .and_then(Authentication::primary_key)
            })
            .unwrap_or_default()
            .to_owned();
        if let Some(patch) = patch {
            s.hub.update_twin(id, &patch).await.map_err(|e| s.fail(e))?;
        }
        Ok(s.registration(id, &key, note))
    }

    /// `DELETE /devices/{id}` with `If-Match: "*"`. A device IoT Hub does not know is
    /// [`ProviderError::NotFound`].
    pub(super) async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        self.hub
            .delete_device(id.as_str())
            .await
            .map_err(|e| self.fail(e))?;
        self.ok();
        Ok(())
    }

    /// Registers many devices with IoT Hub's bulk registry operation (`POST /devices`, at
    /// most 100 per call), then writes tags and desired settings to the twins of the devices
    /// that have them. Returns one result per spec, in order: the device connection string
    /// for new devices; a device that already exists goes through [`Shared::register`]
    /// (which returns its existing keys), and so does every device of a batch the hub did
    /// not fully accept.
    pub(super) async fn register_many(
        &self,
        specs: &[DeviceSpec],
    ) -> Vec<Result<Registration, ProviderError>> {
        let mut out = Vec::with_capacity(specs.len());
        for chunk in specs.chunks(BULK_MAX) {
            let keys: Vec<(String, String)> = chunk
                .iter()
                .map(|_| (generate_key(), generate_key()))
                .collect();
            let ops: Vec<ExportImportDevice> = chunk
                .iter()
                .zip(&keys)
                .map(|(s, (pk, sk))| ExportImportDevice {
                    id: s.device_id.as_str().to_owned(),
                    import_mode: "create".into(),
                    status: Some("enabled".into()),
                    authentication: Some(Authentication::sas(pk, sk)),
                })
                .collect();
            let result = match self.hub.bulk(&ops).await {
                Ok(r) => r,
                Err(e) => {
                    let e = self.fail(e);
                    out.extend(chunk.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            self.ok();
            let failed: HashMap<&str, &DeviceRegistryOperationError> = result
                .errors
                .iter()
                .map(|e| (e.device_id.as_str(), e))
                .collect();
            for (spec, (pk, _)) in chunk.iter().zip(&keys) {
                let id = spec.device_id.as_str();
                let r = match failed.get(id) {
                    Some(err)
                        if code_text(&err.error_code).contains("AlreadyExists")
                            || code_text(&err.error_code) == "409001" =>
                    {
                        self.register(spec).await
                    }
                    // The hub does not document whether the other devices of a failed
                    // batch were created: register them one by one (a 409 then returns
                    // the keys the batch gave them).
                    None if !result.is_successful => self.register(spec).await,
                    Some(err) => Err(ProviderError::InvalidInput {
                        instance: self.instance.to_string(),
                        field: "msdyn_deviceid".into(),
                        message: format!(
                            "bulk registration of device {id} failed ({}): {}",
                            code_text(&err.error_code),
                            err.error_status
                        ),
                    }),
                    None => match self.apply_twin(spec).await {
                        Ok(()) => Ok(self.registration(id, pk, "registered in IoT Hub (bulk)")),
                        Err(e) => Err(e),
                    },
                };
                out.push(r);
            }
        }
        out
    }

    fn registration(&self, id: &str, primary_key: &str, message: &str) -> Registration {
        let host = self.hub.host();
        Registration {
            message: Some(format!("{message}: {host}")),
            credentials: Some(json!({
                "kind": "azure_iot_hub_sas",
                "connection_string": format!("HostName={host};DeviceId={id};SharedAccessKey={primary_key}"),
            })),
        }
    }

    /// Writes the spec's tags and desired settings to the twin (`PATCH /twins/{id}`), if any.
    async fn apply_twin(&self, spec: &DeviceSpec) -> Result<(), ProviderError> {
        let Some(patch) = self.twin_patch(spec)? else {
            return Ok(());
        };
        self.hub
            .update_twin(spec.device_id.as_str(), &patch)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    fn twin_patch(&self, spec: &DeviceSpec) -> Result<Option<Twin>, ProviderError> {
        let desired = match &spec.settings {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(ProviderError::InvalidInput {
                instance: self.instance.to_string(),
                field: "msdyn_devicesettings".into(),
                message:
                    "IoT Hub desired properties must be a JSON object, e.g. {\"interval_s\": 30}"
                        .into(),
            }),
        };
        if desired.is_none() && spec.tags.is_empty() {
            return Ok(None);
        }
        Ok(Some(Twin {
            tags: (!spec.tags.is_empty()).then(|| tags_json(&spec.tags)),
            properties: desired.map(|d| TwinProperties {
                desired: Some(d),
                reported: None,
            }),
            ..Twin::default()
        }))
    }
}

fn tags_json(tags: &BTreeMap<String, String>) -> Map<String, Value> {
    tags.iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}
