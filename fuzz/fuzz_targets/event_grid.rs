//! Any body pushed to the Event Grid hook: parsing and mapping never panic.
#![no_main]

use std::collections::HashMap;

use iotgw_providers::azure_iot_hub::inbound::{map_batch, parse_batch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = parse_batch(data) {
        let _ = map_batch(&events, &HashMap::new(), chrono::Utc::now());
    }
});
