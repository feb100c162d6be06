//! MAPR, MAPW and discard: volume byte ranges to object extents.
//!
//! MAPW makes every block of the range OWNED before answering:
//! - ZERO → OWNED: nothing to copy; any object still under the new name (emptied by a discard,
//!   or left with data by a crash) is truncated first, so the unwritten part reads as zeros;
//! - SHARED/CONTENT → OWNED, partial write: the old object is copied server-side first;
//! - SHARED/CONTENT → OWNED, whole block: no copy, the caller's write replaces it all.
//!
//! The new entries are persisted (one page write per touched page) before the extents are
//! returned. Blocks already OWNED are answered from the cached map without any I/O.
//!
//! An owned object's name (uuid + epoch + block) comes back within the epoch whenever its block
//! is discarded and written again, so a discard *truncates* the object instead of deleting it.
//! The data is written by another process (the blocker peer), whose file blocker caches open
//! descriptors: had the discard unlinked the file, the next write would go through that cached
//! descriptor into the unlinked file (lost at the blocker's next restart) while its reads
//! showed the pre-discard data where zeros belong. Truncation keeps the inode, so every cached
//! descriptor sees the emptied object. The empty file costs an inode until the epoch moves on
//! and GC reclaims it; objects are deleted only once their name can never be written again.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::volume::{BlockState, PageSlot, VolumeMap, write_page};
use super::{Mapper, MapperError, OpenVolume, ResultExt};
use crate::block_range::{self, Piece};
use crate::blocker::ObjectName;
use crate::map_format::{MapEntry, MapPage, VolumeName};

/// Where a piece of a volume range lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// No object: reads return zeros, with no backend I/O.
    Zero,
    Object(ObjectName),
}

/// A piece of a volume range within one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    pub volume_offset: u64,
    pub length: u64,
    pub block: u64,
    pub object_offset: u64,
    pub target: Target,
}

impl Extent {
    pub fn is_zero(&self) -> bool {
        self.target == Target::Zero
    }

    pub fn object(&self) -> Option<&ObjectName> {
        match &self.target {
            Target::Zero => None,
            Target::Object(o) => Some(o),
        }
    }
}

/// What a discard did, and what is left for the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscardOutcome {
    /// Blocks turned into ZERO entries.
    pub zeroed_blocks: u64,
    /// Partial blocks that still hold data: already mapped writable; the caller writes zeros
    /// into these extents.
    pub zero_write: Vec<Extent>,
}

fn pieces(map: &VolumeMap, offset: u64, length: u64) -> Vec<Piece> {
    block_range::split(offset, length, u64::from(map.header.block_size))
}

/// Whether `p` covers its whole block, so a write of it needs no copy of the old data.
fn whole(map: &VolumeMap, p: &Piece) -> bool {
    p.covers(map.header.block_len(p.block))
}

fn check_range(map: &VolumeMap, offset: u64, length: u64) -> Result<(), MapperError> {
    match offset.checked_add(length) {
        Some(end) if end <= map.header.size => Ok(()),
        _ => Err(MapperError::OutOfRange {
            volume: map.header.name.to_string(),
            offset,
            length,
            size: map.header.size,
        }),
    }
}

fn extents(map: &VolumeMap, offset: u64, length: u64) -> Vec<Extent> {
    pieces(map, offset, length)
        .into_iter()
        .map(|p| Extent {
            volume_offset: p.volume_offset,
            length: p.len,
            block: p.block,
            object_offset: p.object_offset,
            target: map.object(p.block).map_or(Target::Zero, Target::Object),
        })
        .collect()
}

impl Mapper {
    /// The objects holding `[offset, offset + length)`; ZERO extents need no I/O. Served from
    /// the cache when the volume is open here, else from a fresh read of the map (never from a
    /// stale cache of a volume someone else may be writing). A shared volume is served from the
    /// cache only while this node still holds its lock.
    pub async fn map_read(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, MapperError> {
        let name = VolumeName::new(name)?;
        let cached = if self.is_shared(&name) {
            self.held_shared(&name).await?
        } else {
            self.lookup(&name)
        };
        if let Some(vol) = cached {
            self.refresh(&vol).await?;
            vol.check_usable()?;
            let map = vol.map();
            check_range(&map, offset, length)?;
            return Ok(extents(&map, offset, length));
        }
        // Only the pages the range touches: a shared volume pays this on every read.
        let map = VolumeMap::load_window(self.maps.as_ref(), &name, offset, length).await?;
        check_range(&map, offset, length)?;
        Ok(extents(&map, offset, length))
    }

    /// The open, writable volume `name`, opening it (and taking its lock) on first use. A
    /// shared volume takes the lock over from another node (the handover).
    pub(crate) async fn writable_volume(
        &self,
        name: &VolumeName,
    ) -> Result<Arc<OpenVolume>, MapperError> {
        let shared = self.is_shared(name);
        let found = if shared {
            self.held_shared(name).await?
        } else {
            self.lookup(name)
        };
        let vol = match found {
            Some(v) => v,
            None => {
                let _ns = self.namespace.lock().await;
                match self.lookup(name) {
                    Some(v) => v,
                    None => self.open_locked(name, shared).await?,
                }
            }
        };
        vol.writable()?;
        self.refresh(&vol).await?;
        vol.check_usable()?;
        Ok(vol)
    }

    /// Writable extents for `[offset, offset + length)`, after copy-on-write. The map change is
    /// durable when this returns; the data is the caller's to write.
    pub async fn map_write(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, MapperError> {
        let name = VolumeName::new(name)?;
        let vol = self.writable_volume(&name).await?;
        {
            let map = vol.map();
            check_range(&map, offset, length)?;
            if pieces(&map, offset, length)
                .iter()
                .all(|p| map.state(p.block) == BlockState::Owned)
            {
                return Ok(extents(&map, offset, length));
            }
        }
        let _m = vol.mutate.lock().await;
        self.reload_locked(&vol).await?;
        vol.check_usable()?;
        let r = self.copy_on_write(&vol, offset, length).await;
        vol.observe(r)?;
        let map = vol.map();
        Ok(extents(&map, offset, length))
    }

    /// Make every block of the range OWNED. Caller holds `vol.mutate`.
    async fn copy_on_write(
        &self,
        vol: &OpenVolume,
        offset: u64,
        length: u64,
    ) -> Result<(), MapperError> {
        let fence = vol.writable()?.clone();
        let name = &vol.name;
        // Work out everything under the read lock, then do I/O without it: the map cannot
        // change meanwhile because we hold `mutate`.
        let (todo, mut pages, own, owned_entry) = {
            let map = vol.map();
            let mut todo = Vec::new();
            let mut pages: BTreeMap<u32, (MapPage, Option<u64>)> = BTreeMap::new();
            for p in pieces(&map, offset, length) {
                let state = map.state(p.block);
                if state == BlockState::Owned {
                    continue;
                }
                let (page, _) = map.page_of(p.block);
                pages.entry(page).or_insert_with(|| {
                    let slot = &map.pages[page as usize];
                    (slot.page.clone(), slot.version)
                });
                todo.push((
                    p,
                    whole(&map, &p),
                    state,
                    map.object(p.block),
                    map.owned_object(p.block),
                ));
            }
            (todo, pages, map.header.own_pages(), map.owned_entry())
        };
        for (piece, whole, state, old, new) in &todo {
            tracing::debug!(volume = %name, block = piece.block, ?state, whole, old = ?old.as_ref().map(|o| o.as_str()), new = new.as_str(), "making a block owned");
            match (state, whole) {
                // Even a whole-block write truncates: if the write never happens (the writer
                // dies after MAPW), the block must read as zeros, not as the stale object.
                (BlockState::Zero, _) => {
                    self.data.truncate(new).await.ctx(name)?;
                }
                (_, true) => {}
                (_, false) => {
                    let old = old.as_ref().expect("non-zero blocks have an object");
                    self.data.copy(old, new).await.ctx(name)?;
                    crate::metrics::global()
                        .cow_copies
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        let page_entries = u64::from(vol.map().header.page_entries);
        for (piece, _, _, _, _) in &todo {
            let p = (piece.block / page_entries) as u32;
            let i = (piece.block % page_entries) as usize;
            pages.get_mut(&p).expect("planned").0.set(i, owned_entry);
        }
        self.persist_pages(vol, own, pages, &fence).await
    }

    /// Persist changed pages one by one (as page objects of `own`, the volume's current page
    /// generation), installing each in the cache as soon as it is durable so that the cache
    /// never runs ahead of, or behind, storage.
    pub(super) async fn persist_pages(
        &self,
        vol: &OpenVolume,
        own: crate::map_format::PageOwner,
        pages: BTreeMap<u32, (MapPage, Option<u64>)>,
        fence: &crate::blocker::Fence,
    ) -> Result<(), MapperError> {
        for (p, (mut page, version)) in pages {
            let version = write_page(
                self.maps.as_ref(),
                &vol.name,
                own,
                p,
                &mut page,
                version,
                Some(fence),
            )
            .await?;
            let mut map = vol.map.write().unwrap_or_else(|e| e.into_inner());
            map.pages[p as usize] = PageSlot {
                page,
                version: Some(version),
                inherited: None,
            };
        }
        Ok(())
    }

    /// Discard (or write zeroes to) a range: whole blocks become ZERO entries and their owned
    /// objects are truncated (never deleted: the name comes back at the block's next write, see
    /// the module documentation); partial blocks that hold data come back as writable extents
    /// for the caller to fill with zeros.
    pub async fn discard(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<DiscardOutcome, MapperError> {
        let vname = VolumeName::new(name)?;
        let vol = self.writable_volume(&vname).await?;
        let mut outcome = DiscardOutcome::default();
        let mut partial = Vec::new();
        {
            let _m = vol.mutate.lock().await;
            self.reload_locked(&vol).await?;
            vol.check_usable()?;
            let fence = vol.writable()?.clone();
            let (pages, own, doomed) = {
                let map = vol.map();
                check_range(&map, offset, length)?;
                let mut pages: BTreeMap<u32, (MapPage, Option<u64>)> = BTreeMap::new();
                let mut doomed = Vec::new();
                for p in pieces(&map, offset, length) {
                    let state = map.state(p.block);
                    if state == BlockState::Zero {
                        continue;
                    }
                    if !whole(&map, &p) {
                        partial.push(p);
                        continue;
                    }
                    if state == BlockState::Owned {
                        doomed.push(map.object(p.block).expect("owned"));
                    }
                    let (page, i) = map.page_of(p.block);
                    let slot = &map.pages[page as usize];
                    pages
                        .entry(page)
                        .or_insert_with(|| (slot.page.clone(), slot.version))
                        .0
                        .set(i, MapEntry::Zero);
                    outcome.zeroed_blocks += 1;
                }
                (pages, map.header.own_pages(), doomed)
            };
            tracing::debug!(volume = %vname, offset, length, zeroed = outcome.zeroed_blocks, partial = partial.len(), "discarding");
            let r = self.persist_pages(&vol, own, pages, &fence).await;
            vol.observe(r)?;
            // Only now that no entry names them: an owned object is referenced by this map
            // alone, so its data is garbage the moment its entry is ZERO. Truncated, not
            // deleted: the name is reused by the block's next write in this epoch.
            for obj in doomed {
                self.data.truncate(&obj).await.ctx(&vname)?;
            }
        }
        for p in partial {
            outcome
                .zero_write
                .extend(self.map_write(name, p.volume_offset, p.len).await?);
        }
        Ok(outcome)
    }
}
