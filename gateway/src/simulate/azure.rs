//! Simulated Azure IoT Hub devices: not built yet. A device of the hub speaks MQTT (or
//! AMQP) with a SAS token, device twins and direct methods, best done with Azure's device
//! SDK behind a feature of its own (`azure_device_sim`), so a default build does not carry
//! it. Until then an `azure_iot_hub` instance is refused with [`UNSUPPORTED`], before
//! anything is registered.
//!
//! The module a later step adds here follows the others: a function building each
//! device's connection from its registration credentials (the hub's connection string),
//! and a `run_device` driving [`super::device::Behaviour`] with the shared
//! [`super::device::Counters`].

/// The error for an `azure_iot_hub` instance.
pub const UNSUPPORTED: &str =
    "simulating azure_iot_hub devices needs a build with --features azure_device_sim";
