//! The Identity service over a real unix socket, as a CO would call it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tonic::Code;
use tonic::service::Routes;

use csi::identity::{AlwaysHealthy, Health, IdentityService, ProbeError};
use csi::pb::identity_client::IdentityClient;
use csi::pb::plugin_capability::{self, service, volume_expansion};
use csi::pb::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};

fn routes<H: Health>(health: H) -> Routes {
    Routes::new(IdentityService::new(health).into_server())
}

#[tokio::test]
async fn plugin_info_names_the_driver_and_version() {
    let mut server = common::start(routes(AlwaysHealthy));
    let mut client = IdentityClient::new(common::connect(&server.socket).await);

    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.archipelago.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert!(!info.vendor_version.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn plugin_capabilities_are_the_advertised_set() {
    let mut server = common::start(routes(AlwaysHealthy));
    let mut client = IdentityClient::new(common::connect(&server.socket).await);

    let caps = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut services = Vec::new();
    let mut expansion = Vec::new();
    for cap in caps {
        match cap.r#type.expect("capability without a type") {
            plugin_capability::Type::Service(s) => services.push(s.r#type()),
            plugin_capability::Type::VolumeExpansion(e) => expansion.push(e.r#type()),
        }
    }
    services.sort_by_key(|t| *t as i32);
    assert_eq!(
        services,
        [
            service::Type::ControllerService,
            service::Type::VolumeAccessibilityConstraints,
            service::Type::GroupControllerService,
        ]
    );
    assert_eq!(expansion, [volume_expansion::Type::Online]);
    server.stop().await.unwrap();
}

/// A health source whose answer the test sets, counting the calls so the
/// test can tell Probe really asked it.
struct Scripted {
    answer: Result<(), ProbeError>,
    calls: AtomicUsize,
}

impl Health for Scripted {
    async fn probe(&self) -> Result<(), ProbeError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.answer.clone()
    }
}

async fn probe_with(
    answer: Result<(), ProbeError>,
) -> (Result<Option<bool>, tonic::Status>, usize) {
    let health = Arc::new(Scripted {
        answer,
        calls: AtomicUsize::new(0),
    });
    let mut server = common::start(routes(health.clone()));
    let mut client = IdentityClient::new(common::connect(&server.socket).await);
    let result = client
        .probe(ProbeRequest {})
        .await
        .map(|r| r.into_inner().ready);
    server.stop().await.unwrap();
    (result, health.calls.load(Ordering::SeqCst))
}

#[tokio::test]
async fn probe_reports_ready_when_healthy() {
    let (result, calls) = probe_with(Ok(())).await;
    assert_eq!(result.unwrap(), Some(true));
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn probe_reports_not_ready_while_starting() {
    let (result, calls) = probe_with(Err(ProbeError::NotReady("peers attaching".into()))).await;
    assert_eq!(result.unwrap(), Some(false));
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn probe_fails_with_the_reason_when_unhealthy() {
    let (result, calls) = probe_with(Err(ProbeError::Unhealthy(
        "blocker rados: cluster unreachable".into(),
    )))
    .await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("cluster unreachable"),
        "message: {}",
        status.message()
    );
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn services_not_registered_answer_unimplemented() {
    use csi::pb::NodeGetCapabilitiesRequest;
    use csi::pb::node_client::NodeClient;

    let mut server = common::start(routes(AlwaysHealthy));
    let mut node = NodeClient::new(common::connect(&server.socket).await);
    let status = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
    server.stop().await.unwrap();
}
