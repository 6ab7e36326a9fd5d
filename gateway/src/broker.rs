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
//! and becomes a dead letter with the reason, and only a packet beyond the broker's limit
//! is refused by the broker (logged by it with the client id).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Starts rumqttd in its own thread: MQTT 5 on `addr`, MQTT 3.1.1 on `v311` (if any), and
/// waits until the MQTT 5 listener accepts connections.
pub fn start(addr: SocketAddr, v311: Option<SocketAddr>, max_packet: usize) -> anyhow::Result<()> {
    // Bind once ourselves first, so a busy port gives a clear error instead of a broker
    // thread dying in the background.
    drop(TcpListener::bind(addr).with_context(|| {
        format!("the embedded broker cannot listen on {addr}: is another broker running there? stop it, or set embedded_broker.port (and the mqtt provider's port) to a free port")
    })?);
    if let Some(v311) = v311 {
        drop(TcpListener::bind(v311).with_context(|| {
            format!("the embedded broker's MQTT 3.1.1 listener cannot listen on {v311}: set embedded_broker.v311_port to a free port, or 0 to turn it off")
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
    tracing::info!(%addr, max_packet, "embedded MQTT 5 broker listening (loopback only, no authentication)");
    if let Some(v311) = v311 {
        tracing::info!(addr = %v311, "embedded broker: MQTT 3.1.1 devices connect here");
    }
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
