//! Map pages (`pg.<uuid>.<page>`) as read back from a backend. The first byte picks the page
//! size the header would give (every valid one) and whether to recompute the checksum; the
//! page's own uuid and index are passed as the expected ones, so the fuzzer gets past the
//! identity check to the entries and the content table.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peers::map_format::{MapEntry, MapPage, PageOwner};
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let page_entries = 16u32 << (sel % 13); // 16 ..= 65536, the header's range
    let mut bytes = bytes.to_vec();
    if sel & 0x80 != 0 && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
    }
    let page = bytes
        .get(12..16)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));
    let uuid = bytes
        .get(16..32)
        .map_or(Uuid::nil(), |b| Uuid::from_slice(b).unwrap());
    // Version 2 pages carry their generation after the uuid; version 1 pages are generation 0.
    let generation = match bytes.get(8..10) {
        Some([2, 0]) => bytes
            .get(32..40)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap())),
        _ => 0,
    };
    let uuid = PageOwner { uuid, generation };
    let Ok(p) = MapPage::decode(&bytes, uuid, page, page_entries) else {
        return;
    };
    assert_eq!(p.len(), page_entries as usize);
    for i in 0..p.len() {
        if let MapEntry::Content { slot } = p.get(i) {
            let _ = p.content(slot);
        }
    }
    let again = MapPage::decode(&p.encode(uuid, page), uuid, page, page_entries)
        .expect("an encoded page decodes");
    assert_eq!(again, p, "decode(encode(p)) != p");
    let mut compacted = p.clone();
    compacted.compact();
    for i in 0..p.len() {
        let (a, b) = (p.get(i), compacted.get(i));
        match (a, b) {
            (MapEntry::Content { slot: x }, MapEntry::Content { slot: y }) => {
                assert_eq!(
                    p.content(x),
                    compacted.content(y),
                    "compaction moved a hash"
                )
            }
            _ => assert_eq!(a, b, "compaction changed an entry"),
        }
    }
});
