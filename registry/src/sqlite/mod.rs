//! The embedded backend: SQLite through sqlx, WAL journal, embedded migrations.
//!
//! # Rooms (the same as `crate::postgres`)
//! - this file: the store, opening, migrations, value helpers, the [`Store`] impl (each
//!   method hands over to its room);
//! - `rows`: the column lists and the mapping of rows to records;
//! - `devices`: devices, connection state, reported properties, categories, history;
//! - `alerts`: telemetry, dedupe, debounce, the alert queries;
//! - `commands`, `outbox` (with dead letters), `checkpoints`;
//! - `batch`: group commit; `registration`: begin and finish, one device or many.
//!
//! # Storage conventions (mirrored by any other backend)
//! - ids are UUIDs stored as lowercase hyphenated text; new ids are UUIDv7 (time ordered);
//! - times are UTC RFC 3339 text with exactly six fraction digits and a `Z`
//!   (`2024-05-01T12:00:00.000000Z`), so text order is time order; times are therefore kept
//!   to the microsecond, the precision of PostgreSQL's `timestamptz`;
//! - JSON is text; option sets are their Dataverse integer values.
//!
//! # Writes
//! Every multi-statement write runs in a `BEGIN IMMEDIATE` transaction: SQLite then takes
//! the write lock up front (waiting up to the 5 s busy timeout), so two writers never
//! deadlock upgrading a read lock, and each telemetry commit, debounce included, sees every
//! alert committed before it.
//!
//! # Outbox idempotency key
//! The outbox `idempotency_key` is the alert id alone (`msdyn_iotalertid`, hyphenated), the
//! same for every sink: each sink is its own receiver, and the key is the id it would store
//! anyway. A `(sink, idempotency_key)` unique index keeps an alert from being queued twice
//! for one sink.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::batch::{check_command_message, BatchOutcome, BatchWrite};
use crate::model::*;
use crate::page::{bad_cursor, finish_page, page_size, MAX_PAGE};
use crate::store::{Store, StoreError, StoreResult};
use crate::DeviceId;

mod alerts;
mod batch;
mod checkpoints;
mod commands;
mod devices;
mod entities;
mod outbox;
mod ownership;
mod readings;
mod registration;
mod rows;

use alerts::*;
use commands::*;
use devices::*;
use outbox::*;
use rows::*;

/// The migrations, embedded at build time, in version order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "checkpoints",
        include_str!("../../migrations/sqlite/0002_checkpoints.sql"),
    ),
    (
        3,
        "debounce index",
        include_str!("../../migrations/sqlite/0003_debounce_index.sql"),
    ),
    (
        4,
        "outbox fencing",
        include_str!("../../migrations/sqlite/0004_outbox_fencing.sql"),
    ),
    (
        5,
        "partition ownership",
        include_str!("../../migrations/sqlite/0005_partition_ownership.sql"),
    ),
    (
        6,
        "command delivery",
        include_str!("../../migrations/sqlite/0006_command_delivery.sql"),
    ),
    (
        7,
        "readings",
        include_str!("../../migrations/sqlite/0007_readings.sql"),
    ),
    (
        8,
        "readings by time",
        include_str!("../../migrations/sqlite/0008_readings_by_time.sql"),
    ),
    (
        9,
        "service work",
        include_str!("../../migrations/sqlite/0009_service_work.sql"),
    ),
    (
        10,
        "entity links",
        include_str!("../../migrations/sqlite/0010_entity_links.sql"),
    ),
    (
        11,
        "connection events",
        include_str!("../../migrations/sqlite/0011_connection_events.sql"),
    ),
    (
        12,
        "reading series",
        include_str!("../../migrations/sqlite/0012_reading_series.sql"),
    ),
    (
        13,
        "change feed",
        include_str!("../../migrations/sqlite/0013_change_feed.sql"),
    ),
    (
        14,
        "change feed entities",
        include_str!("../../migrations/sqlite/0014_change_feed_entities.sql"),
    ),
];

/// Connections in a file store's pool (readers run side by side under WAL).
const FILE_POOL_SIZE: u32 = 4;

/// The SQLite [`Store`].
///
/// Cheap to clone (it is a connection pool).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Registration transactions of this process take turns here before `BEGIN IMMEDIATE`.
    /// SQLite's busy handler waits for the write lock by sleeping 1, 2, 5, 10 ... ms between
    /// tries, so two registration batches colliding on the lock lost more time asleep than
    /// their work took (measured: a 500-device begin went from 3 to 12 ms on average with
    /// two batches in flight); queued here, the next one starts as soon as the previous
    /// one commits.
    registration_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The reading series ids committed so far (`readings::SeriesCache`).
    series: std::sync::Arc<readings::SeriesCache>,
    /// Which sinks take which entities' change events.
    subs: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Subscriptions>>>,
}

/// How a commit reaches the disk (SQLite's `synchronous` under WAL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SqliteDurability {
    /// `synchronous=FULL`: every commit is synced to the disk before it returns, so what
    /// was acknowledged survives a power loss. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: commits are synced at checkpoints only; a crash of the process
    /// loses nothing, a power loss or kernel crash can lose the last commits (already
    /// acknowledged to their devices and clouds).
    Normal,
}

impl SqliteStore {
    /// [`open_with`](Self::open_with) and [`SqliteDurability::Full`].
    pub async fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, SqliteDurability::Full).await
    }

    /// Opens (creating the parent directory and the file if needed) the database at `path`
    /// with a WAL journal, `synchronous` as `durability` says, foreign keys on and a 5 s
    /// busy timeout, and runs the pending migrations.
    ///
    /// The WAL is checkpointed by a background task every [`CHECKPOINT_EVERY`], not by the
    /// commit that happens to cross SQLite's 1,000-page threshold: a checkpoint copies pages
    /// and syncs the database file, which took a commit (and every ack waiting for it) from
    /// milliseconds to a tenth of a second. A passive checkpoint never blocks a writer.
    pub async fn open_with(path: &Path, durability: SqliteDurability) -> StoreResult<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                StoreError::Database(format!(
                    "creating the directory {} for the database: {e}",
                    parent.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                SqliteDurability::Full => SqliteSynchronous::Full,
                SqliteDurability::Normal => SqliteSynchronous::Normal,
            })
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", WAL_SIZE_LIMIT.to_string());
        let pool = SqlitePoolOptions::new()
            .max_connections(FILE_POOL_SIZE)
            // No ping before handing a connection out: a local file connection does not go
            // stale, and the ping is one more hand-off to the worker thread per batch.
            .test_before_acquire(false)
            .after_release(|conn, _| Box::pin(settled_after_release(conn)))
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Database(format!("opening SQLite database {}: {e}", path.display()))
            })?;
        let store = Self::with_pool(pool).await?;
        tokio::spawn(checkpoint_wal(store.pool.clone()));
        Ok(store)
    }

    /// A private in-memory database for tests: one connection that is never closed, so the
    /// data lives as long as the store. Behaves like a file store (same schema, same SQL).
    pub async fn memory() -> StoreResult<Self> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Database(format!("opening in-memory SQLite: {e}")))?;
        Self::with_pool(pool).await
    }

    async fn with_pool(pool: SqlitePool) -> StoreResult<Self> {
        let migrator = Migrator::new(EmbeddedMigrations)
            .await
            .map_err(|e| StoreError::Database(format!("loading the embedded migrations: {e}")))?;
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("migrating the database: {e}")))?;
        Ok(Self {
            pool,
            registration_gate: Default::default(),
            series: Default::default(),
            subs: Default::default(),
        })
    }

    /// The subscriptions in force.
    fn subs(&self) -> std::sync::Arc<Subscriptions> {
        self.subs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The connection pool, for diagnostics and tests.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Checkpoints the WAL into the database file, then closes every connection; the store
    /// is unusable afterwards.
    pub async fn close(&self) {
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error = %e, "checkpointing the WAL at close failed; SQLite replays it at the next open");
        }
        self.pool.close().await;
    }

    async fn write(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db("starting a write transaction"))
    }

    async fn conn(&self) -> StoreResult<sqlx::pool::PoolConnection<Sqlite>> {
        self.pool
            .acquire()
            .await
            .map_err(db("acquiring a connection"))
    }
}

/// Whether a connection given back to the pool may be handed out again: yes unless it is
/// still marked inside a transaction. That happens after a failed `COMMIT` (a full disk:
/// SQLite rolls the transaction back itself, so the rollback sqlx then sends fails and its
/// transaction count stays at one); such a connection would refuse every later `BEGIN`
/// ("non-zero transaction depth") and the store could never write again, so it is closed
/// and the pool opens a new one. The check costs nothing while the count is zero.
async fn settled_after_release(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::TransactionManager;
    type Tm = <Sqlite as sqlx::Database>::TransactionManager;
    if Tm::get_transaction_depth(conn) == 0 {
        return Ok(true);
    }
    // A dropped transaction's rollback is queued on the connection's worker: let it run.
    if let Err(e) = sqlx::query("SELECT 1").execute(&mut *conn).await {
        tracing::debug!(error = %e, "a released connection failed its check; closing it");
        return Ok(false);
    }
    let clean = Tm::get_transaction_depth(conn) == 0;
    if !clean {
        tracing::warn!(
            "a store connection was left inside a transaction by a failed commit; closing it"
        );
    }
    Ok(clean)
}

/// Bytes the WAL file keeps once a checkpoint has emptied it (`journal_size_limit`): a
/// burst (an import of a million devices left a 1.1 GB WAL) no longer holds its disk space
/// until the gateway stops; SQLite truncates the file to this size when it starts the WAL
/// over. Below it the file keeps its size, so steady writing does not grow and truncate it.
pub const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// How often the background task checkpoints the WAL of a file store.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Checkpoints (passively) every [`CHECKPOINT_EVERY`] until the pool is closed.
async fn checkpoint_wal(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            if pool.is_closed() {
                return;
            }
            tracing::warn!(error = %e, "checkpointing the SQLite WAL failed; retrying");
        }
    }
}

/// The migrations in `migrations/sqlite`, embedded with `include_str!`, handed to sqlx's
/// [`Migrator`] (applied versions are tracked in `_sqlx_migrations`, checksums verified).
#[derive(Debug)]
struct EmbeddedMigrations;

type MigrationsFuture =
    Pin<Box<dyn Future<Output = Result<Vec<Migration>, sqlx::error::BoxDynError>> + Send>>;

impl MigrationSource<'static> for EmbeddedMigrations {
    fn resolve(self) -> MigrationsFuture {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

// --- small helpers -------------------------------------------------------------------------

fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::Database(format!("{context}: {e}"))
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

const TS_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// A time as stored.
fn ts(t: DateTime<Utc>) -> String {
    t.format(TS_FORMAT).to_string()
}

fn now() -> String {
    ts(Utc::now())
}

fn parse_ts(raw: &str, col: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Database(format!("column {col} holds {raw:?}, not a time: {e}")))
}

fn get<'r, T>(row: &'r SqliteRow, col: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Database(format!("reading column {col}: {e}")))
}

fn get_ts(row: &SqliteRow, col: &str) -> StoreResult<DateTime<Utc>> {
    parse_ts(&get::<String>(row, col)?, col)
}

fn get_opt_ts(row: &SqliteRow, col: &str) -> StoreResult<Option<DateTime<Utc>>> {
    get::<Option<String>>(row, col)?
        .map(|raw| parse_ts(&raw, col))
        .transpose()
}

fn parse_uuid(raw: &str, col: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(raw)
        .map_err(|e| StoreError::Database(format!("column {col} holds {raw:?}, not a UUID: {e}")))
}

fn get_uuid(row: &SqliteRow, col: &str) -> StoreResult<Uuid> {
    parse_uuid(&get::<String>(row, col)?, col)
}

fn get_opt_uuid(row: &SqliteRow, col: &str) -> StoreResult<Option<Uuid>> {
    get::<Option<String>>(row, col)?
        .map(|raw| parse_uuid(&raw, col))
        .transpose()
}

fn get_device_id(row: &SqliteRow, col: &str) -> StoreResult<DeviceId> {
    let raw: String = get(row, col)?;
    DeviceId::parse(&raw)
        .map_err(|e| StoreError::Database(format!("column {col} holds an invalid device id: {e}")))
}

fn get_json(row: &SqliteRow, col: &str) -> StoreResult<serde_json::Value> {
    let raw: String = get(row, col)?;
    serde_json::from_str(&raw)
        .map_err(|e| StoreError::Database(format!("column {col} holds invalid JSON: {e}")))
}

fn get_opt_json(row: &SqliteRow, col: &str) -> StoreResult<Option<serde_json::Value>> {
    get::<Option<String>>(row, col)?
        .map(|raw| {
            serde_json::from_str(&raw)
                .map_err(|e| StoreError::Database(format!("column {col} holds invalid JSON: {e}")))
        })
        .transpose()
}

fn option_value<T>(row: &SqliteRow, col: &str, from: fn(i64) -> Option<T>) -> StoreResult<T> {
    let v: i64 = get(row, col)?;
    from(v).ok_or_else(|| {
        StoreError::Database(format!("column {col} holds {v}, not a known option value"))
    })
}

fn json_text<T: serde::Serialize + ?Sized>(value: &T, field: &'static str) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid {
        field,
        message: format!("cannot be written as JSON: {e}"),
    })
}

/// Cursor of a newest-first listing: the last item's creation time and id.
fn time_cursor(created_at: DateTime<Utc>, id: &str) -> String {
    format!("{}|{id}", ts(created_at))
}

fn parse_time_cursor(raw: &str) -> StoreResult<(String, String)> {
    let (time, id) = raw.split_once('|').ok_or_else(|| bad_cursor(raw))?;
    let time = parse_ts(time, "after").map_err(|_| bad_cursor(raw))?;
    if id.is_empty() {
        return Err(bad_cursor(raw));
    }
    Ok((ts(time), id.to_owned()))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db("pinging the database"))?;
        Ok(())
    }

    fn set_subscriptions(&self, subscriptions: Subscriptions) {
        *self
            .subs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            std::sync::Arc::new(subscriptions);
    }

    // --- devices -------------------------------------------------------------------------

    async fn begin_registration(&self, device: &NewDevice) -> StoreResult<Device> {
        self.begin_single(device).await
    }

    async fn begin_registrations(
        &self,
        devices: &[NewDevice],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        self.begin_batch(devices).await
    }

    async fn finish_registration(
        &self,
        id: &DeviceId,
        outcome: Result<Option<String>, String>,
    ) -> StoreResult<Device> {
        self.finish_single(id, outcome).await
    }

    async fn finish_registrations(
        &self,
        outcomes: &[(DeviceId, Result<Option<String>, String>)],
    ) -> StoreResult<Vec<StoreResult<Device>>> {
        self.finish_batch(outcomes).await
    }

    async fn device_counts(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT provider_instance, COUNT(*) FROM devices WHERE registration_status <> ? \
             GROUP BY provider_instance ORDER BY provider_instance",
        )
        .bind(RegistrationStatus::Unregistered.value())
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting devices per instance"))?;
        Ok(rows
            .into_iter()
            .map(|(name, n)| (name, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    async fn move_device(&self, id: &DeviceId, from: &str, to: &str) -> StoreResult<(Device, u64)> {
        self.relocate(id, from, to).await
    }

    async fn mark_unregistered(
        &self,
        id: &DeviceId,
        message: Option<String>,
    ) -> StoreResult<Device> {
        self.unregister(id, message).await
    }

    async fn ensure_unknown_device(
        &self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        if insert_unknown_device(&mut tx, id, provider_instance).await? {
            device_changed(&mut tx, id, false, &self.subs()).await?;
        }
        let device = require_device(&mut tx, id).await?;
        tx.commit()
            .await
            .map_err(db("committing an unknown device"))?;
        Ok(device)
    }

    async fn get_device(&self, id: &DeviceId) -> StoreResult<Option<Device>> {
        let mut conn = self.conn().await?;
        fetch_device(&mut conn, id).await
    }

    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Device>> {
        self.devices_page(filter, page).await
    }

    async fn history(&self, id: &DeviceId) -> StoreResult<Vec<RegistrationHistory>> {
        self.device_history(id).await
    }

    async fn connection_history(
        &self,
        id: &DeviceId,
        limit: u32,
    ) -> StoreResult<Vec<(DateTime<Utc>, bool)>> {
        devices::connection_events(&self.pool, id, limit).await
    }

    async fn set_connection_state(
        &self,
        id: &DeviceId,
        connected: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.write().await?;
        let applied = write_connection_state(&mut tx, id, connected, at)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                entity: "device",
                key: id.to_string(),
            })?;
        if applied {
            device_changed(&mut tx, id, true, &self.subs()).await?;
        }
        tx.commit()
            .await
            .map_err(db("committing a connection state"))?;
        Ok(applied)
    }

    async fn set_reported_properties(
        &self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        if !write_reported(&mut conn, id, reported, at).await? {
            return Err(StoreError::NotFound {
                entity: "device",
                key: id.to_string(),
            });
        }
        Ok(())
    }

    async fn set_device_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        let device = write_settings(&mut tx, id, settings)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                entity: "device",
                key: id.to_string(),
            })?;
        device_changed(&mut tx, id, false, &self.subs()).await?;
        tx.commit()
            .await
            .map_err(db("committing device settings"))?;
        Ok(device)
    }

    // --- categories ----------------------------------------------------------------------

    async fn upsert_category(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> StoreResult<Category> {
        let mut tx = self.write().await?;
        let category = write_category(&mut tx, name, description, &self.subs()).await?;
        tx.commit().await.map_err(db("committing a category"))?;
        Ok(category)
    }

    async fn list_categories(&self) -> StoreResult<Vec<Category>> {
        self.categories().await
    }

    async fn commit_telemetry(&self, commit: &TelemetryCommit) -> StoreResult<Vec<CommittedAlert>> {
        self.telemetry(commit).await
    }

    async fn commit_batch(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>> {
        self.apply_batch(writes).await
    }

    async fn query_readings(
        &self,
        query: &crate::readings::ReadingQuery,
    ) -> StoreResult<Vec<crate::readings::ReadingBucket>> {
        self.readings(query).await
    }

    async fn get_alert(&self, id: Uuid) -> StoreResult<Option<Alert>> {
        self.alert(id).await
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Alert>> {
        self.alerts_page(filter, page).await
    }

    async fn set_alert_status(
        &self,
        id: Uuid,
        status: AlertStatus,
        last_command: Option<(Uuid, DateTime<Utc>)>,
    ) -> StoreResult<Alert> {
        self.alert_status(id, status, last_command).await
    }

    async fn set_alert_service_work(&self, id: Uuid, work: ServiceWork) -> StoreResult<Alert> {
        self.alert_service_work(id, work).await
    }

    async fn close_child_alerts(&self, parent: Uuid) -> StoreResult<u64> {
        self.close_children(parent).await
    }

    async fn link_entity(
        &self,
        logical_name: &str,
        entity_id: &str,
        device: &DeviceId,
    ) -> StoreResult<EntityLink> {
        self.link(logical_name, entity_id, device).await
    }

    async fn entity_links(&self, filter: &EntityLinkFilter) -> StoreResult<Vec<EntityLink>> {
        self.links(filter).await
    }

    async fn insert_command(&self, command: &NewCommand) -> StoreResult<Command> {
        self.new_command(command).await
    }

    async fn set_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        reason: Option<String>,
    ) -> StoreResult<Command> {
        self.command_status(id, status, reason).await
    }

    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        self.command(id).await
    }

    async fn claim_command(
        &self,
        id: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<Option<Command>> {
        Ok(self
            .claim_commands(Some(id), holder, now, until, 1)
            .await?
            .pop())
    }

    async fn claim_unpublished_commands(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Command>> {
        self.claim_commands(None, holder, now, until, limit).await
    }

    async fn command_published(&self, id: Uuid, holder: &str) -> StoreResult<bool> {
        self.published(id, holder).await
    }

    async fn defer_command(
        &self,
        id: Uuid,
        holder: &str,
        retry_at: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<bool> {
        self.defer(id, holder, retry_at, reason).await
    }

    async fn release_command_claims(&self, holder: &str) -> StoreResult<u64> {
        self.release_claims(holder).await
    }

    async fn get_command_by_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<Command>> {
        self.command_by_correlation(correlation_id).await
    }

    async fn list_commands(
        &self,
        filter: &CommandFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Command>> {
        self.commands_page(filter, page).await
    }

    async fn claim_outbox(
        &self,
        sink: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxItem>> {
        self.claim(sink, holder, now, lease_until, limit).await
    }

    async fn renew_outbox(
        &self,
        leases: &[OutboxLease],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<i64>> {
        self.renew(leases, lease_until).await
    }

    async fn outbox_delivered(&self, lease: OutboxLease) -> StoreResult<bool> {
        self.delivered(lease).await
    }

    async fn outbox_retry(
        &self,
        lease: OutboxLease,
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> StoreResult<bool> {
        self.retry(lease, next_attempt_at, error).await
    }

    async fn outbox_dead_letter(&self, lease: OutboxLease, reason: &str) -> StoreResult<bool> {
        self.dead_letter_item(lease, reason).await
    }

    async fn outbox_depth(&self) -> StoreResult<Vec<(String, u64)>> {
        self.depth().await
    }

    async fn insert_dead_letter(&self, letter: &NewDeadLetter) -> StoreResult<DeadLetter> {
        let mut conn = self.conn().await?;
        write_dead_letter(&mut conn, letter).await
    }

    async fn list_dead_letters(&self, page: &PageRequest) -> StoreResult<Page<DeadLetter>> {
        self.dead_letters_page(page).await
    }

    async fn get_dead_letter(&self, id: i64) -> StoreResult<Option<DeadLetter>> {
        self.dead_letter(id).await
    }

    async fn delete_dead_letter(&self, id: i64) -> StoreResult<bool> {
        self.remove_dead_letter(id).await
    }

    async fn requeue_outbox(
        &self,
        sink: &str,
        idempotency_key: &str,
        payload: &serde_json::Value,
    ) -> StoreResult<bool> {
        self.queue_again(sink, idempotency_key, payload).await
    }

    async fn purge(&self, before: &PurgeBefore, limit: u32) -> StoreResult<Purged> {
        self.purge_old(before, limit).await
    }

    async fn load_checkpoint(&self, scope: &str, key: &str) -> StoreResult<Option<String>> {
        self.checkpoint(scope, key).await
    }

    async fn save_checkpoint(
        &self,
        scope: &str,
        key: &str,
        value: &str,
        position: i64,
    ) -> StoreResult<bool> {
        self.put_checkpoint(scope, key, value, position).await
    }

    async fn list_ownership(&self, scope: &str) -> StoreResult<Vec<Ownership>> {
        self.ownership(scope).await
    }

    async fn claim_ownership(
        &self,
        scope: &str,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<Option<Ownership>> {
        self.claim_partition(scope, partition, owner, expected_version, expires_at)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod memory {
        crate::conformance_tests!(async {
            crate::SqliteStore::memory().await.expect("in-memory store")
        });
    }

    mod file {
        crate::conformance_tests!(async {
            let dir = tempfile::tempdir().expect("temp dir");
            let store = crate::SqliteStore::open(&dir.path().join("registry.db"))
                .await
                .expect("file store");
            crate::conformance::WithGuard { store, guard: dir }
        });
    }

    async fn pragma(store: &SqliteStore, name: &str) -> String {
        let row = sqlx::query(&format!("PRAGMA {name}"))
            .fetch_one(store.pool())
            .await
            .expect("pragma");
        match row.try_get::<String, _>(0) {
            Ok(text) => text,
            Err(_) => row.try_get::<i64, _>(0).expect("pragma value").to_string(),
        }
    }

    fn alert(token: &str) -> NewAlert {
        NewAlert {
            description: "overheat".into(),
            alert_data: "{}".into(),
            alert_time: Utc::now(),
            alert_token: token.into(),
            alert_type: AlertType::Anomaly,
            priority_score: None,
            rule: "overheat".into(),
            debounce_key: "k".into(),
            command: None,
        }
    }

    #[tokio::test]
    async fn file_store_is_wal_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        // The parent directory does not exist yet: open creates it.
        let path = dir.path().join("state").join("registry.db");
        let id = DeviceId::parse("pump-01").expect("id");

        let store = SqliteStore::open(&path).await.expect("open");
        assert_eq!(pragma(&store, "journal_mode").await, "wal");
        assert_eq!(
            pragma(&store, "synchronous").await,
            "2",
            "synchronous=FULL by default: an acknowledged commit survives a power loss"
        );
        assert_eq!(pragma(&store, "foreign_keys").await, "1");
        assert_eq!(pragma(&store, "busy_timeout").await, "5000");
        store
            .ensure_unknown_device(&id, "mqtt-local")
            .await
            .expect("device");
        let committed = store
            .commit_telemetry(&TelemetryCommit {
                device_id: id.clone(),
                received_at: Utc::now(),
                alerts: vec![alert("evt-durable")],
                debounce_window: chrono::Duration::seconds(60),
                sinks: vec!["hook".into()],
                readings: Default::default(),
            })
            .await
            .expect("commit");
        store.close().await;
        drop(store);

        let reopened = SqliteStore::open(&path)
            .await
            .expect("reopen (migrations are a no-op)");
        assert_eq!(pragma(&reopened, "journal_mode").await, "wal");
        reopened.close().await;
        drop(reopened);
        let relaxed = SqliteStore::open_with(&path, SqliteDurability::Normal)
            .await
            .expect("reopen with NORMAL");
        assert_eq!(
            pragma(&relaxed, "synchronous").await,
            "1",
            "synchronous=NORMAL"
        );
        relaxed.close().await;
        drop(relaxed);
        let reopened = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(
            pragma(&reopened, "wal_autocheckpoint").await,
            "0",
            "no commit pays for a checkpoint: the background task does them"
        );
        assert_eq!(
            pragma(&reopened, "journal_size_limit").await,
            WAL_SIZE_LIMIT.to_string(),
            "a WAL grown by a burst is truncated when it starts over"
        );
        let versions: Vec<i64> =
            sqlx::query("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(reopened.pool())
                .await
                .expect("migrations table")
                .iter()
                .map(|r| r.try_get("version").expect("version"))
                .collect();
        let files = std::fs::read_dir(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"),
        )
        .expect("migrations dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count();
        let expected: Vec<i64> = (1..=i64::try_from(files).expect("count")).collect();
        assert_eq!(
            versions, expected,
            "every migration file applied once, in order"
        );
        let now = Utc::now();
        let items = reopened
            .claim_outbox(
                "hook",
                "replica-1",
                now,
                now + chrono::Duration::seconds(30),
                10,
            )
            .await
            .expect("claim after reopen");
        assert_eq!(items.len(), 1, "the outbox item survived close and reopen");
        assert_eq!(items[0].idempotency_key, committed[0].alert.id.to_string());
        assert_eq!(
            reopened
                .get_alert(committed[0].alert.id)
                .await
                .expect("get"),
            Some(committed[0].alert.clone())
        );
    }

    /// Several tasks on several threads writing to one file at once: `BEGIN IMMEDIATE` plus
    /// the busy timeout serialize them without a single "database is locked".
    /// A WAL grown past [`WAL_SIZE_LIMIT`] by a burst shrinks back to the limit once a
    /// checkpoint has emptied it and the next commit starts it over.
    #[tokio::test]
    async fn a_wal_grown_by_a_burst_is_truncated_to_the_limit_after_a_checkpoint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("registry.db");
        let store = SqliteStore::open(&path).await.expect("open");
        let wal = || {
            std::fs::metadata(dir.path().join("registry.db-wal"))
                .map(|m| m.len())
                .unwrap_or(0)
        };
        sqlx::query("CREATE TABLE burst (b BLOB)")
            .execute(store.pool())
            .await
            .expect("scratch table");
        let mut tx = store.pool().begin().await.expect("begin");
        let mb = WAL_SIZE_LIMIT / (1024 * 1024);
        for _ in 0..mb + 16 {
            sqlx::query("INSERT INTO burst VALUES (zeroblob(1048576))")
                .execute(&mut *tx)
                .await
                .expect("a MiB");
        }
        tx.commit().await.expect("the burst commits");
        assert!(
            wal() > WAL_SIZE_LIMIT as u64,
            "the burst grew the WAL: {}",
            wal()
        );
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(store.pool())
            .await
            .expect("checkpoint");
        sqlx::query("DELETE FROM burst WHERE rowid = 1")
            .execute(store.pool())
            .await
            .expect("a small commit starts the WAL over");
        assert!(
            wal() <= WAL_SIZE_LIMIT as u64,
            "truncated to journal_size_limit: {} bytes",
            wal()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn parallel_writers_on_a_file_never_see_busy() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("registry.db"))
            .await
            .expect("open");
        let id = DeviceId::parse("pump-01").expect("id");
        store
            .ensure_unknown_device(&id, "mqtt-local")
            .await
            .expect("device");
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let store = store.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..15 {
                    // Every worker also redelivers the tokens of worker 0.
                    let token = format!("evt-{}-{n}", worker % 4);
                    store
                        .commit_telemetry(&TelemetryCommit {
                            device_id: id.clone(),
                            received_at: Utc::now(),
                            alerts: vec![alert(&token)],
                            debounce_window: chrono::Duration::seconds(60),
                            sinks: vec!["hook".into()],
                            readings: Default::default(),
                        })
                        .await
                        .expect("commit");
                    store
                        .set_connection_state(&id, n % 2 == 0, Utc::now())
                        .await
                        .expect("connection state");
                    let now = Utc::now();
                    for item in store
                        .claim_outbox(
                            "hook",
                            "replica-1",
                            now,
                            now + chrono::Duration::seconds(60),
                            5,
                        )
                        .await
                        .expect("claim")
                    {
                        store
                            .outbox_delivered(item.lease())
                            .await
                            .expect("delivered");
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
        let alerts = store
            .list_alerts(
                &AlertFilter::default(),
                &PageRequest {
                    after: None,
                    limit: 1000,
                },
            )
            .await
            .expect("alerts");
        assert_eq!(alerts.items.len(), 4 * 15, "one alert per distinct token");
        let parents = alerts
            .items
            .iter()
            .filter(|a| a.parent_alert.is_none())
            .count();
        assert_eq!(parents, 1, "all share a debounce key inside the window");
    }

    /// The debounce lookup is one index seek: no sort of every alert of the key (which
    /// made a burst of N alerts of one device cost O(N) per alert).
    #[tokio::test]
    async fn the_debounce_lookup_needs_no_sort() {
        let store = SqliteStore::memory().await.expect("store");
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", debounce_lookups(2)))
            .bind(0_i64)
            .bind("k")
            .bind("a")
            .bind("b")
            .bind(1_i64)
            .bind("j")
            .bind("a")
            .bind("b")
            .fetch_all(store.pool())
            .await
            .expect("plan")
            .iter()
            .map(|r| r.try_get::<String, _>("detail").expect("detail"))
            .collect();
        assert!(
            plan.iter().any(|d| d.contains("alerts_debounce_latest")),
            "{plan:?}"
        );
        assert!(!plan.iter().any(|d| d.contains("TEMP B-TREE")), "{plan:?}");
    }

    #[tokio::test]
    async fn memory_stores_are_private() {
        let a = SqliteStore::memory().await.expect("a");
        let b = SqliteStore::memory().await.expect("b");
        let id = DeviceId::parse("only-in-a").expect("id");
        a.ensure_unknown_device(&id, "p").await.expect("device");
        assert!(b.get_device(&id).await.expect("get").is_none());
    }

    #[test]
    fn times_are_stored_in_a_fixed_sortable_format() {
        let t = DateTime::parse_from_rfc3339("2024-05-01T12:00:00.1234567Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(ts(t), "2024-05-01T12:00:00.123456Z");
        let whole = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(ts(whole), "2024-05-01T12:00:00.000000Z");
        assert!(ts(whole) < ts(t));
        assert_eq!(
            parse_ts(&ts(t), "t").expect("parse"),
            t - chrono::Duration::nanoseconds(700)
        );
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let t = DateTime::parse_from_rfc3339("2024-05-01T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let c = time_cursor(t, "abc");
        assert_eq!(
            parse_time_cursor(&c).expect("cursor"),
            (ts(t), "abc".to_owned())
        );
        assert!(parse_time_cursor("nope").is_err());
        assert!(parse_time_cursor("2024-05-01T12:00:00Z|").is_err());
    }
}
