//! The device server: the process (or, in tests, the thread) that attaches to the segment,
//! opens the volume at vlmc, creates or recovers the ublk device and serves its queues until
//! the device is stopped. [`serve_main`] is its command line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::UblkFlags;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::sys;
use peers::client::VolumeClient;
use xseg::Segment;

use super::control::refuse_if_mapped;
use super::features::{features, has};
use super::queue;
use super::{Result, UblkConfig, UblkError, driver, io_err};
use crate::devices::{DeviceRecord, DeviceTable};
use crate::io_stats::{Frontend, IoStats};

/// Whether the server creates a new device or takes over one whose server died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeMode {
    /// A new device, with this id or the first free one.
    Add { dev_id: Option<u32> },
    /// Re-attach to an existing device (user recovery).
    Recover { dev_id: u32 },
}

/// Everything a device server needs.
#[derive(Clone, Debug)]
pub struct ServeRequest {
    pub volume: String,
    /// Segment name (under /dev/shm) or path.
    pub segment: String,
    pub config: UblkConfig,
    pub mode: ServeMode,
    pub table: DeviceTable,
}

/// The server's command line (after the launcher's own arguments): what [`ServeRequest::to_args`]
/// renders and [`ServeRequest::parse`] reads back. Every option but the volume and the segment
/// may be left out and then takes [`UblkConfig::default`]'s value, so a launcher only has to
/// say what differs.
#[derive(clap::Parser, Clone, Debug, PartialEq, Eq)]
#[command(name = "archip ublk server", no_binary_name = true)]
pub struct ServeArgs {
    #[arg(long)]
    pub volume: String,
    /// Segment name (under /dev/shm) or path.
    #[arg(long)]
    pub segment: String,
    /// The device table; default [`DeviceTable::default_path`].
    #[arg(long)]
    pub state: Option<PathBuf>,
    #[arg(long, default_value_t = UblkConfig::default().queues)]
    pub queues: u16,
    #[arg(long, default_value_t = UblkConfig::default().depth)]
    pub depth: u16,
    #[arg(long, default_value_t = UblkConfig::default().io_buf_bytes)]
    pub io_buf_bytes: u32,
    #[arg(long, default_value_t = UblkConfig::default().logical_block_size)]
    pub block_size: u32,
    #[arg(long, default_value_t = UblkConfig::default().discard_granularity)]
    pub discard_granularity: u32,
    #[arg(long, default_value_t = UblkConfig::default().max_discard_bytes)]
    pub max_discard_bytes: u64,
    /// `true` or `false`: a value rather than a bare flag, so that either can be said.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = UblkConfig::default().user_copy)]
    pub user_copy: bool,
    #[arg(long, default_value_t = UblkConfig::default().peer_wait.as_millis() as u64)]
    pub peer_wait_ms: u64,
    #[arg(long, default_value_t = UblkConfig::default().vlmc_port)]
    pub vlmc_port: u32,
    /// `true` or `false`, like `--user-copy`.
    #[arg(long, action = clap::ArgAction::Set, default_value_t = UblkConfig::default().shared)]
    pub shared: bool,
    /// Create the device with this id (default: the first free one).
    #[arg(long, conflicts_with = "recover")]
    pub dev_id: Option<u32>,
    /// Take over this device, whose server died, instead of creating one.
    #[arg(long)]
    pub recover: Option<u32>,
}

impl ServeArgs {
    /// The arguments that parse back to `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--volume".into(),
            self.volume.clone(),
            "--segment".into(),
            self.segment.clone(),
        ];
        if let Some(s) = &self.state {
            a.extend(["--state".into(), s.display().to_string()]);
        }
        a.extend([
            "--queues".into(),
            self.queues.to_string(),
            "--depth".into(),
            self.depth.to_string(),
            "--io-buf-bytes".into(),
            self.io_buf_bytes.to_string(),
            "--block-size".into(),
            self.block_size.to_string(),
            "--discard-granularity".into(),
            self.discard_granularity.to_string(),
            "--max-discard-bytes".into(),
            self.max_discard_bytes.to_string(),
            "--user-copy".into(),
            self.user_copy.to_string(),
            "--peer-wait-ms".into(),
            self.peer_wait_ms.to_string(),
            "--vlmc-port".into(),
            self.vlmc_port.to_string(),
            "--shared".into(),
            self.shared.to_string(),
        ]);
        if let Some(id) = self.dev_id {
            a.extend(["--dev-id".into(), id.to_string()]);
        }
        if let Some(id) = self.recover {
            a.extend(["--recover".into(), id.to_string()]);
        }
        a
    }
}

impl From<&ServeRequest> for ServeArgs {
    fn from(r: &ServeRequest) -> Self {
        let c = &r.config;
        let (dev_id, recover) = match r.mode {
            ServeMode::Add { dev_id } => (dev_id, None),
            ServeMode::Recover { dev_id } => (None, Some(dev_id)),
        };
        ServeArgs {
            volume: r.volume.clone(),
            segment: r.segment.clone(),
            state: Some(r.table.path().to_path_buf()),
            queues: c.queues,
            depth: c.depth,
            io_buf_bytes: c.io_buf_bytes,
            block_size: c.logical_block_size,
            discard_granularity: c.discard_granularity,
            max_discard_bytes: c.max_discard_bytes,
            user_copy: c.user_copy,
            // Saturates rather than wraps: a wait of 584 million years is as good as forever.
            peer_wait_ms: u64::try_from(c.peer_wait.as_millis()).unwrap_or(u64::MAX),
            vlmc_port: c.vlmc_port,
            shared: c.shared,
            dev_id,
            recover,
        }
    }
}

impl From<ServeArgs> for ServeRequest {
    fn from(a: ServeArgs) -> Self {
        ServeRequest {
            volume: a.volume,
            segment: a.segment,
            config: UblkConfig {
                queues: a.queues,
                depth: a.depth,
                io_buf_bytes: a.io_buf_bytes,
                logical_block_size: a.block_size,
                discard_granularity: a.discard_granularity,
                max_discard_bytes: a.max_discard_bytes,
                user_copy: a.user_copy,
                peer_wait: Duration::from_millis(a.peer_wait_ms),
                vlmc_port: a.vlmc_port,
                shared: a.shared,
            },
            mode: match a.recover {
                Some(dev_id) => ServeMode::Recover { dev_id },
                None => ServeMode::Add { dev_id: a.dev_id },
            },
            table: DeviceTable::new(a.state.unwrap_or_else(DeviceTable::default_path)),
        }
    }
}

impl ServeRequest {
    /// The server's command line (after the launcher's own arguments); [`ServeRequest::parse`]
    /// reads it back.
    pub fn to_args(&self) -> Vec<String> {
        ServeArgs::from(self).to_args()
    }

    /// Parses what [`ServeRequest::to_args`] wrote.
    pub fn parse(args: &[String]) -> Result<ServeRequest> {
        use clap::Parser;
        ServeArgs::try_parse_from(args)
            .map(ServeRequest::from)
            .map_err(|e| {
                // clap's first line says what is wrong; the rest is usage, for a person.
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or_default();
                UblkError::Invalid(first.trim_start_matches("error: ").to_owned())
            })
    }
}

/// What a server did, once its device is gone.
#[derive(Debug)]
pub struct ServeReport {
    pub device: Option<DeviceRecord>,
    pub stats: Arc<IoStats>,
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))
}

/// Opens the volume at vlmc (taking its lock, unless shared), returning its size.
pub(super) fn open_volume(segment: &Arc<Segment>, volume: &str, shared: bool) -> Result<u64> {
    let client = VolumeClient::connect(segment)?;
    let rt = runtime()?;
    let info = if shared {
        rt.block_on(client.open_shared(volume))?
    } else {
        rt.block_on(client.open(volume))?
    };
    Ok(info.size)
}

/// Releases the volume at vlmc (its lock) after the device is gone. Best effort: a failure
/// only delays another node's open until the lock is broken.
pub(super) fn close_volume(segment: &Arc<Segment>, volume: &str) {
    let r = VolumeClient::connect(segment)
        .map_err(UblkError::from)
        .and_then(|c| Ok(runtime()?.block_on(c.close(volume))?));
    if let Err(e) = r {
        tracing::warn!(volume, error = %e, "closing the volume after unmap");
    }
}

pub(super) fn attach(segment: &str) -> Result<Arc<Segment>> {
    Ok(Segment::attach(&xseg::segment_path(segment)?)?)
}

/// Serves one device in this process until it is stopped (by [`unmap`](super::unmap)); `on_ready` runs once
/// `/dev/ublkbN` is live and recorded in the table.
///
/// In `Add` mode the device is created with user recovery, so killing this process leaves it
/// waiting for [`recover`](super::recover). In `Recover` mode it takes over such a device.
pub fn serve(
    req: &ServeRequest,
    on_ready: impl FnOnce(&DeviceRecord) + Send + Sync + 'static,
) -> Result<ServeReport> {
    let cfg = &req.config;
    cfg.validate()?;
    let features = features()?;
    let segment = attach(&req.segment)?;
    let vol_size = open_volume(&segment, &req.volume, cfg.shared)?;
    let lbs = u64::from(cfg.logical_block_size);
    let size = vol_size / lbs * lbs;
    if size == 0 {
        return Err(UblkError::Invalid(format!(
            "volume {} of {vol_size} bytes is smaller than one block",
            req.volume
        )));
    }

    let ctrl = match req.mode {
        ServeMode::Add { dev_id } => {
            refuse_if_mapped(&req.table, &req.volume)?;
            let mut flags = 0u64;
            for f in [
                u64::from(sys::UBLK_F_USER_RECOVERY),
                u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE),
                // Only records the intent (the driver does not check it), harmless elsewhere.
                u64::from(sys::UBLK_F_UPDATE_SIZE),
            ] {
                if has(features, f) {
                    flags |= f;
                }
            }
            if !has(features, sys::UBLK_F_USER_RECOVERY) {
                tracing::warn!("no UBLK_F_USER_RECOVERY: a server restart will fail the device");
            }
            if cfg.user_copy && has(features, sys::UBLK_F_USER_COPY) {
                flags |= u64::from(sys::UBLK_F_USER_COPY);
            }
            UblkCtrlBuilder::default()
                .name("archip")
                .id(dev_id.map_or(-1, |i| i as i32))
                .nr_queues(cfg.queues)
                .depth(cfg.depth)
                .io_buf_bytes(cfg.io_buf_bytes)
                .ctrl_flags(flags)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
                .build()
                .map_err(driver("add device"))?
        }
        ServeMode::Recover { dev_id } => {
            let old = UblkCtrl::new_simple(dev_id as i32).map_err(driver("open device"))?;
            // The successor must have the shape the kernel knows (libublk sizes its per-queue
            // tables from the builder, not from the kernel).
            let shape = old.dev_info();
            // Waits (bounded, inside libublk) until the kernel has noticed the old server's
            // death and quiesced the device.
            old.start_user_recover()
                .map_err(driver("START_USER_RECOVERY"))?;
            drop(old);
            UblkCtrlBuilder::default()
                .name("archip")
                .id(dev_id as i32)
                .nr_queues(shape.nr_hw_queues)
                .depth(shape.queue_depth)
                .io_buf_bytes(shape.max_io_buf_bytes)
                .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
                .build()
                .map_err(driver("open device for recovery"))?
        }
    };

    let info = ctrl.dev_info();
    let dev_id = info.dev_id;
    // One port per queue, bound before the queues start so that a failure is an error here
    // rather than a queue that never comes up.
    let mut ports = Vec::with_capacity(info.nr_hw_queues as usize);
    for q in 0..info.nr_hw_queues {
        ports.push(Some(segment.bind_dynamic(&format!("ublk{dev_id}-q{q}"))?));
    }
    let ports = Arc::new(Mutex::new(ports));
    let stats = Arc::new(IoStats::new(Frontend::Ublk));
    let qcfg = Arc::new(queue::QueueConfig {
        volume: req.volume.clone(),
        vlmc_port: cfg.vlmc_port,
        peer_wait: cfg.peer_wait,
        stats: stats.clone(),
    });

    let (gran, max_discard) = (cfg.discard_granularity, cfg.max_discard_bytes);
    let volume = req.volume.clone();
    let seg_name = req.segment.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        let shift = lbs.trailing_zeros() as u8;
        let depth = dev.dev_info.queue_depth;
        // Room for the eventfd read and the retry timer beside the io commands.
        dev.tgt.sq_depth = depth.saturating_mul(2);
        dev.tgt.cq_depth = depth.saturating_mul(2);
        dev.tgt.dev_size = size;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
            basic: sys::ublk_param_basic {
                // FLUSH must reach vlmc: writes are only durable after one.
                attrs: sys::UBLK_ATTR_VOLATILE_CACHE,
                logical_bs_shift: shift,
                physical_bs_shift: shift.max(12),
                io_opt_shift: shift.max(12),
                io_min_shift: shift.max(12),
                max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard: sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: gran,
                max_discard_sectors: (max_discard >> 9) as u32,
                max_write_zeroes_sectors: (max_discard >> 9) as u32,
                max_discard_segments: 1,
                reserved0: 0,
            },
            ..Default::default()
        };
        dev.set_target_json(serde_json::json!({ "volume": volume, "segment": seg_name }));
        Ok(())
    };
    let q_fn = {
        let ports = ports.clone();
        let qcfg = qcfg.clone();
        move |qid: u16, dev: &UblkDev| {
            let port = ports.lock().unwrap_or_else(|e| e.into_inner())[qid as usize].take();
            match port {
                Some(p) => queue::serve_queue(qid, dev, p, &qcfg),
                None => tracing::error!(qid, "no xseg port for this queue"),
            }
        }
    };
    let recorded: Arc<Mutex<Option<DeviceRecord>>> = Arc::default();
    let after_start = {
        let recorded = recorded.clone();
        let table = req.table.clone();
        let volume = req.volume.clone();
        let segment = req.segment.clone();
        let shared = cfg.shared;
        move |ctrl: &UblkCtrl| {
            let info = ctrl.dev_info();
            let pid = std::process::id();
            let rec = DeviceRecord {
                dev_id: info.dev_id,
                volume,
                segment,
                pid,
                pid_start: xseg::owner::start_time(pid).unwrap_or(0),
                queues: info.nr_hw_queues,
                depth: info.queue_depth,
                logical_block_size: 1 << shift_of(lbs),
                user_copy: info.flags & u64::from(sys::UBLK_F_USER_COPY) != 0,
                size,
                shared,
            };
            if let Err(e) = table.insert(rec.clone()) {
                // The device works; only a later recover cannot find it. Say so loudly.
                tracing::error!(error = %e, "recording the device");
            }
            tracing::info!(dev = info.dev_id, volume = %rec.volume, flags = format!("{:#x}", info.flags), "ublk device live");
            *recorded.lock().unwrap_or_else(|e| e.into_inner()) = Some(rec.clone());
            on_ready(&rec);
        }
    };
    ctrl.run_target(tgt_init, q_fn, after_start)
        .map_err(driver("serving the device"))?;
    drop(ctrl);

    // The device was stopped (unmap): forget it and release the volume.
    let device = recorded.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(r) = &device {
        if let Err(e) = req.table.remove(r.dev_id, Some(r.pid)) {
            tracing::warn!(error = %e, "removing the device record");
        }
    }
    close_volume(&segment, &req.volume);
    Ok(ServeReport { device, stats })
}

pub(super) fn shift_of(v: u64) -> u32 {
    v.trailing_zeros()
}

/// The body of the hidden `archip __ublk-serve ARGS...` command that [`map`](super::map) starts: parses
/// `args` (from [`ServeRequest::to_args`]), serves, and prints `READY <id>` on stdout when the
/// device is live (then points stdout at /dev/null, so that the parent may go away). Returns
/// the process exit code.
pub fn serve_main(args: &[String]) -> i32 {
    let req = match ServeRequest::parse(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("archip ublk server: {e}");
            return 2;
        }
    };
    let r = serve(&req, |rec| {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "READY {}", rec.dev_id);
        let _ = out.flush();
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 between two descriptors this process owns; fd 1 stays open.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
    });
    match r {
        Ok(rep) => {
            tracing::info!(
                stats = %serde_json::to_string(&*rep.stats).unwrap_or_default(),
                "device stopped"
            );
            0
        }
        Err(e) => {
            eprintln!("archip ublk server: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_args_round_trip() {
        let req = ServeRequest {
            volume: "db".into(),
            segment: "/run/archip/seg".into(),
            config: UblkConfig {
                queues: 3,
                depth: 128,
                io_buf_bytes: 1 << 20,
                logical_block_size: 4096,
                discard_granularity: 1 << 20,
                max_discard_bytes: 1 << 28,
                user_copy: false,
                peer_wait: Duration::from_millis(1500),
                vlmc_port: 9,
                shared: true,
            },
            mode: ServeMode::Recover { dev_id: 7 },
            table: DeviceTable::new("/tmp/x.json"),
        };
        let back = ServeRequest::parse(&req.to_args()).unwrap();
        assert_eq!(back.volume, req.volume);
        assert_eq!(back.segment, req.segment);
        assert_eq!(back.config, req.config);
        assert_eq!(back.mode, req.mode);
        assert_eq!(back.table.path(), req.table.path());
        let add = ServeRequest {
            mode: ServeMode::Add { dev_id: Some(2) },
            ..req
        };
        assert_eq!(ServeRequest::parse(&add.to_args()).unwrap().mode, add.mode);
        for mode in [
            ServeMode::Add { dev_id: None },
            ServeMode::Add { dev_id: Some(0) },
            ServeMode::Recover { dev_id: 0 },
        ] {
            let r = ServeRequest {
                mode,
                ..add.clone()
            };
            let back = ServeRequest::parse(&r.to_args()).unwrap();
            assert_eq!(back.mode, r.mode);
            assert_eq!(back.config, r.config);
            assert_eq!(back.table.path(), r.table.path());
        }
    }

    #[test]
    fn serve_args_round_trip_every_field() {
        use clap::Parser;
        let all = ServeArgs {
            volume: "vol with space".into(),
            segment: "seg".into(),
            state: Some("/tmp/state.json".into()),
            queues: 5,
            depth: 17,
            io_buf_bytes: 1 << 16,
            block_size: 4096,
            discard_granularity: 8192,
            max_discard_bytes: 1 << 29,
            user_copy: false,
            peer_wait_ms: 12_345,
            vlmc_port: 77,
            shared: true,
            dev_id: Some(4),
            recover: None,
        };
        let variants = [
            all.clone(),
            ServeArgs {
                dev_id: None,
                recover: Some(9),
                user_copy: true,
                shared: false,
                ..all.clone()
            },
            ServeArgs {
                state: None,
                dev_id: None,
                ..all.clone()
            },
        ];
        for a in variants {
            assert_eq!(ServeArgs::try_parse_from(a.to_args()).unwrap(), a);
        }
        // Left out, an option takes the default configuration's value, as before clap.
        let bare = ServeRequest::parse(&[
            "--volume".into(),
            "v".into(),
            "--segment".into(),
            "s".into(),
        ])
        .unwrap();
        assert_eq!(bare.config, UblkConfig::default());
        assert_eq!(bare.mode, ServeMode::Add { dev_id: None });
        assert_eq!(bare.table.path(), DeviceTable::default_path());
    }

    #[test]
    fn serve_args_reject_garbage() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            ServeRequest::parse(&s(&["--segment", "x"])).is_err(),
            "no volume"
        );
        assert!(ServeRequest::parse(&s(&["--volume", "v", "--segment", "x", "--depth"])).is_err());
        assert!(
            ServeRequest::parse(&s(&["--volume", "v", "--segment", "x", "--depth", "lots"]))
                .is_err()
        );
        assert!(
            ServeRequest::parse(&s(&["--volume", "v", "--segment", "x", "--bogus", "1"])).is_err()
        );
        assert!(
            ServeRequest::parse(&s(&["--volume", "v", "--segment", "x", "--shared", "yes"]))
                .is_err()
        );
        assert!(
            ServeRequest::parse(&s(&[
                "--volume",
                "v",
                "--segment",
                "x",
                "--dev-id",
                "1",
                "--recover",
                "2"
            ]))
            .is_err(),
            "a new device and a recovery at once"
        );
    }
}
