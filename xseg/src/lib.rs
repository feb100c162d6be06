//! xseg: the shared-memory transport between Archipelago peers.
//!
//! One segment per node, mapped by every peer. Peers bind ports; requests come from a pool in
//! the segment and carry their data in segment buffers, so data moves between peers without
//! copies. Each port has a request ring and a reply ring (lock-free, multi-producer), and a
//! futex word for sleeping. Nothing in the segment is a lock: a peer killed at any instant
//! leaves nothing held, and its port is recovered automatically ([`Segment::reap`]), failing
//! back to their senders the requests it was serving.
//!
//! - [`segment`]: the shared-memory file and typed access to what lies in it ([`layout`]);
//! - [`port`]: binding, sending, accepting, replying and waiting ([`WaitPolicy`]);
//! - [`ring`]: the lock-free request and reply rings of a port; `futex`: sleeping on them;
//! - [`request`]: a handle on one request slot; [`protocol`]: op codes, flags and payloads;
//! - [`peer`]: the accept-handle-reply loop of a peer; [`client`]: many requests in flight
//!   from async code; [`retry`]: retrying a send refused for a moment;
//! - [`owner`]: process identity that survives pid reuse; `recovery`: failing back what a
//!   dead peer held; [`stats`]: per-port counters; [`error`]: the typed errors;
//! - [`bench`]: `archip bench xseg`.

pub mod client;
pub mod error;
mod futex;
pub mod layout;
pub mod owner;
pub mod peer;
pub mod port;
pub mod protocol;
mod recovery;
pub mod request;
pub mod retry;
pub mod ring;
pub mod segment;
pub mod stats;

pub use client::AsyncClient;
pub use error::{Error, Result};
pub use layout::{Config, MAX_TARGET_LEN};
pub use peer::{Peer, Runner, Stopper};
pub use port::{Port, Sender, WaitPolicy};
pub use protocol::{Op, Status};
pub use request::{Request, Target};
pub use retry::SendRetry;
pub use segment::{Segment, segment_path};
pub use stats::PortStats;
pub mod bench;
