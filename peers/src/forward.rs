//! An operation on a volume in use, in the form its lock holder is asked to perform it.
//!
//! Why a module of its own: the operation is the same whichever way it travels to the
//! holder: through the holder's segment when it runs on this host (the CSI controller's
//! registry path), or in a RADOS notify when it runs on another machine
//! (`blocker::rados::watch`). Keeping it here, free of librados, lets the CSI controller
//! describe what it wants done once and hand it to either path, with or without the `rados`
//! feature.
//!
//! A request may come from anyone who can write the pool, so [`ForwardOp::validate`] is the
//! check every receiver runs before anything else; after it, the same vlmc and mapper
//! validation as any local call applies.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::client::{ClientError, VolumeClient};
use crate::wire::{MAX_GROUP_MEMBERS, VolumeInfo};

/// Longest volume or snapshot name a request may carry (the xseg target limit).
pub const MAX_NAME: usize = xseg::protocol::MAX_NAME;

/// An operation for the holder of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ForwardOp {
    Snapshot {
        volume: String,
        snapshot: String,
    },
    Resize {
        volume: String,
        size: u64,
    },
    Clone {
        source: String,
        name: String,
        size: Option<u64>,
    },
    GroupSnapshot {
        members: Vec<(String, String)>,
    },
}

impl ForwardOp {
    /// The volumes whose lock decides who must perform this.
    pub fn volumes(&self) -> Vec<&str> {
        match self {
            ForwardOp::Snapshot { volume, .. } | ForwardOp::Resize { volume, .. } => vec![volume],
            ForwardOp::Clone { source, .. } => vec![source],
            ForwardOp::GroupSnapshot { members } => members.iter().map(|(v, _)| &**v).collect(),
        }
    }

    fn names(&self) -> Vec<&str> {
        match self {
            ForwardOp::Snapshot { volume, snapshot } => vec![volume, snapshot],
            ForwardOp::Resize { volume, .. } => vec![volume],
            ForwardOp::Clone { source, name, .. } => vec![source, name],
            ForwardOp::GroupSnapshot { members } => {
                members.iter().flat_map(|(v, s)| [&**v, &**s]).collect()
            }
        }
    }

    /// The checks a request passes before anything is done with it.
    pub fn validate(&self) -> Result<(), String> {
        for n in self.names() {
            if n.is_empty() || n.len() > MAX_NAME {
                return Err(format!("a name of {} bytes (1 to {MAX_NAME})", n.len()));
            }
        }
        match self {
            ForwardOp::GroupSnapshot { members } => {
                if members.is_empty() || members.len() > MAX_GROUP_MEMBERS {
                    return Err(format!(
                        "a group of {} members (1 to {MAX_GROUP_MEMBERS})",
                        members.len()
                    ));
                }
                let mut seen = HashSet::new();
                if !members.iter().all(|(v, _)| seen.insert(v)) {
                    return Err("a volume named twice in a group".into());
                }
            }
            ForwardOp::Resize { size: 0, .. } | ForwardOp::Clone { size: Some(0), .. } => {
                return Err("size 0".into());
            }
            _ => {}
        }
        Ok(())
    }

    /// The volume or snapshot that describes the result: what was made or changed (`None`
    /// for a group, whose members are answered one by one).
    pub fn made(&self) -> Option<&str> {
        match self {
            ForwardOp::Snapshot { snapshot, .. } => Some(snapshot),
            ForwardOp::Resize { volume, .. } => Some(volume),
            ForwardOp::Clone { name, .. } => Some(name),
            ForwardOp::GroupSnapshot { .. } => None,
        }
    }

    /// Performs the operation through `client` (a peer set's vlmc) and returns what it made
    /// or changed (`None` for a group).
    pub async fn perform_info(
        &self,
        client: &VolumeClient,
    ) -> Result<Option<VolumeInfo>, ClientError> {
        match self {
            ForwardOp::Snapshot { volume, snapshot } => {
                client.snapshot(volume, snapshot).await.map(Some)
            }
            ForwardOp::Resize { volume, size } => client.resize(volume, *size).await.map(Some),
            ForwardOp::Clone { source, name, size } => {
                client.clone_volume(source, name, *size).await.map(Some)
            }
            ForwardOp::GroupSnapshot { members } => {
                client.snapshot_group(members).await.map(|()| None)
            }
        }
    }

    /// Performs the operation through `client`; returns the size of the volume or snapshot
    /// it made or changed (0 for a group), which is what a RADOS notify reply carries.
    pub async fn perform(&self, client: &VolumeClient) -> Result<u64, ClientError> {
        self.perform_info(client)
            .await
            .map(|i| i.map_or(0, |i| i.size))
    }
}
