//! The control side: starting device servers ([`map`], [`recover`]), stopping them ([`unmap`]),
//! resizing, and reporting what is mapped with its kernel state, from the device table.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use libublk::ctrl::UblkCtrl;
use libublk::sys;
use serde::Serialize;

use super::features::{features, has};
use super::server::{ServeMode, ServeRequest, attach, close_volume};
use super::{Result, UblkConfig, UblkError, available, driver, io_err};
use crate::devices::{DeviceRecord, DeviceTable, Target};

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

pub(super) fn log_path(table: &DeviceTable, volume: &str, log: Option<&Path>) -> PathBuf {
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
pub(super) fn launch(launcher: &Launcher, req: &ServeRequest, log: &Path) -> Result<u32> {
    if let Some(d) = log.parent() {
        peers::private::create_dir_all(d).map_err(io_err(format!("{}", d.display())))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(peers::private::FILE_MODE)
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

/// Refuses a second device for a volume whose recorded device still exists: two servers
/// of one volume on one node would each believe they hold its lock.
pub(super) fn refuse_if_mapped(table: &DeviceTable, volume: &str) -> Result<()> {
    if let Some(r) = table.by_volume(volume)?
        && device_exists(r.dev_id)
    {
        return Err(UblkError::AlreadyMapped {
            volume: r.volume,
            dev_id: r.dev_id,
        });
    }
    Ok(())
}

/// `archip map VOLUME`: starts a server for the volume and returns its live device.
pub fn map(req: &MapRequest, launcher: &Launcher) -> Result<DeviceRecord> {
    req.config.validate()?;
    if !available() {
        return Err(UblkError::NoDriver);
    }
    refuse_if_mapped(&req.table, &req.volume)?;
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
        .by_id(id)?
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
pub(super) fn wait_exit(pid: u32, timeout: Duration) -> bool {
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
pub fn unmap(table: &DeviceTable, target: &Target) -> Result<Option<DeviceRecord>> {
    let rec = table.find(target)?;
    let id = match (&rec, target) {
        (Some(r), _) => r.dev_id,
        // An unrecorded device (a leftover of a lost state file) can still be deleted.
        (None, Target::Device(id)) => *id,
        (None, Target::Volume(_)) => return Err(UblkError::NotMapped(target.to_string())),
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
                .by_id(id)?
                .ok_or_else(|| UblkError::Server(format!("device {id} recovered but not recorded")))
        }));
    }
    Ok(out)
}

/// Online resize of a mapped device to `new_size` bytes (rounded down to its block size), after
/// the volume itself was resized. Needs `UBLK_F_UPDATE_SIZE` (Linux 6.16+).
pub fn resize(table: &DeviceTable, target: &Target, new_size: u64) -> Result<u64> {
    let rec = table
        .find(target)?
        .ok_or_else(|| UblkError::NotMapped(target.to_string()))?;
    if !has(features()?, u64::from(sys::UBLK_F_UPDATE_SIZE)) {
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
    fn log_names_are_sanitised() {
        let t = DeviceTable::new("/run/archip/state.json");
        assert_eq!(
            log_path(&t, "a/b c", None),
            PathBuf::from("/run/archip/ublk-a_b_c.log")
        );
    }
}
