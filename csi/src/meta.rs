//! What the controller must remember that the volume catalogue does not
//! hold: the CSI request a volume was created from (to tell a retry from an
//! incompatible re-create), which nodes it is published to, its mutable
//! parameters, and group snapshots.
//!
//! Records are small JSON documents stored as map objects of a
//! [`Blocker`]: replaced whole and atomically, with a version
//! compare-and-swap, on whatever backend the operator points the controller
//! at (for the file backend, a `csi/` directory beside `objects/`). So they
//! survive restarts like the volumes they describe, and a second controller
//! instance racing this one (during a leader handover) cannot lose an update:
//! a write made on a stale version fails and the RPC returns ABORTED, which
//! the CO retries.
//!
//! Object names: `csi.v.<volume id>`, `csi.s.<snapshot id>`,
//! `csi.g.<group snapshot id>`. Ids are `[A-Za-z0-9-]`, so these are valid
//! object names.

use std::collections::BTreeMap;
use std::sync::Arc;

use peers::backend::{BackendConfig, BackendError, Store};
use peers::blocker::{Blocker, BlockerError, Capacity, Expect, ObjectName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::errors::CsiError;

/// Current record format; a record of a newer format is refused rather
/// than misread.
pub const RECORD_VERSION: u32 = 1;

/// Decodes a record read from `object` (named in errors): the format version first, so that a
/// newer controller's record is refused rather than misread. Public so that the fuzz target
/// runs exactly this.
pub fn decode_record<T: DeserializeOwned>(
    object: &ObjectName,
    data: &[u8],
) -> Result<T, MetaError> {
    let corrupt = |reason: String| MetaError::Corrupt {
        object: object.to_string(),
        reason,
    };
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let v: Versioned = serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
    if v.version > RECORD_VERSION {
        return Err(corrupt(format!(
            "format {} is newer than this controller's {RECORD_VERSION}",
            v.version
        )));
    }
    serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))
}

/// The kind of a record, which fixes its object-name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// [`VolumeRecord`].
    Volume,
    /// [`SnapshotRecord`].
    Snapshot,
    /// [`GroupRecord`].
    Group,
}

impl RecordKind {
    fn prefix(self) -> &'static str {
        match self {
            RecordKind::Volume => "csi.v.",
            RecordKind::Snapshot => "csi.s.",
            RecordKind::Group => "csi.g.",
        }
    }
}

/// Where a volume's initial content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// Cloned from this snapshot id.
    Snapshot(String),
    /// Cloned from this volume id.
    Volume(String),
}

/// One node a volume is published to, as ControllerPublishVolume asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// The CO's node id.
    pub node_id: String,
    /// `volume_capability.access_mode.mode` of the publish request.
    pub mode: i32,
    /// Raw block (true) or filesystem (false).
    pub block: bool,
    /// The request's `readonly` flag.
    pub readonly: bool,
}

/// A volume created through CSI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// The CreateVolume `name`.
    pub name: String,
    /// The StorageClass parameters it was created with (the
    /// `csi.storage.k8s.io/` ones removed: they name the PVC, not the
    /// volume's properties).
    pub parameters: BTreeMap<String, String>,
    /// Mutable parameters, as created and as modified since.
    pub mutable_parameters: BTreeMap<String, String>,
    /// Content source, if any.
    pub source: Option<Source>,
    /// The node whose directory holds the volume, when only that node can
    /// reach it; `None` means every node can.
    pub node: Option<String>,
    /// Nodes it is published to.
    pub publications: Vec<Publication>,
}

/// A snapshot created through CSI (alone or as a group member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Format version.
    pub version: u32,
    /// The CreateSnapshot `name`; empty for a group member.
    pub name: String,
    /// The volume it was taken of.
    pub source_volume_id: String,
    /// The group it belongs to, if any.
    pub group_id: Option<String>,
}

/// A group snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Format version.
    pub version: u32,
    /// The CreateVolumeGroupSnapshot `name`.
    pub name: String,
    /// Member volumes, in request order.
    pub source_volume_ids: Vec<String>,
    /// Member snapshots, one per source volume, in the same order.
    pub snapshot_ids: Vec<String>,
    /// The request's parameters (minus `csi.storage.k8s.io/`).
    pub parameters: BTreeMap<String, String>,
    /// False from the intent until every member is cut; a group found
    /// incomplete (a crash in between) is cut again from scratch, because
    /// members taken at different times would not be consistent.
    pub complete: bool,
    /// When the members were cut, seconds since the Unix epoch.
    pub created: u64,
}

/// A record with the version to compare-and-swap against.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    /// The record.
    pub record: T,
    /// Its object version.
    pub version: u64,
}

/// Why the store failed, before it becomes a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Someone else changed the record between our read and our write.
    #[error("record {object} changed concurrently")]
    Conflict {
        /// The record object.
        object: String,
    },
    /// The record does not decode.
    #[error("record {object} is unreadable: {reason}")]
    Corrupt {
        /// The record object.
        object: String,
        /// Why.
        reason: String,
    },
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BlockerError),
}

impl From<MetaError> for CsiError {
    fn from(e: MetaError) -> Self {
        match e {
            // The CO retries ABORTED with backoff, which is the right
            // answer to a lost race.
            MetaError::Conflict { .. } => CsiError::Aborted(format!(
                "{e}; another controller instance is working on it, retry"
            )),
            MetaError::Backend(BlockerError::Io { ref source, .. })
                if crate::errors::is_out_of_space(source) =>
            {
                CsiError::ResourceExhausted(format!("controller metadata: {e}"))
            }
            e => CsiError::Internal(format!("controller metadata: {e}")),
        }
    }
}

/// The record store.
#[derive(Debug, Clone)]
pub struct MetaStore {
    backend: Arc<dyn Blocker>,
}

impl MetaStore {
    /// Records live in `backend`'s map objects.
    pub fn new(backend: Arc<dyn Blocker>) -> Self {
        Self { backend }
    }

    /// Records in the records store of a configured backend (for the file backend,
    /// `<dir>/csi`), apart from the volumes' objects.
    pub fn open(backend: &BackendConfig) -> Result<Self, BackendError> {
        Ok(Self::new(backend.open(Store::Records)?))
    }

    /// The identity of the store holding the records (for RADOS it names the cluster's fsid).
    pub fn backend_id(&self) -> peers::blocker::BackendId {
        self.backend.identity()
    }

    /// Total and available bytes of the backend that holds the records, which is the
    /// volumes' backend too (the filesystem of the file backend's directory, a RADOS pool):
    /// what GetCapacity reports, without a path of its own to `statvfs`.
    pub async fn capacity(&self) -> Result<Capacity, MetaError> {
        Ok(self.backend.capacity().await?)
    }

    fn object(kind: RecordKind, id: &str) -> Result<ObjectName, MetaError> {
        Ok(ObjectName::new(format!("{}{id}", kind.prefix()))?)
    }

    /// Reads a record, or `None` if there is none.
    pub async fn get<T: DeserializeOwned>(
        &self,
        kind: RecordKind,
        id: &str,
    ) -> Result<Option<Stored<T>>, MetaError> {
        let object = Self::object(kind, id)?;
        let Some(raw) = self.backend.read_map(&object).await? else {
            return Ok(None);
        };
        let record = decode_record(&object, &raw.data)?;
        Ok(Some(Stored {
            record,
            version: raw.version,
        }))
    }

    /// Writes a record if the stored one is still at `expect` (`None`: there
    /// must be none). Returns the new version.
    pub async fn put<T: Serialize>(
        &self,
        kind: RecordKind,
        id: &str,
        record: &T,
        expect: Option<u64>,
    ) -> Result<u64, MetaError> {
        let object = Self::object(kind, id)?;
        let data = serde_json::to_vec(record).map_err(|e| MetaError::Corrupt {
            object: object.to_string(),
            reason: e.to_string(),
        })?;
        let expect = expect.map_or(Expect::Absent, Expect::Version);
        match self.backend.write_map(&object, &data, expect, None).await {
            Err(BlockerError::VersionMismatch { .. }) => Err(MetaError::Conflict {
                object: object.to_string(),
            }),
            r => Ok(r?),
        }
    }

    /// Removes a record; a missing one is fine.
    pub async fn delete(&self, kind: RecordKind, id: &str) -> Result<(), MetaError> {
        let object = Self::object(kind, id)?;
        match self.backend.delete_map(&object, Expect::Any, None).await {
            Ok(()) | Err(BlockerError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The ids of every record of `kind`, sorted.
    pub async fn ids(&self, kind: RecordKind) -> Result<Vec<String>, MetaError> {
        let prefix = kind.prefix();
        let mut ids: Vec<String> = self
            .backend
            .list(prefix)
            .await?
            .into_iter()
            .filter_map(|o| o.name.as_str().strip_prefix(prefix).map(str::to_owned))
            .collect();
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peers::blocker::MemoryBlocker;

    fn record(name: &str) -> SnapshotRecord {
        SnapshotRecord {
            version: RECORD_VERSION,
            name: name.into(),
            source_volume_id: "v-a".into(),
            group_id: None,
        }
    }

    #[tokio::test]
    async fn put_get_cas_list_delete() {
        let store = MetaStore::new(Arc::new(MemoryBlocker::new()));
        assert!(
            store
                .get::<SnapshotRecord>(RecordKind::Snapshot, "s-1")
                .await
                .unwrap()
                .is_none()
        );
        let v1 = store
            .put(RecordKind::Snapshot, "s-1", &record("one"), None)
            .await
            .unwrap();
        // A second create of the same record loses the race.
        let e = store
            .put(RecordKind::Snapshot, "s-1", &record("two"), None)
            .await
            .unwrap_err();
        assert!(matches!(e, MetaError::Conflict { .. }), "{e}");
        let got = store
            .get::<SnapshotRecord>(RecordKind::Snapshot, "s-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((got.record.name.as_str(), got.version), ("one", v1));
        let v2 = store
            .put(RecordKind::Snapshot, "s-1", &record("three"), Some(v1))
            .await
            .unwrap();
        assert!(v2 > v1);
        // A write on the stale version is refused.
        assert!(
            store
                .put(RecordKind::Snapshot, "s-1", &record("four"), Some(v1))
                .await
                .is_err()
        );
        store
            .put(RecordKind::Volume, "v-1", &record("other kind"), None)
            .await
            .unwrap();
        assert_eq!(store.ids(RecordKind::Snapshot).await.unwrap(), ["s-1"]);
        store.delete(RecordKind::Snapshot, "s-1").await.unwrap();
        store.delete(RecordKind::Snapshot, "s-1").await.unwrap();
        assert!(store.ids(RecordKind::Snapshot).await.unwrap().is_empty());
        assert_eq!(store.ids(RecordKind::Volume).await.unwrap(), ["v-1"]);
    }

    #[tokio::test]
    async fn capacity_is_the_backends() {
        let store = MetaStore::new(Arc::new(MemoryBlocker::with_capacity(1 << 20)));
        let c = store.capacity().await.unwrap();
        assert_eq!((c.total, c.available), (1 << 20, 1 << 20));
        let dir = tempfile::tempdir().unwrap();
        let files = MetaStore::open(&BackendConfig::file(dir.path())).unwrap();
        let c = files.capacity().await.unwrap();
        assert!(c.total > 0 && c.available <= c.total, "{c:?}");
        assert!(
            dir.path().join("csi").is_dir(),
            "records keep their directory"
        );
    }

    #[tokio::test]
    async fn newer_formats_are_refused_not_misread() {
        let backend = Arc::new(MemoryBlocker::new());
        let store = MetaStore::new(backend.clone());
        let object = ObjectName::new("csi.s.s-9").unwrap();
        backend
            .write_map(&object, br#"{"version":99}"#, Expect::Absent, None)
            .await
            .unwrap();
        let e = store
            .get::<SnapshotRecord>(RecordKind::Snapshot, "s-9")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
    }
}
