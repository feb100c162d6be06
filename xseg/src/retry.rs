//! The retry policy for a send that xseg refused only for a moment: the destination's request
//! ring was full, or a racing producer left it looking inconsistent (see `ring.rs`). Both clear
//! by themselves as the consumer drains its ring, so the sender tries again, a bounded number
//! of times, yielding to the runtime in between (the consumer may be a task on the same
//! runtime). Every sender that retries uses this one policy, so its bound and pause are the
//! same everywhere.
//!
//! An exhausted request or buffer pool (`NoRequest`, `NoBuffer`) is different: it clears only
//! when other requests finish, so yielding is not enough. [`PoolBackoff`] is the policy for it:
//! exponential sleeps, a bounded number of times, with the bounds chosen by the caller (a
//! frontend that must answer its client in time picks fewer attempts than a batch job).

use crate::error::Error;

/// Attempts after the first before the error is returned.
pub const SEND_RETRIES: u32 = 1000;

/// The state of one send's retries: create one per request, ask [`allows`](Self::allows) on
/// each failure, and [`pause`](Self::pause) before trying again.
#[derive(Debug, Default)]
pub struct SendRetry {
    attempts: u32,
}

impl SendRetry {
    pub fn new() -> Self {
        SendRetry::default()
    }

    /// Whether `e` is momentary and the budget allows another attempt; counts that attempt.
    pub fn allows(&mut self, e: &Error) -> bool {
        let momentary = matches!(e, Error::QueueFull(_) | Error::QueueCorrupt(_));
        if momentary && self.attempts < SEND_RETRIES {
            self.attempts += 1;
            true
        } else {
            false
        }
    }

    /// The pause before the next attempt.
    pub async fn pause(&self) {
        tokio::task::yield_now().await;
    }
}

/// The state of one request's back-off from an exhausted pool: ask
/// [`next_pause`](Self::next_pause) on each refusal; `None` means give up and return the error.
#[derive(Debug, Clone)]
pub struct PoolBackoff {
    attempts: u32,
    limit: u32,
    first: std::time::Duration,
    max_doublings: u32,
}

impl PoolBackoff {
    /// At most `limit` retries, the first after `first`, each pause doubling up to
    /// `first * 2^max_doublings`.
    pub fn new(limit: u32, first: std::time::Duration, max_doublings: u32) -> Self {
        PoolBackoff {
            attempts: 0,
            limit,
            first,
            max_doublings,
        }
    }

    /// The pause before the next attempt, or `None` once the budget is spent.
    pub fn next_pause(&mut self) -> Option<std::time::Duration> {
        if self.attempts >= self.limit {
            return None;
        }
        self.attempts += 1;
        Some(self.first * (1u32 << self.attempts.min(self.max_doublings)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_backoff_doubles_up_to_its_ceiling_and_stops_at_its_limit() {
        let first = std::time::Duration::from_micros(50);
        let mut b = PoolBackoff::new(12, first, 10);
        let pauses: Vec<_> = std::iter::from_fn(|| b.next_pause()).collect();
        assert_eq!(pauses.len(), 12);
        assert_eq!(pauses[0], first * 2);
        assert_eq!(pauses[9], first * 1024);
        assert_eq!(pauses[11], first * 1024, "capped at 2^10");
    }

    #[test]
    fn only_momentary_errors_are_retried_and_only_so_often() {
        let mut r = SendRetry::new();
        assert!(!r.allows(&Error::NoRequest));
        assert!(!r.allows(&Error::NoPeer(3)));
        for i in 0..SEND_RETRIES {
            let e = if i % 2 == 0 {
                Error::QueueFull(3)
            } else {
                Error::QueueCorrupt(3)
            };
            assert!(r.allows(&e), "attempt {i}");
        }
        assert!(!r.allows(&Error::QueueFull(3)));
    }
}
