//! A real controller for the conformance tests: a peer set (blocker,
//! mapper, vlmc) on a temp directory and a unique /dev/shm segment, the
//! controller served on a unix socket, and gRPC clients dialling it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet, Ports};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use csi::ControllerConfig;
use csi::ControllerPlugin;
use csi::health::PeerSetHealth;
use csi::pb::controller_client::ControllerClient;
use csi::pb::group_controller_client::GroupControllerClient;
use csi::pb::identity_client::IdentityClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::pb::{CapacityRange, CreateVolumeRequest, VolumeCapability};
use csi::server::{ServeError, UnixEndpoint};

pub const MI: u64 = 1 << 20;
pub const GI: u64 = 1 << 30;

/// The node whose directory holds the volumes (also the peers' lock owner).
pub const HOME: &str = "node-home";

fn test_xseg() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
    }
}

/// The controller served on a socket, stoppable.
pub struct Served {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Served {
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server");
        }
    }
}

/// Peers + controller + channel.
pub struct Plugin {
    pub set: Option<PeerSet>,
    pub dir: tempfile::TempDir,
    pub segment: PathBuf,
    pub plugin: ControllerPlugin,
    pub served: Served,
    pub channel: Channel,
    /// A direct client of the peer set, for writing and reading data.
    pub volumes: Arc<VolumeClient>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Plugin {
    pub async fn start(tag: &str) -> Plugin {
        Self::start_in(tag, tempfile::tempdir().expect("tempdir")).await
    }

    /// [`start`](Self::start) on `dir` (a directory on a filesystem of the test's choosing).
    pub async fn start_in(tag: &str, dir: tempfile::TempDir) -> Plugin {
        let segment = PathBuf::from(format!(
            "/dev/shm/archip-csi-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut config = PeerConfig::new(dir.path(), segment.to_str().unwrap(), HOME);
        config.xseg = test_xseg();
        config.workers = 2;
        // A registry of this test's own, so the peer sets of other tests (running at the
        // same time under the same owner names) are not taken for ours.
        config.registry = Some(registry_of(dir.path()));
        let set = PeerSet::start(&config).expect("peer set");
        let (plugin, served) = serve(&set, dir.path().to_path_buf(), "csi.sock");
        let channel = csi::dial::connect(&served.socket).await.expect("dial");
        let volumes = Arc::new(VolumeClient::connect(set.segment()).expect("client"));
        Plugin {
            set: Some(set),
            dir,
            segment,
            plugin,
            served,
            channel,
            volumes,
        }
    }

    /// Stops the controller and starts a fresh one (new records cache,
    /// new in-flight set) over the same peers and data directory, as a
    /// restarted controller pod would be.
    pub async fn restart_controller(&mut self) {
        self.served.stop().await;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let (plugin, served) = serve(
            self.set.as_ref().unwrap(),
            self.dir.path().to_path_buf(),
            &format!("csi-{n}.sock"),
        );
        self.channel = csi::dial::connect(&served.socket).await.expect("dial");
        self.plugin = plugin;
        self.served = served;
    }

    /// A peer set of another node on this host, over a directory of its own, registered
    /// where this controller looks: a node that exists but cannot reach node-local volumes.
    pub fn other_node(&self, node: &str) -> (PeerSet, tempfile::TempDir) {
        let data = tempfile::tempdir().expect("tempdir");
        let segment = data.path().join("segment");
        let mut config = PeerConfig::new(data.path(), segment.to_str().unwrap(), node);
        config.xseg = test_xseg();
        config.workers = 1;
        config.registry = Some(registry_of(self.dir.path()));
        (PeerSet::start(&config).expect("peer set"), data)
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn group(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }
}

/// The peer-set registry of a test's data directory.
pub fn registry_of(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("registry")
}

fn serve(set: &PeerSet, data_dir: PathBuf, socket: &str) -> (ControllerPlugin, Served) {
    let mut config = ControllerConfig::new(HOME, data_dir.clone());
    config.peerset_registry = Some(registry_of(&data_dir));
    let plugin = ControllerPlugin::open_with(set.segment(), config).expect("controller");
    let routes = plugin.routes(PeerSetHealth::new(set.segment().clone()));
    let socket = data_dir.join("plugin").join(socket);
    let bound = UnixEndpoint::parse(&format!("unix://{}", socket.display()))
        .unwrap()
        .bind()
        .expect("bind");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(routes, async {
        let _ = rx.await;
    }));
    (
        plugin,
        Served {
            socket,
            stop: Some(tx),
            task: Some(task),
        },
    )
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Some(tx) = self.served.stop.take() {
            let _ = tx.send(());
        }
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

pub fn mount(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn range(required: u64, limit: u64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: required as i64,
        limit_bytes: limit as i64,
    })
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A single-node-writer filesystem volume of `size` bytes.
pub fn create(name: &str, size: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: range(size, 0),
        volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}
