//! Request and reply payloads carried in xseg buffers: the segment is shared memory that any
//! local process of the user can write, so every payload decoder sees hostile bytes. The first
//! byte picks the decoder; whatever decodes must encode and decode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peers::wire::{self, WireCounters};
use xseg::protocol::{MapReply, NamePayload};

/// Decode, and for a success, check that the encoding decodes to the same value.
macro_rules! round_trip {
    ($ty:ty, $bytes:expr) => {{
        if let Ok(v) = <$ty>::decode($bytes) {
            let mut buf = vec![0u8; $bytes.len() * 2 + 4096];
            let n = v.encode(&mut buf).expect("a decoded value encodes");
            let again = <$ty>::decode(&buf[..n]).expect("an encoded value decodes");
            assert_eq!(again, v, "decode(encode(x)) != x");
        }
    }};
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 16 {
        0 => round_trip!(MapReply, bytes),
        1 => round_trip!(NamePayload, bytes),
        2 => round_trip!(wire::VolumeInfo, bytes),
        3 => round_trip!(wire::CreateRequest, bytes),
        4 => round_trip!(wire::GroupSnapshotRequest, bytes),
        5 => {
            let _ = wire::ListReply::decode(bytes);
        }
        6 => round_trip!(wire::DiscardReply, bytes),
        7 => round_trip!(wire::ObjectStat, bytes),
        8 => round_trip!(wire::LockState, bytes),
        9 => round_trip!(wire::QosReport, bytes),
        10 => round_trip!(wire::GcRequest, bytes),
        11 => round_trip!(wire::ErrorReply, bytes),
        12 => round_trip!(wire::GcReport, bytes),
        13 => round_trip!(wire::ImportReport, bytes),
        14 => {
            // The primitive reader the payloads are built on, driven by the bytes themselves.
            let mut r = xseg::protocol::Reader::new(bytes);
            for _ in 0..64 {
                let ok = match r.remaining() % 5 {
                    0 => r.u16().is_ok(),
                    1 => r.u32().is_ok(),
                    2 => r.u64().is_ok(),
                    3 => r.name().is_ok(),
                    _ => r.bytes(r.remaining() / 2).is_ok(),
                };
                if !ok {
                    break;
                }
            }
        }
        _ => {
            let _ = xseg::Op::from_code(u32::from_le_bytes(
                bytes
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 4]),
            ));
            round_trip!(wire::VerifyReport, bytes)
        }
    }
});
