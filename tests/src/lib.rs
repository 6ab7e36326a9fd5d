//! Test support for iotgw's behaviour tests (`tests/tests/`): nothing here ships.
//!
//! # Layout
//! - The emulators (Mosquitto, moto, the Pub/Sub emulator, PostgreSQL) are not here: their
//!   one starter each is the `iotgw-testkit` crate (`testkit/`), which the providers'
//!   in-crate tests and the gateway's tests and benches use too.
//! - [`conformance`]: the provider conformance suite: the [`conformance::ProviderFixture`]
//!   trait (one file per provider under `conformance/fixtures/`), the scenarios, the
//!   record normalisation and golden files, and the scenario x provider matrix.
//! - [`api`]: a small client of the gateway's HTTP API.
//! - [`wait`]: waiting on conditions with deadlines (never bare sleeps).
//! - [`runner`]: the tiny runner of the `harness = false` test binaries.
#![allow(
    clippy::disallowed_methods,
    reason = "test support: plain-HTTP clients against local emulators and the gateway under test, no TLS roots or timeouts to configure"
)]

pub mod api;
pub mod conformance;
pub mod runner;
pub mod wait;
