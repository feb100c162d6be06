//! `archip`: command-line parsing and dispatch only; the work lives in the crates and in one
//! module per command group under `cli/`. Adding a command is one [`Command`] variant and one
//! line in [`run`].

mod cli;
mod control;
mod size;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "archip",
    version,
    about = "Copy-on-write volumes over xseg, ublk and CSI",
    after_help = "Start the peers with `archip up`; every other command talks to it over its \
                  control socket. Exit codes: 0 ok, 1 failed, 2 bad input (nothing changed), \
                  3 no `archip up` running."
)]
struct Cli {
    #[command(flatten)]
    instance: cli::Instance,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Log format on stderr: text for people, json (one object a line) for log collectors.
    #[arg(long, global = true, env = "ARCHIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level (error, warn, info, debug, trace, or a tracing filter such as peers=debug).
    /// Default: info for the long-running commands, warn for the others. RUST_LOG wins.
    #[arg(long, global = true, env = "ARCHIP_LOG_LEVEL", value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start the segment and all peers, and serve the control socket, in the foreground.
    Up(cli::up::UpArgs),
    /// Run one peer (blocker, mapper or vlmc) as its own process.
    Peer(cli::up::PeerArgs),
    /// Create, list, inspect, grow and delete volumes.
    Volume {
        #[command(subcommand)]
        cmd: cli::volume::VolumeCmd,
    },
    /// Take, list and delete snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: cli::volume::SnapshotCmd,
    },
    /// Make a writable copy-on-write clone of a snapshot or volume.
    Clone(cli::volume::CloneArgs),
    /// Write a raw image into a volume (zero blocks skipped, identical blocks stored once).
    Import(cli::image::ImportArgs),
    /// Write a volume or snapshot out as a sparse raw image.
    Export(cli::image::ExportArgs),
    /// Store a snapshot's blocks content-addressed, so identical data is kept once.
    Dedup(cli::admin::DedupArgs),
    /// Reclaim objects no volume or snapshot references.
    Gc(cli::admin::GcArgs),
    /// Show or set a volume's I/O limits (enforced on every node within seconds).
    Qos(cli::admin::QosArgs),
    /// Inspect or break volume locks.
    Lock {
        #[command(subcommand)]
        cmd: cli::admin::LockCmd,
    },
    /// Peers, their PING latency, and per-port counters and service times.
    Status,
    /// Serve the CSI Identity, Controller and GroupController services over this node's peers.
    Controller(cli::csi::ControllerArgs),
    /// Serve the CSI Identity and Node services: stage volumes as ublk devices, mount, publish.
    Node(cli::node::NodeArgs),
    /// Map a volume as a /dev/ublkbN block device (starts its device server).
    Map(cli::ublk::MapArgs),
    /// Remove a mapped device.
    Unmap(cli::ublk::UnmapArgs),
    /// List mapped devices and whether their servers are alive.
    Showmapped(cli::ublk::DeviceArgs),
    /// Restart the servers of mapped devices whose server died; their I/O resumes.
    Recover(cli::ublk::DeviceArgs),
    /// Internal: the device server `map` starts.
    #[command(name = "__ublk-serve", hide = true)]
    UblkServe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Serve volumes of the running peer set over NBD (qemu-img, qemu-io, nbd-client).
    ExportNbd(cli::nbd::ExportNbdArgs),
    /// Print a shell completion script (e.g. `archip completions bash > /etc/bash_completion.d/archip`).
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `archip man | man -l -`.
    Man,
    /// Measure a part of the system against a baseline in the same run; prints JSON.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Request round trips over xseg vs a Unix socket pair, and idle CPU.
    Xseg {
        /// Round trips per scenario.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
    },
    /// Volume I/O vs pread/pwrite, snapshot/clone latency, mass clones, copy-on-write cost.
    Volume {
        /// I/Os per random-I/O scenario.
        #[arg(long, default_value_t = 50_000)]
        ios: u64,
        /// Clones of one snapshot in the mass-clone scenario.
        #[arg(long, default_value_t = 1000)]
        clones: u32,
        /// Scratch directory (on the filesystem to measure; removed afterwards).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// What one 4 KiB I/O costs through the volume path (CPU time, context switches, xseg
    /// hops and futex waits per I/O) vs pread/pwrite on the same files; instructions per I/O
    /// come from e2e/bench-cost.sh (callgrind).
    Cost {
        /// I/Os per scenario.
        #[arg(long, default_value_t = 20_000)]
        ios: u64,
        /// Only this scenario (repeatable): volume-read-qd1, volume-write-qd1, pread-qd1,
        /// pwrite-qd1, and the same with qd32.
        #[arg(long, value_parser = parse_scenario)]
        only: Vec<peers::bench_cost::Scenario>,
        /// Scratch directory (on the filesystem to measure; removed afterwards).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// qemu-img bench on our NBD export of a clone vs qemu-nbd on a qcow2 overlay.
    Nbd {
        /// Requests per qemu-img bench run.
        #[arg(long)]
        count: Option<u64>,
        /// Rounds (the median is reported).
        #[arg(long)]
        rounds: Option<u32>,
    },
    /// Our stack on RADOS vs RBD on the same cluster: 4 KiB random and 4 MiB sequential
    /// writes, snapshot + clone latency, 100 clones of one snapshot (needs the `rados` feature).
    Rados {
        // The cluster and pool come from the global `--backend rados:pool=P,conf=PATH,...`
        // (a second `--backend` of this subcommand's own clashed with it and made clap panic).
        // The bench uses a namespace of its own below the given one; RBD images go to the
        // same pool.
        /// Size of the volume and of the RBD image, in MiB (both written end to end).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// 4 KiB random writes per side.
        #[arg(long, default_value_t = 40_000)]
        random_ios: u64,
        /// Interleaved repeats of the I/O scenarios (medians are reported).
        #[arg(long, default_value_t = 3)]
        repeats: u32,
        /// Snapshot + clone rounds (the median is reported).
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Clones of one snapshot in the mass-clone scenario.
        #[arg(long, default_value_t = 100)]
        clones: u32,
        /// Leave the RBD images, volumes and objects in place afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// CreateVolume-from-snapshot latency over gRPC (1 GiB and 1 TiB), 100 concurrent clones.
    Csi {
        /// Parent of the scratch directory (the filesystem to measure).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = cli::Context {
        instance: cli.instance,
        json: cli.json,
    };
    match cli.command {
        Command::Up(args) => cli::up::up(&ctx.instance, &args),
        Command::Peer(args) => cli::up::peer(&ctx.instance, &args),
        Command::Volume { cmd } => cli::volume::volume(&ctx, cmd),
        Command::Snapshot { cmd } => cli::volume::snapshot(&ctx, cmd),
        Command::Clone(args) => cli::volume::clone(&ctx, args),
        Command::Import(args) => cli::image::import(&ctx, args),
        Command::Export(args) => cli::image::export(&ctx, args),
        Command::Dedup(args) => cli::admin::dedup(&ctx, args),
        Command::Gc(args) => cli::admin::gc(&ctx, args),
        Command::Lock { cmd } => cli::admin::lock(&ctx, cmd),
        Command::Qos(args) => cli::admin::qos(&ctx, args),
        Command::Status => cli::admin::status(&ctx),
        Command::Controller(args) => cli::csi::controller(&ctx.instance, &args),
        Command::Node(args) => cli::node::node(&ctx.instance, &args),
        Command::ExportNbd(args) => cli::nbd::export_nbd(&ctx.instance, &args),
        Command::Map(args) => cli::ublk::map(&ctx.instance, &args),
        Command::Unmap(args) => cli::ublk::unmap(&args),
        Command::Showmapped(args) => cli::ublk::showmapped(&args, ctx.json),
        Command::Recover(args) => cli::ublk::recover(&args),
        Command::UblkServe { args } => cli::ublk::serve(&args),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "archip", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Bench { what } => match what {
            Bench::Xseg { requests } => {
                println!("{}", xseg::bench::run(requests));
                Ok(())
            }
            Bench::Volume { ios, clones, dir } => {
                let mut opts = peers::bench::Options {
                    ios,
                    clones,
                    ..Default::default()
                };
                if let Some(dir) = dir {
                    opts.dir = dir;
                }
                println!("{}", peers::bench::run(&opts)?);
                Ok(())
            }
            Bench::Cost { ios, only, dir } => {
                let mut opts = peers::bench_cost::Options {
                    ios,
                    only,
                    ..Default::default()
                };
                if let Some(dir) = dir {
                    opts.dir = dir;
                }
                println!("{}", peers::bench_cost::run(&opts)?);
                Ok(())
            }
            Bench::Rados {
                size_mib,
                random_ios,
                repeats,
                rounds,
                clones,
                keep,
            } => bench_rados(
                ctx.instance.backend.as_ref(),
                size_mib,
                random_ios,
                [repeats, rounds, clones],
                keep,
            ),
            Bench::Csi { dir } => cli::csi::bench(dir),
            Bench::Nbd { count, rounds } => cli::nbd::bench(count, rounds),
        },
    }
}

#[cfg(feature = "rados")]
fn bench_rados(
    backend: Option<&peers::backend::BackendConfig>,
    size_mib: u64,
    random_ios: u64,
    [repeats, rounds, clones]: [u32; 3],
    keep: bool,
) -> anyhow::Result<()> {
    let Some(backend) = backend.filter(|b| matches!(b, peers::backend::BackendConfig::Rados(_)))
    else {
        anyhow::bail!(
            "`archip bench rados` needs --backend rados:pool=P,conf=PATH[,id=ID,keyring=PATH]"
        );
    };
    let backend = backend.clone();
    let opts = peers::bench_rados::Options {
        size: size_mib.max(4) * 1024 * 1024,
        random_ios,
        repeats,
        rounds,
        clones,
        cleanup: !keep,
        ..peers::bench_rados::Options::new(backend)
    };
    println!("{}", peers::bench_rados::run(&opts)?);
    Ok(())
}

#[cfg(not(feature = "rados"))]
fn bench_rados(
    _: Option<&peers::backend::BackendConfig>,
    _: u64,
    _: u64,
    _: [u32; 3],
    _: bool,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "`archip bench rados` needs a build with the cargo feature \"rados\" \
         (cargo build --release --features rados)"
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The long-running commands log at info; the others only say what went wrong.
    let default_level = match cli.command {
        Command::Up(_)
        | Command::Peer(_)
        | Command::Controller(_)
        | Command::Node(_)
        | Command::ExportNbd(_) => "info",
        _ => "warn",
    };
    let level = cli.log_level.as_deref().unwrap_or(default_level);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level));
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("archip: error: invalid --log-level {level:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    xseg::WaitPolicy::set_process_default(cli.instance.wait_policy());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("archip: error: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}

fn parse_scenario(name: &str) -> Result<peers::bench_cost::Scenario, String> {
    peers::bench_cost::Scenario::parse(name).ok_or_else(|| {
        let all: Vec<String> = peers::bench_cost::Scenario::all()
            .iter()
            .map(|s| s.name())
            .collect();
        format!("unknown scenario {name:?} (one of {})", all.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every positional argument of every command says what it is in `--help`.
    #[test]
    fn every_positional_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_positionals() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if !sub.is_hide_set() {
                    walk(sub, &format!("{path} {}", sub.get_name()), missing);
                }
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "archip", &mut missing);
        assert!(missing.is_empty(), "positionals without help: {missing:?}");
        // The walk does reach positionals (so an empty list means something).
        let map = cmd.find_subcommand("map").unwrap();
        assert_eq!(map.get_positionals().count(), 1);
    }
}
