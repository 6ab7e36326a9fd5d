//! Registration in AWS IoT Core: thing (type from the category, attributes from the
//! tags), certificate and key, per-device policy, attachments, desired shadow state; and
//! their removal.
//!
//! - A registration that fails part-way removes, in reverse order, what it created
//!   (attachments, certificate, policy, shadow, thing) and says in the error what it
//!   removed, or what it could not remove. Thing types are shared and never removed.
//! - Registering again a device whose thing exists with the same type and attributes and
//!   already has a certificate creates nothing new: it repairs the policy and its
//!   attachment, applies the settings, and answers without credentials (the key was
//!   handed out once, at the first registration). The same thing with another type or
//!   other attributes is a conflict.
//! - The certificate's private key is returned in the [`Registration`] and nowhere
//!   else: never stored, never logged.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_iot::types::{AttributePayload, CertificateStatus};
use aws_sdk_iotdataplane::primitives::Blob;
use iotgw_config::AwsIotCoreConfig;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::clients::Clients;
use super::errors::{with_note, Call};
use super::policy::{self, arn_prefix, device_policy, same_document};
use super::state::Shared;
use super::topics::AwsTopics;
use crate::{DeviceSpec, ProviderError, Registration};

/// AWS IoT keeps at most this many versions of a policy.
const MAX_POLICY_VERSIONS: usize = 5;

/// How long deletes wait for AWS's eventually consistent detach to take effect.
const DETACH_SETTLE: Duration = Duration::from_secs(5);

/// What one registration created, for the rollback.
#[derive(Debug, Default)]
struct Created {
    thing: bool,
    /// Certificate ARN and id.
    certificate: Option<(String, String)>,
    policy: bool,
    policy_attached: bool,
    principal_attached: bool,
}

/// A thing as DescribeThing shows it.
struct Thing {
    arn: String,
    thing_type: Option<String>,
    attributes: HashMap<String, String>,
}

/// Registration and removal of devices; borrows the provider's clients and settings.
pub struct Registrar<'a> {
    /// Provider instance.
    pub instance: &'a str,
    /// SDK clients.
    pub clients: &'a Clients,
    /// Topic scheme (for the device policy and the credentials' topic list).
    pub topics: &'a AwsTopics,
    /// Settings.
    pub config: &'a AwsIotCoreConfig,
}

impl<'a> Registrar<'a> {
    /// The registrar of the instance whose state is `shared`.
    pub(super) fn of(shared: &'a Shared) -> Self {
        Self {
            instance: &shared.instance,
            clients: &shared.clients,
            topics: &shared.topics,
            config: &shared.config,
        }
    }
}

fn is_not_found(e: &ProviderError) -> bool {
    matches!(e, ProviderError::NotFound { .. })
}

fn is_conflict(e: &ProviderError) -> bool {
    matches!(e, ProviderError::Conflict { .. })
}

/// The certificate id of a certificate principal ARN (`...:cert/<id>`).
fn certificate_id(principal: &str) -> Option<&str> {
    principal
        .rsplit_once(":cert/")
        .map(|(_, id)| id)
        .filter(|id| !id.is_empty())
}

impl Registrar<'_> {
    fn invalid(&self, field: &str, message: String) -> ProviderError {
        ProviderError::InvalidInput {
            instance: self.instance.to_owned(),
            field: field.to_owned(),
            message,
        }
    }

    /// The name of the device's policy.
    pub fn policy_name(&self, thing: &str) -> String {
        format!("{}{thing}", self.config.policy_prefix)
    }

    /// Creates the device; see the module docs.
    pub async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        let thing = spec.device_id.as_str();
        let thing_type = match (&spec.category, self.config.thing_type_from_category) {
            (Some(c), true) if !policy::thing_type_ok(c) => {
                return Err(self.invalid(
                    "msdyn_category",
                    format!("category {c:?} is not a valid AWS IoT thing type name ([a-zA-Z0-9:_-], at most 128 characters): rename the category or set thing_type_from_category = false"),
                ))
            }
            (Some(c), true) => Some(c.clone()),
            _ => None,
        };
        let attributes = policy::attributes(&spec.tags, thing_type.is_some())
            .map_err(|m| self.invalid("msdyn_tags", m))?;
        let desired =
            match &spec.settings {
                None | Some(Value::Null) => None,
                Some(v @ Value::Object(_)) => Some(v.clone()),
                Some(_) => return Err(self.invalid(
                    "msdyn_devicesettings",
                    "must be a JSON object: it becomes the desired state of the device's shadow"
                        .into(),
                )),
            };
        if let Some(t) = &thing_type {
            self.ensure_thing_type(t).await?;
        }

        let mut created = Created::default();
        let thing_arn = match self.describe_thing(thing).await? {
            Some(existing) => {
                if existing.thing_type != thing_type || existing.attributes != attributes {
                    return Err(ProviderError::Conflict {
                        instance: self.instance.to_owned(),
                        message: format!(
                            "thing {thing} exists with thing type {:?} and attributes {:?}, this registration asks for {:?} and {:?}: unregister the device first, or register it with its current category and tags",
                            existing.thing_type, sorted(&existing.attributes), thing_type, sorted(&attributes)
                        ),
                    });
                }
                let certificates: Vec<String> = self
                    .thing_principals(thing)
                    .await?
                    .into_iter()
                    .filter(|p| certificate_id(p).is_some())
                    .collect();
                if !certificates.is_empty() {
                    return self
                        .refresh(thing, &existing.arn, &certificates, desired.as_ref())
                        .await;
                }
                existing.arn
            }
            None => {
                let arn = self
                    .create_thing(thing, thing_type.as_deref(), &attributes)
                    .await?;
                created.thing = true;
                arn
            }
        };
        match self
            .provision(thing, &thing_arn, desired.as_ref(), &mut created)
            .await
        {
            Ok(reg) => Ok(reg),
            Err(e) => {
                let note = self.rollback(thing, &created).await;
                warn!(instance = self.instance, device = thing, error = %e, %note, "aws_iot_core: registration failed");
                Err(with_note(e, &note))
            }
        }
    }

    /// Certificate, policy, attachments and settings of a new registration.
    async fn provision(
        &self,
        thing: &str,
        thing_arn: &str,
        desired: Option<&Value>,
        created: &mut Created,
    ) -> Result<Registration, ProviderError> {
        let res = format!("thing {thing}");
        let cert = self
            .clients
            .iot
            .create_keys_and_certificate()
            .set_as_active(true)
            .send()
            .await
            .map_err(|e| self.call_error("CreateKeysAndCertificate", &res, "msdyn_deviceid", &e))?;
        let (Some(cert_arn), Some(cert_id), Some(pem), Some(keys)) = (
            cert.certificate_arn(),
            cert.certificate_id(),
            cert.certificate_pem(),
            cert.key_pair(),
        ) else {
            return Err(ProviderError::Transient {
                instance: self.instance.to_owned(),
                message: format!("CreateKeysAndCertificate for {thing} answered without a certificate or key pair"),
            });
        };
        created.certificate = Some((cert_arn.to_owned(), cert_id.to_owned()));
        let policy_name = self.ensure_policy(thing, thing_arn, created).await?;
        self.attach_policy(&policy_name, cert_arn).await?;
        created.policy_attached = true;
        self.clients
            .iot
            .attach_thing_principal()
            .thing_name(thing)
            .principal(cert_arn)
            .send()
            .await
            .map_err(|e| self.call_error("AttachThingPrincipal", &res, "msdyn_deviceid", &e))?;
        created.principal_attached = true;
        if let Some(d) = desired {
            self.set_desired(thing, d).await?;
        }
        info!(instance = self.instance, device = thing, certificate = cert_id, policy = %policy_name, "aws_iot_core: device registered");
        let endpoint = match self.config.mqtt_host.as_deref() {
            Some(h) => Some(h.to_owned()),
            None => self.clients.data_endpoint().await.ok().map(str::to_owned),
        };
        Ok(Registration {
            message: Some(format!(
                "AWS IoT Core: thing {thing}, certificate {cert_id}, policy {policy_name}"
            )),
            credentials: Some(json!({
                "thing_name": thing,
                "thing_arn": thing_arn,
                "client_id": thing,
                "certificate_id": cert_id,
                "certificate_arn": cert_arn,
                "certificate_pem": pem,
                "private_key": keys.private_key(),
                "public_key": keys.public_key(),
                "endpoint": endpoint,
                "port": self.config.mqtt_port,
                "topics": {
                    "telemetry": self.topics.telemetry_topics(thing),
                    "commands": self.topics.command_topic(thing),
                    "replies": self.topics.reply_topic(thing),
                    "shadow": format!("$aws/things/{thing}/shadow"),
                },
            })),
        })
    }

    /// Re-registration of a complete device: repairs policy and attachments, applies the
    /// settings, creates no credentials.
    async fn refresh(
        &self,
        thing: &str,
        thing_arn: &str,
        certificates: &[String],
        desired: Option<&Value>,
    ) -> Result<Registration, ProviderError> {
        let mut created = Created::default();
        let result = async {
            let policy_name = self.ensure_policy(thing, thing_arn, &mut created).await?;
            for cert in certificates {
                self.attach_policy(&policy_name, cert).await?;
            }
            if let Some(d) = desired {
                self.set_desired(thing, d).await?;
            }
            Ok::<_, ProviderError>(())
        }
        .await;
        if let Err(e) = result {
            let note = self.rollback(thing, &created).await;
            return Err(with_note(e, &note));
        }
        let ids: Vec<&str> = certificates
            .iter()
            .filter_map(|c| certificate_id(c))
            .collect();
        debug!(
            instance = self.instance,
            device = thing,
            "aws_iot_core: already registered, refreshed"
        );
        Ok(Registration {
            message: Some(format!(
                "already registered in AWS IoT Core as thing {thing} with certificate {}: its key was handed out at the first registration (unregister and register again for a new one)",
                ids.join(", ")
            )),
            credentials: None,
        })
    }

    /// Removes what one registration created, newest first; says what it did.
    async fn rollback(&self, thing: &str, created: &Created) -> String {
        let mut done = Vec::new();
        let mut left = Vec::new();
        let mut step = |ok: Result<(), ProviderError>, what: String| match ok {
            Ok(()) => done.push(what),
            Err(e) => left.push(format!("{what} ({e})")),
        };
        if let Some((cert_arn, cert_id)) = &created.certificate {
            if created.principal_attached {
                step(
                    self.detach_thing_principal(thing, cert_arn).await,
                    format!("detached certificate {cert_id} from thing {thing}"),
                );
            }
            if created.policy_attached {
                step(
                    self.detach_policy(&self.policy_name(thing), cert_arn).await,
                    format!("detached policy {}", self.policy_name(thing)),
                );
            }
            step(
                self.delete_certificate(cert_id).await,
                format!("deleted certificate {cert_id}"),
            );
        }
        if created.policy {
            step(
                self.delete_policy(&self.policy_name(thing)).await,
                format!("deleted policy {}", self.policy_name(thing)),
            );
        }
        if created.thing {
            step(
                self.delete_shadow(thing).await,
                format!("deleted the shadow of {thing}"),
            );
            step(
                self.delete_thing(thing).await,
                format!("deleted thing {thing}"),
            );
        }
        if left.is_empty() {
            if done.is_empty() {
                "nothing had been created".into()
            } else {
                format!("rolled back: {}", done.join(", "))
            }
        } else {
            format!(
                "rollback incomplete, remove by hand: {}{}",
                left.join("; "),
                if done.is_empty() {
                    String::new()
                } else {
                    format!(" (done: {})", done.join(", "))
                }
            )
        }
    }

    /// Removes the device: every certificate of the thing is detached, and unless another
    /// thing uses it, stripped of its policies, deactivated and deleted; then the device
    /// policy, the shadow and the thing. [`ProviderError::NotFound`] when the thing does
    /// not exist (its policy is removed all the same).
    pub async fn unregister(&self, thing: &str) -> Result<(), ProviderError> {
        let policy_name = self.policy_name(thing);
        let principals = match self.thing_principals(thing).await {
            Err(e) if is_not_found(&e) => {
                ignore_not_found(self.delete_policy(&policy_name).await)?;
                return Err(e);
            }
            other => other?,
        };
        for principal in &principals {
            ignore_not_found(self.detach_thing_principal(thing, principal).await)?;
            let Some(cert_id) = certificate_id(principal) else {
                continue;
            };
            ignore_not_found(self.detach_policy(&policy_name, principal).await)?;
            if !self.principal_things(principal).await?.is_empty() {
                info!(
                    instance = self.instance,
                    device = thing,
                    certificate = cert_id,
                    "aws_iot_core: certificate kept, other things use it"
                );
                continue;
            }
            for other in self.attached_policies(principal).await? {
                ignore_not_found(self.detach_policy(&other, principal).await)?;
            }
            self.delete_certificate(cert_id).await?;
        }
        ignore_not_found(self.delete_policy(&policy_name).await)?;
        ignore_not_found(self.delete_shadow(thing).await)?;
        self.delete_thing(thing).await?;
        info!(
            instance = self.instance,
            device = thing,
            "aws_iot_core: device unregistered"
        );
        Ok(())
    }

    fn call_error<E>(
        &self,
        op: &'static str,
        resource: &str,
        field: &'static str,
        err: &aws_sdk_iot::error::SdkError<E>,
    ) -> ProviderError
    where
        E: aws_sdk_iot::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.clients.error(
            &Call {
                op,
                resource,
                field,
            },
            err,
        )
    }

    async fn ensure_thing_type(&self, name: &str) -> Result<(), ProviderError> {
        let res = format!("thing type {name}");
        let found = self
            .clients
            .iot
            .describe_thing_type()
            .thing_type_name(name)
            .send()
            .await
            .map_err(|e| self.call_error("DescribeThingType", &res, "msdyn_category", &e));
        match found {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        let made = self
            .clients
            .iot
            .create_thing_type()
            .thing_type_name(name)
            .send()
            .await
            .map_err(|e| self.call_error("CreateThingType", &res, "msdyn_category", &e));
        match made {
            Ok(_) => {
                info!(
                    instance = self.instance,
                    thing_type = name,
                    "aws_iot_core: thing type created"
                );
                Ok(())
            }
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn describe_thing(&self, thing: &str) -> Result<Option<Thing>, ProviderError> {
        let res = format!("thing {thing}");
        match self
            .clients
            .iot
            .describe_thing()
            .thing_name(thing)
            .send()
            .await
        {
            Ok(out) => Ok(Some(Thing {
                arn: out.thing_arn().unwrap_or_default().to_owned(),
                thing_type: out
                    .thing_type_name()
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned),
                attributes: out.attributes().cloned().unwrap_or_default(),
            })),
            Err(e) => {
                let e = self.call_error("DescribeThing", &res, "msdyn_deviceid", &e);
                if is_not_found(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn create_thing(
        &self,
        thing: &str,
        thing_type: Option<&str>,
        attributes: &HashMap<String, String>,
    ) -> Result<String, ProviderError> {
        let res = format!("thing {thing}");
        let out = self
            .clients
            .iot
            .create_thing()
            .thing_name(thing)
            .set_thing_type_name(thing_type.map(str::to_owned))
            .attribute_payload(
                AttributePayload::builder()
                    .set_attributes(Some(attributes.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.call_error("CreateThing", &res, "msdyn_deviceid", &e))?;
        Ok(out.thing_arn().unwrap_or_default().to_owned())
    }

    /// Creates the device policy, or brings an existing one up to date (a new default
    /// version when its document differs). Returns its name.
    async fn ensure_policy(
        &self,
        thing: &str,
        thing_arn: &str,
        created: &mut Created,
    ) -> Result<String, ProviderError> {
        let name = self.policy_name(thing);
        let res = format!("policy {name}");
        let document = device_policy(&arn_prefix(thing_arn), thing, self.topics).to_string();
        let made = self
            .clients
            .iot
            .create_policy()
            .policy_name(&name)
            .policy_document(&document)
            .send()
            .await
            .map_err(|e| self.call_error("CreatePolicy", &res, "policy_prefix", &e));
        match made {
            Ok(_) => {
                created.policy = true;
                return Ok(name);
            }
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e),
        }
        let current = self
            .clients
            .iot
            .get_policy()
            .policy_name(&name)
            .send()
            .await
            .map_err(|e| self.call_error("GetPolicy", &res, "policy_prefix", &e))?;
        if current
            .policy_document()
            .is_some_and(|d| same_document(d, &document))
        {
            return Ok(name);
        }
        let versions = self
            .clients
            .iot
            .list_policy_versions()
            .policy_name(&name)
            .send()
            .await
            .map_err(|e| self.call_error("ListPolicyVersions", &res, "policy_prefix", &e))?;
        let mut old: Vec<&str> = versions
            .policy_versions()
            .iter()
            .filter(|v| !v.is_default_version())
            .filter_map(|v| v.version_id())
            .collect();
        old.sort_by_key(|v| v.parse::<u64>().unwrap_or(u64::MAX));
        if versions.policy_versions().len() >= MAX_POLICY_VERSIONS {
            if let Some(oldest) = old.first() {
                self.clients
                    .iot
                    .delete_policy_version()
                    .policy_name(&name)
                    .policy_version_id(*oldest)
                    .send()
                    .await
                    .map_err(|e| {
                        self.call_error("DeletePolicyVersion", &res, "policy_prefix", &e)
                    })?;
            }
        }
        self.clients
            .iot
            .create_policy_version()
            .policy_name(&name)
            .policy_document(&document)
            .set_as_default(true)
            .send()
            .await
            .map_err(|e| self.call_error("CreatePolicyVersion", &res, "policy_prefix", &e))?;
        info!(instance = self.instance, policy = %name, "aws_iot_core: device policy updated to the configured topics");
        Ok(name)
    }

    async fn attach_policy(&self, policy: &str, target: &str) -> Result<(), ProviderError> {
        let res = format!("policy {policy} to {target}");
        self.clients
            .iot
            .attach_policy()
            .policy_name(policy)
            .target(target)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.call_error("AttachPolicy", &res, "policy_prefix", &e))
    }

    async fn detach_policy(&self, policy: &str, target: &str) -> Result<(), ProviderError> {
        let res = format!("policy {policy} from {target}");
        self.clients
            .iot
            .detach_policy()
            .policy_name(policy)
            .target(target)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.call_error("DetachPolicy", &res, "policy_prefix", &e))
    }

    async fn detach_thing_principal(
        &self,
        thing: &str,
        principal: &str,
    ) -> Result<(), ProviderError> {
        let res = format!("certificate {principal} from thing {thing}");
        self.clients
            .iot
            .detach_thing_principal()
            .thing_name(thing)
            .principal(principal)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.call_error("DetachThingPrincipal", &res, "msdyn_deviceid", &e))
    }

    async fn thing_principals(&self, thing: &str) -> Result<Vec<String>, ProviderError> {
        let res = format!("thing {thing}");
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .clients
                .iot
                .list_thing_principals()
                .thing_name(thing)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| self.call_error("ListThingPrincipals", &res, "msdyn_deviceid", &e))?;
            out.extend(page.principals().iter().cloned());
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn principal_things(&self, principal: &str) -> Result<Vec<String>, ProviderError> {
        let res = format!("certificate {principal}");
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .clients
                .iot
                .list_principal_things()
                .principal(principal)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| self.call_error("ListPrincipalThings", &res, "msdyn_deviceid", &e))?;
            out.extend(page.things().iter().cloned());
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    async fn attached_policies(&self, target: &str) -> Result<Vec<String>, ProviderError> {
        let res = format!("certificate {target}");
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .clients
                .iot
                .list_attached_policies()
                .target(target)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| self.call_error("ListAttachedPolicies", &res, "msdyn_deviceid", &e))?;
            out.extend(
                page.policies()
                    .iter()
                    .filter_map(|p| p.policy_name())
                    .map(str::to_owned),
            );
            marker = page
                .next_marker()
                .filter(|m| !m.is_empty())
                .map(str::to_owned);
            if marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// Deactivates and deletes a certificate (waiting for detaches to settle).
    async fn delete_certificate(&self, cert_id: &str) -> Result<(), ProviderError> {
        let res = format!("certificate {cert_id}");
        self.clients
            .iot
            .update_certificate()
            .certificate_id(cert_id)
            .new_status(CertificateStatus::Inactive)
            .send()
            .await
            .map_err(|e| self.call_error("UpdateCertificate", &res, "msdyn_deviceid", &e))?;
        settle(|| async {
            self.clients
                .iot
                .delete_certificate()
                .certificate_id(cert_id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.call_error("DeleteCertificate", &res, "msdyn_deviceid", &e))
        })
        .await
    }

    /// Deletes a policy: detached from every target, old versions first.
    async fn delete_policy(&self, name: &str) -> Result<(), ProviderError> {
        let res = format!("policy {name}");
        let targets = self
            .clients
            .iot
            .list_targets_for_policy()
            .policy_name(name)
            .send()
            .await
            .map_err(|e| self.call_error("ListTargetsForPolicy", &res, "policy_prefix", &e))?;
        for target in targets.targets() {
            ignore_not_found(self.detach_policy(name, target).await)?;
        }
        let versions = self
            .clients
            .iot
            .list_policy_versions()
            .policy_name(name)
            .send()
            .await
            .map_err(|e| self.call_error("ListPolicyVersions", &res, "policy_prefix", &e))?;
        for v in versions
            .policy_versions()
            .iter()
            .filter(|v| !v.is_default_version())
        {
            if let Some(id) = v.version_id() {
                ignore_not_found(
                    self.clients
                        .iot
                        .delete_policy_version()
                        .policy_name(name)
                        .policy_version_id(id)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            self.call_error("DeletePolicyVersion", &res, "policy_prefix", &e)
                        }),
                )?;
            }
        }
        settle(|| async {
            self.clients
                .iot
                .delete_policy()
                .policy_name(name)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.call_error("DeletePolicy", &res, "policy_prefix", &e))
        })
        .await
    }

    async fn delete_thing(&self, thing: &str) -> Result<(), ProviderError> {
        let res = format!("thing {thing}");
        settle(|| async {
            self.clients
                .iot
                .delete_thing()
                .thing_name(thing)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.call_error("DeleteThing", &res, "msdyn_deviceid", &e))
        })
        .await
    }

    /// Writes `desired` as the shadow's desired state (`UpdateThingShadow`,
    /// `{"state":{"desired":...}}`): AWS merges it into the desired state already there
    /// (a key set to null is removed). Also Update Device Data's path.
    pub(super) async fn set_desired(
        &self,
        thing: &str,
        desired: &Value,
    ) -> Result<(), ProviderError> {
        let res = format!("the shadow of {thing}");
        let body = json!({ "state": { "desired": desired } }).to_string();
        self.clients
            .data()
            .await?
            .update_thing_shadow()
            .thing_name(thing)
            .payload(Blob::new(body.into_bytes()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                self.clients.error(
                    &Call {
                        op: "UpdateThingShadow",
                        resource: &res,
                        field: "msdyn_devicesettings",
                    },
                    &e,
                )
            })
    }

    async fn delete_shadow(&self, thing: &str) -> Result<(), ProviderError> {
        let res = format!("the shadow of {thing}");
        let deleted = self
            .clients
            .data()
            .await?
            .delete_thing_shadow()
            .thing_name(thing)
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = self.clients.error(
                    &Call {
                        op: "DeleteThingShadow",
                        resource: &res,
                        field: "msdyn_deviceid",
                    },
                    &e,
                );
                if is_not_found(&e) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

/// `Ok` for a not-found error (already gone).
fn ignore_not_found(r: Result<(), ProviderError>) -> Result<(), ProviderError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

/// Runs `op` again while it answers a conflict (AWS applies detaches eventually), for at
/// most [`DETACH_SETTLE`]; not-found counts as done.
async fn settle<F, Fut>(mut op: F) -> Result<(), ProviderError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ProviderError>>,
{
    let deadline = tokio::time::Instant::now() + DETACH_SETTLE;
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) if is_conflict(&e) && tokio::time::Instant::now() + delay < deadline => {
                debug!(error = %e, "aws_iot_core: waiting for a detach to settle");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

fn sorted(m: &HashMap<String, String>) -> std::collections::BTreeMap<&str, &str> {
    m.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_ids_are_read_from_certificate_principals_only() {
        assert_eq!(
            certificate_id("arn:aws:iot:eu-west-1:123456789012:cert/ab12"),
            Some("ab12")
        );
        assert_eq!(certificate_id("arn:aws:iam::123456789012:role/x"), None);
        assert_eq!(certificate_id("arn:aws:iot:eu-west-1:1:cert/"), None);
    }
}
