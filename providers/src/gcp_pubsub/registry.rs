//! The control plane of a Pub/Sub instance: Pub/Sub has no device registry (the
//! gateway's is the only one), so this is topic and subscription administration: the
//! start-up check (or creation, with `create_if_missing`) of every resource the instance
//! uses, and `register`/`unregister`: the per-device command subscriptions (with
//! `command_subscriptions`).
//!
//! Every call is bounded by `request_timeout_secs`; every error names the resource and the
//! config key it comes from.

use std::future::Future;
use std::time::Duration;

use google_cloud_pubsub::model::{DeadLetterPolicy, RetryPolicy, Subscription, Topic};
use iotgw_ids::DeviceId;
use tracing::{info, warn};

use super::client::{classify, Call};
use super::names::{Stream, StreamKind};
use super::state::Shared;
use crate::{DeviceSpec, ProviderError, Registration};

/// Label put on the subscriptions the gateway creates (`managed-by=iotgw`), so an operator
/// can tell them apart.
const MANAGED_LABEL: (&str, &str) = ("managed-by", "iotgw");

impl Shared {
    /// Registers the device: Pub/Sub has no device registry, the gateway's is the only
    /// one. With `command_subscriptions`, creates the device's subscription on the
    /// commands topic, filtered on its id attribute with message ordering on (an identical
    /// existing one is accepted, so registering twice is fine).
    pub(super) async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        if !self.config.command_subscriptions {
            return Ok(Registration {
                message: Some(format!(
                    "registry only: Pub/Sub has no devices; the device's bridge publishes with attribute {}={} to {}",
                    self.names.device_id_attribute,
                    spec.device_id,
                    self.names.streams[0].topic
                )),
                credentials: None,
            });
        }
        let name = self.create_command_subscription(&spec.device_id).await?;
        Ok(Registration {
            message: Some(format!(
                "command subscription {name} (filter {}); the device's bridge publishes with attribute {}={} to {}",
                self.names.command_filter(&spec.device_id),
                self.names.device_id_attribute,
                spec.device_id,
                self.names.streams[0].topic
            )),
            credentials: None,
        })
    }

    /// With `command_subscriptions`, deletes the device's command subscription (one
    /// already gone counts as deleted); otherwise nothing to do.
    pub(super) async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        if self.config.command_subscriptions {
            self.delete_command_subscription(id).await?;
        }
        Ok(())
    }

    /// Runs one admin call within `request_timeout_secs`, classifying its error.
    async fn call<T>(
        &self,
        call: Call<'_>,
        fut: impl Future<Output = google_cloud_pubsub::Result<T>>,
    ) -> Result<T, ProviderError> {
        let limit = Duration::from_secs(self.config.request_timeout_secs);
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(&self.instance, call, &e)),
            Err(_) => Err(self.transient(format!(
                "{}: no answer from {} within {limit:?} (request_timeout_secs)",
                call.what,
                self.clients.target.describe()
            ))),
        }
    }

    /// Checks (or creates, with `create_if_missing`) every topic and subscription of the
    /// instance. A missing resource without `create_if_missing` is a
    /// [`ProviderError::NotFound`] naming it and its key; a subscription on another topic,
    /// or one whose dead-letter policy differs from the config without `create_if_missing`
    /// to fix it, is a [`ProviderError::Conflict`].
    pub(super) async fn ensure_resources(&self) -> Result<(), ProviderError> {
        let names = &self.names;
        self.ensure_topic(&names.commands_topic, "commands_topic")
            .await?;
        if let Some(dl) = &names.dead_letter_topic {
            self.ensure_topic(dl, "dead_letter_topic").await?;
        }
        for stream in &names.streams {
            self.ensure_topic(&stream.topic, stream.topic_key).await?;
            self.ensure_subscription(stream).await?;
        }
        info!(instance = %self.instance, target = %self.clients.target.describe(), "gcp_pubsub: topics and subscriptions in place");
        Ok(())
    }

    async fn ensure_topic(&self, topic: &str, field: &str) -> Result<(), ProviderError> {
        let what = format!("checking topic {topic}");
        let got = self
            .call(
                Call { field, what: &what },
                self.clients.topics.get_topic().set_topic(topic).send(),
            )
            .await;
        match got {
            Ok(_) => Ok(()),
            Err(ProviderError::NotFound { .. }) if self.config.create_if_missing => {
                self.create_topic(topic, field).await
            }
            // Publisher/subscriber-only accounts may not read topic metadata: the topic is
            // then checked by the first publish or pull instead.
            Err(ProviderError::Unauthorized { message, .. }) if !self.config.create_if_missing => {
                warn!(instance = %self.instance, %topic, "gcp_pubsub: cannot check the topic ({message}); continuing");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn create_topic(&self, topic: &str, field: &str) -> Result<(), ProviderError> {
        let what = format!("creating topic {topic}");
        let created = self
            .call(
                Call { field, what: &what },
                self.clients
                    .topics
                    .create_topic()
                    .with_request(Topic::new().set_name(topic))
                    .send(),
            )
            .await;
        match created {
            Ok(_) => {
                info!(instance = %self.instance, %topic, "gcp_pubsub: topic created");
                Ok(())
            }
            // Another replica created it in the meantime.
            Err(ProviderError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The dead-letter policy the config asks of `stream`.
    fn dead_letter_policy(&self, stream: &Stream) -> Option<DeadLetterPolicy> {
        let topic = self.names.dead_letter_topic.as_ref()?;
        (stream.kind == StreamKind::Telemetry).then(|| {
            DeadLetterPolicy::new()
                .set_dead_letter_topic(topic.clone())
                .set_max_delivery_attempts(
                    i32::try_from(self.config.max_delivery_attempts).unwrap_or(i32::MAX),
                )
        })
    }

    /// The retry policy of the subscriptions the gateway creates (redelivery backoff).
    pub(super) fn retry_policy(&self) -> RetryPolicy {
        let secs = |s: u32| google_cloud_wkt::Duration::clamp(i64::from(s), 0);
        RetryPolicy::new()
            .set_minimum_backoff(secs(self.config.retry_min_backoff_secs))
            .set_maximum_backoff(secs(self.config.retry_max_backoff_secs))
    }

    async fn ensure_subscription(&self, stream: &Stream) -> Result<(), ProviderError> {
        let field = stream.subscription_key;
        let name = &stream.subscription;
        let what = format!("checking subscription {name}");
        let got = self
            .call(
                Call { field, what: &what },
                self.clients
                    .subscriptions
                    .get_subscription()
                    .set_subscription(name)
                    .send(),
            )
            .await;
        let existing = match got {
            Ok(s) => s,
            Err(ProviderError::NotFound { .. }) if self.config.create_if_missing => {
                let sub = Subscription::new()
                    .set_name(name.clone())
                    .set_topic(stream.topic.clone())
                    .set_ack_deadline_seconds(self.ack_deadline())
                    .set_labels([MANAGED_LABEL])
                    .set_retry_policy(self.retry_policy())
                    .set_or_clear_dead_letter_policy(self.dead_letter_policy(stream));
                return self.create_subscription(sub, field).await;
            }
            Err(e) => return Err(e),
        };
        if existing.topic != stream.topic {
            return Err(ProviderError::Conflict {
                instance: self.instance.to_string(),
                message: format!(
                    "subscription {name} ({field}) reads {}, not {} ({}): point {field} at a subscription of that topic",
                    existing.topic, stream.topic, stream.topic_key
                ),
            });
        }
        // Only a configured policy is enforced: one set on the subscription out of band is
        // left alone when the config names no dead-letter topic.
        let wanted = self.dead_letter_policy(stream);
        if wanted.is_some() && !same_policy(existing.dead_letter_policy.as_ref(), wanted.as_ref()) {
            if !self.config.create_if_missing {
                return Err(ProviderError::Conflict {
                    instance: self.instance.to_string(),
                    message: format!(
                        "subscription {name} has dead-letter policy {:?}, but dead_letter_topic / max_delivery_attempts ask for {:?}: update the subscription (gcloud pubsub subscriptions update), or set create_if_missing = true to let the gateway do it",
                        existing.dead_letter_policy, wanted
                    ),
                });
            }
            let what = format!("setting the dead-letter policy of subscription {name}");
            self.call(
                Call {
                    field: "dead_letter_topic",
                    what: &what,
                },
                self.clients
                    .subscriptions
                    .update_subscription()
                    .set_subscription(
                        existing
                            .clone()
                            .set_or_clear_dead_letter_policy(wanted.clone()),
                    )
                    .set_update_mask(
                        google_cloud_wkt::FieldMask::default().set_paths(["dead_letter_policy"]),
                    )
                    .send(),
            )
            .await?;
            info!(instance = %self.instance, subscription = %name, policy = ?wanted, "gcp_pubsub: dead-letter policy updated");
        }
        Ok(())
    }

    async fn create_subscription(
        &self,
        sub: Subscription,
        field: &str,
    ) -> Result<(), ProviderError> {
        let name = sub.name.clone();
        let what = format!("creating subscription {name} on {}", sub.topic);
        let created = self
            .call(
                Call { field, what: &what },
                self.clients
                    .subscriptions
                    .create_subscription()
                    .with_request(sub)
                    .send(),
            )
            .await;
        match created {
            Ok(_) => {
                info!(instance = %self.instance, subscription = %name, "gcp_pubsub: subscription created");
                Ok(())
            }
            Err(ProviderError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(super) fn ack_deadline(&self) -> i32 {
        i32::try_from(self.config.ack_deadline_secs).unwrap_or(600)
    }

    /// Creates the device's command subscription (filtered on its id, ordered), or accepts
    /// an identical existing one. Returns its name.
    pub(super) async fn create_command_subscription(
        &self,
        device: &DeviceId,
    ) -> Result<String, ProviderError> {
        let name = self.names.command_subscription(device);
        let filter = self.names.command_filter(device);
        let sub = Subscription::new()
            .set_name(name.clone())
            .set_topic(self.names.commands_topic.clone())
            .set_filter(filter.clone())
            .set_enable_message_ordering(true)
            .set_ack_deadline_seconds(self.ack_deadline())
            .set_retry_policy(self.retry_policy())
            .set_labels([MANAGED_LABEL]);
        let what = format!("creating command subscription {name} of device {device}");
        let create = || {
            self.call(
                Call {
                    field: "command_subscription_prefix",
                    what: &what,
                },
                self.clients
                    .subscriptions
                    .create_subscription()
                    .with_request(sub.clone())
                    .send(),
            )
        };
        let created = match create().await {
            Err(ProviderError::NotFound { .. }) if self.config.create_if_missing => {
                // The commands topic is missing (run has not checked it yet): create it.
                self.create_topic(&self.names.commands_topic, "commands_topic")
                    .await?;
                create().await
            }
            other => other,
        };
        match created {
            Ok(_) => Ok(name),
            Err(ProviderError::Conflict { .. }) => {
                // Registration is idempotent for an identical subscription.
                let what = format!("checking command subscription {name}");
                let existing = self
                    .call(
                        Call {
                            field: "command_subscription_prefix",
                            what: &what,
                        },
                        self.clients
                            .subscriptions
                            .get_subscription()
                            .set_subscription(&name)
                            .send(),
                    )
                    .await?;
                if existing.topic == self.names.commands_topic && existing.filter == filter {
                    Ok(name)
                } else {
                    Err(ProviderError::Conflict {
                        instance: self.instance.to_string(),
                        message: format!(
                            "subscription {name} exists with topic {} and filter {:?}, not {} and {filter:?}: delete it or change command_subscription_prefix",
                            existing.topic, existing.filter, self.names.commands_topic
                        ),
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the device's command subscription; one already gone counts as deleted.
    pub(super) async fn delete_command_subscription(
        &self,
        device: &DeviceId,
    ) -> Result<(), ProviderError> {
        let name = self.names.command_subscription(device);
        let what = format!("deleting command subscription {name} of device {device}");
        let deleted = self
            .call(
                Call {
                    field: "command_subscription_prefix",
                    what: &what,
                },
                self.clients
                    .subscriptions
                    .delete_subscription()
                    .set_subscription(&name)
                    .send(),
            )
            .await;
        match deleted {
            Ok(()) | Err(ProviderError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether two dead-letter policies send to the same topic after the same attempts.
fn same_policy(a: Option<&DeadLetterPolicy>, b: Option<&DeadLetterPolicy>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.dead_letter_topic == b.dead_letter_topic
                && a.max_delivery_attempts == b.max_delivery_attempts
        }
        _ => false,
    }
}
