//! The `archip` binary as a CSI plugin, end to end: the real binary as a child process, a
//! tonic CSI client over its unix socket, real ublk devices, mkfs and mounts.
//!
//! - `archip up --csi-endpoint`: every CSI service on one socket. CreateVolume, stage (ext4)
//!   and publish, a file written through the mount, unpublish/unstage, CreateSnapshot, a
//!   volume from the snapshot staged and published in BLOCK mode whose raw bytes hold every
//!   block of the file, cleanup through the controller, then SIGTERM: the process exits 0,
//!   removes both sockets, and leaves no ublk device behind.
//! - `archip controller` + `archip node`: two processes cannot share one peer set (the second
//!   finds the peer ports bound), so each runs its own peer set on its own segment over one
//!   data directory, under one node id (one machine; the controller locks as
//!   `csi-controller@<node id>`). The controller creates volumes and snapshots, a snapshot of a
//!   staged volume going through the node's peer set; the node stages and publishes them.
//!
//! Needs root and the ublk driver; without `/dev/ublk-control` each test says so and returns.
//! `e2e/vm/ublk-suite.sh` runs this binary inside its VM with `archip` shipped beside it
//! (found through `$ARCHIP_BIN`, the cargo-built binary, or `/usr/local/bin/archip`).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use csi::pb::controller_client::ControllerClient;
use csi::pb::identity_client::IdentityClient;
use csi::pb::node_client::NodeClient;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use csi::pb::volume_content_source::{SnapshotSource, Type as SourceType};
use csi::pb::*;
use node::devices::DeviceTable;
use tonic::transport::Channel;

/// Bound on every wait: a child getting ready, a socket appearing, a process stopping. Under
/// qemu's software emulation a debug build takes its time.
const WAIT: Duration = Duration::from_secs(180);
const MI: i64 = 1 << 20;
/// The test file: this many 1 KiB blocks, each one distinct. 1 KiB is ext4's smallest block
/// size (and the one mkfs.ext4 picks for a 64 MiB volume), so every block of the file starts
/// at a 1 KiB-aligned device offset.
const FILE_BLOCKS: usize = 1024;
const BLOCK: usize = 1024;

fn archip() -> PathBuf {
    if let Some(p) = std::env::var_os("ARCHIP_BIN") {
        return p.into();
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_archip"));
    if built.exists() {
        return built;
    }
    PathBuf::from("/usr/local/bin/archip")
}

fn skip() -> bool {
    if !Path::new("/dev/ublk-control").exists() {
        eprintln!("skipping: no /dev/ublk-control here (e2e/vm/ublk-suite.sh runs this for real)");
        return true;
    }
    false
}

/// Polls `f` until it gives a value or `WAIT` passes.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "archip-csibin-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The ublk block devices present now (`/sys/block/ublkb*`).
fn ublk_devices() -> BTreeSet<String> {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ublkb"))
                .collect()
        })
        .unwrap_or_default()
}

/// What every `archip` child shares: one data directory, one node id, one device table.
struct Site {
    dir: tempfile::TempDir,
    node: String,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
            node: "csi-bin-node".into(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn table(&self) -> DeviceTable {
        DeviceTable::new(self.path("ublk-devices.json"))
    }

    /// `archip ARGS` with this site's instance flags; stdout piped, stderr to a log file.
    fn spawn(&self, tag: &str, args: &[&str]) -> Proc {
        let log = self.path(&format!("{tag}.log"));
        let segment = PathBuf::from("/dev/shm").join(unique(tag));
        let child = Command::new(archip())
            .args(args)
            .env("ARCHIP_DATA_DIR", self.path("data"))
            .env("ARCHIP_SEGMENT", &segment)
            .env("ARCHIP_NODE", &self.node)
            .env("ARCHIP_CONTROL", self.path(&format!("{tag}-control.sock")))
            .env("ARCHIP_UBLK_STATE", self.table().path())
            .env("ARCHIP_PEERSET_DIR", self.path("peersets"))
            .env("RUST_LOG", "info,libublk=warn")
            .env_remove("CSI_ENDPOINT")
            .env_remove("ARCHIP_CSI_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", archip().display()));
        let mut p = Proc {
            child,
            tag: tag.into(),
            log,
            segment,
            lines: None,
        };
        let out = p.child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        p.lines = Some(rx);
        p
    }
}

/// A running `archip` child; killed on drop if still running.
struct Proc {
    child: Child,
    tag: String,
    log: PathBuf,
    segment: PathBuf,
    lines: Option<mpsc::Receiver<String>>,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a stdout line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let rx = self.lines.as_ref().expect("stdout reader");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: no {prefix:?} line ({e}); log:\n{}",
                    self.tag,
                    self.log()
                ),
            }
        }
    }

    /// Connects to the CSI socket at `sock` once the child serves it.
    fn dial(&mut self, sock: &Path, rt: &tokio::runtime::Runtime) -> Channel {
        poll(&format!("{} to serve {}", self.tag, sock.display()), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before serving; log:\n{}",
                    self.tag,
                    self.log()
                );
            }
            if !sock.exists() {
                return None;
            }
            rt.block_on(csi::dial::connect(sock)).ok()
        })
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped yet (we
        // hold the Child and have not waited on it), so the pid cannot name another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill -TERM {pid}: {}",
            std::io::Error::last_os_error()
        );
        poll(&format!("{} to exit after SIGTERM", self.tag), || {
            self.child.try_wait().expect("try_wait")
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// Unmounts and unmaps whatever a failed test left, so later tests start clean.
struct Cleanup<'a>(&'a Site);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let base = self.0.dir.path().to_owned();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in node::csi_node::parse_mountinfo(&info).into_iter().rev() {
            if m.mount_point.starts_with(&base) {
                let _ = Command::new("umount").arg(&m.mount_point).status();
            }
        }
        for r in self.0.table().load().unwrap_or_default() {
            let _ = node::ublk::unmap(&self.0.table(), &node::devices::Target::Device(r.dev_id));
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn cap(kind: AccessType, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(kind),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn ext4() -> VolumeCapability {
    cap(
        AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        }),
        Mode::SingleNodeWriter,
    )
}

fn block() -> VolumeCapability {
    cap(AccessType::Block(BlockVolume {}), Mode::SingleNodeWriter)
}

/// Block `i` of the test file: a header naming it, then bytes that depend on `i`.
fn file_block(i: usize) -> Vec<u8> {
    let mut b = format!("archip-csi-binary block {i:05} ").into_bytes();
    let mut x = (i as u32).wrapping_mul(2_654_435_761) | 1;
    while b.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        b.push(x as u8);
    }
    b
}

fn test_file() -> Vec<u8> {
    (0..FILE_BLOCKS).flat_map(file_block).collect()
}

/// Which blocks of the test file appear, 1 KiB-aligned, in the first `len` bytes of `dev`.
fn blocks_found(dev: &Path, len: u64) -> BTreeSet<usize> {
    let mut f = std::fs::File::open(dev).unwrap_or_else(|e| panic!("{}: {e}", dev.display()));
    let want: HashMap<Vec<u8>, usize> = (0..FILE_BLOCKS).map(|i| (file_block(i), i)).collect();
    let mut found = BTreeSet::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        f.read_exact(&mut buf[..n]).expect("reading the device");
        for chunk in buf[..n].chunks_exact(BLOCK) {
            if chunk.starts_with(b"archip-csi-binary")
                && let Some(i) = want.get(chunk)
            {
                found.insert(*i);
            }
        }
        done += n as u64;
    }
    found
}

/// The CSI clients of one socket (or of two).
struct Clients {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Clients {
    fn create_volume(
        &mut self,
        rt: &tokio::runtime::Runtime,
        name: &str,
        c: VolumeCapability,
        snapshot: Option<&str>,
    ) -> Volume {
        rt.block_on(self.controller.create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 64 * MI,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![c],
            volume_content_source: snapshot.map(|s| VolumeContentSource {
                r#type: Some(SourceType::Snapshot(SnapshotSource {
                    snapshot_id: s.into(),
                })),
            }),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .expect("a volume")
    }

    fn controller_publish(
        &mut self,
        rt: &tokio::runtime::Runtime,
        id: &str,
        node: &str,
        c: VolumeCapability,
    ) -> HashMap<String, String> {
        rt.block_on(
            self.controller
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: id.into(),
                    node_id: node.into(),
                    volume_capability: Some(c),
                    ..Default::default()
                }),
        )
        .unwrap_or_else(|e| panic!("ControllerPublishVolume {id}: {e:?}"))
        .into_inner()
        .publish_context
    }

    fn controller_unpublish(&mut self, rt: &tokio::runtime::Runtime, id: &str, node: &str) {
        rt.block_on(self.controller.controller_unpublish_volume(
            ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: node.into(),
                ..Default::default()
            },
        ))
        .unwrap_or_else(|e| panic!("ControllerUnpublishVolume {id}: {e:?}"));
    }

    /// Stage + publish, as kubelet does; `context` is ControllerPublish's publish_context.
    #[allow(clippy::too_many_arguments)]
    fn stage_publish(
        &mut self,
        rt: &tokio::runtime::Runtime,
        v: &Volume,
        context: &HashMap<String, String>,
        staging: &Path,
        target: &Path,
        c: VolumeCapability,
    ) {
        rt.block_on(self.node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(c.clone()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("NodeStageVolume {}: {e:?}", v.volume_id));
        rt.block_on(self.node.node_publish_volume(NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: context.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(c),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("NodePublishVolume {}: {e:?}", v.volume_id));
    }

    fn unpublish_unstage(
        &mut self,
        rt: &tokio::runtime::Runtime,
        id: &str,
        staging: &Path,
        target: &Path,
    ) {
        rt.block_on(self.node.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        }))
        .unwrap_or_else(|e| panic!("NodeUnpublishVolume {id}: {e:?}"));
        rt.block_on(self.node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        }))
        .unwrap_or_else(|e| panic!("NodeUnstageVolume {id}: {e:?}"));
    }

    fn snapshot(&mut self, rt: &tokio::runtime::Runtime, source: &str, name: &str) -> Snapshot {
        let s = rt
            .block_on(self.controller.create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            }))
            .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e:?}"))
            .into_inner()
            .snapshot
            .expect("a snapshot");
        assert!(s.ready_to_use, "{s:?}");
        assert_eq!(s.source_volume_id, source);
        s
    }

    fn node_id(&mut self, rt: &tokio::runtime::Runtime) -> String {
        rt.block_on(self.node.node_get_info(NodeGetInfoRequest {}))
            .expect("NodeGetInfo")
            .into_inner()
            .node_id
    }
}

fn mounted(path: &Path) -> Option<node::csi_node::MountInfo> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    node::csi_node::parse_mountinfo(&info)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path)
}

/// Writes the test file through a published mount and makes it durable.
fn write_test_file(target: &Path) -> PathBuf {
    let m = mounted(target).unwrap_or_else(|| panic!("{} is not mounted", target.display()));
    assert_eq!(m.fstype, "ext4", "{m:?}");
    let file = target.join("data.bin");
    let mut f = std::fs::File::create(&file).unwrap();
    f.write_all(&test_file()).unwrap();
    f.sync_all().unwrap();
    file
}

#[test]
fn up_serves_every_csi_service_on_one_socket() {
    if skip() {
        return;
    }
    let site = Site::new();
    let _cleanup = Cleanup(&site);
    let rt = rt();
    let before = ublk_devices();
    let sock = site.path("csi/csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let mut up = site.spawn("up", &["up", "--csi-endpoint", &endpoint]);
    up.wait_line("archip: ready");
    let ch = up.dial(&sock, &rt);
    let mut c = Clients {
        identity: IdentityClient::new(ch.clone()),
        controller: ControllerClient::new(ch.clone()),
        node: NodeClient::new(ch),
    };
    let info = rt
        .block_on(c.identity.get_plugin_info(GetPluginInfoRequest {}))
        .expect("GetPluginInfo")
        .into_inner();
    assert_eq!(info.name, csi::DRIVER_NAME);
    let probe = rt
        .block_on(c.identity.probe(ProbeRequest {}))
        .expect("Probe")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let node_id = c.node_id(&rt);
    assert_eq!(node_id, site.node);

    // A filesystem volume: create, attach, stage, publish, write a file through the mount.
    let vol = c.create_volume(&rt, "pvc-fs", ext4(), None);
    assert_eq!(vol.capacity_bytes, 64 * MI);
    let ctx = c.controller_publish(&rt, &vol.volume_id, &node_id, ext4());
    let (st, tgt) = (site.path("k/staging/fs"), site.path("k/pods/a/volumes/fs"));
    c.stage_publish(&rt, &vol, &ctx, &st, &tgt, ext4());
    let rec = site
        .table()
        .load()
        .unwrap()
        .into_iter()
        .find(|r| csi::ids::backend_name(&vol.volume_id) == Some(r.volume.as_str()))
        .expect("the volume is mapped in the device table");
    let dev_name = format!("ublkb{}", rec.dev_id);
    assert!(ublk_devices().contains(&dev_name), "{dev_name} missing");
    let file = write_test_file(&tgt);
    let stats = rt
        .block_on(c.node.node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: tgt.display().to_string(),
            staging_target_path: String::new(),
        }))
        .expect("NodeGetVolumeStats")
        .into_inner();
    assert!(
        stats
            .usage
            .iter()
            .any(|u| u.used >= (FILE_BLOCKS * BLOCK) as i64),
        "{stats:?}"
    );
    assert!(!stats.volume_condition.expect("condition").abnormal);
    c.unpublish_unstage(&rt, &vol.volume_id, &st, &tgt);
    assert!(!file.exists() && mounted(&st).is_none());
    assert!(
        !ublk_devices().contains(&dev_name),
        "{dev_name} left mapped"
    );
    c.controller_unpublish(&rt, &vol.volume_id, &node_id);

    // A snapshot, a volume from it in block mode: the file's blocks are on the device.
    let snap = c.snapshot(&rt, &vol.volume_id, "snap-fs");
    let clone = c.create_volume(&rt, "pvc-clone", block(), Some(&snap.snapshot_id));
    let src = clone
        .content_source
        .as_ref()
        .and_then(|s| s.r#type.as_ref());
    assert!(
        matches!(src, Some(SourceType::Snapshot(s)) if s.snapshot_id == snap.snapshot_id),
        "{clone:?}"
    );
    let ctx = c.controller_publish(&rt, &clone.volume_id, &node_id, block());
    let (bst, btgt) = (
        site.path("k/staging/clone"),
        site.path("k/pods/b/dev/clone"),
    );
    c.stage_publish(&rt, &clone, &ctx, &bst, &btgt, block());
    let meta = std::fs::metadata(&btgt).unwrap();
    assert!(meta.file_type().is_block_device(), "{meta:?}");
    let found = blocks_found(&btgt, (64 * MI) as u64);
    assert_eq!(
        found.len(),
        FILE_BLOCKS,
        "blocks of the file missing from the clone: {:?}",
        (0..FILE_BLOCKS)
            .filter(|i| !found.contains(i))
            .collect::<Vec<_>>()
    );
    // The clone is writable through its device, independently of the snapshot.
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&btgt).unwrap();
        f.write_all(&[0xA5; BLOCK]).unwrap();
        f.sync_all().unwrap();
    }
    c.unpublish_unstage(&rt, &clone.volume_id, &bst, &btgt);
    c.controller_unpublish(&rt, &clone.volume_id, &node_id);
    assert!(
        site.table().load().unwrap().is_empty(),
        "devices left in the table"
    );

    // The controller cleans up: the clone, the snapshot, the volume.
    rt.block_on(c.controller.delete_volume(DeleteVolumeRequest {
        volume_id: clone.volume_id.clone(),
        ..Default::default()
    }))
    .expect("DeleteVolume clone");
    rt.block_on(c.controller.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    }))
    .expect("DeleteSnapshot");
    rt.block_on(c.controller.delete_volume(DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    }))
    .expect("DeleteVolume");
    drop(c);

    // SIGTERM: a clean exit, both sockets gone, no ublk device left behind.
    let status = up.terminate();
    assert!(
        status.success(),
        "up exited with {status}; log:\n{}",
        up.log()
    );
    assert!(!sock.exists(), "CSI socket {} left behind", sock.display());
    assert!(
        !site.path("up-control.sock").exists(),
        "control socket left behind"
    );
    let left: Vec<String> = ublk_devices().difference(&before).cloned().collect();
    assert!(left.is_empty(), "ublk devices left behind: {left:?}");
}

#[test]
fn controller_and_node_as_two_processes_over_one_data_directory() {
    if skip() {
        return;
    }
    let site = Site::new();
    let _cleanup = Cleanup(&site);
    let rt = rt();
    let before = ublk_devices();
    let csock = site.path("csi/controller.sock");
    let nsock = site.path("csi/node.sock");
    let mut ctl = site.spawn(
        "controller",
        &[
            "controller",
            "--endpoint",
            &format!("unix://{}", csock.display()),
        ],
    );
    let cch = ctl.dial(&csock, &rt);
    let mut node = site.spawn(
        "node",
        &["node", "--endpoint", &format!("unix://{}", nsock.display())],
    );
    let nch = node.dial(&nsock, &rt);
    let mut c = Clients {
        identity: IdentityClient::new(nch.clone()),
        controller: ControllerClient::new(cch),
        node: NodeClient::new(nch),
    };
    let probe = rt
        .block_on(c.identity.probe(ProbeRequest {}))
        .expect("Probe the node")
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let node_id = c.node_id(&rt);
    assert_eq!(node_id, site.node);

    let vol = c.create_volume(&rt, "pvc-two", ext4(), None);
    let ctx = c.controller_publish(&rt, &vol.volume_id, &node_id, ext4());
    let (st, tgt) = (
        site.path("k/staging/two"),
        site.path("k/pods/a/volumes/two"),
    );
    c.stage_publish(&rt, &vol, &ctx, &st, &tgt, ext4());
    write_test_file(&tgt);
    // A snapshot of the volume while it is in use: the node's peer set holds its lock, so the
    // controller's request goes there (found through the peer-set registry).
    let snap = c.snapshot(&rt, &vol.volume_id, "snap-two");
    c.unpublish_unstage(&rt, &vol.volume_id, &st, &tgt);
    c.controller_unpublish(&rt, &vol.volume_id, &node_id);

    // The controller's snapshot and clone are the node's to stage: the file is there.
    let clone = c.create_volume(&rt, "pvc-two-clone", ext4(), Some(&snap.snapshot_id));
    let ctx = c.controller_publish(&rt, &clone.volume_id, &node_id, ext4());
    let (cst, ctgt) = (
        site.path("k/staging/clone"),
        site.path("k/pods/b/volumes/clone"),
    );
    c.stage_publish(&rt, &clone, &ctx, &cst, &ctgt, ext4());
    assert!(
        std::fs::read(ctgt.join("data.bin")).unwrap() == test_file(),
        "the clone's file differs"
    );
    c.unpublish_unstage(&rt, &clone.volume_id, &cst, &ctgt);
    c.controller_unpublish(&rt, &clone.volume_id, &node_id);
    assert!(
        site.table().load().unwrap().is_empty(),
        "devices left in the table"
    );
    drop(c);

    for (p, sock) in [(&mut node, &nsock), (&mut ctl, &csock)] {
        let status = p.terminate();
        assert!(
            status.success(),
            "{} exited with {status}; log:\n{}",
            p.tag,
            p.log()
        );
        assert!(!sock.exists(), "{} left behind", sock.display());
    }
    let left: Vec<String> = ublk_devices().difference(&before).cloned().collect();
    assert!(left.is_empty(), "ublk devices left behind: {left:?}");
}
