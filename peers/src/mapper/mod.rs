//! The mapper: the volume catalogue and the translation of volume byte ranges into object
//! extents, with copy-on-write, snapshots, clones, locks, dedup and GC.
//!
//! One [`Mapper`] serves many volumes and many concurrent callers. A volume opened for writing
//! is locked in the backend under this mapper's node identity (with a fencing generation) and
//! its map is cached, so a MAPW of an OWNED block is answered from memory. Everything that
//! changes a map is persisted (page or header compare-and-swap, fenced) before the call returns.
//!
//! Concurrency, from outermost to innermost lock:
//! - `namespace` serialises catalogue changes (open, close, create, snapshot, clone, delete,
//!   resize) within this mapper; they are control-plane operations and rare.
//! - `gate` is shared by operations that create references to objects (create, snapshot, clone,
//!   delete, import, dedup) and held exclusively by GC for its whole mark and sweep, so no
//!   reference can appear behind GC's back in this process. MAPW needs no gate: the objects it
//!   creates are named by the volume's current epoch, which GC always spares.
//! - per volume, `mutate` serialises map changes (copy-on-write, discard, import, resize,
//!   snapshot), and a short synchronous `RwLock` guards the cached map itself.
//!
//! Files: `volume.rs` (the cached map), `io.rs` (MAPR, MAPW, discard), `lifecycle.rs` (create,
//! resize, delete, snapshot, clone), `dedup.rs` (dedup and import), `gc.rs`,
//! `peer.rs` (the mapper peer: this API served over xseg).

mod dedup;
mod gc;
mod io;
mod lifecycle;
pub mod peer;
mod qos;
mod volume;

pub use dedup::{DedupReport, ImportReport};
pub use gc::{GcOptions, GcReport};
pub use io::{DiscardOutcome, Extent, Target};
pub use lifecycle::CreateOptions;
pub use qos::QosLimits;
pub use volume::BlockState;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::blocker::{Blocker, BlockerError, Fence, LockInfo, LockOwner, ObjectName};
use crate::map_format::{
    CorruptMap, InvalidVolumeName, MapHeader, VolumeName, header_object, lock_object, page_object,
};
use volume::VolumeMap;

/// Everything the mapper can refuse or fail with. Each variant names the volume.
#[derive(Debug, thiserror::Error)]
pub enum MapperError {
    #[error(transparent)]
    InvalidName(#[from] InvalidVolumeName),
    #[error("volume {volume} not found")]
    NotFound { volume: String },
    #[error("volume {volume} already exists")]
    AlreadyExists { volume: String },
    #[error("{volume} is a read-only snapshot")]
    ReadOnly { volume: String },
    #[error("{volume} is not a snapshot")]
    NotASnapshot { volume: String },
    #[error("invalid size {size} for {volume}: {reason}")]
    InvalidSize {
        volume: String,
        size: u64,
        reason: String,
    },
    #[error("invalid block size {block_size}: a power of two from 4 KiB to 64 MiB")]
    InvalidBlockSize { block_size: u32 },
    #[error("invalid page size {page_entries}: a power of two from 16 to 65536 entries")]
    InvalidPageEntries { page_entries: u32 },
    #[error("range {offset}+{length} is outside {volume} ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("{volume}: import range {offset}+{length} is not block-aligned")]
    Unaligned {
        volume: String,
        offset: u64,
        length: u64,
    },
    #[error("shrinking {volume} from {current} to {requested} bytes is not supported")]
    ShrinkRefused {
        volume: String,
        current: u64,
        requested: u64,
    },
    #[error("volume {volume} is locked by {holder}")]
    Locked { volume: String, holder: String },
    #[error("volume {volume}: this mapper's lock was broken or taken over; it must be reopened")]
    Fenced { volume: String },
    #[error("volume {volume} was closed")]
    Closed { volume: String },
    #[error("volume {volume} was changed concurrently by another mapper")]
    Conflict { volume: String },
    #[error("{volume}: too many origins (clone chain too deep)")]
    TooManyOrigins { volume: String },
    #[error("{volume}: epoch exhausted")]
    EpochExhausted { volume: String },
    #[error(transparent)]
    Corrupt(#[from] CorruptMap),
    #[error(
        "{volume}: lock generation {lock} is older than the map's {map}: the lock object went backwards"
    )]
    LockRegressed { volume: String, lock: u64, map: u64 },
    #[error("volume {volume}: {source}")]
    Blocker {
        volume: String,
        #[source]
        source: BlockerError,
    },
}

impl MapperError {
    pub(crate) fn from_blocker(volume: &VolumeName, e: BlockerError) -> Self {
        let volume = volume.to_string();
        match e {
            BlockerError::Fenced { .. } => MapperError::Fenced { volume },
            BlockerError::Locked { holder, .. } => MapperError::Locked { volume, holder },
            BlockerError::VersionMismatch { .. } => MapperError::Conflict { volume },
            source => MapperError::Blocker { volume, source },
        }
    }
}

/// Attach the volume to a blocker error.
pub(crate) trait ResultExt<T> {
    fn ctx(self, volume: &VolumeName) -> Result<T, MapperError>;
}

impl<T> ResultExt<T> for Result<T, BlockerError> {
    fn ctx(self, volume: &VolumeName) -> Result<T, MapperError> {
        self.map_err(|e| MapperError::from_blocker(volume, e))
    }
}

/// A volume or snapshot as the catalogue shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub uuid: Uuid,
    pub size: u64,
    pub block_size: u32,
    pub epoch: u64,
    pub snapshot: bool,
    /// What it was snapshotted or cloned from.
    pub source: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl From<&MapHeader> for VolumeInfo {
    fn from(h: &MapHeader) -> Self {
        VolumeInfo {
            name: h.name.to_string(),
            uuid: h.uuid,
            size: h.size,
            block_size: h.block_size,
            epoch: h.epoch,
            snapshot: h.read_only(),
            source: h.source.clone(),
            created: h.created,
        }
    }
}

/// Block counts of a verified map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub blocks: u64,
    pub zero: u64,
    pub owned: u64,
    pub shared: u64,
    pub content: u64,
}

const OPEN: u8 = 0;
const CLOSED: u8 = 1;
const FENCED: u8 = 2;

/// A volume this mapper has open: its cached map, and for a writable volume the lock fence.
///
/// The cache is only worth having if it says what storage says. A map write that returns an
/// error may still have landed (a backend can lose the completion of a write it made), so after
/// any failed map change the cache is marked `stale` and is read back from storage before the
/// volume answers anything else: never guessed from what we tried to write. Trusting the old
/// cache instead let a discard whose page write "failed" but landed keep a block OWNED in the
/// cache and ZERO in storage, so later writes to it went out with no map entry and were lost
/// at the next restart (the fault-injection model test found it).
#[derive(Debug)]
pub(crate) struct OpenVolume {
    name: VolumeName,
    fence: Option<Fence>,
    map: RwLock<VolumeMap>,
    mutate: tokio::sync::Mutex<()>,
    state: AtomicU8,
    stale: AtomicBool,
}

impl OpenVolume {
    fn map(&self) -> std::sync::RwLockReadGuard<'_, VolumeMap> {
        // The map is only replaced whole, after persisting; a panic cannot leave it half-done.
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    fn snapshot_map(&self) -> VolumeMap {
        self.map().clone()
    }

    fn install(&self, map: VolumeMap) {
        map.check_invariants();
        let mut guard = self.map.write().unwrap_or_else(|e| e.into_inner());
        assert!(
            map.header.epoch >= guard.header.epoch,
            "{}: epoch went backwards",
            self.name
        );
        *guard = map;
    }

    /// Fail if the volume was closed or fenced while the caller waited.
    fn check_usable(&self) -> Result<(), MapperError> {
        match self.state.load(Ordering::Acquire) {
            OPEN => Ok(()),
            CLOSED => Err(MapperError::Closed {
                volume: self.name.to_string(),
            }),
            _ => Err(MapperError::Fenced {
                volume: self.name.to_string(),
            }),
        }
    }

    /// Note how a map change ended: a fencing failure makes the volume unusable here (later
    /// calls fail fast); any other failure leaves storage in a state the cache cannot know (the
    /// write may have landed), so the map is reloaded before its next use.
    fn observe<T>(&self, r: Result<T, MapperError>) -> Result<T, MapperError> {
        match &r {
            Ok(_) => {}
            Err(MapperError::Fenced { .. }) => {
                tracing::error!(volume = %self.name, "map write fenced: lock lost, volume unusable here");
                self.state.store(FENCED, Ordering::Release);
            }
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "map change failed; the map will be read back from storage");
                self.mark_stale();
            }
        }
        r
    }

    fn mark_stale(&self) {
        self.stale.store(true, Ordering::Release);
    }

    fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    fn writable(&self) -> Result<&Fence, MapperError> {
        self.fence.as_ref().ok_or_else(|| MapperError::ReadOnly {
            volume: self.name.to_string(),
        })
    }
}

/// Whether a map read from storage fits how it is open here: a writable volume under our lock
/// (the map never carries a newer fence generation than the lock), a snapshot read-only.
fn check_loaded(
    name: &VolumeName,
    fence: Option<&Fence>,
    map: VolumeMap,
) -> Result<VolumeMap, MapperError> {
    match fence {
        Some(_) if map.header.read_only() => Err(MapperError::Conflict {
            volume: name.to_string(),
        }),
        Some(f) if map.header.fence_generation > f.generation => Err(MapperError::LockRegressed {
            volume: name.to_string(),
            lock: f.generation,
            map: map.header.fence_generation,
        }),
        None if !map.header.read_only() => Err(MapperError::Conflict {
            volume: name.to_string(),
        }),
        _ => Ok(map),
    }
}

/// Where a cached map differs from the one in storage, if it does: the object and what.
fn cache_divergence(cached: &VolumeMap, stored: &VolumeMap) -> Option<(ObjectName, String)> {
    let header = || header_object(&stored.header.name);
    if cached.header != stored.header {
        return Some((header(), "header".into()));
    }
    if cached.header_version != stored.header_version {
        return Some((
            header(),
            format!(
                "header version {} cached, {} stored",
                cached.header_version, stored.header_version
            ),
        ));
    }
    if cached.pages.len() != stored.pages.len() {
        return Some((header(), "page count".into()));
    }
    let own = stored.header.own_pages();
    for (p, (c, s)) in cached.pages.iter().zip(&stored.pages).enumerate() {
        let object = || page_object(s.inherited.unwrap_or(own), p as u32);
        if c.page != s.page {
            return Some((object(), format!("page {p} entries")));
        }
        if c.version != s.version {
            return Some((
                object(),
                format!(
                    "page {p} version {:?} cached, {:?} stored",
                    c.version, s.version
                ),
            ));
        }
        if c.inherited != s.inherited {
            return Some((
                object(),
                format!(
                    "page {p} inherited from {:?} cached, {:?} stored",
                    c.inherited, s.inherited
                ),
            ));
        }
    }
    None
}

/// The mapper over one blocker (maps and data together) or two (maps apart from data).
#[derive(Debug)]
pub struct Mapper {
    maps: Arc<dyn Blocker>,
    data: Arc<dyn Blocker>,
    owner: LockOwner,
    open: RwLock<HashMap<VolumeName, Arc<OpenVolume>>>,
    /// Volumes opened shared (see [`Mapper::open_shared`]).
    shared: RwLock<HashSet<VolumeName>>,
    namespace: tokio::sync::Mutex<()>,
    gate: tokio::sync::RwLock<()>,
    content: tokio::sync::Mutex<()>,
}

impl Mapper {
    /// A mapper storing maps and data in the same backend, locking volumes as `owner`.
    pub fn new(blocker: Arc<dyn Blocker>, owner: LockOwner) -> Self {
        Self::with_blockers(blocker.clone(), blocker, owner)
    }

    pub fn with_blockers(maps: Arc<dyn Blocker>, data: Arc<dyn Blocker>, owner: LockOwner) -> Self {
        Mapper {
            maps,
            data,
            owner,
            open: RwLock::new(HashMap::new()),
            shared: RwLock::new(HashSet::new()),
            namespace: tokio::sync::Mutex::new(()),
            gate: tokio::sync::RwLock::new(()),
            content: tokio::sync::Mutex::new(()),
        }
    }

    pub fn owner(&self) -> &LockOwner {
        &self.owner
    }

    /// The blocker data objects live in (what the extents name).
    pub fn data_blocker(&self) -> &Arc<dyn Blocker> {
        &self.data
    }

    pub fn map_blocker(&self) -> &Arc<dyn Blocker> {
        &self.maps
    }

    fn lookup(&self, name: &VolumeName) -> Option<Arc<OpenVolume>> {
        self.open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Open a volume for writing (taking its lock) or a snapshot for reading, and cache its
    /// map. Opening what is already open here is a no-op.
    pub async fn open(&self, name: &str) -> Result<VolumeInfo, MapperError> {
        let name = VolumeName::new(name)?;
        let _ns = self.namespace.lock().await;
        let vol = self.open_locked(&name, false).await?;
        Ok(VolumeInfo::from(&vol.map().header))
    }

    /// Open a volume or snapshot, caching its map. A writable volume is locked as this node;
    /// with `takeover`, a lock held by another node is broken first (the shared-mode handover,
    /// logged), otherwise it is refused with `Locked`.
    async fn open_locked(
        &self,
        name: &VolumeName,
        takeover: bool,
    ) -> Result<Arc<OpenVolume>, MapperError> {
        if let Some(v) = self.cached(name).await? {
            return Ok(v);
        }
        let raw = self
            .maps
            .read_map(&header_object(name))
            .await
            .ctx(name)?
            .ok_or_else(|| MapperError::NotFound {
                volume: name.to_string(),
            })?;
        let read_only = MapHeader::decode(&raw.data)
            .map(|h| h.read_only())
            .unwrap_or(false);
        let fence = if read_only {
            None
        } else if takeover {
            Some(self.take_over(name).await?)
        } else {
            Some(self.acquire(name).await?)
        };
        let loaded = VolumeMap::load(self.maps.as_ref(), name).await;
        let checked = loaded.and_then(|map| check_loaded(name, fence.as_ref(), map));
        let map = match checked {
            Ok(map) => map,
            Err(e) => {
                if let Some(f) = &fence {
                    let _ = self.maps.lock_release(f).await;
                }
                return Err(e);
            }
        };
        tracing::debug!(volume = %name, generation = fence.as_ref().map(|f| f.generation), "opened");
        let vol = Arc::new(OpenVolume {
            name: name.clone(),
            fence,
            map: RwLock::new(map),
            mutate: tokio::sync::Mutex::new(()),
            state: AtomicU8::new(OPEN),
            stale: AtomicBool::new(false),
        });
        self.open
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone(), vol.clone());
        Ok(vol)
    }

    /// The volume `name` if it is open here, with its map read back from storage first if a
    /// failed change left it stale (see [`OpenVolume`]).
    pub(crate) async fn cached(
        &self,
        name: &VolumeName,
    ) -> Result<Option<Arc<OpenVolume>>, MapperError> {
        let Some(vol) = self.lookup(name) else {
            return Ok(None);
        };
        self.refresh(&vol).await?;
        Ok(Some(vol))
    }

    /// Read a stale volume's map back from storage (see [`OpenVolume`]); a no-op otherwise.
    pub(crate) async fn refresh(&self, vol: &Arc<OpenVolume>) -> Result<(), MapperError> {
        if vol.is_stale() {
            let _m = vol.mutate.lock().await;
            self.reload_locked(vol).await?;
        }
        Ok(())
    }

    /// Replace a stale cached map with what storage holds. Caller holds `vol.mutate`. A
    /// volume whose header is gone (a delete that reported an error had landed) is dropped
    /// from the cache and its lock released; the volume stays stale if storage cannot be read.
    pub(crate) async fn reload_locked(&self, vol: &Arc<OpenVolume>) -> Result<(), MapperError> {
        if !vol.is_stale() {
            return Ok(());
        }
        vol.check_usable()?;
        let name = &vol.name;
        let map = match VolumeMap::load(self.maps.as_ref(), name).await {
            Err(MapperError::NotFound { volume }) => {
                self.forget(vol, "its header is gone from storage").await;
                return Err(MapperError::NotFound { volume });
            }
            r => r?,
        };
        let map = vol.observe(check_loaded(name, vol.fence.as_ref(), map))?;
        let (uuid, epoch) = {
            let cached = vol.map();
            (cached.header.uuid, cached.header.epoch)
        };
        // A writable map keeps its uuid for life; a snapshot changes under a new uuid (dedup),
        // but no map's epoch ever moves back.
        if vol.fence.is_some() && map.header.uuid != uuid {
            self.forget(vol, "it was replaced by another volume of that name")
                .await;
            return Err(MapperError::Conflict {
                volume: name.to_string(),
            });
        }
        if map.header.epoch < epoch {
            tracing::error!(volume = %name, stored = map.header.epoch, cached = epoch, "stored epoch is older than the cached one");
            return Err(MapperError::Conflict {
                volume: name.to_string(),
            });
        }
        vol.install(map);
        vol.stale.store(false, Ordering::Release);
        tracing::info!(volume = %name, "map read back from storage after a failed change");
        Ok(())
    }

    /// Drop a volume from the cache without touching its maps (they are gone or not ours),
    /// releasing its lock. Caller holds `vol.mutate`.
    async fn forget(&self, vol: &Arc<OpenVolume>, why: &str) {
        {
            let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
            if open.get(&vol.name).is_some_and(|v| Arc::ptr_eq(v, vol)) {
                open.remove(&vol.name);
            }
        }
        vol.state.store(CLOSED, Ordering::Release);
        tracing::warn!(volume = %vol.name, why, "dropped from the cache");
        if let Some(f) = &vol.fence
            && let Err(e) = self.maps.lock_release(f).await
        {
            tracing::warn!(volume = %vol.name, error = %e, "releasing the lock of a dropped volume");
        }
    }

    async fn acquire(&self, name: &VolumeName) -> Result<Fence, MapperError> {
        self.maps
            .lock_acquire(&lock_object(name), &self.owner)
            .await
            .ctx(name)
    }

    /// Take the lock even from another holder: the handover of a shared volume to the node
    /// that writes it now. The former holder's fence goes stale, so its map writes are refused
    /// and its next request reads the map afresh.
    async fn take_over(&self, name: &VolumeName) -> Result<Fence, MapperError> {
        let lock = lock_object(name);
        match self.maps.lock_acquire(&lock, &self.owner).await {
            Err(BlockerError::Locked { holder, .. }) => {
                // Not a break: on RADOS a break blocklists the former holder, and the source
                // node of a migration must keep reading.
                let fence = self
                    .maps
                    .lock_hand_over(&lock, &self.owner)
                    .await
                    .ctx(name)?;
                crate::metrics::global()
                    .lock_takeovers
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    volume = %name,
                    from = %holder,
                    generation = fence.generation,
                    to = %self.owner,
                    "shared volume: lock handed over to this node (first write here)"
                );
                Ok(fence)
            }
            r => r.ctx(name),
        }
    }

    /// Open a volume *shared*, for the live-migration handover of a multi-node block volume:
    /// no lock is taken and nothing is cached until this node writes. Reads are answered from
    /// the map as it is in storage at that moment (another node may be writing it); the first
    /// write takes the lock over from whoever holds it; while this node holds the lock its
    /// cache is used, after checking on each request that the lock has not moved on. So both
    /// nodes can have the volume attached, one writes at a time, and neither ever serves a
    /// stale mapping. A snapshot opens as usual (read-only, nothing to hand over).
    pub async fn open_shared(&self, name: &str) -> Result<VolumeInfo, MapperError> {
        let name = VolumeName::new(name)?;
        let _ns = self.namespace.lock().await;
        if let Some(v) = self.cached(&name).await? {
            let info = VolumeInfo::from(&v.map().header);
            if !info.snapshot {
                self.mark_shared(&name);
            }
            return Ok(info);
        }
        let header = self.read_header(&name).await?;
        if header.read_only() {
            let vol = self.open_locked(&name, false).await?;
            return Ok(VolumeInfo::from(&vol.map().header));
        }
        self.mark_shared(&name);
        tracing::info!(volume = %name, "opened shared (no lock until the first write here)");
        Ok(VolumeInfo::from(&header))
    }

    fn mark_shared(&self, name: &VolumeName) {
        self.shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone());
    }

    pub(crate) fn is_shared(&self, name: &VolumeName) -> bool {
        self.shared
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// For a shared volume: the open volume if this node still holds its lock. A volume whose
    /// lock moved on is dropped from the cache (without releasing: the lock is not ours), so
    /// the caller reads the map afresh or takes the lock back.
    pub(crate) async fn held_shared(
        &self,
        name: &VolumeName,
    ) -> Result<Option<Arc<OpenVolume>>, MapperError> {
        let Some(vol) = self.lookup(name) else {
            return Ok(None);
        };
        let Some(fence) = &vol.fence else {
            return Ok(Some(vol));
        };
        let now = self.maps.lock_info(&fence.lock).await.ctx(name)?;
        if vol.state.load(Ordering::Acquire) == OPEN
            && now.generation == fence.generation
            && now.holder.as_ref() == Some(&fence.owner)
        {
            return Ok(Some(vol));
        }
        let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
        if open.get(name).is_some_and(|v| Arc::ptr_eq(v, &vol)) {
            open.remove(name);
            vol.state.store(FENCED, Ordering::Release);
            tracing::info!(
                volume = %name,
                holder = now.holder.as_ref().map(|h| h.as_str()).unwrap_or("<none>"),
                generation = now.generation,
                "shared volume: the lock moved to another node; reading the map afresh"
            );
        }
        Ok(None)
    }

    /// Drop the cached map and release the lock. Closing what is not open is a no-op.
    pub async fn close(&self, name: &str) -> Result<(), MapperError> {
        let name = VolumeName::new(name)?;
        let _ns = self.namespace.lock().await;
        self.shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        self.close_locked(&name).await
    }

    async fn close_locked(&self, name: &VolumeName) -> Result<(), MapperError> {
        let removed = self
            .open
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        let Some(vol) = removed else {
            return Ok(());
        };
        // Wait for an in-flight map change, then refuse any that was queued behind it.
        let _m = vol.mutate.lock().await;
        let was = vol.state.swap(CLOSED, Ordering::AcqRel);
        if let Some(f) = &vol.fence {
            match self.maps.lock_release(f).await {
                Ok(()) => {}
                Err(BlockerError::Fenced { .. }) => {
                    tracing::warn!(volume = %name, was_fenced = was == FENCED, "closed a volume whose lock had been taken away");
                }
                Err(e) => return Err(MapperError::from_blocker(name, e)),
            }
        }
        tracing::debug!(volume = %name, "closed");
        Ok(())
    }

    /// Close every volume (shutdown).
    pub async fn close_all(&self) -> Result<(), MapperError> {
        let _ns = self.namespace.lock().await;
        let names: Vec<VolumeName> = self
            .open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        for name in names {
            self.close_locked(&name).await?;
        }
        Ok(())
    }

    /// Names of the volumes open here.
    pub fn open_volumes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .map(|n| n.to_string())
            .collect();
        v.sort();
        v
    }

    /// A volume's or snapshot's metadata (from the cache if open here).
    pub async fn info(&self, name: &str) -> Result<VolumeInfo, MapperError> {
        let name = VolumeName::new(name)?;
        if let Some(v) = self.cached(&name).await? {
            return Ok(VolumeInfo::from(&v.map().header));
        }
        Ok(VolumeInfo::from(&self.read_header(&name).await?))
    }

    async fn read_header(&self, name: &VolumeName) -> Result<MapHeader, MapperError> {
        let object = header_object(name);
        let raw = self
            .maps
            .read_map(&object)
            .await
            .ctx(name)?
            .ok_or_else(|| MapperError::NotFound {
                volume: name.to_string(),
            })?;
        MapHeader::decode(&raw.data).map_err(|problem| {
            MapperError::Corrupt(CorruptMap {
                object: object.to_string(),
                problem,
            })
        })
    }

    /// Every volume and snapshot in the backend, sorted by name. A corrupt header fails the
    /// listing, naming the object, rather than being skipped.
    pub async fn list(&self) -> Result<Vec<VolumeInfo>, MapperError> {
        let mut out = Vec::new();
        let everything = VolumeName::new("list").expect("valid");
        for obj in self
            .maps
            .list(crate::map_format::HEADER_PREFIX)
            .await
            .ctx(&everything)?
        {
            let crate::map_format::ObjectKind::Header(name) =
                crate::map_format::parse_object(&obj.name)
            else {
                continue;
            };
            match self.read_header(&name).await {
                Ok(h) => out.push(VolumeInfo::from(&h)),
                // Deleted between the listing and the read.
                Err(MapperError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Who holds a volume's lock.
    pub async fn lock_info(&self, name: &str) -> Result<LockInfo, MapperError> {
        let name = VolumeName::new(name)?;
        self.maps.lock_info(&lock_object(&name)).await.ctx(&name)
    }

    /// Break a volume's lock, whoever holds it: for a dead node. The former holder's map writes
    /// are refused from now on. Returns the lock as it was.
    pub async fn break_lock(&self, name: &str) -> Result<LockInfo, MapperError> {
        let name = VolumeName::new(name)?;
        let before = self.maps.lock_break(&lock_object(&name)).await.ctx(&name)?;
        crate::metrics::global()
            .locks_broken
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            volume = %name,
            holder = before.holder.as_ref().map(|h| h.as_str()).unwrap_or("<none>"),
            generation = before.generation,
            by = %self.owner,
            "volume lock broken"
        );
        Ok(before)
    }

    /// Read a map back from storage, verify it completely, and (if it is open here) check that
    /// the cache matches storage exactly.
    pub async fn verify(&self, name: &str) -> Result<VerifyReport, MapperError> {
        let name = VolumeName::new(name)?;
        let cached = self.lookup(&name);
        // No map change may land between reading storage and comparing the cache with it.
        let _m = match &cached {
            Some(v) => Some(v.mutate.lock().await),
            None => None,
        };
        if let Some(v) = &cached {
            self.reload_locked(v).await?;
        }
        let stored = VolumeMap::load(self.maps.as_ref(), &name).await?;
        if let Some(v) = &cached {
            let divergence = cache_divergence(&v.map(), &stored);
            if let Some((object, what)) = divergence {
                // A mapper bug, not bad input: say so loudly, and stop trusting the cache.
                tracing::error!(volume = %name, object = %object, what, "cached map differs from storage");
                v.mark_stale();
                return Err(MapperError::Corrupt(CorruptMap {
                    object: object.to_string(),
                    problem: crate::map_format::MapFormatError::Invalid(format!(
                        "the cached map of {name} differs from storage: {what}"
                    )),
                }));
            }
        }
        let mut report = VerifyReport {
            blocks: stored.block_count(),
            ..Default::default()
        };
        for b in 0..stored.block_count() {
            match stored.state(b) {
                BlockState::Zero => report.zero += 1,
                BlockState::Owned => report.owned += 1,
                BlockState::Shared => report.shared += 1,
                BlockState::Content => report.content += 1,
            }
            if let Some(obj) = stored.object(b) {
                debug_assert!(crate::blocker::name_problem(obj.as_str()).is_none());
            }
        }
        Ok(report)
    }

    /// The state of one block (for tests and diagnostics).
    pub async fn block_state(&self, name: &str, block: u64) -> Result<BlockState, MapperError> {
        let name = VolumeName::new(name)?;
        let map = match self.cached(&name).await? {
            Some(v) => v.snapshot_map(),
            None => VolumeMap::load(self.maps.as_ref(), &name).await?,
        };
        if block >= map.block_count() {
            return Err(MapperError::OutOfRange {
                volume: name.to_string(),
                offset: block * u64::from(map.header.block_size),
                length: u64::from(map.header.block_size),
                size: map.header.size,
            });
        }
        Ok(map.state(block))
    }
}

#[cfg(test)]
mod tests;
