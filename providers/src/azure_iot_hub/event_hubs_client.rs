//! The real reader of the hub's Event Hubs-compatible endpoint: [`AmqpEventSource`], an
//! [`EventSource`] on Microsoft's official `azure_messaging_eventhubs` client (feature
//! `azure_event_hubs`).
//!
//! One `ConsumerClient` per provider instance, opened with the endpoint's connection string
//! (`Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...`: the
//! client signs and renews its SAS tokens on `$cbs` itself) in the configured consumer
//! group. `partitions` asks `$management` for the partition ids; `open` attaches one
//! receiver per partition with a selector filter on the offset of the last checkpoint, and
//! a task of its own turns the received AMQP messages into [`HubEvent`]s (IoT Hub's
//! `iothub-*` message annotations become [`HubEvent::system`]).
//!
//! The client reconnects its AMQP connection by itself; a receiver that fails is reported
//! as closed and the consumer reopens it after its last checkpoint. A client that cannot be
//! opened (endpoint unreachable) is opened again on the next call.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_messaging_eventhubs::models::{AmqpSimpleValue, AmqpValue, MessageId, ReceivedEventData};
use azure_messaging_eventhubs::{
    ConsumerClient, OpenReceiverOptions, StartLocation, StartPosition,
};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use iotgw_config::azure_iot_hub::EventHubsConfig;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::event_hubs::{EventSource, HubEvent, PartitionReceiver, Position, IN_FLIGHT};

/// How often a receiver that has gone quiet asks the partition how far it is.
const STALL_CHECK: Duration = Duration::from_secs(5);
/// Quiet checks in a row, with events waiting beyond the last one received, after which
/// the receiver counts as stalled and is reopened after its last checkpoint.
const STALL_CHECKS: u32 = 2;
use crate::ProviderError;

/// Reads the Event Hubs-compatible endpoint with the official client.
pub struct AmqpEventSource {
    instance: String,
    config: EventHubsConfig,
    /// The client (one AMQP connection), shared with the receiver tasks: a receiver whose
    /// link fails forgets it, so the partition reopens on a new connection.
    client: Arc<Mutex<Option<Arc<ConsumerClient>>>>,
    /// Per partition, the task of the receiver opened last (it closes its link when done).
    receivers: std::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl AmqpEventSource {
    /// A source for instance `instance`; connects nothing until the first call.
    pub fn new(instance: &str, config: &EventHubsConfig) -> Self {
        // fe2o3-amqp 0.16 builds its TLS config from rustls' process-wide provider; with
        // both ring and aws-lc-rs compiled in, none is chosen by itself: use ring, the one
        // every other TLS client of iotgw uses.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        Self {
            instance: instance.to_owned(),
            config: config.clone(),
            client: Arc::default(),
            receivers: std::sync::Mutex::default(),
        }
    }

    fn error(&self, what: &str, e: &(dyn std::error::Error + 'static)) -> ProviderError {
        // The client wraps the cause (a `401` answered on `$cbs`, say) in errors whose text
        // does not show it: report and classify the whole chain.
        let mut message = format!("Event Hubs endpoint: {what}: {e}");
        let mut cause = e.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        let lower = message.to_ascii_lowercase();
        if lower.contains("unauthorized") || lower.contains("401") {
            ProviderError::Unauthorized {
                instance: self.instance.clone(),
                message: format!(
                    "{message}; check event_hubs.connection_string (the hub's Built-in endpoints page) and that its policy has the ServiceConnect permission"
                ),
            }
        } else {
            ProviderError::Transient {
                instance: self.instance.clone(),
                message,
            }
        }
    }

    async fn client(&self) -> Result<Arc<ConsumerClient>, ProviderError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut builder = ConsumerClient::builder()
            .with_consumer_group(self.config.consumer_group.clone())
            .with_application_id(format!("iotgw-{}", self.instance));
        if let Some(ep) = &self.config.custom_endpoint {
            builder = builder.with_custom_endpoint(ep.clone());
        }
        let client = builder
            .open_with_connection_string(self.config.connection_string.expose(), None)
            .await
            .map_err(|e| self.error("opening the connection", &e))?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        tracing::info!(provider = %self.instance, consumer_group = %self.config.consumer_group, "Event Hubs-compatible endpoint connected");
        Ok(client)
    }

    /// Forgets the client after a failure, so the next call opens a new one.
    async fn reset(&self) {
        if let Some(c) = self.client.lock().await.take() {
            if let Ok(c) = Arc::try_unwrap(c) {
                let _ = c.close().await;
            }
        }
    }
}

#[async_trait]
impl EventSource for AmqpEventSource {
    async fn partitions(&self) -> Result<Vec<String>, ProviderError> {
        let client = self.client().await?;
        match client.get_eventhub_properties().await {
            Ok(p) => Ok(p.partition_ids),
            Err(e) => {
                drop(client);
                self.reset().await;
                Err(self.error("reading the partition ids", &e))
            }
        }
    }

    async fn open(
        &self,
        partition: &str,
        from: Position,
    ) -> Result<Box<dyn PartitionReceiver>, ProviderError> {
        // The client keeps one receiver link per partition address and hands it out again
        // (with its first filter) to a new receiver on that partition: the previous one must
        // be closed first, or a reopening would not start after the last checkpoint.
        let previous = self
            .receivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(partition);
        if let Some(previous) = previous {
            let _ = tokio::time::timeout(Duration::from_secs(10), previous).await;
        }
        let client = self.client().await?;
        let location = match from {
            Position::Earliest => StartLocation::Earliest,
            // The client attaches again by itself after a reconnect, with the same filter:
            // `@latest` would then skip what came meanwhile. Pin it to the last event now.
            Position::Latest => match client.get_partition_properties(partition).await {
                Ok(p) if p.is_empty => StartLocation::Earliest,
                Ok(p) => StartLocation::SequenceNumber(p.last_enqueued_sequence_number),
                Err(e) => {
                    drop(client);
                    self.reset().await;
                    return Err(self.error(&format!("reading partition {partition}"), &e));
                }
            },
            Position::After(offset) => StartLocation::Offset(offset),
        };
        let options = OpenReceiverOptions {
            start_position: Some(StartPosition {
                location,
                inclusive: false,
            }),
            prefetch: Some(u32::try_from(IN_FLIGHT).unwrap_or(64)),
            ..OpenReceiverOptions::default()
        };
        let receiver = match client
            .open_receiver_on_partition(partition.to_owned(), Some(options))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                drop(client);
                self.reset().await;
                return Err(self.error(&format!("opening partition {partition}"), &e));
            }
        };
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (instance, p) = (self.instance.clone(), partition.to_owned());
        let slot = self.client.clone();
        let task = tokio::spawn(async move {
            // The client must outlive its receiver.
            let client = client;
            let mut broken = false;
            {
                let stream = receiver.stream_events();
                futures::pin_mut!(stream);
                // After reconnecting by itself the client attaches again with the first
                // filter, and the partition's events come again from there: skip those
                // already passed on.
                let mut last: Option<i64> = None;
                // The client does not always resume after its connection drops (seen
                // against the fake endpoint: no event and no error any more). A quiet
                // receiver therefore asks the partition how far it is; events waiting
                // beyond the last one received for STALL_CHECKS checks in a row mean
                // it is stuck, and it fails so that the consumer reopens it.
                let mut check = tokio::time::interval(STALL_CHECK);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                check.tick().await;
                let (mut received, mut quiet) = (false, 0_u32);
                loop {
                    let item = tokio::select! {
                        _ = &mut stopped => break,
                        item = stream.next() => match item {
                            Some(i) => i.map_err(|e| e.to_string()),
                            None => break,
                        },
                        _ = check.tick() => {
                            if std::mem::take(&mut received) {
                                quiet = 0;
                                continue;
                            }
                            let Some(seen) = last else { continue };
                            let waiting = tokio::time::timeout(
                                STALL_CHECK,
                                client.get_partition_properties(&p),
                            )
                            .await;
                            match waiting {
                                Ok(Ok(props)) if props.last_enqueued_sequence_number <= seen => {
                                    quiet = 0;
                                    continue;
                                }
                                _ => quiet += 1,
                            }
                            if quiet < STALL_CHECKS {
                                continue;
                            }
                            tracing::warn!(provider = %instance, partition = %p, last_received = seen, "Event Hubs receiver stalled (events are waiting, none arrives); reopening it after the last checkpoint");
                            Err(format!("the receiver stalled after sequence number {seen} while the partition holds later events"))
                        }
                    };
                    received = true;
                    if let Ok(e) = &item {
                        if let (Some(seq), Some(last)) = (e.sequence_number(), last) {
                            if seq <= last {
                                continue;
                            }
                        }
                        last = e.sequence_number().or(last);
                    }
                    let item =
                        item.map(|e| hub_event(&p, &e))
                            .map_err(|e| ProviderError::Transient {
                                instance: instance.clone(),
                                message: format!("Event Hubs partition {p}: {e}"),
                            });
                    let failed = item.is_err();
                    broken |= failed;
                    if tx.send(item).await.is_err() || failed {
                        break;
                    }
                }
            }
            // A link that failed can leave its session broken in the client's cache (seen
            // after another partition's link was closed: every later attach on it failed
            // with "Link name is not unique"): forget this client, if it is still the
            // current one, so the reopening gets a new connection. Receivers still reading
            // on it keep it until they end.
            if broken {
                let mut current = slot.lock().await;
                if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &client)) {
                    *current = None;
                }
            }
            // Detach the link and drop it from the client's cache.
            let _ = receiver.close().await;
        });
        self.receivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(partition.to_owned(), task);
        Ok(Box::new(AmqpPartition { rx, _stop: stop }))
    }
}

/// One partition's receiver: events come from the task that owns the AMQP link; dropping
/// it stops that task, which then closes the link.
struct AmqpPartition {
    rx: mpsc::Receiver<Result<HubEvent, ProviderError>>,
    _stop: oneshot::Sender<()>,
}

#[async_trait]
impl PartitionReceiver for AmqpPartition {
    async fn next(&mut self) -> Result<Option<HubEvent>, ProviderError> {
        self.rx.recv().await.transpose()
    }
}

/// Text of an annotation or property value, as IoT Hub's system properties are read.
fn value_text(v: &AmqpValue) -> String {
    match v {
        AmqpValue::String(s) => s.clone(),
        AmqpValue::Symbol(s) => s.0.clone(),
        AmqpValue::Boolean(b) => b.to_string(),
        AmqpValue::Int(i) => i.to_string(),
        AmqpValue::Long(i) => i.to_string(),
        AmqpValue::UInt(i) => i.to_string(),
        AmqpValue::ULong(i) => i.to_string(),
        AmqpValue::TimeStamp(t) => {
            t.0.map(|t| DateTime::<Utc>::from(t).to_rfc3339())
                .unwrap_or_default()
        }
        other => format!("{other:?}"),
    }
}

fn simple_text(v: &AmqpSimpleValue) -> String {
    match v {
        AmqpSimpleValue::String(s) => s.clone(),
        AmqpSimpleValue::Symbol(s) => s.0.clone(),
        AmqpSimpleValue::Boolean(b) => b.to_string(),
        AmqpSimpleValue::Int(i) => i.to_string(),
        AmqpSimpleValue::Long(i) => i.to_string(),
        AmqpSimpleValue::UInt(i) => i.to_string(),
        AmqpSimpleValue::ULong(i) => i.to_string(),
        AmqpSimpleValue::TimeStamp(t) => {
            t.0.map(|t| DateTime::<Utc>::from(t).to_rfc3339())
                .unwrap_or_default()
        }
        other => format!("{other:?}"),
    }
}

fn message_id_text(m: &MessageId) -> String {
    match m {
        MessageId::String(s) => s.clone(),
        MessageId::Uuid(u) => u.to_string(),
        MessageId::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        MessageId::Ulong(u) => u.to_string(),
    }
}

/// A received event as the consumer reads it.
fn hub_event(partition: &str, e: &ReceivedEventData) -> HubEvent {
    let data = e.event_data();
    HubEvent {
        partition: partition.to_owned(),
        offset: e.offset().clone().unwrap_or_default(),
        sequence_number: e.sequence_number().unwrap_or_default(),
        enqueued_time: e.enqueued_time().map(DateTime::<Utc>::from),
        message_id: data.message_id().map(message_id_text),
        system: e
            .system_properties()
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect(),
        application: data
            .properties()
            .map(|p| {
                p.iter()
                    .map(|(k, v)| (k.clone(), simple_text(v)))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default(),
        body: Bytes::copy_from_slice(data.body().unwrap_or_default()),
    }
}
