//! The identifiers every iotgw crate shares, validated once at the edge.
//!
//! # Layout
//! - [`device_id`]: [`DeviceId`], the canonical device id, valid on every provider.
//! - [`instance`]: [`InstanceName`], the name of a provider instance in the config file.
//!
//! This crate is a leaf: it imports nothing of the workspace and no database or cloud
//! client, so `iotgw-providers` can name a device without linking the registry's sqlx.

#![forbid(unsafe_code)]

pub mod device_id;
pub mod instance;

pub use device_id::{DeviceId, DeviceIdError, MAX_DEVICE_ID_LEN};
pub use instance::InstanceName;
