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
//!
//! Layout: `control` holds what the CLI and the CSI node call (map, unmap, recover, resize,
//! showmapped, device state), `server` the device server process, `queue` the data path of one
//! hardware queue, `features` the driver's feature bits.

mod control;
mod features;
mod queue;
mod server;

use std::path::Path;
use std::time::Duration;

use libublk::sys;

use crate::devices::DevicesError;
pub use crate::io_stats::IoStats;
pub use control::{
    DeviceState, Launcher, MapRequest, MappedDevice, device_state, map, recover, resize,
    showmapped, unmap,
};
pub use features::{FEATURE_NAMES, feature_names, features};
pub use server::{ServeArgs, ServeMode, ServeReport, ServeRequest, serve, serve_main};

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

/// The default queue count and depth for a machine with `cpus` CPUs: one queue per CPU (each
/// queue thread serves its CPU's submissions without a cross-CPU wake-up; the kernel caps the
/// count at the number of CPUs anyway), up to 8, and a depth that keeps about 128 requests in
/// flight per device, 32 to 64 per queue: each holds an xseg request and segment buffer, and
/// without user copy a per-tag bounce buffer of `io_buf_bytes`, so the total is what bounds
/// memory.
pub fn default_shape(cpus: usize) -> (u16, u16) {
    let queues = cpus.clamp(1, 8) as u16;
    let depth = (128 / queues).clamp(32, 64);
    (queues, depth)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for UblkConfig {
    fn default() -> Self {
        let (queues, depth) = default_shape(cpus());
        UblkConfig {
            queues,
            depth,
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

/// Whether this host has the ublk driver at all.
pub fn available() -> bool {
    Path::new(CTRL_PATH).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(UblkConfig::default().validate().is_ok());
        let with = |change: fn(&mut UblkConfig)| {
            let mut c = UblkConfig::default();
            change(&mut c);
            c
        };
        let bad = [
            with(|c| c.logical_block_size = 1024),
            with(|c| c.queues = 0),
            with(|c| c.depth = 0),
            with(|c| c.io_buf_bytes = 3000),
            with(|c| {
                c.logical_block_size = 4096;
                c.discard_granularity = 512;
            }),
            with(|c| c.max_discard_bytes = 1 << 50),
        ];
        for c in bad {
            assert!(c.validate().is_err(), "{c:?} should be refused");
        }
    }

    #[test]
    fn the_default_shape_follows_the_cpu_count() {
        assert_eq!(default_shape(0), (1, 64));
        assert_eq!(default_shape(1), (1, 64));
        assert_eq!(default_shape(2), (2, 64));
        assert_eq!(default_shape(4), (4, 32));
        assert_eq!(default_shape(8), (8, 32));
        assert_eq!(default_shape(64), (8, 32));
        let (q, d) = default_shape(cpus());
        assert_eq!(
            (UblkConfig::default().queues, UblkConfig::default().depth),
            (q, d)
        );
        assert!(UblkConfig::default().validate().is_ok());
    }
}
