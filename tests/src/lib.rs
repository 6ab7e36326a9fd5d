//! Test support for iotgw's behaviour tests (`tests/tests/`): nothing here ships.
//!
//! # Layout
//! - [`harness`]: the emulators (Mosquitto, moto, the Pub/Sub emulator, PostgreSQL) in
//!   Docker through testcontainers, one shared container per test binary, dedicated ones
//!   for restart tests; skip or fail when Docker is missing.
//! - [`conformance`]: the provider conformance suite: the [`conformance::ProviderFixture`]
//!   trait (one file per provider under `conformance/fixtures/`), the scenarios, the
//!   record normalisation and golden files, and the scenario x provider matrix.
//! - [`api`]: a small client of the gateway's HTTP API.
//! - [`wait`]: waiting on conditions with deadlines (never bare sleeps).
//! - [`runner`]: the tiny runner of the `harness = false` test binaries.
#![allow(
    clippy::disallowed_methods,
    reason = "test support: plain-HTTP clients against local emulators; DOCKER_HOST is set once, inside a OnceLock, before any container starts"
)]

pub mod api;
pub mod conformance;
pub mod harness;
pub mod runner;
pub mod wait;
