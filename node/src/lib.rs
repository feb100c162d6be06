//! Node-side frontends and the CSI Node service.
//!
//! - [`ublk`]: volumes as `/dev/ublkbN` block devices (libublk), served over xseg by vlmc,
//!   surviving restarts of their server process (user recovery);
//! - [`devices`]: the state file recording which device serves which volume;
//! - [`io_stats`]: the I/O counters both frontends keep.
//! - [`nbd`]: volumes exported over NBD, and `archip bench nbd`;
//! - [`csi_node`]: the CSI Node service, staging volumes as ublk devices.

pub mod csi_node;
pub mod devices;
pub mod io_stats;
pub mod nbd;
pub mod ublk;
