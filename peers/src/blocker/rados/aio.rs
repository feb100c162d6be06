//! librados handles and aio completions as safe Rust: the only place of the RADOS blocker that
//! touches raw pointers.
//!
//! The `ceph` crate has the `extern` declarations but no future type, so an operation here is a
//! completion whose callback wakes the task. Everything librados reads from or writes into
//! during an operation (names, buffers, out-parameters) is owned by the completion's shared
//! state, not borrowed from the caller: if the future is dropped (or leaked) before the OSD
//! answers, librados still writes into live memory, freed only when the callback has run.

use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use ceph::rados::{self, rados_completion_t, rados_ioctx_t, rados_t};

#[link(name = "rados")]
unsafe extern "C" {
    // Exported by librados 16 but not declared by the `ceph` crate 3.2.5.
    fn rados_aio_get_version(c: rados_completion_t) -> u64;
    fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut libc::c_char) -> libc::c_int;
    fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut libc::c_char,
        expire_seconds: u32,
    ) -> libc::c_int;
    // Declared here because the crate's `Struct_rados_pool_stat_t` lacks the four compression
    // fields librados 16 writes: passing it smashes the stack.
    fn rados_ioctx_pool_stat(io: rados_ioctx_t, stats: *mut PoolStat) -> libc::c_int;
}

/// `struct rados_pool_stat_t` as librados 16 defines it.
#[repr(C)]
#[derive(Default)]
struct PoolStat {
    num_bytes: u64,
    num_kb: u64,
    num_objects: u64,
    num_object_clones: u64,
    num_object_copies: u64,
    num_objects_missing_on_primary: u64,
    num_objects_unfound: u64,
    num_objects_degraded: u64,
    num_rd: u64,
    num_rd_kb: u64,
    num_wr: u64,
    num_wr_kb: u64,
    num_user_bytes: u64,
    compressed_bytes_orig: u64,
    compressed_bytes: u64,
    compressed_bytes_alloc: u64,
}

/// Let a full pool answer ENOSPC/EDQUOT instead of parking the write until space appears.
pub(super) const FULL_TRY: i32 = 64;

/// A connected cluster handle. librados handles are thread-safe.
pub(super) struct Cluster(rados_t);

// SAFETY: a connected rados_t may be used from any thread (librados locks internally).
unsafe impl Send for Cluster {}
// SAFETY: as above; every call takes the handle by value and synchronises inside librados.
unsafe impl Sync for Cluster {}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create and every ioctx made from it holds an
        // Arc<Cluster>, so none outlives this shutdown.
        unsafe { rados::rados_shutdown(self.0) }
    }
}

fn cstring(s: &str) -> Result<CString, i32> {
    CString::new(s).map_err(|_| -libc::EINVAL)
}

impl Cluster {
    /// Create, configure (`options` are `rados_conf_set` pairs applied after `conf` is read) and
    /// connect. Negative errno on failure.
    pub(super) fn connect(
        client: &str,
        conf: Option<&str>,
        options: &[(&str, String)],
    ) -> Result<Cluster, i32> {
        let id = cstring(client)?;
        let mut h: rados_t = std::ptr::null_mut();
        // SAFETY: `h` is a valid out-pointer and `id` a NUL-terminated string alive for the call.
        let rc = unsafe { rados::rados_create(&mut h, id.as_ptr()) };
        if rc < 0 {
            return Err(rc);
        }
        let cluster = Cluster(h);
        if let Some(conf) = conf {
            let path = cstring(conf)?;
            // SAFETY: `h` is a created (unconnected) handle and `path` is NUL-terminated.
            let rc = unsafe { rados::rados_conf_read_file(h, path.as_ptr()) };
            if rc < 0 {
                return Err(rc);
            }
        }
        for (k, v) in options {
            let (k, v) = (cstring(k)?, cstring(v)?);
            // SAFETY: as above; librados copies both strings.
            let rc = unsafe { rados::rados_conf_set(h, k.as_ptr(), v.as_ptr()) };
            if rc < 0 {
                return Err(rc);
            }
        }
        // SAFETY: a created, configured handle.
        let rc = unsafe { rados::rados_connect(h) };
        if rc < 0 {
            return Err(rc);
        }
        Ok(cluster)
    }

    pub(super) fn fsid(&self) -> Result<String, i32> {
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for its length; librados NUL-terminates what it writes.
        let rc = unsafe { rados::rados_cluster_fsid(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if rc < 0 {
            return Err(rc);
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    /// This client's address, as `blocklist add` takes it.
    pub(super) fn address(&self) -> Result<String, i32> {
        let mut out: *mut libc::c_char = std::ptr::null_mut();
        // SAFETY: `out` is a valid out-pointer; on success librados stores a malloc'ed string.
        let rc = unsafe { rados_getaddrs(self.0, &mut out) };
        if rc < 0 {
            return Err(rc);
        }
        // SAFETY: librados returned a NUL-terminated string, which we copy and then free.
        let s = unsafe { std::ffi::CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: the string was allocated with malloc by librados and is not used after this.
        unsafe { libc::free(out.cast::<c_void>()) };
        Ok(s)
    }

    /// Fence `address` off every OSD, then wait until this client's own later operations
    /// carry an OSD map that includes the entry, so they are ordered after it.
    pub(super) fn blocklist(&self, address: &str, seconds: u32) -> Result<(), i32> {
        let addr = cstring(address)?;
        // SAFETY: the address string is NUL-terminated and only read by librados.
        let rc = unsafe { rados_blocklist_add(self.0, addr.as_ptr() as *mut _, seconds) };
        if rc < 0 {
            return Err(rc);
        }
        self.wait_for_latest_map()
    }

    /// Fetch the newest OSD map, so later operations see every pool and blocklist entry that
    /// the monitors had committed before this call.
    /// Waits until every watch callback in progress returned (after an unwatch).
    pub(super) fn watch_flush(&self) {
        // SAFETY: a connected cluster handle.
        unsafe { rados::rados_watch_flush(self.0) };
    }

    pub(super) fn wait_for_latest_map(&self) -> Result<(), i32> {
        // SAFETY: a connected handle.
        let rc = unsafe { rados::rados_wait_for_latest_osdmap(self.0) };
        if rc < 0 { Err(rc) } else { Ok(()) }
    }

    /// (total, available) bytes of the whole cluster, as the monitors report them.
    pub(super) fn stat(&self) -> Result<(u64, u64), i32> {
        let mut st = rados::Struct_rados_cluster_stat_t::default();
        // SAFETY: `st` is a valid out-struct of the type librados fills.
        let rc = unsafe { rados::rados_cluster_stat(self.0, &mut st) };
        if rc < 0 {
            return Err(rc);
        }
        Ok((st.kb.saturating_mul(1024), st.kb_avail.saturating_mul(1024)))
    }

    /// Run a monitor command (JSON), returning its output.
    pub(super) fn mon_command(&self, cmd: &str) -> Result<Vec<u8>, i32> {
        let cmd = cstring(cmd)?;
        let cmds = [cmd.as_ptr()];
        let (mut outbuf, mut outlen) = (std::ptr::null_mut(), 0usize);
        let (mut outs, mut outslen) = (std::ptr::null_mut(), 0usize);
        // SAFETY: one valid command string; out-pointers are valid; outputs freed below.
        let rc = unsafe {
            rados::rados_mon_command(
                self.0,
                cmds.as_ptr() as *mut _,
                1,
                std::ptr::null(),
                0,
                &mut outbuf,
                &mut outlen,
                &mut outs,
                &mut outslen,
            )
        };
        let out = if outbuf.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados returned `outlen` readable bytes at `outbuf`.
            unsafe { std::slice::from_raw_parts(outbuf as *const u8, outlen) }.to_vec()
        };
        // SAFETY: both buffers (possibly NULL) were allocated by librados for us to free.
        unsafe {
            rados::rados_buffer_free(outbuf);
            rados::rados_buffer_free(outs);
        }
        if rc < 0 { Err(rc) } else { Ok(out) }
    }
}

/// An I/O context on one pool and namespace; keeps its cluster alive.
pub(super) struct Io {
    pub(super) raw: rados_ioctx_t,
    pub(super) cluster: Arc<Cluster>,
}

// SAFETY: an ioctx is thread-safe for I/O; its namespace is set once, before sharing.
unsafe impl Send for Io {}
// SAFETY: as above.
unsafe impl Sync for Io {}

impl Io {
    pub(super) fn open(cluster: Arc<Cluster>, pool: &str, namespace: &str) -> Result<Io, i32> {
        let pool = cstring(pool)?;
        let ns = cstring(namespace)?;
        let mut raw: rados_ioctx_t = std::ptr::null_mut();
        // SAFETY: connected cluster, NUL-terminated pool name, valid out-pointer.
        let rc = unsafe { rados::rados_ioctx_create(cluster.0, pool.as_ptr(), &mut raw) };
        if rc < 0 {
            return Err(rc);
        }
        // SAFETY: a fresh ioctx not yet shared with anyone.
        unsafe { rados::rados_ioctx_set_namespace(raw, ns.as_ptr()) };
        Ok(Io { raw, cluster })
    }

    /// Stats `oid` synchronously, for its error code only (0, or a negative errno).
    pub(super) fn probe(&self, oid: &str) -> Result<(), i32> {
        let oid = cstring(oid)?;
        let (mut size, mut mtime) = (0u64, 0 as libc::time_t);
        // SAFETY: valid ioctx, NUL-terminated name and out-pointers alive for the call.
        let rc = unsafe { rados::rados_stat(self.raw, oid.as_ptr(), &mut size, &mut mtime) };
        if rc < 0 { Err(rc) } else { Ok(()) }
    }

    /// Bytes the pool holds (all namespaces).
    pub(super) fn pool_used(&self) -> Result<u64, i32> {
        let mut st = PoolStat::default();
        // SAFETY: valid ioctx and an out-struct with librados 16's full layout.
        let rc = unsafe { rados_ioctx_pool_stat(self.raw, &mut st) };
        if rc < 0 { Err(rc) } else { Ok(st.num_bytes) }
    }

    /// Every object name of this namespace (blocking: librados lists synchronously).
    pub(super) fn list(&self) -> Result<Vec<String>, i32> {
        let mut ctx: rados::rados_list_ctx_t = std::ptr::null_mut();
        // SAFETY: valid ioctx and out-pointer; the context is closed below.
        let rc = unsafe { rados::rados_nobjects_list_open(self.raw, &mut ctx) };
        if rc < 0 {
            return Err(rc);
        }
        let mut names = Vec::new();
        let result = loop {
            let mut entry: *const libc::c_char = std::ptr::null();
            // SAFETY: open list context; the entry pointer stays valid until the next call.
            let rc = unsafe {
                rados::rados_nobjects_list_next(
                    ctx,
                    (&raw mut entry).cast::<*mut *const libc::c_char>(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if rc == -libc::ENOENT {
                break Ok(names);
            }
            if rc < 0 {
                break Err(rc);
            }
            // SAFETY: librados returned a NUL-terminated name, copied before the next call.
            let name = unsafe { std::ffi::CStr::from_ptr(entry) };
            names.push(name.to_string_lossy().into_owned());
        };
        // SAFETY: the context was opened above and is not used after this.
        unsafe { rados::rados_nobjects_list_close(ctx) };
        result
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        // SAFETY: the ioctx is ours; waiting for its in-flight aio first means no completion
        // refers to a destroyed context.
        unsafe {
            rados::rados_aio_flush(self.raw);
            rados::rados_ioctx_destroy(self.raw);
        }
    }
}

struct Shared<K> {
    done: bool,
    waker: Option<Waker>,
    keep: Option<K>,
}

fn guard<K>(m: &Mutex<Shared<K>>) -> MutexGuard<'_, Shared<K>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

extern "C" fn on_complete<K>(_c: rados_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the Arc leaked by `submit` for exactly this one callback.
    let shared = unsafe { Arc::from_raw(arg as *const Mutex<Shared<K>>) };
    let mut s = guard(&shared);
    s.done = true;
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

/// What a finished operation returned: librados' return value (negative errno on failure),
/// the object version after the operation, and the memory the operation used.
pub(super) struct Done<K> {
    pub(super) rc: i32,
    pub(super) version: u64,
    pub(super) keep: K,
}

/// One operation in flight.
pub(super) struct Aio<K> {
    c: rados_completion_t,
    shared: Arc<Mutex<Shared<K>>>,
}

// SAFETY: completions may be polled and released from any thread; `K` is Send.
unsafe impl<K: Send> Send for Aio<K> {}

/// Start an operation: `start` gets the completion and the operation's owned memory (whose
/// heap addresses stay put from now until the callback ran) and returns librados' submit code.
pub(super) fn submit<K: Send + 'static>(
    keep: K,
    start: impl FnOnce(rados_completion_t, &mut K) -> i32,
) -> Result<Aio<K>, i32> {
    let shared = Arc::new(Mutex::new(Shared {
        done: false,
        waker: None,
        keep: Some(keep),
    }));
    let arg = Arc::into_raw(shared.clone()) as *mut c_void;
    let mut c: rados_completion_t = std::ptr::null_mut();
    // SAFETY: `arg` stays valid until the callback reclaims it; `c` is a valid out-pointer.
    let rc =
        unsafe { rados::rados_aio_create_completion(arg, Some(on_complete::<K>), None, &mut c) };
    if rc < 0 {
        // SAFETY: no callback will run, so the leaked reference is ours to reclaim.
        drop(unsafe { Arc::from_raw(arg as *const Mutex<Shared<K>>) });
        return Err(rc);
    }
    let rc = {
        let mut s = guard(&shared);
        let keep = s.keep.as_mut().expect("set above");
        start(c, keep)
    };
    if rc < 0 {
        // SAFETY: submission failed, so the callback never runs: reclaim its reference and
        // release the unused completion.
        unsafe {
            drop(Arc::from_raw(arg as *const Mutex<Shared<K>>));
            rados::rados_aio_release(c);
        }
        return Err(rc);
    }
    Ok(Aio { c, shared })
}

impl<K> std::future::Future for Aio<K> {
    type Output = Done<K>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done<K>> {
        let mut s = guard(&self.shared);
        if !s.done {
            s.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        // SAFETY: the completion is complete (its callback ran) and not yet released.
        let (rc, version) = unsafe {
            (
                rados::rados_aio_get_return_value(self.c),
                rados_aio_get_version(self.c),
            )
        };
        let keep = s.keep.take().expect("polled after completion");
        Poll::Ready(Done { rc, version, keep })
    }
}

impl<K> Drop for Aio<K> {
    fn drop(&mut self) {
        // SAFETY: releasing is allowed while the operation is still in flight: librados keeps
        // its own reference until it completes, and the memory it uses is in `shared`.
        unsafe { rados::rados_aio_release(self.c) }
    }
}

/// A compound write operation being built; released when dropped (after submission is fine:
/// librados moved the steps into the submitted operation).
pub(super) struct WriteOp(pub(super) rados::rados_write_op_t);

impl WriteOp {
    pub(super) fn new() -> WriteOp {
        // SAFETY: allocation only.
        WriteOp(unsafe { rados::rados_create_write_op() })
    }
}

impl Drop for WriteOp {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_write_op and not used after this.
        unsafe { rados::rados_release_write_op(self.0) }
    }
}

/// A compound read operation being built; released when dropped.
pub(super) struct ReadOp(pub(super) rados::rados_read_op_t);

impl ReadOp {
    pub(super) fn new() -> ReadOp {
        // SAFETY: allocation only.
        ReadOp(unsafe { rados::rados_create_read_op() })
    }
}

impl Drop for ReadOp {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_read_op and not used after this.
        unsafe { rados::rados_release_read_op(self.0) }
    }
}
