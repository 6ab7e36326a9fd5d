//! Any MQTT payload on any kind of topic, with or without a message-id property: decoding
//! never panics, and telemetry always becomes an event.
#![no_main]

use bytes::Bytes;
use iotgw_providers::mqtt::inbound::{decode, Inbound, Received};
use iotgw_providers::mqtt::topics::TopicKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, payload) = data.split_at(data.len().min(8));
    let property = std::str::from_utf8(head).ok();
    let payload = Bytes::copy_from_slice(payload);
    let msg = Received {
        topic: "devices/d/x",
        payload: &payload,
        message_id_property: property,
        correlation_data: Some(head),
        received_at: chrono::Utc::now(),
    };
    for kind in [TopicKind::Telemetry, TopicKind::Status, TopicKind::Reply, TopicKind::Reported] {
        let out = decode(kind, "d", &msg, "/message_id");
        if kind == TopicKind::Telemetry && !payload.is_empty() {
            assert!(matches!(out, Inbound::Event(_)));
        }
    }
});
