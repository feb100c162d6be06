//! The Controller service: volumes, snapshots, clones, publication,
//! expansion, capacity and listing, over a running peer set.
//!
//! Every RPC has the same shape: check the request (INVALID_ARGUMENT, via
//! [`crate::status`]), take the object's id in the [in-flight
//! set](crate::inflight) (ABORTED), then act on the volume catalogue through
//! [`VolumeClient`] and on the controller's [records](crate::meta).
//!
//! The catalogue is the source of truth for what exists; records only add
//! what the catalogue cannot say (the CSI request behind a volume, its
//! publications). Creating writes the record first and the object second,
//! and deleting removes the object first and the record second, so a crash
//! at any point leaves a record whose object may be missing (completed by
//! the CO's retry, or ignored: listings join records with the catalogue),
//! never an object whose CSI identity is lost.
//!
//! Ids are deterministic functions of CSI names ([`crate::ids`]), which is
//! what makes CreateVolume and CreateSnapshot idempotent across restarts.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use peers::blocker::LockOwner;
use peers::client::{ClientError, LockState, VolumeInfo, VolumeKind};
use tonic::{Request, Response, Status};

use crate::core::{Core, answer, client_error};
use crate::ids;
use crate::meta::{
    Publication, RECORD_VERSION, RecordKind, SnapshotRecord, Source, Stored, VolumeRecord,
};
use crate::params::{self, DEFAULT_BLOCK_SIZE, MutableParams, VolumeParams};
use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::{self, rpc};
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::volume_content_source as vcs;
use crate::pb::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListVolumesRequest, ListVolumesResponse, Topology, TopologyRequirement,
    ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse, Volume, VolumeCondition,
    VolumeContentSource, controller_get_volume_response, list_snapshots_response,
    list_volumes_response, validate_volume_capabilities_response,
};
use crate::status::{
    Access, CsiError, CsiResult, check_capabilities, check_capability, check_id, check_map,
    check_name, check_node_id, check_secrets,
};

/// The topology segment a node-local volume is pinned by. The node service
/// reports the same key with its node id in NodeGetInfo.
pub const TOPOLOGY_KEY: &str = "topology.archipelago.io/node";

/// Volume context keys handed to the node service (NodeStageVolume).
pub mod context {
    /// The backend (`file`).
    pub const BACKEND: &str = "backend";
    /// Bytes per block.
    pub const BLOCK_SIZE: &str = "blockSize";
    /// The StorageClass filesystem, if any (a capability's `fs_type` wins).
    pub const FS_TYPE: &str = "fsType";
    /// `"true"` if every node reaches the volume.
    pub const SHARED: &str = "shared";
}

/// Publish context key: the access mode the volume was published with, so
/// that the node knows whether to expect a second node (the live-migration
/// handover of a MULTI_NODE_MULTI_WRITER block volume).
pub const PUBLISH_ACCESS_MODE: &str = "archipelago.io/accessMode";
/// Publish context key: `"true"` if published read-only.
pub const PUBLISH_READONLY: &str = "archipelago.io/readonly";

pub use crate::core::ControllerConfig;

/// Most blocks a volume may have (the mapper's bound).
const MAX_BLOCKS: u64 = peers::map::MAX_BLOCKS;

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    core: Arc<Core>,
}

impl ControllerService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// Rounds `bytes` up to a multiple of `block`, or `None` on overflow.
fn round_up(bytes: u64, block: u64) -> Option<u64> {
    bytes.div_ceil(block).checked_mul(block)
}

/// The size a CreateVolume gets: the request rounded up to the block size,
/// at least `floor` (a clone's source size), within `limit_bytes`.
pub(crate) fn capacity(
    range: Option<&CapacityRange>,
    block: u64,
    default: u64,
    floor: u64,
) -> CsiResult<u64> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range must not be negative (required_bytes {required}, limit_bytes {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = match (required, floor) {
        (0, 0) if limit > 0 => default.min(limit),
        (0, 0) => default,
        (r, f) => r.max(f),
    };
    let mut size = round_up(wanted.max(1), block)
        .ok_or_else(|| CsiError::OutOfRange(format!("{wanted} bytes is too large")))?;
    if required == 0 && floor == 0 && limit > 0 && size > limit {
        // Only a limit: the largest whole number of blocks under it.
        size = limit / block * block;
        if size == 0 {
            return Err(CsiError::OutOfRange(format!(
                "limit_bytes {limit} is smaller than one {block}-byte block"
            )));
        }
    }
    if limit > 0 && size > limit {
        return Err(CsiError::OutOfRange(if floor > limit {
            format!("the source holds {floor} bytes, more than limit_bytes {limit}")
        } else {
            format!(
                "{wanted} bytes rounded up to the {block}-byte block size is {size}, more than limit_bytes {limit}"
            )
        }));
    }
    let max = MAX_BLOCKS * block;
    if size > max || size > i64::MAX as u64 {
        return Err(CsiError::OutOfRange(format!(
            "{size} bytes exceeds the largest volume of {block}-byte blocks ({max} bytes)"
        )));
    }
    Ok(size)
}

/// Whether a CSI `Topology` admits a volume pinned to `node` (`None`: every
/// node). A topology without our key says nothing about nodes, so it admits.
fn topology_admits(t: &Topology, node: Option<&str>) -> bool {
    match (node, t.segments.get(TOPOLOGY_KEY)) {
        (Some(node), Some(want)) => want == node,
        _ => true,
    }
}

fn check_requirements(req: Option<&TopologyRequirement>, node: Option<&str>) -> CsiResult<()> {
    let Some(req) = req else { return Ok(()) };
    if node.is_none() || (req.requisite.is_empty() && req.preferred.is_empty()) {
        return Ok(());
    }
    let candidates = if req.requisite.is_empty() {
        &req.preferred
    } else {
        &req.requisite
    };
    if candidates.iter().any(|t| topology_admits(t, node)) {
        return Ok(());
    }
    Err(CsiError::ResourceExhausted(format!(
        "the volume would live in the directory of node {:?}, which none of the required topologies includes (mark the StorageClass shared: \"true\" if the directory is on a shared filesystem)",
        node.unwrap_or_default()
    )))
}

fn source_of(src: &VolumeContentSource) -> CsiResult<Source> {
    match &src.r#type {
        Some(vcs::Type::Snapshot(s)) => {
            check_id("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
            Ok(Source::Snapshot(s.snapshot_id.clone()))
        }
        Some(vcs::Type::Volume(v)) => {
            check_id("volume_content_source.volume.volume_id", &v.volume_id)?;
            Ok(Source::Volume(v.volume_id.clone()))
        }
        None => Err(CsiError::InvalidArgument(
            "volume_content_source needs a snapshot or a volume".into(),
        )),
    }
}

fn source_to_pb(src: &Source) -> VolumeContentSource {
    VolumeContentSource {
        r#type: Some(match src {
            Source::Snapshot(id) => vcs::Type::Snapshot(vcs::SnapshotSource {
                snapshot_id: id.clone(),
            }),
            Source::Volume(id) => vcs::Type::Volume(vcs::VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn mode_name(mode: i32) -> String {
    Mode::try_from(mode).map_or_else(|_| mode.to_string(), |m| m.as_str_name().to_owned())
}

fn is_multi_node(mode: i32) -> bool {
    matches!(
        Mode::try_from(mode),
        Ok(Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter)
    )
}

fn publish_context(p: &Publication) -> HashMap<String, String> {
    HashMap::from([
        (PUBLISH_ACCESS_MODE.to_owned(), mode_name(p.mode)),
        (PUBLISH_READONLY.to_owned(), p.readonly.to_string()),
    ])
}

/// Rejects capabilities the driver cannot serve, with CreateVolume's code.
fn check_supported(caps: &[Access]) -> CsiResult<()> {
    match caps.iter().find_map(Access::unsupported_reason) {
        Some(why) => Err(CsiError::InvalidArgument(why)),
        None => Ok(()),
    }
}

/// Pagination tokens: "start after this id". A prefix makes a token we did
/// not issue recognisable, so it gets ABORTED rather than a silent restart.
const TOKEN_PREFIX: &str = "after:";

fn parse_token(token: &str) -> CsiResult<Option<&str>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(TOKEN_PREFIX)
        .filter(|id| ids::backend_name(id).is_some())
        .map(Some)
        .ok_or_else(|| {
            CsiError::Aborted(format!(
                "starting_token {token:?} was not issued by this plugin; restart the listing"
            ))
        })
}

fn page<T>(items: Vec<(String, T)>, max_entries: i32) -> CsiResult<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(format!(
            "max_entries must not be negative, got {max_entries}"
        )));
    }
    let max = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let more = items.len() > max;
    let mut out = Vec::with_capacity(items.len().min(max));
    let mut last = String::new();
    for (id, item) in items.into_iter().take(max) {
        last = id;
        out.push(item);
    }
    let next = if more {
        format!("{TOKEN_PREFIX}{last}")
    } else {
        String::new()
    };
    Ok((out, next))
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &std::path::Path) -> CsiResult<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CsiError::Internal(format!("{} contains a NUL byte", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory of the right type; statvfs writes it fully when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(CsiError::Internal(format!(
            "statvfs {}: {e}",
            path.display()
        )));
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Core {
    /// The record of a volume, or the one it would have had: volumes made
    /// outside CSI (a static PV over `archip create`) live in the
    /// controller's directory, on its node.
    async fn volume_record(&self, id: &str) -> CsiResult<(VolumeRecord, Option<u64>)> {
        Ok(
            match self
                .meta
                .get::<VolumeRecord>(RecordKind::Volume, id)
                .await?
            {
                Some(Stored { record, version }) => (record, Some(version)),
                None => (
                    VolumeRecord {
                        version: RECORD_VERSION,
                        name: String::new(),
                        parameters: BTreeMap::new(),
                        mutable_parameters: BTreeMap::new(),
                        source: None,
                        node: Some(self.config.node_id.clone()),
                        publications: Vec::new(),
                    },
                    None,
                ),
            },
        )
    }

    fn csi_volume(&self, id: &str, info: &VolumeInfo, rec: &VolumeRecord) -> Volume {
        let mut ctx = HashMap::from([
            (context::BACKEND.to_owned(), "file".to_owned()),
            (context::BLOCK_SIZE.to_owned(), info.block_size.to_string()),
            (context::SHARED.to_owned(), rec.node.is_none().to_string()),
        ]);
        if let Some(fs) = rec.parameters.get(params::FS_TYPE) {
            ctx.insert(context::FS_TYPE.to_owned(), fs.clone());
        }
        Volume {
            capacity_bytes: info.size.min(i64::MAX as u64) as i64,
            volume_id: id.to_owned(),
            volume_context: ctx,
            content_source: rec.source.as_ref().map(source_to_pb),
            accessible_topology: rec
                .node
                .iter()
                .map(|n| Topology {
                    segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), n.clone())]),
                })
                .collect(),
        }
    }

    /// A volume is abnormal when a node it is not published to holds its
    /// write lock: a node that was lost without being unpublished, whose
    /// lock keeps every other node out until it is broken.
    async fn condition(&self, name: &str, rec: &VolumeRecord) -> VolumeCondition {
        match self.client.lock_info(name).await {
            Ok(LockState {
                holder: Some(h), ..
            }) if h != self.config.node_id && !rec.publications.iter().any(|p| p.node_id == h) => {
                VolumeCondition {
                    abnormal: true,
                    message: format!(
                        "node {h} holds the write lock but the volume is not published to it (a lost node?); unpublishing from {h} breaks the lock"
                    ),
                }
            }
            Ok(_) => VolumeCondition {
                abnormal: false,
                message: "healthy".into(),
            },
            Err(e) => VolumeCondition {
                abnormal: true,
                message: format!("the lock state cannot be read: {e}"),
            },
        }
    }

    async fn create_volume(&self, req: CreateVolumeRequest) -> CsiResult<CreateVolumeResponse> {
        check_name("name", &req.name)?;
        check_map("parameters", &req.parameters)?;
        check_map("mutable_parameters", &req.mutable_parameters)?;
        check_secrets("secrets", &req.secrets)?;
        let caps = check_capabilities("volume_capabilities", &req.volume_capabilities)?;
        check_supported(&caps)?;
        let params = VolumeParams::parse(&req.parameters)?;
        let mutable = MutableParams::parse(&req.mutable_parameters)?;
        let source = req
            .volume_content_source
            .as_ref()
            .map(source_of)
            .transpose()?;
        let id = ids::volume_id(&req.name);
        let _busy = self.inflight.begin(&[&id])?;
        let node = (!params.shared).then(|| self.config.node_id.clone());
        check_requirements(req.accessibility_requirements.as_ref(), node.as_deref())?;
        let range = req.capacity_range.as_ref();

        let record = VolumeRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            parameters: params.canonical.clone(),
            mutable_parameters: mutable.0.clone(),
            source: source.clone(),
            node,
            publications: Vec::new(),
        };
        let existing = self
            .meta
            .get::<VolumeRecord>(RecordKind::Volume, &id)
            .await?;
        if let Some(Stored { record: old, .. }) = &existing {
            if old.name != req.name
                || old.parameters != record.parameters
                || old.source != record.source
                || old.node != record.node
            {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with other parameters or another content source",
                    req.name
                )));
            }
            // A retry: the volume may already be there.
            if let Some(info) = self.volume(&id).await? {
                let (required, limit) =
                    range.map_or((0, 0), |r| (r.required_bytes.max(0), r.limit_bytes.max(0)));
                if info.size < required as u64 || (limit > 0 && info.size > limit as u64) {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} exists with {} bytes, outside the requested range",
                        req.name, info.size
                    )));
                }
                if old.mutable_parameters != record.mutable_parameters
                    && !record.mutable_parameters.is_empty()
                {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} exists with other mutable parameters",
                        req.name
                    )));
                }
                // The first attempt may have died before applying them.
                if !old.mutable_parameters.is_empty() {
                    self.apply_mutable(&id, &old.mutable_parameters).await?;
                }
                return Ok(CreateVolumeResponse {
                    volume: Some(self.csi_volume(&id, &info, old)),
                });
            }
        }

        // Resolve the source before writing anything, so that a bad
        // source changes nothing.
        let source_info = match &source {
            None => None,
            Some(Source::Snapshot(sid)) => Some(self.snapshot(sid).await?.ok_or_else(|| {
                CsiError::NotFound(format!("source snapshot {sid} does not exist"))
            })?),
            Some(Source::Volume(vid)) => Some(self.volume(vid).await?.ok_or_else(|| {
                CsiError::NotFound(format!("source volume {vid} does not exist"))
            })?),
        };
        let block = match (&source_info, params.block_size) {
            (Some(s), Some(b)) if s.block_size != b => {
                return Err(CsiError::InvalidArgument(format!(
                    "parameter {}={b} differs from the source's block size {}; a clone keeps its source's blocks",
                    params::BLOCK_SIZE,
                    s.block_size
                )));
            }
            (Some(s), _) => s.block_size as u64,
            (None, Some(b)) => b as u64,
            (None, None) => DEFAULT_BLOCK_SIZE,
        };
        let floor = source_info.as_ref().map_or(0, |s| s.size);
        let size = capacity(range, block, self.config.default_capacity, floor)?;

        let wrote_record = match existing {
            Some(_) => false,
            None => {
                self.meta
                    .put(RecordKind::Volume, &id, &record, None)
                    .await?;
                true
            }
        };
        let what = format!("creating volume {id}");
        let made = match &source {
            None => (self.client.create(&id, size, Some(block)).await)
                .map_err(|e| client_error(&what, e)),
            // A live source volume may be locked by a node: its peer set clones it.
            Some(Source::Snapshot(src) | Source::Volume(src)) => {
                let target = id.as_str();
                self.on_holder("CreateVolume", src, &what, |c| async move {
                    c.clone_volume(src, target, Some(size)).await
                })
                .await
            }
        };
        let info = match made {
            Ok(info) => info,
            Err(e) => {
                if wrote_record && let Err(me) = self.meta.delete(RecordKind::Volume, &id).await {
                    tracing::warn!(volume = %id, error = %me, "removing the record of a failed create");
                }
                return Err(e);
            }
        };
        if !record.mutable_parameters.is_empty() {
            self.apply_mutable(&id, &record.mutable_parameters).await?;
        }
        tracing::info!(volume = %id, name = %req.name, size, source = ?source, "volume created");
        Ok(CreateVolumeResponse {
            volume: Some(self.csi_volume(&id, &info, &record)),
        })
    }

    async fn delete_volume(&self, req: DeleteVolumeRequest) -> CsiResult<DeleteVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        let Some(name) = ids::backend_name(id) else {
            return Ok(DeleteVolumeResponse {});
        };
        if let Some(Stored { record, .. }) = self
            .meta
            .get::<VolumeRecord>(RecordKind::Volume, id)
            .await?
            && !record.publications.is_empty()
        {
            let nodes: Vec<&str> = record
                .publications
                .iter()
                .map(|p| p.node_id.as_str())
                .collect();
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to {nodes:?}; unpublish it first"
            )));
        }
        // Only a volume: a snapshot id passed here must not delete the
        // snapshot.
        if self.volume(id).await?.is_some() {
            match self.client.delete(name).await {
                Ok(()) | Err(ClientError::NotFound(_)) => {}
                Err(e) => return Err(client_error(&format!("deleting volume {id}"), e)),
            }
            tracing::info!(volume = %id, "volume deleted");
        }
        self.meta.delete(RecordKind::Volume, id).await?;
        Ok(DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> CsiResult<ControllerPublishVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_node_id("node_id", &req.node_id)?;
        check_secrets("secrets", &req.secrets)?;
        check_map("volume_context", &req.volume_context)?;
        let access = check_capability("volume_capability", req.volume_capability.as_ref())?;
        check_supported(std::slice::from_ref(&access))?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        if self.volume(id).await?.is_none() {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")));
        }
        // A node's peers lock volumes under its node id, so an id that
        // cannot be a lock owner cannot be one of our nodes.
        if let Err(e) = LockOwner::new(req.node_id.clone()) {
            return Err(CsiError::NotFound(format!(
                "node {:?} cannot exist: {e}",
                req.node_id
            )));
        }
        let (mut rec, version) = self.volume_record(id).await?;
        if let Some(home) = &rec.node
            && *home != req.node_id
        {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} lives in the directory of node {home} and cannot be reached from node {}",
                req.node_id
            )));
        }
        let want = Publication {
            node_id: req.node_id.clone(),
            mode: access.mode as i32,
            block: access.is_block(),
            readonly: req.readonly,
        };
        if let Some(p) = rec.publications.iter().find(|p| p.node_id == req.node_id) {
            if *p == want {
                return Ok(ControllerPublishVolumeResponse {
                    publish_context: publish_context(p),
                });
            }
            return Err(CsiError::AlreadyExists(format!(
                "volume {id} is already published to node {} as {}{}, not as {}{}",
                p.node_id,
                mode_name(p.mode),
                if p.readonly { " read-only" } else { "" },
                mode_name(want.mode),
                if want.readonly { " read-only" } else { "" },
            )));
        }
        if let Some(other) = rec
            .publications
            .iter()
            .find(|p| !(is_multi_node(p.mode) && is_multi_node(want.mode)))
        {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to node {} as {}; a second node needs a MULTI_NODE access mode on both",
                other.node_id,
                mode_name(other.mode)
            )));
        }
        rec.publications.push(want.clone());
        self.meta.put(RecordKind::Volume, id, &rec, version).await?;
        tracing::info!(volume = %id, node = %req.node_id, mode = %mode_name(want.mode), readonly = want.readonly, "published");
        Ok(ControllerPublishVolumeResponse {
            publish_context: publish_context(&want),
        })
    }

    async fn unpublish(
        &self,
        req: ControllerUnpublishVolumeRequest,
    ) -> CsiResult<ControllerUnpublishVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        if !req.node_id.is_empty() {
            check_node_id("node_id", &req.node_id)?;
        }
        check_secrets("secrets", &req.secrets)?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        let Some(name) = ids::backend_name(id) else {
            return Ok(ControllerUnpublishVolumeResponse {});
        };
        let stored = self
            .meta
            .get::<VolumeRecord>(RecordKind::Volume, id)
            .await?;
        let leaving = |node: &str| {
            if req.node_id.is_empty() {
                stored
                    .as_ref()
                    .is_some_and(|s| s.record.publications.iter().any(|p| p.node_id == node))
            } else {
                node == req.node_id
            }
        };
        // The lock handover: a node the volume leaves must not keep the
        // write lock, or the next node cannot take it. By the time the CO
        // unpublishes, the node has unstaged (and closed the volume) or is
        // gone, so a lock it still holds is stale, and breaking it fences
        // whatever that node might still send. This runs before the record
        // changes, so a retry after a crash still breaks it.
        match self.client.lock_info(name).await {
            Ok(LockState {
                holder: Some(h), ..
            }) if leaving(&h) => match self.client.break_lock(name).await {
                Ok(before) => tracing::warn!(
                    volume = %id, node = %h, generation = before.generation,
                    "broke the write lock of a node the volume is unpublished from"
                ),
                Err(ClientError::NotFound(_)) => {}
                Err(e) => return Err(client_error(&format!("breaking the lock of {id}"), e)),
            },
            Ok(_) | Err(ClientError::NotFound(_)) => {}
            Err(e) => return Err(client_error(&format!("reading the lock of {id}"), e)),
        }
        if let Some(Stored {
            mut record,
            version,
        }) = stored
        {
            let before = record.publications.len();
            record
                .publications
                .retain(|p| !req.node_id.is_empty() && p.node_id != req.node_id);
            if record.publications.len() != before {
                self.meta
                    .put(RecordKind::Volume, id, &record, Some(version))
                    .await?;
                tracing::info!(volume = %id, node = %req.node_id, "unpublished");
            }
        }
        Ok(ControllerUnpublishVolumeResponse {})
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_map("volume_context", &req.volume_context)?;
        check_map("parameters", &req.parameters)?;
        check_map("mutable_parameters", &req.mutable_parameters)?;
        check_secrets("secrets", &req.secrets)?;
        let caps = check_capabilities("volume_capabilities", &req.volume_capabilities)?;
        let id = req.volume_id.as_str();
        if self.volume(id).await?.is_none() {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")));
        }
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if let Some(why) = caps.iter().find_map(Access::unsupported_reason) {
            return Ok(unconfirmed(why));
        }
        let (rec, _) = self.volume_record(id).await?;
        if !req.parameters.is_empty() {
            match VolumeParams::parse(&req.parameters) {
                Err(e) => return Ok(unconfirmed(e.to_string())),
                Ok(p)
                    if rec.version > 0 && !rec.name.is_empty() && p.canonical != rec.parameters =>
                {
                    return Ok(unconfirmed(format!(
                        "volume {id} was created with other parameters"
                    )));
                }
                Ok(_) => {}
            }
        }
        if let Err(e) = MutableParams::parse(&req.mutable_parameters) {
            return Ok(unconfirmed(e.to_string()));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        })
    }

    async fn list_volumes(&self, req: ListVolumesRequest) -> CsiResult<ListVolumesResponse> {
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!(
                "max_entries must not be negative, got {}",
                req.max_entries
            )));
        }
        let after = parse_token(&req.starting_token)?;
        let catalogue: HashMap<String, VolumeInfo> = self
            .client
            .list()
            .await
            .map_err(|e| client_error("listing volumes", e))?
            .into_iter()
            .filter(|v| v.kind == VolumeKind::Volume)
            .map(|v| (v.name.clone(), v))
            .collect();
        let ids: Vec<String> = self
            .meta
            .ids(RecordKind::Volume)
            .await?
            .into_iter()
            .filter(|id| catalogue.contains_key(id))
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
            .collect();
        let (ids, next_token) = page(
            ids.into_iter().map(|i| (i.clone(), i)).collect(),
            req.max_entries,
        )?;
        let mut entries = Vec::with_capacity(ids.len());
        for id in ids {
            let info = &catalogue[&id];
            let (rec, _) = self.volume_record(&id).await?;
            entries.push(list_volumes_response::Entry {
                volume: Some(self.csi_volume(&id, info, &rec)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: rec
                        .publications
                        .iter()
                        .map(|p| p.node_id.clone())
                        .collect(),
                    volume_condition: Some(self.condition(&id, &rec).await),
                }),
            });
        }
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn get_capacity(&self, req: GetCapacityRequest) -> CsiResult<GetCapacityResponse> {
        check_map("parameters", &req.parameters)?;
        let caps = if req.volume_capabilities.is_empty() {
            Vec::new()
        } else {
            check_capabilities("volume_capabilities", &req.volume_capabilities)?
        };
        let params = VolumeParams::parse(&req.parameters)?;
        let block = params.block_size.map_or(DEFAULT_BLOCK_SIZE, u64::from);
        let max = (MAX_BLOCKS * block).min(i64::MAX as u64) as i64;
        let node = (!params.shared).then_some(self.config.node_id.as_str());
        let reachable = req
            .accessible_topology
            .as_ref()
            .is_none_or(|t| topology_admits(t, node));
        let supported = caps.iter().all(|c| c.unsupported_reason().is_none());
        let available = if reachable && supported {
            free_bytes(&self.config.data_dir)?.min(i64::MAX as u64) as i64
        } else {
            0
        };
        Ok(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(max),
            minimum_volume_size: Some(block as i64),
        })
    }

    async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> CsiResult<CreateSnapshotResponse> {
        check_name("name", &req.name)?;
        check_id("source_volume_id", &req.source_volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        check_map("parameters", &req.parameters)?;
        params::check_snapshot_params(&req.parameters)?;
        let id = ids::snapshot_id(&req.name);
        let source = req.source_volume_id.as_str();
        let _busy = self.inflight.begin(&[&id])?;
        let existing = self
            .meta
            .get::<SnapshotRecord>(RecordKind::Snapshot, &id)
            .await?;
        if let Some(Stored { record, .. }) = &existing
            && (record.source_volume_id != source || record.name != req.name)
        {
            return Err(CsiError::AlreadyExists(format!(
                "snapshot {:?} exists with source volume {}, not {source}",
                req.name, record.source_volume_id
            )));
        }
        if let Some(info) = self.snapshot(&id).await? {
            if info.parent.as_deref() != Some(source) {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {:?} exists with another source volume",
                    req.name
                )));
            }
            let rec = existing.map(|s| s.record);
            return Ok(CreateSnapshotResponse {
                snapshot: Some(self.csi_snapshot(&id, &info, rec.as_ref())),
            });
        }
        if self.volume(source).await?.is_none() {
            return Err(CsiError::NotFound(format!(
                "source volume {source} does not exist"
            )));
        }
        let record = SnapshotRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            source_volume_id: source.to_owned(),
            group_id: None,
        };
        let wrote_record = existing.is_none();
        if wrote_record {
            self.meta
                .put(RecordKind::Snapshot, &id, &record, None)
                .await?;
        }
        // A volume in use is locked by its node: that node's peer set cuts the snapshot.
        let target = id.as_str();
        let made = self
            .on_holder(
                "CreateSnapshot",
                source,
                &format!("snapshotting {source}"),
                |c| async move { c.snapshot(source, target).await },
            )
            .await;
        let info = match made {
            Ok(info) => info,
            Err(e) => {
                if wrote_record && let Err(me) = self.meta.delete(RecordKind::Snapshot, &id).await {
                    tracing::warn!(snapshot = %id, error = %me, "removing the record of a failed snapshot");
                }
                return Err(e);
            }
        };
        tracing::info!(snapshot = %id, name = %req.name, volume = %source, "snapshot created");
        Ok(CreateSnapshotResponse {
            snapshot: Some(self.csi_snapshot(&id, &info, Some(&record))),
        })
    }

    async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> CsiResult<DeleteSnapshotResponse> {
        check_id("snapshot_id", &req.snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        let id = req.snapshot_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        if let Some(Stored { record, .. }) = self
            .meta
            .get::<SnapshotRecord>(RecordKind::Snapshot, id)
            .await?
            && let Some(group) = record.group_id
        {
            return Err(CsiError::InvalidArgument(format!(
                "snapshot {id} belongs to group snapshot {group}; delete the group instead"
            )));
        }
        if let Some(info) = self.snapshot(id).await? {
            match self.client.delete(&info.name).await {
                Ok(()) | Err(ClientError::NotFound(_)) => {}
                Err(e) => return Err(client_error(&format!("deleting snapshot {id}"), e)),
            }
            tracing::info!(snapshot = %id, "snapshot deleted");
        }
        self.meta.delete(RecordKind::Snapshot, id).await?;
        Ok(DeleteSnapshotResponse {})
    }

    async fn list_snapshots(&self, req: ListSnapshotsRequest) -> CsiResult<ListSnapshotsResponse> {
        check_secrets("secrets", &req.secrets)?;
        if req.max_entries < 0 {
            return Err(CsiError::InvalidArgument(format!(
                "max_entries must not be negative, got {}",
                req.max_entries
            )));
        }
        let after = parse_token(&req.starting_token)?;
        let catalogue: HashMap<String, VolumeInfo> = self
            .client
            .list()
            .await
            .map_err(|e| client_error("listing snapshots", e))?
            .into_iter()
            .filter(|v| v.kind == VolumeKind::Snapshot)
            .map(|v| (v.name.clone(), v))
            .collect();
        let mut items = Vec::new();
        for id in self.meta.ids(RecordKind::Snapshot).await? {
            if !req.snapshot_id.is_empty() && id != req.snapshot_id {
                continue;
            }
            if after.is_some_and(|a| id.as_str() <= a) {
                continue;
            }
            let Some(info) = catalogue.get(&id) else {
                continue;
            };
            let rec = self
                .meta
                .get::<SnapshotRecord>(RecordKind::Snapshot, &id)
                .await?
                .map(|s| s.record);
            let snap = self.csi_snapshot(&id, info, rec.as_ref());
            if !req.source_volume_id.is_empty() && snap.source_volume_id != req.source_volume_id {
                continue;
            }
            items.push((id, snap));
        }
        let (snaps, next_token) = page(items, req.max_entries)?;
        Ok(ListSnapshotsResponse {
            entries: snaps
                .into_iter()
                .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        })
    }

    async fn get_snapshot(&self, req: GetSnapshotRequest) -> CsiResult<GetSnapshotResponse> {
        check_id("snapshot_id", &req.snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        let id = req.snapshot_id.as_str();
        let info = self
            .snapshot(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("snapshot {id} does not exist")))?;
        let rec = self
            .meta
            .get::<SnapshotRecord>(RecordKind::Snapshot, id)
            .await?
            .map(|s| s.record);
        Ok(GetSnapshotResponse {
            snapshot: Some(self.csi_snapshot(id, &info, rec.as_ref())),
        })
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> CsiResult<ControllerExpandVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::missing("capacity_range"))?;
        if range.required_bytes <= 0 {
            return Err(CsiError::InvalidArgument(format!(
                "capacity_range.required_bytes must be positive, got {}",
                range.required_bytes
            )));
        }
        let access = req
            .volume_capability
            .as_ref()
            .map(|c| {
                let a = crate::status::Access::from_capability("volume_capability", c)?;
                check_supported(std::slice::from_ref(&a))?;
                Ok::<_, CsiError>(a)
            })
            .transpose()?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        let info = self
            .volume(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))?;
        let block = info.block_size as u64;
        let size = capacity(Some(range), block, 0, 0)?;
        let info = if size <= info.size {
            info
        } else {
            // A volume in use is locked by its node: that node's peer set grows it.
            let name = info.name.as_str();
            self.on_holder(
                "ControllerExpandVolume",
                id,
                &format!("expanding {id}"),
                |c| async move { c.resize(name, size).await },
            )
            .await?
        };
        // A block volume is ready once the device grows; a filesystem has
        // to be grown on the node. Without a capability, ask the node unless
        // every publication is raw block.
        let node_expansion_required = match &access {
            Some(a) => !a.is_block(),
            None => {
                let (rec, _) = self.volume_record(id).await?;
                rec.publications.is_empty() || rec.publications.iter().any(|p| !p.block)
            }
        };
        tracing::info!(volume = %id, size = info.size, "expanded");
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: info.size.min(i64::MAX as u64) as i64,
            node_expansion_required,
        })
    }

    async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> CsiResult<ControllerGetVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        let id = req.volume_id.as_str();
        let info = self
            .volume(id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))?;
        let (rec, _) = self.volume_record(id).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(self.csi_volume(id, &info, &rec)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: rec.publications.iter().map(|p| p.node_id.clone()).collect(),
                volume_condition: Some(self.condition(&info.name, &rec).await),
            }),
        })
    }

    /// Puts a volume's mutable parameters into effect: its QoS limits, which the mapper
    /// stores and every node's vlmc enforces (no lock needed, so a volume in use on a node
    /// changes online).
    async fn apply_mutable(&self, id: &str, params: &BTreeMap<String, String>) -> CsiResult<()> {
        let limits = params::qos_limits(params);
        self.client
            .set_qos(id, limits)
            .await
            .map(drop)
            .map_err(|e| client_error(&format!("setting the QoS limits of volume {id}"), e))
    }

    async fn modify(
        &self,
        req: ControllerModifyVolumeRequest,
    ) -> CsiResult<ControllerModifyVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        check_map("mutable_parameters", &req.mutable_parameters)?;
        // Every key is checked before anything is applied.
        let changes = MutableParams::parse(&req.mutable_parameters)?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        if self.volume(id).await?.is_none() {
            return Err(CsiError::NotFound(format!("volume {id} does not exist")));
        }
        let (mut rec, version) = self.volume_record(id).await?;
        let before = rec.mutable_parameters.clone();
        rec.mutable_parameters.extend(changes.0);
        // Applied first, and every time: a retry after a failure between the two converges.
        self.apply_mutable(id, &rec.mutable_parameters).await?;
        if rec.mutable_parameters != before || version.is_none() {
            self.meta.put(RecordKind::Volume, id, &rec, version).await?;
            tracing::info!(volume = %id, parameters = ?rec.mutable_parameters, "modified");
        }
        Ok(ControllerModifyVolumeResponse {})
    }
}

/// What the controller offers.
pub fn controller_capabilities() -> Vec<ControllerServiceCapability> {
    use rpc::Type as T;
    [
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::PublishReadonly,
        T::ExpandVolume,
        T::ListVolumesPublishedNodes,
        T::VolumeCondition,
        T::GetVolume,
        T::SingleNodeMultiWriter,
        T::ModifyVolume,
        T::GetSnapshot,
    ]
    .into_iter()
    .map(|t| ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    })
    .collect()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        answer(
            "CreateVolume",
            self.core.create_volume(request.into_inner()),
        )
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        answer(
            "DeleteVolume",
            self.core.delete_volume(request.into_inner()),
        )
        .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        answer(
            "ControllerPublishVolume",
            self.core.publish(request.into_inner()),
        )
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        answer(
            "ControllerUnpublishVolume",
            self.core.unpublish(request.into_inner()),
        )
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        answer(
            "ValidateVolumeCapabilities",
            self.core.validate(request.into_inner()),
        )
        .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        answer("ListVolumes", self.core.list_volumes(request.into_inner())).await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        answer("GetCapacity", self.core.get_capacity(request.into_inner())).await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: controller_capabilities(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        answer(
            "CreateSnapshot",
            self.core.create_snapshot(request.into_inner()),
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        answer(
            "DeleteSnapshot",
            self.core.delete_snapshot(request.into_inner()),
        )
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        answer(
            "ListSnapshots",
            self.core.list_snapshots(request.into_inner()),
        )
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        answer("GetSnapshot", self.core.get_snapshot(request.into_inner())).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        answer(
            "ControllerExpandVolume",
            self.core.expand(request.into_inner()),
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        answer(
            "ControllerGetVolume",
            self.core.get_volume(request.into_inner()),
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        answer(
            "ControllerModifyVolume",
            self.core.modify(request.into_inner()),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

    /// A reply as a peer sends it for a blocker error, decoded as the client does.
    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn capacity_rounds_up_and_respects_limits() {
        let bs = 4 * MI;
        assert_eq!(capacity(None, bs, 1 << 30, 0).unwrap(), 1 << 30);
        assert_eq!(capacity(Some(&range(1, 0)), bs, 0, 0).unwrap(), bs);
        assert_eq!(
            capacity(Some(&range(5 * MI as i64, 0)), bs, 0, 0).unwrap(),
            8 * MI
        );
        // Rounding past the limit is out of range.
        let e = capacity(Some(&range(5 * MI as i64, 6 * MI as i64)), bs, 0, 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert_eq!(
            capacity(Some(&range(0, 6 * MI as i64)), bs, 1 << 30, 0).unwrap(),
            4 * MI,
            "a limit-only request gets whole blocks under the limit"
        );
        assert_eq!(
            capacity(Some(&range(-1, 0)), bs, 0, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            capacity(Some(&range(10, 5)), bs, 0, 0).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        // A clone is at least its source.
        assert_eq!(capacity(None, bs, 1 << 30, 12 * MI).unwrap(), 12 * MI);
        assert_eq!(
            capacity(Some(&range(0, 8 * MI as i64)), bs, 1 << 30, 12 * MI)
                .unwrap_err()
                .code(),
            tonic::Code::OutOfRange
        );
        // Beyond the mapper's block count.
        assert!(capacity(Some(&range(i64::MAX, 0)), bs, 0, 0).is_err());
    }

    #[test]
    fn tokens_we_did_not_issue_are_aborted() {
        assert_eq!(parse_token("").unwrap(), None);
        assert_eq!(parse_token("after:v-a").unwrap(), Some("v-a"));
        for bad in ["v-a", "after:", "after:../x", "garbage"] {
            assert_eq!(
                parse_token(bad).unwrap_err().code(),
                tonic::Code::Aborted,
                "{bad}"
            );
        }
        let (items, next) =
            page(vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)], 2).unwrap();
        assert_eq!((items, next.as_str()), (vec![1, 2], "after:b"));
        let (items, next) = page(vec![("a".into(), 1)], 0).unwrap();
        assert_eq!((items, next.as_str()), (vec![1], ""));
    }

    #[test]
    fn topology() {
        let t = |n: &str| Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), n.to_owned())]),
        };
        assert!(topology_admits(&t("a"), Some("a")));
        assert!(!topology_admits(&t("b"), Some("a")));
        assert!(topology_admits(&t("b"), None));
        let req = TopologyRequirement {
            requisite: vec![t("b"), t("c")],
            preferred: vec![],
        };
        assert_eq!(
            check_requirements(Some(&req), Some("a"))
                .unwrap_err()
                .code(),
            tonic::Code::ResourceExhausted
        );
        assert!(check_requirements(Some(&req), None).is_ok());
        let req = TopologyRequirement {
            requisite: vec![t("b"), t("a")],
            preferred: vec![t("a")],
        };
        assert!(check_requirements(Some(&req), Some("a")).is_ok());
    }
}
