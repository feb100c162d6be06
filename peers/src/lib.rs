//! The Archipelago peers' storage core: blockers (storage drivers), the map format (`map_format`), and the
//! mapper (volumes, copy-on-write, snapshots, clones, locks, dedup, GC).
//!
//! This layer is plain async Rust over [`blocker::Blocker`]; the xseg peers wrap it and drive
//! it from their request loops.
//!
//! - [`blocker`]: the storage interface and its backends (file, memory); [`backend`]: which
//!   backend, as configuration;
//! - [`map_format`]: the on-storage map; [`mapper`]: the volume catalogue, copy-on-write,
//!   snapshots, clones, locks, dedup and GC;
//! - [`vlmc`]: the volume peer, with its cache and per-volume QoS (`throttle`);
//! - [`peerset`]: one segment and the peers serving it; [`registry`]: the host-local record
//!   of running peer sets;
//! - [`client`]: `VolumeClient`, the one API of the CLI, CSI and the frontends; [`wire`]: the
//!   payloads the peers exchange; [`failure`]: what a failed request carries back;
//! - [`fence`]: fencing a lost node's locks; [`forward`]: an operation for a volume's lock
//!   holder; `block_range`: cutting ranges at block bounds;
//! - [`bench`]: `archip bench volume`; `testing` (feature `testing`): test fixtures.

/// The maps on the path of every I/O: foldhash (seeded per process) instead of SipHash.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod backend;
pub mod bench;
pub mod bench_cost;
#[cfg(feature = "rados")]
pub mod bench_rados;
pub(crate) mod block_range;
pub mod blocker;
pub mod client;
pub mod failure;
pub mod fence;
pub mod flock;
pub mod forward;
pub mod fs_stats;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod map_format;
pub mod mapper;
pub mod metrics;
pub mod peerset;
pub mod private;
pub mod registry;
pub mod size;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub(crate) mod throttle;
pub mod vlmc;
pub mod wire;
