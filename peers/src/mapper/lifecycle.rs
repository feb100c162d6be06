//! Create, resize, delete, snapshot and clone: the operations that change the catalogue.
//!
//! Crash safety comes from ordering, with the header object as the commit point:
//! - a new map (create) writes its pages, then its header with "must not exist"; until then
//!   nothing refers to the pages and GC may reclaim them;
//! - a snapshot or clone writes no page at all: the new map inherits every page of its source.
//!   A writable source is first moved to a new epoch and a new page generation, inheriting its
//!   own pages of the generation before (one fenced header write), then the new map's header is
//!   written. A crash in between leaves the source consistent: it only reads those pages
//!   through its inherited table (which keeps them from GC) and copies its blocks on their next
//!   write, and a retried snapshot freezes it once more. The reverse order could let the source
//!   overwrite objects and page objects a snapshot already refers to;
//! - delete removes the header only; pages and objects are GC's.

use std::sync::Arc;

use super::volume::{VolumeMap, create_header, replace_header};
use super::{Mapper, MapperError, OpenVolume, ResultExt, VolumeInfo};
use crate::blocker::Expect;
use crate::map_format::{
    DEFAULT_BLOCK_SIZE, DEFAULT_PAGE_ENTRIES, MAX_BLOCK_SIZE, MAX_BLOCKS, MAX_PAGE_ENTRIES,
    MIN_BLOCK_SIZE, MIN_PAGE_ENTRIES, MapHeader, PageOwner, VolumeName, header_object,
};

/// A map that can be snapshotted or cloned: its header, and its non-ZERO pages with the page
/// objects that hold them, none of which will ever change.
struct Frozen {
    header: MapHeader,
    table: Vec<(u32, PageOwner)>,
}

/// Layout choices for a new volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Bytes per block (data object): a power of two from 4 KiB to 64 MiB.
    pub block_size: u32,
    /// Entries per map page: a power of two from 16 to 65536. Small pages are for tests that
    /// want many pages on small volumes.
    pub page_entries: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            page_entries: DEFAULT_PAGE_ENTRIES,
        }
    }
}

fn check_size(volume: &VolumeName, size: u64, block_size: u32) -> Result<(), MapperError> {
    let bad = |reason: &str| {
        Err(MapperError::InvalidSize {
            volume: volume.to_string(),
            size,
            reason: reason.to_string(),
        })
    };
    if size == 0 {
        return bad("must be positive");
    }
    if size % 512 != 0 {
        return bad("must be a multiple of 512");
    }
    if size.div_ceil(u64::from(block_size)) > MAX_BLOCKS {
        return bad("too many blocks for the block size");
    }
    Ok(())
}

impl Mapper {
    /// Create an empty (all ZERO) volume. Fails with `AlreadyExists` if the name is taken.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        opts: CreateOptions,
    ) -> Result<VolumeInfo, MapperError> {
        let name = VolumeName::new(name)?;
        if !opts.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&opts.block_size)
        {
            return Err(MapperError::InvalidBlockSize {
                block_size: opts.block_size,
            });
        }
        if !opts.page_entries.is_power_of_two()
            || !(MIN_PAGE_ENTRIES..=MAX_PAGE_ENTRIES).contains(&opts.page_entries)
        {
            return Err(MapperError::InvalidPageEntries {
                page_entries: opts.page_entries,
            });
        }
        check_size(&name, size, opts.block_size)?;
        let _ns = self.namespace.lock().await;
        let _g = self.gate.read().await;
        let mut map = VolumeMap::new_volume(name, size, opts.block_size, opts.page_entries);
        map.persist_new(self.maps.as_ref()).await?;
        tracing::info!(volume = %map.header.name, size, uuid = %map.header.uuid, "created");
        Ok(VolumeInfo::from(&map.header))
    }

    /// Open `name` writable for a catalogue operation; the flag says whether it was opened
    /// just for this and must be closed afterwards. Caller holds `namespace`.
    async fn hold_writable(
        &self,
        name: &VolumeName,
    ) -> Result<(Arc<OpenVolume>, bool), MapperError> {
        let temporary = self.lookup(name).is_none();
        let vol = self.open_locked(name, false).await?;
        if vol.fence.is_none() {
            if temporary {
                self.close_locked(name).await?;
            }
            return Err(MapperError::ReadOnly {
                volume: name.to_string(),
            });
        }
        Ok((vol, temporary))
    }

    async fn release_temporary(&self, name: &VolumeName, temporary: bool) {
        if temporary && let Err(e) = self.close_locked(name).await {
            tracing::warn!(volume = %name, error = %e, "closing after a catalogue operation failed");
        }
    }

    /// Grow a volume. Growing to the current size is a no-op; shrinking is refused.
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, MapperError> {
        let name = VolumeName::new(name)?;
        let _ns = self.namespace.lock().await;
        if let Ok(h) = self.read_header(&name).await
            && h.read_only()
        {
            return Err(MapperError::ReadOnly {
                volume: name.to_string(),
            });
        }
        let (vol, temporary) = self.hold_writable(&name).await?;
        let r = async {
            let _m = vol.mutate.lock().await;
            self.reload_locked(&vol).await?;
            vol.check_usable()?;
            let mut map = vol.snapshot_map();
            let current = map.header.size;
            if size == current {
                return Ok(VolumeInfo::from(&map.header));
            }
            if size < current {
                return Err(MapperError::ShrinkRefused {
                    volume: name.to_string(),
                    current,
                    requested: size,
                });
            }
            check_size(&name, size, map.header.block_size)?;
            let mut header = map.header.clone();
            header.size = size;
            let fence = vol.writable()?.clone();
            let r = map
                .persist_header(self.maps.as_ref(), header, Some(&fence))
                .await;
            vol.observe(r)?;
            vol.install(map.clone());
            tracing::info!(volume = %name, from = current, to = size, "resized");
            Ok(VolumeInfo::from(&map.header))
        }
        .await;
        self.release_temporary(&name, temporary).await;
        r
    }

    /// Delete a volume or snapshot: its header goes, everything else is left to GC. A volume
    /// locked by another node cannot be deleted.
    pub async fn delete(&self, name: &str) -> Result<(), MapperError> {
        let name = VolumeName::new(name)?;
        let _ns = self.namespace.lock().await;
        let _g = self.gate.read().await;
        let object = header_object(&name);
        if let Some(vol) = self.cached(&name).await? {
            if let Some(fence) = vol.fence.clone() {
                {
                    let _m = vol.mutate.lock().await;
                    self.reload_locked(&vol).await?;
                    vol.check_usable()?;
                    let version = vol.map().header_version;
                    let r = self
                        .maps
                        .delete_map(&object, Expect::Version(version), Some(&fence))
                        .await
                        .ctx(&name);
                    vol.observe(r)?;
                }
                self.close_locked(&name).await?;
                tracing::info!(volume = %name, "deleted");
                return Ok(());
            }
            self.close_locked(&name).await?;
        }
        let raw = self
            .maps
            .read_map(&object)
            .await
            .ctx(&name)?
            .ok_or_else(|| MapperError::NotFound {
                volume: name.to_string(),
            })?;
        // A header too damaged to decode is treated as a volume: deleting it takes the lock.
        let read_only = MapHeader::decode(&raw.data)
            .map(|h| h.read_only())
            .unwrap_or(false);
        if read_only {
            self.maps
                .delete_map(&object, Expect::Version(raw.version), None)
                .await
                .ctx(&name)?;
        } else {
            let fence = self.acquire(&name).await?;
            let r = async {
                let raw = self
                    .maps
                    .read_map(&object)
                    .await
                    .ctx(&name)?
                    .ok_or_else(|| MapperError::NotFound {
                        volume: name.to_string(),
                    })?;
                self.maps
                    .delete_map(&object, Expect::Version(raw.version), Some(&fence))
                    .await
                    .ctx(&name)
            }
            .await;
            if let Err(e) = self.maps.lock_release(&fence).await {
                tracing::warn!(volume = %name, error = %e, "releasing the lock after delete");
            }
            r?;
        }
        tracing::info!(volume = %name, "deleted");
        Ok(())
    }

    /// The map to snapshot or clone from. A writable volume is frozen first: moved to a new
    /// epoch and page generation (see [`VolumeMap::frozen_header`]), so that from now on it
    /// writes new objects and new page objects and leaves the shared ones alone. A snapshot
    /// with no pages of its own is answered from its header alone. Caller holds `namespace` and
    /// `gate`.
    async fn freeze_source(&self, source: &VolumeName) -> Result<Frozen, MapperError> {
        match self.cached(source).await? {
            Some(v) if v.fence.is_none() => {
                let map = v.map();
                let table = if map.header.no_own_pages() {
                    map.header.inherited.clone()
                } else {
                    map.page_table()
                };
                return Ok(Frozen {
                    header: map.header.clone(),
                    table,
                });
            }
            Some(_) => {}
            None => {
                let header = self.read_header(source).await?;
                if header.read_only() {
                    if header.no_own_pages() {
                        let table = header.inherited.clone();
                        return Ok(Frozen { header, table });
                    }
                    let map = VolumeMap::load(self.maps.as_ref(), source).await?;
                    let table = map.page_table();
                    return Ok(Frozen {
                        header: map.header,
                        table,
                    });
                }
            }
        }
        let (vol, temporary) = self.hold_writable(source).await?;
        let r = async {
            let _m = vol.mutate.lock().await;
            self.reload_locked(&vol).await?;
            vol.check_usable()?;
            let (mut header, version) = {
                let map = vol.map();
                (map.frozen_header()?, map.header_version)
            };
            let fence = vol.writable()?.clone();
            let r = replace_header(self.maps.as_ref(), &mut header, version, Some(&fence)).await;
            let version = vol.observe(r)?;
            // In place, under the write lock: the cache must say what storage says now (every
            // block SHARED, every page inherited), without copying a terabyte's map for it.
            vol.map
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .freeze(header.clone(), version);
            let table = header.inherited.clone();
            tracing::debug!(volume = %source, epoch = header.epoch, page_generation = header.page_generation, pages = table.len(), "frozen for a snapshot");
            Ok(Frozen { header, table })
        }
        .await;
        self.release_temporary(source, temporary).await;
        r
    }

    async fn refuse_existing(&self, name: &VolumeName) -> Result<(), MapperError> {
        if self
            .maps
            .read_map(&header_object(name))
            .await
            .ctx(name)?
            .is_some()
        {
            return Err(MapperError::AlreadyExists {
                volume: name.to_string(),
            });
        }
        Ok(())
    }

    /// A read-only snapshot of a volume (or a copy of a snapshot). Instant: no data and no page
    /// is copied; the metadata cost is one header (plus one for a live volume, which moves to a
    /// new epoch and page generation), whatever the size of the volume.
    pub async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo, MapperError> {
        let source = VolumeName::new(volume)?;
        let name = VolumeName::new(snapshot)?;
        let _ns = self.namespace.lock().await;
        let _g = self.gate.read().await;
        self.refuse_existing(&name).await?;
        let frozen = self.freeze_source(&source).await?;
        let snap = VolumeMap::derived_header(&frozen.header, &frozen.table, name, None)?;
        create_header(self.maps.as_ref(), &snap).await?;
        tracing::info!(volume = %source, snapshot = %snap.name, uuid = %snap.uuid, pages = snap.inherited.len(), "snapshot taken");
        Ok(VolumeInfo::from(&snap))
    }

    /// A writable volume whose blocks are the source's, all SHARED until written. The source
    /// may be a snapshot or a volume (which then moves to a new epoch, an implicit snapshot).
    /// `size` may grow the clone; it defaults to the source's size.
    pub async fn clone_volume(
        &self,
        source: &str,
        target: &str,
        size: Option<u64>,
    ) -> Result<VolumeInfo, MapperError> {
        let source = VolumeName::new(source)?;
        let name = VolumeName::new(target)?;
        let _ns = self.namespace.lock().await;
        let _g = self.gate.read().await;
        self.refuse_existing(&name).await?;
        // Check the size before freezing, so that bad input changes nothing.
        let src_header = match self.cached(&source).await? {
            Some(v) => v.map().header.clone(),
            None => self.read_header(&source).await?,
        };
        let size = size.unwrap_or(src_header.size);
        if size < src_header.size {
            return Err(MapperError::ShrinkRefused {
                volume: name.to_string(),
                current: src_header.size,
                requested: size,
            });
        }
        check_size(&name, size, src_header.block_size)?;
        if src_header.origins.len() + 1 >= u16::MAX as usize - 1 {
            return Err(MapperError::TooManyOrigins {
                volume: name.to_string(),
            });
        }
        let frozen = self.freeze_source(&source).await?;
        let clone = VolumeMap::derived_header(&frozen.header, &frozen.table, name, Some(size))?;
        create_header(self.maps.as_ref(), &clone).await?;
        tracing::info!(source = %source, clone = %clone.name, uuid = %clone.uuid, pages = clone.inherited.len(), "cloned");
        Ok(VolumeInfo::from(&clone))
    }
}
