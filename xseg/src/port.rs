//! Ports: binding, sending, accepting, responding, receiving and sleeping.
//!
//! A [`Port`] is the single consumer of its two rings (requests in, replies in) and so is used
//! from one thread at a time (`&mut self`). Its [`Sender`] half is `Clone + Send + Sync`: any
//! thread may allocate, submit, forward and respond through it, which is how asynchronous
//! handlers complete requests later from worker tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::layout::*;
use crate::owner::ProcessId;
use crate::protocol::Op;
use crate::request::Request;
use crate::ring::{HoleWatch, Pop, PushError};
use crate::segment::{RingKind, Segment, now_ns};

/// How often an idle peer wakes up to look for dead peers.
pub const REAP_INTERVAL: Duration = Duration::from_millis(500);

/// How a port waits for work: spin briefly (a busy pipeline then costs no syscalls), then sleep
/// on the port's futex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Pure spinning: long enough to cover a round trip to a peer running on another core.
    pub busy: Duration,
    /// Spinning with `sched_yield`: lets a peer sharing this core run, without sleeping yet.
    pub spin: Duration,
}

impl WaitPolicy {
    /// 2 µs busy, then spinning with yields up to 50 µs: measured in BENCHMARKS.md.
    pub const DEFAULT: WaitPolicy = WaitPolicy {
        busy: Duration::from_nanos(DEFAULT_BUSY_NS),
        spin: Duration::from_nanos(DEFAULT_SPIN_NS),
    };

    /// Makes `policy` what every port this process binds from now on starts with. A per-node
    /// tuning belongs to the process, and ports are bound deep inside peers, clients and
    /// frontends: the entry point (`archip`, from `--xseg-busy-ns`/`--xseg-spin-ns`) sets it
    /// once rather than threading it through every bind site. [`Port::set_wait_policy`]
    /// still overrides it per port.
    pub fn set_process_default(policy: WaitPolicy) {
        PROCESS_BUSY_NS.store(duration_ns(policy.busy), Relaxed);
        PROCESS_SPIN_NS.store(duration_ns(policy.spin), Relaxed);
    }
}

/// Saturates: a wait of 584 years is as good as forever.
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

const DEFAULT_BUSY_NS: u64 = 2_000;
const DEFAULT_SPIN_NS: u64 = 50_000;
static PROCESS_BUSY_NS: AtomicU64 = AtomicU64::new(DEFAULT_BUSY_NS);
static PROCESS_SPIN_NS: AtomicU64 = AtomicU64::new(DEFAULT_SPIN_NS);

impl Default for WaitPolicy {
    /// The process default: [`WaitPolicy::DEFAULT`] unless the entry point set another with
    /// [`WaitPolicy::set_process_default`].
    fn default() -> Self {
        WaitPolicy {
            busy: Duration::from_nanos(PROCESS_BUSY_NS.load(Relaxed)),
            spin: Duration::from_nanos(PROCESS_SPIN_NS.load(Relaxed)),
        }
    }
}

/// The sending half of a port.
#[derive(Clone)]
pub struct Sender {
    seg: Arc<Segment>,
    no: u32,
    hop: u64,
    hint: Arc<AtomicU32>,
}

/// A bound port. Dropping it unbinds the port and fails back whatever was queued to it.
pub struct Port {
    tx: Sender,
    req_watch: HoleWatch,
    rep_watch: HoleWatch,
    policy: WaitPolicy,
    last_reap: Instant,
}

impl std::ops::Deref for Port {
    type Target = Sender;
    fn deref(&self) -> &Sender {
        &self.tx
    }
}

impl Segment {
    /// Binds port `p`. A port whose owner died is recovered first; a live owner is an error.
    pub fn bind(self: &Arc<Self>, p: u32, name: &str) -> Result<Port> {
        if !self.valid_port(p) {
            return Err(Error::NoSuchPort(p));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.try_bind(p, name) {
                Ok(port) => return Ok(port),
                Err(BindError::Busy(pid)) => return Err(Error::PortBusy { port: p, pid }),
                Err(BindError::Transient) => {
                    if Instant::now() > deadline {
                        return Err(Error::PortBusy { port: p, pid: 0 });
                    }
                    self.reap();
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Binds the first free port of the dynamic range.
    pub fn bind_dynamic(self: &Arc<Self>, name: &str) -> Result<Port> {
        let c = self.config();
        for _round in 0..2 {
            for p in c.dynamic_start..c.nr_ports {
                if let Ok(port) = self.try_bind(p, name) {
                    return Ok(port);
                }
            }
            // Maybe dead peers hold them all.
            if self.reap() == 0 {
                break;
            }
        }
        Err(Error::NoFreePort)
    }

    fn try_bind(self: &Arc<Self>, p: u32, name: &str) -> std::result::Result<Port, BindError> {
        let port = self.port(p);
        let me = self.me();
        let w = port.owner.load(Acquire);
        let pid = (w >> 32) as u32;
        match w & 0xffff_ffff {
            PORT_FREE => {}
            PORT_BOUND => {
                let owner = ProcessId {
                    pid,
                    start: port.owner_start.load(Acquire),
                };
                return Err(if owner.is_alive() {
                    BindError::Busy(pid)
                } else {
                    BindError::Transient
                });
            }
            // Being bound or reclaimed by someone (or garbage): reap sorts out the dead.
            _ => return Err(BindError::Transient),
        }
        let binding = u64::from(me.pid) << 32 | PORT_BINDING;
        if port
            .owner
            .compare_exchange(w, binding, AcqRel, Relaxed)
            .is_err()
        {
            return Err(BindError::Transient);
        }
        port.owner_start.store(me.start, Release);
        let epoch = port.generation.fetch_add(1, AcqRel) + 1;
        let bytes = name.as_bytes();
        let n = bytes.len().min(PORT_NAME_LEN);
        for (i, chunk) in bytes[..n].chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            port.name[i].store(u64::from_le_bytes(w), Relaxed);
        }
        port.name_len.store(n as u32, Relaxed);
        port.sleeping.store(0, Relaxed);
        port.owner
            .store(u64::from(me.pid) << 32 | PORT_BOUND, Release);
        tracing::debug!(port = p, name, "bound");
        let seg = match self.remap() {
            Ok(seg) => seg,
            Err(e) => {
                tracing::warn!(port = p, "cannot map the segment again: {e}");
                port.owner.store(PORT_FREE, Release);
                return Err(BindError::Transient);
            }
        };
        Ok(Port {
            tx: Sender {
                seg,
                no: p,
                hop: u64::from(epoch) << 32 | u64::from(p),
                hint: Arc::new(AtomicU32::new(p.wrapping_mul(97))),
            },
            req_watch: HoleWatch::default(),
            rep_watch: HoleWatch::default(),
            policy: WaitPolicy::default(),
            last_reap: Instant::now(),
        })
    }
}

enum BindError {
    Busy(u32),
    Transient,
}

impl Sender {
    pub fn number(&self) -> u32 {
        self.no
    }

    pub fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }

    /// Allocates a request with a data buffer of at least `data_len` bytes (0 for none).
    pub fn alloc(&self, op: Op, target: &[u8], data_len: u64) -> Result<Request> {
        if target.len() > MAX_TARGET_LEN {
            return Err(Error::TargetTooLong(target.len()));
        }
        let n = self.seg.config().nr_requests;
        let start = self.hint.load(Relaxed) % n;
        let mut found = None;
        for i in 0..n {
            let r = (start + i) % n;
            let q = self.seg.req(r);
            if q.state.load(Relaxed) == REQ_FREE
                && q.state
                    .compare_exchange(REQ_FREE, REQ_ALLOCATED, AcqRel, Relaxed)
                    .is_ok()
            {
                found = Some(r);
                break;
            }
        }
        // The hint stays put: first fit from a per-port base keeps reusing the same few slots,
        // which stay hot in this core's cache, while ports start apart and rarely collide.
        let r = found.ok_or(Error::NoRequest)?;
        let q = self.seg.req(r);
        q.owner.store(self.hop, Relaxed);
        q.holder.store(self.no, Relaxed);
        q.flags.store(0, Relaxed);
        q.offset.store(0, Relaxed);
        q.size.store(0, Relaxed);
        q.serviced.store(0, Relaxed);
        q.result.store(0, Relaxed);
        q.path_len.store(0, Relaxed);
        q.data_len.store(0, Relaxed);
        q.tag.store(0, Relaxed);
        q.src_port.store(self.no, Relaxed);
        q.buffer.store(0, Relaxed);
        let mut req = Request {
            seg: self.seg.clone(),
            index: r,
        };
        req.set_op(op);
        req.set_target(target)?;
        if data_len > 0 {
            match self.alloc_buffer(r, data_len) {
                Ok(b) => q.buffer.store(b + 1, Release),
                Err(e) => {
                    self.free(req);
                    return Err(e);
                }
            }
        }
        Ok(req)
    }

    fn alloc_buffer(&self, r: u32, len: u64) -> Result<u32> {
        let classes = &self.seg.layout().classes;
        if len > classes.last().map_or(0, |c| c.size) {
            return Err(Error::TooLarge(len));
        }
        // Smallest fitting class first, then larger ones: a large free buffer serves a small
        // request rather than failing it.
        // First fit: recently freed buffers are reused while still in cache.
        for c in classes.iter().filter(|c| c.size >= len) {
            for i in 0..c.count {
                let b = c.first + i;
                let owner = self.seg.buffer_owner(b);
                if owner.load(Relaxed) == 0
                    && owner.compare_exchange(0, r + 1, AcqRel, Relaxed).is_ok()
                {
                    return Ok(b);
                }
            }
        }
        Err(Error::NoBuffer(len))
    }

    /// Returns a request (and its buffer) to the pool.
    pub fn free(&self, req: Request) {
        drop(req);
    }

    /// Queues `req` to `dst`. On failure the request is back in `state`, the state it was in
    /// here (ALLOCATED for a sender, SERVING for a forwarder), held by this port.
    fn push(&self, req: &Request, dst: u32, state: u32) -> Result<()> {
        let q = self.seg.req(req.index);
        // dst_port before holder: the reaper takes `holder != p && dst_port == p` on a SERVING
        // request for "p died answering it" (see `Segment::recover_port`), which a forward
        // must never look like.
        q.dst_port.store(dst, Relaxed);
        q.holder.store(dst, Relaxed);
        q.submit_ns.store(now_ns(), Relaxed);
        q.state.store(REQ_QUEUED, Release);
        match self.seg.ring(dst, RingKind::Requests).push(req.index) {
            Ok(()) => {
                self.seg.wake(dst);
                self.seg.port(self.no).stats.submitted.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                q.holder.store(self.no, Relaxed);
                q.dst_port.store(self.no, Relaxed);
                q.state.store(state, Release);
                Err(match e {
                    PushError::Full => Error::QueueFull(dst),
                    PushError::Corrupt => Error::QueueCorrupt(dst),
                })
            }
        }
    }

    fn check_dst(&self, dst: u32) -> Result<()> {
        if !self.seg.valid_port(dst) {
            return Err(Error::NoSuchPort(dst));
        }
        if self.seg.port(dst).owner.load(Acquire) & 0xffff_ffff != PORT_BOUND {
            return Err(Error::NoPeer(dst));
        }
        Ok(())
    }

    /// Sends a request this port allocated to port `dst`; its reply comes back to this port.
    /// On failure the request is handed back untouched.
    pub fn submit(&self, mut req: Request, dst: u32) -> std::result::Result<(), (Error, Request)> {
        if let Err(e) = self.check_dst(dst) {
            return Err((e, req));
        }
        req.clear_result();
        let q = self.seg.req(req.index);
        q.path[0].store(self.hop, Relaxed);
        q.path_len.store(1, Relaxed);
        match self.push(&req, dst, REQ_ALLOCATED) {
            Ok(()) => {
                req.hand_on();
                Ok(())
            }
            Err(e) => Err((e, req)),
        }
    }

    /// Passes a request received from elsewhere on to `dst`; the reply returns here first.
    pub fn forward(&self, req: Request, dst: u32) -> std::result::Result<(), (Error, Request)> {
        if let Err(e) = self.check_dst(dst) {
            return Err((e, req));
        }
        let q = self.seg.req(req.index);
        let len = q.path_len.load(Relaxed) as usize;
        if len >= MAX_HOPS {
            return Err((Error::PathFull, req));
        }
        q.path[len].store(self.hop, Relaxed);
        q.path_len.store(len as u32 + 1, Relaxed);
        // Still ours to answer if it cannot be sent: a drop then fails it back to its sender.
        match self.push(&req, dst, REQ_SERVING) {
            Ok(()) => {
                req.hand_on();
                Ok(())
            }
            Err(e) => {
                q.path_len.store(len as u32, Relaxed);
                Err((e, req))
            }
        }
    }

    /// Sends a served request back to whoever sent it, accounting its service time.
    pub fn respond(&self, req: Request) {
        let q = self.seg.req(req.index);
        let stats = &self.seg.port(self.no).stats;
        stats.replied.fetch_add(1, Relaxed);
        if q.result.load(Relaxed) != 0 {
            stats.errors.fetch_add(1, Relaxed);
        } else {
            stats.bytes.fetch_add(q.serviced.load(Relaxed), Relaxed);
        }
        let elapsed = now_ns().saturating_sub(q.accept_ns.load(Relaxed));
        let bucket = (63 - elapsed.max(1).leading_zeros() as usize).min(HIST_BUCKETS - 1);
        stats.service_ns[bucket].fetch_add(1, Relaxed);
        let index = req.hand_on();
        self.seg.respond_raw(index);
    }

    /// Wakes this port's own consumer (used to stop a sleeping peer loop).
    pub fn wake(&self) {
        self.seg.wake(self.no);
    }
}

impl Request {
    /// Gives up the handle once the slot belongs to someone else (queued to a port, or
    /// answered), without the Drop that would fail or free it, but still releasing the
    /// handle's reference to the segment: `mem::forget` leaked that reference, and with it
    /// the port's mapping and file descriptor for the life of the process.
    fn hand_on(self) -> u32 {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped after this read, so the Arc moves out once.
        drop(unsafe { std::ptr::read(&me.seg) });
        me.index
    }
}

impl Drop for Request {
    /// A handle dropped without being sent or responded is never lost silently: a request being
    /// served goes back to its sender as an I/O error, any other is freed.
    fn drop(&mut self) {
        let q = self.seg.req(self.index);
        if q.state.load(Acquire) == REQ_SERVING {
            if q.result.load(Relaxed) == 0 {
                q.result.store(crate::protocol::Status::Io.code(), Relaxed);
            }
            self.seg.respond_raw(self.index);
        } else {
            self.seg.free_request(self.index);
        }
    }
}

impl Port {
    pub fn sender(&self) -> &Sender {
        &self.tx
    }

    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// Takes the next request sent to this port, if any.
    pub fn accept(&mut self) -> Option<Request> {
        let no = self.tx.no;
        let seg = &self.tx.seg;
        let taken = Self::take(seg, no, RingKind::Requests, &mut self.req_watch, |q| {
            if q.holder.load(Acquire) != no
                || q.state
                    .compare_exchange(REQ_QUEUED, REQ_SERVING, AcqRel, Relaxed)
                    .is_err()
            {
                return false;
            }
            q.accept_ns.store(now_ns(), Relaxed);
            true
        });
        if taken.is_some() {
            seg.port(no).stats.accepted.fetch_add(1, Relaxed);
        }
        taken
    }

    /// Takes the next reply that came back to this port, if any.
    pub fn receive(&mut self) -> Option<Request> {
        let (no, hop) = (self.tx.no, self.tx.hop);
        let seg = &self.tx.seg;
        let taken = Self::take(seg, no, RingKind::Replies, &mut self.rep_watch, |q| {
            // A reply to a request this port sent is ours again (ALLOCATED). A reply to one it
            // forwarded still belongs to the sender further back: it is SERVING here again, so
            // that dropping it, or dying with it, fails it back to that sender instead of
            // freeing a request someone still waits for.
            let back = if q.owner.load(Acquire) == hop {
                REQ_ALLOCATED
            } else {
                REQ_SERVING
            };
            let mine = q.holder.load(Acquire) == no && q.state.load(Acquire) == REQ_REPLIED;
            if mine && back == REQ_SERVING {
                // Served here again: the port that answered is done with it.
                q.dst_port.store(no, Relaxed);
            }
            mine && q
                .state
                .compare_exchange(REQ_REPLIED, back, AcqRel, Relaxed)
                .is_ok()
        });
        if taken.is_some() {
            seg.port(no).stats.received.fetch_add(1, Relaxed);
        }
        taken
    }

    /// Pops entries of one of this port's rings until `claim` accepts one; entries that are out
    /// of range, corrupt or not in the expected state are dropped and counted. Bounded, so
    /// garbage in the ring cannot keep the caller here.
    fn take(
        seg: &Arc<Segment>,
        no: u32,
        kind: RingKind,
        watch: &mut HoleWatch,
        claim: impl Fn(&RequestShm) -> bool,
    ) -> Option<Request> {
        let ring = seg.ring(no, kind);
        let stats = &seg.port(no).stats;
        for _ in 0..64 {
            match ring.pop(watch) {
                Pop::Item(r) if r < seg.config().nr_requests => {
                    if claim(seg.req(r)) {
                        return Some(Request {
                            seg: seg.clone(),
                            index: r,
                        });
                    }
                    stats.dropped.fetch_add(1, Relaxed);
                }
                Pop::Item(_) | Pop::Corrupt => {
                    stats.dropped.fetch_add(1, Relaxed);
                }
                Pop::Empty | Pop::Pending => return None,
            }
        }
        None
    }

    fn has_work(&self) -> bool {
        let seg = &self.tx.seg;
        seg.ring(self.tx.no, RingKind::Requests).maybe_nonempty()
            || seg.ring(self.tx.no, RingKind::Replies).maybe_nonempty()
    }

    /// Waits until a request or reply may be there, or `timeout` passes. Spins for the policy's
    /// window first, then sleeps on the futex; also runs the periodic dead-peer check.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        if self.has_work() {
            return true;
        }
        let spin = self.policy.spin.min(timeout);
        // Without a spin window the clock is not read at all (it is read per I/O otherwise).
        let start = (!spin.is_zero()).then(Instant::now);
        if let Some(start) = start {
            loop {
                if self.has_work() {
                    return true;
                }
                let spent = start.elapsed();
                if spent >= spin {
                    break;
                }
                if spent < self.policy.busy {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        if !self.begin_sleep() {
            return true;
        }
        let port = self.tx.seg.port(self.tx.no);
        let spent = start.map_or(Duration::ZERO, |s| s.elapsed());
        let left = timeout.saturating_sub(spent).min(REAP_INTERVAL);
        if !left.is_zero() {
            crate::futex::wait(&port.sleeping, 1, left);
            port.stats.wakeups.fetch_add(1, Relaxed);
        }
        port.sleeping.store(0, Relaxed);
        self.has_work()
    }

    /// Gets the port ready for a sleep that the caller carries out itself (an io_uring
    /// FUTEX_WAIT, so that one thread can wait for xseg replies and for other events at
    /// once): marks the port as sleeping, so that a producer clears and wakes
    /// [`Port::sleep_word`], unless work is already there. True when the caller may sleep,
    /// waiting while the word holds 1; false when there is work (the port is then not marked).
    /// After the wait ends, however it ends, call [`Port::end_sleep`]. Also runs the periodic
    /// dead-peer check, as [`Port::wait`] does.
    pub fn begin_sleep(&mut self) -> bool {
        self.reap_if_due();
        let port = self.tx.seg.port(self.tx.no);
        port.sleeping.store(1, SeqCst);
        if self.has_work() {
            port.sleeping.store(0, Relaxed);
            return false;
        }
        true
    }

    /// The futex word a producer clears and wakes when it queues work for a sleeping port. It
    /// lives in the segment's shared mapping, which stays mapped for as long as this port.
    pub fn sleep_word(&self) -> &AtomicU32 {
        &self.tx.seg.port(self.tx.no).sleeping
    }

    /// Ends a sleep begun with [`Port::begin_sleep`]; true when a request or reply may be
    /// there.
    pub fn end_sleep(&mut self) -> bool {
        let port = self.tx.seg.port(self.tx.no);
        port.sleeping.store(0, Relaxed);
        port.stats.wakeups.fetch_add(1, Relaxed);
        self.has_work()
    }

    /// Runs the dead-peer check if [`REAP_INTERVAL`] has passed since the last one: requests
    /// held by a peer that died come back failed, so that their senders stop waiting.
    pub fn reap_if_due(&mut self) {
        if self.last_reap.elapsed() >= REAP_INTERVAL {
            self.last_reap = Instant::now();
            self.tx.seg.reap();
        }
    }

    /// Sends `req` to `dst` and waits for its reply (one request in flight on this port).
    /// When the serving peer dies the reply comes back failed with `PeerGone`.
    pub fn call(&mut self, req: Request, dst: u32, timeout: Duration) -> Result<Request> {
        let index = req.index;
        self.tx.submit(req, dst).map_err(|(e, _)| e)?;
        let start = Instant::now();
        loop {
            while let Some(rep) = self.receive() {
                if rep.index == index {
                    return Ok(rep);
                }
                self.tx.free(rep);
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                // Unresponsive: look for a dead peer now rather than at the next interval.
                self.tx.seg.reap();
                if let Some(rep) = self.receive() {
                    if rep.index == index {
                        return Ok(rep);
                    }
                    self.tx.free(rep);
                }
                return Err(Error::Timeout(timeout));
            }
            self.wait(timeout - elapsed);
        }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        let seg = &self.tx.seg;
        let p = self.tx.no;
        let port = seg.port(p);
        let me = u64::from(seg.me().pid) << 32;
        if port
            .owner
            .compare_exchange(me | PORT_BOUND, me | PORT_RECLAIMING, AcqRel, Relaxed)
            .is_ok()
        {
            seg.retire_port(p);
        }
    }
}
