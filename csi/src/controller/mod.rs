//! The Controller service: volumes, snapshots, clones, publication,
//! expansion, capacity and listing, over a running peer set.
//!
//! Every RPC has the same shape: check the request (INVALID_ARGUMENT, via
//! [`crate::validate`]), take the object's id in the [in-flight
//! set](crate::inflight) (ABORTED), then act on the volume catalogue through
//! [`VolumeClient`](peers::client::VolumeClient) and on the controller's
//! [records](crate::meta).
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
//!
//! This file holds the RPC entry points, which only hand each request to
//! the `Core` method that serves it; the bodies live by concern in
//! `volumes`, `publish`, `snapshots`, `listing` and `topology`.

mod listing;
mod publish;
mod snapshots;
mod topology;
mod volumes;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::{Core, rpc_service};
use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::{self, rpc};
use crate::pb::{
    ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListVolumesRequest, ListVolumesResponse, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse,
};

pub use crate::core::ControllerConfig;
pub use publish::{PUBLISH_ACCESS_MODE, PUBLISH_READONLY};
pub use topology::TOPOLOGY_KEY;
pub use volumes::context;

/// Most blocks a volume may have (the mapper's bound).
const MAX_BLOCKS: u64 = peers::map_format::MAX_BLOCKS;

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

rpc_service! {
    impl Controller for ControllerService {
        create_volume(CreateVolumeRequest) -> CreateVolumeResponse
            = "CreateVolume" => core.create_volume;
        delete_volume(DeleteVolumeRequest) -> DeleteVolumeResponse
            = "DeleteVolume" => core.delete_volume;
        controller_publish_volume(ControllerPublishVolumeRequest) -> ControllerPublishVolumeResponse
            = "ControllerPublishVolume" => core.publish;
        controller_unpublish_volume(ControllerUnpublishVolumeRequest)
            -> ControllerUnpublishVolumeResponse
            = "ControllerUnpublishVolume" => core.unpublish;
        validate_volume_capabilities(ValidateVolumeCapabilitiesRequest)
            -> ValidateVolumeCapabilitiesResponse
            = "ValidateVolumeCapabilities" => core.validate;
        list_volumes(ListVolumesRequest) -> ListVolumesResponse
            = "ListVolumes" => core.list_volumes;
        get_capacity(GetCapacityRequest) -> GetCapacityResponse
            = "GetCapacity" => core.get_capacity;
        create_snapshot(CreateSnapshotRequest) -> CreateSnapshotResponse
            = "CreateSnapshot" => core.create_snapshot;
        delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse
            = "DeleteSnapshot" => core.delete_snapshot;
        list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse
            = "ListSnapshots" => core.list_snapshots;
        get_snapshot(GetSnapshotRequest) -> GetSnapshotResponse
            = "GetSnapshot" => core.get_snapshot;
        controller_expand_volume(ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse
            = "ControllerExpandVolume" => core.expand;
        controller_get_volume(ControllerGetVolumeRequest) -> ControllerGetVolumeResponse
            = "ControllerGetVolume" => core.get_volume;
        controller_modify_volume(ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse
            = "ControllerModifyVolume" => core.modify;
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: controller_capabilities(),
        }))
    }
}
