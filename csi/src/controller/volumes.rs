//! The life of a volume: CreateVolume (new, or a clone of a snapshot or a
//! volume), DeleteVolume, ValidateVolumeCapabilities, ControllerExpandVolume,
//! ControllerGetVolume and ControllerModifyVolume, and how a volume is
//! described to the CO (its context, topology and condition).

use std::collections::{BTreeMap, HashMap};

use peers::client::{LockState, VolumeInfo, VolumeKind};
use peers::forward::ForwardOp;

use super::MAX_BLOCKS;
use super::topology::{TOPOLOGY_KEY, check_requirements};
use crate::core::{Core, client_error};
use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::meta::{RECORD_VERSION, RecordKind, Source, Stored, VolumeRecord};
use crate::params::{self, DEFAULT_BLOCK_SIZE, MutableParams, VolumeParams};
use crate::pb::volume_content_source as vcs;
use crate::pb::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest,
    DeleteVolumeResponse, Topology, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, Volume, VolumeCondition, VolumeContentSource,
    controller_get_volume_response, validate_volume_capabilities_response,
};
use crate::validate::{Access, check_capabilities, check_id, check_map, check_name, check_secrets};

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

/// Rounds `bytes` up to a multiple of `block`, or `None` on overflow.
fn round_up(bytes: u64, block: u64) -> Option<u64> {
    bytes.div_ceil(block).checked_mul(block)
}

/// The size a CreateVolume gets: the request rounded up to the block size,
/// at least `floor` (a clone's source size), within `limit_bytes`.
fn capacity(range: Option<&CapacityRange>, block: u64, default: u64, floor: u64) -> CsiResult<u64> {
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

/// Rejects capabilities the driver cannot serve, with CreateVolume's code.
pub(super) fn check_supported(caps: &[Access]) -> CsiResult<()> {
    match caps.iter().find_map(Access::unsupported_reason) {
        Some(why) => Err(CsiError::InvalidArgument(why)),
        None => Ok(()),
    }
}

impl Core {
    /// The record of a volume, or the one it would have had: volumes made
    /// outside CSI (a static PV over `archip create`) live in the
    /// controller's directory, on its node.
    pub(super) async fn volume_record(&self, id: &str) -> CsiResult<(VolumeRecord, Option<u64>)> {
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

    pub(super) fn csi_volume(&self, id: &str, info: &VolumeInfo, rec: &VolumeRecord) -> Volume {
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
    pub(super) async fn condition(&self, name: &str, rec: &VolumeRecord) -> VolumeCondition {
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

    pub(super) async fn create_volume(
        &self,
        req: CreateVolumeRequest,
    ) -> CsiResult<CreateVolumeResponse> {
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
        self.check_target(&params)?;
        self.authorize(&req.secrets).await?;
        let id = ids::volume_id(&req.name);
        let _busy = self.inflight.begin(&[&id])?;
        let node = self.pinned_node(&params);
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
            Some(Source::Snapshot(sid)) => Some(
                self.existing(sid, VolumeKind::Snapshot, "source snapshot")
                    .await?,
            ),
            Some(Source::Volume(vid)) => Some(
                self.existing(vid, VolumeKind::Volume, "source volume")
                    .await?,
            ),
        };
        let block = match (&source_info, params.block_size) {
            (Some(s), Some(b)) if s.block_size != b => {
                return Err(CsiError::InvalidArgument(format!(
                    "parameter {}={b} differs from the source's block size {}; a clone keeps its source's blocks",
                    params::BLOCK_SIZE,
                    s.block_size
                )));
            }
            (Some(s), _) => u64::from(s.block_size),
            (None, Some(b)) => u64::from(b),
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
                let op = ForwardOp::Clone {
                    source: src.clone(),
                    name: id.clone(),
                    size: Some(size),
                };
                self.on_holder("CreateVolume", &what, op).await
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

    pub(super) async fn delete_volume(
        &self,
        req: DeleteVolumeRequest,
    ) -> CsiResult<DeleteVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        self.authorize(&req.secrets).await?;
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
            self.remove_entry(name, || format!("deleting volume {id}"))
                .await?;
            tracing::info!(volume = %id, "volume deleted");
        }
        self.meta.delete(RecordKind::Volume, id).await?;
        Ok(DeleteVolumeResponse {})
    }

    pub(super) async fn validate(
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
        self.existing(id, VolumeKind::Volume, "volume").await?;
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

    pub(super) async fn expand(
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
                let a = crate::validate::Access::from_capability("volume_capability", c)?;
                check_supported(std::slice::from_ref(&a))?;
                Ok::<_, CsiError>(a)
            })
            .transpose()?;
        self.authorize(&req.secrets).await?;
        let id = req.volume_id.as_str();
        let _busy = self.inflight.begin(&[id])?;
        let info = self.existing(id, VolumeKind::Volume, "volume").await?;
        let block = u64::from(info.block_size);
        let size = capacity(Some(range), block, 0, 0)?;
        let info = if size <= info.size {
            info
        } else {
            // A volume in use is locked by its node: that node's peer set grows it.
            let op = ForwardOp::Resize {
                volume: info.name.clone(),
                size,
            };
            self.on_holder("ControllerExpandVolume", &format!("expanding {id}"), op)
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

    pub(super) async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> CsiResult<ControllerGetVolumeResponse> {
        check_id("volume_id", &req.volume_id)?;
        let id = req.volume_id.as_str();
        let info = self.existing(id, VolumeKind::Volume, "volume").await?;
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
    pub(super) async fn apply_mutable(
        &self,
        id: &str,
        params: &BTreeMap<String, String>,
    ) -> CsiResult<()> {
        let limits = params::qos_limits(params);
        self.client
            .set_qos(id, limits)
            .await
            .map(drop)
            .map_err(|e| client_error(&format!("setting the QoS limits of volume {id}"), e))
    }

    pub(super) async fn modify(
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
        self.existing(id, VolumeKind::Volume, "volume").await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const MI: u64 = 1 << 20;

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
}
