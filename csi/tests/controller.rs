//! Conformance of the Identity and Controller services (volumes,
//! publication, listing, capacity, expansion, modification) over a real
//! unix socket, against a real peer set.

mod plugin;

use peers::backend::BackendConfig;
use peers::client::VolumeKind;
use peers::peerset::{PeerConfig, PeerSet};
use tonic::Code;

use csi::controller::{PUBLISH_ACCESS_MODE, TOPOLOGY_KEY};
use csi::meta::{MetaStore, RecordKind, VolumeRecord};
use csi::pb::controller_service_capability::{self, rpc};
use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_content_source as vcs;
use csi::pb::*;
use plugin::*;

fn code<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "{s:?} has no message");
            s.code()
        }
    }
}

async fn make(p: &Plugin, req: CreateVolumeRequest) -> Volume {
    p.controller()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

fn publish(
    id: &str,
    node: &str,
    cap: VolumeCapability,
    readonly: bool,
) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish(id: &str, node: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn records(p: &Plugin) -> MetaStore {
    MetaStore::open(&BackendConfig::file(p.dir.path())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_the_peer_set_health() {
    let mut p = Plugin::start("identity").await;
    let mut id = p.identity();
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, csi::DRIVER_NAME);
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities, csi::identity::plugin_capabilities());
    let probe = id.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    // With the peers gone, every controller RPC would fail: Probe says so.
    p.set.take().unwrap().stop();
    let e = id.probe(ProbeRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("vlmc"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_capabilities_are_the_advertised_set() {
    let p = Plugin::start("caps").await;
    let caps = p
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let types: Vec<i32> = caps
        .iter()
        .map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("empty capability"),
        })
        .collect();
    for want in [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::PublishUnpublishVolume,
        rpc::Type::ListVolumes,
        rpc::Type::GetCapacity,
        rpc::Type::CreateDeleteSnapshot,
        rpc::Type::ListSnapshots,
        rpc::Type::CloneVolume,
        rpc::Type::PublishReadonly,
        rpc::Type::ExpandVolume,
        rpc::Type::ListVolumesPublishedNodes,
        rpc::Type::VolumeCondition,
        rpc::Type::GetVolume,
        rpc::Type::SingleNodeMultiWriter,
        rpc::Type::ModifyVolume,
        rpc::Type::GetSnapshot,
    ] {
        assert!(types.contains(&(want as i32)), "{want:?} missing");
    }
    assert_eq!(types.len(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_rounds_up_to_the_block_size_and_is_idempotent() {
    let p = Plugin::start("create").await;
    let v = make(&p, create("pvc-5mib", 5 * MI)).await;
    assert_eq!(v.capacity_bytes as u64, 8 * MI, "4 MiB blocks");
    assert!(v.volume_id.len() <= 128);
    let info = p.volumes.info(&v.volume_id).await.unwrap();
    assert_eq!((info.size, info.kind), (8 * MI, VolumeKind::Volume));
    assert_eq!(v.volume_context["blockSize"], (4 * MI).to_string());
    assert_eq!(
        v.accessible_topology[0].segments[TOPOLOGY_KEY], HOME,
        "node-local by default"
    );
    // The same request again: the same volume.
    let again = make(&p, create("pvc-5mib", 5 * MI)).await;
    assert_eq!(again, v);
    // A smaller request is still satisfied by the existing volume.
    let smaller = make(&p, create("pvc-5mib", MI)).await;
    assert_eq!(smaller.volume_id, v.volume_id);

    // StorageClass block size and filesystem.
    let mut req = create("pvc-small-blocks", 100 << 10);
    req.parameters = params(&[
        ("blockSize", "64Ki"),
        ("fsType", "xfs"),
        ("csi.storage.k8s.io/pvc/name", "data"),
    ]);
    let small = make(&p, req).await;
    assert_eq!(small.capacity_bytes, 128 << 10);
    assert_eq!(small.volume_context["fsType"], "xfs");
    assert_eq!(
        p.volumes.info(&small.volume_id).await.unwrap().block_size,
        64 << 10
    );

    // No capacity: the default (1 GiB); only a limit: whole blocks under it.
    let mut req = create("pvc-default", 0);
    req.capacity_range = None;
    assert_eq!(make(&p, req).await.capacity_bytes as u64, GI);
    let mut req = create("pvc-limit-only", 0);
    req.capacity_range = range(0, 10 * MI);
    assert_eq!(make(&p, req).await.capacity_bytes as u64, 8 * MI);

    // A 128-byte name is fine; the id still fits in 128 bytes.
    let long = make(&p, create(&"n".repeat(128), MI)).await;
    assert!(long.volume_id.len() <= 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_errors_follow_the_spec() {
    let p = Plugin::start("create-errors").await;
    let mut c = p.controller();
    make(&p, create("pvc-a", 8 * MI)).await;
    let cases: Vec<(&str, CreateVolumeRequest, Code)> = vec![
        ("missing name", create("", MI), Code::InvalidArgument),
        (
            "name over 128 bytes",
            create(&"n".repeat(129), MI),
            Code::InvalidArgument,
        ),
        (
            "no capabilities",
            CreateVolumeRequest {
                volume_capabilities: vec![],
                ..create("pvc-nocap", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "multi-node writer filesystem",
            CreateVolumeRequest {
                volume_capabilities: vec![mount(Mode::MultiNodeMultiWriter)],
                ..create("pvc-rwx-fs", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "unknown parameter",
            CreateVolumeRequest {
                parameters: params(&[("replicas", "3")]),
                ..create("pvc-params", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "unknown mutable parameter",
            CreateVolumeRequest {
                mutable_parameters: params(&[("tier", "gold")]),
                ..create("pvc-mut", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "negative capacity",
            CreateVolumeRequest {
                capacity_range: Some(CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                }),
                ..create("pvc-neg", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "rounding passes the limit",
            CreateVolumeRequest {
                capacity_range: range(5 * MI, 6 * MI),
                ..create("pvc-limit", MI)
            },
            Code::OutOfRange,
        ),
        (
            "same name, other parameters",
            CreateVolumeRequest {
                parameters: params(&[("blockSize", "64Ki")]),
                ..create("pvc-a", 8 * MI)
            },
            Code::AlreadyExists,
        ),
        (
            "same name, larger size",
            create("pvc-a", 16 * MI),
            Code::AlreadyExists,
        ),
        (
            "same name, now from a snapshot",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
                        snapshot_id: "s-x".into(),
                    })),
                }),
                ..create("pvc-a", 8 * MI)
            },
            Code::AlreadyExists,
        ),
        (
            "missing source snapshot",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
                        snapshot_id: "s-nothing-here".into(),
                    })),
                }),
                ..create("pvc-from-nothing", MI)
            },
            Code::NotFound,
        ),
        (
            "missing source volume",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
                        volume_id: "v-nothing-here".into(),
                    })),
                }),
                ..create("pvc-from-nothing-2", MI)
            },
            Code::NotFound,
        ),
        (
            "empty content source",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource { r#type: None }),
                ..create("pvc-empty-src", MI)
            },
            Code::InvalidArgument,
        ),
        (
            "topology that excludes the directory's node",
            CreateVolumeRequest {
                accessibility_requirements: Some(TopologyRequirement {
                    requisite: vec![Topology {
                        segments: params(&[(TOPOLOGY_KEY, "node-elsewhere")]),
                    }],
                    preferred: vec![],
                }),
                ..create("pvc-elsewhere", MI)
            },
            Code::ResourceExhausted,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.create_volume(req).await), want, "{what}");
    }
    // Nothing was left behind by the failures.
    let names: Vec<String> = p
        .volumes
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, [csi::ids::volume_id("pvc-a")]);
    assert_eq!(records(&p).ids(RecordKind::Volume).await.unwrap().len(), 1);

    // A shared directory reaches every node, so any topology is fine.
    let shared = make(
        &p,
        CreateVolumeRequest {
            parameters: params(&[("shared", "true")]),
            accessibility_requirements: Some(TopologyRequirement {
                requisite: vec![Topology {
                    segments: params(&[(TOPOLOGY_KEY, "node-elsewhere")]),
                }],
                preferred: vec![],
            }),
            ..create("pvc-shared", MI)
        },
    )
    .await;
    assert!(shared.accessible_topology.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_in_flight_makes_the_next_one_on_the_same_id_abort() {
    let p = Plugin::start("aborted").await;
    let mut c = p.controller();
    let id = csi::ids::volume_id("pvc-busy");
    let held = p.plugin.in_flight().begin(&[&id]).unwrap();
    let e = c.create_volume(create("pvc-busy", MI)).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let e = c
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    // Other names go on meanwhile.
    make(&p, create("pvc-other", MI)).await;
    drop(held);
    assert_eq!(make(&p, create("pvc-busy", MI)).await.volume_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_across_controller_restarts() {
    let mut p = Plugin::start("restart").await;
    let v = make(&p, create("pvc-restart", 8 * MI)).await;
    let mut req = publish(&v.volume_id, HOME, mount(Mode::SingleNodeWriter), false);
    p.controller()
        .controller_publish_volume(req.clone())
        .await
        .unwrap();
    p.restart_controller().await;
    assert_eq!(make(&p, create("pvc-restart", 8 * MI)).await, v);
    let e = p
        .controller()
        .create_volume(create("pvc-restart", 64 * MI))
        .await;
    assert_eq!(code(e), Code::AlreadyExists);
    // The publication was persisted: an incompatible re-publish is refused.
    req.readonly = true;
    assert_eq!(
        code(p.controller().controller_publish_volume(req).await),
        Code::AlreadyExists
    );
    let got = p
        .controller()
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, [HOME]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_is_idempotent_and_never_deletes_a_snapshot() {
    let p = Plugin::start("delete").await;
    let mut c = p.controller();
    let v = make(&p, create("pvc-del", MI)).await;
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    // Published: refused, and nothing is deleted.
    c.controller_publish_volume(publish(
        &v.volume_id,
        HOME,
        mount(Mode::SingleNodeWriter),
        false,
    ))
    .await
    .unwrap();
    assert_eq!(
        code(c.delete_volume(del(&v.volume_id)).await),
        Code::FailedPrecondition
    );
    assert!(p.volumes.info(&v.volume_id).await.is_ok());
    c.controller_unpublish_volume(unpublish(&v.volume_id, HOME))
        .await
        .unwrap();
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    assert!(p.volumes.info(&v.volume_id).await.is_err());
    assert!(
        records(&p)
            .ids(RecordKind::Volume)
            .await
            .unwrap()
            .is_empty()
    );
    c.delete_volume(del(&v.volume_id)).await.unwrap();
    c.delete_volume(del("v-never-existed")).await.unwrap();
    c.delete_volume(del("not/even/a/name")).await.unwrap();
    assert_eq!(code(c.delete_volume(del("")).await), Code::InvalidArgument);

    // A snapshot id given to DeleteVolume leaves the snapshot alone.
    let w = make(&p, create("pvc-keep", MI)).await;
    let s = c
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: w.volume_id.clone(),
            name: "snap-keep".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    c.delete_volume(del(&s.snapshot_id)).await.unwrap();
    assert_eq!(
        p.volumes.info(&s.snapshot_id).await.unwrap().kind,
        VolumeKind::Snapshot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_records_nodes_and_enforces_single_writers() {
    let p = Plugin::start("publish").await;
    let mut c = p.controller();
    let local = make(&p, create("pvc-local", MI)).await;
    let snw = mount(Mode::SingleNodeWriter);

    let ctx = c
        .controller_publish_volume(publish(&local.volume_id, HOME, snw.clone(), false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx[PUBLISH_ACCESS_MODE], "SINGLE_NODE_WRITER");
    // The same publication again: the same answer.
    let again = c
        .controller_publish_volume(publish(&local.volume_id, HOME, snw.clone(), false))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again, ctx);
    // Same node, incompatible: ALREADY_EXISTS.
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&local.volume_id, HOME, snw.clone(), true))
                .await
        ),
        Code::AlreadyExists
    );
    // A node-local volume cannot reach another node that exists (its peer set runs on this
    // host) ...
    let (other, _other_data) = p.other_node("node-b");
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&local.volume_id, "node-b", snw.clone(), false))
                .await
        ),
        Code::FailedPrecondition
    );
    // ... and a node that does not exist is NOT_FOUND (csi-sanity's "node does not exist"),
    // not a topology mismatch.
    let e = c
        .controller_publish_volume(publish(
            &local.volume_id,
            "some-fake-node-id",
            snw.clone(),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("some-fake-node-id"), "{e:?}");
    // Once node-b's peer set is gone, it is no longer known either.
    other.stop();
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&local.volume_id, "node-b", snw.clone(), false))
                .await
        ),
        Code::NotFound
    );

    // A shared single-writer volume: a second node is refused.
    let mut req = create("pvc-shared", MI);
    req.parameters = params(&[("shared", "true")]);
    let shared = make(&p, req).await;
    c.controller_publish_volume(publish(&shared.volume_id, "node-a", snw.clone(), false))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&shared.volume_id, "node-b", snw.clone(), false))
                .await
        ),
        Code::FailedPrecondition
    );

    // Multi-node multi-writer block (live migration): both nodes at once.
    let mut req = create("pvc-rwx", MI);
    req.parameters = params(&[("shared", "true")]);
    req.volume_capabilities = vec![block(Mode::MultiNodeMultiWriter)];
    let rwx = make(&p, req).await;
    let mnmw = block(Mode::MultiNodeMultiWriter);
    for node in ["node-a", "node-b"] {
        c.controller_publish_volume(publish(&rwx.volume_id, node, mnmw.clone(), false))
            .await
            .unwrap();
    }
    // ...but not a single-node mode next to them.
    assert_eq!(
        code(
            c.controller_publish_volume(publish(
                &rwx.volume_id,
                "node-c",
                block(Mode::SingleNodeWriter),
                false
            ))
            .await
        ),
        Code::FailedPrecondition
    );

    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let nodes_of = |id: &str| -> Vec<String> {
        listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == id)
            .unwrap()
            .status
            .clone()
            .unwrap()
            .published_node_ids
    };
    assert_eq!(nodes_of(&rwx.volume_id), ["node-a", "node-b"]);
    assert_eq!(nodes_of(&local.volume_id), [HOME]);

    // Unpublish: idempotent, and then the other node may publish.
    for _ in 0..2 {
        c.controller_unpublish_volume(unpublish(&shared.volume_id, "node-a"))
            .await
            .unwrap();
    }
    c.controller_publish_volume(publish(&shared.volume_id, "node-b", snw.clone(), false))
        .await
        .unwrap();
    // Unpublish from every node at once (empty node id).
    c.controller_unpublish_volume(unpublish(&rwx.volume_id, ""))
        .await
        .unwrap();
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: rwx.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.status.unwrap().published_node_ids.is_empty());
    c.controller_unpublish_volume(unpublish("v-gone", "node-a"))
        .await
        .unwrap();

    // Errors.
    assert_eq!(
        code(
            c.controller_publish_volume(publish("v-missing", HOME, snw.clone(), false))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish(
                &local.volume_id,
                "no such node!",
                snw.clone(),
                false
            ))
            .await
        ),
        Code::NotFound
    );
    let mut no_cap = publish(&local.volume_id, HOME, snw.clone(), false);
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(no_cap).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_publish_volume(publish(&local.volume_id, "", snw.clone(), false))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.controller_unpublish_volume(unpublish("", HOME)).await),
        Code::InvalidArgument
    );
}

/// The lock handover: a node that leaves a volume without releasing its
/// lock (it crashed) keeps every other node out until the controller
/// unpublishes it, which breaks the lock with fencing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_breaks_the_lock_of_the_node_that_left() {
    let p = Plugin::start("handover").await;
    let mut c = p.controller();
    let mut req = create("pvc-vm-disk", 8 * MI);
    req.parameters = params(&[("shared", "true")]);
    req.volume_capabilities = vec![block(Mode::MultiNodeMultiWriter)];
    let v = make(&p, req).await;
    let id = v.volume_id.clone();

    // Node B: its own peer set over the same directory, writing as node-b.
    let segment_b = format!("{}-b", p.segment.display());
    let config = PeerConfig::new(p.dir.path(), &segment_b, "node-b");
    let set_b = PeerSet::start(&config).unwrap();
    let client_b = peers::client::VolumeClient::connect(set_b.segment()).unwrap();
    c.controller_publish_volume(publish(
        &id,
        "node-b",
        block(Mode::MultiNodeMultiWriter),
        false,
    ))
    .await
    .unwrap();
    client_b.write(&id, 0, b"written on node b").await.unwrap();
    client_b.flush(&id).await.unwrap();
    let before = p.volumes.lock_info(&id).await.unwrap();
    assert_eq!(before.holder.as_deref(), Some("node-b"));

    // Node B is lost: its lock stays. While it is still published, the
    // volume is healthy; once a node holds it without being published,
    // the condition says so. Here node B stays published, so all is well.
    let get = |c: &mut csi::pb::controller_client::ControllerClient<_>| {
        let id = id.clone();
        let mut c = c.clone();
        async move {
            c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
        }
    };
    assert!(!get(&mut c).await.volume_condition.unwrap().abnormal);

    // The CO moves the VM: publish on node A, unpublish node B.
    c.controller_publish_volume(publish(
        &id,
        "node-a",
        block(Mode::MultiNodeMultiWriter),
        false,
    ))
    .await
    .unwrap();
    c.controller_unpublish_volume(unpublish(&id, "node-b"))
        .await
        .unwrap();
    let after = p.volumes.lock_info(&id).await.unwrap();
    assert_eq!(after.holder, None, "the lost node's lock was broken");
    // Node B's late writes that need a map update (a block it never
    // wrote) are fenced off. (A block B already owns is written straight
    // to its object from B's cache: fencing covers map updates only; see
    // the report on peers.) Node A (here: the home peer set) takes the
    // lock and sees B's acknowledged data.
    let late = client_b.write(&id, 4 * MI, b"late write from b").await;
    assert!(late.is_err(), "a fenced node must not map new blocks");
    let mut buf = vec![0u8; 17];
    p.volumes.read(&id, 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"written on node b");
    p.volumes
        .write(&id, 4 * MI, b"node a writes")
        .await
        .unwrap();
    let taken = p.volumes.lock_info(&id).await.unwrap();
    assert_eq!(taken.holder.as_deref(), Some(HOME));
    assert!(
        taken.generation > before.generation,
        "a new fencing generation"
    );
    drop(client_b);
    set_b.stop();
    let _ = std::fs::remove_file(&segment_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_an_unpublished_node_makes_the_volume_abnormal() {
    let p = Plugin::start("condition").await;
    let mut c = p.controller();
    let mut req = create("pvc-stale", 8 * MI);
    req.parameters = params(&[("shared", "true")]);
    let v = make(&p, req).await;
    let segment_b = format!("{}-b", p.segment.display());
    let set_b = PeerSet::start(&PeerConfig::new(p.dir.path(), &segment_b, "node-b")).unwrap();
    let client_b = peers::client::VolumeClient::connect(set_b.segment()).unwrap();
    client_b.write(&v.volume_id, 0, b"x").await.unwrap();
    let status = |c: &mut csi::pb::controller_client::ControllerClient<_>| {
        let mut c = c.clone();
        let id = v.volume_id.clone();
        async move {
            c.controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap()
                .volume_condition
                .unwrap()
        }
    };
    let cond = status(&mut c).await;
    assert!(cond.abnormal && cond.message.contains("node-b"), "{cond:?}");
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.entries[0]
            .status
            .as_ref()
            .unwrap()
            .volume_condition
            .as_ref()
            .unwrap()
            .abnormal
    );
    // Unpublishing the stale node (never published: the CO's force-detach
    // path) breaks the lock and heals the volume.
    c.controller_unpublish_volume(unpublish(&v.volume_id, "node-b"))
        .await
        .unwrap();
    assert!(!status(&mut c).await.abnormal);
    drop(client_b);
    set_b.stop();
    let _ = std::fs::remove_file(&segment_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities() {
    let p = Plugin::start("validate").await;
    let mut c = p.controller();
    let v = make(&p, create("pvc-val", MI)).await;
    let req = |caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: v.volume_id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(req(vec![
            mount(Mode::SingleNodeWriter),
            block(Mode::MultiNodeMultiWriter),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    let no = c
        .validate_volume_capabilities(req(vec![mount(Mode::MultiNodeMultiWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    let mut other_params = req(vec![mount(Mode::SingleNodeWriter)]);
    other_params.parameters = params(&[("blockSize", "64Ki")]);
    let no = c
        .validate_volume_capabilities(other_params)
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none(), "created with other parameters");
    assert_eq!(
        code(c.validate_volume_capabilities(req(vec![])).await),
        Code::InvalidArgument
    );
    let mut missing = req(vec![mount(Mode::SingleNodeWriter)]);
    missing.volume_id = "v-missing".into();
    assert_eq!(
        code(c.validate_volume_capabilities(missing).await),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_pages_through_everything_exactly_once() {
    let p = Plugin::start("list").await;
    let mut c = p.controller();
    let mut want = Vec::new();
    for i in 0..5 {
        want.push(make(&p, create(&format!("pvc-{i}"), MI)).await.volume_id);
    }
    // A volume made outside CSI is not listed.
    p.volumes.create("cli-volume", MI, None).await.unwrap();
    want.sort();
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        got.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!((got, pages), (want.clone(), 3));
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    let bad = c
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: "bogus".into(),
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);
    let neg = c
        .list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    assert_eq!(code(neg), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_reports_free_space_where_volumes_can_go() {
    let p = Plugin::start("capacity").await;
    let mut c = p.controller();
    let r = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.available_capacity > 0);
    assert_eq!(r.minimum_volume_size, Some(4 << 20));
    assert_eq!(r.maximum_volume_size, Some((1i64 << 26) * (4 << 20)));
    let small = c
        .get_capacity(GetCapacityRequest {
            parameters: params(&[("blockSize", "64Ki")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(small.minimum_volume_size, Some(64 << 10));
    let elsewhere = Topology {
        segments: params(&[(TOPOLOGY_KEY, "node-elsewhere")]),
    };
    let r = c
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(elsewhere.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.available_capacity, 0,
        "node-local volumes cannot go elsewhere"
    );
    let r = c
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(elsewhere),
            parameters: params(&[("shared", "true")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.available_capacity > 0);
    let r = c
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![mount(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.available_capacity, 0, "unsupported capability");
    let bad = c
        .get_capacity(GetCapacityRequest {
            parameters: params(&[("nope", "1")]),
            ..Default::default()
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expand_volume_online() {
    let p = Plugin::start("expand").await;
    let mut c = p.controller();
    let v = make(&p, create("pvc-grow", 8 * MI)).await;
    // Published and written: expansion is online.
    c.controller_publish_volume(publish(
        &v.volume_id,
        HOME,
        mount(Mode::SingleNodeWriter),
        false,
    ))
    .await
    .unwrap();
    p.volumes.write(&v.volume_id, 0, b"keep me").await.unwrap();
    let req =
        |required: u64, limit: u64, cap: Option<VolumeCapability>| ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: range(required, limit),
            volume_capability: cap,
            ..Default::default()
        };
    let r = c
        .controller_expand_volume(req(21 * MI, 0, Some(mount(Mode::SingleNodeWriter))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes as u64, 24 * MI);
    assert!(r.node_expansion_required, "a filesystem grows on the node");
    assert_eq!(p.volumes.info(&v.volume_id).await.unwrap().size, 24 * MI);
    // Idempotent, and never shrinks.
    let r = c
        .controller_expand_volume(req(21 * MI, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes as u64, 24 * MI);
    assert!(r.node_expansion_required, "published as a filesystem");
    let r = c
        .controller_expand_volume(req(MI, 0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes as u64, 24 * MI);
    let r = c
        .controller_expand_volume(req(32 * MI, 0, Some(block(Mode::SingleNodeWriter))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes as u64, 32 * MI);
    assert!(
        !r.node_expansion_required,
        "a block device needs nothing more"
    );
    let mut buf = [0u8; 7];
    p.volumes.read(&v.volume_id, 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"keep me");
    // Errors.
    assert_eq!(
        code(
            c.controller_expand_volume(req(33 * MI, 34 * MI, None))
                .await
        ),
        Code::OutOfRange
    );
    let mut no_range = req(MI, 0, None);
    no_range.capacity_range = None;
    assert_eq!(
        code(c.controller_expand_volume(no_range).await),
        Code::InvalidArgument
    );
    let mut missing = req(64 * MI, 0, None);
    missing.volume_id = "v-missing".into();
    assert_eq!(
        code(c.controller_expand_volume(missing).await),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_volume_and_modify_volume() {
    let p = Plugin::start("modify").await;
    let mut c = p.controller();
    let mut req = create("pvc-mod", MI);
    req.mutable_parameters = params(&[("qosIops", "1000")]);
    let v = make(&p, req).await;
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap(), v);
    // The limits are in force in the backend, not just recorded.
    let limits = || async { p.volumes.qos(&v.volume_id).await.unwrap().limits() };
    assert_eq!(
        (limits().await.iops, limits().await.bytes_per_sec),
        (1000, 0)
    );
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "v-missing".into()
            })
            .await
        ),
        Code::NotFound
    );

    let stored = || async {
        records(&p)
            .get::<VolumeRecord>(RecordKind::Volume, &v.volume_id)
            .await
            .unwrap()
            .unwrap()
            .record
            .mutable_parameters
    };
    let modify = |pairs: &[(&str, &str)]| ControllerModifyVolumeRequest {
        volume_id: v.volume_id.clone(),
        mutable_parameters: params(pairs),
        ..Default::default()
    };
    c.controller_modify_volume(modify(&[("qosBandwidth", "1048576")]))
        .await
        .unwrap();
    let m = stored().await;
    assert_eq!(
        (m["qosIops"].as_str(), m["qosBandwidth"].as_str()),
        ("1000", "1048576")
    );
    assert_eq!(
        (limits().await.iops, limits().await.bytes_per_sec),
        (1000, 1 << 20)
    );
    // One bad key fails the whole call, and the good key is not applied.
    assert_eq!(
        code(
            c.controller_modify_volume(modify(&[("qosIops", "5"), ("tier", "gold")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_modify_volume(modify(&[("qosIops", "lots")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(stored().await, m);
    assert_eq!(limits().await.iops, 1000, "a refused call applied nothing");
    // Idempotent.
    for _ in 0..2 {
        c.controller_modify_volume(modify(&[("qosIops", "5")]))
            .await
            .unwrap();
    }
    assert_eq!(stored().await["qosIops"], "5");
    assert_eq!(limits().await.iops, 5);
    let mut missing = modify(&[("qosIops", "5")]);
    missing.volume_id = "v-missing".into();
    assert_eq!(
        code(c.controller_modify_volume(missing).await),
        Code::NotFound
    );
}
