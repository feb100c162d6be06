//! The on-storage map format: how a volume's metadata and block table are laid out in objects.
//!
//! A map is one header object plus pages:
//! - `vol.<name>` — the [`MapHeader`]: name, uuid, size, block size, epoch, flags, the table of
//!   origin uuids its entries name objects by, the page generation and inherited pages, and the
//!   fencing generation of its last writer. Its presence *is* the volume's existence: creating
//!   writes the pages first and the header last (atomic create), snapshotting and cloning write
//!   headers only (the new map inherits its source's pages), and deleting removes only the
//!   header.
//! - `pg.<uuid>.<generation>.<page>` (generation 0: `pg.<uuid>.<page>`, the name formats 1 and 2
//!   use) — a [`MapPage`] of `page_entries` 8-byte entries plus the SHA-256 names of the content
//!   objects that page refers to. A missing page means "all ZERO", so a thin volume has almost
//!   no map. Persisting one entry rewrites one small page, never the whole map. A writable map
//!   rewrites its pages in place only at its current *page generation*; a snapshot moves the
//!   volume to the next generation, so the page objects it leaves behind never change again and
//!   the snapshot shares them instead of copying them (see [`MapHeader`]).
//!
//! Every object is little-endian, versioned (magic + format version) and ends with a CRC-32C of
//! everything before it; a torn or corrupted object is reported as [`CorruptMap`], never used.
//! Map objects are replaced atomically by the blocker's `write_map`, so a torn write cannot reach
//! storage in the first place; the checksum catches bit rot and foreign writes.
//!
//! Data objects are named so that a name is never reused:
//! - `ob.<uuid>.<epoch>.<block>` — written by the volume with that uuid while at that epoch;
//! - `ct.<sha256>` — content-addressed (dedup), immutable.

mod entry;
mod header;
mod page;

pub use entry::MapEntry;
pub use header::{MapFlags, MapHeader, PageOwner};
pub use page::MapPage;

use crate::blocker::{ObjectName, name_problem};
use std::fmt;
use uuid::Uuid;

/// First version of the header and page formats (still read).
pub const FORMAT_VERSION: u16 = 1;
/// Default block (data object) size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;
/// Smallest and largest block sizes (powers of two).
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// Default entries per page: 4096 × 8 B = 32 KiB, so a 1 TiB volume of 4 MiB blocks has 64
/// pages and 2 MiB of entries.
pub const DEFAULT_PAGE_ENTRIES: u32 = 4096;
pub const MIN_PAGE_ENTRIES: u32 = 16;
pub const MAX_PAGE_ENTRIES: u32 = 1 << 16;
/// Most blocks a volume may have: bounds the in-memory map (64 Mi entries = 512 MiB).
pub const MAX_BLOCKS: u64 = 1 << 26;
/// Longest volume or snapshot name.
pub const MAX_VOLUME_NAME_LEN: usize = 128;

pub const HEADER_PREFIX: &str = "vol.";
pub const PAGE_PREFIX: &str = "pg.";
pub const OWNED_PREFIX: &str = "ob.";
pub const CONTENT_PREFIX: &str = "ct.";
pub const LOCK_PREFIX: &str = "lk.";
pub const QOS_PREFIX: &str = "qs.";

/// Why a map object could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum MapFormatError {
    #[error("bad magic (not a map object of this kind)")]
    BadMagic,
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("truncated while reading {0}")]
    Truncated(&'static str),
    #[error("{0}")]
    Invalid(String),
}

/// A map object that failed to decode or verify, with the object it came from.
#[derive(Debug, thiserror::Error)]
#[error("map object {object} is corrupt: {problem}")]
pub struct CorruptMap {
    pub object: String,
    #[source]
    pub problem: MapFormatError,
}

/// A validated volume or snapshot name: 1..=128 bytes, starting with a letter or digit, and such
/// that `vol.<name>` is a valid object name (so `[A-Za-z0-9._-]`, no `..`, no reserved suffix).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidVolumeName> {
        let name = name.into();
        match volume_name_problem(&name) {
            None => Ok(VolumeName(name)),
            Some(reason) => Err(InvalidVolumeName { name, reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A refused volume name and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid volume name {name:?}: {reason}")]
pub struct InvalidVolumeName {
    pub name: String,
    pub reason: &'static str,
}

pub fn volume_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.len() > MAX_VOLUME_NAME_LEN {
        return Some("longer than 128 bytes");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Some("must start with a letter or digit");
    }
    name_problem(&format!("{HEADER_PREFIX}{name}"))
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn valid(s: String) -> ObjectName {
    ObjectName::new(s).expect("map object names are valid by construction")
}

/// The header object of a volume or snapshot.
pub fn header_object(name: &VolumeName) -> ObjectName {
    valid(format!("{HEADER_PREFIX}{name}"))
}

/// The lock object of a volume. Keyed by name, not uuid, so that the generation keeps growing
/// when a name is deleted and created again.
pub fn lock_object(name: &VolumeName) -> ObjectName {
    valid(format!("{LOCK_PREFIX}{name}"))
}

/// A volume's I/O limits. Keyed by uuid, so a volume created again under a deleted one's name
/// does not inherit them, and GC reclaims them with the map.
pub fn qos_object(uuid: Uuid) -> ObjectName {
    valid(format!("{QOS_PREFIX}{}", uuid.simple()))
}

/// Page `page` of map `owner.uuid` at page generation `owner.generation`. Generation 0 keeps the
/// name of formats 1 and 2, so maps already on storage keep their pages where they are.
pub fn page_object(owner: PageOwner, page: u32) -> ObjectName {
    match owner.generation {
        0 => valid(format!("{PAGE_PREFIX}{}.{page:08x}", owner.uuid.simple())),
        g => valid(format!(
            "{PAGE_PREFIX}{}.{g:016x}.{page:08x}",
            owner.uuid.simple()
        )),
    }
}

pub fn owned_object(uuid: Uuid, epoch: u64, block: u64) -> ObjectName {
    valid(format!(
        "{OWNED_PREFIX}{}.{epoch:016x}.{block:016x}",
        uuid.simple()
    ))
}

pub fn content_object(hash: &[u8; 32]) -> ObjectName {
    valid(format!("{CONTENT_PREFIX}{}", to_hex(hash)))
}

/// What an object name means to the mapper; GC uses this to sort what it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectKind {
    Header(VolumeName),
    Page {
        owner: PageOwner,
        page: u32,
    },
    Owned {
        uuid: Uuid,
        epoch: u64,
        block: u64,
    },
    Content([u8; 32]),
    Qos(Uuid),
    /// Locks and anything the mapper did not name.
    Other,
}

pub fn parse_object(name: &ObjectName) -> ObjectKind {
    let s = name.as_str();
    let parsed = if let Some(rest) = s.strip_prefix(HEADER_PREFIX) {
        VolumeName::new(rest).ok().map(ObjectKind::Header)
    } else if let Some(rest) = s.strip_prefix(PAGE_PREFIX) {
        let mut it = rest.split('.');
        let page = |u: &str, generation: u64, p: &str| {
            let uuid = parse_uuid(u)?;
            let page = u32::from_str_radix(p, 16).ok()?;
            Some(ObjectKind::Page {
                owner: PageOwner { uuid, generation },
                page,
            })
        };
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(u), Some(p), None, None) if p.len() == 8 => page(u, 0, p),
            // Generation 0 has only the short name: one page, one name.
            (Some(u), Some(g), Some(p), None) if g.len() == 16 && p.len() == 8 => {
                match u64::from_str_radix(g, 16) {
                    Ok(generation) if generation > 0 => page(u, generation, p),
                    _ => None,
                }
            }
            _ => None,
        }
    } else if let Some(rest) = s.strip_prefix(OWNED_PREFIX) {
        let mut it = rest.split('.');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(u), Some(e), Some(b), None) if e.len() == 16 && b.len() == 16 => {
                match (
                    parse_uuid(u),
                    u64::from_str_radix(e, 16),
                    u64::from_str_radix(b, 16),
                ) {
                    (Some(uuid), Ok(epoch), Ok(block)) => {
                        Some(ObjectKind::Owned { uuid, epoch, block })
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    } else if let Some(rest) = s.strip_prefix(CONTENT_PREFIX) {
        from_hex32(rest).map(ObjectKind::Content)
    } else if let Some(rest) = s.strip_prefix(QOS_PREFIX) {
        parse_uuid(rest).map(ObjectKind::Qos)
    } else {
        None
    };
    parsed.unwrap_or(ObjectKind::Other)
}

fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 32
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    Uuid::try_parse(s).ok()
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Little-endian reader over a map object that reports truncation instead of panicking.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, at: 0 }
    }

    pub(crate) fn take(
        &mut self,
        n: usize,
        what: &'static str,
    ) -> Result<&'a [u8], MapFormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(MapFormatError::Truncated(what))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, MapFormatError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, MapFormatError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, MapFormatError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Split off and verify the trailing CRC-32C; returns the body it covers.
pub(crate) fn verify_checksum(bytes: &[u8]) -> Result<&[u8], MapFormatError> {
    if bytes.len() < 4 {
        return Err(MapFormatError::Truncated("checksum"));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().expect("4"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(MapFormatError::Checksum { stored, computed });
    }
    Ok(body)
}

pub(crate) fn append_checksum(out: &mut Vec<u8>) {
    let crc = crc32c::crc32c(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Checks the magic and the trailing CRC-32C of a map object and returns what lies between.
/// An object too short to hold both is refused: otherwise the two overlap, and a checksum that
/// happens to match would leave a body shorter than the magic to slice.
pub(crate) fn checked_body<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
) -> Result<&'a [u8], MapFormatError> {
    if bytes.len() < 8 || &bytes[..8] != magic {
        return Err(MapFormatError::BadMagic);
    }
    if bytes.len() < 8 + 4 {
        return Err(MapFormatError::Truncated("checksum"));
    }
    Ok(&verify_checksum(bytes)?[8..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_and_checksum_never_overlap() {
        // Found by fuzz/fuzz_targets/map_page.rs: "ARCHPG0" plus its CRC-32C happens to
        // start with '1', so 11 bytes pass both the magic and the checksum, and decoding
        // sliced the 7-byte body at 8 and panicked.
        let mut page = b"ARCHPG0".to_vec();
        append_checksum(&mut page);
        assert_eq!(&page[..8], b"ARCHPG01");
        assert!(MapPage::decode(&page, PageOwner::new(Uuid::nil()), 0, 16).is_err());
        // The same overlap for any magic, at every short length.
        for len in 8..12 {
            let mut b = vec![7u8; len - 4];
            append_checksum(&mut b);
            let magic: [u8; 8] = b[..8].try_into().unwrap();
            assert!(matches!(
                checked_body(&b, &magic),
                Err(MapFormatError::Truncated(_))
            ));
        }
    }

    #[test]
    fn volume_names() {
        for ok in ["db", "pvc-0d3c1e2a", "a.b_c-d", "0", &"x".repeat(128)] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".x",
            "-x",
            "_x",
            "a/b",
            "../x",
            "a..b",
            "a\0",
            "a.lock",
            "a.tmp",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn object_names_round_trip() {
        let u = Uuid::new_v4();
        let v = VolumeName::new("vm-disk.0").unwrap();
        assert_eq!(
            parse_object(&header_object(&v)),
            ObjectKind::Header(v.clone())
        );
        for generation in [0, 1, u64::MAX] {
            let owner = PageOwner {
                uuid: u,
                generation,
            };
            assert_eq!(
                parse_object(&page_object(owner, 7)),
                ObjectKind::Page { owner, page: 7 }
            );
        }
        assert_eq!(
            page_object(
                PageOwner {
                    uuid: u,
                    generation: 0
                },
                7
            )
            .as_str(),
            format!("pg.{}.00000007", u.simple()),
            "generation 0 keeps the name of formats 1 and 2"
        );
        assert_eq!(
            parse_object(&owned_object(u, 3, 1 << 40)),
            ObjectKind::Owned {
                uuid: u,
                epoch: 3,
                block: 1 << 40
            }
        );
        let h = [0xabu8; 32];
        assert_eq!(parse_object(&content_object(&h)), ObjectKind::Content(h));
        assert_eq!(parse_object(&lock_object(&v)), ObjectKind::Other);
        let zero_long = format!("pg.{}.{:016x}.00000007", u.simple(), 0);
        for other in ["pg.zz.1", "ob.1.2.3", "ct.00", "misc", &zero_long] {
            assert_eq!(
                parse_object(&ObjectName::new(other).unwrap()),
                ObjectKind::Other
            );
        }
    }
}
