//! vlmc: the volume peer. Clients send it volume I/O at any byte offset and length; it turns
//! that into object I/O at the blocker, asking the mapper where blocks live.
//!
//! Fast path: mappings are cached per volume (block → object, writable or not), so a write to
//! a block this volume already owns costs no mapper round trip, and a read of a ZERO block no
//! I/O at all. An I/O that fits in one object is *forwarded* to the blocker: the very request
//! the client sent, with target and offset rewritten, its data still in the client's segment
//! buffer; the reply comes back here, the target and offset are restored, and it goes on to
//! the client. Only an I/O that spans objects is split into sub-requests (and copied).
//!
//! The mapping cache and its coherence rules live in `cache.rs`; splitting an I/O at object
//! boundaries and composing its reply in `plan.rs`; this file is the request loop.
//!
//! A volume opened *shared* (`flags::SHARED`: attached on two nodes for a live-migration
//! handover) is never cached here: another node may move its blocks at any moment, so every
//! I/O asks the mapper, which reads the map afresh unless this node holds the lock.
//!
//! QoS: each volume's reads and writes pass a rate limiter (`throttle.rs`) before anything
//! else, with the limits the mapper stores for the volume, read again every few seconds.
//!
//! FLUSH waits for the writes of that volume issued before it, then flushes the blocker.
//!
//! A write is never abandoned. vlmc answers a write only once every call it made for it
//! (MAPW, object writes, a discard's zero writes) has its reply. Answering "timed out" while
//! an object write is still queued at a slow blocker would let the client resend, see it
//! succeed, write newer data to the same place, and then have the first attempt land over
//! it. So calls that change data or the map wait for their reply however long it takes
//! (logging while they wait; a dead peer's requests are failed back by the segment's
//! recovery, so the wait ends when the peer dies), and [`VlmcConfig::timeout`] bounds only
//! calls whose late reply changes nothing (INFO, MAPR, object reads, QoS limits). A frontend
//! that resends on TimedOut or PeerGone (ublk) is then safe: no part of the first attempt is
//! still on its way. Ordering a write after one that is still in flight is the client's
//! job, as on any disk; vlmc only guarantees that a write it has answered is over.
//!
//! A segment short of requests or buffers is back-pressure, not a full disk: vlmc's own calls
//! wait for the pool with a bounded back-off ([`xseg::retry::PoolBackoff`]) and, if it stays
//! exhausted, answer TimedOut (nothing of the call was sent, so a resend is safe), never
//! NoSpace, which stays the backend's "disk full".
//!
//! Per-volume state (cache, gate, QoS) is kept for at most [`MAX_VOLUMES`] volumes: names
//! that are not valid volume names get no entry, and past the cap the least recently used
//! entries with no I/O in flight are dropped (a volume opened shared keeps its entry, since
//! its "never cache" mode lives in it).

mod cache;
mod fast;
mod plan;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use xseg::protocol::flags;
use xseg::{AsyncClient, Op, Peer, Request, Sender, Status};

use crate::FastMap;
use crate::failure::Failure;
use crate::wire::{self, CONTROL_BUF, QosReport};
use cache::{Vol, lock};
use fast::Waiter;

/// Where vlmc sends what it does not serve itself.
#[derive(Clone, Debug)]
pub struct VlmcConfig {
    pub mapper_port: u32,
    pub blocker_port: u32,
    /// Limit on each call to the mapper or blocker whose late reply changes nothing (reads,
    /// lookups). Calls that write are never given up (see the module documentation); for them
    /// this is how often a slow call is logged.
    pub timeout: Duration,
}

/// Volumes whose state vlmc keeps at once (beyond that, idle ones are forgotten): far more
/// than a node maps, few enough that a client sending endless names costs little memory.
pub const MAX_VOLUMES: usize = 1024;

/// Retries of a call of vlmc's own while the segment has no request or buffer for it: 200
/// pauses from 100 µs doubling to ~51 ms, about 10 s in all.
const POOL_RETRIES: u32 = 200;

/// How long vlmc waits for the reply to a call of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// At most [`VlmcConfig::timeout`]: a late reply changes nothing.
    Bounded,
    /// Until it comes: the call writes (see "A write is never abandoned" above).
    ToReply,
}

/// One call of vlmc's own: what to allocate; the caller fills in the rest.
pub(super) struct Call<'a> {
    pub(super) op: Op,
    pub(super) target: &'a [u8],
    /// Data buffer to allocate (the payload, or room for the reply).
    pub(super) buffer: u64,
    pub(super) wait: Wait,
}

impl Default for VlmcConfig {
    fn default() -> Self {
        VlmcConfig {
            mapper_port: crate::peerset::Ports::MAPPER,
            blocker_port: crate::peerset::Ports::BLOCKER,
            timeout: Duration::from_secs(600),
        }
    }
}

struct Inner {
    /// vlmc's own port: forwarding from it brings replies back to it.
    port: Sender,
    /// A dynamic port for vlmc's own calls (MAPR/MAPW, INFO, sub-requests).
    client: AsyncClient,
    forwarded: Mutex<FastMap<u32, Waiter>>,
    volumes: Mutex<Volumes>,
    config: VlmcConfig,
    /// I/Os served on the run-to-completion path (`fast.rs`), for tests and benchmarks.
    fast_ios: AtomicU64,
}

/// The per-volume table, with a use clock for least-recently-used eviction.
#[derive(Default)]
struct Volumes {
    map: FastMap<String, (Arc<Vol>, u64)>,
    clock: u64,
}

impl Volumes {
    fn get(&mut self, name: &str) -> Arc<Vol> {
        self.clock += 1;
        let now = self.clock;
        if let Some((vol, used)) = self.map.get_mut(name) {
            *used = now;
            return vol.clone();
        }
        if self.map.len() >= MAX_VOLUMES {
            self.evict(self.map.len() + 1 - MAX_VOLUMES);
        }
        let vol = Arc::new(Vol::default());
        self.map.insert(name.to_string(), (vol.clone(), now));
        vol
    }

    /// Drops up to `n` of the least recently used entries that nothing else holds (no I/O or
    /// barrier in flight) and that are not opened shared. When every entry is busy the table
    /// stays over the cap, by at most the number of requests in flight.
    fn evict(&mut self, n: usize) {
        let mut idle: Vec<(u64, String)> = self
            .map
            .iter()
            .filter(|(_, (vol, _))| {
                Arc::strong_count(vol) == 1 && !vol.shared.load(Ordering::Acquire)
            })
            .map(|(name, (_, used))| (*used, name.clone()))
            .collect();
        idle.sort_unstable();
        for (_, name) in idle.into_iter().take(n) {
            self.map.remove(&name);
        }
    }
}

/// The vlmc peer; drive it with an [`xseg::Runner`] on the vlmc port.
pub struct Vlmc {
    inner: Arc<Inner>,
    rt: Handle,
}

impl Vlmc {
    /// `port` is the sender of the port the runner serves (forwarded replies come back there);
    /// `client` is a separate dynamic port for vlmc's own calls.
    pub fn new(port: Sender, client: AsyncClient, config: VlmcConfig, rt: Handle) -> Self {
        Vlmc {
            inner: Arc::new(Inner {
                port,
                client,
                forwarded: Mutex::new(FastMap::default()),
                volumes: Mutex::new(Volumes::default()),
                config,
                fast_ios: AtomicU64::new(0),
            }),
            rt,
        }
    }
}

impl Peer for Vlmc {
    fn request(&mut self, req: Request, _tx: &Sender) {
        let req = match self.inner.try_fast(req) {
            Ok(()) => return,
            Err(req) => req,
        };
        let inner = self.inner.clone();
        self.rt.spawn(async move { inner.handle(req).await });
    }

    fn reply(&mut self, rep: Request, _tx: &Sender) {
        let waiter = lock(&self.inner.forwarded).remove(&rep.index());
        match waiter {
            Some(Waiter::Task(w)) => {
                // A task that is gone drops the request, which fails or frees it.
                let _ = w.send(rep);
            }
            Some(Waiter::Fast(fast)) => self.inner.finish_fast(rep, &fast),
            None => drop(rep),
        }
    }
}

impl Inner {
    /// The state of volume `name`; a name no volume can have is refused without an entry.
    fn vol(&self, name: &str) -> Result<Arc<Vol>, Failure> {
        if let Some(reason) = crate::map_format::volume_name_problem(name) {
            return Err(Failure::new(
                Status::Invalid,
                format!("invalid volume name {name:?}: {reason}"),
            ));
        }
        Ok(lock(&self.volumes).get(name))
    }

    async fn handle(self: Arc<Self>, mut req: Request) {
        let name = match req.target().and_then(|t| t.as_str().map(str::to_string)) {
            Ok(n) => n,
            Err(s) => {
                Failure::from(s).apply(&mut req);
                self.port.respond(req);
                return;
            }
        };
        let op = req.op();
        let started = std::time::Instant::now();
        let io_bytes = req.size();
        let result = match op {
            Op::Read | Op::Write => self.io(&name, req).await,
            Op::Flush => self.flush(&name, req).await,
            Op::Discard | Op::WriteZeroes => {
                let r = self.discard(&name, &mut req).await;
                r.outcome(req)
            }
            // A snapshot without a target is a group: one barrier over all its members.
            Op::Snapshot if name.is_empty() => self.group_snapshot(req).await,
            // These can change where blocks live or whether we may write them.
            Op::Snapshot
            | Op::Clone
            | Op::Close
            | Op::Delete
            | Op::Resize
            | Op::Import
            | Op::Dedup
            | Op::Release => self.barrier(&name, req).await,
            Op::Open if req.flags() & flags::SHARED != 0 => self.open_shared(&name, req).await,
            Op::Qos => self.qos(&name, req).await,
            Op::Create
            | Op::Info
            | Op::List
            | Op::Open
            | Op::Acquire
            | Op::LockInfo
            | Op::Gc
            | Op::Verify
            | Op::MapRead
            | Op::MapWrite => {
                let port = self.config.mapper_port;
                self.forward(req, port).await
            }
            op => Err((
                Failure::new(Status::Unsupported, format!("vlmc does not serve {op:?}")),
                Some(req),
            )),
        };
        let status = match &result {
            Ok(Some(r)) => r.status(),
            Ok(None) => Status::Io,
            Err((f, _)) => f.status,
        };
        // I/O to a volume that does not exist (or cannot) has no counters of its own: a
        // client sending endless names would otherwise take every per-volume slot.
        let no_volume =
            status == Status::NotFound || crate::map_format::volume_name_problem(&name).is_some();
        count(
            op,
            &name,
            status == Status::Ok,
            no_volume,
            io_bytes,
            started.elapsed(),
        );
        match result {
            Ok(Some(req)) => self.port.respond(req),
            Ok(None) => {}
            Err((f, Some(mut req))) => {
                f.apply(&mut req);
                self.port.respond(req);
            }
            Err((f, None)) => {
                tracing::warn!(?op, volume = %name, error = %f.message, "request lost");
            }
        }
    }

    /// Passes `req` on to `port` and returns it once the reply is back here. A request that
    /// cannot be sent comes back failed.
    async fn forward(&self, req: Request, port: u32) -> Outcome {
        let index = req.index();
        let (w, r) = oneshot::channel();
        lock(&self.forwarded).insert(index, Waiter::Task(w));
        let mut req = req;
        let mut retry = xseg::SendRetry::new();
        loop {
            match self.port.forward(req, port) {
                Ok(()) => break,
                Err((e, back)) if retry.allows(&e) => {
                    // Momentarily full, or a push that lost a race (see xseg's ring): the
                    // request came back untouched, so send it again.
                    req = back;
                    retry.pause().await;
                }
                Err((e, back)) => {
                    lock(&self.forwarded).remove(&index);
                    return Err((Failure::from(e), Some(back)));
                }
            }
        }
        match r.await {
            Ok(rep) => Ok(Some(rep)),
            Err(_) => Err((Failure::new(Status::Io, "vlmc stopped"), None)),
        }
    }

    async fn barrier(&self, name: &str, req: Request) -> Outcome {
        let vol = match self.vol(name) {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        let _exclusive = vol.gate.write().await;
        let closing = req.op() == Op::Close;
        let port = self.config.mapper_port;
        let r = self.forward(req, port).await;
        if closing && matches!(&r, Ok(Some(rep)) if rep.status() == Status::Ok) {
            vol.shared.store(false, Ordering::Release);
        }
        vol.clear();
        r
    }

    /// How long an I/O of `bytes` must wait under the volume's QoS limits, reading the limits
    /// from the mapper when they are stale. A failure to read them keeps the old ones (the
    /// I/O itself will report a missing volume).
    async fn throttle(&self, name: &str, vol: &Vol, bytes: u64) -> Duration {
        let now = std::time::Instant::now();
        {
            // The common case: one lock, one clock read.
            let mut t = lock(&vol.throttle);
            if !t.claim_refresh(now) {
                let wait = t.admit(now, bytes);
                drop(t);
                count_delay(wait);
                return wait;
            }
        }
        let call = Call {
            op: Op::Qos,
            target: name.as_bytes(),
            buffer: CONTROL_BUF,
            wait: Wait::Bounded,
        };
        let got = self
            .call_again(self.config.mapper_port, call, |_| Ok(()))
            .await
            .and_then(|rep| Ok(QosReport::decode(rep.data()?)?));
        match got {
            Ok(r) => lock(&vol.throttle).set_limits(r.limits(), std::time::Instant::now()),
            Err(f) => tracing::debug!(volume = %name, error = %f.message, "reading QoS limits"),
        }
        let wait = lock(&vol.throttle).admit(std::time::Instant::now(), bytes);
        count_delay(wait);
        wait
    }

    /// QOS: answered by the mapper; a change applies here at once (other nodes pick it up
    /// within `throttle::REFRESH`), and the reply carries this vlmc's count of delayed I/Os.
    async fn qos(&self, name: &str, req: Request) -> Outcome {
        let vol = match self.vol(name) {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        let port = self.config.mapper_port;
        let mut rep = match self.forward(req, port).await? {
            Some(rep) => rep,
            None => return Ok(None),
        };
        if rep.status() == Status::Ok
            && let Ok(r) = rep.data().and_then(QosReport::decode)
        {
            let delayed = {
                let mut t = lock(&vol.throttle);
                t.set_limits(r.limits(), std::time::Instant::now());
                t.delayed()
            };
            let r = QosReport {
                delayed_ios: delayed,
                ..r
            };
            wire::reply_with(&mut rep, |buf| r.encode(buf));
        }
        Ok(Some(rep))
    }

    /// OPEN shared: from now on nothing of this volume is cached here. Under the drain
    /// barrier, so no I/O planned from the cache is still in flight when the mode changes.
    async fn open_shared(&self, name: &str, req: Request) -> Outcome {
        let vol = match self.vol(name) {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        let _exclusive = vol.gate.write().await;
        vol.shared.store(true, Ordering::Release);
        vol.clear();
        let port = self.config.mapper_port;
        self.forward(req, port).await
    }

    /// A group snapshot: holds the drain barrier of every member at once (in-flight I/O to
    /// all of them completes, new I/O waits), cuts every member's snapshot at the mapper, then
    /// lets I/O resume. No write can land between two members' cuts, so the snapshots are one
    /// point in time across the volumes (crash-consistent as a set), for I/O that goes through
    /// this vlmc. Gates are taken in name order, so two groups sharing volumes cannot deadlock,
    /// and a single-volume barrier holds one gate only. A failed member stops the cut; members
    /// already cut stay, and the caller deletes them (it named them).
    async fn group_snapshot(&self, req: Request) -> Outcome {
        let group = match req.data().and_then(wire::GroupSnapshotRequest::decode) {
            Ok(g) => g,
            Err(s) => {
                let f = Failure::new(s, "vlmc: malformed group snapshot request");
                return Err((f, Some(req)));
            }
        };
        let names: BTreeSet<&str> = group.members.iter().map(|(v, _)| v.as_str()).collect();
        let vols: Result<Vec<Arc<Vol>>, Failure> = names.iter().map(|n| self.vol(n)).collect();
        let vols = match vols {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        let mut held = Vec::with_capacity(vols.len());
        for vol in &vols {
            held.push(vol.gate.write().await);
        }
        let mut result = Ok(());
        for (volume, snapshot) in &group.members {
            let fill = |sub: &mut Request| {
                let payload = xseg::protocol::NamePayload {
                    name: snapshot.clone(),
                    size: 0,
                };
                let n = payload.encode(sub.buffer_mut()?)?;
                sub.set_data_len(n as u64)?;
                Ok(())
            };
            // Waited for to the end: the gates must not open while a cut may still happen.
            let call = Call {
                op: Op::Snapshot,
                target: volume.as_bytes(),
                buffer: CONTROL_BUF,
                wait: Wait::ToReply,
            };
            if let Err(f) = self.call_again(self.config.mapper_port, call, fill).await {
                result = Err(Failure {
                    message: format!("group snapshot member {volume}: {}", f.message),
                    ..f
                });
                break;
            }
        }
        for vol in &vols {
            vol.clear();
        }
        drop(held);
        let mut req = req;
        match result.and_then(|()| req.set_data_len(0).map_err(Failure::from)) {
            Ok(()) => {
                req.complete(0);
                Ok(Some(req))
            }
            Err(f) => Err((f, Some(req))),
        }
    }

    /// One call of vlmc's own: allocates the request `call` describes, lets `fill` complete
    /// it, sends it to `port` and waits by `call.wait`; a failed reply becomes a failure with
    /// its message. An exhausted pool is waited out (bounded, then TimedOut: nothing was
    /// sent); a send refused for a moment is retried with a fresh request, by xseg's one
    /// policy ([`xseg::SendRetry`]).
    async fn call_again(
        &self,
        port: u32,
        call: Call<'_>,
        fill: impl Fn(&mut Request) -> Result<(), Failure>,
    ) -> Result<Request, Failure> {
        let mut pool = xseg::retry::PoolBackoff::new(POOL_RETRIES, Duration::from_micros(50), 10);
        let mut send = xseg::SendRetry::new();
        loop {
            let mut req = match self.client.alloc(call.op, call.target, call.buffer) {
                Ok(r) => r,
                Err(e @ (xseg::Error::NoRequest | xseg::Error::NoBuffer(_))) => {
                    match pool.next_pause() {
                        Some(pause) => {
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        None => {
                            return Err(Failure::new(
                                Status::TimedOut,
                                format!("vlmc: the segment stayed exhausted ({e}); try again"),
                            ));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            };
            // On failure `req` drops here, which frees it.
            fill(&mut req)?;
            let sent = match call.wait {
                Wait::Bounded => self.client.call(req, port, self.config.timeout).await,
                Wait::ToReply => {
                    let slow = |waited: Duration| {
                        tracing::warn!(op = ?call.op, object = %String::from_utf8_lossy(call.target),
                            port, ?waited, "a write is slow; waiting for it (it is never abandoned)");
                    };
                    let every = self.config.timeout;
                    self.client.call_to_reply(req, port, every, slow).await
                }
            };
            match sent {
                Err(e) if send.allows(&e) => send.pause().await,
                Err(e) => return Err(e.into()),
                Ok(rep) if rep.status() == Status::Ok => return Ok(rep),
                Ok(rep) => return Err(Failure::from_reply(&rep)),
            }
        }
    }

    async fn flush(&self, name: &str, req: Request) -> Outcome {
        let vol = match self.vol(name) {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        let _shared = vol.gate.read().await;
        vol.drain_writes_before_now().await;
        let port = self.config.blocker_port;
        self.forward(req, port).await
    }
}

fn count_delay(wait: Duration) {
    if !wait.is_zero() {
        let stats = crate::metrics::global();
        stats
            .qos_delayed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        stats
            .qos_delay_ns
            .fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a finished request in [`crate::metrics`]: volume I/O per volume, snapshots and
/// clones with their latency; a deleted volume's counters are dropped to keep the bound.
/// I/O of `no_volume` (a name that is not a volume) is not counted.
fn count(op: Op, name: &str, ok: bool, no_volume: bool, bytes: u64, took: Duration) {
    let stats = crate::metrics::global();
    match op {
        Op::Read | Op::Write | Op::Flush if !no_volume => {
            let v = stats.volume(name);
            match op {
                Op::Read => v.read.record(ok, bytes, took),
                Op::Write => v.write.record(ok, bytes, took),
                _ => v.flush.record(ok, 0, took),
            }
        }
        Op::Snapshot => stats.snapshots.record(ok, 0, took),
        Op::Clone => stats.clones.record(ok, 0, took),
        Op::Delete if ok => stats.forget(name),
        _ => {}
    }
}

/// A finished request to respond with, or the failure to put in it (with the request, unless
/// it was lost on the way).
type Outcome = Result<Option<Request>, (Failure, Option<Request>)>;

trait IntoOutcome {
    fn outcome(self, req: Request) -> Outcome;
}

impl IntoOutcome for Result<(), Failure> {
    fn outcome(self, req: Request) -> Outcome {
        match self {
            Ok(()) => Ok(Some(req)),
            Err(f) => Err((f, Some(req))),
        }
    }
}
