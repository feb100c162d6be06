//! Map headers (`vol.<name>`) and object names as read back from a backend, which a crash, a
//! bad disk or another writer may have left in any state. A random mutation almost never keeps
//! the CRC-32C right, so every input is also tried with its checksum recomputed: that is what
//! reaches the field checks behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peers::blocker::ObjectName;
use peers::map_format::{self, MapHeader};

fn with_fixed_checksum(bytes: &[u8]) -> Vec<u8> {
    let mut fixed = bytes.to_vec();
    if fixed.len() >= 4 {
        let body = fixed.len() - 4;
        let crc = crc32c::crc32c(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_le_bytes());
    }
    fixed
}

fn check(bytes: &[u8]) {
    let Ok(h) = MapHeader::decode(bytes) else {
        return;
    };
    h.validate().expect("a decoded header is valid");
    let again = MapHeader::decode(&h.encode()).expect("an encoded header decodes");
    assert_eq!(again, h, "decode(encode(h)) != h");
    let blocks = h.block_count();
    for b in [0, blocks / 2, blocks.saturating_sub(1)] {
        assert!(h.block_len(b) <= u64::from(h.block_size));
    }
    let _ = h.page_count();
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&with_fixed_checksum(data));
    // Object names come from backend listings (GC, recovery): any valid name must parse
    // without a panic, whatever it claims to be.
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(name) = ObjectName::new(s)
    {
        let _ = map_format::parse_object(&name);
    }
});
