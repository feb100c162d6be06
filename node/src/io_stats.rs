//! The I/O counters of a frontend (a ublk device, an NBD server): one type for both, counted
//! where the work happens, and reported with the counters and names that frontend's readers
//! (its log line, `archip nbd`'s report, the benchmarks, the VM suites) already know.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::ser::{Serialize, SerializeMap, Serializer};

/// Which frontend counts: it decides which counters a report shows and under which names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    Ublk,
    Nbd,
}

/// Counters of one frontend instance (all queues of a ublk device, all connections of an NBD
/// server). A counter the frontend has no use for stays at zero and is left out of its report.
#[derive(Debug)]
pub struct IoStats {
    frontend: Frontend,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// DISCARD (ublk) or TRIM (NBD, reported as `trims`) requests.
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// ublk: requests completed with an error.
    pub errors: AtomicU64,
    /// ublk: requests put back for a later try (no buffer, vlmc restarting).
    pub retries: AtomicU64,
    /// ublk: bytes this process copied with memcpy between ublk's per-tag buffers and the
    /// segment (the fallback path: the kernel made a copy too).
    pub memcpy_bytes: AtomicU64,
    /// ublk: bytes the kernel copied directly between its pages and the segment
    /// (`UBLK_F_USER_COPY`).
    pub user_copy_bytes: AtomicU64,
    /// NBD: connections accepted.
    pub connections: AtomicU64,
    /// NBD: connections ended for a protocol violation (garbage, bad magic, bad flags, timeout).
    pub protocol_errors: AtomicU64,
    /// NBD: requests merged into the volume call of the request before them.
    pub merged: AtomicU64,
    /// NBD: requests refused before any work (range, flags, unknown command).
    pub refused: AtomicU64,
    /// NBD: requests that failed in the volume layer.
    pub failed: AtomicU64,
}

/// A counter's name in a report and where it lives.
type Counter = (&'static str, fn(&IoStats) -> &AtomicU64);

/// The ublk device's report, in the order its log line has always had.
const UBLK: &[Counter] = &[
    ("reads", |s| &s.reads),
    ("writes", |s| &s.writes),
    ("flushes", |s| &s.flushes),
    ("discards", |s| &s.discards),
    ("write_zeroes", |s| &s.write_zeroes),
    ("errors", |s| &s.errors),
    ("retries", |s| &s.retries),
    ("bytes_read", |s| &s.bytes_read),
    ("bytes_written", |s| &s.bytes_written),
    ("memcpy_bytes", |s| &s.memcpy_bytes),
    ("user_copy_bytes", |s| &s.user_copy_bytes),
];

/// The NBD server's report.
const NBD: &[Counter] = &[
    ("connections", |s| &s.connections),
    ("protocol_errors", |s| &s.protocol_errors),
    ("reads", |s| &s.reads),
    ("writes", |s| &s.writes),
    ("flushes", |s| &s.flushes),
    ("trims", |s| &s.discards),
    ("write_zeroes", |s| &s.write_zeroes),
    ("bytes_read", |s| &s.bytes_read),
    ("bytes_written", |s| &s.bytes_written),
    ("merged", |s| &s.merged),
    ("refused", |s| &s.refused),
    ("failed", |s| &s.failed),
];

/// Adds `n` to a counter. Relaxed: the counters order nothing, they are only read in reports.
pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl IoStats {
    /// All counters at zero.
    pub fn new(frontend: Frontend) -> Self {
        let z = AtomicU64::default;
        IoStats {
            frontend,
            reads: z(),
            writes: z(),
            flushes: z(),
            discards: z(),
            write_zeroes: z(),
            bytes_read: z(),
            bytes_written: z(),
            errors: z(),
            retries: z(),
            memcpy_bytes: z(),
            user_copy_bytes: z(),
            connections: z(),
            protocol_errors: z(),
            merged: z(),
            refused: z(),
            failed: z(),
        }
    }

    pub fn frontend(&self) -> Frontend {
        self.frontend
    }

    fn counters(&self) -> &'static [Counter] {
        match self.frontend {
            Frontend::Ublk => UBLK,
            Frontend::Nbd => NBD,
        }
    }

    /// The frontend's counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.counters()
                .iter()
                .map(|(name, c)| (name.to_string(), c(self).load(Relaxed).into()))
                .collect(),
        )
    }
}

impl Serialize for IoStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let counters = self.counters();
        let mut m = s.serialize_map(Some(counters.len()))?;
        for (name, c) in counters {
            m.serialize_entry(name, &c(self).load(Relaxed))?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frontend_reports_its_own_counters_by_its_own_names() {
        let u = IoStats::new(Frontend::Ublk);
        bump(&u.discards, 2);
        bump(&u.user_copy_bytes, 4096);
        assert_eq!(
            serde_json::to_string(&u).unwrap(),
            r#"{"reads":0,"writes":0,"flushes":0,"discards":2,"write_zeroes":0,"errors":0,"retries":0,"bytes_read":0,"bytes_written":0,"memcpy_bytes":0,"user_copy_bytes":4096}"#
        );
        assert_eq!(u.json(), serde_json::to_value(&u).unwrap());

        let n = IoStats::new(Frontend::Nbd);
        bump(&n.discards, 3);
        bump(&n.merged, 1);
        assert_eq!(
            n.json(),
            serde_json::json!({
                "connections": 0, "protocol_errors": 0, "reads": 0, "writes": 0, "flushes": 0,
                "trims": 3, "write_zeroes": 0, "bytes_read": 0, "bytes_written": 0, "merged": 1,
                "refused": 0, "failed": 0,
            })
        );
        assert_eq!(n.json(), serde_json::to_value(&n).unwrap());
    }
}
