//! One operation per volume, snapshot or group id at a time.
//!
//! The CO normally sends one call per object at a time, but after a restart
//! or a timeout it may send a second while the first still runs (a
//! CreateVolume that is slow, then retried). Two operations on the same
//! object racing each other is how records and the catalogue drift apart, so
//! the second one is refused with ABORTED, as the spec allows, and the CO
//! retries it with backoff once the first has finished.
//!
//! The key is the object's id, and CreateVolume/CreateSnapshot derive their
//! id from the name before anything else, so "same name" and "same id" are
//! the same key: a DeleteVolume racing the CreateVolume of that volume is
//! refused too. Sources of clones are *not* taken: a hundred clones of one
//! golden snapshot must run concurrently.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::errors::CsiError;

/// The set of ids with an operation in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    ids: Mutex<HashSet<String>>,
}

impl InFlight {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashSet<String>> {
        // Insert and remove cannot leave the set half-updated, so a panic
        // elsewhere while holding the lock does not invalidate it.
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `ids` busy until the guard drops, or fails with ABORTED
    /// (naming the busy id) and marks nothing.
    pub fn begin(self: &Arc<Self>, ids: &[&str]) -> Result<InFlightGuard, CsiError> {
        let mut set = self.lock();
        if let Some(busy) = ids.iter().find(|id| set.contains(**id)) {
            return Err(CsiError::Aborted(format!(
                "an operation on {busy} is already in progress; retry later"
            )));
        }
        let owned: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        for id in &owned {
            set.insert(id.clone());
        }
        Ok(InFlightGuard {
            set: self.clone(),
            ids: owned,
        })
    }

    /// Whether `id` is busy (for tests and diagnostics).
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains(id)
    }
}

/// Keeps ids busy; dropping it (also on error paths and on a cancelled
/// RPC, whose future is dropped) frees them.
#[derive(Debug)]
pub struct InFlightGuard {
    set: Arc<InFlight>,
    ids: Vec<String>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut set = self.set.lock();
        for id in &self.ids {
            set.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_aborted_until_the_first_ends() {
        let f = InFlight::new();
        let g = f.begin(&["v-a"]).unwrap();
        let e = f.begin(&["v-b", "v-a"]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted);
        // The failed attempt marked nothing.
        assert!(!f.contains("v-b"));
        let other = f.begin(&["v-b"]).unwrap();
        drop(g);
        assert!(!f.contains("v-a"));
        let _again = f.begin(&["v-a"]).unwrap();
        drop(other);
        assert!(!f.contains("v-b"));
    }
}
