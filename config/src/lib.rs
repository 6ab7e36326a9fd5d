//! Typed iotgw configuration, loaded with figment: defaults -> TOML file -> `IOTGW_*`
//! environment (`__` between levels, e.g. `IOTGW_API__LISTEN=0.0.0.0:8080`).
//!
//! # Layout
//! - [`model`]: the config structs (the public contract: every field documented,
//!   unknown keys refused).
//! - [`load`]: loading, every problem collected at once with its key path, its source and
//!   a fix.
//! - [`postgres`]: the PostgreSQL store's settings and the URL that hides its password.
//! - [`validate`]: the checks that serde cannot express (references, addresses, templates).
//!
//! This crate knows the shape of each provider's settings but nothing of how they run.

pub mod aws_iot_core;
pub mod azure_iot_hub;
pub mod gcp_pubsub;
pub mod load;
pub mod model;
pub mod postgres;
pub mod validate;

pub use aws_iot_core::AwsIotCoreConfig;
pub use azure_iot_hub::AzureIotHubConfig;
pub use gcp_pubsub::GcpPubSubConfig;
pub use load::{load, ConfigError, LoadOptions, Problem};
pub use model::*;
pub use postgres::{DatabaseUrl, PostgresStoreConfig, PostgresTlsMode};
