//! The data path of one ublk hardware queue.
//!
//! Each queue thread owns one io_uring (libublk's) and one dynamic xseg port. A block request
//! from the kernel becomes one xseg request to vlmc (READ, WRITE, FLUSH, DISCARD or
//! WRITE_ZEROES; target = volume, offset and size in bytes) and is completed when vlmc replies.
//! Many requests are in flight at once: nothing blocks the queue thread but io_uring itself.
//!
//! Replies arrive on the xseg port. Where the kernel has io_uring FUTEX_WAIT (Linux >= 6.7)
//! the queue thread takes them off the port itself: before it sleeps it marks the port
//! sleeping and arms a FUTEX_WAIT on the port's futex word in the same io_uring that brings
//! the kernel's block requests, so one thread waits for both and a reply costs one wake-up of
//! this thread, and every reply there is is handled in that one wake-up. On older kernels
//! (or with `ARCHIP_UBLK_REPLY_THREAD=1`, to compare) a small receiver thread per queue takes
//! them off the port and hands them over through a mailbox, ringing an eventfd that the queue
//! keeps an io_uring READ armed on; the eventfd is rung only when the mailbox goes from empty
//! to non-empty, so a busy queue costs one wake-up per batch of replies, not per reply.
//!
//! Data copies. With `UBLK_F_USER_COPY` (Linux ≥ 6.5) WRITE data is `pread` from `/dev/ublkcN`
//! straight into the xseg request's segment buffer and READ data is `pwrite` from it: one copy
//! between the kernel's pages and the buffer the blocker reads from or writes into. Without it
//! the kernel copies into a per-tag buffer and this module copies between that and the segment
//! buffer: two copies. [`IoStats`] counts the bytes moved each way.
//!
//! Transient trouble does not fail I/O: when the request pool or buffers are exhausted, or vlmc
//! is gone (its process restarting), the request is retried on an io_uring timer until
//! `peer_wait` passes. Failing it instead would make a mounted filesystem go read-only.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkIORes, sys};
use peers::wire::CONTROL_BUF;
use xseg::{Op, Port, Request, Sender, Status};

use crate::io_stats::{IoStats, bump};

/// Tags (in io_uring user data) of this module's own target operations; real tags are below
/// the queue depth (at most 4096).
const EVENT_TAG: u16 = u16::MAX;
const TIMER_TAG: u16 = u16::MAX - 1;
const REAP_TAG: u16 = u16::MAX - 2;
/// How often deferred requests are retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// What a queue needs to know, shared by all queues of a device.
pub(crate) struct QueueConfig {
    pub volume: String,
    pub vlmc_port: u32,
    /// How long a request may wait for vlmc (or for resources) before it fails.
    pub peer_wait: Duration,
    pub stats: Arc<IoStats>,
}

/// Replies handed from the receiver thread to the queue thread.
struct Mailbox {
    replies: Mutex<Vec<Request>>,
    /// Set when the eventfd has been rung and the queue has not drained yet.
    notified: AtomicBool,
    stop: AtomicBool,
    efd: OwnedFd,
}

impl Mailbox {
    fn new() -> std::io::Result<Mailbox> {
        // SAFETY: eventfd takes no pointers; the result is checked before it is owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mailbox {
            replies: Mutex::new(Vec::new()),
            notified: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let n = unsafe {
            libc::write(
                self.efd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if n != 8 {
            // Only possible if the counter saturates, i.e. the queue is not reading at all.
            tracing::warn!(error = %std::io::Error::last_os_error(), "ringing the queue eventfd");
        }
    }

    fn post(&self, reps: Vec<Request>) {
        self.replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(reps);
        if !self.notified.swap(true, SeqCst) {
            self.ring();
        }
    }

    fn take(&self) -> Vec<Request> {
        self.notified.store(false, SeqCst);
        std::mem::take(&mut *self.replies.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Marks the calling thread as one that writeback depends on, so that memory reclaim never
/// waits on I/O to the very device this thread serves.
fn set_io_flusher() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
}

/// Takes replies off the port until told to stop, then unbinds it (by dropping it).
fn receive_loop(mut port: Port, mb: Arc<Mailbox>) {
    set_io_flusher();
    while !mb.stop.load(Acquire) {
        let mut got = Vec::new();
        while let Some(rep) = port.receive() {
            got.push(rep);
        }
        if got.is_empty() {
            port.wait(Duration::from_millis(200));
        } else {
            mb.post(got);
        }
    }
}

/// Errors that go away by themselves: resources freed by other requests, a peer that restarts.
fn transient(e: &xseg::Error) -> bool {
    matches!(
        e,
        xseg::Error::NoRequest
            | xseg::Error::NoBuffer(_)
            | xseg::Error::QueueFull(_)
            | xseg::Error::NoPeer(_)
    )
}

/// The negative errno a block request completes with for a failed reply.
fn errno(s: Status) -> i32 {
    match s {
        Status::Unsupported => -libc::EOPNOTSUPP,
        Status::NoSpace => -libc::ENOSPC,
        _ => -libc::EIO,
    }
}

/// How the queue thread learns of vlmc's replies (see the module documentation).
enum Replies {
    /// It takes them off its own port, woken by an io_uring FUTEX_WAIT on the port's word.
    Own {
        port: Port,
        /// A REAP_TAG timeout is armed.
        reap_armed: bool,
    },
    /// A receiver thread takes them and rings the eventfd.
    Thread(Arc<Mailbox>),
}

/// Whether this kernel's io_uring can wait on a futex (IORING_OP_FUTEX_WAIT, Linux >= 6.7),
/// and the operator has not asked for the receiver thread.
fn futex_wait_supported() -> bool {
    if std::env::var_os("ARCHIP_UBLK_REPLY_THREAD").is_some_and(|v| v == "1") {
        return false;
    }
    let mut probe = io_uring::Probe::new();
    io_uring::IoUring::new(2)
        .and_then(|ring| ring.submitter().register_probe(&mut probe))
        .is_ok()
        && probe.is_supported(opcode::FutexWait::CODE)
}

/// FUTEX2_SIZE_U32: the word is 32 bits; not FUTEX2_PRIVATE, since the producer that wakes it
/// may be another process mapping the same segment.
const FUTEX2_SIZE_U32: u32 = 0x02;
/// FUTEX_BITSET_MATCH_ANY: woken by a plain FUTEX_WAKE, which is what xseg's producers send.
const FUTEX_MATCH_ANY: u64 = 0xffff_ffff;

struct QueueState<'a> {
    qid: u16,
    cfg: &'a QueueConfig,
    sender: Sender,
    replies: Replies,
    /// Replies taken off the port in one round (kept to reuse its allocation).
    taken: Vec<Request>,
    /// Per-tag buffers when the kernel copies into our memory (no user copy).
    bufs: Option<Vec<IoBuf<u8>>>,
    /// `/dev/ublkcN`, for user copy.
    cdev: i32,
    /// xseg request index → tag of the block request it serves.
    inflight: HashMap<u32, u16>,
    /// Per tag: when its first attempt started (for the retry deadline).
    since: Vec<Option<Instant>>,
    deferred: Vec<u16>,
    timer_armed: bool,
    /// io_uring reads these after the SQE is pushed, so they live on the heap, not the stack.
    timespec: Box<types::Timespec>,
    reap_timespec: Box<types::Timespec>,
    event_buf: Box<u64>,
}

impl QueueState<'_> {
    /// Handles every reply there is, then arms what wakes the queue for the next ones.
    fn arm_event(&mut self, q: &UblkQueue) {
        let efd = match &self.replies {
            Replies::Thread(mb) => mb.efd.as_raw_fd(),
            Replies::Own { .. } => return self.drain_and_sleep(q),
        };
        let sqe = opcode::Read::new(types::Fd(efd), (&mut *self.event_buf as *mut u64).cast(), 8)
            .build()
            .user_data(UblkIOCtx::build_user_data(EVENT_TAG, 0, 0, true));
        if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
            tracing::error!(error = %e, qid = self.qid, "arming the reply eventfd");
        }
    }

    /// Own replies: takes every reply off the port and completes it, until the port may sleep;
    /// then arms a FUTEX_WAIT on its word (and, while requests are in flight, the dead-peer
    /// check's timer, since nothing else may wake the queue if vlmc died).
    fn drain_and_sleep(&mut self, q: &UblkQueue) {
        loop {
            let Replies::Own { port, .. } = &mut self.replies else {
                return;
            };
            let mut taken = std::mem::take(&mut self.taken);
            while let Some(rep) = port.receive() {
                taken.push(rep);
            }
            if taken.is_empty() {
                if !port.begin_sleep() {
                    self.taken = taken;
                    continue;
                }
                let word = port.sleep_word().as_ptr().cast_const();
                self.taken = taken;
                let sqe = opcode::FutexWait::new(word, 1, FUTEX_MATCH_ANY, FUTEX2_SIZE_U32)
                    .build()
                    .user_data(UblkIOCtx::build_user_data(EVENT_TAG, 0, 0, true));
                if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
                    tracing::error!(error = %e, qid = self.qid, "arming the reply futex wait");
                }
                self.arm_reap(q);
                return;
            }
            for rep in taken.drain(..) {
                self.finish(q, rep);
            }
            self.taken = taken;
        }
    }

    fn arm_reap(&mut self, q: &UblkQueue) {
        let Replies::Own { reap_armed, .. } = &mut self.replies else {
            return;
        };
        if *reap_armed || self.inflight.is_empty() {
            return;
        }
        let sqe = opcode::Timeout::new(&*self.reap_timespec as *const types::Timespec)
            .build()
            .user_data(UblkIOCtx::build_user_data(REAP_TAG, 0, 0, true));
        match q.ublk_submit_sqe_sync(sqe) {
            Ok(()) => *reap_armed = true,
            Err(e) => tracing::error!(error = %e, qid = self.qid, "arming the dead-peer check"),
        }
    }

    fn arm_timer(&mut self, q: &UblkQueue) {
        if self.timer_armed {
            return;
        }
        let sqe = opcode::Timeout::new(&*self.timespec as *const types::Timespec)
            .build()
            .user_data(UblkIOCtx::build_user_data(TIMER_TAG, 0, 0, true));
        match q.ublk_submit_sqe_sync(sqe) {
            Ok(()) => self.timer_armed = true,
            Err(e) => tracing::error!(error = %e, qid = self.qid, "arming the retry timer"),
        }
    }

    fn handle(&mut self, q: &UblkQueue, tag: u16, io: &UblkIOCtx) {
        if !io.is_tgt_io() {
            self.start(q, tag);
            return;
        }
        match tag {
            EVENT_TAG => {
                match &mut self.replies {
                    Replies::Thread(mb) => {
                        for rep in mb.take() {
                            self.finish(q, rep);
                        }
                    }
                    Replies::Own { port, .. } => {
                        // Woken, or the word had changed already (EAGAIN): either way the
                        // sleep is over; `arm_event` takes what came.
                        port.end_sleep();
                    }
                }
                // Keep listening while anything can still reply or the queue still runs.
                if !q.is_stopping() || !self.inflight.is_empty() || !self.deferred.is_empty() {
                    self.arm_event(q);
                }
            }
            REAP_TAG => {
                if let Replies::Own { port, reap_armed } = &mut self.replies {
                    *reap_armed = false;
                    // Requests a dead vlmc held come back failed to this port, which wakes
                    // the futex wait.
                    port.reap_if_due();
                }
                self.arm_reap(q);
            }
            TIMER_TAG => {
                self.timer_armed = false;
                for t in std::mem::take(&mut self.deferred) {
                    self.start(q, t);
                }
            }
            _ => {}
        }
    }

    fn complete(&mut self, q: &UblkQueue, tag: u16, res: i32) {
        self.since[tag as usize] = None;
        if res < 0 {
            bump(&self.cfg.stats.errors, 1);
        }
        let desc = match &self.bufs {
            Some(b) => BufDesc::Slice(b[tag as usize].as_slice()),
            None => BufDesc::Slice(&[]),
        };
        if let Err(e) = q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res))) {
            tracing::error!(error = %e, qid = self.qid, tag, "completing a block request");
        }
    }

    fn defer(&mut self, q: &UblkQueue, tag: u16, why: &dyn std::fmt::Display) {
        let since = self.since[tag as usize].unwrap_or_else(Instant::now);
        if since.elapsed() > self.cfg.peer_wait {
            tracing::error!(qid = self.qid, tag, %why, "giving up on a block request");
            self.complete(q, tag, -libc::EIO);
            return;
        }
        bump(&self.cfg.stats.retries, 1);
        self.deferred.push(tag);
        self.arm_timer(q);
    }

    /// Turns the block request in `tag` into an xseg request and sends it to vlmc.
    fn start(&mut self, q: &UblkQueue, tag: u16) {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        self.since[tag as usize].get_or_insert_with(Instant::now);
        // FLUSH carries no sector (start_sector is -1): never look at its range.
        let range = || -> Option<(u64, u64)> {
            let off = iod.start_sector.checked_mul(512)?;
            let len = u64::from(iod.nr_sectors) * 512;
            off.checked_add(len)?;
            Some((off, len))
        };
        let (xop, off, len) = match op {
            sys::UBLK_IO_OP_FLUSH => (Op::Flush, 0, 0),
            sys::UBLK_IO_OP_READ
            | sys::UBLK_IO_OP_WRITE
            | sys::UBLK_IO_OP_DISCARD
            | sys::UBLK_IO_OP_WRITE_ZEROES => {
                let Some((off, len)) = range() else {
                    return self.complete(q, tag, -libc::EINVAL);
                };
                let xop = match op {
                    sys::UBLK_IO_OP_READ => Op::Read,
                    sys::UBLK_IO_OP_WRITE => Op::Write,
                    sys::UBLK_IO_OP_DISCARD => Op::Discard,
                    _ => Op::WriteZeroes,
                };
                (xop, off, len)
            }
            _ => return self.complete(q, tag, -libc::EOPNOTSUPP),
        };
        let data = matches!(xop, Op::Read | Op::Write);
        if data
            && let Some(b) = &self.bufs
            && len > b[tag as usize].len() as u64
        {
            return self.complete(q, tag, -libc::EINVAL);
        }
        let buf_len = if data { len.max(1) } else { CONTROL_BUF };
        let mut req = match self.sender.alloc(xop, self.cfg.volume.as_bytes(), buf_len) {
            Ok(r) => r,
            Err(e) if transient(&e) => return self.defer(q, tag, &e),
            Err(e) => {
                tracing::error!(error = %e, qid = self.qid, tag, "allocating an xseg request");
                return self.complete(q, tag, -libc::EIO);
            }
        };
        req.set_offset(off);
        req.set_size(len);
        if xop == Op::Write
            && let Err(res) = self.fill_write(tag, &mut req, len)
        {
            return self.complete(q, tag, res);
        }
        let index = req.index();
        match self.sender.submit(req, self.cfg.vlmc_port) {
            Ok(()) => {
                self.inflight.insert(index, tag);
            }
            Err((e, req)) => {
                drop(req);
                if transient(&e) {
                    self.defer(q, tag, &e);
                } else {
                    tracing::error!(error = %e, qid = self.qid, tag, "sending to vlmc");
                    self.complete(q, tag, -libc::EIO);
                }
            }
        }
    }

    /// Moves WRITE data into the request's segment buffer.
    fn fill_write(&mut self, tag: u16, req: &mut Request, len: u64) -> Result<(), i32> {
        let n = len as usize;
        let dst = match req.buffer_mut() {
            Ok(b) if b.len() >= n => &mut b[..n],
            _ => return Err(-libc::EIO),
        };
        match &self.bufs {
            Some(b) => {
                dst.copy_from_slice(&b[tag as usize].as_slice()[..n]);
                bump(&self.cfg.stats.memcpy_bytes, len);
            }
            None => {
                self.user_copy(tag, dst.as_mut_ptr(), n, false)?;
                bump(&self.cfg.stats.user_copy_bytes, len);
            }
        }
        req.set_data_len(len).map_err(|_| -libc::EIO)
    }

    /// `pread` (`to_kernel == false`) or `pwrite` `n` bytes of tag's request data at `ptr`
    /// through `/dev/ublkcN`.
    fn user_copy(&self, tag: u16, ptr: *mut u8, n: usize, to_kernel: bool) -> Result<(), i32> {
        let mut done = 0usize;
        while done < n {
            let pos = UblkIOCtx::ublk_user_copy_pos(self.qid, tag, done as u32);
            // SAFETY: `ptr..ptr+n` is a segment buffer owned by the request we hold (checked
            // by `buffer_mut`/`data`), nobody else touches it while we hold the handle, and
            // `done < n` keeps the range inside it.
            let r = unsafe {
                if to_kernel {
                    libc::pwrite(self.cdev, ptr.add(done).cast(), n - done, pos as i64)
                } else {
                    libc::pread(self.cdev, ptr.add(done).cast(), n - done, pos as i64)
                }
            };
            if r <= 0 {
                let e = std::io::Error::last_os_error();
                tracing::error!(error = %e, qid = self.qid, tag, to_kernel, "ublk user copy");
                return Err(-libc::EIO);
            }
            done += r as usize;
        }
        Ok(())
    }

    /// Completes the block request behind a reply.
    fn finish(&mut self, q: &UblkQueue, rep: Request) {
        let Some(tag) = self.inflight.remove(&rep.index()) else {
            // Not ours (cannot happen unless the segment is corrupted): free it.
            return;
        };
        let status = rep.status();
        // Resending is safe: vlmc answers TimedOut only when nothing of the request is still
        // on its way (a segment that stayed exhausted; a write is never abandoned), and
        // PeerGone when vlmc died. NoSpace is left to `errno`: it means the backend is full.
        if matches!(status, Status::PeerGone | Status::TimedOut) {
            drop(rep);
            return self.defer(q, tag, &status);
        }
        if status != Status::Ok {
            let msg = rep
                .data()
                .ok()
                .map(|d| String::from_utf8_lossy(d).into_owned());
            tracing::warn!(qid = self.qid, tag, op = ?rep.op(), %status, ?msg, "vlmc failed a block request");
            drop(rep);
            return self.complete(q, tag, errno(status));
        }
        let stats = &self.cfg.stats;
        let res = match rep.op() {
            Op::Read => {
                let len = rep.size();
                match self.copy_read(tag, &rep, len) {
                    Ok(()) => {
                        bump(&stats.reads, 1);
                        bump(&stats.bytes_read, len);
                        len as i32
                    }
                    Err(e) => e,
                }
            }
            Op::Write => {
                if rep.serviced() == rep.size() {
                    bump(&stats.writes, 1);
                    bump(&stats.bytes_written, rep.size());
                    rep.size() as i32
                } else {
                    -libc::EIO
                }
            }
            Op::Flush => {
                bump(&stats.flushes, 1);
                0
            }
            Op::Discard => {
                bump(&stats.discards, 1);
                0
            }
            _ => {
                bump(&stats.write_zeroes, 1);
                0
            }
        };
        // Free the request (and its buffer) before the tag can be reused.
        drop(rep);
        self.complete(q, tag, res);
    }

    fn copy_read(&mut self, tag: u16, rep: &Request, len: u64) -> Result<(), i32> {
        let data = match rep.data() {
            Ok(d) if d.len() as u64 == len && rep.serviced() == len => d,
            _ => return Err(-libc::EIO),
        };
        match &mut self.bufs {
            Some(b) => {
                b[tag as usize].as_mut_slice()[..data.len()].copy_from_slice(data);
                bump(&self.cfg.stats.memcpy_bytes, len);
            }
            None => {
                self.user_copy(tag, data.as_ptr().cast_mut(), data.len(), true)?;
                bump(&self.cfg.stats.user_copy_bytes, len);
            }
        }
        Ok(())
    }
}

/// Serves queue `qid` of `dev` until the device stops. `port` is this queue's xseg port.
pub(crate) fn serve_queue(qid: u16, dev: &UblkDev, port: Port, cfg: &QueueConfig) {
    set_io_flusher();
    let user_copy = dev.dev_info.flags & u64::from(sys::UBLK_F_USER_COPY) != 0;
    let sender = port.sender().clone();
    let waker = sender.clone();
    let (replies, receiver) = if futex_wait_supported() {
        let replies = Replies::Own {
            port,
            reap_armed: false,
        };
        (replies, None)
    } else {
        let mailbox = match Mailbox::new() {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::error!(error = %e, qid, "eventfd");
                return;
            }
        };
        let mb = mailbox.clone();
        let receiver = std::thread::Builder::new()
            .name(format!("ublk-rx-{}-{qid}", dev.dev_info.dev_id))
            .spawn(move || receive_loop(port, mb));
        match receiver {
            Ok(t) => (Replies::Thread(mailbox.clone()), Some((t, mailbox))),
            Err(e) => {
                tracing::error!(error = %e, qid, "starting the reply thread");
                return;
            }
        }
    };
    tracing::info!(
        qid,
        replies = if receiver.is_none() { "own" } else { "thread" },
        "queue started: replies taken by the queue thread (own, io_uring futex wait) or a receiver thread"
    );
    let bufs = (!user_copy).then(|| dev.alloc_queue_io_bufs());
    let queue = UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(bufs.as_ref())));
    let timespec = |d: Duration| {
        Box::new(
            types::Timespec::new()
                .sec(d.as_secs())
                .nsec(d.subsec_nanos()),
        )
    };
    match queue {
        Ok(q) => {
            let depth = dev.dev_info.queue_depth as usize;
            let mut st = QueueState {
                qid,
                cfg,
                sender,
                replies,
                taken: Vec::with_capacity(depth),
                bufs,
                cdev: dev.tgt.fds[0],
                inflight: HashMap::with_capacity(depth),
                since: vec![None; depth],
                deferred: Vec::new(),
                timer_armed: false,
                timespec: timespec(RETRY_INTERVAL),
                reap_timespec: timespec(xseg::port::REAP_INTERVAL),
                event_buf: Box::new(0),
            };
            st.arm_event(&q);
            q.wait_and_handle_io(|q, tag, io| st.handle(q, tag, io));
            if !st.inflight.is_empty() {
                tracing::warn!(
                    qid,
                    n = st.inflight.len(),
                    "queue stopped with requests in flight"
                );
            }
            // The io_uring (and any FUTEX_WAIT still armed on the port's word) goes before
            // the port it waits on.
            drop(q);
            drop(st);
        }
        Err(e) => tracing::error!(error = %e, qid, "setting up the ublk queue"),
    }
    if let Some((receiver, mailbox)) = receiver {
        mailbox.stop.store(true, Release);
        // The receiver may sleep on the port's futex: wake it so that it sees `stop` now.
        waker.wake();
        if receiver.join().is_err() {
            tracing::error!(qid, "ublk reply thread panicked");
        }
    }
}
