//! The CSI Node service over gRPC on a unix socket, staging real ublk devices over an
//! in-process peer set (file backend): mount mode (ext4, xfs) and block mode, idempotency, the
//! "never format a device with data" rule, the spec's publication table per access mode,
//! `volume_mount_group`, stats, expansion, and the request errors.
//!
//! The request checks run everywhere; the staging tests need root and the ublk driver and
//! return early (saying so) without `/dev/ublk-control`. The VM runs them for real:
//! `e2e/vm/run-in-vm.sh --cpus 2 --mem 2G --bin target/release/archip-ublk-test --runner TESTBIN`
//! (`e2e/vm/ublk-suite.sh` does). Device servers are `archip-ublk-test serve` processes.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use csi::pb::node_client::NodeClient;
use csi::pb::node_service_capability;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::pb::volume_usage::Unit;
use csi::pb::*;
use node::csi_node::{self, NodeOptions, NodeService};
use node::devices::{DeviceTable, Target};
use node::ublk::{self, Launcher, UblkConfig};
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet};
use tonic::Code;
use tonic::transport::Channel;

const NODE: &str = "node-csi-test";

fn skip() -> bool {
    if !ublk::available() {
        eprintln!("skipping: no /dev/ublk-control here (the VM suite runs this for real)");
        return true;
    }
    false
}

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

struct Env {
    dir: tempfile::TempDir,
    set: Option<PeerSet>,
    client: VolumeClient,
    node: NodeClient<Channel>,
    table: DeviceTable,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn new() -> Env {
        Env::node(NODE, None)
    }

    /// A node named `node` with its own peer set, device table and socket, over `data` (another
    /// node's data directory: a shared backend) or a fresh one.
    fn node(node: &str, data: Option<&Path>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("seg").display().to_string();
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let set = PeerSet::start(&PeerConfig::new(data, &seg, node)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let table = DeviceTable::new(dir.path().join("devices.json"));
        let opts = NodeOptions {
            node_id: node.into(),
            segment: seg,
            table: table.clone(),
            launcher: Launcher {
                program: server_binary(),
                args: vec!["serve".into()],
            },
            ublk: UblkConfig::default(),
            max_volumes_per_node: 7,
        };
        let svc = NodeService::new(
            opts,
            Some(Arc::new(VolumeClient::connect(set.segment()).unwrap())),
        );
        let sock = dir.path().join("csi.sock");
        let endpoint =
            csi::server::UnixEndpoint::parse(&format!("unix://{}", sock.display())).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let bound = {
            let _g = rt.enter();
            endpoint.bind().unwrap()
        };
        rt.spawn(
            bound.serve(svc.routes(csi::identity::AlwaysHealthy), async {
                let _ = rx.await;
            }),
        );
        let node = NodeClient::new(rt.block_on(csi::dial::connect(&sock)).unwrap());
        let client = VolumeClient::connect(set.segment()).unwrap();
        Env {
            dir,
            set: Some(set),
            client,
            node,
            table,
            stop: Some(tx),
            rt,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn create(&self, name: &str, size: u64) {
        self.rt
            .block_on(self.client.create(name, size, Some(1 << 20)))
            .unwrap();
    }

    fn stage(&self, id: &str, staging: &Path, cap: VolumeCapability) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            }))
            .map(drop)
    }

    fn unstage(&self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
            }))
            .map(drop)
    }

    fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            }))
            .map(drop)
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
            }))
            .map(drop)
    }

    fn stats(&self, id: &str, path: &Path) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            }))
            .map(|r| r.into_inner())
    }

    fn expand(&self, id: &str, path: &Path, bytes: i64) -> Result<i64, tonic::Status> {
        let mut n = self.node.clone();
        self.rt
            .block_on(n.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: path.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .map(|r| r.into_inner().capacity_bytes)
    }

    fn mapped(&self, volume: &str) -> Option<node::devices::DeviceRecord> {
        self.table
            .load()
            .unwrap()
            .into_iter()
            .find(|r| r.volume == volume)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave nothing mounted or mapped behind, even when a test failed half-way.
        let base = self.dir.path().to_owned();
        for m in mounts().into_iter().rev() {
            if m.mount_point.starts_with(&base) {
                let _ = std::process::Command::new("umount")
                    .arg(&m.mount_point)
                    .status();
                if let Some(lo) = m.root.strip_prefix("/loop") {
                    let _ = std::process::Command::new("losetup")
                        .arg("-d")
                        .arg(format!("/dev/loop{lo}"))
                        .status();
                }
            }
        }
        if ublk::available() {
            for r in self.table.load().unwrap_or_default() {
                let _ = ublk::unmap(&self.table, &Target::Device(r.dev_id));
            }
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(set) = self.set.take() {
            set.stop();
        }
    }
}

fn mounts() -> Vec<csi_node::MountInfo> {
    csi_node::parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
}

fn mount_at(p: &Path) -> Option<csi_node::MountInfo> {
    mounts().into_iter().rev().find(|m| m.mount_point == p)
}

fn cap(kind: AccessType, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(kind),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn fs(fs_type: &str) -> VolumeCapability {
    fs_mode(fs_type, Mode::SingleNodeWriter)
}

fn fs_mode(fs_type: &str, mode: Mode) -> VolumeCapability {
    cap(
        AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            mount_flags: vec!["noatime".into()],
            ..Default::default()
        }),
        mode,
    )
}

fn fs_group(fs_type: &str, mode: Mode, group: &str) -> VolumeCapability {
    cap(
        AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: group.into(),
        }),
        mode,
    )
}

fn block(mode: Mode) -> VolumeCapability {
    cap(AccessType::Block(BlockVolume {}), mode)
}

fn code(r: Result<impl std::fmt::Debug, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn usage(r: &NodeGetVolumeStatsResponse, unit: Unit) -> VolumeUsage {
    *r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {r:?}"))
}

fn condition_ok(r: &NodeGetVolumeStatsResponse) {
    let c = r.volume_condition.as_ref().expect("a volume condition");
    assert!(!c.abnormal, "abnormal: {}", c.message);
}

#[test]
fn info_capabilities_and_request_errors() {
    let env = Env::new();
    let mut n = env.node.clone();
    let info = env
        .rt
        .block_on(n.node_get_info(NodeGetInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(info.max_volumes_per_node, 7);
    assert_eq!(
        info.accessible_topology.unwrap().segments,
        HashMap::from([("topology.archipelago.io/node".to_owned(), NODE.to_owned())])
    );
    let caps = env
        .rt
        .block_on(n.node_get_capabilities(NodeGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps, csi_node::capabilities());
    assert_eq!(caps.len(), 5);
    // VOLUME_MOUNT_GROUP (6) is not advertised: see the module documentation of csi_node.
    assert!(
        !caps.iter().any(|c| matches!(
            c.r#type,
            Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: 6 }
            ))
        )),
        "{caps:?}"
    );

    let st = env.path("st");
    let tgt = env.path("tgt");
    // Stage: each required field.
    assert_eq!(code(env.stage("", &st, fs("ext4"))), Code::InvalidArgument);
    assert_eq!(
        code(env.stage("v", Path::new(""), fs("ext4"))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(env.stage("v", Path::new("relative"), fs("ext4"))),
        Code::InvalidArgument
    );
    let mut r = env.node.clone();
    let no_cap = env.rt.block_on(r.node_stage_volume(NodeStageVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: st.display().to_string(),
        ..Default::default()
    }));
    assert_eq!(code(no_cap), Code::InvalidArgument);
    let no_mode = VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: None,
    };
    assert_eq!(code(env.stage("v", &st, no_mode)), Code::InvalidArgument);
    // Unsupported capabilities.
    assert_eq!(
        code(env.stage("v", &st, fs("btrfs"))),
        Code::FailedPrecondition
    );
    let rwx_fs = cap(
        AccessType::Mount(MountVolume::default()),
        Mode::MultiNodeMultiWriter,
    );
    assert_eq!(code(env.stage("v", &st, rwx_fs)), Code::FailedPrecondition);
    // A volume_mount_group that is not a numeric gid, on stage and on publish, is refused
    // before anything is looked up.
    for bad in [
        "staff",
        "-1",
        "+5",
        "12a",
        " 7",
        "4294967295",
        "99999999999",
    ] {
        let c = fs_group("ext4", Mode::SingleNodeWriter, bad);
        assert_eq!(
            code(env.stage("nope", &st, c.clone())),
            Code::InvalidArgument,
            "stage, group {bad:?}"
        );
        assert_eq!(
            code(env.publish("nope", &st, &tgt, c, false)),
            Code::InvalidArgument,
            "publish, group {bad:?}"
        );
    }
    // A volume that does not exist, and an id that cannot be ours.
    assert_eq!(code(env.stage("nope", &st, fs("ext4"))), Code::NotFound);
    assert_eq!(code(env.stage("a/b", &st, fs("ext4"))), Code::NotFound);
    assert_eq!(
        code(env.stage(&"v".repeat(129), &st, fs("ext4"))),
        Code::InvalidArgument
    );

    // Publish.
    assert_eq!(
        code(env.publish("v", &st, Path::new(""), fs("ext4"), false)),
        Code::InvalidArgument
    );
    assert_eq!(
        code(env.publish("v", Path::new(""), &tgt, fs("ext4"), false)),
        Code::FailedPrecondition
    );
    env.create("v", 16 << 20);
    assert_eq!(
        code(env.publish("v", &st, &tgt, fs("ext4"), false)),
        Code::FailedPrecondition,
        "not staged"
    );
    // Unpublish / unstage of what was never there: success.
    env.unpublish("v", &tgt).unwrap();
    env.unstage("v", &st).unwrap();
    assert_eq!(code(env.unpublish("", &tgt)), Code::InvalidArgument);
    assert_eq!(code(env.unstage("v", Path::new(""))), Code::InvalidArgument);
    // Stats and expand.
    assert_eq!(code(env.stats("v", &env.path("missing"))), Code::NotFound);
    // A volume that does not exist is NOT_FOUND whatever the path looks like (csi-sanity
    // sends a relative one), before the path is checked.
    for path in ["some/path", "", "/nowhere"] {
        let path = Path::new(path);
        assert_eq!(
            code(env.stats("nope", path)),
            Code::NotFound,
            "stats {path:?}"
        );
        assert_eq!(
            code(env.expand("nope", path, 0)),
            Code::NotFound,
            "expand {path:?}"
        );
    }
    // An existing volume with a relative path: the path is wrong.
    assert_eq!(
        code(env.stats("v", Path::new("some/path"))),
        Code::InvalidArgument
    );
    assert_eq!(code(env.stats("v", Path::new(""))), Code::InvalidArgument);
    assert_eq!(code(env.stats("", &st)), Code::InvalidArgument);
    assert_eq!(
        code(env.expand("v", Path::new(""), 0)),
        Code::InvalidArgument
    );
    assert_eq!(code(env.expand("v", &st, -1)), Code::OutOfRange);
    assert_eq!(
        code(env.expand("v", &env.path("missing"), 0)),
        Code::NotFound
    );
}

#[test]
fn mount_mode_ext4_stage_publish_unpublish_unstage() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.create("fsvol", 64 << 20);
    let st = env.path("staging/fsvol");
    let rw = env.path("pods/a/volumes/fsvol");
    let ro = env.path("pods/b/volumes/fsvol");

    env.stage("fsvol", &st, fs("ext4")).unwrap();
    let rec = env.mapped("fsvol").expect("mapped");
    let dev = rec.block_device();
    let m = mount_at(&st).expect("staging mounted");
    assert_eq!(m.fstype, "ext4");
    assert_eq!(Path::new(&m.source), dev);
    assert!(m.options.split(',').any(|o| o == "noatime"), "{m:?}");
    // Idempotent: same device, still one mount.
    env.stage("fsvol", &st, fs("ext4")).unwrap();
    env.stage("fsvol", &st, fs("")).unwrap();
    assert_eq!(env.mapped("fsvol"), Some(rec.clone()));
    assert_eq!(mounts().iter().filter(|m| m.mount_point == st).count(), 1);
    assert_eq!(
        code(env.stage("fsvol", &st, fs("xfs"))),
        Code::AlreadyExists
    );

    // Two publications of one volume on this node: SINGLE_NODE_MULTI_WRITER allows that.
    let multi = fs_mode("ext4", Mode::SingleNodeMultiWriter);
    env.publish("fsvol", &st, &rw, multi.clone(), false)
        .unwrap();
    env.publish("fsvol", &st, &rw, multi.clone(), false)
        .unwrap();
    assert_eq!(mounts().iter().filter(|m| m.mount_point == rw).count(), 1);
    assert_eq!(
        code(env.publish("fsvol", &st, &rw, multi.clone(), true)),
        Code::AlreadyExists,
        "same target, other read-only flag"
    );
    let data = pattern(7, 3 << 20);
    std::fs::write(rw.join("hello.bin"), &data).unwrap();
    std::fs::File::open(rw.join("hello.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    env.publish("fsvol", &st, &ro, multi.clone(), true).unwrap();
    assert!(mount_at(&ro).unwrap().read_only());
    assert_eq!(std::fs::read(ro.join("hello.bin")).unwrap(), data);
    let err = std::fs::write(ro.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");

    let s = env.stats("fsvol", &rw).unwrap();
    condition_ok(&s);
    let bytes = usage(&s, Unit::Bytes);
    assert!(
        bytes.total > 50 << 20 && bytes.total <= 64 << 20,
        "{bytes:?}"
    );
    assert!(bytes.used >= 3 << 20, "{bytes:?}");
    assert!(bytes.available > 0 && bytes.available < bytes.total);
    let inodes = usage(&s, Unit::Inodes);
    assert!(inodes.total > 1000 && inodes.used >= 12, "{inodes:?}");

    // Unstage refuses while published; unpublish twice; then unstage twice.
    assert_eq!(code(env.unstage("fsvol", &st)), Code::FailedPrecondition);
    for t in [&rw, &ro] {
        env.unpublish("fsvol", t).unwrap();
        assert!(!t.exists(), "{} left behind", t.display());
        env.unpublish("fsvol", t).unwrap();
    }
    assert_eq!(code(env.stats("fsvol", &rw)), Code::NotFound);
    env.unstage("fsvol", &st).unwrap();
    assert!(mount_at(&st).is_none());
    assert!(env.mapped("fsvol").is_none(), "device still recorded");
    assert!(!dev.exists() || env.table.load().unwrap().is_empty());
    env.unstage("fsvol", &st).unwrap();

    // Another filesystem type is refused, not formatted over.
    assert_eq!(
        code(env.stage("fsvol", &st, fs("xfs"))),
        Code::FailedPrecondition
    );
    assert!(mount_at(&st).is_none());
    // Re-staged: the file written before is still there (no reformat).
    env.stage("fsvol", &st, fs("ext4")).unwrap();
    env.publish("fsvol", &st, &rw, fs("ext4"), false).unwrap();
    assert_eq!(std::fs::read(rw.join("hello.bin")).unwrap(), data);

    // Expansion: the volume grows, then the device and filesystem where the kernel can.
    env.rt
        .block_on(env.client.resize("fsvol", 128 << 20))
        .unwrap();
    let online = ublk::feature_names(ublk::features().unwrap()).contains(&"UPDATE_SIZE");
    match env.expand("fsvol", &rw, 128 << 20) {
        Ok(cap) => {
            assert!(online, "expanded without UPDATE_SIZE");
            assert_eq!(cap, 128 << 20);
            let total = usage(&env.stats("fsvol", &rw).unwrap(), Unit::Bytes).total;
            assert!(total > 100 << 20, "filesystem did not grow: {total}");
        }
        Err(e) => {
            assert!(!online, "kernel has UPDATE_SIZE but expand failed: {e:?}");
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        }
    }
    assert_eq!(
        code(env.expand("fsvol", &rw, 1 << 30)),
        Code::FailedPrecondition,
        "more than the volume has"
    );
    env.unpublish("fsvol", &rw).unwrap();
    env.unstage("fsvol", &st).unwrap();
    assert!(env.table.load().unwrap().is_empty());
}

#[test]
fn a_device_with_data_is_never_formatted() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.create("raw", 32 << 20);
    let junk = pattern(3, 8192);
    env.rt.block_on(env.client.write("raw", 0, &junk)).unwrap();
    let st = env.path("staging/raw");
    assert_eq!(
        code(env.stage("raw", &st, fs(""))),
        Code::FailedPrecondition
    );
    assert!(mount_at(&st).is_none());
    let mut back = vec![0u8; junk.len()];
    env.rt
        .block_on(env.client.read("raw", 0, &mut back))
        .unwrap();
    assert_eq!(
        code(env.stage("raw", &st, fs("xfs"))),
        Code::FailedPrecondition,
        "xfs over data"
    );
    assert!(mount_at(&st).is_none());
    env.rt
        .block_on(env.client.read("raw", 0, &mut back))
        .unwrap();
    assert_eq!(back, junk, "the data was touched");
    env.unstage("raw", &st).unwrap();
    assert!(env.table.load().unwrap().is_empty());
}

#[test]
fn block_mode_stage_publish_unpublish_unstage() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.create("blk", 32 << 20);
    let first = pattern(1, 1 << 20);
    env.rt
        .block_on(env.client.write("blk", 1 << 20, &first))
        .unwrap();
    let st = env.path("staging/blk");
    let rw = env.path("pods/c/dev/blk");
    let ro = env.path("pods/d/dev/blk");
    let mode = Mode::MultiNodeMultiWriter;

    env.stage("blk", &st, block(mode)).unwrap();
    env.stage("blk", &st, block(mode)).unwrap();
    let rec = env.mapped("blk").expect("mapped");
    assert!(mount_at(&st).is_none(), "block staging mounts nothing");
    assert_eq!(code(env.stage("blk", &st, fs("ext4"))), Code::AlreadyExists);

    env.publish("blk", &st, &rw, block(mode), false).unwrap();
    env.publish("blk", &st, &rw, block(mode), false).unwrap();
    assert!(
        std::fs::metadata(&rw)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    let mut f = OpenOptions::new().read(true).write(true).open(&rw).unwrap();
    let mut back = vec![0u8; first.len()];
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.read_exact(&mut back).unwrap();
    assert!(back == first, "published device does not show the volume");
    let second = pattern(2, 1 << 20);
    f.seek(SeekFrom::Start(4 << 20)).unwrap();
    f.write_all(&second).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut via = vec![0u8; second.len()];
    env.rt
        .block_on(env.client.read("blk", 4 << 20, &mut via))
        .unwrap();
    assert!(
        via == second,
        "write through the published device is not in the volume"
    );

    env.publish("blk", &st, &ro, block(mode), true).unwrap();
    // Read-only: a write through the published node fails (at open or at write).
    let wrote = OpenOptions::new()
        .write(true)
        .open(&ro)
        .and_then(|mut w| w.write_all(&first).and_then(|()| w.sync_all()));
    assert!(
        wrote.is_err(),
        "a write through the read-only publication succeeded"
    );
    let mut r = std::fs::File::open(&ro).unwrap();
    r.seek(SeekFrom::Start(4 << 20)).unwrap();
    r.read_exact(&mut via).unwrap();
    assert!(via == second);
    drop(r);

    let s = env.stats("blk", &rw).unwrap();
    condition_ok(&s);
    assert_eq!(usage(&s, Unit::Bytes).total, 32 << 20);

    assert_eq!(code(env.unstage("blk", &st)), Code::FailedPrecondition);
    assert!(env.mapped("blk").is_some());
    for t in [&rw, &ro] {
        env.unpublish("blk", t).unwrap();
        assert!(!t.exists());
        env.unpublish("blk", t).unwrap();
    }
    env.unstage("blk", &st).unwrap();
    env.unstage("blk", &st).unwrap();
    assert!(env.mapped("blk").is_none());
    assert!(!rec.block_device().exists(), "device still present");
    assert!(!st.join(csi_node::BLOCK_DEVICE_FILE).exists());
}

/// The record publish keeps of a volume's publications (beside the device table).
fn record_file(env: &Env, volume: &str) -> PathBuf {
    env.path(&format!("devices.json.published/{volume}.json"))
}

#[test]
fn publication_table_per_access_mode() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.create("pv", 32 << 20);
    let st = env.path("staging/pv");
    let t1 = env.path("pods/1/volumes/pv");
    let t2 = env.path("pods/2/volumes/pv");
    let t3 = env.path("pods/3/volumes/pv");
    let snsw = fs_mode("ext4", Mode::SingleNodeSingleWriter);
    let snmw = fs_mode("ext4", Mode::SingleNodeMultiWriter);
    env.stage("pv", &st, snsw.clone()).unwrap();

    // SINGLE_NODE_SINGLE_WRITER (csi-sanity): the same target again is OK, another target
    // FAILED_PRECONDITION, whatever mode the second request names.
    env.publish("pv", &st, &t1, snsw.clone(), false).unwrap();
    env.publish("pv", &st, &t1, snsw.clone(), false).unwrap();
    assert_eq!(mounts().iter().filter(|m| m.mount_point == t1).count(), 1);
    assert!(record_file(&env, "pv").exists(), "no publication record");
    for (what, c) in [
        ("SINGLE_NODE_SINGLE_WRITER", snsw.clone()),
        ("SINGLE_NODE_WRITER", fs("ext4")),
        ("SINGLE_NODE_MULTI_WRITER", snmw.clone()),
    ] {
        assert_eq!(
            code(env.publish("pv", &st, &t2, c, false)),
            Code::FailedPrecondition,
            "second target with {what}"
        );
        assert!(mount_at(&t2).is_none(), "{what}: t2 mounted anyway");
    }
    // The same target with an incompatible capability: ALREADY_EXISTS.
    assert_eq!(
        code(env.publish("pv", &st, &t1, snmw.clone(), false)),
        Code::AlreadyExists,
        "same target, other access mode"
    );
    let other_flags = cap(
        AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec!["noatime".into(), "nodiratime".into()],
            ..Default::default()
        }),
        Mode::SingleNodeSingleWriter,
    );
    assert_eq!(
        code(env.publish("pv", &st, &t1, other_flags, false)),
        Code::AlreadyExists,
        "same target, other mount flags"
    );
    assert_eq!(
        code(env.publish("pv", &st, &t1, snsw.clone(), true)),
        Code::AlreadyExists,
        "same target, read-only"
    );
    // A lost record (crash between the bind and the write): the same request is still OK
    // and writes it again, so the exclusivity holds on.
    std::fs::remove_file(record_file(&env, "pv")).unwrap();
    env.publish("pv", &st, &t1, snsw.clone(), false).unwrap();
    assert!(record_file(&env, "pv").exists(), "record not rewritten");
    assert_eq!(
        code(env.publish("pv", &st, &t2, snmw.clone(), false)),
        Code::FailedPrecondition
    );

    // Once t1 is gone, t2 may have it.
    env.unpublish("pv", &t1).unwrap();
    assert!(
        !record_file(&env, "pv").exists(),
        "record outlived the publication"
    );
    env.publish("pv", &st, &t2, snsw.clone(), false).unwrap();
    env.unpublish("pv", &t2).unwrap();

    // SINGLE_NODE_WRITER and SINGLE_NODE_READER_ONLY are "published once" modes too (the
    // spec's table: non-MULTI_NODE, second target -> FAILED_PRECONDITION).
    env.publish("pv", &st, &t1, fs("ext4"), false).unwrap();
    assert_eq!(
        code(env.publish("pv", &st, &t2, fs("ext4"), false)),
        Code::FailedPrecondition
    );
    env.unpublish("pv", &t1).unwrap();
    let snro = fs_mode("ext4", Mode::SingleNodeReaderOnly);
    env.publish("pv", &st, &t1, snro.clone(), true).unwrap();
    assert!(mount_at(&t1).unwrap().read_only());
    assert_eq!(
        code(env.publish("pv", &st, &t2, snro, true)),
        Code::FailedPrecondition
    );
    env.unpublish("pv", &t1).unwrap();

    // SINGLE_NODE_MULTI_WRITER: several targets, but not next to a single-publication mode.
    env.publish("pv", &st, &t1, snmw.clone(), false).unwrap();
    env.publish("pv", &st, &t2, snmw.clone(), false).unwrap();
    std::fs::write(t1.join("shared"), b"both see it").unwrap();
    assert_eq!(std::fs::read(t2.join("shared")).unwrap(), b"both see it");
    assert_eq!(
        code(env.publish("pv", &st, &t3, snsw.clone(), false)),
        Code::FailedPrecondition
    );
    assert!(mount_at(&t3).is_none());
    for t in [&t1, &t2] {
        env.unpublish("pv", t).unwrap();
    }
    env.unstage("pv", &st).unwrap();

    // Block mode follows the same table.
    env.create("pb", 16 << 20);
    let bst = env.path("staging/pb");
    let (b1, b2) = (env.path("pods/4/dev/pb"), env.path("pods/5/dev/pb"));
    env.stage("pb", &bst, block(Mode::SingleNodeSingleWriter))
        .unwrap();
    env.publish("pb", &bst, &b1, block(Mode::SingleNodeSingleWriter), false)
        .unwrap();
    env.publish("pb", &bst, &b1, block(Mode::SingleNodeSingleWriter), false)
        .unwrap();
    assert_eq!(
        code(env.publish("pb", &bst, &b2, block(Mode::SingleNodeSingleWriter), false)),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(env.publish("pb", &bst, &b1, block(Mode::MultiNodeMultiWriter), false)),
        Code::AlreadyExists
    );
    assert!(mount_at(&b2).is_none());
    env.unpublish("pb", &b1).unwrap();
    env.unstage("pb", &bst).unwrap();
    assert!(env.table.load().unwrap().is_empty());
}

#[test]
fn volume_mount_group_owns_the_filesystem_root() {
    if skip() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    env.create("grp", 32 << 20);
    let st = env.path("staging/grp");
    let t = env.path("pods/g/volumes/grp");
    let with = |g: &str| fs_group("ext4", Mode::SingleNodeWriter, g);

    env.stage("grp", &st, with("4321")).unwrap();
    let root = std::fs::metadata(&st).unwrap();
    assert_eq!(root.gid(), 4321, "staged root group");
    assert_eq!(root.mode() & 0o2070, 0o2070, "mode {:o}", root.mode());
    env.stage("grp", &st, with("4321")).unwrap();

    env.publish("grp", &st, &t, with("4321"), false).unwrap();
    let meta = std::fs::metadata(&t).unwrap();
    assert_eq!(meta.gid(), 4321, "published root group");
    // setgid: what a workload creates belongs to the group.
    std::fs::create_dir(t.join("d")).unwrap();
    std::fs::write(t.join("d/f"), b"x").unwrap();
    assert_eq!(std::fs::metadata(t.join("d")).unwrap().gid(), 4321);
    assert_eq!(std::fs::metadata(t.join("d/f")).unwrap().gid(), 4321);

    // Survives unstage and a later stage without a group (it is in the filesystem).
    env.unpublish("grp", &t).unwrap();
    env.unstage("grp", &st).unwrap();
    env.stage("grp", &st, fs("ext4")).unwrap();
    assert_eq!(std::fs::metadata(&st).unwrap().gid(), 4321);
    env.unstage("grp", &st).unwrap();

    // xfs too, on a freshly made filesystem.
    env.create("grpx", 320 << 20);
    let stx = env.path("staging/grpx");
    env.stage("grpx", &stx, fs_group("xfs", Mode::SingleNodeWriter, "77"))
        .unwrap();
    assert_eq!(mount_at(&stx).unwrap().fstype, "xfs");
    let root = std::fs::metadata(&stx).unwrap();
    assert_eq!((root.gid(), root.mode() & 0o2070), (77, 0o2070));
    env.unstage("grpx", &stx).unwrap();
    assert!(env.table.load().unwrap().is_empty());
}

fn blkid_type(dev: &Path) -> String {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn mount_mode_xfs_stage_publish_stats_expand_and_a_clone_beside_it() {
    if skip() {
        return;
    }
    let env = Env::new();
    // mkfs.xfs refuses filesystems under 300 MB.
    env.create("xv", 384 << 20);
    let st = env.path("staging/xv");
    let t = env.path("pods/x/volumes/xv");

    env.stage("xv", &st, fs("xfs")).unwrap();
    let dev = env.mapped("xv").expect("mapped").block_device();
    assert_eq!(blkid_type(&dev), "xfs");
    let m = mount_at(&st).expect("staging mounted");
    assert_eq!((m.fstype.as_str(), Path::new(&m.source)), ("xfs", &*dev));
    assert!(m.options.split(',').any(|o| o == "noatime"), "{m:?}");
    env.stage("xv", &st, fs("xfs")).unwrap();
    env.stage("xv", &st, fs("")).unwrap();
    assert_eq!(mounts().iter().filter(|m| m.mount_point == st).count(), 1);
    assert_eq!(code(env.stage("xv", &st, fs("ext4"))), Code::AlreadyExists);

    env.publish("xv", &st, &t, fs("xfs"), false).unwrap();
    let data = pattern(9, 5 << 20);
    std::fs::write(t.join("data.bin"), &data).unwrap();
    std::fs::File::open(t.join("data.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    let s = env.stats("xv", &t).unwrap();
    condition_ok(&s);
    let bytes = usage(&s, Unit::Bytes);
    assert!(
        bytes.total > 300 << 20 && bytes.total <= 384 << 20,
        "{bytes:?}"
    );
    assert!(bytes.used >= 5 << 20, "{bytes:?}");
    assert!(usage(&s, Unit::Inodes).used >= 2);

    // A snapshot's clone has the origin's xfs UUID; nouuid lets both be staged here.
    env.rt
        .block_on(env.client.snapshot("xv", "xv-snap"))
        .unwrap();
    env.rt
        .block_on(env.client.clone_volume("xv-snap", "xv-clone", None))
        .unwrap();
    let cst = env.path("staging/xv-clone");
    env.stage("xv-clone", &cst, fs("xfs")).unwrap();
    assert_eq!(std::fs::read(cst.join("data.bin")).unwrap(), data);
    std::fs::write(cst.join("clone-only"), b"c").unwrap();
    assert!(!t.join("clone-only").exists(), "clone write leaked");
    env.unstage("xv-clone", &cst).unwrap();

    // Expansion: xfs_growfs where the kernel can grow the device online.
    env.rt.block_on(env.client.resize("xv", 512 << 20)).unwrap();
    let online = ublk::feature_names(ublk::features().unwrap()).contains(&"UPDATE_SIZE");
    match env.expand("xv", &t, 512 << 20) {
        Ok(c) => {
            assert!(online, "expanded without UPDATE_SIZE");
            assert_eq!(c, 512 << 20);
            let total = usage(&env.stats("xv", &t).unwrap(), Unit::Bytes).total;
            assert!(total > 420 << 20, "xfs did not grow: {total}");
        }
        Err(e) => {
            assert!(!online, "kernel has UPDATE_SIZE but expand failed: {e:?}");
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        }
    }
    env.unpublish("xv", &t).unwrap();
    env.unstage("xv", &st).unwrap();
    // Staged again: mounted as is, never reformatted.
    env.stage("xv", &st, fs("xfs")).unwrap();
    assert_eq!(std::fs::read(st.join("data.bin")).unwrap(), data);
    env.unstage("xv", &st).unwrap();
    assert!(env.table.load().unwrap().is_empty());
}

/// KubeVirt live migration of a VM disk: a MULTI_NODE_MULTI_WRITER block volume staged and
/// published on two nodes over one backend. The target reads what the source wrote (nothing
/// stale), the target's first write takes the volume's lock over, the source then reads the
/// target's data, and the source's unstage leaves the target's lock and data alone. Devices are
/// opened O_DIRECT, like QEMU's cache=none.
#[test]
fn live_migration_handover_of_a_multi_node_block_volume() {
    use std::os::unix::fs::OpenOptionsExt;
    if skip() {
        return;
    }
    let a = Env::node("node-a", None);
    let b = Env::node("node-b", Some(&a.dir.path().join("data")));
    a.create("vm", 32 << 20);
    let mode = Mode::MultiNodeMultiWriter;
    let (st_a, st_b) = (a.path("staging/vm"), b.path("staging/vm"));
    let (pod_a, pod_b) = (a.path("pods/src/dev/vm"), b.path("pods/dst/dev/vm"));
    for (env, st, pod) in [(&a, &st_a, &pod_a), (&b, &st_b, &pod_b)] {
        env.stage("vm", st, block(mode)).unwrap();
        env.publish("vm", st, pod, block(mode), false).unwrap();
        assert!(
            env.mapped("vm").expect("mapped").shared,
            "multi-node maps shared"
        );
    }
    let holder = || a.rt.block_on(a.client.lock_info("vm")).unwrap().holder;
    assert_eq!(holder(), None, "attached on both nodes, written by neither");

    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(p)
            .unwrap()
    };
    // 4 KiB-aligned buffers for O_DIRECT: an aligned window of a larger Vec.
    let io = |f: &mut std::fs::File, at: u64, data: Option<&[u8]>, len: usize| -> Vec<u8> {
        let mut v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        let buf = &mut v[off..off + len];
        f.seek(SeekFrom::Start(at)).unwrap();
        match data {
            Some(d) => {
                buf.copy_from_slice(d);
                f.write_all(buf).unwrap();
                f.sync_all().unwrap();
            }
            None => f.read_exact(buf).unwrap(),
        }
        buf.to_vec()
    };
    let (mut src, mut dst) = (open(&pod_a), open(&pod_b));
    // The target looks at the disk before the source writes there (QEMU probes it).
    assert!(io(&mut dst, 2 << 20, None, 1 << 20).iter().all(|&x| x == 0));
    let before = pattern(7, 2 << 20);
    io(&mut src, 2 << 20, Some(&before), before.len());
    assert_eq!(holder().as_deref(), Some("node-a"));
    assert!(
        io(&mut dst, 2 << 20, None, before.len()) == before,
        "the target reads stale data"
    );

    // Switch-over: the target VM runs and writes.
    let after = pattern(9, 64 << 10);
    io(&mut dst, 3 << 20, Some(&after), after.len());
    assert_eq!(
        holder().as_deref(),
        Some("node-b"),
        "the lock moved to the writer"
    );
    assert!(io(&mut src, 3 << 20, None, after.len()) == after);

    // The source pod goes away: unpublish and unstage there keep the target's lock and data.
    drop(src);
    a.unpublish("vm", &pod_a).unwrap();
    a.unstage("vm", &st_a).unwrap();
    assert!(a.mapped("vm").is_none());
    assert_eq!(holder().as_deref(), Some("node-b"));
    let mut want = before.clone();
    want[1 << 20..(1 << 20) + after.len()].copy_from_slice(&after);
    assert!(io(&mut dst, 2 << 20, None, want.len()) == want);
    let more = pattern(11, 1 << 20);
    io(&mut dst, 20 << 20, Some(&more), more.len());
    drop(dst);
    b.unpublish("vm", &pod_b).unwrap();
    b.unstage("vm", &st_b).unwrap();
    assert_eq!(holder(), None, "the last node's unstage releases the lock");
    let mut back = vec![0u8; more.len()];
    a.rt.block_on(a.client.read("vm", 20 << 20, &mut back))
        .unwrap();
    assert!(back == more);
}
