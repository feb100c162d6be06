//! The wire format is the contract with every CO: these tests encode
//! messages and look at the raw tags, so a wrong field number or enum value
//! in csi.proto fails here rather than in a cluster.

use std::collections::HashMap;

use prost::Message;

use csi::pb::controller_service_capability::rpc::Type as CtrlCap;
use csi::pb::node_service_capability::rpc::Type as NodeCap;
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_content_source::{SnapshotSource, Type as SourceType};
use csi::pb::*;

/// Decodes the top-level (field number, wire type) pairs of a message.
fn tags(bytes: &[u8]) -> Vec<(u32, u8)> {
    let mut out = Vec::new();
    let mut buf = bytes;
    while !buf.is_empty() {
        let key = prost::encoding::decode_varint(&mut buf).unwrap();
        let field = (key >> 3) as u32;
        let wire = (key & 7) as u8;
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut buf).unwrap();
            }
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
                buf = &buf[len..];
            }
            other => panic!("unexpected wire type {other}"),
        }
        out.push((field, wire));
    }
    out
}

fn numbers(bytes: &[u8]) -> Vec<u32> {
    let mut n: Vec<u32> = tags(bytes).into_iter().map(|(f, _)| f).collect();
    n.dedup();
    n
}

#[test]
fn create_volume_request_field_numbers() {
    let req = CreateVolumeRequest {
        name: "pvc-1".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability::default()],
        parameters: HashMap::from([("backend".into(), "file".into())]),
        secrets: HashMap::from([("key".into(), "s3cr3t".into())]),
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(SourceType::Snapshot(SnapshotSource {
                snapshot_id: "snap".into(),
            })),
        }),
        accessibility_requirements: Some(TopologyRequirement::default()),
        mutable_parameters: HashMap::from([("qos".into(), "gold".into())]),
    };
    assert_eq!(numbers(&req.encode_to_vec()), [1, 2, 3, 4, 5, 6, 7, 8]);

    // name alone: tag byte (1 << 3 | 2), length, bytes.
    let only_name = CreateVolumeRequest {
        name: "ab".into(),
        ..Default::default()
    };
    assert_eq!(only_name.encode_to_vec(), [0x0a, 2, b'a', b'b']);
    // volume_content_source alone is field 6, length-delimited: 0x32.
    let only_source = CreateVolumeRequest {
        volume_content_source: req.volume_content_source.clone(),
        ..Default::default()
    };
    assert_eq!(only_source.encode_to_vec()[0], 6 << 3 | 2);
}

#[test]
fn nested_field_numbers() {
    // The snapshot branch of the oneof is 1, the volume branch 2.
    let src = VolumeContentSource {
        r#type: Some(SourceType::Volume(volume_content_source::VolumeSource {
            volume_id: "v".into(),
        })),
    };
    assert_eq!(src.encode_to_vec(), [0x12, 3, 0x0a, 1, b'v']);

    let cap = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: "xfs".into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: "107".into(),
            },
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    };
    assert_eq!(numbers(&cap.encode_to_vec()), [2, 3]);
    let volume_capability::AccessType::Mount(m) = cap.access_type.clone().unwrap() else {
        unreachable!()
    };
    assert_eq!(numbers(&m.encode_to_vec()), [1, 2, 3]);
    // mode is field 1, MULTI_NODE_MULTI_WRITER is 5.
    assert_eq!(cap.access_mode.unwrap().encode_to_vec(), [0x08, 5]);

    let vol = Volume {
        capacity_bytes: 1,
        volume_id: "v".into(),
        volume_context: HashMap::from([("a".into(), "b".into())]),
        content_source: Some(src),
        accessible_topology: vec![Topology::default()],
    };
    assert_eq!(numbers(&vol.encode_to_vec()), [1, 2, 3, 4, 5]);
}

#[test]
fn snapshot_and_node_field_numbers() {
    let snap = Snapshot {
        size_bytes: 1,
        snapshot_id: "s".into(),
        source_volume_id: "v".into(),
        creation_time: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        ready_to_use: true,
        group_snapshot_id: "g".into(),
    };
    assert_eq!(numbers(&snap.encode_to_vec()), [1, 2, 3, 4, 5, 6]);

    let publish = NodePublishVolumeRequest {
        volume_id: "v".into(),
        publish_context: HashMap::from([("a".into(), "b".into())]),
        staging_target_path: "/s".into(),
        target_path: "/t".into(),
        volume_capability: Some(VolumeCapability::default()),
        readonly: true,
        secrets: HashMap::from([("k".into(), "v".into())]),
        volume_context: HashMap::from([("c".into(), "d".into())]),
    };
    assert_eq!(numbers(&publish.encode_to_vec()), [1, 2, 3, 4, 5, 6, 7, 8]);

    let info = NodeGetInfoResponse {
        node_id: "n".into(),
        max_volumes_per_node: 3,
        accessible_topology: Some(Topology::default()),
    };
    assert_eq!(numbers(&info.encode_to_vec()), [1, 2, 3]);

    let group = GetVolumeGroupSnapshotRequest {
        group_snapshot_id: "g".into(),
        snapshot_ids: vec!["s".into()],
        secrets: HashMap::from([("k".into(), "v".into())]),
    };
    assert_eq!(numbers(&group.encode_to_vec()), [1, 2, 3]);
}

#[test]
fn capability_enum_values() {
    assert_eq!(CtrlCap::CreateDeleteVolume as i32, 1);
    assert_eq!(CtrlCap::CloneVolume as i32, 7);
    assert_eq!(CtrlCap::ListVolumesPublishedNodes as i32, 10);
    assert_eq!(CtrlCap::ModifyVolume as i32, 14);
    assert_eq!(CtrlCap::GetSnapshot as i32, 15);
    assert_eq!(NodeCap::StageUnstageVolume as i32, 1);
    assert_eq!(NodeCap::VolumeMountGroup as i32, 6);
    assert_eq!(Mode::SingleNodeSingleWriter as i32, 6);
    assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
    assert_eq!(
        plugin_capability::service::Type::GroupControllerService as i32,
        3
    );
    assert_eq!(
        group_controller_service_capability::rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
        1
    );
}

#[test]
fn decodes_bytes_a_go_client_would_send() {
    // ProbeResponse{ready: BoolValue{value: true}}: field 1, then the
    // wrapper's own field 1.
    let probe = ProbeResponse::decode(&[0x0a, 2, 0x08, 1][..]).unwrap();
    assert_eq!(probe.ready, Some(true));

    // NodeStageVolumeRequest{volume_id: "v", staging_target_path: "/s"}.
    let stage = NodeStageVolumeRequest::decode(&[0x0a, 1, b'v', 0x1a, 2, b'/', b's'][..]).unwrap();
    assert_eq!(stage.volume_id, "v");
    assert_eq!(stage.staging_target_path, "/s");
}

#[test]
fn debug_output_never_shows_secrets() {
    let req = CreateVolumeRequest {
        name: "pvc-1".into(),
        secrets: HashMap::from([("userKey".into(), "AQBsecretkey==".into())]),
        ..Default::default()
    };
    let shown = format!("{req:?}");
    assert!(shown.contains("pvc-1"), "{shown}");
    assert!(shown.contains("<1 redacted>"), "{shown}");
    assert!(!shown.contains("AQBsecretkey"), "{shown}");
    assert!(!shown.contains("userKey"), "{shown}");

    let stage = NodeStageVolumeRequest {
        secrets: HashMap::from([("k".into(), "hunter2".into())]),
        ..Default::default()
    };
    assert!(!format!("{stage:#?}").contains("hunter2"));
}
