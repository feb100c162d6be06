//! Model-based randomized test of the mapper: thousands of random operations on several volumes,
//! snapshots and clones, each checked against a plain in-memory model (a byte vector per volume).
//!
//! Runs against the memory blocker and the backend `ARCHIP_TEST_BACKEND` names (the file
//! blocker in a temporary directory by default, or a fresh RADOS namespace). Every read
//! is compared with the model, every map is verified (storage decodes, cache equals storage),
//! and GC runs in the middle of it all, so a GC that deleted a referenced object shows up as a
//! wrong read. Reproduce a failure with `ARCHIP_SEED=<seed printed> cargo test -p peers --test
//! model`; `ARCHIP_MODEL_OPS` changes the number of operations (default 10000 per backend, a
//! tenth of that under injected faults).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use peers::blocker::{Blocker, LockOwner, MemoryBlocker};
use peers::mapper::{BlockState, CreateOptions, GcOptions, GcReport, Mapper, MapperError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const MAX_NAMES: usize = 10;
const OWNER: &str = "model-node";

#[derive(Clone, Debug)]
struct ModelVolume {
    data: Vec<u8>,
    snapshot: bool,
    block_size: u64,
}

enum Backend {
    Memory(Arc<MemoryBlocker>),
    Test(common::TestBackend),
}

impl Backend {
    fn blocker(&self) -> Arc<dyn Blocker> {
        match self {
            Backend::Memory(m) => m.clone(),
            Backend::Test(b) => b.open(),
        }
    }
}

struct World {
    backend: Backend,
    mapper: Mapper,
    model: BTreeMap<String, ModelVolume>,
    rng: StdRng,
    next_name: u32,
    step: String,
    prefix: String,
    gc_total: GcReport,
    counts: BTreeMap<&'static str, u64>,
}

fn mapper_over(b: Arc<dyn Blocker>) -> Mapper {
    Mapper::new(b, LockOwner::new(OWNER).unwrap())
}

impl World {
    fn new(backend: Backend, seed: u64) -> Self {
        let mapper = mapper_over(backend.blocker());
        World {
            backend,
            mapper,
            model: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed),
            next_name: 0,
            step: String::new(),
            prefix: String::new(),
            gc_total: GcReport::default(),
            counts: BTreeMap::new(),
        }
    }

    fn fresh_name(&mut self) -> String {
        self.next_name += 1;
        format!("v{}", self.next_name)
    }

    fn pick(&mut self, filter: impl Fn(&ModelVolume) -> bool) -> Option<String> {
        let names: Vec<&String> = self
            .model
            .iter()
            .filter(|(_, v)| filter(v))
            .map(|(n, _)| n)
            .collect();
        if names.is_empty() {
            return None;
        }
        Some(names[self.rng.random_range(0..names.len())].clone())
    }

    fn pattern(&mut self, len: usize) -> Vec<u8> {
        if self.rng.random_ratio(1, 10) {
            return vec![0; len];
        }
        let base: u8 = self.rng.random::<u8>() | 1;
        let step: u8 = self.rng.random_range(1..8);
        (0..len)
            .map(|i| base.wrapping_add(step.wrapping_mul((i / 61) as u8)) | 1)
            .collect()
    }

    /// A range inside `size`: sometimes block-aligned whole blocks, sometimes arbitrary.
    fn range(&mut self, size: u64, bs: u64) -> (u64, u64) {
        if self.rng.random_ratio(1, 3) {
            let blocks = size.div_ceil(bs);
            let first = self.rng.random_range(0..blocks);
            let n = self.rng.random_range(1..=(blocks - first).min(3));
            let start = first * bs;
            return (start, (n * bs).min(size - start));
        }
        let offset = self.rng.random_range(0..size);
        let max = (size - offset).min(bs * 5 / 2);
        (offset, self.rng.random_range(1..=max))
    }

    fn ctx(&self) -> String {
        format!("{}: {}", self.prefix, self.step)
    }

    async fn op(&mut self) {
        let roll = self.rng.random_range(0..100);
        let kind = match roll {
            0..=29 => "write",
            30..=51 => "read",
            52..=58 => "discard",
            59..=63 => "snapshot",
            64..=68 => "clone",
            69..=72 => "create",
            73..=76 => "delete",
            77..=80 => "resize",
            81..=82 => "gc",
            83..=85 => "reopen",
            86..=88 => "verify",
            89..=91 => "import",
            92..=93 => "dedup",
            _ => "invalid",
        };
        *self.counts.entry(kind).or_default() += 1;
        match kind {
            "write" => self.write().await,
            "read" => self.read().await,
            "discard" => self.discard().await,
            "snapshot" => self.snapshot().await,
            "clone" => self.clone_op().await,
            "create" => self.create().await,
            "delete" => self.delete().await,
            "resize" => self.resize().await,
            "gc" => self.gc().await,
            "reopen" => self.reopen().await,
            "verify" => self.verify_one().await,
            "import" => self.import().await,
            "dedup" => self.dedup().await,
            _ => self.invalid().await,
        }
    }

    async fn create(&mut self) {
        if self.model.len() >= MAX_NAMES {
            return;
        }
        let name = self.fresh_name();
        let bs: u64 = [4096, 16384, 65536][self.rng.random_range(0..3)];
        let blocks = self.rng.random_range(1..=40u64);
        let trim = self.rng.random_range(0..bs / 512) * 512;
        let size = (blocks * bs - trim).max(512);
        self.step = format!("create {name} size {size} bs {bs}");
        let opts = CreateOptions {
            block_size: bs as u32,
            page_entries: 16,
        };
        self.mapper.create(&name, size, opts).await.unwrap();
        self.model.insert(
            name,
            ModelVolume {
                data: vec![0; size as usize],
                snapshot: false,
                block_size: bs,
            },
        );
    }

    async fn write(&mut self) {
        let Some(name) = self.pick(|v| !v.snapshot) else {
            return self.create().await;
        };
        let (size, bs) = {
            let v = &self.model[&name];
            (v.data.len() as u64, v.block_size)
        };
        let (offset, len) = self.range(size, bs);
        let data = self.pattern(len as usize);
        self.step = format!("write {name} {offset}+{len}");
        common::write(&self.mapper, &name, offset, &data)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        let v = self.model.get_mut(&name).unwrap();
        v.data[offset as usize..(offset + len) as usize].copy_from_slice(&data);
    }

    async fn read(&mut self) {
        let Some(name) = self.pick(|_| true) else {
            return;
        };
        let (size, bs) = {
            let v = &self.model[&name];
            (v.data.len() as u64, v.block_size)
        };
        let (offset, len) = self.range(size, bs);
        self.check_range(&name, offset, len).await;
    }

    async fn check_range(&mut self, name: &str, offset: u64, len: u64) {
        self.step = format!("read {name} {offset}+{len}");
        let got = common::read(&self.mapper, name, offset, len as usize)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        let want = &self.model[name].data[offset as usize..(offset + len) as usize];
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{}: data differs at volume byte {} (got {}, model {})",
                self.ctx(),
                offset + first as u64,
                got[first],
                want[first]
            );
        }
    }

    async fn discard(&mut self) {
        let Some(name) = self.pick(|v| !v.snapshot) else {
            return;
        };
        let (size, bs) = {
            let v = &self.model[&name];
            (v.data.len() as u64, v.block_size)
        };
        let (offset, len) = self.range(size, bs);
        self.step = format!("discard {name} {offset}+{len}");
        common::discard(&self.mapper, &name, offset, len)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        let v = self.model.get_mut(&name).unwrap();
        v.data[offset as usize..(offset + len) as usize].fill(0);
        // Whole discarded blocks must be ZERO entries, not zero-filled objects.
        let first_whole = offset.div_ceil(bs);
        let end = offset + len;
        let end_whole = if end == size {
            size.div_ceil(bs)
        } else {
            end / bs
        };
        for b in first_whole..end_whole {
            let state = self.mapper.block_state(&name, b).await.unwrap();
            assert_eq!(state, BlockState::Zero, "{}: block {b}", self.ctx());
        }
    }

    async fn snapshot(&mut self) {
        if self.model.len() >= MAX_NAMES {
            return;
        }
        let Some(src) = self.pick(|_| true) else {
            return;
        };
        let name = self.fresh_name();
        self.step = format!("snapshot {src} -> {name}");
        let info = self
            .mapper
            .snapshot(&src, &name)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        assert!(info.snapshot);
        let mut v = self.model[&src].clone();
        v.snapshot = true;
        self.model.insert(name, v);
    }

    async fn clone_op(&mut self) {
        if self.model.len() >= MAX_NAMES {
            return;
        }
        let Some(src) = self.pick(|_| true) else {
            return;
        };
        let name = self.fresh_name();
        let (size, bs) = {
            let v = &self.model[&src];
            (v.data.len() as u64, v.block_size)
        };
        let grow = if self.rng.random_ratio(1, 3) {
            self.rng.random_range(1..=bs * 3 / 512) * 512
        } else {
            0
        };
        self.step = format!("clone {src} -> {name} +{grow}");
        let info = self
            .mapper
            .clone_volume(&src, &name, Some(size + grow))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        assert_eq!(info.size, size + grow);
        let mut v = self.model[&src].clone();
        v.snapshot = false;
        v.data.resize((size + grow) as usize, 0);
        self.model.insert(name, v);
    }

    async fn delete(&mut self) {
        if self.model.len() <= 2 {
            return;
        }
        let Some(name) = self.pick(|_| true) else {
            return;
        };
        self.step = format!("delete {name}");
        self.mapper
            .delete(&name)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        self.model.remove(&name);
        assert!(matches!(
            self.mapper.info(&name).await,
            Err(MapperError::NotFound { .. })
        ));
    }

    async fn resize(&mut self) {
        let Some(name) = self.pick(|v| !v.snapshot) else {
            return;
        };
        let size = self.model[&name].data.len() as u64;
        if self.rng.random_ratio(1, 4) && size > 512 {
            self.step = format!("shrink {name}");
            let r = self.mapper.resize(&name, size - 512).await;
            assert!(
                matches!(r, Err(MapperError::ShrinkRefused { .. })),
                "{}: {r:?}",
                self.ctx()
            );
            return;
        }
        let grow = self.rng.random_range(0..=256u64) * 512;
        self.step = format!("resize {name} {size} -> {}", size + grow);
        let info = self
            .mapper
            .resize(&name, size + grow)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        assert_eq!(info.size, size + grow);
        self.model
            .get_mut(&name)
            .unwrap()
            .data
            .resize((size + grow) as usize, 0);
    }

    async fn gc(&mut self) {
        self.step = "gc".into();
        let r = self
            .mapper
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        assert_eq!(r.maps, self.model.len() as u64, "gc saw every map");
        self.gc_total.deleted_objects += r.deleted_objects;
        self.gc_total.deleted_pages += r.deleted_pages;
        self.gc_total.deleted_bytes += r.deleted_bytes;
    }

    async fn reopen(&mut self) {
        self.step = "reopen".into();
        // Half the time a clean shutdown, half the time the mapper just goes away (its locks
        // stay, and the same node identity takes them back).
        if self.rng.random_bool(0.5) {
            self.mapper.close_all().await.unwrap();
        }
        self.mapper = mapper_over(self.backend.blocker());
        let listed: Vec<String> = self
            .mapper
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        let modelled: Vec<String> = self.model.keys().cloned().collect();
        assert_eq!(listed, modelled, "the catalogue survives a restart");
    }

    async fn verify_one(&mut self) {
        let Some(name) = self.pick(|_| true) else {
            return;
        };
        self.verify(&name).await;
    }

    async fn verify(&mut self, name: &str) {
        self.step = format!("verify {name}");
        let r = self
            .mapper
            .verify(name)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        let v = &self.model[name];
        assert_eq!(r.blocks, (v.data.len() as u64).div_ceil(v.block_size));
        assert_eq!(r.blocks, r.zero + r.owned + r.shared + r.content);
        if v.snapshot {
            assert_eq!(r.owned, 0, "{}: a snapshot owns nothing", self.ctx());
        }
        // A ZERO entry must mean zeros in the model.
        for b in 0..r.blocks {
            if self.mapper.block_state(name, b).await.unwrap() == BlockState::Zero {
                let start = (b * v.block_size) as usize;
                let end = (start + v.block_size as usize).min(v.data.len());
                assert!(
                    v.data[start..end].iter().all(|&x| x == 0),
                    "{}: block {b} is ZERO but the model has data",
                    self.ctx()
                );
            }
        }
    }

    async fn import(&mut self) {
        let Some(name) = self.pick(|v| !v.snapshot) else {
            return;
        };
        let (size, bs) = {
            let v = &self.model[&name];
            (v.data.len() as u64, v.block_size)
        };
        let blocks = size.div_ceil(bs);
        let first = self.rng.random_range(0..blocks);
        let n = self.rng.random_range(1..=(blocks - first).min(4));
        let start = first * bs;
        let len = (n * bs).min(size - start);
        // Few distinct patterns, so that blocks repeat and dedup has something to do.
        let mut data = vec![0u8; len as usize];
        for chunk in data.chunks_mut(bs as usize) {
            let kind = self.rng.random_range(0..4u8);
            if kind != 0 {
                chunk.iter_mut().enumerate().for_each(|(i, b)| {
                    *b = kind.wrapping_mul(37).wrapping_add((i % 251) as u8) | 1
                });
            }
        }
        self.step = format!("import {name} {start}+{len}");
        self.mapper
            .import(&name, start, &data)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        self.model.get_mut(&name).unwrap().data[start as usize..(start + len) as usize]
            .copy_from_slice(&data);
    }

    async fn dedup(&mut self) {
        let Some(name) = self.pick(|v| v.snapshot) else {
            return;
        };
        self.step = format!("dedup {name}");
        self.mapper
            .dedup(&name)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", self.ctx()));
        let len = self.model[&name].data.len() as u64;
        self.check_range(&name, 0, len).await;
    }

    /// Bad requests fail with the right error and change nothing.
    async fn invalid(&mut self) {
        let Some(name) = self.pick(|_| true) else {
            return;
        };
        let (size, snapshot) = {
            let v = &self.model[&name];
            (v.data.len() as u64, v.snapshot)
        };
        self.step = format!("invalid ops on {name}");
        let m = &self.mapper;
        assert!(matches!(
            m.map_read(&name, size, 1).await,
            Err(MapperError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.create(&name, 4096, CreateOptions::default()).await,
            Err(MapperError::AlreadyExists { .. })
        ));
        assert!(matches!(
            m.snapshot(&name, &name).await,
            Err(MapperError::AlreadyExists { .. })
        ));
        assert!(matches!(
            m.clone_volume("no-such-volume", "x-new", None).await,
            Err(MapperError::NotFound { .. })
        ));
        assert!(matches!(
            m.map_write("../etc/passwd", 0, 1).await,
            Err(MapperError::InvalidName(_))
        ));
        if snapshot {
            assert!(matches!(
                m.map_write(&name, 0, 1).await,
                Err(MapperError::ReadOnly { .. })
            ));
            assert!(matches!(
                m.discard(&name, 0, 1).await,
                Err(MapperError::ReadOnly { .. })
            ));
        } else {
            assert!(matches!(
                m.map_write(&name, size - 1, 2).await,
                Err(MapperError::OutOfRange { .. })
            ));
            // Another node cannot take a volume this mapper holds.
            m.open(&name).await.unwrap();
            let other = Mapper::new(m.map_blocker().clone(), LockOwner::new("intruder").unwrap());
            match other.map_write(&name, 0, 1).await {
                Err(MapperError::Locked { holder, .. }) => assert_eq!(holder, OWNER),
                r => panic!("{}: {r:?}", self.ctx()),
            }
        }
        assert!(self.mapper.info("x-new").await.is_err());
        self.check_range(&name, 0, size).await;
    }

    async fn final_check(&mut self) {
        let names: Vec<String> = self.model.keys().cloned().collect();
        for name in &names {
            self.verify(name).await;
            let len = self.model[name].data.len() as u64;
            self.check_range(name, 0, len).await;
        }
        self.gc().await;
        self.reopen().await;
        for name in &names {
            let len = self.model[name].data.len() as u64;
            self.check_range(name, 0, len).await;
        }
        // Everything left is referenced: a second collection finds nothing.
        let r = self
            .mapper
            .gc(GcOptions {
                grace: Duration::ZERO,
                dry_run: true,
            })
            .await
            .unwrap();
        assert_eq!(r.deleted_objects + r.deleted_pages, 0, "{r:?}");
    }
}

fn ops() -> usize {
    std::env::var("ARCHIP_MODEL_OPS")
        .ok()
        .map(|s| s.parse().expect("ARCHIP_MODEL_OPS must be a number"))
        .unwrap_or(10_000)
}

async fn run(backend: Backend, label: &str) {
    let seed = common::seed(label);
    let mut w = World::new(backend, seed);
    for _ in 0..3 {
        w.create().await;
    }
    let n = ops();
    for i in 0..n {
        w.prefix = format!("seed {seed} op {i}");
        w.op().await;
    }
    w.prefix = format!("seed {seed} final check");
    w.final_check().await;
    eprintln!(
        "{label}: {n} ops {:?}; gc reclaimed {} objects, {} pages, {} bytes",
        w.counts, w.gc_total.deleted_objects, w.gc_total.deleted_pages, w.gc_total.deleted_bytes
    );
    assert!(
        w.gc_total.deleted_objects > 0,
        "a run this long should have produced garbage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_memory_blocker() {
    run(
        Backend::Memory(Arc::new(MemoryBlocker::new())),
        "model/memory",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_test_backend() {
    let backend = common::TestBackend::fresh("model");
    let label = format!("model/{}", backend.kind());
    run(Backend::Test(backend), &label).await;
}

// ---------------------------------------------------------------------------------------------
// Fault mode: the same kind of random workload over a `FaultyBlocker` (EIO, ENOSPC, failed
// flushes, latency, crashes), with the invariants checked after every step: an injected error
// surfaces as an error, never as success with wrong data; no write acknowledged before a
// successful flush is lost; every map verifies and the catalogue matches the model. The model
// keeps, per byte, whether it is durable, written but unflushed, or unknown (a failed write or
// discard, or an unflushed write that a failed flush or a crash may have lost).

use peers::blocker::faulty::{FaultCounts, FaultPlan, FaultyBlocker};

const DURABLE: u8 = 0;
const PENDING: u8 = 1;
const UNKNOWN: u8 = 2;

#[derive(Clone, Debug)]
struct FaultVolume {
    data: Vec<u8>,
    state: Vec<u8>,
    snapshot: bool,
}

struct FaultWorld {
    inner: Arc<MemoryBlocker>,
    faulty: Arc<FaultyBlocker>,
    mapper: Mapper,
    model: BTreeMap<String, FaultVolume>,
    rng: StdRng,
    next_name: u32,
    step: String,
    restarts: u64,
    errors: u64,
    totals: FaultCounts,
}

impl FaultWorld {
    /// A fresh plan; `crash` forces a crash point (the first plan has one, so that every run
    /// restarts at least once and no seed tests less than the others).
    fn plan(rng: &mut StdRng, crash: bool) -> FaultPlan {
        FaultPlan {
            seed: rng.random(),
            read_eio: 20,
            write_eio: 20,
            write_enospc: 10,
            flush_eio: 50,
            latency: 5,
            max_latency: Duration::from_micros(200),
            crash_after: (crash || rng.random_bool(0.5)).then(|| rng.random_range(20..400)),
        }
    }

    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let inner = Arc::new(MemoryBlocker::new());
        let faulty = Arc::new(FaultyBlocker::new(
            inner.clone(),
            Self::plan(&mut rng, true),
        ));
        let mapper = mapper_over(faulty.clone());
        FaultWorld {
            inner,
            faulty,
            mapper,
            model: BTreeMap::new(),
            rng,
            next_name: 0,
            step: String::new(),
            restarts: 0,
            errors: 0,
            totals: FaultCounts::default(),
        }
    }

    fn pick(&mut self, writable: bool) -> Option<String> {
        let names: Vec<&String> = self
            .model
            .iter()
            .filter(|(_, v)| !writable || !v.snapshot)
            .map(|(n, _)| n)
            .collect();
        (!names.is_empty()).then(|| names[self.rng.random_range(0..names.len())].clone())
    }

    /// Faults off while the test looks at what is really stored.
    async fn info(&self, name: &str) -> Option<u64> {
        self.faulty.pause(true);
        let r = self.mapper.info(name).await;
        self.faulty.pause(false);
        match r {
            Ok(i) => Some(i.size),
            Err(MapperError::NotFound { .. }) => None,
            Err(e) => panic!("{}: info {name} after a fault: {e}", self.step),
        }
    }

    async fn op(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..=34 => self.write().await,
            35..=59 => self.read().await,
            60..=69 => self.flush().await,
            70..=74 => self.discard().await,
            75..=79 => self.snapshot_or_clone(true).await,
            80..=84 => self.snapshot_or_clone(false).await,
            85..=88 => self.create().await,
            89..=91 => self.delete().await,
            92..=94 => self.resize().await,
            _ => self.gc().await,
        }
        if self.faulty.crashed() {
            self.restart().await;
        }
        self.check().await;
    }

    async fn create(&mut self) {
        if self.model.len() >= MAX_NAMES {
            return;
        }
        self.next_name += 1;
        let name = format!("f{}", self.next_name);
        let blocks = self.rng.random_range(1..=12u64);
        let size = blocks * 4096 - self.rng.random_range(0..8u64) * 512;
        self.step = format!("create {name} {size}");
        let opts = CreateOptions {
            block_size: 4096,
            page_entries: 16,
        };
        let r = self.mapper.create(&name, size, opts).await;
        let exists = match r {
            Ok(_) => true,
            // The crash struck before the header write: `restart` checks it is absent.
            Err(_) if self.faulty.crashed() => false,
            Err(_) => {
                self.errors += 1;
                self.info(&name).await.is_some()
            }
        };
        if exists {
            let v = FaultVolume {
                data: vec![0; size as usize],
                state: vec![DURABLE; size as usize],
                snapshot: false,
            };
            self.model.insert(name, v);
        }
    }

    fn range(&mut self, name: &str) -> (usize, usize) {
        let size = self.model[name].data.len();
        let offset = self.rng.random_range(0..size);
        let len = self.rng.random_range(1..=(size - offset).min(3 * 4096));
        (offset, len)
    }

    async fn write(&mut self) {
        let Some(name) = self.pick(true) else {
            return self.create().await;
        };
        let (offset, len) = self.range(&name);
        let fill: u8 = self.rng.random::<u8>() | 1;
        let data: Vec<u8> = (0..len)
            .map(|i| fill.wrapping_add((i / 509) as u8) | 1)
            .collect();
        self.step = format!("write {name} {offset}+{len}");
        let r = fault_write(&self.mapper, &name, offset as u64, &data).await;
        let v = self.model.get_mut(&name).unwrap();
        let range = offset..offset + len;
        if r.is_ok() {
            v.data[range.clone()].copy_from_slice(&data);
            v.state[range].fill(PENDING);
        } else {
            self.errors += 1;
            v.data[range.clone()].copy_from_slice(&data);
            v.state[range].fill(UNKNOWN);
        }
    }

    async fn discard(&mut self) {
        let Some(name) = self.pick(true) else {
            return;
        };
        let (offset, len) = self.range(&name);
        self.step = format!("discard {name} {offset}+{len}");
        let r = fault_discard(&self.mapper, &name, offset as u64, len as u64).await;
        let v = self.model.get_mut(&name).unwrap();
        let range = offset..offset + len;
        v.data[range.clone()].fill(0);
        // Whole blocks become ZERO map entries (durable); partial blocks are zero writes.
        v.state[range].fill(if r.is_ok() { PENDING } else { UNKNOWN });
        if r.is_err() {
            self.errors += 1;
        }
    }

    async fn read(&mut self) {
        let Some(name) = self.pick(false) else {
            return;
        };
        let (offset, len) = self.range(&name);
        self.step = format!("read {name} {offset}+{len}");
        match fault_read(&self.mapper, &name, offset as u64, len).await {
            Ok(got) => self.compare(&name, offset, &got),
            Err(_) => self.errors += 1,
        }
    }

    fn compare(&self, name: &str, offset: usize, got: &[u8]) {
        let v = &self.model[name];
        for (i, b) in got.iter().enumerate() {
            let at = offset + i;
            if v.state[at] != UNKNOWN && v.data[at] != *b {
                panic!(
                    "{}: {name} byte {at}: got {b}, model {} ({})",
                    self.step,
                    v.data[at],
                    if v.state[at] == DURABLE {
                        "flushed"
                    } else {
                        "acknowledged"
                    }
                );
            }
        }
    }

    async fn flush(&mut self) {
        self.step = "flush".into();
        let ok = self.mapper.data_blocker().flush().await.is_ok();
        let (from, to) = if ok {
            (PENDING, DURABLE)
        } else {
            self.errors += 1;
            (PENDING, UNKNOWN)
        };
        for v in self.model.values_mut() {
            v.state
                .iter_mut()
                .filter(|s| **s == from)
                .for_each(|s| *s = to);
        }
    }

    async fn snapshot_or_clone(&mut self, snapshot: bool) {
        if self.model.len() >= MAX_NAMES {
            return;
        }
        let Some(src) = self.pick(false) else {
            return;
        };
        self.next_name += 1;
        let name = format!("f{}", self.next_name);
        self.step = format!(
            "{} {src} -> {name}",
            if snapshot { "snapshot" } else { "clone" }
        );
        let r = if snapshot {
            self.mapper.snapshot(&src, &name).await.map(|_| ())
        } else {
            self.mapper
                .clone_volume(&src, &name, None)
                .await
                .map(|_| ())
        };
        let exists = match r {
            Ok(()) => true,
            Err(_) if self.faulty.crashed() => false,
            Err(_) => {
                self.errors += 1;
                self.info(&name).await.is_some()
            }
        };
        if exists {
            let mut v = self.model[&src].clone();
            v.snapshot = snapshot;
            self.model.insert(name, v);
        }
    }

    async fn delete(&mut self) {
        if self.model.len() <= 2 {
            return;
        }
        let Some(name) = self.pick(false) else {
            return;
        };
        self.step = format!("delete {name}");
        let gone = match self.mapper.delete(&name).await {
            Ok(()) => true,
            // Storage cannot be asked until the restart, which drops it if it is gone.
            Err(_) if self.faulty.crashed() => false,
            Err(_) => {
                self.errors += 1;
                self.info(&name).await.is_none()
            }
        };
        if gone {
            self.model.remove(&name);
        }
    }

    async fn resize(&mut self) {
        let Some(name) = self.pick(true) else {
            return;
        };
        let size = self.model[&name].data.len() as u64;
        let new = size + self.rng.random_range(1..=16u64) * 512;
        self.step = format!("resize {name} {size} -> {new}");
        let now = match self.mapper.resize(&name, new).await {
            Ok(i) => i.size,
            // The restart reads the size back.
            Err(_) if self.faulty.crashed() => size,
            Err(_) => {
                self.errors += 1;
                self.info(&name)
                    .await
                    .expect("a failed resize keeps the volume")
            }
        };
        assert!(now == size || now == new, "{}: size {now}", self.step);
        let v = self.model.get_mut(&name).unwrap();
        v.data.resize(now as usize, 0);
        v.state.resize(now as usize, DURABLE);
    }

    async fn gc(&mut self) {
        self.step = "gc".into();
        let opts = GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        };
        if self.mapper.gc(opts).await.is_err() {
            self.errors += 1;
        }
    }

    /// The process died: unflushed writes may be gone, and a new mapper starts over the storage
    /// with a new plan (its own crash point, perhaps).
    async fn restart(&mut self) {
        self.restarts += 1;
        let c = self.faulty.counts();
        self.totals.read_eio += c.read_eio;
        self.totals.write_eio += c.write_eio;
        self.totals.write_enospc += c.write_enospc;
        self.totals.flush_eio += c.flush_eio;
        self.totals.delays += c.delays;
        self.totals.crashes += c.crashes;
        self.totals.lost_writes += c.lost_writes;
        for v in self.model.values_mut() {
            v.state
                .iter_mut()
                .filter(|s| **s == PENDING)
                .for_each(|s| *s = UNKNOWN);
        }
        let plan = Self::plan(&mut self.rng, false);
        self.faulty = Arc::new(FaultyBlocker::new(self.inner.clone(), plan));
        self.mapper = mapper_over(self.faulty.clone());
        // A metadata operation in flight at the crash may or may not have committed.
        let names: Vec<String> = self.model.keys().cloned().collect();
        for name in names {
            match self.info(&name).await {
                None => {
                    self.model.remove(&name);
                }
                Some(size) => {
                    let v = self.model.get_mut(&name).unwrap();
                    v.data.resize(size as usize, 0);
                    v.state.resize(size as usize, DURABLE);
                }
            }
        }
        for i in 1..=self.next_name {
            let name = format!("f{i}");
            if !self.model.contains_key(&name) {
                assert!(
                    self.info(&name).await.is_none(),
                    "{}: {name} exists after a crash but was never acknowledged nor resolved",
                    self.step
                );
            }
        }
    }

    /// The invariants, with faults off: the catalogue is the model's, every map verifies, and
    /// one volume reads back as the model says.
    async fn check(&mut self) {
        self.faulty.pause(true);
        let listed: Vec<String> = self
            .mapper
            .list()
            .await
            .unwrap_or_else(|e| panic!("{}: list: {e}", self.step))
            .into_iter()
            .map(|v| v.name)
            .collect();
        let modelled: Vec<String> = self.model.keys().cloned().collect();
        assert_eq!(listed, modelled, "{}: catalogue", self.step);
        for (name, v) in &self.model {
            let r = self
                .mapper
                .verify(name)
                .await
                .unwrap_or_else(|e| panic!("{}: verify {name}: {e}", self.step));
            assert_eq!(
                r.blocks,
                (v.data.len() as u64).div_ceil(4096),
                "{}",
                self.step
            );
        }
        if let Some(name) = self.pick(false) {
            let len = self.model[&name].data.len();
            let got = fault_read(&self.mapper, &name, 0, len)
                .await
                .unwrap_or_else(|e| panic!("{}: read {name} without faults: {e}", self.step));
            self.compare(&name, 0, &got);
        }
        self.faulty.pause(false);
    }
}

/// Volume I/O as vlmc does it, where a blocker error is an error (the shared helpers panic).
async fn fault_write(m: &Mapper, vol: &str, offset: u64, data: &[u8]) -> Result<(), String> {
    let extents = m
        .map_write(vol, offset, data.len() as u64)
        .await
        .map_err(|e| e.to_string())?;
    for e in extents {
        let at = (e.volume_offset - offset) as usize;
        let obj = e.object().expect("MAPW never returns a ZERO extent");
        m.data_blocker()
            .write(obj, e.object_offset, &data[at..at + e.length as usize])
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn fault_read(m: &Mapper, vol: &str, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0xa5u8; len];
    for e in m
        .map_read(vol, offset, len as u64)
        .await
        .map_err(|e| e.to_string())?
    {
        let at = (e.volume_offset - offset) as usize;
        let buf = &mut out[at..at + e.length as usize];
        match e.object() {
            None => buf.fill(0),
            Some(o) => m
                .data_blocker()
                .read(o, e.object_offset, buf)
                .await
                .map_err(|e| e.to_string())?,
        }
    }
    Ok(out)
}

async fn fault_discard(m: &Mapper, vol: &str, offset: u64, len: u64) -> Result<(), String> {
    let outcome = m
        .discard(vol, offset, len)
        .await
        .map_err(|e| e.to_string())?;
    for e in outcome.zero_write {
        let obj = e.object().expect("zero-write extents are writable objects");
        let zeros = vec![0u8; e.length as usize];
        m.data_blocker()
            .write(obj, e.object_offset, &zeros)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

// Seeded like the others (`ARCHIP_SEED` replays a run); a tenth of `ARCHIP_MODEL_OPS`, so that
// it takes seconds in `cargo test`. Every run crashes at least once (see `FaultWorld::plan`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_faulty_blocker() {
    let seed = common::seed("model/faults");
    let mut w = FaultWorld::new(seed);
    let n = ops() / 10;
    for i in 0..n {
        w.step = format!("seed {seed} op {i}");
        w.op().await;
        w.step = format!("seed {seed} op {i} ({})", w.step);
    }
    w.restart().await;
    w.check().await;
    let t = &w.totals;
    eprintln!(
        "model/faults: {n} ops, {} errors surfaced, {} restarts, injected {t:?}",
        w.errors, w.restarts
    );
    assert!(
        t.read_eio + t.write_eio + t.write_enospc + t.flush_eio > 0 && t.crashes > 0,
        "a run this long should have injected faults: {t:?}"
    );
}
