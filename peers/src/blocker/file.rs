//! The file blocker: one file per object in one flat directory.
//!
//! - Data objects are plain sparse files, written in place with pwrite; `flush` fsyncs the
//!   files written since the last flush and then the directory (or `syncfs` when too many are
//!   dirty to track).
//! - Descriptors of data objects are cached per process, and several processes (blocker,
//!   mapper) open the same directory, each with its own cache. A descriptor cached here stays
//!   attached to its inode when another process unlinks the file, and a file re-created under
//!   the name is a different inode this process never sees. Hence `truncate` empties an object
//!   in place (same inode: every process's descriptor sees it), and `delete` is meant for
//!   names that are never written again (GC); `copy` likewise never unlinks its destination.
//!   Descriptors of files unlinked elsewhere are dropped by a periodic sweep, so they do not
//!   pin the space GC freed.
//! - Map objects are replaced whole: write a temporary file, fsync it, rename it over the old
//!   one, fsync the directory. A reader therefore sees one complete version or the other. The
//!   version lives in a small prefix of the file. The compare-and-swap runs under an `flock`,
//!   which the kernel drops if the process dies, so a crash never leaves a stuck lock.
//! - Lock objects are small files (owner + generation) replaced the same way, under their own
//!   `flock`. A fenced map write holds the lock object's `flock` shared while it checks the
//!   generation and renames, so a lock break cannot slip in between the check and the write.
//! - `copy` clones the file (FICLONE: btrfs, XFS with reflink) and otherwise falls back to
//!   `std::io::copy`, which uses copy_file_range on Linux: data stays in the kernel.
//!
//! Blocking syscalls run on the calling thread; inside a multi-threaded tokio runtime they are
//! wrapped in `block_in_place` so that other tasks move to another worker meanwhile.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::flock::{self, LockMode};

use super::{
    BackendId, Blocker, BlockerError, BlockerFuture, Capacity, Expect, Fence, LockInfo, LockOwner,
    ObjectInfo, ObjectName, Versioned, check_fence, check_range, name_problem,
};

/// Open descriptors kept for data objects; opening a file per I/O would triple the syscalls.
const FD_CACHE_LIMIT: usize = 1024;
/// How often the descriptor cache drops descriptors of files that another process (the
/// mapper's GC) unlinked: an open descriptor keeps the inode, and so its space, allocated. An
/// fstat of each cached descriptor every few seconds costs next to nothing; doing it on every
/// I/O would cost a syscall each.
const FD_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Written objects remembered for the next flush; past this, flush syncs the whole filesystem.
const DIRTY_LIMIT: usize = 4096;
/// Number of `flock` files per kind; unrelated objects may share one, which only serialises
/// their (short) atomic replacements.
const FLOCK_SHARDS: u64 = 64;

/// Temporaries older than this are leftovers of a crash between write and rename; no atomic
/// replacement takes anywhere near this long.
const STALE_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

const MAP_MAGIC: &[u8; 8] = b"ARCHMV01";
const MAP_PREFIX: usize = 16;
const LOCK_MAGIC: &[u8; 8] = b"ARCHLK01";

/// What the next flush must make durable, and what no flush can any longer promise.
///
/// After a failed fsync Linux may have dropped the dirty pages and cleared the error, so a
/// retried fsync can succeed although the data is gone (PostgreSQL's "fsyncgate"). A failed
/// object is therefore latched: every later flush fails until the object is emptied
/// (truncate) or deleted, which makes its contents known again, or the process restarts.
#[derive(Default)]
struct Dirty {
    names: HashSet<ObjectName>,
    overflow: bool,
    /// Objects whose fsync failed, with the error, reported by every later flush.
    failed: HashMap<ObjectName, String>,
    /// A failed `syncfs`: any object may have lost data; latched until restart.
    fs_failed: Option<String>,
}

/// The per-process descriptor cache of data objects.
struct FdCache {
    files: crate::FastMap<ObjectName, Arc<File>>,
    swept: Instant,
}

/// A directory of objects.
pub struct FileBlocker {
    root: PathBuf,
    dir: File,
    identity: BackendId,
    fds: Mutex<FdCache>,
    dirty: Mutex<Dirty>,
    tmp_counter: AtomicU64,
    /// Whether buffered `RWF_NOWAIT` writes may work here; cleared at the first EOPNOTSUPP.
    nowait_writes: std::sync::atomic::AtomicBool,
    /// Objects whose next `sync_data` fails with EIO: fault injection for tests.
    #[cfg(test)]
    fail_sync: Mutex<HashSet<ObjectName>>,
}

impl std::fmt::Debug for FileBlocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBlocker")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (single insert/remove operations).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run blocking syscalls without starving the other tasks of a multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn is_not_found(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

fn shard(name: &ObjectName) -> u64 {
    u64::from(crc32c::crc32c(name.as_str().as_bytes())) % FLOCK_SHARDS
}

/// The identity of an object directory: device and inode, which survive different mount paths
/// of one filesystem (a bind mount in another container), where the path would not.
fn identity_of(dir: &fs::Metadata) -> BackendId {
    BackendId::new("file", format_args!("dev={},ino={}", dir.dev(), dir.ino()))
}

/// The [`BackendId`] a [`FileBlocker`] opened on `dir` would report, without opening (or
/// creating) it: for a process that compares backends but stores nothing there itself.
pub fn dir_identity(dir: &Path) -> io::Result<BackendId> {
    fs::metadata(dir).map(|m| identity_of(&m))
}

/// Size and free space of the filesystem holding `dir`. Available is what an unprivileged
/// writer may still use (`f_bavail`), the figure that decides whether a volume fits.
fn fs_capacity(dir: &File) -> io::Result<Capacity> {
    let st = crate::fs_stats::of_file(dir)?;
    Ok(Capacity {
        total: st.total_bytes(),
        available: st.available_bytes(),
    })
}

/// Held for as long as the descriptor is open; closing it (or dying) releases the flock.
struct Flock(#[allow(dead_code)] File);

impl FileBlocker {
    /// Use (creating if needed) `root` as the object directory.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, BlockerError> {
        let root = root.as_ref().to_path_buf();
        let shown = root.display().to_string();
        crate::private::create_dir_all(&root).map_err(|e| BlockerError::io(&shown, e))?;
        let dir = File::open(&root).map_err(|e| BlockerError::io(&shown, e))?;
        let identity = dir
            .metadata()
            .map(|m| identity_of(&m))
            .map_err(|e| BlockerError::io(&shown, e))?;
        let blocker = FileBlocker {
            root,
            dir,
            identity,
            fds: Mutex::new(FdCache {
                files: crate::FastMap::default(),
                swept: Instant::now(),
            }),
            // Writes of an earlier process on this directory (a blocker that crashed or was
            // restarted) may still be only in the page cache, and no list of them survived:
            // the first flush syncs the whole filesystem.
            dirty: Mutex::new(Dirty {
                overflow: true,
                ..Dirty::default()
            }),
            tmp_counter: AtomicU64::new(0),
            nowait_writes: std::sync::atomic::AtomicBool::new(true),
            #[cfg(test)]
            fail_sync: Mutex::new(HashSet::new()),
        };
        blocker.remove_stale_temporaries(STALE_TMP_AGE)?;
        Ok(blocker)
    }

    /// Remove temporaries that a crashed process left between writing and renaming. Young
    /// ones are left alone: another process may be about to rename them.
    fn remove_stale_temporaries(&self, age: std::time::Duration) -> Result<usize, BlockerError> {
        let shown = self.root.display().to_string();
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&self.root).map_err(|e| BlockerError::io(&shown, e))? {
            let entry = entry.map_err(|e| BlockerError::io(&shown, e))?;
            if !entry.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| now.duration_since(t).unwrap_or_default() >= age)
                .unwrap_or(false);
            if old && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(dir = %shown, removed, "removed stale temporaries");
        }
        Ok(removed)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, name: &ObjectName) -> PathBuf {
        self.root.join(name.as_str())
    }

    fn sync_dir(&self) -> Result<(), BlockerError> {
        self.dir
            .sync_all()
            .map_err(|e| BlockerError::io(self.root.display(), e))
    }

    /// The cached descriptor of a data object, opening (and with `create`, creating) it.
    /// Opening happens under the cache mutex so that a concurrent delete cannot leave a
    /// descriptor of an unlinked file in the cache.
    fn file(&self, name: &ObjectName, create: bool) -> Result<Option<Arc<File>>, BlockerError> {
        let mut cache = lock(&self.fds);
        if cache.swept.elapsed() >= FD_SWEEP_INTERVAL {
            Self::sweep(&mut cache);
        }
        let fds = &mut cache.files;
        if let Some(f) = fds.get(name) {
            return Ok(Some(f.clone()));
        }
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(crate::private::FILE_MODE)
            .open(self.path(name));
        let file = match opened {
            Ok(f) => Arc::new(f),
            Err(e) if !create && is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BlockerError::io(name, e)),
        };
        if fds.len() >= FD_CACHE_LIMIT
            && let Some(victim) = fds.keys().next().cloned()
        {
            fds.remove(&victim);
        }
        fds.insert(name.clone(), file.clone());
        Ok(Some(file))
    }

    /// Drop cached descriptors of files that are no longer linked (deleted by another
    /// process), so that their space is freed. Names are not reused after a delete, so such a
    /// descriptor is never needed again; if one were, the next I/O simply reopens the path.
    fn sweep(cache: &mut FdCache) {
        use std::os::unix::fs::MetadataExt;
        let before = cache.files.len();
        cache
            .files
            .retain(|_, f| f.metadata().is_ok_and(|m| m.nlink() > 0));
        cache.swept = Instant::now();
        let dropped = before - cache.files.len();
        if dropped > 0 {
            tracing::debug!(dropped, "dropped descriptors of objects deleted elsewhere");
        }
    }

    fn mark_dirty(&self, name: &ObjectName) {
        let mut dirty = lock(&self.dirty);
        if dirty.names.len() >= DIRTY_LIMIT {
            dirty.overflow = true;
        } else {
            dirty.names.insert(name.clone());
        }
    }

    fn read_sync(
        &self,
        name: &ObjectName,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BlockerError> {
        check_range(name, offset, buf.len())?;
        let Some(file) = self.file(name, false)? else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BlockerError::io(name, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    /// `read_sync` without waiting: only through a cached descriptor, and only while every
    /// byte comes from the page cache (`preadv2` with `RWF_NOWAIT` fails with EAGAIN rather
    /// than wait for the disk). `None` when it would have to wait.
    fn read_nowait(
        &self,
        name: &ObjectName,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<(), BlockerError>> {
        if let Err(e) = check_range(name, offset, buf.len()) {
            return Some(Err(e));
        }
        let file = lock(&self.fds).files.get(name).cloned()?;
        let mut done = 0;
        while done < buf.len() {
            match nowait(
                &file,
                NowaitOp::Read(&mut buf[done..]),
                offset + done as u64,
            ) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if would_wait(&e) => return None,
                Err(e) => return Some(Err(BlockerError::io(name, e))),
            }
        }
        buf[done..].fill(0);
        Some(Ok(()))
    }

    /// `write_sync` without waiting, where the filesystem takes `RWF_NOWAIT` buffered writes
    /// (XFS and btrfs do; ext4 refuses them, and is then not asked again).
    fn write_nowait(
        &self,
        name: &ObjectName,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<(), BlockerError>> {
        if !self.nowait_writes.load(Ordering::Relaxed) {
            return None;
        }
        if let Err(e) = check_range(name, offset, data.len()) {
            return Some(Err(e));
        }
        let file = lock(&self.fds).files.get(name).cloned()?;
        let mut done = 0;
        while done < data.len() {
            match nowait(&file, NowaitOp::Write(&data[done..]), offset + done as u64) {
                Ok(0) => return None,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_writes.store(false, Ordering::Relaxed);
                    return None;
                }
                Err(e) if would_wait(&e) => return None,
                Err(e) => return Some(Err(BlockerError::io(name, e))),
            }
        }
        self.mark_dirty(name);
        Some(Ok(()))
    }

    fn write_sync(&self, name: &ObjectName, offset: u64, data: &[u8]) -> Result<(), BlockerError> {
        check_range(name, offset, data.len())?;
        let file = self.file(name, true)?.expect("create=true always opens");
        file.write_all_at(data, offset)
            .map_err(|e| BlockerError::io(name, e))?;
        self.mark_dirty(name);
        Ok(())
    }

    /// fsync of one data object's contents; the single place a test can make it fail.
    fn sync_data(&self, name: &ObjectName, file: &File) -> io::Result<()> {
        let _ = name;
        #[cfg(test)]
        if lock(&self.fail_sync).remove(name) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.sync_data()
    }

    fn flush_sync(&self) -> Result<(), BlockerError> {
        let (names, overflow) = {
            let mut d = lock(&self.dirty);
            (
                std::mem::take(&mut d.names),
                std::mem::take(&mut d.overflow),
            )
        };
        if overflow {
            // SAFETY: `self.dir` is an open descriptor for the whole call; syncfs reads no
            // memory of ours.
            let rc = unsafe { libc::syncfs(self.dir.as_raw_fd()) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                let mut d = lock(&self.dirty);
                d.fs_failed = Some(e.to_string());
                d.names.extend(names);
                return Err(BlockerError::io(self.root.display(), e));
            }
        } else {
            let mut pending = names.iter();
            while let Some(name) = pending.next() {
                let synced = match self.file(name, false) {
                    Ok(Some(file)) => self.sync_data(name, &file),
                    Ok(None) => Ok(()),
                    Err(e) => {
                        // Not synced, not known lost: keep it and the rest for the next flush.
                        let mut d = lock(&self.dirty);
                        d.names.insert(name.clone());
                        d.names.extend(pending.cloned());
                        return Err(e);
                    }
                };
                if let Err(e) = synced {
                    let mut d = lock(&self.dirty);
                    d.failed.insert(name.clone(), e.to_string());
                    d.names.extend(pending.cloned());
                    return Err(BlockerError::io(name, e));
                }
            }
            if !names.is_empty()
                && let Err(e) = self.sync_dir()
            {
                // New files are only durable once their directory entry is: retry them all.
                lock(&self.dirty).names.extend(names);
                return Err(e);
            }
        }
        let d = lock(&self.dirty);
        if let Some(e) = &d.fs_failed {
            return Err(BlockerError::io(
                self.root.display(),
                io::Error::other(format!("an earlier syncfs failed ({e}); data may be lost")),
            ));
        }
        if let Some((name, e)) = d.failed.iter().next() {
            return Err(BlockerError::io(
                name,
                io::Error::other(format!("an earlier fsync failed ({e}); data may be lost")),
            ));
        }
        Ok(())
    }

    fn delete_sync(&self, name: &ObjectName) -> Result<bool, BlockerError> {
        let removed = {
            let mut fds = lock(&self.fds);
            fds.files.remove(name);
            match fs::remove_file(self.path(name)) {
                Ok(()) => true,
                Err(e) if is_not_found(&e) => false,
                Err(e) => return Err(BlockerError::io(name, e)),
            }
        };
        {
            let mut d = lock(&self.dirty);
            d.names.remove(name);
            // Gone: nothing of it is left to lose.
            d.failed.remove(name);
        }
        if removed {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// Empty an object in place. Truncating keeps the inode, so the descriptors that other
    /// processes cached stay attached to the live object: unlinking instead would leave them
    /// writing into a deleted file once the name is written again.
    fn truncate_sync(&self, name: &ObjectName) -> Result<bool, BlockerError> {
        let file = match OpenOptions::new().write(true).open(self.path(name)) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(BlockerError::io(name, e)),
        };
        file.set_len(0).map_err(|e| BlockerError::io(name, e))?;
        // Durable now, like a delete: the mapper persists map entries relying on it, and a
        // truncation undone by a crash would bring discarded data back.
        file.sync_all().map_err(|e| BlockerError::io(name, e))?;
        // Empty and durable: whatever an earlier failed fsync lost no longer matters.
        lock(&self.dirty).failed.remove(name);
        Ok(true)
    }

    fn copy_sync(&self, src: &ObjectName, dst: &ObjectName) -> Result<(), BlockerError> {
        // Under the descriptor-cache mutex, like open and delete, so that the destination's
        // identity cannot change under a cached descriptor.
        let fds = lock(&self.fds);
        let mut from = match File::open(self.path(src)) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => {
                drop(fds);
                // Emptied in place rather than deleted: `dst` is about to be written.
                self.truncate_sync(dst)?;
                return Ok(());
            }
            Err(e) => return Err(BlockerError::io(src, e)),
        };
        // Truncating in place keeps the inode, so cached descriptors of `dst` stay valid.
        let mut to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(crate::private::FILE_MODE)
            .open(self.path(dst))
            .map_err(|e| BlockerError::io(dst, e))?;
        drop(fds);
        // SAFETY: both descriptors are open for the duration of the call and FICLONE takes the
        // source descriptor by value; no memory of ours is read or written.
        let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(
                    libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS,
                ) => {
                    // No reflink here: std::io::copy between files uses copy_file_range.
                    io::copy(&mut from, &mut to).map_err(|e| BlockerError::io(dst, e))?;
                }
                _ => return Err(BlockerError::io(dst, err)),
            }
        }
        to.sync_all().map_err(|e| BlockerError::io(dst, e))?;
        self.sync_dir()
    }

    fn info_sync(&self, name: &ObjectName) -> Result<Option<ObjectInfo>, BlockerError> {
        match fs::metadata(self.path(name)) {
            Ok(m) => Ok(Some(ObjectInfo {
                name: name.clone(),
                size: m.len(),
                modified: m.modified().unwrap_or(UNIX_EPOCH),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(BlockerError::io(name, e)),
        }
    }

    fn list_sync(&self, prefix: &str) -> Result<Vec<ObjectInfo>, BlockerError> {
        let shown = self.root.display().to_string();
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| BlockerError::io(&shown, e))? {
            let entry = entry.map_err(|e| BlockerError::io(&shown, e))?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // Temporaries, flock files and anything else that is not a valid object name are
            // the blocker's own business.
            if !file_name.starts_with(prefix) || name_problem(&file_name).is_some() {
                continue;
            }
            let name = ObjectName::new(file_name).expect("checked above");
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(BlockerError::io(&name, e)),
            };
            out.push(ObjectInfo {
                name,
                size: meta.len(),
                modified: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn flock(&self, kind: &str, name: &ObjectName, exclusive: bool) -> Result<Flock, BlockerError> {
        let path = self.root.join(format!("{kind}-{:02}.lock", shard(name)));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(crate::private::FILE_MODE)
            .open(&path)
            .map_err(|e| BlockerError::io(name, e))?;
        let mode = if exclusive {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        };
        flock::lock(&file, mode).map_err(|e| BlockerError::io(name, e))?;
        Ok(Flock(file))
    }

    /// Write `bytes` to `name` atomically: temporary file, fsync, rename, directory fsync.
    fn replace(&self, name: &ObjectName, bytes: &[u8]) -> Result<(), BlockerError> {
        self.replace_unsynced(name, bytes)?;
        self.sync_dir()
    }

    /// [`Self::replace`] without the directory fsync: the new name is durable only after the
    /// caller's next `sync_dir`.
    fn replace_unsynced(&self, name: &ObjectName, bytes: &[u8]) -> Result<(), BlockerError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(format!("{name}.{}.{n}.tmp", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(crate::private::FILE_MODE)
                .open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, self.path(name))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(BlockerError::io(name, e));
        }
        Ok(())
    }

    fn map_version(&self, name: &ObjectName) -> Result<Option<u64>, BlockerError> {
        let mut f = match File::open(self.path(name)) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BlockerError::io(name, e)),
        };
        let mut prefix = [0u8; MAP_PREFIX];
        f.read_exact(&mut prefix)
            .map_err(|e| corrupt_or_io(name, e, "shorter than the map prefix"))?;
        parse_map_prefix(name, &prefix).map(Some)
    }

    fn read_map_sync(&self, name: &ObjectName) -> Result<Option<Versioned>, BlockerError> {
        let bytes = match fs::read(self.path(name)) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(BlockerError::io(name, e)),
        };
        if bytes.len() < MAP_PREFIX {
            return Err(corrupt(name, "shorter than the map prefix"));
        }
        let version = parse_map_prefix(name, &bytes[..MAP_PREFIX])?;
        Ok(Some(Versioned {
            data: bytes[MAP_PREFIX..].to_vec(),
            version,
        }))
    }

    /// Check the preconditions of a map write or delete; the returned guards must be held
    /// until the change is in place.
    fn map_precondition(
        &self,
        name: &ObjectName,
        expect: Expect,
        fence: Option<&Fence>,
    ) -> Result<(Vec<Flock>, Option<u64>), BlockerError> {
        let mut guards = vec![self.flock("map", name, true)?];
        if let Some(fence) = fence {
            guards.push(self.flock("lck", &fence.lock, false)?);
            check_fence(fence, &self.read_lock(&fence.lock)?)?;
        }
        let found = self.map_version(name)?;
        if !expect.admits(found) {
            return Err(BlockerError::VersionMismatch {
                object: name.to_string(),
                expected: expect,
                found,
            });
        }
        Ok((guards, found))
    }

    fn write_map_sync(
        &self,
        name: &ObjectName,
        data: &[u8],
        expect: Expect,
        fence: Option<&Fence>,
    ) -> Result<u64, BlockerError> {
        let (_guards, found) = self.map_precondition(name, expect, fence)?;
        let version = self.write_map_file(name, data, found)?;
        self.sync_dir()?;
        Ok(version)
    }

    /// Map objects nobody refers to yet, written by a few threads at once (their file fsyncs
    /// overlap, and the filesystem commits them together), then one directory fsync for all.
    fn create_maps_sync(
        &self,
        objects: &[(ObjectName, Vec<u8>)],
    ) -> Result<Vec<u64>, BlockerError> {
        const THREADS: usize = 8;
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let per = objects.len().div_ceil(THREADS);
        let results: Vec<Result<Vec<u64>, BlockerError>> = std::thread::scope(|scope| {
            let workers: Vec<_> = objects
                .chunks(per)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|(name, data)| {
                                let (_guards, found) =
                                    self.map_precondition(name, Expect::Absent, None)?;
                                self.write_map_file(name, data, found)
                            })
                            .collect()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        Err(BlockerError::io(
                            self.root.display(),
                            io::Error::other("map writer thread panicked"),
                        ))
                    })
                })
                .collect()
        });
        let mut versions = Vec::with_capacity(objects.len());
        for r in results {
            versions.extend(r?);
        }
        self.sync_dir()?;
        Ok(versions)
    }

    /// The new version of a map object (one greater than `found`, at least the clock) and its
    /// file, replaced atomically; the caller holds the object's map lock and syncs the directory.
    fn write_map_file(
        &self,
        name: &ObjectName,
        data: &[u8],
        found: Option<u64>,
    ) -> Result<u64, BlockerError> {
        // Versions come from the clock (never below the old version plus one), so a map that
        // is deleted and created again does not repeat the versions of its predecessor.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let version = now.max(found.unwrap_or(0) + 1);
        let mut bytes = Vec::with_capacity(MAP_PREFIX + data.len());
        bytes.extend_from_slice(MAP_MAGIC);
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(data);
        self.replace_unsynced(name, &bytes)?;
        Ok(version)
    }

    fn delete_map_sync(
        &self,
        name: &ObjectName,
        expect: Expect,
        fence: Option<&Fence>,
    ) -> Result<(), BlockerError> {
        let (_guards, found) = self.map_precondition(name, expect, fence)?;
        if found.is_some() {
            fs::remove_file(self.path(name)).map_err(|e| BlockerError::io(name, e))?;
            self.sync_dir()?;
        }
        Ok(())
    }

    fn read_lock(&self, name: &ObjectName) -> Result<LockInfo, BlockerError> {
        let bytes = match fs::read(self.path(name)) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => {
                return Ok(LockInfo {
                    holder: None,
                    generation: 0,
                });
            }
            Err(e) => return Err(BlockerError::io(name, e)),
        };
        decode_lock(name, &bytes)
    }

    fn write_lock(&self, name: &ObjectName, info: &LockInfo) -> Result<(), BlockerError> {
        self.replace(name, &encode_lock(info))
    }

    fn lock_acquire_sync(
        &self,
        name: &ObjectName,
        owner: &LockOwner,
    ) -> Result<Fence, BlockerError> {
        let _g = self.flock("lck", name, true)?;
        let mut info = self.read_lock(name)?;
        match &info.holder {
            Some(h) if h == owner => {}
            Some(h) => {
                return Err(BlockerError::Locked {
                    lock: name.to_string(),
                    holder: h.to_string(),
                });
            }
            None => {
                info.generation += 1;
                info.holder = Some(owner.clone());
                self.write_lock(name, &info)?;
            }
        }
        Ok(Fence {
            lock: name.clone(),
            owner: owner.clone(),
            generation: info.generation,
        })
    }

    fn lock_release_sync(&self, fence: &Fence) -> Result<(), BlockerError> {
        let _g = self.flock("lck", &fence.lock, true)?;
        let mut info = self.read_lock(&fence.lock)?;
        if info.holder.is_none() {
            return Ok(());
        }
        check_fence(fence, &info)?;
        info.holder = None;
        self.write_lock(&fence.lock, &info)
    }

    fn lock_break_sync(&self, name: &ObjectName) -> Result<LockInfo, BlockerError> {
        let _g = self.flock("lck", name, true)?;
        let before = self.read_lock(name)?;
        if before.holder.is_some() {
            self.write_lock(
                name,
                &LockInfo {
                    holder: None,
                    generation: before.generation,
                },
            )?;
        }
        Ok(before)
    }
}

fn corrupt(name: &ObjectName, reason: &str) -> BlockerError {
    BlockerError::Corrupt {
        object: name.to_string(),
        reason: reason.to_string(),
    }
}

fn corrupt_or_io(name: &ObjectName, e: io::Error, reason: &str) -> BlockerError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt(name, reason)
    } else {
        BlockerError::io(name, e)
    }
}

fn parse_map_prefix(name: &ObjectName, prefix: &[u8]) -> Result<u64, BlockerError> {
    if &prefix[..8] != MAP_MAGIC {
        return Err(corrupt(name, "not a map object (bad magic)"));
    }
    Ok(u64::from_le_bytes(
        prefix[8..16].try_into().expect("8 bytes"),
    ))
}

pub(crate) fn encode_lock(info: &LockInfo) -> Vec<u8> {
    let holder = info.holder.as_ref().map(|h| h.as_str()).unwrap_or("");
    let mut out = Vec::with_capacity(22 + holder.len());
    out.extend_from_slice(LOCK_MAGIC);
    out.extend_from_slice(&info.generation.to_le_bytes());
    out.extend_from_slice(&(holder.len() as u16).to_le_bytes());
    out.extend_from_slice(holder.as_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_lock(name: &ObjectName, bytes: &[u8]) -> Result<LockInfo, BlockerError> {
    if bytes.len() < 22 || &bytes[..8] != LOCK_MAGIC {
        return Err(corrupt(name, "not a lock object"));
    }
    let body = &bytes[..bytes.len() - 4];
    let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(corrupt(name, "lock object checksum mismatch"));
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let len = u16::from_le_bytes(bytes[16..18].try_into().expect("2 bytes")) as usize;
    if 18 + len != body.len() {
        return Err(corrupt(name, "lock object length mismatch"));
    }
    let holder = if len == 0 {
        None
    } else {
        let s = std::str::from_utf8(&bytes[18..18 + len])
            .map_err(|_| corrupt(name, "lock holder is not UTF-8"))?;
        Some(LockOwner::new(s).map_err(|_| corrupt(name, "lock holder is invalid"))?)
    };
    Ok(LockInfo { holder, generation })
}

fn run<'a, T: Send + 'a>(
    f: impl FnOnce() -> Result<T, BlockerError> + Send + 'a,
) -> BlockerFuture<'a, T> {
    Box::pin(async move { blocking(f) })
}

impl Blocker for FileBlocker {
    fn read<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BlockerFuture<'a, ()> {
        run(move || self.read_sync(object, offset, buf))
    }

    fn write<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        data: &'a [u8],
    ) -> BlockerFuture<'a, ()> {
        run(move || self.write_sync(object, offset, data))
    }

    fn read_now(
        &self,
        object: &ObjectName,
        offset: u64,
        buf: &mut [u8],
    ) -> Option<Result<(), BlockerError>> {
        self.read_nowait(object, offset, buf)
    }

    fn write_now(
        &self,
        object: &ObjectName,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<(), BlockerError>> {
        self.write_nowait(object, offset, data)
    }

    fn flush(&self) -> BlockerFuture<'_, ()> {
        run(move || self.flush_sync())
    }

    fn delete<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        run(move || self.delete_sync(object))
    }

    fn truncate<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool> {
        run(move || self.truncate_sync(object))
    }

    fn copy<'a>(&'a self, src: &'a ObjectName, dst: &'a ObjectName) -> BlockerFuture<'a, ()> {
        run(move || self.copy_sync(src, dst))
    }

    fn info<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>> {
        run(move || self.info_sync(object))
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>> {
        run(move || self.list_sync(prefix))
    }

    fn read_map<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>> {
        run(move || self.read_map_sync(object))
    }

    fn write_map<'a>(
        &'a self,
        object: &'a ObjectName,
        data: &'a [u8],
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64> {
        run(move || self.write_map_sync(object, data, expect, fence))
    }

    fn create_maps<'a>(
        &'a self,
        objects: &'a [(ObjectName, Vec<u8>)],
    ) -> BlockerFuture<'a, Vec<u64>> {
        run(move || self.create_maps_sync(objects))
    }

    fn delete_map<'a>(
        &'a self,
        object: &'a ObjectName,
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()> {
        run(move || self.delete_map_sync(object, expect, fence))
    }

    fn lock_acquire<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        run(move || self.lock_acquire_sync(lock, owner))
    }

    fn lock_release<'a>(&'a self, fence: &'a Fence) -> BlockerFuture<'a, ()> {
        run(move || self.lock_release_sync(fence))
    }

    fn lock_info<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        run(move || {
            let _g = self.flock("lck", lock, false)?;
            self.read_lock(lock)
        })
    }

    fn lock_break<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        run(move || self.lock_break_sync(lock))
    }

    fn capacity(&self) -> BlockerFuture<'_, Capacity> {
        run(move || fs_capacity(&self.dir).map_err(|e| BlockerError::io(self.root.display(), e)))
    }

    fn identity(&self) -> BackendId {
        self.identity.clone()
    }
}

enum NowaitOp<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// One `preadv2`/`pwritev2` with `RWF_NOWAIT` at `offset`.
fn nowait(file: &File, op: NowaitOp<'_>, offset: u64) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let (base, len, write) = match op {
        NowaitOp::Read(b) => (b.as_mut_ptr().cast::<libc::c_void>(), b.len(), false),
        NowaitOp::Write(b) => (b.as_ptr().cast_mut().cast::<libc::c_void>(), b.len(), true),
    };
    let iov = libc::iovec {
        iov_base: base,
        iov_len: len,
    };
    let fd = file.as_raw_fd();
    // SAFETY: `iov` describes one live buffer of `len` bytes that outlives the call (borrowed
    // by `op`); a read writes into it (a `&mut` borrow), a write only reads it. `fd` is open
    // for the duration: `file` is borrowed.
    let n = unsafe {
        if write {
            libc::pwritev2(fd, &iov, 1, offset, libc::RWF_NOWAIT)
        } else {
            libc::preadv2(fd, &iov, 1, offset, libc::RWF_NOWAIT)
        }
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The kernel would have had to wait (or cannot tell without waiting): take the slow path.
fn would_wait(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = AtomicU64::new(0);
        super::super::conformance::run_all(|| {
            let sub = dir
                .path()
                .join(fresh.fetch_add(1, Ordering::Relaxed).to_string());
            Arc::new(FileBlocker::open(sub).unwrap())
        })
        .await;
    }

    /// The no-wait path answers only what it can without blocking (a cached descriptor), reads
    /// what the slow path wrote and reads past the end as zeros, refuses bad ranges like the
    /// slow path, and a write it takes is flushed like any other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_and_writes_now_agree_with_the_slow_path() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        let cold = ObjectName::new("ob.cold").unwrap();
        let mut buf = [1u8; 16];
        assert!(
            b.read_now(&cold, 0, &mut buf).is_none(),
            "no descriptor: not now"
        );
        assert!(
            b.write_now(&cold, 0, b"x").is_none(),
            "no descriptor: not now"
        );
        let hot = ObjectName::new("ob.hot").unwrap();
        b.write(&hot, 0, b"0123456789").await.unwrap();
        b.flush().await.unwrap();
        let mut buf = [1u8; 16];
        match b.read_now(&hot, 4, &mut buf) {
            Some(Ok(())) => assert_eq!(&buf, b"456789\0\0\0\0\0\0\0\0\0\0"),
            // Only if the page cache dropped the page meanwhile.
            None => {}
            Some(Err(e)) => panic!("{e}"),
        }
        assert!(matches!(
            b.read_now(&hot, u64::MAX - 4, &mut buf),
            Some(Err(BlockerError::InvalidRange { .. }))
        ));
        match b.write_now(&hot, 2, b"ab") {
            Some(Ok(())) => assert!(lock(&b.dirty).names.contains(&hot), "flushed next time"),
            // ext4 and others refuse RWF_NOWAIT buffered writes; the slow path does it.
            None => b.write(&hot, 2, b"ab").await.unwrap(),
            Some(Err(e)) => panic!("{e}"),
        }
        let mut all = [0u8; 10];
        b.read(&hot, 0, &mut all).await.unwrap();
        assert_eq!(&all, b"01ab456789");
    }

    /// Issue 13: a failed fsync dropped the dirty names, and the next flush succeeded without
    /// syncing them. After a failed fsync the kernel may have dropped the dirty pages (and
    /// cleared the error), so no later flush may claim durability for that object.
    #[tokio::test]
    async fn a_failed_fsync_fails_every_later_flush() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        b.flush().await.unwrap(); // the first flush after open syncs the filesystem
        let names: Vec<ObjectName> = (0..8)
            .map(|i| ObjectName::new(format!("ob.{i}")).unwrap())
            .collect();
        for n in &names {
            b.write(n, 0, b"data").await.unwrap();
        }
        lock(&b.fail_sync).insert(names[3].clone());
        assert!(b.flush().await.is_err(), "the injected EIO is reported");
        for attempt in 0..3 {
            let err = b.flush().await.unwrap_err();
            assert!(err.to_string().contains("ob.3"), "attempt {attempt}: {err}");
        }
        // Writing other objects does not clear the failure of ob.3.
        b.write(&names[0], 0, b"more").await.unwrap();
        assert!(b.flush().await.is_err());
        // Emptying the object makes its state known again: flushes succeed.
        b.truncate(&names[3]).await.unwrap();
        b.flush().await.unwrap();
    }

    #[tokio::test]
    async fn capacity_is_the_filesystems() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        let c = b.capacity().await.unwrap();
        assert!(c.total > 0, "{c:?}");
        assert!(c.available <= c.total, "{c:?}");
    }

    #[test]
    fn identity_follows_the_directory_not_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let one = FileBlocker::open(&a).unwrap();
        let two = FileBlocker::open(&a).unwrap();
        assert_eq!(one.identity(), two.identity(), "two opens of one directory");
        // Another spelling of the same directory is the same backend.
        let other_path = FileBlocker::open(dir.path().join("a/../a/.")).unwrap();
        assert_eq!(one.identity(), other_path.identity());
        assert_eq!(dir_identity(&a).unwrap(), one.identity());
        let b = FileBlocker::open(dir.path().join("b")).unwrap();
        assert_ne!(one.identity(), b.identity(), "two directories");
        assert!(dir_identity(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn conformance_on_current_thread_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        super::super::conformance::run(&b).await;
    }

    #[tokio::test]
    async fn directory_objects_maps_and_locks_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("objects");
        let b = FileBlocker::open(&root).unwrap();
        b.write_map(
            &ObjectName::new("vol.x").unwrap(),
            b"map",
            Expect::Absent,
            None,
        )
        .await
        .unwrap();
        b.write(&ObjectName::new("ob.1").unwrap(), 0, b"data")
            .await
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700, "object directory");
        let mut files = 0;
        for entry in fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            files += 1;
        }
        assert!(files >= 2, "the object and the map were written");
    }

    #[tokio::test]
    async fn internal_files_are_invisible_and_objects_persist() {
        let dir = tempfile::tempdir().unwrap();
        let m = ObjectName::new("vol.x").unwrap();
        {
            let b = FileBlocker::open(dir.path()).unwrap();
            b.write_map(&m, b"map", Expect::Absent, None).await.unwrap();
            b.write(&ObjectName::new("ob.1").unwrap(), 0, b"data")
                .await
                .unwrap();
            b.flush().await.unwrap();
            let names: Vec<String> = b
                .list("")
                .await
                .unwrap()
                .into_iter()
                .map(|i| i.name.to_string())
                .collect();
            assert_eq!(
                names,
                ["ob.1", "vol.x"],
                "flock and temporary files stay hidden"
            );
        }
        let b = FileBlocker::open(dir.path()).unwrap();
        assert_eq!(b.read_map(&m).await.unwrap().unwrap().data, b"map");
        // A data object is not a map object: the magic check refuses it.
        let err = b
            .read_map(&ObjectName::new("ob.1").unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, BlockerError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn stale_temporaries_are_removed_and_young_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("vol.a.1.1.tmp"), b"x").unwrap();
        fs::write(dir.path().join("ob.keep"), b"x").unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        assert!(dir.path().join("vol.a.1.1.tmp").exists(), "young: kept");
        assert_eq!(
            b.remove_stale_temporaries(std::time::Duration::ZERO)
                .unwrap(),
            1
        );
        assert!(!dir.path().join("vol.a.1.1.tmp").exists());
        assert!(dir.path().join("ob.keep").exists());
    }

    #[tokio::test]
    async fn corrupt_lock_object_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let b = FileBlocker::open(dir.path()).unwrap();
        let l = ObjectName::new("lk.v").unwrap();
        let owner = LockOwner::new("n1").unwrap();
        b.lock_acquire(&l, &owner).await.unwrap();
        let path = dir.path().join("lk.v");
        let mut bytes = fs::read(&path).unwrap();
        bytes[9] ^= 1;
        fs::write(&path, bytes).unwrap();
        let err = b.lock_info(&l).await.unwrap_err();
        assert!(matches!(err, BlockerError::Corrupt { .. }), "{err}");
    }

    /// Two blockers on one directory stand for two processes (the blocker peer, which caches
    /// descriptors, and the mapper). Truncation by one is seen through the other's cached
    /// descriptor, and a later write through that descriptor reaches the file that stays.
    #[tokio::test]
    async fn truncate_reaches_descriptors_cached_by_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let peer = FileBlocker::open(dir.path()).unwrap();
        let mapper = FileBlocker::open(dir.path()).unwrap();
        let o = ObjectName::new("ob.x").unwrap();
        peer.write(&o, 0, &[0xaa; 4096]).await.unwrap();
        assert!(mapper.truncate(&o).await.unwrap());
        peer.write(&o, 10, b"new").await.unwrap();
        peer.flush().await.unwrap();
        for (who, b) in [
            ("cached", &peer),
            ("fresh", &FileBlocker::open(dir.path()).unwrap()),
        ] {
            let mut buf = [0xeeu8; 4096];
            b.read(&o, 0, &mut buf).await.unwrap();
            assert_eq!(&buf[10..13], b"new", "{who}");
            assert!(buf[..10].iter().chain(&buf[13..]).all(|&x| x == 0), "{who}");
        }
        // Copying a missing source empties the destination in place as well.
        mapper
            .copy(&ObjectName::new("ob.none").unwrap(), &o)
            .await
            .unwrap();
        peer.write(&o, 0, b"z").await.unwrap();
        let mut buf = [0xeeu8; 16];
        FileBlocker::open(dir.path())
            .unwrap()
            .read(&o, 0, &mut buf)
            .await
            .unwrap();
        assert_eq!(buf, *b"z\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    }

    /// A descriptor of a file another process deleted (GC) pins its space until dropped.
    #[tokio::test]
    async fn sweep_drops_descriptors_of_files_deleted_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let peer = FileBlocker::open(dir.path()).unwrap();
        let gc = FileBlocker::open(dir.path()).unwrap();
        let (gone, kept) = (
            ObjectName::new("ob.gone").unwrap(),
            ObjectName::new("ob.kept").unwrap(),
        );
        peer.write(&gone, 0, b"x").await.unwrap();
        peer.write(&kept, 0, b"y").await.unwrap();
        assert!(gc.delete(&gone).await.unwrap());
        assert_eq!(lock(&peer.fds).files.len(), 2);
        lock(&peer.fds).swept -= FD_SWEEP_INTERVAL;
        let mut one = [0u8; 1];
        peer.read(&kept, 0, &mut one).await.unwrap();
        let cache = lock(&peer.fds);
        assert!(cache.files.contains_key(&kept) && !cache.files.contains_key(&gone));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_compare_and_swap_has_one_winner_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(FileBlocker::open(dir.path()).unwrap());
        let m = ObjectName::new("vol.race").unwrap();
        let v0 = b.write_map(&m, b"0", Expect::Absent, None).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let b = b.clone();
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                b.write_map(&m, &[i], Expect::Version(v0), None)
                    .await
                    .is_ok()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.unwrap());
        }
        assert_eq!(winners, 1);
    }
}
