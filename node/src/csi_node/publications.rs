//! The publication table: which targets a volume is published to on this node, with which
//! capability, kept in a file beside the device table (a mount does not show it).

use std::path::{Path, PathBuf};

use csi::errors::{CsiError, CsiResult};
use csi::pb::volume_capability::access_mode::Mode;
use csi::validate::{Access, AccessKind};
use serde::{Deserialize, Serialize};

use super::mounts::canonical;
use super::{DEFAULT_FS_TYPE, io_err};
use crate::devices::DeviceTable;

/// One publication of a volume on this node, as publish recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Publication {
    pub(super) target: PathBuf,
    /// `AccessMode.Mode` as its number.
    pub(super) mode: i32,
    pub(super) block: bool,
    pub(super) read_only: bool,
    /// FNV-1a of fs_type, mount flags and mount group: enough to tell two capabilities apart
    /// without writing the flags (which may hold secrets) to disk.
    pub(super) mount: u64,
}

pub(super) fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Whether a publication in `mode` may share this node with others (the spec's table:
/// MULTI_NODE modes; SINGLE_NODE_MULTI_WRITER by its definition).
pub(super) fn allows_many(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter
            | Mode::SingleNodeMultiWriter
    )
}

impl Publication {
    pub(super) fn new(target: &Path, access: &Access, read_only: bool) -> Publication {
        let mount = match &access.kind {
            AccessKind::Block => 0,
            AccessKind::Mount {
                fs_type,
                mount_flags,
                volume_mount_group,
            } => {
                let fs = if fs_type.is_empty() {
                    DEFAULT_FS_TYPE
                } else {
                    fs_type
                };
                let mut parts = vec![fs, volume_mount_group.as_str()];
                parts.extend(mount_flags.iter().map(String::as_str));
                fnv1a(&parts)
            }
        };
        Publication {
            target: canonical(target),
            mode: access.mode as i32,
            block: access.is_block(),
            read_only,
            mount,
        }
    }

    pub(super) fn mode(&self) -> Mode {
        Mode::try_from(self.mode).unwrap_or(Mode::Unknown)
    }
}

/// Where the publications of `volume` are recorded.
pub(super) fn publications_file(table: &DeviceTable, volume: &str) -> CsiResult<PathBuf> {
    if let Some(why) = peers::map_format::volume_name_problem(volume) {
        return Err(CsiError::InvalidArgument(format!(
            "volume name {volume:?}: {why}"
        )));
    }
    let path = table.path();
    let mut dir = path
        .file_name()
        .map_or_else(|| "devices".into(), |n| n.to_os_string());
    dir.push(".published");
    Ok(path.with_file_name(dir).join(format!("{volume}.json")))
}

pub(super) fn load_publications(file: &Path) -> CsiResult<Vec<Publication>> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| CsiError::Internal(format!("{} is corrupt: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(file.display())(e)),
    }
}

/// Writes the records atomically (a temporary file renamed over), or removes the file when
/// there are none.
pub(super) fn save_publications(file: &Path, pubs: &[Publication]) -> CsiResult<()> {
    if pubs.is_empty() {
        return match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(file.display())(e)),
            _ => Ok(()),
        };
    }
    if let Some(dir) = file.parent() {
        peers::private::create_dir_all(dir).map_err(io_err(dir.display()))?;
    }
    let tmp = peers::private::temp_name(file);
    let bytes = serde_json::to_vec(pubs)
        .map_err(|e| CsiError::Internal(format!("encoding publications: {e}")))?;
    let written = peers::private::create_new_file(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(tmp.display())(e));
    }
    std::fs::rename(&tmp, file).map_err(io_err(file.display()))
}

#[cfg(test)]
mod tests {
    use super::super::mount_access;
    use super::*;
    use crate::devices::DeviceTable;

    #[test]
    fn publications_tell_capabilities_apart() {
        let t = Path::new("/nonexistent/target");
        let a = Publication::new(t, &mount_access("", Mode::SingleNodeWriter), false);
        assert_eq!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("5", Mode::SingleNodeWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeMultiWriter), false)
        );
        assert_ne!(
            a,
            Publication::new(t, &mount_access("", Mode::SingleNodeWriter), true)
        );
        // Stable across builds: the records outlive a restart of the plugin.
        assert_eq!(fnv1a(&["ext4", "", "noatime"]), a.mount);
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert!(allows_many(Mode::SingleNodeMultiWriter) && allows_many(Mode::MultiNodeReaderOnly));
        assert!(!allows_many(Mode::SingleNodeWriter) && !allows_many(Mode::SingleNodeSingleWriter));
        assert!(!allows_many(Mode::SingleNodeReaderOnly));
        let table = DeviceTable::new("/run/x/devices.json");
        assert_eq!(
            publications_file(&table, "vol-1").unwrap(),
            Path::new("/run/x/devices.json.published/vol-1.json")
        );
        assert!(publications_file(&table, "../x").is_err());
    }
}
