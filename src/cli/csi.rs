//! `archip controller`: the CSI Identity, Controller and GroupController services over this
//! node's peer set, on a unix socket.

use anyhow::Context;
use clap::Args;

use super::Instance;

#[derive(Args, Debug)]
pub struct ControllerArgs {
    /// CSI endpoint.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///var/lib/kubelet/plugins/csi.archipelago.io/controller.sock"
    )]
    pub endpoint: String,
}

pub fn controller(inst: &Instance, args: &ControllerArgs) -> anyhow::Result<()> {
    let config = super::up::config(inst, None)?;
    let set = peers::peerset::PeerSet::start(&config).context("starting the peer set")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    tracing::info!(endpoint = %args.endpoint, node = %config.node, "CSI controller serving");
    let served = rt.block_on(csi::run_controller(
        set.segment(),
        csi::ControllerOptions {
            endpoint: args.endpoint.clone(),
            node_id: config.node.clone(),
            data_dir: config.data_dir.clone(),
        },
        csi::server::shutdown_signal(),
    ));
    set.stop();
    served.context("serving CSI")
}

/// `archip bench csi`.
pub fn bench(dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(std::env::temp_dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the bench runtime")?;
    let json = rt.block_on(csi::bench::run(&csi::bench::BenchOptions::new(dir)))?;
    println!("{json}");
    Ok(())
}
