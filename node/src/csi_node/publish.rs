//! NodePublishVolume / NodeUnpublishVolume: bind mounts of the staged volume onto targets.

use std::path::Path;

use csi::errors::{CsiError, CsiResult};
use csi::validate::{Access, AccessKind};

use super::filesystems::{apply_mount_group, mount_group};
use super::mounts::{
    bind, bound_loop, canonical, mount_at, mount_uses, mounts, rw_word, top_mount, umount_all,
};
use super::publications::{
    Publication, allows_many, load_publications, publications_file, save_publications,
};
use super::{BLOCK_DEVICE_FILE, NodeOptions, io_err, record, run};

pub(super) fn publish(
    o: &NodeOptions,
    name: &str,
    staging: &Path,
    target: &Path,
    access: &Access,
    read_only: bool,
) -> CsiResult<()> {
    let group = mount_group(access)?;
    let not_staged = || {
        CsiError::FailedPrecondition(format!(
            "volume {name} is not staged at {}",
            staging.display()
        ))
    };
    let rec = record(&o.table, name)?.ok_or_else(not_staged)?;
    let dev = rec.block_device();
    let file = publications_file(&o.table, name)?;
    let want = Publication::new(target, access, read_only);
    let all = mounts()?;
    // Records count only while their target still shows the volume.
    let mut recorded: Vec<Publication> = load_publications(&file)?
        .into_iter()
        .filter(|p| top_mount(&all, &p.target).is_some_and(|m| mount_uses(m, &rec)))
        .collect();

    if let Some(m) = top_mount(&all, target) {
        // Already published here: the same capability is success, another ALREADY_EXISTS.
        if !mount_uses(m, &rec) {
            return Err(CsiError::AlreadyExists(format!(
                "{} has something else mounted",
                target.display()
            )));
        }
        if m.read_only() != read_only {
            return Err(CsiError::AlreadyExists(format!(
                "{} is published {}, requested {}",
                target.display(),
                rw_word(m.read_only()),
                rw_word(read_only)
            )));
        }
        match recorded.iter().find(|p| p.target == want.target) {
            Some(p) if *p != want => {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is published with another capability ({:?}{}, now {:?}{})",
                    target.display(),
                    p.mode(),
                    if p.block { ", block" } else { ", mount" },
                    access.mode,
                    if want.block { ", block" } else { ", mount" },
                )));
            }
            Some(_) => return Ok(()),
            None => {
                // Published, but the record was lost (a crash between the two): write it.
                recorded.push(want);
                return save_publications(&file, &recorded);
            }
        }
    }

    // Elsewhere on this node: the spec's table allows a second target only when every
    // publication's mode allows several.
    let staging_c = canonical(staging);
    let mut others: Vec<&Path> = all
        .iter()
        .filter(|m| m.mount_point != staging_c && m.mount_point != want.target)
        .filter(|m| mount_uses(m, &rec))
        .map(|m| m.mount_point.as_path())
        .collect();
    others.dedup();
    if let Some(other) = others.first() {
        if !allows_many(access.mode) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is already published at {} and access mode {:?} allows one \
                 publication",
                other.display(),
                access.mode
            )));
        }
        if let Some(p) = recorded
            .iter()
            .find(|p| !allows_many(p.mode()) && others.contains(&p.target.as_path()))
        {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published at {} with access mode {:?}, which allows no \
                 other publication",
                p.target.display(),
                p.mode()
            )));
        }
    }

    match access.kind {
        AccessKind::Mount { .. } => {
            let staged = top_mount(&all, staging).ok_or_else(not_staged)?;
            if staged.source != dev.to_string_lossy() {
                return Err(not_staged());
            }
            if let Some(gid) = group
                && !staged.read_only()
            {
                apply_mount_group(staging, gid)?;
            }
            std::fs::create_dir_all(target).map_err(io_err(target.display()))?;
            bind(staging, target, read_only)?;
        }
        AccessKind::Block => {
            let file = staging.join(BLOCK_DEVICE_FILE);
            let recorded = std::fs::read_to_string(&file).map_err(|_| not_staged())?;
            if Path::new(recorded.trim()) != dev {
                return Err(not_staged());
            }
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent.display()))?;
            }
            if target.is_dir() {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is a directory; block volumes are published on a file",
                    target.display()
                )));
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map_err(io_err(target.display()))?;
            if !read_only {
                bind(&dev, target, false)?;
            } else {
                // A read-only mount does not stop writes through a device node on it, so a
                // read-only publication binds a read-only loop device over the volume's
                // device.
                let out = run("losetup", &["-r", "-f", "--show", &dev.to_string_lossy()])?;
                let lo = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !out.status.success() || lo.is_empty() {
                    return Err(CsiError::Internal(format!(
                        "losetup -r {}: {}",
                        dev.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                bind(Path::new(&lo), target, true).inspect_err(|_| {
                    let _ = run("losetup", &["-d", &lo]);
                })?;
            }
        }
    }
    // The target exists now, so its canonical form is the one mountinfo shows.
    let want = Publication {
        target: canonical(target),
        ..want
    };
    recorded.retain(|p| p.target != want.target);
    recorded.push(want);
    save_publications(&file, &recorded)
}

pub(super) fn unpublish(o: &NodeOptions, name: &str, target: &Path) -> CsiResult<()> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(target.display())(e)),
    };
    let canon = canonical(target);
    let lo = mount_at(target)?.as_ref().and_then(bound_loop);
    umount_all(target)?;
    if let Some(lo) = lo {
        let _ = run("losetup", &["-d", &format!("/dev/{lo}")]);
    }
    if let Ok(file) = publications_file(&o.table, name) {
        let mut pubs = load_publications(&file)?;
        let before = pubs.len();
        pubs.retain(|p| p.target != canon);
        if pubs.len() != before {
            save_publications(&file, &pubs)?;
        }
    }
    let removed = if meta.is_dir() {
        std::fs::remove_dir(target)
    } else {
        std::fs::remove_file(target)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", target.display()))(e)),
    }
}
