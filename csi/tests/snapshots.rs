//! Conformance of snapshots, clones and group snapshots, and the data
//! they hold: a clone reads what its source held when the snapshot was
//! cut, and neither side sees the other's later writes.

mod plugin;

use std::sync::Arc;

use peers::backend::BackendConfig;
use peers::client::VolumeKind;
use tonic::Code;

use csi::meta::{GroupRecord, MetaStore, RECORD_VERSION, RecordKind, SnapshotRecord};
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

fn snap_req(source: &str, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn snap(p: &Plugin, source: &str, name: &str) -> Snapshot {
    p.controller()
        .create_snapshot(snap_req(source, name))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
}

fn from_snapshot(name: &str, snapshot_id: &str, size: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(vcs::Type::Snapshot(vcs::SnapshotSource {
                snapshot_id: snapshot_id.into(),
            })),
        }),
        ..create(name, size)
    }
}

fn from_volume(name: &str, volume_id: &str, size: u64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        volume_content_source: Some(VolumeContentSource {
            r#type: Some(vcs::Type::Volume(vcs::VolumeSource {
                volume_id: volume_id.into(),
            })),
        }),
        ..create(name, size)
    }
}

/// A recognisable pattern: every byte depends on its offset and a seed.
fn pattern(seed: u8, len: usize, at: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((at as usize + i) as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

async fn read(p: &Plugin, id: &str, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    p.volumes.read(id, at, &mut buf).await.unwrap();
    buf
}

fn records(p: &Plugin) -> MetaStore {
    MetaStore::open(&BackendConfig::file(p.dir.path())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshot_is_instant_and_idempotent() {
    let p = Plugin::start("snapshot").await;
    let mut c = p.controller();
    let v = make(&p, create("pvc-src", 8 * MI)).await;
    let w = make(&p, create("pvc-other", 8 * MI)).await;
    let s = snap(&p, &v.volume_id, "snap-1").await;
    assert!(s.ready_to_use, "copy-on-write: ready at once");
    assert_eq!(s.source_volume_id, v.volume_id);
    assert_eq!(s.size_bytes as u64, 8 * MI);
    assert!(s.creation_time.unwrap().seconds > 0);
    assert!(s.group_snapshot_id.is_empty());
    assert_eq!(
        p.volumes.info(&s.snapshot_id).await.unwrap().kind,
        VolumeKind::Snapshot
    );
    assert_eq!(snap(&p, &v.volume_id, "snap-1").await, s);

    let cases = [
        (
            "same name, other source",
            snap_req(&w.volume_id, "snap-1"),
            Code::AlreadyExists,
        ),
        (
            "missing source",
            snap_req("v-missing", "snap-2"),
            Code::NotFound,
        ),
        (
            "missing name",
            snap_req(&v.volume_id, ""),
            Code::InvalidArgument,
        ),
        (
            "name over 128 bytes",
            snap_req(&v.volume_id, &"s".repeat(129)),
            Code::InvalidArgument,
        ),
        (
            "missing source id",
            snap_req("", "snap-3"),
            Code::InvalidArgument,
        ),
        (
            "a snapshot is not a volume",
            snap_req(&s.snapshot_id, "snap-4"),
            Code::NotFound,
        ),
        (
            "unknown parameter",
            CreateSnapshotRequest {
                parameters: params(&[("compress", "yes")]),
                ..snap_req(&v.volume_id, "snap-5")
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(c.create_snapshot(req).await), want, "{what}");
    }
    // The CO's own parameters are accepted.
    let mut req = snap_req(&v.volume_id, "snap-co");
    req.parameters = params(&[("csi.storage.k8s.io/volumesnapshot/name", "x")]);
    c.create_snapshot(req).await.unwrap();

    // In flight: ABORTED.
    let id = csi::ids::snapshot_id("snap-busy");
    let held = p.plugin.in_flight().begin(&[&id]).unwrap();
    assert_eq!(
        code(c.create_snapshot(snap_req(&v.volume_id, "snap-busy")).await),
        Code::Aborted
    );
    drop(held);
    snap(&p, &v.volume_id, "snap-busy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_get_and_delete_snapshots() {
    let p = Plugin::start("list-snapshots").await;
    let mut c = p.controller();
    let a = make(&p, create("pvc-a", MI)).await;
    let b = make(&p, create("pvc-b", MI)).await;
    let mut of_a = Vec::new();
    for i in 0..3 {
        of_a.push(snap(&p, &a.volume_id, &format!("a-{i}")).await.snapshot_id);
    }
    let of_b = snap(&p, &b.volume_id, "b-0").await;
    of_a.sort();

    let list = |max: i32, token: &str, source: &str, id: &str| ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        source_volume_id: source.into(),
        snapshot_id: id.into(),
        ..Default::default()
    };
    let ids = |r: &ListSnapshotsResponse| -> Vec<String> {
        r.entries
            .iter()
            .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
            .collect()
    };
    let all = c
        .list_snapshots(list(0, "", "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 4);
    let by_source = c
        .list_snapshots(list(0, "", &a.volume_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&by_source), of_a);
    let by_id = c
        .list_snapshots(list(0, "", "", &of_b.snapshot_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &of_b);
    let none = c
        .list_snapshots(list(0, "", "", "s-unknown"))
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty(), "an unknown id filters to nothing");
    // Pages of two, by source.
    let first = c
        .list_snapshots(list(2, "", &a.volume_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&first), of_a[..2]);
    let second = c
        .list_snapshots(list(2, &first.next_token, &a.volume_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&second), of_a[2..]);
    assert!(second.next_token.is_empty());
    assert_eq!(
        code(c.list_snapshots(list(0, "nonsense", "", "")).await),
        Code::Aborted
    );
    assert_eq!(
        code(c.list_snapshots(list(-5, "", "", "")).await),
        Code::InvalidArgument
    );

    let got = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: of_b.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshot.unwrap(), of_b);
    let get = |id: &str| GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    assert_eq!(code(c.get_snapshot(get("s-missing")).await), Code::NotFound);
    assert_eq!(
        code(c.get_snapshot(get(&a.volume_id)).await),
        Code::NotFound,
        "a volume"
    );
    assert_eq!(code(c.get_snapshot(get("")).await), Code::InvalidArgument);

    // Deleting: idempotent; the source volume is untouched.
    let del = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    for _ in 0..2 {
        c.delete_snapshot(del(&of_b.snapshot_id)).await.unwrap();
    }
    assert!(p.volumes.info(&of_b.snapshot_id).await.is_err());
    assert!(p.volumes.info(&b.volume_id).await.is_ok());
    // A volume id given to DeleteSnapshot leaves the volume alone.
    c.delete_snapshot(del(&b.volume_id)).await.unwrap();
    assert!(p.volumes.info(&b.volume_id).await.is_ok());
    assert_eq!(
        code(c.delete_snapshot(del("")).await),
        Code::InvalidArgument
    );
    // Snapshots are independent of their volume: delete the volume, keep
    // the snapshots.
    c.delete_volume(DeleteVolumeRequest {
        volume_id: a.volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let left = c
        .list_snapshots(list(0, "", &a.volume_id, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&left), of_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_snapshot_holds_the_data_of_the_moment_it_was_cut() {
    let p = Plugin::start("data-snapshot").await;
    let mut c = p.controller();
    let src = make(&p, create("pvc-golden", 16 * MI)).await;
    let id = &src.volume_id;
    // A pattern across a block boundary, and one in a later block.
    let first = pattern(1, 3 * MI as usize / 2, 3 * MI);
    let second = pattern(2, 4096, 12 * MI);
    p.volumes.write(id, 3 * MI, &first).await.unwrap();
    p.volumes.write(id, 12 * MI, &second).await.unwrap();
    p.volumes.flush(id).await.unwrap();
    let s = snap(&p, id, "golden-1").await;

    let clone = make(&p, from_snapshot("pvc-clone", &s.snapshot_id, 0)).await;
    assert_eq!(clone.capacity_bytes as u64, 16 * MI, "the source's size");
    assert_eq!(
        clone.content_source.as_ref().unwrap().r#type,
        Some(vcs::Type::Snapshot(vcs::SnapshotSource {
            snapshot_id: s.snapshot_id.clone()
        }))
    );
    assert_eq!(read(&p, &clone.volume_id, 3 * MI, first.len()).await, first);
    assert_eq!(read(&p, &clone.volume_id, 12 * MI, 4096).await, second);
    assert_eq!(read(&p, &clone.volume_id, 0, 4096).await, vec![0; 4096]);

    // Write the source: the clone and the snapshot keep the old data.
    let overwrite = pattern(9, 2 * MI as usize, 2 * MI);
    p.volumes.write(id, 2 * MI, &overwrite).await.unwrap();
    assert_eq!(
        read(&p, id, 3 * MI, MI as usize).await,
        overwrite[MI as usize..]
    );
    assert_eq!(read(&p, &clone.volume_id, 3 * MI, first.len()).await, first);
    assert_eq!(read(&p, &s.snapshot_id, 3 * MI, first.len()).await, first);
    // Write the clone: the source and the snapshot do not see it.
    p.volumes
        .write(&clone.volume_id, 12 * MI, &[7u8; 4096])
        .await
        .unwrap();
    assert_eq!(read(&p, id, 12 * MI, 4096).await, second);
    assert_eq!(read(&p, &s.snapshot_id, 12 * MI, 4096).await, second);

    // A larger clone holds the data and zeros beyond it.
    let big = make(&p, from_snapshot("pvc-bigger", &s.snapshot_id, 21 * MI)).await;
    assert_eq!(big.capacity_bytes as u64, 24 * MI);
    assert_eq!(read(&p, &big.volume_id, 12 * MI, 4096).await, second);
    assert_eq!(read(&p, &big.volume_id, 20 * MI, 4096).await, vec![0; 4096]);
    // Retrying the clone is idempotent even after the source changed.
    assert_eq!(
        make(&p, from_snapshot("pvc-clone", &s.snapshot_id, 0)).await,
        clone
    );

    // Errors: smaller than the source, and a block size of its own.
    let mut small = from_snapshot("pvc-too-small", &s.snapshot_id, 0);
    small.capacity_range = range(0, 8 * MI);
    assert_eq!(code(c.create_volume(small).await), Code::OutOfRange);
    let mut blocks = from_snapshot("pvc-other-blocks", &s.snapshot_id, 0);
    blocks.parameters = params(&[("blockSize", "64Ki")]);
    assert_eq!(code(c.create_volume(blocks).await), Code::InvalidArgument);
    // A volume id is not a snapshot id.
    assert_eq!(
        code(
            c.create_volume(from_snapshot("pvc-wrong-kind", id, 0))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_volume_holds_its_data_and_diverges() {
    let p = Plugin::start("data-volume").await;
    let src = make(&p, create("pvc-src", 8 * MI)).await;
    let id = &src.volume_id;
    let data = pattern(3, 100_000, 4 * MI - 50_000);
    p.volumes.write(id, 4 * MI - 50_000, &data).await.unwrap();
    let clone = make(&p, from_volume("pvc-copy", id, 8 * MI)).await;
    assert_eq!(
        clone.content_source.as_ref().unwrap().r#type,
        Some(vcs::Type::Volume(vcs::VolumeSource {
            volume_id: id.clone()
        }))
    );
    assert_eq!(
        read(&p, &clone.volume_id, 4 * MI - 50_000, data.len()).await,
        data
    );
    // The source keeps being written without the clone seeing it, and the
    // other way round.
    p.volumes.write(id, 4 * MI, &[1u8; 10]).await.unwrap();
    p.volumes
        .write(&clone.volume_id, 4 * MI - 10, &[2u8; 10])
        .await
        .unwrap();
    let src_now = read(&p, id, 4 * MI - 10, 20).await;
    let clone_now = read(&p, &clone.volume_id, 4 * MI - 10, 20).await;
    assert_eq!(src_now[..10], data[50_000 - 10..50_000]);
    assert_eq!(src_now[10..], [1u8; 10]);
    assert_eq!(clone_now[..10], [2u8; 10]);
    assert_eq!(clone_now[10..], data[50_000..50_010]);
    // A clone of a clone: no depth limit, same data.
    let grand = make(&p, from_volume("pvc-copy-2", &clone.volume_id, 0)).await;
    assert_eq!(read(&p, &grand.volume_id, 4 * MI - 10, 20).await, clone_now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clones_of_one_snapshot_at_once() {
    let p = Plugin::start("many-clones").await;
    let src = make(&p, create("pvc-golden", 64 * MI)).await;
    p.volumes
        .write(&src.volume_id, 5 * MI, b"golden image")
        .await
        .unwrap();
    let s = snap(&p, &src.volume_id, "golden").await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut c = p.controller();
        let req = from_snapshot(&format!("pvc-vm-{i}"), &s.snapshot_id, 0);
        calls.spawn(async move { c.create_volume(req).await });
    }
    let mut ids = Vec::new();
    while let Some(r) = calls.join_next().await {
        ids.push(r.unwrap().unwrap().into_inner().volume.unwrap().volume_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 100);
    for id in ids.iter().step_by(17) {
        assert_eq!(read(&p, id, 5 * MI, 12).await, b"golden image");
    }
}

fn group_req(name: &str, sources: &[&str]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_cut_every_member_and_restore() {
    let p = Plugin::start("group").await;
    let mut c = p.controller();
    let mut g = p.group();
    let caps = g
        .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 1);

    let os = make(&p, create("pvc-vm-os", 8 * MI)).await;
    let data = make(&p, create("pvc-vm-data", 8 * MI)).await;
    p.volumes.write(&os.volume_id, 0, b"os disk").await.unwrap();
    p.volumes
        .write(&data.volume_id, MI, b"data disk")
        .await
        .unwrap();
    let members = [os.volume_id.as_str(), data.volume_id.as_str()];
    let group = g
        .create_volume_group_snapshot(group_req("vm-backup", &members))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert!(group.ready_to_use);
    assert_eq!(group.snapshots.len(), 2);
    for (s, v) in group.snapshots.iter().zip(members) {
        assert_eq!(s.source_volume_id, v);
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
        assert!(s.ready_to_use);
    }
    // Idempotent (the members may be listed in another order).
    let again = g
        .create_volume_group_snapshot(group_req("vm-backup", &[members[1], members[0]]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(again, group);
    // Writes after the cut are not in the members.
    p.volumes.write(&os.volume_id, 0, b"OS DISK").await.unwrap();
    let restored = make(
        &p,
        from_snapshot("pvc-restored-os", &group.snapshots[0].snapshot_id, 0),
    )
    .await;
    assert_eq!(read(&p, &restored.volume_id, 0, 7).await, b"os disk");
    assert_eq!(
        read(&p, &group.snapshots[1].snapshot_id, MI, 9).await,
        b"data disk"
    );

    // Members show up in snapshot listings with their group.
    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            snapshot_id: group.snapshots[1].snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].snapshot.as_ref().unwrap(),
        &group.snapshots[1]
    );
    // ...and cannot be deleted one by one.
    assert_eq!(
        code(
            c.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: group.snapshots[0].snapshot_id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    let get = |ids: Vec<String>| GetVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids: ids,
        ..Default::default()
    };
    let member_ids: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let got = g
        .get_volume_group_snapshot(get(member_ids.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.group_snapshot.unwrap(), group);
    assert_eq!(
        code(
            g.get_volume_group_snapshot(get(vec![member_ids[0].clone()]))
                .await
        ),
        Code::InvalidArgument
    );

    // Errors on create.
    let cases = [
        (
            "same name, other members",
            group_req("vm-backup", &[members[0]]),
            Code::AlreadyExists,
        ),
        (
            "missing member",
            group_req("g-2", &[members[0], "v-missing"]),
            Code::NotFound,
        ),
        (
            "duplicate member",
            group_req("g-3", &[members[0], members[0]]),
            Code::InvalidArgument,
        ),
        ("no members", group_req("g-4", &[]), Code::InvalidArgument),
        (
            "no name",
            group_req("", &[members[0]]),
            Code::InvalidArgument,
        ),
        (
            "unknown parameter",
            CreateVolumeGroupSnapshotRequest {
                parameters: params(&[("quiesce", "true")]),
                ..group_req("g-5", &[members[0]])
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(g.create_volume_group_snapshot(req).await),
            want,
            "{what}"
        );
    }

    // Delete: the member list must match; then idempotent.
    let del = |ids: Vec<String>| DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshot_ids: ids,
        ..Default::default()
    };
    assert_eq!(
        code(
            g.delete_volume_group_snapshot(del(vec!["s-other".into()]))
                .await
        ),
        Code::InvalidArgument
    );
    for _ in 0..2 {
        g.delete_volume_group_snapshot(del(member_ids.clone()))
            .await
            .unwrap();
    }
    for s in &member_ids {
        assert!(p.volumes.info(s).await.is_err(), "{s} deleted");
    }
    assert_eq!(
        code(g.get_volume_group_snapshot(get(vec![])).await),
        Code::NotFound
    );
    // The clone made from a member outlives the group.
    assert_eq!(read(&p, &restored.volume_id, 0, 7).await, b"os disk");
}

/// A crash between writing a group's intent and marking it complete
/// leaves members of unknown age; the retry must cut them all again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_group_snapshot_is_cut_again_from_scratch() {
    let p = Plugin::start("group-retry").await;
    let a = make(&p, create("pvc-a", 8 * MI)).await;
    let b = make(&p, create("pvc-b", 8 * MI)).await;
    p.volumes.write(&a.volume_id, 0, b"old a").await.unwrap();
    // The state a crashed first attempt left: an incomplete record and a
    // member cut from the old data.
    let gid = csi::ids::group_id("nightly");
    let sa = csi::ids::group_member_id(&gid, &a.volume_id);
    let sb = csi::ids::group_member_id(&gid, &b.volume_id);
    let store = records(&p);
    store
        .put(
            RecordKind::Group,
            &gid,
            &GroupRecord {
                version: RECORD_VERSION,
                name: "nightly".into(),
                source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
                snapshot_ids: vec![sa.clone(), sb.clone()],
                parameters: Default::default(),
                complete: false,
                created: 0,
            },
            None,
        )
        .await
        .unwrap();
    store
        .put(
            RecordKind::Snapshot,
            &sa,
            &SnapshotRecord {
                version: RECORD_VERSION,
                name: String::new(),
                source_volume_id: a.volume_id.clone(),
                group_id: Some(gid.clone()),
            },
            None,
        )
        .await
        .unwrap();
    p.volumes.snapshot(&a.volume_id, &sa).await.unwrap();
    p.volumes.write(&a.volume_id, 0, b"new a").await.unwrap();
    p.volumes.write(&b.volume_id, 0, b"new b").await.unwrap();

    let mut g = p.group();
    // Not complete: not visible.
    let get = GetVolumeGroupSnapshotRequest {
        group_snapshot_id: gid.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(g.get_volume_group_snapshot(get.clone()).await),
        Code::NotFound
    );
    let group = g
        .create_volume_group_snapshot(group_req("nightly", &[&a.volume_id, &b.volume_id]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(group.group_snapshot_id, gid);
    assert_eq!(
        read(&p, &sa, 0, 5).await,
        b"new a",
        "the stale member was recut"
    );
    assert_eq!(read(&p, &sb, 0, 5).await, b"new b");
    g.get_volume_group_snapshot(get).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_and_block_volumes_both_clone() {
    // The access type is the node's business; a block volume clones the
    // same way as a filesystem one.
    let p = Plugin::start("block-clone").await;
    let mut req = create("pvc-raw", 4 * MI);
    req.volume_capabilities = vec![block(Mode::SingleNodeWriter)];
    let v = make(&p, req).await;
    p.volumes.write(&v.volume_id, 0, b"raw").await.unwrap();
    let s = snap(&p, &v.volume_id, "raw-snap").await;
    let mut req = from_snapshot("pvc-raw-clone", &s.snapshot_id, 0);
    req.volume_capabilities = vec![block(Mode::SingleNodeWriter)];
    let clone = make(&p, req).await;
    assert_eq!(read(&p, &clone.volume_id, 0, 3).await, b"raw");
}

/// Write order across volumes: a writer puts counter `i` on volume A and,
/// once that is acknowledged, on volume B; so A never holds less than B.
/// Every group snapshot must show the same (A's member >= B's member),
/// even though A is cut first and the writer never stops. Cutting the
/// members one after the other would let B's member catch a value A's
/// member missed: volumes cut between A and B (with data, so each cut
/// takes a while) widen that window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_snapshots_keep_write_order_across_volumes() {
    let p = Plugin::start("group-order").await;
    let a = make(&p, create("pvc-log", 4 * MI)).await.volume_id;
    let b = make(&p, create("pvc-data", 4 * MI)).await.volume_id;
    let mut members = vec![a.clone()];
    for i in 0..6 {
        let filler = make(&p, create(&format!("pvc-filler-{i}"), 4 * MI))
            .await
            .volume_id;
        p.volumes.write(&filler, 0, b"filler").await.unwrap();
        members.push(filler);
    }
    members.push(b.clone());
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (volumes, a, b, stop) = (p.volumes.clone(), a.clone(), b.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                volumes.write(&a, 0, &i.to_le_bytes()).await.unwrap();
                volumes.write(&b, 0, &i.to_le_bytes()).await.unwrap();
            }
            i
        })
    };
    let counter = |bytes: Vec<u8>| u64::from_le_bytes(bytes.try_into().unwrap());
    let mut g = p.group();
    let mut nonzero = 0;
    for round in 0..20 {
        let group = g
            .create_volume_group_snapshot(group_req(&format!("order-{round}"), &members))
            .await
            .unwrap()
            .into_inner()
            .group_snapshot
            .unwrap();
        let in_a = counter(read(&p, &group.snapshots[0].snapshot_id, 0, 8).await);
        let in_b = counter(read(&p, &group.snapshots[7].snapshot_id, 0, 8).await);
        assert!(in_a >= in_b, "round {round}: log {in_a} behind data {in_b}");
        assert!(in_a - in_b <= 1, "round {round}: {in_a} vs {in_b}");
        nonzero += usize::from(in_b > 0);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 20,
        "the writer ran during the snapshots ({writes})"
    );
    assert!(nonzero > 0, "some snapshots caught writes");
}
