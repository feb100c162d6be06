//! The ublk frontend: volumes as `/dev/ublkbN` block devices, served over xseg by vlmc.
//!
//! Shape. Each mapped volume is served by its own process (like `rbd-nbd` and ublksrv): `map`
//! starts a server process and returns once the device is live; the server runs until `unmap`
//! stops the device. A dead server (kill -9, crash, upgrade) does **not** take the device with
//! it: devices are created with `UBLK_F_USER_RECOVERY` (+ `_REISSUE`), so the kernel keeps
//! `/dev/ublkbN`, holds new I/O, requeues what the dead server had in flight, and waits for
//! a successor. [`recover`] starts one for every recorded device whose server is gone; the
//! successor re-attaches with `START_USER_RECOVERY`/`END_USER_RECOVERY` and the held I/O
//! completes. A mounted filesystem sees only a pause.
//!
//! Which device serves which volume is recorded in the [`DeviceTable`] (a JSON state file),
//! because the kernel does not know.
//!
//! Entry points for the CLI (`archip map/unmap/showmapped`) are [`map`], [`unmap`],
//! [`showmapped`], [`recover`] and [`resize`]; the server process runs [`serve_main`] (or
//! [`serve`] in-process, as the tests do).

mod queue;

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libublk::UblkFlags;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::sys;
use peers::client::VolumeClient;
use serde::Serialize;
use xseg::Segment;

use crate::devices::{DeviceRecord, DeviceTable, DevicesError, parse_device, process_start_time};
pub use queue::IoStats;

const CTRL_PATH: &str = "/dev/ublk-control";

#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    #[error("no ublk driver here ({CTRL_PATH} is missing: load ublk_drv, Linux >= 6.0)")]
    NoDriver,
    #[error("ublk {what}: {source}")]
    Driver {
        what: &'static str,
        #[source]
        source: libublk::UblkError,
    },
    #[error("{0} is not supported by this kernel's ublk driver")]
    Unsupported(&'static str),
    #[error(transparent)]
    Segment(#[from] xseg::Error),
    #[error("volume: {0}")]
    Volume(#[from] peers::client::ClientError),
    #[error(transparent)]
    Devices(#[from] DevicesError),
    #[error("volume {volume} is already mapped at /dev/ublkb{dev_id}")]
    AlreadyMapped { volume: String, dev_id: u32 },
    #[error("no mapped device matches {0:?}")]
    NotMapped(String),
    #[error("device server: {0}")]
    Server(String),
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, UblkError>;

fn driver(what: &'static str) -> impl FnOnce(libublk::UblkError) -> UblkError {
    move |source| UblkError::Driver { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UblkError {
    let what = what.into();
    move |source| UblkError::Io { what, source }
}

/// The shape of a device and how its server behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UblkConfig {
    /// Hardware queues (one serving thread and one xseg port each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest single request in bytes (the device's max_sectors).
    pub io_buf_bytes: u32,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// Smallest discard the device accepts; vlmc turns whole volume blocks into ZERO entries
    /// and zero-writes the rest.
    pub discard_granularity: u32,
    /// Largest single DISCARD / WRITE_ZEROES in bytes.
    pub max_discard_bytes: u64,
    /// Move data with `UBLK_F_USER_COPY` when the kernel has it (one copy instead of two).
    pub user_copy: bool,
    /// How long I/O waits for vlmc to come back before it fails with EIO.
    pub peer_wait: Duration,
    /// vlmc's port.
    pub vlmc_port: u32,
    /// Open the volume shared: the live-migration mode of a multi-node block volume (attached
    /// on two nodes, no lock until this node writes, never a stale mapping).
    pub shared: bool,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            queues: 2,
            depth: 64,
            io_buf_bytes: 512 << 10,
            logical_block_size: 512,
            discard_granularity: 4096,
            max_discard_bytes: 1 << 30,
            user_copy: true,
            peer_wait: Duration::from_secs(300),
            vlmc_port: peers::peerset::Ports::VLMC,
            shared: false,
        }
    }
}

impl UblkConfig {
    fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(UblkError::Invalid(s));
        if !matches!(self.logical_block_size, 512 | 4096) {
            return bad(format!(
                "logical block size {} (512 or 4096)",
                self.logical_block_size
            ));
        }
        if self.queues == 0 || self.queues > sys::UBLK_MAX_NR_QUEUES as u16 {
            return bad(format!("{} queues", self.queues));
        }
        if self.depth == 0 || u32::from(self.depth) > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!("queue depth {}", self.depth));
        }
        if self.io_buf_bytes < 4096 || !self.io_buf_bytes.is_power_of_two() {
            return bad(format!(
                "io buffer of {} bytes (a power of two >= 4096)",
                self.io_buf_bytes
            ));
        }
        if !self.discard_granularity.is_power_of_two()
            || self.discard_granularity < self.logical_block_size
        {
            return bad(format!(
                "discard granularity {} (a power of two >= the block size)",
                self.discard_granularity
            ));
        }
        if self.max_discard_bytes < u64::from(self.discard_granularity)
            || self.max_discard_bytes >> 9 > u64::from(u32::MAX)
        {
            return bad(format!("max discard of {} bytes", self.max_discard_bytes));
        }
        Ok(())
    }
}

/// Names of the ublk driver's feature bits (UBLK_F_*), lowest first.
pub const FEATURE_NAMES: [&str; 20] = [
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
];

/// Whether this host has the ublk driver at all.
pub fn available() -> bool {
    Path::new(CTRL_PATH).exists()
}

/// The driver's feature bits (GET_FEATURES, Linux >= 6.5).
pub fn features() -> Result<u64> {
    if !available() {
        return Err(UblkError::NoDriver);
    }
    UblkCtrl::get_features().ok_or(UblkError::Unsupported("GET_FEATURES (Linux >= 6.5)"))
}

/// The names of the bits set in `bits`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

fn has(features: u64, flag: impl Into<u64>) -> bool {
    features & flag.into() != 0
}

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

impl ServeRequest {
    /// The server's command line (after the launcher's own arguments); [`ServeRequest::parse`]
    /// reads it back.
    pub fn to_args(&self) -> Vec<String> {
        let c = &self.config;
        let mut a = vec![
            "--volume".into(),
            self.volume.clone(),
            "--segment".into(),
            self.segment.clone(),
            "--state".into(),
            self.table.path().display().to_string(),
            "--queues".into(),
            c.queues.to_string(),
            "--depth".into(),
            c.depth.to_string(),
            "--io-buf-bytes".into(),
            c.io_buf_bytes.to_string(),
            "--block-size".into(),
            c.logical_block_size.to_string(),
            "--discard-granularity".into(),
            c.discard_granularity.to_string(),
            "--max-discard-bytes".into(),
            c.max_discard_bytes.to_string(),
            "--user-copy".into(),
            c.user_copy.to_string(),
            "--peer-wait-ms".into(),
            c.peer_wait.as_millis().to_string(),
            "--vlmc-port".into(),
            c.vlmc_port.to_string(),
            "--shared".into(),
            c.shared.to_string(),
        ];
        match self.mode {
            ServeMode::Add { dev_id: Some(id) } => a.extend(["--dev-id".into(), id.to_string()]),
            ServeMode::Add { dev_id: None } => {}
            ServeMode::Recover { dev_id } => a.extend(["--recover".into(), dev_id.to_string()]),
        }
        a
    }

    /// Parses what [`ServeRequest::to_args`] wrote.
    pub fn parse(args: &[String]) -> Result<ServeRequest> {
        let mut volume = None;
        let mut segment = None;
        let mut state = None;
        let mut c = UblkConfig::default();
        let mut mode = ServeMode::Add { dev_id: None };
        let mut it = args.iter();
        fn num<T: std::str::FromStr>(k: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| UblkError::Invalid(format!("{k} {v:?}")))
        }
        while let Some(k) = it.next() {
            let v = it
                .next()
                .ok_or_else(|| UblkError::Invalid(format!("{k} needs a value")))?;
            match k.as_str() {
                "--volume" => volume = Some(v.clone()),
                "--segment" => segment = Some(v.clone()),
                "--state" => state = Some(PathBuf::from(v)),
                "--queues" => c.queues = num(k, v)?,
                "--depth" => c.depth = num(k, v)?,
                "--io-buf-bytes" => c.io_buf_bytes = num(k, v)?,
                "--block-size" => c.logical_block_size = num(k, v)?,
                "--discard-granularity" => c.discard_granularity = num(k, v)?,
                "--max-discard-bytes" => c.max_discard_bytes = num(k, v)?,
                "--user-copy" => c.user_copy = num(k, v)?,
                "--peer-wait-ms" => c.peer_wait = Duration::from_millis(num(k, v)?),
                "--vlmc-port" => c.vlmc_port = num(k, v)?,
                "--shared" => c.shared = num(k, v)?,
                "--dev-id" => {
                    mode = ServeMode::Add {
                        dev_id: Some(num(k, v)?),
                    }
                }
                "--recover" => mode = ServeMode::Recover { dev_id: num(k, v)? },
                other => return Err(UblkError::Invalid(format!("unknown option {other}"))),
            }
        }
        Ok(ServeRequest {
            volume: volume.ok_or_else(|| UblkError::Invalid("--volume is required".into()))?,
            segment: segment.ok_or_else(|| UblkError::Invalid("--segment is required".into()))?,
            config: c,
            mode,
            table: DeviceTable::new(state.unwrap_or_else(DeviceTable::default_path)),
        })
    }
}

/// What a server did, once its device is gone.
#[derive(Debug)]
pub struct ServeReport {
    pub device: Option<DeviceRecord>,
    pub stats: Arc<IoStats>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("tokio runtime"))
}

/// Opens the volume at vlmc (taking its lock, unless shared), returning its size.
fn open_volume(segment: &Arc<Segment>, volume: &str, shared: bool) -> Result<u64> {
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
fn close_volume(segment: &Arc<Segment>, volume: &str) {
    let r = VolumeClient::connect(segment)
        .map_err(UblkError::from)
        .and_then(|c| Ok(runtime()?.block_on(c.close(volume))?));
    if let Err(e) = r {
        tracing::warn!(volume, error = %e, "closing the volume after unmap");
    }
}

fn attach(segment: &str) -> Result<Arc<Segment>> {
    Ok(Segment::attach(&xseg::segment_path(segment)?)?)
}

/// Serves one device in this process until it is stopped (by [`unmap`]); `on_ready` runs once
/// `/dev/ublkbN` is live and recorded in the table.
///
/// In `Add` mode the device is created with user recovery, so killing this process leaves it
/// waiting for [`recover`]. In `Recover` mode it takes over such a device.
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
            if let Some(r) = req.table.find(&req.volume)?
                && r.volume == req.volume
                && device_exists(r.dev_id)
            {
                return Err(UblkError::AlreadyMapped {
                    volume: r.volume,
                    dev_id: r.dev_id,
                });
            }
            let mut flags = 0u64;
            for f in [
                u64::from(sys::UBLK_F_USER_RECOVERY),
                u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE),
                // Only records the intent (the driver does not check it), harmless elsewhere.
                sys::UBLK_F_UPDATE_SIZE as u64,
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
    let stats = Arc::new(IoStats::default());
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
                pid_start: process_start_time(pid).unwrap_or(0),
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

fn shift_of(v: u64) -> u32 {
    v.trailing_zeros()
}

/// The body of the hidden `archip __ublk-serve ARGS...` command that [`map`] starts: parses
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

/// How to start a device server process: `program args... <serve args>`.
#[derive(Clone, Debug)]
pub struct Launcher {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl Launcher {
    /// This executable with `args` before the server's own (e.g. `["__ublk-serve"]`).
    pub fn current_exe(args: &[&str]) -> Result<Launcher> {
        Ok(Launcher {
            program: std::env::current_exe().map_err(io_err("current executable"))?,
            args: args.iter().map(OsString::from).collect(),
        })
    }
}

/// A request to map a volume.
#[derive(Clone, Debug)]
pub struct MapRequest {
    pub volume: String,
    pub segment: String,
    pub config: UblkConfig,
    pub table: DeviceTable,
    pub dev_id: Option<u32>,
    /// Where the server's stderr goes; default `<state dir>/ublk-<volume>.log`.
    pub log: Option<PathBuf>,
}

fn log_path(table: &DeviceTable, volume: &str, log: Option<&Path>) -> PathBuf {
    if let Some(l) = log {
        return l.to_path_buf();
    }
    let safe: String = volume
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = table.path().parent().unwrap_or(Path::new("."));
    dir.join(format!("ublk-{safe}.log"))
}

/// Starts a server process for `req` and waits until it reports its device live.
fn launch(launcher: &Launcher, req: &ServeRequest, log: &Path) -> Result<u32> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).map_err(io_err(format!("{}", d.display())))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("{}", log.display())))?;
    let mut child = Command::new(&launcher.program)
        .args(&launcher.args)
        .args(req.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        // Its own process group: a ^C or a SIGHUP to the caller's group does not reach it.
        .process_group(0)
        .spawn()
        .map_err(io_err(format!("starting {}", launcher.program.display())))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    let read = BufReader::new(stdout).read_line(&mut line);
    let ready = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|id| id.parse::<u32>().ok());
    match (read, ready) {
        (Ok(_), Some(id)) => {
            // Reap it whenever it exits, so a long-lived caller collects no zombies.
            std::thread::spawn(move || child.wait());
            Ok(id)
        }
        _ => {
            let status = child.wait().map_err(io_err("waiting for the server"))?;
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(UblkError::Server(format!(
                "exited ({status}) before its device was live; {}: {}",
                log.display(),
                tail.join(" | ")
            )))
        }
    }
}

/// `archip map VOLUME`: starts a server for the volume and returns its live device.
pub fn map(req: &MapRequest, launcher: &Launcher) -> Result<DeviceRecord> {
    req.config.validate()?;
    if !available() {
        return Err(UblkError::NoDriver);
    }
    if let Some(r) = req.table.find(&req.volume)?
        && r.volume == req.volume
        && device_exists(r.dev_id)
    {
        return Err(UblkError::AlreadyMapped {
            volume: r.volume,
            dev_id: r.dev_id,
        });
    }
    let sreq = ServeRequest {
        volume: req.volume.clone(),
        segment: req.segment.clone(),
        config: req.config.clone(),
        mode: ServeMode::Add { dev_id: req.dev_id },
        table: req.table.clone(),
    };
    let log = log_path(&req.table, &req.volume, req.log.as_deref());
    let id = launch(launcher, &sreq, &log)?;
    req.table
        .find(&id.to_string())?
        .ok_or_else(|| UblkError::Server(format!("device {id} is live but was not recorded")))
}

fn device_exists(id: u32) -> bool {
    Path::new(&format!("/dev/ublkc{id}")).exists() || Path::new(&format!("/dev/ublkb{id}")).exists()
}

/// Kernel state of a device, as `showmapped` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Live,
    /// Server gone, I/O held for a successor ([`recover`]).
    Quiesced,
    /// Server gone, I/O failing (a device without user recovery, or FAIL_IO mode).
    FailIo,
    Dead,
    /// No such device in the kernel.
    Gone,
    Unknown,
}

/// The kernel's view of device `id`.
pub fn device_state(id: u32) -> DeviceState {
    if !available() {
        return DeviceState::Unknown;
    }
    if !device_exists(id) {
        return DeviceState::Gone;
    }
    match UblkCtrl::new_simple(id as i32) {
        Ok(c) => match u32::from(c.dev_info().state) {
            sys::UBLK_S_DEV_LIVE => DeviceState::Live,
            sys::UBLK_S_DEV_QUIESCED => DeviceState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DeviceState::FailIo,
            sys::UBLK_S_DEV_DEAD => DeviceState::Dead,
            _ => DeviceState::Unknown,
        },
        Err(_) => DeviceState::Gone,
    }
}

/// One line of `archip showmapped`.
#[derive(Clone, Debug, Serialize)]
pub struct MappedDevice {
    #[serde(flatten)]
    pub record: DeviceRecord,
    pub device: String,
    pub state: DeviceState,
    pub server_alive: bool,
}

/// `archip showmapped`: every recorded device with its kernel state and server liveness.
pub fn showmapped(table: &DeviceTable) -> Result<Vec<MappedDevice>> {
    Ok(table
        .load()?
        .into_iter()
        .map(|r| MappedDevice {
            device: r.block_device().display().to_string(),
            state: device_state(r.dev_id),
            server_alive: r.server_alive(),
            record: r,
        })
        .collect())
}

/// Waits until process `pid` exits (via a pidfd: no polling), at most `timeout`.
fn wait_exit(pid: u32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags, no pointers; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return true; // no such process
    }
    let fd = fd as i32;
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd; `fd` is ours and closed right after.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    // SAFETY: closing the pidfd we opened above.
    unsafe { libc::close(fd) };
    n == 1
}

/// `archip unmap DEVICE|VOLUME`: stops and deletes the device, waits for its server to exit,
/// and forgets it. A device whose server is dead (quiesced) is deleted too, failing its held I/O.
pub fn unmap(table: &DeviceTable, target: &str) -> Result<Option<DeviceRecord>> {
    let rec = table.find(target)?;
    let id = match (&rec, parse_device(target)) {
        (Some(r), _) => r.dev_id,
        (None, Some(id)) => id,
        (None, None) => return Err(UblkError::NotMapped(target.into())),
    };
    if !available() {
        return Err(UblkError::NoDriver);
    }
    if device_exists(id) {
        let ctrl = UblkCtrl::new_simple(id as i32).map_err(driver("open device"))?;
        // STOP first: the server's queues end and it exits; DEL then waits for the release.
        let _ = ctrl.kill_dev();
        if let Err(e) = ctrl.del_dev() {
            if device_exists(id) {
                return Err(UblkError::Driver {
                    what: "delete device",
                    source: e,
                });
            }
        }
    }
    if let Some(r) = &rec {
        if r.pid != std::process::id()
            && r.server_alive()
            && !wait_exit(r.pid, Duration::from_secs(60))
        {
            return Err(UblkError::Server(format!(
                "server {} of /dev/ublkb{id} did not exit after the device was deleted",
                r.pid
            )));
        }
        if !r.server_alive() {
            // Nobody else will release the volume's lock.
            if let Ok(seg) = attach(&r.segment) {
                close_volume(&seg, &r.volume);
            }
        }
    }
    table.remove(id, None)?;
    Ok(rec)
}

/// `archip map --recover` / node start-up: starts a server for every recorded device whose
/// server is gone and whose device still exists; forgets records of vanished devices.
pub fn recover(
    table: &DeviceTable,
    launcher: &Launcher,
    config: &UblkConfig,
) -> Result<Vec<Result<DeviceRecord>>> {
    let mut out = Vec::new();
    for r in table.load()? {
        if r.server_alive() {
            continue;
        }
        if !device_exists(r.dev_id) {
            table.remove(r.dev_id, Some(r.pid))?;
            continue;
        }
        let req = ServeRequest {
            volume: r.volume.clone(),
            segment: r.segment.clone(),
            config: UblkConfig {
                queues: r.queues,
                depth: r.depth,
                logical_block_size: r.logical_block_size,
                user_copy: r.user_copy,
                shared: r.shared,
                ..config.clone()
            },
            mode: ServeMode::Recover { dev_id: r.dev_id },
            table: table.clone(),
        };
        let log = log_path(table, &r.volume, None);
        out.push(launch(launcher, &req, &log).and_then(|id| {
            table
                .find(&id.to_string())?
                .ok_or_else(|| UblkError::Server(format!("device {id} recovered but not recorded")))
        }));
    }
    Ok(out)
}

/// Online resize of a mapped device to `new_size` bytes (rounded down to its block size), after
/// the volume itself was resized. Needs `UBLK_F_UPDATE_SIZE` (Linux 6.16+).
pub fn resize(table: &DeviceTable, target: &str, new_size: u64) -> Result<u64> {
    let rec = table
        .find(target)?
        .ok_or_else(|| UblkError::NotMapped(target.into()))?;
    if !has(features()?, sys::UBLK_F_UPDATE_SIZE as u64) {
        return Err(UblkError::Unsupported(
            "online resize (UBLK_F_UPDATE_SIZE, Linux 6.16+)",
        ));
    }
    let lbs = u64::from(rec.logical_block_size);
    let size = new_size / lbs * lbs;
    UblkCtrl::new_simple(rec.dev_id as i32)
        .and_then(|c| c.update_size(size))
        .map_err(driver("UPDATE_SIZE"))?;
    table.update(|devs| {
        for d in devs.iter_mut().filter(|d| d.dev_id == rec.dev_id) {
            d.size = size;
        }
    })?;
    Ok(size)
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
    }

    #[test]
    fn config_validation() {
        assert!(UblkConfig::default().validate().is_ok());
        let bad = [
            UblkConfig {
                logical_block_size: 1024,
                ..Default::default()
            },
            UblkConfig {
                queues: 0,
                ..Default::default()
            },
            UblkConfig {
                depth: 0,
                ..Default::default()
            },
            UblkConfig {
                io_buf_bytes: 3000,
                ..Default::default()
            },
            UblkConfig {
                logical_block_size: 4096,
                discard_granularity: 512,
                ..Default::default()
            },
            UblkConfig {
                max_discard_bytes: 1 << 50,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?} should be refused");
        }
    }

    #[test]
    fn feature_bits_are_named() {
        assert_eq!(
            feature_names(0x1fe),
            [
                "URING_CMD_COMP_IN_TASK",
                "NEED_GET_DATA",
                "USER_RECOVERY",
                "USER_RECOVERY_REISSUE",
                "UNPRIVILEGED_DEV",
                "CMD_IOCTL_ENCODE",
                "USER_COPY",
                "ZONED"
            ]
        );
        assert_eq!(1u64 << 10, sys::UBLK_F_UPDATE_SIZE as u64);
        assert_eq!(1u64 << 7, u64::from(sys::UBLK_F_USER_COPY));
    }

    #[test]
    fn log_names_are_sanitised() {
        let t = DeviceTable::new("/run/archip/state.json");
        assert_eq!(
            log_path(&t, "a/b c", None),
            PathBuf::from("/run/archip/ublk-a_b_c.log")
        );
    }
}
