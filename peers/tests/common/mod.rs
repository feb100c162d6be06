//! Helpers shared by the mapper's integration tests: volume I/O the way vlmc does it and the
//! seed (from `peers::testing`), and a blocker that yields before every operation.

#![allow(dead_code)]

pub use peers::testing::{discard, read, seed, write};

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
