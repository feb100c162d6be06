//! CSI names to Archipelago ids, deterministically.
//!
//! The CO retries CreateVolume and CreateSnapshot with the same `name` until
//! it sees a response, possibly across controller restarts, so the id of the
//! object a name creates must follow from the name alone: then a retry finds
//! the object it (or a crashed predecessor) made, and no table of names has
//! to be kept consistent with the backend.
//!
//! An id is also the object's name in the peers' catalogue (what
//! `VolumeClient` takes), so the node service turns a `volume_id` into a
//! volume with [`backend_name`] and nothing else. Ids are built from
//! `[A-Za-z0-9-]` only, so they are valid catalogue names whatever the CSI
//! name contains:
//!
//! ```text
//! v-<readable part of the name, <= 48 bytes>-<32 hex digits of SHA-256>   volume
//! s-<readable part>-<32 hex>                                              snapshot
//! g-<readable part>-<32 hex>                                              group snapshot
//! gs-<32 hex of (group id, volume id)>                                    group member snapshot
//! ```
//!
//! The readable part is for operators listing the catalogue; uniqueness comes
//! from the hash (128 bits), which covers the whole name and a per-kind
//! domain, so a volume and a snapshot with the same CSI name get different
//! ids. Ids are at most 83 bytes: well inside CSI's 128.

use sha2::{Digest, Sha256};

/// Longest readable prefix kept from a CSI name.
const READABLE: usize = 48;

/// The kinds of object a CSI name can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A writable volume.
    Volume,
    /// A snapshot made by CreateSnapshot.
    Snapshot,
    /// A group snapshot (only a metadata record; its members are snapshots).
    Group,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Volume => "v-",
            Kind::Snapshot => "s-",
            Kind::Group => "g-",
        }
    }

    fn domain(self) -> &'static [u8] {
        match self {
            Kind::Volume => b"archipelago.io/volume\0",
            Kind::Snapshot => b"archipelago.io/snapshot\0",
            Kind::Group => b"archipelago.io/group-snapshot\0",
        }
    }
}

fn hex32(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The id a CSI `name` gives an object of `kind`. Pure: the same name always
/// gives the same id.
pub fn id_for_name(kind: Kind, name: &str) -> String {
    let readable: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(READABLE)
        .collect();
    let hash = hex32(&[kind.domain(), name.as_bytes()]);
    format!("{}{readable}-{hash}", kind.prefix())
}

/// The volume id for a CreateVolume `name`.
pub fn volume_id(name: &str) -> String {
    id_for_name(Kind::Volume, name)
}

/// The snapshot id for a CreateSnapshot `name`.
pub fn snapshot_id(name: &str) -> String {
    id_for_name(Kind::Snapshot, name)
}

/// The group snapshot id for a CreateVolumeGroupSnapshot `name`.
pub fn group_id(name: &str) -> String {
    id_for_name(Kind::Group, name)
}

/// The id of the member snapshot of `volume_id` in group `group_id`: fixed
/// by the pair, so a retried group snapshot finds its members.
pub fn group_member_id(group_id: &str, volume_id: &str) -> String {
    let hash = hex32(&[
        b"archipelago.io/group-member\0",
        group_id.as_bytes(),
        b"\0",
        volume_id.as_bytes(),
    ]);
    format!("gs-{hash}")
}

/// The catalogue name behind a volume or snapshot id, or `None` if the id
/// cannot name anything in the catalogue (so the object does not exist).
///
/// Ids are the catalogue names themselves; this is the one place that
/// knows, so that a later id format (a backend tag, a version) changes only
/// here. Ids made by the CLI (`archip create db`) are accepted too, which lets
/// an operator import an existing volume as a static PV.
pub fn backend_name(id: &str) -> Option<&str> {
    peers::map_format::volume_name_problem(id)
        .is_none()
        .then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_distinct_and_valid() {
        let name = "pvc-3f1c2a9e-7b4d-4e2a-9c1d-0a1b2c3d4e5f";
        let v = volume_id(name);
        assert_eq!(v, volume_id(name));
        assert!(v.starts_with("v-pvc-3f1c2a9e-"), "{v}");
        assert_ne!(v, volume_id("pvc-other"));
        let s = snapshot_id(name);
        assert!(s.starts_with("s-") && s[2..] != v[2..], "{s} vs {v}");
        assert_ne!(group_id(name)[2..], v[2..]);
        for id in [
            &v,
            &s,
            &group_id(name),
            &group_member_id(&group_id(name), &v),
        ] {
            assert_eq!(backend_name(id), Some(id.as_str()), "{id}");
        }
    }

    #[test]
    fn any_csi_name_maps_to_a_valid_bounded_id() {
        let long = "x".repeat(128);
        let weird = "a/b/../c\u{1}\u{e9}t\u{e9} .name";
        let max = "\u{20ac}".repeat(42);
        for name in [long.as_str(), weird, max.as_str(), "-", ".", "..", "A"] {
            for kind in [Kind::Volume, Kind::Snapshot, Kind::Group] {
                let id = id_for_name(kind, name);
                assert!(id.len() <= 83, "{id}");
                assert!(backend_name(&id).is_some(), "{name:?} -> {id:?}");
            }
        }
        // Names that differ only in characters the readable part drops
        // still get different ids.
        assert_ne!(volume_id("a/b"), volume_id("a.b"));
    }

    #[test]
    fn member_ids_depend_on_both_group_and_volume() {
        let a = group_member_id("g-1", "v-1");
        assert_eq!(a, group_member_id("g-1", "v-1"));
        assert_ne!(a, group_member_id("g-1", "v-2"));
        assert_ne!(a, group_member_id("g-2", "v-1"));
        // The separator keeps ("g-1v", "-1") apart from ("g-1", "v-1").
        assert_ne!(a, group_member_id("g-1v", "-1"));
    }

    #[test]
    fn foreign_strings_are_not_backend_names() {
        for bad in ["", "../etc", "a/b", ".hidden", &"x".repeat(129)] {
            assert_eq!(backend_name(bad), None, "{bad:?}");
        }
    }
}
