//! Owner-only files and directories: the one place that says which modes our data gets.
//!
//! Objects and maps hold every volume's data, records name every volume, and device tables
//! and logs say which device serves what; none of it is other local users' business, so
//! everything we create is 0700 (directories) or 0600 (files). A directory that already
//! exists is the administrator's choice: it is never chmodded behind their back, but a group-
//! or world-accessible one is reported, because it exposes whatever is put in it.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

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
