//! The peer set: one segment and the peers serving it (blocker, mapper, vlmc).

/// The fixed port plan of a segment. Clients bind dynamic ports from [`Ports::DYNAMIC_START`].
#[derive(Debug, Clone, Copy)]
pub struct Ports;

impl Ports {
    /// Volume I/O and the catalogue, as clients see it.
    pub const VLMC: u32 = 1;
    pub const MAPPER: u32 = 2;
    /// The data blocker (object I/O).
    pub const BLOCKER: u32 = 3;
    pub const DYNAMIC_START: u32 = 16;
}
