//! The RADOS blocker against a real cluster: the blocker conformance suite, one fresh
//! namespace per blocker, and the mapping of cluster errors to typed blocker errors.
//!
//! Needs `--features rados` and a cluster: `eval "$(e2e/ceph/start-ceph.sh DIR)"` exports
//! `CEPH_CONF` and `ARCHIP_CEPH_POOL` (e2e/ceph/rados-suite.sh does all of it). Without them
//! every test here says so and returns.
#![cfg(feature = "rados")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use peers::blocker::rados::{Connect, DEFAULT_TIMEOUT, RadosBlocker};
use peers::blocker::{Blocker, BlockerError, Expect, LockOwner, ObjectName, conformance};

/// The cluster from the environment, or None (and a message) when there is none.
fn cluster() -> Option<(Connect, String)> {
    let (Ok(conf), Ok(pool)) = (
        std::env::var("CEPH_CONF"),
        std::env::var("ARCHIP_CEPH_POOL"),
    ) else {
        eprintln!(
            "SKIP: no Ceph cluster (set CEPH_CONF and ARCHIP_CEPH_POOL, e.g. with \
             eval \"$(e2e/ceph/start-ceph.sh /tmp/archip-ceph)\")"
        );
        return None;
    };
    let connect = Connect {
        conf: Some(conf.into()),
        monitors: Vec::new(),
        client: "admin".into(),
        keyring: std::env::var_os("ARCHIP_CEPH_KEYRING").map(Into::into),
        key_env: None,
        timeout: DEFAULT_TIMEOUT,
    };
    Some((connect, pool))
}

fn fresh_namespace() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

fn n(s: &str) -> ObjectName {
    ObjectName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_rados() {
    let Some((connect, pool)) = cluster() else {
        return;
    };
    conformance::run_all(|| {
        Arc::new(RadosBlocker::connect(&connect, &pool, &fresh_namespace()).unwrap())
            as Arc<dyn Blocker>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_stores_apart() {
    let Some((connect, pool)) = cluster() else {
        return;
    };
    let a = RadosBlocker::connect(&connect, &pool, &fresh_namespace()).unwrap();
    let b = RadosBlocker::connect(&connect, &pool, &fresh_namespace()).unwrap();
    a.write(&n("shared.name"), 0, b"in a").await.unwrap();
    assert!(b.info(&n("shared.name")).await.unwrap().is_none());
    assert!(b.list("shared").await.unwrap().is_empty());
    assert_eq!(a.list("shared").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pool_is_not_found() {
    let Some((connect, _)) = cluster() else {
        return;
    };
    let err = RadosBlocker::connect(&connect, "no-such-pool-archip", "ns").unwrap_err();
    match &err {
        BlockerError::NotFound { object } => assert!(object.contains("no-such-pool"), "{err}"),
        e => panic!("expected NotFound, got {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_objects_map_to_not_found_or_absent() {
    let Some((connect, pool)) = cluster() else {
        return;
    };
    let b = RadosBlocker::connect(&connect, &pool, &fresh_namespace()).unwrap();
    assert!(b.info(&n("nope")).await.unwrap().is_none());
    assert!(b.read_map(&n("nope")).await.unwrap().is_none());
    let err = b
        .write_map(&n("nope"), b"x", peers::blocker::Expect::Version(7), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, BlockerError::VersionMismatch { found: None, .. }),
        "{err}"
    );
}

fn ceph(args: &[&str]) {
    let out = std::process::Command::new("ceph")
        .args(args)
        .output()
        .expect("the ceph CLI runs");
    assert!(
        out.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pool with a tiny byte quota fills up; the blocker then answers NoSpace instead of
/// blocking. The quota is enforced from statistics the ceph-mgr reports every few seconds,
/// so the test writes until the pool is marked full, with a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_is_no_space() {
    let Some((connect, _)) = cluster() else {
        return;
    };
    let pool = format!("archip-full-{}", std::process::id());
    ceph(&["osd", "pool", "create", &pool, "8", "8", "replicated"]);
    ceph(&["osd", "pool", "set-quota", &pool, "max_bytes", "1048576"]);
    // A new pool reaches a fresh client's OSD map with a lag even after the monitors
    // committed it (seen in CI): poll for it, bounded, instead of failing on the race.
    let deadline = Instant::now() + Duration::from_secs(30);
    let b = loop {
        match RadosBlocker::connect(&connect, &pool, "ns") {
            Ok(b) => break b,
            Err(BlockerError::NotFound { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    // Likewise the pool's first statistics reach the mgr with a lag: capacity is a transient
    // error (never NotFound) until they do.
    let deadline = Instant::now() + Duration::from_secs(60);
    let capacity = loop {
        match b.capacity().await {
            Ok(c) => break c,
            Err(BlockerError::NotFound { object }) => panic!("capacity said {object} is missing"),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(
        capacity.total <= 1048576,
        "the quota bounds capacity: {capacity:?}"
    );

    // Past the quota in new objects (an overwrite of the same size does not grow the pool, so
    // the OSD lets it through even when full), then keep adding small objects until the
    // monitors, fed by the mgr's statistics, mark the pool full.
    let chunk = vec![0x5au8; 64 * 1024];
    for i in 0..32 {
        b.write(&n(&format!("fill.{i}")), 0, &chunk).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = 32u64;
    let err = loop {
        assert!(
            Instant::now() < deadline,
            "the pool never became full after {i} writes"
        );
        match b.write(&n(&format!("fill.{i}")), 0, &chunk[..4096]).await {
            Ok(()) => i += 1,
            Err(e) => break e,
        }
        // A poll interval, not synchronisation: the outcome is checked, whenever it comes.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(matches!(err, BlockerError::NoSpace { .. }), "{err}");
    drop(b);
    ceph(&[
        "osd",
        "pool",
        "delete",
        &pool,
        &pool,
        "--yes-i-really-really-mean-it",
    ]);
}

/// Two clients of one namespace (two connections, two client addresses): a hand-over frees
/// the lock and leaves the former holder connected; a break fences it off the cluster, every
/// operation included, and leaves the breaker alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_blocklists_the_holder_and_a_hand_over_does_not() {
    let Some((connect, pool)) = cluster() else {
        return;
    };
    let ns = fresh_namespace();
    let x = RadosBlocker::connect(&connect, &pool, &ns).unwrap();
    let y = RadosBlocker::connect(&connect, &pool, &ns).unwrap();
    let lock = n("vol.lk");
    let (ox, oy) = (
        LockOwner::new("node-x").unwrap(),
        LockOwner::new("node-y").unwrap(),
    );

    let fx = x.lock_acquire(&lock, &ox).await.unwrap();
    x.write(&n("data.x"), 0, b"before").await.unwrap();
    let fy = y.lock_hand_over(&lock, &oy).await.unwrap();
    assert!(fy.generation > fx.generation);
    assert_eq!(y.lock_info(&lock).await.unwrap().holder.as_ref(), Some(&oy));
    // Still connected: x's fence is stale, but the cluster serves it.
    x.write(&n("data.x"), 0, b"after!").await.unwrap();
    assert!(matches!(
        x.write_map(&n("map"), b"m", Expect::Absent, Some(&fx))
            .await,
        Err(BlockerError::Fenced { .. })
    ));
    y.lock_release(&fy).await.unwrap();

    let fx = x.lock_acquire(&lock, &ox).await.unwrap();
    let before = y.lock_break(&lock).await.unwrap();
    assert_eq!(before.holder.as_ref().map(|h| h.as_str()), Some("node-x"));
    for r in [
        x.write(&n("data.x"), 0, b"late").await,
        x.write_map(&n("map"), b"m", Expect::Absent, Some(&fx))
            .await
            .map(drop),
        x.read(&n("data.x"), 0, &mut [0u8; 6]).await,
    ] {
        assert!(matches!(r, Err(BlockerError::Blocklisted { .. })), "{r:?}");
    }
    let fy = y.lock_acquire(&lock, &oy).await.unwrap();
    y.write(&n("data.x"), 0, b"theirs").await.unwrap();
    y.write_map(&n("map"), b"m", Expect::Absent, Some(&fy))
        .await
        .unwrap();
    let mut buf = [0u8; 6];
    y.read(&n("data.x"), 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"theirs");
}
