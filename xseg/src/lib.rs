//! Shared-memory transport between Archipelago peers.
