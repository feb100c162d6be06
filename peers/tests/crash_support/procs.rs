//! The three peers as separate processes: this test binary re-executed with a role in its
//! environment, each calling `peers::peerset::run_peer` as `archip peer NAME` does. Or a whole
//! peer set in one child process ([`PeerProcs::spawn_set`], as a node plugin runs it), with a
//! node identity and a backend of its own: a stand-in for one node of a cluster.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use peers::backend::BackendConfig;
use peers::client::{ClientError, VolumeClient};
use peers::peerset::{PEERS, PeerConfig, PeerSet, Ports, peer_port, run_peer};

const ROLE: &str = "ARCHIP_CRASH_ROLE";
const SEGMENT: &str = "ARCHIP_CRASH_SEGMENT";
const DATA: &str = "ARCHIP_CRASH_DATA";
const NODE_ENV: &str = "ARCHIP_CRASH_NODE";
/// The backend's text form (`file:/DIR`, `rados:pool=..`): every peer process uses the one
/// the test chose, the way `archip peer --backend` does.
const BACKEND: &str = "ARCHIP_CRASH_BACKEND";
const REGISTRY: &str = "ARCHIP_CRASH_REGISTRY";
/// The role of a child running all three peers ([`PeerProcs::spawn_set`]).
const WHOLE_SET: &str = "set";

/// The node identity of every mapper incarnation: a restarted mapper must get its own locks
/// back.
pub const NODE: &str = "node-crash";

/// Readiness polls per peer, and the pause between two of them (the peer has not bound its
/// port yet): a peer that is not serving after this long failed to start.
const READY_ATTEMPTS: u32 = 5000;
const READY_PAUSE: Duration = Duration::from_millis(2);

/// Small pools, buffers up to 256 KiB so that volume I/O is split by the client and by vlmc.
pub fn segment_config() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (256 << 10, 32)],
    }
}

pub fn peer_config(data_dir: &Path, segment: &Path) -> PeerConfig {
    let mut config = PeerConfig::new(data_dir, segment.to_str().expect("utf-8 path"), NODE);
    config.xseg = segment_config();
    config.workers = 2;
    // Calls to a dead mapper or blocker fail back (PeerGone) at once; this only bounds a hang.
    config.timeout = Duration::from_secs(20);
    config
}

/// In a child: runs the peer named in the environment until killed, and never returns.
/// In the test process: returns.
pub fn run_child_role() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let segment = PathBuf::from(std::env::var(SEGMENT).expect("segment path"));
    let data = PathBuf::from(std::env::var(DATA).expect("data dir"));
    let mut config = peer_config(&data, &segment);
    if let Ok(node) = std::env::var(NODE_ENV) {
        config.node = node;
    }
    let backend = std::env::var(BACKEND).expect("backend");
    config.backend = BackendConfig::parse(&backend).expect("backend description");
    if role == WHOLE_SET {
        // Not in the host's registry: nothing is forwarded to a test's peer set, unless the
        // test gives the node a registry directory of its own.
        config.registry = std::env::var(REGISTRY).ok().map(PathBuf::from);
        match PeerSet::start(&config) {
            // Serves until killed; the peers run on their own threads.
            Ok(_set) => loop {
                std::thread::park();
            },
            Err(e) => {
                eprintln!("peer set of {} did not start: {e}", config.node);
                std::process::exit(1);
            }
        }
    }
    log_to_file(&data, &role);
    let r = run_peer(&role, &config);
    eprintln!("crash test peer {role} stopped: {r:?}");
    std::process::exit(if r.is_ok() { 0 } else { 1 });
}

/// Where each peer incarnation's log goes: `peer-logs/<role>.log` in the data directory (kept
/// when the test fails), at `RUST_LOG` or else debug for the peers, so that a finding can be
/// traced to the map changes behind it.
pub fn log_dir(data: &Path) -> PathBuf {
    data.join("peer-logs")
}

fn log_to_file(data: &Path, role: &str) {
    let dir = log_dir(data);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{role}.log")))
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,peers=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    tracing::info!(pid = std::process::id(), "peer started");
}

/// The peer processes of one data directory and backend, over the segment they are given. Every child is
/// killed when this is dropped, and also when the test thread dies (PR_SET_PDEATHSIG).
pub struct PeerProcs {
    test: &'static str,
    data_dir: PathBuf,
    /// One child per peer, or the whole set in `children[0]` ([`PeerProcs::spawn_set`]).
    children: [Option<Child>; 3],
    whole_set: bool,
    node: Option<String>,
    /// The text form of the backend every child opens.
    backend: String,
    registry: Option<PathBuf>,
}

impl PeerProcs {
    pub fn new(test: &'static str, data_dir: &Path, backend: &BackendConfig) -> PeerProcs {
        PeerProcs {
            test,
            data_dir: data_dir.to_path_buf(),
            children: [None, None, None],
            whole_set: false,
            node: None,
            backend: backend.to_string(),
            registry: None,
        }
    }

    /// Peers started from now on lock as `node` (default [`NODE`]).
    #[allow(
        dead_code,
        reason = "the two-node tests use it, the crash test does not"
    )]
    pub fn with_node(mut self, node: &str) -> PeerProcs {
        self.node = Some(node.to_owned());
        self
    }

    /// A whole peer set started from now on records itself in this registry directory (by
    /// default in none).
    #[allow(
        dead_code,
        reason = "the forwarding tests use it, the crash test does not"
    )]
    pub fn with_registry(mut self, dir: &Path) -> PeerProcs {
        self.registry = Some(dir.to_owned());
        self
    }

    /// Starts peer `i` of [`PEERS`] on `segment` (it must not be running).
    pub fn spawn(&mut self, i: usize, segment: &Path) {
        assert!(!self.whole_set, "this is a whole peer set");
        assert!(self.children[i].is_none(), "{} is running", PEERS[i]);
        self.children[i] = Some(self.command(PEERS[i], segment).spawn().expect("spawn peer"));
    }

    /// Starts all three peers in one child process on `segment`, sharing one blocker (as
    /// `PeerSet::start` does in a node plugin): one process to freeze or kill as a node.
    /// [`PeerProcs::pid`], `kill` and `wait_ready` then take index 0 for the whole set.
    #[allow(
        dead_code,
        reason = "the two-node tests use it, the crash test does not"
    )]
    pub fn spawn_set(&mut self, segment: &Path) {
        assert!(
            self.children.iter().all(Option::is_none),
            "peers are running"
        );
        self.whole_set = true;
        self.children[0] = Some(self.command(WHOLE_SET, segment).spawn().expect("spawn set"));
    }

    fn command(&self, role: &str, segment: &Path) -> Command {
        let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
        cmd.args(["--exact", self.test, "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(SEGMENT, segment)
            .env(DATA, &self.data_dir)
            // Peers print nothing we wait for (readiness is a PING); their panics go to stderr.
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in
        // the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        if let Some(node) = &self.node {
            cmd.env(NODE_ENV, node);
        }
        cmd.env(BACKEND, &self.backend);
        if let Some(registry) = &self.registry {
            cmd.env(REGISTRY, registry);
        }
        cmd
    }

    pub fn pid(&self, i: usize) -> Option<libc::pid_t> {
        self.children[i].as_ref().map(|c| c.id() as libc::pid_t)
    }

    /// Collects peer `i` after someone sent it SIGKILL; asserts that it died of it (a peer
    /// that exited by itself, e.g. on a panic, is a finding of its own).
    pub fn collect_killed(&mut self, i: usize) {
        let mut child = self.children[i].take().expect("peer was running");
        let status = child.wait().expect("wait for peer");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{} ended with {status} before it was killed",
            PEERS[i]
        );
    }

    /// SIGKILLs peer `i` and collects it.
    pub fn kill(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            // SAFETY: plain syscall on a child we have not yet waited for (so the pid is ours).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            self.collect_killed(i);
        }
    }

    pub fn kill_all(&mut self) {
        for i in 0..PEERS.len() {
            self.kill(i);
        }
    }

    /// Waits until peer `i` answers a PING on its port. Before it binds the port, a PING fails
    /// at once with "no peer"; that is polled, a bounded number of times.
    pub async fn wait_ready(&mut self, i: usize, client: &VolumeClient) {
        if self.whole_set && i == 0 {
            for name in PEERS {
                self.wait_port_ready(name, 0, client).await;
            }
        } else {
            self.wait_port_ready(PEERS[i], i, client).await;
        }
    }

    async fn wait_port_ready(&mut self, name: &str, i: usize, client: &VolumeClient) {
        let port = peer_port(name).expect("peer port");
        let mut last = None;
        for _ in 0..READY_ATTEMPTS {
            match client.ping(port).await {
                Ok(_) => return,
                Err(e @ (ClientError::PeerGone(_) | ClientError::Transport(_))) => last = Some(e),
                Err(e) => panic!("PING {} answered {e}", name),
            }
            if let Some(status) = self.children[i]
                .as_mut()
                .expect("peer was started")
                .try_wait()
                .expect("try_wait")
            {
                panic!("{} exited with {status} before serving", name);
            }
            tokio::time::sleep(READY_PAUSE).await;
        }
        panic!(
            "{} not serving after {READY_ATTEMPTS} polls: {last:?}",
            name
        );
    }
}

/// For a hang: every live port's counters and every peer thread's state and wait channel.
pub fn diagnose(procs: &PeerProcs, segment: Option<&xseg::Segment>) -> String {
    let mut out = String::new();
    if let Some(seg) = segment {
        for p in seg.live_ports() {
            if let Ok(s) = seg.port_stats(p) {
                out.push_str(&format!(
                    "    port {p} {:?} pid {:?}: submitted {} accepted {} replied {} received {} dropped {}\n",
                    s.name, s.owner, s.submitted, s.accepted, s.replied, s.received, s.dropped
                ));
            }
        }
        out.push_str(&format!(
            "    requests in use {}, buffers in use {}\n",
            seg.requests_in_use(),
            seg.buffers_in_use()
        ));
    }
    for (i, name) in PEERS.iter().enumerate() {
        let Some(pid) = procs.pid(i) else { continue };
        out.push_str(&format!("    {name} (pid {pid}) threads:\n"));
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        // Descriptors of unlinked files: a peer still reading or writing an object another
        // process deleted sees data that vanishes when it restarts.
        if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    let target = target.to_string_lossy();
                    if target.ends_with(" (deleted)") && !target.starts_with("/memfd:") {
                        out.push_str(&format!("      open but deleted: {target}\n"));
                    }
                }
            }
        }
        for t in tasks.flatten() {
            let dir = t.path();
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let stat = read("stat");
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            out.push_str(&format!(
                "      {} {state} {}\n",
                read("comm"),
                read("wchan")
            ));
        }
    }
    out
}

impl Drop for PeerProcs {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
