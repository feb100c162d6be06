//! The peer set: one segment and the peers serving it (blocker, mapper, vlmc).
//!
//! [`PeerSet::start`] runs all three as threads of the calling process, each with its own
//! [`xseg::Runner`] loop and multi-threaded tokio runtime; [`run_peer`] runs one of them in the
//! current process, for `archip peer NAME` (one process per peer, which a crash test can kill
//! independently). Either way the peers meet only through the segment, so the two modes behave
//! alike.
//!
//! The backend comes from [`PeerConfig::backend`] through [`BackendConfig::open`]; every peer
//! process opens it itself (the file blocker is safe across processes: atomic renames, flocks).
//!
//! A [`PeerSet`] records itself in the host's
//! [registry](crate::registry) under its mapper's lock owner while it runs, so that another
//! process (the CSI controller) can forward an operation on a volume this mapper holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xseg::{AsyncClient, Op, Peer, Port, Runner, Segment, Status, Stopper};

use crate::backend::{BackendConfig, BackendError, Store};
use crate::blocker::peer::BlockerPeer;
use crate::blocker::{Blocker, BlockerError, LockOwner};
use crate::mapper::Mapper;
use crate::mapper::peer::MapperPeer;
use crate::registry::{PeerSetEntry, Registration, Registry};
use crate::vlmc::{Vlmc, VlmcConfig};

/// The fixed port plan of a segment. Clients bind dynamic ports from [`Ports::DYNAMIC_START`].
#[derive(Debug, Clone, Copy)]
pub struct Ports;

impl Ports {
    /// Volume I/O and the catalogue, as clients see it.
    pub const VLMC: u32 = 1;
    pub const MAPPER: u32 = 2;
    /// The data blocker (object I/O).
    pub const BLOCKER: u32 = 3;
    pub const DYNAMIC_START: u32 = 16;
}

/// The peers, by the names `archip peer NAME` takes, in start order.
pub const PEERS: [&str; 3] = ["blocker", "mapper", "vlmc"];

/// The port a named peer binds.
pub fn peer_port(name: &str) -> Option<u32> {
    match name {
        "blocker" => Some(Ports::BLOCKER),
        "mapper" => Some(Ports::MAPPER),
        "vlmc" => Some(Ports::VLMC),
        _ => None,
    }
}

/// How to run a peer set.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// This peer set's host-local directory; by default also the root of its file backend.
    pub data_dir: PathBuf,
    /// Where volumes are stored. [`PeerConfig::new`] makes it the file backend in `data_dir`
    /// (objects in `data_dir/objects`).
    pub backend: BackendConfig,
    /// Segment name (under /dev/shm) or path (anything with a '/').
    pub segment: String,
    /// This node's identity: the owner recorded in the volume locks its mapper takes. Stable
    /// across restarts, so a restarted mapper gets its own locks back.
    pub node: String,
    /// Sizes of the segment if it has to be created. `dynamic_start` should be
    /// [`Ports::DYNAMIC_START`].
    pub xseg: xseg::Config,
    /// Tokio worker threads per peer.
    pub workers: usize,
    /// Limit on each call vlmc makes to the mapper or blocker.
    pub timeout: Duration,
    /// Permission bits of the segment if it has to be created ([`xseg::segment::DEFAULT_MODE`],
    /// owner only, unless widened for peers that run as several users of one group).
    pub segment_mode: u32,
    /// The peer-set registry directory [`PeerSet::start`] records itself in (`None`: not
    /// recorded). Defaults to [`crate::registry::DEFAULT_DIR`].
    pub registry: Option<PathBuf>,
}

impl PeerConfig {
    /// A peer set over the file backend in `data_dir`; set [`PeerConfig::backend`] for another.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        segment: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        let data_dir = data_dir.into();
        PeerConfig {
            backend: BackendConfig::file(data_dir.clone()),
            data_dir,
            segment: segment.into(),
            node: node.into(),
            xseg: xseg::Config::default(),
            segment_mode: xseg::segment::DEFAULT_MODE,
            workers: std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8)),
            timeout: Duration::from_secs(600),
            registry: Some(PathBuf::from(crate::registry::DEFAULT_DIR)),
        }
    }

    pub fn segment_path(&self) -> Result<PathBuf, PeerSetError> {
        Ok(xseg::segment_path(&self.segment)?)
    }

    /// Attaches to the segment, creating it if needed. A segment of another layout is refused.
    pub fn open_segment(&self) -> Result<Arc<Segment>, PeerSetError> {
        if self.xseg.dynamic_start <= Ports::BLOCKER {
            return Err(PeerSetError::Config(format!(
                "dynamic ports start at {}, which would hand out the fixed peer ports",
                self.xseg.dynamic_start
            )));
        }
        Ok(Segment::open_or_create_with_mode(
            &self.segment_path()?,
            &self.xseg,
            self.segment_mode,
        )?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerSetError {
    #[error(transparent)]
    Segment(#[from] xseg::Error),
    #[error(transparent)]
    Blocker(#[from] BlockerError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("unknown peer {0:?} (expected one of blocker, mapper, vlmc)")]
    UnknownPeer(String),
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("starting peer {peer}: {source}")]
    Thread {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

/// One peer running on its own thread.
pub struct RunningPeer {
    name: &'static str,
    port: u32,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl RunningPeer {
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Stops the loop and waits for the thread (in-flight requests finish or fail back).
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Blocks until the peer's loop ends (it only ends when stopped).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningPeer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn runtime(name: &str, workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name(format!("{name}-worker"))
        .enable_all()
        .build()
}

/// Runs `peer` on `port` in a new thread, with a runtime built for it.
fn spawn_loop<P: Peer + 'static>(
    name: &'static str,
    port: Port,
    workers: usize,
    make: impl FnOnce(&mut Runner, tokio::runtime::Handle) -> P + Send + 'static,
    on_stop: impl FnOnce(&tokio::runtime::Runtime) + Send + 'static,
) -> Result<RunningPeer, PeerSetError> {
    let number = port.number();
    let rt = runtime(name, workers).map_err(|source| PeerSetError::Thread {
        peer: name.into(),
        source,
    })?;
    let mut runner = Runner::new(port);
    let stopper = runner.stopper();
    let thread = std::thread::Builder::new()
        .name(format!("peer-{name}"))
        .spawn(move || {
            let mut peer = make(&mut runner, rt.handle().clone());
            runner.run(&mut peer);
            drop(peer);
            on_stop(&rt);
            // Give in-flight tasks a moment to answer; anything left fails back when dropped.
            rt.shutdown_timeout(Duration::from_secs(5));
        })
        .map_err(|source| PeerSetError::Thread {
            peer: name.into(),
            source,
        })?;
    Ok(RunningPeer {
        name,
        port: number,
        stopper,
        thread: Some(thread),
    })
}

/// Binds the named peer's port on `segment` and starts it on a thread of this process.
pub fn spawn_peer(
    name: &str,
    config: &PeerConfig,
    segment: &Arc<Segment>,
    blocker: Option<Arc<dyn Blocker>>,
) -> Result<RunningPeer, PeerSetError> {
    let port_no = peer_port(name).ok_or_else(|| PeerSetError::UnknownPeer(name.into()))?;
    // vlmc needs no backend of its own; the others open the configured one unless given one.
    let backend = || -> Result<Arc<dyn Blocker>, PeerSetError> {
        match blocker {
            Some(b) => Ok(b),
            None => Ok(config.backend.open(Store::Objects)?),
        }
    };
    let workers = config.workers;
    match name {
        "blocker" => {
            let blocker = backend()?;
            let port = segment.bind(port_no, "blocker")?;
            spawn_loop(
                "blocker",
                port,
                workers,
                move |_, rt| BlockerPeer::new(blocker, rt),
                |_| {},
            )
        }
        "mapper" => {
            let owner = LockOwner::new(config.node.clone())?;
            let mapper = Arc::new(Mapper::new(backend()?, owner));
            let port = segment.bind(port_no, "mapper")?;
            let closing = mapper.clone();
            spawn_loop(
                "mapper",
                port,
                workers,
                move |_, rt| MapperPeer::new(mapper, rt),
                move |rt| {
                    // Release this node's locks on a clean stop; a crash leaves them to be
                    // re-acquired by the restarted mapper (same node identity).
                    if let Err(e) = rt.block_on(closing.close_all()) {
                        tracing::warn!(error = %e, "closing volumes at mapper stop");
                    }
                },
            )
        }
        "vlmc" => {
            let client = AsyncClient::new(segment, "vlmc-client")?;
            let port = segment.bind(port_no, "vlmc")?;
            let vc = VlmcConfig {
                timeout: config.timeout,
                ..VlmcConfig::default()
            };
            spawn_loop(
                "vlmc",
                port,
                workers,
                move |runner, rt| Vlmc::new(runner.port_mut().sender().clone(), client, vc, rt),
                |_| {},
            )
        }
        other => Err(PeerSetError::UnknownPeer(other.into())),
    }
}

/// Runs one peer in the current process until it is stopped or the process dies
/// (`archip peer NAME`).
///
/// On RADOS each such process is a librados client of its own, and a volume lock records the
/// mapper's client only: breaking the lock blocklists the mapper process, not the blocker
/// process that writes the data objects. Fencing at the data path needs the node's peers in
/// one process ([`PeerSet::start`], as the node plugin runs them).
pub fn run_peer(name: &str, config: &PeerConfig) -> Result<(), PeerSetError> {
    let segment = config.open_segment()?;
    let peer = spawn_peer(name, config, &segment, None)?;
    tracing::info!(peer = name, port = peer.port(), segment = %segment.path().display(), "peer running");
    peer.join();
    Ok(())
}

/// A peer's answer to a PING.
#[derive(Clone, Debug)]
pub struct PeerHealth {
    pub name: &'static str,
    pub port: u32,
    /// Round-trip time, or why there was none.
    pub latency: Result<Duration, String>,
}

impl PeerHealth {
    pub fn is_up(&self) -> bool {
        self.latency.is_ok()
    }
}

/// PINGs each peer port of `segment` (whoever runs them: threads here or other processes).
pub fn probe_segment(
    segment: &Arc<Segment>,
    timeout: Duration,
) -> Result<Vec<PeerHealth>, PeerSetError> {
    let mut port = segment.bind_dynamic("probe")?;
    Ok(PEERS
        .iter()
        .map(|&name| {
            let p = peer_port(name).expect("known peer");
            let latency = (|| {
                let req = port.alloc(Op::Ping, b"", 0).map_err(|e| e.to_string())?;
                let start = Instant::now();
                let rep = port.call(req, p, timeout).map_err(|e| e.to_string())?;
                match rep.status() {
                    Status::Ok => Ok(start.elapsed()),
                    s => Err(s.to_string()),
                }
            })();
            PeerHealth {
                name,
                port: p,
                latency,
            }
        })
        .collect())
}

/// The segment and all peers, as threads of this process.
pub struct PeerSet {
    segment: Arc<Segment>,
    config: PeerConfig,
    peers: Vec<RunningPeer>,
    /// This peer set's registry entry, removed before the peers stop.
    registration: Option<Registration>,
    /// This node's watch for operations forwarded over RADOS, stopped before the peers.
    #[cfg(feature = "rados")]
    watch: Option<crate::blocker::rados::watch::NodeWatch>,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("segment", &self.segment.path())
            .field("config", &self.config)
            .finish()
    }
}

impl PeerSet {
    /// Creates or attaches the segment and starts blocker, mapper and vlmc. The blocker and
    /// the mapper share one blocker instance (for files: one descriptor cache). Once they run, the
    /// peer set is recorded in the registry (`config.registry`); a registry that cannot be
    /// written costs only the forwarding of operations to this peer set, so that is a warning.
    pub fn start(config: &PeerConfig) -> Result<PeerSet, PeerSetError> {
        let segment = config.open_segment()?;
        #[cfg(feature = "rados")]
        let (blocker, rados) = match &config.backend {
            BackendConfig::Rados(_) => {
                let r = config.backend.open_rados(Store::Objects)?;
                (r.clone() as Arc<dyn Blocker>, Some(r))
            }
            _ => (config.backend.open(Store::Objects)?, None),
        };
        #[cfg(not(feature = "rados"))]
        let blocker = config.backend.open(Store::Objects)?;
        let mut set = Self::start_with(config, segment, blocker.clone())?;
        set.registration = set.register(blocker.as_ref());
        #[cfg(feature = "rados")]
        if let Some(r) = rados {
            set.watch = set.watch_node(&r);
        }
        Ok(set)
    }

    /// On RADOS, answers operations other nodes forward to this node by notify (the
    /// cross-machine counterpart of the registry). Like the registry, a failure costs only
    /// the forwarding: a warning.
    #[cfg(feature = "rados")]
    fn watch_node(
        &self,
        blocker: &crate::blocker::RadosBlocker,
    ) -> Option<crate::blocker::rados::watch::NodeWatch> {
        match crate::blocker::rados::watch::NodeWatch::start(
            blocker,
            &self.config.node,
            self.segment.path().to_owned(),
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, node = %self.config.node, "not watching for forwarded operations: operations on volumes this node holds cannot be forwarded to it from other machines");
                None
            }
        }
    }

    fn register(&self, blocker: &dyn Blocker) -> Option<Registration> {
        let dir = self.config.registry.as_ref()?;
        let registry = Registry::new(dir);
        let entry = match PeerSetEntry::current(
            &self.config.node,
            self.segment.path(),
            &self.config.backend.location(Store::Objects),
            blocker.identity(),
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "this peer set cannot be registered");
                return None;
            }
        };
        match registry.register(entry) {
            Ok(r) => {
                tracing::info!(owner = %self.config.node, segment = %self.segment.path().display(), registry = %dir.display(), "peer set registered");
                Some(r)
            }
            Err(e) => {
                tracing::warn!(error = %e, registry = %dir.display(), "peer set not registered: operations on volumes it locks cannot be forwarded to it");
                None
            }
        }
    }

    /// This peer set's registry entry, if it has one.
    pub fn registration(&self) -> Option<&Registration> {
        self.registration.as_ref()
    }

    /// Starts the peers over a given segment and backend (tests use a memory blocker).
    pub fn start_with(
        config: &PeerConfig,
        segment: Arc<Segment>,
        blocker: Arc<dyn Blocker>,
    ) -> Result<PeerSet, PeerSetError> {
        let mut peers = Vec::with_capacity(PEERS.len());
        for name in PEERS {
            // On failure, the peers already started stop as `peers` drops.
            peers.push(spawn_peer(name, config, &segment, Some(blocker.clone()))?);
        }
        Ok(PeerSet {
            segment,
            config: config.clone(),
            peers,
            registration: None,
            #[cfg(feature = "rados")]
            watch: None,
        })
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.segment
    }

    pub fn config(&self) -> &PeerConfig {
        &self.config
    }

    /// PINGs every peer.
    pub fn probe(&self) -> Result<Vec<PeerHealth>, PeerSetError> {
        probe_segment(&self.segment, Duration::from_secs(2))
    }

    /// Unregisters (nothing new is forwarded here), then stops vlmc (no new I/O), the
    /// mapper (which releases its locks), and the blocker.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.registration.take());
        #[cfg(feature = "rados")]
        drop(self.watch.take());
        while let Some(p) = self.peers.pop() {
            p.stop();
        }
    }
}

impl Drop for PeerSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}
