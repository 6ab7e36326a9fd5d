//! Scenarios every [`Store`] backend must pass.
//!
//! Each scenario is a `pub async fn(&dyn Store)` that starts from an empty store, exercises
//! one behaviour of the trait and panics (with a message saying what broke) when the backend
//! gets it wrong. A backend runs them all, one test per scenario, with
//! [`conformance_tests!`](crate::conformance_tests):
//!
//! ```ignore
//! mod conformance {
//!     iotgw_registry::conformance_tests!(async {
//!         iotgw_registry::SqliteStore::memory().await.expect("in-memory store")
//!     });
//! }
//! ```
//!
//! The expression is evaluated once per test and must give a fresh, empty store (or a
//! [`WithGuard`] that also keeps, say, a temporary directory alive). The calling crate needs
//! `tokio` (the tests are `#[tokio::test]`).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;

use crate::batch::{Arrival, BatchOutcome, BatchWrite, IfUnknown};
use crate::model::*;
use crate::store::{Store, StoreError, StoreResult};
use crate::DeviceId;

/// What a conformance test gets from its setup expression: something that holds a store.
pub trait Fixture: Send + Sync {
    /// The store under test.
    fn store(&self) -> &dyn Store;
}

impl<S: Store> Fixture for S {
    fn store(&self) -> &dyn Store {
        self
    }
}

/// A store together with something that must live as long as it (a temporary directory,
/// a container handle, ...).
#[derive(Debug)]
pub struct WithGuard<S, G> {
    /// The store under test.
    pub store: S,
    /// Dropped after the test.
    pub guard: G,
}

impl<S: Store, G: Send + Sync> Fixture for WithGuard<S, G> {
    fn store(&self) -> &dyn Store {
        &self.store
    }
}

/// Expands to one `#[tokio::test]` per conformance scenario, each calling the scenario on a
/// fresh fixture from `$make` (an expression giving a future whose output is a [`Fixture`]).
/// Invoke it inside a module of its own so several backends (or set-ups) can coexist.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests! {@with [@each $make;]}
    };
    (@scenarios) => {
        $crate::conformance_tests! {@with [@scenarios]}
    };
    (@with [$($head:tt)*]) => {
        $crate::conformance_tests! {$($head)*
            ping_answers,
            registration_lifecycle_writes_history,
            duplicate_registration_is_a_conflict,
            failed_registration_sets_error_without_history,
            unknown_device_is_created_once_and_registered_in_place,
            unregistering_unknown_or_unregistered_device_fails,
            late_disconnect_never_overrides_newer_connect,
            reported_properties_replace_and_bump_activity,
            categories_upsert_by_name,
            commit_writes_alert_activity_and_outbox,
            commit_creates_command_for_alert,
            commit_for_unknown_device_is_not_found,
            telemetry_commit_is_all_or_nothing,
            a_token_with_a_nul_character_is_deduplicated_like_any_other,
            redelivered_token_makes_no_second_alert,
            concurrent_redelivery_stores_one_alert,
            alert_inside_window_becomes_child_of_first,
            match_on_child_links_to_its_parent,
            alert_outside_window_is_a_new_primary,
            long_description_and_data_are_cut_on_char_boundaries,
            outbox_claim_retry_deliver_and_dead_letter,
            an_expired_lease_taken_over_by_another_replica_is_fenced,
            paging_walks_every_device_once,
            device_filters_select_matching_devices,
            alerts_page_newest_first_with_filters,
            commands_page_newest_first_with_filters,
            status_updates_return_the_updated_record,
            a_move_cuts_over_in_one_step_with_history_and_ends_open_commands,
            commands_are_claimed_once_published_deferred_and_released,
            insert_command_checks_device_alert_and_correlation,
            dead_letters_page_newest_first,
            a_dead_letter_keeps_a_bounded_payload_with_its_size_and_hash,
            retention_purges_old_dead_letters_finished_commands_and_closed_alerts_children_first,
            a_dead_letter_is_read_and_deleted_and_a_sink_item_queued_again_once,
            checkpoints_are_replaced_per_scope_and_key,
            a_checkpoint_never_moves_behind_the_stored_position,
            of_two_claims_on_the_same_version_exactly_one_wins,
            the_owner_renews_its_claim_and_each_write_bumps_the_version,
            an_expired_claim_is_taken_over_and_scopes_keep_their_own_claims,
            batch_folds_dedupes_and_orders_like_single_commits,
            a_reading_through_another_instance_is_a_wrong_instance_dead_letter,
            a_token_of_another_devices_reading_is_a_conflict_not_a_duplicate,
            readings_of_an_unregistered_or_failed_device_are_dead_letters_without_alerts,
            batch_applies_the_unknown_device_policy_and_lifecycle_writes,
            a_registration_batch_begins_each_device_by_the_single_device_rules,
            a_finishing_batch_registers_or_fails_each_device_on_its_own,
            readings_are_kept_once_and_answered_per_bucket,
            service_work_is_recorded_children_close_and_a_request_groups_its_commands,
            entities_link_to_devices_once_and_are_found_both_ways,
            device_settings_are_replaced_and_bump_updated_at,
            connection_changes_are_kept_newest_first_and_bounded,
            device_changes_reach_subscribed_sinks_in_version_order,
            connection_churn_is_coalesced_per_sink_and_the_last_state_wins,
            command_changes_reach_subscribed_sinks_in_version_order,
            registration_history_rows_reach_subscribed_sinks_once,
            category_changes_reach_subscribed_sinks,
            alert_updates_follow_the_new_alert_in_order_for_sinks_taking_alerts,
            device_change_events_name_their_category_id,
            a_sink_gets_only_the_entities_it_takes,
        }
    };
    (@scenarios $($name:ident),+ $(,)?) => {
        vec![$(
            $crate::conformance::Scenario {
                name: stringify!($name),
                run: |store| ::std::boxed::Box::pin($crate::conformance::$name(store)),
            }
        ),+]
    };
    (@each $make:expr; $($name:ident),+ $(,)?) => {
        $(
            #[::tokio::test]
            async fn $name() {
                let fixture = $make.await;
                $crate::conformance::$name($crate::conformance::Fixture::store(&fixture)).await;
            }
        )+
    };
}

/// A scenario's future, borrowing the store it runs on.
pub type ScenarioFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// One scenario as data, for a runner that is not libtest (the PostgreSQL suite in
/// `tests/`, which shares one container and needs its own skip policy).
#[derive(Clone, Copy)]
pub struct Scenario {
    /// The scenario's function name.
    pub name: &'static str,
    /// Runs it on a fresh, empty store.
    pub run: for<'a> fn(&'a dyn Store) -> ScenarioFuture<'a>,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every scenario, in file order (the list of [`conformance_tests!`](crate::conformance_tests)).
pub fn scenarios() -> Vec<Scenario> {
    crate::conformance_tests!(@scenarios)
}

// --- helpers -------------------------------------------------------------------------------

/// A fixed base time for event times, so scenarios are deterministic.
fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .expect("a valid fixed time")
}

/// `base()` plus `secs` seconds.
/// A time after every lease a scenario takes.
fn far_future() -> DateTime<Utc> {
    Utc::now() + Duration::days(1)
}

fn at(secs: i64) -> DateTime<Utc> {
    base() + Duration::seconds(secs)
}

fn did(raw: &str) -> DeviceId {
    DeviceId::parse(raw).expect("scenario device ids are valid")
}

fn new_device(id: &str, provider: &str) -> NewDevice {
    NewDevice {
        name: format!("{id} display"),
        device_id: did(id),
        provider_instance: provider.to_owned(),
        category: Some("pumps".to_owned()),
        account: Some("contoso".to_owned()),
        settings: Some(serde_json::json!({"interval": 30})),
        tags: BTreeMap::from([("site".to_owned(), "north".to_owned())]),
        is_simulated: IsSimulated::Yes,
    }
}

async fn registered(store: &dyn Store, id: &str, provider: &str) -> Device {
    store
        .begin_registration(&new_device(id, provider))
        .await
        .expect("begin_registration of a new device");
    store
        .finish_registration(&did(id), Ok(None))
        .await
        .expect("finish_registration")
}

fn new_alert(token: &str, key: &str, time: DateTime<Utc>) -> NewAlert {
    NewAlert {
        description: format!("alert {token}"),
        alert_data: format!("{{\"token\":\"{token}\",\"temp\":99}}"),
        alert_time: time,
        alert_token: token.to_owned(),
        alert_type: AlertType::Anomaly,
        priority_score: Some(80),
        rule: "overheat".to_owned(),
        debounce_key: key.to_owned(),
        command: None,
    }
}

fn commit(
    device: &str,
    alerts: Vec<NewAlert>,
    window_secs: i64,
    sinks: &[&str],
) -> TelemetryCommit {
    TelemetryCommit {
        device_id: did(device),
        received_at: at(1),
        alerts,
        debounce_window: Duration::seconds(window_secs),
        sinks: sinks.iter().map(|s| (*s).to_owned()).collect(),
        readings: Default::default(),
    }
}

/// Commits one alert and returns it (asserting it is new).
async fn one(store: &dyn Store, c: TelemetryCommit) -> Alert {
    let mut out = store.commit_telemetry(&c).await.expect("commit_telemetry");
    assert_eq!(out.len(), 1, "one alert in, one result out");
    let first = out.remove(0);
    assert!(
        !first.duplicate,
        "a fresh token must not be reported as duplicate"
    );
    first.alert
}

fn conflict<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) -> String {
    match r {
        Err(StoreError::Conflict(m)) => m,
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

fn not_found<T: std::fmt::Debug>(r: StoreResult<T>, entity: &str, what: &str) {
    match r {
        Err(StoreError::NotFound { entity: e, .. }) if e == entity => {}
        other => panic!("{what}: expected NotFound {entity}, got {other:?}"),
    }
}

fn invalid<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    match r {
        Err(StoreError::Invalid { .. }) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

fn page(after: Option<String>, limit: u32) -> PageRequest {
    PageRequest { after, limit }
}

async fn depth(store: &dyn Store) -> Vec<(String, u64)> {
    store.outbox_depth().await.expect("outbox_depth")
}

async fn all_alerts(store: &dyn Store, filter: &AlertFilter) -> Vec<Alert> {
    store
        .list_alerts(filter, &page(None, 1000))
        .await
        .expect("list_alerts")
        .items
}

// --- scenarios -----------------------------------------------------------------------------

/// `ping` answers on a fresh store.
pub async fn ping_answers(store: &dyn Store) {
    store.ping().await.expect("ping on a fresh store");
}

/// Begin -> In Progress, finish -> Registered + Register history, unregister -> Unregistered
/// + Unregister history, register again -> the same record, history oldest first.
pub async fn registration_lifecycle_writes_history(store: &dyn Store) {
    let new = new_device("pump-01", "aws-east");
    let begun = store.begin_registration(&new).await.expect("begin");
    assert_eq!(begun.registration_status, RegistrationStatus::InProgress);
    assert_eq!(begun.device_id, new.device_id);
    assert_eq!(begun.name, new.name);
    assert_eq!(begun.provider_instance, "aws-east");
    assert_eq!(begun.category, new.category);
    assert_eq!(begun.account, new.account);
    assert_eq!(begun.settings, new.settings);
    assert_eq!(begun.tags, new.tags);
    assert_eq!(begun.is_simulated, IsSimulated::Yes);
    assert!(!begun.connection_state, "a new device starts disconnected");
    assert_eq!(begun.registration_message, None);
    assert!(
        store
            .history(&new.device_id)
            .await
            .expect("history")
            .is_empty(),
        "no history before finishing"
    );

    let done = store
        .finish_registration(&new.device_id, Ok(Some("thing created".into())))
        .await
        .expect("finish");
    assert_eq!(done.id, begun.id);
    assert_eq!(done.registration_status, RegistrationStatus::Registered);
    assert_eq!(done.registration_message.as_deref(), Some("thing created"));
    assert_eq!(
        store.get_device(&new.device_id).await.expect("get"),
        Some(done.clone())
    );

    let history = store.history(&new.device_id).await.expect("history");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].action, RegistrationAction::Register);
    assert_eq!(history[0].name, "Register pump-01");
    assert_eq!(history[0].device, begun.id);
    assert_eq!(history[0].device_id, new.device_id);
    assert_eq!(history[0].provider_instance, "aws-east");

    let gone = store
        .mark_unregistered(&new.device_id, Some("removed by operator".into()))
        .await
        .expect("unregister");
    assert_eq!(gone.id, begun.id);
    assert_eq!(gone.registration_status, RegistrationStatus::Unregistered);
    assert_eq!(
        gone.registration_message.as_deref(),
        Some("removed by operator")
    );

    let mut again = new_device("pump-01", "azure-west");
    again.name = "Pump one".into();
    again.tags = BTreeMap::new();
    again.category = None;
    let rebegun = store.begin_registration(&again).await.expect("begin again");
    assert_eq!(rebegun.id, begun.id, "re-registering keeps the record id");
    assert_eq!(rebegun.registration_status, RegistrationStatus::InProgress);
    assert_eq!(rebegun.provider_instance, "azure-west");
    assert_eq!(rebegun.name, "Pump one");
    assert_eq!(rebegun.category, None);
    assert!(rebegun.tags.is_empty());
    assert_eq!(
        rebegun.registration_message, None,
        "the old message is cleared"
    );
    assert_eq!(rebegun.created_at, begun.created_at);

    let redone = store
        .finish_registration(&new.device_id, Ok(None))
        .await
        .expect("finish again");
    assert_eq!(redone.registration_status, RegistrationStatus::Registered);
    assert_eq!(redone.registration_message, None);

    let history = store.history(&new.device_id).await.expect("history");
    let actions: Vec<_> = history
        .iter()
        .map(|h| (h.action, h.name.as_str(), h.provider_instance.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            (RegistrationAction::Register, "Register pump-01", "aws-east"),
            (
                RegistrationAction::Unregister,
                "Unregister pump-01",
                "aws-east"
            ),
            (
                RegistrationAction::Register,
                "Register pump-01",
                "azure-west"
            ),
        ],
        "history is oldest first"
    );
}

/// Registering a device that is In Progress or Registered is a Conflict that names the
/// device, its status, its provider instance and the fix; the device is left alone.
pub async fn duplicate_registration_is_a_conflict(store: &dyn Store) {
    store
        .begin_registration(&new_device("pump-02", "aws-east"))
        .await
        .expect("begin");
    let msg = conflict(
        store
            .begin_registration(&new_device("pump-02", "gcp-eu"))
            .await,
        "registering a device that is In Progress",
    );
    for part in ["pump-02", "In Progress", "aws-east", "unregister it first"] {
        assert!(
            msg.contains(part),
            "conflict message {msg:?} should mention {part:?}"
        );
    }

    store
        .finish_registration(&did("pump-02"), Ok(None))
        .await
        .expect("finish");
    let msg = conflict(
        store
            .begin_registration(&new_device("pump-02", "gcp-eu"))
            .await,
        "registering a Registered device",
    );
    for part in ["pump-02", "Registered", "aws-east", "unregister it first"] {
        assert!(
            msg.contains(part),
            "conflict message {msg:?} should mention {part:?}"
        );
    }
    let device = store
        .get_device(&did("pump-02"))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        device.provider_instance, "aws-east",
        "a refused registration changes nothing"
    );
    assert_eq!(device.registration_status, RegistrationStatus::Registered);
    assert_eq!(
        store.history(&did("pump-02")).await.expect("history").len(),
        1
    );
}

/// `finish_registration(Err)` sets Error with the message and writes no history; the device
/// can then be registered again in place.
pub async fn failed_registration_sets_error_without_history(store: &dyn Store) {
    let begun = store
        .begin_registration(&new_device("pump-03", "aws-east"))
        .await
        .expect("begin");
    let failed = store
        .finish_registration(&did("pump-03"), Err("thing name already taken".into()))
        .await
        .expect("finish with error");
    assert_eq!(failed.registration_status, RegistrationStatus::Error);
    assert_eq!(
        failed.registration_message.as_deref(),
        Some("thing name already taken")
    );
    assert!(
        store
            .history(&did("pump-03"))
            .await
            .expect("history")
            .is_empty(),
        "no history for a failure"
    );

    let retried = store
        .begin_registration(&new_device("pump-03", "azure-west"))
        .await
        .expect("an Error device can be registered again");
    assert_eq!(retried.id, begun.id);
    assert_eq!(retried.registration_status, RegistrationStatus::InProgress);
    assert_eq!(retried.provider_instance, "azure-west");
    assert_eq!(retried.registration_message, None);
    not_found(
        store.finish_registration(&did("nobody"), Ok(None)).await,
        "device",
        "finishing an unknown device",
    );
}

/// `ensure_unknown_device` creates an Unknown device named after its id once, then returns
/// it unchanged; registering it keeps the record.
pub async fn unknown_device_is_created_once_and_registered_in_place(store: &dyn Store) {
    let first = store
        .ensure_unknown_device(&did("meter-9"), "mqtt-local")
        .await
        .expect("ensure");
    assert_eq!(first.registration_status, RegistrationStatus::Unknown);
    assert_eq!(first.name, "meter-9");
    assert_eq!(first.provider_instance, "mqtt-local");
    assert_eq!(first.is_simulated, IsSimulated::No);
    assert!(first.tags.is_empty());
    assert_eq!(first.category, None);

    let second = store
        .ensure_unknown_device(&did("meter-9"), "another-provider")
        .await
        .expect("ensure again");
    assert_eq!(second, first, "an existing device is returned unchanged");

    let registered = store
        .begin_registration(&new_device("meter-9", "aws-east"))
        .await
        .expect("an Unknown device can be registered");
    assert_eq!(registered.id, first.id);
    assert_eq!(
        registered.registration_status,
        RegistrationStatus::InProgress
    );

    let after = store
        .ensure_unknown_device(&did("meter-9"), "mqtt-local")
        .await
        .expect("ensure on a known device");
    assert_eq!(after, registered, "ensure never touches a known device");
}

/// Unregistering an unknown device is NotFound; unregistering twice is a Conflict and
/// writes no second history row.
pub async fn unregistering_unknown_or_unregistered_device_fails(store: &dyn Store) {
    not_found(
        store.mark_unregistered(&did("ghost"), None).await,
        "device",
        "unregistering an unknown device",
    );
    not_found(
        store.history(&did("ghost")).await,
        "device",
        "history of an unknown device",
    );
    registered(store, "pump-04", "aws-east").await;
    store
        .mark_unregistered(&did("pump-04"), None)
        .await
        .expect("unregister");
    let msg = conflict(
        store.mark_unregistered(&did("pump-04"), None).await,
        "unregistering twice",
    );
    assert!(
        msg.contains("pump-04") && msg.contains("Unregistered"),
        "{msg}"
    );
    let actions: Vec<_> = store
        .history(&did("pump-04"))
        .await
        .expect("history")
        .iter()
        .map(|h| h.action)
        .collect();
    assert_eq!(
        actions,
        vec![RegistrationAction::Register, RegistrationAction::Unregister]
    );
}

/// Connection states are ordered by event time: an older event never overrides a newer one,
/// an equal time is applied, and last activity only moves forward.
pub async fn late_disconnect_never_overrides_newer_connect(store: &dyn Store) {
    let id = did("pump-05");
    store
        .ensure_unknown_device(&id, "mqtt-local")
        .await
        .expect("ensure");
    assert!(
        store
            .set_connection_state(&id, true, at(10))
            .await
            .expect("connect"),
        "first state applies"
    );
    assert!(
        !store
            .set_connection_state(&id, false, at(5))
            .await
            .expect("late disconnect"),
        "an older disconnect must not apply"
    );
    let d = store.get_device(&id).await.expect("get").expect("exists");
    assert!(
        d.connection_state,
        "still connected after a late disconnect"
    );
    assert_eq!(d.connection_state_updated_at, Some(at(10)));
    assert_eq!(d.last_activity_time, Some(at(10)));

    assert!(
        store
            .set_connection_state(&id, false, at(10))
            .await
            .expect("same time"),
        "an equal time applies"
    );
    assert!(
        !store
            .get_device(&id)
            .await
            .expect("get")
            .expect("exists")
            .connection_state
    );
    assert!(store
        .set_connection_state(&id, true, at(20))
        .await
        .expect("reconnect"));
    assert!(!store
        .set_connection_state(&id, false, at(1))
        .await
        .expect("very late"));
    let d = store.get_device(&id).await.expect("get").expect("exists");
    assert!(d.connection_state);
    assert_eq!(d.connection_state_updated_at, Some(at(20)));
    assert_eq!(
        d.last_activity_time,
        Some(at(20)),
        "last activity never moves back"
    );
    not_found(
        store.set_connection_state(&did("ghost"), true, at(1)).await,
        "device",
        "connection state of an unknown device",
    );
}

/// Reported properties are replaced; last activity is the later of the stored one and `at`.
pub async fn reported_properties_replace_and_bump_activity(store: &dyn Store) {
    let id = did("pump-06");
    store
        .ensure_unknown_device(&id, "mqtt-local")
        .await
        .expect("ensure");
    let first = serde_json::json!({"fw": "1.0", "temp": {"max": 90}});
    store
        .set_reported_properties(&id, &first, at(30))
        .await
        .expect("report");
    let d = store.get_device(&id).await.expect("get").expect("exists");
    assert_eq!(d.reported_properties, Some(first));
    assert_eq!(d.last_activity_time, Some(at(30)));

    let second = serde_json::json!({"fw": "1.1"});
    store
        .set_reported_properties(&id, &second, at(10))
        .await
        .expect("report again");
    let d = store.get_device(&id).await.expect("get").expect("exists");
    assert_eq!(
        d.reported_properties,
        Some(second),
        "properties are replaced, not merged"
    );
    assert_eq!(
        d.last_activity_time,
        Some(at(30)),
        "last activity never moves back"
    );
    not_found(
        store
            .set_reported_properties(&did("ghost"), &serde_json::json!({}), at(1))
            .await,
        "device",
        "reported properties of an unknown device",
    );
}

/// Categories are unique by name; upserting updates the description (a missing one keeps
/// the stored description); the list is by name.
pub async fn categories_upsert_by_name(store: &dyn Store) {
    let pumps = store
        .upsert_category("pumps", Some("Water pumps"))
        .await
        .expect("create");
    assert_eq!(pumps.name, "pumps");
    assert_eq!(pumps.description.as_deref(), Some("Water pumps"));
    let updated = store
        .upsert_category("pumps", Some("All pumps"))
        .await
        .expect("update");
    assert_eq!(updated.id, pumps.id, "same name, same record");
    assert_eq!(updated.description.as_deref(), Some("All pumps"));
    assert_eq!(updated.created_at, pumps.created_at);
    let kept = store
        .upsert_category("pumps", None)
        .await
        .expect("upsert without description");
    assert_eq!(kept.description.as_deref(), Some("All pumps"));
    store
        .upsert_category("meters", None)
        .await
        .expect("create meters");
    let names: Vec<_> = store
        .list_categories()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["meters", "pumps"]);
}

/// A new alert is stored Active with the device's provider instance, bumps last activity and
/// queues one outbox item per sink whose payload is the alert JSON and whose idempotency key
/// is the alert id.
pub async fn commit_writes_alert_activity_and_outbox(store: &dyn Store) {
    let device = registered(store, "pump-07", "aws-east").await;
    let mut c = commit(
        "pump-07",
        vec![new_alert("evt-1", "pump-07/overheat", at(0))],
        60,
        &["dataverse", "webhook"],
    );
    c.received_at = at(2);
    let out = store.commit_telemetry(&c).await.expect("commit");
    assert_eq!(out.len(), 1);
    assert!(!out[0].duplicate);
    assert!(out[0].command.is_none());
    let alert = &out[0].alert;
    assert_eq!(alert.status(), Some(AlertStatus::Active));
    assert_eq!((alert.statecode, alert.statuscode), (0, 1));
    assert_eq!(alert.device, device.id);
    assert_eq!(alert.device_id, device.device_id);
    assert_eq!(alert.provider_instance, "aws-east");
    assert_eq!(alert.alert_token, "evt-1");
    assert_eq!(alert.alert_time, at(0));
    assert_eq!(alert.alert_type, AlertType::Anomaly);
    assert_eq!(alert.priority_score, Some(80));
    assert_eq!(alert.rule, "overheat");
    assert_eq!(alert.description, "alert evt-1");
    assert_eq!(alert.parent_alert, None);
    assert_eq!(alert.parent_alert_token, None);
    assert_eq!(alert.last_command_sent, None);
    assert_eq!(
        store.get_alert(alert.id).await.expect("get_alert").as_ref(),
        Some(alert)
    );

    let d = store
        .get_device(&device.device_id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        d.last_activity_time,
        Some(at(2)),
        "telemetry bumps last activity"
    );

    assert_eq!(
        depth(store).await,
        vec![("dataverse".to_owned(), 1), ("webhook".to_owned(), 1)]
    );
    let expected = serde_json::to_value(alert).expect("alert JSON");
    for sink in ["dataverse", "webhook"] {
        let now = Utc::now();
        let items = store
            .claim_outbox(sink, "replica-1", now, now + Duration::seconds(30), 10)
            .await
            .expect("claim");
        assert_eq!(items.len(), 1, "{sink}");
        assert_eq!(items[0].sink, sink);
        assert_eq!(
            items[0].payload, expected,
            "the payload is the stored alert's JSON"
        );
        assert_eq!(items[0].idempotency_key, alert.id.to_string());
        assert_eq!(items[0].attempts, 0);
        assert_eq!(items[0].last_error, None);
    }
}

/// A NewAlert with a command creates that command In Progress, parented to the alert, through
/// the device's provider instance.
pub async fn commit_creates_command_for_alert(store: &dyn Store) {
    let device = registered(store, "pump-08", "aws-east").await;
    let mut a = new_alert("evt-8", "pump-08/overheat", at(0));
    a.command = Some(NewAlertCommand {
        name: "reset".into(),
        message: r#"{"CommandName":"reset","Parameters":{}}"#.into(),
        correlation_id: "corr-8".into(),
    });
    let out = store
        .commit_telemetry(&commit("pump-08", vec![a], 60, &[]))
        .await
        .expect("commit");
    let alert = &out[0].alert;
    let command = out[0].command.clone().expect("a command was asked for");
    assert_eq!(command.status, CommandStatus::InProgress);
    assert_eq!(command.status_reason, None);
    assert_eq!(command.parent_alert, Some(alert.id));
    assert_eq!(command.name, "reset");
    assert_eq!(
        command.message,
        r#"{"CommandName":"reset","Parameters":{}}"#
    );
    assert_eq!(command.correlation_id, "corr-8");
    assert_eq!(command.provider_instance, "aws-east");
    assert_eq!(command.device, device.id);
    assert_eq!(command.device_id, device.device_id);
    assert_eq!(
        store.get_command(command.id).await.expect("get"),
        Some(command.clone())
    );
    assert_eq!(
        store
            .get_command_by_correlation("corr-8")
            .await
            .expect("by correlation"),
        Some(command.clone())
    );
    assert_eq!(
        store
            .get_command_by_correlation("corr-none")
            .await
            .expect("by correlation"),
        None
    );
    let listed = store
        .list_commands(
            &CommandFilter {
                parent_alert: Some(alert.id),
                ..Default::default()
            },
            &PageRequest::default(),
        )
        .await
        .expect("list");
    assert_eq!(listed.items, vec![command.clone()]);
    assert!(depth(store).await.is_empty(), "no sinks, no outbox items");

    let sent_at = at(5);
    let updated = store
        .set_alert_status(
            alert.id,
            AlertStatus::CommandSent,
            Some((command.id, sent_at)),
        )
        .await
        .expect("set status");
    assert_eq!((updated.statecode, updated.statuscode), (2, 5));
    assert_eq!(updated.last_command_sent, Some(command.id));
    assert_eq!(updated.last_command_sent_time, Some(sent_at));

    // A debounced child of that alert does not send the command again.
    let mut child = new_alert("evt-8b", "pump-08/overheat", at(10));
    child.command = Some(NewAlertCommand {
        name: "reset".into(),
        message: r#"{"CommandName":"reset","Parameters":{}}"#.into(),
        correlation_id: "corr-8b".into(),
    });
    let out = store
        .commit_telemetry(&commit("pump-08", vec![child], 60, &[]))
        .await
        .expect("commit child");
    assert_eq!(out[0].alert.parent_alert, Some(alert.id));
    assert_eq!(out[0].command, None, "a child repeats no command");
    assert_eq!(
        store
            .get_command_by_correlation("corr-8b")
            .await
            .expect("by correlation"),
        None
    );
}

/// Telemetry for a device the store does not know is NotFound and writes nothing.
pub async fn commit_for_unknown_device_is_not_found(store: &dyn Store) {
    not_found(
        store
            .commit_telemetry(&commit(
                "ghost",
                vec![new_alert("evt-g", "k", at(0))],
                60,
                &["hook"],
            ))
            .await,
        "device",
        "telemetry for an unknown device",
    );
    assert!(all_alerts(store, &AlertFilter::default()).await.is_empty());
    assert!(depth(store).await.is_empty());
}

/// One commit is one transaction: when its second alert fails (a command correlation id that
/// is taken), its first alert, outbox items and activity bump are not kept either.
pub async fn telemetry_commit_is_all_or_nothing(store: &dyn Store) {
    let device = registered(store, "pump-09", "aws-east").await;
    store
        .insert_command(&NewCommand {
            request_id: None,
            name: "ping".into(),
            message: "{}".into(),
            device_id: device.device_id.clone(),
            parent_alert: None,
            correlation_id: "taken".into(),
        })
        .await
        .expect("insert command");
    let first = new_alert("evt-9a", "k-a", at(0));
    let mut second = new_alert("evt-9b", "k-b", at(0));
    second.command = Some(NewAlertCommand {
        name: "reset".into(),
        message: "{}".into(),
        correlation_id: "taken".into(),
    });
    let result = store
        .commit_telemetry(&commit("pump-09", vec![first, second], 60, &["hook"]))
        .await;
    assert!(
        result.is_err(),
        "a taken correlation id fails the commit: {result:?}"
    );
    assert!(
        all_alerts(store, &AlertFilter::default()).await.is_empty(),
        "no alert of a failed commit is kept"
    );
    assert!(
        depth(store).await.is_empty(),
        "no outbox item of a failed commit is kept"
    );
    let d = store
        .get_device(&device.device_id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        d.last_activity_time, None,
        "the activity bump of a failed commit is rolled back"
    );
}

/// A redelivered message (same alert token) returns the stored alert marked duplicate and
/// writes nothing: no second alert, no outbox item, no command.
/// A token or debounce key from junk input may hold characters a backend cannot store as
/// they are (PostgreSQL text cannot hold NUL): a redelivery, in the same batch or a later
/// one, is still the same token, and the second alert of the key still folds.
pub async fn a_token_with_a_nul_character_is_deduplicated_like_any_other(store: &dyn Store) {
    registered(store, "pump-11", "aws-east").await;
    let first = new_alert("evt\0-1", "pump-11/\0hot", at(0));
    let second = new_alert("evt\0-2", "pump-11/\0hot", at(1));
    let out = store
        .commit_telemetry(&commit(
            "pump-11",
            vec![first.clone(), first.clone(), second],
            60,
            &[],
        ))
        .await
        .expect("a token with NUL commits");
    assert_eq!(
        out.iter().map(|c| c.duplicate).collect::<Vec<_>>(),
        vec![false, true, false]
    );
    assert_eq!(out[2].alert.parent_alert, Some(out[0].alert.id));
    let again = store
        .commit_telemetry(&commit("pump-11", vec![first], 60, &[]))
        .await
        .expect("the redelivery commits");
    assert!(again[0].duplicate, "{again:?}");
    assert_eq!(again[0].alert, out[0].alert);
    assert_eq!(all_alerts(store, &AlertFilter::default()).await.len(), 2);
}

pub async fn redelivered_token_makes_no_second_alert(store: &dyn Store) {
    registered(store, "pump-10", "aws-east").await;
    let mut a = new_alert("evt-10", "pump-10/overheat", at(0));
    a.command = Some(NewAlertCommand {
        name: "reset".into(),
        message: "{}".into(),
        correlation_id: "corr-10".into(),
    });
    let c = commit("pump-10", vec![a.clone()], 60, &["hook"]);
    let first = store.commit_telemetry(&c).await.expect("first delivery");
    assert!(!first[0].duplicate);

    let mut redelivered = c.clone();
    // Even a redelivery that would now carry another command id writes nothing.
    if let Some(cmd) = redelivered.alerts[0].command.as_mut() {
        cmd.correlation_id = "corr-10-again".into();
    }
    let again = store
        .commit_telemetry(&redelivered)
        .await
        .expect("redelivery");
    assert_eq!(again.len(), 1);
    assert!(again[0].duplicate, "a stored token is a duplicate");
    assert_eq!(
        again[0].alert, first[0].alert,
        "the stored alert is returned"
    );
    assert!(again[0].command.is_none());

    // Twice in the same message: the second is a duplicate of the first.
    let twice = commit(
        "pump-10",
        vec![
            new_alert("evt-11", "other", at(3)),
            new_alert("evt-11", "other", at(3)),
        ],
        60,
        &["hook"],
    );
    let out = store
        .commit_telemetry(&twice)
        .await
        .expect("same token twice");
    assert_eq!(
        out.iter().map(|c| c.duplicate).collect::<Vec<_>>(),
        vec![false, true]
    );
    assert_eq!(out[0].alert, out[1].alert);

    let alerts = all_alerts(store, &AlertFilter::default()).await;
    assert_eq!(alerts.len(), 2, "one alert per token: {alerts:?}");
    assert_eq!(depth(store).await, vec![("hook".to_owned(), 2)]);
    let commands = store
        .list_commands(&CommandFilter::default(), &PageRequest::default())
        .await
        .expect("list commands")
        .items;
    assert_eq!(commands.len(), 1);
    assert_eq!(
        store
            .get_command_by_correlation("corr-10-again")
            .await
            .expect("lookup"),
        None
    );
}

/// Two deliveries of the same token committed at the same moment store one alert.
pub async fn concurrent_redelivery_stores_one_alert(store: &dyn Store) {
    registered(store, "pump-11", "aws-east").await;
    let c = commit(
        "pump-11",
        vec![new_alert("evt-race", "pump-11/overheat", at(0))],
        60,
        &["hook"],
    );
    let (a, b) = tokio::join!(store.commit_telemetry(&c), store.commit_telemetry(&c));
    let (a, b) = (a.expect("first racer"), b.expect("second racer"));
    let mut flags = vec![a[0].duplicate, b[0].duplicate];
    flags.sort();
    assert_eq!(
        flags,
        vec![false, true],
        "exactly one racer stores the alert"
    );
    assert_eq!(a[0].alert, b[0].alert);
    assert_eq!(all_alerts(store, &AlertFilter::default()).await.len(), 1);
    assert_eq!(depth(store).await, vec![("hook".to_owned(), 1)]);
}

/// An alert with the same debounce key inside the window becomes a child of the first.
pub async fn alert_inside_window_becomes_child_of_first(store: &dyn Store) {
    registered(store, "pump-12", "aws-east").await;
    let key = "pump-12/overheat";
    let primary = one(
        store,
        commit(
            "pump-12",
            vec![new_alert("evt-12a", key, at(0))],
            60,
            &["hook"],
        ),
    )
    .await;
    assert_eq!(primary.parent_alert, None);
    let child = one(
        store,
        commit(
            "pump-12",
            vec![new_alert("evt-12b", key, at(30))],
            60,
            &["hook"],
        ),
    )
    .await;
    assert_eq!(child.parent_alert, Some(primary.id));
    assert_eq!(child.parent_alert_token.as_deref(), Some("evt-12a"));
    // Exactly at the window's edge still folds.
    let edge = one(
        store,
        commit("pump-12", vec![new_alert("evt-12c", key, at(90))], 60, &[]),
    )
    .await;
    assert_eq!(edge.parent_alert, Some(primary.id));

    let primaries = all_alerts(
        store,
        &AlertFilter {
            primary: Some(true),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        primaries.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![primary.id]
    );
    let children = all_alerts(
        store,
        &AlertFilter {
            primary: Some(false),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        children.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![edge.id, child.id]
    );
    let by_parent = all_alerts(
        store,
        &AlertFilter {
            parent_alert: Some(primary.id),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_parent.len(), 2);
    // A child is queued to sinks like any alert, carrying its parent.
    let now = Utc::now();
    let items = store
        .claim_outbox("hook", "replica-1", now, now + Duration::seconds(30), 10)
        .await
        .expect("claim");
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1].payload["msdyn_parentalert"],
        serde_json::json!(primary.id.to_string())
    );
}

/// A match on a child links to that child's parent: the hierarchy stays flat.
pub async fn match_on_child_links_to_its_parent(store: &dyn Store) {
    registered(store, "pump-13", "aws-east").await;
    let key = "pump-13/overheat";
    let a = one(
        store,
        commit("pump-13", vec![new_alert("evt-13a", key, at(0))], 60, &[]),
    )
    .await;
    let b = one(
        store,
        commit("pump-13", vec![new_alert("evt-13b", key, at(50))], 60, &[]),
    )
    .await;
    assert_eq!(b.parent_alert, Some(a.id));
    // 100 s is outside the window of A but inside the window of B, A's child.
    let c = one(
        store,
        commit("pump-13", vec![new_alert("evt-13c", key, at(100))], 60, &[]),
    )
    .await;
    assert_eq!(
        c.parent_alert,
        Some(a.id),
        "a match on a child links to its parent, not to the child"
    );
    assert_eq!(c.parent_alert_token.as_deref(), Some("evt-13a"));
    // Alerts of one message fold into each other too.
    let out = store
        .commit_telemetry(&commit(
            "pump-13",
            vec![
                new_alert("evt-13d", "fresh", at(0)),
                new_alert("evt-13e", "fresh", at(1)),
            ],
            60,
            &[],
        ))
        .await
        .expect("commit two");
    assert_eq!(out[0].alert.parent_alert, None);
    assert_eq!(out[1].alert.parent_alert, Some(out[0].alert.id));
}

/// Outside the window, with another debounce key, or with a zero window, an alert is a new
/// primary. The window is measured on alert times and reaches both ways, so an alert
/// delivered late folds into the burst around it; the latest alert in the window decides.
pub async fn alert_outside_window_is_a_new_primary(store: &dyn Store) {
    registered(store, "pump-14", "aws-east").await;
    let key = "pump-14/overheat";
    let a = one(
        store,
        commit("pump-14", vec![new_alert("evt-14a", key, at(0))], 60, &[]),
    )
    .await;
    let b = one(
        store,
        commit("pump-14", vec![new_alert("evt-14b", key, at(61))], 60, &[]),
    )
    .await;
    assert_eq!(
        b.parent_alert, None,
        "61 s after the last match, outside a 60 s window"
    );
    let c = one(
        store,
        commit(
            "pump-14",
            vec![new_alert("evt-14c", "pump-14/leak", at(62))],
            60,
            &[],
        ),
    )
    .await;
    assert_eq!(c.parent_alert, None, "another debounce key never folds");
    let d = one(
        store,
        commit("pump-14", vec![new_alert("evt-14d", key, at(63))], 0, &[]),
    )
    .await;
    assert_eq!(d.parent_alert, None, "a zero window turns debounce off");
    let e = one(
        store,
        commit("pump-14", vec![new_alert("evt-14e", key, at(65))], 60, &[]),
    )
    .await;
    assert_eq!(
        e.parent_alert,
        Some(d.id),
        "the latest match in the window (by alert time) wins"
    );
    assert_ne!(e.parent_alert, Some(a.id));
    assert_ne!(e.parent_alert, Some(b.id));
    // A late alert far before every stored one is a new primary ...
    let lonely = one(
        store,
        commit(
            "pump-14",
            vec![new_alert("evt-14f", key, at(-100))],
            60,
            &[],
        ),
    )
    .await;
    assert_eq!(lonely.parent_alert, None, "nothing within 60 s of -100 s");
    // ... but one delivered late inside a burst folds into that burst: the latest alert
    // within the window either side (e at 65 s, a child of d) gives the parent.
    let late = one(
        store,
        commit("pump-14", vec![new_alert("evt-14g", key, at(20))], 60, &[]),
    )
    .await;
    assert_eq!(
        late.parent_alert,
        Some(d.id),
        "a late alert folds into the alerts around it"
    );
}

/// Description is cut to 100 characters and alert data to 8192, on character boundaries.
pub async fn long_description_and_data_are_cut_on_char_boundaries(store: &dyn Store) {
    registered(store, "pump-15", "aws-east").await;
    let mut a = new_alert("evt-15", "k", at(0));
    a.description = "é".repeat(150);
    a.alert_data = format!("{}{}", "x".repeat(8190), "€".repeat(10));
    let alert = one(store, commit("pump-15", vec![a], 60, &["hook"])).await;
    assert_eq!(alert.description, "é".repeat(100));
    assert_eq!(alert.alert_data.chars().count(), 8192);
    assert!(alert.alert_data.ends_with("€€"));
    assert_eq!(
        store.get_alert(alert.id).await.expect("get"),
        Some(alert.clone())
    );

    let mut short = new_alert("evt-15b", "k2", at(0));
    short.description = "ß".repeat(100);
    let kept = one(store, commit("pump-15", vec![short], 60, &[])).await;
    assert_eq!(
        kept.description,
        "ß".repeat(100),
        "exactly 100 characters is kept whole"
    );
}

/// Claim leases due items of one sink oldest first; leased items are not claimed again until
/// the lease runs out; retry counts the attempt, records the error and waits; delivered
/// removes; dead-lettering moves the item with its key, payload and reason, atomically.
pub async fn outbox_claim_retry_deliver_and_dead_letter(store: &dyn Store) {
    registered(store, "pump-16", "aws-east").await;
    let mut alerts = Vec::new();
    for n in 0..3 {
        alerts.push(
            one(
                store,
                commit(
                    "pump-16",
                    vec![new_alert(&format!("evt-16-{n}"), &format!("k{n}"), at(n))],
                    60,
                    &["hook", "other"],
                ),
            )
            .await,
        );
    }
    assert_eq!(
        depth(store).await,
        vec![("hook".to_owned(), 3), ("other".to_owned(), 3)]
    );

    let now = Utc::now();
    let first = store
        .claim_outbox("hook", "replica-1", now, now + Duration::seconds(30), 2)
        .await
        .expect("claim 2");
    assert_eq!(first.len(), 2, "the limit is honoured");
    assert!(first[0].id < first[1].id, "oldest first");
    assert_eq!(
        first
            .iter()
            .map(|i| i.idempotency_key.clone())
            .collect::<Vec<_>>(),
        vec![alerts[0].id.to_string(), alerts[1].id.to_string()]
    );
    let rest = store
        .claim_outbox("hook", "replica-1", now, now + Duration::seconds(30), 10)
        .await
        .expect("claim rest");
    assert_eq!(rest.len(), 1, "leased items are not handed out twice");
    assert_eq!(rest[0].idempotency_key, alerts[2].id.to_string());
    assert!(store
        .claim_outbox("hook", "replica-1", now, now + Duration::seconds(30), 10)
        .await
        .expect("claim")
        .is_empty());
    assert!(store
        .claim_outbox("hook", "replica-1", now, now, 0)
        .await
        .expect("limit 0")
        .is_empty());

    // The leases run out: everything is due again.
    let later = now + Duration::seconds(31);
    let all = store
        .claim_outbox(
            "hook",
            "replica-1",
            later,
            later + Duration::seconds(30),
            10,
        )
        .await
        .expect("after lease");
    assert_eq!(all.len(), 3);
    let (a, b, c) = (all[0].clone(), all[1].clone(), all[2].clone());

    assert!(store
        .outbox_retry(a.lease(), now + Duration::seconds(300), "HTTP 503")
        .await
        .expect("retry"));
    let after_lease = now + Duration::seconds(62);
    let due = store
        .claim_outbox(
            "hook",
            "replica-1",
            after_lease,
            after_lease + Duration::seconds(30),
            10,
        )
        .await
        .expect("claim while waiting");
    assert_eq!(
        due.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![b.id, c.id],
        "a retried item waits for its time"
    );
    let retry_time = now + Duration::seconds(300);
    let retried = store
        .claim_outbox(
            "hook",
            "replica-1",
            retry_time,
            retry_time + Duration::seconds(30),
            10,
        )
        .await
        .expect("claim at retry time");
    let retried_a = retried
        .iter()
        .find(|i| i.id == a.id)
        .expect("due again at its time");
    assert_eq!(retried_a.attempts, 1);
    assert_eq!(retried_a.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(retried_a.payload, a.payload);

    let (b, c) = (
        retried.iter().find(|i| i.id == b.id).expect("b").clone(),
        retried.iter().find(|i| i.id == c.id).expect("c").clone(),
    );
    assert!(store.outbox_delivered(b.lease()).await.expect("delivered"));
    assert!(
        !store.outbox_delivered(b.lease()).await.expect("again"),
        "delivered twice is harmless, and says it changed nothing"
    );
    assert!(store
        .outbox_dead_letter(c.lease(), "HTTP 400: schema rejected")
        .await
        .expect("dead letter"));
    assert_eq!(
        depth(store).await,
        vec![("hook".to_owned(), 1), ("other".to_owned(), 3)]
    );

    let letters = store
        .list_dead_letters(&PageRequest::default())
        .await
        .expect("dead letters")
        .items;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.source, "sink:hook");
    assert_eq!(letter.reason, "HTTP 400: schema rejected");
    assert_eq!(
        letter.message_id.as_deref(),
        Some(c.idempotency_key.as_str())
    );
    assert_eq!(letter.device_id.as_deref(), Some("pump-16"));
    let payload: serde_json::Value =
        serde_json::from_str(&letter.payload).expect("the dead letter keeps the JSON");
    assert_eq!(payload, c.payload);

    let far = now + Duration::seconds(3600);
    let left = store
        .claim_outbox("hook", "replica-1", far, far, 10)
        .await
        .expect("claim");
    assert_eq!(
        left.iter().map(|i| i.id).collect::<Vec<_>>(),
        vec![a.id],
        "delivered and dead items are gone"
    );
    assert!(
        !store
            .outbox_retry(c.lease(), now, "x")
            .await
            .expect("retry"),
        "retrying a dead item changes nothing"
    );
    assert!(
        !store
            .outbox_dead_letter(b.lease(), "x")
            .await
            .expect("dead"),
        "dead-lettering a delivered item changes nothing"
    );
    let other = store
        .claim_outbox("other", "replica-1", far, far, 10)
        .await
        .expect("claim other");
    assert_eq!(other.len(), 3, "sinks are independent");
}

/// A replica whose lease ran out and was claimed by another (it paused, or lost the
/// network) can no longer mark the item: not delivered, not retried (which would free it
/// for a third replica while the second delivers), not dead; renewing fails for it and
/// works for the holder, whose renewed lease keeps everyone else out. Each claim's fencing
/// token is larger than the one before.
pub async fn an_expired_lease_taken_over_by_another_replica_is_fenced(store: &dyn Store) {
    registered(store, "pump-17", "aws-east").await;
    one(
        store,
        commit(
            "pump-17",
            vec![new_alert("evt-17", "k17", at(0))],
            60,
            &["hook"],
        ),
    )
    .await;
    let now = Utc::now();
    let first = store
        .claim_outbox("hook", "replica-1", now, now + Duration::seconds(5), 10)
        .await
        .expect("claim by replica-1");
    assert_eq!(first.len(), 1);
    let stale = first[0].lease();

    let later = now + Duration::seconds(6);
    let taken = store
        .claim_outbox("hook", "replica-2", later, later + Duration::seconds(5), 10)
        .await
        .expect("claim by replica-2 after the lease ran out");
    assert_eq!(taken.len(), 1, "an expired lease is taken over");
    let held = taken[0].lease();
    assert_eq!(held.id, stale.id);
    assert!(held.token > stale.token, "{held:?} after {stale:?}");

    assert!(!store.outbox_delivered(stale).await.expect("delivered"));
    assert!(!store
        .outbox_retry(stale, now, "HTTP 503")
        .await
        .expect("retry"));
    assert!(!store
        .outbox_dead_letter(stale, "HTTP 400")
        .await
        .expect("dead letter"));
    assert!(
        store
            .renew_outbox(&[stale], later + Duration::seconds(60))
            .await
            .expect("renew")
            .is_empty(),
        "the stale holder cannot renew"
    );
    assert_eq!(depth(store).await, vec![("hook".to_owned(), 1)]);
    assert!(store
        .list_dead_letters(&PageRequest::default())
        .await
        .expect("dead letters")
        .items
        .is_empty());

    // The holder renews; past its first lease nobody else can claim the item.
    assert_eq!(
        store
            .renew_outbox(&[held, stale], later + Duration::seconds(60))
            .await
            .expect("renew"),
        vec![held.id]
    );
    let past_first_lease = later + Duration::seconds(10);
    assert!(store
        .claim_outbox(
            "hook",
            "replica-3",
            past_first_lease,
            past_first_lease + Duration::seconds(5),
            10
        )
        .await
        .expect("claim by replica-3")
        .is_empty());
    let untried = store
        .claim_outbox("hook", "replica-1", far_future(), far_future(), 10)
        .await
        .expect("claim after everything")
        .pop()
        .expect("still queued");
    assert_eq!(untried.attempts, 0, "the stale retry was not recorded");
    assert!(store
        .outbox_delivered(untried.lease())
        .await
        .expect("delivered by the newest holder"));
    assert!(depth(store).await.is_empty());
}

/// Keyset paging over devices visits every device exactly once, in device id order;
/// the limit is clamped to 1..=1000 and a bad cursor is Invalid.
pub async fn paging_walks_every_device_once(store: &dyn Store) {
    let mut ids: Vec<String> = (0..23)
        .map(|n| format!("dev-{:02}", (n * 7) % 23))
        .collect();
    for id in &ids {
        store
            .ensure_unknown_device(&did(id), "mqtt-local")
            .await
            .expect("ensure");
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let p = store
            .list_devices(&DeviceFilter::default(), &page(after.clone(), 5))
            .await
            .expect("page");
        pages += 1;
        assert!(p.items.len() <= 5);
        seen.extend(p.items.iter().map(|d| d.device_id.to_string()));
        match p.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 50, "paging does not end");
    }
    assert_eq!(seen, ids, "every device once, by device id");
    assert_eq!(pages, 5);

    let one_item = store
        .list_devices(&DeviceFilter::default(), &page(None, 0))
        .await
        .expect("limit 0");
    assert_eq!(one_item.items.len(), 1, "limit 0 is clamped to 1");
    assert!(one_item.next.is_some());
    let everything = store
        .list_devices(&DeviceFilter::default(), &page(None, 5000))
        .await
        .expect("limit 5000");
    assert_eq!(everything.items.len(), 23);
    assert_eq!(everything.next, None);
    let exact = store
        .list_devices(&DeviceFilter::default(), &page(None, 23))
        .await
        .expect("limit 23");
    assert_eq!(
        exact.next, None,
        "no next cursor when the last page is exactly full"
    );
    invalid(
        store
            .list_devices(
                &DeviceFilter::default(),
                &page(Some("not a cursor!".into()), 5),
            )
            .await,
        "a bad device cursor",
    );
}

/// Device filters: provider instance, category, registration status, connection state.
pub async fn device_filters_select_matching_devices(store: &dyn Store) {
    registered(store, "a-1", "aws-east").await;
    registered(store, "a-2", "aws-east").await;
    store
        .begin_registration(&new_device("z-1", "azure-west"))
        .await
        .expect("begin");
    let mut uncategorized = new_device("z-2", "azure-west");
    uncategorized.category = Some("meters".into());
    store
        .begin_registration(&uncategorized)
        .await
        .expect("begin");
    store
        .set_connection_state(&did("a-2"), true, at(0))
        .await
        .expect("connect");
    store
        .set_connection_state(&did("z-1"), true, at(0))
        .await
        .expect("connect");

    async fn ids(store: &dyn Store, f: DeviceFilter) -> Vec<String> {
        store
            .list_devices(&f, &PageRequest::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|d| d.device_id.to_string())
            .collect()
    }
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                provider_instance: Some("aws-east".into()),
                ..Default::default()
            }
        )
        .await,
        vec!["a-1", "a-2"]
    );
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                category: Some("meters".into()),
                ..Default::default()
            }
        )
        .await,
        vec!["z-2"]
    );
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                registration_status: Some(RegistrationStatus::InProgress),
                ..Default::default()
            }
        )
        .await,
        vec!["z-1", "z-2"]
    );
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                connected: Some(true),
                ..Default::default()
            }
        )
        .await,
        vec!["a-2", "z-1"]
    );
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                connected: Some(false),
                ..Default::default()
            }
        )
        .await,
        vec!["a-1", "z-2"]
    );
    assert_eq!(
        ids(
            store,
            DeviceFilter {
                provider_instance: Some("azure-west".into()),
                connected: Some(true),
                ..Default::default()
            }
        )
        .await,
        vec!["z-1"],
        "filters combine"
    );
    // A filter value no device has, NUL included (PostgreSQL text cannot hold NUL), finds
    // nothing instead of failing.
    for odd in ["aws\0east", "\0"] {
        let none: Vec<String> = Vec::new();
        assert_eq!(
            ids(
                store,
                DeviceFilter {
                    provider_instance: Some(odd.into()),
                    ..Default::default()
                }
            )
            .await,
            none
        );
        assert_eq!(
            ids(
                store,
                DeviceFilter {
                    category: Some(odd.into()),
                    ..Default::default()
                }
            )
            .await,
            none
        );
    }
    // Paging with a filter stays inside the filter.
    let p = store
        .list_devices(
            &DeviceFilter {
                provider_instance: Some("aws-east".into()),
                ..Default::default()
            },
            &page(None, 1),
        )
        .await
        .expect("page 1");
    let p2 = store
        .list_devices(
            &DeviceFilter {
                provider_instance: Some("aws-east".into()),
                ..Default::default()
            },
            &page(p.next, 1),
        )
        .await
        .expect("page 2");
    assert_eq!(p2.items.len(), 1);
    assert_eq!(p2.items[0].device_id.as_str(), "a-2");
    assert_eq!(p2.next, None);
}

/// Alerts list newest first, page without gaps or repeats, and filter by device, statecode,
/// parent, primary and type.
pub async fn alerts_page_newest_first_with_filters(store: &dyn Store) {
    registered(store, "pump-17", "aws-east").await;
    registered(store, "pump-18", "aws-east").await;
    let mut tokens = Vec::new();
    for n in 0..7 {
        let mut a = new_alert(&format!("evt-17-{n}"), &format!("k{n}"), at(n));
        if n % 3 == 0 {
            a.alert_type = AlertType::Info;
        }
        one(store, commit("pump-17", vec![a], 60, &[])).await;
        tokens.push(format!("evt-17-{n}"));
    }
    let other = one(
        store,
        commit("pump-18", vec![new_alert("evt-18", "k18", at(0))], 60, &[]),
    )
    .await;
    tokens.push("evt-18".into());
    tokens.reverse();

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = store
            .list_alerts(&AlertFilter::default(), &page(after, 3))
            .await
            .expect("page");
        seen.extend(p.items.iter().map(|a| a.alert_token.clone()));
        after = p.next;
        if after.is_none() {
            break;
        }
        assert!(seen.len() < 100, "paging does not end");
    }
    assert_eq!(seen, tokens, "newest first, every alert once");

    let device = all_alerts(
        store,
        &AlertFilter {
            device_id: Some(did("pump-18")),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        device.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![other.id]
    );
    let info = all_alerts(
        store,
        &AlertFilter {
            alert_type: Some(AlertType::Info),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        info.iter()
            .map(|a| a.alert_token.as_str())
            .collect::<Vec<_>>(),
        vec!["evt-17-6", "evt-17-3", "evt-17-0"]
    );
    store
        .set_alert_status(other.id, AlertStatus::Closed, None)
        .await
        .expect("close");
    let closed = all_alerts(
        store,
        &AlertFilter {
            statecode: Some(3),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        closed.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![other.id]
    );
    let active = all_alerts(
        store,
        &AlertFilter {
            statecode: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(active.len(), 7);
    let filtered_page = store
        .list_alerts(
            &AlertFilter {
                device_id: Some(did("pump-17")),
                ..Default::default()
            },
            &page(None, 4),
        )
        .await
        .expect("filtered page");
    let rest = store
        .list_alerts(
            &AlertFilter {
                device_id: Some(did("pump-17")),
                ..Default::default()
            },
            &page(filtered_page.next, 4),
        )
        .await
        .expect("filtered page 2");
    assert_eq!(filtered_page.items.len() + rest.items.len(), 7);
    assert_eq!(rest.next, None);
    invalid(
        store
            .list_alerts(&AlertFilter::default(), &page(Some("garbage".into()), 3))
            .await,
        "a bad alert cursor",
    );
}

/// Commands list newest first, page, and filter by device, status and parent alert.
pub async fn commands_page_newest_first_with_filters(store: &dyn Store) {
    registered(store, "pump-19", "aws-east").await;
    registered(store, "pump-20", "azure-west").await;
    let mut made = Vec::new();
    for n in 0..5 {
        let device = if n == 2 { "pump-20" } else { "pump-19" };
        made.push(
            store
                .insert_command(&NewCommand {
                    request_id: None,
                    name: format!("cmd-{n}"),
                    message: "{}".into(),
                    device_id: did(device),
                    parent_alert: None,
                    correlation_id: format!("corr-19-{n}"),
                })
                .await
                .expect("insert"),
        );
    }
    assert_eq!(
        made[2].provider_instance, "azure-west",
        "the command goes through its device's provider"
    );
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = store
            .list_commands(&CommandFilter::default(), &page(after, 2))
            .await
            .expect("page");
        seen.extend(p.items.iter().map(|c| c.name.clone()));
        after = p.next;
        if after.is_none() {
            break;
        }
        assert!(seen.len() < 100, "paging does not end");
    }
    assert_eq!(seen, vec!["cmd-4", "cmd-3", "cmd-2", "cmd-1", "cmd-0"]);

    store
        .set_command_status(made[1].id, CommandStatus::Sent, None)
        .await
        .expect("sent");
    let list = |f: CommandFilter| async move {
        store
            .list_commands(&f, &PageRequest::default())
            .await
            .expect("list")
            .items
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(CommandFilter {
            status: Some(CommandStatus::Sent),
            ..Default::default()
        })
        .await,
        vec!["cmd-1"]
    );
    assert_eq!(
        list(CommandFilter {
            device_id: Some(did("pump-20")),
            ..Default::default()
        })
        .await,
        vec!["cmd-2"]
    );
    assert_eq!(
        list(CommandFilter {
            device_id: Some(did("pump-19")),
            status: Some(CommandStatus::InProgress),
            ..Default::default()
        })
        .await,
        vec!["cmd-4", "cmd-3", "cmd-0"]
    );
    assert!(list(CommandFilter {
        parent_alert: Some(Uuid::now_v7()),
        ..Default::default()
    })
    .await
    .is_empty());
    invalid(
        store
            .list_commands(&CommandFilter::default(), &page(Some("garbage".into()), 2))
            .await,
        "a bad command cursor",
    );
}

/// Status setters return the updated record and are NotFound for unknown ids; setting an
/// alert status without a command keeps the last command.
pub async fn status_updates_return_the_updated_record(store: &dyn Store) {
    registered(store, "pump-21", "aws-east").await;
    let alert = one(
        store,
        commit("pump-21", vec![new_alert("evt-21", "k", at(0))], 60, &[]),
    )
    .await;
    let command = store
        .insert_command(&NewCommand {
            request_id: None,
            name: "reset".into(),
            message: "{}".into(),
            device_id: did("pump-21"),
            parent_alert: Some(alert.id),
            correlation_id: "corr-21".into(),
        })
        .await
        .expect("insert");
    assert_eq!(command.parent_alert, Some(alert.id));

    let failed = store
        .set_command_status(
            command.id,
            CommandStatus::Error,
            Some("device offline".into()),
        )
        .await
        .expect("set command status");
    assert_eq!(failed.id, command.id);
    assert_eq!(failed.status, CommandStatus::Error);
    assert_eq!(failed.status_reason.as_deref(), Some("device offline"));
    assert_eq!(
        store.get_command(command.id).await.expect("get"),
        Some(failed.clone())
    );

    let sent = store
        .set_alert_status(
            alert.id,
            AlertStatus::CommandFailed,
            Some((command.id, at(9))),
        )
        .await
        .expect("set alert status");
    assert_eq!(sent.status(), Some(AlertStatus::CommandFailed));
    assert_eq!((sent.statecode, sent.statuscode), (2, 7));
    let closed = store
        .set_alert_status(alert.id, AlertStatus::Closed, None)
        .await
        .expect("close");
    assert_eq!((closed.statecode, closed.statuscode), (3, 6));
    assert_eq!(
        closed.last_command_sent,
        Some(command.id),
        "no command given keeps the last one"
    );
    assert_eq!(closed.last_command_sent_time, Some(at(9)));
    assert_eq!(store.get_alert(alert.id).await.expect("get"), Some(closed));

    not_found(
        store
            .set_alert_status(Uuid::now_v7(), AlertStatus::Closed, None)
            .await,
        "alert",
        "status of an unknown alert",
    );
    not_found(
        store
            .set_command_status(Uuid::now_v7(), CommandStatus::Sent, None)
            .await,
        "command",
        "status of an unknown command",
    );
    assert_eq!(store.get_alert(Uuid::now_v7()).await.expect("get"), None);
    assert_eq!(store.get_command(Uuid::now_v7()).await.expect("get"), None);
}

/// `insert_command`: NotFound for an unknown device or parent alert, Conflict for a taken
/// Moving a device changes its instance, writes Deactivate on the old instance and
/// Register on the new one, ends its In Progress commands in Error with the reason, and
/// from then on only the new instance's readings count. A stale or pointless move is a
/// conflict; an unknown device is not found.
pub async fn a_move_cuts_over_in_one_step_with_history_and_ends_open_commands(store: &dyn Store) {
    registered(store, "pump-40", "a").await;
    let open = store
        .insert_command(&NewCommand {
            request_id: None,
            name: "open".into(),
            message: "{}".into(),
            device_id: did("pump-40"),
            parent_alert: None,
            correlation_id: "corr-40".into(),
        })
        .await
        .expect("insert");
    let (moved, failed) = store
        .move_device(&did("pump-40"), "a", "b")
        .await
        .expect("move");
    assert_eq!(moved.provider_instance, "b");
    assert_eq!(moved.registration_status, RegistrationStatus::Registered);
    assert_eq!(failed, 1);
    registered(store, "pump-41", "a").await;
    assert_eq!(
        store.device_counts().await.expect("counts"),
        vec![("a".to_owned(), 1), ("b".to_owned(), 1)],
        "devices per instance, after the move"
    );
    let history: Vec<_> = store
        .history(&did("pump-40"))
        .await
        .expect("history")
        .into_iter()
        .map(|h| (h.action, h.provider_instance))
        .collect();
    assert_eq!(
        history,
        vec![
            (RegistrationAction::Register, "a".to_owned()),
            (RegistrationAction::Deactivate, "a".to_owned()),
            (RegistrationAction::Register, "b".to_owned()),
        ]
    );
    let ended = store
        .get_command(open.id)
        .await
        .expect("get")
        .expect("command");
    assert_eq!(ended.status, CommandStatus::Error);
    assert!(
        ended
            .status_reason
            .as_deref()
            .is_some_and(|r| r.contains("moved from provider instance a to b")),
        "{:?}",
        ended.status_reason
    );
    conflict(
        store.move_device(&did("pump-40"), "a", "b").await,
        "a move from an instance the device left",
    );
    conflict(
        store.move_device(&did("pump-40"), "b", "b").await,
        "a move to where the device is",
    );
    not_found(
        store.move_device(&did("ghost-40"), "a", "b").await,
        "device",
        "moving an unknown device",
    );
    let reading = |instance: &str, token: &str| BatchWrite::Telemetry {
        commit: commit(
            "pump-40",
            vec![new_alert(token, "pump-40/x", at(1))],
            60,
            &[],
        ),
        from: arrival(instance, "pump-40", token),
        if_unknown: IfUnknown::Register,
    };
    let out = store
        .commit_batch(&[reading("a", "m-1"), reading("b", "m-2")])
        .await
        .expect("commit");
    assert_eq!(
        out[0],
        BatchOutcome::WrongInstance {
            hosted_on: "b".into()
        }
    );
    assert!(
        matches!(&out[1], BatchOutcome::Telemetry { .. }),
        "{:?}",
        out[1]
    );
}

/// A command waits to be sent until a sender claims it; a claim excludes every other
/// sender until it runs out; a published command is never claimed again; a deferred one
/// comes back at its retry time with the reason on the record; a restarted replica's claims
/// are released; a command that left In Progress is never claimed.
pub async fn commands_are_claimed_once_published_deferred_and_released(store: &dyn Store) {
    registered(store, "pump-30", "edge").await;
    let mut made = Vec::new();
    for n in 0..3 {
        made.push(
            store
                .insert_command(&NewCommand {
                    request_id: None,
                    name: format!("cmd-{n}"),
                    message: "{}".into(),
                    device_id: did("pump-30"),
                    parent_alert: None,
                    correlation_id: format!("corr-30-{n}"),
                })
                .await
                .expect("insert"),
        );
    }
    assert!(made.iter().all(|c| c.published_at.is_none()));
    let now = Utc::now();
    let later = |secs: i64| now + chrono::Duration::seconds(secs);
    let claimed = store
        .claim_unpublished_commands("r1", now, later(60), 2)
        .await
        .expect("claim");
    assert_eq!(
        claimed.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![made[0].id, made[1].id],
        "oldest first, at most the limit"
    );
    let rest = store
        .claim_unpublished_commands("r2", now, later(60), 10)
        .await
        .expect("claim");
    assert_eq!(
        rest.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![made[2].id],
        "claimed commands are not claimed twice"
    );
    assert!(store
        .claim_command(made[0].id, "r2", now, later(60))
        .await
        .expect("claim one")
        .is_none());
    assert!(
        !store
            .command_published(made[0].id, "r2")
            .await
            .expect("published"),
        "only the holder records the publish"
    );
    assert!(store
        .command_published(made[0].id, "r1")
        .await
        .expect("published"));
    let published = store
        .get_command(made[0].id)
        .await
        .expect("get")
        .expect("cmd-0");
    assert!(published.published_at.is_some());
    assert_eq!(
        published.status,
        CommandStatus::InProgress,
        "published is not confirmed"
    );
    assert!(store
        .claim_command(made[0].id, "r3", later(3600), later(3660))
        .await
        .expect("claim")
        .is_none());

    assert!(store
        .defer_command(made[1].id, "r1", later(600), "instance edge unreachable")
        .await
        .expect("defer"));
    let deferred = store
        .get_command(made[1].id)
        .await
        .expect("get")
        .expect("cmd-1");
    assert_eq!(
        deferred.status_reason.as_deref(),
        Some("instance edge unreachable")
    );
    assert!(store
        .claim_unpublished_commands("r2", later(61), later(120), 10)
        .await
        .expect("claim")
        .iter()
        .all(|c| c.id != made[1].id));
    let again = store
        .claim_unpublished_commands("r2", later(600), later(660), 10)
        .await
        .expect("claim");
    assert!(
        again.iter().any(|c| c.id == made[1].id),
        "a deferred command comes back at its retry time"
    );

    assert_eq!(
        store.release_command_claims("r2").await.expect("release"),
        2
    );
    let taken = store
        .claim_command(made[2].id, "r3", now, later(60))
        .await
        .expect("claim")
        .expect("released claims can be taken");
    assert_eq!(taken.correlation_id, "corr-30-2");
    store
        .set_command_status(made[2].id, CommandStatus::Error, Some("gave up".into()))
        .await
        .expect("status");
    assert!(!store
        .command_published(made[2].id, "r3")
        .await
        .expect("published"));
    assert!(
        store
            .claim_unpublished_commands("r4", later(7200), later(7260), 10)
            .await
            .expect("claim")
            .iter()
            .all(|c| c.id != made[2].id),
        "a command that left In Progress is never claimed"
    );
}

/// correlation id, Invalid for a message longer than 8192 characters.
pub async fn insert_command_checks_device_alert_and_correlation(store: &dyn Store) {
    registered(store, "pump-22", "aws-east").await;
    let base_cmd = NewCommand {
        request_id: None,
        name: "reset".into(),
        message: "{}".into(),
        device_id: did("pump-22"),
        parent_alert: None,
        correlation_id: "corr-22".into(),
    };
    not_found(
        store
            .insert_command(&NewCommand {
                request_id: None,
                device_id: did("ghost"),
                ..base_cmd.clone()
            })
            .await,
        "device",
        "a command for an unknown device",
    );
    not_found(
        store
            .insert_command(&NewCommand {
                request_id: None,
                parent_alert: Some(Uuid::now_v7()),
                ..base_cmd.clone()
            })
            .await,
        "alert",
        "a command for an unknown alert",
    );
    invalid(
        store
            .insert_command(&NewCommand {
                request_id: None,
                message: "x".repeat(8193),
                ..base_cmd.clone()
            })
            .await,
        "a command message over 8192 characters",
    );
    let made = store.insert_command(&base_cmd).await.expect("insert");
    assert_eq!(made.status, CommandStatus::InProgress);
    assert_eq!(made.provider_instance, "aws-east");
    let msg = conflict(
        store.insert_command(&base_cmd).await,
        "a taken correlation id",
    );
    assert!(msg.contains("corr-22"), "{msg}");
}

/// Dead letters list newest first and page.
pub async fn dead_letters_page_newest_first(store: &dyn Store) {
    for n in 0..5 {
        let letter = store
            .insert_dead_letter(&NewDeadLetter {
                source: "telemetry:aws-east".into(),
                reason: format!("bad JSON {n}"),
                device_id: if n == 0 {
                    Some("not/valid".into())
                } else {
                    None
                },
                message_id: Some(format!("msg-{n}")),
                payload: format!("payload {n}"),
            })
            .await
            .expect("insert dead letter");
        assert_eq!(letter.reason, format!("bad JSON {n}"));
        if n == 0 {
            assert_eq!(
                letter.device_id.as_deref(),
                Some("not/valid"),
                "invalid ids are kept as received"
            );
        }
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let p = store
            .list_dead_letters(&page(after, 2))
            .await
            .expect("page");
        seen.extend(
            p.items
                .iter()
                .map(|d| d.message_id.clone().unwrap_or_default()),
        );
        after = p.next;
        if after.is_none() {
            break;
        }
        assert!(seen.len() < 100, "paging does not end");
    }
    assert_eq!(seen, vec!["msg-4", "msg-3", "msg-2", "msg-1", "msg-0"]);
    invalid(
        store
            .list_dead_letters(&page(Some("garbage".into()), 2))
            .await,
        "a bad dead-letter cursor",
    );
}

/// A dead letter keeps at most 64 KiB of its payload and 256 bytes of its ids: a longer
/// one is cut on a character boundary and ends with its full size and SHA-256, so junk
/// cannot grow the store by more per letter and the original can still be matched.
pub async fn a_dead_letter_keeps_a_bounded_payload_with_its_size_and_hash(store: &dyn Store) {
    let payload = format!("{}é", "x".repeat(MAX_DEAD_LETTER_PAYLOAD - 1));
    let stored = store
        .insert_dead_letter(&NewDeadLetter {
            source: "telemetry:edge".into(),
            reason: "oversize".into(),
            device_id: Some("d".repeat(1000)),
            message_id: Some("m-1".into()),
            payload: payload.clone(),
        })
        .await
        .expect("insert");
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(payload.as_bytes()));
    assert!(
        stored.payload.ends_with(&format!(
            " [iotgw: cut, {} bytes, sha256 {hash}]",
            payload.len()
        )),
        "{}",
        &stored.payload[stored.payload.len() - 120..]
    );
    assert!(
        stored
            .payload
            .starts_with(&"x".repeat(MAX_DEAD_LETTER_PAYLOAD - 1)),
        "cut before the two-byte character, not through it"
    );
    assert!(stored.payload.len() < MAX_DEAD_LETTER_PAYLOAD + 200);
    let id = stored.device_id.expect("device id");
    assert!(
        id.starts_with(&"d".repeat(MAX_DEAD_LETTER_ID)) && id.contains("1000 bytes"),
        "{id}"
    );
    assert_eq!(
        stored.message_id.as_deref(),
        Some("m-1"),
        "short ids stay whole"
    );
}

/// Retention deletes what is old enough and finished: dead letters; commands no longer In
/// Progress; Inactive or Closed alerts without a child left (a closed child first, its
/// parent in the next call), unlinking the commands that name them. An open alert, an
/// alert with an open child, an In Progress command and anything newer than the cutoff
/// stay.
pub async fn retention_purges_old_dead_letters_finished_commands_and_closed_alerts_children_first(
    store: &dyn Store,
) {
    registered(store, "old-1", "local").await;
    let out = store
        .commit_batch(&[BatchWrite::Telemetry {
            commit: commit(
                "old-1",
                vec![
                    new_alert("r-1", "old-1/hot", at(1)),
                    new_alert("r-2", "old-1/hot", at(2)),
                ],
                3600,
                &[],
            ),
            from: arrival("local", "old-1", "r-1"),
            if_unknown: IfUnknown::DeadLetter {
                reason: "unknown".into(),
            },
        }])
        .await
        .expect("commit");
    let BatchOutcome::Telemetry { alerts, .. } = &out[0] else {
        panic!("{out:?}")
    };
    let (primary, child) = (alerts[0].alert.id, alerts[1].alert.id);
    assert_eq!(alerts[1].alert.parent_alert, Some(primary));
    let command = |name: &str| NewCommand {
        request_id: None,
        name: name.into(),
        message: "{}".into(),
        device_id: did("old-1"),
        parent_alert: Some(primary),
        correlation_id: format!("purge/{name}"),
    };
    let open = store
        .insert_command(&command("open"))
        .await
        .expect("command");
    let done = store
        .insert_command(&command("done"))
        .await
        .expect("command");
    store
        .set_command_status(done.id, CommandStatus::Sent, None)
        .await
        .expect("sent");
    store
        .insert_dead_letter(&NewDeadLetter {
            source: "telemetry:local".into(),
            reason: "malformed".into(),
            device_id: None,
            message_id: None,
            payload: "{".into(),
        })
        .await
        .expect("dead letter");

    let everything = Some(Utc::now() + Duration::hours(1));
    let all = PurgeBefore {
        dead_letters: everything,
        commands: everything,
        alerts: everything,
        ..PurgeBefore::default()
    };
    // Nothing is old enough yet.
    let past = Some(Utc::now() - Duration::hours(1));
    let none = PurgeBefore {
        dead_letters: past,
        commands: past,
        alerts: past,
        ..PurgeBefore::default()
    };
    assert_eq!(
        store.purge(&none, 100).await.expect("purge"),
        Purged::default()
    );

    // Both alerts open: only the dead letter and the finished command go.
    let first = store.purge(&all, 100).await.expect("purge");
    assert_eq!(
        first,
        Purged {
            dead_letters: 1,
            commands: 1,
            alerts: 0,
            ..Purged::default()
        }
    );
    assert!(store.get_command(done.id).await.expect("get").is_none());
    assert!(store.get_command(open.id).await.expect("get").is_some());

    // The parent closed, its child still open: the parent stays.
    store
        .set_alert_status(primary, AlertStatus::Closed, None)
        .await
        .expect("close");
    assert_eq!(store.purge(&all, 100).await.expect("purge").alerts, 0);
    // Both closed: the child goes first, then the parent, whose open command is unlinked.
    store
        .set_alert_status(child, AlertStatus::Inactive, None)
        .await
        .expect("close");
    assert_eq!(store.purge(&all, 100).await.expect("purge").alerts, 1);
    assert!(store.get_alert(child).await.expect("get").is_none());
    assert_eq!(store.purge(&all, 100).await.expect("purge").alerts, 1);
    assert!(store.get_alert(primary).await.expect("get").is_none());
    let kept = store
        .get_command(open.id)
        .await
        .expect("get")
        .expect("open command");
    assert_eq!(
        kept.parent_alert, None,
        "unlinked, not deleted: it is In Progress"
    );
    assert_eq!(
        store.purge(&all, 100).await.expect("purge"),
        Purged::default()
    );
}

/// What a replay needs: a dead letter read by id and deleted once; a sink's item queued
/// again, due now, and not twice while it waits.
pub async fn a_dead_letter_is_read_and_deleted_and_a_sink_item_queued_again_once(
    store: &dyn Store,
) {
    let letter = store
        .insert_dead_letter(&NewDeadLetter {
            source: "sink:hook".into(),
            reason: "POST answered 410".into(),
            device_id: Some("pump-1".into()),
            message_id: Some("alert-1".into()),
            payload: r#"{"msdyn_deviceid":"pump-1"}"#.into(),
        })
        .await
        .expect("dead letter");
    let read = store
        .get_dead_letter(letter.id)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(read, letter);
    assert!(store
        .get_dead_letter(letter.id + 1000)
        .await
        .expect("get")
        .is_none());

    let payload = serde_json::json!({"msdyn_deviceid": "pump-1"});
    assert!(store
        .requeue_outbox("hook", "alert-1", &payload)
        .await
        .expect("queue"));
    assert!(
        !store
            .requeue_outbox("hook", "alert-1", &payload)
            .await
            .expect("queue"),
        "not twice while it waits"
    );
    let now = Utc::now();
    let claimed = store
        .claim_outbox("hook", "r1", now, now + Duration::seconds(30), 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "due now");
    assert_eq!(claimed[0].idempotency_key, "alert-1");
    assert_eq!(claimed[0].payload, payload);

    assert!(store.delete_dead_letter(letter.id).await.expect("delete"));
    assert!(!store.delete_dead_letter(letter.id).await.expect("delete"));
    assert!(store
        .get_dead_letter(letter.id)
        .await
        .expect("get")
        .is_none());
}

/// A checkpoint is replaced by a later save, and scopes (provider instances) and keys
/// (partitions) never see each other's values.
pub async fn checkpoints_are_replaced_per_scope_and_key(store: &dyn Store) {
    assert_eq!(
        store.load_checkpoint("hub", "0").await.expect("load"),
        None,
        "nothing saved yet"
    );
    store
        .save_checkpoint("hub", "0", "100", 1)
        .await
        .expect("save");
    store
        .save_checkpoint("hub", "1", "7", 7)
        .await
        .expect("save");
    store
        .save_checkpoint("other", "0", "9", 9)
        .await
        .expect("save");
    store
        .save_checkpoint("hub", "0", "250", 2)
        .await
        .expect("save");
    assert_eq!(
        store
            .load_checkpoint("hub", "0")
            .await
            .expect("load")
            .as_deref(),
        Some("250"),
        "the later save wins"
    );
    assert_eq!(
        store
            .load_checkpoint("hub", "1")
            .await
            .expect("load")
            .as_deref(),
        Some("7")
    );
    assert_eq!(
        store
            .load_checkpoint("other", "0")
            .await
            .expect("load")
            .as_deref(),
        Some("9")
    );
}

/// A save at a lower position than the stored one is refused (a replica that lost the
/// partition writes behind the one that took it over), an equal or higher one replaces it.
pub async fn a_checkpoint_never_moves_behind_the_stored_position(store: &dyn Store) {
    let load = |key: &'static str| async move {
        store
            .load_checkpoint("hub", key)
            .await
            .expect("load")
            .unwrap_or_default()
    };
    assert!(store
        .save_checkpoint("hub", "0", "offset-50", 50)
        .await
        .expect("save"));
    assert!(
        !store
            .save_checkpoint("hub", "0", "offset-40", 40)
            .await
            .expect("save"),
        "position 40 is behind the stored 50: not saved"
    );
    assert_eq!(load("0").await, "offset-50", "the stored checkpoint stays");
    assert!(
        store
            .save_checkpoint("hub", "0", "offset-50b", 50)
            .await
            .expect("save"),
        "the same position saves again"
    );
    assert!(store
        .save_checkpoint("hub", "0", "offset-60", 60)
        .await
        .expect("save"));
    assert_eq!(load("0").await, "offset-60");
    assert!(
        store
            .save_checkpoint("hub", "1", "offset-1", 1)
            .await
            .expect("save"),
        "another key has a position of its own"
    );
}

/// The time claims in these scenarios expire relative to (a whole second, so both
/// backends keep it exactly).
fn claim_time(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + secs, 0)
        .single()
        .expect("time")
}

/// Two replicas claiming the same partition from the same read (no claim yet, then the
/// same version): exactly one claim is written, the other learns it lost.
pub async fn of_two_claims_on_the_same_version_exactly_one_wins(store: &dyn Store) {
    let until = claim_time(30);
    let (a, b) = tokio::join!(
        store.claim_ownership("hub", "p0", "replica-a", None, until),
        store.claim_ownership("hub", "p0", "replica-b", None, until),
    );
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    assert!(
        a.is_some() != b.is_some(),
        "exactly one first claim wins: {a:?} / {b:?}"
    );
    let first = a.or(b).expect("a winner");
    assert_eq!(first.version, 1, "a new claim has version 1");
    assert_eq!(first.expires_at, until);

    let (a, b) = tokio::join!(
        store.claim_ownership("hub", "p0", "replica-a", Some(1), claim_time(60)),
        store.claim_ownership("hub", "p0", "replica-b", Some(1), claim_time(60)),
    );
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    assert!(
        a.is_some() != b.is_some(),
        "exactly one claim on version 1 wins: {a:?} / {b:?}"
    );
    let winner = a.or(b).expect("a winner");
    assert_eq!(winner.version, 2);
    assert_eq!(
        store.list_ownership("hub").await.expect("list"),
        vec![winner],
        "the stored claim is the winner's"
    );
    assert_eq!(
        store
            .claim_ownership("hub", "p0", "replica-c", Some(1), claim_time(90))
            .await
            .expect("claim"),
        None,
        "a claim on a stale version loses"
    );
}

/// The owner renews its claim with the version it holds: the expiry moves and the version
/// goes up, so a claim made on the version read before the renewal loses.
pub async fn the_owner_renews_its_claim_and_each_write_bumps_the_version(store: &dyn Store) {
    let first = store
        .claim_ownership("hub", "p0", "replica-a", None, claim_time(30))
        .await
        .expect("claim")
        .expect("first claim");
    let renewed = store
        .claim_ownership(
            "hub",
            "p0",
            "replica-a",
            Some(first.version),
            claim_time(60),
        )
        .await
        .expect("renew")
        .expect("the owner renews");
    assert_eq!(
        (renewed.owner.as_str(), renewed.version, renewed.expires_at),
        ("replica-a", first.version + 1, claim_time(60))
    );
    assert_eq!(
        store
            .claim_ownership(
                "hub",
                "p0",
                "replica-b",
                Some(first.version),
                claim_time(90)
            )
            .await
            .expect("claim"),
        None,
        "a steal on the version before the renewal loses"
    );
    assert_eq!(
        store
            .claim_ownership("hub", "p0", "replica-b", None, claim_time(90))
            .await
            .expect("claim"),
        None,
        "a first claim loses where a claim exists"
    );
    assert_eq!(
        store.list_ownership("hub").await.expect("list"),
        vec![renewed]
    );
}

/// An expired claim is still listed (with its owner and time, for the caller to judge) and
/// another replica takes it over with the version it read; each scope (provider instance)
/// has claims of its own, listed in partition order.
pub async fn an_expired_claim_is_taken_over_and_scopes_keep_their_own_claims(store: &dyn Store) {
    let dead = store
        .claim_ownership("hub", "p1", "replica-a", None, claim_time(30))
        .await
        .expect("claim")
        .expect("claimed");
    store
        .claim_ownership("hub", "p0", "replica-b", None, claim_time(90))
        .await
        .expect("claim")
        .expect("claimed");
    store
        .claim_ownership("other", "p1", "replica-c", None, claim_time(90))
        .await
        .expect("claim")
        .expect("another scope's claim on the same partition name");
    let listed = store.list_ownership("hub").await.expect("list");
    assert_eq!(
        listed
            .iter()
            .map(|o| (o.partition.as_str(), o.owner.as_str()))
            .collect::<Vec<_>>(),
        [("p0", "replica-b"), ("p1", "replica-a")],
        "listed by partition, within the scope"
    );
    let expired = &listed[1];
    assert!(expired.expired(claim_time(31)) && !expired.expired(claim_time(29)));
    let taken = store
        .claim_ownership(
            "hub",
            "p1",
            "replica-b",
            Some(expired.version),
            claim_time(120),
        )
        .await
        .expect("take over")
        .expect("an expired claim is taken with the version read");
    assert_eq!(
        (taken.owner.as_str(), taken.version),
        ("replica-b", dead.version + 1)
    );
    assert_eq!(
        store.list_ownership("other").await.expect("list")[0].owner,
        "replica-c",
        "the other scope's claim is untouched"
    );
}

/// One batch holding a reading with an alert, its redelivery, a second alert of the same
/// device (a child of the first), a reading of another device and a dead letter: the
/// outcomes come back in order, and the registry holds what single commits would leave.
pub async fn batch_folds_dedupes_and_orders_like_single_commits(store: &dyn Store) {
    registered(store, "pump-1", "local").await;
    registered(store, "pump-2", "local").await;
    let reading = |device: &str, token: &str, secs: i64| BatchWrite::Telemetry {
        commit: TelemetryCommit {
            received_at: at(secs),
            ..commit(
                device,
                vec![new_alert(token, &format!("{device}/overheat"), at(secs))],
                60,
                &["hook"],
            )
        },
        from: arrival("local", device, token),
        if_unknown: IfUnknown::Register,
    };
    let letter = NewDeadLetter {
        source: "telemetry:local".into(),
        reason: "payload is not JSON".into(),
        device_id: Some("pump-1".into()),
        message_id: Some("m-bad".into()),
        payload: "{".into(),
    };
    let out = store
        .commit_batch(&[
            reading("pump-1", "b-1", 0),
            reading("pump-1", "b-1", 0),
            reading("pump-1", "b-2", 9),
            BatchWrite::DeadLetter(letter),
            reading("pump-2", "b-3", 4),
        ])
        .await
        .expect("commit_batch");
    assert_eq!(out.len(), 5, "one outcome per write");
    let alerts_of = |o: &BatchOutcome| match o {
        BatchOutcome::Telemetry { alerts, registered } => {
            assert!(!registered, "registered devices are not registered again");
            alerts.clone()
        }
        other => panic!("expected a telemetry outcome, got {other:?}"),
    };
    let first = alerts_of(&out[0]);
    assert!(!first[0].duplicate && first[0].alert.parent_alert.is_none());
    let again = alerts_of(&out[1]);
    assert!(
        again[0].duplicate,
        "the same token later in the batch is a redelivery"
    );
    assert_eq!(again[0].alert.id, first[0].alert.id);
    let child = alerts_of(&out[2]);
    assert_eq!(
        child[0].alert.parent_alert,
        Some(first[0].alert.id),
        "a second alert of a device in the same batch folds into the first"
    );
    assert_eq!(out[3], BatchOutcome::DeadLettered);
    assert!(alerts_of(&out[4])[0].alert.parent_alert.is_none());
    assert_eq!(all_alerts(store, &AlertFilter::default()).await.len(), 3);
    assert_eq!(
        depth(store).await,
        vec![("hook".to_owned(), 3)],
        "one outbox item per new alert"
    );
    let dead = store
        .list_dead_letters(&page(None, 10))
        .await
        .expect("dead letters");
    assert_eq!(dead.items.len(), 1);
    let device = store
        .get_device(&did("pump-1"))
        .await
        .expect("get")
        .expect("pump-1");
    assert_eq!(
        device.last_activity_time,
        Some(at(9)),
        "the latest reading of the batch"
    );
    assert!(
        store
            .commit_batch(&[])
            .await
            .expect("empty batch")
            .is_empty(),
        "an empty batch commits nothing"
    );
}

/// How the gateway hands a reading's origin to the store: the instance and the message as
/// a dead letter would keep it.
fn arrival(instance: &str, device: &str, message_id: &str) -> Arrival {
    Arrival {
        instance: instance.into(),
        message: NewDeadLetter {
            source: format!("telemetry:{instance}"),
            reason: String::new(),
            device_id: Some(device.into()),
            message_id: Some(message_id.into()),
            payload: format!(r#"{{"from":"{instance}"}}"#),
        },
    }
}

/// A reading of a registered device that arrives through an instance other than the one
/// hosting it is kept as a `wrong_instance` dead letter naming both instances, and changes
/// nothing else: no alert, no activity, no outbox item. Readings through the hosting
/// instance around it commit as usual.
pub async fn a_reading_through_another_instance_is_a_wrong_instance_dead_letter(store: &dyn Store) {
    registered(store, "pump-1", "aws").await;
    let reading = |instance: &str, token: &str, secs: i64| BatchWrite::Telemetry {
        commit: TelemetryCommit {
            received_at: at(secs),
            ..commit(
                "pump-1",
                vec![new_alert(token, "pump-1/overheat", at(secs))],
                60,
                &["hook"],
            )
        },
        from: arrival(instance, "pump-1", token),
        if_unknown: IfUnknown::Register,
    };
    let out = store
        .commit_batch(&[
            reading("aws", "w-1", 1),
            reading("gcp", "w-2", 2),
            reading("aws", "w-3", 3),
        ])
        .await
        .expect("commit_batch");
    assert!(
        matches!(&out[0], BatchOutcome::Telemetry { .. }),
        "{:?}",
        out[0]
    );
    assert_eq!(
        out[1],
        BatchOutcome::WrongInstance {
            hosted_on: "aws".into()
        }
    );
    assert!(
        matches!(&out[2], BatchOutcome::Telemetry { .. }),
        "{:?}",
        out[2]
    );
    let alerts = all_alerts(store, &AlertFilter::default()).await;
    assert_eq!(
        alerts
            .iter()
            .map(|a| a.alert_token.as_str())
            .collect::<Vec<_>>()
            .len(),
        2,
        "no alert from the spoofed reading: {alerts:?}"
    );
    assert!(alerts.iter().all(|a| a.alert_token != "w-2"));
    let dead = store
        .list_dead_letters(&page(None, 10))
        .await
        .expect("dead letters");
    assert_eq!(dead.items.len(), 1);
    let letter = &dead.items[0];
    assert_eq!(letter.source, "telemetry:gcp");
    assert_eq!(letter.message_id.as_deref(), Some("w-2"));
    assert_eq!(letter.payload, r#"{"from":"gcp"}"#);
    assert!(
        letter.reason.starts_with("wrong_instance:")
            && letter.reason.contains("`aws`")
            && letter.reason.contains("`gcp`"),
        "{}",
        letter.reason
    );
    let device = store
        .get_device(&did("pump-1"))
        .await
        .expect("get")
        .expect("pump-1");
    assert_eq!(
        device.last_activity_time,
        Some(at(3)),
        "the spoofed reading does not move last activity"
    );
    assert_eq!(depth(store).await, vec![("hook".to_owned(), 2)]);
}

/// An alert token names one reading of one device. The same token from another device,
/// stored before or taken earlier in the same batch, is a `token_conflict` dead letter:
/// not counted as a redelivery (which would drop the reading silently), nothing written,
/// while a true redelivery from the token's own device stays a duplicate.
pub async fn a_token_of_another_devices_reading_is_a_conflict_not_a_duplicate(store: &dyn Store) {
    registered(store, "a", "local").await;
    registered(store, "a:b", "local").await;
    let reading = |device: &str, token: &str, secs: i64| BatchWrite::Telemetry {
        commit: TelemetryCommit {
            received_at: at(secs),
            ..commit(
                device,
                vec![new_alert(token, &format!("{device}/hot"), at(secs))],
                60,
                &["hook"],
            )
        },
        from: arrival("local", device, token),
        if_unknown: IfUnknown::Register,
    };
    let first = store
        .commit_batch(&[reading("a", "a:b:m1", 1), reading("a:b", "a:b:m1", 2)])
        .await
        .expect("first batch");
    assert!(
        matches!(&first[0], BatchOutcome::Telemetry { alerts, .. } if !alerts[0].duplicate),
        "{:?}",
        first[0]
    );
    assert_eq!(first[1], BatchOutcome::TokenConflict { owner: did("a") });
    let second = store
        .commit_batch(&[reading("a:b", "a:b:m1", 3), reading("a", "a:b:m1", 4)])
        .await
        .expect("second batch");
    assert_eq!(second[0], BatchOutcome::TokenConflict { owner: did("a") });
    assert!(
        matches!(&second[1], BatchOutcome::Telemetry { alerts, .. } if alerts[0].duplicate),
        "a redelivery from the token's own device stays a duplicate: {:?}",
        second[1]
    );
    let single = store
        .commit_telemetry(&commit(
            "a:b",
            vec![new_alert("a:b:m1", "a:b/hot", at(5))],
            60,
            &["hook"],
        ))
        .await;
    assert!(
        matches!(&single, Err(StoreError::Conflict(m)) if m.contains("device `a`")),
        "{single:?}"
    );

    let alerts = all_alerts(store, &AlertFilter::default()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].device_id, did("a"));
    let dead = store
        .list_dead_letters(&page(None, 10))
        .await
        .expect("dead letters");
    assert_eq!(dead.items.len(), 2, "{:?}", dead.items);
    for letter in &dead.items {
        assert_eq!(letter.device_id.as_deref(), Some("a:b"));
        assert!(
            letter.reason.starts_with("token_conflict:") && letter.reason.contains("device `a`"),
            "{}",
            letter.reason
        );
    }
    let other = store
        .get_device(&did("a:b"))
        .await
        .expect("get")
        .expect("a:b");
    assert_eq!(
        other.last_activity_time, None,
        "a conflicting reading does not move last activity"
    );
}

/// A reading of a device that is stored but not Registered (Unregistered, Error, In
/// Progress) is a `not_registered` dead letter naming the status: no alert, no command, no
/// activity, whatever the unknown-device policy (an unregistered device is not registered
/// again by its own telemetry).
pub async fn readings_of_an_unregistered_or_failed_device_are_dead_letters_without_alerts(
    store: &dyn Store,
) {
    registered(store, "gone-1", "local").await;
    store
        .mark_unregistered(&did("gone-1"), None)
        .await
        .expect("unregister");
    store
        .begin_registration(&new_device("broken-1", "local"))
        .await
        .expect("begin");
    store
        .finish_registration(&did("broken-1"), Err("the cloud refused it".into()))
        .await
        .expect("finish as Error");
    let reading = |device: &str, token: &str| BatchWrite::Telemetry {
        commit: commit(
            device,
            vec![new_alert(token, &format!("{device}/x"), at(1))],
            60,
            &["hook"],
        ),
        from: arrival("local", device, token),
        if_unknown: IfUnknown::Register,
    };
    let out = store
        .commit_batch(&[reading("gone-1", "n-1"), reading("broken-1", "n-2")])
        .await
        .expect("commit");
    assert_eq!(
        out,
        vec![
            BatchOutcome::NotRegistered {
                status: RegistrationStatus::Unregistered
            },
            BatchOutcome::NotRegistered {
                status: RegistrationStatus::Error
            },
        ]
    );
    assert!(all_alerts(store, &AlertFilter::default()).await.is_empty());
    assert!(depth(store).await.is_empty(), "no outbox item");
    let dead = store
        .list_dead_letters(&page(None, 10))
        .await
        .expect("dead letters");
    assert_eq!(dead.items.len(), 2);
    assert!(
        dead.items
            .iter()
            .all(|d| d.reason.starts_with("not_registered:")),
        "{:?}",
        dead.items
    );
    let gone = store
        .get_device(&did("gone-1"))
        .await
        .expect("get")
        .expect("gone-1");
    assert_eq!(gone.registration_status, RegistrationStatus::Unregistered);
    assert_eq!(
        gone.last_activity_time, None,
        "no activity from a refused reading"
    );
}

/// Inside a batch, a reading of an unknown device follows the policy it carries (a dead
/// letter, or registration with status Unknown), and lifecycle writes for unknown devices
/// write nothing.
pub async fn batch_applies_the_unknown_device_policy_and_lifecycle_writes(store: &dyn Store) {
    registered(store, "pump-1", "local").await;
    let out = store
        .commit_batch(&[
            BatchWrite::Telemetry {
                commit: commit(
                    "ghost-1",
                    vec![new_alert("g-1", "ghost-1/x", at(1))],
                    60,
                    &[],
                ),
                from: arrival("local", "ghost-1", "g-1"),
                if_unknown: IfUnknown::DeadLetter {
                    reason: "device ghost-1 is not in the registry".into(),
                },
            },
            BatchWrite::Telemetry {
                commit: commit("new-1", vec![new_alert("n-1", "new-1/x", at(1))], 60, &[]),
                from: arrival("edge", "new-1", "n-1"),
                if_unknown: IfUnknown::Register,
            },
            BatchWrite::Connection {
                device_id: did("pump-1"),
                connected: true,
                at: at(5),
            },
            BatchWrite::Connection {
                device_id: did("pump-1"),
                connected: false,
                at: at(2),
            },
            BatchWrite::Connection {
                device_id: did("ghost-2"),
                connected: true,
                at: at(5),
            },
            BatchWrite::Reported {
                device_id: did("pump-1"),
                properties: serde_json::json!({"fw": "2.1"}),
                at: at(6),
            },
            BatchWrite::Reported {
                device_id: did("ghost-2"),
                properties: serde_json::json!({}),
                at: at(6),
            },
        ])
        .await
        .expect("commit_batch");
    assert_eq!(out[0], BatchOutcome::DeadLettered, "dead-letter policy");
    match &out[1] {
        BatchOutcome::Telemetry { alerts, registered } => {
            assert!(registered, "register policy");
            assert_eq!(alerts.len(), 1);
        }
        other => panic!("expected the new device's reading to commit, got {other:?}"),
    }
    assert_eq!(out[2], BatchOutcome::Connection { applied: true });
    assert_eq!(
        out[3],
        BatchOutcome::Connection { applied: false },
        "an older state in the same batch does not override a newer one"
    );
    assert_eq!(out[4], BatchOutcome::UnknownDevice);
    assert_eq!(out[5], BatchOutcome::Reported);
    assert_eq!(out[6], BatchOutcome::UnknownDevice);
    assert!(store
        .get_device(&did("ghost-1"))
        .await
        .expect("get")
        .is_none());
    assert!(store
        .get_device(&did("ghost-2"))
        .await
        .expect("get")
        .is_none());
    let new = store
        .get_device(&did("new-1"))
        .await
        .expect("get")
        .expect("new-1 registered");
    assert_eq!(new.registration_status, RegistrationStatus::Unknown);
    assert_eq!(new.provider_instance, "edge");
    let pump = store
        .get_device(&did("pump-1"))
        .await
        .expect("get")
        .expect("pump-1");
    assert!(pump.connection_state, "the newer connect stands");
    assert_eq!(
        pump.reported_properties,
        Some(serde_json::json!({"fw": "2.1"}))
    );
    let dead = store
        .list_dead_letters(&page(None, 10))
        .await
        .expect("dead letters");
    assert_eq!(dead.items.len(), 1);
    assert_eq!(dead.items[0].message_id.as_deref(), Some("g-1"));
}

/// `begin_registrations` applies `begin_registration`'s rules to each device in one call: new
/// and Unregistered/Unknown/Error devices become In Progress (a known record keeps its id),
/// Registered and In Progress ones are conflicts, an id repeated in the batch conflicts the
/// second time, a device naming a category that cannot be created is refused; none of the
/// refusals stops the others. Each category named is created once.
pub async fn a_registration_batch_begins_each_device_by_the_single_device_rules(store: &dyn Store) {
    registered(store, "done-1", "aws-east").await;
    store
        .begin_registration(&new_device("busy-1", "aws-east"))
        .await
        .expect("begin busy-1");
    let gone = registered(store, "gone-1", "aws-east").await;
    store
        .mark_unregistered(&did("gone-1"), None)
        .await
        .expect("unregister gone-1");
    let seen = store
        .ensure_unknown_device(&did("seen-1"), "mqtt-local")
        .await
        .expect("unknown seen-1");
    store
        .begin_registration(&new_device("bad-1", "aws-east"))
        .await
        .expect("begin bad-1");
    store
        .finish_registration(&did("bad-1"), Err("quota".into()))
        .await
        .expect("fail bad-1");

    let mut blank = new_device("blank-cat", "gcp-eu");
    blank.category = Some("   ".into());
    let mut valves = new_device("valve-1", "gcp-eu");
    valves.category = Some("valves".into());
    let batch = vec![
        new_device("new-1", "gcp-eu"),
        new_device("done-1", "gcp-eu"),
        new_device("busy-1", "gcp-eu"),
        new_device("gone-1", "gcp-eu"),
        new_device("seen-1", "gcp-eu"),
        new_device("bad-1", "gcp-eu"),
        new_device("new-1", "azure-west"),
        blank,
        valves,
    ];
    let out = store
        .begin_registrations(&batch)
        .await
        .expect("begin_registrations");
    assert_eq!(out.len(), batch.len(), "one result per device, in order");

    let begun = |i: usize| match &out[i] {
        Ok(d) => d.clone(),
        Err(e) => panic!("{} should have begun, got {e:?}", batch[i].device_id),
    };
    let new = begun(0);
    assert_eq!(new.registration_status, RegistrationStatus::InProgress);
    assert_eq!(new.provider_instance, "gcp-eu");
    assert_eq!(new.name, batch[0].name);
    assert_eq!(new.tags, batch[0].tags);
    assert_eq!(new.settings, batch[0].settings);
    for (i, status) in [(1, "Registered"), (2, "In Progress")] {
        let msg = match &out[i] {
            Err(StoreError::Conflict(m)) => m.clone(),
            other => panic!("{}: expected Conflict, got {other:?}", batch[i].device_id),
        };
        for part in [
            batch[i].device_id.as_str(),
            status,
            "aws-east",
            "unregister it first",
        ] {
            assert!(msg.contains(part), "{msg:?} should mention {part:?}");
        }
    }
    let again = begun(3);
    assert_eq!(again.id, gone.id, "re-registering keeps the record id");
    assert_eq!(again.provider_instance, "gcp-eu");
    assert_eq!(
        begun(4).id,
        seen.id,
        "an Unknown device is registered in place"
    );
    let retried = begun(5);
    assert_eq!(retried.registration_status, RegistrationStatus::InProgress);
    assert_eq!(
        retried.registration_message, None,
        "the old error is cleared"
    );
    match &out[6] {
        Err(StoreError::Conflict(m)) => assert!(
            m.contains("new-1") && m.contains("In Progress") && m.contains("gcp-eu"),
            "the repeated id conflicts with its first occurrence: {m}"
        ),
        other => panic!("a repeated id: expected Conflict, got {other:?}"),
    }
    invalid(out[7].clone(), "a device naming a blank category");
    assert!(
        store
            .get_device(&did("blank-cat"))
            .await
            .expect("get")
            .is_none(),
        "a refused device is not begun"
    );
    assert_eq!(begun(8).category.as_deref(), Some("valves"));

    let done = store
        .get_device(&did("done-1"))
        .await
        .expect("get")
        .expect("done-1");
    assert_eq!(done.registration_status, RegistrationStatus::Registered);
    assert_eq!(
        done.provider_instance, "aws-east",
        "a conflict changes nothing"
    );
    let names: Vec<String> = store
        .list_categories()
        .await
        .expect("categories")
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["pumps", "valves"], "each category once");
    assert!(
        store
            .begin_registrations(&[])
            .await
            .expect("empty batch")
            .is_empty(),
        "an empty batch begins nothing"
    );
}

/// `finish_registrations` applies `finish_registration`'s rules to each outcome in one call:
/// `Ok` sets Registered with a Register history row, `Err` sets Error with the message and
/// no history, an unknown device is `NotFound` without failing the others.
pub async fn a_finishing_batch_registers_or_fails_each_device_on_its_own(store: &dyn Store) {
    let begun = store
        .begin_registrations(&[
            new_device("ok-1", "local"),
            new_device("ok-2", "local"),
            new_device("fail-1", "local"),
        ])
        .await
        .expect("begin_registrations");
    assert!(begun.iter().all(Result::is_ok), "{begun:?}");
    let out = store
        .finish_registrations(&[
            (did("ok-1"), Ok(Some("thing created".into()))),
            (did("ghost-1"), Ok(None)),
            (did("fail-1"), Err("quota exceeded".into())),
            (did("ok-2"), Ok(None)),
        ])
        .await
        .expect("finish_registrations");
    assert_eq!(out.len(), 4, "one result per outcome, in order");
    let ok1 = out[0].as_ref().expect("ok-1 finished");
    assert_eq!(ok1.registration_status, RegistrationStatus::Registered);
    assert_eq!(ok1.registration_message.as_deref(), Some("thing created"));
    not_found(
        out[1].clone(),
        "device",
        "finishing an unknown device in a batch",
    );
    let failed = out[2].as_ref().expect("fail-1 finished");
    assert_eq!(failed.registration_status, RegistrationStatus::Error);
    assert_eq!(
        failed.registration_message.as_deref(),
        Some("quota exceeded")
    );
    let ok2 = out[3].as_ref().expect("ok-2 finished");
    assert_eq!(ok2.registration_status, RegistrationStatus::Registered);
    assert_eq!(ok2.registration_message, None);

    for (id, rows) in [("ok-1", 1), ("ok-2", 1), ("fail-1", 0)] {
        let history = store.history(&did(id)).await.expect("history");
        assert_eq!(history.len(), rows, "{id}: {history:?}");
        if let Some(h) = history.first() {
            assert_eq!(h.action, RegistrationAction::Register);
            assert_eq!(h.name, format!("Register {id}"));
            assert_eq!(h.provider_instance, "local");
        }
    }
    assert_eq!(
        store.get_device(&did("ok-1")).await.expect("get").as_ref(),
        Some(ok1),
        "the returned record is the stored one"
    );

    // An id repeated in a batch is applied in order, as two calls would be.
    store
        .begin_registration(&new_device("twice-1", "local"))
        .await
        .expect("begin twice-1");
    let out = store
        .finish_registrations(&[
            (did("twice-1"), Err("first try failed".into())),
            (did("twice-1"), Ok(Some("second try".into()))),
        ])
        .await
        .expect("finish_registrations");
    let first = out[0].as_ref().expect("first outcome");
    assert_eq!(first.registration_status, RegistrationStatus::Error);
    let second = out[1].as_ref().expect("second outcome");
    assert_eq!(second.registration_status, RegistrationStatus::Registered);
    assert_eq!(second.registration_message.as_deref(), Some("second try"));
    assert_eq!(
        store.history(&did("twice-1")).await.expect("history").len(),
        1,
        "one Register row, for the outcome that registered"
    );
    assert!(
        store
            .finish_registrations(&[])
            .await
            .expect("empty batch")
            .is_empty(),
        "an empty batch finishes nothing"
    );
}

/// Readings: each message's measures are kept once (its redelivery in the same batch or a
/// later one adds nothing, to the readings or the rollups), a dead-lettered message keeps
/// none, and a query answers min, max, sum and count per bucket, from the readings (an
/// interval that is not whole minutes) or the rollups (whole minutes, whole hours), as
/// the scenario computes them from the values it sent.
pub async fn readings_are_kept_once_and_answered_per_bucket(store: &dyn Store) {
    use crate::readings::{ReadingQuery, Readings};
    /// (measure, bucket start) -> (min, max, sum, count).
    type Buckets = BTreeMap<(String, DateTime<Utc>), (f64, f64, f64, i64)>;

    registered(store, "meter-1", "local").await;
    // Ten minutes from an hour's start, one message every 20 s: /temp = i, /on = i % 2.
    let start = base();
    let value = |i: i64| (i as f64, (i % 2) as f64);
    let reading = |device: &str, i: i64| BatchWrite::Telemetry {
        commit: TelemetryCommit {
            received_at: start + Duration::seconds(20 * i),
            readings: Box::new(Readings {
                at: start + Duration::seconds(20 * i),
                message_id: format!("r-{i}"),
                measures: vec![("/temp".into(), value(i).0), ("/on".into(), value(i).1)],
            }),
            ..commit(device, Vec::new(), 60, &[])
        },
        from: arrival("local", device, &format!("r-{i}")),
        if_unknown: IfUnknown::DeadLetter {
            reason: "not registered".into(),
        },
    };
    let mut first: Vec<BatchWrite> = (0..20).map(|i| reading("meter-1", i)).collect();
    first.push(reading("meter-1", 3)); // delivered twice in one batch
    first.push(reading("ghost-1", 0)); // not registered: a dead letter
    store.commit_batch(&first).await.expect("first batch");
    // The second batch repeats five of the first.
    let second: Vec<BatchWrite> = (15..30).map(|i| reading("meter-1", i)).collect();
    store.commit_batch(&second).await.expect("second batch");

    let query = |interval_s: i64, measures: &[&str]| ReadingQuery {
        device_id: did("meter-1"),
        from: start,
        to: start + Duration::seconds(600),
        interval_s,
        measures: measures.iter().map(|m| (*m).to_owned()).collect(),
    };
    // What each bucket must hold, computed from the values sent: (measure, start) ->
    // (min, max, sum, count).
    let expected = |interval_s: i64| {
        let mut out = Buckets::new();
        for i in 0..30 {
            let b = start + Duration::seconds((20 * i) / interval_s * interval_s);
            for (measure, v) in [("/on", value(i).1), ("/temp", value(i).0)] {
                let e = out
                    .entry((measure.to_owned(), b))
                    .or_insert((f64::MAX, f64::MIN, 0.0, 0));
                *e = (e.0.min(v), e.1.max(v), e.2 + v, e.3 + 1);
            }
        }
        out
    };
    for interval_s in [40, 60, 300, 3600] {
        let got: Buckets = store
            .query_readings(&query(interval_s, &[]))
            .await
            .expect("query")
            .into_iter()
            .map(|b| ((b.measure, b.start), (b.min, b.max, b.sum, b.count)))
            .collect();
        assert_eq!(got, expected(interval_s), "interval {interval_s} s");
    }
    let temps = store
        .query_readings(&query(3600, &["/temp"]))
        .await
        .expect("one measure");
    assert_eq!(temps.len(), 1);
    assert_eq!((temps[0].count, temps[0].avg()), (30, 14.5));
    assert!(
        store
            .query_readings(&ReadingQuery {
                device_id: did("ghost-1"),
                ..query(60, &[])
            })
            .await
            .expect("ghost")
            .is_empty(),
        "a dead-lettered message keeps no reading"
    );
    // A bucket is answered when its start is in the range: from 10:00:30 the first minute
    // bucket is 10:01.
    let later = store
        .query_readings(&ReadingQuery {
            from: start + Duration::seconds(30),
            ..query(60, &["/temp"])
        })
        .await
        .expect("query");
    assert_eq!(
        later.first().map(|b| b.start),
        Some(start + Duration::seconds(60))
    );
    assert!(matches!(
        store
            .query_readings(&ReadingQuery {
                to: start,
                ..query(60, &[])
            })
            .await,
        Err(StoreError::Invalid { .. })
    ));

    // Retention: the readings and minute rollups of the first five minutes go, the hour
    // rollup stays.
    let cut = Some(start + Duration::seconds(300));
    let purged = store
        .purge(
            &PurgeBefore {
                readings: cut,
                minute_rollups: cut,
                ..PurgeBefore::default()
            },
            1000,
        )
        .await
        .expect("purge");
    assert_eq!((purged.readings, purged.rollups), (30, 10), "{purged:?}");
    let raw = store
        .query_readings(&query(40, &["/temp"]))
        .await
        .expect("raw after the purge");
    assert_eq!(raw.iter().map(|b| b.count).sum::<i64>(), 15);
    assert_eq!(
        store
            .query_readings(&query(3600, &["/temp"]))
            .await
            .expect("hour")[0]
            .count,
        30
    );
}

/// An alert's case and work order are recorded with Field Service's status codes; closing
/// a parent's children leaves the parent and other alerts as they are; the commands of one
/// send-to-all request are found by its id.
pub async fn service_work_is_recorded_children_close_and_a_request_groups_its_commands(
    store: &dyn Store,
) {
    registered(store, "work-1", "local").await;
    registered(store, "work-2", "local").await;
    let parent = one(
        store,
        commit(
            "work-1",
            vec![new_alert("w-1", "work-1/hot", at(1))],
            60,
            &[],
        ),
    )
    .await;
    let child = one(
        store,
        commit(
            "work-1",
            vec![new_alert("w-2", "work-1/hot", at(2))],
            60,
            &[],
        ),
    )
    .await;
    assert_eq!(child.parent_alert, Some(parent.id));
    let other = one(
        store,
        commit(
            "work-2",
            vec![new_alert("w-3", "work-2/hot", at(1))],
            60,
            &[],
        ),
    )
    .await;
    assert_eq!((parent.case, parent.work_order), (None, None));

    let order = Uuid::now_v7();
    let ordered = store
        .set_alert_service_work(parent.id, ServiceWork::WorkOrder(order))
        .await
        .expect("work order");
    assert_eq!(
        (
            ordered.work_order,
            ordered.case,
            ordered.statecode,
            ordered.statuscode
        ),
        (Some(order), None, 2, 4)
    );
    let case = Uuid::now_v7();
    let cased = store
        .set_alert_service_work(parent.id, ServiceWork::Case(case))
        .await
        .expect("case");
    assert_eq!(
        (cased.work_order, cased.case, cased.statuscode),
        (Some(order), Some(case), 3),
        "the work order stays recorded"
    );
    assert_eq!(store.get_alert(parent.id).await.expect("read"), Some(cased));
    not_found(
        store
            .set_alert_service_work(Uuid::now_v7(), ServiceWork::Case(case))
            .await,
        "alert",
        "an unknown alert",
    );

    assert_eq!(store.close_child_alerts(parent.id).await.expect("close"), 1);
    assert_eq!(store.close_child_alerts(parent.id).await.expect("again"), 0);
    let state = |id| async move {
        let a = store.get_alert(id).await.expect("read").expect("stored");
        (a.statecode, a.statuscode)
    };
    assert_eq!(state(child.id).await, (3, 6));
    assert_eq!(
        state(parent.id).await,
        (2, 3),
        "the parent is left as it was"
    );
    assert_eq!(
        state(other.id).await,
        (0, 1),
        "another device's alert is untouched"
    );

    let request = Uuid::now_v7();
    for (i, device) in ["work-1", "work-2"].iter().enumerate() {
        let c = store
            .insert_command(&NewCommand {
                name: "set_threshold".into(),
                message: "{}".into(),
                device_id: did(device),
                parent_alert: None,
                correlation_id: format!("req-{i}"),
                request_id: Some(request),
            })
            .await
            .expect("a command of the request");
        assert_eq!(c.request_id, Some(request));
    }
    store
        .insert_command(&NewCommand {
            name: "reboot".into(),
            message: "{}".into(),
            device_id: did("work-1"),
            parent_alert: None,
            correlation_id: "alone".into(),
            request_id: None,
        })
        .await
        .expect("a command of no request");
    let of_request = store
        .list_commands(
            &CommandFilter {
                request_id: Some(request),
                ..CommandFilter::default()
            },
            &PageRequest::default(),
        )
        .await
        .expect("by request");
    let mut devices: Vec<&str> = of_request
        .items
        .iter()
        .map(|c| c.device_id.as_str())
        .collect();
    devices.sort_unstable();
    assert_eq!(devices, ["work-1", "work-2"]);
}

/// A Field Service record links to several devices and a device to several records;
/// linking again answers the stored link; an unknown device is `NotFound`.
pub async fn entities_link_to_devices_once_and_are_found_both_ways(store: &dyn Store) {
    registered(store, "asset-dev-1", "local").await;
    registered(store, "asset-dev-2", "local").await;
    let asset = "msdyn_customerasset";
    let first = store
        .link_entity(asset, "a-1", &did("asset-dev-1"))
        .await
        .expect("link");
    assert_eq!(
        (
            first.entity_logical_name.as_str(),
            first.entity_id.as_str(),
            first.device_id.as_str()
        ),
        (asset, "a-1", "asset-dev-1")
    );
    let again = store
        .link_entity(asset, "a-1", &did("asset-dev-1"))
        .await
        .expect("link again");
    assert_eq!(again, first, "linking again answers the stored link");
    store
        .link_entity(asset, "a-1", &did("asset-dev-2"))
        .await
        .expect("a second device");
    store
        .link_entity("account", "acc-9", &did("asset-dev-1"))
        .await
        .expect("another entity");
    not_found(
        store
            .link_entity(asset, "a-2", &did("no-such-device"))
            .await,
        "device",
        "an unknown device",
    );
    let devices_of = |id: &str| EntityLinkFilter {
        entity_logical_name: Some(asset.into()),
        entity_id: Some(id.into()),
        device_id: None,
    };
    let of_asset: Vec<String> = store
        .entity_links(&devices_of("a-1"))
        .await
        .expect("by entity")
        .into_iter()
        .map(|l| l.device_id.to_string())
        .collect();
    assert_eq!(of_asset, ["asset-dev-1", "asset-dev-2"]);
    let of_device: Vec<(String, String)> = store
        .entity_links(&EntityLinkFilter {
            device_id: Some(did("asset-dev-1")),
            ..EntityLinkFilter::default()
        })
        .await
        .expect("by device")
        .into_iter()
        .map(|l| (l.entity_logical_name, l.entity_id))
        .collect();
    assert_eq!(
        of_device,
        [
            ("account".into(), "acc-9".into()),
            (asset.into(), "a-1".into())
        ]
    );
    assert!(store
        .entity_links(&devices_of("a-2"))
        .await
        .expect("none")
        .is_empty());
}

/// Update Device Data: the settings replace the stored ones (not merged), the device is
/// answered as stored with `updated_at` bumped and nothing else changed; an unknown
/// device is `NotFound`.
pub async fn device_settings_are_replaced_and_bump_updated_at(store: &dyn Store) {
    let before = registered(store, "settings-dev-1", "local").await;
    assert_eq!(
        before.settings,
        Some(serde_json::json!({"interval": 30})),
        "registered with settings"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let first = serde_json::json!({"setpoint": 21.5, "mode": "eco", "zones": [1, 2]});
    let got = store
        .set_device_settings(&did("settings-dev-1"), &first)
        .await
        .expect("settings stored");
    assert_eq!(got.settings.as_ref(), Some(&first));
    assert!(
        got.updated_at > before.updated_at,
        "updated_at bumped: {} then {}",
        before.updated_at,
        got.updated_at
    );
    assert_eq!(
        (
            got.id,
            got.registration_status,
            &got.provider_instance,
            &got.reported_properties
        ),
        (
            before.id,
            before.registration_status,
            &before.provider_instance,
            &before.reported_properties
        ),
        "nothing else changes"
    );
    let second = serde_json::json!({"mode": "boost"});
    let got = store
        .set_device_settings(&did("settings-dev-1"), &second)
        .await
        .expect("settings replaced");
    assert_eq!(got.settings.as_ref(), Some(&second), "replaced, not merged");
    let read = store
        .get_device(&did("settings-dev-1"))
        .await
        .expect("read")
        .expect("the device");
    assert_eq!(read.settings.as_ref(), Some(&second));
    assert_eq!(read, got, "the answer is the stored device");
    not_found(
        store
            .set_device_settings(&did("no-such-device"), &first)
            .await,
        "device",
        "an unknown device",
    );
}

/// Connection changes become the device's timeline, newest first; an older change than
/// the stored one is ignored there too; at most [`CONNECTION_EVENTS_KEPT`] are kept.
pub async fn connection_changes_are_kept_newest_first_and_bounded(store: &dyn Store) {
    registered(store, "flappy-1", "local").await;
    let id = did("flappy-1");
    let t0 = base();
    assert!(store
        .connection_history(&id, 10)
        .await
        .expect("empty")
        .is_empty());
    store.set_connection_state(&id, true, t0).await.expect("on");
    store
        .set_connection_state(&id, false, t0 + Duration::seconds(10))
        .await
        .expect("off");
    // Late: older than what is stored, so neither the record nor the timeline changes.
    let applied = store
        .set_connection_state(&id, true, t0 + Duration::seconds(5))
        .await
        .expect("late");
    assert!(!applied);
    assert_eq!(
        store.connection_history(&id, 10).await.expect("history"),
        vec![(t0 + Duration::seconds(10), false), (t0, true)]
    );
    for i in 0..150 {
        store
            .set_connection_state(&id, i % 2 == 0, t0 + Duration::seconds(20 + i))
            .await
            .expect("flap");
    }
    let all = store.connection_history(&id, 1000).await.expect("all");
    assert_eq!(all.len(), CONNECTION_EVENTS_KEPT as usize, "bounded");
    assert_eq!(all[0], (t0 + Duration::seconds(169), false), "newest first");
    assert_eq!(
        store.connection_history(&id, 3).await.expect("three").len(),
        3
    );
}

/// `sink` takes these entities, coalescing connection states over `coalesce`.
fn subscribe(subs: &mut Subscriptions, sink: &str, entities: &[&str], coalesce: Duration) {
    subs.insert(
        sink,
        Subscription {
            entities: entities.iter().map(|e| (*e).to_owned()).collect(),
            alert_changes: entities.contains(&ENTITY_ALERT),
            coalesce_connection: coalesce,
        },
    );
}

/// Claims every item waiting for `sink` and marks them delivered; returns them in order.
async fn drain(store: &dyn Store, sink: &str) -> Vec<OutboxItem> {
    let now = Utc::now();
    let items = store
        .claim_outbox(sink, "replica-1", now, now + Duration::seconds(30), 1000)
        .await
        .expect("claim_outbox");
    for item in &items {
        assert!(store
            .outbox_delivered(item.lease())
            .await
            .expect("delivered"));
    }
    items
}

/// Registration, connection states and unregistration of a device each queue one change
/// event (`msdyn_iotdevice`, its device id, versions 1..n in order, the record as stored)
/// for a sink taking devices, and nothing for a sink that takes alerts only; alerts still go
/// to the sinks taking alerts, and only to them.
pub async fn device_changes_reach_subscribed_sinks_in_version_order(store: &dyn Store) {
    // Registered before any sink takes devices: no change events for it.
    registered(store, "feed-2", "mqtt").await;
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_DEVICE], Duration::zero());
    subscribe(&mut subs, "alerts", &[ENTITY_ALERT], Duration::zero());
    store.set_subscriptions(subs);
    registered(store, "feed-1", "mqtt").await;
    assert!(store
        .set_connection_state(&did("feed-1"), true, at(10))
        .await
        .expect("connect"));
    assert!(store
        .set_connection_state(&did("feed-1"), false, at(20))
        .await
        .expect("disconnect"));
    let last = store
        .mark_unregistered(&did("feed-1"), Some("retired".into()))
        .await
        .expect("unregister");
    let alert = one(
        store,
        commit(
            "feed-2",
            vec![new_alert("t-feed", "k", at(1))],
            60,
            &["feed", "alerts", "legacy"],
        ),
    )
    .await
    .id;

    let items = drain(store, "feed").await;
    let versions: Vec<i64> = items
        .iter()
        .map(|i| i.payload["version"].as_i64().expect("a version"))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5], "{items:?}");
    for (item, version) in items.iter().zip(1..) {
        assert_eq!(item.payload["entity"], ENTITY_DEVICE);
        assert_eq!(item.payload["key"], "feed-1");
        assert_eq!(
            item.idempotency_key,
            format!("msdyn_iotdevice:feed-1:{version}")
        );
        assert_eq!(item.payload["state"]["msdyn_deviceid"], "feed-1");
    }
    assert_eq!(items[2].payload["state"]["msdyn_connectionstate"], true);
    assert_eq!(items[3].payload["state"]["msdyn_connectionstate"], false);
    assert_eq!(
        items[4].payload["state"],
        serde_json::to_value(&last).expect("device json"),
        "the last event carries the record as stored"
    );
    let alerts = drain(store, "alerts").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].idempotency_key, alert.to_string());
    let legacy = drain(store, "legacy").await;
    assert_eq!(
        legacy.len(),
        1,
        "a sink never subscribed takes alerts, as before"
    );
    assert!(depth(store).await.iter().all(|(_, d)| *d == 0));
}

/// A flapping device's connection states are queued once per coalescing interval and
/// sink: a connection state waits out the interval, and every newer state replaces the
/// item still waiting (new state, version and key); a leased item is left alone (the newer
/// state is queued after it); a change other than a connection state takes the waiting
/// item's place and makes it due at once; the last state is always what is delivered last.
/// Group commit's connection writes coalesce the same way.
pub async fn connection_churn_is_coalesced_per_sink_and_the_last_state_wins(store: &dyn Store) {
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_DEVICE], Duration::hours(1));
    subscribe(&mut subs, "every", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    registered(store, "flap-1", "mqtt").await;
    let registration = drain(store, "feed").await;
    assert_eq!(registration.len(), 2, "begun and finished, due at once");
    let id = did("flap-1");
    for i in 0..100 {
        store
            .set_connection_state(&id, true, at(10 + 2 * i))
            .await
            .expect("connect");
        store
            .set_connection_state(&id, false, at(11 + 2 * i))
            .await
            .expect("disconnect");
    }
    let every = drain(store, "every").await;
    assert_eq!(every.len(), 202, "no coalescing at a zero interval");
    assert!(
        drain(store, "feed").await.is_empty(),
        "the connection state waits out the interval"
    );

    let later = Utc::now() + Duration::hours(2);
    let leased = store
        .claim_outbox(
            "feed",
            "replica-1",
            later,
            later + Duration::seconds(30),
            1000,
        )
        .await
        .expect("claim");
    assert_eq!(leased.len(), 1, "one item for 200 changes: {leased:?}");
    let last = &leased[0];
    assert_eq!(last.payload["version"], 202);
    assert_eq!(last.idempotency_key, "msdyn_iotdevice:flap-1:202");
    assert_eq!(last.payload["state"]["msdyn_connectionstate"], false);

    // The waiting item is leased: a newer state is queued after it, not into it.
    let out = store
        .commit_batch(&[
            BatchWrite::Connection {
                device_id: id.clone(),
                connected: true,
                at: at(300),
            },
            BatchWrite::Connection {
                device_id: id.clone(),
                connected: false,
                at: at(301),
            },
            BatchWrite::Connection {
                device_id: id.clone(),
                connected: true,
                at: at(302),
            },
        ])
        .await
        .expect("batch");
    assert!(out
        .iter()
        .all(|o| matches!(o, BatchOutcome::Connection { applied: true })));
    assert!(store
        .outbox_delivered(last.lease())
        .await
        .expect("delivered"));
    let rest = store
        .claim_outbox(
            "feed",
            "replica-1",
            later,
            later + Duration::seconds(30),
            1000,
        )
        .await
        .expect("claim");
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0].payload["version"], 205);
    assert_eq!(rest[0].payload["state"]["msdyn_connectionstate"], true);
    assert_eq!(
        rest[0].payload["state"],
        serde_json::to_value(store.get_device(&id).await.expect("get").expect("device"))
            .expect("json")
    );
    assert!(store
        .outbox_delivered(rest[0].lease())
        .await
        .expect("delivered"));

    // A connection state waiting, then an unregistration: one item, due at once, holding
    // both (the state is the whole record).
    store
        .set_connection_state(&id, false, at(400))
        .await
        .expect("disconnect");
    store
        .mark_unregistered(&id, None)
        .await
        .expect("unregister");
    let now_due = drain(store, "feed").await;
    assert_eq!(now_due.len(), 1, "{now_due:?}");
    assert_eq!(now_due[0].payload["version"], 207);
    assert_eq!(
        now_due[0].payload["state"]["msdyn_registrationstatus"],
        192_350_001
    );
    assert_eq!(now_due[0].payload["state"]["msdyn_connectionstate"], false);
}

/// The change events among `items` about `record` (`<entity>:<key>`), in queue order.
fn of_record<'a>(items: &'a [OutboxItem], record: &str) -> Vec<&'a OutboxItem> {
    items
        .iter()
        .filter(|i| i.change_of.as_deref() == Some(record))
        .collect()
}

/// Checks that `item` is version `version` of the change event of `entity`'s record `key`.
fn assert_change(item: &OutboxItem, entity: &str, key: &str, version: i64) {
    assert_eq!(item.payload["entity"], entity, "{item:?}");
    assert_eq!(item.payload["key"], key, "{item:?}");
    assert_eq!(item.payload["version"], version, "{item:?}");
    assert_eq!(item.idempotency_key, format!("{entity}:{key}:{version}"));
    assert_eq!(
        item.change_of.as_deref(),
        Some(format!("{entity}:{key}").as_str())
    );
}

/// A command's creation and each change of what it shows (status, status reason,
/// publication) queue one change event (`msdyn_iotdevicecommand`, its id, versions 1..n in
/// order, the record as stored) for a sink taking commands, whatever created it (the API or
/// an alert's rule); a claim alone queues nothing, and a sink not taking commands gets none.
pub async fn command_changes_reach_subscribed_sinks_in_version_order(store: &dyn Store) {
    registered(store, "cmdfeed-1", "mqtt").await;
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_COMMAND], Duration::zero());
    subscribe(&mut subs, "devices", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    let made = store
        .insert_command(&NewCommand {
            request_id: None,
            name: "reboot".into(),
            message: "{}".into(),
            device_id: did("cmdfeed-1"),
            parent_alert: None,
            correlation_id: "corr-feed-1".into(),
        })
        .await
        .expect("insert");
    let sent = store
        .set_command_status(made.id, CommandStatus::Sent, None)
        .await
        .expect("sent");
    let mut a = new_alert("t-cmdfeed", "k", at(1));
    a.command = Some(NewAlertCommand {
        name: "reset".into(),
        message: "{}".into(),
        correlation_id: "corr-feed-2".into(),
    });
    let out = store
        .commit_telemetry(&commit("cmdfeed-1", vec![a], 60, &["feed", "devices"]))
        .await
        .expect("commit");
    let by_rule = out[0].command.clone().expect("a command");

    let items = drain(store, "feed").await;
    let key = made.id.to_string();
    let mine = of_record(&items, &format!("{ENTITY_COMMAND}:{key}"));
    assert_eq!(mine.len(), 2, "{items:?}");
    assert_change(mine[0], ENTITY_COMMAND, &key, 1);
    assert_change(mine[1], ENTITY_COMMAND, &key, 2);
    assert_eq!(mine[0].payload["state"]["msdyn_commandstatus"], 192350000);
    assert_eq!(mine[1].payload["state"]["msdyn_commandstatus"], 192350001);
    assert_eq!(
        mine[0].payload["state"],
        serde_json::to_value(&made).expect("json")
    );
    assert_eq!(
        mine[1].payload["state"],
        serde_json::to_value(&sent).expect("json")
    );
    let rule_key = by_rule.id.to_string();
    let ruled = of_record(&items, &format!("{ENTITY_COMMAND}:{rule_key}"));
    assert_eq!(ruled.len(), 1, "{items:?}");
    assert_change(ruled[0], ENTITY_COMMAND, &rule_key, 1);
    assert_eq!(items.len(), 3, "commands only: {items:?}");

    // A claim is lease bookkeeping: nothing to queue. Publishing shows on the record.
    let now = Utc::now();
    store
        .claim_command(by_rule.id, "r1", now, now + Duration::seconds(60))
        .await
        .expect("claim")
        .expect("claimed");
    assert!(
        drain(store, "feed").await.is_empty(),
        "a claim queues nothing"
    );
    assert!(store
        .command_published(by_rule.id, "r1")
        .await
        .expect("published"));
    let published = drain(store, "feed").await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert_change(&published[0], ENTITY_COMMAND, &rule_key, 2);
    assert_eq!(
        published[0].payload["state"],
        serde_json::to_value(store.get_command(by_rule.id).await.expect("get")).expect("json")
    );
    let devices = drain(store, "devices").await;
    assert!(
        devices.iter().all(|i| i.payload["entity"] == ENTITY_DEVICE),
        "{devices:?}"
    );
}

/// Every registration history row (single and batch registration, unregistering, a move)
/// reaches a sink taking history once: `msdyn_iotdeviceregistrationhistory`, its id,
/// version 1, the row as `history` reads it; a sink not taking history gets none.
pub async fn registration_history_rows_reach_subscribed_sinks_once(store: &dyn Store) {
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_HISTORY], Duration::zero());
    subscribe(&mut subs, "devices", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    registered(store, "hist-1", "mqtt").await;
    store
        .mark_unregistered(&did("hist-1"), None)
        .await
        .expect("unregister");
    let batch = [new_device("hist-2", "mqtt"), new_device("hist-3", "mqtt")];
    store.begin_registrations(&batch).await.expect("begin");
    let finished = store
        .finish_registrations(&[(did("hist-2"), Ok(None)), (did("hist-3"), Ok(None))])
        .await
        .expect("finish");
    assert!(finished.iter().all(Result::is_ok));
    registered(store, "hist-4", "mqtt").await;
    store
        .move_device(&did("hist-4"), "mqtt", "edge")
        .await
        .expect("move");

    let items = drain(store, "feed").await;
    let mut rows = Vec::new();
    for id in ["hist-1", "hist-2", "hist-3", "hist-4"] {
        rows.extend(store.history(&did(id)).await.expect("history"));
    }
    assert_eq!(rows.len(), 7, "{rows:?}");
    assert_eq!(items.len(), rows.len(), "one event per row: {items:?}");
    for row in &rows {
        let key = row.id.to_string();
        let events = of_record(&items, &format!("{ENTITY_HISTORY}:{key}"));
        assert_eq!(events.len(), 1, "{row:?} in {items:?}");
        assert_change(events[0], ENTITY_HISTORY, &key, 1);
        assert_eq!(
            events[0].payload["state"],
            serde_json::to_value(row).expect("json")
        );
    }
    let devices = drain(store, "devices").await;
    assert!(
        devices.iter().all(|i| i.payload["entity"] == ENTITY_DEVICE),
        "{devices:?}"
    );
}

/// A category's creation (by `upsert_category` or by a registration batch naming it) and
/// each change of its description queue one change event (`msdyn_iotdevicecategory`, its
/// id, versions 1..n, the record as listed); an upsert changing nothing queues nothing.
pub async fn category_changes_reach_subscribed_sinks(store: &dyn Store) {
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_CATEGORY], Duration::zero());
    subscribe(&mut subs, "devices", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    let created = store
        .upsert_category("pumps", Some("Pumps"))
        .await
        .expect("create");
    let same = store
        .upsert_category("pumps", Some("Pumps"))
        .await
        .expect("same again");
    assert_eq!(same, created, "nothing changed");
    let kept = store
        .upsert_category("pumps", None)
        .await
        .expect("no description");
    assert_eq!(kept, created, "a missing description keeps the stored one");
    let changed = store
        .upsert_category("pumps", Some("All pumps"))
        .await
        .expect("change");
    assert_eq!(changed.description.as_deref(), Some("All pumps"));
    let mut valve = new_device("catfeed-1", "mqtt");
    valve.category = Some("valves".into());
    let mut pump = new_device("catfeed-2", "mqtt");
    pump.category = Some("pumps".into());
    store
        .begin_registrations(&[valve, pump])
        .await
        .expect("begin");

    let items = drain(store, "feed").await;
    assert_eq!(items.len(), 3, "{items:?}");
    let key = created.id.to_string();
    assert_change(&items[0], ENTITY_CATEGORY, &key, 1);
    assert_eq!(
        items[0].payload["state"],
        serde_json::to_value(&created).expect("json")
    );
    assert_change(&items[1], ENTITY_CATEGORY, &key, 2);
    assert_eq!(
        items[1].payload["state"],
        serde_json::to_value(&changed).expect("json")
    );
    let listed = store.list_categories().await.expect("list");
    let valves = listed
        .iter()
        .find(|c| c.name == "valves")
        .expect("valves created by the batch");
    assert_change(&items[2], ENTITY_CATEGORY, &valves.id.to_string(), 1);
    assert_eq!(
        items[2].payload["state"],
        serde_json::to_value(valves).expect("json")
    );
    let devices = drain(store, "devices").await;
    assert!(
        devices.iter().all(|i| i.payload["entity"] == ENTITY_DEVICE),
        "{devices:?}"
    );
}

/// A new alert goes to a sink taking alerts as it always did (the alert, keyed by its id)
/// but names its record (`msdyn_iotalert:<id>`), and each later change of the alert
/// (status and last command, service work, closing as a child) follows it as a change
/// event, versions 2..n; a sink never subscribed still gets the new alerts only, and a
/// sink not taking alerts gets none of them.
pub async fn alert_updates_follow_the_new_alert_in_order_for_sinks_taking_alerts(
    store: &dyn Store,
) {
    registered(store, "alfeed-1", "mqtt").await;
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_ALERT], Duration::zero());
    subscribe(&mut subs, "devices", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    let sinks = ["feed", "devices", "legacy"];
    let parent = one(
        store,
        commit(
            "alfeed-1",
            vec![new_alert("t-al-1", "k", at(1))],
            60,
            &sinks,
        ),
    )
    .await;
    let child = one(
        store,
        commit(
            "alfeed-1",
            vec![new_alert("t-al-2", "k", at(2))],
            60,
            &sinks,
        ),
    )
    .await;
    assert_eq!(child.parent_alert, Some(parent.id), "debounced");
    let command = Uuid::now_v7();
    let sent = store
        .set_alert_status(parent.id, AlertStatus::CommandSent, Some((command, at(5))))
        .await
        .expect("status");
    let case = store
        .set_alert_service_work(parent.id, ServiceWork::Case(Uuid::now_v7()))
        .await
        .expect("case");
    assert_eq!(store.close_child_alerts(parent.id).await.expect("close"), 1);

    let items = drain(store, "feed").await;
    assert_eq!(items.len(), 5, "{items:?}");
    let key = parent.id.to_string();
    let mine = of_record(&items, &format!("{ENTITY_ALERT}:{key}"));
    assert_eq!(mine.len(), 3, "{items:?}");
    assert_eq!(mine[0].idempotency_key, key, "the new alert keeps its key");
    assert_eq!(
        mine[0].payload,
        serde_json::to_value(&parent).expect("json"),
        "and its payload"
    );
    assert_change(mine[1], ENTITY_ALERT, &key, 2);
    assert_eq!(
        mine[1].payload["state"],
        serde_json::to_value(&sent).expect("json")
    );
    assert_eq!(
        mine[1].payload["state"]["msdyn_lastcommandsent"],
        command.to_string()
    );
    assert_change(mine[2], ENTITY_ALERT, &key, 3);
    assert_eq!(
        mine[2].payload["state"],
        serde_json::to_value(&case).expect("json")
    );
    let child_key = child.id.to_string();
    let theirs = of_record(&items, &format!("{ENTITY_ALERT}:{child_key}"));
    assert_eq!(theirs.len(), 2, "{items:?}");
    assert_eq!(theirs[0].idempotency_key, child_key);
    assert_change(theirs[1], ENTITY_ALERT, &child_key, 2);
    assert_eq!(
        theirs[1].payload["state"],
        serde_json::to_value(store.get_alert(child.id).await.expect("get")).expect("json")
    );
    assert_eq!(theirs[1].payload["state"]["statecode"], 3, "closed");

    let legacy = drain(store, "legacy").await;
    assert_eq!(legacy.len(), 2, "new alerts only: {legacy:?}");
    assert!(legacy
        .iter()
        .all(|i| i.change_of.as_deref() == Some(&format!("{ENTITY_ALERT}:{}", i.idempotency_key))));
    let devices = drain(store, "devices").await;
    assert!(
        devices.iter().all(|i| i.payload["entity"] == ENTITY_DEVICE),
        "{devices:?}"
    );
}

/// A device's change event names the id of its category (`refs.msdyn_category`) once a
/// category of that name exists, and has no `refs` while it does not or when the device
/// has no category.
pub async fn device_change_events_name_their_category_id(store: &dyn Store) {
    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "feed", &[ENTITY_DEVICE], Duration::zero());
    store.set_subscriptions(subs);
    registered(store, "refs-1", "mqtt").await;
    let mut bare = new_device("refs-2", "mqtt");
    bare.category = None;
    store.begin_registration(&bare).await.expect("begin");
    let before = drain(store, "feed").await;
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(
        before.iter().all(|i| i.payload.get("refs").is_none()),
        "no category stored yet, or none named: {before:?}"
    );

    let pumps = store
        .upsert_category("pumps", None)
        .await
        .expect("category");
    assert!(store
        .set_connection_state(&did("refs-1"), true, at(10))
        .await
        .expect("connect"));
    assert!(store
        .set_connection_state(&did("refs-2"), true, at(10))
        .await
        .expect("connect"));
    let after = drain(store, "feed").await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0].payload["key"], "refs-1");
    assert_eq!(
        after[0].payload["refs"],
        serde_json::json!({"msdyn_category": pumps.id.to_string()})
    );
    assert_eq!(after[0].payload["state"]["msdyn_category"], "pumps");
    assert_eq!(after[1].payload["key"], "refs-2");
    assert!(after[1].payload.get("refs").is_none(), "{after:?}");
}

/// Without a sink taking them, commands, history, categories and alert updates queue
/// nothing (a sink never subscribed gets the new alerts only), and a sink gets the
/// entities it takes and no other.
pub async fn a_sink_gets_only_the_entities_it_takes(store: &dyn Store) {
    async fn churn(store: &dyn Store, n: u32) {
        let id = format!("only-{n}");
        let device = registered(store, &id, "mqtt").await;
        store
            .upsert_category(&format!("cat-{n}"), Some("c"))
            .await
            .expect("category");
        let command = store
            .insert_command(&NewCommand {
                request_id: None,
                name: "reboot".into(),
                message: "{}".into(),
                device_id: device.device_id.clone(),
                parent_alert: None,
                correlation_id: format!("corr-only-{n}"),
            })
            .await
            .expect("insert");
        store
            .set_command_status(command.id, CommandStatus::Sent, None)
            .await
            .expect("sent");
        let alert = one(
            store,
            commit(
                &id,
                vec![new_alert(&format!("t-only-{n}"), "k", at(1))],
                60,
                &["legacy", "devices", "commands"],
            ),
        )
        .await;
        store
            .set_alert_status(alert.id, AlertStatus::Inactive, None)
            .await
            .expect("status");
        store
            .mark_unregistered(&device.device_id, None)
            .await
            .expect("unregister");
    }
    churn(store, 1).await;
    let waiting = depth(store).await;
    let total: u64 = waiting.iter().map(|(_, d)| *d).sum();
    let legacy = drain(store, "legacy").await;
    assert_eq!(legacy.len(), 1, "the new alert only: {legacy:?}");
    assert_eq!(
        total, 3,
        "the new alert for each sink, nothing else: {waiting:?}"
    );
    drain(store, "devices").await;
    drain(store, "commands").await;

    let mut subs = Subscriptions::default();
    subscribe(&mut subs, "devices", &[ENTITY_DEVICE], Duration::zero());
    subscribe(&mut subs, "commands", &[ENTITY_COMMAND], Duration::zero());
    store.set_subscriptions(subs);
    churn(store, 2).await;
    let devices = drain(store, "devices").await;
    assert!(!devices.is_empty());
    assert!(
        devices.iter().all(|i| i.payload["entity"] == ENTITY_DEVICE),
        "{devices:?}"
    );
    let commands = drain(store, "commands").await;
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert!(
        commands
            .iter()
            .all(|i| i.payload["entity"] == ENTITY_COMMAND),
        "{commands:?}"
    );
    let legacy = drain(store, "legacy").await;
    assert_eq!(legacy.len(), 1, "the new alert only: {legacy:?}");
}

#[cfg(test)]
mod tests {
    /// A scenario left out of `conformance_tests!` would silently never run.
    #[test]
    fn every_scenario_is_in_the_macro() {
        let src = include_str!("conformance.rs");
        let macro_body = &src[src
            .find("macro_rules! conformance_tests")
            .expect("the macro")..];
        let macro_body = &macro_body[..macro_body
            .find("(@scenarios $($name")
            .expect("the @scenarios arm")];
        let listed: Vec<&str> = macro_body
            .lines()
            .map(|l| l.trim().trim_end_matches(','))
            .filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        let defined: Vec<&str> = src
            .lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .map(|l| &l[..l.find('(').expect("a parameter list")])
            .collect();
        assert!(!defined.is_empty());
        assert_eq!(
            listed, defined,
            "list every scenario in conformance_tests!, in file order"
        );
    }
}
