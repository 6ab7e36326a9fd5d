//! Settings of the `azure_iot_hub` provider (Azure IoT Hub).

use serde::{Deserialize, Serialize};

use crate::load::Problem;

/// Azure IoT Hub provider settings. (Filled in by the azure_iot_hub provider's issue.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AzureIotHubConfig {}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(_base: &str, _c: &AzureIotHubConfig, _out: &mut Vec<Problem>) {}
