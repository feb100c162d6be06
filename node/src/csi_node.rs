//! The CSI Node service: volumes staged as ublk devices, published by bind mounts.
//!
//! - **Stage** maps the volume (`ids::backend_name(volume_id)`) to a `/dev/ublkbN` device (an
//!   existing mapping is reused; one whose server died is recovered first). Mount mode then
//!   looks for a filesystem with `blkid`: none and an all-zero head → `mkfs.ext4`/`mkfs.xfs`
//!   (ext4 when `fs_type` is empty); the requested filesystem → mounted as is; anything else
//!   (another filesystem, a partition table, unrecognised data) → FAILED_PRECONDITION, never a
//!   format. It is mounted at the staging path with the requested flags (xfs also with
//!   `nouuid`, so that a clone can be mounted next to its origin). A `volume_mount_group` (a
//!   numeric gid; anything else is INVALID_ARGUMENT) becomes the group of the filesystem root,
//!   which is made group-writable and setgid so new entries inherit the group. Block mode
//!   records the device path in `<staging>/archip-device` and mounts nothing.
//! - **Publish** bind-mounts the staging mount onto the target directory (mount mode), or the
//!   device node onto the target file (block mode), then remounts it read-only when asked. A
//!   read-only block publication binds a read-only loop device over the ublk device instead,
//!   because a read-only mount does not stop writes through a device node. The spec's
//!   publication table: the same target with the same capability is OK, with another
//!   capability ALREADY_EXISTS; a second target on this node is OK only when both publications
//!   allow it (the MULTI_NODE modes and SINGLE_NODE_MULTI_WRITER), else FAILED_PRECONDITION.
//!   Each publication's capability is recorded beside the device table
//!   (`<table>.published/<volume>.json`), because a mount does not show it.
//! - **Unpublish / Unstage** undo that; both are idempotent (a missing target or an unmapped
//!   volume is success). Unstage refuses to unmap a device that is still published.
//! - **Stats**: statvfs bytes and inodes for a mount, the device size for a block target, and
//!   the volume condition: abnormal when the device server is dead, the device is not live, or
//!   the path is not (any longer) the volume's mount or device.
//! - **Expand** grows the device (`ublk::resize`, which needs Linux 6.16+'s UPDATE_SIZE; older
//!   kernels get FAILED_PRECONDITION) and then the filesystem (`resize2fs`, `xfs_growfs`).
//!
//! VOLUME_MOUNT_GROUP is not advertised: ext4 and xfs take no group mount option, so the
//! spec's "pass it to the mount system call" cannot be met, and a CO that saw the capability
//! would stop applying fsGroup to existing files itself. A group sent anyway is honoured as
//! above.
//!
//! The work blocks (mkfs, mount, the device server start-up), so every RPC runs it on tokio's
//! blocking pool; one operation per volume id at a time, a second gets ABORTED.

use std::collections::HashMap;
use std::ffi::CString;
use std::future::Future;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use csi::errors::{CsiError, CsiResult};
use csi::inflight::InFlight;
use csi::pb::node_server::{Node, NodeServer};
use csi::pb::node_service_capability::{self, rpc};
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_usage::Unit;
use csi::pb::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology, VolumeCondition, VolumeUsage,
};
use csi::validate::{self, Access, AccessKind};
use peers::client::{ClientError, VolumeClient};
use serde::{Deserialize, Serialize};
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use xseg::Segment;

use crate::devices::{DeviceRecord, DeviceTable};
use crate::ublk::{self, DeviceState, Launcher, MapRequest, UblkConfig, UblkError};

/// The filesystem made when the capability names none.
pub const DEFAULT_FS_TYPE: &str = "ext4";
/// In a block-mode staging directory: the device path the volume is staged as.
pub const BLOCK_DEVICE_FILE: &str = "archip-device";
/// How many bytes at the head of a device must be zero before it counts as blank.
const BLANK_CHECK_BYTES: usize = 1 << 20;

/// How the node service maps and reports volumes.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// This node's identity (`NodeGetInfo.node_id` and its topology segment).
    pub node_id: String,
    /// The xseg segment (name under /dev/shm, or path) the device servers attach to.
    pub segment: String,
    /// Which device serves which volume.
    pub table: DeviceTable,
    /// How device server processes are started.
    pub launcher: Launcher,
    /// Shape of the devices created.
    pub ublk: UblkConfig,
    /// `NodeGetInfo.max_volumes_per_node` (0: no limit).
    pub max_volumes_per_node: i64,
}

/// The CSI Node service.
#[derive(Clone)]
pub struct NodeService {
    opts: Arc<NodeOptions>,
    client: Option<Arc<VolumeClient>>,
    inflight: Arc<InFlight>,
}

impl NodeService {
    /// A node service; `client` (a connection to the peer set) lets stage report a missing
    /// volume as NOT_FOUND and expand learn the volume's size.
    pub fn new(opts: NodeOptions, client: Option<Arc<VolumeClient>>) -> Self {
        NodeService {
            opts: Arc::new(opts),
            client,
            inflight: InFlight::new(),
        }
    }

    /// The tonic server of this service.
    pub fn into_server(self) -> NodeServer<Self> {
        NodeServer::new(self)
    }

    /// Identity + Node, ready for [`csi::server::serve`].
    pub fn routes<H: csi::identity::Health>(self, health: H) -> Routes {
        Routes::new(csi::identity::IdentityService::new(health).into_server())
            .add_service(self.into_server())
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&NodeOptions) -> CsiResult<T> + Send + 'static,
    {
        let opts = self.opts.clone();
        tokio::task::spawn_blocking(move || f(&opts))
            .await
            .map_err(|e| Status::internal(format!("node task failed: {e}")))?
            .map_err(Status::from)
    }

    async fn volume_size(&self, name: &str) -> CsiResult<Option<u64>> {
        let Some(c) = &self.client else {
            return Ok(None);
        };
        match c.info(name).await {
            Ok(i) => Ok(Some(i.size)),
            Err(ClientError::NotFound(_)) => Err(CsiError::NotFound(format!(
                "volume {name:?} does not exist"
            ))),
            Err(e) => Err(CsiError::Unavailable(format!(
                "asking the peer set about {name:?}: {e}"
            ))),
        }
    }
}

/// Serves Identity + Node on `endpoint` over the peers serving `segment` until `shutdown`.
pub async fn run_node<F>(
    segment: &Arc<Segment>,
    endpoint: &str,
    opts: NodeOptions,
    shutdown: F,
) -> Result<(), csi::RunError>
where
    F: Future<Output = ()> + Send,
{
    let client = Arc::new(VolumeClient::connect(segment)?);
    tracing::info!(%endpoint, node = %opts.node_id, table = %opts.table.path().display(), "CSI node starting");
    let routes = NodeService::new(opts, Some(client))
        .routes(csi::health::PeerSetHealth::new(segment.clone()));
    csi::server::serve(endpoint, routes, shutdown).await?;
    Ok(())
}

fn volume_name(id: &str) -> CsiResult<String> {
    validate::check_id("volume_id", id)?;
    csi::ids::backend_name(id)
        .map(str::to_owned)
        .ok_or_else(|| CsiError::NotFound(format!("volume {id:?} is not an Archipelago volume id")))
}

fn check_access(field: &str, cap: Option<&csi::pb::VolumeCapability>) -> CsiResult<Access> {
    let access = validate::check_capability(field, cap)?;
    if let Some(why) = access.unsupported_reason() {
        return Err(CsiError::FailedPrecondition(why));
    }
    Ok(access)
}

fn ublk_err(e: UblkError) -> CsiError {
    match e {
        UblkError::NoDriver | UblkError::Unsupported(_) => {
            CsiError::FailedPrecondition(e.to_string())
        }
        UblkError::Volume(ClientError::NotFound(m)) => CsiError::NotFound(m),
        UblkError::Invalid(m) => CsiError::InvalidArgument(m),
        e => CsiError::Internal(e.to_string()),
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CsiError {
    move |e| CsiError::Internal(format!("{what}: {e}"))
}

// ---- mounts -------------------------------------------------------------------------------

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem's device.
    pub dev: String,
    /// The root of the mount within its filesystem (`/ublkb0` for a bound device node).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro` first).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl MountInfo {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            if sep < 6 || f.len() < sep + 3 {
                return None;
            }
            Some(MountInfo {
                dev: f[2].to_owned(),
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_owned(),
                fstype: f[sep + 1].to_owned(),
                source: unescape(f[sep + 2]),
            })
        })
        .collect()
}

fn mounts() -> CsiResult<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if any.
fn mount_at(path: &Path) -> CsiResult<Option<MountInfo>> {
    Ok(top_mount(&mounts()?, path).cloned())
}

/// The topmost mount at `path` in `all`.
fn top_mount<'a>(all: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let canon = canonical(path);
    all.iter()
        .rev()
        .find(|m| m.mount_point == canon || m.mount_point == path)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Whether mount `m` shows device `rec` (a filesystem on it, or its node bound onto a file).
fn mount_uses(m: &MountInfo, rec: &DeviceRecord) -> bool {
    let dev = rec.block_device();
    m.source == dev.to_string_lossy()
        || m.root == format!("/ublkb{}", rec.dev_id)
        || bound_loop(m)
            .is_some_and(|l| loop_backing(&l).as_deref() == Some(&*dev.to_string_lossy()))
}

/// The loop device (`loopN`) whose node `m` binds, if any: read-only block publications.
fn bound_loop(m: &MountInfo) -> Option<String> {
    let name = m.root.strip_prefix('/')?;
    (name.starts_with("loop") && name[4..].bytes().all(|b| b.is_ascii_digit()) && name.len() > 4)
        .then(|| name.to_owned())
}

fn loop_backing(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim().to_owned())
}

fn cstr(p: &Path) -> CsiResult<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| CsiError::InvalidArgument(format!("{} contains a NUL byte", p.display())))
}

fn bind(src: &Path, dst: &Path, read_only: bool) -> CsiResult<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: valid NUL-terminated strings; null fstype and data are allowed for MS_BIND.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(CsiError::Internal(format!(
            "bind mount {} on {}: {}",
            src.display(),
            dst.display(),
            std::io::Error::last_os_error()
        )));
    }
    if read_only {
        // SAFETY: as above; a remount of the bind just made.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = umount(dst);
            return Err(CsiError::Internal(format!(
                "read-only remount of {}: {e}",
                dst.display()
            )));
        }
    }
    Ok(())
}

fn umount(path: &Path) -> CsiResult<()> {
    let p = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(p.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(CsiError::Internal(format!(
                "umount {}: {e}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `path`.
fn umount_all(path: &Path) -> CsiResult<()> {
    for _ in 0..16 {
        if mount_at(path)?.is_none() {
            return Ok(());
        }
        umount(path)?;
    }
    Err(CsiError::Internal(format!(
        "{} is still mounted after 16 unmounts",
        path.display()
    )))
}

// ---- tools --------------------------------------------------------------------------------

fn run(program: &str, args: &[&str]) -> CsiResult<std::process::Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(io_err(format!("running {program}")))?;
    Ok(out)
}

fn run_ok(program: &str, args: &[&str]) -> CsiResult<()> {
    let out = run(program, args)?;
    if !out.status.success() {
        return Err(CsiError::Internal(format!(
            "{program} {}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What is on a device, as far as it matters for formatting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Zeros at the head and no signature.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// A partition table, another signature, or unrecognised non-zero data.
    Other(String),
}

fn probe(dev: &Path) -> CsiResult<Content> {
    let d = dev.to_string_lossy();
    let out = run("blkid", &["-p", "-o", "export", &d])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_owned))
    };
    match out.status.code() {
        Some(0) => {}
        Some(2) => {
            // Nothing identified: blank only if the head is all zeros.
            let mut f = std::fs::File::open(dev).map_err(io_err(format!("opening {d}")))?;
            let mut buf = vec![0u8; BLANK_CHECK_BYTES];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(CsiError::Internal(format!("reading {d}: {e}"))),
                }
            }
            return Ok(if buf[..n].iter().all(|&b| b == 0) {
                Content::Blank
            } else {
                Content::Other("unrecognised data".into())
            });
        }
        _ => {
            return Err(CsiError::Internal(format!(
                "blkid -p {d}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    if let Some(t) = tag("TYPE=") {
        if tag("USAGE=").is_none_or(|u| u == "filesystem") {
            return Ok(Content::Filesystem(t));
        }
        return Ok(Content::Other(format!("a {t} signature")));
    }
    if let Some(pt) = tag("PTTYPE=") {
        return Ok(Content::Other(format!("a {pt} partition table")));
    }
    Ok(Content::Other("an unknown signature".into()))
}

fn mkfs(fs: &str, dev: &Path) -> CsiResult<()> {
    let d = dev.to_string_lossy();
    match fs {
        "ext4" => run_ok("mkfs.ext4", &["-q", "-F", &d]),
        "xfs" => run_ok("mkfs.xfs", &["-q", &d]),
        other => Err(CsiError::FailedPrecondition(format!(
            "cannot make a {other} filesystem"
        ))),
    }
}

fn mount_fs(dev: &Path, target: &Path, fs: &str, flags: &[String]) -> CsiResult<()> {
    let d = dev.to_string_lossy();
    let t = target.to_string_lossy();
    let mut flags = flags.to_vec();
    // A clone (or a snapshot's copy) of an xfs volume carries its origin's UUID, and xfs
    // refuses a second mount of one UUID: without nouuid the two could not be staged together.
    if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
        flags.push("nouuid".into());
    }
    let opts = flags.join(",");
    let mut args = vec!["-t", fs];
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([&*d, &*t]);
    run_ok("mount", &args)
}

fn grow_fs(fs: &str, dev: &Path, mount_point: &Path) -> CsiResult<()> {
    match fs {
        "ext4" | "ext3" | "ext2" => run_ok("resize2fs", &[&dev.to_string_lossy()]),
        "xfs" => run_ok("xfs_growfs", &[&mount_point.to_string_lossy()]),
        other => Err(CsiError::FailedPrecondition(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
}

/// The `volume_mount_group` of a mount capability as a gid: `None` when empty or block.
pub fn mount_group(access: &Access) -> CsiResult<Option<u32>> {
    let AccessKind::Mount {
        volume_mount_group: g,
        ..
    } = &access.kind
    else {
        return Ok(None);
    };
    if g.is_empty() {
        return Ok(None);
    }
    match g.parse::<u32>() {
        // (gid_t)-1 means "leave the group alone" to chown, so it cannot name a group.
        Ok(gid) if gid != u32::MAX && g.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(gid)),
        _ => Err(CsiError::InvalidArgument(format!(
            "volume_capability.mount.volume_mount_group {g:?} is not a numeric group id"
        ))),
    }
}

/// Gives the filesystem root at `root` to group `gid`, group-writable and setgid (so that
/// new entries inherit the group). Does nothing when it is so already.
fn apply_mount_group(root: &Path, gid: u32) -> CsiResult<()> {
    let meta = std::fs::metadata(root).map_err(io_err(root.display()))?;
    const BITS: u32 = libc::S_ISGID | libc::S_IRWXG;
    if meta.gid() != gid {
        std::os::unix::fs::chown(root, None, Some(gid))
            .map_err(io_err(format!("chgrp {gid} {}", root.display())))?;
    }
    // chown clears setgid on some filesystems, so the mode is looked at afresh.
    let mode = std::fs::metadata(root)
        .map_err(io_err(root.display()))?
        .mode();
    if mode & BITS != BITS {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root,
            std::fs::Permissions::from_mode((mode | BITS) & 0o7777),
        )
        .map_err(io_err(format!("chmod g+rwxs {}", root.display())))?;
    }
    Ok(())
}

// ---- publications ---------------------------------------------------------------------------

/// One publication of a volume on this node, as publish recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Publication {
    target: PathBuf,
    /// `AccessMode.Mode` as its number.
    mode: i32,
    block: bool,
    read_only: bool,
    /// FNV-1a of fs_type, mount flags and mount group: enough to tell two capabilities apart
    /// without writing the flags (which may hold secrets) to disk.
    mount: u64,
}

fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Whether a publication in `mode` may share this node with others (the spec's table:
/// MULTI_NODE modes; SINGLE_NODE_MULTI_WRITER by its definition).
fn allows_many(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter
            | Mode::SingleNodeMultiWriter
    )
}

impl Publication {
    fn new(target: &Path, access: &Access, read_only: bool) -> Publication {
        let mount = match &access.kind {
            AccessKind::Block => 0,
            AccessKind::Mount {
                fs_type,
                mount_flags,
                volume_mount_group,
            } => {
                let fs = if fs_type.is_empty() {
                    DEFAULT_FS_TYPE
                } else {
                    fs_type
                };
                let mut parts = vec![fs, volume_mount_group.as_str()];
                parts.extend(mount_flags.iter().map(String::as_str));
                fnv1a(&parts)
            }
        };
        Publication {
            target: canonical(target),
            mode: access.mode as i32,
            block: access.is_block(),
            read_only,
            mount,
        }
    }

    fn mode(&self) -> Mode {
        Mode::try_from(self.mode).unwrap_or(Mode::Unknown)
    }
}

/// Where the publications of `volume` are recorded.
fn publications_file(table: &DeviceTable, volume: &str) -> CsiResult<PathBuf> {
    if let Some(why) = peers::map::volume_name_problem(volume) {
        return Err(CsiError::InvalidArgument(format!(
            "volume name {volume:?}: {why}"
        )));
    }
    let path = table.path();
    let mut dir = path
        .file_name()
        .map_or_else(|| "devices".into(), |n| n.to_os_string());
    dir.push(".published");
    Ok(path.with_file_name(dir).join(format!("{volume}.json")))
}

fn load_publications(file: &Path) -> CsiResult<Vec<Publication>> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| CsiError::Internal(format!("{} is corrupt: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(file.display())(e)),
    }
}

/// Writes the records atomically (a temporary file renamed over), or removes the file when
/// there are none.
fn save_publications(file: &Path, pubs: &[Publication]) -> CsiResult<()> {
    if pubs.is_empty() {
        return match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(file.display())(e)),
            _ => Ok(()),
        };
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir.display()))?;
    }
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec(pubs)
        .map_err(|e| CsiError::Internal(format!("encoding publications: {e}")))?;
    std::fs::write(&tmp, bytes).map_err(io_err(tmp.display()))?;
    std::fs::rename(&tmp, file).map_err(io_err(file.display()))
}

// ---- devices ------------------------------------------------------------------------------

fn record(table: &DeviceTable, volume: &str) -> CsiResult<Option<DeviceRecord>> {
    Ok(table
        .load()
        .map_err(|e| CsiError::Internal(e.to_string()))?
        .into_iter()
        .find(|r| r.volume == volume))
}

/// The live device of `volume`: the existing mapping (recovered if its server died), or a new one.
/// The ublk device of `volume`, mapping it if needed. `shared` maps it for a multi-node access
/// mode: another node may have it attached too (the live-migration handover), so the volume is
/// opened shared (no lock until this node writes, nothing served from a stale cache).
fn ensure_mapped(o: &NodeOptions, volume: &str, shared: bool) -> CsiResult<DeviceRecord> {
    if let Some(r) = record(&o.table, volume)? {
        if r.shared != shared {
            tracing::warn!(
                volume,
                mapped_shared = r.shared,
                wanted_shared = shared,
                "the volume is already mapped in the other mode; keeping it"
            );
        }
        match ublk::device_state(r.dev_id) {
            DeviceState::Live if r.server_alive() => return Ok(r),
            DeviceState::Gone => {
                let _ = ublk::unmap(&o.table, &r.dev_id.to_string());
            }
            _ => {
                for res in ublk::recover(&o.table, &o.launcher, &o.ublk).map_err(ublk_err)? {
                    res.map_err(ublk_err)?;
                }
                if let Some(r) = record(&o.table, volume)?
                    && r.server_alive()
                {
                    return Ok(r);
                }
            }
        }
    }
    let req = MapRequest {
        volume: volume.to_owned(),
        segment: o.segment.clone(),
        config: UblkConfig {
            shared,
            ..o.ublk.clone()
        },
        table: o.table.clone(),
        dev_id: None,
        log: None,
    };
    match ublk::map(&req, &o.launcher) {
        Ok(r) => Ok(r),
        Err(UblkError::AlreadyMapped { .. }) => record(&o.table, volume)?
            .ok_or_else(|| CsiError::Aborted(format!("{volume} is being mapped; retry"))),
        Err(e) => Err(ublk_err(e)),
    }
}

fn block_size_of(path: &Path) -> CsiResult<u64> {
    let meta = std::fs::metadata(path).map_err(io_err(path.display()))?;
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/size"))
        .map_err(io_err(format!("size of {}", path.display())))?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| CsiError::Internal(format!("size of {}: {e}", path.display())))
}

fn condition(rec: Option<&DeviceRecord>) -> VolumeCondition {
    let abnormal = |message: String| VolumeCondition {
        abnormal: true,
        message,
    };
    let Some(r) = rec else {
        return abnormal("the volume is not mapped on this node".into());
    };
    if !r.server_alive() {
        return abnormal(format!(
            "the server (pid {}) of {} is not running; its I/O waits for `archip recover`",
            r.pid,
            r.block_device().display()
        ));
    }
    match ublk::device_state(r.dev_id) {
        DeviceState::Live => VolumeCondition {
            abnormal: false,
            message: format!("{} is live", r.block_device().display()),
        },
        s => abnormal(format!("{} is {s:?}", r.block_device().display())),
    }
}

// ---- the RPCs -----------------------------------------------------------------------------

fn stage(o: &NodeOptions, name: &str, staging: &Path, access: &Access) -> CsiResult<()> {
    let group = mount_group(access)?;
    let multi_node = matches!(
        access.mode,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    );
    let rec = ensure_mapped(o, name, multi_node)?;
    let dev = rec.block_device();
    std::fs::create_dir_all(staging).map_err(io_err(staging.display()))?;
    match &access.kind {
        AccessKind::Block => {
            if let Some(m) = mount_at(staging)? {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is staged in mount mode ({} mounted there)",
                    staging.display(),
                    m.source
                )));
            }
            let file = staging.join(BLOCK_DEVICE_FILE);
            let want = dev.to_string_lossy().into_owned();
            if std::fs::read_to_string(&file).ok().as_deref() != Some(&want) {
                std::fs::write(&file, &want).map_err(io_err(file.display()))?;
            }
            Ok(())
        }
        AccessKind::Mount {
            fs_type,
            mount_flags,
            ..
        } => {
            if let Some(m) = mount_at(staging)? {
                if m.source != dev.to_string_lossy() {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} has {} mounted, not this volume",
                        staging.display(),
                        m.source
                    )));
                }
                if !fs_type.is_empty() && *fs_type != m.fstype {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is staged with {}, {fs_type} requested",
                        staging.display(),
                        m.fstype
                    )));
                }
                let want_ro = access.is_read_only() || mount_flags.iter().any(|f| f == "ro");
                if m.read_only() != want_ro {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is staged {}",
                        staging.display(),
                        if m.read_only() {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    )));
                }
                if let Some(gid) = group
                    && !m.read_only()
                {
                    apply_mount_group(staging, gid)?;
                }
                return Ok(());
            }
            if staging.join(BLOCK_DEVICE_FILE).exists() {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is staged in block mode",
                    staging.display()
                )));
            }
            let fs = match probe(&dev)? {
                Content::Blank => {
                    let fs = if fs_type.is_empty() {
                        DEFAULT_FS_TYPE
                    } else {
                        fs_type
                    };
                    if access.is_read_only() {
                        return Err(CsiError::FailedPrecondition(format!(
                            "volume {name} has no filesystem and is to be mounted read-only"
                        )));
                    }
                    tracing::info!(volume = %name, device = %dev.display(), %fs, "making a filesystem");
                    mkfs(fs, &dev)?;
                    fs.to_owned()
                }
                Content::Filesystem(t) if fs_type.is_empty() || *fs_type == t => t,
                Content::Filesystem(t) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {name} holds a {t} filesystem, not {fs_type}; it will not be reformatted"
                    )));
                }
                Content::Other(what) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {name} holds {what} and no {} filesystem; it will not be formatted",
                        if fs_type.is_empty() {
                            DEFAULT_FS_TYPE
                        } else {
                            fs_type
                        }
                    )));
                }
            };
            let mut flags = mount_flags.clone();
            if access.is_read_only() && !flags.iter().any(|f| f == "ro") {
                flags.push("ro".into());
            }
            mount_fs(&dev, staging, &fs, &flags)?;
            if let Some(gid) = group
                && !access.is_read_only()
            {
                apply_mount_group(staging, gid).inspect_err(|_| {
                    let _ = umount(staging);
                })?;
            }
            Ok(())
        }
    }
}

fn unstage(o: &NodeOptions, name: &str, staging: &Path) -> CsiResult<()> {
    umount_all(staging)?;
    let file = staging.join(BLOCK_DEVICE_FILE);
    match std::fs::remove_file(&file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(file.display())(e)),
    }
    let Some(rec) = record(&o.table, name)? else {
        return Ok(());
    };
    if let Some(m) = mounts()?.into_iter().find(|m| mount_uses(m, &rec)) {
        return Err(CsiError::FailedPrecondition(format!(
            "{} is still in use at {}; unpublish it first",
            rec.block_device().display(),
            m.mount_point.display()
        )));
    }
    ublk::unmap(&o.table, &rec.dev_id.to_string()).map_err(ublk_err)?;
    Ok(())
}

fn publish(
    o: &NodeOptions,
    name: &str,
    staging: &Path,
    target: &Path,
    access: &Access,
    read_only: bool,
) -> CsiResult<()> {
    let group = mount_group(access)?;
    let not_staged = || {
        CsiError::FailedPrecondition(format!(
            "volume {name} is not staged at {}",
            staging.display()
        ))
    };
    let rec = record(&o.table, name)?.ok_or_else(not_staged)?;
    let dev = rec.block_device();
    let file = publications_file(&o.table, name)?;
    let want = Publication::new(target, access, read_only);
    let all = mounts()?;
    // Records count only while their target still shows the volume.
    let mut recorded: Vec<Publication> = load_publications(&file)?
        .into_iter()
        .filter(|p| top_mount(&all, &p.target).is_some_and(|m| mount_uses(m, &rec)))
        .collect();

    if let Some(m) = top_mount(&all, target) {
        // Already published here: the same capability is success, another ALREADY_EXISTS.
        if !mount_uses(m, &rec) {
            return Err(CsiError::AlreadyExists(format!(
                "{} has something else mounted",
                target.display()
            )));
        }
        if m.read_only() != read_only {
            return Err(CsiError::AlreadyExists(format!(
                "{} is published {}, requested {}",
                target.display(),
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                },
                if read_only { "read-only" } else { "read-write" }
            )));
        }
        match recorded.iter().find(|p| p.target == want.target) {
            Some(p) if *p != want => {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is published with another capability ({:?}{}, now {:?}{})",
                    target.display(),
                    p.mode(),
                    if p.block { ", block" } else { ", mount" },
                    access.mode,
                    if want.block { ", block" } else { ", mount" },
                )));
            }
            Some(_) => return Ok(()),
            None => {
                // Published, but the record was lost (a crash between the two): write it.
                recorded.push(want);
                return save_publications(&file, &recorded);
            }
        }
    }

    // Elsewhere on this node: the spec's table allows a second target only when every
    // publication's mode allows several.
    let staging_c = canonical(staging);
    let mut others: Vec<&Path> = all
        .iter()
        .filter(|m| m.mount_point != staging_c && m.mount_point != want.target)
        .filter(|m| mount_uses(m, &rec))
        .map(|m| m.mount_point.as_path())
        .collect();
    others.dedup();
    if let Some(other) = others.first() {
        if !allows_many(access.mode) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is already published at {} and access mode {:?} allows one \
                 publication",
                other.display(),
                access.mode
            )));
        }
        if let Some(p) = recorded
            .iter()
            .find(|p| !allows_many(p.mode()) && others.contains(&p.target.as_path()))
        {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published at {} with access mode {:?}, which allows no \
                 other publication",
                p.target.display(),
                p.mode()
            )));
        }
    }

    match access.kind {
        AccessKind::Mount { .. } => {
            let staged = top_mount(&all, staging).ok_or_else(not_staged)?;
            if staged.source != dev.to_string_lossy() {
                return Err(not_staged());
            }
            if let Some(gid) = group
                && !staged.read_only()
            {
                apply_mount_group(staging, gid)?;
            }
            std::fs::create_dir_all(target).map_err(io_err(target.display()))?;
            bind(staging, target, read_only)?;
        }
        AccessKind::Block => {
            let file = staging.join(BLOCK_DEVICE_FILE);
            let recorded = std::fs::read_to_string(&file).map_err(|_| not_staged())?;
            if Path::new(recorded.trim()) != dev {
                return Err(not_staged());
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent.display()))?;
            }
            if target.is_dir() {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is a directory; block volumes are published on a file",
                    target.display()
                )));
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map_err(io_err(target.display()))?;
            if !read_only {
                bind(&dev, target, false)?;
            } else {
                // A read-only mount does not stop writes through a device node on it, so a
                // read-only publication binds a read-only loop device over the volume's
                // device.
                let out = run("losetup", &["-r", "-f", "--show", &dev.to_string_lossy()])?;
                let lo = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !out.status.success() || lo.is_empty() {
                    return Err(CsiError::Internal(format!(
                        "losetup -r {}: {}",
                        dev.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                bind(Path::new(&lo), target, true).inspect_err(|_| {
                    let _ = run("losetup", &["-d", &lo]);
                })?;
            }
        }
    }
    // The target exists now, so its canonical form is the one mountinfo shows.
    let want = Publication {
        target: canonical(target),
        ..want
    };
    recorded.retain(|p| p.target != want.target);
    recorded.push(want);
    save_publications(&file, &recorded)
}

fn unpublish(o: &NodeOptions, name: &str, target: &Path) -> CsiResult<()> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(target.display())(e)),
    };
    let canon = canonical(target);
    let lo = mount_at(target)?.as_ref().and_then(bound_loop);
    umount_all(target)?;
    if let Some(lo) = lo {
        let _ = run("losetup", &["-d", &format!("/dev/{lo}")]);
    }
    if let Ok(file) = publications_file(&o.table, name) {
        let mut pubs = load_publications(&file)?;
        let before = pubs.len();
        pubs.retain(|p| p.target != canon);
        if pubs.len() != before {
            save_publications(&file, &pubs)?;
        }
    }
    let removed = if meta.is_dir() {
        std::fs::remove_dir(target)
    } else {
        std::fs::remove_file(target)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", target.display()))(e)),
    }
}

fn stats(o: &NodeOptions, name: &str, path: &Path) -> CsiResult<NodeGetVolumeStatsResponse> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CsiError::NotFound(format!(
                "{} does not exist",
                path.display()
            )));
        }
        Err(e) => return Err(io_err(path.display())(e)),
    };
    let rec = record(&o.table, name)?;
    let mut cond = condition(rec.as_ref());
    let usage = if meta.file_type().is_block_device() {
        if let Some(r) = &rec
            && std::fs::metadata(r.block_device()).is_ok_and(|d| d.rdev() != meta.rdev())
        {
            cond = VolumeCondition {
                abnormal: true,
                message: format!(
                    "{} is not the volume's device {}",
                    path.display(),
                    r.block_device().display()
                ),
            };
        }
        let size = block_size_of(path)? as i64;
        vec![VolumeUsage {
            total: size,
            unit: Unit::Bytes as i32,
            ..Default::default()
        }]
    } else {
        let m = mount_at(path)?;
        if let Some(r) = &rec
            && !m.as_ref().is_some_and(|m| mount_uses(m, r))
        {
            cond = VolumeCondition {
                abnormal: true,
                message: format!("{} is not a mount of the volume", path.display()),
            };
        }
        let p = cstr(path)?;
        // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return Err(io_err(format!("statvfs {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        let f = s.f_frsize as i64;
        vec![
            VolumeUsage {
                available: s.f_bavail as i64 * f,
                total: s.f_blocks as i64 * f,
                used: (s.f_blocks as i64 - s.f_bfree as i64) * f,
                unit: Unit::Bytes as i32,
            },
            VolumeUsage {
                available: s.f_favail as i64,
                total: s.f_files as i64,
                used: s.f_files as i64 - s.f_ffree as i64,
                unit: Unit::Inodes as i32,
            },
        ]
    };
    Ok(NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(cond),
    })
}

fn expand(
    o: &NodeOptions,
    name: &str,
    path: &Path,
    block: Option<bool>,
    size: u64,
) -> CsiResult<i64> {
    let meta = std::fs::metadata(path)
        .map_err(|_| CsiError::NotFound(format!("{} does not exist", path.display())))?;
    let rec = record(&o.table, name)?
        .ok_or_else(|| CsiError::NotFound(format!("volume {name} is not staged on this node")))?;
    let dev = rec.block_device();
    let mut current = block_size_of(&dev)?;
    if current < size {
        current = ublk::resize(&o.table, &rec.dev_id.to_string(), size).map_err(|e| match e {
            UblkError::Unsupported(what) => CsiError::FailedPrecondition(format!(
                "cannot grow {} online: {what} is missing; unstage and stage the volume again \
                 to see its new size",
                dev.display()
            )),
            e => ublk_err(e),
        })?;
    }
    let block = block.unwrap_or_else(|| meta.file_type().is_block_device());
    if !block {
        let m = mount_at(path)?.ok_or_else(|| {
            CsiError::FailedPrecondition(format!("{} is not mounted", path.display()))
        })?;
        grow_fs(&m.fstype, &dev, path)?;
    }
    Ok(current as i64)
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// The capabilities `NodeGetCapabilities` reports.
pub fn capabilities() -> Vec<NodeServiceCapability> {
    [
        rpc::Type::StageUnstageVolume,
        rpc::Type::GetVolumeStats,
        rpc::Type::ExpandVolume,
        rpc::Type::VolumeCondition,
        rpc::Type::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(rpc_cap)
    .collect()
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("staging_target_path", &r.staging_target_path)?;
        let access = check_access("volume_capability", r.volume_capability.as_ref())?;
        mount_group(&access)?;
        validate::check_secrets("secrets", &r.secrets)?;
        validate::check_map("volume_context", &r.volume_context)?;
        let _guard = self.inflight.begin(&[&r.volume_id])?;
        self.volume_size(&name).await?;
        let staging = PathBuf::from(&r.staging_target_path);
        self.blocking(move |o| stage(o, &name, &staging, &access))
            .await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.inflight.begin(&[&r.volume_id])?;
        let staging = PathBuf::from(&r.staging_target_path);
        self.blocking(move |o| unstage(o, &name, &staging)).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("target_path", &r.target_path)?;
        let access = check_access("volume_capability", r.volume_capability.as_ref())?;
        mount_group(&access)?;
        if r.staging_target_path.is_empty() {
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is required: this plugin stages volumes (STAGE_UNSTAGE_VOLUME)"
                    .into(),
            )
            .into());
        }
        validate::check_path("staging_target_path", &r.staging_target_path)?;
        let _guard = self.inflight.begin(&[&r.volume_id])?;
        let read_only = r.readonly || access.is_read_only();
        let staging = PathBuf::from(&r.staging_target_path);
        let target = PathBuf::from(&r.target_path);
        self.blocking(move |o| publish(o, &name, &staging, &target, &access, read_only))
            .await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("target_path", &r.target_path)?;
        let _guard = self.inflight.begin(&[&r.volume_id])?;
        let target = PathBuf::from(&r.target_path);
        self.blocking(move |o| unpublish(o, &name, &target)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("volume_path", &r.volume_path)?;
        let path = PathBuf::from(&r.volume_path);
        let resp = self.blocking(move |o| stats(o, &name, &path)).await?;
        Ok(Response::new(resp))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = volume_name(&r.volume_id)?;
        validate::check_path("volume_path", &r.volume_path)?;
        let block = match &r.volume_capability {
            Some(c) => Some(check_access("volume_capability", Some(c))?.is_block()),
            None => None,
        };
        let (required, limit) = r
            .capacity_range
            .as_ref()
            .map_or((0, 0), |c| (c.required_bytes, c.limit_bytes));
        if required < 0 || limit < 0 || (limit > 0 && required > limit) {
            return Err(CsiError::OutOfRange(format!(
                "capacity_range required {required} / limit {limit} is not satisfiable"
            ))
            .into());
        }
        let _guard = self.inflight.begin(&[&r.volume_id])?;
        let volume_size = self.volume_size(&name).await?;
        let size = match (volume_size, required as u64) {
            (Some(v), 0) => v,
            (Some(v), req) if req > v => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {name} is {v} bytes, less than the {req} requested: \
                     ControllerExpandVolume first"
                ))
                .into());
            }
            (Some(v), _) => v,
            (None, req) => req,
        };
        let path = PathBuf::from(&r.volume_path);
        let capacity = self
            .blocking(move |o| expand(o, &name, &path, block, size))
            .await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: capacity,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: capabilities(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let id = self.opts.node_id.clone();
        Ok(Response::new(NodeGetInfoResponse {
            accessible_topology: Some(Topology {
                segments: HashMap::from([(csi::controller::TOPOLOGY_KEY.to_owned(), id.clone())]),
            }),
            node_id: id,
            max_volumes_per_node: self.opts.max_volumes_per_node,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 0:5 /ublkb3 /var/lib/k/pv rw shared:9 - devtmpfs udev rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert!(!m[0].read_only());
        assert_eq!(m[1].root, "/ublkb3");
        let rec = DeviceRecord {
            dev_id: 3,
            volume: "v".into(),
            segment: "s".into(),
            pid: 1,
            pid_start: 1,
            queues: 1,
            depth: 1,
            logical_block_size: 512,
            user_copy: false,
            size: 0,
            shared: false,
        };
        assert!(mount_uses(&m[1], &rec));
        assert!(!mount_uses(&m[0], &rec));
    }

    fn mount_access(group: &str, mode: Mode) -> Access {
        Access {
            kind: AccessKind::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: group.into(),
            },
            mode,
        }
    }

    #[test]
    fn mount_groups_are_numeric_gids() {
        let g = |s: &str| mount_group(&mount_access(s, Mode::SingleNodeWriter));
        assert_eq!(g("").unwrap(), None);
        assert_eq!(g("0").unwrap(), Some(0));
        assert_eq!(g("2000").unwrap(), Some(2000));
        assert_eq!(g("4294967294").unwrap(), Some(u32::MAX - 1));
        for bad in [
            "staff",
            "-1",
            "+1",
            "1 ",
            "0x10",
            "4294967295",
            "4294967296",
        ] {
            assert!(
                matches!(g(bad), Err(CsiError::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
        let block = Access {
            kind: AccessKind::Block,
            mode: Mode::SingleNodeWriter,
        };
        assert_eq!(mount_group(&block).unwrap(), None);
    }

    #[test]
    fn publications_tell_capabilities_apart() {
        let t = Path::new("/nonexistent/target");
        let a = Publication::new(t, &mount_access("", Mode::SingleNodeWriter), false);
        assert_eq!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("5", Mode::SingleNodeWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeMultiWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeWriter), true)
        );
        // Stable across builds: the records outlive a restart of the plugin.
        assert_eq!(fnv1a(&["ext4", "", "noatime"]), a.mount);
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert!(allows_many(Mode::SingleNodeMultiWriter) && allows_many(Mode::MultiNodeReaderOnly));
        assert!(!allows_many(Mode::SingleNodeWriter) && !allows_many(Mode::SingleNodeSingleWriter));
        assert!(!allows_many(Mode::SingleNodeReaderOnly));
        let table = DeviceTable::new("/run/x/devices.json");
        assert_eq!(
            publications_file(&table, "vol-1").unwrap(),
            Path::new("/run/x/devices.json.published/vol-1.json")
        );
        assert!(publications_file(&table, "../x").is_err());
    }

    #[test]
    fn capabilities_are_the_advertised_five() {
        let caps: Vec<i32> = capabilities()
            .into_iter()
            .map(|c| match c.r#type {
                Some(node_service_capability::Type::Rpc(r)) => r.r#type,
                None => 0,
            })
            .collect();
        assert_eq!(caps, vec![1, 2, 3, 4, 5]);
    }
}
