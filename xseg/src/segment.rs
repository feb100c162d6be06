//! The segment: a shared-memory file mapped by every peer on a node, and typed access to its
//! ports, rings, requests and buffers. Recovering the ports of dead peers is `recovery.rs`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::*};

use memmap2::MmapRaw;

use crate::error::{Error, Result};
use crate::layout::*;
use crate::owner::{ProcessId, euid, pid_alive, trusted_owner, user_name};
use crate::protocol::Status;
use crate::ring::Ring;

/// Permission bits of a new segment unless the caller asks for others: owner only.
pub const DEFAULT_MODE: u32 = 0o600;

/// `owner` of a free request: matches no port.
const NO_OWNER: u64 = u64::MAX;

/// Which of a port's two rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingKind {
    Requests = 0,
    Replies = 1,
}

/// A mapped segment. Cheap to share (`Arc`); unmapped when the last user drops it.
pub struct Segment {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    layout: Layout,
    me: ProcessId,
}

// SAFETY: the mapping is shared memory accessed only through atomics or through buffers whose
// exclusive use the request protocol hands to one holder at a time.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

/// Resolves a segment name: a bare name lives under /dev/shm, anything with a '/' is a path.
pub fn segment_path(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.len() > 200 || name.contains('\0') || name == "." || name == ".." {
        return Err(Error::BadConfig(format!("bad segment name {name:?}")));
    }
    if name.contains('/') {
        Ok(PathBuf::from(name))
    } else {
        Ok(Path::new("/dev/shm").join(name))
    }
}

impl Segment {
    /// Creates a new segment file readable and writable by its owner only; fails if it exists.
    pub fn create(path: &Path, config: &Config) -> Result<Arc<Segment>> {
        Self::create_with_mode(path, config, DEFAULT_MODE)
    }

    /// Creates a new segment file with permission bits `mode` (exactly, whatever the umask):
    /// widen it (0o660) only for deployments that run peers as several users of one group,
    /// since whoever can open the segment reads every I/O buffer and can inject requests.
    pub fn create_with_mode(path: &Path, config: &Config, mode: u32) -> Result<Arc<Segment>> {
        if mode & !0o777 != 0 || mode & 0o600 != 0o600 {
            return Err(Error::BadConfig(format!(
                "segment mode {mode:o}: expected permission bits that include 0600"
            )));
        }
        let layout = Layout::new(config)?;
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            return Err(Error::Exists {
                path: path.to_owned(),
            });
        }
        // Build the segment under a private name and link it into place only once its header
        // is written, so an attacher racing the creator never sees a half-made segment.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".creating.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        // Exclusive and without following links: a file or link planted under the private
        // name must make creation fail, never be written through.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        let made = (|| -> std::io::Result<Segment> {
            // The umask narrowed `mode` at open; a mode asked for explicitly is set as asked.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.set_len(layout.size)?;
            let map = MmapRaw::map_raw(&file)?;
            let seg = Segment {
                path: path.to_owned(),
                file,
                map,
                layout,
                me: ProcessId::current(),
            };
            seg.initialize();
            std::fs::hard_link(&tmp, path)?;
            Ok(seg)
        })();
        let _ = std::fs::remove_file(&tmp);
        match made {
            Ok(seg) => Ok(Arc::new(seg)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::Exists {
                path: path.to_owned(),
            }),
            Err(e) => Err(io(e)),
        }
    }

    /// Attaches to an existing segment, refusing one of another layout or of another user.
    ///
    /// The default segment name is well known, so a local user could create it before the
    /// peers start and then read every buffer and inject writes: a segment whose file belongs
    /// to neither this user nor root is refused (checked on the opened file, so it cannot be
    /// swapped between the check and the mapping).
    pub fn attach(path: &Path) -> Result<Arc<Segment>> {
        let io = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !trusted_owner(meta.uid()) {
            return Err(Error::ForeignOwner {
                path: path.to_owned(),
                owner: user_name(meta.uid()),
                me: user_name(euid()),
            });
        }
        let len = meta.len();
        if len < PAGE {
            return Err(Error::BadMagic {
                path: path.to_owned(),
            });
        }
        let map = MmapRaw::map_raw(&file).map_err(io)?;
        Self::check_and_wrap(path, map, len, file)
    }

    /// Attaches if the segment exists, else creates it (racing creators end up attached).
    pub fn open_or_create(path: &Path, config: &Config) -> Result<Arc<Segment>> {
        Self::open_or_create_with_mode(path, config, DEFAULT_MODE)
    }

    /// [`Segment::open_or_create`], creating with permission bits `mode` (see
    /// [`Segment::create_with_mode`]). An existing segment keeps its mode.
    pub fn open_or_create_with_mode(
        path: &Path,
        config: &Config,
        mode: u32,
    ) -> Result<Arc<Segment>> {
        match Self::attach(path) {
            Ok(s) => Ok(s),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                match Self::create_with_mode(path, config, mode) {
                    Err(Error::Exists { .. }) => Self::attach(path),
                    other => other,
                }
            }
            Err(e) => Err(e),
        }
    }

    fn check_and_wrap(path: &Path, map: MmapRaw, len: u64, file: File) -> Result<Arc<Segment>> {
        // SAFETY: the mapping is at least one page long and page-aligned; Header fits in it.
        let h = unsafe { &*map.as_ptr().cast::<Header>() };
        if h.magic.load(Acquire) != MAGIC {
            return Err(Error::BadMagic {
                path: path.to_owned(),
            });
        }
        if h.version != LAYOUT_VERSION {
            return Err(Error::LayoutVersion {
                path: path.to_owned(),
                found: h.version,
                expected: LAYOUT_VERSION,
            });
        }
        let bad = |what: String| Error::BadHeader {
            path: path.to_owned(),
            what,
        };
        let nc = h.nr_classes as usize;
        if nc == 0 || nc > MAX_CLASSES {
            return Err(bad(format!("{nc} buffer classes")));
        }
        let config = Config {
            nr_ports: h.nr_ports,
            dynamic_start: h.dynamic_start,
            nr_requests: h.nr_requests,
            buffer_classes: (0..nc)
                .map(|i| (h.class_size[i], h.class_count[i]))
                .collect(),
        };
        let layout = Layout::new(&config).map_err(|e| bad(e.to_string()))?;
        if h.segment_size != layout.size || len < layout.size {
            return Err(bad(format!(
                "size {} (file {len}) but layout needs {}",
                h.segment_size, layout.size
            )));
        }
        if h.port_size as usize != size_of::<PortShm>()
            || h.request_size as usize != size_of::<RequestShm>()
        {
            return Err(bad("structure sizes differ".into()));
        }
        Ok(Arc::new(Segment {
            path: path.to_owned(),
            file,
            map,
            layout,
            me: ProcessId::current(),
        }))
    }

    fn initialize(&self) {
        let l = &self.layout;
        for p in 0..l.config.nr_ports {
            let port = self.port(p);
            port.owner.store(0, Relaxed);
            port.generation.store(1, Relaxed);
            self.ring(p, RingKind::Requests).init();
            self.ring(p, RingKind::Replies).init();
        }
        // The file is fresh (zero-filled), so requests are FREE and buffers unowned already;
        // only the owner field needs a value that names no port.
        for r in 0..l.config.nr_requests {
            self.req(r).owner.store(NO_OWNER, Relaxed);
            self.req(r).holder.store(u32::MAX, Relaxed);
        }
        let base = self.map.as_mut_ptr();
        // SAFETY: the header lies at the start of the mapping, which nobody else uses yet
        // because the magic is written last.
        let h = unsafe { &mut *base.cast::<Header>() };
        h.version = LAYOUT_VERSION;
        h.header_size = size_of::<Header>() as u32;
        h.segment_size = l.size;
        h.nr_ports = l.config.nr_ports;
        h.dynamic_start = l.config.dynamic_start;
        h.nr_requests = l.config.nr_requests;
        h.nr_classes = l.config.buffer_classes.len() as u32;
        for (i, &(size, count)) in l.config.buffer_classes.iter().enumerate() {
            h.class_size[i] = size;
            h.class_count[i] = count;
        }
        h.port_size = size_of::<PortShm>() as u32;
        h.request_size = size_of::<RequestShm>() as u32;
        h.creator_pid = self.me.pid;
        h.magic.store(MAGIC, Release);
    }

    /// Removes the segment file unless a live peer still has a port bound.
    pub fn destroy(path: &Path) -> Result<()> {
        let seg = Self::attach(path)?;
        let live = seg.live_ports();
        if !live.is_empty() {
            return Err(Error::InUse { ports: live });
        }
        std::fs::remove_file(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Ports whose owner process is alive.
    pub fn live_ports(&self) -> Vec<u32> {
        (0..self.layout.config.nr_ports)
            .filter(|&p| {
                let w = self.port(p).owner.load(Acquire);
                match w & 0xffff_ffff {
                    PORT_BOUND => ProcessId {
                        pid: (w >> 32) as u32,
                        start: self.port(p).owner_start.load(Acquire),
                    }
                    .is_alive(),
                    PORT_BINDING => pid_alive((w >> 32) as u32),
                    _ => false,
                }
            })
            .collect()
    }

    /// A second mapping of the same segment with the already-validated layout. Each port gets
    /// its own, so the reference counts of request handles are not one cache line bounced
    /// between every thread of the process.
    pub(crate) fn remap(&self) -> Result<Arc<Segment>> {
        let map = MmapRaw::map_raw(&self.file).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        if (map.len() as u64) < self.layout.size {
            return Err(Error::BadHeader {
                path: self.path.clone(),
                what: "segment file shrank".into(),
            });
        }
        Ok(Arc::new(Segment {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?,
            map,
            layout: self.layout.clone(),
            me: self.me,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn config(&self) -> &Config {
        &self.layout.config
    }
    pub(crate) fn me(&self) -> ProcessId {
        self.me
    }

    pub(crate) fn port(&self, p: u32) -> &PortShm {
        assert!(p < self.layout.config.nr_ports, "port index unchecked");
        let off = self.layout.ports_off + u64::from(p) * size_of::<PortShm>() as u64;
        // SAFETY: p is in range, so the PortShm lies inside the mapping, aligned by layout.
        unsafe { &*self.map.as_ptr().add(off as usize).cast::<PortShm>() }
    }

    pub(crate) fn ring(&self, p: u32, kind: RingKind) -> Ring {
        assert!(p < self.layout.config.nr_ports, "port index unchecked");
        let idx = u64::from(p) * 2 + kind as u64;
        let off = self.layout.rings_off + idx * self.layout.ring_size;
        // SAFETY: the ring region for a valid port lies inside the mapping and is 128-aligned;
        // the Segment (and so the mapping) outlives every Ring through the owning Arc.
        unsafe {
            Ring::from_raw(
                self.map.as_mut_ptr().add(off as usize),
                self.layout.ring_capacity,
            )
        }
    }

    pub(crate) fn req(&self, r: u32) -> &RequestShm {
        assert!(
            r < self.layout.config.nr_requests,
            "request index unchecked"
        );
        let off = self.layout.requests_off + u64::from(r) * size_of::<RequestShm>() as u64;
        // SAFETY: r is in range, so the slot lies inside the mapping.
        unsafe { &*self.map.as_ptr().add(off as usize).cast::<RequestShm>() }
    }

    pub(crate) fn buffer_owner(&self, b: u32) -> &AtomicU32 {
        assert!(b < self.layout.total_buffers, "buffer index unchecked");
        let off = self.layout.owners_off + u64::from(b) * 4;
        // SAFETY: b is in range of the owner array inside the mapping.
        unsafe { &*self.map.as_ptr().add(off as usize).cast::<AtomicU32>() }
    }

    /// Start and capacity of buffer `b`.
    pub(crate) fn buffer(&self, b: u32) -> (*mut u8, u64) {
        assert!(b < self.layout.total_buffers, "buffer index unchecked");
        for c in &self.layout.classes {
            if b < c.first + c.count {
                let off = c.offset + u64::from(b - c.first) * c.size;
                // SAFETY: the class region lies inside the mapping.
                return (unsafe { self.map.as_mut_ptr().add(off as usize) }, c.size);
            }
        }
        unreachable!("buffer index checked above")
    }

    pub(crate) fn valid_port(&self, p: u32) -> bool {
        p < self.layout.config.nr_ports
    }

    /// Wakes the owner of port `p` if it sleeps. Free when it does not.
    pub(crate) fn wake(&self, p: u32) {
        let port = self.port(p);
        std::sync::atomic::fence(SeqCst);
        if port.sleeping.load(Relaxed) != 0 && port.sleeping.swap(0, SeqCst) != 0 {
            crate::futex::wake(&port.sleeping, u32::MAX);
        }
    }

    /// Frees a request and its buffer.
    pub(crate) fn free_request(&self, r: u32) {
        let q = self.req(r);
        let b = q.buffer.swap(0, AcqRel);
        if b != 0 && b - 1 < self.layout.total_buffers {
            let _ = self
                .buffer_owner(b - 1)
                .compare_exchange(r + 1, 0, AcqRel, Relaxed);
        }
        q.path_len.store(0, Relaxed);
        q.data_len.store(0, Relaxed);
        // A reaper that reads `owner` between a new allocation's state change and its owner
        // store must not see the previous owner (a dead port) and free the new request.
        q.owner.store(NO_OWNER, Relaxed);
        q.holder.store(u32::MAX, Relaxed);
        q.state.store(REQ_FREE, Release);
    }

    /// Sends request `r` back along its return path. Requests whose sender is gone are freed.
    pub(crate) fn respond_raw(&self, r: u32) {
        let q = self.req(r);
        loop {
            let len = q.path_len.load(Acquire) as usize;
            if len == 0 || len > MAX_HOPS {
                self.free_request(r);
                return;
            }
            let hop = q.path[len - 1].load(Acquire);
            q.path_len.store(len as u32 - 1, Release);
            let (port, epoch) = (hop as u32, (hop >> 32) as u32);
            if !self.valid_port(port) {
                self.free_request(r);
                return;
            }
            let p = self.port(port);
            let bound = p.owner.load(Acquire) & 0xffff_ffff == PORT_BOUND;
            if !bound || p.generation.load(Acquire) != epoch {
                if q.owner.load(Acquire) == hop {
                    // The sender itself is gone: nobody will ever read this reply.
                    self.free_request(r);
                    return;
                }
                // An intermediate hop died: carry the error further back.
                q.result.store(Status::PeerGone.code(), Relaxed);
                continue;
            }
            q.holder.store(port, Relaxed);
            q.state.store(REQ_REPLIED, Release);
            if self.ring(port, RingKind::Replies).push(r).is_err() {
                self.free_request(r);
                return;
            }
            self.wake(port);
            return;
        }
    }

    /// Counters of one port, readable by any attached process.
    pub fn port_stats(&self, p: u32) -> Result<crate::stats::PortStats> {
        if !self.valid_port(p) {
            return Err(Error::NoSuchPort(p));
        }
        Ok(crate::stats::PortStats::read(p, self.port(p)))
    }

    /// Requests currently not free (in use by some peer).
    pub fn requests_in_use(&self) -> u32 {
        (0..self.layout.config.nr_requests)
            .filter(|&r| self.req(r).state.load(Relaxed) != REQ_FREE)
            .count() as u32
    }

    /// Buffers currently owned.
    pub fn buffers_in_use(&self) -> u32 {
        (0..self.layout.total_buffers)
            .filter(|&b| self.buffer_owner(b).load(Relaxed) != 0)
            .count() as u32
    }

    /// Raw bytes of the mapping, for fault-injection tests that scribble over it.
    #[doc(hidden)]
    pub fn raw(&self) -> (*mut u8, usize) {
        (self.map.as_mut_ptr(), self.map.len())
    }
}

pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
