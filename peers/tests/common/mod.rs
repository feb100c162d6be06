//! Helpers shared by the peers' integration tests: the backend a test runs on
//! ([`TestBackend`]), volume I/O the way vlmc does it and the seed (from `peers::testing`), and
//! a blocker that yields before every operation.

#![allow(dead_code, unused_imports)]

pub use peers::testing::{discard, read, seed, write};

use std::path::PathBuf;
use std::sync::Arc;

use peers::backend::{BackendConfig, Store};
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
    fn lock_hand_over<'a>(
        &'a self,
        l: &'a ObjectName,
        o: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        yielding!(self.lock_hand_over(l, o))
    }
    fn capacity(&self) -> BlockerFuture<'_, peers::blocker::Capacity> {
        yielding!(self.capacity())
    }
    fn identity(&self) -> peers::blocker::BackendId {
        self.0.identity()
    }
}

/// Which backend the suite runs on: `ARCHIP_TEST_BACKEND`, `file` (the default) or `rados`.
pub const BACKEND_ENV: &str = "ARCHIP_TEST_BACKEND";

/// A fresh, isolated backend for one test, chosen by `ARCHIP_TEST_BACKEND`, so that the same
/// test code runs on every backend instead of a copy per backend.
///
/// - `file` (or unset): the file backend in a temporary directory, removed on drop.
/// - `rados`: a RADOS namespace of its own (`test-<tag>-<uuid>`) in the pool
///   `ARCHIP_CEPH_POOL` of the cluster `CEPH_CONF` (as `e2e/ceph/start-ceph.sh` exports them;
///   `ARCHIP_CEPH_KEYRING` when set). The namespace is left behind with whatever the test did
///   not delete itself: the suite's cluster is a throw-away one (`e2e/ceph/suite-on-rados.sh`
///   purges it), and a namespace that stays can be looked at after a failure.
///
/// Asking for RADOS never falls back to files: a build without the `rados` feature, missing
/// variables or an unreachable cluster fail the test, so a green run on RADOS means it ran
/// there.
pub struct TestBackend {
    config: BackendConfig,
    /// The file backend's directory, kept alive (and removed) with the backend.
    _dir: Option<tempfile::TempDir>,
}

impl TestBackend {
    /// A fresh backend for the test `tag` (a short name, shown in the RADOS namespace).
    pub fn fresh(tag: &str) -> TestBackend {
        let kind = std::env::var(BACKEND_ENV).unwrap_or_default();
        let backend = match kind.as_str() {
            "" | "file" => {
                let dir = tempfile::tempdir().expect("temporary directory");
                TestBackend {
                    config: BackendConfig::file(dir.path()),
                    _dir: Some(dir),
                }
            }
            "rados" => TestBackend {
                config: rados_config(tag),
                _dir: None,
            },
            other => panic!("{BACKEND_ENV}={other:?}: expected \"file\" or \"rados\""),
        };
        // Open once now: an unreachable cluster fails here, naming the backend, not in the
        // middle of a workload.
        backend.open();
        eprintln!("{tag}: backend {}", backend.config);
        backend
    }

    /// The backend's description, as a peer set (or a peer process, in its text form) takes it.
    pub fn config(&self) -> &BackendConfig {
        &self.config
    }

    /// A new blocker on the backend's volume objects (each call connects anew: a reopen).
    pub fn open(&self) -> Arc<dyn Blocker> {
        self.config
            .open(Store::Objects)
            .unwrap_or_else(|e| panic!("{BACKEND_ENV}: {e}"))
    }

    /// The directory holding the objects, on the file backend only: for the checks that look
    /// at what a test left on disk.
    pub fn objects_dir(&self) -> Option<PathBuf> {
        match &self.config {
            BackendConfig::File { dir } => Some(dir.join(peers::backend::OBJECTS_SUBDIR)),
            BackendConfig::Rados(_) => None,
        }
    }

    /// `file` or `rados`, for labels.
    pub fn kind(&self) -> &'static str {
        self.config.kind().name()
    }

    /// A scratch peer set (vlmc, mapper, blocker in this process) over this backend.
    pub fn peer_set(&self, tag: &str) -> peers::testing::ScratchPeerSet {
        peers::testing::ScratchPeerSet::start_on(tag, Some(self.config.clone()))
    }
}

/// A scratch peer set over a fresh [`TestBackend`] of its own, which lives as long as it.
pub struct PeerSetOnBackend {
    /// Declared first: dropped (stopped) before its backend goes away.
    pub scratch: peers::testing::ScratchPeerSet,
    pub backend: TestBackend,
}

impl std::ops::Deref for PeerSetOnBackend {
    type Target = peers::testing::ScratchPeerSet;
    fn deref(&self) -> &Self::Target {
        &self.scratch
    }
}

/// [`peers::testing::ScratchPeerSet::start`] on the backend `ARCHIP_TEST_BACKEND` names.
pub fn scratch_peer_set(tag: &str) -> PeerSetOnBackend {
    let backend = TestBackend::fresh(tag);
    PeerSetOnBackend {
        scratch: backend.peer_set(tag),
        backend,
    }
}

impl Drop for TestBackend {
    /// A failed test's objects are its evidence: kept, and where they are said.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        match self._dir.take() {
            Some(dir) => eprintln!("test backend kept at {}", dir.keep().display()),
            None => eprintln!("test backend left as it is: {}", self.config),
        }
    }
}

#[cfg(feature = "rados")]
fn rados_config(tag: &str) -> BackendConfig {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{BACKEND_ENV}=rados needs {name} (eval \"$(e2e/ceph/start-ceph.sh DIR)\" sets it)"
            )
        })
    };
    let mut text = format!(
        "rados:pool={},namespace=test-{tag}-{},conf={},id=admin",
        var("ARCHIP_CEPH_POOL"),
        uuid::Uuid::new_v4().simple(),
        var("CEPH_CONF"),
    );
    if let Ok(keyring) = std::env::var("ARCHIP_CEPH_KEYRING") {
        text.push_str(&format!(",keyring={keyring}"));
    }
    BackendConfig::parse(&text).unwrap_or_else(|e| panic!("{BACKEND_ENV}=rados: {e}"))
}

#[cfg(not(feature = "rados"))]
fn rados_config(_tag: &str) -> BackendConfig {
    panic!("{BACKEND_ENV}=rados needs a build with `--features rados`")
}
