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
    /// Watch Nodes and fence the volume locks of every Node tainted node.kubernetes.io/out-of-service
    /// (csi/src/node_loss.rs). Default: on inside a cluster (KUBERNETES_SERVICE_HOST set).
    #[arg(long, env = "ARCHIP_WATCH_NODES", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub watch_nodes: Option<bool>,
    /// Serve Prometheus metrics on http://ADDR/metrics and the peer set's health on /healthz
    /// (e.g. 0.0.0.0:9180; port 0 picks a free one, logged at start).
    #[arg(long, env = "ARCHIP_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
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
    let inst = &inst.with_default_segment(super::CONTROLLER_SEGMENT);
    let mut config = super::up::config(inst, None)?;
    let node = config.node.clone();
    config.node = controller_owner(&node)?;
    let set = super::start_peer_set(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the gRPC runtime")?;
    tracing::info!(endpoint = %args.endpoint, node = %node, lock_owner = %config.node, segment = %config.segment, "CSI controller serving");
    let served = rt.block_on(async {
        super::start_metrics(args.metrics_addr, set.segment()).await?;
        let watch = watch_nodes(args.watch_nodes, set.segment()).await?;
        let served = csi::run_controller(
            set.segment(),
            csi::ControllerOptions {
                endpoint: args.endpoint.clone(),
                node_id: node,
                data_dir: config.data_dir.clone(),
                backend: config.backend.clone(),
                peerset_registry: config.registry.clone(),
            },
            csi::server::shutdown_signal(),
        )
        .await;
        if let Some(w) = watch {
            w.abort();
        }
        anyhow::Ok(served)
    })?;
    set.stop();
    served.context("serving CSI")
}

/// Start node-loss recovery if asked, or by default inside a cluster; say which either way.
async fn watch_nodes(
    asked: Option<bool>,
    segment: &std::sync::Arc<xseg::Segment>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    if !asked.unwrap_or(in_cluster) {
        tracing::info!(
            in_cluster,
            "node-loss recovery off: out-of-service nodes keep their volume locks (--watch-nodes to enable)"
        );
        return Ok(None);
    }
    let volumes = std::sync::Arc::new(
        peers::client::VolumeClient::connect(segment).context("node-loss recovery: peer set")?,
    );
    let watcher = csi::node_loss::NodeLoss::in_cluster(volumes)
        .await
        .context("node-loss recovery (--watch-nodes=false to run without it)")?;
    tracing::info!(
        in_cluster,
        "node-loss recovery on: locks of nodes tainted out-of-service are fenced"
    );
    Ok(Some(tokio::spawn(watcher.run(std::future::pending()))))
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
