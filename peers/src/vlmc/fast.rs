//! vlmc's run-to-completion path: a read or write that fits in one object whose mapping the
//! cache already holds is forwarded to the blocker from the runner's own thread, as a plain
//! function call, with no tokio task and no wake-up of another thread; the blocker's reply
//! comes back to the same thread ([`super::Vlmc::reply`]), which restores the request and
//! answers the client.
//!
//! It is the slow path's single-object case with every `await` taken out, so it keeps that
//! path's rules by holding the same things for as long as the I/O is in flight: the volume's
//! drain gate (shared, so a snapshot or any other barrier waits for it, as for any I/O) and, for
//! a write, a write ticket (so a FLUSH waits for it). Anything that would have to wait (the
//! gate held by a barrier, a QoS delay or a due refresh of the limits, a cache miss, a
//! read-only block for a write, a volume not yet described, a full queue) declines the fast
//! path before it changes anything, and the request goes the slow way, unchanged.
//!
//! The order of the checks matters: the gate is taken *before* the cache is read. A barrier
//! drops the cache only after its mapper operation, while holding the gate; reading the cache
//! first could find a mapping that the barrier is about to make stale (a block a snapshot has
//! just started to share) and then go on after the barrier with it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::OwnedRwLockReadGuard;
use xseg::{Op, Request, Status};

use super::cache::{Mapping, Vol, WriteTicket, lock};
use super::{Inner, count};

/// A fast-path I/O in flight at the blocker: what its reply needs to become the client's
/// answer, and the guards that keep barriers and flushes waiting until then.
pub(super) struct FastIo {
    name: Box<str>,
    offset: u64,
    op: Op,
    bytes: u64,
    started: Instant,
    _ticket: Option<WriteTicket>,
    _gate: OwnedRwLockReadGuard<()>,
    _vol: Arc<Vol>,
}

/// Who waits for a request vlmc forwarded.
pub(super) enum Waiter {
    /// A task of the slow path.
    Task(tokio::sync::oneshot::Sender<Request>),
    /// Nobody: the reply finishes a fast-path I/O on the runner's thread.
    Fast(Box<FastIo>),
}

impl Inner {
    /// Serves `req` on the fast path if it can, else gives it back untouched.
    pub(super) fn try_fast(&self, mut req: Request) -> Result<(), Request> {
        let op = req.op();
        if !matches!(op, Op::Read | Op::Write) {
            return Err(req);
        }
        let name: Box<str> = match req
            .target()
            .ok()
            .and_then(|t| t.as_str().ok().map(Box::from))
        {
            Some(n) => n,
            None => return Err(req),
        };
        let Ok(vol) = self.vol(&name) else {
            return Err(req);
        };
        // The gate first (see the module documentation).
        let Ok(gate) = vol.gate.clone().try_read_owned() else {
            return Err(req);
        };
        if vol.shared.load(Ordering::Acquire) {
            return Err(req);
        }
        let Some(meta) = *lock(&vol.meta) else {
            return Err(req);
        };
        let (offset, len) = (req.offset(), req.size());
        let write = op == Op::Write;
        let bs = meta.block_size;
        let fits = len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= meta.size && offset / bs == (end - 1) / bs)
            && if write {
                req.data_len() >= len
            } else {
                req.capacity() >= len
            };
        if !fits {
            return Err(req);
        }
        let block = offset / bs;
        let Some(mapping) = vol.cached_one(block, write) else {
            return Err(req);
        };
        let started = Instant::now();
        if !lock(&vol.throttle).admit_now(started, len) {
            return Err(req);
        }
        let object = match mapping {
            Mapping::Zero => {
                // Only reads get here: a write needs a writable object.
                let status = match super::plan::read_zeros(&mut req, len) {
                    Ok(()) => {
                        req.complete(len);
                        Status::Ok
                    }
                    Err(f) => {
                        let status = f.status;
                        f.apply(&mut req);
                        status
                    }
                };
                count(
                    op,
                    &name,
                    status == Status::Ok,
                    false,
                    len,
                    started.elapsed(),
                );
                self.fast_ios.fetch_add(1, Ordering::Relaxed);
                self.port.respond(req);
                return Ok(());
            }
            Mapping::Object { name: object, .. } => object,
        };
        if req.set_target(object.as_bytes()).is_err() {
            // The target buffer is too small for the object name: the slow path says so.
            return Err(req);
        }
        req.set_offset(offset % bs);
        let fast = FastIo {
            name,
            offset,
            op,
            bytes: len,
            started,
            _ticket: write.then(|| vol.begin_write()),
            _gate: gate,
            _vol: vol,
        };
        let index = req.index();
        let restore = |r: &mut Request, fast: &FastIo| {
            // Cannot fail: the name fitted when the client sent it.
            let _ = r.set_target(fast.name.as_bytes());
            r.set_offset(fast.offset);
        };
        let mut forwarded = lock(&self.forwarded);
        forwarded.insert(index, Waiter::Fast(Box::new(fast)));
        match self.port.forward(req, self.config.blocker_port) {
            Ok(()) => Ok(()),
            Err((_, mut back)) => {
                // Full for a moment, or worse: the slow path retries or reports it. Dropping
                // the entry releases the gate and the ticket.
                if let Some(Waiter::Fast(fast)) = forwarded.remove(&index) {
                    restore(&mut back, &fast);
                }
                Err(back)
            }
        }
    }

    /// The blocker's reply to a fast-path I/O: restored to what the client sent, counted and
    /// answered. The guards drop after the answer is queued.
    pub(super) fn finish_fast(&self, mut rep: Request, fast: &FastIo) {
        let _ = rep.set_target(fast.name.as_bytes());
        rep.set_offset(fast.offset);
        let status = rep.status();
        count(
            fast.op,
            &fast.name,
            status == Status::Ok,
            status == Status::NotFound,
            fast.bytes,
            fast.started.elapsed(),
        );
        self.fast_ios.fetch_add(1, Ordering::Relaxed);
        self.port.respond(rep);
    }
}
