//! vlmc's mapping cache: per volume, block → object (writable or not), with the in-flight
//! write tracking and drain gate that keep it coherent with the mapper.
//!
//! Cache coherence. The cache may only lag the mapper in the safe direction (a block cached as
//! read-only or missing that is really owned costs one extra MAPW). Three rules keep it so:
//! - MAPW replies are authoritative and installed, unless a discard of the volume started
//!   since the MAPW was sent (a per-volume generation counter tells); a MAPW that *fails*
//!   drops its blocks from the cache, since the mapper may have moved them before failing (a
//!   mapper killed between persisting a copy-on-write and replying): a block left cached as
//!   the old read-only object would go on reading it after GC deleted it, as zeros;
//! - MAPR replies only fill empty slots, under the same generation check, so a slow MAPR can
//!   never overwrite a newer MAPW result;
//! - everything that can move blocks behind the cache's back (snapshot, clone of a volume,
//!   close, delete, resize, import, dedup, lock release or break) passes a per-volume drain
//!   barrier: it waits until the volume's in-flight I/O is done, holds new I/O back, runs at
//!   the mapper, drops the volume's cache and lets I/O resume. So no write ever lands in an
//!   object that a snapshot has just started to share.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, RwLock};
use xseg::Status;
use xseg::protocol::{MapReply, extent};

use crate::failure::Failure;
use crate::throttle::Throttle;

/// Cached entries per volume before the cache is dropped and rebuilt: bounds memory on huge
/// volumes while keeping the working set of any realistic one.
const MAX_CACHED_BLOCKS: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Mapping {
    Zero,
    Object { name: Arc<str>, writable: bool },
}

#[derive(Default)]
pub(super) struct Cache {
    pub(super) blocks: crate::FastMap<u64, Mapping>,
    /// Bumped whenever entries are dropped for a reason other than a barrier (discard):
    /// a mapper reply sent before that must not be installed.
    pub(super) generation: u64,
}

#[derive(Default)]
struct Writes {
    next: u64,
    in_flight: BTreeSet<u64>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub(super) size: u64,
    pub(super) block_size: u64,
}

/// What vlmc knows about one volume.
#[derive(Default)]
pub(super) struct Vol {
    /// I/O holds it shared; barrier operations exclusively. In an `Arc` so that a fast-path
    /// I/O can hold it from its forward to its reply without a task around it.
    pub(super) gate: Arc<RwLock<()>>,
    pub(super) meta: Mutex<Option<Meta>>,
    pub(super) cache: Mutex<Cache>,
    writes: Mutex<Writes>,
    writes_done: Notify,
    /// Opened shared: no mapping is cached (see `vlmc`'s module documentation).
    pub(super) shared: AtomicBool,
    pub(super) throttle: Mutex<Throttle>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic cannot leave them half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vol {
    pub(super) fn clear(&self) {
        let mut c = lock(&self.cache);
        c.blocks.clear();
        c.generation += 1;
        *lock(&self.meta) = None;
    }

    /// Drops the cached mappings of `blocks`, and any map reply already on its way, because
    /// the mapper may have changed them: a discard, or a MAPW that failed after it had moved
    /// the blocks.
    pub(super) fn forget(&self, blocks: impl IntoIterator<Item = u64>) {
        let mut c = lock(&self.cache);
        c.generation += 1;
        for b in blocks {
            c.blocks.remove(&b);
        }
    }

    pub(super) fn begin_write(self: &Arc<Self>) -> WriteTicket {
        let mut w = lock(&self.writes);
        let t = w.next;
        w.next += 1;
        w.in_flight.insert(t);
        WriteTicket {
            vol: self.clone(),
            ticket: t,
        }
    }

    /// Waits until every write that began before this call has ended.
    pub(super) async fn drain_writes_before_now(&self) {
        let mark = lock(&self.writes).next;
        loop {
            let notified = self.writes_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.writes)
                .in_flight
                .first()
                .is_none_or(|&t| t >= mark)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Marks a write in flight until dropped (also on error paths).
pub(super) struct WriteTicket {
    vol: Arc<Vol>,
    ticket: u64,
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        lock(&self.vol.writes).in_flight.remove(&self.ticket);
        self.vol.writes_done.notify_waiters();
    }
}

impl Vol {
    /// The cached mapping of `block`, as [`Vol::cached`] answers for one block.
    pub(super) fn cached_one(&self, block: u64, write: bool) -> Option<Mapping> {
        lock(&self.cache)
            .blocks
            .get(&block)
            .filter(|m| !write || matches!(m, Mapping::Object { writable: true, .. }))
            .cloned()
    }

    /// The cached mapping of each block, `None` where the cache cannot answer: a miss, or a
    /// read-only block for a write.
    pub(super) fn cached(
        &self,
        blocks: impl Iterator<Item = u64>,
        write: bool,
    ) -> Vec<Option<Mapping>> {
        let c = lock(&self.cache);
        blocks
            .map(|b| {
                c.blocks
                    .get(&b)
                    .filter(|m| !write || matches!(m, Mapping::Object { writable: true, .. }))
                    .cloned()
            })
            .collect()
    }

    /// Records a map reply for `[start, ..)` in the cache (by the rules above) and
    /// returns the mappings it carried, per block. `generation` is the cache generation when
    /// the request was sent, or `None` for a shared volume, whose mappings are never cached.
    pub(super) fn install(
        &self,
        reply: &MapReply,
        start: u64,
        bs: u64,
        generation: Option<u64>,
        authoritative: bool,
    ) -> Result<HashMap<u64, Mapping>, Failure> {
        let mut fresh = HashMap::with_capacity(reply.extents.len());
        let mut pos = start;
        for e in &reply.extents {
            let m = if e.flags & extent::ZERO != 0 {
                Mapping::Zero
            } else {
                if e.object.is_empty() {
                    return Err(Failure::new(Status::Io, "map reply names no object"));
                }
                Mapping::Object {
                    name: e.object.as_str().into(),
                    writable: e.flags & extent::READONLY == 0,
                }
            };
            if e.len == 0 || pos % bs != e.offset {
                return Err(Failure::new(
                    Status::Io,
                    "map reply extents are inconsistent",
                ));
            }
            fresh.insert(pos / bs, m);
            pos += e.len;
        }
        let mut c = lock(&self.cache);
        if generation == Some(c.generation) {
            if c.blocks.len() + fresh.len() > MAX_CACHED_BLOCKS {
                c.blocks.clear();
            }
            for (&b, m) in &fresh {
                if authoritative {
                    c.blocks.insert(b, m.clone());
                } else {
                    c.blocks.entry(b).or_insert_with(|| m.clone());
                }
            }
        }
        Ok(fresh)
    }
}
