//! The Kubernetes layout on one machine, for the forwarding tests: a controller with its own
//! peer set, and a "node" peer set in a child process (so that it can be killed with SIGKILL),
//! both over one data directory and one peer-set registry, each on its own segment.
//!
//! The child is this very test binary, re-run with [`CHILD_ENV`] set to run
//! [`run_child_if_asked`] alone: it starts the node's peer set, prints [`READY`] and serves
//! until its stdin closes (a clean stop) or it is killed (an unclean one).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet, Ports};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use csi::health::PeerSetHealth;
use csi::pb::controller_client::ControllerClient;
use csi::pb::group_controller_client::GroupControllerClient;
use csi::server::{ServeError, UnixEndpoint};
use csi::{ControllerConfig, ControllerPlugin};

/// Set in the child's environment: `data_dir\nsegment\nowner\nregistry`.
pub const CHILD_ENV: &str = "ARCHIP_TEST_NODE_PEER_SET";
/// What the child prints once its peer set runs and is registered.
pub const READY: &str = "node-peer-set-ready";
/// The controller's own lock owner (its peer set's node id).
pub const CONTROLLER: &str = "ctl-home";

pub fn test_xseg() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
    }
}

fn config(data: &Path, segment: &Path, owner: &str, registry: &Path) -> PeerConfig {
    let mut c = PeerConfig::new(data, segment.to_str().unwrap(), owner);
    c.xseg = test_xseg();
    c.workers = 2;
    c.registry = Some(registry.to_owned());
    c
}

/// In the child: runs the node's peer set until stdin closes. Does nothing in a normal run.
pub fn run_child_if_asked() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let [data, segment, owner, registry] = parts[..] else {
        panic!("bad {CHILD_ENV}: {spec:?}");
    };
    let set = PeerSet::start(&config(
        Path::new(data),
        Path::new(segment),
        owner,
        Path::new(registry),
    ))
    .expect("node peer set");
    assert!(set.registration().is_some(), "the node peer set registered");
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{READY}").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    set.stop();
}

/// The node's peer set, in a child process.
pub struct NodeProcess {
    pub owner: String,
    pub segment: PathBuf,
    child: Option<Child>,
    /// A client of the node's peer set (as the node's ublk frontend would be).
    pub volumes: Option<Arc<VolumeClient>>,
}

impl NodeProcess {
    /// Starts the child running `child_test` (the name of the test that calls
    /// [`run_child_if_asked`]) and waits until its peer set is registered.
    pub fn start(child_test: &str, data: &Path, owner: &str, registry: &Path, tag: &str) -> Self {
        let segment = unique_segment(tag);
        let spec = format!(
            "{}\n{}\n{owner}\n{}",
            data.display(),
            segment.display(),
            registry.display()
        );
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([child_test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the node process");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains(READY) {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the node process did not come up");
        let seg = xseg::Segment::attach(&segment).expect("attach the node segment");
        let volumes = Arc::new(VolumeClient::connect(&seg).expect("node client"));
        NodeProcess {
            owner: owner.to_owned(),
            segment,
            child: Some(child),
            volumes: Some(volumes),
        }
    }

    pub fn client(&self) -> &Arc<VolumeClient> {
        self.volumes.as_ref().expect("node running")
    }

    /// SIGKILL: no registry cleanup, no lock release.
    pub fn kill(&mut self) {
        self.volumes = None;
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill the node process");
            c.wait().expect("reap the node process");
        }
    }

    /// Closes stdin: the child stops its peer set cleanly.
    pub fn stop(&mut self) {
        self.volumes = None;
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            let status = c.wait().expect("reap the node process");
            assert!(status.success(), "node process: {status}");
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.volumes = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique_segment(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/archip-csi-deleg-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The controller: its peer set and the gRPC services on a socket.
pub struct Controller {
    pub dir: tempfile::TempDir,
    pub registry: PathBuf,
    pub segment: PathBuf,
    pub set: Option<PeerSet>,
    /// A client of the controller's own peer set.
    pub volumes: Arc<VolumeClient>,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Controller {
    pub async fn start(tag: &str) -> Controller {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("peersets");
        let segment = unique_segment(tag);
        let set = PeerSet::start(&config(dir.path(), &segment, CONTROLLER, &registry))
            .expect("controller peer set");
        let mut cc = ControllerConfig::new(CONTROLLER, dir.path());
        cc.peerset_registry = Some(registry.clone());
        let plugin = ControllerPlugin::open_with(set.segment(), cc).expect("controller");
        let routes = plugin.routes(PeerSetHealth::new(set.segment().clone()));
        let socket = dir.path().join("plugin").join("csi.sock");
        let bound = UnixEndpoint::parse(&format!("unix://{}", socket.display()))
            .unwrap()
            .bind()
            .expect("bind");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.serve(routes, async {
            let _ = rx.await;
        }));
        let channel = csi::dial::connect(&socket).await.expect("dial");
        let volumes = Arc::new(VolumeClient::connect(set.segment()).expect("client"));
        Controller {
            dir,
            registry,
            segment,
            set: Some(set),
            volumes,
            channel,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn group(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel.clone())
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}
