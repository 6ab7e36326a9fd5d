//! The Field Service IoT entity model and the [`Store`] that keeps it.
//!
//! # Layout
//! - [`id`]: the canonical device id, valid on every provider (defined in `iotgw-ids`,
//!   re-exported here so store code and its callers keep one path).
//! - [`batch`]: group commit, the ordered writes of many events in one transaction.
//! - `apply`: group commit's one loop over those writes, used by every backend.
//! - `fold`: dedupe and debounce of a whole batch's alerts, decided in memory from one
//!   read of the stored tokens and one debounce lookup per alert.
//! - `page`: paging (size bounds, next-page cursor, bad cursors), the same for every backend.
//! - [`model`]: `msdyn_iotdevice`, history, category, command, alert, outbox, dead letter.
//! - [`readings`]: the measures a reading keeps, their rollups, the readings query.
//! - [`store`]: the [`Store`] trait every backend implements.
//! - [`error`]: [`StoreError`], shared by the trait and the group-commit types.
//! - [`decide`]: the store's decisions (debounce, connection-state order, registration
//!   transitions), written once for every backend.
//! - [`sqlite`]: the embedded backend (sqlx, WAL, migrations).
//! - [`postgres`]: the scale-out backend, shared by several replicas.
//! - [`conformance`]: scenarios every backend must pass.
//!
//! This crate knows nothing of clouds or providers: a provider instance is just a name.

mod apply;
pub mod batch;
pub mod conformance;
pub mod decide;
pub mod error;
mod fold;
pub mod model;
mod page;
pub mod postgres;
pub mod readings;
pub mod sqlite;
pub mod store;

pub use batch::{Arrival, BatchOutcome, BatchWrite, IfUnknown};
pub use iotgw_ids::device_id as id;
pub use iotgw_ids::{DeviceId, DeviceIdError, InstanceName, MAX_DEVICE_ID_LEN};
pub use model::*;
pub use postgres::{PostgresOptions, PostgresStore};
pub use readings::{ReadingBucket, ReadingQuery, Readings};
pub use sqlite::{SqliteDurability, SqliteStore};
pub use store::{Store, StoreError, StoreResult};
