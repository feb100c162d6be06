//! Reading the mount table and making/undoing bind mounts: what is mounted where, and by which
//! ublk device.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use csi::errors::{CsiError, CsiResult};

use super::io_err;
use crate::devices::DeviceRecord;

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// `major:minor` of the mounted filesystem's device.
    pub dev: String,
    /// The root of the mount within its filesystem (`/ublkb0` for a bound device node).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro` first).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl MountInfo {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

pub(super) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            if sep < 6 || f.len() < sep + 3 {
                return None;
            }
            Some(MountInfo {
                dev: f[2].to_owned(),
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_owned(),
                fstype: f[sep + 1].to_owned(),
                source: unescape(f[sep + 2]),
            })
        })
        .collect()
}

pub(super) fn mounts() -> CsiResult<Vec<MountInfo>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if any.
pub(super) fn mount_at(path: &Path) -> CsiResult<Option<MountInfo>> {
    Ok(top_mount(&mounts()?, path).cloned())
}

/// The topmost mount at `path` in `all`.
pub(super) fn top_mount<'a>(all: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    let canon = canonical(path);
    all.iter()
        .rev()
        .find(|m| m.mount_point == canon || m.mount_point == path)
}

pub(super) fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Whether mount `m` shows device `rec` (a filesystem on it, or its node bound onto a file).
pub(super) fn mount_uses(m: &MountInfo, rec: &DeviceRecord) -> bool {
    let dev = rec.block_device();
    m.source == dev.to_string_lossy()
        || m.root == format!("/ublkb{}", rec.dev_id)
        || bound_loop(m)
            .is_some_and(|l| loop_backing(&l).as_deref() == Some(&*dev.to_string_lossy()))
}

/// The loop device (`loopN`) whose node `m` binds, if any: read-only block publications.
pub(super) fn bound_loop(m: &MountInfo) -> Option<String> {
    let name = m.root.strip_prefix('/')?;
    (name.starts_with("loop") && name[4..].bytes().all(|b| b.is_ascii_digit()) && name.len() > 4)
        .then(|| name.to_owned())
}

pub(super) fn loop_backing(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub(super) fn cstr(p: &Path) -> CsiResult<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| CsiError::InvalidArgument(format!("{} contains a NUL byte", p.display())))
}

pub(super) fn bind(src: &Path, dst: &Path, read_only: bool) -> CsiResult<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: valid NUL-terminated strings; null fstype and data are allowed for MS_BIND.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(CsiError::Internal(format!(
            "bind mount {} on {}: {}",
            src.display(),
            dst.display(),
            std::io::Error::last_os_error()
        )));
    }
    if read_only {
        // SAFETY: as above; a remount of the bind just made.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = umount(dst);
            return Err(CsiError::Internal(format!(
                "read-only remount of {}: {e}",
                dst.display()
            )));
        }
    }
    Ok(())
}

pub(super) fn umount(path: &Path) -> CsiResult<()> {
    let p = cstr(path)?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(p.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(CsiError::Internal(format!(
                "umount {}: {e}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Unmounts everything stacked at `path`.
pub(super) fn umount_all(path: &Path) -> CsiResult<()> {
    for _ in 0..16 {
        if mount_at(path)?.is_none() {
            return Ok(());
        }
        umount(path)?;
    }
    Err(CsiError::Internal(format!(
        "{} is still mounted after 16 unmounts",
        path.display()
    )))
}

/// How an error message names a mount's access.
pub(super) fn rw_word(read_only: bool) -> &'static str {
    if read_only { "read-only" } else { "read-write" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 0:5 /ublkb3 /var/lib/k/pv rw shared:9 - devtmpfs udev rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert!(!m[0].read_only());
        assert_eq!(m[1].root, "/ublkb3");
        let rec = DeviceRecord {
            dev_id: 3,
            volume: "v".into(),
            segment: "s".into(),
            pid: 1,
            pid_start: 1,
            queues: 1,
            depth: 1,
            logical_block_size: 512,
            user_copy: false,
            size: 0,
            shared: false,
        };
        assert!(mount_uses(&m[1], &rec));
        assert!(!mount_uses(&m[0], &rec));
    }
}
