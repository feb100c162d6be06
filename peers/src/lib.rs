//! The Archipelago peers' storage core: blockers (storage drivers), the map format, and the
//! mapper (volumes, copy-on-write, snapshots, clones, locks, dedup, GC).
//!
//! This layer is plain async Rust over [`blocker::Blocker`]; the xseg peers wrap it and drive
//! it from their request loops.

pub mod bench;
pub mod blocker;
pub mod blocker_peer;
pub mod client;
pub mod fence;
pub mod map;
pub mod mapper;
pub mod mapper_peer;
pub mod peerset;
pub mod registry;
pub(crate) mod throttle;
pub mod vlmc;
pub mod wire;
