//! Snapshots: CreateSnapshot (cut by the peer set holding the volume's lock),
//! DeleteSnapshot, ListSnapshots and GetSnapshot.

use peers::client::VolumeKind;
use peers::forward::ForwardOp;

use super::listing::{check_max_entries, page, parse_token};
use crate::core::Core;
use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::meta::{RECORD_VERSION, RecordKind, SnapshotRecord, Stored};
use crate::params;
use crate::pb::{
    CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    list_snapshots_response,
};
use crate::validate::{check_id, check_map, check_name, check_secrets};

impl Core {
    pub(super) async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> CsiResult<CreateSnapshotResponse> {
        check_name("name", &req.name)?;
        check_id("source_volume_id", &req.source_volume_id)?;
        check_secrets("secrets", &req.secrets)?;
        check_map("parameters", &req.parameters)?;
        params::check_snapshot_params(&req.parameters)?;
        self.authorize(&req.secrets).await?;
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
        self.existing(source, VolumeKind::Volume, "source volume")
            .await?;
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
        let op = ForwardOp::Snapshot {
            volume: source.to_owned(),
            snapshot: id.clone(),
        };
        let made = self
            .on_holder("CreateSnapshot", &format!("snapshotting {source}"), op)
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

    pub(super) async fn delete_snapshot(
        &self,
        req: DeleteSnapshotRequest,
    ) -> CsiResult<DeleteSnapshotResponse> {
        check_id("snapshot_id", &req.snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        self.authorize(&req.secrets).await?;
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
            self.remove_entry(&info.name, || format!("deleting snapshot {id}"))
                .await?;
            tracing::info!(snapshot = %id, "snapshot deleted");
        }
        self.meta.delete(RecordKind::Snapshot, id).await?;
        Ok(DeleteSnapshotResponse {})
    }

    pub(super) async fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> CsiResult<ListSnapshotsResponse> {
        check_secrets("secrets", &req.secrets)?;
        check_max_entries(req.max_entries)?;
        let after = parse_token(&req.starting_token)?;
        let catalogue = self
            .catalogue(VolumeKind::Snapshot, "listing snapshots")
            .await?;
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

    pub(super) async fn get_snapshot(
        &self,
        req: GetSnapshotRequest,
    ) -> CsiResult<GetSnapshotResponse> {
        check_id("snapshot_id", &req.snapshot_id)?;
        check_secrets("secrets", &req.secrets)?;
        let id = req.snapshot_id.as_str();
        let info = self.existing(id, VolumeKind::Snapshot, "snapshot").await?;
        let rec = self
            .meta
            .get::<SnapshotRecord>(RecordKind::Snapshot, id)
            .await?
            .map(|s| s.record);
        Ok(GetSnapshotResponse {
            snapshot: Some(self.csi_snapshot(id, &info, rec.as_ref())),
        })
    }
}
