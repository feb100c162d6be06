//! Publication: ControllerPublishVolume and ControllerUnpublishVolume, who
//! may hold a volume at once, and the write-lock handover when a node leaves.

use std::collections::HashMap;

use peers::blocker::LockOwner;
use peers::client::{ClientError, LockState, VolumeKind};

use super::volumes::check_supported;
use crate::core::{Core, client_error};
use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::meta::{Publication, RecordKind, Stored, VolumeRecord};
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::{
    ControllerPublishVolumeRequest, ControllerPublishVolumeResponse,
    ControllerUnpublishVolumeRequest, ControllerUnpublishVolumeResponse,
};
use crate::validate::{
    check_capability, check_id, check_map, check_node_id, check_secrets, is_multi_node_mode,
};

/// Publish context key: the access mode the volume was published with, so
/// that the node knows whether to expect a second node (the live-migration
/// handover of a MULTI_NODE_MULTI_WRITER block volume).
pub const PUBLISH_ACCESS_MODE: &str = "archipelago.io/accessMode";
/// Publish context key: `"true"` if published read-only.
pub const PUBLISH_READONLY: &str = "archipelago.io/readonly";

fn mode_name(mode: i32) -> String {
    Mode::try_from(mode).map_or_else(|_| mode.to_string(), |m| m.as_str_name().to_owned())
}

/// [`is_multi_node_mode`] of a mode as stored in a publication.
fn is_multi_node(mode: i32) -> bool {
    Mode::try_from(mode).is_ok_and(is_multi_node_mode)
}

fn publish_context(p: &Publication) -> HashMap<String, String> {
    HashMap::from([
        (PUBLISH_ACCESS_MODE.to_owned(), mode_name(p.mode)),
        (PUBLISH_READONLY.to_owned(), p.readonly.to_string()),
    ])
}

impl Core {
    pub(super) async fn publish(
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
        self.existing(id, VolumeKind::Volume, "volume").await?;
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
            // A node-local volume is reached only from its home node, whose peer sets
            // register on this host. A node that has none here is unknown to this
            // controller: the spec's NOT_FOUND, not a topology mismatch of a node that
            // exists but sits elsewhere.
            if self.delegation.node_registered(&req.node_id) == Some(false) {
                return Err(CsiError::NotFound(format!(
                    "node {:?} is not known here: it is not this controller's node {home} and no \
                     peer set of it is registered on this host",
                    req.node_id
                )));
            }
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

    pub(super) async fn unpublish(
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
}
