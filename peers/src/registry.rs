//! The host-local registry of running peer sets: which segment serves which lock owner.
//!
//! Why it exists: a volume is written through one mapper at a time, the one holding its lock
//! in the backend. In the Kubernetes layout the CSI controller and the node run separate peer
//! sets over the same backend, so a volume staged on the node is locked by the node's mapper,
//! and the controller's mapper cannot snapshot, resize or clone it. The lock record names its
//! owner, but an owner id is not an address. This registry turns it into one: a peer set that
//! runs a mapper records `owner -> segment` here, and the controller forwards the operation to
//! that segment's vlmc, which drains the volume's I/O around it (the way librbd forwards
//! snapshot-create to the exclusive-lock owner). Without the forwarding the only choices would
//! be to refuse (what the controller did) or to break the lock of a live writer.
//!
//! Why a directory of small JSON files: readers are other processes (maybe other containers
//! sharing `/run`), each entry is written by exactly one peer set, and a file per owner makes
//! the lookup one `open`. Entries are replaced atomically (temp file + rename), so a reader
//! never sees half an entry.
//!
//! Why entries carry a process identity: a peer set killed with `kill -9` (or a crashed node
//! process) cannot remove its entry. As xseg does for its ports, an entry records the pid and
//! the kernel's start time of that pid, so a dead or recycled pid is recognised and the entry
//! ignored and removed by the reader who notices. The pid namespace is recorded too: a reader
//! in another pid namespace cannot judge the pid, so it keeps such an entry and leaves the final
//! word to a PING over the segment. Removal of a stale entry and registration are serialised by
//! an flock on `.lock` in the directory, so a reader cleaning a dead owner's entry can never
//! delete the fresh one its restarted peer set just wrote.
//!
//! Why entries name their backend (the [`BackendId`] its blocker reports: for files, device and
//! inode of the objects directory): forwarding to a peer set that happens to use the same owner
//! id over another backend would act on the wrong volumes; a reader compares the backend before
//! trusting an entry. An entry of the first layout (version 1) named a directory instead; it
//! reads as "another backend", which costs only forwarding until that peer set restarts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use xseg::owner::ProcessId;

use crate::blocker::{BackendId, BlockerError, LockOwner};

/// Where entries live unless the entry point passes another directory (`archip
/// --peerset-dir`, `ARCHIP_PEERSET_DIR`).
pub const DEFAULT_DIR: &str = "/run/archip/peersets";
/// Longest owner id accepted as a file name (lock owners are at most 128 bytes).
pub const MAX_OWNER_LEN: usize = 128;
/// Layout version of an entry (2: the backend is a [`BackendId`]).
pub const ENTRY_VERSION: u32 = 2;

const LOCK_FILE: &str = ".lock";
const SUFFIX: &str = ".json";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid peer-set owner {owner:?}: {reason}")]
    InvalidOwner { owner: String, reason: &'static str },
    #[error("peer-set registry {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "owner {owner} is already registered by a live peer set (pid {pid}, segment {})",
        segment.display()
    )]
    Taken {
        owner: String,
        pid: u32,
        segment: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `owner` can name a file in the registry directory: a valid lock owner (1..=128
/// bytes of `[A-Za-z0-9._:@-]`, so no `/`), not starting with `.` (no `.`, `..`, hidden or temp
/// files) and without `..`. Every path built from an owner goes through here first.
pub fn check_owner(owner: &str) -> Result<(), RegistryError> {
    let invalid = |reason| RegistryError::InvalidOwner {
        owner: owner.to_owned(),
        reason,
    };
    match LockOwner::new(owner) {
        Err(BlockerError::InvalidOwner { reason, .. }) => Err(invalid(reason)),
        Err(_) => Err(invalid("not a lock owner")),
        Ok(_) if owner.starts_with('.') => Err(invalid("starts with '.'")),
        Ok(_) if owner.contains("..") => Err(invalid("contains '..'")),
        Ok(_) => Ok(()),
    }
}

/// The pid namespace of the calling process (inode of `/proc/self/ns/pid`).
fn current_pid_ns() -> Option<u64> {
    fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// One running peer set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSetEntry {
    pub version: u32,
    /// The lock owner its mapper writes volumes as.
    pub owner: String,
    /// The segment to connect a client to.
    pub segment: PathBuf,
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// Pid namespace `pid` belongs to, if known.
    #[serde(default)]
    pub pid_ns: Option<u64>,
    /// Where the backend's objects live, as the peer set sees it (for humans).
    #[serde(default)]
    pub location: String,
    /// Which backend (for the comparison). Fields of its own, not the version-1 `backend`
    /// (a device and inode), so an old entry still parses and compares as another backend.
    #[serde(default)]
    pub backend_id: Option<BackendId>,
}

/// What a reader can tell about an entry's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Exited, or the pid now belongs to another process.
    Dead,
    /// Registered from another pid namespace: the pid means nothing here.
    Unknown,
}

impl PeerSetEntry {
    /// The entry for a peer set of the calling process over the backend `backend_id`, whose
    /// objects are at `location` (for humans).
    pub fn current(
        owner: &str,
        segment: &Path,
        location: &str,
        backend_id: BackendId,
    ) -> Result<PeerSetEntry, RegistryError> {
        check_owner(owner)?;
        let me = ProcessId::current();
        Ok(PeerSetEntry {
            version: ENTRY_VERSION,
            owner: owner.to_owned(),
            segment: segment.to_owned(),
            pid: me.pid,
            start_time: me.start,
            pid_ns: current_pid_ns(),
            location: location.to_owned(),
            backend_id: Some(backend_id),
        })
    }

    pub fn liveness(&self) -> Liveness {
        match (self.pid_ns, current_pid_ns()) {
            (Some(theirs), Some(ours)) if theirs != ours => Liveness::Unknown,
            _ => {
                let id = ProcessId {
                    pid: self.pid,
                    start: self.start_time,
                };
                if id.is_alive() {
                    Liveness::Alive
                } else {
                    Liveness::Dead
                }
            }
        }
    }

    /// Whether this peer set serves the backend `ours`. An entry that names none (version 1)
    /// is another backend.
    pub fn same_backend(&self, ours: &BackendId) -> bool {
        self.backend_id.as_ref() == Some(ours)
    }

    /// Same process and segment: the entry a [`Registration`] wrote.
    fn same_instance(&self, other: &PeerSetEntry) -> bool {
        self.pid == other.pid
            && self.start_time == other.start_time
            && self.pid_ns == other.pid_ns
            && self.segment == other.segment
    }
}

/// A registry directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registry {
    dir: PathBuf,
}

/// An exclusive flock on the directory's `.lock`, released when dropped (the file closes).
struct DirLock(#[allow(dead_code)] File);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Registry {
    pub fn new(dir: impl Into<PathBuf>) -> Registry {
        Registry { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry file of `owner`, after checking the owner is a plain file name.
    pub fn path_of(&self, owner: &str) -> Result<PathBuf, RegistryError> {
        check_owner(owner)?;
        Ok(self.dir.join(format!("{owner}{SUFFIX}")))
    }

    fn create_dir(&self) -> Result<(), RegistryError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.dir)
            .map_err(io_err(&self.dir))
    }

    fn lock(&self) -> Result<DirLock, RegistryError> {
        let path = self.dir.join(LOCK_FILE);
        // flock needs no write access: a reader that may not write the directory can still
        // take the lock of a `.lock` someone else created.
        let f = match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path),
            r => r,
        }
        .map_err(io_err(&path))?;
        crate::flock::lock(&f, crate::flock::LockMode::Exclusive).map_err(io_err(&path))?;
        Ok(DirLock(f))
    }

    /// Reads an entry as stored: `Ok(None)` if there is none. A file that does not parse, or
    /// that names another owner than its file name, is garbage (`Err(bytes)` for the cleaner).
    ///
    /// Only files owned by root or by this process's user count: in a directory others can
    /// write (a misconfigured `ARCHIP_PEERSET_DIR`), anyone else's file is ignored, never
    /// trusted to name a segment and never removed.
    fn read(&self, path: &Path) -> Result<Option<Result<PeerSetEntry, Vec<u8>>>, RegistryError> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path)(e)),
        };
        let uid = f.metadata().map_err(io_err(path))?.uid();
        if !xseg::owner::trusted_owner(uid) {
            tracing::warn!(path = %path.display(), uid, "ignoring a peer-set registry entry of another user");
            return Ok(None);
        }
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut f, &mut bytes).map_err(io_err(path))?;
        let owner = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX));
        Ok(Some(match serde_json::from_slice::<PeerSetEntry>(&bytes) {
            Ok(e) if Some(e.owner.as_str()) == owner && check_owner(&e.owner).is_ok() => Ok(e),
            _ => Err(bytes),
        }))
    }

    /// Writes `entry` as its owner's entry. Refused if another live peer set holds the owner
    /// id here (two peer sets writing as one owner on one host is a configuration error that
    /// forwarding must not paper over); a dead one's entry is replaced.
    pub fn register(&self, entry: PeerSetEntry) -> Result<Registration, RegistryError> {
        let path = self.path_of(&entry.owner)?;
        self.create_dir()?;
        let _lock = self.lock()?;
        if let Some(Ok(old)) = self.read(&path)?
            && !old.same_instance(&entry)
            && old.liveness() != Liveness::Dead
        {
            return Err(RegistryError::Taken {
                owner: old.owner,
                pid: old.pid,
                segment: old.segment,
            });
        }
        let temp = self.dir.join(format!(
            ".{}{SUFFIX}.{}.{}.tmp",
            entry.owner,
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let json = serde_json::to_vec_pretty(&entry).map_err(|e| io_err(&temp)(e.into()))?;
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&temp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&temp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(io_err(&path)(e));
        }
        Ok(Registration {
            registry: self.clone(),
            entry,
            removed: false,
        })
    }

    /// The entry of `owner` if its peer set may be running: alive, or registered from
    /// another pid namespace ([`Liveness::Unknown`]). A dead one's entry is removed.
    pub fn lookup(&self, owner: &str) -> Result<Option<PeerSetEntry>, RegistryError> {
        let path = self.path_of(owner)?;
        match self.read(&path)? {
            None => Ok(None),
            Some(Ok(e)) if e.liveness() != Liveness::Dead => Ok(Some(e)),
            Some(found) => {
                self.remove_if_unchanged(&path, &found)?;
                Ok(None)
            }
        }
    }

    /// The live peer sets other than `ours` that serve the same backend: whoever could have
    /// objects of an operation in flight that a GC without grace would take for garbage.
    /// Entries from another pid namespace count as live (their pids cannot be checked).
    pub fn others_on_backend(
        &self,
        ours: &PeerSetEntry,
    ) -> Result<Vec<PeerSetEntry>, RegistryError> {
        let Some(backend) = ours.backend_id.as_ref() else {
            return Ok(Vec::new());
        };
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut others = Vec::new();
        for dirent in entries {
            let path = dirent.map_err(io_err(&self.dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || !name.ends_with(SUFFIX) {
                continue;
            }
            if let Some(Ok(e)) = self.read(&path)?
                && e.liveness() != Liveness::Dead
                && e.same_backend(backend)
                && !e.same_instance(ours)
            {
                others.push(e);
            }
        }
        others.sort_by(|a, b| a.owner.cmp(&b.owner));
        Ok(others)
    }

    /// Removes a stale entry unless it changed since it was read (a restarted peer set
    /// registered again meanwhile).
    fn remove_if_unchanged(
        &self,
        path: &Path,
        seen: &Result<PeerSetEntry, Vec<u8>>,
    ) -> Result<(), RegistryError> {
        let _lock = self.lock()?;
        if self.read(path)?.as_ref() == Some(seen) {
            match seen {
                Ok(e) => {
                    tracing::info!(owner = %e.owner, pid = e.pid, segment = %e.segment.display(), "removing the registry entry of a dead peer set")
                }
                Err(_) => {
                    tracing::warn!(path = %path.display(), "removing a malformed peer-set registry entry")
                }
            }
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            }
        }
        Ok(())
    }

    /// Removes `entry`'s file if it still describes that peer set.
    fn unregister(&self, entry: &PeerSetEntry) -> Result<(), RegistryError> {
        let path = self.path_of(&entry.owner)?;
        let _lock = self.lock()?;
        if let Some(Ok(cur)) = self.read(&path)?
            && cur.same_instance(entry)
        {
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

/// A registered peer set; the entry goes when this is dropped (a clean stop).
#[derive(Debug)]
pub struct Registration {
    registry: Registry,
    entry: PeerSetEntry,
    removed: bool,
}

impl Registration {
    pub fn entry(&self) -> &PeerSetEntry {
        &self.entry
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Removes the entry now, reporting failure.
    pub fn remove(mut self) -> Result<(), RegistryError> {
        self.removed = true;
        self.registry.unregister(&self.entry)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = self.registry.unregister(&self.entry)
        {
            tracing::warn!(owner = %self.entry.owner, error = %e, "removing the peer-set registry entry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocker::file::dir_identity;

    fn entry_in(dir: &Path, owner: &str, segment: &str) -> PeerSetEntry {
        let objects = dir.join("objects");
        fs::create_dir_all(&objects).unwrap();
        PeerSetEntry::current(
            owner,
            Path::new(segment),
            &objects.display().to_string(),
            dir_identity(&objects).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn others_on_backend_lists_live_peer_sets_of_the_same_backend_only() {
        let base = tempfile::tempdir().unwrap();
        let reg = Registry::new(base.path().join("reg"));
        let ours = entry_in(base.path(), "ours", "/dev/shm/a");
        let _mine = reg.register(ours.clone()).unwrap();
        assert!(reg.others_on_backend(&ours).unwrap().is_empty());
        // A second peer set over the same objects (another process: a live pid of ours with
        // another segment is another instance).
        let second = entry_in(base.path(), "second", "/dev/shm/b");
        let _second = reg.register(second).unwrap();
        // A peer set over another backend does not count.
        let elsewhere = entry_in(&base.path().join("other"), "elsewhere", "/dev/shm/c");
        let _elsewhere = reg.register(elsewhere).unwrap();
        let others: Vec<_> = reg
            .others_on_backend(&ours)
            .unwrap()
            .into_iter()
            .map(|e| e.owner)
            .collect();
        assert_eq!(others, ["second"]);
    }

    #[test]
    fn owner_names_are_plain_file_names() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../etc",
            "a..b",
            "x\0y",
            "sp ace",
            "é",
            &"n".repeat(MAX_OWNER_LEN + 1),
        ] {
            assert!(
                matches!(check_owner(bad), Err(RegistryError::InvalidOwner { .. })),
                "{bad:?} must be refused"
            );
        }
        for good in [
            "node-1",
            "n.example.com",
            "a:b@c_d",
            &"n".repeat(MAX_OWNER_LEN),
        ] {
            check_owner(good).unwrap();
        }
        let reg = Registry::new("/nonexistent/registry");
        assert!(reg.path_of("../x").is_err());
        assert!(reg.lookup("a/b").is_err());
        assert_eq!(
            reg.path_of("node-1").unwrap(),
            Path::new("/nonexistent/registry/node-1.json")
        );
    }

    #[test]
    fn register_lookup_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("peersets"));
        assert_eq!(reg.lookup("node-1").unwrap(), None, "empty registry");
        let entry = entry_in(dir.path(), "node-1", "/dev/shm/seg-1");
        assert!(entry.same_backend(&dir_identity(&dir.path().join("objects")).unwrap()));
        assert!(!entry.same_backend(&dir_identity(dir.path()).unwrap()));
        let r = reg.register(entry.clone()).unwrap();
        assert_eq!(reg.lookup("node-1").unwrap(), Some(entry.clone()));
        assert_eq!(entry.liveness(), Liveness::Alive);
        // A second live peer set may not claim the same owner.
        let other = entry_in(dir.path(), "node-1", "/dev/shm/seg-2");
        assert!(matches!(
            reg.register(other),
            Err(RegistryError::Taken { .. })
        ));
        // Registering again as the same instance is fine (idempotent).
        std::mem::forget(reg.register(entry.clone()).unwrap());
        drop(r);
        assert_eq!(reg.lookup("node-1").unwrap(), None, "removed on drop");
        // No temp files are left behind.
        let left: Vec<_> = fs::read_dir(reg.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != LOCK_FILE)
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn stale_entries_are_ignored_and_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("peersets"));
        // A process that has exited.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = xseg::owner::start_time(pid);
        child.wait().unwrap();
        let mut dead = entry_in(dir.path(), "node-dead", "/dev/shm/seg-dead");
        dead.pid = pid;
        dead.start_time = start.unwrap_or(1);
        assert_eq!(dead.liveness(), Liveness::Dead);
        // Written as a crashed peer set leaves it (no Registration to remove it).
        std::mem::forget(reg.register(dead.clone()).unwrap());
        assert!(reg.path_of("node-dead").unwrap().exists());
        assert_eq!(reg.lookup("node-dead").unwrap(), None, "dead pid");
        assert!(!reg.path_of("node-dead").unwrap().exists(), "cleaned");

        // A live pid whose start time differs: the pid was reused.
        let mut reused = entry_in(dir.path(), "node-reused", "/dev/shm/seg-r");
        reused.start_time = reused.start_time.wrapping_add(1);
        assert_eq!(reused.liveness(), Liveness::Dead);
        std::mem::forget(reg.register(reused).unwrap());
        assert_eq!(reg.lookup("node-reused").unwrap(), None, "reused pid");
        assert!(!reg.path_of("node-reused").unwrap().exists());

        // A dead owner's entry is replaced by its restarted peer set.
        std::mem::forget(reg.register(dead).unwrap());
        let fresh = entry_in(dir.path(), "node-dead", "/dev/shm/seg-new");
        let r = reg.register(fresh.clone()).unwrap();
        assert_eq!(reg.lookup("node-dead").unwrap(), Some(fresh));
        drop(r);

        // Garbage and an entry naming another owner are ignored and removed.
        fs::write(reg.dir().join("node-junk.json"), b"{not json").unwrap();
        assert_eq!(reg.lookup("node-junk").unwrap(), None);
        assert!(!reg.dir().join("node-junk.json").exists());
        let liar = entry_in(dir.path(), "node-a", "/dev/shm/x");
        fs::write(
            reg.dir().join("node-b.json"),
            serde_json::to_vec(&liar).unwrap(),
        )
        .unwrap();
        assert_eq!(reg.lookup("node-b").unwrap(), None);
    }

    #[test]
    fn a_version_1_entry_reads_as_another_backend() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("peersets"));
        let objects = dir.path().join("objects");
        fs::create_dir_all(&objects).unwrap();
        let me = ProcessId::current();
        let v1 = serde_json::json!({
            "version": 1,
            "owner": "node-old",
            "segment": "/dev/shm/seg-old",
            "pid": me.pid,
            "start_time": me.start,
            "pid_ns": current_pid_ns(),
            "objects_dir": objects,
            "backend": { "dev": 1, "ino": 2 },
        });
        fs::create_dir_all(reg.dir()).unwrap();
        fs::write(reg.path_of("node-old").unwrap(), v1.to_string()).unwrap();
        let old = reg
            .lookup("node-old")
            .unwrap()
            .expect("still a live peer set");
        assert_eq!(old.backend_id, None);
        assert!(!old.same_backend(&dir_identity(&objects).unwrap()));
    }

    #[test]
    fn another_users_entry_is_neither_trusted_nor_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("peersets"));
        let e = entry_in(dir.path(), "node-x", "/dev/shm/seg-x");
        std::mem::forget(reg.register(e.clone()).unwrap());
        let path = reg.path_of("node-x").unwrap();
        // Only root can give a file away; elsewhere there is nothing to test.
        if std::os::unix::fs::chown(&path, Some(54321), None).is_err() {
            return;
        }
        assert_eq!(reg.lookup("node-x").unwrap(), None);
        assert!(path.exists(), "not ours to remove");
    }

    #[test]
    fn another_pid_namespace_is_not_judged_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::new(dir.path().join("peersets"));
        let mut e = entry_in(dir.path(), "node-ns", "/dev/shm/seg-ns");
        e.pid = u32::MAX - 1;
        e.pid_ns = e.pid_ns.map(|n| n.wrapping_add(1)).or(Some(1));
        if current_pid_ns().is_none() {
            return; // no /proc/self/ns here: nothing to compare
        }
        assert_eq!(e.liveness(), Liveness::Unknown);
        std::mem::forget(reg.register(e.clone()).unwrap());
        assert_eq!(reg.lookup("node-ns").unwrap(), Some(e), "kept for a probe");
    }
}
