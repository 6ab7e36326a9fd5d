//! Column lists and the mapping of PostgreSQL rows to records.

use std::collections::BTreeMap;

use sqlx::postgres::PgRow;

use super::{get, get_device_id, option_value};
use crate::model::*;
use crate::store::{StoreError, StoreResult};

pub(super) const DEVICE_COLS: &str = "id, device_id, name, provider_instance, category, account, \
     connection_state, connection_state_updated_at, last_activity_time, reported_properties, \
     settings, tags, registration_status, registration_message, is_simulated, created_at, updated_at";
pub(super) const HISTORY_COLS: &str =
    "id, device, device_id, name, action, provider_instance, created_at";
pub(super) const CATEGORY_COLS: &str = "id, name, description, created_at";
pub(super) const ALERT_COLS: &str =
    "id, description, alert_data, alert_time, alert_token, alert_type, \
     priority_score, device, device_id, parent_alert, parent_alert_token, last_command_sent, \
     last_command_sent_time, statecode, statuscode, rule, provider_instance, created_at, \
     case_id, workorder_id";
pub(super) const COMMAND_COLS: &str =
    "id, name, message, status, status_reason, device, device_id, \
     parent_alert, correlation_id, provider_instance, created_at, updated_at, published_at, \
     request_id";
pub(super) const OUTBOX_COLS: &str =
    "id, sink, payload, idempotency_key, attempts, last_error, created_at, lease_token, change_of";
pub(super) const DEAD_LETTER_COLS: &str =
    "id, source, reason, device_id, message_id, payload, created_at";

pub(super) fn device_from_row(row: &PgRow) -> StoreResult<Device> {
    let tags_raw: serde_json::Value = get(row, "tags")?;
    let tags: BTreeMap<String, String> = serde_json::from_value(tags_raw)
        .map_err(|e| StoreError::Database(format!("column tags holds invalid JSON: {e}")))?;
    Ok(Device {
        id: get(row, "id")?,
        name: get(row, "name")?,
        device_id: get_device_id(row, "device_id")?,
        provider_instance: get(row, "provider_instance")?,
        category: get(row, "category")?,
        account: get(row, "account")?,
        connection_state: get(row, "connection_state")?,
        connection_state_updated_at: get(row, "connection_state_updated_at")?,
        last_activity_time: get(row, "last_activity_time")?,
        reported_properties: get(row, "reported_properties")?,
        settings: get(row, "settings")?,
        tags,
        registration_status: option_value(
            row,
            "registration_status",
            RegistrationStatus::from_value,
        )?,
        registration_message: get(row, "registration_message")?,
        is_simulated: option_value(row, "is_simulated", IsSimulated::from_value)?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
    })
}

pub(super) fn history_from_row(row: &PgRow) -> StoreResult<RegistrationHistory> {
    Ok(RegistrationHistory {
        id: get(row, "id")?,
        device: get(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        name: get(row, "name")?,
        action: option_value(row, "action", RegistrationAction::from_value)?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get(row, "created_at")?,
    })
}

pub(super) fn category_from_row(row: &PgRow) -> StoreResult<Category> {
    Ok(Category {
        id: get(row, "id")?,
        name: get(row, "name")?,
        description: get(row, "description")?,
        created_at: get(row, "created_at")?,
    })
}

pub(super) fn alert_from_row(row: &PgRow) -> StoreResult<Alert> {
    let priority: Option<i32> = get(row, "priority_score")?;
    let priority_score = priority
        .map(|p| {
            u8::try_from(p).map_err(|_| {
                StoreError::Database(format!("column priority_score holds {p}, not 0..=100"))
            })
        })
        .transpose()?;
    Ok(Alert {
        id: get(row, "id")?,
        description: get(row, "description")?,
        alert_data: get(row, "alert_data")?,
        alert_time: get(row, "alert_time")?,
        alert_token: get(row, "alert_token")?,
        alert_type: option_value(row, "alert_type", AlertType::from_value)?,
        priority_score,
        device: get(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        parent_alert: get(row, "parent_alert")?,
        parent_alert_token: get(row, "parent_alert_token")?,
        last_command_sent: get(row, "last_command_sent")?,
        last_command_sent_time: get(row, "last_command_sent_time")?,
        case: get(row, "case_id")?,
        work_order: get(row, "workorder_id")?,
        statecode: get(row, "statecode")?,
        statuscode: get(row, "statuscode")?,
        rule: get(row, "rule")?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get(row, "created_at")?,
    })
}

pub(super) fn command_from_row(row: &PgRow) -> StoreResult<Command> {
    Ok(Command {
        id: get(row, "id")?,
        name: get(row, "name")?,
        message: get(row, "message")?,
        status: option_value(row, "status", CommandStatus::from_value)?,
        status_reason: get(row, "status_reason")?,
        device: get(row, "device")?,
        device_id: get_device_id(row, "device_id")?,
        parent_alert: get(row, "parent_alert")?,
        request_id: get(row, "request_id")?,
        correlation_id: get(row, "correlation_id")?,
        provider_instance: get(row, "provider_instance")?,
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
        published_at: get(row, "published_at")?,
    })
}

pub(super) fn outbox_from_row(row: &PgRow) -> StoreResult<OutboxItem> {
    let attempts: i32 = get(row, "attempts")?;
    Ok(OutboxItem {
        id: get(row, "id")?,
        sink: get(row, "sink")?,
        payload: get(row, "payload")?,
        idempotency_key: get(row, "idempotency_key")?,
        attempts: u32::try_from(attempts).map_err(|_| {
            StoreError::Database(format!("column attempts holds {attempts}, not a count"))
        })?,
        last_error: get(row, "last_error")?,
        created_at: get(row, "created_at")?,
        lease_token: get(row, "lease_token")?,
        change_of: get(row, "change_of")?,
    })
}

pub(super) fn dead_letter_from_row(row: &PgRow) -> StoreResult<DeadLetter> {
    Ok(DeadLetter {
        id: get(row, "id")?,
        source: get(row, "source")?,
        reason: get(row, "reason")?,
        device_id: get(row, "device_id")?,
        message_id: get(row, "message_id")?,
        payload: get(row, "payload")?,
        created_at: get(row, "created_at")?,
    })
}
