//! The map header object (`vol.<name>`).
//!
//! Layout (little-endian):
//! ```text
//!   0  magic "ARCHMAP1"        8
//!   8  format version u16      | flags u16 | reserved u32 (0)
//!  16  uuid                    16
//!  32  size u64                | block_size u32 | page_entries u32
//!  48  epoch u64               | created (unix seconds) u64 | fence_generation u64
//!  72  self_origin u16 (0xffff = none) | origin count u16 | name len u16 | source len u16
//!  80  name bytes, source bytes, origin uuids (16 bytes each)
//!      (version 2) inherited page count u32, then per page: page u32, owner uuid (16 bytes)
//!      (version 3) page generation u64, inherited page count u32, then per page: page u32,
//!                  owner uuid (16 bytes), owner page generation u64
//!      crc32c u32 of everything before it
//! ```
//!
//! Inherited pages (version 2) are how a clone of a snapshot costs one header whatever the
//! size of the map: page `p` of the new map *is* page object `pg.<owner>.<p>` of an immutable
//! map (a snapshot), until the new map writes a page object of its own under its own uuid,
//! which then takes precedence. The page's entries need no translation, because a derived
//! map's origin table extends its source's and keeps its indices.
//!
//! Page generations (version 3) make a snapshot of a *live* volume cost headers only too. A
//! writable map writes its page objects at its current page generation, and only those; a
//! snapshot moves the volume to the next generation (with the next epoch, so that every entry
//! it has is SHARED from then on), and the volume inherits its own pages of the generation
//! before, exactly as a clone inherits a snapshot's. Those page objects never change again, so
//! the snapshot inherits them as well instead of copying them. A map may therefore inherit from
//! its own uuid, at an older generation. Version 1 and 2 headers are read as generation 0 with
//! every inherited page at generation 0.

use uuid::Uuid;

use super::{
    FORMAT_VERSION, MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_PAGE_ENTRIES, MIN_BLOCK_SIZE, MIN_PAGE_ENTRIES,
    MapEntry, MapFormatError, Reader, VolumeName, append_checksum, checked_body,
    volume_name_problem,
};

const MAGIC: &[u8; 8] = b"ARCHMAP1";
const NO_ORIGIN: u16 = u16::MAX;
/// Header layout written; 1 (no inherited pages) and 2 (no page generations) are still read.
const HEADER_VERSION: u16 = 3;

/// Who holds a page object: a map's uuid and the page generation the map wrote it at. Page
/// objects of a generation older than their map's current one never change again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageOwner {
    pub uuid: Uuid,
    pub generation: u64,
}

impl PageOwner {
    /// Generation 0 of `uuid`: where formats 1 and 2 keep every page.
    pub fn new(uuid: Uuid) -> Self {
        PageOwner {
            uuid,
            generation: 0,
        }
    }
}

/// Persisted map flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFlags(u16);

impl MapFlags {
    /// A snapshot: never written, never locked.
    pub const READ_ONLY: MapFlags = MapFlags(1);
    /// (Version 3, snapshots only.) The map has no page object of its own: every non-ZERO page
    /// is in the inherited table, so a snapshot or clone of it is derived from the header
    /// alone, without reading a page.
    pub const NO_OWN_PAGES: MapFlags = MapFlags(2);
    const KNOWN: u16 = 3;
    /// What versions 1 and 2 knew.
    const KNOWN_V2: u16 = 1;

    pub fn contains(self, other: MapFlags) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn bits(self) -> u16 {
        self.0
    }

    pub fn with(self, other: MapFlags) -> MapFlags {
        MapFlags(self.0 | other.0)
    }

    pub fn without(self, other: MapFlags) -> MapFlags {
        MapFlags(self.0 & !other.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapHeader {
    pub name: VolumeName,
    pub uuid: Uuid,
    pub size: u64,
    pub block_size: u32,
    pub page_entries: u32,
    /// Owned objects are written at this epoch; it only grows.
    pub epoch: u64,
    pub flags: MapFlags,
    pub created: u64,
    /// Lock generation under which the header was last written: a later opener must hold a
    /// generation at least this high, which catches a lock object that went backwards.
    pub fence_generation: u64,
    /// Index of this map's own uuid in `origins`; `None` for snapshots, which own nothing.
    pub self_origin: Option<u16>,
    /// The uuids OBJECT entries name their objects by.
    pub origins: Vec<Uuid>,
    /// The volume or snapshot this map was snapshotted or cloned from, for humans.
    pub source: Option<String>,
    /// The generation this map writes its own page objects at (`pg.<uuid>.<generation>.<p>`).
    /// It only grows; a snapshot of the map moves it on.
    pub page_generation: u64,
    /// Pages this map reads from an immutable page object (another map's, or its own of an
    /// older generation) until it writes its own: (page, owner), sorted by page, at most one
    /// per page.
    pub inherited: Vec<(u32, PageOwner)>,
}

impl MapHeader {
    pub fn read_only(&self) -> bool {
        self.flags.contains(MapFlags::READ_ONLY)
    }

    /// Whether every non-ZERO page is inherited (see [`MapFlags::NO_OWN_PAGES`]).
    pub fn no_own_pages(&self) -> bool {
        self.flags.contains(MapFlags::NO_OWN_PAGES)
    }

    /// Where this map writes (or wrote) page objects of its own.
    pub fn own_pages(&self) -> PageOwner {
        PageOwner {
            uuid: self.uuid,
            generation: self.page_generation,
        }
    }

    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size))
    }

    pub fn page_count(&self) -> u32 {
        self.block_count().div_ceil(u64::from(self.page_entries)) as u32
    }

    /// Bytes of volume covered by `block` (the last block may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let start = block * u64::from(self.block_size);
        (self.size - start).min(u64::from(self.block_size))
    }

    /// Check every rule a header must satisfy; used before writing and after reading.
    pub fn validate(&self) -> Result<(), MapFormatError> {
        let bad = |s: String| Err(MapFormatError::Invalid(s));
        if let Some(reason) = volume_name_problem(self.name.as_str()) {
            return bad(format!("name: {reason}"));
        }
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return bad(format!("block size {} out of range", self.block_size));
        }
        if !self.page_entries.is_power_of_two()
            || !(MIN_PAGE_ENTRIES..=MAX_PAGE_ENTRIES).contains(&self.page_entries)
        {
            return bad(format!("page entries {} out of range", self.page_entries));
        }
        if self.size == 0 || self.size % 512 != 0 {
            return bad(format!(
                "size {} is not a positive multiple of 512",
                self.size
            ));
        }
        if self.block_count() > MAX_BLOCKS {
            return bad(format!("{} blocks exceed the limit", self.block_count()));
        }
        if self.epoch > MapEntry::MAX_EPOCH {
            return bad(format!("epoch {} out of range", self.epoch));
        }
        if self.origins.len() >= NO_ORIGIN as usize {
            return bad("origin table too large".into());
        }
        match (self.read_only(), self.self_origin) {
            (true, None) => {}
            (false, Some(o)) if (o as usize) < self.origins.len() => {
                if self.origins[o as usize] != self.uuid {
                    return bad("self origin does not name the map's own uuid".into());
                }
                if self.epoch == 0 {
                    return bad("a writable map has epoch 0".into());
                }
            }
            _ => return bad("self origin inconsistent with the read-only flag".into()),
        }
        if self
            .source
            .as_ref()
            .is_some_and(|s| s.len() > u16::MAX as usize)
        {
            return bad("source too long".into());
        }
        if !self.inherited.windows(2).all(|w| w[0].0 < w[1].0) {
            return bad("inherited pages not sorted or repeated".into());
        }
        // A map inherits its own pages only from older generations: those never change.
        if let Some((p, owner)) = self.inherited.iter().find(|(p, owner)| {
            *p >= self.page_count()
                || (owner.uuid == self.uuid && owner.generation >= self.page_generation)
        }) {
            return bad(format!(
                "inherited page {p} from {} generation {} is invalid",
                owner.uuid, owner.generation
            ));
        }
        if self.no_own_pages() && !self.read_only() {
            return bad("only a snapshot can be without pages of its own".into());
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.validate().is_ok(), "{:?}", self.validate());
        let source = self.source.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(
            96 + self.name.as_str().len() + 16 * self.origins.len() + 28 * self.inherited.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&HEADER_VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.0.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(self.uuid.as_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.page_entries.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.created.to_le_bytes());
        out.extend_from_slice(&self.fence_generation.to_le_bytes());
        out.extend_from_slice(&self.self_origin.unwrap_or(NO_ORIGIN).to_le_bytes());
        out.extend_from_slice(&(self.origins.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.name.as_str().len() as u16).to_le_bytes());
        out.extend_from_slice(&(source.len() as u16).to_le_bytes());
        out.extend_from_slice(self.name.as_str().as_bytes());
        out.extend_from_slice(source.as_bytes());
        for o in &self.origins {
            out.extend_from_slice(o.as_bytes());
        }
        out.extend_from_slice(&self.page_generation.to_le_bytes());
        out.extend_from_slice(&(self.inherited.len() as u32).to_le_bytes());
        for (p, owner) in &self.inherited {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(owner.uuid.as_bytes());
            out.extend_from_slice(&owner.generation.to_le_bytes());
        }
        append_checksum(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MapFormatError> {
        let mut r = Reader::new(checked_body(bytes, MAGIC)?);
        let version = r.u16("version")?;
        if !(FORMAT_VERSION..=HEADER_VERSION).contains(&version) {
            return Err(MapFormatError::UnsupportedVersion(version));
        }
        let flags = r.u16("flags")?;
        let known = if version >= 3 {
            MapFlags::KNOWN
        } else {
            MapFlags::KNOWN_V2
        };
        if flags & !known != 0 {
            return Err(MapFormatError::Invalid(format!("unknown flags {flags:#x}")));
        }
        r.u32("reserved")?;
        let uuid = Uuid::from_slice(r.take(16, "uuid")?).expect("16 bytes");
        let size = r.u64("size")?;
        let block_size = r.u32("block size")?;
        let page_entries = r.u32("page entries")?;
        let epoch = r.u64("epoch")?;
        let created = r.u64("created")?;
        let fence_generation = r.u64("fence generation")?;
        let self_origin = r.u16("self origin")?;
        let origin_count = r.u16("origin count")? as usize;
        let name_len = r.u16("name length")? as usize;
        let source_len = r.u16("source length")? as usize;
        let name = std::str::from_utf8(r.take(name_len, "name")?)
            .ok()
            .and_then(|s| VolumeName::new(s).ok())
            .ok_or_else(|| MapFormatError::Invalid("invalid name".into()))?;
        let source = std::str::from_utf8(r.take(source_len, "source")?)
            .map_err(|_| MapFormatError::Invalid("source is not UTF-8".into()))?;
        let mut origins = Vec::with_capacity(origin_count);
        for _ in 0..origin_count {
            origins.push(Uuid::from_slice(r.take(16, "origins")?).expect("16 bytes"));
        }
        let mut inherited = Vec::new();
        let page_generation = match version {
            3.. => r.u64("page generation")?,
            _ => 0,
        };
        if version >= 2 {
            let count = r.u32("inherited count")? as usize;
            let each = if version >= 3 { 28 } else { 20 };
            // Bounded by the bytes present, never by the count read.
            if count > r.remaining() / each {
                return Err(MapFormatError::Invalid(
                    "inherited count past the end".into(),
                ));
            }
            inherited.reserve(count);
            for _ in 0..count {
                let p = r.u32("inherited page")?;
                let uuid = Uuid::from_slice(r.take(16, "inherited owner")?).expect("16 bytes");
                let generation = match version {
                    3.. => r.u64("inherited generation")?,
                    _ => 0,
                };
                inherited.push((p, PageOwner { uuid, generation }));
            }
        }
        if r.remaining() != 0 {
            return Err(MapFormatError::Invalid("trailing bytes".into()));
        }
        let header = MapHeader {
            name,
            uuid,
            size,
            block_size,
            page_entries,
            epoch,
            flags: MapFlags(flags),
            created,
            fence_generation,
            self_origin: (self_origin != NO_ORIGIN).then_some(self_origin),
            origins,
            source: (!source.is_empty()).then(|| source.to_string()),
            page_generation,
            inherited,
        };
        header.validate()?;
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MapHeader {
        let uuid = Uuid::new_v4();
        MapHeader {
            name: VolumeName::new("vol-1").unwrap(),
            uuid,
            size: 1 << 40,
            block_size: 4 << 20,
            page_entries: 4096,
            epoch: 7,
            flags: MapFlags::default(),
            created: 1_700_000_000,
            fence_generation: 3,
            self_origin: Some(1),
            origins: vec![Uuid::new_v4(), uuid],
            source: Some("snap-a".into()),
            page_generation: 4,
            inherited: vec![
                (0, PageOwner::new(Uuid::new_v4())),
                (
                    3,
                    PageOwner {
                        uuid,
                        generation: 3,
                    },
                ),
                (
                    5,
                    PageOwner {
                        uuid: Uuid::new_v4(),
                        generation: 9,
                    },
                ),
            ],
        }
    }

    /// `h` (at page generation 0, inheriting at generation 0 only) in the version 2 layout.
    fn encode_v2(h: &MapHeader) -> Vec<u8> {
        let v3 = h.encode();
        let fixed = 80 + h.name.as_str().len() + h.source.as_deref().unwrap_or("").len();
        let tables = fixed + 16 * h.origins.len();
        let mut v2 = v3[..tables].to_vec();
        v2[8..10].copy_from_slice(&2u16.to_le_bytes());
        v2.extend_from_slice(&(h.inherited.len() as u32).to_le_bytes());
        for (p, owner) in &h.inherited {
            v2.extend_from_slice(&p.to_le_bytes());
            v2.extend_from_slice(owner.uuid.as_bytes());
        }
        append_checksum(&mut v2);
        v2
    }

    #[test]
    fn version_2_headers_are_still_read_at_generation_0() {
        let mut h = sample();
        h.page_generation = 0;
        h.inherited = vec![
            (0, PageOwner::new(Uuid::new_v4())),
            (7, PageOwner::new(Uuid::new_v4())),
        ];
        assert_eq!(MapHeader::decode(&encode_v2(&h)).unwrap(), h);
        // Version 2 knew no flag but READ_ONLY.
        let mut s = h.clone();
        s.flags = MapFlags::READ_ONLY.with(MapFlags::NO_OWN_PAGES);
        s.self_origin = None;
        let mut v2 = encode_v2(&s);
        assert!(MapHeader::decode(&v2).is_err());
        v2[10..12].copy_from_slice(&MapFlags::READ_ONLY.bits().to_le_bytes());
        let body = v2.len() - 4;
        v2.truncate(body);
        append_checksum(&mut v2);
        s.flags = MapFlags::READ_ONLY;
        assert_eq!(MapHeader::decode(&v2).unwrap(), s);
    }

    #[test]
    fn version_1_headers_are_still_read() {
        let mut h = sample();
        h.inherited.clear();
        h.page_generation = 0;
        let mut v1 = h.encode();
        // Version 1: the same layout without the page generation and inherited-page table.
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        let body = v1.len() - 4 - 8 - 4;
        v1.truncate(body);
        append_checksum(&mut v1);
        assert_eq!(MapHeader::decode(&v1).unwrap(), h);
    }

    #[test]
    fn bad_inherited_tables_are_refused() {
        let other = || PageOwner::new(Uuid::new_v4());
        let mut h = sample();
        h.inherited = vec![(5, other()), (0, other())];
        assert!(h.validate().is_err(), "unsorted");
        let mut h = sample();
        h.inherited = vec![(64, other())];
        assert!(h.validate().is_err(), "past the last page");
        let mut h = sample();
        h.inherited = vec![(1, h.own_pages())];
        assert!(h.validate().is_err(), "from its own current generation");
        h.inherited = vec![(
            1,
            PageOwner {
                uuid: h.uuid,
                generation: h.page_generation + 1,
            },
        )];
        assert!(h.validate().is_err(), "from its own future");
        h.inherited = vec![(
            1,
            PageOwner {
                uuid: h.uuid,
                generation: h.page_generation - 1,
            },
        )];
        assert!(
            h.validate().is_ok(),
            "from its own past: {:?}",
            h.validate()
        );
        let mut h = sample();
        h.flags = MapFlags::NO_OWN_PAGES;
        assert!(
            h.validate().is_err(),
            "a volume always has pages of its own"
        );
    }

    #[test]
    fn round_trip_and_counts() {
        let h = sample();
        assert_eq!(MapHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.block_count(), 262_144);
        assert_eq!(h.page_count(), 64);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(MapHeader::decode(&b).is_err(), "flip at {i} went unnoticed");
        }
        for cut in 0..bytes.len() {
            assert!(MapHeader::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn invalid_headers_are_refused() {
        let mut h = sample();
        h.block_size = 3000;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.size = 1000;
        assert!(h.validate().is_err());
        let mut h = sample();
        h.flags = MapFlags::READ_ONLY;
        assert!(h.validate().is_err(), "a snapshot cannot own objects");
        h.self_origin = None;
        assert!(h.validate().is_ok());
    }
}
