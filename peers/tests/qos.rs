//! QoS limits: stored per volume by the mapper, enforced by vlmc, reclaimed with the volume.

mod common;

use std::sync::Arc;

use peers::client::{ClientError, GcRequest, QosLimits};

const KIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_are_stored_per_volume_and_checked() {
    let h = common::scratch_peer_set("qos-store");
    let c = h.client();
    c.create("db", 4 << 20, Some(64 * KIB)).await.unwrap();
    assert_eq!(c.qos("db").await.unwrap().limits(), QosLimits::default());
    let want = QosLimits {
        iops: 300,
        bytes_per_sec: 50 << 20,
    };
    assert_eq!(c.set_qos("db", want).await.unwrap().limits(), want);
    assert_eq!(c.qos("db").await.unwrap().limits(), want);

    // A clone or a snapshot does not inherit them; a snapshot cannot have any.
    c.snapshot("db", "db-s").await.unwrap();
    c.clone("db-s", "db-c", None).await.unwrap();
    assert_eq!(c.qos("db-c").await.unwrap().limits(), QosLimits::default());
    let e = c.set_qos("db-s", want).await.unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly(_)), "{e:?}");
    let e = c.set_qos("missing", want).await.unwrap_err();
    assert!(matches!(e, ClientError::NotFound(_)), "{e:?}");
    let e = c.qos("../x").await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");

    // Deleted and created again under the same name: no limits carried over, and GC takes
    // the old record away with the old map.
    c.delete("db").await.unwrap();
    c.create("db", 4 << 20, Some(64 * KIB)).await.unwrap();
    assert_eq!(c.qos("db").await.unwrap().limits(), QosLimits::default());
    let records = || async { h.blocker.list("qs.").await.unwrap().len() };
    assert_eq!(
        records().await,
        1,
        "the deleted volume's record is still there"
    );
    c.gc_with(GcRequest {
        grace_secs: 0,
        dry_run: false,
    })
    .await
    .unwrap();
    assert_eq!(records().await, 0, "GC reclaimed it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vlmc_delays_io_beyond_the_limit() {
    let h = common::scratch_peer_set("qos-io");
    let c = Arc::new(h.client());
    c.create("vm", 4 << 20, Some(64 * KIB)).await.unwrap();
    c.write("vm", 0, &[1u8; 4096]).await.unwrap();
    // Unlimited: nothing is held back.
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            c.read("vm", (i % 16) * 4096, &mut b).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(c.qos("vm").await.unwrap().delayed_ios, 0);

    // 20 IOPS, one second of burst: of 60 I/Os sent at once, 20 go and the rest wait their
    // turn (some may already be past their turn if sending them took a long while).
    c.set_qos(
        "vm",
        QosLimits {
            iops: 20,
            bytes_per_sec: 0,
        },
    )
    .await
    .unwrap();
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            c.read("vm", (i % 16) * 4096, &mut b).await.unwrap();
            assert!(i % 16 != 0 || b == [1u8; 4096]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let delayed = c.qos("vm").await.unwrap().delayed_ios;
    assert!((20..=40).contains(&delayed), "delayed {delayed}");

    // Lifting the limit lets I/O through again.
    c.set_qos("vm", QosLimits::default()).await.unwrap();
    for i in 0..30u64 {
        c.write("vm", i * 4096, &[2u8; 4096]).await.unwrap();
    }
    assert_eq!(c.qos("vm").await.unwrap().delayed_ios, delayed);
}
