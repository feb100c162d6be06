//! The blocker: the one small interface between the peers and a storage backend.
//!
//! The trait is shaped for a remote, asynchronous backend first (a RADOS pool driven by librados
//! aio, with many operations in flight, exclusive locks with cookies and compound writes with
//! version asserts) and for local files second. So nothing here assumes a path, a file
//! descriptor or pread/pwrite: every operation names an object and returns a boxed future, which
//! keeps the trait object-safe (`Arc<dyn Blocker>`) without a macro crate.
//!
//! Three kinds of object live behind one namespace:
//! - data objects, sparse byte arrays (`read`, `write`, `copy`, `delete`, `info`, `list`);
//! - map objects, replaced whole and atomically with a version compare-and-swap (`read_map`,
//!   `write_map`, `delete_map`); a reader sees the old or the new content, never a mix;
//! - lock objects, holding an owner and a fencing generation (`lock_*`). A map write that
//!   carries a [`Fence`] is refused once the lock has moved on, so a deposed writer cannot
//!   damage a map even if it still believes it owns the volume.
//!
//! Names are validated once, at this boundary ([`ObjectName`]); everything behind it can trust
//! them.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::SystemTime;

#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod file;
pub mod memory;
pub mod peer;
#[cfg(feature = "rados")]
pub mod rados;

pub use file::FileBlocker;
pub use memory::MemoryBlocker;
#[cfg(feature = "rados")]
pub use rados::RadosBlocker;

/// Longest object name accepted. RADOS allows far more, but a bound keeps every backend (and the
/// file blocker's `NAME_MAX` of 255 with its internal suffixes) safe.
pub const MAX_NAME_LEN: usize = 200;

/// Longest lock owner identity accepted (a node id, possibly with an instance suffix).
pub const MAX_OWNER_LEN: usize = 128;

/// Suffixes the file blocker uses for its own files; a user object with such a name could be
/// confused with (or clobber) them, so they are refused for every backend alike.
pub const RESERVED_SUFFIXES: &[&str] = &[".tmp", ".lock"];

/// The future every blocker operation returns.
pub type BlockerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlockerError>> + Send + 'a>>;

/// Everything a blocker operation can fail with. Each variant names the object involved, because
/// these errors cross peer boundaries and end up in logs far from their cause.
#[derive(Debug, thiserror::Error)]
pub enum BlockerError {
    #[error("object {object} not found")]
    NotFound { object: String },
    #[error("invalid object name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid lock owner {owner:?}: {reason}")]
    InvalidOwner { owner: String, reason: &'static str },
    #[error("version mismatch on {object}: expected {expected}, found {found:?}")]
    VersionMismatch {
        object: String,
        expected: Expect,
        found: Option<u64>,
    },
    #[error("{lock} is locked by {holder}")]
    Locked { lock: String, holder: String },
    #[error("fenced: lock {lock} generation {generation} held by {owner} is no longer current")]
    Fenced {
        lock: String,
        owner: String,
        generation: u64,
    },
    #[error("object {object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("invalid range on {object}: offset {offset} length {length}")]
    InvalidRange {
        object: String,
        offset: u64,
        length: u64,
    },
    #[error("I/O error on {object}: {source}")]
    Io {
        object: String,
        #[source]
        source: io::Error,
    },
    /// The pool is full or over its quota (RADOS ENOSPC/EDQUOT).
    #[error("no space left writing {object}: the pool is full or over its quota")]
    NoSpace { object: String },
    /// This client was fenced off the cluster: another node broke a lock it held.
    #[error(
        "fenced off the cluster (blocklisted) while accessing {object}: another node broke our lock"
    )]
    Blocklisted { object: String },
    /// The cluster did not answer within the configured operation timeout.
    #[error("timed out waiting for the cluster on {object}")]
    TimedOut { object: String },
}

impl BlockerError {
    pub(crate) fn io(object: impl fmt::Display, source: io::Error) -> Self {
        BlockerError::Io {
            object: object.to_string(),
            source,
        }
    }
}

/// A validated object name: 1..=200 bytes of `[A-Za-z0-9._-]`, not starting with `.` or `-`,
/// without `..`, and without a reserved suffix. That rules out `/`, NUL, traversal and hidden
/// files by construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName(String);

impl ObjectName {
    pub fn new(name: impl Into<String>) -> Result<Self, BlockerError> {
        let name = name.into();
        match name_problem(&name) {
            None => Ok(ObjectName(name)),
            Some(reason) => Err(BlockerError::InvalidName { name, reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Bytes an object name may hold: A-Z a-z 0-9 . _ -
static NAME_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        i += 1;
    }
    t
};

/// The rules of [`name_problem`] in one pass over the bytes (a table lookup each) and one
/// substring search: allowed bytes only, no `..`, no leading `.` or `-`, no reserved suffix.
fn valid_in_one_pass(name: &str) -> bool {
    let b = name.as_bytes();
    let (Some(&first), true) = (b.first(), b.len() <= MAX_NAME_LEN) else {
        return false;
    };
    first != b'.'
        && first != b'-'
        && b.iter().all(|&c| NAME_BYTES[c as usize])
        && !name.contains("..")
        && !RESERVED_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Why `name` is not a valid object name, if it is not.
pub fn name_problem(name: &str) -> Option<&'static str> {
    // Every object I/O checks its name, so the valid case is one pass over the bytes; only a
    // name that fails it goes through the checks below, for the precise reason.
    if valid_in_one_pass(name) {
        return None;
    }
    reason(name)
}

/// The rules one by one, the first broken named.
fn reason(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Some("longer than 200 bytes");
    }
    if name.contains('\0') {
        return Some("contains NUL");
    }
    if name.contains('/') {
        return Some("contains '/'");
    }
    if name.contains("..") {
        return Some("contains '..'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("only A-Z a-z 0-9 . _ - are allowed");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Some("must not start with '.' or '-'");
    }
    if RESERVED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
        return Some("ends with a reserved suffix (.tmp, .lock)");
    }
    None
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for ObjectName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for ObjectName {
    type Error = BlockerError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        ObjectName::new(s)
    }
}

/// Who holds a lock: a node identity, stable across restarts of that node's peers so that a
/// restarted mapper gets its own lock back instead of waiting on itself.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LockOwner(String);

impl LockOwner {
    pub fn new(owner: impl Into<String>) -> Result<Self, BlockerError> {
        let owner = owner.into();
        let reason = if owner.is_empty() {
            Some("empty")
        } else if owner.len() > MAX_OWNER_LEN {
            Some("longer than 128 bytes")
        } else if !owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'@'))
        {
            Some("only A-Z a-z 0-9 . _ - : @ are allowed")
        } else {
            None
        };
        match reason {
            None => Ok(LockOwner(owner)),
            Some(reason) => Err(BlockerError::InvalidOwner { owner, reason }),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LockOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LockOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Proof of holding a lock at one generation. Generations only grow, across releases and breaks,
/// so a fence from before a break can never become valid again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub lock: ObjectName,
    pub owner: LockOwner,
    pub generation: u64,
}

/// The state of a lock object. `generation` is 0 for a lock that was never taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub holder: Option<LockOwner>,
    pub generation: u64,
}

/// Size and age of an object; the age lets GC spare objects that may belong to an operation
/// still in flight in another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: ObjectName,
    pub size: u64,
    pub modified: SystemTime,
}

/// The precondition of a map-object write or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The object must not exist (atomic create).
    Absent,
    /// The object must exist at exactly this version.
    Version(u64),
    /// No precondition.
    Any,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Absent => f.write_str("absent"),
            Expect::Version(v) => write!(f, "version {v}"),
            Expect::Any => f.write_str("any"),
        }
    }
}

impl Expect {
    /// Whether an object currently at `found` (None = absent) satisfies the precondition.
    pub fn admits(self, found: Option<u64>) -> bool {
        match (self, found) {
            (Expect::Any, _) => true,
            (Expect::Absent, None) => true,
            (Expect::Version(want), Some(have)) => want == have,
            _ => false,
        }
    }
}

/// A map object's content with the version it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub data: Vec<u8>,
    pub version: u64,
}

/// How much a backend holds and has left, in bytes: what CSI GetCapacity reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub total: u64,
    /// Never more than `total`.
    pub available: u64,
}

/// Which backend a blocker stores into, as a value two processes can compare: equal when
/// both reach the same objects, whatever path, mount or client each used to get there. The
/// peer-set registry records it so that the CSI controller forwards an operation only to a
/// peer set over its own backend.
///
/// Opaque on purpose: each backend builds its own from what identifies it (the file blocker:
/// device and inode of its directory, so two bind mounts of one directory match; RADOS:
/// cluster fsid, pool and namespace), and adding a backend adds no variant here. The text is
/// stable across restarts and versions, because it is stored in registry files.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct BackendId(String);

impl BackendId {
    /// `kind` names the backend (`file`, `memory`, `rados`), `detail` what identifies one
    /// instance of it.
    pub fn new(kind: &str, detail: impl fmt::Display) -> Self {
        BackendId(format!("{kind}:{detail}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value of `key` in a detail written as `key=value,key=value` (RADOS:
    /// `fsid=...,pool=...,namespace=...`), if present.
    pub fn detail(&self, key: &str) -> Option<&str> {
        let (_, detail) = self.0.split_once(':')?;
        detail
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

impl fmt::Display for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A storage backend. All methods may run concurrently from many tasks.
///
/// Durability: `write` is durable only after a later `flush` completes. `copy`, `delete` (when it
/// removed something), the map operations and the lock operations are durable when they return,
/// because the mapper orders map updates after them.
pub trait Blocker: Send + Sync + fmt::Debug {
    /// Read `buf.len()` bytes at `offset`. Bytes past the end of the object, and every byte of a
    /// missing object, read as zeros: objects are sparse.
    fn read<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BlockerFuture<'a, ()>;

    /// Write `data` at `offset`, creating the object if needed.
    fn write<'a>(
        &'a self,
        object: &'a ObjectName,
        offset: u64,
        data: &'a [u8],
    ) -> BlockerFuture<'a, ()>;

    /// [`Blocker::read`], done on the calling thread now if that cannot block (the file
    /// blocker: a cached descriptor and the range in the page cache), else `None` and nothing
    /// was done. The blocker peer tries this first, so an I/O the page cache can answer runs to
    /// completion on the peer's thread, with no task spawned and no thread woken for it.
    fn read_now(
        &self,
        _object: &ObjectName,
        _offset: u64,
        _buf: &mut [u8],
    ) -> Option<Result<(), BlockerError>> {
        None
    }

    /// [`Blocker::write`] on the calling thread if that cannot block, else `None`; on `None`
    /// part of `data` may have been written, so the caller writes all of it the usual way.
    fn write_now(
        &self,
        _object: &ObjectName,
        _offset: u64,
        _data: &[u8],
    ) -> Option<Result<(), BlockerError>> {
        None
    }

    /// Make every write completed before this call durable.
    fn flush(&self) -> BlockerFuture<'_, ()>;

    /// Remove an object. Returns whether it existed; deleting a missing object is not an error.
    ///
    /// Only for objects whose name will never be written again (GC): a backend may keep
    /// handles to objects open across calls and processes (the file blocker caches
    /// descriptors), and a write through such a handle after the name was deleted and
    /// re-created would land in the deleted object. To empty an object that may be written
    /// again under the same name, use [`Blocker::truncate`].
    fn delete<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool>;

    /// Empty an object in place: afterwards it reads as all zeros, like a missing object, but
    /// it keeps its identity (the file blocker keeps the inode), so every process that holds a
    /// handle to it sees the change and later writes through any handle land in the one live
    /// object. A missing object stays missing. Returns whether it existed. Durable when it
    /// returns, like `delete`.
    fn truncate<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, bool>;

    /// Replace `dst` with the content of `src`, server-side (reflink or in-kernel copy for
    /// files, copy-from for RADOS): data never travels through the caller. A missing `src` leaves
    /// `dst` empty or missing, which reads the same (all zeros); like `truncate`, it never
    /// deletes `dst` out from under a handle another process holds.
    fn copy<'a>(&'a self, src: &'a ObjectName, dst: &'a ObjectName) -> BlockerFuture<'a, ()>;

    /// Size and modification time, or `None` if the object does not exist.
    fn info<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>>;

    /// Every object whose name starts with `prefix`, sorted by name.
    fn list<'a>(&'a self, prefix: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>>;

    /// Read a whole map object with its version, or `None` if it does not exist.
    fn read_map<'a>(&'a self, object: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>>;

    /// Replace a map object atomically if `expect` holds and, when a fence is given, the fence's
    /// lock is still held by its owner at its generation. Returns the new version, which is
    /// greater than any version the object (or an earlier object of the same name) had.
    fn write_map<'a>(
        &'a self,
        object: &'a ObjectName,
        data: &'a [u8],
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64>;

    /// Create map objects that nothing refers to yet (the pages of a new map, written before
    /// the header that makes them reachable), each of which must not exist. All are durable
    /// when this returns; a backend may write them in parallel and make them durable together
    /// (the file blocker pays one directory sync for the batch instead of one per object), which
    /// is what keeps snapshot and clone of a large map fast. On failure some may exist: they are
    /// unreferenced, and GC reclaims them. Returns the versions, in order.
    fn create_maps<'a>(
        &'a self,
        objects: &'a [(ObjectName, Vec<u8>)],
    ) -> BlockerFuture<'a, Vec<u64>> {
        Box::pin(async move {
            let mut versions = Vec::with_capacity(objects.len());
            for (object, data) in objects {
                versions.push(self.write_map(object, data, Expect::Absent, None).await?);
            }
            Ok(versions)
        })
    }

    /// Remove a map object under the same preconditions as `write_map`.
    fn delete_map<'a>(
        &'a self,
        object: &'a ObjectName,
        expect: Expect,
        fence: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()>;

    /// Take a lock, without waiting. Taking a lock one already holds returns the current fence
    /// (idempotent); a lock held by someone else fails with `Locked`, naming the holder.
    fn lock_acquire<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence>;

    /// Give a lock back. Fails with `Fenced` if the fence is stale; releasing a free lock is fine.
    fn lock_release<'a>(&'a self, fence: &'a Fence) -> BlockerFuture<'a, ()>;

    /// The current holder and generation of a lock.
    fn lock_info<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo>;

    /// Free a lock whoever holds it (a dead node's). Returns the state before the break. The
    /// former holder's fence is stale from now on.
    fn lock_break<'a>(&'a self, lock: &'a ObjectName) -> BlockerFuture<'a, LockInfo>;

    /// Move a lock to `owner` from whoever holds it, for the cooperative handover of a shared
    /// (live-migrating) volume: the former holder's fence goes stale, as with a break, but the
    /// former holder stays a reader of the backend, because the source node of a migration
    /// keeps reading until it detaches. A backend whose break cuts the holder off entirely
    /// (RADOS blocklists its client) must override this; for the others a break and an
    /// acquire are the same thing.
    fn lock_hand_over<'a>(
        &'a self,
        lock: &'a ObjectName,
        owner: &'a LockOwner,
    ) -> BlockerFuture<'a, Fence> {
        Box::pin(async move {
            match self.lock_acquire(lock, owner).await {
                Err(BlockerError::Locked { .. }) => {
                    self.lock_break(lock).await?;
                    self.lock_acquire(lock, owner).await
                }
                r => r,
            }
        })
    }

    /// Total and available bytes of the storage behind this blocker (a filesystem, a pool),
    /// shared with whatever else uses it. Asynchronous because a remote backend has to ask.
    fn capacity(&self) -> BlockerFuture<'_, Capacity>;

    /// Which backend this is (see [`BackendId`]); fixed when the blocker is opened.
    fn identity(&self) -> BackendId;
}

/// Check that a byte range fits in u64 arithmetic, once, for every backend.
pub(crate) fn check_range(
    object: &ObjectName,
    offset: u64,
    len: usize,
) -> Result<u64, BlockerError> {
    offset
        .checked_add(len as u64)
        .filter(|end| *end <= i64::MAX as u64)
        .ok_or_else(|| BlockerError::InvalidRange {
            object: object.to_string(),
            offset,
            length: len as u64,
        })
}

/// Check a fence against the current lock state.
pub(crate) fn check_fence(fence: &Fence, state: &LockInfo) -> Result<(), BlockerError> {
    if state.holder.as_ref() == Some(&fence.owner) && state.generation == fence.generation {
        Ok(())
    } else {
        Err(BlockerError::Fenced {
            lock: fence.lock.to_string(),
            owner: fence.owner.to_string(),
            generation: fence.generation,
        })
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod conformance;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_one_pass_check_agrees_with_the_rules_one_by_one() {
        // Every name of up to 5 bytes over an alphabet that hits each rule.
        let alphabet = ["a", "Z", "0", ".", "-", "_", "/", "\0", "é", "k"];
        let mut names = vec![String::new()];
        let mut frontier = names.clone();
        for _ in 0..5 {
            frontier = frontier
                .iter()
                .flat_map(|n| alphabet.iter().map(move |c| format!("{n}{c}")))
                .collect();
            names.extend(frontier.iter().cloned());
        }
        names.extend([
            "x.tmp".to_string(),
            "x.lock".into(),
            "a".repeat(200),
            "a".repeat(201),
        ]);
        for n in &names {
            assert_eq!(valid_in_one_pass(n), reason(n).is_none(), "{n:?}");
        }
    }

    #[test]
    fn names_accept_the_mapper_namespaces() {
        for ok in [
            "vol.db-1",
            "pg.0123456789abcdef0123456789abcdef.00000001",
            "ct.e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "a",
            "A_b-c.d",
        ] {
            assert!(ObjectName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_refuse_traversal_nul_overlong_and_reserved() {
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "a\0b",
            ".hidden",
            "-opt",
            "x.tmp",
            "x.lock",
            "a..b",
            "sp ace",
            "uni\u{e9}",
            &long,
        ] {
            let err = ObjectName::new(bad).unwrap_err();
            assert!(
                matches!(err, BlockerError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(ObjectName::new("a".repeat(MAX_NAME_LEN)).is_ok());
    }

    #[test]
    fn owners_are_validated() {
        assert!(LockOwner::new("node-1:mapper@host").is_ok());
        assert!(LockOwner::new("").is_err());
        assert!(LockOwner::new("a/b").is_err());
        assert!(LockOwner::new("x".repeat(MAX_OWNER_LEN + 1)).is_err());
    }

    #[test]
    fn expect_admits() {
        assert!(Expect::Absent.admits(None));
        assert!(!Expect::Absent.admits(Some(1)));
        assert!(Expect::Version(3).admits(Some(3)));
        assert!(!Expect::Version(3).admits(Some(4)));
        assert!(!Expect::Version(3).admits(None));
        assert!(Expect::Any.admits(None) && Expect::Any.admits(Some(9)));
    }
}
