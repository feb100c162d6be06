//! `archip bench cost`: what one 4 KiB I/O costs through the volume path, counted rather
//! than timed, against pread/pwrite on the same object files in the same run.
//!
//! Why counts: on a shared 2-core machine wall-clock figures swing by tens of percent from
//! run to run, so a change to the data path is judged by what it does per I/O: CPU time,
//! context switches (each voluntary one is a thread that went to sleep waiting for another:
//! a hand-off), xseg hops (requests accepted by any port: client -> vlmc -> blocker is two)
//! and xseg futex waits (a port owner that found no work, slept on its futex and had to be
//! woken). Machine instructions come from `e2e/bench-cost.sh`, which runs one scenario of this
//! bench under `valgrind --tool=callgrind` at two I/O counts and divides the difference
//! (start-up cancels).
//!
//! Every scenario runs on a volume whose blocks are all owned and whose mappings vlmc already
//! caches: the fast path, the one a run-to-completion design should make nearly free.
//!
//! Three paths: `volume-*` through [`VolumeClient`] (async, a tokio runtime and the client's
//! receiver thread: what NBD and the CLI pay), `port-*` from one thread that owns an xseg port
//! and waits on it itself (what the ublk queue thread does, less the kernel's side), and
//! `pread`/`pwrite` on the object files (the baseline).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::client::VolumeClient;
use crate::peerset::{PeerConfig, PeerSet, PeerSetError};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Small enough to fill quickly under valgrind, large enough to spread over several objects.
const VOLUME: u64 = 16 * MIB;
const BLOCK: u64 = 4 * MIB;

/// How a scenario's I/O reaches the data (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// [`VolumeClient`] through the peers.
    Volume,
    /// An xseg port of a plain thread through the peers.
    Port,
    /// pread/pwrite on the object files: the baseline.
    Direct,
}

/// One measured way of doing 4 KiB I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    pub path: Path,
    pub write: bool,
    pub depth: usize,
}

impl Scenario {
    /// Every scenario, the baseline after the paths through the peers.
    pub fn all() -> Vec<Scenario> {
        let mut v = Vec::new();
        for depth in [1, 32] {
            for write in [false, true] {
                for path in [Path::Volume, Path::Port, Path::Direct] {
                    v.push(Scenario { path, write, depth });
                }
            }
        }
        v
    }

    /// `volume-read-qd1`, `port-write-qd1`, `pread-qd32`, ...
    pub fn name(&self) -> String {
        let what = match (self.path, self.write) {
            (Path::Volume, false) => "volume-read",
            (Path::Volume, true) => "volume-write",
            (Path::Port, false) => "port-read",
            (Path::Port, true) => "port-write",
            (Path::Direct, false) => "pread",
            (Path::Direct, true) => "pwrite",
        };
        format!("{what}-qd{}", self.depth)
    }

    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::all().into_iter().find(|s| s.name() == name)
    }

    fn baseline(&self) -> Scenario {
        Scenario {
            path: Path::Direct,
            ..*self
        }
    }
}

/// Bench settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scratch directory (removed afterwards).
    pub dir: PathBuf,
    /// I/Os per scenario.
    pub ios: u64,
    /// Only these scenarios (all when empty).
    pub only: Vec<Scenario>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: std::env::temp_dir().join(format!("archip-bench-cost-{}", std::process::id())),
            ios: 20_000,
            only: Vec::new(),
        }
    }
}

/// The process's resource counters (all threads, live and ended).
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_us: f64,
    voluntary: f64,
    involuntary: f64,
}

fn usage() -> Usage {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct getrusage fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer; getrusage cannot fail with these.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    Usage {
        cpu_us: tv(ru.ru_utime) + tv(ru.ru_stime),
        voluntary: ru.ru_nvcsw as f64,
        involuntary: ru.ru_nivcsw as f64,
    }
}

/// Threads of this process now (from /proc/self/status).
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Requests accepted and owner wake-ups, summed over every port of the segment.
fn xseg_counts(seg: &xseg::Segment) -> (f64, f64) {
    let (mut hops, mut wakeups) = (0u64, 0u64);
    for p in 0..seg.layout().config.nr_ports {
        if let Ok(s) = seg.port_stats(p) {
            hops += s.accepted;
            wakeups += s.wakeups;
        }
    }
    (hops as f64, wakeups as f64)
}

/// What one scenario cost, per I/O.
#[derive(Debug, Clone, Copy)]
struct Cost {
    wall_us: f64,
    cpu_us: f64,
    voluntary: f64,
    involuntary: f64,
    hops: f64,
    wakeups: f64,
}

impl Cost {
    fn json(&self) -> String {
        format!(
            "{{\"wall_us\":{:.3},\"cpu_us\":{:.3},\"context_switches\":{:.3},\"voluntary\":{:.3},\"involuntary\":{:.3},\"xseg_hops\":{:.3},\"xseg_futex_waits\":{:.3}}}",
            self.wall_us,
            self.cpu_us,
            self.voluntary + self.involuntary,
            self.voluntary,
            self.involuntary,
            self.hops,
            self.wakeups
        )
    }
}

struct Bench {
    rt: tokio::runtime::Runtime,
    client: Arc<VolumeClient>,
    seg: Arc<xseg::Segment>,
    files: Vec<std::fs::File>,
}

impl Bench {
    fn measure(&self, s: Scenario, offs: &[u64]) -> Cost {
        let before = usage();
        let (h0, w0) = xseg_counts(&self.seg);
        let start = Instant::now();
        match s.path {
            Path::Volume => self.rt.block_on(self.volume_io(s, offs)),
            Path::Port => self.port_io(s, offs),
            Path::Direct => self.direct_io(s, offs),
        }
        let wall = start.elapsed().as_secs_f64() * 1e6;
        let after = usage();
        let (h1, w1) = xseg_counts(&self.seg);
        let n = offs.len() as f64;
        Cost {
            wall_us: wall / n,
            cpu_us: (after.cpu_us - before.cpu_us) / n,
            voluntary: (after.voluntary - before.voluntary) / n,
            involuntary: (after.involuntary - before.involuntary) / n,
            hops: (h1 - h0) / n,
            wakeups: (w1 - w0) / n,
        }
    }

    async fn volume_io(&self, s: Scenario, offs: &[u64]) {
        let per = offs.len().div_ceil(s.depth);
        let mut tasks = Vec::new();
        for chunk in offs.chunks(per) {
            let c = self.client.clone();
            let chunk = chunk.to_vec();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0x5au8; 4096];
                for off in chunk {
                    if s.write {
                        c.write("cost", off, &buf).await.expect("write");
                    } else {
                        c.read("cost", off, &mut buf).await.expect("read");
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("io task");
        }
    }

    /// One thread, one dynamic port, up to `depth` requests in flight to vlmc, waiting on the
    /// port itself: the ublk queue's way, without the kernel.
    fn port_io(&self, s: Scenario, offs: &[u64]) {
        let mut port = self.seg.bind_dynamic("bench-cost").expect("bench port");
        let vlmc = crate::peerset::Ports::VLMC;
        let op = if s.write {
            xseg::Op::Write
        } else {
            xseg::Op::Read
        };
        let mut buf = vec![0x5au8; 4096];
        let (mut sent, mut done, mut inflight) = (0usize, 0usize, 0usize);
        while done < offs.len() {
            while inflight < s.depth && sent < offs.len() {
                let mut req = port.alloc(op, b"cost", 4096).expect("request");
                req.set_offset(offs[sent]);
                req.set_size(4096);
                if s.write {
                    req.write_data(&buf).expect("write data");
                }
                port.submit(req, vlmc).map_err(|(e, _)| e).expect("submit");
                sent += 1;
                inflight += 1;
            }
            match port.receive() {
                Some(rep) => {
                    assert_eq!(rep.status(), xseg::Status::Ok, "port I/O failed");
                    if !s.write {
                        buf.copy_from_slice(&rep.data().expect("read data")[..4096]);
                    }
                    port.free(rep);
                    done += 1;
                    inflight -= 1;
                }
                None => {
                    port.wait(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// The baseline: one thread per outstanding I/O, straight on the object files.
    fn direct_io(&self, s: Scenario, offs: &[u64]) {
        let per = offs.len().div_ceil(s.depth);
        std::thread::scope(|sc| {
            for chunk in offs.chunks(per) {
                let files = &self.files;
                sc.spawn(move || {
                    let mut buf = vec![0x5au8; 4096];
                    for &off in chunk {
                        let f = &files[(off / BLOCK) as usize];
                        if s.write {
                            f.write_all_at(&buf, off % BLOCK).expect("pwrite");
                        } else {
                            f.read_exact_at(&mut buf, off % BLOCK).expect("pread");
                        }
                    }
                });
            }
        });
    }
}

fn setup_error(what: &str, e: impl std::fmt::Display) -> PeerSetError {
    PeerSetError::Config(format!("bench cost: {what}: {e}"))
}

/// Runs the scenarios on a private peer set over the file backend; returns one JSON object.
pub fn run(opts: &Options) -> Result<String, PeerSetError> {
    let _ = std::fs::remove_dir_all(&opts.dir);
    std::fs::create_dir_all(&opts.dir).map_err(|e| setup_error("scratch dir", e))?;
    let segment = format!("/dev/shm/archip-bench-cost-{}", std::process::id());
    let config = PeerConfig::new(opts.dir.join("data"), segment.clone(), "bench-node");
    let set = PeerSet::start(&config)?;
    let seg = set.segment().clone();
    let client = Arc::new(VolumeClient::connect(&seg).map_err(|e| setup_error("connect", e))?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| setup_error("runtime", e))?;
    // Every block written, so every mapping is owned, then read once so vlmc caches it.
    rt.block_on(async {
        client.create("cost", VOLUME, Some(BLOCK)).await?;
        let fill = vec![0xa5u8; BLOCK as usize];
        let mut buf = vec![0u8; 4096];
        for b in 0..VOLUME / BLOCK {
            client.write("cost", b * BLOCK, &fill).await?;
            client.read("cost", b * BLOCK, &mut buf).await?;
        }
        client.flush("cost").await
    })
    .map_err(|e| setup_error("filling the volume", e))?;
    let objects = opts.dir.join("data").join("objects");
    let names = crate::bench::data_objects(&objects);
    if names.len() as u64 != VOLUME / BLOCK {
        return Err(setup_error(
            "objects",
            format!("{} data objects, want {}", names.len(), VOLUME / BLOCK),
        ));
    }
    let files = names
        .iter()
        .map(|p| std::fs::OpenOptions::new().read(true).write(true).open(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_error("object file", e))?;
    let bench = Bench {
        rt,
        client: client.clone(),
        seg,
        files,
    };
    let scenarios = if opts.only.is_empty() {
        Scenario::all()
    } else {
        opts.only.clone()
    };
    let offs = crate::bench::offsets(opts.ios, VOLUME, 0x9e37_79b9_7f4a_7c15);
    let mut results: Vec<(Scenario, Cost)> = Vec::new();
    for s in scenarios {
        // A short warm-up, unmeasured: page cache, allocator and runtime in their steady state.
        bench.measure(s, &offs[..offs.len().min(500)]);
        results.push((s, bench.measure(s, &offs)));
    }
    let threads = threads();
    let mut out: Vec<String> = Vec::new();
    for (s, c) in &results {
        let mut entry = format!("\"{}\":{{\"per_io\":{}", s.name(), c.json());
        if s.path != Path::Direct
            && let Some((_, b)) = results.iter().find(|(o, _)| *o == s.baseline())
        {
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            let r = |v: f64| {
                if v.is_finite() {
                    format!("{v:.2}")
                } else {
                    "null".into()
                }
            };
            // Context switches are compared as counts above: the baseline's are near zero.
            entry.push_str(&format!(
                ",\"vs_{}\":{{\"cpu\":{},\"wall\":{}}}",
                s.baseline().name(),
                r(ratio(c.cpu_us, b.cpu_us)),
                r(ratio(c.wall_us, b.wall_us)),
            ));
        }
        entry.push('}');
        out.push(entry);
    }
    drop(bench);
    drop(client);
    set.stop();
    let _ = std::fs::remove_file(&segment);
    let _ = std::fs::remove_dir_all(&opts.dir);
    Ok(format!(
        "{{\"bench\":\"cost\",\"ios\":{},\"threads\":{threads},{}}}",
        opts.ios,
        out.join(",")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::all() {
            assert_eq!(Scenario::parse(&s.name()), Some(s));
        }
        assert_eq!(Scenario::parse("volume-read-qd7"), None);
        assert_eq!(Scenario::all().len(), 12);
    }

    #[test]
    fn a_run_counts_hops_through_the_peers_and_none_for_the_baseline() {
        let opts = Options {
            ios: 200,
            only: vec![
                Scenario::parse("volume-read-qd1").unwrap(),
                Scenario::parse("port-read-qd1").unwrap(),
                Scenario::parse("port-write-qd32").unwrap(),
                Scenario::parse("pread-qd1").unwrap(),
            ],
            ..Default::default()
        };
        let json = run(&opts).expect("bench cost");
        let v: serde_json::Value = serde_json::from_str(&json).expect("json");
        let ours = &v["volume-read-qd1"]["per_io"];
        let base = &v["pread-qd1"]["per_io"];
        // A cached read is client -> vlmc -> blocker: at least two accepted requests.
        assert!(ours["xseg_hops"].as_f64().unwrap() >= 2.0, "{json}");
        assert_eq!(base["xseg_hops"].as_f64(), Some(0.0), "{json}");
        // The port path is the same two hops, without the client's runtime.
        let port = &v["port-read-qd1"]["per_io"];
        assert!(port["xseg_hops"].as_f64().unwrap() >= 2.0, "{json}");
        assert!(v["port-read-qd1"]["vs_pread-qd1"].is_object(), "{json}");
        assert!(
            v["port-write-qd32"]["per_io"]["xseg_hops"]
                .as_f64()
                .unwrap()
                >= 2.0,
            "{json}"
        );
        assert!(v["volume-read-qd1"]["vs_pread-qd1"].is_object(), "{json}");
    }
}
