//! Fixtures for the peers' tests, in one place: the seed of a randomized run, a scratch peer
//! set over a scratch directory and segment, and volume I/O done against a [`Mapper`] the way
//! vlmc does it. Built for this crate's unit tests and, with the `testing` feature, for its
//! integration tests; never part of a release build.

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xseg::Segment;

use crate::backend::{BackendConfig, Store};
use crate::blocker::Blocker;
use crate::client::VolumeClient;
use crate::mapper::{Mapper, MapperError};
use crate::peerset::{PeerConfig, PeerSet, Ports};

/// A fresh random number, without a dependency on a random-number crate.
fn random_u64() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The seed given in `ARCHIP_SEED`, else a fresh one. Prefer [`seed`], which also prints it.
pub fn seed_from_env() -> u64 {
    match std::env::var("ARCHIP_SEED") {
        Ok(s) => s.parse().expect("ARCHIP_SEED must be a u64"),
        Err(_) => random_u64(),
    }
}

/// The seed of a randomized test: `ARCHIP_SEED` if set, else fresh. Always printed, so that a
/// failing run can be replayed with `ARCHIP_SEED=<seed>`.
pub fn seed(test: &str) -> u64 {
    let seed = seed_from_env();
    eprintln!("{test}: ARCHIP_SEED={seed}");
    seed
}

/// A directory of its own for one test, removed with everything in it on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let path = std::env::temp_dir().join(format!(
            "archip-test-{tag}-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir_all(&path).expect("scratch directory");
        ScratchDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A small segment, so that tests run fast and reach pool limits; buffers up to 1 MiB, so that
/// large I/O is split by the client too.
pub fn test_config() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
    }
}

/// A running peer set (vlmc, mapper, blocker) over a scratch directory and a scratch
/// segment; stopped, and the segment removed, on drop.
pub struct ScratchPeerSet {
    pub set: Option<PeerSet>,
    pub dir: ScratchDir,
    pub segment: PathBuf,
    pub blocker: Arc<dyn Blocker>,
}

impl ScratchPeerSet {
    pub fn start(tag: &str) -> ScratchPeerSet {
        Self::start_on(tag, None)
    }

    /// A scratch peer set over `backend` (the file backend in its scratch directory when
    /// `None`): how a test suite runs the same code on every backend. The caller keeps the
    /// backend alive and isolated (a fresh directory or RADOS namespace of its own).
    pub fn start_on(tag: &str, backend: Option<BackendConfig>) -> ScratchPeerSet {
        let dir = ScratchDir::new(tag);
        let segment = PathBuf::from(format!(
            "/dev/shm/xseg-test-{tag}-{}-{}",
            std::process::id(),
            random_u64() as u32
        ));
        let mut config = PeerConfig::new(dir.path(), segment.to_str().unwrap(), "node-test");
        config.xseg = test_config();
        config.workers = 4;
        if let Some(backend) = backend {
            config.backend = backend;
        }
        let seg = Segment::create(&segment, &config.xseg).expect("segment");
        let blocker: Arc<dyn Blocker> = config
            .backend
            .open(Store::Objects)
            .unwrap_or_else(|e| panic!("opening {}: {e}", config.backend));
        let set = PeerSet::start_with(&config, seg, blocker.clone()).expect("peer set");
        ScratchPeerSet {
            set: Some(set),
            dir,
            segment,
            blocker,
        }
    }

    pub fn segment(&self) -> &Arc<Segment> {
        self.set.as_ref().unwrap().segment()
    }

    pub fn client(&self) -> VolumeClient {
        VolumeClient::connect(self.segment()).expect("connect")
    }

    /// Bytes of data objects (owned and content) in the backend.
    pub async fn object_bytes(&self) -> u64 {
        let mut total = 0;
        for prefix in ["ob.", "ct."] {
            for o in self.blocker.list(prefix).await.unwrap() {
                total += o.size;
            }
        }
        total
    }
}

impl Drop for ScratchPeerSet {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// Write `data` at `offset` the way vlmc does: MAPW, then one blocker write per extent.
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

/// Read `len` bytes at `offset` the way vlmc does: MAPR, then blocker reads, ZERO extents
/// zero-filled locally.
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

/// Discard a range and zero-write the partial blocks it hands back, as vlmc does.
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
