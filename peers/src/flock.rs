//! `flock(2)` taken the one way every lock file here needs it: blocking, and retried when a
//! signal interrupts the wait (EINTR is not a failure to lock, only a pause in waiting).
//! The lock belongs to the open file description: closing the file, or the process dying,
//! releases it, which is why callers keep the `File` as their guard.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Who else may hold the lock at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Any number of shared holders, no exclusive one.
    Shared,
    /// One holder only.
    Exclusive,
}

/// Blocks until `file` holds the lock in `mode`.
pub fn lock(file: &File, mode: LockMode) -> io::Result<()> {
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY: `file` owns an open descriptor for the whole call; flock only takes a lock
        // on it and touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether another open file description could take the lock now.
    fn free_for(path: &std::path::Path, mode: LockMode) -> bool {
        let f = File::open(path).unwrap();
        let op = match mode {
            LockMode::Shared => libc::LOCK_SH,
            LockMode::Exclusive => libc::LOCK_EX,
        } | libc::LOCK_NB;
        // SAFETY: `f` owns an open descriptor for the whole call.
        unsafe { libc::flock(f.as_raw_fd(), op) == 0 }
    }

    #[test]
    fn modes_exclude_as_flock_says_and_close_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let held = File::create(&path).unwrap();
        lock(&held, LockMode::Shared).unwrap();
        assert!(free_for(&path, LockMode::Shared));
        assert!(!free_for(&path, LockMode::Exclusive));
        lock(&held, LockMode::Exclusive).unwrap();
        assert!(!free_for(&path, LockMode::Shared));
        drop(held);
        assert!(free_for(&path, LockMode::Exclusive));
    }
}
