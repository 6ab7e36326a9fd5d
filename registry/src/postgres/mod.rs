//! The scale-out backend: PostgreSQL through sqlx, shared by several gateway replicas.
//!
//! # Rooms (the same as `crate::sqlite`)
//! - this file: the store, connecting, migrations, value helpers, the [`Store`] impl (each
//!   method hands over to its room);
//! - `rows`: the column lists and the mapping of rows to records;
//! - `devices`: devices, connection state, reported properties, categories, history;
//! - `alerts`: telemetry, dedupe, debounce, the alert queries;
//! - `commands`, `outbox` (with dead letters), `checkpoints`;
//! - `batch`: group commit; `registration`: begin and finish, one device or many.
//!
//! # Storage conventions
//! The tables of `migrations/postgres` mirror `migrations/sqlite` with native types: uuid
//! ids (new ones UUIDv7), `timestamptz` times (kept to the microsecond, as on SQLite),
//! `jsonb` documents, Dataverse option values as `integer`. Text PostgreSQL cannot hold
//! (the NUL character) is written as U+FFFD.
//!
//! # Several replicas on one database
//! - Migrations run through sqlx's migrator, which holds `pg_advisory_lock` while it
//!   migrates: replicas starting together migrate once, the others wait and find nothing
//!   to do.
//! - Writes run at READ COMMITTED. A telemetry commit (one event or a group-commit batch)
//!   first takes transaction-scoped advisory locks on every device it touches and on every
//!   debounce key of its alerts, all in one sorted order, so two replicas committing alerts
//!   of one device serialize (the second sees the first's primary and becomes its child:
//!   never two primaries) and two batches can never deadlock on each other.
//! - Registration transactions take one advisory lock, so their decisions see a stable
//!   registry, as SQLite's single writer gives.
//! - Outbox claims use `FOR UPDATE SKIP LOCKED`: two replicas never lease the same item.
//! - A transaction PostgreSQL aborts as a deadlock or a serialization failure is retried
//!   (a few times) before the error reaches the caller.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, DurationRound, Utc};
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
/// TLS modes of [`PostgresOptions::tls`] (libpq's `sslmode`).
pub use sqlx::postgres::PgSslMode;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::batch::{BatchOutcome, BatchWrite};
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

/// The migrations, embedded at build time, in version order (the same versions as SQLite's).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "checkpoints",
        include_str!("../../migrations/postgres/0002_checkpoints.sql"),
    ),
    (
        3,
        "debounce index",
        include_str!("../../migrations/postgres/0003_debounce_index.sql"),
    ),
    (
        4,
        "outbox fencing",
        include_str!("../../migrations/postgres/0004_outbox_fencing.sql"),
    ),
    (
        5,
        "partition ownership",
        include_str!("../../migrations/postgres/0005_partition_ownership.sql"),
    ),
    (
        6,
        "command delivery",
        include_str!("../../migrations/postgres/0006_command_delivery.sql"),
    ),
    (
        7,
        "readings",
        include_str!("../../migrations/postgres/0007_readings.sql"),
    ),
    (
        8,
        "readings by time",
        include_str!("../../migrations/postgres/0008_readings_by_time.sql"),
    ),
    (
        9,
        "service work",
        include_str!("../../migrations/postgres/0009_service_work.sql"),
    ),
    (
        10,
        "entity links",
        include_str!("../../migrations/postgres/0010_entity_links.sql"),
    ),
    (
        11,
        "connection events",
        include_str!("../../migrations/postgres/0011_connection_events.sql"),
    ),
    (
        12,
        "change feed",
        include_str!("../../migrations/postgres/0012_change_feed.sql"),
    ),
    (
        13,
        "change feed entities",
        include_str!("../../migrations/postgres/0013_change_feed_entities.sql"),
    ),
];

/// How often a transaction aborted as a deadlock or serialization failure is tried.
const TRIES: usize = 4;

/// How to reach the database. `Debug` shows the URL without its password.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?...]`.
    pub url: String,
    /// Overrides a password in the URL.
    pub password: Option<String>,
    /// Connections in the pool.
    pub pool_size: u32,
    /// `statement_timeout` of every connection (zero: none).
    pub statement_timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// TLS mode; overrides an `sslmode` in the URL when set.
    pub tls: Option<PgSslMode>,
}

impl PostgresOptions {
    /// Options with the defaults of `[store.postgres]` for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            pool_size: 10,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// `postgres://USER@HOST:PORT/DATABASE`: where this connects, without any secret (for
    /// logs and errors). Falls back to a placeholder when the URL does not parse.
    pub fn display_url(&self) -> String {
        match PgConnectOptions::from_str(&self.url) {
            Ok(o) => describe(&o),
            Err(_) => "(a PostgreSQL URL that does not parse)".into(),
        }
    }

    fn connect_options(&self) -> StoreResult<PgConnectOptions> {
        let mut o = PgConnectOptions::from_str(&self.url).map_err(|e| StoreError::Invalid {
            field: "url",
            message: format!(
                "{} is not a usable PostgreSQL URL: {}: write postgres://USER@HOST:PORT/DATABASE",
                self.display_url(),
                self.scrub(&e.to_string())
            ),
        })?;
        if let Some(p) = &self.password {
            o = o.password(p);
        }
        if let Some(mode) = self.tls {
            o = o.ssl_mode(mode);
        }
        let timeout_ms = self.statement_timeout.as_millis().to_string();
        Ok(o.application_name("iotgw")
            .options([("statement_timeout", timeout_ms.as_str())]))
    }

    /// `text` with the password (from the URL or the options) replaced by `<redacted>`.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        let from_url = url_password(&self.url);
        for secret in self.password.iter().cloned().chain(from_url) {
            if !secret.is_empty() {
                out = out.replace(&secret, "<redacted>");
            }
        }
        out
    }
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &self.display_url())
            .field("pool_size", &self.pool_size)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The password of a URL's user info, percent-decoding left aside (it is only scrubbed).
fn url_password(url: &str) -> Option<String> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = &authority[..authority.rfind('@')?];
    Some(userinfo.split_once(':')?.1.to_owned())
}

fn describe(o: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or("")
    )
}

/// The PostgreSQL [`Store`].
///
/// Cheap to clone (it is a connection pool).
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
    /// Which sinks take which entities' change events.
    subs: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Subscriptions>>>,
}

impl PostgresStore {
    /// Connects (a first connection is opened now, so a wrong URL, password or TLS mode
    /// fails here, with the URL shown without its password) and runs the pending
    /// migrations under sqlx's migration lock.
    pub async fn connect(options: &PostgresOptions) -> StoreResult<Self> {
        let connect = options.connect_options()?;
        // One connection first, outside the pool: a pool that cannot connect only says
        // that it timed out, and the reason (refused, unknown host, wrong password, TLS)
        // is what an operator needs.
        let classify = |e: sqlx::Error| {
            let why = options.scrub(&e.to_string());
            let code = e
                .as_database_error()
                .and_then(|d| d.code())
                .unwrap_or_default();
            // 28P01: wrong password; 28000: no pg_hba.conf entry / role cannot log in.
            // Waiting does not fix these: say so, never with the secret.
            if code == "28P01" || code == "28000" {
                StoreError::Invalid {
                    field: "password",
                    message: format!(
                        "PostgreSQL at {} refused the login: {why}: check the user and \
                         store.postgres.password (or the URL's password) and the server's pg_hba.conf",
                        options.display_url()
                    ),
                }
            } else {
                StoreError::Database(format!(
                    "connecting to PostgreSQL at {}: {why}",
                    options.display_url()
                ))
            }
        };
        let first = tokio::time::timeout(
            options.connect_timeout,
            sqlx::ConnectOptions::connect(&connect),
        )
        .await
        .map_err(|_| {
            StoreError::Database(format!(
                "connecting to PostgreSQL at {}: no answer within {:?}",
                options.display_url(),
                options.connect_timeout
            ))
        })?
        .map_err(classify)?;
        let _: Result<(), _> = sqlx::Connection::close(first).await;
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size.max(1))
            .acquire_timeout(options.connect_timeout)
            .connect_lazy_with(connect);
        let migrator = Migrator::new(EmbeddedMigrations)
            .await
            .map_err(|e| StoreError::Database(format!("loading the embedded migrations: {e}")))?;
        migrator.run(&pool).await.map_err(|e| {
            StoreError::Database(format!(
                "migrating PostgreSQL at {}: {}",
                options.display_url(),
                options.scrub(&e.to_string())
            ))
        })?;
        Ok(Self {
            pool,
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
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection; the store is unusable afterwards.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn write(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool
            .begin()
            .await
            .map_err(db("starting a write transaction"))
    }

    async fn conn(&self) -> StoreResult<sqlx::pool::PoolConnection<Postgres>> {
        self.pool
            .acquire()
            .await
            .map_err(db("acquiring a connection"))
    }
}

/// The migrations in `migrations/postgres`, embedded with `include_str!`, handed to sqlx's
/// [`Migrator`] (applied versions are tracked in `_sqlx_migrations`, checksums verified,
/// and the whole run holds PostgreSQL's advisory migration lock).
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

/// Whether PostgreSQL aborted the transaction so that trying it again may succeed
/// (deadlock detected, serialization failure).
fn is_retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Database(m) if m.contains("40P01") || m.contains("40001")
        || m.contains("deadlock detected") || m.contains("could not serialize"))
}

/// Runs `attempt` until it succeeds, fails for good, or [`TRIES`] are used up.
async fn retrying<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let mut tried = 0;
    loop {
        tried += 1;
        match attempt().await {
            Err(e) if tried < TRIES && is_retryable(&e) => {
                tracing::debug!(error = %e, tried, "PostgreSQL aborted a transaction; trying it again");
            }
            other => return other,
        }
    }
}

/// A time as stored: to the microsecond.
fn ts(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(chrono::Duration::microseconds(1))
        .unwrap_or(t)
}

fn now() -> DateTime<Utc> {
    ts(Utc::now())
}

/// Text PostgreSQL can store: NUL becomes U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// A JSON document `jsonb` can store: NUL in any string or key becomes U+FFFD.
fn jsonb(value: &serde_json::Value) -> sqlx::types::Json<serde_json::Value> {
    fn clean(v: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::String(s) => Value::String(text(s).into_owned()),
            Value::Array(a) => Value::Array(a.iter().map(clean).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (text(k).into_owned(), clean(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    sqlx::types::Json(clean(value))
}

fn get<'r, T>(row: &'r PgRow, col: &str) -> StoreResult<T>
where
    T: sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres>,
{
    row.try_get(col)
        .map_err(|e| StoreError::Database(format!("reading column {col}: {e}")))
}

fn get_device_id(row: &PgRow, col: &str) -> StoreResult<DeviceId> {
    let raw: String = get(row, col)?;
    DeviceId::parse(&raw)
        .map_err(|e| StoreError::Database(format!("column {col} holds an invalid device id: {e}")))
}

fn option_value<T>(row: &PgRow, col: &str, from: fn(i64) -> Option<T>) -> StoreResult<T> {
    let v: i32 = get(row, col)?;
    from(i64::from(v)).ok_or_else(|| {
        StoreError::Database(format!("column {col} holds {v}, not a known option value"))
    })
}

fn json_value<T: serde::Serialize + ?Sized>(
    value: &T,
    field: &'static str,
) -> StoreResult<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| StoreError::Invalid {
        field,
        message: format!("cannot be written as JSON: {e}"),
    })
}

const TS_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Cursor of a newest-first listing: the last item's creation time and id (the same text
/// as SQLite's cursors).
fn time_cursor(created_at: DateTime<Utc>, id: &str) -> String {
    format!("{}|{id}", created_at.format(TS_FORMAT))
}

fn parse_time_cursor(raw: &str) -> StoreResult<(DateTime<Utc>, String)> {
    let (time, id) = raw.split_once('|').ok_or_else(|| bad_cursor(raw))?;
    let time = DateTime::parse_from_rfc3339(time)
        .map_err(|_| bad_cursor(raw))?
        .with_timezone(&Utc);
    if id.is_empty() {
        return Err(bad_cursor(raw));
    }
    Ok((ts(time), id.to_owned()))
}

fn parse_uuid_cursor(raw: &str) -> StoreResult<(DateTime<Utc>, Uuid)> {
    let (time, id) = parse_time_cursor(raw)?;
    Ok((time, Uuid::parse_str(&id).map_err(|_| bad_cursor(raw))?))
}

/// A 64-bit advisory lock key for `name` in `space` (FNV-1a: the same on every replica
/// and every build).
fn lock_key(space: &str, name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in space.bytes().chain([0]).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Takes these transaction-scoped advisory locks, in ascending order (every writer takes
/// them in that order, so two writers never wait on each other in a cycle).
async fn lock_all(conn: &mut PgConnection, mut keys: Vec<i64>) -> StoreResult<()> {
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    // unnest yields the array in order, and the locks are taken row by row.
    sqlx::query("SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS t(k)")
        .bind(&keys)
        .execute(&mut *conn)
        .await
        .map_err(db("taking advisory locks"))?;
    Ok(())
}

#[async_trait]
impl Store for PostgresStore {
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
            "SELECT provider_instance, COUNT(*) FROM devices WHERE registration_status <> $1 \
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
        let subs = self.subs();
        retrying(|| async {
            let mut tx = self.write().await?;
            if devices::insert_unknown_device(&mut tx, id, provider_instance).await? {
                devices::device_changed(&mut tx, id, false, &subs).await?;
            }
            let device = devices::require_device(&mut tx, id).await?;
            tx.commit()
                .await
                .map_err(db("committing an unknown device"))?;
            Ok(device)
        })
        .await
    }

    async fn get_device(&self, id: &DeviceId) -> StoreResult<Option<Device>> {
        let mut conn = self.conn().await?;
        devices::fetch_device(&mut conn, id).await
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
        retrying(|| async {
            let mut tx = self.write().await?;
            let applied = devices::write_connection_state(&mut tx, id, connected, at)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    entity: "device",
                    key: id.to_string(),
                })?;
            if applied {
                devices::device_changed(&mut tx, id, true, &self.subs()).await?;
            }
            tx.commit()
                .await
                .map_err(db("committing a connection state"))?;
            Ok(applied)
        })
        .await
    }

    async fn set_reported_properties(
        &self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        if !devices::write_reported(&mut conn, id, reported, at).await? {
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
        retrying(|| async {
            let mut tx = self.write().await?;
            let device = devices::write_settings(&mut tx, id, settings)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    entity: "device",
                    key: id.to_string(),
                })?;
            devices::device_changed(&mut tx, id, false, &self.subs()).await?;
            tx.commit()
                .await
                .map_err(db("committing device settings"))?;
            Ok(device)
        })
        .await
    }

    // --- categories ----------------------------------------------------------------------

    async fn upsert_category(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> StoreResult<Category> {
        retrying(|| async {
            let mut tx = self.write().await?;
            let category =
                registration::write_category(&mut tx, name, description, &self.subs()).await?;
            tx.commit().await.map_err(db("committing a category"))?;
            Ok(category)
        })
        .await
    }

    async fn list_categories(&self) -> StoreResult<Vec<Category>> {
        self.categories().await
    }

    // --- telemetry and alerts ------------------------------------------------------------

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

    // --- commands ------------------------------------------------------------------------

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

    // --- outbox and dead letters ---------------------------------------------------------

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
        outbox::write_dead_letter(&mut conn, letter).await
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

    #[test]
    fn the_password_never_shows_in_what_is_printed() {
        let mut o = PostgresOptions::new("postgres://iotgw:hunter2@db:5433/fleet?sslmode=disable");
        o.password = Some("s3cret".into());
        assert_eq!(o.display_url(), "postgres://iotgw@db:5433/fleet");
        let shown = format!("{o:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert_eq!(
            o.scrub("password hunter2 or s3cret failed"),
            "password <redacted> or <redacted> failed"
        );
    }

    #[test]
    fn lock_keys_are_stable_and_spaced() {
        assert_eq!(lock_key("device", "pump-01"), lock_key("device", "pump-01"));
        assert_ne!(
            lock_key("device", "pump-01"),
            lock_key("debounce", "pump-01")
        );
        assert_ne!(lock_key("device", "a"), lock_key("devicea", ""));
    }

    #[test]
    fn text_pg_cannot_hold_is_replaced() {
        assert_eq!(text("a\0b"), "a\u{FFFD}b");
    }
}
