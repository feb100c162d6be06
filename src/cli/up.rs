//! `archip up`: the segment, all peers as threads, and the control socket, in the foreground;
//! `archip peer NAME`: one peer as its own process (crash tests kill these independently).
//!
//! Lifecycle of `up`:
//! 1. refuse to start if another `up` answers on the control socket; remove a stale socket;
//! 2. create or attach the segment and start blocker, mapper, vlmc ([`PeerSet::start`]);
//! 3. bind the control socket (mode 0600; callers other than root and our user are refused), print `archip: ready control=... segment=...` on
//!    stdout (scripts and tests wait for that line), serve until SIGINT or SIGTERM;
//! 4. stop: close the socket, stop the peers (vlmc, then the mapper, which releases this node's
//!    locks, then the blocker), and remove the segment file if no live process has a port bound
//!    in it (else leave it: `archip peer` processes may still be using it). The data directory
//!    is never touched: the next `up` finds every volume again.
//!
//! Volumes that `up` opened for an import or an export stay open here (locked by this node)
//! until `up` stops, as a mapped volume would; other nodes see them locked.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use peers::client::VolumeClient;
use peers::peerset::{PEERS, PeerConfig, PeerSet, peer_port, spawn_peer};
use tokio::signal::unix::{SignalKind, signal};

use super::{Instance, absolute};
use crate::control::client::Refused;
use crate::control::server::{Limits, Server, serve};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Tokio worker threads per peer (default: the number of CPUs, 2 to 8).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Also serve every CSI service (Identity, Controller, GroupController, Node) on this
    /// endpoint, e.g. unix:///run/archip/csi.sock: single-machine use.
    #[arg(long, env = "ARCHIP_CSI_ENDPOINT", value_name = "ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics and the peer set's health on /healthz
    /// (e.g. 0.0.0.0:9180; port 0 picks a free one, logged at start).
    #[arg(long, env = "ARCHIP_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Device state file of the CSI Node service (default /run/archip/ublk-devices.json).
    #[arg(long, env = "ARCHIP_UBLK_STATE")]
    pub state: Option<PathBuf>,
}

/// Identity, Controller, GroupController and Node on one router, over this process's peers.
fn csi_routes(
    inst: &Instance,
    state: &Option<PathBuf>,
    config: &PeerConfig,
    set: &PeerSet,
) -> anyhow::Result<tonic::service::Routes> {
    let mut controller_config = csi::ControllerConfig::new(&config.node, config.data_dir.clone());
    controller_config.peerset_registry = config.registry.clone();
    controller_config.backend = config.backend.clone();
    let controller = csi::ControllerPlugin::open_with(set.segment(), controller_config)
        .context("opening the CSI controller")?;
    let client = Arc::new(VolumeClient::connect(set.segment()).context("connecting to vlmc")?);
    let node = node::csi_node::NodeService::new(
        node::csi_node::NodeOptions {
            node_id: config.node.clone(),
            segment: inst.segment(),
            table: node::devices::DeviceTable::new(
                state
                    .clone()
                    .unwrap_or_else(node::devices::DeviceTable::default_path),
            ),
            launcher: node::ublk::Launcher::current_exe(&[super::ublk::SERVE_SUBCOMMAND])?,
            ublk: node::ublk::UblkConfig::default(),
            max_volumes_per_node: 256,
        },
        Some(client),
    );
    Ok(controller
        .routes(csi::health::PeerSetHealth::new(set.segment().clone()))
        .add_service(node.into_server()))
}

#[derive(Args, Debug)]
pub struct PeerArgs {
    /// Which peer: blocker, mapper or vlmc.
    pub name: String,
    /// Tokio worker threads (default: the number of CPUs, 2 to 8).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
}

pub(crate) fn config(inst: &Instance, workers: Option<usize>) -> anyhow::Result<PeerConfig> {
    let data_dir = absolute(&inst.data_dir());
    peers::private::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let node = inst.node();
    peers::blocker::LockOwner::new(node.clone()).map_err(|e| Refused::invalid(e.to_string()))?;
    let mut config = PeerConfig::new(data_dir, inst.segment(), node);
    if let Some(mode) = inst.segment_mode {
        config.segment_mode = mode;
    }
    config.registry = Some(inst.peerset_dir());
    if let Some(backend) = &inst.backend {
        config.backend = backend.clone();
    }
    if let Some(w) = workers {
        config.workers = w.max(1);
    }
    Ok(config)
}

/// A signal stream for SIGINT and SIGTERM, registered before the caller reports ready so that a
/// signal sent right after the ready line is never lost to the default action.
pub(super) fn stop_signals() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// Removes a control socket nobody answers on; refuses if an `up` is serving it.
fn claim_socket(path: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "archip is already running at {}; stop it first or pass another --control",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let meta = std::fs::symlink_metadata(path)
                .with_context(|| format!("inspecting {}", path.display()))?;
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                );
            }
            tracing::info!(socket = %path.display(), "removing a stale control socket");
            std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
        }
    }
}

pub fn up(inst: &Instance, args: &UpArgs) -> anyhow::Result<()> {
    let config = config(inst, args.workers)?;
    let control = absolute(&inst.control());
    if let Some(dir) = control.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory of {}", control.display()))?;
    }
    claim_socket(&control)?;
    let segment_path = config.segment_path().context("segment name")?;
    let set = super::start_peer_set(&config).with_context(|| {
        format!(
            "starting the peers on segment {} with data in {}",
            segment_path.display(),
            config.data_dir.display()
        )
    })?;
    let client = VolumeClient::connect(set.segment()).context("connecting to vlmc")?;
    let server = Arc::new(Server {
        client,
        segment: set.segment().clone(),
        node: config.node.clone(),
        data_dir: config.data_dir.clone(),
        registration: set
            .registration()
            .map(|r| (r.registry().clone(), r.entry().clone())),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("control")
        .enable_all()
        .build()
        .context("starting the control runtime")?;
    rt.block_on(super::start_metrics(args.metrics_addr, set.segment()))?;
    let (csi_stop, csi_stopped) = tokio::sync::watch::channel(false);
    let csi_task = match &args.csi_endpoint {
        Some(endpoint) => {
            let routes = csi_routes(inst, &args.state, &config, &set)?;
            let endpoint = endpoint.clone();
            let mut stopped = csi_stopped.clone();
            Some(rt.spawn(async move {
                csi::server::serve(&endpoint, routes, async move {
                    let _ = stopped.changed().await;
                })
                .await
            }))
        }
        None => None,
    };
    let served = rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(&control)
            .with_context(|| format!("binding the control socket {}", control.display()))?;
        std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", control.display()))?;
        let stop = stop_signals()?;
        tracing::info!(
            control = %control.display(),
            segment = %segment_path.display(),
            data = %config.data_dir.display(),
            node = %config.node,
            "archip up"
        );
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "archip: ready control={} segment={} data={} node={}",
            control.display(),
            segment_path.display(),
            config.data_dir.display(),
            config.node
        )?;
        out.flush()?;
        drop(out);
        serve(listener, server.clone(), Limits::default(), async {
            let which = stop.await;
            tracing::info!(signal = which, "stopping");
        })
        .await;
        let _ = csi_stop.send(true);
        if let Some(task) = csi_task {
            match task.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "CSI server"),
                Err(e) => tracing::warn!(error = %e, "CSI server task"),
                Ok(Ok(())) => {}
            }
        }
        anyhow::Ok(())
    });
    // Connection tasks hold the server; end them before the peers go.
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(server);
    if let Err(e) = std::fs::remove_file(&control) {
        tracing::warn!(socket = %control.display(), error = %e, "removing the control socket");
    }
    set.stop();
    match xseg::Segment::destroy(&segment_path) {
        Ok(()) => tracing::info!(segment = %segment_path.display(), "segment removed"),
        Err(xseg::Error::InUse { ports }) => tracing::info!(
            segment = %segment_path.display(),
            ?ports,
            "segment left in place: other processes still have ports bound"
        ),
        Err(e) => {
            tracing::warn!(segment = %segment_path.display(), error = %e, "removing the segment")
        }
    }
    served
}

pub fn peer(inst: &Instance, args: &PeerArgs) -> anyhow::Result<()> {
    if peer_port(&args.name).is_none() {
        return Err(Refused::invalid(format!(
            "unknown peer {:?}: expected one of {}",
            args.name,
            PEERS.join(", ")
        ))
        .into());
    }
    let config = config(inst, args.workers)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let segment = config.open_segment().context("opening the segment")?;
    let running = spawn_peer(&args.name, &config, &segment, None)
        .with_context(|| format!("starting peer {}", args.name))?;
    rt.block_on(async {
        let stop = stop_signals()?;
        println!(
            "archip: peer {} ready port={} segment={} pid={}",
            args.name,
            running.port(),
            segment.path().display(),
            std::process::id()
        );
        std::io::stdout().flush()?;
        let which = stop.await;
        tracing::info!(peer = %args.name, signal = which, "stopping");
        anyhow::Ok(())
    })?;
    running.stop();
    Ok(())
}
