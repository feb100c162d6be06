//! The node's device-state file (`/run/archip/devices.json`): rewritten by every `map`, read at
//! start-up for recovery. A torn or hand-edited file must give an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node::devices::{self, Target};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    // The file is read with read_to_string: bytes that are not UTF-8 stop there.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(records) = devices::decode_state(Path::new("devices.json"), text) {
        for r in &records {
            let _ = r.block_device();
            let _ = r.matches(&Target::Device(r.dev_id));
        }
    }
    // Device names from the command line and from records.
    let t = Target::parse(text);
    let _ = t.to_string();
    if let Some(id) = devices::parse_device(text) {
        assert_eq!(devices::parse_device(&format!("/dev/ublkb{id}")), Some(id));
    }
});
