//! NodeStage of a RADOS volume with the StorageClass's node-stage secrets, through gRPC over a
//! unix socket, against a real Ceph cluster (`rados` feature; see csi/tests/rados.rs for the
//! environment it needs). The credential check runs before any device is made, so it is proven
//! on the host: an accepted NodeStage fails later there, for lack of ublk, and never with a
//! credential error.
//!
//! The whole stage (a ublk device over the RADOS volume, ext4 made and mounted, a publication,
//! data that outlives an unstage) needs the kernel driver: the VM suite's `rados` part runs
//! `node_stage_maps_a_rados_volume_with_the_secrets` in the guest, against the host's cluster,
//! with the guest's own cephx user given as ARCHIP_STAGE_USER/ARCHIP_STAGE_KEY_FILE and the
//! backend as ARCHIP_BACKEND. ARCHIP_STAGE_REQUIRED=1 (set there) turns a skip into a failure.

#![cfg(feature = "rados")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::pb::{
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, VolumeCapability,
};
use node::csi_node::{NodeOptions, NodeService};
use node::devices::DeviceTable;
use node::ublk::{Launcher, UblkConfig};
use peers::backend::BackendConfig;
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet};
use tonic::Code;

fn ceph(args: &[&str]) -> String {
    let out = Command::new("ceph").args(args).output().expect("ceph CLI");
    assert!(
        out.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A cephx user with `osd_caps` and its key, removed on drop.
struct User(String, String);

impl User {
    fn new(id: String, osd_caps: &str) -> User {
        let entity = format!("client.{id}");
        ceph(&[
            "auth",
            "get-or-create",
            &entity,
            "mon",
            "allow r",
            "osd",
            osd_caps,
        ]);
        let key = ceph(&["auth", "get-key", &entity]).trim().to_owned();
        User(id, key)
    }
    fn secrets(&self) -> HashMap<String, String> {
        HashMap::from([
            ("userID".into(), self.0.clone()),
            ("userKey".into(), self.1.clone()),
        ])
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("ceph")
            .args(["auth", "del", &format!("client.{}", self.0)])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_checks_the_secrets_against_the_cluster() {
    let (Ok(conf), Ok(pool), Ok(keyring)) = (
        std::env::var("CEPH_CONF"),
        std::env::var("ARCHIP_CEPH_POOL"),
        std::env::var("ARCHIP_CEPH_KEYRING"),
    ) else {
        eprintln!("SKIP: no Ceph cluster (CEPH_CONF, ARCHIP_CEPH_POOL, ARCHIP_CEPH_KEYRING)");
        return;
    };
    let tag = format!(
        "stage-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let backend = BackendConfig::parse(&format!(
        "rados:pool={pool},namespace={tag},conf={conf},id=admin,keyring={keyring}"
    ))
    .unwrap();
    let allowed = User::new(format!("{tag}-ok"), &format!("allow rw pool={pool}"));
    let elsewhere = User::new(format!("{tag}-no"), "allow rw pool=some-other-pool");

    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg").display().to_string();
    let mut config = PeerConfig::new(dir.path().join("data"), &seg, "node-stage");
    config.backend = backend.clone();
    config.registry = Some(dir.path().join("registry"));
    let set = PeerSet::start(&config).expect("peer set on RADOS");
    let client = Arc::new(VolumeClient::connect(set.segment()).unwrap());
    client
        .create("vol", 64 << 20, Some(1 << 20))
        .await
        .expect("create");
    let svc = NodeService::new(
        NodeOptions {
            node_id: "node-stage".into(),
            segment: seg,
            table: DeviceTable::new(dir.path().join("devices.json")),
            launcher: Launcher {
                program: "/nonexistent/archip".into(),
                args: vec![],
            },
            ublk: UblkConfig::default(),
            max_volumes_per_node: 0,
        },
        Some(client.clone()),
    )
    .with_authorizer(Arc::new(csi::secrets::Authorizer::new(backend)));
    let sock = dir.path().join("csi.sock");
    let bound = csi::server::UnixEndpoint::parse(&format!("unix://{}", sock.display()))
        .unwrap()
        .bind()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        bound.serve(svc.routes(csi::identity::AlwaysHealthy), async {
            let _ = rx.await;
        }),
    );
    let mut node = NodeClient::new(csi::dial::connect(&sock).await.unwrap());
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let stage = |secrets: HashMap<String, String>| NodeStageVolumeRequest {
        volume_id: "vol".into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        secrets,
        ..Default::default()
    };

    let mut wrong = allowed.secrets();
    wrong.insert("userKey".into(), elsewhere.1.clone());
    for (secrets, want) in [
        (HashMap::new(), Code::InvalidArgument),
        (wrong, Code::Unauthenticated),
        (elsewhere.secrets(), Code::PermissionDenied),
    ] {
        let e = node.node_stage_volume(stage(secrets)).await.unwrap_err();
        assert_eq!(e.code(), want, "{}", e.message());
    }
    assert!(
        DeviceTable::new(dir.path().join("devices.json"))
            .load()
            .unwrap_or_default()
            .is_empty(),
        "a refused NodeStage made no device"
    );
    // The right credentials pass the check; what follows needs ublk (the VM suite).
    match node.node_stage_volume(stage(allowed.secrets())).await {
        Ok(_) => eprintln!("NodeStage succeeded (this host has ublk)"),
        Err(e) => {
            assert!(
                !matches!(
                    e.code(),
                    Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
                ),
                "the accepted credentials were refused: {e:?}"
            );
            eprintln!(
                "NodeStage past the credential check, then: {:?} {}",
                e.code(),
                e.message()
            );
        }
    }
    let _ = tx.send(());
    set.stop();
}

/// The device server a stage launches (in the guest: the copy the VM suite installs).
fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ARCHIP_UBLK_SERVER") {
        return p.into();
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_archip-ublk-test"));
    if built.exists() {
        return built;
    }
    PathBuf::from("/usr/local/bin/archip-ublk-test")
}

fn ext4() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(m), Ok(p)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    m.dev() != p.dev()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stage_maps_a_rados_volume_with_the_secrets() {
    let required = std::env::var("ARCHIP_STAGE_REQUIRED").is_ok_and(|v| v == "1");
    let skip = |why: &str| {
        assert!(!required, "ARCHIP_STAGE_REQUIRED=1, but {why}");
        eprintln!("SKIP: {why} (the VM suite's rados part runs this)");
    };
    let (Ok(backend), Ok(user), Ok(key_file)) = (
        std::env::var("ARCHIP_BACKEND"),
        std::env::var("ARCHIP_STAGE_USER"),
        std::env::var("ARCHIP_STAGE_KEY_FILE"),
    ) else {
        return skip("ARCHIP_BACKEND, ARCHIP_STAGE_USER or ARCHIP_STAGE_KEY_FILE is not set");
    };
    if !node::ublk::available() {
        return skip("no /dev/ublk-control here");
    }
    // A keyring's `key = ...` line, or a bare key.
    let text = std::fs::read_to_string(&key_file).expect("the stage user's key file");
    let key = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("key")
                .map(|k| k.trim_start_matches([' ', '=']))
        })
        .unwrap_or(text.trim())
        .trim()
        .to_owned();
    let backend = BackendConfig::parse(&backend).expect("ARCHIP_BACKEND");
    let secrets = HashMap::from([("userID".to_owned(), user), ("userKey".to_owned(), key)]);

    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg").display().to_string();
    let mut config = PeerConfig::new(dir.path().join("data"), &seg, "node-stage-vm");
    config.backend = backend.clone();
    config.registry = Some(dir.path().join("registry"));
    let set = PeerSet::start(&config).expect("peer set on RADOS");
    let client = Arc::new(VolumeClient::connect(set.segment()).unwrap());
    let volume = format!("stage-{}", std::process::id());
    client
        .create(&volume, 64 << 20, Some(1 << 20))
        .await
        .expect("create");
    let table = DeviceTable::new(dir.path().join("devices.json"));
    let svc = NodeService::new(
        NodeOptions {
            node_id: "node-stage-vm".into(),
            segment: seg,
            table: table.clone(),
            launcher: Launcher {
                program: server_binary(),
                args: vec!["serve".into()],
            },
            ublk: UblkConfig::default(),
            max_volumes_per_node: 0,
        },
        Some(client.clone()),
    )
    .with_authorizer(Arc::new(csi::secrets::Authorizer::new(backend)));
    let sock = dir.path().join("csi.sock");
    let bound = csi::server::UnixEndpoint::parse(&format!("unix://{}", sock.display()))
        .unwrap()
        .bind()
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        bound.serve(svc.routes(csi::identity::AlwaysHealthy), async {
            let _ = rx.await;
        }),
    );
    let mut node = NodeClient::new(csi::dial::connect(&sock).await.unwrap());
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let target = dir.path().join("pods/pod-1/volume");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let stage = |secrets: HashMap<String, String>| NodeStageVolumeRequest {
        volume_id: volume.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(ext4()),
        secrets,
        ..Default::default()
    };
    let unstage = || NodeUnstageVolumeRequest {
        volume_id: volume.clone(),
        staging_target_path: staging.display().to_string(),
    };

    // A key the cluster does not know is refused before anything is made.
    let mut wrong = secrets.clone();
    wrong.insert(
        "userKey".into(),
        // Well-formed (AES, 16-byte secret), but no user's key.
        "AQAAAAAAAAAAABAAAAECAwQFBgcICQoLDA0ODw==".into(),
    );
    let e = node.node_stage_volume(stage(wrong)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(
        table.load().unwrap_or_default().is_empty(),
        "a refusal made a device"
    );

    node.node_stage_volume(stage(secrets.clone()))
        .await
        .expect("NodeStage of a RADOS volume with the node-stage secrets");
    let devices = table.load().expect("device table");
    assert_eq!(devices.len(), 1, "one ublk device: {devices:?}");
    assert!(mounted(&staging), "ext4 mounted at the staging path");
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: volume.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(ext4()),
        ..Default::default()
    })
    .await
    .expect("NodePublish");
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(target.join("data"), &data).expect("write through the publication");
    std::fs::File::open(target.join("data"))
        .and_then(|f| f.sync_all())
        .expect("fsync");
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: volume.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("NodeUnpublish");
    node.node_unstage_volume(unstage())
        .await
        .expect("NodeUnstage");
    assert!(!mounted(&staging), "unmounted");
    assert!(
        table.load().unwrap_or_default().is_empty(),
        "the device is gone after unstage"
    );

    // Staged again (a new device, the same RADOS objects): the file is there.
    node.node_stage_volume(stage(secrets))
        .await
        .expect("NodeStage again");
    let back = std::fs::read(staging.join("data")).expect("the file after a re-stage");
    assert!(back == data, "the file survives unstage and re-stage");
    node.node_unstage_volume(unstage())
        .await
        .expect("NodeUnstage again");
    client.delete(&volume).await.expect("delete");
    let _ = tx.send(());
    set.stop();
}
