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

/// The lock owner of the controller's own peer set. It must differ from the node plugin's (the
/// node id) even on the same machine: a lock is re-entrant for its owner, so sharing the
/// identity would let the controller write a map the node's mapper holds and caches. With its
/// own identity, the controller's writes to a volume in use are refused as `Locked` and go to
/// the node's peer set instead (csi/src/delegate.rs).
fn controller_owner(node: &str) -> anyhow::Result<String> {
    let owner = format!("csi-controller@{node}");
    peers::blocker::LockOwner::new(owner.clone()).map_err(|e| {
        anyhow::anyhow!("node id {node:?} is too long for the controller's lock owner: {e}")
    })?;
    Ok(owner)
}

pub fn controller(inst: &Instance, args: &ControllerArgs) -> anyhow::Result<()> {
    let mut config = super::up::config(inst, None)?;
    let node = config.node.clone();
    config.node = controller_owner(&node)?;
    let set = peers::peerset::PeerSet::start(&config).context("starting the peer set")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    tracing::info!(endpoint = %args.endpoint, node = %node, lock_owner = %config.node, "CSI controller serving");
    let served = rt.block_on(csi::run_controller(
        set.segment(),
        csi::ControllerOptions {
            endpoint: args.endpoint.clone(),
            node_id: node,
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
