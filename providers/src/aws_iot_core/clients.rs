//! The AWS SDK side: one shared SDK configuration (region, credentials, endpoint, timeouts,
//! retries, one HTTPS client on ring-based rustls) and the two clients built from it,
//! `iot` (control plane) and `iot-data` (data plane, on the account's data endpoint,
//! looked up once with DescribeEndpoint unless configured).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_iot::config::Credentials;
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider as TlsProvider};
use iotgw_config::AwsIotCoreConfig;
use tokio::sync::OnceCell;

use super::errors::{classify, Call};
use crate::ProviderError;

/// The endpoint type of the account's ATS-signed data endpoint.
pub const DATA_ENDPOINT_TYPE: &str = "iot:Data-ATS";

/// The SDK clients of one provider instance.
pub struct Clients {
    instance: String,
    sdk: SdkConfig,
    explicit_endpoint: bool,
    /// The control-plane client (things, certificates, policies).
    pub iot: aws_sdk_iot::Client,
    data_endpoint: OnceCell<String>,
    data: OnceCell<aws_sdk_iotdataplane::Client>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("instance", &self.instance)
            .field("region", &self.sdk.region())
            .field("endpoint_url", &self.sdk.endpoint_url())
            .finish_non_exhaustive()
    }
}

impl Clients {
    /// Loads the SDK configuration: the config file's region, profile, static credentials
    /// and endpoint first, then the AWS environment and profile chain. Connects nothing;
    /// fails only when no region can be found.
    pub async fn new(instance: &str, c: &AwsIotCoreConfig) -> Result<Self, ProviderError> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(TlsProvider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(Duration::from_millis(c.api_timeout_ms))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(c.max_attempts.max(1)));
        if let Some(profile) = &c.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(region) = &c.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let (Some(id), Some(secret)) = (&c.access_key_id, &c.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.expose().to_owned(),
                c.session_token.as_ref().map(|t| t.expose().to_owned()),
                None,
                "iotgw-config",
            ));
        }
        if let Some(url) = &c.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(ProviderError::InvalidInput {
                instance: instance.to_owned(),
                field: "region".into(),
                message:
                    "no AWS region: set region in the config, AWS_REGION, or the profile's region"
                        .into(),
            });
        }
        let data_endpoint = OnceCell::new();
        if let Some(host) = &c.data_endpoint {
            data_endpoint
                .set(host.clone())
                .expect("a fresh cell takes one value");
        }
        Ok(Self {
            instance: instance.to_owned(),
            iot: aws_sdk_iot::Client::new(&sdk),
            explicit_endpoint: c.endpoint_url.is_some(),
            sdk,
            data_endpoint,
            data: OnceCell::new(),
        })
    }

    /// Classifies an SDK error of `call`.
    pub fn error<E>(&self, call: &Call<'_>, err: &SdkError<E>) -> ProviderError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(&self.instance, call, err)
    }

    /// The account's data endpoint host: configured, or DescribeEndpoint(iot:Data-ATS)
    /// (asked once; a failure is asked again next time).
    pub async fn data_endpoint(&self) -> Result<&str, ProviderError> {
        self.data_endpoint
            .get_or_try_init(|| async {
                let out = self
                    .iot
                    .describe_endpoint()
                    .endpoint_type(DATA_ENDPOINT_TYPE)
                    .send()
                    .await
                    .map_err(|e| {
                        self.error(
                            &Call {
                                op: "DescribeEndpoint",
                                resource: DATA_ENDPOINT_TYPE,
                                field: "data_endpoint",
                            },
                            &e,
                        )
                    })?;
                out.endpoint_address()
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| ProviderError::Transient {
                        instance: self.instance.clone(),
                        message: "DescribeEndpoint returned no address: set data_endpoint".into(),
                    })
            })
            .await
            .map(String::as_str)
    }

    /// The data endpoint if already known (configured or looked up), without asking.
    pub fn known_data_endpoint(&self) -> Option<&str> {
        self.data_endpoint.get().map(String::as_str)
    }

    /// The data-plane client: on `endpoint_url` when set (emulators serve both APIs on
    /// one port), else on `https://<data endpoint>`.
    pub async fn data(&self) -> Result<&aws_sdk_iotdataplane::Client, ProviderError> {
        self.data
            .get_or_try_init(|| async {
                if self.explicit_endpoint {
                    return Ok(aws_sdk_iotdataplane::Client::new(&self.sdk));
                }
                let host = self.data_endpoint().await?;
                let conf = aws_sdk_iotdataplane::config::Builder::from(&self.sdk)
                    .endpoint_url(format!("https://{host}"))
                    .build();
                Ok(aws_sdk_iotdataplane::Client::from_conf(conf))
            })
            .await
    }
}
