//! Counters of the work the peers do, counted where it happens (vlmc for volume I/O, the
//! mapper for copy-on-write, GC and locks) and read by whoever exports them (`csi::metrics`
//! serves them to Prometheus).
//!
//! Plain atomics, so counting costs a few relaxed increments on the I/O path and this crate
//! does not depend on a metrics library. They are per process: the binary runs one peer set per
//! process (`up`, `node`, `controller`), and tests that share a process count into the same
//! totals, so they assert on a volume of their own. The number of volumes tracked is bounded
//! ([`MAX_VOLUMES`]): past it, I/O is counted under [`OTHER_VOLUMES`], so a node with many
//! short-lived volumes cannot grow the exposition (or the memory) without limit.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Volumes tracked by name; I/O of any further volume is counted under [`OTHER_VOLUMES`].
pub const MAX_VOLUMES: usize = 1024;

/// The name under which volumes past [`MAX_VOLUMES`] are counted together.
pub const OTHER_VOLUMES: &str = "_other";

/// Upper bounds (seconds) of the latency buckets: 50 µs (a cached write to an owned block) to
/// 10 s (a copy-on-write of a large block on a slow backend).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// A latency histogram over [`LATENCY_BUCKETS`] (plus one bucket for anything slower).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

/// What a [`Histogram`] held when read: cumulative counts per upper bound, as Prometheus wants.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut seen = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len());
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            seen += n.load(Relaxed);
            buckets.push((*bound, seen));
        }
        let count = seen + self.counts[LATENCY_BUCKETS.len()].load(Relaxed);
        HistogramSnapshot {
            buckets,
            count,
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
}

/// One kind of operation: how many, how many failed, and how long they took.
#[derive(Debug, Default)]
pub struct OpStats {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    /// Bytes moved (volume I/O only).
    pub bytes: AtomicU64,
    pub latency: Histogram,
}

impl OpStats {
    /// Counts one finished operation; `bytes` only when it succeeded.
    pub fn record(&self, ok: bool, bytes: u64, took: Duration) {
        self.ops.fetch_add(1, Relaxed);
        if ok {
            self.bytes.fetch_add(bytes, Relaxed);
        } else {
            self.errors.fetch_add(1, Relaxed);
        }
        self.latency.observe(took);
    }
}

/// The volume I/O vlmc served for one volume.
#[derive(Debug, Default)]
pub struct VolumeStats {
    pub read: OpStats,
    pub write: OpStats,
    pub flush: OpStats,
}

/// Everything counted in this process.
#[derive(Debug, Default)]
pub struct Stats {
    volumes: Mutex<crate::FastMap<String, Arc<VolumeStats>>>,
    other: Arc<VolumeStats>,
    /// Partial writes to a shared block that copied the old object first (mapper).
    pub cow_copies: AtomicU64,
    /// Snapshots (single and group members) and clones, as vlmc passed them to the mapper.
    pub snapshots: OpStats,
    pub clones: OpStats,
    /// I/Os that vlmc's QoS throttle delayed, and for how long in all.
    pub qos_delayed: AtomicU64,
    pub qos_delay_ns: AtomicU64,
    /// Bytes of objects GC deleted (not counted by a dry run).
    pub gc_bytes_reclaimed: AtomicU64,
    /// Locks this node's mapper took over from another holder (a live-migration handover).
    pub lock_takeovers: AtomicU64,
    /// Locks broken without a new holder (`archip lock break`, node-loss fencing).
    pub locks_broken: AtomicU64,
}

/// This process's counters.
pub fn global() -> &'static Stats {
    static STATS: OnceLock<Stats> = OnceLock::new();
    STATS.get_or_init(Stats::default)
}

impl Stats {
    /// The counters of `volume`, or the shared [`OTHER_VOLUMES`] ones once [`MAX_VOLUMES`]
    /// volumes are tracked.
    pub fn volume(&self, volume: &str) -> Arc<VolumeStats> {
        let mut map = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = map.get(volume) {
            return v.clone();
        }
        if map.len() >= MAX_VOLUMES {
            return self.other.clone();
        }
        map.entry(volume.to_string()).or_default().clone()
    }

    /// Stops tracking a deleted volume, so its slot is free for another.
    pub fn forget(&self, volume: &str) {
        let mut map = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(volume);
    }

    /// Every tracked volume (and [`OTHER_VOLUMES`] once used), sorted by name.
    pub fn volumes(&self) -> Vec<(String, Arc<VolumeStats>)> {
        let map = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, s)| (k.clone(), s.clone())).collect();
        drop(map);
        v.sort_by(|a, b| a.0.cmp(&b.0));
        if self.other.read.ops.load(Relaxed)
            + self.other.write.ops.load(Relaxed)
            + self.other.flush.ops.load(Relaxed)
            > 0
        {
            v.push((OTHER_VOLUMES.to_string(), self.other.clone()));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.000_05, 1));
        assert_eq!(s.buckets.last().unwrap().1, 2, "60 s is only in +Inf");
        assert!((s.sum_seconds - 60.003_01).abs() < 1e-6);
    }

    #[test]
    fn volumes_are_bounded() {
        let s = Stats::default();
        for i in 0..MAX_VOLUMES + 5 {
            s.volume(&format!("v{i}"))
                .write
                .record(true, 1, Duration::ZERO);
        }
        let v = s.volumes();
        assert_eq!(v.len(), MAX_VOLUMES + 1);
        let (name, other) = v.last().unwrap();
        assert_eq!(name, OTHER_VOLUMES);
        assert_eq!(other.write.ops.load(Relaxed), 5);
        s.forget("v0");
        assert!(Arc::ptr_eq(&s.volume("new"), &s.volume("new")));
    }
}
