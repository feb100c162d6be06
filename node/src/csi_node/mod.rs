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

mod filesystems;
mod mounts;
mod publications;
mod publish;
mod stage;
mod stats;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use csi::errors::{CsiError, CsiResult};
use csi::inflight::InFlight;
use csi::pb::node_server::{Node, NodeServer};
use csi::pb::node_service_capability::{self, rpc};
use csi::pb::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology,
};
use csi::validate::{self, Access};
use peers::client::{ClientError, VolumeClient};
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use xseg::Segment;

use crate::devices::{DeviceRecord, DeviceTable};
use crate::ublk::{Launcher, UblkConfig, UblkError};
use publish::{publish, unpublish};
use stage::{stage, unstage};
use stats::{expand, stats};

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
    /// Checks NodeStage's secrets (cephx credentials for a RADOS backend); none: not checked.
    authorizer: Option<Arc<csi::secrets::Authorizer>>,
}

impl NodeService {
    /// A node service; `client` (a connection to the peer set) lets stage report a missing
    /// volume as NOT_FOUND and expand learn the volume's size.
    pub fn new(opts: NodeOptions, client: Option<Arc<VolumeClient>>) -> Self {
        NodeService {
            opts: Arc::new(opts),
            client,
            inflight: InFlight::new(),
            authorizer: None,
        }
    }

    /// Checks NodeStage's secrets with `authorizer` (built on the node's backend): a RADOS
    /// volume is staged only for credentials the cluster accepts ([`csi::secrets`]), before a
    /// device is made.
    pub fn with_authorizer(mut self, authorizer: Arc<csi::secrets::Authorizer>) -> Self {
        self.authorizer = Some(authorizer);
        self
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

    /// NOT_FOUND for a volume that does not exist, checked before the path is looked at: the
    /// spec's answer for a missing volume does not depend on what path came with it (a CO
    /// probing for a deleted volume may send any path, even a relative one). Without a peer
    /// set to ask, a volume exists here when it is staged on this node.
    async fn check_exists(&self, name: &str) -> CsiResult<()> {
        if self.client.is_some() {
            return self.volume_size(name).await.map(drop);
        }
        let n = name.to_owned();
        match self.blocking(move |o| record(&o.table, &n)).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(CsiError::NotFound(format!(
                "volume {name:?} is not staged on this node"
            ))),
            Err(s) => Err(CsiError::Internal(s.message().to_owned())),
        }
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

/// Serves Identity + Node on `endpoint` over the peers serving `segment` (opened on `backend`,
/// whose credentials NodeStage's secrets must carry) until `shutdown`.
pub async fn run_node<F>(
    segment: &Arc<Segment>,
    endpoint: &str,
    opts: NodeOptions,
    backend: &peers::backend::BackendConfig,
    shutdown: F,
) -> Result<(), csi::RunError>
where
    F: Future<Output = ()> + Send,
{
    let client = Arc::new(VolumeClient::connect(segment)?);
    tracing::info!(%endpoint, node = %opts.node_id, table = %opts.table.path().display(), "CSI node starting");
    let authorizer = Arc::new(csi::secrets::Authorizer::new(backend.clone()));
    let routes = NodeService::new(opts, Some(client))
        .with_authorizer(authorizer)
        .routes(UblkHealth(csi::health::PeerSetHealth::new(segment.clone())));
    csi::server::serve(endpoint, routes, shutdown).await?;
    Ok(())
}

/// The node's Probe: the peer set's health, and not ready while the kernel has no ublk driver,
/// so that `kubectl describe` and the sidecars say why no volume can be staged here (not ready
/// rather than unhealthy: restarting the plugin would not load the module).
struct UblkHealth<H>(H);

impl<H: csi::identity::Health> csi::identity::Health for UblkHealth<H> {
    async fn probe(&self) -> Result<(), csi::identity::ProbeError> {
        self.0.probe().await?;
        if crate::ublk::available() {
            Ok(())
        } else {
            Err(csi::identity::ProbeError::NotReady(
                "the kernel has no ublk driver (/dev/ublk-control is missing): modprobe ublk_drv"
                    .into(),
            ))
        }
    }
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

fn record(table: &DeviceTable, volume: &str) -> CsiResult<Option<DeviceRecord>> {
    Ok(table
        .load()
        .map_err(|e| CsiError::Internal(e.to_string()))?
        .into_iter()
        .find(|r| r.volume == volume))
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
        if let Some(a) = &self.authorizer {
            a.authorize(&r.secrets).await?;
        }
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
        self.check_exists(&name).await?;
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
        self.check_exists(&name).await?;
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

pub use filesystems::{Content, mount_group};
pub use mounts::{MountInfo, parse_mountinfo};

/// An access of mount type for the unit tests of the submodules.
#[cfg(test)]
fn mount_access(group: &str, mode: csi::pb::volume_capability::access_mode::Mode) -> Access {
    Access {
        kind: csi::validate::AccessKind::Mount {
            fs_type: "ext4".into(),
            mount_flags: vec!["noatime".into()],
            volume_mount_group: group.into(),
        },
        mode,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
