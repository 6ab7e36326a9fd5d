//! Simulated devices: MQTT 5 clients that publish realistic telemetry (a temperature that
//! drifts and sometimes spikes over the sample rule's threshold), keep a retained status
//! with a last will, and answer commands on their reply topic.
//!
//! Each device spikes on a schedule (two readings in a row over 75 C, first after about 5
//! readings, then every 30) so the embedded default shows an alert and its debounced child
//! within seconds, plus occasional random spikes.

use std::time::Duration;

use iotgw_config::MqttConfig;
use rand::Rng;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Fleet settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Topic templates (the mqtt provider's).
    pub topics: MqttConfig,
    /// Device ids.
    pub device_ids: Vec<String>,
    /// Milliseconds between readings.
    pub interval: Duration,
    /// Broker credentials per device, if the broker needs them: (username, password).
    pub credentials: Option<(String, String)>,
}

/// Simulated device ids `sim-001`, `sim-002`, ...
pub fn device_ids(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}-{i:03}")).collect()
}

fn topic(template: &str, id: &str) -> String {
    template.replace("{device_id}", id)
}

/// Runs every device until `shutdown`.
pub async fn run_fleet(cfg: FleetConfig, shutdown: CancellationToken) {
    let mut set = JoinSet::new();
    for (i, id) in cfg.device_ids.iter().enumerate() {
        let (cfg, id, shutdown) = (cfg.clone(), id.clone(), shutdown.clone());
        set.spawn(async move { run_device(&cfg, &id, i, shutdown).await });
    }
    while set.join_next().await.is_some() {}
}

/// The reading a device sends at step `n`.
pub fn reading(temp: &mut f64, n: u64, index: usize, rng: &mut impl Rng) -> serde_json::Value {
    let phase = (n + 30 - (index as u64 * 2) % 30) % 30;
    *temp += rng.gen_range(-0.6..0.6) + (62.0 - *temp) * 0.1;
    let spiking = phase == 5 || phase == 6 || rng.gen_bool(0.01);
    let t = if spiking {
        76.0 + rng.gen_range(0.5..8.0)
    } else {
        *temp
    };
    serde_json::json!({
        "message_id": uuid::Uuid::new_v4().to_string(),
        "temperature": (t * 10.0).round() / 10.0,
        "humidity": ((40.0 + rng.gen_range(-5.0..5.0_f64)) * 10.0).round() / 10.0,
        "vibration_mm_s": (rng.gen_range(0.5..3.0_f64) * 100.0).round() / 100.0,
        "ts": chrono::Utc::now().to_rfc3339(),
    })
}

async fn run_device(cfg: &FleetConfig, id: &str, index: usize, shutdown: CancellationToken) {
    let status = topic(&cfg.topics.status_topic, id);
    let mut opts = MqttOptions::new(id, cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_last_will(LastWill::new(
        status.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    if let Some((u, p)) = &cfg.credentials {
        opts.set_credentials(u.clone(), p.clone());
    }
    let (client, mut events) = AsyncClient::new(opts, 32);
    let commands = topic(&cfg.topics.command_topic, id);
    let replies = topic(&cfg.topics.reply_topic, id);
    let telemetry = topic(&cfg.topics.telemetry_topic, id);
    let mut tick = tokio::time::interval(cfg.interval);
    let mut temp = 60.0 + index as f64;
    let mut n: u64 = 0;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = client.publish(status.clone(), QoS::AtLeastOnce, true, "offline").await;
                let _ = client.disconnect().await;
                // Let the event loop flush the last publish and the disconnect.
                let flush = tokio::time::timeout(Duration::from_millis(500), async {
                    while let Ok(ev) = events.poll().await {
                        if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) { break; }
                    }
                });
                let _ = flush.await;
                return;
            }
            _ = tick.tick() => {
                n += 1;
                let body = reading(&mut temp, n, index, &mut rng);
                if let Err(e) = client.try_publish(telemetry.clone(), QoS::AtLeastOnce, false, body.to_string()) {
                    tracing::debug!(device = id, error = %e, "simulated reading not queued");
                }
            }
            ev = events.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(device = id, "simulated device connected");
                    let _ = client.try_subscribe(commands.clone(), QoS::AtLeastOnce);
                    let _ = client.try_publish(status.clone(), QoS::AtLeastOnce, true, "online");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let correlation = p.properties.as_ref().and_then(|pr| pr.correlation_data.clone())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .or_else(|| p.properties.as_ref().and_then(|pr| pr.user_properties.iter().find(|(k, _)| k == "correlation_id").map(|(_, v)| v.clone())));
                    let cmd: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    tracing::info!(device = id, command = %cmd, "simulated device received a command");
                    if cmd.get("CommandName").and_then(|v| v.as_str()) == Some("cool_down") {
                        temp = 58.0;
                    }
                    if let Some(c) = correlation {
                        let reply = serde_json::json!({"correlation_id": c, "status": "ok"});
                        let props = PublishProperties { correlation_data: Some(c.into_bytes().into()), ..Default::default() };
                        let _ = client.try_publish_with_properties(replies.clone(), QoS::AtLeastOnce, false, reply.to_string(), props);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(device = id, error = %e, "simulated device connection lost; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn every_device_spikes_twice_in_a_row_early_and_stays_realistic_otherwise() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for index in 0..3 {
            let mut temp = 60.0;
            let temps: Vec<f64> = (1..=12)
                .map(|n| {
                    reading(&mut temp, n, index, &mut rng)["temperature"]
                        .as_f64()
                        .expect("number")
                })
                .collect();
            let over: Vec<usize> = temps
                .iter()
                .enumerate()
                .filter(|(_, t)| **t > 75.0)
                .map(|(i, _)| i + 1)
                .collect();
            assert!(
                over.windows(2).any(|w| w[1] == w[0] + 1),
                "device {index}: {temps:?}"
            );
            assert!(temps.iter().all(|t| (40.0..90.0).contains(t)), "{temps:?}");
        }
    }

    #[test]
    fn ids_are_zero_padded_and_valid() {
        let ids = device_ids("sim", 3);
        assert_eq!(ids, ["sim-001", "sim-002", "sim-003"]);
        assert!(ids
            .iter()
            .all(|i| iotgw_registry::DeviceId::parse(i).is_ok()));
    }
}
