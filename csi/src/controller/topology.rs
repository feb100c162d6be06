//! Where a volume can be reached: the topology a node-local volume is pinned
//! by, and the check of a CreateVolume's accessibility requirements against it.

use crate::errors::{CsiError, CsiResult};
use crate::pb::{Topology, TopologyRequirement};

/// The topology segment a node-local volume is pinned by. The node service
/// reports the same key with its node id in NodeGetInfo.
pub const TOPOLOGY_KEY: &str = "topology.archipelago.io/node";

/// Whether a CSI `Topology` admits a volume pinned to `node` (`None`: every
/// node). A topology without our key says nothing about nodes, so it admits.
pub(super) fn topology_admits(t: &Topology, node: Option<&str>) -> bool {
    match (node, t.segments.get(TOPOLOGY_KEY)) {
        (Some(node), Some(want)) => want == node,
        _ => true,
    }
}

pub(super) fn check_requirements(
    req: Option<&TopologyRequirement>,
    node: Option<&str>,
) -> CsiResult<()> {
    let Some(req) = req else { return Ok(()) };
    if node.is_none() || (req.requisite.is_empty() && req.preferred.is_empty()) {
        return Ok(());
    }
    let candidates = if req.requisite.is_empty() {
        &req.preferred
    } else {
        &req.requisite
    };
    if candidates.iter().any(|t| topology_admits(t, node)) {
        return Ok(());
    }
    Err(CsiError::ResourceExhausted(format!(
        "the volume would live in the directory of node {:?}, which none of the required topologies includes (mark the StorageClass shared: \"true\" if the directory is on a shared filesystem)",
        node.unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn topology() {
        let t = |n: &str| Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), n.to_owned())]),
        };
        assert!(topology_admits(&t("a"), Some("a")));
        assert!(!topology_admits(&t("b"), Some("a")));
        assert!(topology_admits(&t("b"), None));
        let req = TopologyRequirement {
            requisite: vec![t("b"), t("c")],
            preferred: vec![],
        };
        assert_eq!(
            check_requirements(Some(&req), Some("a"))
                .unwrap_err()
                .code(),
            tonic::Code::ResourceExhausted
        );
        assert!(check_requirements(Some(&req), None).is_ok());
        let req = TopologyRequirement {
            requisite: vec![t("b"), t("a")],
            preferred: vec![t("a")],
        };
        assert!(check_requirements(Some(&req), Some("a")).is_ok());
    }
}
