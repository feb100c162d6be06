//! Model-based randomized test of volumes over xseg: random operations through `VolumeClient`
//! (client → vlmc → mapper → blocker, on the backend `ARCHIP_TEST_BACKEND` names), every read compared with an in-memory model, every
//! map verified. Replay a failure with the printed `ARCHIP_SEED`; `ARCHIP_OPS` sets the length.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use peers::client::{ClientError, CreateRequest, GcRequest, VolumeClient, VolumeKind};
use peers::testing::seed;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 64 << 10;

#[derive(Clone)]
struct ModelVol {
    data: Vec<u8>,
    snapshot: bool,
}

struct Run {
    c: Arc<VolumeClient>,
    rng: StdRng,
    model: BTreeMap<String, ModelVol>,
    next: u32,
    ops: BTreeMap<&'static str, u64>,
}

fn fill(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // Mostly random bytes, sometimes runs of zeros (so zero detection paths are hit).
    rng.fill(&mut v[..]);
    if rng.random_bool(0.2) {
        let a = rng.random_range(0..n);
        let b = rng.random_range(a..=n);
        v[a..b].fill(0);
    }
    v
}

impl Run {
    fn pick(&mut self, want: Option<bool>) -> Option<String> {
        let names: Vec<&String> = self
            .model
            .iter()
            .filter(|(_, v)| want.is_none_or(|s| v.snapshot == s))
            .map(|(n, _)| n)
            .collect();
        if names.is_empty() {
            return None;
        }
        Some(names[self.rng.random_range(0..names.len())].clone())
    }

    fn fresh(&mut self, kind: &str) -> String {
        self.next += 1;
        format!("{kind}{}", self.next)
    }

    /// A random range inside a volume of `size` bytes: unaligned, block-sized, multi-block or
    /// (rarely) larger than a segment buffer.
    fn range(&mut self, size: u64) -> (u64, u64) {
        let len = match self.rng.random_range(0..10) {
            0..=3 => self.rng.random_range(1..=5000),
            4..=5 => BS,
            6..=8 => self.rng.random_range(1..=3 * BS),
            _ => self.rng.random_range(1..=(1 << 20) + BS),
        }
        .min(size);
        let off = if self.rng.random_bool(0.3) {
            self.rng.random_range(0..=(size - len) / BS) * BS
        } else {
            self.rng.random_range(0..=size - len)
        };
        (off, len)
    }

    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    async fn check_read(&mut self, name: &str, off: u64, len: u64) {
        let mut buf = vec![0xeeu8; len as usize];
        self.c.read(name, off, &mut buf).await.unwrap();
        let want = &self.model[name].data[off as usize..(off + len) as usize];
        if buf != want {
            let first = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{name}: read {off}+{len} differs from the model at byte {} (got {}, want {})",
                off + first as u64,
                buf[first],
                want[first]
            );
        }
    }

    async fn verify_all(&mut self) {
        let list = self.c.list().await.unwrap();
        let names: Vec<&String> = list.iter().map(|v| &v.name).collect();
        let expected: Vec<&String> = self.model.keys().collect();
        assert_eq!(names, expected, "catalogue differs from the model");
        for v in &list {
            let m = &self.model[&v.name];
            assert_eq!(v.size, m.data.len() as u64, "{}: size", v.name);
            assert_eq!(
                v.kind == VolumeKind::Snapshot,
                m.snapshot,
                "{}: kind",
                v.name
            );
            let r = self.c.verify(&v.name).await.unwrap();
            assert_eq!(r.blocks, v.size.div_ceil(BS), "{}: block count", v.name);
            assert_eq!(r.blocks, r.zero + r.owned + r.shared + r.content);
            if m.snapshot {
                assert_eq!(r.owned, 0, "{}: a snapshot owns nothing", v.name);
            }
        }
    }

    async fn step(&mut self) {
        let vols = self.model.values().filter(|v| !v.snapshot).count();
        let total = self.model.len();
        let roll = self.rng.random_range(0..100);
        match roll {
            _ if vols == 0 || (roll < 3 && total < 10) => {
                let name = self.fresh("v");
                let size = self.rng.random_range(1..=40) * 64 * 512;
                let layout = CreateRequest {
                    size,
                    block_size: BS as u32,
                    page_entries: 16,
                };
                self.c.create_with(&name, layout).await.unwrap();
                self.model.insert(
                    name,
                    ModelVol {
                        data: vec![0; size as usize],
                        snapshot: false,
                    },
                );
                self.count("create");
            }
            0..=34 => {
                let name = self.pick(Some(false)).unwrap();
                let size = self.model[&name].data.len() as u64;
                let (off, len) = self.range(size);
                let data = fill(&mut self.rng, len as usize);
                self.c.write(&name, off, &data).await.unwrap();
                self.model.get_mut(&name).unwrap().data[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
                self.count("write");
            }
            35..=59 => {
                let name = self.pick(None).unwrap();
                let size = self.model[&name].data.len() as u64;
                let (off, len) = self.range(size);
                self.check_read(&name, off, len).await;
                self.count("read");
            }
            60..=65 => {
                let name = self.pick(Some(false)).unwrap();
                let size = self.model[&name].data.len() as u64;
                let (off, len) = self.range(size);
                if self.rng.random_bool(0.5) {
                    self.c.discard(&name, off, len).await.unwrap();
                    self.count("discard");
                } else {
                    self.c.write_zeroes(&name, off, len).await.unwrap();
                    self.count("write_zeroes");
                }
                self.model.get_mut(&name).unwrap().data[off as usize..(off + len) as usize].fill(0);
            }
            66..=68 => {
                // Concurrent writes to distinct blocks of one volume.
                let name = self.pick(Some(false)).unwrap();
                let size = self.model[&name].data.len() as u64;
                let blocks = size.div_ceil(BS);
                let mut set = tokio::task::JoinSet::new();
                let mut used = std::collections::HashSet::new();
                for _ in 0..8 {
                    let b = self.rng.random_range(0..blocks.max(1));
                    if !used.insert(b) {
                        continue;
                    }
                    let off = b * BS + self.rng.random_range(0..BS / 2);
                    if off >= size {
                        continue;
                    }
                    let len = self.rng.random_range(1..=BS / 2).min(size - off);
                    let data = fill(&mut self.rng, len as usize);
                    self.model.get_mut(&name).unwrap().data[off as usize..(off + len) as usize]
                        .copy_from_slice(&data);
                    let (c, n) = (self.c.clone(), name.clone());
                    set.spawn(async move { c.write(&n, off, &data).await });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap().unwrap();
                }
                self.count("parallel_writes");
            }
            69..=72 if total < 10 => {
                let vol = self.pick(Some(false)).unwrap();
                let snap = self.fresh("s");
                let info = self.c.snapshot(&vol, &snap).await.unwrap();
                assert_eq!(info.kind, VolumeKind::Snapshot);
                assert_eq!(info.parent.as_deref(), Some(vol.as_str()));
                let mut m = self.model[&vol].clone();
                m.snapshot = true;
                self.model.insert(snap, m);
                self.count("snapshot");
            }
            73..=76 if total < 10 => {
                let src = self.pick(None).unwrap();
                let name = self.fresh("c");
                let size = self.model[&src].data.len() as u64;
                let grow = self
                    .rng
                    .random_bool(0.3)
                    .then(|| size + self.rng.random_range(1..=64) * 512);
                let info = self.c.clone_volume(&src, &name, grow).await.unwrap();
                assert_eq!(info.size, grow.unwrap_or(size));
                let mut m = self.model[&src].clone();
                m.snapshot = false;
                m.data.resize(info.size as usize, 0);
                self.model.insert(name, m);
                self.count("clone");
            }
            77..=80 if total > 2 => {
                let name = self.pick(None).unwrap();
                self.c.delete(&name).await.unwrap();
                self.model.remove(&name);
                let e = self.c.info(&name).await.unwrap_err();
                assert!(matches!(e, ClientError::NotFound(_)), "{e}");
                self.count("delete");
            }
            81..=83 => {
                let name = self.pick(Some(false)).unwrap();
                let size = self.model[&name].data.len() as u64;
                if self.rng.random_bool(0.2) && size > 512 {
                    let e = self.c.resize(&name, size - 512).await.unwrap_err();
                    assert!(matches!(e, ClientError::OutOfRange(_)), "{e}");
                    self.count("shrink_refused");
                } else {
                    let new = size + self.rng.random_range(0..=128) * 512;
                    let info = self.c.resize(&name, new).await.unwrap();
                    assert_eq!(info.size, new);
                    self.model
                        .get_mut(&name)
                        .unwrap()
                        .data
                        .resize(new as usize, 0);
                    self.count("resize");
                }
            }
            84 => {
                let r = self
                    .c
                    .gc_with(GcRequest {
                        grace_secs: 0,
                        dry_run: false,
                    })
                    .await
                    .unwrap();
                assert_eq!(r.maps, self.model.len() as u64);
                self.count("gc");
            }
            85..=87 => {
                let name = self.pick(None).unwrap();
                let size = self.model[&name].data.len() as u64;
                let off = self.rng.random_range(0..size);
                let e = self
                    .c
                    .read(&name, off, &mut vec![0; (size - off + 1) as usize])
                    .await
                    .unwrap_err();
                assert!(matches!(e, ClientError::OutOfRange(_)), "{e}");
                if let Some(s) = self.pick(Some(true)) {
                    let e = self.c.write(&s, 0, b"x").await.unwrap_err();
                    assert!(matches!(e, ClientError::ReadOnly(_)), "{e}");
                }
                self.count("refused_io");
            }
            88..=90 => {
                let name = self.pick(Some(false)).unwrap();
                self.c.flush(&name).await.unwrap();
                self.count("flush");
            }
            91 => {
                let name = self.pick(Some(false)).unwrap();
                self.c.close(&name).await.unwrap();
                self.count("close");
            }
            _ => {
                // Whole-volume read back, which also touches every ZERO block.
                let name = self.pick(None).unwrap();
                let size = self.model[&name].data.len() as u64;
                self.check_read(&name, 0, size).await;
                self.count("full_read");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_operations_match_the_model() {
    let seed = seed("xseg_model");
    let n_ops: u64 = std::env::var("ARCHIP_OPS")
        .ok()
        .map(|s| s.parse().expect("ARCHIP_OPS must be a number"))
        .unwrap_or(10_000);
    let h = common::scratch_peer_set("xseg-model");
    let mut run = Run {
        c: Arc::new(h.client()),
        rng: StdRng::seed_from_u64(seed),
        model: BTreeMap::new(),
        next: 0,
        ops: BTreeMap::new(),
    };
    let start = std::time::Instant::now();
    for i in 0..n_ops {
        run.step().await;
        if i % 1000 == 999 {
            run.verify_all().await;
        }
    }
    run.verify_all().await;
    let names: Vec<String> = run.model.keys().cloned().collect();
    for name in names {
        let size = run.model[&name].data.len() as u64;
        run.check_read(&name, 0, size).await;
    }
    // With everything referenced, a full collection keeps every byte the model needs.
    run.c
        .gc_with(GcRequest {
            grace_secs: 0,
            dry_run: false,
        })
        .await
        .unwrap();
    let names: Vec<String> = run.model.keys().cloned().collect();
    for name in names {
        let size = run.model[&name].data.len() as u64;
        run.check_read(&name, 0, size).await;
    }
    eprintln!("{n_ops} operations in {:?}: {:?}", start.elapsed(), run.ops);
    for op in [
        "write", "read", "snapshot", "clone", "delete", "resize", "gc", "discard",
    ] {
        assert!(
            run.ops.get(op).copied().unwrap_or(0) > 0 || n_ops < 1000,
            "{op} never ran"
        );
    }
}
