//! Volumes over xseg through `VolumeClient`: the I/O paths, the mapping cache, dedup, and bad
//! input getting typed errors that change nothing.

mod common;

use peers::client::{ClientError, VolumeKind};
use peers::peerset::Ports;

const KIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smoke_create_write_read_snapshot_clone() {
    let h = common::scratch_peer_set("smoke");
    let c = h.client();
    let v = c.create("disk", 1 << 20, Some(64 * KIB)).await.unwrap();
    assert_eq!(v.kind, VolumeKind::Volume);
    assert_eq!(v.block_size, 64 * 1024);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    c.write("disk", 1000, &data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    c.read("disk", 1000, &mut back).await.unwrap();
    assert!(back == data);
    let mut one = vec![0u8; 10];
    c.read("disk", 1000, &mut one).await.unwrap();
    assert_eq!(&one, &data[..10]);
    c.flush("disk").await.unwrap();
    c.snapshot("disk", "disk-s1").await.unwrap();
    c.write("disk", 1000, &[9u8; 10]).await.unwrap();
    c.read("disk-s1", 1000, &mut one).await.unwrap();
    assert_eq!(&one, &data[..10]);
    c.clone("disk-s1", "copy", None).await.unwrap();
    c.read("copy", 1000, &mut back).await.unwrap();
    assert!(back == data);
    let names: Vec<_> = c
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["copy", "disk", "disk-s1"]);
    for p in [Ports::VLMC, Ports::MAPPER, Ports::BLOCKER] {
        c.ping(p).await.unwrap();
    }
    assert!(
        h.set
            .as_ref()
            .unwrap()
            .probe()
            .unwrap()
            .iter()
            .all(|p| p.is_up())
    );
    let e = c.write("disk-s1", 0, b"x").await.unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_state_writes_to_owned_blocks_skip_the_mapper() {
    let h = common::scratch_peer_set("owned");
    let c = h.client();
    c.create("vol", 4 << 20, Some(64 * KIB)).await.unwrap();
    // First write: MAPW makes the block owned and vlmc caches it.
    c.write("vol", 4096, &[1u8; 4096]).await.unwrap();
    let mapper_before = h.segment().port_stats(Ports::MAPPER).unwrap().accepted;
    let blocker_before = h.segment().port_stats(Ports::BLOCKER).unwrap().accepted;
    for i in 0..100u64 {
        c.write("vol", (i % 16) * 4096, &[i as u8; 4096])
            .await
            .unwrap();
    }
    let mut buf = vec![0u8; 4096];
    c.read("vol", 15 * 4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 95));
    // A ZERO block elsewhere reads as zeros with no backend I/O at all.
    c.read("vol", 2 << 20, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let mapper_after = h.segment().port_stats(Ports::MAPPER).unwrap().accepted;
    let blocker_after = h.segment().port_stats(Ports::BLOCKER).unwrap().accepted;
    // The ZERO block's read needed one MAPR (then it is cached); the writes none.
    assert_eq!(
        mapper_after - mapper_before,
        1,
        "writes to an owned block asked the mapper"
    );
    assert_eq!(
        blocker_after - blocker_before,
        101,
        "one blocker request per I/O, none for ZERO"
    );
    c.read("vol", 2 << 20, &mut buf).await.unwrap();
    assert_eq!(
        h.segment().port_stats(Ports::MAPPER).unwrap().accepted,
        mapper_after
    );
    assert_eq!(
        h.segment().port_stats(Ports::BLOCKER).unwrap().accepted,
        blocker_after
    );

    // After a snapshot the block is shared: the next write must go through MAPW again
    // (copy-on-write), and the snapshot keeps the old data.
    c.snapshot("vol", "snap").await.unwrap();
    let before = h.segment().port_stats(Ports::MAPPER).unwrap().accepted;
    c.write("vol", 15 * 4096, &[7u8; 4096]).await.unwrap();
    assert!(h.segment().port_stats(Ports::MAPPER).unwrap().accepted > before);
    c.read("snap", 15 * 4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 95));
    c.read("vol", 15 * 4096, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn importing_the_same_image_twice_stores_it_once() {
    let h = common::scratch_peer_set("dedup");
    let c = h.client();
    let size = 2 << 20;
    let mut image = vec![0u8; size as usize];
    // Half the blocks hold data, the rest are zero (not stored at all).
    for (i, chunk) in image.chunks_mut(64 << 10).enumerate() {
        if i % 2 == 0 {
            chunk.fill(i as u8 + 1);
            chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
    c.create("img1", size, Some(64 * KIB)).await.unwrap();
    c.create("img2", size, Some(64 * KIB)).await.unwrap();
    let r1 = c.import_block("img1", 0, &image).await.unwrap();
    assert_eq!(r1.blocks, 32);
    assert_eq!(r1.zero, 16);
    assert_eq!(r1.written, 16);
    let bytes_one = h.object_bytes().await;
    let r2 = c.import_block("img2", 0, &image).await.unwrap();
    assert_eq!(r2.written, 0);
    assert_eq!(r2.reused, 16);
    assert_eq!(
        h.object_bytes().await,
        bytes_one,
        "the second import stored new bytes"
    );
    let mut back = vec![0u8; size as usize];
    c.read("img2", 0, &mut back).await.unwrap();
    assert!(back == image);
    let v = c.verify("img2").await.unwrap();
    assert_eq!((v.content, v.zero), (16, 16));

    // Writing to an imported block copies it on write; the other volume is untouched.
    c.write("img2", 10, b"changed").await.unwrap();
    c.read("img1", 0, &mut back).await.unwrap();
    assert!(back == image);

    // dedup of a snapshot turns written blocks into content objects shared with the images.
    c.create("plain", size, Some(64 * KIB)).await.unwrap();
    c.write("plain", 0, &image).await.unwrap();
    c.snapshot("plain", "plain-s").await.unwrap();
    let d = c.dedup("plain-s").await.unwrap();
    assert_eq!(d.converted, 32);
    assert_eq!(d.written, 0);
    assert_eq!(d.reused + d.zero, 32);
    c.read("plain-s", 0, &mut back).await.unwrap();
    assert!(back == image);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_errors_and_changes_nothing() {
    let h = common::scratch_peer_set("bad");
    let c = h.client();
    c.create("good", 1 << 20, Some(64 * KIB)).await.unwrap();
    c.write("good", 0, b"keep").await.unwrap();
    c.snapshot("good", "good-s").await.unwrap();
    let before = c.list().await.unwrap();

    let long = "x".repeat(300);
    let bad_names = [
        "../etc", "a/b", "a\0b", ".hidden", "x.lock", "x.tmp", "a..b", &long, "",
    ];
    for name in bad_names {
        let e = c.create(name, 1 << 20, None).await.unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidArgument(_)),
            "create {name:?}: {e}"
        );
        let e = c.snapshot("good", name).await.unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidArgument(_)),
            "snapshot {name:?}: {e}"
        );
        let e = c.clone_volume("good-s", name, None).await.unwrap_err();
        assert!(
            matches!(e, ClientError::InvalidArgument(_)),
            "clone {name:?}: {e}"
        );
        let e = c.write(name, 0, b"x").await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::InvalidArgument(_) | ClientError::NotFound(_)
            ),
            "write {name:?}: {e}"
        );
    }
    let e = c.info("missing").await.unwrap_err();
    assert!(
        matches!(e, ClientError::NotFound(ref m) if m.contains("missing")),
        "{e}"
    );
    let e = c.snapshot("missing", "s2").await.unwrap_err();
    assert!(matches!(e, ClientError::NotFound(_)), "{e}");
    let e = c.read("missing", 0, &mut [0u8; 10]).await.unwrap_err();
    assert!(matches!(e, ClientError::NotFound(_)), "{e}");
    let e = c.clone_volume("good-s", "good", None).await.unwrap_err();
    assert!(
        matches!(e, ClientError::AlreadyExists(ref m) if m.contains("good")),
        "{e}"
    );
    let e = c.create("good", 1 << 20, None).await.unwrap_err();
    assert!(matches!(e, ClientError::AlreadyExists(_)), "{e}");
    let e = c.resize("good", 512 << 10).await.unwrap_err();
    assert!(
        matches!(e, ClientError::OutOfRange(ref m) if m.contains("shrink")),
        "{e}"
    );
    let e = c
        .clone_volume("good-s", "small", Some(4096))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange(_)), "{e}");
    let e = c.create("odd", 1000, None).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let e = c.create("bs", 1 << 20, Some(3000)).await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");
    let e = c.write("good", (1 << 20) - 2, b"abc").await.unwrap_err();
    assert!(matches!(e, ClientError::OutOfRange(_)), "{e}");
    let e = c.write("good-s", 0, b"abc").await.unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly(_)), "{e}");
    let e = c.dedup("good").await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e}");

    // Nothing changed.
    assert_eq!(c.list().await.unwrap(), before);
    let mut buf = [0u8; 4];
    c.read("good", 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"keep");
    c.read("good-s", 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"keep");
    // On files, nothing appeared beside the objects directory (RADOS has no beside).
    if let Some(objects) = h.backend.objects_dir() {
        let root = objects.parent().unwrap();
        assert!(
            std::fs::read_dir(root)
                .unwrap()
                .all(|e| e.unwrap().file_name() == "objects")
        );
    }

    // Object names are validated at the blocker itself too: traversal does nothing.
    let seg = h.segment();
    let mut port = seg.bind_dynamic("raw").unwrap();
    for name in ["../escape", "a/b", "x.tmp"] {
        let mut req = port.alloc(xseg::Op::Write, name.as_bytes(), 4).unwrap();
        req.write_data(b"evil").unwrap();
        req.set_size(4);
        let rep = port
            .call(req, Ports::BLOCKER, std::time::Duration::from_secs(10))
            .unwrap();
        assert_eq!(rep.status(), xseg::Status::Invalid, "{name}");
    }
    let stored = h.blocker.list("").await.unwrap();
    assert!(
        stored.iter().all(|o| !o.name.as_str().contains("escape")),
        "{stored:?}"
    );
    if let Some(objects) = h.backend.objects_dir() {
        assert!(!objects.parent().unwrap().join("escape").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_are_reported_and_broken_explicitly() {
    let h = common::scratch_peer_set("locks");
    let c = h.client();
    c.create("vol", 1 << 20, Some(64 * KIB)).await.unwrap();
    c.write("vol", 0, b"x").await.unwrap();
    let l = c.lock_info("vol").await.unwrap();
    assert_eq!(l.holder.as_deref(), Some("node-test"));
    let before = c.break_lock("vol").await.unwrap();
    assert_eq!(before.holder.as_deref(), Some("node-test"));
    let after = c.lock_info("vol").await.unwrap();
    assert_eq!(after.holder, None);
    assert!(after.generation >= before.generation);
    // The broken holder's cached open is fenced: it must close and reopen.
    let _ = c.write("vol", 0, b"y").await;
    c.close("vol").await.unwrap();
    c.write("vol", 0, b"z").await.unwrap();
    let mut b = [0u8; 1];
    c.read("vol", 0, &mut b).await.unwrap();
    assert_eq!(&b, b"z");
}
