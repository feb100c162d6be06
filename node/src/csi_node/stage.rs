//! NodeStageVolume / NodeUnstageVolume: mapping the volume to a ublk device and mounting it
//! (or recording the device, in block mode) at the staging path.

use std::path::Path;

use csi::errors::{CsiError, CsiResult};
use csi::pb::volume_capability::access_mode::Mode;
use csi::validate::{Access, AccessKind};

use super::filesystems::{Content, apply_mount_group, mkfs, mount_fs, mount_group, probe};
use super::mounts::{mount_at, mount_uses, mounts, rw_word, umount, umount_all};
use super::{BLOCK_DEVICE_FILE, DEFAULT_FS_TYPE, NodeOptions, io_err, record, ublk_err};
use crate::devices::{DeviceRecord, Target};
use crate::ublk::{self, DeviceState, MapRequest, UblkConfig, UblkError};

/// The live device of `volume`: the existing mapping (recovered if its server died), or a new one.
/// The ublk device of `volume`, mapping it if needed. `shared` maps it for a multi-node access
/// mode: another node may have it attached too (the live-migration handover), so the volume is
/// opened shared (no lock until this node writes, nothing served from a stale cache).
pub(super) fn ensure_mapped(
    o: &NodeOptions,
    volume: &str,
    shared: bool,
) -> CsiResult<DeviceRecord> {
    if let Some(r) = record(&o.table, volume)? {
        if r.shared != shared {
            tracing::warn!(
                volume,
                mapped_shared = r.shared,
                wanted_shared = shared,
                "the volume is already mapped in the other mode; keeping it"
            );
        }
        match ublk::device_state(r.dev_id) {
            DeviceState::Live if r.server_alive() => return Ok(r),
            DeviceState::Gone => {
                let _ = ublk::unmap(&o.table, &Target::Device(r.dev_id));
            }
            _ => {
                for res in ublk::recover(&o.table, &o.launcher, &o.ublk).map_err(ublk_err)? {
                    res.map_err(ublk_err)?;
                }
                if let Some(r) = record(&o.table, volume)?
                    && r.server_alive()
                {
                    return Ok(r);
                }
            }
        }
    }
    let req = MapRequest {
        volume: volume.to_owned(),
        segment: o.segment.clone(),
        config: UblkConfig {
            shared,
            ..o.ublk.clone()
        },
        table: o.table.clone(),
        dev_id: None,
        log: None,
    };
    match ublk::map(&req, &o.launcher) {
        Ok(r) => Ok(r),
        Err(UblkError::AlreadyMapped { .. }) => record(&o.table, volume)?
            .ok_or_else(|| CsiError::Aborted(format!("{volume} is being mapped; retry"))),
        Err(e) => Err(ublk_err(e)),
    }
}

pub(super) fn stage(o: &NodeOptions, name: &str, staging: &Path, access: &Access) -> CsiResult<()> {
    let group = mount_group(access)?;
    let multi_node = matches!(
        access.mode,
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter
    );
    let rec = ensure_mapped(o, name, multi_node)?;
    let dev = rec.block_device();
    std::fs::create_dir_all(staging).map_err(io_err(staging.display()))?;
    match &access.kind {
        AccessKind::Block => {
            if let Some(m) = mount_at(staging)? {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is staged in mount mode ({} mounted there)",
                    staging.display(),
                    m.source
                )));
            }
            let file = staging.join(BLOCK_DEVICE_FILE);
            let want = dev.to_string_lossy().into_owned();
            if std::fs::read_to_string(&file).ok().as_deref() != Some(&want) {
                std::fs::write(&file, &want).map_err(io_err(file.display()))?;
            }
            Ok(())
        }
        AccessKind::Mount {
            fs_type,
            mount_flags,
            ..
        } => {
            if let Some(m) = mount_at(staging)? {
                if m.source != dev.to_string_lossy() {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} has {} mounted, not this volume",
                        staging.display(),
                        m.source
                    )));
                }
                if !fs_type.is_empty() && *fs_type != m.fstype {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is staged with {}, {fs_type} requested",
                        staging.display(),
                        m.fstype
                    )));
                }
                let want_ro = access.is_read_only() || mount_flags.iter().any(|f| f == "ro");
                if m.read_only() != want_ro {
                    return Err(CsiError::AlreadyExists(format!(
                        "{} is staged {}",
                        staging.display(),
                        rw_word(m.read_only())
                    )));
                }
                if let Some(gid) = group
                    && !m.read_only()
                {
                    apply_mount_group(staging, gid)?;
                }
                return Ok(());
            }
            if staging.join(BLOCK_DEVICE_FILE).exists() {
                return Err(CsiError::AlreadyExists(format!(
                    "{} is staged in block mode",
                    staging.display()
                )));
            }
            let fs = match probe(&dev)? {
                Content::Blank => {
                    let fs = if fs_type.is_empty() {
                        DEFAULT_FS_TYPE
                    } else {
                        fs_type
                    };
                    if access.is_read_only() {
                        return Err(CsiError::FailedPrecondition(format!(
                            "volume {name} has no filesystem and is to be mounted read-only"
                        )));
                    }
                    tracing::info!(volume = %name, device = %dev.display(), %fs, "making a filesystem");
                    mkfs(fs, &dev)?;
                    fs.to_owned()
                }
                Content::Filesystem(t) if fs_type.is_empty() || *fs_type == t => t,
                Content::Filesystem(t) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {name} holds a {t} filesystem, not {fs_type}; it will not be reformatted"
                    )));
                }
                Content::Other(what) => {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {name} holds {what} and no {} filesystem; it will not be formatted",
                        if fs_type.is_empty() {
                            DEFAULT_FS_TYPE
                        } else {
                            fs_type
                        }
                    )));
                }
            };
            let mut flags = mount_flags.clone();
            if access.is_read_only() && !flags.iter().any(|f| f == "ro") {
                flags.push("ro".into());
            }
            mount_fs(&dev, staging, &fs, &flags)?;
            if let Some(gid) = group
                && !access.is_read_only()
            {
                apply_mount_group(staging, gid).inspect_err(|_| {
                    let _ = umount(staging);
                })?;
            }
            Ok(())
        }
    }
}

pub(super) fn unstage(o: &NodeOptions, name: &str, staging: &Path) -> CsiResult<()> {
    umount_all(staging)?;
    let file = staging.join(BLOCK_DEVICE_FILE);
    match std::fs::remove_file(&file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(file.display())(e)),
    }
    let Some(rec) = record(&o.table, name)? else {
        return Ok(());
    };
    if let Some(m) = mounts()?.into_iter().find(|m| mount_uses(m, &rec)) {
        return Err(CsiError::FailedPrecondition(format!(
            "{} is still in use at {}; unpublish it first",
            rec.block_device().display(),
            m.mount_point.display()
        )));
    }
    ublk::unmap(&o.table, &Target::Device(rec.dev_id)).map_err(ublk_err)?;
    Ok(())
}
