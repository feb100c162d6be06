//! `archip-ublk-test`: the ublk frontend's commands before they are wired into `archip`, plus
//! the few volume operations the VM suite needs (create, snapshot, clone, dump, load, info).
//!
//! It is also the shape of the `archip` wiring: `map`, `unmap`, `showmapped`, `recover` and
//! the hidden `serve` call the same `node::ublk` functions `archip` will.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use node::devices::{DeviceTable, Target};
use node::ublk::{self, Launcher, MapRequest, UblkConfig};
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet};

#[derive(Parser)]
#[command(name = "archip-ublk-test", about = "ublk frontend test driver")]
struct Cli {
    /// xseg segment name (under /dev/shm) or path.
    #[arg(long, env = "ARCHIP_SEGMENT", default_value = "archip", global = true)]
    segment: String,
    /// Device state file.
    #[arg(long, env = "ARCHIP_UBLK_STATE", global = true)]
    state: Option<PathBuf>,
    /// How long a port spins before it yields (nanoseconds).
    #[arg(long, env = "ARCHIP_XSEG_BUSY_NS", global = true)]
    xseg_busy_ns: Option<u64>,
    /// How long a port spins with sched_yield before it sleeps (nanoseconds).
    #[arg(long, env = "ARCHIP_XSEG_SPIN_NS", global = true)]
    xseg_spin_ns: Option<u64>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the ublk driver's feature bits.
    Features,
    /// Run blocker, mapper and vlmc in this process until killed; prints READY.
    Peers {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "node-1")]
        node: String,
    },
    Create {
        volume: String,
        size: String,
        #[arg(long)]
        block_size: Option<String>,
    },
    Snapshot {
        volume: String,
        snapshot: String,
    },
    Clone {
        source: String,
        name: String,
    },
    /// Grow a volume, then its mapped device (online, where the kernel can).
    Resize {
        volume: String,
        size: String,
    },
    /// Volume metadata and its map's entry counts, as JSON.
    Info {
        volume: String,
    },
    /// Read a volume (or a range) through VolumeClient into a file.
    Dump {
        volume: String,
        file: PathBuf,
        #[arg(long, default_value = "0")]
        offset: String,
        #[arg(long)]
        len: Option<String>,
    },
    /// Write a file into a volume through VolumeClient, then flush.
    Load {
        volume: String,
        file: PathBuf,
        #[arg(long, default_value = "0")]
        offset: String,
    },
    /// BLKZEROOUT on a block device range (busybox's blkdiscard has no -z).
    Zeroout {
        device: PathBuf,
        offset: String,
        len: String,
    },
    /// Map a volume to /dev/ublkbN (starts a server process); prints the device.
    Map {
        volume: String,
        #[arg(long, default_value_t = UblkConfig::default().queues)]
        queues: u16,
        #[arg(long, default_value_t = UblkConfig::default().depth)]
        depth: u16,
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        #[arg(long)]
        no_user_copy: bool,
        #[arg(long)]
        dev_id: Option<u32>,
    },
    Unmap {
        target: String,
    },
    Showmapped,
    /// Restart servers of devices whose server died.
    Recover,
    /// Internal: the device server that `map` starts.
    #[command(hide = true)]
    Serve {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Sizes and offsets in the grammar `archip` and StorageClasses use (zero included: offsets).
fn size(s: &str) -> Res<u64> {
    Ok(peers::size::parse(s)?)
}

fn client(segment: &str) -> Res<(tokio::runtime::Runtime, VolumeClient)> {
    let seg = xseg::Segment::attach(&xseg::segment_path(segment)?)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok((rt, VolumeClient::connect(&seg)?))
}

fn run(cli: Cli) -> Res<ExitCode> {
    let table = DeviceTable::new(cli.state.clone().unwrap_or_else(DeviceTable::default_path));
    let seg = cli.segment.clone();
    match cli.cmd {
        Cmd::Features => {
            let f = ublk::features()?;
            println!("{f:#x} {}", ublk::feature_names(f).join(" "));
        }
        Cmd::Peers { data, node } => {
            let cfg = PeerConfig::new(data, seg, node);
            let set = PeerSet::start(&cfg)?;
            println!("READY {}", set.segment().path().display());
            std::io::stdout().flush()?;
            // Serve until killed: the test kills this process (that is the point).
            loop {
                std::thread::park();
            }
        }
        Cmd::Create {
            volume,
            size: s,
            block_size,
        } => {
            let (rt, c) = client(&seg)?;
            let bs = block_size.map(|b| size(&b)).transpose()?;
            let i = rt.block_on(c.create(&volume, size(&s)?, bs))?;
            println!("{} {} {}", i.name, i.size, i.block_size);
        }
        Cmd::Snapshot { volume, snapshot } => {
            let (rt, c) = client(&seg)?;
            rt.block_on(c.snapshot(&volume, &snapshot))?;
        }
        Cmd::Clone { source, name } => {
            let (rt, c) = client(&seg)?;
            rt.block_on(c.clone_volume(&source, &name, None))?;
        }
        Cmd::Resize { volume, size: s } => {
            let (rt, c) = client(&seg)?;
            let i = rt.block_on(c.resize(&volume, size(&s)?))?;
            if table.by_volume(&volume)?.is_some() {
                match ublk::resize(&table, &Target::Volume(volume.clone()), i.size) {
                    Ok(n) => println!("device resized to {n}"),
                    Err(e @ ublk::UblkError::Unsupported(_)) => {
                        println!("volume resized to {}; device not: {e}", i.size);
                        return Ok(ExitCode::from(3));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Cmd::Info { volume } => {
            let (rt, c) = client(&seg)?;
            let i = rt.block_on(c.info(&volume))?;
            let v = rt.block_on(c.verify(&volume))?;
            println!(
                "{}",
                serde_json::json!({
                    "name": i.name, "size": i.size, "block_size": i.block_size,
                    "epoch": i.epoch, "parent": i.parent,
                    "blocks": v.blocks, "zero": v.zero, "owned": v.owned,
                    "shared": v.shared, "content": v.content,
                })
            );
        }
        Cmd::Dump {
            volume,
            file,
            offset,
            len,
        } => {
            let (rt, c) = client(&seg)?;
            let off = size(&offset)?;
            let len = match len {
                Some(l) => size(&l)?,
                None => rt.block_on(c.info(&volume))?.size - off,
            };
            let mut out = std::fs::File::create(&file)?;
            let chunk = 1u64 << 20;
            let mut buf = vec![0u8; chunk as usize];
            let mut at = 0;
            while at < len {
                let n = chunk.min(len - at) as usize;
                rt.block_on(c.read(&volume, off + at, &mut buf[..n]))?;
                out.write_all(&buf[..n])?;
                at += n as u64;
            }
        }
        Cmd::Load {
            volume,
            file,
            offset,
        } => {
            let (rt, c) = client(&seg)?;
            let data = std::fs::read(&file)?;
            rt.block_on(c.write(&volume, size(&offset)?, &data))?;
            rt.block_on(c.flush(&volume))?;
        }
        Cmd::Zeroout {
            device,
            offset,
            len,
        } => {
            use std::os::fd::AsRawFd;
            const BLKZEROOUT: libc::c_ulong = 0x127f; // _IO(0x12, 127)
            let f = std::fs::OpenOptions::new().write(true).open(&device)?;
            let range: [u64; 2] = [size(&offset)?, size(&len)?];
            // SAFETY: BLKZEROOUT reads two u64 (offset, length) from a live array.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
            if r != 0 {
                return Err(format!("BLKZEROOUT: {}", std::io::Error::last_os_error()).into());
            }
        }
        Cmd::Map {
            volume,
            queues,
            depth,
            block_size,
            no_user_copy,
            dev_id,
        } => {
            let req = MapRequest {
                volume,
                segment: seg,
                config: UblkConfig {
                    queues,
                    depth,
                    logical_block_size: block_size,
                    user_copy: !no_user_copy,
                    ..UblkConfig::default()
                },
                table,
                dev_id,
                log: None,
            };
            let rec = ublk::map(&req, &Launcher::current_exe(&["serve"])?)?;
            println!("{}", rec.block_device().display());
        }
        Cmd::Unmap { target } => {
            ublk::unmap(&table, &Target::parse(&target))?;
        }
        Cmd::Showmapped => {
            for d in ublk::showmapped(&table)? {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        Cmd::Recover => {
            let mut failed = false;
            for r in ublk::recover(
                &table,
                &Launcher::current_exe(&["serve"])?,
                &UblkConfig::default(),
            )? {
                match r {
                    Ok(rec) => println!("{}", rec.block_device().display()),
                    Err(e) => {
                        eprintln!("recover: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Serve { args } => {
            return Ok(ExitCode::from(ublk::serve_main(&args) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_init();
    let cli = Cli::parse();
    let d = xseg::WaitPolicy::DEFAULT;
    xseg::WaitPolicy::set_process_default(xseg::WaitPolicy {
        busy: cli.xseg_busy_ns.map_or(d.busy, Duration::from_nanos),
        spin: cli.xseg_spin_ns.map_or(d.spin, Duration::from_nanos),
    });
    match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("archip-ublk-test: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (the server's log file when started by `map`), `RUST_LOG` filtered.
fn tracing_init() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
