//! The Archipelago peers' storage core: blockers (storage drivers), the map format (`map_format`), and the
//! mapper (volumes, copy-on-write, snapshots, clones, locks, dedup, GC).
//!
//! This layer is plain async Rust over [`blocker::Blocker`]; the xseg peers wrap it and drive
//! it from their request loops.

pub mod backend;
pub mod bench;
pub(crate) mod block_range;
pub mod blocker;
pub mod client;
pub mod failure;
pub mod fence;
pub mod flock;
pub mod fs_stats;
pub mod map_format;
pub mod mapper;
pub mod peerset;
pub mod registry;
pub mod size;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub(crate) mod throttle;
pub mod vlmc;
pub mod wire;
