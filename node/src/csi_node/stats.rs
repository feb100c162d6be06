//! NodeGetVolumeStats and NodeExpandVolume: usage, the volume condition, and online growth.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use csi::errors::{CsiError, CsiResult};
use csi::pb::volume_usage::Unit;
use csi::pb::{NodeGetVolumeStatsResponse, VolumeCondition, VolumeUsage};

use super::filesystems::grow_fs;
use super::mounts::{mount_at, mount_uses};
use super::{NodeOptions, io_err, record, ublk_err};
use crate::devices::{DeviceRecord, Target};
use crate::ublk::{self, DeviceState, UblkError};

pub(super) fn block_size_of(path: &Path) -> CsiResult<u64> {
    let meta = std::fs::metadata(path).map_err(io_err(path.display()))?;
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let s = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/size"))
        .map_err(io_err(format!("size of {}", path.display())))?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| CsiError::Internal(format!("size of {}: {e}", path.display())))
}

pub(super) fn condition(rec: Option<&DeviceRecord>) -> VolumeCondition {
    let abnormal = |message: String| VolumeCondition {
        abnormal: true,
        message,
    };
    let Some(r) = rec else {
        return abnormal("the volume is not mapped on this node".into());
    };
    if !r.server_alive() {
        return abnormal(format!(
            "the server (pid {}) of {} is not running; its I/O waits for `archip recover`",
            r.pid,
            r.block_device().display()
        ));
    }
    match ublk::device_state(r.dev_id) {
        DeviceState::Live => VolumeCondition {
            abnormal: false,
            message: format!("{} is live", r.block_device().display()),
        },
        s => abnormal(format!("{} is {s:?}", r.block_device().display())),
    }
}

pub(super) fn stats(
    o: &NodeOptions,
    name: &str,
    path: &Path,
) -> CsiResult<NodeGetVolumeStatsResponse> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CsiError::NotFound(format!(
                "{} does not exist",
                path.display()
            )));
        }
        Err(e) => return Err(io_err(path.display())(e)),
    };
    let rec = record(&o.table, name)?;
    let mut cond = condition(rec.as_ref());
    let usage = if meta.file_type().is_block_device() {
        if let Some(r) = &rec
            && std::fs::metadata(r.block_device()).is_ok_and(|d| d.rdev() != meta.rdev())
        {
            cond = VolumeCondition {
                abnormal: true,
                message: format!(
                    "{} is not the volume's device {}",
                    path.display(),
                    r.block_device().display()
                ),
            };
        }
        let size = block_size_of(path)? as i64;
        vec![VolumeUsage {
            total: size,
            unit: Unit::Bytes as i32,
            ..Default::default()
        }]
    } else {
        let m = mount_at(path)?;
        if let Some(r) = &rec
            && !m.as_ref().is_some_and(|m| mount_uses(m, r))
        {
            cond = VolumeCondition {
                abnormal: true,
                message: format!("{} is not a mount of the volume", path.display()),
            };
        }
        let s = peers::fs_stats::of_path(path)
            .map_err(io_err(format!("statvfs {}", path.display())))?;
        let f = s.block as i64;
        vec![
            VolumeUsage {
                available: s.blocks_available as i64 * f,
                total: s.blocks as i64 * f,
                used: (s.blocks as i64 - s.blocks_free as i64) * f,
                unit: Unit::Bytes as i32,
            },
            VolumeUsage {
                available: s.files_available as i64,
                total: s.files as i64,
                used: s.files as i64 - s.files_free as i64,
                unit: Unit::Inodes as i32,
            },
        ]
    };
    Ok(NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(cond),
    })
}

pub(super) fn expand(
    o: &NodeOptions,
    name: &str,
    path: &Path,
    block: Option<bool>,
    size: u64,
) -> CsiResult<i64> {
    let meta = std::fs::metadata(path)
        .map_err(|_| CsiError::NotFound(format!("{} does not exist", path.display())))?;
    let rec = record(&o.table, name)?
        .ok_or_else(|| CsiError::NotFound(format!("volume {name} is not staged on this node")))?;
    let dev = rec.block_device();
    let mut current = block_size_of(&dev)?;
    if current < size {
        current =
            ublk::resize(&o.table, &Target::Device(rec.dev_id), size).map_err(|e| match e {
                UblkError::Unsupported(what) => CsiError::FailedPrecondition(format!(
                    "cannot grow {} online: {what} is missing; unstage and stage the volume again \
                 to see its new size",
                    dev.display()
                )),
                e => ublk_err(e),
            })?;
    }
    let block = block.unwrap_or_else(|| meta.file_type().is_block_device());
    if !block {
        let m = mount_at(path)?.ok_or_else(|| {
            CsiError::FailedPrecondition(format!("{} is not mounted", path.display()))
        })?;
        grow_fs(&m.fstype, &dev, path)?;
    }
    Ok(current as i64)
}
