//! The Identity service: who the plugin is, what it offers, and whether it
//! is healthy.
//!
//! Probe is what the CSI liveness sidecar and kubelet use to decide whether
//! to restart the plugin, so it must reflect the real state of the data
//! path rather than the mere fact that gRPC answers. That state comes from
//! a [`Health`] source; the peer set will provide the real one.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::errors::CsiError;
use crate::pb::identity_server::Identity;
use crate::pb::plugin_capability::{self, service, volume_expansion};
use crate::pb::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Why a probe did not come back healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Healthy but still starting (e.g. peers still attaching to the
    /// segment). Reported as `ready: false`, so the CO waits instead of
    /// restarting the plugin.
    #[error("not ready yet: {0}")]
    NotReady(String),
    /// Broken and in need of a restart or an operator. Reported as
    /// FAILED_PRECONDITION with this message, as the spec asks.
    #[error("unhealthy: {0}")]
    Unhealthy(String),
}

/// A source of truth for Probe.
pub trait Health: Send + Sync + 'static {
    /// Checks the plugin's dependencies. Called on every Probe, so it
    /// should be cheap or cache its answer.
    fn probe(&self) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

impl<H: Health> Health for Arc<H> {
    fn probe(&self) -> impl Future<Output = Result<(), ProbeError>> + Send {
        (**self).probe()
    }
}

/// A health source with nothing to check, for tools and tests that run the
/// gRPC layer without a data path.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysHealthy;

impl Health for AlwaysHealthy {
    async fn probe(&self) -> Result<(), ProbeError> {
        Ok(())
    }
}

/// The Identity service, generic over its health source.
#[derive(Debug, Clone)]
pub struct IdentityService<H> {
    health: H,
}

impl<H: Health> IdentityService<H> {
    /// Wraps a health source.
    pub fn new(health: H) -> Self {
        Self { health }
    }

    /// The tonic service, ready to add to a [`tonic::service::Routes`].
    pub fn into_server(self) -> crate::pb::identity_server::IdentityServer<Self> {
        crate::pb::identity_server::IdentityServer::new(self)
    }
}

/// What Archipelago advertises. A controller-less deployment is not
/// supported, so the list is the same for the controller and node
/// plugins: the CO only acts on the controller entries where a Controller
/// service answers.
pub fn plugin_capabilities() -> Vec<PluginCapability> {
    let service = |t: service::Type| PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    };
    vec![
        service(service::Type::ControllerService),
        // File-backend volumes are reachable only from the node holding
        // their directory, so topology matters.
        service(service::Type::VolumeAccessibilityConstraints),
        service(service::Type::GroupControllerService),
        // Copy-on-write volumes can grow while a VM is using them.
        PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        },
    ]
}

#[tonic::async_trait]
impl<H: Health> Identity for IdentityService<H> {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: crate::DRIVER_NAME.to_owned(),
            vendor_version: crate::VENDOR_VERSION.to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: plugin_capabilities(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        match self.health.probe().await {
            Ok(()) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Err(ProbeError::NotReady(reason)) => {
                tracing::info!(%reason, "probe: not ready");
                Ok(Response::new(ProbeResponse { ready: Some(false) }))
            }
            Err(ProbeError::Unhealthy(reason)) => {
                tracing::warn!(%reason, "probe: unhealthy");
                Err(CsiError::FailedPrecondition(format!(
                    "{} is unhealthy: {reason}",
                    crate::DRIVER_NAME
                ))
                .into())
            }
        }
    }
}
