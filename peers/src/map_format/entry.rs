//! One map entry, packed in 8 bytes (the original spent 128).
//!
//! Layout of the little-endian u64:
//! - bits 0-1: kind — 0 ZERO, 1 OBJECT, 2 CONTENT (3 is invalid);
//! - OBJECT: bits 2-17 index into the header's origin table, bits 18-63 epoch (46 bits), so the
//!   object is `ob.<origins[origin]>.<epoch>.<block index>`;
//! - CONTENT: bits 2-33 slot in the page's hash table, the rest zero;
//! - ZERO: every bit zero.
//!
//! OWNED versus SHARED is not stored: an OBJECT entry is OWNED exactly when it names the map's
//! own uuid at the map's current epoch. A snapshot therefore turns every entry SHARED by bumping
//! the source's epoch, without rewriting a single page.

use super::MapFormatError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapEntry {
    Zero,
    Object { origin: u16, epoch: u64 },
    Content { slot: u32 },
}

impl MapEntry {
    pub const MAX_EPOCH: u64 = (1 << 46) - 1;

    pub fn encode(self) -> u64 {
        match self {
            MapEntry::Zero => 0,
            MapEntry::Object { origin, epoch } => {
                assert!(
                    (1..=Self::MAX_EPOCH).contains(&epoch),
                    "epoch {epoch} out of range"
                );
                1 | u64::from(origin) << 2 | epoch << 18
            }
            MapEntry::Content { slot } => 2 | u64::from(slot) << 2,
        }
    }

    pub fn decode(raw: u64) -> Result<Self, MapFormatError> {
        match raw & 3 {
            0 if raw == 0 => Ok(MapEntry::Zero),
            1 => {
                let epoch = raw >> 18;
                if epoch == 0 {
                    return Err(MapFormatError::Invalid("object entry with epoch 0".into()));
                }
                Ok(MapEntry::Object {
                    origin: ((raw >> 2) & 0xffff) as u16,
                    epoch,
                })
            }
            2 if raw >> 34 == 0 => Ok(MapEntry::Content {
                slot: ((raw >> 2) & 0xffff_ffff) as u32,
            }),
            _ => Err(MapFormatError::Invalid(format!(
                "invalid map entry {raw:#018x}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for e in [
            MapEntry::Zero,
            MapEntry::Object {
                origin: 0,
                epoch: 1,
            },
            MapEntry::Object {
                origin: u16::MAX,
                epoch: MapEntry::MAX_EPOCH,
            },
            MapEntry::Content { slot: 0 },
            MapEntry::Content { slot: u32::MAX },
        ] {
            assert_eq!(MapEntry::decode(e.encode()).unwrap(), e);
        }
    }

    #[test]
    fn garbage_is_refused() {
        for raw in [3u64, 4, 1, 2 | 1 << 40] {
            assert!(MapEntry::decode(raw).is_err(), "{raw:#x}");
        }
    }
}
