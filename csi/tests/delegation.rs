//! The controller forwards operations on a volume in use to the peer set holding its lock.
//!
//! The layout is Kubernetes' on one machine: the controller's peer set in this process, the
//! node's peer set in a child process, one data directory, one peer-set registry. The node
//! opens a volume (so its mapper holds the lock) and writes; the controller then snapshots,
//! expands and clones that live volume through the node's peer set, and cuts a group
//! snapshot there. Once the node is killed (its registry entry left behind, stale), the same
//! operations are refused with FAILED_PRECONDITION naming the holder, until the holder's lock
//! is broken by unpublishing.

mod two_peer_sets;

use tonic::Code;

use csi::pb::volume_capability::access_mode::Mode;
use csi::pb::volume_capability::{AccessMode, AccessType, MountVolume};
use csi::pb::volume_content_source as vcs;
use csi::pb::*;
use two_peer_sets::*;

const MI: u64 = 1 << 20;
const NODE: &str = "node-1";
/// The test the child process runs.
const CHILD: &str = "node_peer_set_child";

/// Not a test of its own: the node's peer set when run as the child (see `two_peer_sets`).
#[test]
fn node_peer_set_child() {
    run_child_if_asked();
}

fn mount() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(name: &str, size: u64, source: Option<vcs::Type>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        // Small blocks: a few objects per volume.
        parameters: [("blockSize".to_string(), "1Mi".to_string())].into(),
        volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    }
}

fn snap_req(source: &str, name: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn expand_req(id: &str, size: u64) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn read(c: &peers::client::VolumeClient, name: &str, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    c.read(name, at, &mut buf).await.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_on_a_volume_in_use_go_to_the_node_holding_it() {
    let ctl = Controller::start("ctl").await;
    let mut c = ctl.controller();
    let vol = c
        .create_volume(create("pvc-live", 8 * MI, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let other = c
        .create_volume(create("pvc-other", 4 * MI, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;

    // The node stages the volumes: its mapper takes their locks, and it writes.
    let mut node = NodeProcess::start(CHILD, ctl.data_dir(), NODE, &ctl.registry, "node");
    let n = node.client().clone();
    n.open(&vol).await.unwrap();
    n.open(&other).await.unwrap();
    let first = pattern(1, 3 * MI as usize / 2);
    n.write(&vol, MI / 2, &first).await.unwrap();
    n.write(&other, 0, &pattern(9, 4096)).await.unwrap();
    n.flush(&vol).await.unwrap();
    let lock = ctl.volumes.lock_info(&vol).await.unwrap();
    assert_eq!(lock.holder.as_deref(), Some(NODE));
    // The controller's own peer set cannot change the volume.
    assert!(matches!(
        ctl.volumes.snapshot(&vol, "direct-snap").await,
        Err(peers::client::ClientError::Locked { .. })
    ));

    // CreateSnapshot: cut by the node's peer set, readable through either.
    let snap = c
        .create_snapshot(snap_req(&vol, "snap-live"))
        .await
        .expect("snapshot of a volume in use")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, vol);
    assert_eq!(
        read(&ctl.volumes, &snap.snapshot_id, MI / 2, first.len()).await,
        first
    );
    assert_eq!(
        read(n.as_ref(), &snap.snapshot_id, MI / 2, first.len()).await,
        first
    );
    // Idempotent: the retry finds the snapshot.
    let again = c
        .create_snapshot(snap_req(&vol, "snap-live"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    // The node keeps writing; the snapshot keeps what it held.
    let second = pattern(2, 4096);
    n.write(&vol, MI / 2, &second).await.unwrap();
    assert_eq!(
        read(&ctl.volumes, &snap.snapshot_id, MI / 2, first.len()).await,
        first
    );
    assert_eq!(
        ctl.volumes.lock_info(&vol).await.unwrap().holder.as_deref(),
        Some(NODE),
        "forwarding leaves the node's lock alone"
    );

    // ControllerExpandVolume: grown by the node's peer set, which sees the new size at once.
    let grown = c
        .controller_expand_volume(expand_req(&vol, 16 * MI))
        .await
        .expect("expansion of a volume in use")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 16 * MI as i64);
    assert_eq!(n.info(&vol).await.unwrap().size, 16 * MI);
    n.write(&vol, 15 * MI, b"beyond the old end").await.unwrap();
    assert_eq!(ctl.volumes.info(&vol).await.unwrap().size, 16 * MI);

    // CreateVolume from the live volume: the clone holds the node's latest data.
    let clone = c
        .create_volume(create(
            "pvc-clone",
            16 * MI,
            Some(vcs::Type::Volume(vcs::VolumeSource {
                volume_id: vol.clone(),
            })),
        ))
        .await
        .expect("clone of a volume in use")
        .into_inner()
        .volume
        .unwrap();
    let mut expect = first.clone();
    expect[..second.len()].copy_from_slice(&second);
    assert_eq!(
        read(&ctl.volumes, &clone.volume_id, MI / 2, expect.len()).await,
        expect
    );
    assert_eq!(
        read(&ctl.volumes, &clone.volume_id, 15 * MI, 18).await,
        b"beyond the old end"
    );
    // The clone is nobody's yet: the controller's peer set writes it.
    ctl.volumes
        .write(&clone.volume_id, 0, b"clone is writable")
        .await
        .unwrap();
    ctl.volumes.close(&clone.volume_id).await.unwrap();

    // A group snapshot of volumes held by the node: one barrier on the node's peer set.
    let group = ctl
        .group()
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "group-live".into(),
            source_volume_ids: vec![vol.clone(), other.clone()],
            ..Default::default()
        })
        .await
        .expect("group snapshot of volumes in use")
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    for s in &group.snapshots {
        let (at, want) = if s.source_volume_id == vol {
            (15 * MI, b"beyond the old end".to_vec())
        } else {
            (0, pattern(9, 4096))
        };
        assert_eq!(
            read(&ctl.volumes, &s.snapshot_id, at, want.len()).await,
            want
        );
    }
    // Members held by different nodes cannot share one barrier.
    ctl.volumes
        .write(&clone.volume_id, 0, b"held by the controller")
        .await
        .unwrap();
    let mixed = ctl
        .group()
        .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
            name: "group-mixed".into(),
            source_volume_ids: vec![vol.clone(), clone.volume_id.clone()],
            ..Default::default()
        })
        .await
        .expect_err("members locked by two nodes");
    assert_eq!(mixed.code(), Code::FailedPrecondition, "{mixed:?}");
    assert!(
        mixed.message().contains(NODE) && mixed.message().contains(CONTROLLER),
        "{mixed:?}"
    );
    ctl.volumes.close(&clone.volume_id).await.unwrap();

    // The node dies without cleaning up: its registry entry stays, stale, and so does its lock.
    let entry = ctl.registry.join(format!("{NODE}.json"));
    assert!(entry.exists());
    node.kill();
    assert!(entry.exists(), "SIGKILL leaves the entry behind");
    let refused = c
        .create_snapshot(snap_req(&vol, "snap-after-death"))
        .await
        .expect_err("no live holder");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(NODE), "{refused:?}");
    assert!(
        refused.message().contains("archip lock break"),
        "{refused:?}"
    );
    assert!(!entry.exists(), "the reader removed the stale entry");
    let refused = c
        .controller_expand_volume(expand_req(&vol, 24 * MI))
        .await
        .expect_err("no live holder");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(NODE), "{refused:?}");
    // The snapshot that failed left no record behind.
    let listed = c
        .list_snapshots(ListSnapshotsRequest {
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let dead_id = csi::ids::snapshot_id("snap-after-death");
    assert!(
        listed
            .entries
            .iter()
            .all(|e| e.snapshot.as_ref().unwrap().snapshot_id != dead_id),
        "{listed:?}"
    );
    assert!(ctl.volumes.info(&dead_id).await.is_err());

    // The way out the message names: unpublishing the dead node breaks its lock.
    c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: vol.clone(),
        node_id: NODE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = c
        .create_snapshot(snap_req(&vol, "snap-after-break"))
        .await
        .expect("snapshot once the dead node's lock is broken")
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        read(&ctl.volumes, &snap.snapshot_id, 15 * MI, 18).await,
        b"beyond the old end"
    );
}

/// A node stopped cleanly takes its entry with it, and releases its locks: the controller's
/// own peer set does the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_stopped_cleanly_leaves_no_entry() {
    let ctl = Controller::start("clean").await;
    let mut c = ctl.controller();
    let vol = c
        .create_volume(create("pvc-clean", 4 * MI, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let mut node = NodeProcess::start(CHILD, ctl.data_dir(), NODE, &ctl.registry, "clean");
    node.client().write(&vol, 0, b"x").await.unwrap();
    let entry = ctl.registry.join(format!("{NODE}.json"));
    assert!(entry.exists());
    node.stop();
    assert!(!entry.exists(), "a clean stop unregisters");
    assert_eq!(ctl.volumes.lock_info(&vol).await.unwrap().holder, None);
    c.create_snapshot(snap_req(&vol, "snap-clean"))
        .await
        .expect("an unlocked volume is snapshotted here");
}

/// A forwarded snapshot is one point in the node's stream of writes: the node writes regions
/// one after another (each acknowledged before the next is sent) while the controller cuts a
/// snapshot, and the snapshot holds a prefix of that stream that includes every write
/// acknowledged before CreateSnapshot was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forwarded_snapshot_is_a_point_in_the_nodes_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    const REGION: usize = 4096;
    const REGIONS: usize = 2048;
    let ctl = Controller::start("pit").await;
    let mut c = ctl.controller();
    let vol = c
        .create_volume(create("pvc-stream", (REGION * REGIONS) as u64, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let node = NodeProcess::start(CHILD, ctl.data_dir(), NODE, &ctl.registry, "pit");
    let n = node.client().clone();
    n.open(&vol).await.unwrap();

    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, mut started_rx) = tokio::sync::watch::channel(0usize);
    let writer = {
        let (n, vol, acked, stop) = (n.clone(), vol.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            for k in 0..REGIONS {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let data = pattern(k as u8 | 1, REGION);
                n.write(&vol, (k * REGION) as u64, &data).await.unwrap();
                acked.store(k + 1, Ordering::Release);
                let _ = started_tx.send(k + 1);
            }
        })
    };
    // Cut once the stream is under way.
    started_rx.wait_for(|&k| k >= 16).await.unwrap();
    let before = acked.load(Ordering::Acquire);
    let snap = c
        .create_snapshot(snap_req(&vol, "snap-stream"))
        .await
        .expect("snapshot while the node writes")
        .into_inner()
        .snapshot
        .unwrap();
    let after = acked.load(Ordering::Acquire) + 1; // at most one write was in flight
    stop.store(true, Ordering::Release);
    writer.await.unwrap();

    let image = read(&ctl.volumes, &snap.snapshot_id, 0, REGION * REGIONS).await;
    let present: Vec<bool> = (0..REGIONS)
        .map(|k| {
            let got = &image[k * REGION..(k + 1) * REGION];
            if got == pattern(k as u8 | 1, REGION).as_slice() {
                true
            } else {
                assert!(got.iter().all(|&b| b == 0), "region {k} is torn");
                false
            }
        })
        .collect();
    let cut = present.iter().position(|p| !p).unwrap_or(REGIONS);
    eprintln!(
        "snapshot cut after {cut} of {REGIONS} writes ({before} acknowledged before the request)"
    );
    assert!(
        present[cut..].iter().all(|p| !p),
        "the snapshot holds writes after a missing one (cut at {cut})"
    );
    assert!(
        cut >= before && cut <= after,
        "cut at {cut}, outside [{before}, {after}]"
    );
}
