//! Node-loss recovery: when Kubernetes declares a node out of service, fence the volume locks
//! it held, so that its volumes can be attached elsewhere at once, and tell the owners of the
//! affected claims.
//!
//! An administrator (or a fencing operator) marks a node that is known to be down with the
//! `node.kubernetes.io/out-of-service` taint: Kubernetes then force-deletes its pods and
//! detaches their volumes without waiting for the node. Our volume locks live in the backend
//! and would still name the lost node, so the next node's mapper would be refused with
//! `Locked`. This watcher closes that gap: for every Node carrying the taint it breaks each
//! lock held by that node's identity (the node plugin locks as the Kubernetes node name, see
//! the chart's `ARCHIP_NODE`) through [`peers::fence::fence_node`], logs it, and records a
//! `VolumeFenced` Event on the PersistentVolumeClaim bound to the volume.
//!
//! It is level-triggered and idempotent: every time a Node is seen (initial list, any change,
//! re-list after a dropped watch) a tainted one is fenced again, which breaks only locks the
//! node still holds, so a second pass does nothing and posts no Event. A node without the
//! taint is never touched, whatever its readiness: a partitioned node may still be writing, and
//! only the taint says a human or an operator made sure it is not. A pass that fails (peer set
//! or API server unreachable) is retried on a timer until it succeeds.
//!
//! Kubernetes stays out of the data path: only the controller links this module.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, PersistentVolume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use peers::client::VolumeClient;
use peers::fence::{FenceError, FencedVolume, fence_node};

/// The taint that declares a node lost (Kubernetes' non-graceful node shutdown).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// The reason of the Event recorded on each affected claim.
pub const REASON_FENCED: &str = "VolumeFenced";

/// How long a failed pass waits before it is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeLossError {
    #[error("no Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(transparent)]
    Fence(#[from] FenceError),
    #[error("listing PersistentVolumes for node {node}: {source}")]
    ListVolumes {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("recording the {REASON_FENCED} event of volume {volume} on claim {claim}: {source}")]
    Event {
        volume: String,
        claim: String,
        #[source]
        source: kube::Error,
    },
}

/// Whether a Node carries the out-of-service taint (any value, any effect).
pub fn out_of_service(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == OUT_OF_SERVICE_TAINT))
}

/// The watcher: a Kubernetes client and a client of the controller's peer set.
pub struct NodeLoss {
    kube: Client,
    volumes: Arc<VolumeClient>,
}

impl NodeLoss {
    pub fn new(kube: Client, volumes: Arc<VolumeClient>) -> Self {
        NodeLoss { kube, volumes }
    }

    /// With the client Kubernetes gives a pod (its service account), or the kubeconfig.
    pub async fn in_cluster(volumes: Arc<VolumeClient>) -> Result<Self, NodeLossError> {
        let kube = Client::try_default().await.map_err(NodeLossError::Client)?;
        Ok(NodeLoss::new(kube, volumes))
    }

    /// One pass over one Node: nothing unless it is out of service; otherwise fence the locks
    /// it still holds and record an Event on each affected claim. Returns what was fenced now.
    pub async fn reconcile(&self, node: &Node) -> Result<Vec<FencedVolume>, NodeLossError> {
        if !out_of_service(node) {
            return Ok(Vec::new());
        }
        let name = node.name_any();
        let fenced = fence_node(&self.volumes, &name).await?;
        if fenced.is_empty() {
            tracing::debug!(node = %name, "out-of-service node holds no volume lock");
            return Ok(fenced);
        }
        tracing::warn!(node = %name, volumes = fenced.len(), "out-of-service node: volume locks fenced");
        let pvs: Api<PersistentVolume> = Api::all(self.kube.clone());
        let list = pvs.list(&ListParams::default()).await.map_err(|source| {
            NodeLossError::ListVolumes {
                node: name.clone(),
                source,
            }
        })?;
        for f in &fenced {
            let Some(claim) = list.items.iter().find_map(|pv| claim_of(pv, &f.volume)) else {
                tracing::info!(volume = %f.volume, node = %name, "fenced volume has no bound claim; no event recorded");
                continue;
            };
            self.record(&claim, f, &name).await?;
        }
        Ok(fenced)
    }

    async fn record(
        &self,
        claim: &ObjectReference,
        fenced: &FencedVolume,
        node: &str,
    ) -> Result<(), NodeLossError> {
        let namespace = claim.namespace.clone().unwrap_or_default();
        let claim_name = claim.name.clone().unwrap_or_default();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{claim_name}.")),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(namespace.clone()),
                name: Some(claim_name.clone()),
                uid: claim.uid.clone(),
                ..ObjectReference::default()
            },
            reason: Some(REASON_FENCED.into()),
            message: Some(format!(
                "node {node} is out of service: the lock it held on volume {} (generation {}) \
                 was broken, so the volume can be attached elsewhere and the node's writes are refused",
                fenced.volume, fenced.generation
            )),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(crate::DRIVER_NAME.into()),
                host: None,
            }),
            reporting_component: Some(crate::DRIVER_NAME.into()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        let events: Api<Event> = Api::namespaced(self.kube.clone(), &namespace);
        events
            .create(&PostParams::default(), &event)
            .await
            .map_err(|source| NodeLossError::Event {
                volume: fenced.volume.clone(),
                claim: format!("{namespace}/{claim_name}"),
                source,
            })?;
        Ok(())
    }

    /// Watch Nodes until `shutdown` completes, fencing each out-of-service one as it is seen.
    /// Errors of the watch itself are retried with kube's backoff; a failed pass is retried
    /// every [`RETRY`] while its node stays out of service.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let stream = watcher(nodes.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed: BTreeSet<String> = BTreeSet::new();
        tracing::info!(
            taint = OUT_OF_SERVICE_TAINT,
            "watching Nodes for node-loss recovery"
        );
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                next = stream.next() => match next {
                    Some(Ok(node)) => self.pass(&node, &mut failed).await,
                    Some(Err(e)) => tracing::warn!(error = %e, "watching Nodes"),
                    None => break,
                },
                _ = retry.tick(), if !failed.is_empty() => {
                    for name in std::mem::take(&mut failed) {
                        match nodes.get_opt(&name).await {
                            Ok(Some(node)) => self.pass(&node, &mut failed).await,
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(node = %name, error = %e, "reading Node for a retry");
                                failed.insert(name);
                            }
                        }
                    }
                }
            }
        }
        tracing::info!("node-loss watch stopped");
    }

    async fn pass(&self, node: &Node, failed: &mut BTreeSet<String>) {
        let name = node.name_any();
        match self.reconcile(node).await {
            Ok(_) => {
                failed.remove(&name);
            }
            Err(e) => {
                tracing::error!(node = %name, error = %e, "node-loss recovery failed; will retry");
                failed.insert(name);
            }
        }
    }
}

/// The claim bound to `volume`, if `pv` is this driver's PersistentVolume for it.
fn claim_of(pv: &PersistentVolume, volume: &str) -> Option<ObjectReference> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref()?;
    if csi.driver != crate::DRIVER_NAME || csi.volume_handle != volume {
        return None;
    }
    spec.claim_ref.clone()
}

#[cfg(test)]
mod tests;
