//! The node-loss path: fence every volume lock a lost node holds, so that its volumes can be
//! written elsewhere and whatever the lost node might still send is refused.
//!
//! A volume's lock lives in the backend with its holder (the node id a node plugin's mapper
//! locks as) and a fencing generation. Breaking it frees the lock without a new holder; the
//! next node to open the volume takes it at a higher generation, and the lost node's map
//! writes carry a stale fence and are refused by the backend. On RADOS the break first
//! blocklists the holder's librados client, so the cluster refuses everything the lost node
//! might still send, data writes its vlmc has cached included (tests/rados_nodes.rs freezes a
//! node with SIGSTOP to show it). This is what `archip lock break` does for one volume;
//! [`fence_node`] does it for every volume a node holds, and is the one entry point the
//! Kubernetes node-loss watcher calls.
//!
//! Rules that keep it safe to run at any time, as often as wanted:
//! - Only a lock whose holder is exactly the lost node is broken; a free lock, a lock held by
//!   another node and a snapshot (never locked) are left alone. So a second pass finds nothing
//!   to do, and a node that came back and was not declared lost is never touched.
//! - The check and the break are two calls, so a lock can move between them (another node
//!   taking a shared volume over at that instant). The break reports the lock as it was; if
//!   that is not the lost node's lock, the broken holder is named in an error log so that an
//!   operator knows that node must reopen the volume. Its writes are refused meanwhile, never
//!   misdirected: fencing errs on the safe side.

use crate::client::{ClientError, VolumeClient, VolumeKind};

/// A volume whose lock was taken from the lost node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedVolume {
    pub volume: String,
    /// The generation the lost node held; its fence at this generation is stale from now on.
    pub generation: u64,
}

/// Why fencing a node stopped. Locks broken before the failure stay broken; running
/// [`fence_node`] again carries on where it stopped.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fencing node {node}: listing volumes: {source}")]
    List {
        node: String,
        #[source]
        source: ClientError,
    },
    #[error("fencing node {node}: volume {volume}: {source}")]
    Volume {
        node: String,
        volume: String,
        #[source]
        source: ClientError,
    },
}

/// Breaks every volume lock held by `node`, through a peer set's client, and returns the
/// volumes fenced (empty when the node holds none: fencing is idempotent). Each break is
/// logged by the mapper that performs it and here.
pub async fn fence_node(
    client: &VolumeClient,
    node: &str,
) -> Result<Vec<FencedVolume>, FenceError> {
    let volumes = client.list().await.map_err(|source| FenceError::List {
        node: node.to_string(),
        source,
    })?;
    let mut fenced = Vec::new();
    for v in volumes.iter().filter(|v| v.kind == VolumeKind::Volume) {
        let failed = |source| FenceError::Volume {
            node: node.to_string(),
            volume: v.name.clone(),
            source,
        };
        let held = match client.lock_info(&v.name).await {
            Ok(l) => l,
            // Deleted since the listing: nothing left to fence.
            Err(ClientError::NotFound(_)) => continue,
            Err(e) => return Err(failed(e)),
        };
        if held.holder.as_deref() != Some(node) {
            continue;
        }
        let before = match client.break_lock(&v.name).await {
            Ok(b) => b,
            Err(ClientError::NotFound(_)) => continue,
            Err(e) => return Err(failed(e)),
        };
        match before.holder.as_deref() {
            Some(h) if h == node => {
                tracing::warn!(
                    volume = %v.name,
                    node,
                    generation = before.generation,
                    "node lost: volume lock fenced"
                );
                fenced.push(FencedVolume {
                    volume: v.name.clone(),
                    generation: before.generation,
                });
            }
            // Released between the check and the break: nothing was taken from anyone.
            None => {}
            Some(other) => tracing::error!(
                volume = %v.name,
                lost = node,
                broken = other,
                generation = before.generation,
                "node lost: the lock moved to another node just before the break, whose lock \
                 was broken instead; that node must reopen the volume"
            ),
        }
    }
    Ok(fenced)
}
