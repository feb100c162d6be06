//! The controller's CSI records (`csi.v.*`, `csi.s.*`, `csi.g.*`): JSON documents in map
//! objects of the backend, read on every idempotent retry. The first byte picks the kind.
#![no_main]

use csi::meta::{self, GroupRecord, SnapshotRecord, VolumeRecord};
use libfuzzer_sys::fuzz_target;
use peers::blocker::ObjectName;

fn round_trip<T>(object: &ObjectName, data: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    if let Ok(r) = meta::decode_record::<T>(object, data) {
        let bytes = serde_json::to_vec(&r).expect("a record serialises");
        let again = meta::decode_record::<T>(object, &bytes).expect("an encoded record decodes");
        assert_eq!(again, r);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let object = ObjectName::new("csi.v.fuzz").expect("valid");
    match sel % 3 {
        0 => round_trip::<VolumeRecord>(&object, bytes),
        1 => round_trip::<SnapshotRecord>(&object, bytes),
        _ => round_trip::<GroupRecord>(&object, bytes),
    }
});
