//! The NBD wire parsers: export names, `NBD_OPT_INFO`/`NBD_OPT_GO` payloads, and transmission
//! request headers checked against an export. Whatever passes validation must lie inside the
//! export, as the transmission phase relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node::nbd::proto::{self, Limits, Op, REQUEST_HEADER_LEN, RequestHeader};

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_name(data);
    if let Ok(req) = proto::parse_info_request(data) {
        assert!(req.name.len() <= proto::MAX_STRING);
        assert!(4 + req.name.len() + 2 + 2 * req.requests.len() == data.len());
    }
    // A header followed by the export's limits: size, read-only, max_io.
    if data.len() >= REQUEST_HEADER_LEN + 13 {
        let (h, rest) = data.split_at(REQUEST_HEADER_LEN);
        let mut b: [u8; REQUEST_HEADER_LEN] = h.try_into().unwrap();
        // Usually with the right magic, so the checks behind it are reached.
        if rest[12] & 1 == 0 {
            b[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        let limits = Limits {
            size: u64::from_le_bytes(rest[..8].try_into().unwrap()),
            read_only: rest[12] & 2 != 0,
            max_io: u32::from_le_bytes(rest[8..12].try_into().unwrap()),
        };
        let Ok(header) = RequestHeader::parse(&b) else {
            return;
        };
        let _ = header.payload_len();
        match header.validate(&limits) {
            Ok(Op::Read { offset, len }) | Ok(Op::Write { offset, len, .. }) => {
                assert!(len <= limits.max_io, "longer than max_io");
                assert!(
                    offset + u64::from(len) <= limits.size,
                    "range past the export"
                );
            }
            Ok(Op::Trim { offset, len, .. }) | Ok(Op::WriteZeroes { offset, len, .. }) => {
                assert!(
                    offset + u64::from(len) <= limits.size,
                    "range past the export"
                );
            }
            _ => {}
        }
    }
});
