//! The spec's request rules, in one place.
//!
//! Every RPC checks its request with these helpers before acting, so a
//! field is distrusted once, at the boundary, and each failure is reported
//! as the [`CsiError`] the spec prescribes for it (INVALID_ARGUMENT, mostly).

use std::collections::HashMap;

use crate::errors::{CsiError, CsiResult};
use crate::pb::VolumeCapability;
use crate::pb::volume_capability::{self, access_mode::Mode};

/// Default limit on a string field: names, volume and snapshot ids.
pub const MAX_STRING_BYTES: usize = 128;
/// `node_id` is allowed more than the default (128 recommended).
pub const MAX_NODE_ID_BYTES: usize = 256;
/// Limit on a `map<string, string>` (keys plus values) and on `mount_flags`.
pub const MAX_MAP_BYTES: usize = 4096;
/// Paths only have to be accepted up to 128 bytes, but the SP should take
/// what the OS takes; kubelet paths easily exceed 128 bytes.
pub const MAX_PATH_BYTES: usize = 4096;

/// Checks a CO-chosen name (CreateVolume, CreateSnapshot, group snapshots):
/// required, at most 128 bytes, and free of the control characters the
/// spec bans (everything but common whitespace).
pub fn check_name(field: &str, value: &str) -> CsiResult<()> {
    check_string(field, value, MAX_STRING_BYTES)?;
    if let Some(c) = value.chars().find(|&c| is_banned_in_name(c)) {
        return Err(CsiError::InvalidArgument(format!(
            "{field} contains the control character U+{:04X}, which CSI forbids in names",
            c as u32
        )));
    }
    Ok(())
}

fn is_banned_in_name(c: char) -> bool {
    matches!(c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F)
}

/// Checks a volume, snapshot or group snapshot id: required, at most 128
/// bytes. Ids are ours, so anything else wrong with one means "not found",
/// which the caller decides after the lookup.
pub fn check_id(field: &str, value: &str) -> CsiResult<()> {
    check_string(field, value, MAX_STRING_BYTES)
}

/// Checks a node id: required, at most 256 bytes.
pub fn check_node_id(field: &str, value: &str) -> CsiResult<()> {
    check_string(field, value, MAX_NODE_ID_BYTES)
}

/// Checks a staging or target path: required, absolute, bounded, no NUL.
pub fn check_path(field: &str, value: &str) -> CsiResult<()> {
    check_string(field, value, MAX_PATH_BYTES)?;
    if !value.starts_with('/') {
        return Err(CsiError::InvalidArgument(format!(
            "{field} must be an absolute path, got {value:?}"
        )));
    }
    if value.contains('\0') {
        return Err(CsiError::InvalidArgument(format!(
            "{field} contains a NUL byte"
        )));
    }
    Ok(())
}

fn check_string(field: &str, value: &str, max: usize) -> CsiResult<()> {
    if value.is_empty() {
        return Err(CsiError::missing(field));
    }
    if value.len() > max {
        return Err(CsiError::InvalidArgument(format!(
            "{field} is {} bytes long, the limit is {max}",
            value.len()
        )));
    }
    Ok(())
}

/// Checks a string map (parameters, contexts) against the 4 KiB limit.
pub fn check_map(field: &str, map: &HashMap<String, String>) -> CsiResult<()> {
    let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_MAP_BYTES {
        return Err(CsiError::InvalidArgument(format!(
            "{field} holds {size} bytes, the limit is {MAX_MAP_BYTES}"
        )));
    }
    Ok(())
}

/// Checks a secrets map: the size limit, and keys made only of
/// alphanumerics, '-', '_' and '.'. Error messages name the offending key
/// but never a value.
pub fn check_secrets(field: &str, secrets: &HashMap<String, String>) -> CsiResult<()> {
    check_map(field, secrets)?;
    for key in secrets.keys() {
        let ok = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(CsiError::InvalidArgument(format!(
                "{field} has an invalid key {key:?}: only alphanumerics, '-', '_' and '.' are allowed"
            )));
        }
    }
    Ok(())
}

/// How a volume is to be accessed, once a [`VolumeCapability`] has been
/// checked for the fields the spec requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Block device or filesystem.
    pub kind: AccessKind,
    /// Never [`Mode::Unknown`].
    pub mode: Mode,
}

/// The `access_type` oneof, made total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessKind {
    /// Raw block device.
    Block,
    /// Filesystem; an empty `fs_type` means "the driver's default".
    Mount {
        /// Filesystem type, possibly empty.
        fs_type: String,
        /// Mount options; may be sensitive, so not for logs.
        mount_flags: Vec<String>,
        /// Group that should own the filesystem, possibly empty.
        volume_mount_group: String,
    },
}

/// Whether an access mode lets more than one node hold the volume at once.
pub fn is_multi_node_mode(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    )
}

/// Filesystems the node service can create and grow.
pub const SUPPORTED_FS_TYPES: &[&str] = &["ext4", "xfs"];

impl Access {
    /// Checks the structure the spec requires: an access type and a known
    /// access mode. Any failure is INVALID_ARGUMENT.
    pub fn from_capability(field: &str, cap: &VolumeCapability) -> CsiResult<Self> {
        let kind = match &cap.access_type {
            Some(volume_capability::AccessType::Block(_)) => AccessKind::Block,
            Some(volume_capability::AccessType::Mount(m)) => {
                let flags: usize = m.mount_flags.iter().map(String::len).sum();
                if flags > MAX_MAP_BYTES {
                    return Err(CsiError::InvalidArgument(format!(
                        "{field}.mount.mount_flags hold {flags} bytes, the limit is {MAX_MAP_BYTES}"
                    )));
                }
                AccessKind::Mount {
                    fs_type: m.fs_type.clone(),
                    mount_flags: m.mount_flags.clone(),
                    volume_mount_group: m.volume_mount_group.clone(),
                }
            }
            None => {
                return Err(CsiError::InvalidArgument(format!(
                    "{field} needs an access type (block or mount)"
                )));
            }
        };
        let mode = cap
            .access_mode
            .as_ref()
            .ok_or_else(|| CsiError::missing(&format!("{field}.access_mode")))?
            .mode;
        let mode = Mode::try_from(mode).map_err(|_| {
            CsiError::InvalidArgument(format!("{field}.access_mode has unknown mode {mode}"))
        })?;
        if mode == Mode::Unknown {
            return Err(CsiError::missing(&format!("{field}.access_mode.mode")));
        }
        Ok(Access { kind, mode })
    }

    /// Whether this is raw block access.
    pub fn is_block(&self) -> bool {
        self.kind == AccessKind::Block
    }

    /// Whether the mode lets the volume be published on several nodes.
    pub fn is_multi_node(&self) -> bool {
        is_multi_node_mode(self.mode)
    }

    /// Whether the mode forbids writing altogether.
    pub fn is_read_only(&self) -> bool {
        matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }

    /// Why Archipelago cannot serve this access, or `None` if it can.
    ///
    /// Several writers on several nodes is offered for raw block only: it
    /// exists for the KubeVirt live-migration handover, where the volume
    /// lock lets one writer at a time through. A filesystem mounted on two
    /// nodes would be corrupted. The caller picks the gRPC code, because
    /// the spec gives different ones per RPC (INVALID_ARGUMENT for
    /// CreateVolume, FAILED_PRECONDITION for the node RPCs).
    pub fn unsupported_reason(&self) -> Option<String> {
        match (&self.kind, self.mode) {
            (_, Mode::MultiNodeSingleWriter) => {
                Some("access mode MULTI_NODE_SINGLE_WRITER is not supported".to_owned())
            }
            (AccessKind::Mount { .. }, Mode::MultiNodeMultiWriter) => Some(
                "access mode MULTI_NODE_MULTI_WRITER is supported for block volumes only"
                    .to_owned(),
            ),
            (AccessKind::Mount { fs_type, .. }, _)
                if !fs_type.is_empty() && !SUPPORTED_FS_TYPES.contains(&fs_type.as_str()) =>
            {
                Some(format!(
                    "filesystem {fs_type:?} is not supported (use one of {SUPPORTED_FS_TYPES:?})"
                ))
            }
            _ => None,
        }
    }
}

/// Checks a required list of capabilities and returns them parsed.
pub fn check_capabilities(field: &str, caps: &[VolumeCapability]) -> CsiResult<Vec<Access>> {
    if caps.is_empty() {
        return Err(CsiError::missing(field));
    }
    caps.iter()
        .enumerate()
        .map(|(i, cap)| Access::from_capability(&format!("{field}[{i}]"), cap))
        .collect()
}

/// Checks a single required capability (publish, stage, expand).
pub fn check_capability(field: &str, cap: Option<&VolumeCapability>) -> CsiResult<Access> {
    let cap = cap.ok_or_else(|| CsiError::missing(field))?;
    Access::from_capability(field, cap)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::pb::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};

    fn cap(kind: AccessType, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(kind),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> AccessType {
        AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            ..Default::default()
        })
    }

    #[test]
    fn names_follow_the_size_limit_in_bytes() {
        assert_eq!(check_name("name", ""), Err(CsiError::missing("name")));
        assert!(check_name("name", &"a".repeat(128)).is_ok());
        let err = check_name("name", &"a".repeat(129)).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        // 43 three-byte characters: 43 chars but 129 bytes.
        assert!(check_name("name", &"€".repeat(43)).is_err());
        assert!(check_name("name", &"€".repeat(42)).is_ok());
    }

    #[test]
    fn names_reject_banned_control_characters_only() {
        for bad in ["a\u{0}b", "a\u{8}", "\u{b}", "\u{1f}", "x\u{7f}", "\u{9f}"] {
            assert!(check_name("name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["pvc-1 2", "tab\tok", "nl\nok", "cr\rok", "ünïcödé"] {
            assert!(check_name("name", good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn node_ids_and_paths_have_their_own_limits() {
        assert!(check_node_id("node_id", &"n".repeat(256)).is_ok());
        assert!(check_node_id("node_id", &"n".repeat(257)).is_err());
        assert!(check_id("volume_id", &"v".repeat(129)).is_err());
        let long = format!("/{}", "p".repeat(300));
        assert!(check_path("target_path", &long).is_ok());
        assert!(check_path("target_path", "relative/dir").is_err());
        assert!(check_path("target_path", "/a\0b").is_err());
        assert_eq!(
            check_path("target_path", ""),
            Err(CsiError::missing("target_path"))
        );
    }

    #[test]
    fn maps_and_secret_keys() {
        let mut m = HashMap::new();
        m.insert("k".to_owned(), "v".repeat(4095));
        assert!(check_map("parameters", &m).is_ok());
        m.insert("k2".to_owned(), String::new());
        assert!(check_map("parameters", &m).is_err());

        let mut s = HashMap::new();
        s.insert("userID".to_owned(), "admin".to_owned());
        s.insert("key-1_a.b".to_owned(), "AQD...".to_owned());
        assert!(check_secrets("secrets", &s).is_ok());
        s.insert("bad key".to_owned(), "hunter2".to_owned());
        let err = check_secrets("secrets", &s).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn capability_structure_is_required() {
        let none = VolumeCapability {
            access_type: None,
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_eq!(
            Access::from_capability("c", &none).unwrap_err().code(),
            Code::InvalidArgument
        );
        let unknown = cap(AccessType::Block(BlockVolume {}), Mode::Unknown);
        assert!(Access::from_capability("c", &unknown).is_err());
        let bogus = VolumeCapability {
            access_mode: Some(AccessMode { mode: 42 }),
            ..unknown.clone()
        };
        assert!(Access::from_capability("c", &bogus).is_err());
        assert_eq!(
            check_capabilities("volume_capabilities", &[]),
            Err(CsiError::missing("volume_capabilities"))
        );
        assert_eq!(
            check_capability("volume_capability", None),
            Err(CsiError::missing("volume_capability"))
        );
    }

    #[test]
    fn multi_writer_only_for_block() {
        let block = Access::from_capability(
            "c",
            &cap(
                AccessType::Block(BlockVolume {}),
                Mode::MultiNodeMultiWriter,
            ),
        )
        .unwrap();
        assert!(block.is_block() && block.is_multi_node());
        assert_eq!(block.unsupported_reason(), None);

        let fs =
            Access::from_capability("c", &cap(mount("ext4"), Mode::MultiNodeMultiWriter)).unwrap();
        assert!(fs.unsupported_reason().is_some());

        let rox = Access::from_capability("c", &cap(mount(""), Mode::MultiNodeReaderOnly)).unwrap();
        assert!(rox.is_read_only() && rox.unsupported_reason().is_none());

        let btrfs =
            Access::from_capability("c", &cap(mount("btrfs"), Mode::SingleNodeWriter)).unwrap();
        assert!(btrfs.unsupported_reason().unwrap().contains("btrfs"));
    }
}
