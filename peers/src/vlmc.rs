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
//! Cache coherence. The cache may only lag the mapper in the safe direction (a block cached as
//! read-only or missing that is really owned costs one extra MAPW). Three rules keep it so:
//! - MAPW replies are authoritative and installed, unless a discard of the volume started
//!   since the MAPW was sent (a per-volume generation counter tells);
//! - MAPR replies only fill empty slots, under the same generation check, so a slow MAPR can
//!   never overwrite a newer MAPW result;
//! - everything that can move blocks behind the cache's back (snapshot, clone of a volume,
//!   close, delete, resize, import, dedup, lock release or break) passes a per-volume drain
//!   barrier: it waits until the volume's in-flight I/O is done, holds new I/O back, runs at
//!   the mapper, drops the volume's cache and lets I/O resume. So no write ever lands in an
//!   object that a snapshot has just started to share.
//!
//! A volume opened *shared* (`flags::SHARED`: attached on two nodes for a live-migration
//! handover) is never cached here: another node may move its blocks at any moment, so every
//! I/O asks the mapper, which reads the map afresh unless this node holds the lock.
//!
//! QoS: each volume's reads and writes pass a rate limiter (`throttle.rs`) before anything
//! else, with the limits the mapper stores for the volume, read again every few seconds.
//!
//! FLUSH waits for the writes of that volume issued before it, then flushes the blocker.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{Notify, RwLock, oneshot};
use xseg::protocol::{MapReply, extent, flags};
use xseg::{AsyncClient, Op, Peer, Request, Sender, Status};

use crate::throttle::Throttle;
use crate::wire::{self, DiscardReply, ErrorReply, QosReport, VolumeInfo};

/// Where vlmc sends what it does not serve itself.
#[derive(Clone, Debug)]
pub struct VlmcConfig {
    pub mapper_port: u32,
    pub blocker_port: u32,
    /// Limit on each call to the mapper or blocker.
    pub timeout: Duration,
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

/// Cached entries per volume before the cache is dropped and rebuilt: bounds memory on huge
/// volumes while keeping the working set of any realistic one.
const MAX_CACHED_BLOCKS: usize = 1 << 20;
/// Reply buffer for control calls vlmc makes itself.
const CONTROL_BUF: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mapping {
    Zero,
    Object { name: Arc<str>, writable: bool },
}

#[derive(Default)]
struct Cache {
    blocks: HashMap<u64, Mapping>,
    /// Bumped whenever entries are dropped for a reason other than a barrier (discard):
    /// a mapper reply sent before that must not be installed.
    generation: u64,
}

#[derive(Default)]
struct Writes {
    next: u64,
    in_flight: BTreeSet<u64>,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    size: u64,
    block_size: u64,
}

/// What vlmc knows about one volume.
#[derive(Default)]
struct Vol {
    /// I/O holds it shared; barrier operations exclusively.
    gate: RwLock<()>,
    meta: Mutex<Option<Meta>>,
    cache: Mutex<Cache>,
    writes: Mutex<Writes>,
    writes_done: Notify,
    /// Opened shared: no mapping is cached (see the module documentation).
    shared: AtomicBool,
    throttle: Mutex<Throttle>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic cannot leave them half-done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vol {
    fn clear(&self) {
        let mut c = lock(&self.cache);
        c.blocks.clear();
        c.generation += 1;
        *lock(&self.meta) = None;
    }

    fn begin_write(self: &Arc<Self>) -> WriteTicket {
        let mut w = lock(&self.writes);
        let t = w.next;
        w.next += 1;
        w.in_flight.insert(t);
        WriteTicket {
            vol: self.clone(),
            ticket: t,
        }
    }

    /// Waits until every write that began before this call has ended.
    async fn drain_writes_before_now(&self) {
        let mark = lock(&self.writes).next;
        loop {
            let notified = self.writes_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.writes)
                .in_flight
                .first()
                .is_none_or(|&t| t >= mark)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Marks a write in flight until dropped (also on error paths).
struct WriteTicket {
    vol: Arc<Vol>,
    ticket: u64,
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        lock(&self.vol.writes).in_flight.remove(&self.ticket);
        self.vol.writes_done.notify_waiters();
    }
}

/// One piece of an I/O within one block.
#[derive(Clone, Copy, Debug)]
struct Piece {
    block: u64,
    object_offset: u64,
    /// Offset within the request's data.
    at: u64,
    len: u64,
}

fn split(offset: u64, len: u64, bs: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity((len / bs + 2) as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let block = pos / bs;
        let object_offset = pos % bs;
        let n = (bs - object_offset).min(end - pos);
        out.push(Piece {
            block,
            object_offset,
            at: pos - offset,
            len: n,
        });
        pos += n;
    }
    out
}

/// A failed operation: what goes back to the client.
struct Failure {
    status: Status,
    message: String,
    holder: Option<String>,
}

impl Failure {
    fn new(status: Status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
            holder: None,
        }
    }

    /// The error a peer sent back, passed on with its message.
    fn from_reply(rep: &Request) -> Self {
        let e = ErrorReply::decode(rep.data().unwrap_or(&[])).unwrap_or_default();
        let status = match rep.status() {
            Status::Ok => Status::Io,
            s => s,
        };
        Failure {
            status,
            message: if e.message.is_empty() {
                status.to_string()
            } else {
                e.message
            },
            holder: e.holder,
        }
    }

    fn apply(self, req: &mut Request) {
        wire::fail(req, self.status, &self.message, self.holder.as_deref());
    }
}

impl From<xseg::Error> for Failure {
    fn from(e: xseg::Error) -> Self {
        let status = match e {
            xseg::Error::Timeout(_) => Status::TimedOut,
            xseg::Error::NoPeer(_) => Status::PeerGone,
            xseg::Error::NoRequest | xseg::Error::NoBuffer(_) => Status::NoSpace,
            _ => Status::Io,
        };
        Failure::new(status, format!("vlmc: {e}"))
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::new(s, format!("vlmc: malformed request ({s})"))
    }
}

struct Inner {
    /// vlmc's own port: forwarding from it brings replies back to it.
    port: Sender,
    /// A dynamic port for vlmc's own calls (MAPR/MAPW, INFO, sub-requests).
    client: AsyncClient,
    forwarded: Mutex<HashMap<u32, oneshot::Sender<Request>>>,
    volumes: Mutex<HashMap<String, Arc<Vol>>>,
    config: VlmcConfig,
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
                forwarded: Mutex::new(HashMap::new()),
                volumes: Mutex::new(HashMap::new()),
                config,
            }),
            rt,
        }
    }
}

impl Peer for Vlmc {
    fn request(&mut self, req: Request, _tx: &Sender) {
        let inner = self.inner.clone();
        self.rt.spawn(async move { inner.handle(req).await });
    }

    fn reply(&mut self, rep: Request, _tx: &Sender) {
        let waiter = lock(&self.inner.forwarded).remove(&rep.index());
        match waiter {
            Some(w) => {
                // A task that is gone drops the request, which fails or frees it.
                let _ = w.send(rep);
            }
            None => drop(rep),
        }
    }
}

impl Inner {
    fn vol(&self, name: &str) -> Arc<Vol> {
        lock(&self.volumes)
            .entry(name.to_string())
            .or_default()
            .clone()
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
        lock(&self.forwarded).insert(index, w);
        let mut req = req;
        let mut attempt = 0u32;
        loop {
            match self.port.forward(req, port) {
                Ok(()) => break,
                Err((xseg::Error::QueueFull(_) | xseg::Error::QueueCorrupt(_), back))
                    if attempt < 1000 =>
                {
                    // Momentarily full, or a push that lost a race (see xseg's ring): the
                    // request came back untouched, so send it again.
                    attempt += 1;
                    req = back;
                    tokio::task::yield_now().await;
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
        let vol = self.vol(name);
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
                return t.admit(now, bytes);
            }
        }
        let got = self
            .call_again(self.config.mapper_port, || {
                Ok(self.client.alloc(Op::Qos, name.as_bytes(), CONTROL_BUF)?)
            })
            .await
            .and_then(|rep| Ok(QosReport::decode(rep.data()?)?));
        match got {
            Ok(r) => lock(&vol.throttle).set_limits(r.limits(), std::time::Instant::now()),
            Err(f) => tracing::debug!(volume = %name, error = %f.message, "reading QoS limits"),
        }
        lock(&vol.throttle).admit(std::time::Instant::now(), bytes)
    }

    /// QOS: answered by the mapper; a change applies here at once (other nodes pick it up
    /// within `throttle::REFRESH`), and the reply carries this vlmc's count of delayed I/Os.
    async fn qos(&self, name: &str, req: Request) -> Outcome {
        let vol = self.vol(name);
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
        let vol = self.vol(name);
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
        let vols: Vec<Arc<Vol>> = names.iter().map(|n| self.vol(n)).collect();
        let mut held = Vec::with_capacity(vols.len());
        for vol in &vols {
            held.push(vol.gate.write().await);
        }
        let mut result = Ok(());
        for (volume, snapshot) in &group.members {
            let make = || {
                let mut sub = self
                    .client
                    .alloc(Op::Snapshot, volume.as_bytes(), CONTROL_BUF)?;
                let payload = xseg::protocol::NamePayload {
                    name: snapshot.clone(),
                    size: 0,
                };
                let n = payload.encode(sub.buffer_mut()?)?;
                sub.set_data_len(n as u64)?;
                Ok(sub)
            };
            if let Err(f) = self.call_again(self.config.mapper_port, make).await {
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

    /// One call of vlmc's own, for a request `make` can build again; a failed reply becomes a
    /// failure with its message. A send to a queue that is momentarily full (or reported
    /// corrupt by a racing producer, see xseg's ring) is retried with a fresh request, because
    /// `AsyncClient::call` frees a request it could not send.
    async fn call_again(
        &self,
        port: u32,
        make: impl Fn() -> Result<Request, Failure>,
    ) -> Result<Request, Failure> {
        let mut attempt = 0u32;
        loop {
            match self.client.call(make()?, port, self.config.timeout).await {
                Err(xseg::Error::QueueFull(_) | xseg::Error::QueueCorrupt(_)) if attempt < 1000 => {
                    attempt += 1;
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(e.into()),
                Ok(rep) if rep.status() == Status::Ok => return Ok(rep),
                Ok(rep) => return Err(Failure::from_reply(&rep)),
            }
        }
    }

    async fn meta(&self, name: &str, vol: &Vol, refresh: bool) -> Result<Meta, Failure> {
        if !refresh && let Some(m) = *lock(&vol.meta) {
            return Ok(m);
        }
        let rep = self
            .call_again(self.config.mapper_port, || {
                Ok(self.client.alloc(Op::Info, name.as_bytes(), CONTROL_BUF)?)
            })
            .await?;
        let info = VolumeInfo::decode(rep.data()?)?;
        let m = Meta {
            size: info.size,
            block_size: u64::from(info.block_size).max(512),
        };
        *lock(&vol.meta) = Some(m);
        Ok(m)
    }

    /// The volume's layout, with `[offset, offset + len)` checked against its size (asking the
    /// mapper again before refusing: the volume may have grown through another path).
    async fn checked_meta(
        &self,
        name: &str,
        vol: &Vol,
        offset: u64,
        len: u64,
    ) -> Result<Meta, Failure> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Failure::new(Status::Range, format!("{offset}+{len} overflows")))?;
        let m = self.meta(name, vol, false).await?;
        if end <= m.size {
            return Ok(m);
        }
        let m = self.meta(name, vol, true).await?;
        if end <= m.size {
            return Ok(m);
        }
        Err(Failure::new(
            Status::Range,
            format!("range {offset}+{len} is outside {name} ({} bytes)", m.size),
        ))
    }

    /// Mappings for `pieces`, from the cache or one MAPR/MAPW call covering the misses.
    async fn mappings(
        &self,
        name: &str,
        vol: &Vol,
        meta: Meta,
        pieces: &[Piece],
        write: bool,
    ) -> Result<Vec<Mapping>, Failure> {
        let shared = vol.shared.load(Ordering::Acquire);
        let mut out: Vec<Option<Mapping>> = if shared {
            vec![None; pieces.len()]
        } else {
            let c = lock(&vol.cache);
            pieces
                .iter()
                .map(|p| {
                    c.blocks
                        .get(&p.block)
                        .filter(|m| !write || matches!(m, Mapping::Object { writable: true, .. }))
                        .cloned()
                })
                .collect()
        };
        let (Some(first), Some(last)) = (
            out.iter().position(Option::is_none),
            out.iter().rposition(Option::is_none),
        ) else {
            return Ok(out.into_iter().map(|m| m.expect("all hit")).collect());
        };
        let bs = meta.block_size;
        let start = pieces[first].block * bs + pieces[first].object_offset;
        let end = pieces[last].block * bs + pieces[last].object_offset + pieces[last].len;
        let blocks = pieces[last].block - pieces[first].block + 1;
        let generation = lock(&vol.cache).generation;
        let op = if write { Op::MapWrite } else { Op::MapRead };
        let make = || {
            let cap = (4 + blocks * 300).max(CONTROL_BUF);
            let mut req = self.client.alloc(op, name.as_bytes(), cap)?;
            req.set_offset(start);
            req.set_size(end - start);
            Ok(req)
        };
        let rep = self.call_again(self.config.mapper_port, make).await?;
        let reply = MapReply::decode(rep.data()?)?;
        let fresh = self.install(
            vol,
            &reply,
            start,
            bs,
            (!shared).then_some(generation),
            write,
        )?;
        for (slot, p) in out.iter_mut().zip(pieces) {
            if slot.is_none() {
                *slot = fresh.get(&p.block).cloned();
            }
        }
        out.into_iter()
            .map(|m| {
                m.ok_or_else(|| Failure::new(Status::Io, "map reply does not cover the range"))
            })
            .collect()
    }

    /// Records a map reply for `[start, ..)` in the cache (by the rules in the module docs) and
    /// returns the mappings it carried, per block. `generation` is the cache generation when
    /// the request was sent, or `None` for a shared volume, whose mappings are never cached.
    fn install(
        &self,
        vol: &Vol,
        reply: &MapReply,
        start: u64,
        bs: u64,
        generation: Option<u64>,
        authoritative: bool,
    ) -> Result<HashMap<u64, Mapping>, Failure> {
        let mut fresh = HashMap::with_capacity(reply.extents.len());
        let mut pos = start;
        for e in &reply.extents {
            let m = if e.flags & extent::ZERO != 0 {
                Mapping::Zero
            } else {
                if e.object.is_empty() {
                    return Err(Failure::new(Status::Io, "map reply names no object"));
                }
                Mapping::Object {
                    name: e.object.as_str().into(),
                    writable: e.flags & extent::READONLY == 0,
                }
            };
            if e.len == 0 || pos % bs != e.offset {
                return Err(Failure::new(
                    Status::Io,
                    "map reply extents are inconsistent",
                ));
            }
            fresh.insert(pos / bs, m);
            pos += e.len;
        }
        let mut c = lock(&vol.cache);
        if generation == Some(c.generation) {
            if c.blocks.len() + fresh.len() > MAX_CACHED_BLOCKS {
                c.blocks.clear();
            }
            for (&b, m) in &fresh {
                if authoritative {
                    c.blocks.insert(b, m.clone());
                } else {
                    c.blocks.entry(b).or_insert_with(|| m.clone());
                }
            }
        }
        Ok(fresh)
    }

    async fn io(self: &Arc<Self>, name: &str, mut req: Request) -> Outcome {
        let write = req.op() == Op::Write;
        let vol = self.vol(name);
        // Before the gate: a throttled I/O must not hold up a snapshot's barrier.
        let wait = self.throttle(name, &vol, req.size()).await;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let _shared = vol.gate.read().await;
        let _ticket = write.then(|| vol.begin_write());
        let (pieces, maps) = match self.plan(name, &vol, &mut req, write).await {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(Some(req)),
            Err(f) => return Err((f, Some(req))),
        };
        let (offset, len) = (req.offset(), req.size());
        if let [p] = pieces[..] {
            // Fits in one object: forward the request itself (zero copy), or for a ZERO block
            // fill zeros here without any I/O.
            let object = match &maps[0] {
                Mapping::Zero => {
                    let r = req
                        .buffer_mut()
                        .map_err(Failure::from)
                        .map(|buf| buf[..len as usize].fill(0));
                    let r = r.and_then(|()| req.set_data_len(len).map_err(Failure::from));
                    req.complete(len);
                    return r.outcome(req);
                }
                Mapping::Object { name: object, .. } => object.clone(),
            };
            if let Err(e) = req.set_target(object.as_bytes()) {
                return Err((Failure::from(e), Some(req)));
            }
            req.set_offset(p.object_offset);
            let restore = |mut r: Request| {
                // Both cannot fail: the name fitted when the client sent it.
                let _ = r.set_target(name.as_bytes());
                r.set_offset(offset);
                r
            };
            let port = self.config.blocker_port;
            return match self.forward(req, port).await {
                Ok(Some(rep)) => Ok(Some(restore(rep))),
                Err((f, Some(r))) => Err((f, Some(restore(r)))),
                other => other,
            };
        }
        let r = self.split_io(&mut req, &pieces, &maps, write).await;
        if r.is_ok() {
            req.complete(len);
        }
        r.outcome(req)
    }

    /// Checks an I/O and finds its mappings; `None` when there is nothing to do (length 0).
    async fn plan(
        &self,
        name: &str,
        vol: &Vol,
        req: &mut Request,
        write: bool,
    ) -> Result<Option<(Vec<Piece>, Vec<Mapping>)>, Failure> {
        let (offset, len) = (req.offset(), req.size());
        let meta = self.checked_meta(name, vol, offset, len).await?;
        if write && req.data_len() < len {
            return Err(Failure::new(
                Status::Invalid,
                format!("write of {len} bytes carries {} bytes", req.data_len()),
            ));
        }
        if !write && req.capacity() < len {
            return Err(Failure::new(
                Status::Invalid,
                format!("read of {len} bytes into a {} byte buffer", req.capacity()),
            ));
        }
        if len == 0 {
            req.complete(0);
            return Ok(None);
        }
        let pieces = split(offset, len, meta.block_size);
        let maps = self.mappings(name, vol, meta, &pieces, write).await?;
        Ok(Some((pieces, maps)))
    }

    /// An I/O spanning objects: one sub-request per non-zero piece, all in flight at once.
    async fn split_io(
        self: &Arc<Self>,
        req: &mut Request,
        pieces: &[Piece],
        maps: &[Mapping],
        write: bool,
    ) -> Result<(), Failure> {
        let mut calls = tokio::task::JoinSet::new();
        for (i, (p, m)) in pieces.iter().zip(maps).enumerate() {
            let object = match m {
                Mapping::Zero => {
                    if !write {
                        req.buffer_mut()?[p.at as usize..(p.at + p.len) as usize].fill(0);
                    }
                    continue;
                }
                Mapping::Object { name, .. } => name.clone(),
            };
            let op = if write { Op::Write } else { Op::Read };
            // Owned, so that the task can build the sub-request again if sending must be retried.
            let data = if write {
                req.data()?[p.at as usize..(p.at + p.len) as usize].to_vec()
            } else {
                Vec::new()
            };
            let p = *p;
            let me = self.clone();
            calls.spawn(async move {
                let port = me.config.blocker_port;
                let make = || {
                    let mut sub = me.client.alloc(op, object.as_bytes(), p.len)?;
                    if write {
                        sub.write_data(&data)?;
                    }
                    sub.set_offset(p.object_offset);
                    sub.set_size(p.len);
                    Ok(sub)
                };
                (i, me.call_again(port, make).await)
            });
        }
        let mut first_error = None;
        while let Some(done) = calls.join_next().await {
            let (i, r) =
                done.map_err(|e| Failure::new(Status::Io, format!("sub-request task: {e}")))?;
            match r {
                Ok(rep) if !write => {
                    let p = pieces[i];
                    let data = rep.data()?;
                    if data.len() as u64 != p.len {
                        first_error.get_or_insert(Failure::new(Status::Io, "short object read"));
                        continue;
                    }
                    req.buffer_mut()?[p.at as usize..(p.at + p.len) as usize].copy_from_slice(data);
                }
                Ok(_) => {}
                Err(f) => {
                    first_error.get_or_insert(f);
                }
            }
        }
        if !write {
            req.set_data_len(req.size()).map_err(Failure::from)?;
        }
        match first_error {
            None => Ok(()),
            Some(f) => Err(f),
        }
    }

    async fn flush(&self, name: &str, req: Request) -> Outcome {
        let vol = self.vol(name);
        let _shared = vol.gate.read().await;
        vol.drain_writes_before_now().await;
        let port = self.config.blocker_port;
        self.forward(req, port).await
    }

    /// DISCARD and WRITE_ZEROES: the mapper turns whole blocks into ZERO entries; vlmc writes
    /// zeros into the partial blocks it hands back.
    async fn discard(self: &Arc<Self>, name: &str, req: &mut Request) -> Result<(), Failure> {
        let vol = self.vol(name);
        let _shared = vol.gate.read().await;
        let _ticket = vol.begin_write();
        let (offset, len) = (req.offset(), req.size());
        let meta = self.checked_meta(name, &vol, offset, len).await?;
        if len == 0 {
            req.complete(0);
            return Ok(());
        }
        let blocks: Vec<u64> = split(offset, len, meta.block_size)
            .iter()
            .map(|p| p.block)
            .collect();
        let forget = || {
            let mut c = lock(&vol.cache);
            c.generation += 1;
            for b in &blocks {
                c.blocks.remove(b);
            }
        };
        forget();
        let blocks_n = blocks.len() as u64;
        let op = req.op();
        let make = || {
            let cap = (12 + blocks_n.min(4) * 300).max(CONTROL_BUF);
            let mut sub = self.client.alloc(op, name.as_bytes(), cap)?;
            sub.set_offset(offset);
            sub.set_size(len);
            Ok(sub)
        };
        let rep = self.call_again(self.config.mapper_port, make).await;
        // Entries changed at the mapper whatever the outcome; replies sent meanwhile are stale.
        forget();
        let rep = rep?;
        let outcome = DiscardReply::decode(rep.data()?)?;
        drop(rep);
        let mut calls = tokio::task::JoinSet::new();
        for e in outcome.zero_write.extents {
            if e.flags & extent::ZERO != 0 {
                continue;
            }
            let me = self.clone();
            calls.spawn(async move {
                let port = me.config.blocker_port;
                let make = || {
                    let mut sub = me.client.alloc(Op::Write, e.object.as_bytes(), e.len)?;
                    sub.buffer_mut()?[..e.len as usize].fill(0);
                    sub.set_data_len(e.len)?;
                    sub.set_offset(e.offset);
                    sub.set_size(e.len);
                    Ok(sub)
                };
                me.call_again(port, make).await.map(drop)
            });
        }
        let mut first_error = None;
        while let Some(done) = calls.join_next().await {
            if let Err(f) = done.map_err(|e| Failure::new(Status::Io, e.to_string()))? {
                first_error.get_or_insert(f);
            }
        }
        if let Some(f) = first_error {
            return Err(f);
        }
        req.complete(len);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_cuts_at_block_boundaries() {
        let p = split(100, 300, 128);
        let v: Vec<_> = p
            .iter()
            .map(|p| (p.block, p.object_offset, p.at, p.len))
            .collect();
        assert_eq!(
            v,
            vec![
                (0, 100, 0, 28),
                (1, 0, 28, 128),
                (2, 0, 156, 128),
                (3, 0, 284, 16)
            ]
        );
        assert!(split(5, 0, 128).is_empty());
        assert_eq!(split(128, 128, 128).len(), 1);
    }
}
