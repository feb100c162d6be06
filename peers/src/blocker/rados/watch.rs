//! Operations on a volume in use, across machines: RADOS watch/notify to the lock holder.
//!
//! Why: a snapshot, resize, clone of a live volume or group snapshot of a volume that another
//! node holds must be done by that node's peer set, whose vlmc drains the volume's I/O around
//! it (crash consistency) and whose mapper holds the lock. On one host the controller finds
//! the holder's segment in the host-local [registry](crate::registry); shared memory does not
//! reach another machine. The cluster does: as librbd reaches its exclusive-lock owner, the
//! holder watches an object and the caller notifies it, and the answer comes back in the
//! notify's ack payload.
//!
//! Why one watched object per node (`archip.node.<node id>`, in the objects namespace) and not
//! one per volume lock: a lock names its holder already, so the caller knows whom to ask; a
//! per-node watch lives exactly as long as the peer set, needs no hook in every lock and
//! unlock, and a peer set that holds no volume answers with the mapper's own refusal. The
//! object sits outside every prefix GC or the catalogue lists.
//!
//! Why the holder acknowledges from a thread of its own: librados calls the watch callback on
//! its own finisher thread, which must not wait for a snapshot (the drain can take as long as
//! in-flight I/O). The callback only queues the request; a worker performs it through the
//! peer set's vlmc and then sends `rados_notify_ack` with the reply.
//!
//! Why a dead holder is an error and not a retry: a notify no one acknowledges within its
//! timeout means the holder's process is gone or frozen, and its lock must be broken (which
//! blocklists it) before anyone else may write the volume: [`ForwardError::Unanswered`] says
//! so and names the node to fence (`peers::fence::fence_node`).
//!
//! Requests and replies are small JSON documents. A request is untrusted input (anyone who may
//! write the pool may notify): it is size-limited, parsed strictly (unknown fields refused),
//! checked for name lengths and member counts, and then goes through the same vlmc/mapper
//! validation as any local client's call.

use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ceph::rados;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::aio::{Io, WriteOp};
use super::{RadosBlocker, blocking, fail};
use crate::blocker::BlockerError;
use crate::client::{ClientError, VolumeClient};
pub use crate::forward::ForwardOp;
use crate::registry::check_owner;

/// Largest request accepted from a notifier (a full group snapshot fits several times over).
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a caller waits for the holder's answer unless told otherwise. Long enough for a
/// drain under load; a holder that does not answer within it is treated as lost.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);
const WIRE_VERSION: u32 = 1;

/// The object a node's peer set watches.
pub fn node_object(node: &str) -> String {
    format!("archip.node.{node}")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    v: u32,
    op: ForwardOp,
}

/// The holder's answer, in the notify ack payload.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Reply {
    v: u32,
    /// The node that performed (or refused) the request.
    node: String,
    #[serde(default)]
    size: u64,
    /// The class of a failure (see [`error_kind`]), absent on success.
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    message: String,
    #[serde(default)]
    holder: Option<String>,
}

fn error_kind(e: &ClientError) -> (&'static str, Option<String>) {
    match e {
        ClientError::NotFound(_) => ("not_found", None),
        ClientError::AlreadyExists(_) => ("exists", None),
        ClientError::InvalidArgument(_) => ("invalid", None),
        ClientError::Locked { holder, .. } => ("locked", Some(holder.clone())),
        ClientError::OutOfRange(_) => ("range", None),
        ClientError::NoSpace(_) => ("no_space", None),
        ClientError::ReadOnly(_) => ("read_only", None),
        ClientError::Fenced(_) => ("fenced", None),
        ClientError::PeerGone(_) => ("peer_gone", None),
        ClientError::Timeout(_) => ("timeout", None),
        ClientError::Io(_) | ClientError::Transport(_) => ("io", None),
    }
}

fn client_error(kind: &str, message: String, holder: Option<String>) -> ClientError {
    match kind {
        "not_found" => ClientError::NotFound(message),
        "exists" => ClientError::AlreadyExists(message),
        "invalid" => ClientError::InvalidArgument(message),
        "locked" => ClientError::Locked {
            holder: holder.unwrap_or_default(),
            message,
        },
        "range" => ClientError::OutOfRange(message),
        "no_space" => ClientError::NoSpace(message),
        "read_only" => ClientError::ReadOnly(message),
        "fenced" => ClientError::Fenced(message),
        "peer_gone" => ClientError::PeerGone(message),
        _ => ClientError::Io(message),
    }
}

/// Why an operation could not be done by the holder.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The holder performed the request and it failed there.
    #[error("node {node} refused the forwarded operation: {source}")]
    Refused {
        node: String,
        #[source]
        source: ClientError,
    },
    /// No peer set of `node` answered in time: it is dead, frozen or cut off. Its lock must
    /// be broken (`peers::fence::fence_node`, which blocklists it) before the volume can be
    /// used elsewhere.
    #[error(
        "node {node} holds the volume but no peer set of it answered within {timeout:?} ({detail}); \
         if the node is lost, fence it (fence_node / `archip lock break`) and retry"
    )]
    Unanswered {
        node: String,
        timeout: Duration,
        detail: String,
    },
    /// The request itself is not valid; nothing was sent.
    #[error("invalid forwarded operation: {0}")]
    Invalid(String),
    /// The answer could not be understood.
    #[error("node {node} answered with a malformed reply: {detail}")]
    BadReply { node: String, detail: String },
    /// The cluster refused the notify.
    #[error(transparent)]
    Rados(#[from] BlockerError),
    /// The local attempt failed for another reason than a lock held elsewhere.
    #[error(transparent)]
    Local(ClientError),
}

/// Checks and decodes a notify payload.
pub fn decode_request(data: &[u8]) -> Result<ForwardOp, String> {
    if data.len() > MAX_REQUEST {
        return Err(format!(
            "a request of {} bytes (at most {MAX_REQUEST})",
            data.len()
        ));
    }
    let r: Request = serde_json::from_slice(data).map_err(|e| format!("malformed request: {e}"))?;
    if r.v != WIRE_VERSION {
        return Err(format!(
            "request version {} (this node speaks {WIRE_VERSION})",
            r.v
        ));
    }
    r.op.validate()?;
    Ok(r.op)
}

/// The acks of a notify as librados returns them: `u32 n, n * (u64 gid, u64 cookie, u32 len,
/// len bytes)`, then `u32 m, m * (u64 gid, u64 cookie)` for the watchers that timed out.
fn parse_acks(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    struct R<'a>(&'a [u8]);
    impl R<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if self.0.len() < n {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
    }
    let mut r = R(buf);
    let n = r.u32()? as usize;
    let mut acks = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        r.take(16)?;
        let len = r.u32()? as usize;
        acks.push(r.take(len)?.to_vec());
    }
    let missed = r.u32().unwrap_or(0) as usize;
    Some((acks, missed))
}

/// The caller's side: sends operations to a holder's peer set.
pub struct Notifier {
    io: Io,
    timeout: Duration,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier on the objects namespace `blocker` uses (one librados client for both).
    pub fn new(blocker: &RadosBlocker) -> Result<Notifier, BlockerError> {
        let io = Io::open(
            blocker.io.cluster.clone(),
            &blocker.pool,
            &blocker.namespace,
        )
        .map_err(|rc| fail(format_args!("rados pool {}", blocker.pool), rc))?;
        Ok(Notifier {
            io,
            timeout: DEFAULT_NOTIFY_TIMEOUT,
        })
    }

    /// How long to wait for the holder's answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Notifier {
        self.timeout = timeout;
        self
    }

    /// Asks the peer set of `node` to perform `op`, and returns what it reports (the size of
    /// what it made or changed).
    pub async fn forward(&self, node: &str, op: &ForwardOp) -> Result<u64, ForwardError> {
        op.validate().map_err(ForwardError::Invalid)?;
        check_owner(node).map_err(|e| ForwardError::Invalid(e.to_string()))?;
        let payload = serde_json::to_vec(&Request {
            v: WIRE_VERSION,
            op: op.clone(),
        })
        .map_err(|e| ForwardError::Invalid(e.to_string()))?;
        let object = node_object(node);
        let oid = CString::new(object.clone()).expect("checked owners contain no NUL");
        let timeout_ms = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let io = self.io.raw;
        let (rc, reply) = blocking(|| {
            let mut buf: *mut libc::c_char = std::ptr::null_mut();
            let mut len: libc::size_t = 0;
            // SAFETY: a valid ioctx, NUL-terminated name, payload valid for the call, and
            // out-pointers that librados fills with a buffer we free below.
            let rc = unsafe {
                rados::rados_notify2(
                    io,
                    oid.as_ptr(),
                    payload.as_ptr().cast(),
                    payload.len() as libc::c_int,
                    timeout_ms,
                    &mut buf,
                    &mut len,
                )
            };
            let reply = if buf.is_null() {
                Vec::new()
            } else {
                // SAFETY: librados allocated `len` bytes at `buf`; they are copied, then freed
                // once, with the function librados documents for it.
                unsafe {
                    let v = std::slice::from_raw_parts(buf.cast::<u8>(), len).to_vec();
                    rados::rados_buffer_free(buf);
                    v
                }
            };
            (rc, reply)
        });
        let unanswered = |detail: String| ForwardError::Unanswered {
            node: node.to_owned(),
            timeout: self.timeout,
            detail,
        };
        if rc < 0 && rc != -libc::ETIMEDOUT {
            // ENOENT: the object is gone (the node never ran here, or its peer set stopped).
            if rc == -libc::ENOENT {
                return Err(unanswered(format!(
                    "no object {object}: no peer set of it runs"
                )));
            }
            return Err(fail(&object, rc).into());
        }
        let (acks, missed) = parse_acks(&reply).unwrap_or_default();
        // A restarted node may leave its old watch behind until the OSD times it out: any
        // watcher's well-formed reply from the named node answers.
        let mut bad = None;
        for ack in acks.iter().filter(|a| !a.is_empty()) {
            match serde_json::from_slice::<Reply>(ack) {
                Ok(r) if r.v == WIRE_VERSION && r.node == node => {
                    return match r.error {
                        None => Ok(r.size),
                        Some(kind) => Err(ForwardError::Refused {
                            node: node.to_owned(),
                            source: client_error(&kind, r.message, r.holder),
                        }),
                    };
                }
                Ok(r) => bad = Some(format!("a reply of version {} from node {:?}", r.v, r.node)),
                Err(e) => bad = Some(e.to_string()),
            }
        }
        if let Some(detail) = bad {
            return Err(ForwardError::BadReply {
                node: node.to_owned(),
                detail,
            });
        }
        Err(unanswered(if rc == -libc::ETIMEDOUT || missed > 0 {
            format!("{missed} watcher(s) did not acknowledge")
        } else {
            "no peer set of it watches its object".to_owned()
        }))
    }

    /// Runs `op` through this node's own peer set (`local`); if another node holds the volume,
    /// forwards it to that node. What the CSI controller and the CLI call on RADOS.
    pub async fn on_holder(
        &self,
        local: &VolumeClient,
        op: &ForwardOp,
    ) -> Result<u64, ForwardError> {
        op.validate().map_err(ForwardError::Invalid)?;
        if let ForwardOp::GroupSnapshot { members } = op {
            // A local attempt could cut the free members before the mapper refuses a held
            // one: pick the peer set from the locks first, as the CSI controller does.
            let mut holders = std::collections::BTreeSet::new();
            for (v, _) in members {
                match local.lock_info(v).await {
                    Ok(l) => holders.extend(l.holder),
                    Err(ClientError::NotFound(_)) => {}
                    Err(e) => return Err(ForwardError::Local(e)),
                }
            }
            let mut holders = holders.into_iter();
            match (holders.next(), holders.next()) {
                (None, _) => {}
                // Possibly this very node: its own watch answers then, through the same vlmc.
                (Some(h), None) => return self.forward(&h, op).await,
                (Some(h1), Some(h2)) => {
                    return Err(ForwardError::Invalid(format!(
                        "the members are held by different nodes ({h1}, {h2}, ...); a group is \
                         cut under one barrier by one node"
                    )));
                }
            }
        }
        match op.perform(local).await {
            Ok(size) => Ok(size),
            Err(ClientError::Locked { holder, .. }) if !holder.is_empty() => {
                tracing::info!(volumes = ?op.volumes(), holder = %holder, "forwarding to the lock holder over RADOS notify");
                self.forward(&holder, op).await
            }
            Err(e) => Err(ForwardError::Local(e)),
        }
    }
}

/// What the watch callback hands the worker.
enum Event {
    Notify {
        id: u64,
        cookie: u64,
        data: Vec<u8>,
    },
    /// The watch `cookie` broke (connection reset, timeout): watch again.
    Lost {
        cookie: u64,
        err: i32,
    },
    /// The peer set stops.
    Stop,
}

/// The callback's state, alive (boxed, at a fixed address) as long as the watch.
struct Ctx {
    tx: mpsc::UnboundedSender<Event>,
}

extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    _notifier: u64,
    data: *mut c_void,
    len: libc::size_t,
) {
    // SAFETY: `arg` is the `Ctx` registered with this watch, freed only after unwatch and
    // watch_flush, which wait for running callbacks.
    let ctx = unsafe { &*(arg as *const Ctx) };
    let bytes = if data.is_null() || len == 0 {
        Vec::new()
    } else if len > MAX_REQUEST {
        // Refused by the worker by its size; not copied.
        vec![0; MAX_REQUEST + 1]
    } else {
        // SAFETY: librados passes `len` readable bytes at `data` for the callback's duration.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len).to_vec() }
    };
    let _ = ctx.tx.send(Event::Notify {
        id: notify_id,
        cookie: handle,
        data: bytes,
    });
}

extern "C" fn on_error(arg: *mut c_void, cookie: u64, err: libc::c_int) {
    // SAFETY: as in `on_notify`.
    let ctx = unsafe { &*(arg as *const Ctx) };
    let _ = ctx.tx.send(Event::Lost { cookie, err });
}

/// A watch registration: the cookie and the ioctx it was made on.
struct Handle {
    io: Arc<Io>,
    cookie: u64,
}

fn watch(io: &Io, oid: &CString, ctx: *mut Ctx) -> Result<u64, i32> {
    // A watch on a missing object fails with ENOENT: create it (idempotently, empty).
    let op = WriteOp::new();
    // SAFETY: a fresh write op, then run once on a valid ioctx and name; the op is freed by
    // `WriteOp`'s drop after the synchronous call returns.
    let rc = unsafe {
        rados::rados_write_op_create(op.0, 0, std::ptr::null());
        rados::rados_write_op_operate(op.0, io.raw, oid.as_ptr(), std::ptr::null_mut(), 0)
    };
    if rc < 0 {
        return Err(rc);
    }
    let mut cookie = 0u64;
    // SAFETY: valid ioctx and name; `ctx` outlives the watch (see `Ctx`); callbacks match the
    // signatures librados calls.
    let rc = unsafe {
        rados::rados_watch2(
            io.raw,
            oid.as_ptr(),
            &mut cookie,
            Some(on_notify),
            Some(on_error),
            ctx.cast(),
        )
    };
    if rc < 0 { Err(rc) } else { Ok(cookie) }
}

/// The holder's side: while alive, the peer set answers operations other nodes notify it.
pub struct NodeWatch {
    node: String,
    stop: Option<mpsc::UnboundedSender<Event>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWatch")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeWatch {
    /// Watches `node`'s object on `blocker`'s cluster (same librados client, so a node whose
    /// lock is broken, and which is blocklisted, loses its watch too) and performs what is
    /// notified through the vlmc of `segment`.
    pub fn start(
        blocker: &RadosBlocker,
        node: &str,
        segment: PathBuf,
    ) -> Result<NodeWatch, BlockerError> {
        check_owner(node).map_err(|e| {
            BlockerError::io(
                node,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            )
        })?;
        let object = node_object(node);
        let io = Arc::new(
            Io::open(
                blocker.io.cluster.clone(),
                &blocker.pool,
                &blocker.namespace,
            )
            .map_err(|rc| fail(format_args!("rados pool {}", blocker.pool), rc))?,
        );
        let oid = CString::new(object.clone()).expect("checked owners contain no NUL");
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Box::into_raw(Box::new(Ctx { tx: tx.clone() }));
        let cookie = match blocking(|| watch(&io, &oid, ctx)) {
            Ok(c) => c,
            Err(rc) => {
                // SAFETY: no watch was registered with `ctx`; it is ours again.
                drop(unsafe { Box::from_raw(ctx) });
                return Err(fail(&object, rc));
            }
        };
        let handle = Handle { io, cookie };
        let node_name = node.to_owned();
        let ctx_addr = ctx as usize;
        let worker = std::thread::Builder::new()
            .name("rados-watch".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "watch worker: no runtime");
                        return;
                    }
                };
                rt.block_on(serve(
                    node_name,
                    segment,
                    oid,
                    handle,
                    ctx_addr as *mut Ctx,
                    rx,
                ));
            })
            .map_err(|e| BlockerError::io(&object, e))?;
        tracing::info!(
            node,
            object,
            "watching for operations forwarded by other nodes"
        );
        Ok(NodeWatch {
            node: node.to_owned(),
            stop: Some(tx),
            worker: Some(worker),
        })
    }
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        // Closing every sender (ours; the callback's goes with the unwatch) ends the worker.
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(Event::Stop);
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

async fn serve(
    node: String,
    segment: PathBuf,
    oid: CString,
    mut handle: Handle,
    ctx: *mut Ctx,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut client: Option<VolumeClient> = None;
    let mut stopping = false;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Stop => break,
            // An error of a watch already replaced.
            Event::Lost { cookie, .. } if cookie != handle.cookie => {}
            Event::Lost { err, .. } => {
                tracing::warn!(node, errno = -err, "watch lost; watching again");
                // SAFETY: our cookie on our ioctx.
                unsafe { rados::rados_unwatch2(handle.io.raw, handle.cookie) };
                loop {
                    match watch(&handle.io, &oid, ctx) {
                        Ok(c) => {
                            handle.cookie = c;
                            break;
                        }
                        // Blocklisted: this client will never watch again; the node is fenced,
                        // and callers get the "fence it" error, which is already true.
                        Err(rc) if rc == -libc::ESHUTDOWN => {
                            tracing::error!(
                                node,
                                "blocklisted: no longer answering forwarded operations"
                            );
                            break;
                        }
                        Err(rc) => {
                            tracing::warn!(node, errno = -rc, "watching again failed; retrying");
                            // Waits for the next try, but not past a stop.
                            if let Ok(None | Some(Event::Stop)) =
                                tokio::time::timeout(Duration::from_secs(1), rx.recv()).await
                            {
                                stopping = true;
                                break;
                            }
                        }
                    }
                }
                if stopping {
                    break;
                }
            }
            Event::Notify { id, cookie, data } => {
                let reply = answer(&node, &segment, &mut client, &data).await;
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                // SAFETY: our ioctx and name; the notify's id and cookie as librados gave them;
                // the body is valid for the call.
                let rc = unsafe {
                    rados::rados_notify_ack(
                        handle.io.raw,
                        oid.as_ptr(),
                        id,
                        cookie,
                        body.as_ptr().cast(),
                        body.len() as libc::c_int,
                    )
                };
                if rc < 0 {
                    tracing::warn!(node, errno = -rc, "acknowledging a forwarded operation");
                }
            }
        }
    }
    // SAFETY: our cookie on our ioctx; after unwatch, watch_flush waits for callbacks in
    // progress, so nothing uses `ctx` when it is freed.
    unsafe {
        rados::rados_unwatch2(handle.io.raw, handle.cookie);
        handle.io.cluster.watch_flush();
        drop(Box::from_raw(ctx));
    }
}

async fn answer(
    node: &str,
    segment: &std::path::Path,
    client: &mut Option<VolumeClient>,
    data: &[u8],
) -> Reply {
    let mut reply = Reply {
        v: WIRE_VERSION,
        node: node.to_owned(),
        size: 0,
        error: None,
        message: String::new(),
        holder: None,
    };
    let op = match decode_request(data) {
        Ok(op) => op,
        Err(why) => {
            tracing::warn!(node, why, "refused a forwarded request");
            reply.error = Some("invalid".into());
            reply.message = why;
            return reply;
        }
    };
    if client.is_none() {
        match xseg::Segment::attach(segment)
            .map_err(ClientError::from)
            .and_then(|s| VolumeClient::connect(&s))
        {
            Ok(c) => *client = Some(c),
            Err(e) => {
                reply.error = Some("peer_gone".into());
                reply.message = format!("this node's peer set cannot be reached: {e}");
                return reply;
            }
        }
    }
    let c = client.as_ref().expect("connected above");
    tracing::info!(node, op = ?op, "performing an operation forwarded by another node");
    match op.perform(c).await {
        Ok(size) => reply.size = size,
        Err(e) => {
            let (kind, holder) = error_kind(&e);
            if matches!(e, ClientError::PeerGone(_) | ClientError::Transport(_)) {
                *client = None;
            }
            reply.error = Some(kind.into());
            reply.message = e.to_string();
            reply.holder = holder;
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::MAX_NAME;

    #[test]
    fn requests_are_checked() {
        let ok = br#"{"v":1,"op":{"op":"snapshot","volume":"a","snapshot":"b"}}"#;
        assert_eq!(
            decode_request(ok).unwrap(),
            ForwardOp::Snapshot {
                volume: "a".into(),
                snapshot: "b".into()
            }
        );
        for bad in [
            &br#"{"v":2,"op":{"op":"snapshot","volume":"a","snapshot":"b"}}"#[..],
            br#"{"v":1,"op":{"op":"format","volume":"a"}}"#,
            br#"{"v":1,"op":{"op":"snapshot","volume":"a","snapshot":"b","x":1}}"#,
            br#"{"v":1,"op":{"op":"snapshot","volume":"","snapshot":"b"}}"#,
            br#"{"v":1,"op":{"op":"resize","volume":"a","size":0}}"#,
            br#"{"v":1,"op":{"op":"group_snapshot","members":[]}}"#,
            br#"{"v":1,"op":{"op":"group_snapshot","members":[["a","s"],["a","t"]]}}"#,
            b"\xff",
        ] {
            assert!(
                decode_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(
            r#"{{"v":1,"op":{{"op":"snapshot","volume":"{}","snapshot":"b"}}}}"#,
            "x".repeat(MAX_NAME + 1)
        );
        assert!(decode_request(long.as_bytes()).is_err());
        assert!(decode_request(&vec![b' '; MAX_REQUEST + 1]).is_err());
    }

    #[test]
    fn acks_parse() {
        let mut b = Vec::new();
        b.extend(2u32.to_le_bytes());
        for p in [&b"hi"[..], b""] {
            b.extend([0u8; 16]);
            b.extend((p.len() as u32).to_le_bytes());
            b.extend(p);
        }
        b.extend(1u32.to_le_bytes());
        b.extend([0u8; 16]);
        assert_eq!(parse_acks(&b), Some((vec![b"hi".to_vec(), vec![]], 1)));
        assert_eq!(parse_acks(&b[..10]), None);
    }

    #[test]
    fn errors_round_trip() {
        let e = ClientError::Locked {
            holder: "n1".into(),
            message: "m".into(),
        };
        let (k, h) = error_kind(&e);
        assert!(
            matches!(client_error(k, "m".into(), h), ClientError::Locked { holder, .. } if holder == "n1")
        );
    }
}
