//! Settings of the `aws_iot_core` provider (AWS IoT Core).

use serde::{Deserialize, Serialize};

use crate::load::Problem;

/// AWS IoT Core provider settings. (Filled in by the aws_iot_core provider's issue.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsIotCoreConfig {}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(_base: &str, _c: &AwsIotCoreConfig, _out: &mut Vec<Problem>) {}
