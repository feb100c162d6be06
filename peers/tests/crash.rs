//! Crash test: blocker, mapper and vlmc run as separate processes over one segment and one
//! data directory; a workload of writes, discards, flushes, reads, snapshots, clones, deletes
//! and GC runs through `VolumeClient`; after a random number of completed operations one,
//! several or all peers get SIGKILL, with other operations in flight. The killed peers are
//! restarted over the same segment (the xseg reaper must recover their ports), or everything is
//! killed and started again over a fresh segment. Then:
//! - (a) every byte whose last write was acknowledged before a flush that returned Ok reads
//!   back exactly (bytes written after the last flush are not asserted on);
//! - (b) the catalogue lists exactly the maps the model has, and every map verifies;
//! - (c) snapshots read back their frozen content (the flushed part of it);
//! - (d) GC (grace 0) deletes nothing still referenced: everything is verified and read back
//!   again after it;
//! - the restarted mapper (same node identity) gets its own locks back: writes go on, and
//!   every lock is held by this node or nobody;
//! - no operation hangs (a kill fails requests back, it never loses them), and none fails
//!   while no peer has been killed.
//!
//! Also reported, not asserted: how many acknowledged but unflushed bytes survived, and
//! whether the sectors of writes cut by a kill hold the old or the new data.
//!
//! The data directory lives across iterations, so every iteration also recovers from all the
//! crashes before it. `ARCHIP_CRASH_ITERS` (default 200) sets the iterations, `ARCHIP_SEED`
//! replays a run (thread scheduling aside: the operations, kill points and victims are the
//! seed's). Every awaited step has a deadline, so a hang fails naming the seed, the iteration
//! and the step instead of hanging CI.
//!
//! The soak test (`#[ignore]`d: `ARCHIP_SOAK_SECS=600 cargo test -p peers --test crash soak --
//! --ignored --nocapture`) is the same workload for a duration (`ARCHIP_SOAK_SECS`, default
//! 90), with QoS limits changed between kills, and a final check after one last restart and GC:
//! every flushed byte of every volume and snapshot reads back, every map verifies, and the
//! backend holds no data object that no live map refers to (beyond the ones GC spares by
//! design: those named at a live volume's current epoch).

mod common;
mod crash_support;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crash_support::image::Image;
use crash_support::procs::{self, NODE, PeerProcs};
use crash_support::workload::{
    self, BLOCK, Counters, CutWrite, Exists, Map, PAGE_ENTRIES, Pool, Shared, VOLUME_BLOCKS, Worker,
};
use peers::blocker::LockOwner;
use peers::client::{
    ClientError, ClientOptions, CreateRequest, GcRequest, QosLimits, VolumeClient,
};
use peers::map_format::{CONTENT_PREFIX, OWNED_PREFIX, ObjectKind, parse_object};
use peers::mapper::Mapper;
use peers::peerset::PEERS;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use xseg::Segment;

const TEST: &str = "kill_9_peers_under_workload_loses_no_flushed_write";
const WORKERS: usize = 3;
const SECTOR: u64 = 512;
/// The kill comes after 1..=this many completed operations.
const MAX_KILL_AT: u64 = 40;
/// Share of iterations that restart everything over a fresh segment.
const FRESH_SEGMENT: f64 = 0.25;
/// Bound on any one awaited step (an iteration's workload, a restart, a check): minutes, so
/// that only a hang reaches it, even in a debug build on a busy machine.
const STEP_DEADLINE: Duration = Duration::from_secs(300);

/// Awaits one step of the test, failing with the seed, iteration and step if it hangs.
async fn step<T>(ctx: &Context, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!(
            "crash test hang (ARCHIP_SEED={} iteration {} {}): {what} did not finish within {:?}",
            ctx.seed, ctx.iteration, ctx.kill, STEP_DEADLINE
        ),
    }
}

/// Everything the parent runs: the data directory, the backend, the current segment, the peer
/// processes and the client.
struct Cluster {
    dir: Option<tempfile::TempDir>,
    /// The backend `ARCHIP_TEST_BACKEND` names; the peer processes get its description.
    backend: common::TestBackend,
    segment: PathBuf,
    incarnation: u32,
    procs: PeerProcs,
    client: Option<Arc<VolumeClient>>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = common::TestBackend::fresh("crash");
        let procs = PeerProcs::new(TEST, dir.path(), backend.config());
        Cluster {
            dir: Some(dir),
            backend,
            segment: PathBuf::new(),
            incarnation: 0,
            procs,
            client: None,
        }
    }

    fn client(&self) -> Arc<VolumeClient> {
        self.client.clone().expect("connected")
    }

    fn segment(&self) -> Arc<Segment> {
        self.client.as_ref().expect("connected").segment().clone()
    }

    /// A new segment, all three peers on it, and a client.
    async fn start_fresh(&mut self) {
        assert!(self.client.is_none());
        self.incarnation += 1;
        self.segment = PathBuf::from(format!(
            "/dev/shm/archip-crash-{}-{}",
            std::process::id(),
            self.incarnation
        ));
        let seg = Segment::create(&self.segment, &procs::segment_config()).expect("segment");
        for i in 0..PEERS.len() {
            self.procs.spawn(i, &self.segment);
        }
        let opts = ClientOptions {
            timeout: Duration::from_secs(20),
            admin_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        self.client = Some(Arc::new(
            VolumeClient::connect_with(&seg, opts).expect("connect"),
        ));
        self.wait_ready().await;
    }

    /// Kills whatever still runs, drops the client and removes the segment.
    fn tear_down_segment(&mut self) {
        self.procs.kill_all();
        let client = self.client.take().expect("connected");
        let client = Arc::into_inner(client).expect("no worker holds the client any more");
        drop(client);
        Segment::destroy(&self.segment).expect("remove segment");
    }

    async fn wait_ready(&mut self) {
        let client = self.client();
        for i in 0..PEERS.len() {
            self.procs.wait_ready(i, &client).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.procs.kill_all();
        self.client = None;
        let _ = std::fs::remove_file(&self.segment);
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "crash test: data directory kept at {}",
                dir.keep().display()
            );
        }
    }
}

#[derive(Default)]
struct Stats {
    kills: [u64; 3],
    /// Iterations by how many peers were killed at the kill point.
    victims: [u64; 4],
    fresh_segments: u64,
    iteration_times: Vec<Duration>,
    /// Bytes acknowledged but not flushed when peers died, and how many of them read back as
    /// written: not promised, reported.
    acked: u64,
    acked_survived: u64,
    /// Operations cut by a kill whose outcome the catalogue told: (happened, did not).
    maybe_created: (u64, u64),
    maybe_deleted: (u64, u64),
    gc_deleted_after_restart: u64,
    /// Writes cut by a kill whose range was checked, and its flushed sectors found old / new.
    cut_writes: u64,
    cut_sectors_old: u64,
    cut_sectors_new: u64,
    cut_sectors_neither: u64,
    /// Of those, sectors in a block the cut write covered whole.
    cut_sectors_neither_whole_block: u64,
    cut_sector_example: Option<String>,
    seed: u64,
    iteration: u64,
    bytes_checked: u64,
    counters: Counters,
    /// The backend, read directly to describe where a bad byte's block lives.
    audit: Option<Arc<dyn peers::blocker::Blocker>>,
    /// The peers' logs (see `procs::log_dir`).
    logs: Option<PathBuf>,
}

/// Everything needed to replay or debug a finding.
struct Context {
    seed: u64,
    iteration: u64,
    kill: String,
}

fn fail(ctx: &Context, workers: &[Worker], finding: &str) -> ! {
    let mut text = format!(
        "crash test finding (ARCHIP_SEED={} iteration {} {}):\n  {finding}\n",
        ctx.seed, ctx.iteration, ctx.kill
    );
    for w in workers {
        text.push_str(&format!("  worker {} recent operations:\n", w.id));
        for h in &w.history {
            text.push_str(&format!("    {h}\n"));
        }
    }
    // The maps the finding names, and everything the workers did to them and their sources.
    let named: Vec<String> = finding
        .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
        .filter(|w| workload::is_map_name(w))
        .map(str::to_string)
        .collect();
    if !named.is_empty() {
        for w in workers {
            let lines = w.lineage(&named);
            if lines.iter().any(|l| !l.starts_with("--")) {
                text.push_str(&format!(
                    "  worker {} on {named:?} and their lineage:\n",
                    w.id
                ));
                let mut last_mark: Option<&String> = None;
                for l in &lines {
                    if l.starts_with("--") {
                        last_mark = Some(l);
                        continue;
                    }
                    if let Some(m) = last_mark.take() {
                        text.push_str(&format!("    {m}\n"));
                    }
                    text.push_str(&format!("      {l}\n"));
                }
            }
        }
    }
    panic!("{text}");
}

#[test]
fn kill_9_peers_under_workload_loses_no_flushed_write() {
    // The peer processes of both tests are this test re-executed (see `procs`).
    procs::run_child_role();
    let seed = peers::testing::seed_from_env();
    let iterations: u64 = match std::env::var("ARCHIP_CRASH_ITERS") {
        Ok(s) => s.parse().expect("ARCHIP_CRASH_ITERS must be a number"),
        Err(_) => 200,
    };
    eprintln!("crash: ARCHIP_SEED={seed} ARCHIP_CRASH_ITERS={iterations}");
    runtime().block_on(run(seed, Length::Iterations(iterations)));
}

#[test]
#[ignore = "a soak: minutes by default (ARCHIP_SOAK_SECS), run on its own"]
fn soak_mixed_workload_with_kill_9_keeps_every_flushed_byte_and_leaks_nothing() {
    let seed = peers::testing::seed_from_env();
    let secs: u64 = match std::env::var("ARCHIP_SOAK_SECS") {
        Ok(s) => s
            .parse()
            .expect("ARCHIP_SOAK_SECS must be a number of seconds"),
        Err(_) => 90,
    };
    eprintln!("soak: ARCHIP_SEED={seed} ARCHIP_SOAK_SECS={secs}");
    runtime().block_on(run(seed, Length::Soak(Duration::from_secs(secs))));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// How long a run goes on, and what it adds.
#[derive(Clone, Copy, Debug)]
enum Length {
    Iterations(u64),
    /// Iterations until the time is up, QoS changes between them, and the final leak check.
    Soak(Duration),
}

async fn run(seed: u64, length: Length) {
    let started = Instant::now();
    let mut cluster = Cluster::new();
    let setup = Context {
        seed,
        iteration: 0,
        kill: "setup".into(),
    };
    step(&setup, "starting the peers", cluster.start_fresh()).await;
    let pool = Arc::new(Pool::new(seed));
    let mut stats = Stats {
        seed,
        audit: Some(cluster.backend.open()),
        logs: cluster.dir.as_ref().map(|d| procs::log_dir(d.path())),
        ..Stats::default()
    };
    let mut workers: Vec<Worker> = (0..WORKERS).map(Worker::new).collect();
    let size = VOLUME_BLOCKS * BLOCK;
    for w in &mut workers {
        let name = Worker::base_name(w.id);
        let client = cluster.client();
        let create = client.create_with(
            &name,
            CreateRequest {
                size,
                block_size: BLOCK as u32,
                page_entries: PAGE_ENTRIES,
            },
        );
        step(&setup, "create base volume", create)
            .await
            .expect("create base volume");
        w.maps
            .push(Map::new(name, false, Image::zeroed(size), Exists::Yes));
    }

    let mut iteration = 0;
    loop {
        match length {
            Length::Iterations(n) if iteration >= n => break,
            Length::Soak(d) if started.elapsed() >= d => break,
            _ => {}
        }
        let t = Instant::now();
        stats.iteration = iteration;
        let mut rng = StdRng::seed_from_u64(seed ^ iteration.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let kill_at = rng.random_range(1..=MAX_KILL_AT);
        let victims: Vec<usize> = loop {
            let v: Vec<usize> = (0..PEERS.len()).filter(|_| rng.random_bool(0.5)).collect();
            if !v.is_empty() {
                break v;
            }
        };
        let fresh = rng.random_bool(FRESH_SEGMENT);
        let ctx = Context {
            seed,
            iteration,
            kill: format!(
                "kill {:?} after {kill_at} operations, then {}",
                victims.iter().map(|&i| PEERS[i]).collect::<Vec<_>>(),
                if fresh {
                    "a fresh segment"
                } else {
                    "restart on the same segment"
                }
            ),
        };

        for w in &mut workers {
            w.mark(format!("-- iteration {iteration}: {}", ctx.kill));
        }
        // The workload, and the kill in the middle of it.
        let shared = Arc::new(Shared {
            client: cluster.client(),
            pool: pool.clone(),
            kill_at,
            victims: victims
                .iter()
                .map(|&i| cluster.procs.pid(i).expect("running"))
                .collect(),
            completed: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
        });
        let tasks: Vec<_> = workers
            .drain(..)
            .map(|w| tokio::spawn(w.run(shared.clone(), StdRng::seed_from_u64(rng.random()))))
            .collect();
        step(
            &ctx,
            "the workload up to the kill",
            shared.stopped.notified(),
        )
        .await;
        let fired = shared.fired.load(SeqCst);
        if fired {
            for &i in &victims {
                cluster.procs.collect_killed(i);
            }
            // Recover the dead peers' ports now rather than at the next periodic check, so
            // that operations waiting on them fail back at once.
            cluster.segment().reap();
        }
        let mut findings = Vec::new();
        for t in tasks {
            let (w, r) = step(&ctx, "a worker's operations after the kill", t)
                .await
                .expect("worker task");
            if let Err(f) = r {
                findings.push(f);
            }
            workers.push(w);
        }
        workers.sort_by_key(|w| w.id);
        drop(shared);
        if let Some(f) = findings.first() {
            let seg = cluster.segment();
            let state = procs::diagnose(&cluster.procs, Some(&seg));
            fail(&ctx, &workers, &format!("{f}\n  peers now:\n{state}"));
        }
        assert!(fired, "workers stopped without a finding or a kill");
        stats.victims[victims.len()] += 1;
        for &i in &victims {
            stats.kills[i] += 1;
        }

        // Restart.
        if fresh {
            stats.fresh_segments += 1;
            cluster.tear_down_segment();
            step(&ctx, "restart over a fresh segment", cluster.start_fresh()).await;
        } else {
            for &i in &victims {
                cluster.procs.spawn(i, &cluster.segment);
            }
            step(&ctx, "restart of the killed peers", cluster.wait_ready()).await;
        }

        // Check.
        let before: HashMap<String, Image> = workers
            .iter()
            .flat_map(|w| &w.maps)
            .map(|m| (m.name.clone(), m.image.clone()))
            .collect();
        for m in workers.iter_mut().flat_map(|w| &mut w.maps) {
            m.image.crashed();
        }
        let client = cluster.client();
        let checked = step(
            &ctx,
            "the check after the restart",
            check_after_restart(&client, &mut workers, &before, &mut stats),
        )
        .await;
        if let Err(f) = checked {
            let state = procs::diagnose(&cluster.procs, Some(client.segment()));
            fail(&ctx, &workers, &format!("{f}\n  peers now:\n{state}"));
        }
        let gc = client.gc_with(GcRequest {
            grace_secs: 0,
            dry_run: false,
        });
        match step(&ctx, "gc after the restart", gc).await {
            Ok(r) => {
                stats.gc_deleted_after_restart += r.deleted_objects;
                for w in &mut workers {
                    w.mark(format!(
                        "-- iteration {iteration}: gc after the restart deleted {}",
                        r.deleted_objects
                    ));
                }
            }
            Err(e) => fail(&ctx, &workers, &format!("gc after restart: {e}")),
        }
        let checked = step(
            &ctx,
            "the check after gc",
            check_maps(&client, &workers, None, &mut stats, "after gc"),
        )
        .await;
        if let Err(f) = checked {
            let state = procs::diagnose(&cluster.procs, Some(client.segment()));
            fail(&ctx, &workers, &format!("{f}\n  peers now:\n{state}"));
        }
        if let Length::Soak(_) = length {
            let changed = step(
                &ctx,
                "a QoS change",
                change_qos(&client, &workers, &mut rng),
            )
            .await;
            if let Err(f) = changed {
                fail(&ctx, &workers, &f);
            }
        }
        stats.iteration_times.push(t.elapsed());
        if (iteration + 1) % 25 == 0 {
            eprintln!(
                "crash: {} iterations, {:.1?} so far",
                iteration + 1,
                started.elapsed()
            );
        }
        iteration += 1;
    }
    let iterations = iteration;
    if let Length::Soak(_) = length {
        let ctx = Context {
            seed,
            iteration,
            kill: "final check".into(),
        };
        if let Err(f) = step(&ctx, "the final check", final_check(&mut cluster, &workers)).await {
            fail(&ctx, &workers, &f);
        }
    }

    for w in &workers {
        for (op, n) in &w.counters.ops {
            *stats.counters.ops.entry(op).or_default() += n;
        }
        for (class, n) in &w.counters.failed {
            *stats.counters.failed.entry(class.clone()).or_default() += n;
        }
        stats.counters.gc_deleted += w.counters.gc_deleted;
    }
    report(seed, iterations, &stats, started.elapsed());
    drop(cluster);
}

/// Resolves the operations a kill cut short, then compares the catalogue, the maps, the data
/// and the locks with the model.
async fn check_after_restart(
    c: &VolumeClient,
    workers: &mut [Worker],
    before: &HashMap<String, Image>,
    stats: &mut Stats,
) -> Result<(), String> {
    for w in workers.iter_mut() {
        let mut kept = Vec::new();
        for mut m in w.maps.drain(..) {
            if m.exists == Exists::Yes {
                kept.push(m);
                continue;
            }
            let found = match c.info(&m.name).await {
                Ok(_) => true,
                Err(ClientError::NotFound(_)) => false,
                Err(e) => return Err(format!("info {} after restart: {e}", m.name)),
            };
            let tally = if m.exists == Exists::MaybeCreated {
                &mut stats.maybe_created
            } else {
                &mut stats.maybe_deleted
            };
            if found {
                tally.0 += 1;
                m.exists = Exists::Yes;
                kept.push(m);
            } else {
                tally.1 += 1;
            }
        }
        w.maps = kept;
    }

    let mut want: Vec<(String, bool)> = workers
        .iter()
        .flat_map(|w| &w.maps)
        .map(|m| (m.name.clone(), m.snapshot))
        .collect();
    want.sort();
    let listed = c.list().await.map_err(|e| format!("list: {e}"))?;
    let have: Vec<(String, bool)> = listed
        .iter()
        .map(|v| {
            (
                v.name.clone(),
                v.kind == peers::client::VolumeKind::Snapshot,
            )
        })
        .collect();
    if have != want {
        return Err(format!(
            "catalogue after restart: listed {have:?}, expected {want:?}"
        ));
    }

    check_maps(c, workers, Some(before), stats, "after restart").await?;
    for m in workers.iter_mut().flat_map(|w| &mut w.maps) {
        if let Some(cut) = m.cut_write.take() {
            check_cut_write(c, &m.name, &cut, stats).await?;
        }
    }

    for m in workers.iter().flat_map(|w| &w.maps).filter(|m| !m.snapshot) {
        let lock = c
            .lock_info(&m.name)
            .await
            .map_err(|e| format!("lock info {}: {e}", m.name))?;
        if lock.holder.as_deref().is_some_and(|h| h != NODE) {
            return Err(format!(
                "{} is locked by {:?}, not {NODE}",
                m.name, lock.holder
            ));
        }
    }
    Ok(())
}

/// The range of a write cut short by a kill should hold, sector by sector, the old data or the
/// new (where the old was flushed). That is more than the flush contract promises, so a sector
/// holding neither is counted and reported; `ARCHIP_CRASH_SECTOR_ATOMIC=1` makes it a finding.
async fn check_cut_write(
    c: &VolumeClient,
    name: &str,
    cut: &CutWrite,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut got = vec![0u8; cut.new.len()];
    c.read(name, cut.offset, &mut got)
        .await
        .map_err(|e| format!("read {name} after restart: {e}"))?;
    stats.cut_writes += 1;
    let end_of_write = cut.offset + cut.new.len() as u64;
    for &(s, e) in &cut.flushed {
        let mut at = s;
        while at < e {
            let end = ((at / SECTOR + 1) * SECTOR).min(e);
            let r = (at - cut.offset) as usize..(end - cut.offset) as usize;
            let (got, old, new) = (&got[r.clone()], &cut.old[r.clone()], &cut.new[r]);
            if got == old {
                stats.cut_sectors_old += 1;
            } else if got == new {
                stats.cut_sectors_new += 1;
            } else {
                stats.cut_sectors_neither += 1;
                let count = |other: &[u8]| got.iter().zip(other).filter(|(a, b)| a == b).count();
                let block = at / BLOCK * BLOCK;
                let whole = cut.offset <= block && end_of_write >= block + BLOCK;
                let text = format!(
                    "ARCHIP_SEED={} iteration {}: {name}: a write of {}+{} cut by the kill left \
                     sector {at}..{end} neither old nor new: of its {} bytes {} are old, {} new, \
                     {} zero (old had {} zero); the write {} its block {block}..{}",
                    stats.seed,
                    stats.iteration,
                    cut.offset,
                    cut.new.len(),
                    got.len(),
                    count(old),
                    count(new),
                    got.iter().filter(|&&b| b == 0).count(),
                    old.iter().filter(|&&b| b == 0).count(),
                    if whole {
                        "covered all of"
                    } else {
                        "covered part of"
                    },
                    block + BLOCK,
                );
                if std::env::var_os("ARCHIP_CRASH_SECTOR_ATOMIC").is_some() {
                    return Err(text);
                }
                if stats.cut_sector_example.is_none() {
                    stats.cut_sector_example = Some(text);
                }
                if whole {
                    stats.cut_sectors_neither_whole_block += 1;
                }
            }
            at = end;
        }
    }
    Ok(())
}

/// Verifies every map and reads every map whole, comparing the flushed bytes with the model.
async fn check_maps(
    c: &VolumeClient,
    workers: &[Worker],
    before: Option<&HashMap<String, Image>>,
    stats: &mut Stats,
    when: &str,
) -> Result<(), String> {
    for m in workers.iter().flat_map(|w| &w.maps) {
        let report = c
            .verify(&m.name)
            .await
            .map_err(|e| format!("verify {} {when}: {e}", m.name))?;
        if report.blocks != VOLUME_BLOCKS {
            return Err(format!(
                "verify {} {when}: {} blocks, expected {VOLUME_BLOCKS}",
                m.name, report.blocks
            ));
        }
        let mut buf = vec![0u8; m.image.len() as usize];
        c.read(&m.name, 0, &mut buf)
            .await
            .map_err(|e| format!("read {} {when}: {e}", m.name))?;
        if let Err(e) = m.image.check(0, &buf, false) {
            let mut text = format!("{} {when}: {e}", m.name);
            if let Some(audit) = &stats.audit {
                text.push_str(&describe_block(audit, &m.name, e.offset).await);
            }
            if let Some(logs) = &stats.logs {
                text.push_str(&log_excerpt(logs, &m.name));
            }
            return Err(text);
        }
        stats.bytes_checked += m.image.census()[0];
        if let Some(before) = before.and_then(|b| b.get(&m.name)) {
            let (acked, survived) = Image::acked_survival(before, &buf);
            stats.acked += acked;
            stats.acked_survived += survived;
        }
    }
    Ok(())
}

/// Where the block holding `offset` of `name` lives, read from storage (not through the
/// peers): its map entry and its object's size and age.
async fn describe_block(
    audit: &Arc<dyn peers::blocker::Blocker>,
    name: &str,
    offset: u64,
) -> String {
    let reader = Mapper::new(
        audit.clone(),
        LockOwner::new("crash-audit").expect("valid owner"),
    );
    let block = offset / BLOCK;
    let mut out = format!("\n  block {block} of {name} in storage: ");
    match reader.map_read(name, block * BLOCK, BLOCK).await {
        Err(e) => out.push_str(&format!("map read failed: {e}")),
        Ok(extents) => {
            for e in extents {
                out.push_str(&format!("{e:?}"));
                if let Some(obj) = e.object() {
                    match audit.info(obj).await {
                        Ok(Some(i)) => out.push_str(&format!(
                            " (object of {} bytes, modified {:?} ago)",
                            i.size,
                            i.modified.elapsed().unwrap_or_default()
                        )),
                        Ok(None) => out.push_str(" (object absent)"),
                        Err(e) => out.push_str(&format!(" (object info failed: {e})")),
                    }
                }
            }
        }
    }
    out
}

/// The last lines of each peer log that name `volume`.
fn log_excerpt(dir: &std::path::Path, volume: &str) -> String {
    const LINES: usize = 40;
    let mut out = String::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let needle = format!("volume={volume} ");
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&needle) || l.contains("peer started"))
            .collect();
        out.push_str(&format!(
            "\n  {} (last {LINES} lines about {volume}):",
            e.file_name().to_string_lossy()
        ));
        for l in &lines[lines.len().saturating_sub(LINES)..] {
            out.push_str(&format!("\n    {l}"));
        }
    }
    out
}

fn report(seed: u64, iterations: u64, s: &Stats, total: Duration) {
    let mut times = s.iteration_times.clone();
    times.sort();
    let pct = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    let mean = if times.is_empty() {
        Duration::ZERO
    } else {
        times.iter().sum::<Duration>() / times.len() as u32
    };
    eprintln!("crash: ARCHIP_SEED={seed}: {iterations} iterations in {total:.1?}");
    eprintln!(
        "  kills: blocker {} mapper {} vlmc {}; iterations killing 1/2/3 peers: {}/{}/{}; fresh segments {}",
        s.kills[0],
        s.kills[1],
        s.kills[2],
        s.victims[1],
        s.victims[2],
        s.victims[3],
        s.fresh_segments
    );
    eprintln!(
        "  per iteration: mean {mean:.1?}, p50 {:.1?}, p90 {:.1?}, max {:.1?}",
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
    eprintln!("  operations: {:?}", s.counters.ops);
    eprintln!("  failed after a kill: {:?}", s.counters.failed);
    eprintln!(
        "  cut short, then found to have happened / not: create {:?}, delete {:?}",
        s.maybe_created, s.maybe_deleted
    );
    eprintln!(
        "  flushed bytes checked {} MiB; acknowledged-unflushed bytes at kills {} of which {} read back as written",
        s.bytes_checked >> 20,
        s.acked,
        s.acked_survived
    );
    eprintln!(
        "  writes cut by a kill: {}; their flushed sectors read back old {} / new {} / neither {} \
         ({} of those in blocks the write covered whole)",
        s.cut_writes,
        s.cut_sectors_old,
        s.cut_sectors_new,
        s.cut_sectors_neither,
        s.cut_sectors_neither_whole_block
    );
    if let Some(e) = &s.cut_sector_example {
        eprintln!("  first sector neither old nor new: {e}");
    }
    eprintln!(
        "  gc: {} objects deleted during workloads, {} after restarts",
        s.counters.gc_deleted, s.gc_deleted_after_restart
    );
}

/// Soak: new QoS limits (or none) on a random volume, read back through QOS. vlmc applies them
/// to the next iteration's I/O (delays, never errors, so the workload's checks still hold).
async fn change_qos(c: &VolumeClient, workers: &[Worker], rng: &mut StdRng) -> Result<(), String> {
    let volumes: Vec<&Map> = workers
        .iter()
        .flat_map(|w| &w.maps)
        .filter(|m| !m.snapshot)
        .collect();
    if volumes.is_empty() {
        return Ok(());
    }
    let name = &volumes[rng.random_range(0..volumes.len())].name;
    let limits = if rng.random_bool(0.3) {
        QosLimits::default()
    } else {
        QosLimits {
            iops: rng.random_range(500..5000),
            bytes_per_sec: rng.random_range(16u64..128) << 20,
        }
    };
    let set = c
        .set_qos(name, limits)
        .await
        .map_err(|e| format!("set QoS {limits:?} on {name}: {e}"))?;
    let now = c
        .qos(name)
        .await
        .map_err(|e| format!("QoS of {name}: {e}"))?;
    for r in [&set, &now] {
        if (r.iops, r.bytes_per_sec) != (limits.iops, limits.bytes_per_sec) {
            return Err(format!("QoS of {name}: set {limits:?}, reported {r:?}"));
        }
    }
    Ok(())
}

/// Soak: one last kill of everything and a restart, then every flushed byte and every map is
/// checked, GC runs, and the backend is audited with the peers gone: every data object is
/// referenced by a live map or spared by design (named at a live volume's current epoch).
async fn final_check(cluster: &mut Cluster, workers: &[Worker]) -> Result<(), String> {
    cluster.tear_down_segment();
    cluster.start_fresh().await;
    let c = cluster.client();
    let mut stats = Stats::default();
    check_maps(&c, workers, None, &mut stats, "after the final restart").await?;
    let gc = c
        .gc_with(GcRequest {
            grace_secs: 0,
            dry_run: false,
        })
        .await
        .map_err(|e| format!("final gc: {e}"))?;
    check_maps(&c, workers, None, &mut stats, "after the final gc").await?;
    let again = c
        .gc_with(GcRequest {
            grace_secs: 0,
            dry_run: true,
        })
        .await
        .map_err(|e| format!("final gc (dry run): {e}"))?;
    if again.deleted_objects + again.deleted_pages != 0 {
        return Err(format!("a second gc still finds garbage: {again:?}"));
    }
    cluster.procs.kill_all();

    let blocker = cluster.backend.open();
    let audit = Mapper::new(
        blocker.clone(),
        LockOwner::new("soak-audit").expect("valid owner"),
    );
    let catalogue = audit.list().await.map_err(|e| format!("list: {e}"))?;
    let mut want: Vec<&str> = workers
        .iter()
        .flat_map(|w| &w.maps)
        .map(|m| m.name.as_str())
        .collect();
    want.sort();
    let have: Vec<&str> = catalogue.iter().map(|v| v.name.as_str()).collect();
    if have != want {
        return Err(format!("final catalogue {have:?}, expected {want:?}"));
    }
    let mut referenced = HashSet::new();
    let mut current_epoch = HashMap::new();
    for v in &catalogue {
        let extents = audit
            .map_read(&v.name, 0, v.size)
            .await
            .map_err(|e| format!("map of {}: {e}", v.name))?;
        referenced.extend(extents.iter().filter_map(|e| e.object()).cloned());
        if !v.snapshot {
            current_epoch.insert(v.uuid, v.epoch);
        }
    }
    let mut stored = HashSet::new();
    let (mut spared, mut leaked) = (0u64, Vec::new());
    for prefix in [OWNED_PREFIX, CONTENT_PREFIX] {
        for o in blocker
            .list(prefix)
            .await
            .map_err(|e| format!("list {prefix}: {e}"))?
        {
            stored.insert(o.name.clone());
            if referenced.contains(&o.name) {
                continue;
            }
            match parse_object(&o.name) {
                ObjectKind::Owned { uuid, epoch, .. }
                    if current_epoch.get(&uuid).is_some_and(|&e| epoch >= e) =>
                {
                    spared += 1
                }
                _ => leaked.push(format!("{} ({} bytes)", o.name, o.size)),
            }
        }
    }
    let missing: Vec<_> = referenced.difference(&stored).collect();
    eprintln!(
        "soak: final gc deleted {} objects; {} objects referenced, {} unreferenced at a live \
         volume's current epoch (spared by design), {} leaked, {} missing",
        gc.deleted_objects,
        referenced.len(),
        spared,
        leaked.len(),
        missing.len()
    );
    if !leaked.is_empty() {
        return Err(format!(
            "objects no live map refers to survived gc: {leaked:?}"
        ));
    }
    // A missing referenced object is not a finding by itself: MAPW persists a ZERO block's
    // new entry before the data write creates the object, and a kill between the two leaves an
    // entry whose object never came to be (it reads as zeros, as the block did). Had GC deleted
    // a live object, the flushed data it held would have failed the check above.
    Ok(())
}
