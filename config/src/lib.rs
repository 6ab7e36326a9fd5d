//! Typed iotgw configuration, loaded with figment: defaults -> TOML file -> `IOTGW_*`
//! environment (`__` between levels, e.g. `IOTGW_API__LISTEN=0.0.0.0:8080`).
//!
//! # Layout
//! - [`base`]: [`Secret`] and [`Problem`], used by every other file; imports nothing of
//!   this crate.
//! - [`model`]: the top-level config struct and the settings that belong to no single
//!   component (the public contract: every field documented, unknown keys refused).
//! - one file per component, with its settings and their validation, as the `providers`
//!   crate has one folder per provider: [`mqtt`], [`aws_iot_core`], [`gcp_pubsub`],
//!   [`azure_iot_hub`], [`sinks`], [`store`].
//! - [`load`]: loading, every problem collected at once with its key path, its source and
//!   a fix.
//! - [`postgres`]: the PostgreSQL store's settings and the URL that hides its password.
//! - [`validate`]: the checks that serde cannot express (references, addresses, templates).
//!
//! This crate knows the shape of each provider's settings but nothing of how they run.

pub mod aws_iot_core;
pub mod azure_iot_hub;
pub mod base;
pub mod gcp_pubsub;
pub mod load;
pub mod model;
pub mod mqtt;
pub mod postgres;
pub mod sinks;
pub mod store;
pub mod validate;

pub use aws_iot_core::AwsIotCoreConfig;
pub use azure_iot_hub::AzureIotHubConfig;
pub use base::{Problem, Secret};
pub use gcp_pubsub::GcpPubSubConfig;
pub use load::{load, ConfigError, LoadOptions};
pub use model::*;
pub use postgres::{redact_url, DatabaseUrl, PostgresStoreConfig, PostgresTlsMode, SecretUrl};
