//! Helpers shared by the integration tests: volume I/O the way vlmc will do it (MAPW then object
//! writes; MAPR then object reads with zero-fill), and seed handling.

#![allow(dead_code)]

use peers::mapper::{Mapper, MapperError};

/// Write `data` at `offset`: MAPW, then one blocker write per extent.
pub async fn write(m: &Mapper, vol: &str, offset: u64, data: &[u8]) -> Result<(), MapperError> {
    let extents = m.map_write(vol, offset, data.len() as u64).await?;
    let mut covered = 0;
    for e in extents {
        let at = (e.volume_offset - offset) as usize;
        let obj = e.object().expect("MAPW never returns a ZERO extent");
        m.data_blocker()
            .write(obj, e.object_offset, &data[at..at + e.length as usize])
            .await
            .expect("blocker write");
        covered += e.length;
    }
    assert_eq!(covered, data.len() as u64, "extents cover the range");
    Ok(())
}

/// Read `len` bytes at `offset`: MAPR, then blocker reads, ZERO extents zero-filled locally.
pub async fn read(m: &Mapper, vol: &str, offset: u64, len: usize) -> Result<Vec<u8>, MapperError> {
    let mut out = vec![0xa5u8; len];
    let mut covered = 0;
    for e in m.map_read(vol, offset, len as u64).await? {
        let at = (e.volume_offset - offset) as usize;
        let buf = &mut out[at..at + e.length as usize];
        match e.object() {
            None => buf.fill(0),
            Some(o) => m
                .data_blocker()
                .read(o, e.object_offset, buf)
                .await
                .expect("blocker read"),
        }
        covered += e.length;
    }
    assert_eq!(covered, len as u64, "extents cover the range");
    Ok(out)
}

/// Discard a range and zero-write the partial blocks it hands back, as vlmc will.
pub async fn discard(m: &Mapper, vol: &str, offset: u64, len: u64) -> Result<(), MapperError> {
    let outcome = m.discard(vol, offset, len).await?;
    for e in outcome.zero_write {
        let obj = e.object().expect("zero-write extents are writable objects");
        let zeros = vec![0u8; e.length as usize];
        m.data_blocker()
            .write(obj, e.object_offset, &zeros)
            .await
            .expect("blocker write");
    }
    Ok(())
}

/// The seed of a randomized test: `ARCHIP_SEED` if set, else fresh. Always printed, so that a
/// failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("ARCHIP_SEED") {
        Ok(s) => s.parse().expect("ARCHIP_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: ARCHIP_SEED={seed}");
    seed
}

use peers::blocker::{
    Blocker, BlockerFuture, Expect, Fence, LockInfo, LockOwner, MemoryBlocker, ObjectInfo,
    ObjectName, Versioned,
};

/// A memory blocker that yields to the scheduler before every operation, the way a remote
/// backend would, so that concurrent tasks interleave at every backend call.
#[derive(Debug, Default)]
pub struct Yielding(pub MemoryBlocker);

macro_rules! yielding {
    ($self:ident . $op:ident ( $($arg:expr),* )) => {
        Box::pin(async move {
            tokio::task::yield_now().await;
            $self.0.$op($($arg),*).await
        })
    };
}

impl Blocker for Yielding {
    fn read<'a>(&'a self, o: &'a ObjectName, off: u64, buf: &'a mut [u8]) -> BlockerFuture<'a, ()> {
        yielding!(self.read(o, off, buf))
    }
    fn write<'a>(&'a self, o: &'a ObjectName, off: u64, d: &'a [u8]) -> BlockerFuture<'a, ()> {
        yielding!(self.write(o, off, d))
    }
    fn flush(&self) -> BlockerFuture<'_, ()> {
        yielding!(self.flush())
    }
    fn delete<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, bool> {
        yielding!(self.delete(o))
    }
    fn truncate<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, bool> {
        yielding!(self.truncate(o))
    }
    fn copy<'a>(&'a self, s: &'a ObjectName, d: &'a ObjectName) -> BlockerFuture<'a, ()> {
        yielding!(self.copy(s, d))
    }
    fn info<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>> {
        yielding!(self.info(o))
    }
    fn list<'a>(&'a self, p: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>> {
        yielding!(self.list(p))
    }
    fn read_map<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>> {
        yielding!(self.read_map(o))
    }
    fn write_map<'a>(
        &'a self,
        o: &'a ObjectName,
        d: &'a [u8],
        e: Expect,
        f: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64> {
        yielding!(self.write_map(o, d, e, f))
    }
    fn delete_map<'a>(
        &'a self,
        o: &'a ObjectName,
        e: Expect,
        f: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()> {
        yielding!(self.delete_map(o, e, f))
    }
    fn lock_acquire<'a>(&'a self, l: &'a ObjectName, o: &'a LockOwner) -> BlockerFuture<'a, Fence> {
        yielding!(self.lock_acquire(l, o))
    }
    fn lock_release<'a>(&'a self, f: &'a Fence) -> BlockerFuture<'a, ()> {
        yielding!(self.lock_release(f))
    }
    fn lock_info<'a>(&'a self, l: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        yielding!(self.lock_info(l))
    }
    fn lock_break<'a>(&'a self, l: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        yielding!(self.lock_break(l))
    }
    fn capacity(&self) -> BlockerFuture<'_, peers::blocker::Capacity> {
        yielding!(self.capacity())
    }
    fn identity(&self) -> peers::blocker::BackendId {
        self.0.identity()
    }
}
