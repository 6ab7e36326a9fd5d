//! Any config file: loading answers a config or problems, never a panic.
#![no_main]

use iotgw_config::{load, LoadOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, data).expect("write");
    let _ = load(&LoadOptions {
        file: Some(path),
        env: false,
        built_kinds: vec!["mqtt"],
    });
});
