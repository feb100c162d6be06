//! A small valid segment image, made once per fuzzing process by the real `Segment::create`,
//! that the xseg targets copy into a fresh file for each input and then damage.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use xseg::{Config, Segment};

pub struct Base {
    pub dir: tempfile::TempDir,
    pub image: Vec<u8>,
}

pub fn config() -> Config {
    Config {
        nr_ports: 4,
        dynamic_start: 2,
        nr_requests: 8,
        buffer_classes: vec![(4096, 4), (8192, 2)],
    }
}

pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(|| {
        // /dev/shm where there is one, like the real segments; else the temp dir.
        let dir = tempfile::Builder::new()
            .prefix("archip-fuzz-xseg")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a scratch directory");
        let path = dir.path().join("base");
        drop(Segment::create(&path, &config()).expect("a valid segment"));
        let image = std::fs::read(&path).expect("the segment image");
        std::fs::remove_file(&path).expect("remove the base segment");
        Base { dir, image }
    })
}

/// A path for one input's segment file, unique within the process.
pub fn fresh_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    base()
        .dir
        .path()
        .join(format!("seg-{}", N.fetch_add(1, Ordering::Relaxed)))
}
