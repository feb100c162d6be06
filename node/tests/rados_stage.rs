//! NodeStage of a RADOS volume with the StorageClass's node-stage secrets, through gRPC over a
//! unix socket, against a real Ceph cluster (`rados` feature; see csi/tests/rados.rs for the
//! environment it needs). The credential check runs before any device is made, so it is proven
//! here; making the ublk device needs the kernel driver and runs in the VM suite (e2e/vm): on a
//! host without it, an accepted NodeStage fails later, for lack of ublk, and never with a
//! credential error.

#![cfg(feature = "rados")]

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::pb::{NodeStageVolumeRequest, VolumeCapability};
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
