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
//! checks) and the mapping of our errors to gRPC codes live in [`status`] so
//! that every RPC enforces them the same way.

pub mod identity;
pub mod redact;
pub mod server;
pub mod status;

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
