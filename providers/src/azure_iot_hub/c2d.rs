//! Cloud-to-device messages over AMQP 1.0, as IoT Hub's service endpoint takes them and
//! as the official service SDKs send them:
//!
//! 1. TLS to `HostName:5671` (tokio-rustls, ring; the public roots plus `ca_file`), then
//!    SASL with the `MSSBCBS` mechanism (an empty initial response: "authentication follows
//!    on `$cbs`"), as the official SDKs (uamqp) do, then AMQP;
//! 2. claims-based security: a `put-token` request on the `$cbs` node with
//!    `name = "https://{HostName}"`, `type = "servicebus.windows.net:sastoken"` and the
//!    policy's SAS token (renewed on the open connection before it expires);
//! 3. a sender link to `/messages/devicebound`; each message carries `message-id` (the
//!    command id), `to = /devices/{id}/messages/devicebound`, `correlation-id`,
//!    `content-type`/`content-encoding`, `absolute-expiry-time` (`c2d.ttl_secs`) and the
//!    application property `iothub-ack = full` (delivery feedback requested), with the
//!    command message as a data section.
//!
//! The connection is opened on the first command and kept; a failed send drops it and the
//! next command reconnects.
//!
//! Delivery feedback ([`C2dSender::run_feedback`]): a connection of its own with a receiver
//! on `/messages/servicebound/feedback`. Each feedback message (content type
//! `application/vnd.microsoft.iothub.feedback.json`) is a JSON array of records
//! (`originalMessageId`, `deviceId`, `statusCode` = `Success`, `Expired`,
//! `DeliveryCountExceeded`, `Rejected` or `Purged`, `description`, `enqueuedTimeUtc`); each
//! record becomes a command reply naming the command by its id (the message id above), and
//! the message is accepted only once every reply is committed (released otherwise, so the
//! hub delivers it again).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp::frames::sasl::{Frame as SaslFrame, FrameCodec as SaslCodec};
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Message, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, Timestamp, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_management::client::MgmtClient;
use fe2o3_amqp_management::error::{
    Error as MgmtError, InvalidType, StatusCodeNotFound, StatusError,
};
use fe2o3_amqp_management::mgmt_ext::AmqpMessageManagementExt as _;
use fe2o3_amqp_management::request::Request;
use fe2o3_amqp_management::response::Response;
use iotgw_config::azure_iot_hub::ServiceConnectionString;
use iotgw_config::AzureIotHubConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::rustls;
use tokio_util::codec::{Decoder as _, Encoder as _};

use super::sas::{now_secs, token};
use crate::{
    Ack, AckHandle, CommandRequest, EventKind, EventSender, ProviderError, ProviderEvent, Shutdown,
};

/// The CBS token type of a SAS token.
pub const SAS_TOKEN_TYPE: &str = "servicebus.windows.net:sastoken";
/// The claims-based security node.
pub const CBS_NODE: &str = "$cbs";
/// Our reply address for CBS answers.
pub const CBS_CLIENT_NODE: &str = "cbs";
/// The service's C2D sender node.
pub const DEVICEBOUND: &str = "/messages/devicebound";
/// The service's node of C2D delivery feedback.
pub const FEEDBACK: &str = "/messages/servicebound/feedback";
/// Pause before the feedback receiver connects again after a failure.
const FEEDBACK_RETRY: Duration = Duration::from_secs(2);
/// How long opening the connection, the session, CBS and the link may take together.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the hub may take to settle one message.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The `to` address of a C2D message for `device`.
pub fn devicebound_address(device: &str) -> String {
    format!("/devices/{device}/messages/devicebound")
}

/// Sends C2D messages for one hub.
pub struct C2dSender {
    instance: String,
    /// `HostName` as given (the CBS audience and token resource).
    hub: String,
    /// Where to connect: the host part of `HostName` and `c2d.amqp_port`.
    host: String,
    port: u16,
    key: String,
    key_name: String,
    ttl: Duration,
    token_ttl: u64,
    tls: tokio_rustls::TlsConnector,
    link: Mutex<Option<Link>>,
}

struct Link {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    cbs: MgmtClient,
    sender: Sender,
    token_expiry: u64,
}

impl C2dSender {
    /// Builds the sender (connects nothing).
    pub fn new(
        instance: &str,
        cs: &ServiceConnectionString,
        config: &AzureIotHubConfig,
    ) -> Result<Self, ProviderError> {
        let invalid = |field: &str, message: String| ProviderError::InvalidInput {
            instance: instance.to_owned(),
            field: field.to_owned(),
            message,
        };
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for pem in super::rest::extra_roots_pem(instance, config)? {
            use rustls::pki_types::pem::PemObject as _;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem)
                .map_err(|e| invalid("ca_file", format!("not a PEM certificate: {e}")))?;
            roots
                .add(der)
                .map_err(|e| invalid("ca_file", format!("not a usable CA certificate: {e}")))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("ca_file", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let host = cs
            .host_name
            .rsplit_once(':')
            .map_or(cs.host_name.as_str(), |(h, _)| h)
            .to_owned();
        Ok(Self {
            instance: instance.to_owned(),
            hub: cs.host_name.clone(),
            host,
            port: config.c2d.amqp_port,
            key: cs.key.expose().to_owned(),
            key_name: cs.key_name.clone(),
            ttl: Duration::from_secs(config.c2d.ttl_secs),
            token_ttl: config.sas_token_ttl_secs,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            link: Mutex::new(None),
        })
    }

    fn transient(&self, message: String) -> ProviderError {
        ProviderError::Transient {
            instance: self.instance.clone(),
            message,
        }
    }

    /// The CBS token for the hub, valid until `expiry`.
    fn sas(&self, expiry: u64) -> Result<String, ProviderError> {
        token(&self.hub, &self.key, Some(&self.key_name), expiry).map_err(|e| {
            ProviderError::InvalidInput {
                instance: self.instance.clone(),
                field: "connection_string".into(),
                message: e.to_string(),
            }
        })
    }

    async fn put_token(&self, cbs: &mut MgmtClient) -> Result<u64, ProviderError> {
        let expiry = now_secs() + self.token_ttl;
        let request = PutToken {
            name: format!("https://{}", self.hub),
            token: self.sas(expiry)?,
        };
        cbs.call(request)
        .await
        .map_err(|e: MgmtError| ProviderError::Unauthorized {
            instance: self.instance.clone(),
            message: format!(
                "IoT Hub refused the SAS token on $cbs ({e}): check that the policy has service connect permission"
            ),
        })?;
        Ok(expiry)
    }

    async fn open(&self) -> Result<Link, ProviderError> {
        let (connection, mut session, cbs, token_expiry) = self.connect().await?;
        let sender = Sender::attach(
            &mut session,
            format!("iotgw-c2d-{}", uuid::Uuid::new_v4()),
            DEVICEBOUND,
        )
        .await
        .map_err(|e| self.transient(format!("attaching a sender to {DEVICEBOUND} failed: {e}")))?;
        Ok(Link {
            connection,
            session,
            cbs,
            sender,
            token_expiry,
        })
    }

    /// TLS, SASL `MSSBCBS`, AMQP open, a session and the CBS token: what both the sender
    /// and the feedback receiver start with.
    async fn connect(
        &self,
    ) -> Result<
        (
            fe2o3_amqp::connection::ConnectionHandle<()>,
            fe2o3_amqp::session::SessionHandle<()>,
            MgmtClient,
            u64,
        ),
        ProviderError,
    > {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| self.transient(format!("AMQP connection to {addr} failed: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            ProviderError::InvalidInput {
                instance: self.instance.clone(),
                field: "connection_string".into(),
                message: format!("HostName {} is not a TLS server name: {e}", self.host),
            }
        })?;
        let mut stream = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| self.transient(format!("TLS to {addr} failed: {e}")))?;
        sasl_mssbcbs(&mut stream, &self.host)
            .await
            .map_err(|e| self.transient(format!("SASL MSSBCBS with {addr} failed: {e}")))?;
        let mut connection = Connection::builder()
            .container_id(format!("iotgw-{}", uuid::Uuid::new_v4()))
            .hostname(self.host.as_str())
            .scheme("amqp")
            .open_with_stream(stream)
            .await
            .map_err(|e| self.transient(format!("AMQP open on {addr} failed: {e}")))?;
        let mut session = Session::begin(&mut connection)
            .await
            .map_err(|e| self.transient(format!("AMQP session on {addr} failed: {e}")))?;
        let mut cbs = MgmtClient::builder()
            .management_node_address(CBS_NODE)
            .client_node_addr(CBS_CLIENT_NODE)
            .attach(&mut session)
            .await
            .map_err(|e| self.transient(format!("attaching to $cbs on {addr} failed: {e}")))?;
        let token_expiry = self.put_token(&mut cbs).await?;
        Ok((connection, session, cbs, token_expiry))
    }

    /// Receives delivery feedback until `shutdown`, reconnecting after failures (every
    /// [`FEEDBACK_RETRY`]); each record is sent to `events` as a command reply. Returns
    /// `Err` only when the hub refuses the credentials.
    pub async fn run_feedback(
        &self,
        events: EventSender,
        shutdown: Shutdown,
    ) -> Result<(), ProviderError> {
        while !shutdown.is_cancelled() {
            let result = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                r = self.feedback_once(&events, &shutdown) => r,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(e @ ProviderError::Unauthorized { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(provider = %self.instance, error = %e, "C2D feedback receiver stopped; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = tokio::time::sleep(FEEDBACK_RETRY) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// One connection's worth of feedback: until shutdown (Ok) or a failure (Err).
    async fn feedback_once(
        &self,
        events: &EventSender,
        shutdown: &Shutdown,
    ) -> Result<(), ProviderError> {
        let (mut connection, mut session, mut cbs, mut expiry) =
            tokio::time::timeout(OPEN_TIMEOUT, self.connect())
                .await
                .map_err(|_| {
                    self.transient(format!(
                "opening the AMQP connection for C2D feedback to {}:{} took over {OPEN_TIMEOUT:?}",
                self.host, self.port
            ))
                })??;
        let mut receiver = Receiver::attach(
            &mut session,
            format!("iotgw-c2d-feedback-{}", uuid::Uuid::new_v4()),
            FEEDBACK,
        )
        .await
        .map_err(|e| self.transient(format!("attaching a receiver to {FEEDBACK} failed: {e}")))?;
        tracing::info!(provider = %self.instance, "receiving C2D delivery feedback");
        let result = loop {
            let renew_in = Duration::from_secs(
                expiry
                    .saturating_sub(self.token_ttl / 5)
                    .saturating_sub(now_secs())
                    .max(1),
            );
            let delivery = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                () = tokio::time::sleep(renew_in) => {
                    match self.put_token(&mut cbs).await {
                        Ok(e) => expiry = e,
                        Err(e) => break Err(e),
                    }
                    continue;
                }
                d = receiver.recv::<Body<Value>>() => match d {
                    Ok(d) => d,
                    Err(e) => break Err(self.transient(format!("receiving C2D feedback failed: {e}"))),
                },
            };
            let records = match feedback_records(delivery.body()) {
                Ok(r) => r,
                Err(why) => {
                    tracing::warn!(provider = %self.instance, reason = %why, "C2D feedback message refused (not the documented JSON array)");
                    let _ = receiver
                        .reject(
                            &delivery,
                            fe2o3_amqp::types::definitions::Error::new(
                                fe2o3_amqp::types::definitions::AmqpError::DecodeError,
                                Some(why),
                                None,
                            ),
                        )
                        .await;
                    continue;
                }
            };
            let mut verdicts = Vec::with_capacity(records.len());
            for r in records {
                let (tx, verdict) = tokio::sync::oneshot::channel();
                let ok = r.status_code.eq_ignore_ascii_case("Success");
                let reason = (!ok).then(|| r.reason());
                let ev = ProviderEvent {
                    instance: self.instance.clone().into(),
                    kind: EventKind::CommandReply {
                        device_id: r.device_id,
                        correlation_id: r.original_message_id,
                        ok,
                        reason,
                    },
                    ack: AckHandle::new(move |a| {
                        let _ = tx.send(a);
                    }),
                };
                if events.send(ev).await.is_err() {
                    // The pipeline is gone (shutting down): leave the message to the hub.
                    let _ = receiver.release(&delivery).await;
                    break;
                }
                verdicts.push(verdict);
            }
            let mut committed = true;
            for v in verdicts {
                committed &= matches!(v.await, Ok(Ack::Ack));
            }
            let settled = if committed {
                receiver.accept(&delivery).await
            } else {
                receiver.release(&delivery).await
            };
            if let Err(e) = settled {
                break Err(self.transient(format!("settling C2D feedback failed: {e}")));
            }
        };
        let _ = receiver.close().await;
        let _ = cbs.close().await;
        let _ = session.close().await;
        let _ = connection.close().await;
        result
    }

    /// The AMQP message of a command.
    pub fn message(&self, cmd: &CommandRequest, now_millis: i64) -> Message<Data> {
        let ttl_millis = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 2);
        Message::builder()
            .properties(
                Properties::builder()
                    .message_id(cmd.id.to_string())
                    .to(devicebound_address(cmd.device_id.as_str()))
                    .correlation_id(cmd.correlation_id.clone())
                    .content_type("application/json")
                    .content_encoding("utf-8")
                    .absolute_expiry_time(Timestamp::from_milliseconds(now_millis + ttl_millis))
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("iothub-ack", "full")
                    .insert("command_name", cmd.name.clone())
                    .build(),
            )
            .data(Binary::from(cmd.message.clone().into_bytes()))
            .build()
    }

    /// Sends one command as a C2D message; Ok once the hub accepted (queued) it.
    pub async fn send(&self, cmd: &CommandRequest) -> Result<(), ProviderError> {
        let mut guard = self.link.lock().await;
        if guard.is_none() {
            let link = tokio::time::timeout(OPEN_TIMEOUT, self.open())
                .await
                .map_err(|_| {
                    self.transient(format!(
                        "opening the AMQP link to {}:{} took over {OPEN_TIMEOUT:?}",
                        self.host, self.port
                    ))
                })??;
            *guard = Some(link);
        }
        let Some(link) = guard.as_mut() else {
            return Err(self.transient("no AMQP link".into()));
        };
        if now_secs() + self.token_ttl / 5 >= link.token_expiry {
            match self.put_token(&mut link.cbs).await {
                Ok(expiry) => link.token_expiry = expiry,
                Err(e) => {
                    drop_link(guard.take()).await;
                    return Err(e);
                }
            }
        }
        let message = self.message(cmd, chrono::Utc::now().timestamp_millis());
        let outcome = tokio::time::timeout(SEND_TIMEOUT, link.sender.send(message)).await;
        let device = cmd.device_id.as_str();
        match outcome {
            Ok(Ok(Outcome::Accepted(_))) => Ok(()),
            Ok(Ok(Outcome::Rejected(r))) => {
                let (condition, description) = r
                    .error
                    .map(|e| {
                        (
                            format!("{:?}", e.condition),
                            e.description.unwrap_or_default(),
                        )
                    })
                    .unwrap_or_default();
                let detail = format!(
                    "IoT Hub rejected C2D message {} to device {device}: {condition} {description}",
                    cmd.id
                );
                Err(if condition.contains("NotFound") {
                    ProviderError::NotFound {
                        instance: self.instance.clone(),
                        what: detail,
                    }
                } else if condition.contains("ResourceLimitExceeded") {
                    ProviderError::Throttled {
                        instance: self.instance.clone(),
                        retry_after: Duration::from_secs(60),
                        message: format!("{detail} (the device's queue holds 50 messages at most; it must receive some first)"),
                    }
                } else {
                    ProviderError::InvalidInput {
                        instance: self.instance.clone(),
                        field: "command".into(),
                        message: detail,
                    }
                })
            }
            Ok(Ok(other)) => Err(self.transient(format!(
                "C2D message {} to device {device} not accepted: {other:?}",
                cmd.id
            ))),
            Ok(Err(e)) => {
                drop_link(guard.take()).await;
                Err(self.transient(format!(
                    "C2D message {} to device {device} not sent: {e}",
                    cmd.id
                )))
            }
            Err(_) => {
                drop_link(guard.take()).await;
                Err(self.transient(format!(
                    "C2D message {} to device {device}: no answer within {SEND_TIMEOUT:?}",
                    cmd.id
                )))
            }
        }
    }
}

/// One record of a feedback message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// The C2D message's `message-id`: iotgw's command id.
    pub original_message_id: String,
    /// The device.
    pub device_id: String,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    /// The hub's words for it.
    #[serde(default)]
    pub description: Option<String>,
    /// When the hub recorded the outcome.
    #[serde(default)]
    pub enqueued_time_utc: Option<String>,
}

impl FeedbackRecord {
    /// Why the message was not delivered, for the command's status reason.
    pub fn reason(&self) -> String {
        let what = match self.status_code.as_str() {
            "Expired" => "expired before the device received it (c2d.ttl_secs)",
            "DeliveryCountExceeded" => "was delivered too many times without being completed",
            "Rejected" => "was rejected by the device",
            "Purged" => "was purged from the device's queue",
            _ => "was not completed",
        };
        match self.description.as_deref().filter(|d| !d.is_empty()) {
            Some(d) if d != self.status_code => {
                format!("C2D message {what}: {} ({d})", self.status_code)
            }
            _ => format!("C2D message {what}: {}", self.status_code),
        }
    }
}

/// The records of a feedback message's body (data sections holding the JSON array).
pub fn feedback_records(body: &Body<Value>) -> Result<Vec<FeedbackRecord>, String> {
    let bytes: Vec<u8> = match body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        Body::Value(v) => match &v.0 {
            Value::Binary(b) => b.to_vec(),
            Value::String(s) => s.clone().into_bytes(),
            other => return Err(format!("an AMQP value body ({other:?})")),
        },
        other => return Err(format!("an unexpected body ({other:?})")),
    };
    serde_json::from_slice(&bytes).map_err(|e| format!("not a JSON array of feedback records: {e}"))
}

/// The SASL protocol header (`AMQP` 3.1.0).
const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";

/// Negotiates SASL with the `MSSBCBS` mechanism (empty initial response) on `io`: the
/// mechanism the official SDKs use with IoT Hub's CBS. Afterwards the AMQP header follows
/// on the same stream (fe2o3 sends it when it opens the connection without a SASL profile).
pub async fn sasl_mssbcbs<Io>(io: &mut Io, hostname: &str) -> Result<(), String>
where
    Io: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&SASL_HEADER)
        .await
        .map_err(|e| e.to_string())?;
    let mut header = [0u8; 8];
    io.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    if header != SASL_HEADER {
        return Err(format!(
            "the server answered the SASL header with {header:?}"
        ));
    }
    match read_sasl_frame(io).await? {
        SaslFrame::Mechanisms(m) => {
            if !m.sasl_server_mechanisms.0.iter().any(|s| s.0 == "MSSBCBS") {
                return Err(format!(
                    "the server does not offer MSSBCBS: {:?}",
                    m.sasl_server_mechanisms
                ));
            }
        }
        other => return Err(format!("expected sasl-mechanisms, got {other:?}")),
    }
    let init = SaslInit {
        mechanism: "MSSBCBS".into(),
        initial_response: Some(Binary::from(Vec::new())),
        hostname: Some(hostname.to_owned()),
    };
    let mut body = BytesMut::new();
    SaslCodec {}
        .encode(SaslFrame::Init(init), &mut body)
        .map_err(|e| e.to_string())?;
    let size = u32::try_from(body.len() + 4).map_err(|e| e.to_string())?;
    io.write_all(&size.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    io.write_all(&body).await.map_err(|e| e.to_string())?;
    io.flush().await.map_err(|e| e.to_string())?;
    match read_sasl_frame(io).await? {
        SaslFrame::Outcome(o) if matches!(o.code, SaslCode::Ok) => Ok(()),
        SaslFrame::Outcome(o) => Err(format!("authentication refused: {:?}", o.code)),
        other => Err(format!("expected sasl-outcome, got {other:?}")),
    }
}

async fn read_sasl_frame<Io: AsyncRead + Unpin>(io: &mut Io) -> Result<SaslFrame, String> {
    let mut size = [0u8; 4];
    io.read_exact(&mut size).await.map_err(|e| e.to_string())?;
    let size = u32::from_be_bytes(size) as usize;
    if !(8..=64 * 1024).contains(&size) {
        return Err(format!("a SASL frame of {size} bytes"));
    }
    let mut buf = vec![0u8; size - 4];
    io.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    let mut bytes = BytesMut::from(&buf[..]);
    SaslCodec {}
        .decode(&mut bytes)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "an empty SASL frame".to_owned())
}

/// A CBS `put-token` request: application properties `operation = put-token`,
/// `type = servicebus.windows.net:sastoken` and `name` (the audience); the token as an
/// AMQP string value.
#[derive(Debug, Clone)]
pub struct PutToken {
    /// The audience: `https://{HostName}`.
    pub name: String,
    /// The SAS token.
    pub token: String,
}

impl Request for PutToken {
    const OPERATION: &'static str = "put-token";
    type Response = PutTokenAccepted;
    type Body = String;

    fn manageable_entity_type(&mut self) -> Option<String> {
        Some(SAS_TOKEN_TYPE.to_owned())
    }

    fn encode_application_properties(&mut self) -> Option<ApplicationProperties> {
        // No `expiration`: the official SDKs (uamqp) send `name`, `operation` and `type`
        // only; the token carries its own expiry (`se`).
        Some(
            ApplicationProperties::builder()
                .insert("name", self.name.clone())
                .build(),
        )
    }

    fn encode_body(self) -> String {
        self.token
    }
}

/// A successful answer to [`PutToken`]: any 2xx `status-code` (IoT Hub and the Event Hubs
/// family do not agree on 200 or 202).
#[derive(Debug, Clone, Copy)]
pub struct PutTokenAccepted;

impl Response for PutTokenAccepted {
    const STATUS_CODE: u16 = 200;
    type Body = Value;
    type Error = MgmtError;

    fn decode_message(_message: Message<Value>) -> Result<Self, MgmtError> {
        Ok(Self)
    }

    fn from_message(mut message: Message<Value>) -> Result<Self, MgmtError> {
        let code = match message.remove_status_code() {
            None => return Err(StatusCodeNotFound {}.into()),
            Some(Err(actual)) => {
                return Err(InvalidType {
                    expected: "u16".into(),
                    actual: format!("{actual:?}"),
                }
                .into())
            }
            Some(Ok(code)) => code,
        };
        if (200..300).contains(&code.0.get()) {
            return Ok(Self);
        }
        let description = message.remove_status_description().and_then(Result::ok);
        Err(StatusError { code, description }.into())
    }
}

async fn drop_link(link: Option<Link>) {
    if let Some(mut l) = link {
        let _ = l.sender.close().await;
        let _ = l.cbs.close().await;
        let _ = l.session.close().await;
        let _ = l.connection.close().await;
    }
}
