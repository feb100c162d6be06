//! Where everything lives inside the segment, and the structures laid there.
//!
//! The layout is a pure function of [`Config`]: the creator writes the config into the header
//! and every attacher recomputes the layout from it and compares. After attach a peer uses only
//! its own computed copy, so garbage written over the header later cannot move anything.
//!
//! ```text
//! page 0          Header (magic, version, config, offsets)
//! ports           nr_ports × PortShm            (1 KiB each, cache-line aligned)
//! rings           2 × nr_ports × Ring           (request ring, reply ring per port)
//! requests        nr_requests × RequestShm      (512 bytes each)
//! buffer owners   one AtomicU32 per buffer      (0 = free, else request index + 1)
//! buffers         per class: count × size bytes (page aligned)
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::error::{Error, Result};

pub const MAGIC: u64 = u64::from_le_bytes(*b"ARCHXSEG");
/// Bumped whenever any structure below changes shape.
pub const LAYOUT_VERSION: u32 = 1;
pub const PAGE: u64 = 4096;
/// Hops a request may be forwarded through before its return path is full.
pub const MAX_HOPS: usize = 8;
pub const MAX_CLASSES: usize = 8;
pub const MAX_TARGET_LEN: usize = 256;
pub const PORT_NAME_LEN: usize = 32;
pub const HIST_BUCKETS: usize = 32;

/// Sizes of a segment. Everything is bounded by these numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub nr_ports: u32,
    /// Ports `[dynamic_start, nr_ports)` are handed out by [`crate::Segment::bind_dynamic`].
    pub dynamic_start: u32,
    pub nr_requests: u32,
    /// Data buffer classes as (size in bytes, count), smallest first.
    pub buffer_classes: Vec<(u64, u32)>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nr_ports: 64,
            dynamic_start: 16,
            nr_requests: 2048,
            buffer_classes: vec![
                (4 << 10, 1024),
                (64 << 10, 256),
                (1 << 20, 64),
                (4 << 20, 32),
            ],
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::BadConfig(s));
        if self.nr_ports == 0 || self.nr_ports > 4096 {
            return bad(format!("nr_ports {} not in 1..=4096", self.nr_ports));
        }
        if self.dynamic_start > self.nr_ports {
            return bad(format!(
                "dynamic_start {} beyond nr_ports {}",
                self.dynamic_start, self.nr_ports
            ));
        }
        if self.nr_requests == 0 || self.nr_requests > (1 << 20) {
            return bad(format!("nr_requests {} not in 1..=2^20", self.nr_requests));
        }
        if self.buffer_classes.is_empty() || self.buffer_classes.len() > MAX_CLASSES {
            return bad(format!("1..={MAX_CLASSES} buffer classes needed"));
        }
        let mut last = 0;
        for &(size, count) in &self.buffer_classes {
            if size == 0 || size % PAGE != 0 || size <= last || size > (1 << 30) {
                return bad(format!(
                    "buffer class size {size} must be page-aligned, increasing, at most 1 GiB"
                ));
            }
            if count == 0 || count > (1 << 20) {
                return bad(format!("buffer class count {count} not in 1..=2^20"));
            }
            last = size;
        }
        Ok(())
    }
}

/// Offsets of every region, computed from a [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub config: Config,
    pub ring_capacity: u64,
    pub ports_off: u64,
    pub rings_off: u64,
    pub ring_size: u64,
    pub requests_off: u64,
    pub owners_off: u64,
    /// Per class: (offset of the first buffer, size, count, index of its first owner word).
    pub classes: Vec<BufferClass>,
    pub total_buffers: u32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferClass {
    pub offset: u64,
    pub size: u64,
    pub count: u32,
    pub first: u32,
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl Layout {
    pub fn new(config: &Config) -> Result<Layout> {
        config.validate()?;
        // A ring can hold every request at once, so a push never finds it full.
        let ring_capacity = u64::from(config.nr_requests).next_power_of_two();
        let ports_off = PAGE;
        let rings_off = align(
            ports_off + u64::from(config.nr_ports) * size_of::<PortShm>() as u64,
            PAGE,
        );
        let ring_size = align(RING_HEADER + ring_capacity * 8, 128);
        let requests_off = align(rings_off + 2 * u64::from(config.nr_ports) * ring_size, PAGE);
        let owners_off = align(
            requests_off + u64::from(config.nr_requests) * size_of::<RequestShm>() as u64,
            PAGE,
        );
        let total_buffers: u32 = config.buffer_classes.iter().map(|c| c.1).sum();
        let mut off = align(owners_off + u64::from(total_buffers) * 4, PAGE);
        let mut classes = Vec::new();
        let mut first = 0;
        for &(size, count) in &config.buffer_classes {
            classes.push(BufferClass {
                offset: off,
                size,
                count,
                first,
            });
            off += size * u64::from(count);
            first += count;
        }
        Ok(Layout {
            config: config.clone(),
            ring_capacity,
            ports_off,
            rings_off,
            ring_size,
            requests_off,
            owners_off,
            classes,
            total_buffers,
            size: off,
        })
    }
}

/// Bytes before the slots of a ring: head and tail each on their own 64-byte line.
pub const RING_HEADER: u64 = 128;

/// The first page. Plain integers written once by the creator, read once by attachers.
#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: u32,
    pub header_size: u32,
    pub segment_size: u64,
    pub nr_ports: u32,
    pub dynamic_start: u32,
    pub nr_requests: u32,
    pub nr_classes: u32,
    pub class_size: [u64; MAX_CLASSES],
    pub class_count: [u32; MAX_CLASSES],
    pub port_size: u32,
    pub request_size: u32,
    pub creator_pid: u32,
    pub _pad: u32,
}

/// Owner word states (low 32 bits; the high 32 bits hold the pid that set them).
pub const PORT_FREE: u64 = 0;
pub const PORT_BINDING: u64 = 1;
pub const PORT_BOUND: u64 = 2;
pub const PORT_RECLAIMING: u64 = 3;

/// One port in shared memory.
#[repr(C, align(64))]
pub struct PortShm {
    /// pid << 32 | state. A single word so that bind and reclaim are one compare-and-swap.
    pub owner: AtomicU64,
    pub owner_start: AtomicU64,
    /// Bumped on every bind and reclaim; a reply addressed to an older generation is an orphan.
    pub generation: AtomicU32,
    pub name_len: AtomicU32,
    pub name: [AtomicU8x8; PORT_NAME_LEN / 8],
    pub _pad0: [u64; 1],
    /// Futex word: 1 while the owner sleeps or is about to.
    pub sleeping: AtomicU32,
    pub _pad1: [u32; 15],
    pub stats: PortStatsShm,
}

/// Eight name bytes stored in one atomic word, so readers never race on plain memory.
pub type AtomicU8x8 = AtomicU64;

#[repr(C, align(64))]
pub struct PortStatsShm {
    pub accepted: AtomicU64,
    pub replied: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
    pub submitted: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub wakeups: AtomicU64,
    /// Service time histogram: bucket i counts requests served in [2^i, 2^(i+1)) ns.
    pub service_ns: [AtomicU64; HIST_BUCKETS],
}

/// Request slot states.
pub const REQ_FREE: u32 = 0;
pub const REQ_ALLOCATED: u32 = 1;
pub const REQ_QUEUED: u32 = 2;
pub const REQ_SERVING: u32 = 3;
pub const REQ_REPLIED: u32 = 4;

/// One request in shared memory. Integers are atomics so that a reader racing a buggy writer
/// sees garbage values (which validation rejects), never undefined behaviour.
#[repr(C, align(64))]
pub struct RequestShm {
    pub state: AtomicU32,
    /// Port currently responsible for the request.
    pub holder: AtomicU32,
    /// Port (low 32) and its generation (high 32) that allocated the request.
    pub owner: AtomicU64,
    pub op: AtomicU32,
    pub flags: AtomicU32,
    pub offset: AtomicU64,
    pub size: AtomicU64,
    pub serviced: AtomicU64,
    pub result: AtomicU32,
    pub target_len: AtomicU32,
    /// Buffer index + 1 (0 = no buffer).
    pub buffer: AtomicU32,
    pub path_len: AtomicU32,
    pub data_len: AtomicU64,
    pub submit_ns: AtomicU64,
    pub accept_ns: AtomicU64,
    /// Free for the sender: a correlation id that comes back unchanged with the reply.
    pub tag: AtomicU64,
    pub src_port: AtomicU32,
    pub dst_port: AtomicU32,
    /// Return path: port (low 32) and generation (high 32) of each hop.
    pub path: [AtomicU64; MAX_HOPS],
    pub target: [AtomicU64; MAX_TARGET_LEN / 8],
}

const _: () = assert!(size_of::<Header>() as u64 <= PAGE);
const _: () = assert!(size_of::<PortShm>() % 64 == 0);
const _: () = assert!(size_of::<RequestShm>() % 64 == 0);
const _: () = assert!(std::mem::offset_of!(PortShm, sleeping) % 64 == 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_is_ordered_and_aligned() {
        let l = Layout::new(&Config::default()).unwrap();
        assert!(l.ports_off < l.rings_off && l.rings_off < l.requests_off);
        assert!(l.requests_off < l.owners_off && l.owners_off < l.classes[0].offset);
        for c in &l.classes {
            assert_eq!(c.offset % PAGE, 0);
        }
        assert_eq!(l.ring_capacity, 2048);
        assert_eq!(l.total_buffers, 1024 + 256 + 64 + 32);
    }

    #[test]
    fn bad_configs_are_refused() {
        for classes in [vec![(4096, 1), (4096, 1)], vec![(1000, 1)], vec![]] {
            let c = Config {
                buffer_classes: classes,
                ..Config::default()
            };
            assert!(c.validate().is_err());
        }
        let c = Config {
            dynamic_start: 100,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            nr_requests: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
