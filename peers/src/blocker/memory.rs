//! The memory blocker: every object in a hash map, for unit and model tests.
//!
//! It keeps the exact semantics of the trait (sparse reads, versioned map objects, fenced
//! writes, lock generations) so that tests written against it hold for the real backends, and it
//! adds a few test hooks (byte counts, raw corruption) that no real backend offers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use super::{
    BackendId, Blocker, BlockerError, BlockerFuture, Capacity, Expect, Fence, LockInfo, LockOwner,
    ObjectInfo, ObjectName, Versioned, check_fence, check_range,
};

#[derive(Debug)]
struct Object {
    data: Vec<u8>,
    /// Non-zero only for map objects.
    version: u64,
    modified: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<ObjectName, Object>,
    locks: BTreeMap<ObjectName, LockInfo>,
    /// One counter for every map version, so a re-created map never repeats an old version.
    next_version: u64,
}

/// Objects in memory; cheap to create, gone when dropped.
#[derive(Debug)]
pub struct MemoryBlocker {
    state: Mutex<State>,
    /// The capacity it reports as total; data objects count against it, but nothing stops a
    /// write past it (tests of a full backend fail writes on purpose, not by accident).
    total: u64,
    /// Each instance is its own backend: objects are visible only through it.
    identity: BackendId,
}

impl Default for MemoryBlocker {
    fn default() -> Self {
        Self::with_capacity(u64::MAX)
    }
}

impl MemoryBlocker {
    /// A blocker of unlimited capacity.
    pub fn new() -> Self {
        Self::default()
    }

    /// A blocker that reports `total` bytes of capacity.
    pub fn with_capacity(total: u64) -> Self {
        MemoryBlocker {
            state: Mutex::default(),
            total,
            identity: BackendId::new("memory", uuid::Uuid::new_v4()),
        }
    }

    /// Sum of the sizes of all data objects whose name starts with `prefix`.
    pub fn bytes_stored(&self, prefix: &str) -> u64 {
        let state = self.lock();
        state
            .objects
            .iter()
            .filter(|(name, _)| name.as_str().starts_with(prefix))
            .map(|(_, o)| o.data.len() as u64)
            .sum()
    }

    /// Flip one byte of an object in place, behind the back of every check: corruption for
    /// tests. Returns false if the object does not exist or is shorter than `offset`.
    pub fn corrupt(&self, object: &ObjectName, offset: usize) -> bool {
        let mut state = self.lock();
        match state.objects.get_mut(object) {
            Some(o) if offset < o.data.len() => {
                o.data[offset] ^= 0x5a;
                true
            }
            _ => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; nothing is half-updated
        // because every mutation below is a single map operation.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map_precondition(
        state: &State,
        object: &ObjectName,
        expect: Expect,
        fence: Option<&Fence>,
    ) -> Result<(), BlockerError> {
        if let Some(fence) = fence {
            let lock = state.locks.get(&fence.lock).cloned().unwrap_or(LockInfo {
                holder: None,
                generation: 0,
            });
            check_fence(fence, &lock)?;
        }
        let found = state.objects.get(object).map(|o| o.version);
        if !expect.admits(found) {
            return Err(BlockerError::VersionMismatch {
                object: object.to_string(),
                expected: expect,
                found,
            });
        }
        Ok(())
    }
}

fn ready<'a, T: Send + 'a>(r: Result<T, BlockerError>) -> BlockerFuture<'a, T> {
    Box::pin(std::future::ready(r))
}

impl Blocker for MemoryBlocker {
    fn read<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BlockerFuture<'a, ()> {
        let r = check_range(object, offset, buf.len()).map(|_| {
            buf.fill(0);
            let state = self.lock();
            if let Some(o) = state.objects.get(object) {
                let len = o.data.len() as u64;
                if offset < len {
                    let start = offset as usize;
                    let n = (o.data.len() - start).min(buf.len());
                    buf[..n].copy_from_slice(&o.data[start..start + n]);
                }
            }
        });
        ready(r)
    }

    fn write<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        data: &'a [u8],
    ) -> BlockerFuture<'a, ()> {
        let r = check_range(object, offset, data.len()).map(|end| {
            let mut state = self.lock();
            let o = state
                .objects
                .entry(object.clone())
                .or_insert_with(|| Object {
                    data: Vec::new(),
                    version: 0,
                    modified: SystemTime::now(),
                });
            if (o.data.len() as u64) < end {
                o.data.resize(end as usize, 0);
            }
            o.data[offset as usize..end as usize].copy_from_slice(data);
            o.modified = SystemTime::now();
        });
        ready(r)
    }

    fn flush(&self) -> BlockerFuture<'_, ()> {
        ready(Ok(()))
    }

    fn delete<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        ready(Ok(self.lock().objects.remove(object).is_some()))
    }

    fn truncate<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        let mut state = self.lock();
        let existed = match state.objects.get_mut(object) {
            Some(o) => {
                o.data.clear();
                o.modified = SystemTime::now();
                true
            }
            None => false,
        };
        ready(Ok(existed))
    }

    fn copy<'a>(&'a self, src: &'a ObjectName, dst: &'a ObjectName) -> BlockerFuture<'a, ()> {
        let mut state = self.lock();
        match state.objects.get(src).map(|o| o.data.clone()) {
            Some(data) => {
                state.objects.insert(
                    dst.clone(),
                    Object {
                        data,
                        version: 0,
                        modified: SystemTime::now(),
                    },
                );
            }
            None => {
                state.objects.remove(dst);
            }
        }
        ready(Ok(()))
    }

    fn info<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>> {
        let state = self.lock();
        ready(Ok(state.objects.get(object).map(|o| ObjectInfo {
            name: object.clone(),
            size: o.data.len() as u64,
            modified: o.modified,
        })))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>> {
        let state = self.lock();
        let mut out: Vec<ObjectInfo> = state
            .objects
            .iter()
            .filter(|(name, _)| name.as_str().starts_with(prefix))
            .map(|(name, o)| ObjectInfo {
                name: name.clone(),
                size: o.data.len() as u64,
                modified: o.modified,
            })
            .collect();
        for (name, _) in state.locks.iter() {
            if name.as_str().starts_with(prefix) && !state.objects.contains_key(name) {
                out.push(ObjectInfo {
                    name: name.clone(),
                    size: 0,
                    modified: SystemTime::UNIX_EPOCH,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        ready(Ok(out))
    }

    fn read_map<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>> {
        let state = self.lock();
        ready(Ok(state.objects.get(object).map(|o| Versioned {
            data: o.data.clone(),
            version: o.version,
        })))
    }

    fn write_map<'a>(
        &'a self,
        object: &'a ObjectName,
        data: &'a [u8],
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64> {
        let mut state = self.lock();
        let r = Self::map_precondition(&state, object, expect, fence).map(|()| {
            state.next_version += 1;
            let version = state.next_version;
            state.objects.insert(
                object.clone(),
                Object {
                    data: data.to_vec(),
                    version,
                    modified: SystemTime::now(),
                },
            );
            version
        });
        ready(r)
    }

    fn delete_map<'a>(
        &'a self,
        object: &'a ObjectName,
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()> {
        let mut state = self.lock();
        let r = Self::map_precondition(&state, object, expect, fence).map(|()| {
            state.objects.remove(object);
        });
        ready(r)
    }

    fn lock_acquire<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        let mut state = self.lock();
        let info = state.locks.entry(lock.clone()).or_insert(LockInfo {
            holder: None,
            generation: 0,
        });
        let r = match &info.holder {
            Some(holder) if holder == owner => Ok(info.generation),
            Some(holder) => Err(BlockerError::Locked {
                lock: lock.to_string(),
                holder: holder.to_string(),
            }),
            None => {
                info.generation += 1;
                info.holder = Some(owner.clone());
                Ok(info.generation)
            }
        };
        ready(r.map(|generation| Fence {
            lock: lock.clone(),
            owner: owner.clone(),
            generation,
        }))
    }

    fn lock_release<'a>(&'a self, fence: &'a Fence) -> BlockerFuture<'a, ()> {
        let mut state = self.lock();
        let r = match state.locks.get_mut(&fence.lock) {
            None => Ok(()),
            Some(info) if info.holder.is_none() => Ok(()),
            Some(info) => check_fence(fence, info).map(|()| info.holder = None),
        };
        ready(r)
    }

    fn lock_info<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        let state = self.lock();
        ready(Ok(state.locks.get(lock).cloned().unwrap_or(LockInfo {
            holder: None,
            generation: 0,
        })))
    }

    fn lock_break<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        let mut state = self.lock();
        let before = match state.locks.get_mut(lock) {
            None => LockInfo {
                holder: None,
                generation: 0,
            },
            Some(info) => {
                let before = info.clone();
                info.holder = None;
                before
            }
        };
        ready(Ok(before))
    }

    fn capacity(&self) -> BlockerFuture<'_, Capacity> {
        let used = self.bytes_stored("");
        ready(Ok(Capacity {
            total: self.total,
            available: self.total.saturating_sub(used),
        }))
    }

    fn identity(&self) -> BackendId {
        self.identity.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::run_all(|| std::sync::Arc::new(MemoryBlocker::new())).await;
    }

    #[tokio::test]
    async fn capacity_is_configured_and_counts_stored_bytes() {
        let unlimited = MemoryBlocker::new().capacity().await.unwrap();
        assert_eq!(unlimited.total, u64::MAX);
        let b = MemoryBlocker::with_capacity(1000);
        b.write(&ObjectName::new("obj").unwrap(), 0, &[1; 300])
            .await
            .unwrap();
        let c = b.capacity().await.unwrap();
        assert_eq!((c.total, c.available), (1000, 700));
    }

    #[tokio::test]
    async fn corrupt_flips_a_byte() {
        let b = MemoryBlocker::new();
        let name = ObjectName::new("obj").unwrap();
        b.write(&name, 0, b"abc").await.unwrap();
        assert!(b.corrupt(&name, 1));
        assert!(!b.corrupt(&name, 3));
        let mut buf = [0u8; 3];
        b.read(&name, 0, &mut buf).await.unwrap();
        assert_ne!(&buf, b"abc");
        assert_eq!(b.bytes_stored("ob"), 3);
    }
}
