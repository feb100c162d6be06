//! The transmission phase of one connection: requests are read in order, checked at the
//! boundary, run concurrently, and answered by handle as they complete.
//!
//! Three parts: the reader (this task) parses headers and WRITE payloads and spawns one task
//! per request; each task calls the volume client and sends its reply to the writer; the
//! writer task owns the socket's write half and batches replies into few writes. Bounds: at
//! most `queue_depth` requests of a connection in flight (the reader waits beyond that, which
//! pushes back on the client through the socket), and at most `inflight_bytes` of data across
//! the server.
//!
//! The session ends on NBD_CMD_DISC, on the client hanging up, on garbage (a bad request
//! magic: the stream is out of step), or on server shutdown. In every case the requests
//! already accepted finish and are answered, and writes not yet flushed are flushed, before
//! the socket closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::Duration;

use peers::client::{ClientError, VolumeClient};
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::handshake::Export;
use super::proto::{self, Limits, Op, RequestHeader, errno};
use super::{IoStats, Shared, stopped};
use crate::io_stats::bump;

/// Largest piece of explicit zeros written for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: usize = 1 << 20;
/// Attempts when the segment's request or buffer pool is momentarily exhausted.
const POOL_RETRIES: u32 = 200;

/// One reply for the writer: a header and, for a successful READ, the data.
struct Reply {
    handle: u64,
    error: u32,
    /// READ data: this reply's range of its batch's buffer.
    data: Option<(Arc<Vec<u8>>, std::ops::Range<usize>)>,
    /// Held until the reply is written, so that READ data counts against the budget while it
    /// sits in memory.
    _bytes: Option<Arc<OwnedSemaphorePermit>>,
}

/// Streams that split into independent owned halves (no lock shared between reading and
/// writing, unlike `tokio::io::split`).
pub(super) trait IntoHalves: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl IntoHalves for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl IntoHalves for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Why the reader stopped.
#[derive(Debug)]
enum End {
    Disc,
    Hangup,
    Shutdown,
    Garbage(proto::BadMagic),
    Io(std::io::Error),
}

/// What every request task of a connection needs.
struct Conn {
    client: Arc<VolumeClient>,
    export: Export,
    stats: Arc<IoStats>,
    /// Writes completed since the last successful FLUSH started: flushed at the end.
    dirty: AtomicBool,
}

/// Runs the transmission phase until the session ends; never panics on client input.
pub(super) async fn run<S: IntoHalves>(
    stream: S,
    export: Export,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.into_halves();
    let depth = shared.config.queue_depth;
    let (tx, rx) = mpsc::channel::<Reply>(depth + 1);
    let writer = tokio::spawn(write_replies(wr, rx));
    let conn = Arc::new(Conn {
        client: shared.client.clone(),
        export,
        stats: shared.stats.clone(),
        dirty: AtomicBool::new(false),
    });
    let slots = Arc::new(Semaphore::new(depth));
    let end = read_requests(rd, &conn, &shared, &slots, &tx, stop).await;
    match &end {
        End::Garbage(e) => {
            bump(&conn.stats.protocol_errors, 1);
            tracing::warn!(export = %conn.export.name, error = %e, "nbd: disconnecting a client that sent garbage");
        }
        End::Io(e) => {
            tracing::debug!(export = %conn.export.name, error = %e, "nbd: connection error")
        }
        End::Disc | End::Hangup | End::Shutdown => {
            tracing::debug!(export = %conn.export.name, end = ?end, "nbd: session ends")
        }
    }
    // Every accepted request holds a slot until it has sent its reply: taking them all back
    // waits for the last one.
    let _all = slots.acquire_many(depth as u32).await;
    if conn.dirty.swap(false, AcqRel)
        && let Err(e) = retry_pool(|| conn.client.flush(&conn.export.name)).await
    {
        tracing::warn!(export = %conn.export.name, error = %e, "nbd: flush at disconnect failed");
    }
    drop(tx);
    let _ = writer.await;
}

async fn read_requests<R>(
    rd: R,
    conn: &Arc<Conn>,
    shared: &Shared,
    slots: &Arc<Semaphore>,
    tx: &mpsc::Sender<Reply>,
    mut stop: watch::Receiver<bool>,
) -> End
where
    R: AsyncRead + Unpin,
{
    let mut rd = BufReader::with_capacity(64 << 10, rd);
    let limits = Limits {
        size: conn.export.size,
        read_only: conn.export.read_only,
        max_io: shared.config.max_io,
    };
    let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
    loop {
        let got = tokio::select! {
            biased;
            _ = stopped(&mut stop) => return End::Shutdown,
            r = rd.read_exact(&mut raw) => r,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return End::Hangup,
            Err(e) => return End::Io(e),
        }
        let header = match RequestHeader::parse(&raw) {
            Ok(h) => h,
            Err(e) => return End::Garbage(e),
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return End::Shutdown;
        };
        let op = match header.validate(&limits) {
            Ok(op) => op,
            Err(refused) => {
                bump(&conn.stats.refused, 1);
                tracing::debug!(
                    handle = header.handle,
                    kind = header.kind,
                    why = refused.why,
                    "nbd: request refused"
                );
                // A refused WRITE's payload is still on the wire: skip it to stay in step.
                if let Err(e) = skip(&mut rd, header.payload_len()).await {
                    return End::Io(e);
                }
                let _ = tx
                    .send(Reply {
                        handle: header.handle,
                        error: refused.errno,
                        data: None,
                        _bytes: None,
                    })
                    .await;
                drop(slot);
                continue;
            }
        };
        let (bytes, payload) = match op {
            Op::Disc => return End::Disc,
            Op::Write { len, .. } | Op::Read { len, .. } => {
                // `len` <= max_io <= inflight_bytes (checked at bind), so this always fits.
                let Ok(permit) = shared.budget.clone().acquire_many_owned(len.max(1)).await else {
                    return End::Shutdown;
                };
                let payload = if let Op::Write { .. } = op {
                    let mut data = Vec::with_capacity(len as usize);
                    if let Err(e) = read_payload(&mut rd, &mut data, len).await {
                        return End::Io(e);
                    }
                    Some(data)
                } else {
                    None
                };
                (Some(permit), payload)
            }
            _ => (None, None),
        };
        let mut batch = Batch {
            op,
            pieces: vec![(header.handle, len_of(&op))],
            payload,
            slots: vec![slot],
            bytes,
        };
        let merging = merge_buffered(
            &mut rd,
            &mut batch,
            &limits,
            shared.config.merge_limit,
            &shared.budget,
            slots,
            &conn.stats,
        );
        if let Err(e) = merging.await {
            return End::Io(e);
        }
        let conn = conn.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let Batch {
                op,
                pieces,
                payload,
                slots,
                bytes,
            } = batch;
            let result = execute(&conn, op, pieces.len() as u64, payload).await;
            if let Err(e) = &result {
                bump(&conn.stats.failed, pieces.len() as u64);
                tracing::debug!(export = %conn.export.name, ?op, error = %e, "nbd: request failed");
            }
            let (error, data) = match result {
                Ok(data) => (0, data.map(Arc::new)),
                Err(e) => (errno_of(&e, &op), None),
            };
            let bytes = bytes.map(Arc::new);
            let mut at = 0usize;
            for (handle, len) in pieces {
                let range = at..at + len as usize;
                at += len as usize;
                let _ = tx
                    .send(Reply {
                        handle,
                        error,
                        data: data.as_ref().map(|d| (d.clone(), range)),
                        _bytes: bytes.clone(),
                    })
                    .await;
            }
            drop(slots);
        });
    }
}

/// Requests run as one call to the volume: a single request, or contiguous READs (or WRITEs)
/// that arrived together and were merged.
struct Batch {
    op: Op,
    /// Handle and length of each merged request, in offset order.
    pieces: Vec<(u64, u32)>,
    /// WRITE data of all pieces, back to back.
    payload: Option<Vec<u8>>,
    slots: Vec<OwnedSemaphorePermit>,
    bytes: Option<OwnedSemaphorePermit>,
}

fn len_of(op: &Op) -> u32 {
    match *op {
        Op::Read { len, .. }
        | Op::Write { len, .. }
        | Op::Trim { len, .. }
        | Op::WriteZeroes { len, .. } => len,
        Op::Flush | Op::Disc => 0,
    }
}

async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    into: &mut Vec<u8>,
    len: u32,
) -> std::io::Result<()> {
    let from = into.len();
    into.resize(from + len as usize, 0);
    rd.read_exact(&mut into[from..]).await.map(drop)
}

/// Merges into `batch` the requests already waiting in the read buffer that continue it: same
/// kind (READ or WRITE), starting where it ends, up to `merge_limit` bytes in all. Requests
/// then cost the volume layer one call instead of one each, as a block layer's merging does
/// for a kernel device. Never waits for the client: only what is buffered is looked at (a
/// merged WRITE's payload follows its header, so reading it does not wait on the client's
/// choice). Stops at the first request that does not fit, leaving it for the main loop.
async fn merge_buffered<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    batch: &mut Batch,
    limits: &Limits,
    merge_limit: u32,
    budget: &Arc<Semaphore>,
    slots: &Arc<Semaphore>,
    stats: &IoStats,
) -> std::io::Result<()> {
    let limit = u64::from(merge_limit);
    loop {
        let Some(raw) = rd.buffer().get(..proto::REQUEST_HEADER_LEN) else {
            return Ok(());
        };
        let raw: &[u8; proto::REQUEST_HEADER_LEN] = raw.try_into().expect("sliced to size");
        let Ok(next) = RequestHeader::parse(raw) else {
            return Ok(());
        };
        let Ok(op) = next.validate(limits) else {
            return Ok(());
        };
        let merged = match (batch.op, op) {
            (Op::Read { offset, len }, Op::Read { offset: o, len: l })
                if offset + u64::from(len) == o && u64::from(len) + u64::from(l) <= limit =>
            {
                Op::Read {
                    offset,
                    len: len + l,
                }
            }
            (
                Op::Write { offset, len, fua },
                Op::Write {
                    offset: o,
                    len: l,
                    fua: f,
                },
            ) if offset + u64::from(len) == o && u64::from(len) + u64::from(l) <= limit => {
                Op::Write {
                    offset,
                    len: len + l,
                    fua: fua || f,
                }
            }
            _ => return Ok(()),
        };
        // Only with a free queue slot and budget at hand: merging must never wait.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            return Ok(());
        };
        let Ok(more) = budget.clone().try_acquire_many_owned(len_of(&op).max(1)) else {
            return Ok(());
        };
        std::pin::Pin::new(&mut *rd).consume(proto::REQUEST_HEADER_LEN);
        if let (Op::Write { len, .. }, Some(data)) = (op, batch.payload.as_mut()) {
            read_payload(rd, data, len).await?;
        }
        bump(&stats.merged, 1);
        batch.op = merged;
        batch.pieces.push((next.handle, len_of(&op)));
        batch.slots.push(slot);
        match batch.bytes.as_mut() {
            Some(b) => b.merge(more),
            None => batch.bytes = Some(more),
        }
    }
}

/// Reads and drops `n` bytes without buffering them all.
async fn skip<R: AsyncRead + Unpin>(rd: &mut R, n: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut rd.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The reply error for a failed request, from the spec's short list.
fn errno_of(e: &ClientError, op: &Op) -> u32 {
    let writes = matches!(
        op,
        Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
    );
    match e {
        ClientError::ReadOnly(_) | ClientError::Locked { .. } => errno::EPERM,
        ClientError::InvalidArgument(_) => errno::EINVAL,
        ClientError::OutOfRange(_) if writes => errno::ENOSPC,
        ClientError::OutOfRange(_) => errno::EINVAL,
        // The backend is full: the client must learn it is out of space, not that the disk
        // failed. (A segment short of requests never comes here: it is waited out.)
        ClientError::NoSpace(_) => errno::ENOSPC,
        _ => errno::EIO,
    }
}

/// Whether a failure is the segment running short of requests or buffers for a moment.
fn pool_exhausted(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Transport(
            xseg::Error::NoRequest | xseg::Error::NoBuffer(_) | xseg::Error::QueueFull(_)
        )
    )
}

/// Retries `f` while the segment's pools are exhausted, with a growing (bounded) pause: other
/// frontends share the segment, so its pools can run dry even within this server's budget.
async fn retry_pool<T, F, Fut>(mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut backoff = pool_backoff();
    loop {
        match f().await {
            Err(e) if pool_exhausted(&e) => match backoff.next_pause() {
                Some(pause) => tokio::time::sleep(pause).await,
                None => return Err(e),
            },
            r => return r,
        }
    }
}

/// The back-off from an exhausted pool: 200 tries, 100 µs doubling to ~51 ms.
fn pool_backoff() -> xseg::retry::PoolBackoff {
    xseg::retry::PoolBackoff::new(POOL_RETRIES, Duration::from_micros(50), 10)
}

async fn flush(conn: &Conn) -> Result<(), ClientError> {
    bump(&conn.stats.flushes, 1);
    let was = conn.dirty.swap(false, AcqRel);
    let r = retry_pool(|| conn.client.flush(&conn.export.name)).await;
    if r.is_err() && was {
        conn.dirty.store(true, Release);
    }
    r
}

/// Runs one validated request (or `n` merged ones); returns READ data.
async fn execute(
    conn: &Conn,
    op: Op,
    n: u64,
    payload: Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, ClientError> {
    let c = &conn.client;
    let vol = conn.export.name.as_str();
    let stats = &conn.stats;
    match op {
        Op::Read { offset, len } => {
            bump(&stats.reads, n);
            let mut buf = vec![0u8; len as usize];
            if len > 0 {
                let mut backoff = pool_backoff();
                // Not `retry_pool`: the future borrows `buf` mutably.
                loop {
                    match c.read(vol, offset, &mut buf).await {
                        Err(e) if pool_exhausted(&e) => match backoff.next_pause() {
                            Some(pause) => tokio::time::sleep(pause).await,
                            None => return Err(e),
                        },
                        r => break r?,
                    }
                }
            }
            bump(&stats.bytes_read, u64::from(len));
            Ok(Some(buf))
        }
        Op::Write { offset, len, fua } => {
            bump(&stats.writes, n);
            let data = payload.unwrap_or_default();
            debug_assert_eq!(data.len(), len as usize);
            if len > 0 {
                retry_pool(|| c.write(vol, offset, &data)).await?;
                conn.dirty.store(true, Release);
            }
            bump(&stats.bytes_written, u64::from(len));
            if fua {
                flush(conn).await?;
            }
            Ok(None)
        }
        Op::Flush => flush(conn).await.map(|()| None),
        Op::Trim { offset, len, fua } => {
            bump(&stats.discards, 1);
            if len > 0 {
                retry_pool(|| c.discard(vol, offset, u64::from(len))).await?;
                conn.dirty.store(true, Release);
                if fua {
                    flush(conn).await?;
                }
            }
            Ok(None)
        }
        Op::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
        } => {
            bump(&stats.write_zeroes, 1);
            if len > 0 {
                if no_hole {
                    // The client wants the range provisioned: store real zeros rather than
                    // ZERO map entries.
                    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
                    let end = offset + u64::from(len);
                    let mut at = offset;
                    while at < end {
                        let n = (end - at).min(zeros.len() as u64) as usize;
                        retry_pool(|| c.write(vol, at, &zeros[..n])).await?;
                        at += n as u64;
                    }
                } else {
                    retry_pool(|| c.write_zeroes(vol, offset, u64::from(len))).await?;
                }
                conn.dirty.store(true, Release);
                if fua {
                    flush(conn).await?;
                }
            }
            Ok(None)
        }
        Op::Disc => Ok(None),
    }
}

/// Owns the write half: writes each reply (header, then READ data) and flushes once the
/// queue is empty, so that a burst of completions costs one system call.
async fn write_replies<W>(wr: W, mut rx: mpsc::Receiver<Reply>)
where
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::with_capacity(128 << 10, wr);
    let result: std::io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(r) = next {
                out.write_all(&proto::simple_reply(r.error, r.handle))
                    .await?;
                if let Some((d, range)) = &r.data {
                    out.write_all(&d[range.clone()]).await?;
                }
                next = rx.try_recv().ok();
            }
            out.flush().await?;
        }
        out.shutdown().await
    }
    .await;
    if let Err(e) = result {
        // The client went away; the reader notices on its side. Drain so senders never block.
        tracing::debug!(error = %e, "nbd: writing replies failed");
        while rx.recv().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::proto::cmd;
    use super::*;

    fn header(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn a_full_backend_is_enospc_and_a_failed_one_eio() {
        let write = Op::Write {
            offset: 0,
            len: 4096,
            fua: false,
        };
        let full = ClientError::NoSpace("pool full".into());
        assert_eq!(errno_of(&full, &write), errno::ENOSPC);
        assert_eq!(
            errno_of(&ClientError::Io("disk".into()), &write),
            errno::EIO
        );
    }

    const LIMITS: Limits = Limits {
        size: 1 << 20,
        read_only: false,
        max_io: 1 << 20,
    };

    /// Parses the first request off `wire` and merges what follows, as the reader does.
    async fn first_batch(wire: &[u8], merge_limit: u32, depth: usize) -> (Batch, Vec<u8>) {
        let mut rd = BufReader::new(wire);
        let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
        rd.read_exact(&mut raw).await.unwrap();
        let h = RequestHeader::parse(&raw).unwrap();
        let op = h.validate(&LIMITS).unwrap();
        let slots = Arc::new(Semaphore::new(depth));
        let budget = Arc::new(Semaphore::new(1 << 20));
        let payload = match op {
            Op::Write { len, .. } => {
                let mut d = Vec::new();
                read_payload(&mut rd, &mut d, len).await.unwrap();
                Some(d)
            }
            _ => None,
        };
        let mut batch = Batch {
            op,
            pieces: vec![(h.handle, len_of(&op))],
            payload,
            slots: vec![slots.clone().try_acquire_owned().unwrap()],
            bytes: Some(budget.clone().try_acquire_many_owned(len_of(&op)).unwrap()),
        };
        let stats = IoStats::new(crate::io_stats::Frontend::Nbd);
        merge_buffered(
            &mut rd,
            &mut batch,
            &LIMITS,
            merge_limit,
            &budget,
            &slots,
            &stats,
        )
        .await
        .unwrap();
        assert_eq!(stats.merged.load(Relaxed) as usize, batch.pieces.len() - 1);
        assert_eq!(batch.slots.len(), batch.pieces.len());
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.unwrap();
        (batch, rest)
    }

    #[tokio::test]
    async fn contiguous_reads_merge_until_a_gap_or_the_limit() {
        let mut wire = Vec::new();
        for (h, off) in [(1, 0), (2, 4096), (3, 8192), (4, 20480)] {
            wire.extend(header(cmd::READ, h, off, 4096));
        }
        let (b, rest) = first_batch(&wire, 1 << 20, 8).await;
        assert_eq!(
            b.op,
            Op::Read {
                offset: 0,
                len: 12288
            }
        );
        assert_eq!(b.pieces, [(1, 4096), (2, 4096), (3, 4096)]);
        // The non-contiguous request is left for the main loop, intact.
        assert_eq!(rest, header(cmd::READ, 4, 20480, 4096));
        // The merge limit and the queue depth bound a batch.
        let (b, _) = first_batch(&wire, 8192, 8).await;
        assert_eq!(b.pieces.len(), 2);
        let (b, _) = first_batch(&wire, 1 << 20, 1).await;
        assert_eq!(b.pieces.len(), 1);
        let (b, _) = first_batch(&wire, 0, 8).await;
        assert_eq!(b.pieces.len(), 1);
    }

    #[tokio::test]
    async fn contiguous_writes_merge_with_their_payloads_and_fua() {
        let mut wire = header(cmd::WRITE, 1, 100, 3);
        wire.extend_from_slice(b"abc");
        let mut h = header(cmd::WRITE, 2, 103, 2);
        h[5] = 1; // FUA
        wire.extend(h);
        wire.extend_from_slice(b"de");
        // A READ after them is not merged into writes.
        wire.extend(header(cmd::READ, 3, 105, 1));
        let (b, rest) = first_batch(&wire, 1 << 20, 8).await;
        assert_eq!(
            b.op,
            Op::Write {
                offset: 100,
                len: 5,
                fua: true
            }
        );
        assert_eq!(b.payload.as_deref(), Some(&b"abcde"[..]));
        assert_eq!(b.pieces, [(1, 3), (2, 2)]);
        assert_eq!(rest, header(cmd::READ, 3, 105, 1));
        // Invalid or garbage requests are never merged: they are the main loop's to refuse.
        let mut wire = header(cmd::READ, 1, 0, 4096);
        wire.extend(header(cmd::READ, 2, 4096, 2 << 20));
        assert_eq!(first_batch(&wire, 1 << 20, 8).await.0.pieces.len(), 1);
        let mut wire = header(cmd::READ, 1, 0, 4096);
        wire.extend_from_slice(&[0xff; 28]);
        assert_eq!(first_batch(&wire, 1 << 20, 8).await.0.pieces.len(), 1);
    }
}
