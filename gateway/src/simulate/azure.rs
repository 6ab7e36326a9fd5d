//! Simulated Azure IoT Hub devices, with the `azure_iot_sdk` device client (crates.io,
//! feature `azure_device_sim`, so a default build does not carry its TLS, OpenSSL built in):
//! device-to-cloud telemetry, a direct-method handler, cloud-to-device messages and twin
//! reported properties, over MQTT to the hub's port 8883 with a SAS token signed by the
//! device's key.
//!
//! The devices come from their connection strings (`HostName=...;DeviceId=...;
//! SharedAccessKey=...`): the `credentials.connection_string` registration returns with
//! `--register`, or `--connection-string` for devices registered elsewhere. The SDK's own
//! connection-string parser drops the `=` padding of a base64 key (it splits each part on
//! every `=`), so the string is parsed here and the SDK given hub, device and key.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use azure_iot_sdk::{
    DeviceKeyTokenSource, DirectMethodResponse, IoTHubClient, Message, MessageType,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::device::{Answer, Behaviour, Counters};

/// One device's identity, from its connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The hub's host name (`HostName`), where the device connects (port 8883).
    pub host: String,
    /// `DeviceId`.
    pub device_id: String,
    /// `SharedAccessKey`, base64.
    pub key: String,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("host", &self.host)
            .field("device_id", &self.device_id)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl DeviceIdentity {
    /// Parses a device connection string; the error names the part that is missing.
    pub fn parse(connection_string: &str) -> anyhow::Result<Self> {
        let mut host = None;
        let mut device_id = None;
        let mut key = None;
        for part in connection_string
            .split(';')
            .filter(|p| !p.trim().is_empty())
        {
            let (name, value) = part.split_once('=').with_context(|| {
                format!("`{part}` is not NAME=VALUE (a device connection string is HostName=...;DeviceId=...;SharedAccessKey=...)")
            })?;
            match name.trim() {
                "HostName" => host = Some(value.trim().to_owned()),
                "DeviceId" => device_id = Some(value.trim().to_owned()),
                "SharedAccessKey" => key = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        let need = |v: Option<String>, name: &str| {
            v.filter(|s| !s.is_empty()).with_context(|| {
                format!(
                    "the device connection string has no {name} (expected HostName=...;DeviceId=...;SharedAccessKey=...; \
                     `az iot hub device-identity connection-string show` prints one)"
                )
            })
        };
        Ok(Self {
            host: need(host, "HostName")?,
            device_id: need(device_id, "DeviceId")?,
            key: need(key, "SharedAccessKey")?,
        })
    }
}

/// The direct-method answer: 200 with `{"status": "ok"}`, or 400 with the reason (the
/// provider stores a non-2xx answer's `reason` as the command's error).
pub fn method_response(request_id: String, answer: &Answer) -> DirectMethodResponse {
    let (status, body) = match answer {
        Answer::Ok => (200, json!({"status": "ok"})),
        Answer::Refused(reason) => (400, json!({"status": "error", "reason": reason})),
    };
    DirectMethodResponse::new(request_id, status, Some(body.to_string()))
}

/// Runs one device until `stop`: connects (again after a failure, waiting 1 s doubling to
/// 30 s), sends a reading every `interval`, reported properties when due, and answers
/// direct methods; a cloud-to-device message or a desired-property patch counts as a
/// command and is answered with reported properties.
pub async fn run_device(
    who: DeviceIdentity,
    index: usize,
    refuse_rate: f64,
    interval: Duration,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let mut behaviour = Behaviour::new(index, refuse_rate);
    let mut backoff = Duration::from_secs(1);
    let mut ever_connected = false;
    while !stop.is_cancelled() {
        match session(
            &who,
            &mut behaviour,
            interval,
            &counters,
            &stop,
            &mut ever_connected,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => {
                counters.error(&who.device_id, format!("{e:#}"));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One connection: Ok when stopped, Err when it failed.
async fn session(
    who: &DeviceIdentity,
    behaviour: &mut Behaviour,
    interval: Duration,
    counters: &Counters,
    stop: &CancellationToken,
    ever_connected: &mut bool,
) -> anyhow::Result<()> {
    let tokens = DeviceKeyTokenSource::new(&who.host, &who.device_id, &who.key)
        .map_err(|e| anyhow::anyhow!("the device key of {}: {e:?}", who.device_id))?;
    let mut client = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        c = IoTHubClient::new(&who.host, who.device_id.clone(), tokens) => c
            .map_err(|e| anyhow::anyhow!("connecting to {}:8883: {e}", who.host))?,
    };
    if !*ever_connected {
        *ever_connected = true;
        Counters::bump(&counters.connected);
    }
    let mut inbox = client.get_receiver().await;
    let mut tick = tokio::time::interval(interval);
    let mut rid: u64 = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let reading = behaviour.next_reading();
                let message = Message::builder()
                    .set_body(reading.to_string().into_bytes())
                    .set_message_id(uuid::Uuid::new_v4().to_string())
                    .set_content_type("application/json".into())
                    .set_content_encoding("utf-8".into())
                    .build();
                client
                    .send_message(message)
                    .await
                    .map_err(|e| anyhow::anyhow!("sending telemetry: {e}"))?;
                Counters::bump(&counters.sent);
                if behaviour.report_due() {
                    rid += 1;
                    report(&mut client, behaviour, rid, counters).await?;
                }
            }
            received = inbox.recv() => {
                let Some(received) = received else {
                    anyhow::bail!("the connection to {} ended", who.host);
                };
                match received {
                    MessageType::DirectMethod(call) => {
                        Counters::bump(&counters.commands);
                        let payload = serde_json::from_slice::<Value>(&call.message.body)
                            .unwrap_or(Value::Null);
                        let command = json!({"CommandName": call.method_name, "Message": payload});
                        let answer = behaviour.answer(&command);
                        client
                            .respond_to_direct_method(method_response(call.request_id, &answer))
                            .await
                            .map_err(|e| anyhow::anyhow!("answering a direct method: {e}"))?;
                        counters.answered(&answer);
                    }
                    MessageType::C2DMessage(m) => {
                        Counters::bump(&counters.commands);
                        let body = serde_json::from_slice::<Value>(&m.body).unwrap_or(Value::Null);
                        counters.answered(&behaviour.answer(&body));
                        rid += 1;
                        report(&mut client, behaviour, rid, counters).await?;
                    }
                    MessageType::DesiredPropertyUpdate(_) => {
                        rid += 1;
                        report(&mut client, behaviour, rid, counters).await?;
                    }
                    MessageType::ErrorReceive(e) => {
                        counters.error(&who.device_id, format!("receiving: {e:?}"));
                    }
                }
            }
        }
    }
}

/// Sends the reported properties (a twin PATCH of `properties/reported`).
async fn report(
    client: &mut IoTHubClient,
    behaviour: &Behaviour,
    rid: u64,
    counters: &Counters,
) -> anyhow::Result<()> {
    client
        .send_property_update(&rid.to_string(), &behaviour.properties().to_string())
        .await
        .map_err(|e| anyhow::anyhow!("reporting properties: {e}"))?;
    Counters::bump(&counters.reported);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_string_keeps_the_keys_base64_padding_and_names_what_is_missing() {
        let who = DeviceIdentity::parse(
            "HostName=plant.azure-devices.net;DeviceId=sim-001;SharedAccessKey=c2VjcmV0LWtleQ==",
        )
        .expect("parses");
        assert_eq!(who.host, "plant.azure-devices.net");
        assert_eq!(who.device_id, "sim-001");
        assert_eq!(who.key, "c2VjcmV0LWtleQ==");
        assert!(!format!("{who:?}").contains("c2Vj"), "{who:?}");
        let e = DeviceIdentity::parse("HostName=h;SharedAccessKey=k").expect_err("no device");
        assert!(format!("{e:#}").contains("DeviceId"), "{e:#}");
    }

    #[test]
    fn a_refused_method_answers_400_with_the_reason() {
        let r = method_response("7".into(), &Answer::Refused("door open".into()));
        let text = format!("{r:?}");
        assert!(text.contains("400") && text.contains("door open"), "{text}");
        let ok = format!("{:?}", method_response("8".into(), &Answer::Ok));
        assert!(ok.contains("200"), "{ok}");
    }
}
