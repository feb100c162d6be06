//! A map held in memory: the decoded header and every page, with the blocker versions they were
//! read or written at, so that each update is a compare-and-swap against exactly what we hold.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use super::{MapperError, ResultExt};
use crate::blocker::{Blocker, Expect, Fence, ObjectName};
use crate::map_format::{
    CorruptMap, MapEntry, MapFlags, MapFormatError, MapHeader, MapPage, PageOwner, VolumeName,
    content_object, header_object, owned_object, page_object,
};

/// What a block is, from the point of view of the map holding it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// No object; reads return zeros.
    Zero,
    /// Named by this map's uuid at its current epoch, in a page of its own (not inherited):
    /// only this map writes it.
    Owned,
    /// Named by another uuid or an older epoch, or read through an inherited page: read-only
    /// here.
    Shared,
    /// Content-addressed: read-only everywhere.
    Content,
}

#[derive(Clone, Debug)]
pub(crate) struct PageSlot {
    pub page: MapPage,
    /// Blocker version of this map's own page object (at its current page generation);
    /// `None` while it does not exist (the page is all ZERO, or inherited).
    pub version: Option<u64>,
    /// With no own page object: the immutable page object that holds these entries (another
    /// map's, or this map's of an older generation; see the header's inherited pages). Its
    /// entries are never OWNED here. The first write of the page creates an own object.
    pub inherited: Option<PageOwner>,
}

impl PageSlot {
    fn zero(page_entries: u32) -> Self {
        PageSlot {
            page: MapPage::zero(page_entries),
            version: None,
            inherited: None,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct VolumeMap {
    pub header: MapHeader,
    pub header_version: u64,
    pub pages: Vec<PageSlot>,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn corrupt(object: &ObjectName, problem: MapFormatError) -> MapperError {
    MapperError::Corrupt(CorruptMap {
        object: object.to_string(),
        problem,
    })
}

impl VolumeMap {
    /// A fresh writable map of ZERO entries.
    pub fn new_volume(name: VolumeName, size: u64, block_size: u32, page_entries: u32) -> Self {
        let uuid = Uuid::new_v4();
        let header = MapHeader {
            name,
            uuid,
            size,
            block_size,
            page_entries,
            epoch: 1,
            flags: MapFlags::default(),
            created: now_secs(),
            fence_generation: 0,
            self_origin: Some(0),
            origins: vec![uuid],
            source: None,
            page_generation: 0,
            inherited: Vec::new(),
        };
        Self::with_zero_pages(header)
    }

    fn with_zero_pages(header: MapHeader) -> Self {
        let pages = (0..header.page_count())
            .map(|_| PageSlot::zero(header.page_entries))
            .collect();
        VolumeMap {
            header,
            header_version: 0,
            pages,
        }
    }

    /// Every non-ZERO page of this map and the page object holding it: what a snapshot or
    /// clone of it inherits. Only meaningful for a map whose own pages never change again (a
    /// snapshot, or a volume just moved to a new page generation by [`VolumeMap::freeze`]).
    pub fn page_table(&self) -> Vec<(u32, PageOwner)> {
        let own = self.header.own_pages();
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(p, slot)| match (slot.inherited, slot.version) {
                (Some(owner), _) => Some((p as u32, owner)),
                (None, Some(_)) if !slot.page.is_zero() => Some((p as u32, own)),
                _ => None,
            })
            .collect()
    }

    /// The header a writable map moves to before it is snapshotted or cloned: the next epoch,
    /// so every entry it has now is SHARED from then on (the next write of a block copies it),
    /// and the next page generation, inheriting every non-ZERO page from the page objects it
    /// has now, which are thereby frozen: the snapshot can share them instead of copying them,
    /// because this map never writes them again. One header write, whatever the size.
    pub fn frozen_header(&self) -> Result<MapHeader, MapperError> {
        assert!(!self.header.read_only(), "only writable maps are frozen");
        let mut header = self.header.clone();
        header.epoch += 1;
        if header.epoch > MapEntry::MAX_EPOCH {
            return Err(MapperError::EpochExhausted {
                volume: header.name.to_string(),
            });
        }
        header.page_generation += 1;
        header.inherited = self.page_table();
        Ok(header)
    }

    /// Install a frozen header (see [`VolumeMap::frozen_header`]) once it is durable at
    /// `version`: every own page becomes inherited from the generation before, and an own page
    /// of ZERO entries simply goes (its object is left to GC).
    pub fn freeze(&mut self, header: MapHeader, version: u64) {
        assert_eq!(header.uuid, self.header.uuid);
        assert_eq!(header.page_generation, self.header.page_generation + 1);
        let old = self.header.own_pages();
        for slot in &mut self.pages {
            if slot.version.take().is_some() && !slot.page.is_zero() {
                slot.inherited = Some(old);
            }
        }
        self.header = header;
        self.header_version = version;
        self.check_invariants();
        debug_assert_eq!(self.page_table(), self.header.inherited);
    }

    /// The header of a new map with the entries of `source`, whose non-ZERO pages are `table`
    /// (see [`VolumeMap::page_table`]): a read-only snapshot, or a writable clone of `size`
    /// bytes (at least the source's). Every page is inherited, none copied, so the new map is
    /// one header: the source's page objects in `table` never change again. The origin table
    /// comes along, so every OBJECT entry keeps naming the same object and, not being the new
    /// map's own, is SHARED.
    pub fn derived_header(
        source: &MapHeader,
        table: &[(u32, PageOwner)],
        name: VolumeName,
        writable: Option<u64>,
    ) -> Result<MapHeader, MapperError> {
        let uuid = Uuid::new_v4();
        let mut origins = source.origins.clone();
        let (flags, self_origin, epoch, size) = match writable {
            None => (
                MapFlags::READ_ONLY.with(MapFlags::NO_OWN_PAGES),
                None,
                source.epoch.max(1),
                source.size,
            ),
            Some(size) => {
                let index = u16::try_from(origins.len())
                    .ok()
                    .filter(|&i| i < u16::MAX - 1)
                    .ok_or_else(|| MapperError::TooManyOrigins {
                        volume: name.to_string(),
                    })?;
                origins.push(uuid);
                (MapFlags::default(), Some(index), 1, size.max(source.size))
            }
        };
        let header = MapHeader {
            name,
            uuid,
            size,
            block_size: source.block_size,
            page_entries: source.page_entries,
            epoch,
            flags,
            created: now_secs(),
            fence_generation: 0,
            self_origin,
            origins,
            source: Some(source.name.to_string()),
            page_generation: 0,
            inherited: table.to_vec(),
        };
        header
            .validate()
            .map_err(|e| corrupt(&header_object(&header.name), e))?;
        Ok(header)
    }

    /// Read and verify a whole map from storage.
    pub async fn load(maps: &dyn Blocker, name: &VolumeName) -> Result<Self, MapperError> {
        let (header, header_version) = Self::load_header(maps, name).await?;
        let mut pages = Vec::with_capacity(header.page_count() as usize);
        for p in 0..header.page_count() {
            pages.push(Self::load_page(maps, name, &header, p).await?);
        }
        let map = VolumeMap {
            header,
            header_version,
            pages,
        };
        map.check_invariants();
        Ok(map)
    }

    /// The header and the pages covering bytes `[offset, offset + length)` only, fresh from
    /// storage (the pages of the first block for an empty range): what a
    /// mapper that does not hold the volume's lock reads per request (another node is writing
    /// it, so nothing may be cached). The other pages are left empty, so the result answers
    /// questions about that block range and nothing else; it is never installed as a cache.
    pub async fn load_window(
        maps: &dyn Blocker,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Self, MapperError> {
        let (header, header_version) = Self::load_header(maps, name).await?;
        let bs = u64::from(header.block_size);
        let last_block = header.block_count().saturating_sub(1);
        let first = (offset / bs).min(last_block);
        let last = (offset.saturating_add(length.saturating_sub(1)) / bs).min(last_block);
        let per_page = u64::from(header.page_entries);
        let window = (first / per_page)..=(last / per_page);
        let mut pages = Vec::with_capacity(header.page_count() as usize);
        for p in 0..header.page_count() {
            if window.contains(&u64::from(p)) {
                pages.push(Self::load_page(maps, name, &header, p).await?);
            } else {
                pages.push(PageSlot::zero(0));
            }
        }
        Ok(VolumeMap {
            header,
            header_version,
            pages,
        })
    }

    async fn load_header(
        maps: &dyn Blocker,
        name: &VolumeName,
    ) -> Result<(MapHeader, u64), MapperError> {
        let object = header_object(name);
        let raw = maps
            .read_map(&object)
            .await
            .ctx(name)?
            .ok_or_else(|| MapperError::NotFound {
                volume: name.to_string(),
            })?;
        let header = MapHeader::decode(&raw.data).map_err(|e| corrupt(&object, e))?;
        if &header.name != name {
            return Err(corrupt(
                &object,
                MapFormatError::Invalid(format!("header names volume {}", header.name)),
            ));
        }
        Ok((header, raw.version))
    }

    async fn load_page(
        maps: &dyn Blocker,
        name: &VolumeName,
        header: &MapHeader,
        p: u32,
    ) -> Result<PageSlot, MapperError> {
        // A map with no pages of its own (a snapshot of a live volume) costs no read for them.
        if !header.no_own_pages() {
            let own = header.own_pages();
            let object = page_object(own, p);
            if let Some(v) = maps.read_map(&object).await.ctx(name)? {
                let page = MapPage::decode(&v.data, own, p, header.page_entries)
                    .map_err(|e| corrupt(&object, e))?;
                check_page(header, p, &page).map_err(|e| corrupt(&object, e))?;
                return Ok(PageSlot {
                    page,
                    version: Some(v.version),
                    inherited: None,
                });
            }
        }
        let Ok(i) = header.inherited.binary_search_by_key(&p, |&(q, _)| q) else {
            return Ok(PageSlot::zero(header.page_entries));
        };
        let owner = header.inherited[i].1;
        let object = page_object(owner, p);
        // An inherited page must exist: reading it as ZERO would silently lose data.
        let v = maps.read_map(&object).await.ctx(name)?.ok_or_else(|| {
            corrupt(
                &object,
                MapFormatError::Invalid(format!("page {p} inherited by {name} is missing")),
            )
        })?;
        let page = MapPage::decode(&v.data, owner, p, header.page_entries)
            .map_err(|e| corrupt(&object, e))?;
        check_page(header, p, &page).map_err(|e| corrupt(&object, e))?;
        Ok(PageSlot {
            page,
            version: None,
            inherited: Some(owner),
        })
    }

    /// Internal consistency that no input can break: a failure here is a bug in the mapper.
    pub fn check_invariants(&self) {
        let h = &self.header;
        assert_eq!(
            self.pages.len(),
            h.page_count() as usize,
            "{}: page count does not match the size",
            h.name
        );
        assert!(
            self.pages
                .iter()
                .all(|s| s.page.len() == h.page_entries as usize),
            "{}: a page has the wrong number of entries",
            h.name
        );
        assert!(
            (self.pages.len() as u64) * u64::from(h.page_entries) >= h.block_count(),
            "{}: entries do not cover the volume",
            h.name
        );
    }

    pub fn block_count(&self) -> u64 {
        self.header.block_count()
    }

    fn locate(&self, block: u64) -> (usize, usize) {
        let pe = u64::from(self.header.page_entries);
        ((block / pe) as usize, (block % pe) as usize)
    }

    pub fn state(&self, block: u64) -> BlockState {
        assert!(block < self.block_count(), "block {block} out of range");
        let (p, i) = self.locate(block);
        let slot = &self.pages[p];
        match slot.page.get(i) {
            MapEntry::Zero => BlockState::Zero,
            MapEntry::Content { .. } => BlockState::Content,
            MapEntry::Object { origin, epoch } => {
                // An inherited page is shared with the map it came from (a snapshot shares the
                // volume's frozen pages): nothing in it is this map's to overwrite, whatever it
                // names. The epoch already says so; this says it twice.
                if !self.header.read_only()
                    && slot.inherited.is_none()
                    && Some(origin) == self.header.self_origin
                    && epoch == self.header.epoch
                {
                    BlockState::Owned
                } else {
                    BlockState::Shared
                }
            }
        }
    }

    /// The object holding `block`, or `None` for a ZERO block.
    pub fn object(&self, block: u64) -> Option<ObjectName> {
        let (p, i) = self.locate(block);
        let page = &self.pages[p].page;
        match page.get(i) {
            MapEntry::Zero => None,
            MapEntry::Object { origin, epoch } => Some(owned_object(
                self.header.origins[origin as usize],
                epoch,
                block,
            )),
            MapEntry::Content { slot } => Some(content_object(page.content(slot))),
        }
    }

    /// The object this map writes `block` into at its current epoch.
    pub fn owned_object(&self, block: u64) -> ObjectName {
        owned_object(self.header.uuid, self.header.epoch, block)
    }

    pub fn owned_entry(&self) -> MapEntry {
        MapEntry::Object {
            origin: self
                .header
                .self_origin
                .expect("only writable maps own blocks"),
            epoch: self.header.epoch,
        }
    }

    /// Which page holds `block`, and where in it.
    pub fn page_of(&self, block: u64) -> (u32, usize) {
        let (p, i) = self.locate(block);
        (p as u32, i)
    }

    /// This snapshot with `changed` pages replaced, under a new uuid: the unchanged pages are
    /// inherited from wherever they live now. A snapshot's page objects are never rewritten in
    /// place, because other maps may inherit them (and cache what they read); a changed
    /// snapshot is a new map that takes over the name (see [`VolumeMap::persist_replacement`]).
    pub fn rebased(&self, changed: BTreeMap<u32, MapPage>) -> VolumeMap {
        assert!(self.header.read_only(), "only snapshots are rebased");
        let mut header = self.header.clone();
        header.uuid = Uuid::new_v4();
        header.page_generation = 0;
        // The changed pages are the new map's own.
        header.flags = header.flags.without(MapFlags::NO_OWN_PAGES);
        header.inherited.clear();
        let own = self.header.own_pages();
        let mut pages = Vec::with_capacity(self.pages.len());
        for (p, slot) in self.pages.iter().enumerate() {
            let p = p as u32;
            let new = match changed.get(&p) {
                Some(page) => PageSlot {
                    page: page.clone(),
                    version: None,
                    inherited: None,
                },
                None if slot.page.is_zero() => PageSlot::zero(self.header.page_entries),
                None => {
                    let owner = match (slot.version, slot.inherited) {
                        (None, Some(owner)) => owner,
                        _ => own,
                    };
                    header.inherited.push((p, owner));
                    PageSlot {
                        page: slot.page.clone(),
                        version: None,
                        inherited: Some(owner),
                    }
                }
            };
            pages.push(new);
        }
        let map = VolumeMap {
            header,
            header_version: self.header_version,
            pages,
        };
        map.check_invariants();
        map
    }

    /// Write a rebased map's own pages, then swap its header in for the old one (compare-and-
    /// swap on the version the old map was read at).
    pub async fn persist_replacement(&mut self, maps: &dyn Blocker) -> Result<(), MapperError> {
        self.write_new_pages(maps).await?;
        let name = self.header.name.clone();
        let object = header_object(&name);
        self.header_version = maps
            .write_map(
                &object,
                &self.header.encode(),
                Expect::Version(self.header_version),
                None,
            )
            .await
            .ctx(&name)?;
        Ok(())
    }

    /// Write every non-empty page of a map that does not exist yet, then its header (atomic
    /// create: until the header lands, nothing refers to the pages and GC may reclaim them).
    pub async fn persist_new(&mut self, maps: &dyn Blocker) -> Result<(), MapperError> {
        self.write_new_pages(maps).await?;
        self.header_version = create_header(maps, &self.header).await?;
        Ok(())
    }

    /// The own, non-empty pages of a map nothing refers to yet, as one batch.
    async fn write_new_pages(&mut self, maps: &dyn Blocker) -> Result<(), MapperError> {
        let name = self.header.name.clone();
        let own = self.header.own_pages();
        let mut written = Vec::new();
        let mut objects = Vec::new();
        for (p, slot) in self.pages.iter_mut().enumerate() {
            if slot.page.is_zero() || slot.inherited.is_some() {
                continue;
            }
            assert!(!self.header.no_own_pages(), "a map without pages wrote one");
            slot.page.compact();
            objects.push((page_object(own, p as u32), slot.page.encode(own, p as u32)));
            written.push(p);
        }
        // One batch: the pages are unreachable until the header below lands.
        let versions = maps.create_maps(&objects).await.ctx(&name)?;
        for (p, version) in written.into_iter().zip(versions) {
            self.pages[p].version = Some(version);
        }
        Ok(())
    }

    /// Replace the header (compare-and-swap, fenced) and install it. Inherited pages this map
    /// has since written a page of its own for are dropped from the table on the way, so that
    /// GC can reclaim what nothing else inherits.
    pub async fn persist_header(
        &mut self,
        maps: &dyn Blocker,
        mut header: MapHeader,
        fence: Option<&Fence>,
    ) -> Result<(), MapperError> {
        assert!(
            header.epoch >= self.header.epoch,
            "{}: epoch went backwards",
            header.name
        );
        assert!(
            header.size >= self.header.size,
            "{}: size went backwards",
            header.name
        );
        assert_eq!(header.uuid, self.header.uuid);
        assert_eq!(header.page_generation, self.header.page_generation);
        header.inherited.retain(|(p, _)| {
            self.pages
                .get(*p as usize)
                .is_some_and(|s| s.inherited.is_some())
        });
        let version = replace_header(maps, &mut header, self.header_version, fence).await?;
        let pages = header.page_count() as usize;
        while self.pages.len() < pages {
            self.pages.push(PageSlot::zero(header.page_entries));
        }
        self.header = header;
        self.header_version = version;
        self.check_invariants();
        Ok(())
    }
}

/// Write the header of a map that does not exist yet ("must not exist": a name taken meanwhile
/// is `AlreadyExists`). Returns its version.
pub(crate) async fn create_header(
    maps: &dyn Blocker,
    header: &MapHeader,
) -> Result<u64, MapperError> {
    let name = &header.name;
    maps.write_map(&header_object(name), &header.encode(), Expect::Absent, None)
        .await
        .map_err(|e| match e {
            crate::blocker::BlockerError::VersionMismatch { .. } => MapperError::AlreadyExists {
                volume: name.to_string(),
            },
            e => MapperError::from_blocker(name, e),
        })
}

/// Replace a map's header, expecting it at `version` (compare-and-swap), fenced, after
/// stamping it with the fence's generation and validating it. Returns the new version.
pub(crate) async fn replace_header(
    maps: &dyn Blocker,
    header: &mut MapHeader,
    version: u64,
    fence: Option<&Fence>,
) -> Result<u64, MapperError> {
    if let Some(f) = fence {
        header.fence_generation = f.generation;
    }
    header
        .validate()
        .map_err(|e| corrupt(&header_object(&header.name), e))?;
    maps.write_map(
        &header_object(&header.name),
        &header.encode(),
        Expect::Version(version),
        fence,
    )
    .await
    .ctx(&header.name)
}

/// Compact and write page `p` of `owner` (a writable map at its current page generation),
/// expecting it at `version` (None: absent). Returns the new version.
pub(crate) async fn write_page(
    maps: &dyn Blocker,
    name: &VolumeName,
    owner: PageOwner,
    p: u32,
    page: &mut MapPage,
    version: Option<u64>,
    fence: Option<&Fence>,
) -> Result<u64, MapperError> {
    page.compact();
    let expect = match version {
        Some(v) => Expect::Version(v),
        None => Expect::Absent,
    };
    let bytes = page.encode(owner, p);
    maps.write_map(&page_object(owner, p), &bytes, expect, fence)
        .await
        .ctx(name)
}

/// Checks of a page that need its header.
fn check_page(header: &MapHeader, p: u32, page: &MapPage) -> Result<(), MapFormatError> {
    let first = u64::from(p) * u64::from(header.page_entries);
    for i in 0..page.len() {
        let block = first + i as u64;
        match page.get(i) {
            MapEntry::Zero => {}
            _ if block >= header.block_count() => {
                return Err(MapFormatError::Invalid(format!(
                    "entry for block {block} past the end of the volume"
                )));
            }
            MapEntry::Object { origin, epoch } => {
                if origin as usize >= header.origins.len() {
                    return Err(MapFormatError::Invalid(format!(
                        "block {block} names origin {origin} past the table"
                    )));
                }
                if Some(origin) == header.self_origin && epoch > header.epoch {
                    return Err(MapFormatError::Invalid(format!(
                        "block {block} owned at epoch {epoch}, after the map's {}",
                        header.epoch
                    )));
                }
            }
            MapEntry::Content { .. } => {}
        }
    }
    Ok(())
}
