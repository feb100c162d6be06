//! Device bookkeeping: which ublk device serves which volume, and which process serves it.
//!
//! The kernel keeps a ublk device (and the I/O queued on it) alive when its server process
//! dies, but it does not know what the device *was*: a restarted server needs the volume name,
//! the segment and the device shape to take it over. That lives here, in a small JSON file that
//! every `map`, `unmap` and server start/stop updates under an exclusive `flock`, written
//! atomically (temporary file, fsync, rename) so a crash mid-update never leaves half a file.
//!
//! The default place is `/run/archip/ublk-devices.json`: `/run` has exactly the lifetime of the
//! kernel's devices (it is emptied at boot, when they are gone too).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Layout version of the state file; a file of another version is refused, never guessed at.
const STATE_VERSION: u32 = 1;

/// Where the table lives unless the entry point passes another path (`--state`,
/// `ARCHIP_UBLK_STATE`).
pub const DEFAULT_PATH: &str = "/run/archip/ublk-devices.json";

#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    #[error("device state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device state file {path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("device state file {path} has version {found}, this binary reads {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// One mapped device, as recorded when its server started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// ublk device id: the N of `/dev/ublkbN` and `/dev/ublkcN`.
    pub dev_id: u32,
    pub volume: String,
    /// The xseg segment (path) the server attaches to.
    pub segment: String,
    /// The serving process and its start time (clock ticks since boot, from /proc), so that a
    /// recycled pid is not mistaken for the server.
    pub pid: u32,
    pub pid_start: u64,
    pub queues: u16,
    pub depth: u16,
    pub logical_block_size: u32,
    /// Whether data moves by `UBLK_F_USER_COPY` (one copy) rather than through per-tag buffers.
    pub user_copy: bool,
    /// Device size in bytes when it was recorded (online resize updates it).
    pub size: u64,
    /// Opened shared (multi-node block, live migration); records from before this field
    /// existed were exclusive.
    #[serde(default)]
    pub shared: bool,
}

impl DeviceRecord {
    pub fn block_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Whether the recorded server process is still the one running.
    pub fn server_alive(&self) -> bool {
        xseg::owner::ProcessId {
            pid: self.pid,
            start: self.pid_start,
        }
        .is_alive()
    }

    /// Whether `target` names this device.
    pub fn matches(&self, target: &Target) -> bool {
        match target {
            Target::Device(id) => self.dev_id == *id,
            Target::Volume(v) => self.volume == *v,
        }
    }
}

/// What a user or a caller means by "this mapping": a device or a volume, never a guess.
///
/// A volume may be named `1`, so a string that could be either is ambiguous; matching both
/// made `archip map b` print the device of volume `1`. The one rule: only `/dev/ublkbN` or
/// `ublkbN` (or an explicit device id) means a device; anything else, a bare number
/// included, is a volume name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Device(u32),
    Volume(String),
}

impl Target {
    /// Parses user input by the rule above.
    pub fn parse(input: &str) -> Target {
        match parse_device(input) {
            Some(id) => Target::Device(id),
            None => Target::Volume(input.to_owned()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Device(id) => write!(f, "/dev/ublkb{id}"),
            Target::Volume(v) => write!(f, "volume {v}"),
        }
    }
}

/// The device id in `/dev/ublkbN` or `ublkbN`; a bare `N` is not a device path.
pub fn parse_device(target: &str) -> Option<u32> {
    let t = target.strip_prefix("/dev/").unwrap_or(target);
    let t = t.strip_prefix("ublkb")?;
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// Decodes the text of a state file read from `path` (named in errors): an empty file is an
/// empty table; anything else must be a document of this version. Public so that the fuzz
/// target runs exactly this.
pub fn decode_state(path: &Path, text: &str) -> Result<Vec<DeviceRecord>, DevicesError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let doc: StateDoc = serde_json::from_str(text).map_err(|source| DevicesError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    if doc.version != STATE_VERSION {
        return Err(DevicesError::Version {
            path: path.to_owned(),
            found: doc.version,
        });
    }
    Ok(doc.devices)
}

#[derive(Default, Serialize, Deserialize)]
struct StateDoc {
    version: u32,
    devices: Vec<DeviceRecord>,
}

/// The state file. Cheap to construct; every operation opens, locks and closes the file.
#[derive(Clone, Debug)]
pub struct DeviceTable {
    path: PathBuf,
}

impl DeviceTable {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DeviceTable { path: path.into() }
    }

    /// [`DEFAULT_PATH`].
    pub fn default_path() -> PathBuf {
        PathBuf::from(DEFAULT_PATH)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, source: std::io::Error) -> DevicesError {
        DevicesError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Takes the exclusive lock (on a sibling `.lock` file, so that the rename of the data file
    /// never races with a lock holder).
    fn lock(&self) -> Result<File, DevicesError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            peers::private::create_dir_all(dir).map_err(|e| self.io_err(e))?;
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(peers::private::FILE_MODE)
            .open(&lock_path)
            .map_err(|e| self.io_err(e))?;
        peers::flock::lock(&f, peers::flock::LockMode::Exclusive).map_err(|e| self.io_err(e))?;
        Ok(f)
    }

    fn read_doc(&self) -> Result<StateDoc, DevicesError> {
        let mut text = String::new();
        match File::open(&self.path) {
            Ok(mut f) => {
                f.read_to_string(&mut text).map_err(|e| self.io_err(e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StateDoc::default()),
            Err(e) => return Err(self.io_err(e)),
        }
        Ok(StateDoc {
            version: STATE_VERSION,
            devices: decode_state(&self.path, &text)?,
        })
    }

    fn write_doc(&self, doc: &StateDoc) -> Result<(), DevicesError> {
        // A unique name created exclusively, never through a link: `/run/archip` may be
        // reachable by others, and a predictable name could be planted in advance.
        let tmp = peers::private::temp_name(&self.path);
        let text = serde_json::to_vec_pretty(doc).expect("state serialises");
        let write = || -> std::io::Result<()> {
            let mut f = peers::private::create_new_file(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io_err(e)
        })
    }

    /// All records (a missing file is an empty table).
    pub fn load(&self) -> Result<Vec<DeviceRecord>, DevicesError> {
        let _lock = self.lock()?;
        Ok(self.read_doc()?.devices)
    }

    /// Reads, changes and writes the table under the lock; the file is only rewritten when
    /// `f` changed something.
    pub fn update<R>(
        &self,
        f: impl FnOnce(&mut Vec<DeviceRecord>) -> R,
    ) -> Result<R, DevicesError> {
        let _lock = self.lock()?;
        let mut doc = self.read_doc()?;
        let before = doc.devices.clone();
        let r = f(&mut doc.devices);
        if doc.devices != before {
            doc.version = STATE_VERSION;
            doc.devices.sort_by_key(|d| d.dev_id);
            self.write_doc(&doc)?;
        }
        Ok(r)
    }

    /// Records a device, replacing any record of the same device id.
    pub fn insert(&self, rec: DeviceRecord) -> Result<(), DevicesError> {
        self.update(|devs| {
            devs.retain(|d| d.dev_id != rec.dev_id);
            devs.push(rec);
        })
    }

    /// Removes the record of `dev_id`, only if it still names server `pid` (when given): a
    /// server that exits must not remove the record its successor just wrote.
    pub fn remove(
        &self,
        dev_id: u32,
        pid: Option<u32>,
    ) -> Result<Option<DeviceRecord>, DevicesError> {
        self.update(|devs| {
            let i = devs
                .iter()
                .position(|d| d.dev_id == dev_id && pid.is_none_or(|p| d.pid == p))?;
            Some(devs.remove(i))
        })
    }

    /// The record that `target` names.
    pub fn find(&self, target: &Target) -> Result<Option<DeviceRecord>, DevicesError> {
        Ok(self.load()?.into_iter().find(|d| d.matches(target)))
    }

    /// The record of device `/dev/ublkb{dev_id}`.
    pub fn by_id(&self, dev_id: u32) -> Result<Option<DeviceRecord>, DevicesError> {
        self.find(&Target::Device(dev_id))
    }

    /// The record of the device serving `volume`.
    pub fn by_volume(&self, volume: &str) -> Result<Option<DeviceRecord>, DevicesError> {
        self.find(&Target::Volume(volume.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u32, vol: &str) -> DeviceRecord {
        DeviceRecord {
            dev_id: id,
            volume: vol.into(),
            segment: "/dev/shm/seg".into(),
            pid: std::process::id(),
            pid_start: xseg::owner::start_time(std::process::id()).unwrap(),
            queues: 2,
            depth: 64,
            logical_block_size: 512,
            user_copy: true,
            size: 1 << 30,
            shared: false,
        }
    }

    #[test]
    fn table_directory_and_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let path = base.path().join("run/ublk-devices.json");
        DeviceTable::new(&path).insert(rec(1, "v")).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&base.path().join("run")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        assert_eq!(mode(Path::new(&lock)), 0o600);
    }

    #[test]
    fn parse_device_names() {
        assert_eq!(parse_device("/dev/ublkb3"), Some(3));
        assert_eq!(parse_device("ublkb12"), Some(12));
        assert_eq!(parse_device("7"), None, "a bare number is a volume name");
        assert_eq!(parse_device("vol7"), None);
        assert_eq!(parse_device("/dev/ublkb"), None);
        assert_eq!(parse_device("/dev/ublkc1"), None);
        assert_eq!(parse_device(""), None);
    }

    #[test]
    fn table_round_trip_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let t = DeviceTable::new(dir.path().join("sub/state.json"));
        assert!(
            t.load().unwrap().is_empty(),
            "a missing file is an empty table"
        );
        t.insert(rec(1, "db")).unwrap();
        t.insert(rec(0, "web")).unwrap();
        let all = t.load().unwrap();
        assert_eq!(
            all.iter().map(|d| d.dev_id).collect::<Vec<_>>(),
            [0, 1],
            "sorted"
        );
        assert_eq!(t.by_volume("db").unwrap().unwrap().dev_id, 1);
        let dev0 = Target::parse("/dev/ublkb0");
        assert_eq!(t.find(&dev0).unwrap().unwrap().volume, "web");
        assert!(t.by_volume("nothing").unwrap().is_none());
        // Replacing keeps one record per device id.
        let mut again = rec(1, "db2");
        again.size = 5;
        t.insert(again.clone()).unwrap();
        assert_eq!(t.by_id(1).unwrap().unwrap(), again);
        assert_eq!(t.load().unwrap().len(), 2);
    }

    /// Issue 13: with volume `1` on device 0, looking up the new device 1 (by its number as a
    /// string) found volume `1`, and `archip map b` printed /dev/ublkb0.
    #[test]
    fn a_numeric_volume_name_is_not_a_device_number() {
        let dir = tempfile::tempdir().unwrap();
        let t = DeviceTable::new(dir.path().join("state.json"));
        t.insert(rec(0, "1")).unwrap();
        t.insert(rec(1, "b")).unwrap();
        assert_eq!(t.by_id(1).unwrap().unwrap().volume, "b");
        assert_eq!(t.by_volume("1").unwrap().unwrap().dev_id, 0);
        // Typed by a user, a bare number is a volume name; a device path is a device.
        assert_eq!(Target::parse("1"), Target::Volume("1".into()));
        assert_eq!(t.find(&Target::parse("1")).unwrap().unwrap().dev_id, 0);
        assert_eq!(Target::parse("/dev/ublkb1"), Target::Device(1));
        assert_eq!(
            t.find(&Target::parse("ublkb1")).unwrap().unwrap().volume,
            "b"
        );
    }

    #[test]
    fn remove_respects_the_successor() {
        let dir = tempfile::tempdir().unwrap();
        let t = DeviceTable::new(dir.path().join("state.json"));
        let r = rec(4, "v");
        t.insert(r.clone()).unwrap();
        // An old server (another pid) exiting leaves the new record alone.
        assert!(t.remove(4, Some(r.pid + 1)).unwrap().is_none());
        assert_eq!(t.load().unwrap().len(), 1);
        assert_eq!(t.remove(4, Some(r.pid)).unwrap(), Some(r));
        assert!(t.load().unwrap().is_empty());
    }

    #[test]
    fn corrupt_and_foreign_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        std::fs::write(&p, "{not json").unwrap();
        let t = DeviceTable::new(&p);
        assert!(matches!(t.load(), Err(DevicesError::Corrupt { .. })));
        std::fs::write(&p, r#"{"version": 99, "devices": []}"#).unwrap();
        assert!(matches!(
            t.load(),
            Err(DevicesError::Version { found: 99, .. })
        ));
    }

    #[test]
    fn liveness_uses_pid_and_start_time() {
        let mut r = rec(0, "v");
        assert!(r.server_alive());
        r.pid_start += 1;
        assert!(
            !r.server_alive(),
            "same pid, other start time: a recycled pid"
        );
        r.pid = u32::MAX - 1;
        assert!(!r.server_alive());
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let t = DeviceTable::new(dir.path().join("state.json"));
        std::thread::scope(|s| {
            for i in 0..8u32 {
                let t = t.clone();
                s.spawn(move || t.insert(rec(i, &format!("v{i}"))).unwrap());
            }
        });
        assert_eq!(t.load().unwrap().len(), 8);
    }
}
