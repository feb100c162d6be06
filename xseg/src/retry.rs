//! The retry policy for a send that xseg refused only for a moment: the destination's request
//! ring was full, or a racing producer left it looking inconsistent (see `ring.rs`). Both clear
//! by themselves as the consumer drains its ring, so the sender tries again, a bounded number
//! of times, yielding to the runtime in between (the consumer may be a task on the same
//! runtime). Every sender that retries uses this one policy, so its bound and pause are the
//! same everywhere.
//!
//! Not covered: an exhausted request or buffer pool (`NoRequest`, `NoBuffer`), which needs
//! other requests to finish and is the caller's to back off from.

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

#[cfg(test)]
mod tests {
    use super::*;

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
