//! The blocker peer: object I/O over xseg, served by any [`Blocker`].
//!
//! A read or write the backend can serve without waiting (the file blocker: the page cache
//! holds the range) runs to completion on the peer's thread, answered before the next request
//! is taken: the fast path costs no task and no wake-up of another thread. Every other request
//! runs as its own tokio task, so a slow object (a disk read, a reflink copy, an fsync) never
//! holds up the others; replies go back through a clone of the port's [`Sender`]. Reads land
//! directly in the request's segment buffer and writes come straight from it: the bytes a
//! frontend put in the segment are the bytes the backend sees, with no copy in between.
//!
//! The target is an object name, validated by [`ObjectName`] before anything is done, so a
//! name with `/`, `..`, NUL or a reserved suffix fails with `Invalid` and touches nothing.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::runtime::Handle;
use xseg::protocol::NamePayload;
use xseg::{Op, Peer, Request, Sender, Status};

use crate::blocker::{Blocker, BlockerError, ObjectName};
use crate::failure::Failure;
use crate::wire::{self, ObjectStat};

/// Serves an `Arc<dyn Blocker>` on a port; drive it with an [`xseg::Runner`].
pub struct BlockerPeer {
    blocker: Arc<dyn Blocker>,
    rt: Handle,
}

impl BlockerPeer {
    /// `rt` must be a multi-threaded runtime: the file blocker moves blocking syscalls off the
    /// worker with `block_in_place`, which a current-thread runtime does not allow.
    pub fn new(blocker: Arc<dyn Blocker>, rt: Handle) -> Self {
        BlockerPeer { blocker, rt }
    }
}

impl Peer for BlockerPeer {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        // Run to completion when the backend can answer without waiting (a read from the page
        // cache): no task, no wake-up of another thread, the reply goes out from here.
        if let Some(done) = serve_now(self.blocker.as_ref(), &mut req) {
            if let Err(f) = done {
                f.apply(&mut req);
            }
            tx.respond(req);
            return;
        }
        let blocker = self.blocker.clone();
        let tx = tx.clone();
        self.rt.spawn(async move {
            if let Err(f) = serve(blocker.as_ref(), &mut req).await {
                f.apply(&mut req);
            }
            tx.respond(req);
        });
    }
}

/// The status a blocker error travels as.
pub fn status_of(e: &BlockerError) -> Status {
    match e {
        BlockerError::NotFound { .. } => Status::NotFound,
        BlockerError::InvalidName { .. } | BlockerError::InvalidOwner { .. } => Status::Invalid,
        BlockerError::InvalidRange { .. } => Status::Range,
        BlockerError::Locked { .. } | BlockerError::VersionMismatch { .. } => Status::Busy,
        // A blocklisted client is a fenced one: its lock was broken and taken over.
        BlockerError::Fenced { .. } | BlockerError::Blocklisted { .. } => Status::Stale,
        BlockerError::NoSpace { .. } => Status::NoSpace,
        BlockerError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
        {
            Status::NoSpace
        }
        BlockerError::Corrupt { .. } | BlockerError::Io { .. } | BlockerError::TimedOut { .. } => {
            Status::Io
        }
    }
}

fn object(req: &Request) -> Result<ObjectName, Failure> {
    let t = req
        .target()
        .map_err(|s| Failure::new(s, "garbage target length"))?;
    let s = t
        .as_str()
        .map_err(|s| Failure::new(s, "object name is not UTF-8"))?;
    ObjectName::new(s).map_err(Failure::from)
}

fn length(req: &Request) -> Result<usize, Failure> {
    usize::try_from(req.size()).map_err(|_| Failure::new(Status::Invalid, "size too large"))
}

/// A read's object, offset and the part of the segment buffer it fills.
fn read_args(req: &mut Request) -> Result<(ObjectName, u64, &mut [u8]), Failure> {
    let name = object(req)?;
    let (offset, len) = (req.offset(), length(req)?);
    let buf = req
        .buffer_mut()
        .map_err(|s| Failure::new(s, "bad buffer"))?;
    let buf = buf.get_mut(..len).ok_or_else(|| {
        Failure::new(
            Status::Invalid,
            format!("read of {len} bytes exceeds the buffer"),
        )
    })?;
    Ok((name, offset, buf))
}

/// A write's object, offset and data (in the segment buffer).
fn write_args(req: &Request) -> Result<(ObjectName, u64, &[u8]), Failure> {
    let name = object(req)?;
    let (offset, len) = (req.offset(), length(req)?);
    let data = req.data().map_err(|s| Failure::new(s, "bad buffer"))?;
    let data = data.get(..len).ok_or_else(|| {
        Failure::new(
            Status::Invalid,
            format!("write of {len} bytes carries only {} bytes", data.len()),
        )
    })?;
    Ok((name, offset, data))
}

fn read_done(req: &mut Request) -> Result<(), Failure> {
    let len = req.size();
    req.set_data_len(len)
        .map_err(|e| Failure::new(Status::Invalid, e.to_string()))?;
    req.complete(len);
    Ok(())
}

/// A read or write served on this thread if the backend can do it without waiting; `None`
/// (nothing answered) otherwise. Bad requests are answered here too: failing them cannot wait.
fn serve_now(blocker: &dyn Blocker, req: &mut Request) -> Option<Result<(), Failure>> {
    match req.op() {
        Op::Read => {
            let (name, offset, buf) = match read_args(req) {
                Ok(a) => a,
                Err(f) => return Some(Err(f)),
            };
            match blocker.read_now(&name, offset, buf)? {
                Ok(()) => Some(read_done(req)),
                Err(e) => Some(Err(Failure::from(e))),
            }
        }
        Op::Write => {
            let (name, offset, data) = match write_args(req) {
                Ok(a) => a,
                Err(f) => return Some(Err(f)),
            };
            let len = data.len() as u64;
            match blocker.write_now(&name, offset, data)? {
                Ok(()) => {
                    req.complete(len);
                    Some(Ok(()))
                }
                Err(e) => Some(Err(Failure::from(e))),
            }
        }
        _ => None,
    }
}

async fn serve(blocker: &dyn Blocker, req: &mut Request) -> Result<(), Failure> {
    match req.op() {
        Op::Read => {
            let (name, offset, buf) = read_args(req)?;
            blocker
                .read(&name, offset, buf)
                .await
                .map_err(Failure::from)?;
            read_done(req)?;
        }
        Op::Write => {
            let (name, offset, data) = write_args(req)?;
            let len = data.len() as u64;
            blocker
                .write(&name, offset, data)
                .await
                .map_err(Failure::from)?;
            req.complete(len);
        }
        // The target is ignored: a flush covers every object (vlmc forwards a volume's FLUSH
        // unchanged).
        Op::Flush => {
            blocker.flush().await.map_err(Failure::from)?;
            req.complete(0);
        }
        Op::Delete => {
            let name = object(req)?;
            let existed = blocker.delete(&name).await.map_err(Failure::from)?;
            req.complete(u64::from(existed));
        }
        Op::Copy => {
            let dst = object(req)?;
            let src = NamePayload::decode(req.data().unwrap_or(&[]))
                .map_err(|s| Failure::new(s, "COPY needs the source object name as payload"))?;
            let src = ObjectName::new(src.name).map_err(Failure::from)?;
            blocker.copy(&src, &dst).await.map_err(Failure::from)?;
            req.complete(0);
        }
        Op::Info => {
            let name = object(req)?;
            let stat = match blocker.info(&name).await.map_err(Failure::from)? {
                None => ObjectStat::default(),
                Some(i) => ObjectStat {
                    size: i.size,
                    exists: true,
                    modified_ns: i
                        .modified
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                },
            };
            wire::reply_with(req, |buf| stat.encode(buf));
        }
        op => {
            return Err(Failure::new(
                Status::Unsupported,
                format!("the blocker does not serve {op:?}"),
            ));
        }
    }
    Ok(())
}
