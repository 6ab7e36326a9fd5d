//! Settings of the `gcp_pubsub` provider (GCP Pub/Sub).

use serde::{Deserialize, Serialize};

use crate::load::Problem;

/// GCP Pub/Sub provider settings. (Filled in by the gcp_pubsub provider's issue.)
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcpPubSubConfig {}

/// Checks serde cannot express; `base` is the key path of the instance (`providers.NAME`).
pub(crate) fn validate(_base: &str, _c: &GcpPubSubConfig, _out: &mut Vec<Problem>) {}
