//! A blocker that injects storage faults into any other, for tests: EIO on reads and writes,
//! ENOSPC on writes, failed flushes, added latency, and a crash between two writes.
//!
//! Every fault is drawn from a seeded generator, so a failing run replays from its seed. The
//! faults are the ones a real backend shows and the peers must survive:
//! - an error may come *before* the operation took effect or *after* it (a write that reached
//!   the disk but whose completion was lost), so callers cannot assume that an error means
//!   "nothing happened";
//! - a failed flush loses every write since the last successful flush (Linux marks the dirty
//!   pages clean after a failed fsync: a later flush succeeds without them), and so does a crash;
//!   this is modelled with an undo log of the writes since the last successful flush, rolled
//!   back at that moment. Map, copy, truncate and delete operations are durable when they
//!   return (the trait's contract), so they are never rolled back;
//! - the crash stops applying mutations after the Nth one, as if the process died there:
//!   every later operation fails, and [`FaultyBlocker::crashed`] tells the test to restart.
//!
//! [`FaultyBlocker::pause`] turns injection off while a test checks its invariants, so that the
//! checks themselves see the storage as it is.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    BackendId, Blocker, BlockerError, BlockerFuture, Capacity, Expect, Fence, LockInfo, LockOwner,
    ObjectInfo, ObjectName, Versioned,
};

/// How often each fault strikes, in parts per thousand of the operations it applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub seed: u64,
    /// `read` and `read_map` fail with EIO.
    pub read_eio: u32,
    /// Mutations (`write`, `copy`, `truncate`, `delete`, map writes and deletes) fail with EIO.
    pub write_eio: u32,
    /// Mutations fail with ENOSPC.
    pub write_enospc: u32,
    /// `flush` fails with EIO and the writes since the last successful flush are lost.
    pub flush_eio: u32,
    /// An operation waits up to `max_latency` before it runs.
    pub latency: u32,
    pub max_latency: Duration,
    /// After this many mutations the process "dies": unflushed writes are lost and every later
    /// operation fails.
    pub crash_after: Option<u64>,
}

impl FaultPlan {
    /// No fault at all: the wrapper is transparent.
    pub fn none(seed: u64) -> Self {
        FaultPlan {
            seed,
            ..FaultPlan::default()
        }
    }
}

/// How many faults of each kind were injected: a test that injected none tested nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub read_eio: u64,
    pub write_eio: u64,
    pub write_enospc: u64,
    pub flush_eio: u64,
    pub delays: u64,
    pub crashes: u64,
    /// Unflushed writes rolled back by a failed flush or a crash.
    pub lost_writes: u64,
}

/// One write since the last successful flush, with what it overwrote.
#[derive(Debug)]
struct Undo {
    object: ObjectName,
    offset: u64,
    old: Vec<u8>,
}

#[derive(Debug)]
struct State {
    rng: u64,
    paused: bool,
    mutations: u64,
    crashed: bool,
    undo: Vec<Undo>,
    counts: FaultCounts,
}

/// What the dice said for one operation.
enum Fate {
    Run,
    FailBefore(io::Error),
    FailAfter(io::Error),
}

/// Wraps a blocker and injects the faults of a [`FaultPlan`].
#[derive(Debug)]
pub struct FaultyBlocker {
    inner: Arc<dyn Blocker>,
    plan: FaultPlan,
    state: Mutex<State>,
}

fn crashed_error() -> io::Error {
    io::Error::other("injected crash: the process is dead")
}

impl FaultyBlocker {
    pub fn new(inner: Arc<dyn Blocker>, plan: FaultPlan) -> Self {
        let rng = plan.seed ^ 0x9e37_79b9_7f4a_7c15;
        FaultyBlocker {
            inner,
            plan,
            state: Mutex::new(State {
                rng,
                paused: false,
                mutations: 0,
                crashed: false,
                undo: Vec::new(),
                counts: FaultCounts::default(),
            }),
        }
    }

    pub fn inner(&self) -> &Arc<dyn Blocker> {
        &self.inner
    }

    /// Stop (true) or resume (false) injecting faults. A crash stays a crash.
    pub fn pause(&self, paused: bool) {
        self.lock().paused = paused;
    }

    /// Whether the planned crash has happened.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    pub fn counts(&self) -> FaultCounts {
        self.lock().counts.clone()
    }

    /// Writes since the last successful flush: what a crash now would lose.
    pub fn unflushed(&self) -> usize {
        self.lock().undo.len()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// splitmix64: small, seedable, and good enough to pick faults.
    fn next(state: &mut State) -> u64 {
        state.rng = state.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn roll(state: &mut State, per_mille: u32) -> bool {
        per_mille > 0 && Self::next(state) % 1000 < u64::from(per_mille)
    }

    fn delay(&self) -> Option<Duration> {
        let mut s = self.lock();
        if s.paused || self.plan.max_latency.is_zero() || !Self::roll(&mut s, self.plan.latency) {
            return None;
        }
        s.counts.delays += 1;
        let max = self.plan.max_latency.as_micros().max(1) as u64;
        Some(Duration::from_micros(Self::next(&mut s) % max))
    }

    async fn maybe_sleep(&self) {
        if let Some(d) = self.delay() {
            tokio::time::sleep(d).await;
        }
    }

    /// The fate of a read.
    fn read_fate(&self) -> Fate {
        let mut s = self.lock();
        if s.crashed {
            return Fate::FailBefore(crashed_error());
        }
        if !s.paused && Self::roll(&mut s, self.plan.read_eio) {
            s.counts.read_eio += 1;
            return Fate::FailBefore(io::Error::from_raw_os_error(libc::EIO));
        }
        Fate::Run
    }

    /// The fate of a mutation; counts it towards the crash, and crashes when its turn comes.
    fn write_fate(&self) -> Fate {
        let mut s = self.lock();
        if s.crashed {
            return Fate::FailBefore(crashed_error());
        }
        s.mutations += 1;
        if let Some(n) = self.plan.crash_after
            && s.mutations > n
            && !s.paused
        {
            s.crashed = true;
            s.counts.crashes += 1;
            return Fate::FailBefore(crashed_error());
        }
        if s.paused {
            return Fate::Run;
        }
        let error = if Self::roll(&mut s, self.plan.write_eio) {
            s.counts.write_eio += 1;
            libc::EIO
        } else if Self::roll(&mut s, self.plan.write_enospc) {
            s.counts.write_enospc += 1;
            libc::ENOSPC
        } else {
            return Fate::Run;
        };
        let e = io::Error::from_raw_os_error(error);
        // ENOSPC is refused up front by every real backend; EIO can strike after the fact.
        if error == libc::EIO && Self::next(&mut s) % 2 == 0 {
            Fate::FailAfter(e)
        } else {
            Fate::FailBefore(e)
        }
    }

    /// Undo the writes since the last successful flush, newest first, as a crash or a failed
    /// fsync would lose them.
    async fn lose_unflushed(&self) {
        let undo = std::mem::take(&mut self.lock().undo);
        let n = undo.len() as u64;
        for u in undo.into_iter().rev() {
            // The rollback bypasses injection: it is the model of lost pages, not an operation.
            let _ = self.inner.write(&u.object, u.offset, &u.old).await;
        }
        self.lock().counts.lost_writes += n;
    }

    /// An object's unflushed writes are made moot by a durable operation that replaced it.
    fn forget_unflushed(&self, object: &ObjectName) {
        self.lock().undo.retain(|u| &u.object != object);
    }

    async fn crash_check(&self) {
        let lose = {
            let s = self.lock();
            s.crashed && !s.undo.is_empty()
        };
        if lose {
            self.lose_unflushed().await;
        }
    }
}

/// Run a mutation under its fate.
macro_rules! mutate {
    ($self:ident, $object:expr, $op:expr) => {{
        $self.maybe_sleep().await;
        match $self.write_fate() {
            Fate::Run => $op.await,
            Fate::FailBefore(e) => {
                $self.crash_check().await;
                Err(BlockerError::io($object, e))
            }
            Fate::FailAfter(e) => {
                let _ = $op.await;
                Err(BlockerError::io($object, e))
            }
        }
    }};
}

impl Blocker for FaultyBlocker {
    fn read<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BlockerFuture<'a, ()> {
        Box::pin(async move {
            self.maybe_sleep().await;
            match self.read_fate() {
                Fate::Run => self.inner.read(object, offset, buf).await,
                Fate::FailBefore(e) | Fate::FailAfter(e) => {
                    // A failed read must not look like data: scribble over the buffer.
                    buf.fill(0xee);
                    Err(BlockerError::io(object, e))
                }
            }
        })
    }

    fn write<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        data: &'a [u8],
    ) -> BlockerFuture<'a, ()> {
        Box::pin(async move {
            let record = async {
                let mut old = vec![0u8; data.len()];
                self.inner.read(object, offset, &mut old).await?;
                let r = self.inner.write(object, offset, data).await;
                if r.is_ok() {
                    self.lock().undo.push(Undo {
                        object: object.clone(),
                        offset,
                        old,
                    });
                }
                r
            };
            mutate!(self, object, record)
        })
    }

    fn flush(&self) -> BlockerFuture<'_, ()> {
        Box::pin(async move {
            self.maybe_sleep().await;
            let fail = {
                let mut s = self.lock();
                if s.crashed {
                    Some(crashed_error())
                } else if !s.paused && Self::roll(&mut s, self.plan.flush_eio) {
                    s.counts.flush_eio += 1;
                    Some(io::Error::from_raw_os_error(libc::EIO))
                } else {
                    None
                }
            };
            if let Some(e) = fail {
                self.lose_unflushed().await;
                return Err(BlockerError::io("flush", e));
            }
            self.inner.flush().await?;
            self.lock().undo.clear();
            Ok(())
        })
    }

    fn delete<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        Box::pin(async move {
            mutate!(self, object, async {
                let r = self.inner.delete(object).await;
                self.forget_unflushed(object);
                r
            })
        })
    }

    fn truncate<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        Box::pin(async move {
            mutate!(self, object, async {
                let r = self.inner.truncate(object).await;
                self.forget_unflushed(object);
                r
            })
        })
    }

    fn copy<'a>(&'a self, src: &'a ObjectName, dst: &'a ObjectName) -> BlockerFuture<'a, ()> {
        Box::pin(async move {
            mutate!(self, dst, async {
                let r = self.inner.copy(src, dst).await;
                self.forget_unflushed(dst);
                r
            })
        })
    }

    fn info<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>> {
        Box::pin(async move {
            match self.read_fate() {
                Fate::Run => self.inner.info(object).await,
                Fate::FailBefore(e) | Fate::FailAfter(e) => Err(BlockerError::io(object, e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>> {
        Box::pin(async move {
            match self.read_fate() {
                Fate::Run => self.inner.list(prefix).await,
                Fate::FailBefore(e) | Fate::FailAfter(e) => Err(BlockerError::io(prefix, e)),
            }
        })
    }

    fn read_map<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>> {
        Box::pin(async move {
            self.maybe_sleep().await;
            match self.read_fate() {
                Fate::Run => self.inner.read_map(object).await,
                Fate::FailBefore(e) | Fate::FailAfter(e) => Err(BlockerError::io(object, e)),
            }
        })
    }

    fn write_map<'a>(
        &'a self,
        object: &'a ObjectName,
        data: &'a [u8],
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64> {
        Box::pin(async move {
            mutate!(
                self,
                object,
                self.inner.write_map(object, data, expect, fence)
            )
        })
    }

    fn create_maps<'a>(
        &'a self,
        objects: &'a [(ObjectName, Vec<u8>)],
    ) -> BlockerFuture<'a, Vec<u64>> {
        Box::pin(async move {
            let first = objects
                .first()
                .map(|(o, _)| o.to_string())
                .unwrap_or_default();
            mutate!(self, &first, self.inner.create_maps(objects))
        })
    }

    fn delete_map<'a>(
        &'a self,
        object: &'a ObjectName,
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()> {
        Box::pin(async move { mutate!(self, object, self.inner.delete_map(object, expect, fence)) })
    }

    fn lock_acquire<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        Box::pin(async move { mutate!(self, lock, self.inner.lock_acquire(lock, owner)) })
    }

    fn lock_release<'a>(&'a self, fence: &'a Fence) -> BlockerFuture<'a, ()> {
        Box::pin(async move { mutate!(self, &fence.lock, self.inner.lock_release(fence)) })
    }

    fn lock_info<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        Box::pin(async move {
            match self.read_fate() {
                Fate::Run => self.inner.lock_info(lock).await,
                Fate::FailBefore(e) | Fate::FailAfter(e) => Err(BlockerError::io(lock, e)),
            }
        })
    }

    fn lock_break<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        Box::pin(async move { mutate!(self, lock, self.inner.lock_break(lock)) })
    }

    fn lock_hand_over<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        Box::pin(async move { mutate!(self, lock, self.inner.lock_hand_over(lock, owner)) })
    }

    fn capacity(&self) -> BlockerFuture<'_, Capacity> {
        self.inner.capacity()
    }

    fn identity(&self) -> BackendId {
        self.inner.identity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocker::MemoryBlocker;

    fn name(s: &str) -> ObjectName {
        ObjectName::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_plan_without_faults_is_transparent() {
        let f = FaultyBlocker::new(Arc::new(MemoryBlocker::new()), FaultPlan::none(1));
        crate::blocker::conformance::run(&f).await;
        assert_eq!(f.counts(), FaultCounts::default());
    }

    #[tokio::test]
    async fn a_failed_flush_loses_the_unflushed_writes_only() {
        let plan = FaultPlan {
            flush_eio: 1000,
            ..FaultPlan::none(7)
        };
        let f = FaultyBlocker::new(Arc::new(MemoryBlocker::new()), plan);
        let o = name("ob.x");
        f.pause(true);
        f.write(&o, 0, b"durable").await.unwrap();
        f.flush().await.unwrap();
        f.pause(false);
        f.write(&o, 0, b"volatile").await.unwrap();
        assert!(f.flush().await.is_err());
        let mut buf = [0u8; 8];
        f.inner().read(&o, 0, &mut buf).await.unwrap();
        assert_eq!(&buf, b"durable\0");
        assert_eq!(f.counts().lost_writes, 1);
    }

    #[tokio::test]
    async fn a_crash_stops_every_later_mutation_and_loses_unflushed_writes() {
        let plan = FaultPlan {
            crash_after: Some(2),
            ..FaultPlan::none(3)
        };
        let f = FaultyBlocker::new(Arc::new(MemoryBlocker::new()), plan);
        let (a, b) = (name("ob.a"), name("ob.b"));
        f.write(&a, 0, b"one").await.unwrap();
        f.flush().await.unwrap();
        f.write(&a, 0, b"two").await.unwrap();
        assert!(!f.crashed());
        assert!(f.write(&b, 0, b"three").await.is_err());
        assert!(f.crashed());
        assert!(f.flush().await.is_err());
        let mut buf = [0u8; 3];
        f.inner().read(&a, 0, &mut buf).await.unwrap();
        assert_eq!(&buf, b"one", "the unflushed second write is lost");
        assert!(f.inner().info(&b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn errors_are_errors_and_are_counted() {
        let plan = FaultPlan {
            read_eio: 500,
            write_eio: 300,
            write_enospc: 300,
            ..FaultPlan::none(11)
        };
        let f = FaultyBlocker::new(Arc::new(MemoryBlocker::new()), plan);
        let o = name("ob.e");
        let mut enospc = 0;
        for i in 0..200u8 {
            match f.write(&o, 0, &[i]).await {
                Err(BlockerError::Io { source, .. })
                    if source.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    enospc += 1
                }
                _ => {}
            }
            let mut buf = [0u8; 1];
            if f.read(&o, 0, &mut buf).await.is_err() {
                assert_eq!(buf[0], 0xee);
            }
        }
        let c = f.counts();
        assert!(
            c.read_eio > 0 && c.write_eio > 0 && c.write_enospc > 0,
            "{c:?}"
        );
        assert_eq!(c.write_enospc, enospc);
    }
}
