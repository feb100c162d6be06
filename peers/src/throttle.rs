//! vlmc's per-volume rate limiter (QoS), one per volume per node.
//!
//! GCRA (the generic cell rate algorithm, a virtual-clock token bucket): each I/O costs
//! `1 / iops` seconds of the I/O budget and `bytes / bytes_per_sec` of the byte budget; a
//! volume may run up to one second ahead of its budget (the burst), and an I/O that would go
//! further is delayed, not refused, by exactly the excess. So an idle volume gets a burst, a
//! busy one gets its rate on average, and the guest sees latency rather than errors. State is
//! two instants per volume; nothing runs while no I/O comes.

use std::time::{Duration, Instant};

use crate::mapper::QosLimits;

/// How long limits read from the mapper are trusted before vlmc reads them again: how long a
/// change made by the controller takes to reach every node.
pub const REFRESH: Duration = Duration::from_secs(5);

/// How far a volume may run ahead of its rate.
const BURST: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Throttle {
    limits: QosLimits,
    refreshed: Option<Instant>,
    /// Theoretical arrival times of the next I/O under each budget.
    iops_tat: Instant,
    bytes_tat: Instant,
    delayed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        let now = Instant::now();
        Throttle {
            limits: QosLimits::default(),
            refreshed: None,
            iops_tat: now,
            bytes_tat: now,
            delayed: 0,
        }
    }
}

impl Throttle {
    /// Whether the caller should read the limits again; claims the refresh so that concurrent
    /// I/Os do not all ask.
    pub fn claim_refresh(&mut self, now: Instant) -> bool {
        match self.refreshed {
            Some(t) if now.saturating_duration_since(t) < REFRESH => false,
            _ => {
                self.refreshed = Some(now);
                true
            }
        }
    }

    /// Installs limits read from the mapper (or just set). A change starts a fresh budget.
    pub fn set_limits(&mut self, limits: QosLimits, now: Instant) {
        self.refreshed = Some(now);
        if limits != self.limits {
            self.limits = limits;
            self.iops_tat = now;
            self.bytes_tat = now;
        }
    }

    /// Accounts for one I/O of `bytes` arriving at `now` and returns how long it must wait.
    pub fn admit(&mut self, now: Instant, bytes: u64) -> Duration {
        let mut wait = Duration::ZERO;
        if self.limits.iops > 0 {
            let cost = Duration::from_secs_f64(1.0 / self.limits.iops as f64);
            wait = wait.max(gcra(&mut self.iops_tat, now, cost));
        }
        if self.limits.bytes_per_sec > 0 {
            let cost = Duration::from_secs_f64(bytes as f64 / self.limits.bytes_per_sec as f64);
            wait = wait.max(gcra(&mut self.bytes_tat, now, cost));
        }
        if !wait.is_zero() {
            self.delayed += 1;
        }
        wait
    }

    /// Admits an I/O of `bytes` at `now` only if it need not wait and the limits are not due
    /// for a refresh; otherwise changes nothing and says no, so that the caller can take the
    /// path that waits (vlmc's fast path, which never waits).
    pub fn admit_now(&mut self, now: Instant, bytes: u64) -> bool {
        match self.refreshed {
            Some(t) if now.saturating_duration_since(t) < REFRESH => {}
            _ => return false,
        }
        if self.limits.iops == 0 && self.limits.bytes_per_sec == 0 {
            return true;
        }
        let (iops_tat, bytes_tat) = (self.iops_tat, self.bytes_tat);
        if self.admit(now, bytes).is_zero() {
            return true;
        }
        self.iops_tat = iops_tat;
        self.bytes_tat = bytes_tat;
        self.delayed -= 1;
        false
    }

    /// I/Os delayed so far.
    pub fn delayed(&self) -> u64 {
        self.delayed
    }
}

/// One GCRA step: the budget's clock `tat` never lags `now` (unused budget does not pile up
/// beyond the burst), moves on by `cost`, and the I/O waits for whatever exceeds the burst.
fn gcra(tat: &mut Instant, now: Instant, cost: Duration) -> Duration {
    let start = (*tat).max(now);
    *tat = start + cost;
    tat.saturating_duration_since(now + BURST)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(iops: u64, bytes_per_sec: u64) -> QosLimits {
        QosLimits {
            iops,
            bytes_per_sec,
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let mut t = Throttle::default();
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(t.admit(now, 1 << 20), Duration::ZERO);
        }
        assert_eq!(t.delayed(), 0);
    }

    #[test]
    fn a_burst_of_one_second_passes_then_the_rate_holds() {
        let mut t = Throttle::default();
        let now = Instant::now();
        t.set_limits(limits(10, 0), now);
        let waits: Vec<Duration> = (0..30).map(|_| t.admit(now, 4096)).collect();
        // Ten I/Os (one second of budget) go at once; the k-th after them waits k/10 s.
        assert!(waits[..10].iter().all(|w| w.is_zero()), "{waits:?}");
        for (k, w) in waits[10..].iter().enumerate() {
            let want = Duration::from_millis(100 * (k as u64 + 1));
            assert!(w.abs_diff(want) < Duration::from_micros(10), "{k}: {w:?}");
        }
        assert_eq!(t.delayed(), 20);
        // A long idle gap refills the burst, but never more than one second of it.
        let later = now + Duration::from_secs(100);
        let waits: Vec<Duration> = (0..11).map(|_| t.admit(later, 4096)).collect();
        assert!(waits[..10].iter().all(|w| w.is_zero()));
        assert!(!waits[10].is_zero());
    }

    #[test]
    fn bytes_and_iops_both_bind() {
        let mut t = Throttle::default();
        let now = Instant::now();
        // 1 MiB/s and 1000 IOPS: 1 MiB I/Os are bound by bytes, 4 KiB ones by neither at first.
        t.set_limits(limits(1000, 1 << 20), now);
        assert!(t.admit(now, 1 << 20).is_zero());
        let w = t.admit(now, 1 << 20);
        assert!(
            w.abs_diff(Duration::from_secs(1)) < Duration::from_micros(10),
            "{w:?}"
        );
        // Changing the limits starts a fresh budget.
        t.set_limits(limits(1000, 0), now);
        assert!(t.admit(now, 1 << 20).is_zero());
    }

    #[test]
    fn refresh_is_claimed_once_per_period() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert!(t.claim_refresh(now));
        assert!(!t.claim_refresh(now + Duration::from_secs(1)));
        assert!(t.claim_refresh(now + REFRESH));
    }

    #[test]
    fn admit_now_declines_a_due_refresh_or_a_wait_and_then_changes_nothing() {
        let mut t = Throttle::default();
        let now = Instant::now();
        // Never refreshed: the limits are unknown, so the caller must ask first.
        assert!(!t.admit_now(now, 4096));
        t.set_limits(limits(2, 0), now);
        // A burst of one second at 2 IOPS: two I/Os pass at once.
        assert!(t.admit_now(now, 4096));
        assert!(t.admit_now(now, 4096));
        // The next would wait: declined, not counted, and the budget is untouched, so the
        // slow path's admit sees the same wait a first try would have.
        assert!(!t.admit_now(now, 4096));
        assert_eq!(t.delayed(), 0);
        assert_eq!(t.admit(now, 4096), Duration::from_millis(500));
        // Limits older than REFRESH: declined even when unlimited.
        t.set_limits(limits(0, 0), now);
        assert!(t.admit_now(now + Duration::from_secs(1), 1 << 20));
        assert!(!t.admit_now(now + REFRESH, 4096));
    }
}
