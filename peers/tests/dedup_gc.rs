//! Dedup and GC, and GC racing with concurrent operations, on the backend
//! `ARCHIP_TEST_BACKEND` names (files by default, or RADOS); the races also on a memory
//! blocker that yields before every call, which interleaves tasks at every backend call.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Yielding;
use peers::blocker::{Blocker, LockOwner};
use peers::mapper::{CreateOptions, GcOptions, Mapper};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 64 << 10;

fn opts() -> CreateOptions {
    CreateOptions {
        block_size: BS as u32,
        page_entries: 16,
    }
}

fn now() -> GcOptions {
    GcOptions {
        grace: Duration::ZERO,
        dry_run: false,
    }
}

async fn stored(b: &dyn Blocker, prefix: &str) -> u64 {
    b.list(prefix).await.unwrap().iter().map(|i| i.size).sum()
}

/// An "image": 48 blocks of which some are zero and many repeat.
fn image() -> Vec<u8> {
    let mut img = vec![0u8; 48 * BS as usize];
    for (i, block) in img.chunks_mut(BS as usize).enumerate() {
        match i % 6 {
            0 | 3 => {}
            k => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (k as u8) ^ (j % 13) as u8 | 0x80),
        }
    }
    img
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn importing_the_same_image_twice_stores_it_once() {
    let backend = common::TestBackend::fresh("dedup");
    let b = backend.open();
    let m = Mapper::new(b.clone(), LockOwner::new("n").unwrap());
    let img = image();
    m.create("first", img.len() as u64, opts()).await.unwrap();
    let r1 = m.import("first", 0, &img).await.unwrap();
    assert_eq!(r1.zero, 16);
    assert_eq!(r1.written, 4, "four distinct non-zero blocks");
    let after_first = stored(b.as_ref(), "").await;

    m.create("second", img.len() as u64, opts()).await.unwrap();
    let r2 = m.import("second", 0, &img).await.unwrap();
    assert_eq!((r2.written, r2.bytes_written), (0, 0));
    let added = stored(b.as_ref(), "").await - after_first;
    assert!(
        stored(b.as_ref(), "ct.").await <= 4 * BS,
        "content objects hold the data once"
    );
    // Only metadata grew: one header and the pages of the second map.
    assert!(added < 16 * 1024, "second import added {added} bytes");
    assert_eq!(common::read(&m, "second", 0, img.len()).await.unwrap(), img);

    // A dedup pass over a snapshot of plainly written data finds the same content objects.
    m.create("plain", img.len() as u64, opts()).await.unwrap();
    common::write(&m, "plain", 0, &img).await.unwrap();
    m.snapshot("plain", "plain-snap").await.unwrap();
    let d = m.dedup("plain-snap").await.unwrap();
    assert_eq!((d.written, d.reused, d.zero), (0, 32, 16), "{d:?}");
    m.delete("plain").await.unwrap();
    let gc = m.gc(now()).await.unwrap();
    assert_eq!(
        gc.deleted_objects, 48,
        "all plain copies are garbage now: {gc:?}"
    );
    assert_eq!(
        common::read(&m, "plain-snap", 0, img.len()).await.unwrap(),
        img
    );
    assert_eq!(stored(b.as_ref(), "ob.").await, 0);
}

/// GC runs in a loop while other tasks write, snapshot, clone and delete. Afterwards every
/// volume reads back what was written: GC never deleted a referenced object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_is_safe_while_other_operations_run() {
    gc_while_other_operations_run(Arc::new(Yielding::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_is_safe_while_other_operations_run_on_the_test_backend() {
    let backend = common::TestBackend::fresh("gc-concurrent");
    gc_while_other_operations_run(backend.open()).await;
}

async fn gc_while_other_operations_run(b: Arc<dyn Blocker>) {
    let seed = common::seed("gc_concurrent");
    let m = Arc::new(Mapper::new(b.clone(), LockOwner::new("n").unwrap()));
    let workers = 4;
    let rounds = 60;
    for w in 0..workers {
        m.create(&format!("w{w}"), 8 * BS, opts()).await.unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let m = m.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut reclaimed = 0;
            let mut runs = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || runs == 0 {
                reclaimed += m.gc(now()).await.unwrap().deleted_objects;
                runs += 1;
                tokio::task::yield_now().await;
            }
            (runs, reclaimed)
        })
    };
    let mut tasks = Vec::new();
    for w in 0..workers {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ w);
            let vol = format!("w{w}");
            let mut model = vec![0u8; 8 * BS as usize];
            let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
            for round in 0..rounds {
                let off = rng.random_range(0..8 * BS - 100);
                let len = rng.random_range(1..=(8 * BS - off).min(2 * BS));
                let byte = rng.random::<u8>() | 1;
                let data = vec![byte; len as usize];
                common::write(&m, &vol, off, &data).await.unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                match round % 5 {
                    0 => {
                        let snap = format!("w{w}-s{round}");
                        m.snapshot(&vol, &snap).await.unwrap();
                        kept.push((snap, model.clone()));
                    }
                    1 => {
                        let clone = format!("w{w}-c{round}");
                        m.clone_volume(&vol, &clone, None).await.unwrap();
                        kept.push((clone, model.clone()));
                    }
                    2 if kept.len() > 2 => {
                        let (gone, _) = kept.remove(rng.random_range(0..kept.len()));
                        m.delete(&gone).await.unwrap();
                    }
                    3 => {
                        common::discard(&m, &vol, off, len).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    _ => {}
                }
            }
            kept.push((vol, model));
            kept
        }));
    }
    let mut expected = Vec::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (runs, reclaimed) = collector.await.unwrap();
    let final_gc = m.gc(now()).await.unwrap();
    for (name, data) in &expected {
        m.verify(name).await.unwrap();
        let got = common::read(&m, name, 0, data.len()).await.unwrap();
        assert!(
            got == *data,
            "seed {seed}: {name} lost data after {runs} concurrent collections"
        );
    }
    assert!(runs > 1, "GC really ran concurrently");
    assert!(
        reclaimed + final_gc.deleted_objects > 0,
        "and reclaimed something"
    );
    let again = m.gc(now()).await.unwrap();
    assert_eq!(again.deleted_objects + again.deleted_pages, 0);
}

/// Many tasks writing into the same shared block at once: exactly one copy-up, and every
/// write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_to_a_shared_block_copy_once() {
    first_writes_to_a_shared_block(Arc::new(Yielding::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_writes_to_a_shared_block_copy_once_on_the_test_backend() {
    let backend = common::TestBackend::fresh("copy-once");
    first_writes_to_a_shared_block(backend.open()).await;
}

async fn first_writes_to_a_shared_block(b: Arc<dyn Blocker>) {
    let m = Arc::new(Mapper::new(b.clone(), LockOwner::new("n").unwrap()));
    m.create("v", 2 * BS, opts()).await.unwrap();
    common::write(&m, "v", 0, &vec![9u8; BS as usize])
        .await
        .unwrap();
    m.snapshot("v", "s").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            common::write(&m, "v", i * 1024, &[i as u8 + 1; 1024])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = common::read(&m, "v", 0, BS as usize).await.unwrap();
    for i in 0..16usize {
        assert!(
            got[i * 1024..(i + 1) * 1024]
                .iter()
                .all(|&x| x == i as u8 + 1)
        );
    }
    assert!(got[16 * 1024..].iter().all(|&x| x == 9));
    assert_eq!(
        common::read(&m, "s", 0, BS as usize).await.unwrap(),
        vec![9u8; BS as usize]
    );
    let r = m.verify("v").await.unwrap();
    assert_eq!((r.owned, r.zero), (1, 1));
}
