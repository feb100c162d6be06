//! `archip map | unmap | showmapped | recover`: volumes as /dev/ublkbN block devices.
//!
//! `map` starts one device server process per volume (this same binary, hidden subcommand
//! `__ublk-serve`), so that a server can be killed and recovered without touching the others
//! or the peers: the device stays, its I/O waits, and `archip recover` re-attaches it.

use std::path::PathBuf;

use clap::Args;
use node::devices::{DeviceTable, Target};
use node::ublk::{self, Launcher, MapRequest, UblkConfig};

use super::Instance;

/// The hidden subcommand `map` launches as the device server.
pub const SERVE_SUBCOMMAND: &str = "__ublk-serve";

#[derive(Args, Debug)]
pub struct MapArgs {
    /// Volume (or snapshot, read-only) to map.
    pub volume: String,
    /// Hardware queues (capped by the kernel at the number of CPUs); default: one per CPU, up
    /// to 8.
    #[arg(long, default_value_t = node::ublk::UblkConfig::default().queues)]
    pub queues: u16,
    /// Requests in flight per queue; default: about 128 per device, 32 to 64 per queue.
    #[arg(long, default_value_t = node::ublk::UblkConfig::default().depth)]
    pub depth: u16,
    /// Logical block size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Copy through a bounce buffer even when the kernel offers UBLK_F_USER_COPY.
    #[arg(long)]
    pub no_user_copy: bool,
    /// Ask for a specific /dev/ublkbN number.
    #[arg(long)]
    pub dev_id: Option<u32>,
    /// Open shared, for a live-migration handover: the volume may be mapped on another node
    /// at the same time; this node takes its lock over at its first write. Only for a disk
    /// whose writers take turns (a migrating VM's QEMU).
    #[arg(long)]
    pub shared: bool,
    /// Device state file (default /run/archip/ublk-devices.json).
    #[arg(long, env = "ARCHIP_UBLK_STATE")]
    pub state: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Device state file (default /run/archip/ublk-devices.json).
    #[arg(long, env = "ARCHIP_UBLK_STATE")]
    pub state: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UnmapArgs {
    /// The volume name, or the device as /dev/ublkbN or ublkbN. A bare number is a volume
    /// name (a volume may be called `1`); use --id N for device N.
    #[arg(required_unless_present = "id", conflicts_with = "id")]
    pub target: Option<String>,
    /// Unmap device /dev/ublkbN by its number N.
    #[arg(long)]
    pub id: Option<u32>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

impl UnmapArgs {
    fn target(&self) -> Target {
        match (self.id, &self.target) {
            (Some(id), _) => Target::Device(id),
            (None, Some(t)) => Target::parse(t),
            // clap requires one of the two.
            (None, None) => unreachable!("clap requires a target or --id"),
        }
    }
}

fn table(state: &Option<PathBuf>) -> DeviceTable {
    DeviceTable::new(state.clone().unwrap_or_else(DeviceTable::default_path))
}

fn launcher() -> anyhow::Result<Launcher> {
    Ok(Launcher::current_exe(&[SERVE_SUBCOMMAND])?)
}

pub fn map(inst: &Instance, args: &MapArgs) -> anyhow::Result<()> {
    let req = MapRequest {
        volume: args.volume.clone(),
        segment: inst.segment(),
        config: UblkConfig {
            queues: args.queues,
            depth: args.depth,
            logical_block_size: args.block_size,
            user_copy: !args.no_user_copy,
            shared: args.shared,
            ..UblkConfig::default()
        },
        table: table(&args.state),
        dev_id: args.dev_id,
        log: None,
    };
    let rec = ublk::map(&req, &launcher()?)?;
    println!("{}", rec.block_device().display());
    Ok(())
}

pub fn unmap(args: &UnmapArgs) -> anyhow::Result<()> {
    let target = args.target();
    match ublk::unmap(&table(&args.device.state), &target)? {
        Some(rec) => println!("unmapped {} ({})", rec.block_device().display(), rec.volume),
        None => println!("unmapped {target}"),
    }
    Ok(())
}

/// A table for people; with `--json`, one JSON object per device a line (what scripts grep).
pub fn showmapped(args: &DeviceArgs, json: bool) -> anyhow::Result<()> {
    let devices = ublk::showmapped(&table(&args.state))?;
    if json {
        for d in devices {
            println!("{}", serde_json::to_string(&d)?);
        }
        return Ok(());
    }
    print!("{}", showmapped_table(&devices));
    Ok(())
}

/// Nothing at all when no device is mapped, so `[ -z "$(archip showmapped)" ]` works.
fn showmapped_table(devices: &[ublk::MappedDevice]) -> String {
    if devices.is_empty() {
        return String::new();
    }
    let state = |d: &ublk::MappedDevice| {
        serde_json::to_value(d.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            [
                d.device.clone(),
                d.record.volume.clone(),
                crate::size::human(d.record.size),
                state(d),
                d.record.pid.to_string(),
                if d.server_alive { "yes" } else { "no" }.to_string(),
                if d.record.shared { "shared" } else { "" }.to_string(),
            ]
        })
        .collect();
    let head = ["DEVICE", "VOLUME", "SIZE", "STATE", "PID", "SERVER", "MODE"];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&width) {
            l.push_str(&format!("{c:<w$}  "));
        }
        format!("{}\n", l.trim_end())
    };
    let mut out = line(&head);
    for r in &rows {
        out.push_str(&line(&r.each_ref().map(String::as_str)));
    }
    out
}

pub fn recover(args: &DeviceArgs) -> anyhow::Result<()> {
    let mut failed = 0;
    for r in ublk::recover(&table(&args.state), &launcher()?, &UblkConfig::default())? {
        match r {
            Ok(rec) => println!("recovered {}", rec.block_device().display()),
            Err(e) => {
                eprintln!("archip: recover: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} device(s) could not be recovered");
    }
    Ok(())
}

pub fn serve(args: &[String]) -> ! {
    std::process::exit(ublk::serve_main(args))
}
