//! Listing and capacity: ListVolumes with its pagination tokens, and
//! GetCapacity.

use std::collections::HashMap;

use peers::client::{VolumeInfo, VolumeKind};

use super::MAX_BLOCKS;
use super::topology::topology_admits;
use crate::core::{Core, client_error};
use crate::errors::{CsiError, CsiResult};
use crate::ids;
use crate::meta::RecordKind;
use crate::params::{DEFAULT_BLOCK_SIZE, VolumeParams};
use crate::pb::{
    GetCapacityRequest, GetCapacityResponse, ListVolumesRequest, ListVolumesResponse,
    list_volumes_response,
};
use crate::validate::{check_capabilities, check_map};

/// Pagination tokens: "start after this id". A prefix makes a token we did
/// not issue recognisable, so it gets ABORTED rather than a silent restart.
const TOKEN_PREFIX: &str = "after:";

pub(super) fn parse_token(token: &str) -> CsiResult<Option<&str>> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(TOKEN_PREFIX)
        .filter(|id| ids::backend_name(id).is_some())
        .map(Some)
        .ok_or_else(|| {
            CsiError::Aborted(format!(
                "starting_token {token:?} was not issued by this plugin; restart the listing"
            ))
        })
}

/// The most entries a page may hold: `max_entries`, where 0 means no limit.
pub(super) fn check_max_entries(max_entries: i32) -> CsiResult<usize> {
    match max_entries {
        ..0 => Err(CsiError::InvalidArgument(format!(
            "max_entries must not be negative, got {max_entries}"
        ))),
        0 => Ok(usize::MAX),
        n => Ok(n as usize),
    }
}

pub(super) fn page<T>(items: Vec<(String, T)>, max_entries: i32) -> CsiResult<(Vec<T>, String)> {
    let max = check_max_entries(max_entries)?;
    let more = items.len() > max;
    let mut out = Vec::with_capacity(items.len().min(max));
    let mut last = String::new();
    for (id, item) in items.into_iter().take(max) {
        last = id;
        out.push(item);
    }
    let next = if more {
        format!("{TOKEN_PREFIX}{last}")
    } else {
        String::new()
    };
    Ok((out, next))
}

impl Core {
    /// Every catalogue entry of `kind`, by name: what listings join their
    /// records with. `what` names the listing for the error.
    pub(super) async fn catalogue(
        &self,
        kind: VolumeKind,
        what: &str,
    ) -> CsiResult<HashMap<String, VolumeInfo>> {
        Ok(self
            .client
            .list()
            .await
            .map_err(|e| client_error(what, e))?
            .into_iter()
            .filter(|v| v.kind == kind)
            .map(|v| (v.name.clone(), v))
            .collect())
    }

    pub(super) async fn list_volumes(
        &self,
        req: ListVolumesRequest,
    ) -> CsiResult<ListVolumesResponse> {
        check_max_entries(req.max_entries)?;
        let after = parse_token(&req.starting_token)?;
        let catalogue = self
            .catalogue(VolumeKind::Volume, "listing volumes")
            .await?;
        let ids: Vec<String> = self
            .meta
            .ids(RecordKind::Volume)
            .await?
            .into_iter()
            .filter(|id| catalogue.contains_key(id))
            .filter(|id| after.is_none_or(|a| id.as_str() > a))
            .collect();
        let (ids, next_token) = page(
            ids.into_iter().map(|i| (i.clone(), i)).collect(),
            req.max_entries,
        )?;
        let mut entries = Vec::with_capacity(ids.len());
        for id in ids {
            let info = &catalogue[&id];
            let (rec, _) = self.volume_record(&id).await?;
            entries.push(list_volumes_response::Entry {
                volume: Some(self.csi_volume(&id, info, &rec)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: rec
                        .publications
                        .iter()
                        .map(|p| p.node_id.clone())
                        .collect(),
                    volume_condition: Some(self.condition(&id, &rec).await),
                }),
            });
        }
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    pub(super) async fn get_capacity(
        &self,
        req: GetCapacityRequest,
    ) -> CsiResult<GetCapacityResponse> {
        check_map("parameters", &req.parameters)?;
        let caps = if req.volume_capabilities.is_empty() {
            Vec::new()
        } else {
            check_capabilities("volume_capabilities", &req.volume_capabilities)?
        };
        let params = VolumeParams::parse(&req.parameters)?;
        let block = params.block_size.map_or(DEFAULT_BLOCK_SIZE, u64::from);
        let max = (MAX_BLOCKS * block).min(i64::MAX as u64) as i64;
        self.check_target(&params)?;
        let node = self.pinned_node(&params);
        let node = node.as_deref();
        let reachable = req
            .accessible_topology
            .as_ref()
            .is_none_or(|t| topology_admits(t, node));
        let supported = caps.iter().all(|c| c.unsupported_reason().is_none());
        let available = if reachable && supported {
            let capacity = self.meta.capacity().await.map_err(CsiError::from)?;
            i64::try_from(capacity.available).unwrap_or(i64::MAX)
        } else {
            0
        };
        Ok(GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(max),
            minimum_volume_size: Some(block as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_we_did_not_issue_are_aborted() {
        assert_eq!(parse_token("").unwrap(), None);
        assert_eq!(parse_token("after:v-a").unwrap(), Some("v-a"));
        for bad in ["v-a", "after:", "after:../x", "garbage"] {
            assert_eq!(
                parse_token(bad).unwrap_err().code(),
                tonic::Code::Aborted,
                "{bad}"
            );
        }
        let (items, next) =
            page(vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)], 2).unwrap();
        assert_eq!((items, next.as_str()), (vec![1, 2], "after:b"));
        let (items, next) = page(vec![("a".into(), 1)], 0).unwrap();
        assert_eq!((items, next.as_str()), (vec![1], ""));
    }
}
