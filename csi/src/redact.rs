//! Keeping CSI secrets out of logs.
//!
//! The spec requires that secrets are never logged, and a `{:?}` of a
//! request is the easiest way to log one by accident. The build script
//! gives every message with a `secrets` map a `Debug` that shows this
//! placeholder instead of the map.

use std::fmt;

/// Stands in for a secrets map in `Debug` output: shows how many entries
/// there were (useful when debugging a missing Ceph key), never the keys or
/// values.
pub struct Redacted(pub usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0)
    }
}
