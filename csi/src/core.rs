//! The controller's shared core: the state the Controller and GroupController
//! services share, the mapping of peer errors to CSI errors, and the one
//! wrapper every RPC body runs in.
//!
//! It sits below the services (`controller`, `group_controller`) and the
//! forwarding to lock holders ([`crate::delegate`]): each of them extends
//! [`Core`] with its own methods and none names another, so each can change
//! without the others. Only [`crate::ControllerPlugin`] puts them together.
//! The one way back is the [`Delegation`](crate::delegate::Delegation) state
//! that `Core` carries for the forwarding methods.

use std::path::PathBuf;
use std::sync::Arc;

use peers::client::{ClientError, VolumeClient, VolumeInfo, VolumeKind};
use tonic::{Response, Status};

use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::params::VolumeParams;
use peers::backend::{BackendConfig, BackendKind};

use crate::inflight::InFlight;
use crate::meta::{MetaStore, SnapshotRecord};
use crate::pb::Snapshot;

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The node holding the file backend's directory: the only node that
    /// reaches volumes of a StorageClass that does not say `shared: "true"`.
    pub node_id: String,
    /// The file backend's directory (the data directory of this node).
    pub data_dir: PathBuf,
    /// The backend the volumes and the records live on: what GetCapacity asks, and what a
    /// lock holder's peer set must share before an operation is forwarded to it.
    pub backend: BackendConfig,
    /// Size of a volume whose request gives no capacity.
    pub default_capacity: u64,
    /// The peer-set registry to find the holder of a volume's lock in, to forward an
    /// operation to it ([`crate::delegate`]); `None` turns forwarding off.
    pub peerset_registry: Option<PathBuf>,
}

impl ControllerConfig {
    /// A configuration with a 1 GiB default capacity.
    pub fn new(node_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            node_id: node_id.into(),
            backend: BackendConfig::file(&data_dir),
            data_dir,
            default_capacity: 1 << 30,
            peerset_registry: Some(PathBuf::from(peers::registry::DEFAULT_DIR)),
        }
    }
}

/// The controller's state, shared by the Controller and GroupController
/// services.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) client: Arc<VolumeClient>,
    pub(crate) meta: MetaStore,
    pub(crate) config: ControllerConfig,
    pub(crate) inflight: Arc<InFlight>,
    pub(crate) delegation: crate::delegate::Delegation,
    /// Checks the credentials in requests' secrets.
    pub(crate) authorizer: crate::secrets::Authorizer,
}

/// Maps a peer error to the code the spec wants. `what` names the object
/// for the message.
pub(crate) fn client_error(what: &str, e: ClientError) -> CsiError {
    match e {
        ClientError::NotFound(m) => CsiError::NotFound(format!("{what}: {m}")),
        ClientError::AlreadyExists(m) => CsiError::AlreadyExists(format!("{what}: {m}")),
        ClientError::InvalidArgument(m) => CsiError::InvalidArgument(format!("{what}: {m}")),
        ClientError::Locked { holder, message } => {
            CsiError::FailedPrecondition(format!("{what} is in use by node {holder:?}: {message}"))
        }
        ClientError::OutOfRange(m) => CsiError::OutOfRange(format!("{what}: {m}")),
        ClientError::ReadOnly(m) => CsiError::FailedPrecondition(format!("{what}: {m}")),
        e @ (ClientError::Fenced(_)
        | ClientError::PeerGone(_)
        | ClientError::Timeout(_)
        | ClientError::Transport(_)) => {
            CsiError::Unavailable(format!("{what}: the peer set did not answer: {e}"))
        }
        ClientError::NoSpace(m) => {
            CsiError::ResourceExhausted(format!("{what}: the backend is out of space: {m}"))
        }
        ClientError::Io(m) if crate::errors::says_out_of_space(&m) => {
            CsiError::ResourceExhausted(format!("{what}: the backend is out of space: {m}"))
        }
        ClientError::Io(m) => CsiError::Internal(format!("{what}: {m}")),
    }
}

/// Runs one RPC body and turns its error into a status; logs failures
/// (never the request: it may carry secrets, and `Debug` hides them anyway).
pub(crate) async fn answer<T>(
    rpc: &'static str,
    f: impl std::future::Future<Output = CsiResult<T>>,
) -> Result<Response<T>, Status> {
    match f.await {
        Ok(r) => Ok(Response::new(r)),
        Err(e) => {
            tracing::debug!(rpc, code = ?e.code(), error = %e, "rpc failed");
            Err(e.into())
        }
    }
}

/// Implements a CSI service trait whose RPCs each hand their request to one
/// method and run it in [`answer`]: one line per RPC says which method
/// serves it and what the logs call it, so the entry points cannot drift
/// apart. RPCs that do more than that are written out after the table.
///
/// ```text
/// rpc_service! {
///     impl Controller for ControllerService {
///         create_volume(CreateVolumeRequest) -> CreateVolumeResponse
///             = "CreateVolume" => core.create_volume;
///     }
///     // other trait methods, written as usual
/// }
/// ```
macro_rules! rpc_service {
    (
        impl $service_trait:ident for $service:ty {
            $(
                $rpc:ident($request:ty) -> $response:ty = $name:literal => $($method:ident).+;
            )*
        }
        $($other:item)*
    ) => {
        #[tonic::async_trait]
        impl $service_trait for $service {
            $(
                async fn $rpc(
                    &self,
                    request: tonic::Request<$request>,
                ) -> Result<tonic::Response<$response>, tonic::Status> {
                    $crate::core::answer($name, self.$($method).+(request.into_inner())).await
                }
            )*
            $($other)*
        }
    };
}
pub(crate) use rpc_service;

/// A catalogue time (seconds since the epoch) as a protobuf timestamp.
pub(crate) fn timestamp(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs.min(i64::MAX as u64) as i64,
        nanos: 0,
    }
}

impl Core {
    /// The node a volume of these parameters is pinned to: this controller's node for the file
    /// backend's node-local directory, none for a shared directory or RADOS (every node
    /// reaches the pool).
    pub(crate) fn pinned_node(&self, params: &VolumeParams) -> Option<String> {
        let backend = params.backend.unwrap_or(self.config.backend.kind());
        (backend == BackendKind::File && !params.shared).then(|| self.config.node_id.clone())
    }

    /// Checks that a class's backend is the one this driver serves: its kind, and for RADOS
    /// the cluster (by fsid), the pool and the namespace. A class cannot point the driver
    /// elsewhere, and a mismatch is a misconfiguration the user must see, not a volume put
    /// somewhere else.
    pub(crate) fn check_target(&self, params: &VolumeParams) -> CsiResult<()> {
        let serves = self.config.backend.kind();
        let asked = params.backend.unwrap_or(serves);
        if asked != serves {
            return Err(CsiError::InvalidArgument(format!(
                "parameter {}={asked}: this driver serves the {serves} backend",
                crate::params::BACKEND
            )));
        }
        let (BackendConfig::Rados(ours), Some(target)) = (&self.config.backend, &params.rados)
        else {
            return Ok(());
        };
        let id = self.meta.backend_id();
        let fsid = id.detail("fsid").unwrap_or_default();
        let namespace = target.namespace.as_deref().unwrap_or(&ours.namespace);
        if target.cluster_id != fsid || target.pool != ours.pool || namespace != ours.namespace {
            return Err(CsiError::InvalidArgument(format!(
                "parameters {}={:?}, {}={:?}, {}={namespace:?}: this driver serves cluster {fsid:?}, pool {:?}, namespace {:?}",
                crate::params::CLUSTER_ID,
                target.cluster_id,
                crate::params::POOL,
                target.pool,
                crate::params::RADOS_NAMESPACE,
                ours.pool,
                ours.namespace
            )));
        }
        Ok(())
    }

    /// Checks a request's secrets for the backend this driver serves ([`crate::secrets`]).
    pub(crate) async fn authorize(
        &self,
        secrets: &std::collections::HashMap<String, String>,
    ) -> CsiResult<()> {
        self.authorizer.authorize(secrets).await
    }

    /// The catalogue entry behind `id`, if it is an entry of `kind`.
    pub(crate) async fn entry(&self, id: &str, kind: VolumeKind) -> CsiResult<Option<VolumeInfo>> {
        let Some(name) = ids::backend_name(id) else {
            return Ok(None);
        };
        match self.client.info(name).await {
            Ok(info) if info.kind == kind => Ok(Some(info)),
            Ok(_) | Err(ClientError::NotFound(_)) => Ok(None),
            Err(e) => Err(client_error(id, e)),
        }
    }

    /// The catalogue entry of `kind` behind `id`, or NOT_FOUND naming it as
    /// `what` ("volume", "source snapshot").
    pub(crate) async fn existing(
        &self,
        id: &str,
        kind: VolumeKind,
        what: &str,
    ) -> CsiResult<VolumeInfo> {
        self.entry(id, kind)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("{what} {id} does not exist")))
    }

    pub(crate) async fn volume(&self, id: &str) -> CsiResult<Option<VolumeInfo>> {
        self.entry(id, VolumeKind::Volume).await
    }

    pub(crate) async fn snapshot(&self, id: &str) -> CsiResult<Option<VolumeInfo>> {
        self.entry(id, VolumeKind::Snapshot).await
    }

    /// Removes the catalogue entry `name`. One already gone counts as
    /// removed, so a retried delete converges; `what` names the action for
    /// the error.
    pub(crate) async fn remove_entry(
        &self,
        name: &str,
        what: impl FnOnce() -> String,
    ) -> CsiResult<()> {
        match self.client.delete(name).await {
            Ok(()) | Err(ClientError::NotFound(_)) => Ok(()),
            Err(e) => Err(client_error(&what(), e)),
        }
    }

    pub(crate) fn csi_snapshot(
        &self,
        id: &str,
        info: &VolumeInfo,
        rec: Option<&SnapshotRecord>,
    ) -> Snapshot {
        Snapshot {
            size_bytes: info.size.min(i64::MAX as u64) as i64,
            snapshot_id: id.to_owned(),
            source_volume_id: rec
                .map(|r| r.source_volume_id.clone())
                .or_else(|| info.parent.clone())
                .unwrap_or_default(),
            creation_time: Some(timestamp(info.created)),
            // Copy-on-write: a snapshot is complete when the call returns.
            ready_to_use: true,
            group_snapshot_id: rec.and_then(|r| r.group_id.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as a peer sends it for a blocker error, decoded as the client does.
    fn reply_error(e: peers::blocker::BlockerError) -> ClientError {
        let status = peers::blocker::peer::status_of(&e);
        let reply = peers::wire::ErrorReply {
            message: format!("mapper: {e}"),
            holder: None,
        };
        let mut buf = [0u8; 512];
        let n = reply.encode(&mut buf).unwrap();
        ClientError::from_reply(status, &buf[..n])
    }

    #[test]
    fn a_full_backend_is_resource_exhausted_not_internal() {
        let io = |code| {
            reply_error(peers::blocker::BlockerError::Io {
                object: "v1.0001".into(),
                source: std::io::Error::from_raw_os_error(code),
            })
        };
        for code in [libc::ENOSPC, libc::EDQUOT] {
            assert!(
                matches!(io(code), ClientError::NoSpace(_)),
                "typed, not text"
            );
            let e = client_error("snapshotting v1", io(code));
            assert!(matches!(e, CsiError::ResourceExhausted(_)), "{e:?}");
            assert_eq!(Status::from(e).code(), tonic::Code::ResourceExhausted);
        }
        // A bare NoSpace status, without a message.
        let e = client_error("x", ClientError::from_reply(xseg::Status::NoSpace, &[]));
        assert!(matches!(e, CsiError::ResourceExhausted(_)), "{e:?}");
        // Other I/O errors stay INTERNAL.
        let e = client_error("x", io(libc::EIO));
        assert!(matches!(e, CsiError::Internal(_)), "{e:?}");
        // The controller's own records on a full disk.
        let meta = crate::meta::MetaError::Backend(peers::blocker::BlockerError::Io {
            object: "volume-x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        assert!(matches!(
            CsiError::from(meta),
            CsiError::ResourceExhausted(_)
        ));
    }
}
