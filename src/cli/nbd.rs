//! `archip export-nbd`: serve volumes of the running peer set over NBD, so qemu, `qemu-img`
//! and `nbd-client` can use them on hosts without ublk.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::Instance;

#[derive(Args, Debug)]
pub struct ExportNbdArgs {
    /// The volume (or snapshot, read-only) to export; omit with --all.
    #[arg(required_unless_present = "all")]
    pub volume: Option<String>,
    /// Export every volume and snapshot, selected by the client's export name.
    #[arg(long, conflicts_with = "volume")]
    pub all: bool,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Permission bits (octal) of the --socket file. Default: 600, since whoever can connect
    /// reads and writes the exported volumes; 660 to let the owner's group connect too.
    #[arg(long, value_name = "MODE", value_parser = super::parse_mode, requires = "socket")]
    pub socket_mode: Option<u32>,
    /// TCP address to listen on (loopback only: NBD has no authentication here).
    #[arg(long, value_name = "ADDR")]
    pub tcp: Option<SocketAddr>,
}

pub fn export_nbd(inst: &Instance, args: &ExportNbdArgs) -> anyhow::Result<()> {
    if args.socket.is_none() && args.tcp.is_none() {
        anyhow::bail!("give --socket PATH or --tcp 127.0.0.1:PORT");
    }
    let config = super::up::config(inst, None)?;
    let seg = peers::peerset::PeerConfig::open_segment(&config)
        .context("attaching to the segment of `archip up`")?;
    let client =
        Arc::new(peers::client::VolumeClient::connect(&seg).context("connecting to the peer set")?);
    let mut nbd = match &args.volume {
        Some(v) if !args.all => node::nbd::NbdConfig::volume(v.clone()),
        _ => node::nbd::NbdConfig::all(),
    };
    nbd.unix_socket = args.socket.clone();
    if let Some(mode) = args.socket_mode {
        nbd.socket_mode = mode;
    }
    nbd.tcp = args.tcp;
    let rt = tokio::runtime::Runtime::new().context("starting the NBD runtime")?;
    rt.block_on(async {
        // SIGTERM (what a service manager or a pod's shutdown sends) drains like ctrl-c: no
        // new connections or requests, the in-flight ones finish, what was written is
        // flushed, then a clean exit. Installed before binding, so a signal sent as soon as
        // the socket appears is never lost to the default action.
        let stop = super::up::stop_signals()?;
        let server = node::nbd::NbdServer::bind(client, nbd)?;
        let stats = server
            .run(async {
                let signal = stop.await;
                tracing::info!(signal, "export-nbd: draining");
            })
            .await?;
        eprintln!("{}", stats.json());
        anyhow::Ok(())
    })
}

/// `archip bench nbd`: qemu-img bench against our export of a clone vs qemu-nbd over a qcow2
/// overlay on a raw base (the same clone situation).
pub fn bench(count: Option<u64>, rounds: Option<u32>) -> anyhow::Result<()> {
    let mut o = node::nbd::BenchOptions::default();
    if let Some(c) = count {
        o.count = c as _;
    }
    if let Some(r) = rounds {
        o.rounds = r as _;
    }
    println!("{}", node::nbd::bench(o)?);
    Ok(())
}
