//! Per-port counters, read by any process attached to the segment (`archip status`).

use std::sync::atomic::Ordering::Relaxed;

use crate::layout::{HIST_BUCKETS, PORT_BOUND, PortShm};

/// A snapshot of one port's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortStats {
    pub port: u32,
    pub name: String,
    /// Pid of the owner when bound.
    pub owner: Option<u32>,
    pub accepted: u64,
    pub replied: u64,
    pub errors: u64,
    pub bytes: u64,
    pub submitted: u64,
    pub received: u64,
    pub dropped: u64,
    pub wakeups: u64,
    pub service_ns: [u64; HIST_BUCKETS],
}

impl PortStats {
    pub(crate) fn read(port: u32, p: &PortShm) -> PortStats {
        let w = p.owner.load(Relaxed);
        let len = (p.name_len.load(Relaxed) as usize).min(crate::layout::PORT_NAME_LEN);
        let mut name = Vec::with_capacity(len);
        for word in &p.name {
            name.extend_from_slice(&word.load(Relaxed).to_le_bytes());
        }
        name.truncate(len);
        let s = &p.stats;
        let mut service_ns = [0; HIST_BUCKETS];
        for (o, b) in service_ns.iter_mut().zip(&s.service_ns) {
            *o = b.load(Relaxed);
        }
        PortStats {
            port,
            name: String::from_utf8_lossy(&name).into_owned(),
            owner: (w & 0xffff_ffff == PORT_BOUND).then_some((w >> 32) as u32),
            accepted: s.accepted.load(Relaxed),
            replied: s.replied.load(Relaxed),
            errors: s.errors.load(Relaxed),
            bytes: s.bytes.load(Relaxed),
            submitted: s.submitted.load(Relaxed),
            received: s.received.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            wakeups: s.wakeups.load(Relaxed),
            service_ns,
        }
    }

    /// Upper bound (ns) of the histogram bucket holding quantile `q` (0..=1) of service times.
    pub fn service_quantile_ns(&self, q: f64) -> Option<u64> {
        let total: u64 = self.service_ns.iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.service_ns.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(2u64 << i);
            }
        }
        Some(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_follow_the_histogram() {
        let mut s = PortStats::default();
        assert_eq!(s.service_quantile_ns(0.5), None);
        s.service_ns[10] = 90; // [1024, 2048) ns
        s.service_ns[20] = 10;
        assert_eq!(s.service_quantile_ns(0.5), Some(2048));
        assert_eq!(s.service_quantile_ns(0.99), Some(2 << 20));
    }
}
