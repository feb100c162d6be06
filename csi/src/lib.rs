//! CSI v1.12 for Archipelago: the protobuf types, the gRPC plumbing that
//! serves them on a unix socket, and the services.
//!
//! The services are kept apart from the transport so that one process can
//! serve Identity + Controller (`archip controller`), Identity + Node
//! (`archip node`), or everything (`archip up`) on a single socket: build a
//! [`tonic::service::Routes`] from the services wanted and hand it to
//! [`server::serve`].
//!
//! The spec's request rules (size limits, required fields, capability
//! checks) live in [`validate`] and the mapping of our errors to gRPC codes
//! in [`errors`], so that every RPC enforces them the same way.
//!
//! - [`identity`], [`controller`], [`group_controller`]: the services; `core` and `plugin`:
//!   the controller's shared state, built once;
//! - [`validate`], [`params`], [`errors`], [`ids`]: the spec's rules, StorageClass parameters,
//!   gRPC codes, CSI names to volume ids;
//! - [`meta`]: the controller's records; [`inflight`]: one operation per id at a time;
//! - [`delegate`]: forwarding to the peer set that holds a volume's lock; [`node_loss`]:
//!   fencing the locks of an out-of-service node;
//! - [`server`], [`dial`]: the unix-socket gRPC server and client; [`health`]: the probe;
//!   [`redact`]: secrets out of logs; [`secrets`]: the cephx credentials of RADOS classes and
//!   their check against the cluster; [`bench`]: `archip bench csi`.

pub mod bench;
pub mod controller;
mod core;
pub mod delegate;
pub mod dial;
pub mod errors;
pub mod group_controller;
pub mod health;
pub mod identity;
pub mod ids;
pub mod inflight;
pub mod meta;
pub mod metrics;
pub mod node_loss;
pub mod params;
mod plugin;
pub mod redact;
pub mod secrets;
pub mod server;
pub mod validate;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use peers::backend::BackendError;
use peers::client::{ClientError, VolumeClient};
use tonic::service::Routes;
use xseg::Segment;

pub use crate::core::ControllerConfig;
pub use plugin::ControllerPlugin;

/// Generated CSI v1.12 messages, clients and servers (package `csi.v1`).
#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    rustdoc::bare_urls,
    rustdoc::invalid_html_tags
)]
pub mod pb {
    tonic::include_proto!("csi.v1");
    // `Debug` for the messages that carry secrets; see build.rs.
    include!(concat!(env!("OUT_DIR"), "/csi.v1.redact.rs"));
}

/// The name COs know this driver by (StorageClass `provisioner`, CSIDriver).
pub const DRIVER_NAME: &str = "csi.archipelago.io";

/// Reported as `vendor_version` so operators can tell which build answers.
pub const VENDOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the controller keeps its records, under a file backend's data
/// directory (beside the peers' `objects/`). The backend module owns the
/// layout; this names it for tests and tools that look inside.
pub const RECORDS_DIR: &str = peers::backend::RECORDS_SUBDIR;

/// How `archip controller` runs.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// `unix:///path/to/csi.sock`.
    pub endpoint: String,
    /// The node holding the data directory (topology of node-local volumes).
    pub node_id: String,
    /// The file backend's data directory (the peer set's `data_dir`).
    pub data_dir: PathBuf,
    /// The backend the volumes and the controller's records live on (the peer set's).
    pub backend: peers::backend::BackendConfig,
    /// The peer-set registry to find a volume's lock holder in
    /// ([`ControllerConfig::peerset_registry`]); `None` turns forwarding off.
    pub peerset_registry: Option<PathBuf>,
}

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No connection to the peer set.
    #[error("connecting to the peer set: {0}")]
    Peers(#[from] ClientError),
    /// The records store cannot be opened.
    #[error("opening the controller records: {0}")]
    Records(#[from] BackendError),
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

impl ControllerPlugin {
    /// A controller over the peers serving `segment`, with its records in
    /// `<data_dir>/csi`.
    pub fn open(
        segment: &Arc<Segment>,
        node_id: &str,
        data_dir: PathBuf,
    ) -> Result<Self, RunError> {
        Self::open_with(segment, ControllerConfig::new(node_id, data_dir))
    }

    /// [`open`](Self::open) with a configuration of its own (another
    /// peer-set registry, another default capacity).
    pub fn open_with(segment: &Arc<Segment>, config: ControllerConfig) -> Result<Self, RunError> {
        let client = Arc::new(VolumeClient::connect(segment)?);
        let meta = meta::MetaStore::open(&config.backend)?;
        Ok(ControllerPlugin::new(client, meta, config))
    }

    /// Identity + Controller + GroupController, ready to serve. Add the
    /// Node service to the result to serve everything on one socket
    /// (`archip up`).
    pub fn routes<H: identity::Health>(&self, health: H) -> Routes {
        Routes::new(identity::IdentityService::new(health).into_server())
            .add_service(self.controller_server())
            .add_service(self.group_controller_server())
    }
}

/// Serves Identity, Controller and GroupController on `opts.endpoint` over
/// the peers serving `segment` (a [`peers::peerset::PeerSet`] of this
/// process, or peers in other processes) until `shutdown` completes.
pub async fn run_controller<F>(
    segment: &Arc<Segment>,
    opts: ControllerOptions,
    shutdown: F,
) -> Result<(), RunError>
where
    F: Future<Output = ()> + Send,
{
    let mut config = ControllerConfig::new(&opts.node_id, opts.data_dir.clone());
    config.peerset_registry = opts.peerset_registry.clone();
    config.backend = opts.backend.clone();
    let plugin = ControllerPlugin::open_with(segment, config)?;
    let routes = plugin.routes(health::PeerSetHealth::new(segment.clone()));
    tracing::info!(
        endpoint = %opts.endpoint,
        node = %opts.node_id,
        data_dir = %opts.data_dir.display(),
        backend = %opts.backend,
        peerset_registry = ?opts.peerset_registry,
        "controller starting"
    );
    server::serve(&opts.endpoint, routes, shutdown).await?;
    Ok(())
}
