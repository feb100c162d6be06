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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use super::handshake::Export;
use super::proto::{self, Limits, Op, RequestHeader, errno};
use super::{Shared, Stats, stopped};

/// Largest piece of explicit zeros written for WRITE_ZEROES with NO_HOLE.
const ZERO_CHUNK: usize = 1 << 20;
/// Attempts when the segment's request or buffer pool is momentarily exhausted.
const POOL_RETRIES: u32 = 200;

/// One reply for the writer: a header and, for a successful READ, the data.
struct Reply {
    handle: u64,
    error: u32,
    data: Option<Vec<u8>>,
    /// Held until the reply is written, so that READ data counts against the budget while it
    /// sits in memory.
    _bytes: Option<OwnedSemaphorePermit>,
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
    stats: Arc<Stats>,
    /// Writes completed since the last successful FLUSH started: flushed at the end.
    dirty: AtomicBool,
}

/// Runs the transmission phase until the session ends; never panics on client input.
pub(super) async fn run<S>(
    stream: S,
    export: Export,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
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
            Stats::bump(&conn.stats.protocol_errors, 1);
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
                Stats::bump(&conn.stats.refused, 1);
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
                    let mut data = vec![0u8; len as usize];
                    if let Err(e) = rd.read_exact(&mut data).await {
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
        let conn = conn.clone();
        let tx = tx.clone();
        let handle = header.handle;
        tokio::spawn(async move {
            let (error, data) = match execute(&conn, op, payload).await {
                Ok(data) => (0, data),
                Err(e) => {
                    Stats::bump(&conn.stats.failed, 1);
                    tracing::debug!(export = %conn.export.name, ?op, error = %e, "nbd: request failed");
                    (errno_of(&e, &op), None)
                }
            };
            let _ = tx
                .send(Reply {
                    handle,
                    error,
                    data,
                    _bytes: bytes,
                })
                .await;
            drop(slot);
        });
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
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if pool_exhausted(&e) && attempt < POOL_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_micros(50 << attempt.min(10))).await;
            }
            r => return r,
        }
    }
}

async fn flush(conn: &Conn) -> Result<(), ClientError> {
    Stats::bump(&conn.stats.flushes, 1);
    let was = conn.dirty.swap(false, AcqRel);
    let r = retry_pool(|| conn.client.flush(&conn.export.name)).await;
    if r.is_err() && was {
        conn.dirty.store(true, Release);
    }
    r
}

/// Runs one validated request; returns READ data.
async fn execute(
    conn: &Conn,
    op: Op,
    payload: Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, ClientError> {
    let c = &conn.client;
    let vol = conn.export.name.as_str();
    let stats = &conn.stats;
    match op {
        Op::Read { offset, len } => {
            Stats::bump(&stats.reads, 1);
            let mut buf = vec![0u8; len as usize];
            if len > 0 {
                let mut attempt = 0;
                // Not `retry_pool`: the future borrows `buf` mutably.
                loop {
                    match c.read(vol, offset, &mut buf).await {
                        Err(e) if pool_exhausted(&e) && attempt < POOL_RETRIES => {
                            attempt += 1;
                            tokio::time::sleep(Duration::from_micros(50 << attempt.min(10))).await;
                        }
                        r => break r?,
                    }
                }
            }
            Stats::bump(&stats.bytes_read, u64::from(len));
            Ok(Some(buf))
        }
        Op::Write { offset, len, fua } => {
            Stats::bump(&stats.writes, 1);
            let data = payload.unwrap_or_default();
            debug_assert_eq!(data.len(), len as usize);
            if len > 0 {
                retry_pool(|| c.write(vol, offset, &data)).await?;
                conn.dirty.store(true, Release);
            }
            Stats::bump(&stats.bytes_written, u64::from(len));
            if fua {
                flush(conn).await?;
            }
            Ok(None)
        }
        Op::Flush => flush(conn).await.map(|()| None),
        Op::Trim { offset, len, fua } => {
            Stats::bump(&stats.trims, 1);
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
            Stats::bump(&stats.write_zeroes, 1);
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
                if let Some(d) = &r.data {
                    out.write_all(d).await?;
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
