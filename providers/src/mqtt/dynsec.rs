//! Mosquitto dynamic-security administration: per-device broker credentials and ACLs.
//!
//! Each call opens a short-lived admin connection (user `dynsec.admin_username`),
//! subscribes to `$CONTROL/dynamic-security/v1/response`, publishes a batch of commands to
//! `$CONTROL/dynamic-security/v1` and waits (5 s) for the responses, matched by their
//! `correlationData` (every admin session receives every response).
//!
//! Per device `D` it manages:
//! - role `{role_prefix}D` with ACLs: `publishClientSend` on D's telemetry, status, reply
//!   and reported topics; `subscribeLiteral` and `publishClientReceive` on D's command
//!   and settings topics. Nothing else (the plugin's default denies publishing and subscribing);
//! - client (user name) `D`, client id `D`, a random 32-character password, that role.
//!
//! The gateway's own broker user (the instance's `username`) needs, besides: subscribe to
//! the four inbound filters (including `$share/{shared_group}/...`), receive them, and
//! publish to every command and settings topic. The admin user needs publish/subscribe on
//! `$CONTROL/dynamic-security/#` (what `mosquitto_ctrl dynsec init` grants).

use std::time::Duration;

use iotgw_config::{DynsecConfig, MqttConfig};
use iotgw_ids::DeviceId;
use rand::distributions::{Alphanumeric, DistString};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::topics::Topics;
use crate::{DeviceSpec, ProviderError, Registration};

/// Topic the plugin reads commands from.
pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Topic the plugin answers on.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// Length of generated device passwords (alphanumeric, about 190 bits).
pub const PASSWORD_LEN: usize = 32;
/// How long one batch of commands may take, connection included.
const DEADLINE: Duration = Duration::from_secs(5);

/// One command's answer.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct DynsecResponse {
    /// The command answered.
    pub command: String,
    /// The plugin's error text; absent on success.
    #[serde(default)]
    pub error: Option<String>,
    /// Data of `get*` commands.
    #[serde(default)]
    pub data: Option<Value>,
    /// Echo of the command's correlation data.
    #[serde(default, rename = "correlationData")]
    pub correlation_data: Option<String>,
}

#[derive(Deserialize)]
struct ResponseBatch {
    responses: Vec<DynsecResponse>,
}

/// The dynsec client of one provider instance.
#[derive(Clone)]
pub struct DynsecAdmin {
    instance: String,
    host: String,
    port: u16,
    client_id: String,
    admin: DynsecConfig,
    topics: Topics,
    /// The instance's TLS to the broker, if any: the admin's password travels over it too.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl DynsecAdmin {
    /// An admin for the broker of `mqtt`, with the credentials of `admin`.
    pub fn new(
        instance: &str,
        mqtt: &MqttConfig,
        admin: &DynsecConfig,
        topics: Topics,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        Self {
            tls,
            instance: instance.to_owned(),
            host: mqtt.host.clone(),
            port: mqtt.port,
            client_id: mqtt.client_id.clone(),
            admin: admin.clone(),
            topics,
        }
    }

    fn role(&self, id: &DeviceId) -> String {
        format!("{}{id}", self.admin.role_prefix)
    }

    fn acls(&self, id: &DeviceId) -> Vec<Value> {
        let t = &self.topics;
        let d = id.as_str();
        let acl = |acltype: &str, topic: String| json!({"acltype": acltype, "topic": topic, "priority": 0, "allow": true});
        vec![
            acl("publishClientSend", t.telemetry.topic_for(d)),
            acl("publishClientSend", t.status.topic_for(d)),
            acl("publishClientSend", t.reply.topic_for(d)),
            acl("publishClientSend", t.reported.topic_for(d)),
            acl("subscribeLiteral", t.command.topic_for(d)),
            acl("publishClientReceive", t.command.topic_for(d)),
            acl("subscribeLiteral", t.settings.topic_for(d)),
            acl("publishClientReceive", t.settings.topic_for(d)),
        ]
    }

    /// Creates the device's role and client with a new random password. Idempotent: when
    /// they exist, the role's ACLs are brought to the expected set, the password is
    /// replaced (the old one stops working) and the role is attached.
    pub async fn register(&self, spec: &DeviceSpec) -> Result<Registration, ProviderError> {
        let id = &spec.device_id;
        let role = self.role(id);
        let acls = self.acls(id);
        let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, PASSWORD_LEN);
        let mut s = self.session().await?;

        let r = s
            .one(json!({"command": "createRole", "rolename": role, "acls": acls}))
            .await?;
        let role_existed = match r.error.as_deref() {
            None => false,
            Some(e) if e.contains("already exists") => {
                self.align_role(&mut s, &role, &acls).await?;
                true
            }
            Some(e) => return Err(self.classify("createRole", &role, e)),
        };

        let r = s
            .one(json!({
                "command": "createClient", "username": id.as_str(), "clientid": id.as_str(),
                "password": password, "textname": spec.name,
                "roles": [{"rolename": role, "priority": 0}],
            }))
            .await?;
        let client_existed = match r.error.as_deref() {
            None => false,
            Some(e) if e.contains("already exists") => {
                let r = s
                    .one(json!({"command": "setClientPassword", "username": id.as_str(), "password": password}))
                    .await?;
                self.check("setClientPassword", id.as_str(), &r)?;
                let r = s
                    .one(json!({"command": "getClient", "username": id.as_str()}))
                    .await?;
                self.check("getClient", id.as_str(), &r)?;
                let has_role = r
                    .data
                    .as_ref()
                    .and_then(|d| d.pointer("/client/roles"))
                    .and_then(Value::as_array)
                    .is_some_and(|roles| roles.iter().any(|x| x["rolename"] == role.as_str()));
                if !has_role {
                    // addClientRole answers "Internal error" when the role is attached
                    // already (Mosquitto 2.0.11), hence the getClient first.
                    let r = s
                        .one(json!({"command": "addClientRole", "username": id.as_str(), "rolename": role, "priority": 0}))
                        .await?;
                    self.check("addClientRole", id.as_str(), &r)?;
                }
                true
            }
            Some(e) => return Err(self.classify("createClient", id.as_str(), e)),
        };
        s.close().await;

        info!(instance = %self.instance, device = %id, role_existed, client_existed, "dynsec: device credentials issued");
        let message = match (client_existed, role_existed) {
            (false, false) => format!("mosquitto dynsec: client {id} with role {role} created"),
            (true, _) => format!(
                "mosquitto dynsec: client {id} existed: password replaced, role {role} ensured"
            ),
            (false, true) => format!(
                "mosquitto dynsec: client {id} created; role {role} existed, its ACLs aligned"
            ),
        };
        let t = &self.topics;
        let d = id.as_str();
        Ok(Registration {
            message: Some(message),
            credentials: Some(json!({
                "username": d,
                "password": password,
                "client_id": d,
                "host": self.host,
                "port": self.port,
                "protocol": "mqtt5",
                "telemetry_topic": t.telemetry.topic_for(d),
                "status_topic": t.status.topic_for(d),
                "reply_topic": t.reply.topic_for(d),
                "reported_topic": t.reported.topic_for(d),
                "command_topic": t.command.topic_for(d),
                "settings_topic": t.settings.topic_for(d),
            })),
        })
    }

    /// Brings an existing role's ACLs to exactly `want`.
    async fn align_role(
        &self,
        s: &mut Session,
        role: &str,
        want: &[Value],
    ) -> Result<(), ProviderError> {
        let r = s
            .one(json!({"command": "getRole", "rolename": role}))
            .await?;
        self.check("getRole", role, &r)?;
        let have: Vec<Value> = r
            .data
            .as_ref()
            .and_then(|d| d.pointer("/role/acls"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let key = |a: &Value| {
            (
                a["acltype"].as_str().map(str::to_owned),
                a["topic"].as_str().map(str::to_owned),
            )
        };
        let mut commands = Vec::new();
        for a in &have {
            if !want
                .iter()
                .any(|w| key(w) == key(a) && w["allow"] == a["allow"])
            {
                commands.push(json!({"command": "removeRoleACL", "rolename": role, "acltype": a["acltype"], "topic": a["topic"]}));
            }
        }
        for w in want {
            if !have
                .iter()
                .any(|a| key(w) == key(a) && w["allow"] == a["allow"])
            {
                let mut c = w.clone();
                c["command"] = json!("addRoleACL");
                c["rolename"] = json!(role);
                commands.push(c);
            }
        }
        if commands.is_empty() {
            return Ok(());
        }
        for r in s.execute(commands).await? {
            self.check(&r.command, role, &r)?;
        }
        Ok(())
    }

    /// Deletes the device's client and role. [`ProviderError::NotFound`] when the broker
    /// has no such client.
    pub async fn unregister(&self, id: &DeviceId) -> Result<(), ProviderError> {
        let role = self.role(id);
        let mut s = self.session().await?;
        let rs = s
            .execute(vec![
                json!({"command": "deleteClient", "username": id.as_str()}),
                json!({"command": "deleteRole", "rolename": role}),
            ])
            .await?;
        s.close().await;
        let (client, role_r) = (&rs[0], &rs[1]);
        if let Some(e) = &client.error {
            return Err(self.classify("deleteClient", id.as_str(), e));
        }
        match role_r.error.as_deref() {
            None => {}
            Some(e) if e.contains("not found") => {}
            Some(e) => return Err(self.classify("deleteRole", &role, e)),
        }
        info!(instance = %self.instance, device = %id, "dynsec: device credentials deleted");
        Ok(())
    }

    /// Runs raw dynamic-security `commands` (JSON objects with a `command` key) as one
    /// batch on a short-lived admin connection and returns their responses in order; for
    /// setup tasks such as creating the gateway's own broker user.
    pub async fn execute(
        &self,
        commands: Vec<Value>,
    ) -> Result<Vec<DynsecResponse>, ProviderError> {
        let mut s = self.session().await?;
        let result = s.execute(commands).await;
        s.close().await;
        result
    }

    fn check(&self, command: &str, name: &str, r: &DynsecResponse) -> Result<(), ProviderError> {
        match &r.error {
            None => Ok(()),
            Some(e) => Err(self.classify(command, name, e)),
        }
    }

    /// Maps a plugin error text to a provider error class.
    fn classify(&self, command: &str, name: &str, error: &str) -> ProviderError {
        let instance = self.instance.clone();
        let lower = error.to_ascii_lowercase();
        if lower.contains("not found") {
            ProviderError::NotFound {
                instance,
                what: format!("{name} at the broker ({command}: {error})"),
            }
        } else if lower.contains("already exists") {
            ProviderError::Conflict {
                instance,
                message: format!("{command} {name}: {error}"),
            }
        } else if lower.contains("invalid") || lower.contains("missing") {
            ProviderError::InvalidInput {
                instance,
                field: "device_id".into(),
                message: format!("broker refused {command} for {name}: {error}"),
            }
        } else {
            ProviderError::Transient {
                instance,
                message: format!("broker failed {command} for {name}: {error}; retry later"),
            }
        }
    }

    async fn session(&self) -> Result<Session, ProviderError> {
        let id = format!(
            "{}-dynsec-{}",
            self.client_id,
            uuid::Uuid::new_v4().simple()
        );
        let mut o = MqttOptions::new(id, self.host.clone(), self.port);
        o.set_clean_start(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_connection_timeout(DEADLINE.as_secs())
            .set_max_packet_size(Some(1024 * 1024))
            .set_credentials(
                self.admin.admin_username.clone(),
                self.admin.admin_password.expose().to_owned(),
            );
        super::state::with_tls(&mut o, self.tls.as_ref());
        let (client, eventloop) = AsyncClient::new(o, 16);
        let s = Session {
            admin: self.clone(),
            client,
            eventloop,
        };
        s.client
            .subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
            .await
            .map_err(|e| self.transient(e))?;
        Ok(s)
    }

    fn transient(&self, e: impl std::fmt::Display) -> ProviderError {
        ProviderError::Transient {
            instance: self.instance.clone(),
            message: format!(
                "dynsec admin connection to {}:{}: {e}",
                self.host, self.port
            ),
        }
    }
}

/// One admin connection.
struct Session {
    admin: DynsecAdmin,
    client: AsyncClient,
    eventloop: EventLoop,
}

impl Session {
    async fn one(&mut self, command: Value) -> Result<DynsecResponse, ProviderError> {
        let mut rs = self.execute(vec![command]).await?;
        rs.pop()
            .ok_or_else(|| self.admin.transient("empty response"))
    }

    /// Sends `commands` as one batch and returns their responses in order.
    async fn execute(
        &mut self,
        mut commands: Vec<Value>,
    ) -> Result<Vec<DynsecResponse>, ProviderError> {
        let ids: Vec<String> = commands
            .iter_mut()
            .map(|c| {
                let id = uuid::Uuid::new_v4().to_string();
                c["correlationData"] = json!(id);
                id
            })
            .collect();
        let body = json!({ "commands": commands }).to_string();
        self.client
            .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, body)
            .await
            .map_err(|e| self.admin.transient(e))?;
        let mut got: Vec<Option<DynsecResponse>> = vec![None; ids.len()];
        let admin = self.admin.clone();
        let wait = async {
            while got.iter().any(Option::is_none) {
                match self.eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic.as_ref() == RESPONSE_TOPIC.as_bytes() => {
                        let Ok(batch) = serde_json::from_slice::<ResponseBatch>(&p.payload) else {
                            continue;
                        };
                        for r in batch.responses {
                            if let Some(i) = ids.iter().position(|id| Some(id) == r.correlation_data.as_ref()) {
                                got[i] = Some(r);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(
                        code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
                    )) => {
                        return Err(ProviderError::Unauthorized {
                            instance: admin.instance.clone(),
                            message: format!(
                                "broker refused dynsec admin {:?} ({code:?}): check dynsec.admin_username and dynsec.admin_password",
                                admin.admin.admin_username
                            ),
                        })
                    }
                    Err(e) => return Err(admin.transient(e)),
                }
            }
            Ok(())
        };
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(Ok(())) => Ok(got.into_iter().flatten().collect()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(admin.transient(format!(
                "no dynamic-security response within {DEADLINE:?}: does the broker load mosquitto_dynamic_security.so, and may {:?} publish to {CONTROL_TOPIC} and subscribe to {RESPONSE_TOPIC}?",
                admin.admin.admin_username
            ))),
        }
    }

    /// Disconnects cleanly: DISCONNECT, then read until the broker closes (bounded).
    async fn close(mut self) {
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while self.eventloop.poll().await.is_ok() {}
            })
            .await;
        }
    }
}
