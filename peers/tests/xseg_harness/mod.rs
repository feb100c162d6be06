//! Helpers for the xseg integration tests: a peer set on a temporary directory and a
//! temporary segment that is removed on drop, and seed handling.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use peers::backend::Store;
use peers::blocker::Blocker;
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet, Ports};
use xseg::Segment;

/// Small sizes so that tests run fast and reach pool limits; buffers up to 1 MiB, so that
/// large I/O is split by the client too.
pub fn test_config() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
    }
}

/// A running peer set over a scratch directory and segment.
pub struct Harness {
    pub set: Option<PeerSet>,
    pub dir: tempfile::TempDir,
    pub segment: PathBuf,
    pub blocker: Arc<dyn Blocker>,
}

impl Harness {
    pub fn start(tag: &str) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = PathBuf::from(format!(
            "/dev/shm/xseg-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut config = PeerConfig::new(dir.path(), segment.to_str().unwrap(), "node-test");
        config.xseg = test_config();
        config.workers = 4;
        let seg = Segment::create(&segment, &config.xseg).expect("segment");
        let blocker = config.backend.open(Store::Objects).expect("file blocker");
        let set = PeerSet::start_with(&config, seg, blocker.clone()).expect("peer set");
        Harness {
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

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// The seed of a randomized test: `ARCHIP_SEED` if set, else fresh; always printed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("ARCHIP_SEED") {
        Ok(s) => s.parse().expect("ARCHIP_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: ARCHIP_SEED={seed}");
    seed
}
