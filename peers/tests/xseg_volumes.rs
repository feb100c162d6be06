//! Volumes over xseg through `VolumeClient`: the I/O paths, the mapping cache, dedup, and bad
//! input getting typed errors that change nothing.

mod xseg_harness;

use peers::client::{ClientError, VolumeKind};
use peers::peerset::Ports;
use xseg_harness::Harness;

const KIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn smoke_create_write_read_snapshot_clone() {
    let h = Harness::start("smoke");
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
