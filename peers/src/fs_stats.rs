//! `statvfs(3)`, safely: the sizes and free space of the filesystem holding a path or an open
//! file, for the file blocker's capacity and the CSI node's volume stats.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A filesystem's counts, as `statvfs` reports them. Block counts are in units of
/// [`block`](Self::block) bytes (`f_frsize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    pub block: u64,
    pub blocks: u64,
    pub blocks_free: u64,
    /// Free blocks an unprivileged writer may use (`f_bavail`): what decides whether data fits.
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub files_available: u64,
}

impl FsStats {
    /// Size of the filesystem in bytes (saturating).
    pub fn total_bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block)
    }

    /// Bytes an unprivileged writer may still use, never more than the total.
    pub fn available_bytes(&self) -> u64 {
        self.blocks_available
            .saturating_mul(self.block)
            .min(self.total_bytes())
    }
}

/// The filesystem holding `path`.
pub fn of_path(path: &Path) -> io::Result<FsStats> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `p` is NUL-terminated and lives for the call; `st` points to writable memory of
    // the right type, which statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(p.as_ptr(), st.as_mut_ptr()) };
    finish(rc, st)
}

/// The filesystem holding the open `file`: no path lookup, so it cannot race a rename.
pub fn of_file(file: &File) -> io::Result<FsStats> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `file` owns an open descriptor for the whole call and `st` points to writable
    // memory of the right type, which fstatvfs fills when it returns 0.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    finish(rc, st)
}

fn finish(rc: libc::c_int, st: MaybeUninit<libc::statvfs>) -> io::Result<FsStats> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    Ok(FsStats {
        block: st.f_frsize,
        blocks: st.f_blocks,
        blocks_free: st.f_bfree,
        blocks_available: st.f_bavail,
        files: st.f_files,
        files_free: st.f_ffree,
        files_available: st.f_favail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_open_file_agree_on_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let by_path = of_path(dir.path()).unwrap();
        let by_file = of_file(&File::open(dir.path()).unwrap()).unwrap();
        assert!(by_path.block > 0);
        assert!(by_path.total_bytes() > 0);
        assert!(by_path.available_bytes() <= by_path.total_bytes());
        assert_eq!(by_path.blocks, by_file.blocks);
        assert_eq!(by_path.block, by_file.block);
        assert!(of_path(&dir.path().join("missing")).is_err());
        assert!(of_path(Path::new("a\0b")).is_err());
    }
}
