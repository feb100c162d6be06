//! StorageClass, VolumeSnapshotClass and VolumeAttributesClass parameters.
//!
//! Every key is checked and an unknown one is refused with
//! INVALID_ARGUMENT: a misspelt `blocksize` silently ignored would give
//! volumes a layout nobody asked for, and a QoS key silently dropped is how
//! one driver cleared every limit by accident (ceph-csi#6443). Keys under
//! `csi.storage.k8s.io/` are the CO's own (the external-provisioner passes
//! the PVC name and namespace there, and strips the secret references) and
//! are accepted and ignored.

use std::collections::{BTreeMap, HashMap};

use peers::backend::BackendKind;

use crate::errors::{CsiError, CsiResult};
use crate::validate::SUPPORTED_FS_TYPES;

/// Parameter: which backend holds the volume, by the names of
/// [`BackendKind`] (`file`; a backend this build lacks is refused with the feature it needs).
pub const BACKEND: &str = "backend";
/// Parameter: bytes per block (data object), a power of two from 4 KiB to
/// 64 MiB, in the size grammar of [`peers::size`] (`65536`, `64Ki`, `64K`,
/// `64KiB`).
pub const BLOCK_SIZE: &str = "blockSize";
/// Parameter: the filesystem the node service creates (ext4 or xfs),
/// handed to it through the volume context.
pub const FS_TYPE: &str = "fsType";
/// Parameter (RADOS): the cluster, by its fsid (`ceph fsid`), as ceph-csi's `clusterID` names
/// one; it must be the cluster the driver was started on.
pub const CLUSTER_ID: &str = "clusterID";
/// Parameter (RADOS): the pool (ceph-csi's name).
pub const POOL: &str = "pool";
/// Parameter (RADOS): the RADOS namespace within the pool (ceph-csi's `radosNamespace`);
/// default: the driver's.
pub const RADOS_NAMESPACE: &str = "radosNamespace";
/// Parameter: `"true"` when the file backend's directory is on a
/// filesystem every node mounts, so volumes are reachable from every node.
pub const SHARED: &str = "shared";

/// Mutable parameter: a per-volume IOPS limit (`0` = none).
pub const QOS_IOPS: &str = "qosIops";
/// Mutable parameter: a per-volume bandwidth limit in bytes per second
/// (`0` = none), in the size grammar of [`peers::size`] (`100Mi` = 100 MiB/s).
pub const QOS_BANDWIDTH: &str = "qosBandwidth";

/// Keys reserved for the CO.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// The storage backends a volume can live on: the backend module's
/// vocabulary, so a StorageClass and the command line name them alike.
pub type Backend = BackendKind;

/// Validated CreateVolume / GetCapacity parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    /// The backend, if the class names one (else the driver's).
    pub backend: Option<Backend>,
    /// Where a RADOS volume lives, for `backend: rados`.
    pub rados: Option<RadosTarget>,
    /// Block size, if the class sets one (else the source's, or 4 MiB).
    pub block_size: Option<u32>,
    /// Filesystem for mount volumes, if the class sets one.
    pub fs_type: Option<String>,
    /// Whether the directory is reachable from every node.
    pub shared: bool,
    /// The parameters as given, minus the CO's keys: what a retried
    /// CreateVolume is compared against.
    pub canonical: BTreeMap<String, String>,
}

/// The cluster, pool and namespace a RADOS StorageClass names. The controller checks them
/// against the backend it serves: a class never moves the driver to another cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RadosTarget {
    /// The cluster's fsid.
    pub cluster_id: String,
    pub pool: String,
    /// `None`: the driver's namespace.
    pub namespace: Option<String>,
}

/// Smallest and largest block sizes the mapper accepts.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;
/// Block size of a volume whose class does not choose one.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

/// The parameters without the CO's own keys, sorted.
pub fn canonical(params: &HashMap<String, String>) -> BTreeMap<String, String> {
    params
        .iter()
        .filter(|(k, _)| !k.starts_with(CO_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn parse_size(key: &str, value: &str) -> CsiResult<u64> {
    peers::size::parse(value)
        .map_err(|e| CsiError::InvalidArgument(format!("parameter {key}: {e}")))
}

fn parse_bool(key: &str, value: &str) -> CsiResult<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(CsiError::InvalidArgument(format!(
            "parameter {key}={value:?} must be \"true\" or \"false\""
        ))),
    }
}

impl VolumeParams {
    /// Parses and checks StorageClass parameters.
    pub fn parse(params: &HashMap<String, String>) -> CsiResult<Self> {
        let canonical = canonical(params);
        let mut out = VolumeParams {
            backend: None,
            rados: None,
            block_size: None,
            fs_type: None,
            shared: false,
            canonical,
        };
        for (key, value) in &out.canonical {
            match key.as_str() {
                BACKEND => {
                    out.backend = Some(BackendKind::parse(value).map_err(|e| {
                        CsiError::InvalidArgument(format!("parameter {BACKEND}={value:?}: {e}"))
                    })?);
                }
                CLUSTER_ID | POOL | RADOS_NAMESPACE => {} // below, with the backend known
                BLOCK_SIZE => {
                    let bs = parse_size(key, value)?;
                    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
                        return Err(CsiError::InvalidArgument(format!(
                            "parameter {BLOCK_SIZE}={value:?}: a power of two from 4Ki to 64Mi is required"
                        )));
                    }
                    out.block_size = Some(bs as u32);
                }
                FS_TYPE => {
                    if !SUPPORTED_FS_TYPES.contains(&value.as_str()) {
                        return Err(CsiError::InvalidArgument(format!(
                            "parameter {FS_TYPE}={value:?}: use one of {SUPPORTED_FS_TYPES:?}"
                        )));
                    }
                    out.fs_type = Some(value.clone());
                }
                SHARED => out.shared = parse_bool(key, value)?,
                other => {
                    return Err(CsiError::InvalidArgument(format!(
                        "unknown parameter {other:?} (known: {BACKEND}, {BLOCK_SIZE}, {FS_TYPE}, {SHARED}, and for backend rados {CLUSTER_ID}, {POOL}, {RADOS_NAMESPACE})"
                    )));
                }
            }
        }
        let get = |key: &str| out.canonical.get(key).cloned();
        if out.backend == Some(BackendKind::Rados) {
            let need = |key: &str| {
                get(key).filter(|v| !v.is_empty()).ok_or_else(|| {
                    CsiError::InvalidArgument(format!(
                        "parameter {key} is required with {BACKEND}: rados"
                    ))
                })
            };
            let namespace = get(RADOS_NAMESPACE);
            if namespace.as_deref() == Some("") {
                return Err(CsiError::InvalidArgument(format!(
                    "parameter {RADOS_NAMESPACE} is empty: leave it out for the driver's namespace"
                )));
            }
            if out.shared {
                return Err(CsiError::InvalidArgument(format!(
                    "parameter {SHARED} is for the file backend: RADOS volumes are reachable from every node"
                )));
            }
            out.rados = Some(RadosTarget {
                cluster_id: need(CLUSTER_ID)?,
                pool: need(POOL)?,
                namespace,
            });
        } else if let Some(key) = [CLUSTER_ID, POOL, RADOS_NAMESPACE]
            .into_iter()
            .find(|k| out.canonical.contains_key(*k))
        {
            return Err(CsiError::InvalidArgument(format!(
                "parameter {key} needs {BACKEND}: rados"
            )));
        }
        Ok(out)
    }
}

/// Validated mutable parameters: every key known and every value valid, or
/// an error and nothing to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MutableParams(pub BTreeMap<String, String>);

impl MutableParams {
    /// Parses ControllerModifyVolume (or CreateVolume) mutable parameters.
    pub fn parse(params: &HashMap<String, String>) -> CsiResult<Self> {
        let mut out = BTreeMap::new();
        for (key, value) in params {
            match key.as_str() {
                QOS_IOPS => {
                    value.parse::<u64>().map_err(|_| {
                        CsiError::InvalidArgument(format!(
                            "mutable parameter {key}={value:?} must be a non-negative integer"
                        ))
                    })?;
                }
                QOS_BANDWIDTH => {
                    parse_size(key, value)?;
                }
                other => {
                    return Err(CsiError::InvalidArgument(format!(
                        "unknown mutable parameter {other:?} (known: {QOS_IOPS}, {QOS_BANDWIDTH}); nothing was changed"
                    )));
                }
            }
            out.insert(key.clone(), value.clone());
        }
        Ok(MutableParams(out))
    }
}

/// The QoS limits a volume's mutable parameters ask for (a missing key is unlimited). The
/// values were checked by [`MutableParams::parse`] when they were accepted.
pub fn qos_limits(params: &BTreeMap<String, String>) -> peers::client::QosLimits {
    let iops = params.get(QOS_IOPS).and_then(|v| v.parse().ok());
    let bandwidth = params
        .get(QOS_BANDWIDTH)
        .and_then(|v| peers::size::parse(v).ok());
    peers::client::QosLimits {
        iops: iops.unwrap_or(0),
        bytes_per_sec: bandwidth.unwrap_or(0),
    }
}

/// Checks VolumeSnapshotClass / VolumeGroupSnapshotClass parameters: there
/// are none of ours yet, so anything but the CO's keys is refused.
pub fn check_snapshot_params(
    params: &HashMap<String, String>,
) -> CsiResult<BTreeMap<String, String>> {
    let canonical = canonical(params);
    if let Some(key) = canonical.keys().next() {
        return Err(CsiError::InvalidArgument(format!(
            "unknown snapshot parameter {key:?}: snapshot classes take no parameters"
        )));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volume_params() {
        let p = VolumeParams::parse(&map(&[
            ("blockSize", "64Ki"),
            ("fsType", "xfs"),
            ("shared", "true"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .unwrap();
        assert_eq!(p.block_size, Some(64 << 10));
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        for (spelling, want) in [("65536", 64 << 10), ("64K", 64 << 10), ("4MiB", 4 << 20)] {
            let p = VolumeParams::parse(&map(&[("blockSize", spelling)])).unwrap();
            assert_eq!(p.block_size, Some(want), "{spelling}");
        }
        assert!(p.shared);
        assert_eq!(
            p.canonical.len(),
            3,
            "the CO's key is not part of the identity"
        );
        assert_eq!(VolumeParams::parse(&map(&[])).unwrap().block_size, None);
        for bad in [
            ("blockSize", "3000"),
            ("blockSize", "128Mi"),
            ("blockSize", "lots"),
            ("blockSize", "1.5Mi"),
            ("blockSize", "-4Ki"),
            ("blockSize", ""),
            ("blockSize", "99999999999P"),
            ("fsType", "btrfs"),
            ("shared", "yes"),
            ("backend", "rados"),
            ("pool", "rbd"),
            ("blocksize", "4Ki"),
        ] {
            let e = VolumeParams::parse(&map(&[bad])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn backend_names_come_from_the_backend_module() {
        let p = VolumeParams::parse(&map(&[("backend", "file")])).unwrap();
        assert_eq!(p.backend, Some(BackendKind::File));
        let e = VolumeParams::parse(&map(&[("backend", "rados")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        #[cfg(not(feature = "rados"))]
        assert!(e.to_string().contains("cargo feature \"rados\""), "{e}");
        #[cfg(feature = "rados")]
        assert!(e.to_string().contains("clusterID is required"), "{e}");
        let e = VolumeParams::parse(&map(&[("backend", "nfs")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("\"file\""), "names what exists: {e}");
    }

    #[cfg(feature = "rados")]
    #[test]
    fn rados_params() {
        let p = VolumeParams::parse(&map(&[
            ("backend", "rados"),
            ("clusterID", "aa21"),
            ("pool", "archip"),
            ("radosNamespace", "team-a"),
        ]))
        .unwrap();
        assert_eq!(
            p.rados,
            Some(RadosTarget {
                cluster_id: "aa21".into(),
                pool: "archip".into(),
                namespace: Some("team-a".into())
            })
        );
        for (bad, says) in [
            (
                vec![("backend", "rados"), ("pool", "p")],
                "clusterID is required",
            ),
            (
                vec![("backend", "rados"), ("clusterID", "c")],
                "pool is required",
            ),
            (
                vec![
                    ("backend", "rados"),
                    ("clusterID", "c"),
                    ("pool", "p"),
                    ("shared", "true"),
                ],
                "every node",
            ),
            (
                vec![
                    ("backend", "rados"),
                    ("clusterID", "c"),
                    ("pool", "p"),
                    ("radosNamespace", ""),
                ],
                "empty",
            ),
            (
                vec![("backend", "file"), ("pool", "p")],
                "needs backend: rados",
            ),
        ] {
            let e = VolumeParams::parse(&map(&bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn mutable_params_are_all_or_nothing() {
        let ok = MutableParams::parse(&map(&[("qosIops", "100")])).unwrap();
        assert_eq!(ok.0.get("qosIops").map(String::as_str), Some("100"));
        let e = MutableParams::parse(&map(&[("qosIops", "100"), ("colour", "red")])).unwrap_err();
        assert!(e.to_string().contains("colour"));
        assert!(MutableParams::parse(&map(&[("qosBandwidth", "-1")])).is_err());
        for bad in ["1.5Mi", "", "lots", "99999999999P"] {
            let e = MutableParams::parse(&map(&[("qosBandwidth", bad)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
        assert!(
            MutableParams::parse(&map(&[("qosIops", "1K")])).is_err(),
            "a count, not a size"
        );
    }

    #[test]
    fn bandwidth_is_a_size() {
        let p =
            MutableParams::parse(&map(&[("qosBandwidth", "100Mi"), ("qosIops", "500")])).unwrap();
        let limits = qos_limits(&p.0);
        assert_eq!(limits.bytes_per_sec, 100 << 20);
        assert_eq!(limits.iops, 500);
        let raw = MutableParams::parse(&map(&[("qosBandwidth", "1048576")])).unwrap();
        assert_eq!(qos_limits(&raw.0).bytes_per_sec, 1 << 20);
        assert_eq!(qos_limits(&BTreeMap::new()).bytes_per_sec, 0, "unlimited");
    }

    #[test]
    fn snapshot_params() {
        assert!(
            check_snapshot_params(&map(&[("csi.storage.k8s.io/volumesnapshot/name", "x")])).is_ok()
        );
        assert!(check_snapshot_params(&map(&[("compress", "true")])).is_err());
    }
}
