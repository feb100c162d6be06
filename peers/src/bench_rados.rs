//! `archip bench rados`: our full stack (client -> vlmc -> mapper -> RADOS blocker) against
//! RBD on the same cluster, the same pool and in the same run, so the ratios compare like with
//! like whatever the cluster and the machine are.
//!
//! The RBD side is the `rbd` command-line tool: `rbd bench` (client cache off) for the I/O
//! figures, and one `rbd` process per `snap create`/`snap protect`/`clone`. Every `rbd` process
//! pays for connecting to the cluster and opening the image, which librbd inside a long-lived
//! process would not; that cost is measured separately (the median of a read-only `rbd info`)
//! and reported beside the raw figures, so a reader can see how much of the RBD time is process
//! start-up and compare against either.
//!
//! The I/O scenarios are the same on both sides: a volume and an image of the same size are
//! first written end to end with 4 MiB sequential writes (the MB/s figure, and a fill, so the
//! random writes that follow land on allocated objects on both sides), then written at random
//! with 4 KiB writes at queue depth 32. Our RADOS blocker alone (no vlmc, no mapper) runs the
//! same two workloads on plain objects: the gap between it and the full stack is what the stack
//! costs, the gap between it and RBD is what the data path to RADOS costs.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend::{BackendConfig, BackendError, RadosConfig, Store};
use crate::blocker::{Blocker, ObjectName};
use crate::client::VolumeClient;
use crate::peerset::{PeerConfig, PeerSet, PeerSetError};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Bench settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Must be a RADOS backend; the bench works in a namespace of its own below it.
    pub backend: BackendConfig,
    /// Size of the volume and of the RBD image (both written end to end).
    pub size: u64,
    /// 4 KiB random writes per side.
    pub random_ios: u64,
    /// Outstanding 4 KiB random writes.
    pub random_depth: usize,
    /// Outstanding 4 MiB sequential writes. 16 is `rbd bench`'s default; the segment holds 32
    /// buffers of 4 MiB, and a request in flight can hold one at more than one hop.
    pub seq_depth: usize,
    /// Interleaved repeats of the I/O scenarios on each side (medians are reported).
    pub repeats: u32,
    /// Snapshot + clone rounds (the median is reported).
    pub rounds: u32,
    /// Clones of one snapshot in the mass-clone scenario.
    pub clones: u32,
    /// Remove what the bench created (RBD images, our volumes and objects) afterwards.
    pub cleanup: bool,
}

impl Options {
    pub fn new(backend: BackendConfig) -> Self {
        Options {
            backend,
            size: 1024 * MIB,
            random_ios: 40_000,
            random_depth: 32,
            seq_depth: 16,
            repeats: 3,
            rounds: 10,
            clones: 100,
            cleanup: true,
        }
    }
}

/// What can stop the bench.
#[derive(Debug, thiserror::Error)]
pub enum BenchRadosError {
    #[error("`archip bench rados` needs a rados backend (rados:pool=P,conf=PATH,...), got {0}")]
    NotRados(String),
    #[error(
        "the rbd and ceph tools are given a keyring path, never a key: use keyring=PATH instead of key-env"
    )]
    KeyFromEnvironment,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    PeerSet(#[from] PeerSetError),
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

fn step<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> BenchRadosError {
    let what = what.into();
    move |e| BenchRadosError::Step {
        what,
        detail: e.to_string(),
    }
}

type Result<T> = std::result::Result<T, BenchRadosError>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn median_f(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn quantile_ms(v: &mut [Duration], q: f64) -> f64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0.0;
    }
    ms(v[((v.len() as f64 * q) as usize).min(v.len() - 1)])
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Deterministic 4 KiB aligned offsets within `size`.
fn random_offsets(n: u64, size: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / (4 * KIB))) * 4 * KIB
        })
        .collect()
}

/// Where the writes of a scenario go.
enum Target {
    /// Through the full stack, to a volume.
    Stack(Arc<VolumeClient>, String),
    /// Straight to the RADOS blocker: `objects[offset / block]` at `offset % block`.
    Raw(Arc<dyn Blocker>, Vec<ObjectName>, u64),
}

impl Target {
    async fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), String> {
        match self {
            Target::Stack(c, vol) => c.write(vol, offset, data).await.map_err(|e| e.to_string()),
            Target::Raw(b, objects, block) => {
                let object = &objects[(offset / block) as usize % objects.len()];
                b.write(object, offset % block, data)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Issues writes of `len` bytes at `offsets` (in order, `depth` outstanding: a worker takes
/// the next offset when its write completes, as `rbd bench` does) and returns the elapsed time
/// and every write's latency.
async fn drive(
    target: Arc<Target>,
    offsets: Arc<Vec<u64>>,
    len: usize,
    depth: usize,
) -> Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(depth);
    for _ in 0..depth {
        let (target, offsets, next) = (target.clone(), offsets.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let buf = vec![0x5au8; len];
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&off) = offsets.get(i) else {
                    return Ok(lat);
                };
                let t = Instant::now();
                target.write(off, &buf).await?;
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(offsets.len());
    for t in tasks {
        let lat = t
            .await
            .map_err(step("write task"))?
            .map_err(|detail| BenchRadosError::Step {
                what: "write".into(),
                detail,
            })?;
        all.extend(lat);
    }
    Ok((start.elapsed(), all))
}

/// The `rbd`/`ceph` command-line tools, pointed at the backend's cluster as that client.
struct Tools {
    args: Vec<String>,
    pool: String,
}

impl Tools {
    fn new(c: &RadosConfig) -> Result<Self> {
        if c.key_env.is_some() {
            return Err(BenchRadosError::KeyFromEnvironment);
        }
        let mut args = Vec::new();
        if let Some(conf) = &c.conf {
            args.extend(["-c".to_string(), conf.display().to_string()]);
        }
        if !c.monitors.is_empty() {
            args.extend(["-m".to_string(), c.monitors.join(",")]);
        }
        args.extend(["--id".to_string(), c.client.clone()]);
        if let Some(k) = &c.keyring {
            args.extend(["--keyring".to_string(), k.display().to_string()]);
        }
        Ok(Tools {
            args,
            pool: c.pool.clone(),
        })
    }

    /// `pool/name`, as rbd spells an image or `pool/image@snap`.
    fn spec(&self, name: &str) -> String {
        format!("{}/{name}", self.pool)
    }

    /// Runs `tool ARGS...` and returns its stdout and how long it took.
    fn run(&self, tool: &str, args: &[&str]) -> Result<(String, Duration)> {
        let command = format!("{tool} {}", args.join(" "));
        let t = Instant::now();
        let out = Command::new(tool)
            .args(&self.args)
            .args(args)
            .output()
            .map_err(|e| BenchRadosError::Command {
                command: command.clone(),
                detail: e.to_string(),
            })?;
        let took = t.elapsed();
        if !out.status.success() {
            return Err(BenchRadosError::Command {
                command,
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
    }

    fn rbd(&self, args: &[&str]) -> Result<Duration> {
        self.run("rbd", args).map(|(_, t)| t)
    }

    /// `rbd bench` with the client cache off; returns its own ops/s (which leaves out the
    /// process start and the image open).
    fn bench(
        &self,
        image: &str,
        pattern: &str,
        io_size: u64,
        threads: usize,
        total: u64,
    ) -> Result<f64> {
        let (size, threads, total, spec) = (
            io_size.to_string(),
            threads.to_string(),
            total.to_string(),
            self.spec(image),
        );
        let args = [
            "bench",
            "--io-type",
            "write",
            "--io-size",
            &size,
            "--io-pattern",
            pattern,
            "--io-threads",
            &threads,
            "--io-total",
            &total,
            "--rbd_cache=false",
            &spec,
        ];
        let (out, _) = self.run("rbd", &args)?;
        parse_rbd_bench(&out).ok_or_else(|| BenchRadosError::Command {
            command: format!("rbd {}", args.join(" ")),
            detail: format!("no ops/sec in its output: {out:?}"),
        })
    }
}

/// The `ops/sec` of `rbd bench`'s summary line (`elapsed: 3  ops: 25600  ops/sec: 7890.3 ...`).
fn parse_rbd_bench(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.contains("ops/sec:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "ops/sec:")?;
    words.next()?.parse().ok()
}

/// The Ceph version of the tools and of the OSDs, and the OSDs' object stores.
fn cluster_facts(tools: &Tools) -> Value {
    let version = Command::new("ceph")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let osds: Vec<Value> = tools
        .run("ceph", &["osd", "metadata", "-f", "json"])
        .ok()
        .and_then(|(out, _)| serde_json::from_str::<Value>(&out).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    let field = |k: &str| -> Vec<Value> {
        let mut v: Vec<Value> = osds.iter().filter_map(|o| o.get(k).cloned()).collect();
        v.dedup();
        v
    };
    json!({
        "ceph_version": version,
        "osd_versions": field("ceph_version_short"),
        "osd_objectstore": field("osd_objectstore"),
        "osds": osds.len(),
    })
}

fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The RBD side; every image it makes is named `<prefix>...` so cleanup finds them.
struct Rbd<'a> {
    tools: &'a Tools,
    image: String,
}

impl Rbd<'_> {
    fn cleanup(&self, rounds: u32, clones: u32) {
        let t = self.tools;
        let img = &self.image;
        let mut snaps: Vec<String> = (0..rounds).map(|i| format!("s{i}")).collect();
        snaps.push("base".into());
        let mut images: Vec<String> = (0..rounds).map(|i| format!("{img}-c{i}")).collect();
        images.extend((0..clones).map(|i| format!("{img}-m{i}")));
        for name in images {
            let _ = t.rbd(&["rm", "--no-progress", &t.spec(&name)]);
        }
        for s in snaps {
            let _ = t.rbd(&["snap", "unprotect", &t.spec(&format!("{img}@{s}"))]);
        }
        let _ = t.rbd(&["snap", "purge", "--no-progress", &t.spec(img)]);
        if let Err(e) = t.rbd(&["rm", "--no-progress", &t.spec(img)]) {
            tracing::warn!(error = %e, "the bench's RBD image was not removed");
        }
    }
}

async fn ours_cleanup(c: &VolumeClient, vol: &str, rounds: u32, clones: u32) {
    for i in 0..rounds {
        let _ = c.delete(&format!("{vol}-c{i}")).await;
    }
    for i in 0..clones {
        let _ = c.delete(&format!("{vol}-m{i}")).await;
    }
    for i in 0..rounds {
        let _ = c.delete(&format!("{vol}-s{i}")).await;
    }
    let _ = c.delete(&format!("{vol}-base")).await;
    let _ = c.close(vol).await;
    let _ = c.delete(vol).await;
    if let Err(e) = c.gc().await {
        tracing::warn!(error = %e, "gc after the bench failed; its objects stay in the namespace");
    }
}

async fn run_async(
    opts: &Options,
    c: Arc<VolumeClient>,
    raw: Arc<dyn Blocker>,
    tools: &Tools,
) -> Result<Value> {
    let size = opts.size;
    let vol = "bench";
    let rbd = Rbd {
        tools,
        image: format!("archip-bench-{}", std::process::id()),
    };
    let img = rbd.image.clone();
    let seq_offsets: Arc<Vec<u64>> = Arc::new((0..size).step_by((4 * MIB) as usize).collect());
    let rand_offsets = Arc::new(random_offsets(opts.random_ios, size, 0x9e37_79b9));
    let load_before = load_average();

    // (b) 4 MiB sequential writes, which also fill the volume and the image.
    c.create(vol, size, None)
        .await
        .map_err(step("create volume"))?;
    let info = c.info(vol).await.map_err(step("volume info"))?;
    let block = u64::from(info.block_size);
    let stack = Arc::new(Target::Stack(c.clone(), vol.to_string()));
    let (t, _) = drive(
        stack.clone(),
        seq_offsets.clone(),
        (4 * MIB) as usize,
        opts.seq_depth,
    )
    .await?;
    c.flush(vol).await.map_err(step("flush"))?;
    let ours_fill = size as f64 / MIB as f64 / t.as_secs_f64();

    tools.rbd(&[
        "create",
        "--size",
        &format!("{}M", size / MIB),
        &tools.spec(&img),
    ])?;
    let result = rbd_and_rest(
        opts,
        &c,
        raw,
        tools,
        &rbd,
        stack,
        block,
        ours_fill,
        seq_offsets,
        rand_offsets,
    )
    .await;
    if opts.cleanup {
        rbd.cleanup(opts.rounds, opts.clones);
        ours_cleanup(&c, vol, opts.rounds, opts.clones).await;
    }
    let mut v = result?;
    v["load_average_before_after"] = json!([load_before, load_average()]);
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
async fn rbd_and_rest(
    opts: &Options,
    c: &Arc<VolumeClient>,
    raw: Arc<dyn Blocker>,
    tools: &Tools,
    rbd: &Rbd<'_>,
    stack: Arc<Target>,
    block: u64,
    ours_fill: f64,
    seq_offsets: Arc<Vec<u64>>,
    rand_offsets: Arc<Vec<u64>>,
) -> Result<Value> {
    let size = opts.size;
    let vol = "bench";
    let img = rbd.image.as_str();
    let features = tools
        .run("rbd", &["info", "--format", "json", &tools.spec(img)])
        .ok()
        .and_then(|(out, _)| serde_json::from_str::<Value>(&out).ok())
        .and_then(|v| v.get("features").cloned());
    // The first pass writes every block (and creates every object) on all three sides.
    let rbd_fill = tools.bench(img, "seq", 4 * MIB, opts.seq_depth, size)? * 4.0;

    // Our blocker alone, on plain objects of the volume's block size.
    let objects: Vec<ObjectName> = (0..size.div_ceil(block))
        .map(|i| ObjectName::new(format!("benchraw.{i:06}")))
        .collect::<std::result::Result<_, _>>()
        .map_err(step("object name"))?;
    let raw_target = Arc::new(Target::Raw(raw.clone(), objects.clone(), block));
    let seq_mb_s = |t: Duration| size as f64 / MIB as f64 / t.as_secs_f64();
    let (t, _) = drive(
        raw_target.clone(),
        seq_offsets.clone(),
        (4 * MIB) as usize,
        opts.seq_depth,
    )
    .await?;
    let raw_fill = seq_mb_s(t);

    // Then, interleaved so that a burst of load elsewhere on the machine does not land on one
    // side only: (b) 4 MiB sequential overwrites and (a) 4 KiB random writes at depth, on the
    // filled volume / image / objects.
    let (mut seq, mut rand) = ([vec![], vec![], vec![]], [vec![], vec![], vec![]]);
    let (mut lat, mut raw_lat) = (Vec::new(), Vec::new());
    for _ in 0..opts.repeats.max(1) {
        let (t, _) = drive(
            stack.clone(),
            seq_offsets.clone(),
            (4 * MIB) as usize,
            opts.seq_depth,
        )
        .await?;
        c.flush(vol).await.map_err(step("flush"))?;
        seq[0].push(seq_mb_s(t));
        seq[1].push(tools.bench(img, "seq", 4 * MIB, opts.seq_depth, size)? * 4.0);
        let (t, _) = drive(
            raw_target.clone(),
            seq_offsets.clone(),
            (4 * MIB) as usize,
            opts.seq_depth,
        )
        .await?;
        seq[2].push(seq_mb_s(t));

        let ios = rand_offsets.len() as f64;
        let (t, l) = drive(stack.clone(), rand_offsets.clone(), 4096, opts.random_depth).await?;
        c.flush(vol).await.map_err(step("flush"))?;
        rand[0].push(ios / t.as_secs_f64());
        lat.extend(l);
        rand[1].push(tools.bench(img, "rand", 4096, opts.random_depth, opts.random_ios * 4096)?);
        let (t, l) = drive(
            raw_target.clone(),
            rand_offsets.clone(),
            4096,
            opts.random_depth,
        )
        .await?;
        rand[2].push(ios / t.as_secs_f64());
        raw_lat.extend(l);
    }
    for o in &objects {
        let _ = raw.delete(o).await;
    }
    let [ours_seq, rbd_seq, raw_seq] = seq.each_ref().map(|v| median_f(v));
    let [ours_iops, rbd_iops, raw_iops] = rand.each_ref().map(|v| median_f(v));
    let runs = |v: &[f64]| v.iter().map(|x| round2(*x)).collect::<Vec<_>>();

    // What one rbd process costs before it does anything: start, connect, authenticate, read
    // the pool's image directory (median of `rbd ls`, which opens no image).
    let mut floor = Vec::new();
    for _ in 0..opts.rounds.max(1) {
        floor.push(tools.rbd(&["ls", &tools.pool])?);
    }
    let floor = median(floor);

    // (c) Snapshot + clone of the filled volume / image.
    let (mut o_snap, mut o_clone, mut o_total) = (Vec::new(), Vec::new(), Vec::new());
    let (mut r_snap, mut r_protect, mut r_clone, mut r_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.rounds {
        let s = format!("{vol}-s{i}");
        let t = Instant::now();
        c.snapshot(vol, &s).await.map_err(step("snapshot"))?;
        let ts = t.elapsed();
        let t = Instant::now();
        c.clone_volume(&s, &format!("{vol}-c{i}"), None)
            .await
            .map_err(step("clone"))?;
        let tc = t.elapsed();
        o_snap.push(ts);
        o_clone.push(tc);
        o_total.push(ts + tc);

        let snap = tools.spec(&format!("{img}@s{i}"));
        let a = tools.rbd(&["snap", "create", "--no-progress", &snap])?;
        let b = tools.rbd(&["snap", "protect", &snap])?;
        let d = tools.rbd(&["clone", &snap, &tools.spec(&format!("{img}-c{i}"))])?;
        r_snap.push(a);
        r_protect.push(b);
        r_clone.push(d);
        r_total.push(a + b + d);
    }
    let (o_total, r_total) = (median(o_total), median(r_total));
    // RBD without the three process start-ups, the most favourable reading for RBD.
    let r_total_in_process = r_total.saturating_sub(floor * 3);

    // (d) Many clones of one snapshot, one after another on both sides.
    let base = format!("{vol}-base");
    c.snapshot(vol, &base).await.map_err(step("snapshot"))?;
    let t = Instant::now();
    for i in 0..opts.clones {
        c.clone_volume(&base, &format!("{vol}-m{i}"), None)
            .await
            .map_err(step("clone"))?;
    }
    let o_many = t.elapsed();
    let base_snap = tools.spec(&format!("{img}@base"));
    tools.rbd(&["snap", "create", "--no-progress", &base_snap])?;
    tools.rbd(&["snap", "protect", &base_snap])?;
    let t = Instant::now();
    for i in 0..opts.clones {
        tools.rbd(&["clone", &base_snap, &tools.spec(&format!("{img}-m{i}"))])?;
    }
    let r_many = t.elapsed();
    let r_many_in_process = r_many.saturating_sub(floor * opts.clones);

    let per = |d: Duration| ms(d) / f64::from(opts.clones.max(1));
    Ok(json!({
        "bench": "rados",
        "cluster": cluster_facts(tools),
        "backend": format!("rados:pool={},namespace={}", tools.pool, opts_namespace(&opts.backend)),
        "rbd_image_features": features,
        "size_bytes": size,
        "block_size": block,
        "seq_write_4m": {
            "depth": opts.seq_depth,
            "repeats": opts.repeats,
            "ours_mb_s": round2(ours_seq),
            "rbd_mb_s": round2(rbd_seq),
            "ratio": round2(ours_seq / rbd_seq),
            "target": 0.9,
            "breakdown_our_blocker_alone_mb_s": round2(raw_seq),
            "runs_ours_rbd_blocker": [runs(&seq[0]), runs(&seq[1]), runs(&seq[2])],
            "first_fill_mb_s_ours_rbd_blocker": [round2(ours_fill), round2(rbd_fill), round2(raw_fill)],
        },
        "random_write_4k": {
            "depth": opts.random_depth,
            "ios": opts.random_ios,
            "repeats": opts.repeats,
            "ours_iops": ours_iops.round(),
            "rbd_iops": rbd_iops.round(),
            "ratio": round2(ours_iops / rbd_iops),
            "target": 0.9,
            "ours_latency_ms_p50": round2(quantile_ms(&mut lat, 0.5)),
            "ours_latency_ms_p99": round2(quantile_ms(&mut lat, 0.99)),
            "breakdown_our_blocker_alone_iops": raw_iops.round(),
            "breakdown_our_blocker_alone_latency_ms_p50": round2(quantile_ms(&mut raw_lat, 0.5)),
            "breakdown_our_blocker_alone_latency_ms_p99": round2(quantile_ms(&mut raw_lat, 0.99)),
            "runs_ours_rbd_blocker": [runs(&rand[0]), runs(&rand[1]), runs(&rand[2])],
        },
        "snapshot_clone_ms": {
            "rounds": opts.rounds,
            "ours_p50": round2(ms(o_total)),
            "ours_snapshot_p50": round2(ms(median(o_snap))),
            "ours_clone_p50": round2(ms(median(o_clone))),
            "rbd_p50": round2(ms(r_total)),
            "rbd_snap_create_p50": round2(ms(median(r_snap))),
            "rbd_snap_protect_p50": round2(ms(median(r_protect))),
            "rbd_clone_p50": round2(ms(median(r_clone))),
            "ratio": round2(ms(o_total) / ms(r_total)),
            "target": 0.5,
            "rbd_process_floor_ms": round2(ms(floor)),
            "rbd_p50_without_3_process_floors": round2(ms(r_total_in_process)),
            "ratio_vs_rbd_without_floors": ratio_or_null(o_total, r_total_in_process),
        },
        "clones_of_one_snapshot": {
            "clones": opts.clones,
            "ours_total_ms": round2(ms(o_many)),
            "ours_per_clone_ms": round2(per(o_many)),
            "rbd_total_ms": round2(ms(r_many)),
            "rbd_per_clone_ms": round2(per(r_many)),
            "ratio": round2(ms(o_many) / ms(r_many)),
            "rbd_per_clone_ms_without_process_floor": round2(per(r_many_in_process)),
            "ratio_vs_rbd_without_floors": ratio_or_null(o_many, r_many_in_process),
        },
    }))
}

/// `a / b`, or null when the floor estimate left nothing of `b` to compare with.
fn ratio_or_null(a: Duration, b: Duration) -> Value {
    if b.is_zero() {
        Value::Null
    } else {
        json!(round2(a.as_secs_f64() / b.as_secs_f64()))
    }
}

fn opts_namespace(b: &BackendConfig) -> String {
    match b {
        BackendConfig::Rados(c) => c.namespace.clone(),
        BackendConfig::File { .. } => String::new(),
    }
}

/// Runs every scenario on a private peer set over a fresh namespace of the backend's pool (the
/// RBD images go to the same pool) and returns one JSON object.
pub fn run(opts: &Options) -> Result<String> {
    let BackendConfig::Rados(rados) = &opts.backend else {
        return Err(BenchRadosError::NotRados(opts.backend.to_string()));
    };
    let tools = Tools::new(rados)?;
    // A namespace of its own, so the bench neither sees nor disturbs existing volumes.
    let mut rados = rados.clone();
    rados.namespace = format!("{}.bench{}", rados.namespace, std::process::id());
    let backend = BackendConfig::Rados(rados);
    let opts = Options {
        backend: backend.clone(),
        ..opts.clone()
    };

    let dir: PathBuf =
        std::env::temp_dir().join(format!("archip-bench-rados-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(step(format!("{}", dir.display())))?;
    let segment = format!("/dev/shm/archip-bench-rados-{}", std::process::id());
    let mut config = PeerConfig::new(&dir, segment.clone(), "bench-node");
    config.backend = backend.clone();
    config.registry = None;
    let set = PeerSet::start(&config)?;
    let raw = backend.open(Store::Objects)?;
    let client = Arc::new(VolumeClient::connect(set.segment()).map_err(step("connect"))?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(step("runtime"))?;
    let result = rt.block_on(run_async(&opts, client.clone(), raw, &tools));
    drop(client);
    set.stop();
    let _ = std::fs::remove_file(&segment);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rbd_bench_summary() {
        let out = "bench  type write io_size 4096 io_threads 32 bytes 20971520 pattern random\n  SEC       OPS   OPS/SEC   BYTES/SEC\n    1      4896   4987.85    19 MiB/s\nelapsed: 1   ops: 5120   ops/sec: 4776.12   bytes/sec: 19 MiB/s\n";
        assert_eq!(parse_rbd_bench(out), Some(4776.12));
        assert_eq!(parse_rbd_bench("nothing here"), None);
        assert_eq!(parse_rbd_bench("ops/sec: fast"), None);
    }

    #[test]
    fn refuses_other_backends_and_keys_from_the_environment() {
        let e = run(&Options::new(BackendConfig::file("/tmp/x"))).unwrap_err();
        assert!(matches!(e, BenchRadosError::NotRados(_)), "{e}");
        let b = BackendConfig::parse("rados:pool=p,conf=/c,key-env=K").unwrap();
        let e = run(&Options::new(b)).unwrap_err();
        assert!(matches!(e, BenchRadosError::KeyFromEnvironment), "{e}");
    }
}
