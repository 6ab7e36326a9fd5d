//! The embedded MQTT broker (rumqttd) for the zero-config default and for in-process tests:
//! an MQTT 5 listener (the gateway's own session, MQTT 5 devices) and, on its own port, an
//! MQTT 3.1.1 listener (rumqttd serves one protocol version per port). Both feed one
//! router, so a 3.1.1 device's reading reaches the gateway and a command reaches a 3.1.1
//! device. It has no authentication, so it only ever listens on a loopback address (the
//! config validation enforces that).
//!
//! Packet limit: rumqttd closes the connection of a device whose packet is bigger than
//! `max_payload_size` (the whole packet, topic and properties included), and the device's
//! client then resends the same packet after every reconnect. So the limit is kept well
//! above the mqtt provider's `max_payload_bytes`: an oversize reading reaches the gateway
//! and becomes a dead letter with the reason; a packet beyond the broker's limit is refused
//! at the front door (below), counted and logged with the client id.
//!
//! # The front door, and why
//! rumqttd confirms (PUBACKs) a device's QoS 1 publish as soon as its router has the
//! message in memory, before the gateway received it, and offers no hook to delay that and
//! no persistence. So the devices do not talk to rumqttd directly: rumqttd listens on
//! internal loopback ports, and the gateway's own listeners on the configured ports pass
//! each device connection through (bytes, not MQTT). On a graceful stop the gateway first
//! closes those listeners and every device connection, so no new reading can be confirmed,
//! then drains what rumqttd already confirmed (the providers' `drain`) before it stops.
//! The gateway's own MQTT session connects to rumqttd's internal MQTT 5 port directly.
//! What this cannot cover is a crash (`kill -9`, power loss): readings rumqttd confirmed
//! but the gateway had not committed yet are lost with the process (the README states
//! that window).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

mod guard;

/// The running embedded broker: rumqttd on internal ports, and the front door devices use.
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// rumqttd's internal MQTT 5 address (the gateway's own session connects here).
    pub internal_v5: SocketAddr,
    doors: CancellationToken,
    tasks: JoinSet<()>,
}

impl EmbeddedBroker {
    /// Starts rumqttd on free internal loopback ports and the front door on `v5` (and
    /// `v311`): a busy public port is a clear error naming its key. A device packet over
    /// `max_packet` is refused at the door and counted in `metrics`.
    pub async fn start(
        v5: SocketAddr,
        v311: Option<SocketAddr>,
        max_packet: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let public_v5 = tokio::net::TcpListener::bind(v5).await.with_context(|| {
            format!("the embedded broker cannot listen on {v5}: is another broker running there? stop it, or set embedded_broker.port (and the mqtt provider's port) to a free port")
        })?;
        let public_v311 = match v311 {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("the embedded broker's MQTT 3.1.1 listener cannot listen on {addr}: set embedded_broker.v311_port to a free port, or 0 to turn it off")
            })?),
            None => None,
        };
        let internal_v5 = internal_addr()?;
        let internal_v311 = match v311 {
            Some(_) => Some(internal_addr()?),
            None => None,
        };
        tokio::task::spawn_blocking(move || start(internal_v5, internal_v311, max_packet))
            .await??;
        let doors = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let door = Door {
            max_packet,
            metrics,
            closed: doors.clone(),
        };
        tasks.spawn(front_door(public_v5, internal_v5, door.clone()));
        if let (Some(listener), Some(internal)) = (public_v311, internal_v311) {
            tasks.spawn(front_door(listener, internal, door));
        }
        tracing::info!(addr = %v5, max_packet, "embedded broker: MQTT 5 devices connect here (loopback only, no authentication)");
        if let Some(v311) = v311 {
            tracing::info!(addr = %v311, "embedded broker: MQTT 3.1.1 devices connect here");
        }
        Ok(Self {
            internal_v5,
            doors,
            tasks,
        })
    }

    /// Closes the front door: stops accepting devices and closes every device connection,
    /// so nothing new can be confirmed. rumqttd keeps running (and keeps what it holds for
    /// the gateway) until the process ends.
    pub async fn close_doors(&mut self) {
        self.doors.cancel();
        while self.tasks.join_next().await.is_some() {}
        tracing::info!(
            "embedded broker: device connections closed; draining what the broker confirmed"
        );
    }
}

/// A free loopback port for one of rumqttd's internal listeners.
fn internal_addr() -> anyhow::Result<SocketAddr> {
    let probe = TcpListener::bind("127.0.0.1:0")
        .context("finding a free loopback port for the embedded broker")?;
    Ok(probe.local_addr()?)
}

/// What every connection of the front door shares.
#[derive(Clone)]
struct Door {
    max_packet: usize,
    metrics: Arc<Metrics>,
    closed: CancellationToken,
}

/// Accepts devices on `listener` and passes each connection through to rumqttd at
/// `internal`, until the door closes; then every connection it passed is closed.
async fn front_door(listener: tokio::net::TcpListener, internal: SocketAddr, door: Door) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = door.closed.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while conns.try_join_next().is_some() {}
        let (device, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "embedded broker: accepting a device failed");
                continue;
            }
        };
        let door = door.clone();
        conns.spawn(async move {
            let _ = device.set_nodelay(true);
            let broker = match tokio::net::TcpStream::connect(internal).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(%peer, error = %e, "embedded broker: the internal listener refused a device connection");
                    return;
                }
            };
            let _ = broker.set_nodelay(true);
            tokio::select! {
                () = door.closed.cancelled() => {}
                () = pass(device, broker, &door) => {}
            }
        });
    }
    drop(listener);
    conns.shutdown().await;
}

/// Passes one device connection through: broker to device as it comes, device to broker
/// through the packet-size guard. A packet bigger than the broker reads closes the
/// connection here (as rumqttd would), counted and logged with the client id.
async fn pass(device: tokio::net::TcpStream, broker: tokio::net::TcpStream, door: &Door) {
    let (mut from_device, mut to_device) = device.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let downstream = async {
        let _ = tokio::io::copy(&mut from_broker, &mut to_device).await;
    };
    let upstream = async {
        let mut guard = guard::PacketGuard::new(door.max_packet);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from_device.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Err(refused) = guard.feed(&buf[..n]) {
                let client = refused
                    .client_id
                    .unwrap_or_else(|| "(before CONNECT)".into());
                door.metrics.rejected(
                    "embedded_broker",
                    "packet_too_large",
                    &format!(
                        "client {client}: a {}-byte packet, over embedded_broker.max_packet_bytes ({}): connection closed; keep readings under the mqtt provider's max_payload_bytes",
                        refused.size, door.max_packet
                    ),
                );
                return;
            }
            if to_broker.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = downstream => {}
        () = upstream => {}
    }
}

/// Starts rumqttd in its own thread: MQTT 5 on `addr`, MQTT 3.1.1 on `v311` (if any), and
/// waits until the MQTT 5 listener accepts connections.
fn start(addr: SocketAddr, v311: Option<SocketAddr>, max_packet: usize) -> anyhow::Result<()> {
    // Bind once ourselves first, so a taken port gives a clear error instead of a broker
    // thread dying in the background.
    for internal in std::iter::once(addr).chain(v311) {
        drop(TcpListener::bind(internal).with_context(|| {
            format!(
                "the embedded broker's internal port {internal} was taken meanwhile: start again"
            )
        })?);
    }
    let connections = serde_json::json!({
        "connection_timeout_ms": 60_000,
        "max_payload_size": max_packet,
        "max_inflight_count": 100,
        "dynamic_filters": true,
    });
    let mut config = serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 10010,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104_857_600,
            "max_segment_count": 10,
        },
        "v5": {
            "1": {
                "name": "iotgw-embedded-v5",
                "listen": addr.to_string(),
                "next_connection_delay_ms": 1,
                "connections": connections,
            }
        }
    });
    if let Some(v311) = v311 {
        config["v4"] = serde_json::json!({
            "1": {
                "name": "iotgw-embedded-v311",
                "listen": v311.to_string(),
                "next_connection_delay_ms": 1,
                "connections": connections,
            }
        });
    }
    let config: rumqttd::Config =
        serde_json::from_value(config).context("building the embedded broker config")?;
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded broker stopped");
            }
        })
        .context("starting the embedded broker thread")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answers_mqtt(addr) {
        if Instant::now() > deadline {
            anyhow::bail!("the embedded broker did not start listening on {addr} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::debug!(%addr, ?v311, "embedded broker (rumqttd) listening on its internal ports");
    Ok(())
}

/// Whether an MQTT 5 broker at `addr` answers a CONNECT with a CONNACK. A proper
/// handshake (then DISCONNECT) keeps the broker from logging the probe as a broken client.
fn answers_mqtt(addr: SocketAddr) -> bool {
    const CONNECT: [u8; 26] = [
        0x10, 0x18, // CONNECT, remaining length 24
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00,
        0x0a, // MQTT 5, clean start, keep-alive 10 s
        0x00, // no properties
        0x00, 0x0b, b'i', b'o', b't', b'g', b'w', b'-', b'p', b'r', b'o', b'b',
        b'e', // client id
    ];
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut ack = [0u8; 2];
    let ok = s.write_all(&CONNECT).is_ok() && s.read_exact(&mut ack).is_ok() && ack[0] == 0x20;
    let _ = s.write_all(&[0xe0, 0x00]);
    ok
}
