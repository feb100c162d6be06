//! The GroupController service: snapshots of several volumes at one point
//! in time (all the disks of a VM, the data and log volumes of a database).
//!
//! A group snapshot is a [`GroupRecord`] plus one ordinary snapshot per
//! member volume, whose id follows from the group and the volume
//! ([`ids::group_member_id`]), so a retry finds them. The record is written
//! first, marked incomplete; then the members are cut; then it is marked
//! complete. A group found incomplete (a crash or a failure in between) has
//! its members deleted and cut again together, because members cut at
//! different moments would not be consistent with each other.
//!
//! Consistency: all members are cut under one barrier; see [`cut_members`].

use std::collections::BTreeSet;
use std::sync::Arc;

use peers::client::VolumeKind;
use tonic::{Request, Response, Status};

use crate::core::{Core, rpc_service, timestamp};
use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::meta::{GroupRecord, RECORD_VERSION, RecordKind, SnapshotRecord, Stored};
use crate::params;
use crate::pb::group_controller_server::{GroupController, GroupControllerServer};
use crate::pb::group_controller_service_capability::{self, rpc};
use crate::pb::{
    CreateVolumeGroupSnapshotRequest, CreateVolumeGroupSnapshotResponse,
    DeleteVolumeGroupSnapshotRequest, DeleteVolumeGroupSnapshotResponse,
    GetVolumeGroupSnapshotRequest, GetVolumeGroupSnapshotResponse,
    GroupControllerGetCapabilitiesRequest, GroupControllerGetCapabilitiesResponse,
    GroupControllerServiceCapability, VolumeGroupSnapshot,
};
use crate::validate::{check_id, check_name, check_secrets};

/// Most volumes in one group: vlmc's bound on one barrier (it holds I/O
/// to every member while the group is cut).
pub const MAX_GROUP_MEMBERS: usize = peers::wire::MAX_GROUP_MEMBERS;

/// The GroupController service.
#[derive(Debug, Clone)]
pub struct GroupControllerService {
    core: Arc<Core>,
}

impl GroupControllerService {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// The tonic service.
    pub fn into_server(self) -> GroupControllerServer<Self> {
        GroupControllerServer::new(self)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Cuts the member snapshots `(volume, snapshot)` as one point in time.
///
/// vlmc holds the drain barrier of every member at once (I/O in flight to
/// any member completes, new I/O to all of them waits), the mapper cuts
/// every snapshot, then I/O resumes: no write lands between two members'
/// cuts, so the group is crash-consistent as a set, write-order consistent
/// across volumes (if the application wrote X to one disk and then, after X
/// completed, Y to another, a group holding Y holds X). This covers I/O
/// that reaches the volumes through the vlmc that cuts them, so the cut
/// happens on the peer set of the node holding the members' locks (the node
/// the VM runs on; see [`crate::delegate`]), or on the controller's own if
/// none is locked. Members locked by different nodes are refused
/// (FAILED_PRECONDITION) rather than cut at different moments.
async fn cut_members(core: &Core, members: &[(String, String)]) -> CsiResult<()> {
    core.snapshot_group("CreateVolumeGroupSnapshot", members)
        .await
}

impl GroupControllerService {
    async fn response(&self, gid: &str, rec: &GroupRecord) -> CsiResult<VolumeGroupSnapshot> {
        let mut snapshots = Vec::with_capacity(rec.snapshot_ids.len());
        for (sid, vid) in rec.snapshot_ids.iter().zip(&rec.source_volume_ids) {
            let info = self.core.snapshot(sid).await?.ok_or_else(|| {
                CsiError::Internal(format!(
                    "group snapshot {gid} lost its member {sid} (of volume {vid})"
                ))
            })?;
            let member = SnapshotRecord {
                version: RECORD_VERSION,
                name: String::new(),
                source_volume_id: vid.clone(),
                group_id: Some(gid.to_owned()),
            };
            snapshots.push(self.core.csi_snapshot(sid, &info, Some(&member)));
        }
        Ok(VolumeGroupSnapshot {
            group_snapshot_id: gid.to_owned(),
            snapshots,
            creation_time: Some(timestamp(rec.created)),
            ready_to_use: true,
        })
    }

    async fn create(
        &self,
        req: CreateVolumeGroupSnapshotRequest,
    ) -> CsiResult<CreateVolumeGroupSnapshotResponse> {
        check_name("name", &req.name)?;
        check_secrets("secrets", &req.secrets)?;
        crate::validate::check_map("parameters", &req.parameters)?;
        let parameters = params::check_snapshot_params(&req.parameters)?;
        if req.source_volume_ids.is_empty() {
            return Err(CsiError::missing("source_volume_ids"));
        }
        if req.source_volume_ids.len() > MAX_GROUP_MEMBERS {
            return Err(CsiError::InvalidArgument(format!(
                "{} source volumes; a group holds at most {MAX_GROUP_MEMBERS}",
                req.source_volume_ids.len()
            )));
        }
        let mut seen = BTreeSet::new();
        for (i, v) in req.source_volume_ids.iter().enumerate() {
            check_id(&format!("source_volume_ids[{i}]"), v)?;
            if !seen.insert(v.as_str()) {
                return Err(CsiError::InvalidArgument(format!(
                    "source_volume_ids lists {v} twice"
                )));
            }
        }
        let gid = ids::group_id(&req.name);
        let members: Vec<String> = req
            .source_volume_ids
            .iter()
            .map(|v| ids::group_member_id(&gid, v))
            .collect();
        self.core.authorize(&req.secrets).await?;
        let mut busy: Vec<&str> = vec![&gid];
        busy.extend(members.iter().map(String::as_str));
        let _busy = self.core.inflight.begin(&busy)?;

        let existing = self
            .core
            .meta
            .get::<GroupRecord>(RecordKind::Group, &gid)
            .await?;
        if let Some(Stored { record, .. }) = &existing {
            let old: BTreeSet<&str> = record
                .source_volume_ids
                .iter()
                .map(String::as_str)
                .collect();
            if old != seen || record.parameters != parameters || record.name != req.name {
                return Err(CsiError::AlreadyExists(format!(
                    "group snapshot {:?} exists with other source volumes or parameters",
                    req.name
                )));
            }
            if record.complete {
                return Ok(CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(self.response(&gid, record).await?),
                });
            }
        }
        for v in &req.source_volume_ids {
            self.core
                .existing(v, VolumeKind::Volume, "source volume")
                .await?;
        }
        // Intent first: from here a crash leaves an incomplete record that
        // the retry finishes (or DeleteVolumeGroupSnapshot cleans up).
        let mut record = GroupRecord {
            version: RECORD_VERSION,
            name: req.name.clone(),
            source_volume_ids: req.source_volume_ids.clone(),
            snapshot_ids: members.clone(),
            parameters,
            complete: false,
            created: 0,
        };
        let mut version = self
            .core
            .meta
            .put(
                RecordKind::Group,
                &gid,
                &record,
                existing.as_ref().map(|s| s.version),
            )
            .await?;
        for (vid, sid) in req.source_volume_ids.iter().zip(&members) {
            // Left over from an interrupted attempt: not consistent with
            // the members about to be cut.
            if let Some(stale) = self.core.snapshot(sid).await? {
                self.core
                    .remove_entry(&stale.name, || format!("removing stale member {sid}"))
                    .await?;
            }
            let member = SnapshotRecord {
                version: RECORD_VERSION,
                name: String::new(),
                source_volume_id: vid.clone(),
                group_id: Some(gid.clone()),
            };
            let prior = self
                .core
                .meta
                .get::<SnapshotRecord>(RecordKind::Snapshot, sid)
                .await?
                .map(|s| s.version);
            self.core
                .meta
                .put(RecordKind::Snapshot, sid, &member, prior)
                .await?;
        }
        let pairs: Vec<(String, String)> = req
            .source_volume_ids
            .iter()
            .cloned()
            .zip(members.iter().cloned())
            .collect();
        cut_members(&self.core, &pairs).await?;
        record.complete = true;
        record.created = now_secs();
        version = self
            .core
            .meta
            .put(RecordKind::Group, &gid, &record, Some(version))
            .await?;
        tracing::info!(group = %gid, name = %req.name, members = members.len(), version, "group snapshot created");
        Ok(CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.response(&gid, &record).await?),
        })
    }

    /// Checks a request's `snapshot_ids` against the group's members: the
    /// spec wants INVALID_ARGUMENT when they do not match.
    fn check_members(gid: &str, given: &[String], rec: &GroupRecord) -> CsiResult<()> {
        for (i, s) in given.iter().enumerate() {
            check_id(&format!("snapshot_ids[{i}]"), s)?;
        }
        if given.is_empty() {
            return Ok(());
        }
        let given: BTreeSet<&str> = given.iter().map(String::as_str).collect();
        let ours: BTreeSet<&str> = rec.snapshot_ids.iter().map(String::as_str).collect();
        if given != ours {
            return Err(CsiError::InvalidArgument(format!(
                "snapshot_ids do not match the members of group snapshot {gid}"
            )));
        }
        Ok(())
    }

    async fn delete(
        &self,
        req: DeleteVolumeGroupSnapshotRequest,
    ) -> CsiResult<DeleteVolumeGroupSnapshotResponse> {
        check_id("group_snapshot_id", &req.group_snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        self.core.authorize(&req.secrets).await?;
        let gid = req.group_snapshot_id.as_str();
        let _busy = self.core.inflight.begin(&[gid])?;
        let Some(Stored { record, .. }) = self
            .core
            .meta
            .get::<GroupRecord>(RecordKind::Group, gid)
            .await?
        else {
            for (i, s) in req.snapshot_ids.iter().enumerate() {
                check_id(&format!("snapshot_ids[{i}]"), s)?;
            }
            return Ok(DeleteVolumeGroupSnapshotResponse {});
        };
        Self::check_members(gid, &req.snapshot_ids, &record)?;
        for sid in &record.snapshot_ids {
            if let Some(info) = self.core.snapshot(sid).await? {
                self.core
                    .remove_entry(&info.name, || format!("deleting member {sid}"))
                    .await?;
            }
            self.core.meta.delete(RecordKind::Snapshot, sid).await?;
        }
        self.core.meta.delete(RecordKind::Group, gid).await?;
        tracing::info!(group = %gid, "group snapshot deleted");
        Ok(DeleteVolumeGroupSnapshotResponse {})
    }

    async fn get(
        &self,
        req: GetVolumeGroupSnapshotRequest,
    ) -> CsiResult<GetVolumeGroupSnapshotResponse> {
        check_id("group_snapshot_id", &req.group_snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        let gid = req.group_snapshot_id.as_str();
        let record = match self
            .core
            .meta
            .get::<GroupRecord>(RecordKind::Group, gid)
            .await?
        {
            Some(Stored { record, .. }) if record.complete => record,
            _ => {
                return Err(CsiError::NotFound(format!(
                    "group snapshot {gid} does not exist"
                )));
            }
        };
        Self::check_members(gid, &req.snapshot_ids, &record)?;
        Ok(GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(self.response(gid, &record).await?),
        })
    }
}

rpc_service! {
    impl GroupController for GroupControllerService {
        create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest)
            -> CreateVolumeGroupSnapshotResponse
            = "CreateVolumeGroupSnapshot" => create;
        delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest)
            -> DeleteVolumeGroupSnapshotResponse
            = "DeleteVolumeGroupSnapshot" => delete;
        get_volume_group_snapshot(GetVolumeGroupSnapshotRequest) -> GetVolumeGroupSnapshotResponse
            = "GetVolumeGroupSnapshot" => get;
    }

    async fn group_controller_get_capabilities(
        &self,
        _request: Request<GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(GroupControllerGetCapabilitiesResponse {
            capabilities: vec![GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        }))
    }
}
