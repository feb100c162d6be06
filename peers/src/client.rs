//! `VolumeClient`: the one API through which the CLI, the CSI controller and the block frontends
//! (ublk, NBD) talk to a running peer set.
//!
//! Every call becomes one or more xseg requests to the vlmc peer, which serves volume I/O itself
//! and forwards catalogue operations to the mapper. Going through vlmc for *everything* (not
//! only I/O) is deliberate: vlmc caches mappings, and an operation that changes them (snapshot,
//! clone of a volume, delete, close, resize, import, dedup) must pass its drain barrier, or vlmc
//! would keep writing objects a snapshot now shares.
//!
//! Errors are typed ([`ClientError`]) and carry the peer's own message, so a CLI can print
//! "volume db is locked by node-2" rather than "EBUSY".
//!
//! ```no_run
//! # async fn demo(seg: std::sync::Arc<xseg::Segment>) -> Result<(), peers::client::ClientError> {
//! use peers::client::VolumeClient;
//! let c = VolumeClient::connect(&seg)?;
//! c.create("db", 1 << 30, None).await?;
//! c.write("db", 4096, b"hello").await?;
//! c.flush("db").await?;
//! let mut buf = [0u8; 5];
//! c.read("db", 4096, &mut buf).await?;
//! c.snapshot("db", "db-snap1").await?;
//! c.clone_volume("db-snap1", "db-copy", None).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use xseg::protocol::{NamePayload, flags};
use xseg::{AsyncClient, Op, Request, Segment, Status};

pub use crate::mapper::QosLimits;
use crate::peerset::Ports;
use crate::wire::{CONTROL_BUF, ErrorReply, ListReply, WireCounters};
pub use crate::wire::{
    CreateRequest, DedupReport, GcReport, GcRequest, GroupSnapshotRequest, ImportReport, LockState,
    QosReport, VerifyReport, VolumeInfo, VolumeKind,
};

/// Why a call failed. Variants name the class of failure; the strings are the peer's message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Another node holds the volume's lock; `holder` is its identity.
    #[error("{message}")]
    Locked { holder: String, message: String },
    #[error("{0}")]
    OutOfRange(String),
    /// The backend is out of space (or quota), or a volume ran out of room in its metadata.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// A write to a snapshot.
    #[error("{0}")]
    ReadOnly(String),
    /// This node's lock on the volume was broken or taken over; reopen it.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The peer serving the request died (or none is bound to its port).
    #[error("peer gone: {0}")]
    PeerGone(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(String),
    #[error("transport: {0}")]
    Transport(#[source] xseg::Error),
}

impl From<xseg::Error> for ClientError {
    fn from(e: xseg::Error) -> Self {
        match e {
            xseg::Error::Timeout(d) => ClientError::Timeout(d),
            xseg::Error::NoPeer(p) => ClientError::PeerGone(format!("no peer bound to port {p}")),
            e => ClientError::Transport(e),
        }
    }
}

impl ClientError {
    /// The typed error for a failed reply, with the message the peer put in its buffer.
    pub fn from_reply(status: Status, data: &[u8]) -> ClientError {
        let reply = ErrorReply::decode(data).unwrap_or_default();
        let message = if reply.message.is_empty() {
            status.to_string()
        } else {
            reply.message
        };
        match status {
            Status::NotFound => ClientError::NotFound(message),
            Status::Exists => ClientError::AlreadyExists(message),
            Status::Invalid | Status::Unsupported => ClientError::InvalidArgument(message),
            Status::Busy => ClientError::Locked {
                holder: reply.holder.unwrap_or_default(),
                message,
            },
            Status::Range => ClientError::OutOfRange(message),
            Status::NoSpace => ClientError::NoSpace(message),
            Status::Stale => ClientError::Fenced(message),
            Status::PeerGone => ClientError::PeerGone(message),
            Status::TimedOut => ClientError::Timeout(Duration::ZERO),
            Status::Other(c) if c == libc::EROFS as u32 => ClientError::ReadOnly(message),
            _ => ClientError::Io(message),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Where requests go and how long to wait for them.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Port serving volumes: vlmc's.
    pub port: u32,
    /// Limit for I/O and quick catalogue calls.
    pub timeout: Duration,
    /// Limit for long-running calls: GC, dedup, import, verify, snapshot, clone, delete.
    pub admin_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            port: Ports::VLMC,
            timeout: Duration::from_secs(60),
            admin_timeout: Duration::from_secs(3600),
        }
    }
}

/// Room for one page of a LIST reply.
const LIST_BUF: u64 = 64 << 10;

/// A connection to a peer set: one dynamic port with many requests in flight. `Send + Sync`;
/// share it (`Arc`) between tasks rather than connecting per call, since each connection holds
/// a port and a receiver thread.
pub struct VolumeClient {
    client: AsyncClient,
    opts: ClientOptions,
    /// Largest data buffer the segment offers: reads and writes are cut into chunks of this.
    chunk: u64,
}

impl std::fmt::Debug for VolumeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeClient")
            .field("port", &self.client.sender().number())
            .field("opts", &self.opts)
            .finish()
    }
}

impl VolumeClient {
    /// Binds a dynamic port on `segment`, talking to vlmc with default timeouts.
    pub fn connect(segment: &Arc<Segment>) -> Result<VolumeClient> {
        Self::connect_with(segment, ClientOptions::default())
    }

    pub fn connect_with(segment: &Arc<Segment>, opts: ClientOptions) -> Result<VolumeClient> {
        let client = AsyncClient::new(segment, "volume-client")?;
        let chunk = segment.config().buffer_classes.last().map_or(4096, |c| c.0);
        Ok(VolumeClient {
            client,
            opts,
            chunk,
        })
    }

    pub fn segment(&self) -> &Arc<Segment> {
        self.client.sender().segment()
    }

    /// This client's own (dynamic) port.
    pub fn port(&self) -> u32 {
        self.client.sender().number()
    }

    /// Largest single request the segment can carry; bigger reads and writes are split.
    pub fn max_io(&self) -> u64 {
        self.chunk
    }

    /// Allocates a request for the served port, for frontends that fill segment buffers
    /// directly (zero copy). Send it with [`VolumeClient::call`].
    pub fn alloc(&self, op: Op, target: &str, data_len: u64) -> Result<Request> {
        Ok(self.client.alloc(op, target.as_bytes(), data_len)?)
    }

    /// Sends a request to the served port and waits for the reply; a failed reply becomes the
    /// typed error (and the request is freed). A request that cannot be queued is freed with
    /// the error; the methods below rebuild and retry theirs instead.
    pub async fn call(&self, req: Request) -> Result<Request> {
        let rep = self
            .client
            .call(req, self.opts.port, self.opts.timeout)
            .await?;
        Self::checked(rep)
    }

    fn checked(rep: Request) -> Result<Request> {
        match rep.status() {
            Status::Ok => Ok(rep),
            s => Err(ClientError::from_reply(s, rep.data().unwrap_or(&[]))),
        }
    }

    /// Builds a request with `make`, sends it to `port` and waits. A queue that is momentarily
    /// full (or that a racing producer found inconsistent) gets a fresh request, by xseg's
    /// [`xseg::SendRetry`] policy.
    async fn send(
        &self,
        port: u32,
        timeout: Duration,
        make: impl Fn() -> Result<Request>,
    ) -> Result<Request> {
        let rep = self.client.call_again(make, port, timeout).await?;
        Self::checked(rep)
    }

    /// [`send`](Self::send) for a call that writes data (WRITE, DISCARD, WRITE_ZEROES): waited
    /// for until vlmc answers, however long. vlmc answers every write once no part of it is
    /// still on its way (or the transport fails it back when vlmc dies); a caller that gave up
    /// earlier would report a write failed that may still land, after a newer write it makes
    /// believing the first one over. `opts.timeout` is how often a slow write is logged.
    async fn send_write(&self, make: impl Fn() -> Result<Request>) -> Result<Request> {
        let mut retry = xseg::SendRetry::new();
        loop {
            let slow = |waited: Duration| {
                tracing::warn!(?waited, "a volume write is slow; waiting for vlmc's answer");
            };
            let port = self.opts.port;
            match self
                .client
                .call_to_reply(make()?, port, self.opts.timeout, slow)
                .await
            {
                Err(e) if retry.allows(&e) => retry.pause().await,
                r => return Self::checked(r?),
            }
        }
    }

    fn target(name: &str) -> Result<&[u8]> {
        if name.len() > xseg::MAX_TARGET_LEN {
            return Err(ClientError::InvalidArgument(format!(
                "name of {} bytes is too long",
                name.len()
            )));
        }
        Ok(name.as_bytes())
    }

    /// A request for the served port: `op` on `name`, with `offset`/`size` set and `payload`
    /// (or nothing) in a buffer of at least `buf` bytes.
    fn build(
        &self,
        op: Op,
        name: &str,
        offset: u64,
        size: u64,
        payload: &[u8],
        buf: u64,
    ) -> Result<Request> {
        let mut req = self
            .client
            .alloc(op, Self::target(name)?, buf.max(payload.len() as u64))?;
        req.set_offset(offset);
        req.set_size(size);
        if !payload.is_empty() {
            req.write_data(payload)?;
        }
        Ok(req)
    }

    async fn control(
        &self,
        op: Op,
        name: &str,
        offset: u64,
        size: u64,
        payload: &[u8],
        admin: bool,
    ) -> Result<Request> {
        let t = if admin {
            self.opts.admin_timeout
        } else {
            self.opts.timeout
        };
        self.send(self.opts.port, t, || {
            self.build(op, name, offset, size, payload, CONTROL_BUF)
        })
        .await
    }

    fn info_of(rep: &Request) -> Result<VolumeInfo> {
        VolumeInfo::decode(rep.data().unwrap_or(&[]))
            .map_err(|_| ClientError::Io("malformed volume info in reply".into()))
    }

    fn counters<T: WireCounters>(rep: &Request) -> Result<T> {
        T::decode(rep.data().unwrap_or(&[]))
            .map_err(|_| ClientError::Io("malformed report in reply".into()))
    }

    fn lock_state(rep: &Request) -> Result<LockState> {
        LockState::decode(rep.data().unwrap_or(&[]))
            .map_err(|_| ClientError::Io("malformed lock state".into()))
    }

    /// Creates an empty (thin, all zero) volume. `block_size` defaults to 4 MiB.
    pub async fn create(
        &self,
        name: &str,
        size: u64,
        block_size: Option<u64>,
    ) -> Result<VolumeInfo> {
        let block_size = match block_size {
            None => 0,
            Some(b) => u32::try_from(b)
                .ok()
                .filter(|&b| b != 0)
                .ok_or_else(|| ClientError::InvalidArgument(format!("block size {b}")))?,
        };
        self.create_with(
            name,
            CreateRequest {
                size,
                block_size,
                page_entries: 0,
            },
        )
        .await
    }

    /// Creates a volume with an explicit layout (zero fields take the defaults).
    pub async fn create_with(&self, name: &str, layout: CreateRequest) -> Result<VolumeInfo> {
        let mut payload = [0u8; CreateRequest::ENCODED];
        layout.encode(&mut payload).map_err(bad_buffer)?;
        let rep = self
            .control(Op::Create, name, 0, 0, &payload, false)
            .await?;
        Self::info_of(&rep)
    }

    /// A volume's or snapshot's metadata.
    pub async fn info(&self, name: &str) -> Result<VolumeInfo> {
        let rep = self.control(Op::Info, name, 0, 0, &[], false).await?;
        Self::info_of(&rep)
    }

    /// Every volume and snapshot, sorted by name.
    pub async fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out: Vec<VolumeInfo> = Vec::new();
        loop {
            let first = out.len() as u64;
            let rep = self
                .send(self.opts.port, self.opts.timeout, || {
                    self.build(Op::List, "", first, 0, &[], LIST_BUF)
                })
                .await?;
            let page = ListReply::decode(rep.data().unwrap_or(&[]))
                .map_err(|_| ClientError::Io("malformed list reply".into()))?;
            let done = page.entries.is_empty();
            out.extend(page.entries);
            // The catalogue may change between pages; stop when a page brings nothing new.
            if done || out.len() >= page.total as usize {
                break;
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    /// Grows a volume; shrinking is refused with [`ClientError::OutOfRange`].
    pub async fn resize(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let rep = self
            .control(Op::Resize, name, 0, new_size, &[], false)
            .await?;
        Self::info_of(&rep)
    }

    /// Deletes a volume or snapshot; its objects are reclaimed by the next [`gc`](Self::gc).
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.control(Op::Delete, name, 0, 0, &[], true).await?;
        Ok(())
    }

    async fn named(&self, op: Op, target: &str, name: &str, size: u64) -> Result<VolumeInfo> {
        let p = NamePayload {
            name: name.to_string(),
            size,
        };
        let mut payload = [0u8; 2 + xseg::protocol::MAX_NAME + 8];
        let n = p
            .encode(&mut payload)
            .map_err(|_| ClientError::InvalidArgument(format!("name {name:?} is too long")))?;
        let rep = self.control(op, target, 0, 0, &payload[..n], true).await?;
        Self::info_of(&rep)
    }

    /// A read-only, instant snapshot of a volume: no data is copied.
    pub async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo> {
        self.named(Op::Snapshot, volume, snapshot, 0).await
    }

    /// Snapshots of several volumes at one point in time: vlmc holds every member's drain
    /// barrier while the mapper cuts them all. `members` pairs a volume with the name of its
    /// snapshot. On failure some members may have been cut; delete them.
    pub async fn snapshot_group(&self, members: &[(String, String)]) -> Result<()> {
        let group = GroupSnapshotRequest {
            members: members.to_vec(),
        };
        let mut payload = vec![0u8; group.max_encoded()];
        let n = group.encode(&mut payload).map_err(|_| {
            ClientError::InvalidArgument(format!(
                "a group snapshot takes 1 to {} members with names of at most 255 bytes",
                crate::wire::MAX_GROUP_MEMBERS
            ))
        })?;
        self.control(Op::Snapshot, "", 0, 0, &payload[..n], true)
            .await?;
        Ok(())
    }

    /// A writable copy-on-write clone of a snapshot or of a volume (which then gets an
    /// implicit snapshot). `size` may grow the clone; it defaults to the source's size.
    pub async fn clone_volume(
        &self,
        source: &str,
        new_name: &str,
        size: Option<u64>,
    ) -> Result<VolumeInfo> {
        if size == Some(0) {
            return Err(ClientError::InvalidArgument("size 0".into()));
        }
        self.named(Op::Clone, source, new_name, size.unwrap_or(0))
            .await
    }

    /// Same as [`clone_volume`](Self::clone_volume). Through an `Arc<VolumeClient>` the
    /// method call resolves to `Arc::clone`, so call `clone_volume` there.
    pub async fn clone(
        &self,
        source: &str,
        new_name: &str,
        size: Option<u64>,
    ) -> Result<VolumeInfo> {
        self.clone_volume(source, new_name, size).await
    }

    /// Opens a volume for writing here (taking its lock as this node) or a snapshot for
    /// reading. I/O opens implicitly; an explicit open reports a lock conflict up front.
    pub async fn open(&self, name: &str) -> Result<VolumeInfo> {
        let rep = self.control(Op::Open, name, 0, 0, &[], false).await?;
        Self::info_of(&rep)
    }

    /// Opens a volume *shared*, for a live-migration handover between nodes that both have it
    /// attached: no lock until this node's first write (which takes it over from the other
    /// node), and no mapping cached unless this node holds the lock. Only safe when the
    /// writers take turns (a migrating VM's QEMU does); two concurrent writers would keep
    /// taking the lock from each other.
    pub async fn open_shared(&self, name: &str) -> Result<VolumeInfo> {
        let rep = self
            .send(self.opts.port, self.opts.timeout, || {
                let mut req = self.build(Op::Open, name, 0, 0, &[], CONTROL_BUF)?;
                req.set_flags(flags::SHARED);
                Ok(req)
            })
            .await?;
        Self::info_of(&rep)
    }

    /// Waits for in-flight I/O, drops cached mappings and releases the lock.
    pub async fn close(&self, name: &str) -> Result<()> {
        self.control(Op::Close, name, 0, 0, &[], false).await?;
        Ok(())
    }

    fn io_chunks(&self, offset: u64, len: u64) -> Result<impl Iterator<Item = (u64, u64)>> {
        offset
            .checked_add(len)
            .ok_or_else(|| ClientError::OutOfRange(format!("{offset}+{len} overflows")))?;
        let chunk = self.chunk;
        Ok((0..len.div_ceil(chunk)).map(move |i| {
            let at = i * chunk;
            (offset + at, chunk.min(len - at))
        }))
    }

    /// Reads `buf.len()` bytes at byte `offset` (any alignment). Unwritten ranges read as zeros.
    pub async fn read(&self, volume: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (at, n) in self.io_chunks(offset, buf.len() as u64)? {
            let rep = self
                .send(self.opts.port, self.opts.timeout, || {
                    self.build(Op::Read, volume, at, n, &[], n)
                })
                .await?;
            let data = rep
                .data()
                .map_err(|_| ClientError::Io("bad reply buffer".into()))?;
            if data.len() as u64 != n || rep.serviced() != n {
                return Err(ClientError::Io(format!(
                    "short read: {} of {n} bytes at {at}",
                    rep.serviced()
                )));
            }
            let from = (at - offset) as usize;
            buf[from..from + n as usize].copy_from_slice(data);
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` (any alignment). Durable after a later [`flush`](Self::flush).
    pub async fn write(&self, volume: &str, offset: u64, data: &[u8]) -> Result<()> {
        for (at, n) in self.io_chunks(offset, data.len() as u64)? {
            let from = (at - offset) as usize;
            let piece = &data[from..from + n as usize];
            let rep = self
                .send_write(|| self.build(Op::Write, volume, at, n, piece, n))
                .await?;
            if rep.serviced() != n {
                return Err(ClientError::Io(format!(
                    "short write: {} of {n} bytes at {at}",
                    rep.serviced()
                )));
            }
        }
        Ok(())
    }

    /// Makes every write to `volume` completed before this call durable.
    pub async fn flush(&self, volume: &str) -> Result<()> {
        self.control(Op::Flush, volume, 0, 0, &[], false).await?;
        Ok(())
    }

    /// Discards a range: whole blocks become ZERO entries (their space is freed), partial ones
    /// are zero-written. The range reads as zeros afterwards.
    pub async fn discard(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.send_write(|| self.build(Op::Discard, volume, offset, len, &[], CONTROL_BUF))
            .await?;
        Ok(())
    }

    /// Zeroes a range, the same way as [`discard`](Self::discard): no zeros are stored.
    pub async fn write_zeroes(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.send_write(|| self.build(Op::WriteZeroes, volume, offset, len, &[], CONTROL_BUF))
            .await?;
        Ok(())
    }

    /// Who holds a volume's lock, and its fencing generation.
    pub async fn lock_info(&self, volume: &str) -> Result<LockState> {
        let rep = self.control(Op::LockInfo, volume, 0, 0, &[], false).await?;
        Self::lock_state(&rep)
    }

    /// A volume's I/O limits, and how many I/Os this peer set's vlmc has delayed for them.
    pub async fn qos(&self, volume: &str) -> Result<QosReport> {
        let rep = self.control(Op::Qos, volume, 0, 0, &[], false).await?;
        QosReport::decode(rep.data().unwrap_or(&[]))
            .map_err(|_| ClientError::Io("malformed QoS report".into()))
    }

    /// Sets a volume's I/O limits (0 = unlimited). Every node's vlmc applies them within a few
    /// seconds; this peer set's at once.
    pub async fn set_qos(&self, volume: &str, limits: QosLimits) -> Result<QosReport> {
        let mut payload = [0u8; QosReport::ENCODED];
        QosReport {
            iops: limits.iops,
            bytes_per_sec: limits.bytes_per_sec,
            delayed_ios: 0,
        }
        .encode(&mut payload)
        .map_err(|_| ClientError::Io("encoding QoS limits".into()))?;
        let rep = self.control(Op::Qos, volume, 0, 0, &payload, false).await?;
        QosReport::decode(rep.data().unwrap_or(&[]))
            .map_err(|_| ClientError::Io("malformed QoS report".into()))
    }

    /// Breaks a volume's lock whoever holds it (a dead node's). Logged by the mapper. The
    /// former holder's map updates are refused from now on. Returns the lock as it was.
    pub async fn break_lock(&self, volume: &str) -> Result<LockState> {
        let rep = self
            .send(self.opts.port, self.opts.timeout, || {
                let mut req = self.build(Op::Release, volume, 0, 0, &[], CONTROL_BUF)?;
                req.set_flags(flags::FORCE);
                Ok(req)
            })
            .await?;
        Self::lock_state(&rep)
    }

    /// Writes whole blocks of an image at a block-aligned `offset` as content-addressed
    /// objects: identical blocks anywhere are stored once, all-zero blocks are not stored. The
    /// data may span many blocks (the last block of the volume may be short); it is sent in
    /// whole-block chunks that fit the segment's buffers.
    pub async fn import_block(
        &self,
        volume: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<ImportReport> {
        let info = self.info(volume).await?;
        let bs = u64::from(info.block_size);
        if bs > self.chunk {
            return Err(ClientError::InvalidArgument(format!(
                "block size {bs} exceeds the segment's largest buffer ({})",
                self.chunk
            )));
        }
        offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| ClientError::OutOfRange(format!("{offset}+{} overflows", data.len())))?;
        // Whole blocks per request, as many as a buffer holds.
        let per = ((self.chunk / bs) * bs) as usize;
        let mut total = ImportReport::default();
        for (k, piece) in data.chunks(per).enumerate() {
            let at = offset + (k * per) as u64;
            let n = piece.len() as u64;
            let rep = self
                .send(self.opts.port, self.opts.admin_timeout, || {
                    self.build(Op::Import, volume, at, n, piece, CONTROL_BUF)
                })
                .await?;
            let r: ImportReport = Self::counters(&rep)?;
            total.blocks += r.blocks;
            total.zero += r.zero;
            total.written += r.written;
            total.reused += r.reused;
            total.bytes_written += r.bytes_written;
        }
        Ok(total)
    }

    /// Converts a snapshot's objects into content-addressed ones, so identical blocks across
    /// all volumes are stored once (after the next GC).
    pub async fn dedup(&self, snapshot: &str) -> Result<DedupReport> {
        let rep = self.control(Op::Dedup, snapshot, 0, 0, &[], true).await?;
        Self::counters(&rep)
    }

    /// Collects garbage with the default grace period (recent objects are spared).
    pub async fn gc(&self) -> Result<GcReport> {
        self.gc_with(GcRequest::default()).await
    }

    pub async fn gc_with(&self, opts: GcRequest) -> Result<GcReport> {
        let mut payload = [0u8; GcRequest::ENCODED];
        opts.encode(&mut payload).map_err(bad_buffer)?;
        let rep = self.control(Op::Gc, "", 0, 0, &payload, true).await?;
        Self::counters(&rep)
    }

    /// Reads a map back from storage and checks it completely (checksums, entries, and the
    /// mapper's cache against storage).
    pub async fn verify(&self, name: &str) -> Result<VerifyReport> {
        let rep = self.control(Op::Verify, name, 0, 0, &[], true).await?;
        Self::counters(&rep)
    }

    /// Round-trip time of a PING to `port` (see [`Ports`]).
    pub async fn ping(&self, port: u32) -> Result<Duration> {
        let start = Instant::now();
        self.send(port, self.opts.timeout, || {
            Ok(self.client.alloc(Op::Ping, b"", 0)?)
        })
        .await?;
        Ok(start.elapsed())
    }
}

fn bad_buffer(s: Status) -> ClientError {
    ClientError::Io(format!("request buffer: {s}"))
}

impl From<xseg::Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::from_reply(s, &[])
    }
}
