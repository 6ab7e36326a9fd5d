//! Recording fakes of IoT Hub's endpoints, for the tests: IoT Hub has no emulator.
//! Compiled for this crate's tests and, with the feature `azure_fakes`, for other crates'
//! tests (the conformance suite); nothing here ships in the gateway.
//!
//! - [`fake_hub`]: the service HTTPS endpoint (registry, twins, direct methods), checking
//!   every SAS token against [`POLICY_KEY`] and answering with the REST reference's shapes.
//! - [`fake_amqp`]: the AMQP endpoint of C2D messages (`$cbs`, `/messages/devicebound`).
//! - [`fake_event_hubs`]: the Event Hubs-compatible endpoint (`$cbs`, `$management`,
//!   partition receivers with a selector filter), plain AMQP like the Event Hubs emulator.
//! - [`pki`]: a throwaway CA and server certificate the fakes serve TLS with.

pub mod fake_amqp;
pub mod fake_event_hubs;
pub mod fake_hub;
pub mod pki;

/// A test policy key (base64 of 32 bytes) and its name.
pub const POLICY: &str = "iothubowner";
/// The key of [`POLICY`].
pub const POLICY_KEY: &str = "aW90Z3ctdGVzdC1wb2xpY3kta2V5LTAxMjM0NTY3ODk=";

/// The service connection string of a fake hub at `host`.
pub fn connection_string(host: &str) -> String {
    format!("HostName={host};SharedAccessKeyName={POLICY};SharedAccessKey={POLICY_KEY}")
}
