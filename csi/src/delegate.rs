//! Forwarding an operation to the peer set that holds the volume's lock.
//!
//! Why: a volume is written through one mapper at a time, the holder of its lock. In the
//! Kubernetes layout the controller (`archip controller`) and the node (`archip node`) run
//! separate peer sets over the same backend, so a volume staged on the node is locked by the
//! node's mapper and the controller's own mapper must not change its map: CreateSnapshot,
//! ControllerExpandVolume, a clone of the live volume and a group snapshot would all fail with
//! FAILED_PRECONDITION while a pod uses the volume, which is exactly when users take
//! snapshots and grow volumes. Breaking the lock is not an answer (it fences a live writer).
//! The answer librbd gives is to ask the lock owner to do it; here that means sending the same
//! request to the holder's vlmc over the holder's segment. That vlmc drains the volume's
//! in-flight I/O around the snapshot or resize, so the snapshot is crash-consistent, and its
//! mapper, which holds the lock, writes the map. The result lands in the shared backend, where
//! the controller's own peer set reads it as usual.
//!
//! How the holder is found: the lock names an owner id; the host-local
//! [registry](peers::registry) maps a live owner to its segment. Only a peer set on this host
//! can be reached (segments are shared memory), and only one over the same backend (compared by
//! [`BackendId`](peers::blocker::BackendId): for files, device and inode, so different mount paths of one directory match). Anything
//! else keeps FAILED_PRECONDITION, now with a message that names the holder and the way out:
//! a dead node's lock is broken by ControllerUnpublishVolume or `archip lock break`.
//!
//! The local attempt comes first: the mapper refuses a locked volume before changing anything,
//! so a refused attempt costs one round trip and leaves no trace, and unlocked volumes (the
//! common case outside a running pod) pay nothing for forwarding.
//!
//! A group snapshot is one barrier on one vlmc, so every member must be cut by one peer set:
//! the lock holders are looked up first, and members held by different owners are refused
//! rather than cut at different moments.
//!
//! On RADOS the holder may run on another machine, where no segment reaches: when the registry
//! knows no peer set of the holder on this host, the operation goes to the holder's peer set
//! as a RADOS notify on its node object ([`peers::blocker::rados::watch`]), which performs it
//! through its own vlmc (the same drain barrier) and answers in the ack. A holder that does
//! not answer is FAILED_PRECONDITION naming it and saying to fence it, never a hang.
//!
//! One client per holder is kept (a client holds a port and a receiver thread on that
//! segment); it is dropped when the registry entry changes (the holder restarted), when the
//! segment disappears, or when a call through it finds the peers gone.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peers::backend::{BackendConfig, Store};
use peers::client::{ClientError, LockState, VolumeClient, VolumeInfo};
use peers::forward::ForwardOp;
use peers::peerset::Ports;
use peers::registry::{PeerSetEntry, Registry};
use xseg::Segment;

use crate::core::{Core, client_error};
use crate::errors::{CsiError, CsiResult};

/// How long a freshly connected holder has to answer a PING.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a holder's peer set.
#[derive(Debug)]
struct Remote {
    entry: PeerSetEntry,
    client: Arc<VolumeClient>,
}

/// The controller's forwarding state.
#[derive(Debug)]
pub(crate) struct Delegation {
    /// Where peer sets register (`None`: forwarding is off).
    registry: Option<Registry>,
    /// The backend every reachable holder must share with us.
    backend: BackendConfig,
    /// This controller's own segment, never a forwarding target.
    own_segment: PathBuf,
    remotes: Mutex<HashMap<String, Arc<Remote>>>,
    /// Sends operations to holders on other machines (RADOS backends only); connected on
    /// first use and kept.
    #[cfg(feature = "rados")]
    notifier: tokio::sync::Mutex<Option<Arc<peers::blocker::rados::watch::Notifier>>>,
}

/// Why no holder's peer set can take an operation.
#[derive(Debug)]
struct Unreachable(String);

impl Delegation {
    pub(crate) fn new(
        registry: Option<PathBuf>,
        backend: BackendConfig,
        own_segment: &Path,
    ) -> Self {
        Self {
            registry: registry.map(Registry::new),
            backend,
            own_segment: own_segment.to_owned(),
            remotes: Mutex::new(HashMap::new()),
            #[cfg(feature = "rados")]
            notifier: tokio::sync::Mutex::new(None),
        }
    }

    /// The notifier of a RADOS backend (`None` for any other), connecting it on first use.
    #[cfg(feature = "rados")]
    async fn notifier(
        &self,
    ) -> Option<Result<Arc<peers::blocker::rados::watch::Notifier>, String>> {
        if !matches!(self.backend, BackendConfig::Rados(_)) {
            return None;
        }
        let mut slot = self.notifier.lock().await;
        if let Some(n) = slot.as_ref() {
            return Some(Ok(n.clone()));
        }
        let backend = self.backend.clone();
        // Connecting is a blocking librados call (monitor round trips).
        let made = tokio::task::spawn_blocking(move || {
            let blocker = backend
                .open_rados(Store::Objects)
                .map_err(|e| e.to_string())?;
            peers::blocker::rados::watch::Notifier::new(&blocker)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("connecting the notifier: {e}")));
        if let Ok(n) = &made {
            *slot = Some(n.clone());
        }
        Some(made)
    }

    fn remotes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Remote>>> {
        // A panic while holding the lock leaves a plain map behind: still usable.
        self.remotes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets the cached client of `owner` (its peers went away).
    fn forget(&self, owner: &str) {
        self.remotes().remove(owner);
    }

    /// A client of the peer set registered as `owner`, connecting (and probing) it if needed.
    async fn client(&self, owner: &str) -> Result<Arc<VolumeClient>, Unreachable> {
        let registry = self.registry.as_ref().ok_or_else(|| {
            Unreachable("forwarding to lock holders is off (no peer-set registry)".into())
        })?;
        let entry = match registry.lookup(owner) {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.forget(owner);
                return Err(Unreachable(format!(
                    "no running peer set of {owner} is registered on this host (in {})",
                    registry.dir().display()
                )));
            }
            Err(e) => return Err(Unreachable(e.to_string())),
        };
        if entry.segment == self.own_segment {
            return Err(Unreachable(format!(
                "{owner} is registered with this controller's own segment"
            )));
        }
        let ours = self.backend.identity().map_err(|e| {
            Unreachable(format!(
                "this controller's backend {} cannot be compared with the one {owner}'s peer set serves: {e}",
                self.backend.location(Store::Objects)
            ))
        })?;
        if !entry.same_backend(&ours) {
            let theirs = match &entry.backend_id {
                Some(_) => entry.location.clone(),
                None => "a backend named by an older version".to_owned(),
            };
            return Err(Unreachable(format!(
                "the peer set of {owner} on this host serves {theirs}, not this controller's {}",
                self.backend.location(Store::Objects)
            )));
        }
        if !entry.segment.exists() {
            self.forget(owner);
            return Err(Unreachable(format!(
                "the segment {} of {owner}'s peer set is gone",
                entry.segment.display()
            )));
        }
        if let Some(r) = self.remotes().get(owner)
            && r.entry == entry
        {
            return Ok(r.client.clone());
        }
        let client = Self::connect(&entry)?;
        match tokio::time::timeout(PROBE_TIMEOUT, client.ping(Ports::VLMC)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Unreachable(format!(
                    "the peer set of {owner} does not answer: {e}"
                )));
            }
            Err(_) => {
                return Err(Unreachable(format!(
                    "the peer set of {owner} did not answer within {PROBE_TIMEOUT:?}"
                )));
            }
        }
        tracing::info!(holder = %owner, segment = %entry.segment.display(), "connected to a lock holder's peer set");
        self.remotes().insert(
            owner.to_owned(),
            Arc::new(Remote {
                entry,
                client: client.clone(),
            }),
        );
        Ok(client)
    }

    /// Whether a peer set of `node` runs on this host, as far as the registry can tell:
    /// `None` when there is no registry to ask or it cannot be read, so a caller keeps its
    /// old answer rather than call a node missing on no evidence.
    pub(crate) fn node_registered(&self, node: &str) -> Option<bool> {
        let registry = self.registry.as_ref()?;
        match registry.lookup(node) {
            Ok(found) => Some(found.is_some()),
            Err(e) => {
                tracing::warn!(node, error = %e, "peer-set registry unreadable; node presence unknown");
                None
            }
        }
    }

    fn connect(entry: &PeerSetEntry) -> Result<Arc<VolumeClient>, Unreachable> {
        let seg: Arc<Segment> = Segment::attach(&entry.segment).map_err(|e| {
            Unreachable(format!(
                "attaching the segment {} of {}: {e}",
                entry.segment.display(),
                entry.owner
            ))
        })?;
        VolumeClient::connect(&seg).map(Arc::new).map_err(|e| {
            Unreachable(format!(
                "connecting to the peer set of {}: {e}",
                entry.owner
            ))
        })
    }
}

/// The message of a refused operation on a volume whose holder cannot be reached.
fn held_elsewhere(what: &str, volume: &str, holder: &str, why: &str) -> CsiError {
    CsiError::FailedPrecondition(format!(
        "{what}: volume {volume} is in use by node {holder:?}, whose peer set would have to do it, but {why}. \
         If {holder} is running on another host, retry once the volume is detached from it; \
         if {holder} is gone, break its lock: ControllerUnpublishVolume of {volume} from {holder} \
         (what the CO does when it detaches the volume) or `archip lock break {volume}`"
    ))
}

/// Whether an error says the peers behind a client are gone (drop that client).
fn peers_gone(e: &ClientError) -> bool {
    matches!(e, ClientError::PeerGone(_) | ClientError::Transport(_))
}

impl Core {
    /// Performs `op` through this controller's peer set; if its volume is locked by another
    /// node, has that node's peer set perform it (see the [module](self)) and returns what
    /// was made or changed. `rpc` names the RPC for the log, `what` the action for error
    /// messages. Not for groups: [`Core::snapshot_group`].
    pub(crate) async fn on_holder(
        &self,
        rpc: &'static str,
        what: &str,
        op: ForwardOp,
    ) -> CsiResult<VolumeInfo> {
        debug_assert!(op.made().is_some(), "groups go through snapshot_group");
        let holder = match op.perform_info(&self.client).await {
            Ok(info) => return self.made(what, &op, info).await,
            Err(ClientError::Locked { holder, .. }) if !holder.is_empty() => holder,
            Err(e) => return Err(client_error(what, e)),
        };
        let volume = op.volumes().join(", ");
        match self.delegation.client(&holder).await {
            Ok(remote) => {
                tracing::info!(volume, rpc, holder = %holder, "forwarding to the lock holder's peer set");
                let info = op.perform_info(&remote).await.map_err(|e| {
                    if peers_gone(&e) {
                        self.delegation.forget(&holder);
                    }
                    client_error(what, e)
                })?;
                self.made(what, &op, info).await
            }
            Err(Unreachable(why)) => {
                self.notify_holder(rpc, what, &volume, &holder, &op, why)
                    .await?;
                self.made(what, &op, None).await
            }
        }
    }

    /// What a performed `op` made: the answer of the peer set that performed it, or, when
    /// it ran elsewhere and only its outcome is known, read back from the shared backend.
    async fn made(
        &self,
        what: &str,
        op: &ForwardOp,
        answered: Option<VolumeInfo>,
    ) -> CsiResult<VolumeInfo> {
        if let Some(info) = answered {
            return Ok(info);
        }
        let name = op.made().unwrap_or_default();
        self.client
            .info(name)
            .await
            .map_err(|e| client_error(&format!("{what}: reading back {name}"), e))
    }

    /// Cuts the member snapshots `(volume, snapshot)` under one barrier on one peer set:
    /// this controller's if no member is locked by another node, else the one holder's.
    /// Members locked by different nodes cannot be cut together.
    pub(crate) async fn snapshot_group(
        &self,
        rpc: &'static str,
        members: &[(String, String)],
    ) -> CsiResult<()> {
        let what = "group snapshot";
        let mut held: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (v, _) in members {
            match self.client.lock_info(v).await {
                Ok(LockState {
                    holder: Some(h), ..
                }) => held.entry(h).or_default().push(v),
                Ok(_) | Err(ClientError::NotFound(_)) => {}
                Err(e) => return Err(client_error(&format!("reading the lock of {v}"), e)),
            }
        }
        // Our own mapper can cut what it holds, but not together with another node's.
        let own = self.config.node_id.as_str();
        if held.len() > 1 {
            let who: Vec<String> = held
                .iter()
                .map(|(h, vs)| format!("node {h} holds {}", vs.join(", ")))
                .collect();
            return Err(CsiError::FailedPrecondition(format!(
                "the volumes of the group are in use by different nodes ({}); a group snapshot is \
                 cut under one I/O barrier by one node's peer set, so all members must be attached \
                 to the same node (or detached)",
                who.join("; ")
            )));
        }
        let Some((holder, held_members)) = held.into_iter().next().filter(|(h, _)| h != own) else {
            return (self.client.snapshot_group(members).await).map_err(|e| client_error(what, e));
        };
        let volumes = held_members.join(", ");
        match self.delegation.client(&holder).await {
            Ok(remote) => {
                tracing::info!(volumes, rpc, holder = %holder, "forwarding to the lock holder's peer set");
                remote.snapshot_group(members).await.map_err(|e| {
                    if peers_gone(&e) {
                        self.delegation.forget(&holder);
                    }
                    client_error(what, e)
                })
            }
            Err(Unreachable(why)) => {
                let op = ForwardOp::GroupSnapshot {
                    members: members.to_vec(),
                };
                self.notify_holder(rpc, what, &volumes, &holder, &op, why)
                    .await
            }
        }
    }

    /// Sends `op` to `holder`'s peer set on another machine (RADOS), or, where there is no
    /// such path, refuses with what the caller can do (`why` the host-local path failed).
    #[cfg_attr(not(feature = "rados"), allow(unused_variables))]
    async fn notify_holder(
        &self,
        rpc: &'static str,
        what: &str,
        volume: &str,
        holder: &str,
        op: &ForwardOp,
        why: String,
    ) -> CsiResult<()> {
        #[cfg(feature = "rados")]
        if let Some(notifier) = self.delegation.notifier().await {
            use peers::blocker::rados::watch::ForwardError;
            let notifier = notifier.map_err(|e| {
                CsiError::Unavailable(format!(
                    "{what}: volume {volume} is in use by node {holder:?}; reaching it over RADOS: {e}"
                ))
            })?;
            tracing::info!(volume, rpc, holder = %holder, "forwarding to the lock holder over RADOS notify");
            return match notifier.forward(holder, op).await {
                Ok(_) => Ok(()),
                Err(ForwardError::Refused { source, .. }) => Err(client_error(what, source)),
                Err(ForwardError::Invalid(m)) => {
                    Err(CsiError::InvalidArgument(format!("{what}: {m}")))
                }
                Err(e @ ForwardError::Unanswered { .. }) => {
                    Err(held_elsewhere(what, volume, holder, &e.to_string()))
                }
                Err(ForwardError::Local(e)) => Err(client_error(what, e)),
                Err(e @ (ForwardError::BadReply { .. } | ForwardError::Rados(_))) => {
                    Err(CsiError::Unavailable(format!("{what}: {e}")))
                }
            };
        }
        Err(held_elsewhere(what, volume, holder, &why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peers::registry::Registration;

    fn registered(reg: &Path, owner: &str, segment: &Path, objects: &Path) -> Registration {
        std::fs::create_dir_all(objects).unwrap();
        let id = peers::blocker::file::dir_identity(objects).unwrap();
        let location = objects.display().to_string();
        Registry::new(reg)
            .register(PeerSetEntry::current(owner, segment, &location, id).unwrap())
            .unwrap()
    }

    fn why(r: Result<Arc<VolumeClient>, Unreachable>) -> String {
        match r {
            Ok(_) => panic!("expected no holder"),
            Err(Unreachable(why)) => why,
        }
    }

    #[tokio::test]
    async fn holders_that_cannot_take_the_operation() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("peersets");
        let ours = dir.path().join("a/objects");
        std::fs::create_dir_all(&ours).unwrap();
        let own = BackendConfig::file(dir.path().join("a"));
        let own_segment = dir.path().join("own-segment");
        let d = Delegation::new(Some(reg.clone()), own.clone(), &own_segment);

        assert!(why(d.client("node-1").await).contains("no running peer set of node-1"));
        assert!(why(d.client("../etc").await).contains("invalid peer-set owner"));

        // Another directory behind the same owner id: never forwarded to.
        let _other = registered(
            &reg,
            "node-2",
            Path::new("/dev/shm/x"),
            &dir.path().join("b/objects"),
        );
        assert!(why(d.client("node-2").await).contains("serves"));

        // Our own segment.
        let _own = registered(&reg, "node-3", &own_segment, &ours);
        assert!(why(d.client("node-3").await).contains("own segment"));

        // The right backend, but the segment is gone.
        let _gone = registered(&reg, "node-4", &dir.path().join("no-segment"), &ours);
        assert!(why(d.client("node-4").await).contains("is gone"));

        let off = Delegation::new(None, own, &own_segment);
        assert!(why(off.client("node-4").await).contains("off"));

        // The same, with the backend described as configuration: its objects are `a/objects`.
        let d = Delegation::new(
            Some(reg.clone()),
            BackendConfig::file(dir.path().join("a")),
            &own_segment,
        );
        assert!(why(d.client("node-2").await).contains("serves"));
        assert!(why(d.client("node-4").await).contains("is gone"));
        let elsewhere = Delegation::new(
            Some(reg),
            BackendConfig::file(dir.path().join("b")),
            &own_segment,
        );
        assert!(why(elsewhere.client("node-4").await).contains("serves"));
    }
}
