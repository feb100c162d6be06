//! The Archipelago peers.
