//! What the kernel's ublk driver can do: its feature bits and their names.

use libublk::ctrl::UblkCtrl;

use super::{Result, UblkError, available};

/// Names of the ublk driver's feature bits (UBLK_F_*), lowest first.
pub const FEATURE_NAMES: [&str; 20] = [
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
];

/// The driver's feature bits (GET_FEATURES, Linux >= 6.5).
pub fn features() -> Result<u64> {
    if !available() {
        return Err(UblkError::NoDriver);
    }
    UblkCtrl::get_features().ok_or(UblkError::Unsupported("GET_FEATURES (Linux >= 6.5)"))
}

/// The names of the bits set in `bits`.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect()
}

pub(super) fn has(features: u64, flag: impl Into<u64>) -> bool {
    features & flag.into() != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use libublk::sys;

    #[test]
    fn feature_bits_are_named() {
        assert_eq!(
            feature_names(0x1fe),
            [
                "URING_CMD_COMP_IN_TASK",
                "NEED_GET_DATA",
                "USER_RECOVERY",
                "USER_RECOVERY_REISSUE",
                "UNPRIVILEGED_DEV",
                "CMD_IOCTL_ENCODE",
                "USER_COPY",
                "ZONED"
            ]
        );
        assert_eq!(1u64 << 10, u64::from(sys::UBLK_F_UPDATE_SIZE));
        assert_eq!(1u64 << 7, u64::from(sys::UBLK_F_USER_COPY));
    }
}
