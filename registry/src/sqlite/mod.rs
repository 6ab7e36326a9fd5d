//! The embedded backend: SQLite through sqlx, WAL journal, embedded migrations.
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

use crate::batch::{check_command_message, BatchOutcome, BatchWrite, MAX_DATA_CHARS};
use crate::model::*;
use crate::store::{Store, StoreError, StoreResult};
use crate::DeviceId;

mod batch;
mod registration;

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
];

/// Longest `msdyn_description`.
const MAX_DESCRIPTION_CHARS: usize = 100;
/// Largest page.
const MAX_PAGE: u32 = 1000;
/// Connections in a file store's pool (readers run side by side under WAL).
const FILE_POOL_SIZE: u32 = 4;

const DEVICE_COLS: &str = "id, device_id, name, provider_instance, category, account, \
     connection_state, connection_state_updated_at, last_activity_time, reported_properties, \
     settings, tags, registration_status, registration_message, is_simulated, created_at, updated_at";
const HISTORY_COLS: &str = "id, device, device_id, name, action, provider_instance, created_at";
const CATEGORY_COLS: &str = "id, name, description, created_at";
const ALERT_COLS: &str = "id, description, alert_data, alert_time, alert_token, alert_type, \
     priority_score, device, device_id, parent_alert, parent_alert_token, last_command_sent, \
     last_command_sent_time, statecode, statuscode, rule, provider_instance, created_at";
const COMMAND_COLS: &str = "id, name, message, status, status_reason, device, device_id, \
     parent_alert, correlation_id, provider_instance, created_at, updated_at";
const OUTBOX_COLS: &str = "id, sink, payload, idempotency_key, attempts, last_error, created_at";
const DEAD_LETTER_COLS: &str = "id, source, reason, device_id, message_id, payload, created_at";

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
}

impl SqliteStore {
    /// Opens (creating the parent directory and the file if needed) the database at `path`
    /// with a WAL journal, `synchronous=NORMAL`, foreign keys on and a 5 s busy timeout, and
    /// runs the pending migrations.
    ///
    /// The WAL is checkpointed by a background task every [`CHECKPOINT_EVERY`], not by the
    /// commit that happens to cross SQLite's 1,000-page threshold: a checkpoint copies pages
    /// and syncs the database file, which took a commit (and every ack waiting for it) from
    /// milliseconds to a tenth of a second. A passive checkpoint never blocks a writer.
    pub async fn open(path: &Path) -> StoreResult<Self> {
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
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(FILE_POOL_SIZE)
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
        })
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

/// `s` cut to at most `max` characters, on a character boundary.
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

fn page_size(page: &PageRequest) -> usize {
    page.limit.clamp(1, MAX_PAGE) as usize
}

fn bad_cursor(raw: &str) -> StoreError {
    StoreError::Invalid {
        field: "after",
        message: format!(
            "{raw:?} is not a cursor from a previous page of this listing: leave it out to start from the first page"
        ),
    }
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

/// Keeps at most `size` items and makes the next cursor from the last kept one.
fn finish_page<T>(mut items: Vec<T>, size: usize, cursor: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() > size;
    items.truncate(size);
    let next = if more { items.last().map(cursor) } else { None };
    Page { items, next }
}

/// Debounce: the latest alert with this key inside the window (served by the index
/// `alerts_debounce_latest`, without a sort).
const DEBOUNCE_LOOKUP: &str =
    "SELECT id, alert_token, parent_alert, parent_alert_token FROM alerts \
     WHERE debounce_key = ? AND alert_time >= ? AND alert_time <= ? \
     ORDER BY alert_time DESC, created_at DESC, id DESC LIMIT 1";

/// SQL for "the later of the stored time and this one".
const LATER_ACTIVITY: &str =
    "CASE WHEN last_activity_time IS NULL OR last_activity_time < ? THEN ? ELSE last_activity_time END";

// --- row mapping ---------------------------------------------------------------------------

fn device_from_row(row: &SqliteRow) -> StoreResult<Device> {
    let tags_raw: String = get(row, "tags")?;
    let tags: BTreeMap<String, String> = serde_json::from_str(&tags_raw)
        .map_err(|e| StoreError::Database(format!("column tags holds invalid JSON: {e}")))?;
    Ok(Device {
        id: get_uuid(row, "id")?,
        name: get(row, "name")?,
        device_id: get_device_id(row, "device_id")?,
        provider_instance: get(row, "provider_instance")?,
        category: get(row, "category")?,
        account: get(row, "account")?,
        connection_state: get(row, "connection_state")?,
        connection_state_updated_at: get_opt_ts(row, "connection_state_updated_at")?,
        last_activity_time: get_opt_ts(row, "last_activity_time")?,
        reported_properties: get_opt_json(row, "reported_properties")?,
        settings: get_opt_json(row, "settings")?,
        tags,
        registration_status: option_value(
            row,
            "registration_status",
            RegistrationStatus::from_value,
        )?,
        registration_message: get(row, "registration_message")?,
        is_simulated: option_value(row, "is_simulated", IsSimulated::from_value)?,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn history_from_row(row: &SqliteRow) -> StoreResult<RegistrationHistory> {
    Ok(RegistrationHistory {
        id: get_uuid(row, "id")?,
        device: get_uuid(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        name: get(row, "name")?,
        action: option_value(row, "action", RegistrationAction::from_value)?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn category_from_row(row: &SqliteRow) -> StoreResult<Category> {
    Ok(Category {
        id: get_uuid(row, "id")?,
        name: get(row, "name")?,
        description: get(row, "description")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn alert_from_row(row: &SqliteRow) -> StoreResult<Alert> {
    let priority: Option<i64> = get(row, "priority_score")?;
    let priority_score = priority
        .map(|p| {
            u8::try_from(p).map_err(|_| {
                StoreError::Database(format!("column priority_score holds {p}, not 0..=100"))
            })
        })
        .transpose()?;
    Ok(Alert {
        id: get_uuid(row, "id")?,
        description: get(row, "description")?,
        alert_data: get(row, "alert_data")?,
        alert_time: get_ts(row, "alert_time")?,
        alert_token: get(row, "alert_token")?,
        alert_type: option_value(row, "alert_type", AlertType::from_value)?,
        priority_score,
        device: get_uuid(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        parent_alert: get_opt_uuid(row, "parent_alert")?,
        parent_alert_token: get(row, "parent_alert_token")?,
        last_command_sent: get_opt_uuid(row, "last_command_sent")?,
        last_command_sent_time: get_opt_ts(row, "last_command_sent_time")?,
        statecode: get(row, "statecode")?,
        statuscode: get(row, "statuscode")?,
        rule: get(row, "rule")?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn command_from_row(row: &SqliteRow) -> StoreResult<Command> {
    Ok(Command {
        id: get_uuid(row, "id")?,
        name: get(row, "name")?,
        message: get(row, "message")?,
        status: option_value(row, "status", CommandStatus::from_value)?,
        status_reason: get(row, "status_reason")?,
        device: get_uuid(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        parent_alert: get_opt_uuid(row, "parent_alert")?,
        correlation_id: get(row, "correlation_id")?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

fn outbox_from_row(row: &SqliteRow) -> StoreResult<OutboxItem> {
    let attempts: i64 = get(row, "attempts")?;
    Ok(OutboxItem {
        id: get(row, "id")?,
        sink: get(row, "sink")?,
        payload: get_json(row, "payload")?,
        idempotency_key: get(row, "idempotency_key")?,
        attempts: u32::try_from(attempts).map_err(|_| {
            StoreError::Database(format!("column attempts holds {attempts}, not a count"))
        })?,
        last_error: get(row, "last_error")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn dead_letter_from_row(row: &SqliteRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: get(row, "id")?,
        source: get(row, "source")?,
        reason: get(row, "reason")?,
        device_id: get(row, "device_id")?,
        message_id: get(row, "message_id")?,
        payload: get(row, "payload")?,
        created_at: get_ts(row, "created_at")?,
    })
}

// --- queries shared by several operations --------------------------------------------------

async fn fetch_device(conn: &mut SqliteConnection, id: &DeviceId) -> StoreResult<Option<Device>> {
    sqlx::query(&format!(
        "SELECT {DEVICE_COLS} FROM devices WHERE device_id = ?"
    ))
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("reading a device"))?
    .as_ref()
    .map(device_from_row)
    .transpose()
}

async fn require_device(conn: &mut SqliteConnection, id: &DeviceId) -> StoreResult<Device> {
    fetch_device(conn, id)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            entity: "device",
            key: id.to_string(),
        })
}

/// Creates the category or updates its description (a missing one keeps the stored one).
async fn write_category(
    conn: &mut SqliteConnection,
    name: &str,
    description: Option<&str>,
) -> StoreResult<Category> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid {
            field: "name",
            message: "a category needs a name: give one".into(),
        });
    }
    let row = sqlx::query(&format!(
        "INSERT INTO categories (id, name, description, created_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET description = COALESCE(excluded.description, categories.description) \
         RETURNING {CATEGORY_COLS}"
    ))
    .bind(Uuid::now_v7().to_string())
    .bind(name)
    .bind(description)
    .bind(now())
    .fetch_one(&mut *conn)
    .await
    .map_err(db("writing a category"))?;
    category_from_row(&row)
}

async fn alert_by_token(conn: &mut SqliteConnection, token: &str) -> StoreResult<Option<Alert>> {
    sqlx::query(&format!(
        "SELECT {ALERT_COLS} FROM alerts WHERE alert_token = ?"
    ))
    .bind(token)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up an alert token"))?
    .as_ref()
    .map(alert_from_row)
    .transpose()
}

/// Inserts a command (In Progress) for a known device.
async fn insert_command_row(
    conn: &mut SqliteConnection,
    device: &Device,
    name: &str,
    message: &str,
    parent_alert: Option<Uuid>,
    correlation_id: &str,
) -> StoreResult<Command> {
    let at = now();
    let row = sqlx::query(&format!(
        "INSERT INTO commands (id, name, message, status, status_reason, device, device_id, \
         parent_alert, correlation_id, provider_instance, created_at, updated_at) \
         VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, ?) RETURNING {COMMAND_COLS}"
    ))
    .bind(Uuid::now_v7().to_string())
    .bind(name)
    .bind(message)
    .bind(CommandStatus::InProgress.value())
    .bind(device.id.to_string())
    .bind(device.device_id.as_str())
    .bind(parent_alert.map(|u| u.to_string()))
    .bind(correlation_id)
    .bind(&device.provider_instance)
    .bind(&at)
    .bind(&at)
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(format!(
                "a command with correlation id {correlation_id:?} already exists: use a new correlation id"
            ))
        } else {
            db("inserting a command")(e)
        }
    })?;
    command_from_row(&row)
}

/// Applies a connection state unless a newer one is stored; `None` for an unknown device.
async fn write_connection_state(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    connected: bool,
    at: DateTime<Utc>,
) -> StoreResult<Option<bool>> {
    let at = ts(at);
    let Some(row) =
        sqlx::query("SELECT connection_state_updated_at FROM devices WHERE device_id = ?")
            .bind(id.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("reading a connection state"))?
    else {
        return Ok(None);
    };
    let stored: Option<String> = get(&row, "connection_state_updated_at")?;
    // Same format on both sides, so text order is time order.
    let applied = stored.is_none_or(|s| at.as_str() >= s.as_str());
    let sql = if applied {
        format!(
            "UPDATE devices SET connection_state = ?, connection_state_updated_at = ?, \
             last_activity_time = {LATER_ACTIVITY}, updated_at = ? WHERE device_id = ?"
        )
    } else {
        format!(
            "UPDATE devices SET last_activity_time = {LATER_ACTIVITY}, updated_at = ? WHERE device_id = ?"
        )
    };
    let mut query = sqlx::query(&sql);
    if applied {
        query = query.bind(connected).bind(&at);
    }
    query
        .bind(&at)
        .bind(&at)
        .bind(now())
        .bind(id.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db("writing a connection state"))?;
    Ok(Some(applied))
}

/// Replaces the reported properties; false for an unknown device.
async fn write_reported(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    reported: &serde_json::Value,
    at: DateTime<Utc>,
) -> StoreResult<bool> {
    let reported = json_text(reported, "reported_properties")?;
    let at = ts(at);
    let done = sqlx::query(&format!(
        "UPDATE devices SET reported_properties = ?, last_activity_time = {LATER_ACTIVITY}, \
         updated_at = ? WHERE device_id = ?"
    ))
    .bind(&reported)
    .bind(&at)
    .bind(&at)
    .bind(now())
    .bind(id.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db("writing reported properties"))?;
    Ok(done.rows_affected() > 0)
}

/// Inserts a device seen only in telemetry (status Unknown) unless it exists.
async fn insert_unknown_device(
    conn: &mut SqliteConnection,
    id: &DeviceId,
    provider_instance: &str,
) -> StoreResult<()> {
    let at = now();
    sqlx::query(
        "INSERT INTO devices (id, device_id, name, provider_instance, connection_state, tags, \
         registration_status, is_simulated, created_at, updated_at) \
         VALUES (?, ?, ?, ?, FALSE, '{}', ?, ?, ?, ?) ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(id.as_str())
    .bind(id.as_str())
    .bind(provider_instance)
    .bind(RegistrationStatus::Unknown.value())
    .bind(IsSimulated::No.value())
    .bind(&at)
    .bind(&at)
    .execute(&mut *conn)
    .await
    .map_err(db("inserting an unknown device"))?;
    Ok(())
}

async fn write_dead_letter(
    conn: &mut SqliteConnection,
    letter: &NewDeadLetter,
) -> StoreResult<DeadLetter> {
    let row = sqlx::query(&format!(
        "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
         VALUES (?, ?, ?, ?, ?, ?) RETURNING {DEAD_LETTER_COLS}"
    ))
    .bind(&letter.source)
    .bind(&letter.reason)
    .bind(&letter.device_id)
    .bind(&letter.message_id)
    .bind(&letter.payload)
    .bind(now())
    .fetch_one(&mut *conn)
    .await
    .map_err(db("writing a dead letter"))?;
    dead_letter_from_row(&row)
}

/// Bumps a device's last activity to `at` unless a later time is stored.
async fn bump_activity(
    conn: &mut SqliteConnection,
    device: &Uuid,
    at: DateTime<Utc>,
) -> StoreResult<()> {
    let at = ts(at);
    sqlx::query(&format!(
        "UPDATE devices SET last_activity_time = {LATER_ACTIVITY}, updated_at = ? WHERE id = ?"
    ))
    .bind(&at)
    .bind(&at)
    .bind(now())
    .bind(device.to_string())
    .execute(&mut *conn)
    .await
    .map_err(db("bumping last activity"))?;
    Ok(())
}

/// The alerts of one reading: dedupe by token, debounce, the primary's command, the outbox.
/// The insert itself detects a token already stored (`ON CONFLICT DO NOTHING`), so a new
/// alert costs no separate lookup.
async fn insert_alerts(
    conn: &mut SqliteConnection,
    device: &Device,
    commit: &TelemetryCommit,
) -> StoreResult<Vec<CommittedAlert>> {
    let mut out = Vec::with_capacity(commit.alerts.len());
    for new in &commit.alerts {
        // Debounce: the latest alert with the same key whose time is at most one window
        // from this one's, or its parent if it is a child (the hierarchy stays flat).
        // In order, that is the latest alert of the window before this one; the window
        // also reaches forward so that an alert delivered late (after later alerts of the
        // same burst) folds into its burst instead of opening a new primary.
        let alert_time = ts(new.alert_time);
        let mut parent: Option<(String, Option<String>)> = None;
        if commit.debounce_window > chrono::Duration::zero() {
            let found = sqlx::query(DEBOUNCE_LOOKUP)
                .bind(&new.debounce_key)
                .bind(ts(new.alert_time - commit.debounce_window))
                .bind(ts(new.alert_time + commit.debounce_window))
                .fetch_optional(&mut *conn)
                .await
                .map_err(db("looking for an alert to fold into"))?;
            if let Some(row) = found {
                let up: Option<String> = get(&row, "parent_alert")?;
                parent = Some(match up {
                    Some(id) => (id, get(&row, "parent_alert_token")?),
                    None => (get(&row, "id")?, Some(get(&row, "alert_token")?)),
                });
            }
        }
        let (parent_id, parent_token) = match parent {
            Some((id, token)) => (Some(id), token),
            None => (None, None),
        };

        let inserted = sqlx::query(&format!(
                "INSERT INTO alerts (id, description, alert_data, alert_time, alert_token, alert_type, \
                 priority_score, device, device_id, parent_alert, parent_alert_token, statecode, \
                 statuscode, rule, provider_instance, debounce_key, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (alert_token) DO NOTHING RETURNING {ALERT_COLS}"
            ))
            .bind(Uuid::now_v7().to_string())
            .bind(cut(&new.description, MAX_DESCRIPTION_CHARS))
            .bind(cut(&new.alert_data, MAX_DATA_CHARS))
            .bind(&alert_time)
            .bind(&new.alert_token)
            .bind(new.alert_type.value())
            .bind(new.priority_score.map(i64::from))
            .bind(device.id.to_string())
            .bind(device.device_id.as_str())
            .bind(&parent_id)
            .bind(&parent_token)
            .bind(AlertStatus::Active.statecode())
            .bind(AlertStatus::Active.statuscode())
            .bind(&new.rule)
            .bind(&device.provider_instance)
            .bind(&new.debounce_key)
            .bind(now())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("inserting an alert"))?;
        let Some(row) = inserted else {
            // The token is already stored: a redelivery. Nothing is written for it.
            let existing = alert_by_token(&mut *conn, &new.alert_token)
                .await?
                .ok_or_else(|| {
                    StoreError::Database(format!(
                        "alert token {} conflicted but cannot be read back",
                        new.alert_token
                    ))
                })?;
            out.push(CommittedAlert {
                alert: existing,
                duplicate: true,
                command: None,
            });
            continue;
        };
        let alert = alert_from_row(&row)?;

        // A debounced child does not repeat its parent's command.
        let command = match &new.command {
            Some(c) if alert.parent_alert.is_none() => Some(
                insert_command_row(
                    &mut *conn,
                    device,
                    &c.name,
                    &c.message,
                    Some(alert.id),
                    &c.correlation_id,
                )
                .await?,
            ),
            _ => None,
        };

        if !commit.sinks.is_empty() {
            let payload = serde_json::to_string(&alert).map_err(|e| {
                StoreError::Database(format!("serializing alert {}: {e}", alert.id))
            })?;
            let key = alert.id.to_string();
            let at = now();
            for sink in &commit.sinks {
                sqlx::query(
                        "INSERT INTO outbox (sink, payload, idempotency_key, attempts, next_attempt_at, created_at) \
                         VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (sink, idempotency_key) DO NOTHING",
                    )
                    .bind(sink)
                    .bind(&payload)
                    .bind(&key)
                    .bind(&at)
                    .bind(&at)
                    .execute(&mut *conn)
                    .await
                    .map_err(db("queueing an outbox item"))?;
            }
        }

        out.push(CommittedAlert {
            alert,
            duplicate: false,
            command,
        });
    }
    Ok(out)
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

    async fn mark_unregistered(
        &self,
        id: &DeviceId,
        message: Option<String>,
    ) -> StoreResult<Device> {
        let mut tx = self.write().await?;
        let existing = require_device(&mut tx, id).await?;
        if existing.registration_status == RegistrationStatus::Unregistered {
            return Err(StoreError::Conflict(format!(
                "device {} is already Unregistered (last on provider instance {}): nothing to do",
                existing.device_id, existing.provider_instance
            )));
        }
        let at = now();
        let row = sqlx::query(&format!(
            "UPDATE devices SET registration_status = ?, registration_message = ?, updated_at = ? \
             WHERE id = ? RETURNING {DEVICE_COLS}"
        ))
        .bind(RegistrationStatus::Unregistered.value())
        .bind(&message)
        .bind(&at)
        .bind(existing.id.to_string())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("unregistering a device"))?;
        let device = device_from_row(&row)?;
        registration::insert_history(&mut tx, &[(&device, RegistrationAction::Unregister)], &at)
            .await?;
        tx.commit()
            .await
            .map_err(db("committing an unregistration"))?;
        Ok(device)
    }

    async fn ensure_unknown_device(
        &self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<Device> {
        let mut conn = self.conn().await?;
        insert_unknown_device(&mut conn, id, provider_instance).await?;
        require_device(&mut conn, id).await
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
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {DEVICE_COLS} FROM devices WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let after = DeviceId::parse(after).map_err(|_| bad_cursor(after))?;
            qb.push(" AND device_id > ")
                .push_bind(after.as_str().to_owned());
        }
        if let Some(p) = &filter.provider_instance {
            qb.push(" AND provider_instance = ").push_bind(p.clone());
        }
        if let Some(c) = &filter.category {
            qb.push(" AND category = ").push_bind(c.clone());
        }
        if let Some(s) = filter.registration_status {
            qb.push(" AND registration_status = ").push_bind(s.value());
        }
        if let Some(connected) = filter.connected {
            qb.push(" AND connection_state = ").push_bind(connected);
        }
        qb.push(" ORDER BY device_id LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing devices"))?;
        let items = rows
            .iter()
            .map(device_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |d| d.device_id.to_string()))
    }

    async fn history(&self, id: &DeviceId) -> StoreResult<Vec<RegistrationHistory>> {
        let mut conn = self.conn().await?;
        let device = require_device(&mut conn, id).await?;
        let rows = sqlx::query(&format!(
            "SELECT {HISTORY_COLS} FROM registration_history WHERE device = ? ORDER BY created_at, id"
        ))
        .bind(device.id.to_string())
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reading registration history"))?;
        rows.iter().map(history_from_row).collect()
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

    // --- categories ----------------------------------------------------------------------

    async fn upsert_category(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> StoreResult<Category> {
        let mut conn = self.conn().await?;
        write_category(&mut conn, name, description).await
    }

    async fn list_categories(&self) -> StoreResult<Vec<Category>> {
        let rows = sqlx::query(&format!(
            "SELECT {CATEGORY_COLS} FROM categories ORDER BY name"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing categories"))?;
        rows.iter().map(category_from_row).collect()
    }

    // --- telemetry and alerts ------------------------------------------------------------

    async fn commit_telemetry(&self, commit: &TelemetryCommit) -> StoreResult<Vec<CommittedAlert>> {
        commit.check()?;
        let mut tx = self.write().await?;
        let device = require_device(&mut tx, &commit.device_id).await?;
        bump_activity(&mut tx, &device.id, commit.received_at).await?;
        let out = insert_alerts(&mut tx, &device, commit).await?;
        tx.commit().await.map_err(db("committing telemetry"))?;
        Ok(out)
    }

    async fn commit_batch(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>> {
        self.apply_batch(writes).await
    }

    async fn get_alert(&self, id: Uuid) -> StoreResult<Option<Alert>> {
        sqlx::query(&format!("SELECT {ALERT_COLS} FROM alerts WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading an alert"))?
            .as_ref()
            .map(alert_from_row)
            .transpose()
    }

    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Alert>> {
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {ALERT_COLS} FROM alerts WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let (time, id) = parse_time_cursor(after)?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        if let Some(d) = &filter.device_id {
            qb.push(" AND device_id = ")
                .push_bind(d.as_str().to_owned());
        }
        if let Some(s) = filter.statecode {
            qb.push(" AND statecode = ").push_bind(s);
        }
        if let Some(p) = filter.parent_alert {
            qb.push(" AND parent_alert = ").push_bind(p.to_string());
        }
        match filter.primary {
            Some(true) => {
                qb.push(" AND parent_alert IS NULL");
            }
            Some(false) => {
                qb.push(" AND parent_alert IS NOT NULL");
            }
            None => {}
        }
        if let Some(t) = filter.alert_type {
            qb.push(" AND alert_type = ").push_bind(t.value());
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing alerts"))?;
        let items = rows
            .iter()
            .map(alert_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |a| {
            time_cursor(a.created_at, &a.id.to_string())
        }))
    }

    async fn set_alert_status(
        &self,
        id: Uuid,
        status: AlertStatus,
        last_command: Option<(Uuid, DateTime<Utc>)>,
    ) -> StoreResult<Alert> {
        let (command, sent) = match last_command {
            Some((command, at)) => (Some(command.to_string()), Some(ts(at))),
            None => (None, None),
        };
        let row = sqlx::query(&format!(
            "UPDATE alerts SET statecode = ?, statuscode = ?, \
             last_command_sent = COALESCE(?, last_command_sent), \
             last_command_sent_time = COALESCE(?, last_command_sent_time) \
             WHERE id = ? RETURNING {ALERT_COLS}"
        ))
        .bind(status.statecode())
        .bind(status.statuscode())
        .bind(&command)
        .bind(&sent)
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("setting an alert status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "alert",
            key: id.to_string(),
        })?;
        alert_from_row(&row)
    }

    // --- commands ------------------------------------------------------------------------

    async fn insert_command(&self, command: &NewCommand) -> StoreResult<Command> {
        check_command_message(&command.message)?;
        let mut tx = self.write().await?;
        let device = require_device(&mut tx, &command.device_id).await?;
        if let Some(parent) = command.parent_alert {
            let found = sqlx::query("SELECT id FROM alerts WHERE id = ?")
                .bind(parent.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("looking up a parent alert"))?;
            if found.is_none() {
                return Err(StoreError::NotFound {
                    entity: "alert",
                    key: parent.to_string(),
                });
            }
        }
        let stored = insert_command_row(
            &mut tx,
            &device,
            &command.name,
            &command.message,
            command.parent_alert,
            &command.correlation_id,
        )
        .await?;
        tx.commit().await.map_err(db("committing a command"))?;
        Ok(stored)
    }

    async fn set_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        reason: Option<String>,
    ) -> StoreResult<Command> {
        let row = sqlx::query(&format!(
            "UPDATE commands SET status = ?, status_reason = ?, updated_at = ? WHERE id = ? RETURNING {COMMAND_COLS}"
        ))
        .bind(status.value())
        .bind(&reason)
        .bind(now())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("setting a command status"))?
        .ok_or_else(|| StoreError::NotFound {
            entity: "command",
            key: id.to_string(),
        })?;
        command_from_row(&row)
    }

    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>> {
        sqlx::query(&format!("SELECT {COMMAND_COLS} FROM commands WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a command"))?
            .as_ref()
            .map(command_from_row)
            .transpose()
    }

    async fn get_command_by_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<Command>> {
        sqlx::query(&format!(
            "SELECT {COMMAND_COLS} FROM commands WHERE correlation_id = ?"
        ))
        .bind(correlation_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a command"))?
        .as_ref()
        .map(command_from_row)
        .transpose()
    }

    async fn list_commands(
        &self,
        filter: &CommandFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Command>> {
        let size = page_size(page);
        let mut qb =
            QueryBuilder::<Sqlite>::new(format!("SELECT {COMMAND_COLS} FROM commands WHERE 1 = 1"));
        if let Some(after) = &page.after {
            let (time, id) = parse_time_cursor(after)?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        if let Some(d) = &filter.device_id {
            qb.push(" AND device_id = ")
                .push_bind(d.as_str().to_owned());
        }
        if let Some(s) = filter.status {
            qb.push(" AND status = ").push_bind(s.value());
        }
        if let Some(p) = filter.parent_alert {
            qb.push(" AND parent_alert = ").push_bind(p.to_string());
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing commands"))?;
        let items = rows
            .iter()
            .map(command_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |c| {
            time_cursor(c.created_at, &c.id.to_string())
        }))
    }

    // --- outbox and dead letters ---------------------------------------------------------

    async fn claim_outbox(
        &self,
        sink: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxItem>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = ts(now);
        // One statement, so two replicas can never lease the same item.
        let rows = sqlx::query(&format!(
            "UPDATE outbox SET leased_until = ? WHERE id IN (\
                SELECT id FROM outbox WHERE sink = ? AND next_attempt_at <= ? \
                AND (leased_until IS NULL OR leased_until <= ?) ORDER BY id LIMIT ?) \
             RETURNING {OUTBOX_COLS}"
        ))
        .bind(ts(lease_until))
        .bind(sink)
        .bind(&now)
        .bind(&now)
        .bind(i64::from(limit.min(MAX_PAGE)))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claiming outbox items"))?;
        let mut items = rows
            .iter()
            .map(outbox_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        items.sort_by_key(|i| i.id);
        Ok(items)
    }

    async fn outbox_delivered(&self, id: i64) -> StoreResult<()> {
        // Deleting an item that is already gone (another replica delivered it after our
        // lease ran out) is fine: delivered is delivered.
        sqlx::query("DELETE FROM outbox WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db("removing a delivered outbox item"))?;
        Ok(())
    }

    async fn outbox_retry(
        &self,
        id: i64,
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, \
             leased_until = NULL WHERE id = ?",
        )
        .bind(ts(next_attempt_at))
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(db("recording an outbox retry"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound {
                entity: "outbox item",
                key: id.to_string(),
            });
        }
        Ok(())
    }

    async fn outbox_dead_letter(&self, id: i64, reason: &str) -> StoreResult<()> {
        let mut tx = self.write().await?;
        let row = sqlx::query("SELECT sink, payload, idempotency_key FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading an outbox item"))?
            .ok_or_else(|| StoreError::NotFound {
                entity: "outbox item",
                key: id.to_string(),
            })?;
        let sink: String = get(&row, "sink")?;
        let payload: String = get(&row, "payload")?;
        let key: String = get(&row, "idempotency_key")?;
        let device_id = serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| {
                v.get("msdyn_deviceid")
                    .and_then(|d| d.as_str())
                    .map(str::to_owned)
            });
        sqlx::query(
            "INSERT INTO dead_letters (source, reason, device_id, message_id, payload, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(format!("sink:{sink}"))
        .bind(reason)
        .bind(&device_id)
        .bind(&key)
        .bind(&payload)
        .bind(now())
        .execute(&mut *tx)
        .await
        .map_err(db("writing a dead letter"))?;
        sqlx::query("DELETE FROM outbox WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db("removing a dead outbox item"))?;
        tx.commit().await.map_err(db("committing a dead letter"))?;
        Ok(())
    }

    async fn outbox_depth(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows =
            sqlx::query("SELECT sink, COUNT(*) AS depth FROM outbox GROUP BY sink ORDER BY sink")
                .fetch_all(&self.pool)
                .await
                .map_err(db("counting outbox items"))?;
        rows.iter()
            .map(|row| {
                let depth: i64 = get(row, "depth")?;
                Ok((get(row, "sink")?, u64::try_from(depth).unwrap_or_default()))
            })
            .collect()
    }

    async fn insert_dead_letter(&self, letter: &NewDeadLetter) -> StoreResult<DeadLetter> {
        let mut conn = self.conn().await?;
        write_dead_letter(&mut conn, letter).await
    }

    async fn list_dead_letters(&self, page: &PageRequest) -> StoreResult<Page<DeadLetter>> {
        let size = page_size(page);
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {DEAD_LETTER_COLS} FROM dead_letters WHERE 1 = 1"
        ));
        if let Some(after) = &page.after {
            let (time, id) = parse_time_cursor(after)?;
            let id: i64 = id.parse().map_err(|_| bad_cursor(after))?;
            qb.push(" AND (created_at, id) < (")
                .push_bind(time)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        qb.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(size as i64 + 1);
        let rows = qb
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(db("listing dead letters"))?;
        let items = rows
            .iter()
            .map(dead_letter_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(finish_page(items, size, |d| {
            time_cursor(d.created_at, &d.id.to_string())
        }))
    }

    async fn load_checkpoint(&self, scope: &str, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM checkpoints WHERE scope = ? AND key = ?")
            .bind(scope)
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading a checkpoint"))?;
        row.map(|r| r.try_get("value").map_err(db("reading a checkpoint")))
            .transpose()
    }

    async fn save_checkpoint(&self, scope: &str, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO checkpoints (scope, key, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(scope)
        .bind(key)
        .bind(value)
        .bind(now())
        .execute(&self.pool)
        .await
        .map_err(db("saving a checkpoint"))?;
        Ok(())
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
            "1",
            "synchronous=NORMAL"
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
            })
            .await
            .expect("commit");
        store.close().await;
        drop(store);

        let reopened = SqliteStore::open(&path)
            .await
            .expect("reopen (migrations are a no-op)");
        assert_eq!(pragma(&reopened, "journal_mode").await, "wal");
        assert_eq!(
            pragma(&reopened, "wal_autocheckpoint").await,
            "0",
            "no commit pays for a checkpoint: the background task does them"
        );
        let versions: Vec<i64> =
            sqlx::query("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(reopened.pool())
                .await
                .expect("migrations table")
                .iter()
                .map(|r| r.try_get("version").expect("version"))
                .collect();
        assert_eq!(versions, vec![1, 2, 3]);
        let now = Utc::now();
        let items = reopened
            .claim_outbox("hook", now, now + chrono::Duration::seconds(30), 10)
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
                        })
                        .await
                        .expect("commit");
                    store
                        .set_connection_state(&id, n % 2 == 0, Utc::now())
                        .await
                        .expect("connection state");
                    let now = Utc::now();
                    for item in store
                        .claim_outbox("hook", now, now + chrono::Duration::seconds(60), 5)
                        .await
                        .expect("claim")
                    {
                        store.outbox_delivered(item.id).await.expect("delivered");
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
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {DEBOUNCE_LOOKUP}"))
            .bind("k")
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
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo", 2), "hé");
        assert_eq!(cut("héllo", 10), "héllo");
        assert_eq!(cut("", 3), "");
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
