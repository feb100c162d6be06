//! CSI services for Archipelago (filled in by the CSI issue).
