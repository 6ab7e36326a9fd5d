//! Alert and change-feed sinks and the outbox workers that feed them.
//!
//! Items are written to the outbox in the same transaction as their alert or change (a
//! change event: `{"entity", "key", "version", "state"}`, for the sinks whose `entities`
//! take it); a worker per
//! sink leases due items, delivers them and removes them only after the sink accepted. A
//! sink that is down delays delivery (retries with backoff, forever); an item the sink can
//! never accept goes to the dead letters with the reason.

mod dataverse;
mod file;
mod outbox;
mod stdout;
mod webhook;

pub use dataverse::DataverseSink;
pub use file::FileSink;
pub use outbox::{spawn_workers, Leasing, OutboxWorkers};
pub use stdout::StdoutSink;
pub use webhook::{signature, WebhookSink, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use iotgw_config::SinkConfig;
use iotgw_registry::OutboxItem;

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (after at least the given delay, if the receiver announced one).
    #[error("temporary: {message}")]
    Retry {
        /// What failed.
        message: String,
        /// The receiver's `Retry-After`, if any.
        after: Option<Duration>,
    },
    /// The receiver will never accept it.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A place alerts and change events are delivered to.
#[async_trait]
pub trait Sink: Send + Sync {
    /// The configured name.
    fn name(&self) -> &str;
    /// Delivers one item; Ok only once the receiver has it.
    async fn deliver(&self, item: &OutboxItem) -> Result<(), DeliveryError>;
    /// The most items [`Sink::deliver_batch`] is given at once.
    fn batch_size(&self) -> usize {
        1
    }
    /// Delivers items in order (never two of one record), one result per item in the same
    /// order; by default one [`Sink::deliver`] after the other.
    async fn deliver_batch(&self, items: &[OutboxItem]) -> Vec<Result<(), DeliveryError>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.deliver(item).await);
        }
        out
    }
    /// Retry backoff bounds (min, max).
    fn backoff(&self) -> (Duration, Duration) {
        (Duration::from_millis(200), Duration::from_secs(30))
    }
}

/// Builds a sink from its config.
pub fn build(name: &str, cfg: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match cfg {
        SinkConfig::Stdout(_) => Arc::new(StdoutSink::new(name)),
        SinkConfig::File(f) => Arc::new(FileSink::new(name, f.path.as_ref())),
        SinkConfig::Webhook(w) => Arc::new(WebhookSink::new(name, w)?),
        SinkConfig::Dataverse(d) => Arc::new(DataverseSink::new(name, d)?),
    })
}

/// The entity an item is about: a change event names it (`{"entity", "key", "version",
/// "state"}`); any other payload is a new alert (`msdyn_iotalert`), as queued before the
/// change feed.
pub(crate) fn entity_of(item: &OutboxItem) -> &str {
    change_entity(item).unwrap_or(iotgw_registry::ENTITY_ALERT)
}

/// The entity of a change event; `None` for an alert's payload.
pub(crate) fn change_entity(item: &OutboxItem) -> Option<&str> {
    let p = &item.payload;
    if p.get("state").is_some() && p.get("version").is_some_and(serde_json::Value::is_i64) {
        p.get("entity").and_then(serde_json::Value::as_str)
    } else {
        None
    }
}

/// The line a JSON-lines sink writes for an item: the payload with the idempotency key,
/// `type` naming its entity.
pub(crate) fn json_line(item: &OutboxItem) -> String {
    serde_json::json!({
        "type": entity_of(item),
        "idempotency_key": item.idempotency_key,
        "data": item.payload,
    })
    .to_string()
}
