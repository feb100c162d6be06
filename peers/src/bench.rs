//! `archip bench volume`: the volume data path and the metadata operations, each against a
//! baseline measured in the same run.
//!
//! - 4 KiB random reads and writes at queue depth 32 through client -> vlmc -> (mapper) ->
//!   file blocker, against pread/pwrite at the same depth on the very object files the volume
//!   wrote (the same page cache, the same filesystem).
//! - Snapshot and clone latency of a 1 GiB and a 1 TiB thin volume with some blocks written:
//!   metadata only, so the 1 TiB / 1 GiB ratio should stay small.
//! - 1000 clones of one snapshot of a 10 GiB volume: total time and metadata bytes per clone.
//! - The first 4 KiB write to a block after a clone (copy-on-write) against a 4 KiB write to a
//!   block the volume already owns.
//! - The same random reads under a QoS limit (IOPS, then bandwidth): achieved over limit.
//! - The same random I/O on the volume opened shared (the live-migration mode: no mapping
//!   cached in vlmc, and the mapper checks the lock on every request) against exclusive.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::VolumeClient;
use crate::peerset::{PeerConfig, PeerSet};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const DEPTH: usize = 32;

/// Bench settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scratch directory (objects go below it; removed afterwards).
    pub dir: PathBuf,
    /// I/Os per random-I/O scenario.
    pub ios: u64,
    /// Volume size for the random-I/O scenarios.
    pub io_volume: u64,
    pub clones: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: std::env::temp_dir().join(format!("archip-bench-volume-{}", std::process::id())),
            ios: 50_000,
            io_volume: 256 * MIB,
            clones: 1000,
        }
    }
}

fn quantiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort_unstable();
    let q = |f: f64| v[((v.len() as f64 * f) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    (q(0.5), q(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Deterministic offsets: 4 KiB aligned within `size`.
pub(crate) fn offsets(n: u64, size: u64, seed: u64) -> Vec<u64> {
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

async fn volume_iops(c: &Arc<VolumeClient>, vol: &str, offs: &[u64], write: bool) -> f64 {
    let per = offs.len().div_ceil(DEPTH);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for chunk in offs.chunks(per) {
        let c = c.clone();
        let vol = vol.to_string();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0x5au8; 4096];
            for off in chunk {
                if write {
                    c.write(&vol, off, &buf).await.expect("write");
                } else {
                    c.read(&vol, off, &mut buf).await.expect("read");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("io task");
    }
    offs.len() as f64 / start.elapsed().as_secs_f64()
}

/// pread/pwrite at the same depth (one thread per outstanding I/O) on the volume's objects.
fn direct_iops(files: &[PathBuf], block: u64, offs: &[u64], write: bool) -> f64 {
    let files: Arc<Vec<std::fs::File>> = Arc::new(
        files
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .expect("object file")
            })
            .collect(),
    );
    let per = offs.len().div_ceil(DEPTH);
    let start = Instant::now();
    std::thread::scope(|s| {
        for chunk in offs.chunks(per) {
            let files = files.clone();
            s.spawn(move || {
                let mut buf = vec![0x5au8; 4096];
                for &off in chunk {
                    let f = &files[((off / block) as usize) % files.len()];
                    let at = off % block;
                    if write {
                        f.write_all_at(&buf, at).expect("pwrite");
                    } else {
                        f.read_exact_at(&mut buf, at).expect("pread");
                    }
                }
            });
        }
    });
    offs.len() as f64 / start.elapsed().as_secs_f64()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The data objects (`ob.*`) under `dir`, sorted by name.
pub(crate) fn data_objects(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("objects dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ob."))
        })
        .collect();
    v.sort();
    v
}

async fn snapshot_clone_latency(
    c: &VolumeClient,
    size: u64,
    tag: &str,
) -> (Vec<Duration>, Vec<Duration>) {
    let vol = format!("thin-{tag}");
    c.create(&vol, size, None)
        .await
        .expect("create thin volume");
    // Some written blocks, spread over the volume.
    for i in 0..16u64 {
        c.write(&vol, i * (size / 16), &[7u8; 4096])
            .await
            .expect("write");
    }
    c.flush(&vol).await.expect("flush");
    let (mut snaps, mut clones) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let s = format!("{vol}-s{i}");
        let t = Instant::now();
        c.snapshot(&vol, &s).await.expect("snapshot");
        snaps.push(t.elapsed());
        let t = Instant::now();
        c.clone_volume(&s, &format!("{vol}-c{i}"), None)
            .await
            .expect("clone");
        clones.push(t.elapsed());
    }
    (snaps, clones)
}

async fn run_async(opts: &Options, c: Arc<VolumeClient>) -> String {
    let objects = opts.dir.join("data").join("objects");
    let mut out = Vec::new();

    // Random 4 KiB I/O on a fully written volume (every block owned).
    let size = opts.io_volume;
    c.create("io", size, None).await.expect("create io volume");
    let fill = vec![0xa5u8; 4 * MIB as usize];
    for off in (0..size).step_by(fill.len()) {
        c.write("io", off, &fill).await.expect("fill");
    }
    c.flush("io").await.expect("flush");
    let info = c.info("io").await.expect("info");
    let block = u64::from(info.block_size);
    let files = data_objects(&objects);
    let offs = offsets(opts.ios, size, 0x9e37_79b9);
    let vr = volume_iops(&c, "io", &offs, false).await;
    let dr = direct_iops(&files, block, &offs, false);
    let vw = volume_iops(&c, "io", &offs, true).await;
    let dw = direct_iops(&files, block, &offs, true);
    out.push(format!(
        "\"random_4k_qd32\":{{\"volume_read_iops\":{vr:.0},\"direct_pread_iops\":{dr:.0},\"ratio_read\":{:.2},\"volume_write_iops\":{vw:.0},\"direct_pwrite_iops\":{dw:.0},\"ratio_write\":{:.2}}}",
        vr / dr,
        vw / dw
    ));

    // The same I/O with the volume opened shared (this node holds the lock after its first
    // write, so the mapper serves from its cache after one lock check per request).
    // QoS: the same random reads under an IOPS limit well below what the path does, then a
    // bandwidth limit. One second's burst is spent first (untimed), so the timed 3 seconds
    // show the steady rate: achieved over limit should be close to 1.
    let limit = (vr / 10.0).clamp(100.0, 2000.0) as u64;
    let warm = &offs[..limit as usize];
    c.set_qos(
        "io",
        crate::mapper::QosLimits {
            iops: limit,
            bytes_per_sec: 0,
        },
    )
    .await
    .expect("set qos");
    let n = (limit * 3) as usize;
    volume_iops(&c, "io", warm, false).await;
    let qr = volume_iops(&c, "io", &offs[..n], false).await;
    let bw_limit = limit * 4096;
    c.set_qos(
        "io",
        crate::mapper::QosLimits {
            iops: 0,
            bytes_per_sec: bw_limit,
        },
    )
    .await
    .expect("set qos");
    volume_iops(&c, "io", warm, false).await;
    let qb = volume_iops(&c, "io", &offs[..n], false).await * 4096.0;
    c.set_qos("io", crate::mapper::QosLimits::default())
        .await
        .expect("clear qos");
    out.push(format!(
        "\"qos_random_4k_qd32\":{{\"iops_limit\":{limit},\"achieved_iops\":{qr:.0},\"ratio_iops\":{:.2},\"bytes_per_sec_limit\":{bw_limit},\"achieved_bytes_per_sec\":{qb:.0},\"ratio_bytes\":{:.2},\"ios\":{n}}}",
        qr / limit as f64,
        qb / bw_limit as f64
    ));

    c.open_shared("io").await.expect("open shared");
    let sr = volume_iops(&c, "io", &offs, false).await;
    let sw = volume_iops(&c, "io", &offs, true).await;
    c.close("io").await.expect("close");
    out.push(format!(
        "\"shared_mode_random_4k_qd32\":{{\"shared_read_iops\":{sr:.0},\"exclusive_read_iops\":{vr:.0},\"ratio_read\":{:.2},\"shared_write_iops\":{sw:.0},\"exclusive_write_iops\":{vw:.0},\"ratio_write\":{:.2}}}",
        sr / vr,
        sw / vw
    ));

    // Snapshot and clone latency, 1 GiB vs 1 TiB.
    let (s1, c1) = snapshot_clone_latency(&c, GIB, "1g").await;
    let (s2, c2) = snapshot_clone_latency(&c, 1024 * GIB, "1t").await;
    let ((s1p50, s1p99), (c1p50, c1p99)) = (quantiles(s1), quantiles(c1));
    let ((s2p50, s2p99), (c2p50, c2p99)) = (quantiles(s2), quantiles(c2));
    out.push(format!(
        "\"snapshot_ms\":{{\"1GiB\":{{\"p50\":{s1p50:.3},\"p99\":{s1p99:.3}}},\"1TiB\":{{\"p50\":{s2p50:.3},\"p99\":{s2p99:.3}}},\"ratio_1TiB_vs_1GiB_p50\":{:.2}}},\"clone_ms\":{{\"1GiB\":{{\"p50\":{c1p50:.3},\"p99\":{c1p99:.3}}},\"1TiB\":{{\"p50\":{c2p50:.3},\"p99\":{c2p99:.3}}},\"ratio_1TiB_vs_1GiB_p50\":{:.2}}}",
        s2p50 / s1p50,
        c2p50 / c1p50
    ));

    // Many clones of one snapshot of a 10 GiB volume.
    c.create("base10g", 10 * GIB, None).await.expect("create");
    for i in 0..64u64 {
        c.write("base10g", i * 160 * MIB, &[3u8; 4096])
            .await
            .expect("write");
    }
    c.snapshot("base10g", "base10g-snap")
        .await
        .expect("snapshot");
    let before = dir_bytes(&objects);
    let t = Instant::now();
    let per = (opts.clones as usize).div_ceil(DEPTH);
    let names: Vec<u32> = (0..opts.clones).collect();
    let mut tasks = Vec::new();
    for chunk in names.chunks(per) {
        let c = c.clone();
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for i in chunk {
                c.clone_volume("base10g-snap", &format!("base10g-c{i}"), None)
                    .await
                    .expect("clone");
            }
        }));
    }
    for task in tasks {
        task.await.expect("clone task");
    }
    let total = t.elapsed();
    let meta = dir_bytes(&objects).saturating_sub(before) / u64::from(opts.clones.max(1));
    out.push(format!(
        "\"clones_of_10GiB_snapshot\":{{\"clones\":{},\"total_ms\":{:.1},\"per_clone_ms\":{:.3},\"metadata_bytes_per_clone\":{meta}}}",
        opts.clones,
        ms(total),
        ms(total) / f64::from(opts.clones.max(1))
    ));

    // First write after a clone (copy-on-write of a shared block) vs a write to an owned block.
    c.create("cow-src", 1024 * MIB, None).await.expect("create");
    let fill = vec![0x11u8; 4 * MIB as usize];
    for off in (0..1024 * MIB).step_by(fill.len()) {
        c.write("cow-src", off, &fill).await.expect("fill");
    }
    c.snapshot("cow-src", "cow-snap").await.expect("snapshot");
    c.clone_volume("cow-snap", "cow-clone", None)
        .await
        .expect("clone");
    let blocks = 1024 * MIB / block;
    let (mut first, mut owned) = (Vec::new(), Vec::new());
    for b in 0..blocks {
        let t = Instant::now();
        c.write("cow-clone", b * block + 8192, &[0x22u8; 4096])
            .await
            .expect("cow write");
        first.push(t.elapsed());
    }
    for b in 0..blocks {
        let t = Instant::now();
        c.write("cow-clone", b * block + 16384, &[0x33u8; 4096])
            .await
            .expect("owned write");
        owned.push(t.elapsed());
    }
    let ((fp50, fp99), (op50, op99)) = (quantiles(first), quantiles(owned));
    out.push(format!(
        "\"first_write_after_clone_ms\":{{\"cow_p50\":{fp50:.3},\"cow_p99\":{fp99:.3},\"owned_p50\":{op50:.3},\"owned_p99\":{op99:.3},\"ratio_cow_vs_owned_p50\":{:.1},\"block_size\":{block}}}",
        fp50 / op50
    ));
    format!("{{\"bench\":\"volume\",{}}}", out.join(","))
}

/// Runs every scenario on a private peer set and returns one JSON object.
pub fn run(opts: &Options) -> Result<String, crate::peerset::PeerSetError> {
    let _ = std::fs::remove_dir_all(&opts.dir);
    std::fs::create_dir_all(&opts.dir).map_err(|e| {
        crate::peerset::PeerSetError::Config(format!("{}: {e}", opts.dir.display()))
    })?;
    let segment = format!("/dev/shm/archip-bench-volume-{}", std::process::id());
    let config = PeerConfig::new(opts.dir.join("data"), segment.clone(), "bench-node");
    let set = PeerSet::start(&config)?;
    let client = Arc::new(
        VolumeClient::connect(set.segment())
            .map_err(|e| crate::peerset::PeerSetError::Config(format!("connect: {e}")))?,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| crate::peerset::PeerSetError::Config(format!("runtime: {e}")))?;
    let json = rt.block_on(run_async(opts, client.clone()));
    drop(client);
    set.stop();
    let _ = std::fs::remove_file(&segment);
    let _ = std::fs::remove_dir_all(&opts.dir);
    Ok(json)
}
