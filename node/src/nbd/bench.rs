//! `archip bench nbd`: `qemu-img bench` against our NBD export of a clone, and against
//! `qemu-nbd` serving a qcow2 overlay on a raw base image, in one run on the same machine.
//!
//! Both sides are the copy-on-write situation of a freshly cloned disk: ours is a volume
//! cloned from a fully written source, theirs is `qemu-img create -f qcow2 -b base.raw` over
//! a raw file with the same content. Both are reached the same way (NBD over a unix socket,
//! the same `qemu-img bench` client), so the ratio compares the servers and what sits below
//! them. Phases, each run on both sides back to back: reads of the clone (served from the
//! source), writes (copy-on-write), then reads again (now of the clone's own data).
//!
//! The peer set runs in this process on a scratch directory (under `TMPDIR`) and segment
//! ([`ScratchPeerSet`]), both removed afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet, Ports};
use xseg::Segment;

use super::{NbdConfig, NbdError, NbdServer};

/// A directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A fresh, uniquely named directory; `tag` shows up in its name.
    pub fn new(tag: &str) -> Result<ScratchDir, NbdError> {
        let path = std::env::temp_dir().join(unique_name("archip", tag));
        std::fs::create_dir_all(&path).map_err(|source| NbdError::Io {
            what: format!("creating {}", path.display()),
            source,
        })?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `prefix-tag-pid-nanos-counter`: unique across processes and within one.
fn unique_name(prefix: &str, tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{tag}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Relaxed)
    )
}

/// A peer set (blocker, mapper, vlmc as threads of this process) over a scratch data
/// directory and a uniquely named segment under /dev/shm; all of it is stopped and removed on
/// drop. For the benchmark and for tests of the frontends.
pub struct ScratchPeerSet {
    set: Option<PeerSet>,
    segment: PathBuf,
    dir: ScratchDir,
}

impl std::fmt::Debug for ScratchPeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScratchPeerSet")
            .field("segment", &self.segment)
            .field("dir", &self.dir)
            .finish()
    }
}

impl ScratchPeerSet {
    /// Starts the peers with the given segment layout (`dynamic_start` is forced to the port
    /// plan's) and the default number of workers per peer.
    pub fn start(tag: &str, xseg: xseg::Config) -> Result<ScratchPeerSet, NbdError> {
        Self::start_with(tag, xseg, None)
    }

    /// As [`start`](Self::start), with `workers` tokio threads per peer if given.
    pub fn start_with(
        tag: &str,
        mut xseg: xseg::Config,
        workers: Option<usize>,
    ) -> Result<ScratchPeerSet, NbdError> {
        let dir = ScratchDir::new(tag)?;
        let segment = PathBuf::from("/dev/shm").join(unique_name("xseg", tag));
        xseg.dynamic_start = Ports::DYNAMIC_START;
        let mut config = PeerConfig::new(
            dir.path().join("data"),
            segment.to_string_lossy().into_owned(),
            "node-scratch",
        );
        config.xseg = xseg;
        if let Some(w) = workers {
            config.workers = w;
        }
        let set = PeerSet::start(&config).map_err(|e| NbdError::Bench(format!("peer set: {e}")));
        let set = match set {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&segment);
                return Err(e);
            }
        };
        Ok(ScratchPeerSet {
            set: Some(set),
            segment,
            dir,
        })
    }

    pub fn segment(&self) -> &Arc<Segment> {
        self.set.as_ref().expect("running until drop").segment()
    }

    /// The scratch directory (sockets and image files can go there too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new client on its own port.
    pub fn client(&self) -> Result<VolumeClient, NbdError> {
        Ok(VolumeClient::connect(self.segment())?)
    }
}

impl Drop for ScratchPeerSet {
    fn drop(&mut self) {
        if let Some(s) = self.set.take() {
            s.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// What to run. The defaults are those of the issue: 4 KiB requests, depth 32, 20000 per run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Size of the source volume and base image; both are fully written before cloning.
    pub size: u64,
    /// Requests per `qemu-img bench` run.
    pub count: u64,
    /// Requests in flight.
    pub depth: u32,
    /// Bytes per request.
    pub buffer: u64,
    /// Distance between consecutive requests' offsets (qemu-img bench walks sequentially and
    /// wraps at the end of the image; it has no random mode).
    pub step: u64,
    /// Rounds, each on a fresh clone and a fresh overlay; the median of each phase is
    /// reported (single runs on a small machine vary by a third).
    pub rounds: usize,
    /// Tokio threads per peer; by default one per two CPUs (at least one), since on a small
    /// machine more threads than cores only add context switches.
    pub peer_workers: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            size: 256 << 20,
            count: 20_000,
            depth: 32,
            buffer: 4096,
            step: 4096,
            rounds: 3,
            peer_workers: None,
        }
    }
}

/// A deterministic, incompressible-looking fill for the source (xorshift over the offset),
/// with every eighth MiB left zero like a real disk's unused space.
fn fill(offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let at = offset + (i as u64) * 8;
        let v = if (at >> 20) % 8 == 7 {
            0
        } else {
            let mut x = at.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
}

fn run_command(cmd: &mut Command) -> Result<String, NbdError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NbdError::Io {
            what: format!("running {shown}"),
            source,
        })?;
    if !out.status.success() {
        return Err(NbdError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process killed on drop (qemu-nbd in persistent mode).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on `path`, with a bounded number of attempts.
fn wait_for_socket(path: &Path, child: &mut Child) -> Result<(), NbdError> {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NbdError::Bench(format!("qemu-nbd exited early: {status}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(NbdError::Bench(format!(
        "nothing listens on {} after 5 s",
        path.display()
    )))
}

/// One `qemu-img bench` run; returns requests per second.
fn qemu_img_bench(o: &BenchOptions, url: &str, write: bool) -> Result<f64, NbdError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["bench", "-f", "raw", "-t", "none"])
        .args(["-c", &o.count.to_string()])
        .args(["-d", &o.depth.to_string()])
        .args(["-s", &o.buffer.to_string()])
        .args(["-S", &o.step.to_string()]);
    if write {
        // Not the default zero pattern, so that no layer can take a shortcut for zeros.
        cmd.args(["-w", "--pattern=165"]);
    }
    cmd.arg(url);
    let start = Instant::now();
    let out = run_command(&mut cmd)?;
    let wall = start.elapsed().as_secs_f64();
    // "Run completed in 1.234 seconds." excludes qemu-img's start-up; fall back to wall time.
    let secs = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|&s| s > 0.0)
        .unwrap_or(wall);
    Ok(o.count as f64 / secs)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NbdError {
    let what = what.into();
    move |source| NbdError::Io { what, source }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Starts `qemu-nbd` on `overlay` at `socket` and waits until it accepts connections.
fn start_qemu_nbd(overlay: &Path, socket: &Path) -> Result<KillOnDrop, NbdError> {
    let mut child = KillOnDrop(
        Command::new("qemu-nbd")
            .args(["--persistent", "--format=qcow2", "--cache=writeback"])
            .arg(format!("--socket={}", socket.display()))
            .arg(overlay)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io_err("starting qemu-nbd"))?,
    );
    wait_for_socket(socket, &mut child.0)?;
    Ok(child)
}

/// The phases of a round: name and whether it writes.
const PHASES: [(&str, bool); 3] = [("read", false), ("write", true), ("reread", false)];

/// Runs the comparison and returns its figures as JSON (one object). Builds its own tokio
/// runtime; call it from synchronous code (`archip bench nbd`).
pub fn bench(o: BenchOptions) -> Result<String, NbdError> {
    if o.buffer == 0 || o.count == 0 || o.depth == 0 || o.rounds == 0 || o.size < o.buffer {
        return Err(NbdError::Config(format!("bad benchmark options {o:?}")));
    }
    let qemu_version = run_command(Command::new("qemu-img").arg("--version"))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let peer_workers = o.peer_workers.unwrap_or((cpus / 2).max(1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nbd-bench")
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))?;
    let peers =
        ScratchPeerSet::start_with("nbd-bench", xseg::Config::default(), Some(peer_workers))?;
    let dir = peers.dir().to_path_buf();
    let client = Arc::new(peers.client()?);

    // The source: a volume and a raw file with the same content.
    let base_raw = dir.join("base.raw");
    rt.block_on(async {
        client.create("base", o.size, None).await?;
        let mut file = std::fs::File::create(&base_raw).map_err(io_err("base.raw"))?;
        let mut buf = vec![0u8; 4 << 20];
        let mut at = 0;
        while at < o.size {
            let n = (o.size - at).min(buf.len() as u64) as usize;
            fill(at, &mut buf[..n]);
            client.write("base", at, &buf[..n]).await?;
            std::io::Write::write_all(&mut file, &buf[..n]).map_err(io_err("base.raw"))?;
            at += n as u64;
        }
        file.sync_all().map_err(io_err("base.raw"))?;
        client.flush("base").await?;
        Ok::<_, NbdError>(())
    })?;

    // Our server exports every volume, so each round's clone is reached by name.
    let ours_sock = dir.join("archip.sock");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut config = NbdConfig::all();
    config.unix_socket = Some(ours_sock.clone());
    let server = rt.block_on(async { NbdServer::bind(client.clone(), config) })?;
    let stats = server.stats();
    let served = rt.spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); PHASES.len()];
    for round in 0..o.rounds {
        let clone = format!("clone-{round}");
        rt.block_on(client.clone_volume("base", &clone, None))?;
        let overlay = dir.join(format!("overlay-{round}.qcow2"));
        run_command(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(&base_raw)
                .args(["-F", "raw"])
                .arg(&overlay),
        )?;
        let theirs_sock = dir.join(format!("qemu-{round}.sock"));
        let qemu_nbd = start_qemu_nbd(&overlay, &theirs_sock)?;
        let ours_url = format!("nbd+unix:///{clone}?socket={}", ours_sock.display());
        let theirs_url = format!("nbd+unix:///?socket={}", theirs_sock.display());
        for (i, &(_, write)) in PHASES.iter().enumerate() {
            // Alternate which side goes first, so neither always meets a warmer page cache.
            let (ours, theirs) = if round % 2 == 0 {
                let a = qemu_img_bench(&o, &ours_url, write)?;
                (a, qemu_img_bench(&o, &theirs_url, write)?)
            } else {
                let b = qemu_img_bench(&o, &theirs_url, write)?;
                (qemu_img_bench(&o, &ours_url, write)?, b)
            };
            samples[i].0.push(ours);
            samples[i].1.push(theirs);
        }
        drop(qemu_nbd);
    }

    let _ = stop_tx.send(());
    rt.block_on(served)
        .map_err(|e| NbdError::Bench(format!("server task: {e}")))??;

    let mut phases = Vec::new();
    let mut log_sum = 0.0;
    for ((name, _), (ours, theirs)) in PHASES.iter().zip(samples) {
        let round = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        let (all_ours, all_theirs) = (round(&ours), round(&theirs));
        let (ours, theirs) = (median(ours), median(theirs));
        let ratio = ours / theirs;
        log_sum += ratio.ln();
        phases.push(serde_json::json!({
            "phase": name,
            "archip_nbd_ops_per_sec": ours.round(),
            "qemu_nbd_qcow2_ops_per_sec": theirs.round(),
            "ratio": (ratio * 1000.0).round() / 1000.0,
            "archip_runs": all_ours,
            "qemu_nbd_runs": all_theirs,
        }));
    }
    let geomean = (log_sum / phases.len() as f64).exp();
    let wait = xseg::WaitPolicy::default();
    let report = serde_json::json!({
        "benchmark": "nbd",
        "what": "qemu-img bench over NBD (unix socket): archip export of a fresh clone volume vs qemu-nbd serving a fresh qcow2 overlay on a raw base; median of rounds",
        "qemu": qemu_version,
        "cpus": cpus,
        "peer_workers": peer_workers,
        "xseg_spin_ns": wait.spin.as_nanos(),
        "xseg_busy_ns": wait.busy.as_nanos(),
        "image_bytes": o.size,
        "requests": o.count,
        "depth": o.depth,
        "buffer_bytes": o.buffer,
        "step_bytes": o.step,
        "rounds": o.rounds,
        "phases": phases,
        "ratio_geomean": (geomean * 1000.0).round() / 1000.0,
        "target_ratio": 1.0,
        "archip_server": stats.json(),
    });
    Ok(report.to_string())
}
