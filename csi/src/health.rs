//! Probe backed by the peer set: healthy only when blocker, mapper and vlmc
//! all answer a PING on the segment.
//!
//! The controller's RPCs all go through these peers, so a dead one means
//! every RPC would fail; reporting it makes the liveness sidecar restart the
//! pod instead of letting the CO retry into a broken plugin.

use std::sync::Arc;
use std::time::Duration;

use xseg::Segment;

use crate::identity::{Health, ProbeError};

/// How long one peer may take to answer a probe's PING.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Health of the peers serving a segment (threads of this process or
/// other processes alike).
#[derive(Clone)]
pub struct PeerSetHealth {
    segment: Arc<Segment>,
}

impl std::fmt::Debug for PeerSetHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSetHealth")
            .field("segment", &self.segment.path())
            .finish()
    }
}

impl PeerSetHealth {
    /// Probes the peers on `segment`.
    pub fn new(segment: Arc<Segment>) -> Self {
        Self { segment }
    }
}

impl Health for PeerSetHealth {
    async fn probe(&self) -> Result<(), ProbeError> {
        let segment = self.segment.clone();
        // The PINGs block (xseg's synchronous port), so they run off the
        // async workers.
        let peers = tokio::task::spawn_blocking(move || {
            peers::peerset::probe_segment(&segment, PROBE_TIMEOUT)
        })
        .await
        .map_err(|e| ProbeError::Unhealthy(format!("probe task failed: {e}")))?
        .map_err(|e| ProbeError::Unhealthy(format!("cannot probe the peer set: {e}")))?;
        let down: Vec<String> = peers
            .iter()
            .filter_map(|p| {
                p.latency
                    .as_ref()
                    .err()
                    .map(|e| format!("{} (port {}): {e}", p.name, p.port))
            })
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(ProbeError::Unhealthy(format!(
                "peers not answering: {}",
                down.join("; ")
            )))
        }
    }
}
