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
//! the [`Core`] method that serves it; the bodies live by concern in
//! `volumes`, `publish`, `snapshots`, `listing` and `topology`.

mod listing;
mod publish;
mod snapshots;
mod topology;
mod volumes;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::{Core, answer};
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
pub(super) const MAX_BLOCKS: u64 = peers::map::MAX_BLOCKS;

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
