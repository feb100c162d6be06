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
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Layout version of the state file; a file of another version is refused, never guessed at.
const STATE_VERSION: u32 = 1;

/// Environment variable that overrides [`DeviceTable::default_path`].
pub const STATE_ENV: &str = "ARCHIP_UBLK_STATE";

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

    /// Whether `target` names this device: `/dev/ublkbN`, `ublkbN`, `N`, or the volume name.
    pub fn matches(&self, target: &str) -> bool {
        parse_device(target) == Some(self.dev_id) || target == self.volume
    }
}

/// The device id in `/dev/ublkbN`, `ublkbN` or `N`.
pub fn parse_device(target: &str) -> Option<u32> {
    let t = target.strip_prefix("/dev/").unwrap_or(target);
    let t = t.strip_prefix("ublkb").unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
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

    /// `$ARCHIP_UBLK_STATE`, else `/run/archip/ublk-devices.json`.
    pub fn default_path() -> PathBuf {
        std::env::var_os(STATE_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/archip/ublk-devices.json"))
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
            std::fs::create_dir_all(dir).map_err(|e| self.io_err(e))?;
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
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
        if text.trim().is_empty() {
            return Ok(StateDoc::default());
        }
        let doc: StateDoc =
            serde_json::from_str(&text).map_err(|source| DevicesError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if doc.version != STATE_VERSION {
            return Err(DevicesError::Version {
                path: self.path.clone(),
                found: doc.version,
            });
        }
        Ok(doc)
    }

    fn write_doc(&self, doc: &StateDoc) -> Result<(), DevicesError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let text = serde_json::to_vec_pretty(doc).expect("state serialises");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
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

    /// The record that `target` names (device path, device id or volume name).
    pub fn find(&self, target: &str) -> Result<Option<DeviceRecord>, DevicesError> {
        Ok(self.load()?.into_iter().find(|d| d.matches(target)))
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
    fn parse_device_names() {
        assert_eq!(parse_device("/dev/ublkb3"), Some(3));
        assert_eq!(parse_device("ublkb12"), Some(12));
        assert_eq!(parse_device("7"), Some(7));
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
        assert_eq!(t.find("db").unwrap().unwrap().dev_id, 1);
        assert_eq!(t.find("/dev/ublkb0").unwrap().unwrap().volume, "web");
        assert!(t.find("nothing").unwrap().is_none());
        // Replacing keeps one record per device id.
        let mut again = rec(1, "db2");
        again.size = 5;
        t.insert(again.clone()).unwrap();
        assert_eq!(t.find("1").unwrap().unwrap(), again);
        assert_eq!(t.load().unwrap().len(), 2);
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
