//! The private decoders of backend objects, reachable from the fuzz targets (`fuzz/`) only with
//! the `fuzzing` feature: the fuzzers must run the very code the blockers run, not a copy, and
//! the blockers' own API should not grow for them.

use crate::blocker::{BlockerError, LockInfo, ObjectName};

fn object() -> ObjectName {
    ObjectName::new("fuzz").expect("a valid object name")
}

/// The file blocker's lock object (`ARCHLK01`, generation, holder, CRC-32C).
pub fn file_lock_decode(bytes: &[u8]) -> Result<LockInfo, BlockerError> {
    crate::blocker::file::decode_lock(&object(), bytes)
}

/// What the file blocker writes for `info`.
pub fn file_lock_encode(info: &LockInfo) -> Vec<u8> {
    crate::blocker::file::encode_lock(info)
}

/// The RADOS blocker's lock object (text lines: magic, generation, holder, address), as the
/// lock and the holder's address.
#[cfg(feature = "rados")]
pub fn rados_lock_decode(bytes: &[u8]) -> Result<(LockInfo, String), BlockerError> {
    crate::blocker::rados::decode_lock("fuzz", bytes).map(|s| (s.info, s.address))
}

/// What the RADOS blocker writes for a lock and the holder's address.
#[cfg(feature = "rados")]
pub fn rados_lock_encode(info: LockInfo, address: String) -> Vec<u8> {
    crate::blocker::rados::encode_lock(&crate::blocker::rados::LockState { info, address })
}
