//! The controller as one value: builds the shared [`Core`] once and hands
//! out the gRPC services over it.

use std::sync::Arc;

use peers::client::VolumeClient;

use crate::controller::ControllerService;
use crate::core::{ControllerConfig, Core};
use crate::group_controller::GroupControllerService;
use crate::inflight::InFlight;
use crate::meta::MetaStore;
use crate::pb::controller_server::ControllerServer;
use crate::pb::group_controller_server::GroupControllerServer;

/// The controller: build it once, then take its gRPC services.
#[derive(Debug, Clone)]
pub struct ControllerPlugin {
    core: Arc<Core>,
}

impl ControllerPlugin {
    /// A controller acting on the peer set behind `client`, keeping its
    /// records in `meta`.
    pub fn new(client: Arc<VolumeClient>, meta: MetaStore, config: ControllerConfig) -> Self {
        let delegation = crate::delegate::Delegation::new(
            config.peerset_registry.clone(),
            config.backend.clone(),
            client.segment().path(),
        );
        let authorizer = crate::secrets::Authorizer::new(config.backend.clone());
        Self {
            core: Arc::new(Core {
                authorizer,
                client,
                meta,
                config,
                inflight: InFlight::new(),
                delegation,
            }),
        }
    }

    /// The set of ids with an operation in flight. Tests hold an id here to
    /// see a concurrent RPC refused with ABORTED without racing two RPCs.
    pub fn in_flight(&self) -> &Arc<InFlight> {
        &self.core.inflight
    }

    /// The Controller gRPC service.
    pub fn controller_server(&self) -> ControllerServer<ControllerService> {
        ControllerServer::new(ControllerService::new(self.core.clone()))
    }

    /// The GroupController gRPC service.
    pub fn group_controller_server(&self) -> GroupControllerServer<GroupControllerService> {
        GroupControllerService::new(self.core.clone()).into_server()
    }
}
