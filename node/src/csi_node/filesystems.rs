//! Filesystems on a staged device: probing what is on it, mkfs, mounting, growing, and the
//! volume mount group.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use csi::errors::{CsiError, CsiResult};
use csi::validate::{Access, AccessKind};

use super::{BLANK_CHECK_BYTES, io_err, run, run_ok};

/// What is on a device, as far as it matters for formatting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Zeros at the head and no signature.
    Blank,
    /// A filesystem of this type.
    Filesystem(String),
    /// A partition table, another signature, or unrecognised non-zero data.
    Other(String),
}

pub(super) fn probe(dev: &Path) -> CsiResult<Content> {
    let d = dev.to_string_lossy();
    let out = run("blkid", &["-p", "-o", "export", &d])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tag = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_owned))
    };
    match out.status.code() {
        Some(0) => {}
        Some(2) => {
            // Nothing identified: blank only if the head is all zeros.
            let mut f = std::fs::File::open(dev).map_err(io_err(format!("opening {d}")))?;
            let mut buf = vec![0u8; BLANK_CHECK_BYTES];
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(CsiError::Internal(format!("reading {d}: {e}"))),
                }
            }
            return Ok(if buf[..n].iter().all(|&b| b == 0) {
                Content::Blank
            } else {
                Content::Other("unrecognised data".into())
            });
        }
        _ => {
            return Err(CsiError::Internal(format!(
                "blkid -p {d}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    if let Some(t) = tag("TYPE=") {
        if tag("USAGE=").is_none_or(|u| u == "filesystem") {
            return Ok(Content::Filesystem(t));
        }
        return Ok(Content::Other(format!("a {t} signature")));
    }
    if let Some(pt) = tag("PTTYPE=") {
        return Ok(Content::Other(format!("a {pt} partition table")));
    }
    Ok(Content::Other("an unknown signature".into()))
}

pub(super) fn mkfs(fs: &str, dev: &Path) -> CsiResult<()> {
    let d = dev.to_string_lossy();
    match fs {
        "ext4" => run_ok("mkfs.ext4", &["-q", "-F", &d]),
        "xfs" => run_ok("mkfs.xfs", &["-q", &d]),
        other => Err(CsiError::FailedPrecondition(format!(
            "cannot make a {other} filesystem"
        ))),
    }
}

pub(super) fn mount_fs(dev: &Path, target: &Path, fs: &str, flags: &[String]) -> CsiResult<()> {
    let d = dev.to_string_lossy();
    let t = target.to_string_lossy();
    let mut flags = flags.to_vec();
    // A clone (or a snapshot's copy) of an xfs volume carries its origin's UUID, and xfs
    // refuses a second mount of one UUID: without nouuid the two could not be staged together.
    if fs == "xfs" && !flags.iter().any(|f| f == "nouuid") {
        flags.push("nouuid".into());
    }
    let opts = flags.join(",");
    let mut args = vec!["-t", fs];
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([&*d, &*t]);
    run_ok("mount", &args)
}

pub(super) fn grow_fs(fs: &str, dev: &Path, mount_point: &Path) -> CsiResult<()> {
    match fs {
        "ext4" | "ext3" | "ext2" => run_ok("resize2fs", &[&dev.to_string_lossy()]),
        "xfs" => run_ok("xfs_growfs", &[&mount_point.to_string_lossy()]),
        other => Err(CsiError::FailedPrecondition(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
}

/// The `volume_mount_group` of a mount capability as a gid: `None` when empty or block.
pub fn mount_group(access: &Access) -> CsiResult<Option<u32>> {
    let AccessKind::Mount {
        volume_mount_group: g,
        ..
    } = &access.kind
    else {
        return Ok(None);
    };
    if g.is_empty() {
        return Ok(None);
    }
    match g.parse::<u32>() {
        // (gid_t)-1 means "leave the group alone" to chown, so it cannot name a group.
        Ok(gid) if gid != u32::MAX && g.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(gid)),
        _ => Err(CsiError::InvalidArgument(format!(
            "volume_capability.mount.volume_mount_group {g:?} is not a numeric group id"
        ))),
    }
}

/// Gives the filesystem root at `root` to group `gid`, group-writable and setgid (so that
/// new entries inherit the group). Does nothing when it is so already.
pub(super) fn apply_mount_group(root: &Path, gid: u32) -> CsiResult<()> {
    let meta = std::fs::metadata(root).map_err(io_err(root.display()))?;
    const BITS: u32 = libc::S_ISGID | libc::S_IRWXG;
    if meta.gid() != gid {
        std::os::unix::fs::chown(root, None, Some(gid))
            .map_err(io_err(format!("chgrp {gid} {}", root.display())))?;
    }
    // chown clears setgid on some filesystems, so the mode is looked at afresh.
    let mode = std::fs::metadata(root)
        .map_err(io_err(root.display()))?
        .mode();
    if mode & BITS != BITS {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root,
            std::fs::Permissions::from_mode((mode | BITS) & 0o7777),
        )
        .map_err(io_err(format!("chmod g+rwxs {}", root.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::mount_access;
    use super::*;
    use csi::pb::volume_capability::access_mode::Mode;
    use csi::validate::AccessKind;

    #[test]
    fn mount_groups_are_numeric_gids() {
        let g = |s: &str| mount_group(&mount_access(s, Mode::SingleNodeWriter));
        assert_eq!(g("").unwrap(), None);
        assert_eq!(g("0").unwrap(), Some(0));
        assert_eq!(g("2000").unwrap(), Some(2000));
        assert_eq!(g("4294967294").unwrap(), Some(u32::MAX - 1));
        for bad in [
            "staff",
            "-1",
            "+1",
            "1 ",
            "0x10",
            "4294967295",
            "4294967296",
        ] {
            assert!(
                matches!(g(bad), Err(CsiError::InvalidArgument(_))),
                "{bad:?} accepted"
            );
        }
        let block = Access {
            kind: AccessKind::Block,
            mode: Mode::SingleNodeWriter,
        };
        assert_eq!(mount_group(&block).unwrap(), None);
    }
}
