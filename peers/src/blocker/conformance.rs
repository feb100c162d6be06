//! One behavioural suite that every blocker must pass, so that the memory blocker used by the
//! mapper's tests cannot drift from the real backends.
//!
//! Compiled for this crate's tests and, with the `testing` feature, for other crates: a
//! blocker that lives elsewhere (behind a feature, in another crate) proves itself with
//! [`run_all`] from its own tests. The checks panic on the first failure, like `assert!`.

use std::sync::Arc;

use super::*;

fn n(s: &str) -> ObjectName {
    ObjectName::new(s).unwrap()
}

/// Runs every check on one blocker, which must start empty.
pub async fn run(b: &dyn Blocker) {
    sparse_reads(b).await;
    write_read_copy_delete(b).await;
    listing(b).await;
    map_objects(b).await;
    map_batches(b).await;
    locks_and_fences(b).await;
    capacity(b).await;
    identity(b);
}

/// Runs every check, each group on a fresh blocker from `make`, and checks that separate
/// backends tell themselves apart. `make` must return a blocker over a new, empty backend
/// each time (a new directory, a new RADOS namespace), never one that another call returned.
pub async fn run_all(make: impl Fn() -> Arc<dyn Blocker>) {
    sparse_reads(&*make()).await;
    write_read_copy_delete(&*make()).await;
    listing(&*make()).await;
    map_objects(&*make()).await;
    map_batches(&*make()).await;
    locks_and_fences(&*make()).await;
    capacity(&*make()).await;
    identity(&*make());
    distinct_identities(&*make(), &*make());
    // And all of it on one instance, as the peers use a blocker: a long-lived one.
    run(&*make()).await;
}

async fn capacity(b: &dyn Blocker) {
    let before = b.capacity().await.unwrap();
    assert!(before.total > 0, "a backend with no capacity: {before:?}");
    assert!(before.available <= before.total, "{before:?}");
    b.write(&n("capacity.0"), 0, &[1u8; 4096]).await.unwrap();
    b.flush().await.unwrap();
    let after = b.capacity().await.unwrap();
    assert!(after.available <= after.total, "{after:?}");
}

fn identity(b: &dyn Blocker) {
    assert_eq!(b.identity(), b.identity(), "an identity is stable");
    assert!(!b.identity().as_str().is_empty());
}

fn distinct_identities(a: &dyn Blocker, b: &dyn Blocker) {
    assert_ne!(
        a.identity(),
        b.identity(),
        "two separate backends must not claim to be the same one"
    );
}

async fn map_batches(b: &dyn Blocker) {
    let batch: Vec<(ObjectName, Vec<u8>)> = (0..20u8)
        .map(|i| (n(&format!("batch.{i:02}")), vec![i; 100 + i as usize]))
        .collect();
    let versions = b.create_maps(&batch).await.unwrap();
    assert_eq!(versions.len(), batch.len());
    for ((object, data), version) in batch.iter().zip(&versions) {
        let got = b.read_map(object).await.unwrap().expect("created");
        assert_eq!(&got.data, data, "{object}");
        assert_eq!(got.version, *version, "{object}");
    }
    assert!(b.create_maps(&[]).await.unwrap().is_empty());
    // A batch may only create: an existing object fails it and keeps its content.
    let again = [(n("batch.03"), b"other".to_vec())];
    let err = b.create_maps(&again).await.unwrap_err();
    assert!(matches!(err, BlockerError::VersionMismatch { .. }), "{err}");
    assert_eq!(
        b.read_map(&n("batch.03")).await.unwrap().unwrap().data,
        vec![3u8; 103]
    );
}

async fn sparse_reads(b: &dyn Blocker) {
    let missing = n("missing");
    let mut buf = [7u8; 16];
    b.read(&missing, 100, &mut buf).await.unwrap();
    assert_eq!(buf, [0u8; 16], "a missing object reads as zeros");
    assert!(b.info(&missing).await.unwrap().is_none());

    let obj = n("sparse");
    b.write(&obj, 10, b"hello").await.unwrap();
    let mut buf = [7u8; 20];
    b.read(&obj, 0, &mut buf).await.unwrap();
    assert_eq!(
        &buf[..10],
        &[0u8; 10],
        "the hole before the write reads as zeros"
    );
    assert_eq!(&buf[10..15], b"hello");
    assert_eq!(&buf[15..], &[0u8; 5], "past the end reads as zeros");
    assert_eq!(b.info(&obj).await.unwrap().unwrap().size, 15);

    let err = b.read(&obj, u64::MAX - 2, &mut buf).await.unwrap_err();
    assert!(matches!(err, BlockerError::InvalidRange { .. }), "{err}");
}

async fn write_read_copy_delete(b: &dyn Blocker) {
    let src = n("src");
    let dst = n("dst");
    b.write(&src, 0, &[1u8; 4096]).await.unwrap();
    b.write(&src, 4096, &[2u8; 100]).await.unwrap();
    b.write(&dst, 0, &[9u8; 10000]).await.unwrap();
    b.flush().await.unwrap();

    b.copy(&src, &dst).await.unwrap();
    let mut buf = vec![0u8; 10000];
    b.read(&dst, 0, &mut buf).await.unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 1));
    assert!(buf[4096..4196].iter().all(|&x| x == 2));
    assert!(
        buf[4196..].iter().all(|&x| x == 0),
        "copy replaces the destination, it does not merge"
    );
    assert_eq!(b.info(&dst).await.unwrap().unwrap().size, 4196);

    // Writing the copy leaves the source alone.
    b.write(&dst, 0, b"x").await.unwrap();
    let mut one = [0u8; 1];
    b.read(&src, 0, &mut one).await.unwrap();
    assert_eq!(one, [1]);

    // Copying a missing object leaves an empty or missing (all-zero) destination.
    b.copy(&n("nothing-here"), &dst).await.unwrap();
    assert!(b.info(&dst).await.unwrap().is_none_or(|i| i.size == 0));
    b.read(&dst, 0, &mut buf).await.unwrap();
    assert!(buf.iter().all(|&x| x == 0));

    // Truncating empties in place; a missing object stays missing.
    b.write(&dst, 0, &[7u8; 5000]).await.unwrap();
    assert!(b.truncate(&dst).await.unwrap());
    assert_eq!(b.info(&dst).await.unwrap().unwrap().size, 0);
    b.read(&dst, 0, &mut buf).await.unwrap();
    assert!(
        buf.iter().all(|&x| x == 0),
        "truncated objects read as zeros"
    );
    b.write(&dst, 100, b"y").await.unwrap();
    b.read(&dst, 0, &mut buf).await.unwrap();
    assert!(buf[..100].iter().all(|&x| x == 0) && buf[100] == b'y');
    assert!(buf[101..].iter().all(|&x| x == 0), "no old data comes back");
    assert!(!b.truncate(&n("nothing-here")).await.unwrap());
    assert!(b.info(&n("nothing-here")).await.unwrap().is_none());

    assert!(b.delete(&src).await.unwrap());
    assert!(!b.delete(&src).await.unwrap(), "delete is idempotent");
    b.read(&src, 0, &mut one).await.unwrap();
    assert_eq!(one, [0]);
}

async fn listing(b: &dyn Blocker) {
    for name in ["ls.b", "ls.a", "ls.c", "lz.a"] {
        b.write(&n(name), 0, b"1").await.unwrap();
    }
    let names: Vec<String> = b
        .list("ls.")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name.to_string())
        .collect();
    assert_eq!(names, ["ls.a", "ls.b", "ls.c"]);
}

async fn map_objects(b: &dyn Blocker) {
    let m = n("map.one");
    assert!(b.read_map(&m).await.unwrap().is_none());
    let v1 = b
        .write_map(&m, b"first", Expect::Absent, None)
        .await
        .unwrap();
    let err = b
        .write_map(&m, b"again", Expect::Absent, None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::VersionMismatch { .. }), "{err}");
    let got = b.read_map(&m).await.unwrap().unwrap();
    assert_eq!((got.data.as_slice(), got.version), (&b"first"[..], v1));

    let v2 = b
        .write_map(&m, b"second", Expect::Version(v1), None)
        .await
        .unwrap();
    assert!(v2 > v1);
    let err = b
        .write_map(&m, b"stale", Expect::Version(v1), None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::VersionMismatch { .. }), "{err}");
    assert_eq!(b.read_map(&m).await.unwrap().unwrap().data, b"second");

    let err = b
        .delete_map(&m, Expect::Version(v1), None)
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::VersionMismatch { .. }), "{err}");
    b.delete_map(&m, Expect::Version(v2), None).await.unwrap();
    assert!(b.read_map(&m).await.unwrap().is_none());

    // A re-created map never reuses a version, so a stale compare-and-swap cannot succeed.
    let v3 = b
        .write_map(&m, b"third", Expect::Absent, None)
        .await
        .unwrap();
    assert!(v3 > v2);
}

async fn locks_and_fences(b: &dyn Blocker) {
    let lock = n("lk.vol");
    let a = LockOwner::new("node-a").unwrap();
    let c = LockOwner::new("node-c").unwrap();
    let m = n("map.fenced");

    assert_eq!(
        b.lock_info(&lock).await.unwrap(),
        LockInfo {
            holder: None,
            generation: 0
        }
    );
    let fa = b.lock_acquire(&lock, &a).await.unwrap();
    assert_eq!(b.lock_acquire(&lock, &a).await.unwrap(), fa, "idempotent");
    match b.lock_acquire(&lock, &c).await.unwrap_err() {
        BlockerError::Locked { holder, .. } => assert_eq!(holder, "node-a"),
        e => panic!("{e}"),
    }
    let v = b
        .write_map(&m, b"by a", Expect::Absent, Some(&fa))
        .await
        .unwrap();

    let before = b.lock_break(&lock).await.unwrap();
    assert_eq!(before.holder.as_ref(), Some(&a));
    let err = b
        .write_map(&m, b"stale a", Expect::Version(v), Some(&fa))
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::Fenced { .. }), "{err}");

    let fc = b.lock_acquire(&lock, &c).await.unwrap();
    assert!(fc.generation > fa.generation);
    assert!(matches!(
        b.lock_release(&fa).await.unwrap_err(),
        BlockerError::Fenced { .. }
    ));
    // Even the same owner coming back gets a new generation: the old fence stays dead.
    b.lock_release(&fc).await.unwrap();
    b.lock_release(&fc).await.unwrap();
    let fa2 = b.lock_acquire(&lock, &a).await.unwrap();
    assert!(fa2.generation > fc.generation);
    let err = b
        .write_map(&m, b"stale a", Expect::Version(v), Some(&fa))
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::Fenced { .. }), "{err}");
    b.write_map(&m, b"a again", Expect::Version(v), Some(&fa2))
        .await
        .unwrap();
    let err = b.delete_map(&m, Expect::Any, Some(&fc)).await.unwrap_err();
    assert!(matches!(err, BlockerError::Fenced { .. }), "{err}");
    assert!(b.read_map(&m).await.unwrap().is_some());

    // A handover moves the lock in one step: the former holder's fence is stale, the new one
    // works, a free lock is simply taken and handing over to the holder changes nothing.
    let fc2 = b.lock_hand_over(&lock, &c).await.unwrap();
    assert!(fc2.generation > fa2.generation);
    assert_eq!(b.lock_info(&lock).await.unwrap().holder.as_ref(), Some(&c));
    assert_eq!(
        b.lock_hand_over(&lock, &c).await.unwrap(),
        fc2,
        "idempotent"
    );
    let err = b
        .write_map(&m, b"stale a", Expect::Any, Some(&fa2))
        .await
        .unwrap_err();
    assert!(matches!(err, BlockerError::Fenced { .. }), "{err}");
    b.write_map(&m, b"by c", Expect::Any, Some(&fc2))
        .await
        .unwrap();
    b.lock_release(&fc2).await.unwrap();
    let fa3 = b.lock_hand_over(&lock, &a).await.unwrap();
    assert!(fa3.generation > fc2.generation);
    assert_eq!(b.lock_info(&lock).await.unwrap().holder.as_ref(), Some(&a));
}
