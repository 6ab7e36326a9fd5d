//! iotgw: one registry and one alert pipeline in front of several IoT clouds.
//!
//! # Layout
//! - [`cli`]: the command line (thin; `main.rs` only calls it); [`import`]: `iotgw devices
//!   import`, a file of devices registered through a running gateway's batch route.
//!   [`move_cli`]: `iotgw devices move`, through a running gateway's move route.
//!   [`status`]: `iotgw status`, a running gateway's overview read from its API.
//!   [`replay_cli`]: `iotgw dead-letters replay`, through the API, with a progress bar.
//! - [`definitions`]: Field Service's command and property definitions (type checks).
//! - [`app`]: composition and graceful shutdown; [`errors`]: an error's cause chain in words.
//! - [`core`]: the operations the API, CLI and pipeline share (register, unregister, commands).
//! - [`commands`]: command delivery (claim, send, wait for the instance, expire, resend
//!   after a crash).
//! - [`instances`]: the running provider instances (start, drain and remove, stop).
//! - [`live`]: the reloadable state (config, routing, rules, sinks, providers), swapped
//!   whole by a reload.
//! - [`router`]: which provider instance hosts a new device; [`moves`]: moving a device
//!   to another instance.
//! - [`rules`]: alert rules over JSON telemetry.
//! - [`pipeline`]: provider events -> committed effects -> ack.
//! - [`sinks`]: outbox workers and the stdout, file and webhook sinks.
//! - [`reload`]: configuration hot reload (SIGHUP, file changes, `POST /api/v1/config/reload`).
//! - [`api`]: the HTTP API, `/live`, `/ready`, `/metrics`; [`console`]: the operator's
//!   console at `/ui` (server-rendered HTML).
//! - [`health`], [`metrics`]: readiness and Prometheus metrics.
//! - [`internal_events`]: typed events (alert committed, event rejected, delivery
//!   failed) whose one `emit` writes the log line and bumps the metric together.
//! - [`broker`]: the embedded MQTT broker; [`simulate`]: simulated devices.
//!
//! Providers never touch the store and the store never knows a cloud: they meet in [`core`]
//! and [`pipeline`].

pub mod api;
pub mod app;
pub mod broker;
pub mod checkpoints;
pub mod cli;
pub mod commands;
pub mod console;
pub mod core;
pub mod definitions;
pub mod errors;
pub mod health;
pub mod import;
pub mod instances;
pub mod internal_events;
pub mod live;
pub mod metrics;
pub mod move_cli;
pub mod moves;
pub mod ownership;
pub mod pipeline;
pub mod reload;
pub mod replay;
pub mod replay_cli;
pub mod retention;
pub mod router;
pub mod rules;
pub mod simulate;
pub mod sinks;
pub mod status;
pub mod vitals;
