//! CSI on RADOS through real gRPC over a unix socket, against a real Ceph cluster: RADOS
//! StorageClasses with cephx credentials in the secrets, snapshots, clones, capacity from the
//! pool, and the controller's records in the pool (a second controller on another peer set
//! sees the same volumes). Built only with the `rados` feature (`required-features`).
//!
//! Needs a cluster, with a ceph-mgr for the pool statistics GetCapacity answers from:
//! `CEPH_WITH_MGR=1 e2e/ceph/start-ceph.sh DIR` sets `CEPH_CONF`, `ARCHIP_CEPH_POOL` and
//! `ARCHIP_CEPH_KEYRING` (the admin keyring, the driver's standing credential). The test makes
//! cephx users of its own with the `ceph` CLI for the secrets. Without a cluster it says SKIP.
//!
//! What needs a ublk device (NodeStage of a RADOS volume) runs in the VM suite, not here.

#![cfg(feature = "rados")]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi::health::PeerSetHealth;
use csi::pb::controller_client::ControllerClient;
use csi::pb::group_controller_client::GroupControllerClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::pb::volume_content_source::VolumeSource;
use csi::pb::volume_content_source::{SnapshotSource, Type};
use csi::pb::{
    CapacityRange, ControllerExpandVolumeRequest, CreateSnapshotRequest,
    CreateVolumeGroupSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest,
    DeleteVolumeGroupSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest, ListVolumesRequest,
    VolumeCapability, VolumeContentSource,
};
use csi::server::UnixEndpoint;
use csi::{ControllerConfig, ControllerPlugin};
use peers::backend::BackendConfig;
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet, Ports};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

const MI: u64 = 1 << 20;

struct Cluster {
    conf: String,
    pool: String,
    keyring: String,
    fsid: String,
}

fn cluster() -> Option<Cluster> {
    let (Ok(conf), Ok(pool), Ok(keyring)) = (
        std::env::var("CEPH_CONF"),
        std::env::var("ARCHIP_CEPH_POOL"),
        std::env::var("ARCHIP_CEPH_KEYRING"),
    ) else {
        eprintln!(
            "SKIP: no Ceph cluster (set CEPH_CONF, ARCHIP_CEPH_POOL and ARCHIP_CEPH_KEYRING, \
             e.g. with eval \"$(CEPH_WITH_MGR=1 e2e/ceph/start-ceph.sh /tmp/ceph)\")"
        );
        return None;
    };
    let fsid = ceph(&["fsid"]).trim().to_owned();
    Some(Cluster {
        conf,
        pool,
        keyring,
        fsid,
    })
}

/// Runs the `ceph` CLI (as the admin, from CEPH_CONF) and returns its stdout.
fn ceph(args: &[&str]) -> String {
    let out = Command::new("ceph").args(args).output().expect("ceph CLI");
    assert!(
        out.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A cephx user with `osd_caps`, and its key; removed again on drop.
struct User {
    id: String,
    key: String,
}

impl User {
    fn new(id: String, osd_caps: &str) -> User {
        ceph(&[
            "auth",
            "get-or-create",
            &format!("client.{id}"),
            "mon",
            "allow r",
            "osd",
            osd_caps,
        ]);
        let key = ceph(&["auth", "get-key", &format!("client.{id}")])
            .trim()
            .to_owned();
        User { id, key }
    }

    fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".to_owned(), self.id.clone()),
            ("userKey".to_owned(), self.key.clone()),
        ])
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("ceph")
            .args(["auth", "del", &format!("client.{}", self.id)])
            .output();
    }
}

/// Everything the process logs, at every level, to grep for secrets.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One driver instance: a peer set on the RADOS backend and the controller on a socket.
struct Driver {
    set: Option<PeerSet>,
    _dir: tempfile::TempDir,
    segment: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    channel: Channel,
    volumes: Arc<VolumeClient>,
}

impl Driver {
    async fn start(node: &str, backend: &BackendConfig) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let segment = PathBuf::from(format!(
            "/dev/shm/archip-csi-rados-{node}-{}",
            std::process::id()
        ));
        let mut config = PeerConfig::new(dir.path(), segment.to_str().unwrap(), node);
        config.backend = backend.clone();
        config.xseg = xseg::Config {
            nr_ports: 64,
            dynamic_start: Ports::DYNAMIC_START,
            nr_requests: 1024,
            buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
        };
        config.workers = 2;
        config.registry = Some(dir.path().join("registry"));
        let set = PeerSet::start(&config).expect("peer set on RADOS");
        let mut cc = ControllerConfig::new(node, dir.path());
        cc.backend = backend.clone();
        cc.peerset_registry = config.registry.clone();
        let plugin = ControllerPlugin::open_with(set.segment(), cc).expect("controller");
        let routes = plugin.routes(PeerSetHealth::new(set.segment().clone()));
        let socket = dir.path().join("plugin").join("csi.sock");
        let bound = UnixEndpoint::parse(&format!("unix://{}", socket.display()))
            .unwrap()
            .bind()
            .expect("bind");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(bound.serve(routes, async {
            let _ = rx.await;
        }));
        let channel = csi::dial::connect(&socket).await.expect("dial");
        let volumes = Arc::new(VolumeClient::connect(set.segment()).unwrap());
        Driver {
            set: Some(set),
            _dir: dir,
            segment,
            stop: Some(tx),
            channel,
            volumes,
        }
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }
}

impl Drop for Driver {
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

fn mount() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(
    name: &str,
    params: &HashMap<String, String>,
    secrets: HashMap<String, String>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: (64 * MI) as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        parameters: params.clone(),
        secrets,
        ..Default::default()
    }
}

async fn volume_ids(c: &mut ControllerClient<Channel>) -> Vec<String> {
    let mut ids: Vec<String> = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .expect("ListVolumes")
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.volume.map(|v| v.volume_id))
        .collect();
    ids.sort();
    ids
}

/// The content of every object in `namespace` of `pool` (via the `rados` CLI).
fn namespace_dump(pool: &str, namespace: &str) -> Vec<(String, Vec<u8>)> {
    let ls = Command::new("rados")
        .args(["-p", pool, "-N", namespace, "ls"])
        .output()
        .expect("rados ls");
    assert!(ls.status.success());
    String::from_utf8(ls.stdout)
        .unwrap()
        .lines()
        .map(|obj| {
            let get = Command::new("rados")
                .args(["-p", pool, "-N", namespace, "get", obj, "-"])
                .output()
                .expect("rados get");
            assert!(get.status.success(), "rados get {obj}");
            (obj.to_owned(), get.stdout)
        })
        .collect()
}

/// The first `len` bytes of volume or snapshot `name`, read through `client`.
async fn read_back(client: &VolumeClient, name: &str, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    client.open(name).await.expect("open");
    client.read(name, 0, &mut buf).await.expect("read");
    client.close(name).await.expect("close");
    buf
}

/// The code and message of a refusal.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(_) => panic!("accepted"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csi_on_rados_with_secrets() {
    let Some(cl) = cluster() else { return };
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let tag = format!(
        "csi-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let namespace = tag.clone();
    let backend = BackendConfig::parse(&format!(
        "rados:pool={},namespace={namespace},conf={},id=admin,keyring={}",
        cl.pool, cl.conf, cl.keyring
    ))
    .unwrap();
    // The class's credentials: one user allowed on the pool, one on another pool only.
    let allowed = User::new(format!("{tag}-ok"), &format!("allow rw pool={}", cl.pool));
    let elsewhere = User::new(format!("{tag}-other"), "allow rw pool=some-other-pool");
    let params: HashMap<String, String> = [
        ("backend", "rados"),
        ("clusterID", cl.fsid.as_str()),
        ("pool", cl.pool.as_str()),
        ("radosNamespace", namespace.as_str()),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();

    let a = Driver::start("node-a", &backend).await;
    let mut ca = a.controller();

    // Refusals first, each changing nothing.
    let refused = |secrets: HashMap<String, String>| create("refused", &params, secrets);
    let (c, m) = code(ca.create_volume(refused(HashMap::new())).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    assert!(m.contains("userID"), "{m}");
    let mut no_key = allowed.secrets();
    no_key.remove("userKey");
    let (c, m) = code(ca.create_volume(refused(no_key)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    let mut malformed = allowed.secrets();
    malformed.insert("userKey".into(), "not a key".into());
    let (c, m) = code(ca.create_volume(refused(malformed)).await);
    assert_eq!(c, Code::InvalidArgument, "{m}");
    // Well-formed, but not this user's key: the cluster refuses it.
    let mut wrong = allowed.secrets();
    wrong.insert("userKey".into(), elsewhere.key.clone());
    let (c, m) = code(ca.create_volume(refused(wrong)).await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    // A real user whose caps do not cover the pool.
    let (c, m) = code(ca.create_volume(refused(elsewhere.secrets())).await);
    assert_eq!(c, Code::PermissionDenied, "{m}");
    // A class naming another pool or cluster is refused, not served from ours.
    for (key, value) in [("pool", "not-ours"), ("clusterID", "0000-not-ours")] {
        let mut other = params.clone();
        other.insert(key.into(), value.into());
        let (c, m) = code(
            ca.create_volume(create("refused", &other, allowed.secrets()))
                .await,
        );
        assert_eq!(c, Code::InvalidArgument, "{key}: {m}");
    }
    assert!(
        volume_ids(&mut ca).await.is_empty(),
        "a refusal made a volume"
    );
    let (c, _) = code(
        ca.delete_volume(DeleteVolumeRequest {
            volume_id: "v-anything".into(),
            secrets: HashMap::new(),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument, "DeleteVolume without secrets");

    // A volume, as a careless log line would record the request: its Debug redacts secrets.
    let request = create("data", &params, allowed.secrets());
    tracing::info!(request = ?request, "CreateVolume request");
    let vol = ca
        .create_volume(request)
        .await
        .expect("CreateVolume on RADOS")
        .into_inner()
        .volume
        .unwrap();
    assert!(
        vol.accessible_topology.is_empty(),
        "a RADOS volume is reachable from every node: {:?}",
        vol.accessible_topology
    );
    assert!(
        !vol.volume_context
            .values()
            .any(|v| v.contains(&allowed.key)),
        "the key is not in the volume context"
    );

    // Data, so the clone can be shown to carry the snapshot's content.
    let name = vol.volume_id.as_str();
    a.volumes.open(name).await.expect("open");
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    a.volumes.write(name, MI, &pattern).await.expect("write");
    a.volumes.flush(name).await.expect("flush");
    a.volumes.close(name).await.expect("close");

    let (c, m) = code(
        ca.create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(
        c,
        Code::InvalidArgument,
        "CreateSnapshot without secrets: {m}"
    );
    let snap = ca
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap".into(),
            secrets: allowed.secrets(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    let mut from_snapshot = create("clone", &params, allowed.secrets());
    from_snapshot.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let clone = ca
        .create_volume(from_snapshot)
        .await
        .expect("clone from the snapshot")
        .into_inner()
        .volume
        .unwrap();
    assert!(clone.accessible_topology.is_empty());
    let mut back = vec![0u8; pattern.len()];
    a.volumes.open(&clone.volume_id).await.expect("open clone");
    a.volumes
        .read(&clone.volume_id, MI, &mut back)
        .await
        .expect("read clone");
    a.volumes
        .close(&clone.volume_id)
        .await
        .expect("close clone");
    assert!(back == pattern, "the clone holds the snapshot's data");

    let mut want = vec![vol.volume_id.clone(), clone.volume_id.clone()];
    want.sort();
    assert_eq!(volume_ids(&mut ca).await, want);

    // Capacity from the pool: the mgr's statistics may take a moment after the cluster starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    let available = loop {
        let got = ca
            .get_capacity(GetCapacityRequest {
                parameters: params.clone(),
                ..Default::default()
            })
            .await;
        match got {
            Ok(r) if r.get_ref().available_capacity > 0 => break r.into_inner().available_capacity,
            other if Instant::now() > deadline => panic!("GetCapacity never > 0: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    assert!(available > 0);

    // Another controller, on another peer set with another node identity (as after a restart
    // on another node), finds the same volumes: the records are in the pool.
    let b = Driver::start("node-b", &backend).await;
    let mut cb = b.controller();
    assert_eq!(volume_ids(&mut cb).await, want, "B sees A's volumes");
    let again = cb
        .create_volume(create("data", &params, allowed.secrets()))
        .await
        .expect("a retried CreateVolume on B")
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        again.volume_id, vol.volume_id,
        "the same volume, from A's record"
    );

    // A volume in use on node A, operated on through B's controller: B's peer set shares no
    // segment or registry with A (each driver has its own registry directory), so only the
    // RADOS notify reaches A, whose vlmc drains the volume and whose mapper holds the lock.
    // Without forwarding, each of these is FAILED_PRECONDITION ("in use by node node-a").
    a.volumes.open(name).await.expect("A opens the volume");
    let live: Vec<u8> = (0..64 * 1024).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    a.volumes.write(name, 0, &live).await.expect("A writes");
    let held = a.volumes.lock_info(name).await.expect("lock info");
    assert_eq!(held.holder.as_deref(), Some("node-a"), "A holds {name}");
    let live_snap = cb
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "live-snap".into(),
            secrets: allowed.secrets(),
            ..Default::default()
        })
        .await
        .expect("CreateSnapshot on B of a volume A holds")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(live_snap.ready_to_use);
    let seen = read_back(&b.volumes, &live_snap.snapshot_id, live.len()).await;
    assert!(
        seen == live,
        "the snapshot cut by A holds A's acknowledged write"
    );
    let grown = cb
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: (128 * MI) as i64,
                limit_bytes: 0,
            }),
            secrets: allowed.secrets(),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume on B of a volume A holds")
        .into_inner();
    assert_eq!(grown.capacity_bytes, (128 * MI) as i64);
    assert_eq!(
        a.volumes.info(name).await.expect("info").size,
        128 * MI,
        "A's own peer set sees the new size"
    );
    let mut from_volume = create("live-clone", &params, allowed.secrets());
    from_volume.capacity_range = Some(CapacityRange {
        required_bytes: (128 * MI) as i64,
        limit_bytes: 0,
    });
    from_volume.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: vol.volume_id.clone(),
        })),
    });
    let live_clone = cb
        .create_volume(from_volume)
        .await
        .expect("a clone on B of a volume A holds")
        .into_inner()
        .volume
        .unwrap();
    let seen = read_back(&b.volumes, &live_clone.volume_id, live.len()).await;
    assert!(seen == live, "the clone holds A's write");
    let mut group = GroupControllerClient::new(b.channel.clone());
    let cut = group
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "live-group".into(),
            source_volume_ids: vec![vol.volume_id.clone()],
            secrets: allowed.secrets(),
            ..Default::default()
        })
        .await
        .expect("a group snapshot on B of a volume A holds")
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(cut.snapshots.len(), 1);
    a.volumes.close(name).await.expect("A closes the volume");
    group
        .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: cut.group_snapshot_id.clone(),
            snapshot_ids: cut
                .snapshots
                .iter()
                .map(|s| s.snapshot_id.clone())
                .collect(),
            secrets: allowed.secrets(),
        })
        .await
        .expect("DeleteVolumeGroupSnapshot");
    cb.delete_volume(DeleteVolumeRequest {
        volume_id: live_clone.volume_id.clone(),
        secrets: allowed.secrets(),
    })
    .await
    .expect("delete the live clone");
    cb.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: live_snap.snapshot_id.clone(),
        secrets: allowed.secrets(),
    })
    .await
    .expect("delete the live snapshot");

    // Deleting needs the secrets too, and then works from B.
    let (c, _) = code(
        cb.delete_volume(DeleteVolumeRequest {
            volume_id: clone.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await,
    );
    assert_eq!(c, Code::InvalidArgument);
    for id in [&clone.volume_id, &vol.volume_id] {
        cb.delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: allowed.secrets(),
        })
        .await
        .expect("DeleteVolume");
    }
    cb.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: allowed.secrets(),
    })
    .await
    .expect("DeleteSnapshot");
    assert!(volume_ids(&mut ca).await.is_empty(), "A sees B's deletes");

    // The key is nowhere: not in any log line of this process (every level), not in the
    // records or the volumes' objects in the pool.
    drop(b);
    drop(a);
    let text = logs.text();
    assert!(
        text.contains("CreateVolume request") && text.contains("redacted"),
        "the capture works and the request's secrets were redacted"
    );
    assert!(!text.contains(&allowed.key), "the key was logged");
    assert!(!text.contains(&elsewhere.key), "a refused key was logged");
    for ns in [namespace.clone(), format!("{namespace}.csi")] {
        for (obj, content) in namespace_dump(&cl.pool, &ns) {
            let key = allowed.key.as_bytes();
            assert!(
                !content.windows(key.len()).any(|w| w == key),
                "{ns}/{obj} holds the key"
            );
        }
    }
}
