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
//! One client per holder is kept (a client holds a port and a receiver thread on that
//! segment); it is dropped when the registry entry changes (the holder restarted), when the
//! segment disappears, or when a call through it finds the peers gone.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use peers::backend::{BackendConfig, Store};
use peers::client::{ClientError, LockState, VolumeClient};
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
        }
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
    /// Runs `call` against this controller's peer set; if the volume is locked by another
    /// node, runs it again on that node's peer set (see the [module](self)). `op` names the
    /// RPC for the log, `what` the action for error messages.
    pub(crate) async fn on_holder<T, F, Fut>(
        &self,
        op: &'static str,
        volume: &str,
        what: &str,
        call: F,
    ) -> CsiResult<T>
    where
        F: Fn(Arc<VolumeClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let holder = match call(self.client.clone()).await {
            Err(ClientError::Locked { holder, .. }) if !holder.is_empty() => holder,
            r => return r.map_err(|e| client_error(what, e)),
        };
        let remote = self
            .delegation
            .client(&holder)
            .await
            .map_err(|Unreachable(why)| held_elsewhere(what, volume, &holder, &why))?;
        tracing::info!(volume, op, holder = %holder, "forwarding to the lock holder's peer set");
        call(remote).await.map_err(|e| {
            if peers_gone(&e) {
                self.delegation.forget(&holder);
            }
            client_error(what, e)
        })
    }

    /// The peer set that can cut all of `volumes` under one barrier: this controller's if
    /// none is locked by another node, else the one holder's. Members locked by different
    /// nodes cannot be cut together.
    pub(crate) async fn group_target(
        &self,
        op: &'static str,
        volumes: &[String],
    ) -> CsiResult<(Arc<VolumeClient>, Option<String>)> {
        let mut held: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for v in volumes {
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
        let Some((holder, members)) = held.into_iter().next().filter(|(h, _)| h != own) else {
            return Ok((self.client.clone(), None));
        };
        let what = "group snapshot";
        let client = self
            .delegation
            .client(&holder)
            .await
            .map_err(|Unreachable(why)| held_elsewhere(what, &members.join(", "), &holder, &why))?;
        tracing::info!(volumes = ?volumes, op, holder = %holder, "forwarding to the lock holder's peer set");
        Ok((client, Some(holder)))
    }

    /// Reports a failed call through a holder's client, forgetting the client if its peers
    /// are gone.
    pub(crate) fn holder_failed(
        &self,
        holder: Option<&str>,
        what: &str,
        e: ClientError,
    ) -> CsiError {
        if let Some(h) = holder
            && peers_gone(&e)
        {
            self.delegation.forget(h);
        }
        client_error(what, e)
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
