//! The `Store` trait: the one source of truth for devices, history, commands, alerts, the
//! outbox and dead letters. Backends implement it and pass the same conformance suite
//! (`crate::conformance`): SQLite (`crate::sqlite`, the embedded default) and PostgreSQL
//! (`crate::postgres`, shared by several replicas). What a backend decides is decided in
//! `crate::decide`, once for both.
//!
//! Debounce lives here, inside the telemetry transaction (or the batch transaction of a
//! group commit), so it sees every alert committed before it.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::batch::{BatchOutcome, BatchWrite};
pub use crate::error::{StoreError, StoreResult};
use crate::model::*;
use crate::DeviceId;

/// Persistence for the Field Service entities and the delivery machinery.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap check that the database answers (for `/ready`).
    async fn ping(&self) -> StoreResult<()>;

    /// Which sinks take which entities' change events from now on (set at start-up and
    /// after each reload): every write that commits a change of a device, command,
    /// registration history row, category or stored alert queues, in its transaction, one
    /// change event per sink taking the changed entity (a new alert keeps its own item, for
    /// the sinks of its commit that take alerts).
    fn set_subscriptions(&self, subscriptions: Subscriptions);

    // --- devices -------------------------------------------------------------------------

    /// Starts a registration: inserts the device as In Progress, or moves an Unregistered,
    /// Unknown or Error device back to In Progress with the new fields. A device that is
    /// Registered or In Progress gives `Conflict` naming its provider instance.
    async fn begin_registration(&self, device: &NewDevice) -> StoreResult<Device>;

    /// Starts many registrations in one transaction, each by the rules of
    /// [`begin_registration`](Self::begin_registration), and returns one result per device,
    /// at the same index. A device's refusal (`Conflict`, `Invalid`) is its own result and
    /// does not fail the others; an id repeated in the batch is a `Conflict` the second time
    /// (the first one is In Progress by then). Each distinct category the devices name is
    /// created once per batch (an existing one is kept as it is); a device naming a category
    /// that cannot be created gets that category's error and is not begun. The outer `Err`
    /// means the batch as a whole failed (the database) and nothing was written.
    async fn begin_registrations(
        &self,
        devices: &[NewDevice],
    ) -> StoreResult<Vec<StoreResult<Device>>>;

    /// Ends a registration: `Ok(message)` sets Registered and writes a Register history row;
    /// `Err(message)` sets Error with the message (no history row).
    async fn finish_registration(
        &self,
        id: &DeviceId,
        outcome: Result<Option<String>, String>,
    ) -> StoreResult<Device>;

    /// Ends many registrations in one transaction, each by the rules of
    /// [`finish_registration`](Self::finish_registration), and returns one result per
    /// outcome, at the same index (`NotFound` for an unknown device, without failing the
    /// others). The outer `Err` means nothing was written.
    async fn finish_registrations(
        &self,
        outcomes: &[(DeviceId, Result<Option<String>, String>)],
    ) -> StoreResult<Vec<StoreResult<Device>>>;

    /// Marks the device Unregistered and writes an Unregister history row. `NotFound` when
    /// unknown; `Conflict` when it is already Unregistered.
    async fn mark_unregistered(
        &self,
        id: &DeviceId,
        message: Option<String>,
    ) -> StoreResult<Device>;

    /// Moves a device from provider instance `from` to `to` in one transaction: its
    /// provider instance becomes `to`, history gets a Deactivate row on `from` and a
    /// Register row on `to`, and its commands still In Progress end in Error with the
    /// reason (they went through `from`, which may have delivered them; they are not
    /// re-sent). `Conflict` when the device is not Registered/Unknown, is not on `from`
    /// (it moved meanwhile) or already on `to`; `NotFound` when unknown. Returns the device
    /// as moved and how many commands ended in Error.
    async fn move_device(&self, id: &DeviceId, from: &str, to: &str) -> StoreResult<(Device, u64)>;

    /// Inserts a device seen only in telemetry, with status Unknown. Returns the existing
    /// device unchanged if there is one.
    async fn ensure_unknown_device(
        &self,
        id: &DeviceId,
        provider_instance: &str,
    ) -> StoreResult<Device>;

    /// One device.
    async fn get_device(&self, id: &DeviceId) -> StoreResult<Option<Device>>;

    /// Devices matching the filter, ordered by device id.
    async fn list_devices(
        &self,
        filter: &DeviceFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Device>>;

    /// How many devices each provider instance hosts (Unregistered ones not counted), by
    /// instance name.
    async fn device_counts(&self) -> StoreResult<Vec<(String, u64)>>;

    /// Registration history of a device, oldest first.
    async fn history(&self, id: &DeviceId) -> StoreResult<Vec<RegistrationHistory>>;

    /// Applies a connection state if `at` is not older than the stored state's time (events
    /// are ordered by event time, never by arrival). Returns whether it was applied.
    /// `NotFound` for an unknown device.
    async fn set_connection_state(
        &self,
        id: &DeviceId,
        connected: bool,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// The device's connection state changes, newest first: (time, connected), at most
    /// `limit` (and [`CONNECTION_EVENTS_KEPT`] are kept).
    async fn connection_history(
        &self,
        id: &DeviceId,
        limit: u32,
    ) -> StoreResult<Vec<(DateTime<Utc>, bool)>>;

    /// Replaces the reported properties and bumps last activity.
    async fn set_reported_properties(
        &self,
        id: &DeviceId,
        reported: &serde_json::Value,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    /// Replaces the device's desired settings (`msdyn_devicesettings`, Update Device Data)
    /// and bumps `updated_at`; answers the device as stored. `NotFound` for an unknown
    /// device.
    async fn set_device_settings(
        &self,
        id: &DeviceId,
        settings: &serde_json::Value,
    ) -> StoreResult<Device>;

    // --- categories ----------------------------------------------------------------------

    /// Creates the category or updates its description.
    async fn upsert_category(&self, name: &str, description: Option<&str>)
        -> StoreResult<Category>;

    /// All categories by name.
    async fn list_categories(&self) -> StoreResult<Vec<Category>>;

    // --- telemetry and alerts ------------------------------------------------------------

    /// Commits one telemetry message in one transaction: bumps the device's last activity,
    /// inserts each alert unless its token is already stored (then it is reported as a
    /// duplicate and nothing is written for it), folds it into the first alert with the
    /// same debounce key inside the window (a match on a child links to that child's
    /// parent: the hierarchy stays flat), creates the command of a primary alert (In
    /// Progress; a debounced child does not repeat its parent's command) and
    /// queues one outbox item per sink carrying the alert JSON.
    async fn commit_telemetry(&self, commit: &TelemetryCommit) -> StoreResult<Vec<CommittedAlert>>;

    /// Applies `writes` in order in one transaction (group commit) and returns one outcome
    /// per write, at the same index. Either all of them are committed or none is (`Err`):
    /// the caller acknowledges the events only after `Ok`. Later writes see earlier ones, so
    /// debounce and dedupe inside a batch come out exactly as with one commit per write.
    /// Call [`crate::TelemetryCommit::check`] first: a write that fails it fails the batch.
    async fn commit_batch(&self, writes: &[BatchWrite]) -> StoreResult<Vec<BatchOutcome>>;

    /// One device's readings in buckets (see [`crate::readings::ReadingQuery`]), ordered by
    /// measure then time; an empty bucket is not listed.
    async fn query_readings(
        &self,
        query: &crate::readings::ReadingQuery,
    ) -> StoreResult<Vec<crate::readings::ReadingBucket>>;

    /// One alert.
    async fn get_alert(&self, id: Uuid) -> StoreResult<Option<Alert>>;

    /// Alerts matching the filter, newest first.
    async fn list_alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Alert>>;

    /// Sets an alert's state/status and, when given, its last command and time.
    async fn set_alert_status(
        &self,
        id: Uuid,
        status: AlertStatus,
        last_command: Option<(Uuid, DateTime<Utc>)>,
    ) -> StoreResult<Alert>;

    /// Records the case or work order Field Service created from an alert and sets its
    /// status (In Progress – Case Created / Work Order Created). `NotFound` for an unknown
    /// alert.
    async fn set_alert_service_work(&self, id: Uuid, work: ServiceWork) -> StoreResult<Alert>;

    /// Closes the children of a parent alert that are not closed yet; how many.
    async fn close_child_alerts(&self, parent: Uuid) -> StoreResult<u64>;

    // --- entity links --------------------------------------------------------------------

    /// Links a Field Service record (logical name, id) to a stored device; linking again
    /// answers the stored link. `NotFound` for an unknown device.
    async fn link_entity(
        &self,
        logical_name: &str,
        entity_id: &str,
        device: &DeviceId,
    ) -> StoreResult<EntityLink>;

    /// The links matching the filter, at most [`MAX_ENTITY_LINKS`], by entity then device.
    async fn entity_links(&self, filter: &EntityLinkFilter) -> StoreResult<Vec<EntityLink>>;

    // --- commands ------------------------------------------------------------------------

    /// Creates a command, In Progress. `NotFound` for an unknown device.
    async fn insert_command(&self, command: &NewCommand) -> StoreResult<Command>;

    /// Sets a command's status and reason.
    async fn set_command_status(
        &self,
        id: Uuid,
        status: CommandStatus,
        reason: Option<String>,
    ) -> StoreResult<Command>;

    /// One command.
    async fn get_command(&self, id: Uuid) -> StoreResult<Option<Command>>;

    /// Claims a command for `holder` to send until `until`: returns it when it is In
    /// Progress, not yet published, and not claimed by anyone whose claim runs past `now`
    /// (a claim of a sender that died runs out and can be taken over). `None` otherwise.
    async fn claim_command(
        &self,
        id: Uuid,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<Option<Command>>;

    /// Claims, oldest first, up to `limit` commands that are In Progress, never published
    /// and not under a live claim (see [`claim_command`](Self::claim_command)): the ones a
    /// crash, a restart or an unreachable instance left behind, and the ones whose retry
    /// time ([`defer_command`](Self::defer_command)) has come.
    async fn claim_unpublished_commands(
        &self,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Command>>;

    /// Records that the provider took the command (published at now) and drops the claim;
    /// false (nothing changed) when `holder` does not hold it or it is no longer In Progress.
    async fn command_published(&self, id: Uuid, holder: &str) -> StoreResult<bool>;

    /// Leaves a claimed command unsent for now: it stays In Progress with `reason` as its
    /// status reason, and may be claimed again from `retry_at`. False (nothing changed) when
    /// `holder` does not hold it or it is no longer In Progress.
    async fn defer_command(
        &self,
        id: Uuid,
        holder: &str,
        retry_at: DateTime<Utc>,
        reason: &str,
    ) -> StoreResult<bool>;

    /// Drops every command claim of `holder` (a replica that restarted under its id: what
    /// it was sending when it stopped is free to be sent again). Returns how many.
    async fn release_command_claims(&self, holder: &str) -> StoreResult<u64>;

    /// The command with this correlation id.
    async fn get_command_by_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<Command>>;

    /// Commands matching the filter, newest first.
    async fn list_commands(
        &self,
        filter: &CommandFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Command>>;

    // --- outbox and dead letters ---------------------------------------------------------

    /// Leases up to `limit` due items of one sink, oldest first, to `holder` (a replica id,
    /// kept for operators) until `lease_until`, so another replica does not take them
    /// meanwhile. Each claim gives the item a new, larger fencing token
    /// ([`OutboxItem::lease_token`]). An item of a record ([`OutboxItem::change_of`]) is not
    /// claimed while an earlier item of the same record and sink waits for its retry or is
    /// leased, so each record's changes reach a sink in order.
    async fn claim_outbox(
        &self,
        sink: &str,
        holder: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxItem>>;

    /// Extends the leases still held (token unchanged) until `lease_until`; returns the ids
    /// renewed. A lease that is missing was taken over by another replica, or the item is
    /// gone: its holder should stop working on it.
    async fn renew_outbox(
        &self,
        leases: &[OutboxLease],
        lease_until: DateTime<Utc>,
    ) -> StoreResult<Vec<i64>>;

    /// Removes a delivered item; false (nothing changed) when the lease is no longer held.
    async fn outbox_delivered(&self, lease: OutboxLease) -> StoreResult<bool>;

    /// Records a failed attempt and when to try again, releasing the lease; false (nothing
    /// changed) when the lease is no longer held.
    async fn outbox_retry(
        &self,
        lease: OutboxLease,
        next_attempt_at: DateTime<Utc>,
        error: &str,
    ) -> StoreResult<bool>;

    /// Moves an item that can never be delivered to the dead letters with the reason; false
    /// (nothing changed) when the lease is no longer held.
    async fn outbox_dead_letter(&self, lease: OutboxLease, reason: &str) -> StoreResult<bool>;

    /// Items waiting per sink.
    async fn outbox_depth(&self) -> StoreResult<Vec<(String, u64)>>;

    /// Records a dead letter.
    async fn insert_dead_letter(&self, letter: &NewDeadLetter) -> StoreResult<DeadLetter>;

    /// Dead letters, newest first.
    async fn list_dead_letters(&self, page: &PageRequest) -> StoreResult<Page<DeadLetter>>;

    /// One dead letter.
    async fn get_dead_letter(&self, id: i64) -> StoreResult<Option<DeadLetter>>;

    /// Deletes a dead letter (after it was replayed); false when it was not there.
    async fn delete_dead_letter(&self, id: i64) -> StoreResult<bool>;

    /// Queues an outbox item for `sink` again (the replay of a sink's dead letter), due
    /// now; false when an item with this key is already queued for the sink.
    async fn requeue_outbox(
        &self,
        sink: &str,
        idempotency_key: &str,
        payload: &serde_json::Value,
    ) -> StoreResult<bool>;

    /// Retention: deletes at most `limit` rows per table of what `before` allows, oldest
    /// first, in one transaction: dead letters; commands no longer In Progress; Inactive or
    /// Closed alerts that no alert names as its parent (a closed child goes first, its
    /// parent in a later call), after unlinking the commands that name them. Call again
    /// while a count reaches `limit`.
    async fn purge(&self, before: &PurgeBefore, limit: u32) -> StoreResult<Purged>;

    /// The checkpoint saved under `(scope, key)`: where a provider's stream resumes
    /// (`scope` is the provider instance, `key` the provider's own, such as a partition).
    async fn load_checkpoint(&self, scope: &str, key: &str) -> StoreResult<Option<String>>;

    /// Saves `value` under `(scope, key)` at `position`, the checkpoint's place in its
    /// stream (the Event Hubs sequence number), unless the stored checkpoint is further
    /// along: positions never move backwards, so a replica that lost a partition and still
    /// settles its last events cannot write behind the replica that took the partition
    /// over. An equal position replaces the value; a checkpoint stored without a position
    /// (before positions existed) is replaced by any save. Returns whether it was saved.
    async fn save_checkpoint(
        &self,
        scope: &str,
        key: &str,
        value: &str,
        position: i64,
    ) -> StoreResult<bool>;

    // --- partition ownership -------------------------------------------------------------

    /// Every ownership claim of `scope` (a provider instance), expired ones included (the
    /// caller decides what is expired: the store keeps claims, it does not balance them),
    /// ordered by partition.
    async fn list_ownership(&self, scope: &str) -> StoreResult<Vec<Ownership>>;

    /// Claims (or renews, or releases with an `expires_at` in the past) `partition` of
    /// `scope` for `owner` until `expires_at`, if nobody changed the claim since the caller
    /// read it: `expected_version` is the version read (`None`: there must be no claim
    /// yet). On success the claim's version is one more than before (1 for a new claim) and
    /// the new claim is returned; `None` means another replica wrote first (the race is
    /// lost, nothing was written). Optimistic concurrency, as Event Hubs processors do with
    /// a blob's etag.
    async fn claim_ownership(
        &self,
        scope: &str,
        partition: &str,
        owner: &str,
        expected_version: Option<i64>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<Option<Ownership>>;
}
