//! A map page object (`pg.<uuid>.<generation>.<page>`): a fixed number of entries plus the
//! content hashes its CONTENT entries refer to.
//!
//! Layout (little-endian):
//! ```text
//!   0  magic "ARCHPG01"   8
//!   8  format version u16 | reserved u16 (0) | page index u32
//!  16  map uuid           16
//!  32  (version 2) page generation u64
//!      entry count u32    | content count u32
//!      entries            8 × entry count
//!      content hashes     32 × content count
//!      crc32c u32 of everything before it
//! ```
//! The uuid, generation and page index are stored so that a page copied or renamed to the wrong
//! place is caught, not silently used as another map's entries (or as another generation of the
//! same map's, which a snapshot shares). Version 1 pages (no generation) are generation 0.

use std::collections::HashMap;

use uuid::Uuid;

use super::{
    FORMAT_VERSION, MapEntry, MapFormatError, PageOwner, Reader, append_checksum, checked_body,
};

const MAGIC: &[u8; 8] = b"ARCHPG01";
/// Page layout written; 1 (no generation, so generation 0) is still read.
const PAGE_VERSION: u16 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapPage {
    entries: Vec<u64>,
    contents: Vec<[u8; 32]>,
    slots: HashMap<[u8; 32], u32>,
}

impl MapPage {
    /// A page of ZERO entries: what a missing page object means.
    pub fn zero(page_entries: u32) -> Self {
        MapPage {
            entries: vec![0; page_entries as usize],
            contents: Vec::new(),
            slots: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether every entry is ZERO, i.e. the page object need not exist.
    pub fn is_zero(&self) -> bool {
        self.entries.iter().all(|&e| e == 0)
    }

    pub fn get(&self, i: usize) -> MapEntry {
        MapEntry::decode(self.entries[i]).expect("pages are validated when decoded or built")
    }

    /// Set a ZERO or OBJECT entry (CONTENT entries go through `set_content`).
    pub fn set(&mut self, i: usize, entry: MapEntry) {
        assert!(
            !matches!(entry, MapEntry::Content { .. }),
            "content entries are set by hash"
        );
        self.entries[i] = entry.encode();
    }

    pub fn set_content(&mut self, i: usize, hash: [u8; 32]) {
        let slot = match self.slots.get(&hash) {
            Some(&slot) => slot,
            None => {
                let slot = u32::try_from(self.contents.len()).expect("at most one hash per entry");
                self.contents.push(hash);
                self.slots.insert(hash, slot);
                slot
            }
        };
        self.entries[i] = MapEntry::Content { slot }.encode();
    }

    pub fn content(&self, slot: u32) -> &[u8; 32] {
        &self.contents[slot as usize]
    }

    /// Drop hashes no entry refers to any more, renumbering slots; run before persisting so
    /// the table stays bounded by the number of entries.
    pub fn compact(&mut self) {
        let mut used = vec![false; self.contents.len()];
        for &raw in &self.entries {
            if let MapEntry::Content { slot } = MapEntry::decode(raw).expect("valid") {
                used[slot as usize] = true;
            }
        }
        if used.iter().all(|&u| u) {
            return;
        }
        let mut renumber = vec![u32::MAX; self.contents.len()];
        let mut contents = Vec::new();
        for (old, hash) in self.contents.iter().enumerate() {
            if used[old] {
                renumber[old] = contents.len() as u32;
                contents.push(*hash);
            }
        }
        for raw in &mut self.entries {
            if let MapEntry::Content { slot } = MapEntry::decode(*raw).expect("valid") {
                *raw = MapEntry::Content {
                    slot: renumber[slot as usize],
                }
                .encode();
            }
        }
        self.slots = contents
            .iter()
            .enumerate()
            .map(|(i, h)| (*h, i as u32))
            .collect();
        self.contents = contents;
    }

    pub fn encode(&self, owner: PageOwner, page: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(52 + 8 * self.entries.len() + 32 * self.contents.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&PAGE_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&page.to_le_bytes());
        out.extend_from_slice(owner.uuid.as_bytes());
        out.extend_from_slice(&owner.generation.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.contents.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.to_le_bytes());
        }
        for h in &self.contents {
            out.extend_from_slice(h);
        }
        append_checksum(&mut out);
        out
    }

    /// Decode and check a page: checksum, identity, entry encoding and content slots. Checks
    /// that need the header (origins, epochs, entries past the end) are the mapper's.
    pub fn decode(
        bytes: &[u8],
        owner: PageOwner,
        page: u32,
        page_entries: u32,
    ) -> Result<Self, MapFormatError> {
        let mut r = Reader::new(checked_body(bytes, MAGIC)?);
        let version = r.u16("version")?;
        if version != FORMAT_VERSION && version != PAGE_VERSION {
            return Err(MapFormatError::UnsupportedVersion(version));
        }
        r.u16("reserved")?;
        let stored_page = r.u32("page index")?;
        let stored_uuid = Uuid::from_slice(r.take(16, "uuid")?).expect("16 bytes");
        let stored_generation = match version {
            FORMAT_VERSION => 0,
            _ => r.u64("generation")?,
        };
        if stored_page != page || stored_uuid != owner.uuid || stored_generation != owner.generation
        {
            return Err(MapFormatError::Invalid(format!(
                "page belongs to map {stored_uuid} generation {stored_generation} page \
                 {stored_page}, not {} generation {} page {page}",
                owner.uuid, owner.generation
            )));
        }
        let count = r.u32("entry count")?;
        if count != page_entries {
            return Err(MapFormatError::Invalid(format!(
                "{count} entries, the header says {page_entries}"
            )));
        }
        let content_count = r.u32("content count")?;
        if content_count > count {
            return Err(MapFormatError::Invalid("more hashes than entries".into()));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let raw = r.u64("entries")?;
            if let MapEntry::Content { slot } = MapEntry::decode(raw)?
                && slot >= content_count
            {
                return Err(MapFormatError::Invalid(format!(
                    "content slot {slot} past the table"
                )));
            }
            entries.push(raw);
        }
        let mut contents = Vec::with_capacity(content_count as usize);
        let mut slots = HashMap::with_capacity(content_count as usize);
        for i in 0..content_count {
            let hash: [u8; 32] = r.take(32, "hashes")?.try_into().expect("32");
            if slots.insert(hash, i).is_some() {
                return Err(MapFormatError::Invalid("duplicate content hash".into()));
            }
            contents.push(hash);
        }
        if r.remaining() != 0 {
            return Err(MapFormatError::Invalid("trailing bytes".into()));
        }
        Ok(MapPage {
            entries,
            contents,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_contents_and_compaction() {
        let uuid = PageOwner {
            uuid: Uuid::new_v4(),
            generation: 3,
        };
        let mut p = MapPage::zero(64);
        p.set(
            0,
            MapEntry::Object {
                origin: 2,
                epoch: 9,
            },
        );
        p.set_content(1, [1; 32]);
        p.set_content(2, [2; 32]);
        p.set_content(3, [1; 32]);
        assert_eq!(p.get(3), p.get(1), "one slot per distinct hash");
        let decoded = MapPage::decode(&p.encode(uuid, 5), uuid, 5, 64).unwrap();
        assert_eq!(decoded, p);

        p.set(2, MapEntry::Zero);
        p.compact();
        let MapEntry::Content { slot } = p.get(1) else {
            panic!()
        };
        assert_eq!(p.content(slot), &[1; 32]);
        assert_eq!(p.encode(uuid, 5).len(), 48 + 64 * 8 + 32 + 4);
    }

    #[test]
    fn corruption_and_misplacement_are_detected() {
        let uuid = PageOwner {
            uuid: Uuid::new_v4(),
            generation: 1,
        };
        let mut p = MapPage::zero(16);
        p.set_content(4, [7; 32]);
        let bytes = p.encode(uuid, 1);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(MapPage::decode(&b, uuid, 1, 16).is_err(), "flip at {i}");
        }
        assert!(MapPage::decode(&bytes[..bytes.len() - 1], uuid, 1, 16).is_err());
        assert!(
            MapPage::decode(&bytes, uuid, 2, 16).is_err(),
            "wrong page index"
        );
        assert!(
            MapPage::decode(&bytes, PageOwner::new(Uuid::new_v4()), 1, 16).is_err(),
            "wrong map"
        );
        assert!(
            MapPage::decode(
                &bytes,
                PageOwner {
                    generation: 2,
                    ..uuid
                },
                1,
                16
            )
            .is_err(),
            "wrong generation"
        );
        assert!(
            MapPage::decode(&bytes, uuid, 1, 32).is_err(),
            "wrong page size"
        );
    }

    #[test]
    fn a_terabyte_map_is_two_mebibytes() {
        // 1 TiB of 4 MiB blocks: 64 pages of 4096 entries.
        let page = MapPage::zero(4096).encode(PageOwner::new(Uuid::new_v4()), 0);
        assert!(64 * page.len() < 2 * 1024 * 1024 + 64 * 64);
    }

    #[test]
    fn version_1_pages_are_still_read_as_generation_0() {
        let owner = PageOwner::new(Uuid::new_v4());
        let mut p = MapPage::zero(16);
        p.set_content(2, [5; 32]);
        let v2 = p.encode(owner, 4);
        // Version 1: the same layout without the generation.
        let mut v1 = v2[..32].to_vec();
        v1[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        v1.extend_from_slice(&v2[40..v2.len() - 4]);
        append_checksum(&mut v1);
        assert_eq!(MapPage::decode(&v1, owner, 4, 16).unwrap(), p);
        let later = PageOwner {
            generation: 1,
            ..owner
        };
        assert!(MapPage::decode(&v1, later, 4, 16).is_err());
    }
}
