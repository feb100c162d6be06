//! The workload the peers are killed under: a few workers, each owning some volumes and their
//! snapshots and clones, writing, discarding, flushing, reading, snapshotting, cloning and
//! deleting (and one of them collecting garbage), all through one `VolumeClient`. After each completed operation
//! a shared counter moves; the operation that reaches the iteration's kill point SIGKILLs the
//! chosen peers, while the other workers' operations are in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use peers::client::{ClientError, GcRequest, VolumeClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use super::image::Image;

pub const BLOCK: u64 = 64 << 10;
/// 24 blocks of 64 KiB: with 16 entries per map page, every map has two pages.
pub const VOLUME_BLOCKS: u64 = 24;
pub const PAGE_ENTRIES: u32 = 16;
/// Maps (volume, snapshots, clones) a worker keeps at most; past it, snapshot and clone turn
/// into deletes.
const MAX_MAPS: usize = 4;
/// Operations remembered per worker, printed when a check fails.
const HISTORY: usize = 24;
/// Operations (and iteration marks) kept for the lineage of a map a check fails on: enough to
/// reach back to the write a lost byte came from.
const LOG: usize = 20_000;

/// Whether a map is known to exist. An operation that failed because a peer died may or may
/// not have happened; the check after the restart asks the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exists {
    Yes,
    MaybeCreated,
    MaybeDeleted,
}

#[derive(Clone, Debug)]
pub struct Map {
    pub name: String,
    pub snapshot: bool,
    pub image: Image,
    pub exists: Exists,
    /// The write a kill cut short, if the last operation on this map was one.
    pub cut_write: Option<CutWrite>,
}

/// A write that failed because a peer died. Its range may hold the old data or the new, but
/// each 512-byte sector that was flushed before must hold one or the other, not a mix and not
/// zeros.
#[derive(Clone, Debug)]
pub struct CutWrite {
    pub offset: u64,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
    /// Runs of the range that were flushed before the write.
    pub flushed: Vec<(u64, u64)>,
}

impl Map {
    pub fn new(name: String, snapshot: bool, image: Image, exists: Exists) -> Map {
        Map {
            name,
            snapshot,
            image,
            exists,
            cut_write: None,
        }
    }
}

/// Random bytes that writes take slices of: cheaper than generating data per write in a debug
/// build, and two slices at different offsets differ.
pub struct Pool(Vec<u8>);

impl Pool {
    pub fn new(seed: u64) -> Pool {
        let mut v = vec![0u8; 4 << 20];
        StdRng::seed_from_u64(seed ^ 0x706f_6f6c).fill(&mut v[..]);
        Pool(v)
    }

    fn slice(&self, rng: &mut StdRng, len: usize) -> &[u8] {
        let at = rng.random_range(0..=self.0.len() - len);
        &self.0[at..at + len]
    }
}

/// What the operations of one iteration share.
pub struct Shared {
    pub client: Arc<VolumeClient>,
    pub pool: Arc<Pool>,
    pub kill_at: u64,
    pub victims: Vec<libc::pid_t>,
    pub completed: AtomicU64,
    /// Set just before the kill: from then on, a failed operation is expected.
    pub fired: AtomicBool,
    /// Workers start no new operation once set (after the kill, or after a finding).
    pub stop: AtomicBool,
    pub stopped: Notify,
}

impl Shared {
    fn finish_op(&self) {
        let n = self.completed.fetch_add(1, SeqCst) + 1;
        if n == self.kill_at {
            self.fired.store(true, SeqCst);
            for &pid in &self.victims {
                // SAFETY: a plain syscall; the pids are children the test has not waited for.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            self.halt();
        }
    }

    pub fn halt(&self) {
        self.stop.store(true, SeqCst);
        self.stopped.notify_one();
    }
}

/// Counters of one worker, summed over the run.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub ops: BTreeMap<&'static str, u64>,
    /// Failed operations after a kill, by error class.
    pub failed: BTreeMap<String, u64>,
    pub gc_deleted: u64,
}

pub struct Worker {
    pub id: usize,
    pub maps: Vec<Map>,
    next_name: u64,
    pub history: VecDeque<String>,
    /// The longer record behind `history`, with iteration marks.
    pub log: VecDeque<String>,
    pub counters: Counters,
}

/// A failed check or an unexpected error: the test fails with it.
pub type Finding = String;

fn class(e: &ClientError) -> String {
    let s = format!("{e:?}");
    s.split(['(', ' ', '{']).next().unwrap_or("?").to_string()
}

/// Whether `w` looks like a map name the workers make (`w<id>-<kind><n>` or `w<id>-base`).
pub fn is_map_name(w: &str) -> bool {
    w.starts_with('w')
        && w.contains('-')
        && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Worker {
    pub fn new(id: usize) -> Worker {
        Worker {
            id,
            maps: Vec::new(),
            next_name: 0,
            history: VecDeque::new(),
            log: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn base_name(id: usize) -> String {
        format!("w{id}-base")
    }

    fn note(&mut self, s: String) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(s.clone());
        self.mark(s);
    }

    /// Adds a line to the long log only (iteration boundaries, kills, restarts).
    pub fn mark(&mut self, s: String) {
        if self.log.len() == LOG {
            self.log.pop_front();
        }
        self.log.push_back(s);
    }

    /// The long log's lines that concern `names` or any map they were made from or into,
    /// with the iteration marks between them.
    pub fn lineage(&self, names: &[String]) -> Vec<String> {
        let mut names: Vec<String> = names.to_vec();
        // Two rounds of "a -> b" links reach a clone's snapshot's volume.
        for _ in 0..2 {
            for line in &self.log {
                let words: Vec<&str> = line.split_whitespace().collect();
                for pair in words.windows(3) {
                    if pair[1] == "->" {
                        let (a, b) = (pair[0].to_string(), pair[2].to_string());
                        if names.contains(&a) && !names.contains(&b) && is_map_name(&b) {
                            names.push(b);
                        } else if names.contains(&b) && !names.contains(&a) && is_map_name(&a) {
                            names.push(a);
                        }
                    }
                }
            }
        }
        self.log
            .iter()
            .filter(|l| {
                l.starts_with("--") || l.split_whitespace().any(|w| names.iter().any(|n| n == w))
            })
            .cloned()
            .collect()
    }

    /// Turns an error into an expected failure (a peer was killed) or a finding.
    fn failed(&mut self, sh: &Shared, what: &str, e: &ClientError) -> Result<(), Finding> {
        self.note(format!("{what} -> {e}"));
        if matches!(e, ClientError::Timeout(_)) {
            return Err(format!(
                "worker {}: {what} hung: {e} (fired={})",
                self.id,
                sh.fired.load(SeqCst)
            ));
        }
        if !sh.fired.load(SeqCst) {
            return Err(format!(
                "worker {}: {what} failed with no peer killed: {e}",
                self.id
            ));
        }
        *self.counters.failed.entry(class(e)).or_default() += 1;
        Ok(())
    }

    fn random_range(rng: &mut StdRng, size: u64) -> (u64, u64) {
        let (off, len) = match rng.random_range(0..4) {
            0 => (rng.random_range(0..size), rng.random_range(1..=8192)),
            1 => {
                let b = rng.random_range(0..size / BLOCK);
                (b * BLOCK, rng.random_range(1..=2) * BLOCK)
            }
            2 => {
                let s = rng.random_range(0..size / 4096);
                (s * 4096, rng.random_range(1..=16) * 4096)
            }
            _ => (
                rng.random_range(0..size),
                rng.random_range(1..=BLOCK * 5 / 2),
            ),
        };
        (off, len.min(size - off))
    }

    fn pick(&self, rng: &mut StdRng, writable: bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.maps.len())
            .filter(|&i| {
                self.maps[i].exists == Exists::Yes && (!writable || !self.maps[i].snapshot)
            })
            .collect();
        (!candidates.is_empty()).then(|| candidates[rng.random_range(0..candidates.len())])
    }

    fn fresh_name(&mut self, kind: &str) -> String {
        self.next_name += 1;
        format!("w{}-{kind}{}", self.id, self.next_name)
    }

    /// Runs operations until told to stop. Returns the worker (its model updated with every
    /// outcome) or the first finding.
    pub async fn run(mut self, sh: Arc<Shared>, mut rng: StdRng) -> (Worker, Result<(), Finding>) {
        while !sh.stop.load(SeqCst) {
            let r = self.step(&sh, &mut rng).await;
            if r.is_err() {
                sh.halt();
                return (self, r);
            }
            sh.finish_op();
        }
        (self, Ok(()))
    }

    async fn step(&mut self, sh: &Shared, rng: &mut StdRng) -> Result<(), Finding> {
        let c = &sh.client;
        let mut roll = rng.random_range(0..100);
        if roll >= 97 && self.id != 0 {
            roll = 0; // only worker 0 collects garbage
        }
        let at_cap = self.maps.len() >= MAX_MAPS;
        match roll {
            0..50 => {
                let i = self
                    .pick(rng, true)
                    .expect("a worker keeps a writable volume");
                let (off, len) = Self::random_range(rng, self.maps[i].image.len());
                let data = sh.pool.slice(rng, len as usize);
                let name = self.maps[i].name.clone();
                self.count("write");
                match c.write(&name, off, data).await {
                    Ok(()) => {
                        self.note(format!("write {name} {off}+{len}"));
                        self.maps[i].image.write_acked(off, data);
                    }
                    Err(e) => {
                        let m = &mut self.maps[i];
                        m.cut_write = Some(CutWrite {
                            offset: off,
                            old: m.image.bytes(off, len).to_vec(),
                            new: data.to_vec(),
                            flushed: m.image.flushed_runs(off, off + len),
                        });
                        m.image.write_failed(off, len);
                        self.failed(sh, &format!("write {name} {off}+{len}"), &e)?;
                    }
                }
            }
            50..65 => {
                let i = self.pick(rng, true).unwrap();
                let name = self.maps[i].name.clone();
                self.count("flush");
                match c.flush(&name).await {
                    Ok(()) => {
                        self.note(format!("flush {name}"));
                        self.maps[i].image.flushed();
                    }
                    Err(e) => self.failed(sh, &format!("flush {name}"), &e)?,
                }
            }
            65..77 => {
                let i = self.pick(rng, false).unwrap();
                let (off, len) = Self::random_range(rng, self.maps[i].image.len());
                let name = self.maps[i].name.clone();
                let mut buf = vec![0u8; len as usize];
                self.count("read");
                match c.read(&name, off, &mut buf).await {
                    Ok(()) => {
                        self.note(format!("read {name} {off}+{len}"));
                        // A read that completed saw the data whether or not a peer died
                        // meanwhile: acknowledged bytes count too.
                        if let Err(m) = self.maps[i].image.check(off, &buf, true) {
                            return Err(format!(
                                "worker {}: read {name} {off}+{len} during the workload: {m}",
                                self.id
                            ));
                        }
                    }
                    Err(e) => self.failed(sh, &format!("read {name} {off}+{len}"), &e)?,
                }
            }
            77..85 if !at_cap => {
                let i = self.pick(rng, true).unwrap();
                let source = self.maps[i].name.clone();
                let name = self.fresh_name("s");
                let image = self.maps[i].image.frozen();
                self.count("snapshot");
                let r = c.snapshot(&source, &name).await;
                let what = format!("snapshot {source} -> {name}");
                let exists = match &r {
                    Ok(_) => Exists::Yes,
                    Err(_) => Exists::MaybeCreated,
                };
                self.maps.push(Map::new(name, true, image, exists));
                match r {
                    Ok(_) => self.note(what),
                    Err(e) => self.failed(sh, &what, &e)?,
                }
            }
            85..89 => {
                let i = self.pick(rng, true).unwrap();
                let (off, len) = Self::random_range(rng, self.maps[i].image.len());
                let name = self.maps[i].name.clone();
                self.count("discard");
                let what = format!("discard {name} {off}+{len}");
                match c.discard(&name, off, len).await {
                    Ok(()) => {
                        self.note(what);
                        // Whole blocks become ZERO entries, partial ones are zero-written:
                        // either way it reads as zeros, durably after a flush.
                        self.maps[i].image.write_acked(off, &vec![0; len as usize]);
                    }
                    Err(e) => {
                        self.maps[i].image.write_failed(off, len);
                        self.failed(sh, &what, &e)?;
                    }
                }
            }
            89..94 if !at_cap => {
                let i = self.pick(rng, false).unwrap();
                let source = self.maps[i].name.clone();
                let name = self.fresh_name("c");
                let image = self.maps[i].image.frozen();
                self.count("clone");
                let r = c.clone_volume(&source, &name, None).await;
                let what = format!("clone {source} -> {name}");
                let exists = match &r {
                    Ok(_) => Exists::Yes,
                    Err(_) => Exists::MaybeCreated,
                };
                self.maps.push(Map::new(name, false, image, exists));
                match r {
                    Ok(_) => self.note(what),
                    Err(e) => self.failed(sh, &what, &e)?,
                }
            }
            97.. => {
                self.count("gc");
                match c
                    .gc_with(GcRequest {
                        grace_secs: 0,
                        dry_run: false,
                    })
                    .await
                {
                    Ok(r) => {
                        self.note(format!("gc deleted {}", r.deleted_objects));
                        self.counters.gc_deleted += r.deleted_objects;
                    }
                    Err(e) => self.failed(sh, "gc", &e)?,
                }
            }
            _ => {
                // Delete anything but the last writable volume.
                let writable = self
                    .maps
                    .iter()
                    .filter(|m| !m.snapshot && m.exists == Exists::Yes)
                    .count();
                let victims: Vec<usize> = (0..self.maps.len())
                    .filter(|&i| {
                        self.maps[i].exists == Exists::Yes
                            && (self.maps[i].snapshot || writable > 1)
                    })
                    .collect();
                if victims.is_empty() {
                    return Ok(());
                }
                let i = victims[rng.random_range(0..victims.len())];
                let name = self.maps[i].name.clone();
                self.count("delete");
                match c.delete(&name).await {
                    Ok(()) => {
                        self.note(format!("delete {name}"));
                        self.maps.remove(i);
                    }
                    Err(e) => {
                        self.maps[i].exists = Exists::MaybeDeleted;
                        self.failed(sh, &format!("delete {name}"), &e)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, op: &'static str) {
        *self.counters.ops.entry(op).or_default() += 1;
    }
}
