//! The Pub/Sub clients of one instance (the official `google-cloud-pubsub` crate) and the
//! classification of their errors into [`ProviderError`].
//!
//! Where they point: `emulator_host`, else `PUBSUB_EMULATOR_HOST`, else the real service
//! (`endpoint` or the global one). The crate does not read `PUBSUB_EMULATOR_HOST` itself,
//! so every builder gets the endpoint and, for an emulator, anonymous credentials. Admin
//! calls (topics, subscriptions) go over the crate's REST admin clients, publishing and
//! streaming pull over its gRPC clients.

use std::time::Duration;

use google_cloud_auth::credentials::{anonymous, service_account, Credentials};
use google_cloud_gax::error::rpc::Code;
use google_cloud_gax::retry_policy::RetryPolicyExt;
use google_cloud_pubsub::client::{Publisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use google_cloud_pubsub::retry_policy::RetryableErrors;
use iotgw_config::GcpPubSubConfig;

use crate::ProviderError;

/// How long the publisher waits to batch commands (Pub/Sub's default is 10 ms; commands
/// are few and latency matters more).
const COMMAND_BATCH_DELAY: Duration = Duration::from_millis(5);

/// Where the clients go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An emulator at this `http://` URL, without credentials.
    Emulator(String),
    /// The real service, at this endpoint (`None`: the crate's global default).
    Service(Option<String>),
}

impl Target {
    /// Resolves the target of `config`; `env_emulator` is `PUBSUB_EMULATOR_HOST`.
    pub fn resolve(config: &GcpPubSubConfig, env_emulator: Option<String>) -> Self {
        match config
            .emulator_host
            .clone()
            .or(env_emulator.filter(|h| !h.trim().is_empty()))
        {
            Some(host) => {
                let host = host.trim().trim_end_matches('/');
                if host.starts_with("http://") || host.starts_with("https://") {
                    Self::Emulator(host.to_owned())
                } else {
                    Self::Emulator(format!("http://{host}"))
                }
            }
            None => Self::Service(config.endpoint.clone()),
        }
    }

    /// For messages: `the Pub/Sub emulator at http://...` or `Pub/Sub at https://...`.
    pub fn describe(&self) -> String {
        match self {
            Self::Emulator(url) => format!("the Pub/Sub emulator at {url}"),
            Self::Service(Some(url)) => format!("Pub/Sub at {url}"),
            Self::Service(None) => "Pub/Sub at https://pubsub.googleapis.com".into(),
        }
    }
}

/// The clients of one instance.
#[derive(Clone, Debug)]
pub struct Clients {
    /// Topic administration (REST).
    pub topics: TopicAdmin,
    /// Subscription administration (REST).
    pub subscriptions: SubscriptionAdmin,
    /// Publisher of the commands topic (gRPC, batching, ordering keys).
    pub commands: Publisher,
    /// Where they point.
    pub target: Target,
    endpoint: Option<String>,
    credentials: Option<Credentials>,
}

impl Clients {
    /// A new streaming-pull client (gRPC), one per `run`: its connection closes when the
    /// run ends, which tells Pub/Sub that this consumer is gone (the emulator keeps the
    /// messages of a stream closed on a connection that stays open).
    pub async fn subscriber(&self, instance: &str) -> Result<Subscriber, ProviderError> {
        let mut b = Subscriber::builder();
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(c) = &self.credentials {
            b = b.with_credentials(c.clone());
        }
        b.build().await.map_err(|e| ProviderError::Transient {
            instance: instance.to_owned(),
            message: format!(
                "building the streaming-pull client for {}: {e}",
                self.target.describe()
            ),
        })
    }
}

/// Installs ring as rustls' process-wide crypto provider unless one is installed already.
/// The crate is built without its default aws-lc-rs provider so the process keeps a single
/// TLS stack; the real service's TLS (REST and gRPC) and service-account signing need one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: one provider is in place either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The credentials for `target`: none on an emulator, the key file when configured,
/// otherwise `None` so the crate uses Application Default Credentials.
fn credentials(
    instance: &str,
    config: &GcpPubSubConfig,
    target: &Target,
) -> Result<Option<Credentials>, ProviderError> {
    if let Target::Emulator(_) = target {
        return Ok(Some(anonymous::Builder::new().build()));
    }
    let Some(path) = &config.credentials_file else {
        return Ok(None);
    };
    let invalid = |message: String| ProviderError::InvalidInput {
        instance: instance.to_owned(),
        field: "credentials_file".into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(format!(
            "cannot read {path}: {e}: give the path of a service-account key file, or remove the key to use Application Default Credentials"
        ))
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("{path} is not JSON: {e}")))?;
    service_account::Builder::new(json)
        .build()
        .map(Some)
        .map_err(|e| {
            invalid(format!(
                "{path} is not a usable service-account key: {e}: download a JSON key of the service account (IAM > Service accounts > Keys)"
            ))
        })
}

/// Builds every client (no network traffic: connections open on first use).
pub async fn build(
    instance: &str,
    config: &GcpPubSubConfig,
    commands_topic: &str,
) -> Result<Clients, ProviderError> {
    install_crypto_provider();
    let target = Target::resolve(config, std::env::var("PUBSUB_EMULATOR_HOST").ok());
    let creds = credentials(instance, config, &target)?;
    let endpoint = match &target {
        Target::Emulator(url) => Some(url.clone()),
        Target::Service(e) => e.clone(),
    };
    let timeout = Duration::from_secs(config.request_timeout_secs);
    let failed = |what: &str, e: google_cloud_gax::client_builder::Error| {
        let (field, fix) = match (&target, e.is_transport()) {
            (Target::Emulator(_), true) => (
                "emulator_host",
                "check emulator_host / PUBSUB_EMULATOR_HOST",
            ),
            (Target::Service(_), true) => ("endpoint", "check endpoint"),
            _ => (
                "credentials_file",
                "check credentials_file or the Application Default Credentials",
            ),
        };
        ProviderError::InvalidInput {
            instance: instance.to_owned(),
            field: field.into(),
            message: format!(
                "building the {what} client for {} failed: {e}: {fix}",
                target.describe()
            ),
        }
    };

    // The builders share no trait, only method names: configured one by one.
    let mut topics =
        TopicAdmin::builder().with_retry_policy(RetryableErrors.with_time_limit(timeout));
    let mut subscriptions =
        SubscriptionAdmin::builder().with_retry_policy(RetryableErrors.with_time_limit(timeout));
    let mut commands = Publisher::builder(commands_topic)
        .with_retry_policy(RetryableErrors.with_time_limit(timeout))
        .set_delay_threshold(COMMAND_BATCH_DELAY);
    if let Some(e) = &endpoint {
        topics = topics.with_endpoint(e);
        subscriptions = subscriptions.with_endpoint(e);
        commands = commands.with_endpoint(e);
    }
    if let Some(c) = &creds {
        topics = topics.with_credentials(c.clone());
        subscriptions = subscriptions.with_credentials(c.clone());
        commands = commands.with_credentials(c.clone());
    }
    Ok(Clients {
        topics: topics.build().await.map_err(|e| failed("topic admin", e))?,
        subscriptions: subscriptions
            .build()
            .await
            .map_err(|e| failed("subscription admin", e))?,
        commands: commands.build().await.map_err(|e| failed("publisher", e))?,
        target,
        endpoint,
        credentials: creds,
    })
}

/// What failed, for [`classify`]: the config key it concerns and a description of the call.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// The config key the resource comes from (`telemetry_subscription`, ...).
    pub field: &'a str,
    /// What was attempted, e.g. `creating subscription projects/p/subscriptions/s`.
    pub what: &'a str,
}

/// Classifies a Pub/Sub error so the gateway acts the same on every cloud.
pub fn classify(instance: &str, call: Call<'_>, e: &google_cloud_pubsub::Error) -> ProviderError {
    let instance = instance.to_owned();
    let what = call.what;
    let transient = |detail: String| ProviderError::Transient {
        instance: instance.clone(),
        message: format!("{what}: {detail}"),
    };
    if e.is_authentication() {
        return ProviderError::Unauthorized {
            instance,
            message: format!(
                "{what}: no usable Google credentials ({e}): set credentials_file or GOOGLE_APPLICATION_CREDENTIALS, or emulator_host for an emulator"
            ),
        };
    }
    let code = e.status().map(|s| s.code).or_else(|| {
        e.http_status_code().map(|c| match c {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            429 => Code::ResourceExhausted,
            501 => Code::Unimplemented,
            _ => Code::Unavailable,
        })
    });
    let detail = e
        .status()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| e.to_string());
    match code {
        Some(Code::NotFound) => ProviderError::NotFound {
            instance,
            what: format!(
                "{what}: {detail} (key {}): create it, or set create_if_missing = true",
                call.field
            ),
        },
        Some(Code::AlreadyExists) => ProviderError::Conflict {
            instance,
            message: format!("{what}: {detail}"),
        },
        Some(Code::PermissionDenied | Code::Unauthenticated) => ProviderError::Unauthorized {
            instance,
            message: format!(
                "{what}: {detail}: grant the gateway's service account roles/pubsub.editor (or publisher/subscriber on this resource)"
            ),
        },
        Some(Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange) => {
            ProviderError::InvalidInput {
                instance,
                field: call.field.to_owned(),
                message: format!("{what}: {detail}"),
            }
        }
        Some(Code::ResourceExhausted) => ProviderError::Throttled {
            instance,
            retry_after: Duration::from_secs(1),
            message: format!("{what}: {detail}"),
        },
        Some(Code::Unimplemented) => ProviderError::Unsupported {
            instance,
            what: format!("{what}: {detail}"),
        },
        // Unavailable, DeadlineExceeded, Aborted, Internal, Unknown, Cancelled, and errors
        // without a status (connection refused, timeouts, I/O): retrying may help.
        _ => transient(detail),
    }
}

/// Whether a stream error can only be fixed by an operator (config, IAM, a deleted
/// subscription), so `run` returns it instead of retrying.
pub fn is_fatal(e: &ProviderError) -> bool {
    matches!(
        e,
        ProviderError::NotFound { .. }
            | ProviderError::Unauthorized { .. }
            | ProviderError::InvalidInput { .. }
            | ProviderError::Unsupported { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use google_cloud_gax::error::rpc::Status;

    fn config() -> GcpPubSubConfig {
        GcpPubSubConfig {
            project_id: "p".into(),
            ..GcpPubSubConfig::default()
        }
    }

    #[test]
    fn the_emulator_host_setting_wins_over_the_environment_and_gets_a_scheme() {
        let c = GcpPubSubConfig {
            emulator_host: Some("localhost:8085".into()),
            ..config()
        };
        assert_eq!(
            Target::resolve(&c, Some("other:1".into())),
            Target::Emulator("http://localhost:8085".into())
        );
        assert_eq!(
            Target::resolve(&config(), Some("emu:8086".into())),
            Target::Emulator("http://emu:8086".into())
        );
        assert_eq!(
            Target::resolve(&config(), Some("http://emu:8086/".into())),
            Target::Emulator("http://emu:8086".into())
        );
    }

    #[test]
    fn without_an_emulator_the_real_service_is_used_with_the_configured_endpoint() {
        assert_eq!(Target::resolve(&config(), None), Target::Service(None));
        assert_eq!(
            Target::resolve(&config(), Some(" ".into())),
            Target::Service(None)
        );
        let c = GcpPubSubConfig {
            endpoint: Some("https://europe-west1-pubsub.googleapis.com".into()),
            ..config()
        };
        assert_eq!(
            Target::resolve(&c, None),
            Target::Service(Some("https://europe-west1-pubsub.googleapis.com".into()))
        );
    }

    fn service(code: Code, message: &str) -> google_cloud_pubsub::Error {
        google_cloud_pubsub::Error::service(Status::default().set_code(code).set_message(message))
    }

    #[test]
    fn service_errors_are_classified_with_the_key_and_the_fix() {
        let call = Call {
            field: "telemetry_subscription",
            what: "opening subscription projects/p/subscriptions/s",
        };
        let nf = classify(
            "gcp",
            call,
            &service(Code::NotFound, "Subscription does not exist"),
        );
        assert_eq!(nf.class(), "not_found");
        let text = nf.to_string();
        assert!(
            text.contains("telemetry_subscription") && text.contains("create_if_missing"),
            "{text}"
        );
        assert!(is_fatal(&nf));
        let denied = classify("gcp", call, &service(Code::PermissionDenied, "no"));
        assert_eq!(denied.class(), "unauthorized");
        assert!(is_fatal(&denied));
        let busy = classify("gcp", call, &service(Code::Unavailable, "try later"));
        assert!(busy.is_retryable() && !is_fatal(&busy));
        let slow = classify("gcp", call, &service(Code::ResourceExhausted, "quota"));
        assert_eq!(slow.class(), "throttled");
        let exists = classify("gcp", call, &service(Code::AlreadyExists, "exists"));
        assert_eq!(exists.class(), "conflict");
        let bad = classify("gcp", call, &service(Code::InvalidArgument, "bad filter"));
        assert!(
            matches!(bad, ProviderError::InvalidInput { ref field, .. } if field == "telemetry_subscription")
        );
    }

    #[test]
    fn errors_without_a_status_are_transient() {
        let e = google_cloud_pubsub::Error::io("connection refused");
        let got = classify(
            "gcp",
            Call {
                field: "commands_topic",
                what: "publishing",
            },
            &e,
        );
        assert!(got.is_retryable(), "{got:?}");
    }
}
