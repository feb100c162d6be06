//! Typed errors of the transport: every failure a peer can see names what went wrong.

use std::path::PathBuf;

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("segment {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("segment {path} already exists")]
    Exists { path: PathBuf },
    #[error("segment {path} is not an xseg segment (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "segment {path} has layout version {found}, this binary speaks {expected}: stop every peer and recreate it"
    )]
    LayoutVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "segment {path} belongs to {owner}, not to this user ({me}): someone else may read or \
         steer its I/O; remove it (as root) or pick another segment name with --segment"
    )]
    ForeignOwner {
        path: PathBuf,
        owner: String,
        me: String,
    },
    #[error("segment {path} header is inconsistent: {what}")]
    BadHeader { path: PathBuf, what: String },
    #[error("invalid segment configuration: {0}")]
    BadConfig(String),
    #[error("segment is in use by live peers on ports {ports:?}")]
    InUse { ports: Vec<u32> },
    #[error("port {0} does not exist")]
    NoSuchPort(u32),
    #[error("port {port} is bound by live process {pid}")]
    PortBusy { port: u32, pid: u32 },
    #[error("no free dynamic port")]
    NoFreePort,
    #[error("no peer is bound to port {0}")]
    NoPeer(u32),
    #[error("request pool exhausted")]
    NoRequest,
    #[error("no free data buffer of {0} bytes")]
    NoBuffer(u64),
    #[error("data of {0} bytes exceeds the largest buffer class")]
    TooLarge(u64),
    #[error("target name of {0} bytes exceeds {max}", max = crate::MAX_TARGET_LEN)]
    TargetTooLong(usize),
    #[error("request queue of port {0} is full")]
    QueueFull(u32),
    #[error("request queue of port {0} is corrupted")]
    QueueCorrupt(u32),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("request path is full (more than {max} hops)", max = crate::layout::MAX_HOPS)]
    PathFull,
    #[error("timed out after {0:?} waiting for a reply")]
    Timeout(std::time::Duration),
}
