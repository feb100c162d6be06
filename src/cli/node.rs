//! `archip node`: the CSI Identity and Node services over this node's peer set, on a unix
//! socket. Volumes are staged as ublk devices whose servers are this binary's hidden
//! `__ublk-serve` subcommand (so they outlive a restart of `archip node`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use node::csi_node::{self, NodeOptions};
use node::devices::DeviceTable;
use node::ublk::{Launcher, UblkConfig};

use super::Instance;

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// CSI endpoint.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/csi.archipelago.io/csi.sock"
    )]
    pub endpoint: String,
    /// Reported as max_volumes_per_node (0: no limit).
    #[arg(long, env = "ARCHIP_MAX_VOLUMES", default_value_t = 256)]
    pub max_volumes: i64,
    /// Device state file (default /run/archip/ublk-devices.json).
    #[arg(long, env = "ARCHIP_UBLK_STATE")]
    pub state: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics and the peer set's health on /healthz
    /// (e.g. 0.0.0.0:9180; port 0 picks a free one, logged at start).
    #[arg(long, env = "ARCHIP_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub fn node(inst: &Instance, args: &NodeArgs) -> anyhow::Result<()> {
    let inst = &inst.with_default_segment(super::NODE_SEGMENT);
    let config = super::up::config(inst, None)?;
    if !node::ublk::available() {
        tracing::warn!(
            "the kernel has no ublk driver (/dev/ublk-control is missing): volumes cannot be \
             staged until `modprobe ublk_drv` succeeds; Probe reports it"
        );
    }
    let set = super::start_peer_set(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    let opts = NodeOptions {
        node_id: config.node.clone(),
        segment: inst.segment(),
        table: DeviceTable::new(args.state.clone().unwrap_or_else(DeviceTable::default_path)),
        launcher: Launcher::current_exe(&[super::ublk::SERVE_SUBCOMMAND])?,
        ublk: UblkConfig::default(),
        max_volumes_per_node: args.max_volumes,
    };
    rt.block_on(super::start_metrics(args.metrics_addr, set.segment()))?;
    tracing::info!(endpoint = %args.endpoint, node = %config.node, segment = %config.segment, "CSI node serving");
    let served = rt.block_on(csi_node::run_node(
        set.segment(),
        &args.endpoint,
        opts,
        &config.backend,
        csi::server::shutdown_signal(),
    ));
    set.stop();
    served.context("serving CSI")
}
