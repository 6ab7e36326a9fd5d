//! Property tests of the decoders that read what devices and clouds send (issue 16): over
//! arbitrary bytes and structures none may panic, a telemetry message always becomes an
//! event (the gateway dead-letters what it cannot use, with the reason), and anything
//! else is an event, nothing, or `Unparsable` with a reason — never a crash.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use proptest::prelude::*;

fn received_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("time")
}

/// Bytes that are sometimes JSON objects with interesting keys, sometimes anything.
fn payloads() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (
            "[a-z_]{1,12}",
            prop_oneof![
                Just(serde_json::json!(null)),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                ".{0,40}".prop_map(serde_json::Value::from),
                Just(serde_json::json!({"nested": [1, {"x": "y"}]})),
            ],
            proptest::sample::select(vec![
                "message_id",
                "connected",
                "at",
                "status",
                "correlation_id",
                "reason",
                "event_time",
            ]),
        )
            .prop_map(|(k, v, known)| {
                serde_json::json!({ k: v.clone(), known: v })
                    .to_string()
                    .into_bytes()
            }),
    ]
}

#[cfg(feature = "mqtt")]
mod mqtt {
    use super::*;
    use crate::mqtt::inbound::{decode, Inbound, Received};
    use crate::mqtt::topics::TopicKind;
    use crate::EventKind;

    proptest! {
        #[test]
        fn no_mqtt_message_panics_and_telemetry_always_becomes_an_event(
            payload in payloads(),
            device in ".{0,40}",
            property in proptest::option::of(".{0,20}"),
            correlation in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            pointer in prop_oneof![Just(String::new()), Just("/message_id".to_owned()), "/.{0,10}"],
        ) {
            let payload = Bytes::from(payload);
            let msg = Received {
                topic: "devices/x/any",
                payload: &payload,
                message_id_property: property.as_deref(),
                correlation_data: correlation.as_deref(),
                received_at: received_at(),
            };
            for kind in [TopicKind::Telemetry, TopicKind::Status, TopicKind::Reply, TopicKind::Reported] {
                let out = decode(kind, &device, &msg, &pointer);
                if kind == TopicKind::Telemetry && !payload.is_empty() {
                    prop_assert!(matches!(out, Inbound::Event(EventKind::Telemetry(_))), "{out:?}");
                }
                if let Inbound::Unparsable(reason) = out {
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}

#[cfg(feature = "gcp_pubsub")]
mod gcp_pubsub {
    use super::*;
    use crate::gcp_pubsub::inbound::{decode, Inbound, Received};
    use crate::gcp_pubsub::names::StreamKind;
    use crate::EventKind;

    proptest! {
        #[test]
        fn no_pubsub_message_panics_and_telemetry_always_becomes_an_event(
            data in payloads(),
            attributes in proptest::collection::hash_map(
                prop_oneof![
                    Just("device_id".to_owned()),
                    Just("message_id".to_owned()),
                    Just("correlation_id".to_owned()),
                    Just("status".to_owned()),
                    Just("connected".to_owned()),
                    Just("event_time".to_owned()),
                    ".{0,12}",
                ],
                ".{0,40}",
                0..6,
            ),
            message_id in ".{0,30}",
            publish in proptest::option::of(any::<i32>()),
        ) {
            let data = Bytes::from(data);
            let attributes: HashMap<String, String> = attributes;
            let msg = Received {
                data: &data,
                attributes: &attributes,
                message_id: &message_id,
                publish_time: publish.and_then(|s| DateTime::from_timestamp(i64::from(s), 0)),
                received_at: received_at(),
            };
            for kind in [StreamKind::Telemetry, StreamKind::Reply, StreamKind::Lifecycle] {
                let out = decode(kind, "device_id", &msg);
                if kind == StreamKind::Telemetry {
                    prop_assert!(matches!(out, Inbound::Event(EventKind::Telemetry(_))), "{out:?}");
                }
            }
        }
    }
}

#[cfg(feature = "azure_iot_hub")]
mod azure_iot_hub {
    use super::*;
    use crate::azure_iot_hub::inbound::{map_batch, map_event, parse_batch, HubEvent};

    proptest! {
        #[test]
        fn no_event_grid_body_panics(body in payloads()) {
            if let Ok(events) = parse_batch(&body) {
                let _ = map_batch(&events, &HashMap::new(), received_at());
            }
        }

        #[test]
        fn no_event_grid_batch_of_plausible_events_panics(
            kinds in proptest::collection::vec(
                proptest::sample::select(vec![
                    "Microsoft.Devices.DeviceTelemetry",
                    "Microsoft.Devices.DeviceConnected",
                    "Microsoft.Devices.DeviceDisconnected",
                    "Microsoft.Devices.DeviceCreated",
                    "Microsoft.Devices.DeviceDeleted",
                ]),
                1..5,
            ),
            sequence in ".{0,40}",
            time in prop_oneof![Just("2026-12-01T08:00:00Z".to_owned()), Just("+275760-09-13T00:00:00Z".to_owned()), ".{0,30}"],
            device in ".{0,20}",
        ) {
            let events: Vec<serde_json::Value> = kinds
                .iter()
                .map(|k| serde_json::json!({
                    "id": "1", "eventType": k, "subject": format!("devices/{device}"),
                    "eventTime": time, "dataVersion": "", "topic": "t",
                    "data": {
                        "deviceId": device,
                        "deviceConnectionStateEventInfo": {"sequenceNumber": sequence},
                        "properties": {}, "systemProperties": {"iothub-enqueuedtime": time},
                        "body": {"temperature": 1}
                    }
                }))
                .collect();
            let body = serde_json::to_vec(&events).expect("json");
            if let Ok(parsed) = parse_batch(&body) {
                let _ = map_batch(&parsed, &HashMap::new(), received_at());
            }
        }

        #[test]
        fn no_event_hubs_event_panics(
            body in payloads(),
            system in proptest::collection::btree_map(
                prop_oneof![
                    Just("iothub-connection-device-id".to_owned()),
                    Just("iothub-message-source".to_owned()),
                    Just("iothub-enqueuedtime".to_owned()),
                    Just("iothub-connection-module-id".to_owned()),
                    ".{0,12}",
                ],
                ".{0,40}",
                0..5,
            ),
            application in proptest::collection::btree_map(
                prop_oneof![Just("opType".to_owned()), Just("operationTimestamp".to_owned()), ".{0,12}"],
                ".{0,40}",
                0..4,
            ),
            sequence in any::<i64>(),
            message_id in proptest::option::of(".{0,20}"),
        ) {
            let system: BTreeMap<String, String> = system;
            let e = HubEvent {
                partition: "0".into(),
                offset: "0".into(),
                sequence_number: sequence,
                enqueued_time: Some(received_at()),
                message_id,
                system,
                application,
                body: Bytes::from(body),
            };
            let _ = map_event(&e, |_| None);
        }
    }
}
