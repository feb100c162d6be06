//! Mark-and-sweep garbage collection of data objects and map pages.
//!
//! Nothing is reference-counted. GC lists the candidate objects first, then reads every map and
//! marks what the maps refer to, then deletes the unmarked candidates. It is safe while other
//! operations run because:
//! - names are never reused (uuid + epoch + block, or content hash), so an object that no map
//!   refers to cannot come back to life through a name collision;
//! - objects created after the listing are not candidates at all;
//! - in this mapper, every operation that makes a new reference to an existing object (create,
//!   snapshot, clone, delete, import, dedup) holds the gate that GC holds exclusively, so none
//!   is half-done while GC marks and sweeps;
//! - a page object is live while its map is at its page generation, or while a live map
//!   inherits it (a clone of a snapshot reads the snapshot's pages, even after the snapshot
//!   itself was deleted; a snapshot of a live volume and the volume itself read the volume's
//!   pages of the generation before the snapshot). A page object of an older generation that no
//!   map inherits is garbage: its map writes only its current one, and a snapshot moves the map
//!   to a new generation under the gate. An inherited page a map has since written its own
//!   page for is not inherited any more, though its header may still list it until the next
//!   header write: own pages take precedence when a map is read;
//! - MAPW runs freely: the objects it creates are named by the volume's current epoch, and GC
//!   spares every object at (or past) the current epoch of a live writable map;
//! - operations of other processes on the same backend are covered by a grace period: objects
//!   modified less than `grace` before the sweep started are kept.
//!
//! A map that fails to decode aborts the collection: GC never deletes on partial knowledge.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::volume::VolumeMap;
use super::{Mapper, MapperError, ResultExt};
use crate::blocker::ObjectInfo;
use crate::map_format::{
    CONTENT_PREFIX, HEADER_PREFIX, OWNED_PREFIX, ObjectKind, PAGE_PREFIX, QOS_PREFIX, VolumeName,
    page_object, parse_object,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcOptions {
    /// Objects modified this recently are kept even if unreferenced: they may belong to an
    /// operation of another process that has not committed its map yet.
    pub grace: Duration,
    /// Report what would be deleted without deleting it.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: Duration::from_secs(600),
            dry_run: false,
        }
    }
}

/// What a collection found and reclaimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Maps (volumes and snapshots) marked.
    pub maps: u64,
    /// Candidate objects examined (data objects and pages).
    pub examined: u64,
    pub live: u64,
    /// Unreferenced but too recent to delete.
    pub kept_recent: u64,
    /// Data objects deleted (or, in a dry run, that would be).
    pub deleted_objects: u64,
    /// Map pages of deleted maps deleted.
    pub deleted_pages: u64,
    pub deleted_bytes: u64,
}

struct LiveMap {
    page_count: u32,
    /// The generation the map's own page objects are at (older ones live only if inherited).
    page_generation: u64,
    /// The current epoch of a writable map: its objects at this epoch or later are spared.
    epoch: Option<u64>,
}

impl Mapper {
    /// Collect garbage. See the module documentation for why this is safe concurrently.
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport, MapperError> {
        let _g = self.gate.write().await;
        let here = VolumeName::new("gc").expect("valid");
        let start = SystemTime::now();
        let mut candidates: Vec<(ObjectInfo, bool)> = Vec::new();
        for prefix in [OWNED_PREFIX, CONTENT_PREFIX] {
            for info in self.data.list(prefix).await.ctx(&here)? {
                candidates.push((info, false));
            }
        }
        for prefix in [PAGE_PREFIX, QOS_PREFIX] {
            for info in self.maps.list(prefix).await.ctx(&here)? {
                candidates.push((info, true));
            }
        }

        let mut report = GcReport::default();
        let mut live_maps: HashMap<Uuid, LiveMap> = HashMap::new();
        let mut referenced = HashSet::new();
        // Page objects of other (possibly deleted) maps that live maps inherit.
        let mut inherited_pages = HashSet::new();
        for header in self.maps.list(HEADER_PREFIX).await.ctx(&here)? {
            let ObjectKind::Header(name) = parse_object(&header.name) else {
                continue;
            };
            let map = match VolumeMap::load(self.maps.as_ref(), &name).await {
                Ok(m) => m,
                Err(MapperError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            report.maps += 1;
            // What the map reads, not what its header lists: an inherited page the map has
            // since written a page of its own for is never read again (own pages at the
            // current generation take precedence and are never deleted while the map lives),
            // and its header forgets it at the next write.
            for (p, slot) in map.pages.iter().enumerate() {
                if let Some(owner) = slot.inherited {
                    inherited_pages.insert(page_object(owner, p as u32));
                }
            }
            for b in 0..map.block_count() {
                if let Some(obj) = map.object(b) {
                    referenced.insert(obj);
                }
            }
            live_maps.insert(
                map.header.uuid,
                LiveMap {
                    page_count: map.header.page_count(),
                    page_generation: map.header.page_generation,
                    epoch: (!map.header.read_only()).then_some(map.header.epoch),
                },
            );
        }

        for (info, is_page) in candidates {
            report.examined += 1;
            let live = match parse_object(&info.name) {
                ObjectKind::Page { owner, page } => {
                    inherited_pages.contains(&info.name)
                        || live_maps.get(&owner.uuid).is_some_and(|m| {
                            page < m.page_count
                                && owner.generation == m.page_generation
                                && page_object(owner, page) == info.name
                        })
                }
                ObjectKind::Owned { uuid, epoch, .. } => {
                    referenced.contains(&info.name)
                        || live_maps
                            .get(&uuid)
                            .and_then(|m| m.epoch)
                            .is_some_and(|current| epoch >= current)
                }
                ObjectKind::Content(_) => referenced.contains(&info.name),
                ObjectKind::Qos(uuid) => live_maps.contains_key(&uuid),
                // Not a name the mapper makes: not ours to judge.
                _ => true,
            };
            if live {
                report.live += 1;
                continue;
            }
            let age = start
                .duration_since(info.modified)
                .unwrap_or(Duration::ZERO);
            if age < opts.grace {
                report.kept_recent += 1;
                continue;
            }
            if !opts.dry_run {
                let blocker = if is_page { &self.maps } else { &self.data };
                blocker.delete(&info.name).await.ctx(&here)?;
            }
            if is_page {
                report.deleted_pages += 1;
            } else {
                report.deleted_objects += 1;
            }
            report.deleted_bytes += info.size;
            if !opts.dry_run {
                crate::metrics::global()
                    .gc_bytes_reclaimed
                    .fetch_add(info.size, std::sync::atomic::Ordering::Relaxed);
            }
        }
        tracing::info!(?report, dry_run = opts.dry_run, "gc done");
        Ok(report)
    }
}
