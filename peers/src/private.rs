//! Owner-only files and directories: the one place that says which modes our data gets.
//!
//! Objects and maps hold every volume's data, records name every volume, and device tables
//! and logs say which device serves what; none of it is other local users' business, so
//! everything we create is 0700 (directories) or 0600 (files). A directory that already
//! exists is the administrator's choice: it is never chmodded behind their back, but a group-
//! or world-accessible one is reported, because it exposes whatever is put in it.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of the directories we create.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files we create.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents 0700; warns if `dir` already existed open to others.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            warn_if_shared(dir, meta.permissions().mode());
            Ok(())
        }
        _ => DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir),
    }
}

/// Creates `path` as a new 0600 file, exclusively and without following a link there: a file
/// or symlink planted in advance under a temporary name makes this fail instead of sending our
/// write (and a later rename) through the attacker's link.
pub fn create_new_file(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// A temporary name beside `path`, unique to this process and call: `path.tmp.PID.N`.
pub fn temp_name(path: &Path) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    name.into()
}

/// Whether a mode lets anyone but the owner in.
pub fn is_shared(mode: u32) -> bool {
    mode & 0o077 != 0
}

fn warn_if_shared(dir: &Path, mode: u32) {
    if is_shared(mode) {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            "data directory is accessible to other users; `chmod 700` it unless they must read it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_files_are_owner_only_and_never_follow_a_planted_link() {
        let base = tempfile::tempdir().unwrap();
        let target = base.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let planted = temp_name(&base.path().join("state.json"));
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        assert!(
            create_new_file(&planted).is_err(),
            "followed or reused a planted symlink"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");

        let fresh = temp_name(&base.path().join("state.json"));
        assert_ne!(fresh, planted, "temporary names are unique");
        create_new_file(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn new_directories_are_owner_only_and_existing_ones_keep_their_mode() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("a/b");
        create_dir_all(&deep).unwrap();
        for d in [base.path().join("a"), deep.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        }
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&deep).unwrap();
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o755,
            "an existing directory is not chmodded silently"
        );
        assert!(is_shared(0o755) && is_shared(0o710) && !is_shared(0o700));
    }
}
