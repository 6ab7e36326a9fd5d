//! The embedded MQTT broker (rumqttd, MQTT 5 listener on loopback) for the zero-config
//! default and for in-process tests. It has no authentication, so it only ever listens on a
//! loopback address (the config validation enforces that).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Starts rumqttd on `addr` in its own thread and waits until it accepts connections.
pub fn start(addr: SocketAddr, max_payload: usize) -> anyhow::Result<()> {
    // Bind once ourselves first, so a busy port gives a clear error instead of a broker
    // thread dying in the background.
    drop(TcpListener::bind(addr).with_context(|| {
        format!("the embedded broker cannot listen on {addr}: is another broker running there? stop it, or set embedded_broker.port (and the mqtt provider's port) to a free port")
    })?);
    let config: rumqttd::Config = serde_json::from_value(serde_json::json!({
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
                "name": "iotgw-embedded",
                "listen": addr.to_string(),
                "next_connection_delay_ms": 1,
                "connections": {
                    "connection_timeout_ms": 60_000,
                    "max_payload_size": max_payload,
                    "max_inflight_count": 100,
                    "dynamic_filters": true,
                }
            }
        }
    }))
    .context("building the embedded broker config")?;
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
    tracing::info!(%addr, "embedded MQTT 5 broker listening (loopback only, no authentication)");
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
