//! Unit tests of the mapper over the memory blocker, with a counting wrapper to check which
//! backend operations each mapper call costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::blocker::{
    Blocker, BlockerFuture, Expect, Fence, LockOwner, MemoryBlocker, ObjectInfo, ObjectName,
    Versioned,
};
use crate::map_format::PageOwner;

const BS: u32 = 64 << 10;
const BSU: u64 = BS as u64;

fn opts() -> CreateOptions {
    CreateOptions {
        block_size: BS,
        page_entries: 16,
    }
}

/// Counts the operations passed through to a memory blocker.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryBlocker,
    reads: AtomicU64,
    writes: AtomicU64,
    copies: AtomicU64,
    deletes: AtomicU64,
    map_reads: AtomicU64,
    map_writes: AtomicU64,
    /// Map writes and deletes still to be made to land and then report an error, as a backend
    /// that loses the completion of a write it made does.
    lose_map_replies: AtomicU64,
}

impl Counting {
    /// Whether this map mutation's reply is to be lost (counting it down).
    fn lose_reply(&self) -> bool {
        self.lose_map_replies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn lost_reply(o: &ObjectName) -> crate::blocker::BlockerError {
    crate::blocker::BlockerError::io(o, std::io::Error::from_raw_os_error(libc::EIO))
}

impl Counting {
    fn total(&self) -> u64 {
        [
            &self.reads,
            &self.writes,
            &self.copies,
            &self.deletes,
            &self.map_reads,
            &self.map_writes,
        ]
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::SeqCst);
}

impl Blocker for Counting {
    fn read<'a>(&'a self, o: &'a ObjectName, off: u64, buf: &'a mut [u8]) -> BlockerFuture<'a, ()> {
        bump(&self.reads);
        self.inner.read(o, off, buf)
    }
    fn write<'a>(&'a self, o: &'a ObjectName, off: u64, d: &'a [u8]) -> BlockerFuture<'a, ()> {
        bump(&self.writes);
        self.inner.write(o, off, d)
    }
    fn flush(&self) -> BlockerFuture<'_, ()> {
        self.inner.flush()
    }
    fn delete<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, bool> {
        bump(&self.deletes);
        self.inner.delete(o)
    }
    fn truncate<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, bool> {
        bump(&self.deletes);
        self.inner.truncate(o)
    }
    fn copy<'a>(&'a self, s: &'a ObjectName, d: &'a ObjectName) -> BlockerFuture<'a, ()> {
        bump(&self.copies);
        self.inner.copy(s, d)
    }
    fn info<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, Option<ObjectInfo>> {
        self.inner.info(o)
    }
    fn list<'a>(&'a self, p: &'a str) -> BlockerFuture<'a, Vec<ObjectInfo>> {
        self.inner.list(p)
    }
    fn read_map<'a>(&'a self, o: &'a ObjectName) -> BlockerFuture<'a, Option<Versioned>> {
        bump(&self.map_reads);
        self.inner.read_map(o)
    }
    fn write_map<'a>(
        &'a self,
        o: &'a ObjectName,
        d: &'a [u8],
        e: Expect,
        f: Option<&'a Fence>,
    ) -> BlockerFuture<'a, u64> {
        bump(&self.map_writes);
        if self.lose_reply() {
            return Box::pin(async move {
                self.inner.write_map(o, d, e, f).await?;
                Err(lost_reply(o))
            });
        }
        self.inner.write_map(o, d, e, f)
    }
    fn delete_map<'a>(
        &'a self,
        o: &'a ObjectName,
        e: Expect,
        f: Option<&'a Fence>,
    ) -> BlockerFuture<'a, ()> {
        if self.lose_reply() {
            return Box::pin(async move {
                self.inner.delete_map(o, e, f).await?;
                Err(lost_reply(o))
            });
        }
        self.inner.delete_map(o, e, f)
    }
    fn lock_acquire<'a>(&'a self, l: &'a ObjectName, o: &'a LockOwner) -> BlockerFuture<'a, Fence> {
        self.inner.lock_acquire(l, o)
    }
    fn lock_release<'a>(&'a self, f: &'a Fence) -> BlockerFuture<'a, ()> {
        self.inner.lock_release(f)
    }
    fn lock_info<'a>(&'a self, l: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        self.inner.lock_info(l)
    }
    fn lock_break<'a>(&'a self, l: &'a ObjectName) -> BlockerFuture<'a, LockInfo> {
        self.inner.lock_break(l)
    }
    fn capacity(&self) -> BlockerFuture<'_, crate::blocker::Capacity> {
        self.inner.capacity()
    }
    fn identity(&self) -> crate::blocker::BackendId {
        self.inner.identity()
    }
}

fn setup() -> (Arc<Counting>, Mapper) {
    let b = Arc::new(Counting::default());
    let m = Mapper::new(b.clone(), LockOwner::new("node-a").unwrap());
    (b, m)
}

/// What vlmc does for a write: MAPW, then write each extent.
async fn write(m: &Mapper, vol: &str, offset: u64, data: &[u8]) {
    crate::testing::write(m, vol, offset, data).await.unwrap();
}

/// What vlmc does for a read: MAPR, then read each extent, zero-filling ZERO extents.
async fn read(m: &Mapper, vol: &str, offset: u64, len: usize) -> Vec<u8> {
    crate::testing::read(m, vol, offset, len).await.unwrap()
}

#[tokio::test]
async fn create_validates_and_refuses_duplicates() {
    let (_, m) = setup();
    let info = m.create("v1", 10 * BSU, opts()).await.unwrap();
    assert_eq!(
        (info.size, info.block_size, info.snapshot),
        (10 * BSU, BS, false)
    );
    assert!(matches!(
        m.create("v1", BSU, opts()).await,
        Err(MapperError::AlreadyExists { .. })
    ));
    for bad in ["", "../x", "a/b", "x.lock", "a\0b"] {
        assert!(
            matches!(
                m.create(bad, BSU, opts()).await,
                Err(MapperError::InvalidName(_))
            ),
            "{bad:?}"
        );
    }
    assert!(matches!(
        m.create("v2", 1000, opts()).await,
        Err(MapperError::InvalidSize { .. })
    ));
    assert!(matches!(
        m.create("v2", 0, opts()).await,
        Err(MapperError::InvalidSize { .. })
    ));
    let odd = CreateOptions {
        block_size: 3 << 12,
        ..opts()
    };
    assert!(matches!(
        m.create("v2", BSU, odd).await,
        Err(MapperError::InvalidBlockSize { .. })
    ));
    let names: Vec<String> = m
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["v1"], "failed creates left nothing behind");
    assert!(matches!(
        m.info("nope").await,
        Err(MapperError::NotFound { .. })
    ));
}

#[tokio::test]
async fn owned_blocks_map_without_backend_io() {
    let (b, m) = setup();
    m.create("v", 4 * BSU, opts()).await.unwrap();
    write(&m, "v", 100, b"hello").await;
    let before = b.total();
    let e = m.map_write("v", 0, BSU).await.unwrap();
    assert_eq!(e.len(), 1);
    let e = m.map_read("v", 50, 100).await.unwrap();
    assert!(!e[0].is_zero());
    assert_eq!(
        b.total(),
        before,
        "steady-state MAPW/MAPR of an owned block did I/O"
    );
    assert_eq!(&read(&m, "v", 100, 5).await, b"hello");
    assert_eq!(read(&m, "v", BSU, 10).await, vec![0; 10], "zero block");
    let e = m.map_read("v", BSU, 10).await.unwrap();
    assert!(e[0].is_zero());
}

#[tokio::test]
async fn extents_split_at_block_boundaries_and_ranges_are_checked() {
    let (_, m) = setup();
    m.create("v", 3 * BSU, opts()).await.unwrap();
    let e = m.map_write("v", BSU - 10, BSU + 20).await.unwrap();
    let shape: Vec<(u64, u64, u64)> = e
        .iter()
        .map(|e| (e.block, e.object_offset, e.length))
        .collect();
    assert_eq!(shape, [(0, BSU - 10, 10), (1, 0, BSU), (2, 0, 10)]);
    for (off, len) in [(3 * BSU, 1), (0, 3 * BSU + 1), (u64::MAX, 2)] {
        assert!(matches!(
            m.map_write("v", off, len).await,
            Err(MapperError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.map_read("v", off, len).await,
            Err(MapperError::OutOfRange { .. })
        ));
    }
}

#[tokio::test]
async fn snapshot_shares_then_copy_on_write_copies_only_partial_writes() {
    let (b, m) = setup();
    m.create("v", 4 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, &vec![1u8; 2 * BSU as usize]).await;
    let epoch = m.info("v").await.unwrap().epoch;
    let snap = m.snapshot("v", "s").await.unwrap();
    assert!(snap.snapshot);
    assert_eq!(
        m.info("v").await.unwrap().epoch,
        epoch + 1,
        "epoch moves on"
    );
    assert_eq!(m.block_state("v", 0).await.unwrap(), BlockState::Shared);

    let copies = b.copies.load(Ordering::SeqCst);
    write(&m, "v", 10, b"partial").await;
    assert_eq!(
        b.copies.load(Ordering::SeqCst),
        copies + 1,
        "partial write copies"
    );
    write(&m, "v", BSU, &vec![2u8; BSU as usize]).await;
    assert_eq!(
        b.copies.load(Ordering::SeqCst),
        copies + 1,
        "whole write does not"
    );
    write(&m, "v", 2 * BSU + 5, b"fresh").await;
    assert_eq!(
        b.copies.load(Ordering::SeqCst),
        copies + 1,
        "zero block does not"
    );

    let mut expect = vec![1u8; BSU as usize];
    expect[10..17].copy_from_slice(b"partial");
    assert_eq!(read(&m, "v", 0, BSU as usize).await, expect);
    assert_eq!(read(&m, "v", BSU, 4).await, [2; 4]);
    assert_eq!(
        read(&m, "s", 0, 2 * BSU as usize).await,
        vec![1u8; 2 * BSU as usize]
    );
    assert!(matches!(
        m.map_write("s", 0, 1).await,
        Err(MapperError::ReadOnly { .. })
    ));
    assert!(matches!(
        m.snapshot("v", "s").await,
        Err(MapperError::AlreadyExists { .. })
    ));
    m.verify("v").await.unwrap();
    m.verify("s").await.unwrap();
}

#[tokio::test]
async fn clones_from_snapshots_and_volumes_are_independent() {
    let (_, m) = setup();
    m.create("base", 2 * BSU, opts()).await.unwrap();
    write(&m, "base", 0, b"base data").await;
    m.snapshot("base", "gold").await.unwrap();
    let c = m.clone_volume("gold", "c1", Some(5 * BSU)).await.unwrap();
    assert_eq!(c.size, 5 * BSU);
    assert_eq!(c.source.as_deref(), Some("gold"));
    m.clone_volume("base", "c2", None).await.unwrap();
    m.clone_volume("c1", "c3", None).await.unwrap();

    write(&m, "c1", 0, b"c1").await;
    write(&m, "c2", 0, b"c2").await;
    write(&m, "base", 0, b"bb").await;
    assert_eq!(&read(&m, "c1", 0, 9).await, b"c1se data");
    assert_eq!(&read(&m, "c2", 0, 9).await, b"c2se data");
    assert_eq!(&read(&m, "c3", 0, 9).await, b"base data");
    assert_eq!(&read(&m, "base", 0, 9).await, b"bbse data");
    assert_eq!(&read(&m, "gold", 0, 9).await, b"base data");
    assert_eq!(read(&m, "c1", 4 * BSU, 8).await, vec![0; 8]);

    assert!(matches!(
        m.clone_volume("gold", "c4", Some(BSU)).await,
        Err(MapperError::ShrinkRefused { .. })
    ));
    assert!(matches!(
        m.clone_volume("gold", "c1", None).await,
        Err(MapperError::AlreadyExists { .. })
    ));
    assert!(matches!(
        m.clone_volume("nothing", "c5", None).await,
        Err(MapperError::NotFound { .. })
    ));
    assert!(m.info("c4").await.is_err() && m.info("c5").await.is_err());
}

#[tokio::test]
async fn resize_grows_and_refuses_to_shrink() {
    let (_, m) = setup();
    m.create("v", 3 * BSU / 2, opts()).await.unwrap();
    write(&m, "v", BSU, &vec![7u8; (BSU / 2) as usize]).await;
    let grown = m.resize("v", 40 * BSU).await.unwrap();
    assert_eq!(grown.size, 40 * BSU);
    assert_eq!(
        read(&m, "v", BSU, BSU as usize).await[..(BSU / 2) as usize],
        vec![7u8; (BSU / 2) as usize]
    );
    assert_eq!(read(&m, "v", 3 * BSU / 2, 16).await, vec![0; 16]);
    write(&m, "v", 39 * BSU, b"end").await;
    assert_eq!(
        m.resize("v", 40 * BSU).await.unwrap().size,
        40 * BSU,
        "idempotent"
    );
    assert!(matches!(
        m.resize("v", BSU).await,
        Err(MapperError::ShrinkRefused { current, .. }) if current == 40 * BSU
    ));
    m.snapshot("v", "s").await.unwrap();
    assert!(matches!(
        m.resize("s", 80 * BSU).await,
        Err(MapperError::ReadOnly { .. })
    ));
    m.close("v").await.unwrap();
    assert_eq!(m.info("v").await.unwrap().size, 40 * BSU, "persisted");
    assert_eq!(&read(&m, "v", 39 * BSU, 3).await, b"end");
}

#[tokio::test]
async fn discard_zeroes_whole_blocks_and_reports_partial_ones() {
    let (b, m) = setup();
    m.create("v", 4 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, &vec![3u8; 4 * BSU as usize]).await;
    let out = m.discard("v", BSU / 2, 2 * BSU).await.unwrap();
    assert_eq!(out.zeroed_blocks, 1);
    let parts: Vec<(u64, u64)> = out
        .zero_write
        .iter()
        .map(|e| (e.volume_offset, e.length))
        .collect();
    assert_eq!(parts, [(BSU / 2, BSU / 2), (2 * BSU, BSU / 2)]);
    assert_eq!(m.block_state("v", 1).await.unwrap(), BlockState::Zero);
    assert_eq!(
        b.inner.bytes_stored("ob."),
        3 * BSU,
        "the owned object went"
    );
    // Discarding a ZERO block is a no-op; a snapshot keeps shared objects alive.
    let out = m.discard("v", BSU, BSU).await.unwrap();
    assert_eq!(out, DiscardOutcome::default());
    m.snapshot("v", "s").await.unwrap();
    m.discard("v", 0, 4 * BSU).await.unwrap();
    assert_eq!(b.inner.bytes_stored("ob."), 3 * BSU);
    assert_eq!(read(&m, "s", 0, 4).await, [3; 4]);
    assert_eq!(read(&m, "v", 0, 4).await, [0; 4]);
}

#[tokio::test]
async fn a_second_writer_is_refused_naming_the_holder_and_fencing_works() {
    let b: Arc<dyn Blocker> = Arc::new(MemoryBlocker::new());
    let a = Mapper::new(b.clone(), LockOwner::new("node-a").unwrap());
    let c = Mapper::new(b.clone(), LockOwner::new("node-c").unwrap());
    a.create("v", 4 * BSU, opts()).await.unwrap();
    a.open("v").await.unwrap();
    write(&a, "v", 0, b"from a").await;
    match c.open("v").await {
        Err(MapperError::Locked { holder, volume }) => {
            assert_eq!((holder.as_str(), volume.as_str()), ("node-a", "v"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.map_write("v", 0, 1).await,
        Err(MapperError::Locked { .. })
    ));
    assert!(matches!(
        c.delete("v").await,
        Err(MapperError::Locked { .. })
    ));
    assert!(matches!(
        c.resize("v", 8 * BSU).await,
        Err(MapperError::Locked { .. })
    ));
    // Reads from another node go to storage, not to a cache.
    assert_eq!(&read(&c, "v", 0, 6).await, b"from a");
    assert_eq!(
        c.lock_info("v").await.unwrap().holder.unwrap().as_str(),
        "node-a"
    );

    let before = c.break_lock("v").await.unwrap();
    assert_eq!(before.holder.unwrap().as_str(), "node-a");
    c.open("v").await.unwrap();
    write(&c, "v", BSU, b"from c").await;
    // The deposed writer's next map change is refused by the backend.
    assert!(matches!(
        a.map_write("v", 2 * BSU, 1).await,
        Err(MapperError::Fenced { .. })
    ));
    assert!(matches!(
        a.map_write("v", 0, 1).await,
        Err(MapperError::Fenced { .. })
    ));
    a.close("v").await.unwrap();
    assert_eq!(&read(&c, "v", BSU, 6).await, b"from c");
    c.verify("v").await.unwrap();
}

#[tokio::test]
async fn delete_removes_the_map_and_names_can_be_reused() {
    let (_, m) = setup();
    m.create("v", 2 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, b"old").await;
    m.snapshot("v", "s").await.unwrap();
    m.delete("v").await.unwrap();
    assert!(matches!(
        m.info("v").await,
        Err(MapperError::NotFound { .. })
    ));
    assert!(matches!(
        m.delete("v").await,
        Err(MapperError::NotFound { .. })
    ));
    assert_eq!(&read(&m, "s", 0, 3).await, b"old", "the snapshot survives");
    let again = m.create("v", 2 * BSU, opts()).await.unwrap();
    assert_eq!(
        read(&m, "v", 0, 3).await,
        [0; 3],
        "a new volume under an old name is empty"
    );
    assert_eq!(again.epoch, 1);
    m.delete("s").await.unwrap();
    let names: Vec<String> = m
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["v"]);
}

#[tokio::test]
async fn corruption_is_detected_not_used() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let info = m.create("v", 2 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, b"x").await;
    m.close("v").await.unwrap();
    let page = crate::map_format::page_object(crate::map_format::PageOwner::new(info.uuid), 0);
    assert!(mem.corrupt(&page, 60));
    for r in [
        m.open("v").await.map(|_| ()),
        m.verify("v").await.map(|_| ()),
    ] {
        match r {
            Err(MapperError::Corrupt(c)) => assert_eq!(c.object, page.to_string()),
            other => panic!("{other:?}"),
        }
    }
    assert!(m.map_read("v", 0, 1).await.is_err());
    let header =
        crate::map_format::header_object(&crate::map_format::VolumeName::new("v").unwrap());
    assert!(mem.corrupt(&header, 20));
    assert!(matches!(m.info("v").await, Err(MapperError::Corrupt(_))));
    assert!(matches!(m.list().await, Err(MapperError::Corrupt(_))));
    // GC refuses to run on partial knowledge.
    assert!(matches!(
        m.gc(GcOptions::default()).await,
        Err(MapperError::Corrupt(_))
    ));
    // A corrupt map can still be deleted.
    m.delete("v").await.unwrap();
}

#[tokio::test]
async fn a_terabyte_map_stays_small() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let tib = 1u64 << 40;
    m.create("big", tib, CreateOptions::default())
        .await
        .unwrap();
    // One block written in every page: every page object exists.
    let per_page = 4096 * (4u64 << 20);
    for p in 0..64 {
        m.map_write("big", p * per_page, 4096).await.unwrap();
    }
    let map_bytes = mem.bytes_stored("pg.") + mem.bytes_stored("vol.");
    assert!(map_bytes <= 2 * 1024 * 1024 + 64 * 1024, "{map_bytes}");
    let snap = std::time::Instant::now();
    m.snapshot("big", "big-snap").await.unwrap();
    m.clone_volume("big-snap", "big-clone", None).await.unwrap();
    assert!(snap.elapsed() < std::time::Duration::from_secs(5));
    let r = m.verify("big-clone").await.unwrap();
    assert_eq!((r.blocks, r.shared, r.zero), (262_144, 64, 262_144 - 64));
}

#[tokio::test]
async fn import_and_dedup_store_identical_blocks_once() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let mut image = vec![0u8; 8 * BSU as usize];
    for (i, chunk) in image.chunks_mut(BSU as usize).enumerate() {
        if i % 3 != 2 {
            chunk[..100].fill(i as u8 % 2 + 1);
        }
    }
    m.create("a", 8 * BSU, opts()).await.unwrap();
    let r = m.import("a", 0, &image).await.unwrap();
    assert_eq!((r.blocks, r.zero, r.written), (8, 2, 2), "{r:?}");
    let stored = mem.bytes_stored("ct.");
    m.create("b", 8 * BSU, opts()).await.unwrap();
    let r = m.import("b", 0, &image).await.unwrap();
    assert_eq!((r.written, r.reused), (0, 6));
    assert_eq!(
        mem.bytes_stored("ct."),
        stored,
        "a second import stores nothing new"
    );
    assert_eq!(read(&m, "b", 0, image.len()).await, image);
    assert!(matches!(
        m.import("b", 1, &image[..BSU as usize]).await,
        Err(MapperError::Unaligned { .. })
    ));
    // Writing a content block copies it to an owned object, leaving the content intact.
    write(&m, "b", 5, b"own").await;
    assert_eq!(m.block_state("b", 0).await.unwrap(), BlockState::Owned);
    assert_eq!(read(&m, "a", 0, 10).await, image[..10]);

    // Dedup of a snapshot of plain writes.
    m.create("w", 8 * BSU, opts()).await.unwrap();
    write(&m, "w", 0, &image).await;
    m.snapshot("w", "ws").await.unwrap();
    assert!(matches!(
        m.dedup("w").await,
        Err(MapperError::NotASnapshot { .. })
    ));
    let d = m.dedup("ws").await.unwrap();
    assert_eq!((d.converted, d.zero, d.written), (8, 2, 0), "{d:?}");
    assert_eq!(read(&m, "ws", 0, image.len()).await, image);
    let v = m.verify("ws").await.unwrap();
    assert_eq!((v.content, v.zero), (6, 2));
    assert_eq!(m.dedup("ws").await.unwrap().converted, 0, "idempotent");
}

#[tokio::test]
async fn gc_reclaims_only_what_no_map_refers_to() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let now = GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: false,
    };
    m.create("v", 4 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, &vec![5u8; 4 * BSU as usize]).await;
    m.snapshot("v", "s").await.unwrap();
    write(&m, "v", 0, &vec![6u8; 2 * BSU as usize]).await;
    let r = m.gc(now).await.unwrap();
    assert_eq!(r.deleted_objects, 0, "{r:?}");
    m.delete("s").await.unwrap();
    let dry = m
        .gc(GcOptions {
            dry_run: true,
            ..now
        })
        .await
        .unwrap();
    assert_eq!(dry.deleted_objects, 2, "{dry:?}");
    let r = m.gc(now).await.unwrap();
    assert_eq!(
        r.deleted_objects, 2,
        "the two blocks only the snapshot held"
    );
    assert_eq!(r.deleted_pages, 1, "the snapshot's page");
    assert_eq!(r.deleted_bytes, dry.deleted_bytes);
    assert!(r.deleted_bytes > 2 * BSU && r.deleted_bytes < 2 * BSU + 4096);
    assert_eq!(
        read(&m, "v", 0, 4 * BSU as usize).await[..],
        {
            let mut v = vec![6u8; 2 * BSU as usize];
            v.extend(vec![5u8; 2 * BSU as usize]);
            v
        }[..]
    );
    m.delete("v").await.unwrap();
    let r = m.gc(now).await.unwrap();
    assert_eq!(r.deleted_objects, 4);
    assert!(r.deleted_pages >= 1);
    assert_eq!(mem.bytes_stored("ob."), 0);
    assert_eq!(mem.bytes_stored("pg."), 0);
    // A grace period spares young garbage.
    m.create("y", BSU, opts()).await.unwrap();
    write(&m, "y", 0, b"y").await;
    m.delete("y").await.unwrap();
    let r = m.gc(GcOptions::default()).await.unwrap();
    assert_eq!((r.deleted_objects, r.kept_recent), (0, 2));
}

#[tokio::test]
async fn reopen_reads_back_everything() {
    let mem: Arc<dyn Blocker> = Arc::new(MemoryBlocker::new());
    {
        let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
        m.create("v", 4 * BSU, opts()).await.unwrap();
        write(&m, "v", 7, b"persist").await;
        m.snapshot("v", "s").await.unwrap();
        write(&m, "v", 7, b"PERSIST").await;
        // Dropped without close: the lock stays, and the same node gets it back.
    }
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    assert_eq!(&read(&m, "v", 7, 7).await, b"PERSIST");
    assert_eq!(&read(&m, "s", 7, 7).await, b"persist");
    m.open("v").await.unwrap();
    write(&m, "v", 0, b"!").await;
    m.verify("v").await.unwrap();
    m.close_all().await.unwrap();
    assert!(m.open_volumes().is_empty());
    assert!(m.lock_info("v").await.unwrap().holder.is_none());
}

/// The xseg peer drives the mapper from a multi-threaded runtime: every future must be Send.
#[allow(dead_code, clippy::let_underscore_future)]
fn mapper_futures_are_send(m: &Mapper) {
    fn send<T: Send>(_: T) {}
    send(m.create("v", 1, CreateOptions::default()));
    send(m.open("v"));
    send(m.close("v"));
    send(m.close_all());
    send(m.info("v"));
    send(m.list());
    send(m.resize("v", 1));
    send(m.delete("v"));
    send(m.snapshot("v", "s"));
    send(m.clone_volume("s", "c", None));
    send(m.map_read("v", 0, 1));
    send(m.map_write("v", 0, 1));
    send(m.discard("v", 0, 1));
    send(m.lock_info("v"));
    send(m.break_lock("v"));
    send(m.verify("v"));
    send(m.block_state("v", 0));
    send(m.dedup("s"));
    send(m.import("v", 0, &[]));
    send(m.gc(GcOptions::default()));
    fn shared<T: Send + Sync>() {}
    shared::<Mapper>();
}

/// MAPW then a write of each extent through `via`: what vlmc does, with `via` playing the
/// blocker peer (another process, with its own file blocker and descriptor cache).
async fn write_via(m: &Mapper, via: &dyn Blocker, vol: &str, offset: u64, data: &[u8]) {
    for e in m.map_write(vol, offset, data.len() as u64).await.unwrap() {
        let at = (e.volume_offset - offset) as usize;
        let obj = e.object().expect("MAPW never returns ZERO");
        via.write(obj, e.object_offset, &data[at..at + e.length as usize])
            .await
            .unwrap();
    }
}

/// A read of `[offset, offset + len)` through `via`.
async fn read_via(m: &Mapper, via: &dyn Blocker, vol: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0xeeu8; len];
    for e in m.map_read(vol, offset, len as u64).await.unwrap() {
        let at = (e.volume_offset - offset) as usize;
        let buf = &mut out[at..at + e.length as usize];
        match e.object() {
            None => buf.fill(0),
            Some(o) => via.read(o, e.object_offset, buf).await.unwrap(),
        }
    }
    out
}

/// Regression (crash test, seeds 7875364916446958601, 1858425474528266864, 18019545492771167138):
/// the mapper and the blocker peer each open the object directory with their own file blocker.
/// A discard (or an import over an owned block) used to delete the owned object through the
/// mapper's blocker while the blocker peer kept a cached descriptor of it; the block's next
/// write reuses the name within the epoch, so it went through that descriptor into the deleted
/// file: invisible after the blocker restarted, and meanwhile its reads showed the discarded
/// data where zeros belong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_block_rewritten_through_another_processs_cached_descriptor_survives() {
    let dir = tempfile::tempdir().unwrap();
    let mapper_side: Arc<dyn Blocker> =
        Arc::new(crate::blocker::FileBlocker::open(dir.path()).unwrap());
    let blocker_peer = crate::blocker::FileBlocker::open(dir.path()).unwrap();
    let m = Mapper::new(mapper_side, LockOwner::new("node-a").unwrap());
    m.create("v", 4 * BSU, opts()).await.unwrap();
    let bs = BSU as usize;

    // Block 0: written whole, discarded, then written partially.
    write_via(&m, &blocker_peer, "v", 0, &vec![0xaa; bs]).await;
    assert_eq!(m.discard("v", 0, BSU).await.unwrap().zeroed_blocks, 1);
    write_via(&m, &blocker_peer, "v", 100, &[0xbb; 100]).await;
    // Block 1: written, replaced by imported content, then written partially (copy-on-write
    // of the content object into the owned name the import had freed).
    write_via(&m, &blocker_peer, "v", BSU, &vec![0xcc; bs]).await;
    m.import("v", BSU, &vec![0xdd; bs]).await.unwrap();
    write_via(&m, &blocker_peer, "v", BSU + 10, &[0xee; 10]).await;
    blocker_peer.flush().await.unwrap();

    let mut want = vec![0u8; 2 * bs];
    want[100..200].fill(0xbb);
    want[bs..2 * bs].fill(0xdd);
    want[bs + 10..bs + 20].fill(0xee);
    let mut wrong = Vec::new();
    let mut check = |got: Vec<u8>, who: &str| {
        for (block, (g, w)) in got.chunks(bs).zip(want.chunks(bs)).enumerate() {
            if let Some(i) = g.iter().zip(w).position(|(g, w)| g != w) {
                wrong.push(format!(
                    "{who}: block {block} byte {i}: read {:#04x}, expected {:#04x}",
                    g[i], w[i]
                ));
            }
        }
    };
    check(
        read_via(&m, &blocker_peer, "v", 0, 2 * bs).await,
        "the blocker peer, through its cached descriptors",
    );
    // A restarted blocker peer opens the files afresh.
    let restarted = crate::blocker::FileBlocker::open(dir.path()).unwrap();
    check(
        read_via(&m, &restarted, "v", 0, 2 * bs).await,
        "a restarted blocker peer",
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test]
async fn clones_of_a_snapshot_inherit_its_pages_and_gc_keeps_them() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let now = GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: false,
    };
    // 64 blocks over 4 pages of 16 entries, one block written per page.
    m.create("gold", 64 * BSU, opts()).await.unwrap();
    for p in 0..4u64 {
        write(&m, "gold", p * 16 * BSU, &[p as u8 + 1; 4096]).await;
    }
    m.snapshot("gold", "gold-s").await.unwrap();
    let pages = || mem.bytes_stored("pg.");
    let before = pages();

    // A clone of the snapshot writes its header and no page at all.
    m.clone_volume("gold-s", "vm1", None).await.unwrap();
    assert_eq!(pages(), before, "the clone copied pages");
    let header = MapHeader::decode(
        &mem.read_map(&header_object(&VolumeName::new("vm1").unwrap()))
            .await
            .unwrap()
            .unwrap()
            .data,
    )
    .unwrap();
    assert_eq!(header.inherited.len(), 4, "{:?}", header.inherited);
    for p in 0..4u64 {
        assert_eq!(
            read(&m, "vm1", p * 16 * BSU, 4096).await,
            vec![p as u8 + 1; 4096]
        );
    }
    // A clone of the clone's snapshot inherits from the original snapshot, not a chain.
    m.snapshot("vm1", "vm1-s").await.unwrap();
    m.clone_volume("vm1-s", "vm2", None).await.unwrap();
    assert_eq!(
        pages(),
        before,
        "snapshot and clone of inherited pages copied them"
    );

    // A write gives the clone its own page; the snapshot and the other clone are unchanged.
    write(&m, "vm1", 16 * BSU, &[9u8; 4096]).await;
    assert!(pages() > before, "the written page is the clone's own now");
    assert_eq!(read(&m, "vm1", 16 * BSU, 4096).await, vec![9u8; 4096]);
    assert_eq!(read(&m, "vm2", 16 * BSU, 4096).await, vec![2u8; 4096]);
    assert_eq!(read(&m, "gold-s", 16 * BSU, 4096).await, vec![2u8; 4096]);
    m.verify("vm1").await.unwrap();
    m.verify("vm2").await.unwrap();

    // The snapshots and the source go away: GC keeps the pages the clones still read.
    m.delete("vm1-s").await.unwrap();
    m.delete("gold-s").await.unwrap();
    m.delete("gold").await.unwrap();
    m.gc(now).await.unwrap();
    for p in 0..4u64 {
        assert_eq!(
            read(&m, "vm2", p * 16 * BSU, 4096).await,
            vec![p as u8 + 1; 4096]
        );
    }
    let reopened = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    reopened.verify("vm2").await.unwrap();
    assert_eq!(
        read(&reopened, "vm2", 48 * BSU, 4096).await,
        vec![4u8; 4096]
    );

    // Once no map inherits them, they are garbage.
    m.delete("vm2").await.unwrap();
    m.delete("vm1").await.unwrap();
    m.gc(now).await.unwrap();
    assert_eq!(pages(), 0);
}

#[tokio::test]
async fn a_missing_inherited_page_is_corruption_not_zeros() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    m.create("v", 16 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, &[1u8; 4096]).await;
    m.snapshot("v", "s").await.unwrap();
    m.clone_volume("s", "c", None).await.unwrap();
    let s = MapHeader::decode(
        &mem.read_map(&header_object(&VolumeName::new("s").unwrap()))
            .await
            .unwrap()
            .unwrap()
            .data,
    )
    .unwrap();
    // The snapshot shares the volume's page, which the clone inherits in turn.
    assert_eq!(s.inherited.len(), 1, "{:?}", s.inherited);
    mem.delete(&crate::map_format::page_object(s.inherited[0].1, 0))
        .await
        .unwrap();
    let fresh = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    let e = fresh.map_read("c", 0, 4096).await.unwrap_err();
    assert!(matches!(e, MapperError::Corrupt(_)), "{e:?}");
}

#[tokio::test]
async fn dedup_of_a_snapshot_never_changes_pages_a_clone_inherits() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    let now = GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: false,
    };
    m.create("v", 16 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, &vec![3u8; BSU as usize]).await;
    m.snapshot("v", "s").await.unwrap();
    m.clone_volume("s", "c", None).await.unwrap();
    // The clone is open here with its map cached (it names v's owned object for block 0).
    m.open("c").await.unwrap();
    assert_eq!(read(&m, "c", 0, 4096).await, vec![3u8; 4096]);
    let before = m.info("s").await.unwrap().uuid;
    // v moves on, so only the snapshot and the clone still refer to block 0's object.
    write(&m, "v", 0, &vec![4u8; BSU as usize]).await;
    let r = m.dedup("s").await.unwrap();
    assert_eq!(r.converted, 1, "{r:?}");
    assert_ne!(
        m.info("s").await.unwrap().uuid,
        before,
        "dedup rebased the snapshot"
    );
    m.gc(now).await.unwrap();
    // The clone's cached page and its stored (inherited) page both still name a live object.
    assert_eq!(read(&m, "c", 0, 4096).await, vec![3u8; 4096]);
    m.verify("c").await.unwrap();
    assert_eq!(read(&m, "s", 0, 4096).await, vec![3u8; 4096]);
    m.verify("s").await.unwrap();
}

/// The block states of `vol` as storage has them, through a mapper with nothing cached (the
/// same node identity, so that it may take the lock the first one holds).
async fn stored_states(b: &Arc<Counting>, vol: &str, blocks: u64) -> Vec<BlockState> {
    let fresh = Mapper::new(b.clone(), LockOwner::new("node-a").unwrap());
    let mut states = Vec::new();
    for block in 0..blocks {
        states.push(fresh.block_state(vol, block).await.unwrap());
    }
    states
}

#[tokio::test]
async fn a_discard_whose_map_write_landed_despite_an_error_is_not_undone_by_the_cache() {
    let (b, m) = setup();
    m.create("v", 2 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, b"first").await;
    b.lose_map_replies.store(1, Ordering::SeqCst);
    assert!(m.discard("v", 0, BSU).await.is_err());
    assert_eq!(stored_states(&b, "v", 1).await, [BlockState::Zero]);
    // The block is ZERO in storage: writing it again must persist a new OWNED entry, not take
    // a cached OWNED entry's word for it (that write would be lost at the next restart).
    write(&m, "v", 0, b"second").await;
    assert_eq!(stored_states(&b, "v", 1).await, [BlockState::Owned]);
    m.verify("v").await.unwrap();
    m.close("v").await.unwrap();
    let fresh = Mapper::new(b.clone(), LockOwner::new("node-a").unwrap());
    assert_eq!(&read(&fresh, "v", 0, 6).await, b"second");
}

#[tokio::test]
async fn a_map_write_that_landed_despite_an_error_leaves_the_volume_writable() {
    let (b, m) = setup();
    m.create("v", 2 * BSU, opts()).await.unwrap();
    m.open("v").await.unwrap();
    b.lose_map_replies.store(1, Ordering::SeqCst);
    assert!(m.map_write("v", 0, 10).await.is_err());
    // The cache held the page at its old version: a compare-and-swap from it would fail
    // forever with Conflict. Read back, the next write goes through.
    write(&m, "v", 0, b"after").await;
    write(&m, "v", BSU, b"other page entry").await;
    m.verify("v").await.unwrap();
    assert_eq!(
        stored_states(&b, "v", 2).await,
        [BlockState::Owned, BlockState::Owned]
    );
    assert_eq!(&read(&m, "v", 0, 5).await, b"after");
}

#[tokio::test]
async fn a_resize_or_delete_that_landed_despite_an_error_is_what_the_mapper_reports() {
    let (b, m) = setup();
    m.create("v", 2 * BSU, opts()).await.unwrap();
    m.open("v").await.unwrap();
    b.lose_map_replies.store(1, Ordering::SeqCst);
    assert!(m.resize("v", 4 * BSU).await.is_err());
    assert_eq!(m.info("v").await.unwrap().size, 4 * BSU);
    write(&m, "v", 3 * BSU, b"end").await;
    m.verify("v").await.unwrap();

    b.lose_map_replies.store(1, Ordering::SeqCst);
    assert!(m.delete("v").await.is_err());
    assert!(matches!(
        m.info("v").await,
        Err(MapperError::NotFound { .. })
    ));
    assert!(m.open_volumes().is_empty(), "{:?}", m.open_volumes());
    assert!(m.lock_info("v").await.unwrap().holder.is_none());
    m.create("v", BSU, opts()).await.unwrap();
    assert_eq!(read(&m, "v", 0, 3).await, [0; 3]);
}

#[tokio::test]
async fn verify_answers_corrupt_when_the_cache_differs_from_storage() {
    let (_, m) = setup();
    m.create("v", 2 * BSU, opts()).await.unwrap();
    write(&m, "v", 0, b"data").await;
    let name = VolumeName::new("v").unwrap();
    {
        // A mapper bug, simulated: the cache forgets block 0.
        let vol = m.lookup(&name).unwrap();
        let mut map = vol.map.write().unwrap();
        map.pages[0].page.set(0, crate::map_format::MapEntry::Zero);
    }
    match m.verify("v").await {
        Err(MapperError::Corrupt(c)) => {
            assert_eq!(
                c.object,
                page_object(m.lookup(&name).unwrap().map().header.own_pages(), 0).to_string()
            );
            assert!(c.to_string().contains("differs from storage"), "{c}");
        }
        other => panic!("{other:?}"),
    }
    // Storage is the truth: the cache is read back and the volume answers from it again.
    m.verify("v").await.unwrap();
    assert_eq!(&read(&m, "v", 0, 4).await, b"data");
}

// Snapshots of live volumes share the volume's page objects (page generations).

fn no_grace() -> GcOptions {
    GcOptions {
        grace: std::time::Duration::ZERO,
        dry_run: false,
    }
}

async fn stored_header(b: &dyn Blocker, name: &str) -> MapHeader {
    let raw = b
        .read_map(&header_object(&VolumeName::new(name).unwrap()))
        .await
        .unwrap()
        .expect("header exists");
    MapHeader::decode(&raw.data).unwrap()
}

async fn names(b: &dyn Blocker, prefix: &str) -> std::collections::BTreeSet<String> {
    b.list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name.to_string())
        .collect()
}

/// The page objects some map reads: its own pages at its current generation that exist, and
/// for every other page the one its inherited table names.
async fn referenced_pages(b: &dyn Blocker) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for h in names(b, crate::map_format::HEADER_PREFIX).await {
        let h = stored_header(b, h.strip_prefix("vol.").unwrap()).await;
        for p in 0..h.page_count() {
            let own = page_object(h.own_pages(), p);
            if b.read_map(&own).await.unwrap().is_some() {
                out.insert(own.to_string());
            } else if let Ok(i) = h.inherited.binary_search_by_key(&p, |&(q, _)| q) {
                out.insert(page_object(h.inherited[i].1, p).to_string());
            }
        }
    }
    out
}

/// 64 blocks over 4 pages of 16 entries, one block written per page (block 16p, byte p+1).
async fn four_pages(m: &Mapper, vol: &str) {
    m.create(vol, 64 * BSU, opts()).await.unwrap();
    for p in 0..4u64 {
        write(m, vol, p * 16 * BSU, &[p as u8 + 1; 4096]).await;
    }
}

async fn check_four_pages(m: &Mapper, vol: &str, expect: [u8; 4]) {
    for (p, &byte) in expect.iter().enumerate() {
        assert_eq!(
            read(m, vol, p as u64 * 16 * BSU, 4096).await,
            vec![byte; 4096],
            "{vol} page {p}"
        );
    }
    m.verify(vol).await.unwrap();
}

#[tokio::test]
async fn a_snapshot_of_a_live_volume_writes_headers_only_and_shares_the_pages() {
    for pages in [4u64, 64] {
        let (b, m) = setup();
        m.create("v", pages * 16 * BSU, opts()).await.unwrap();
        for p in 0..pages {
            write(&m, "v", p * 16 * BSU, &[p as u8 + 1; 4096]).await;
        }
        let pages_before = names(b.as_ref(), "pg.").await;
        assert_eq!(pages_before.len() as u64, pages);
        let writes = b.map_writes.load(Ordering::SeqCst);
        let data = b.writes.load(Ordering::SeqCst) + b.copies.load(Ordering::SeqCst);
        m.snapshot("v", "s").await.unwrap();
        // The volume's header (new epoch and page generation), then the snapshot's.
        assert_eq!(
            b.map_writes.load(Ordering::SeqCst) - writes,
            2,
            "{pages} pages"
        );
        assert_eq!(
            b.writes.load(Ordering::SeqCst) + b.copies.load(Ordering::SeqCst),
            data
        );
        assert_eq!(
            names(b.as_ref(), "pg.").await,
            pages_before,
            "a page was written"
        );
        let v = stored_header(b.as_ref(), "v").await;
        let snap = stored_header(b.as_ref(), "s").await;
        assert_eq!(v.page_generation, 1);
        assert!(snap.read_only() && snap.no_own_pages());
        assert_eq!(snap.inherited.len() as u64, pages);
        assert_eq!(
            snap.inherited, v.inherited,
            "both read the same page objects"
        );
        assert!(
            v.inherited
                .iter()
                .all(|&(_, o)| o == PageOwner::new(v.uuid)),
            "the volume inherits its own pages of generation 0: {:?}",
            v.inherited
        );
        // Every block the snapshot shares is copied on the volume's next write of it.
        for p in 0..pages {
            assert_eq!(
                m.block_state("v", p * 16).await.unwrap(),
                BlockState::Shared
            );
        }
        write(&m, "v", 0, &[0xee; 100]).await;
        write(&m, "v", 16 * BSU + 8192, &[0xdd; 4096]).await;
        assert_eq!(m.block_state("v", 0).await.unwrap(), BlockState::Owned);
        let mut expect_v = vec![1u8; 4096];
        expect_v[..100].fill(0xee);
        assert_eq!(read(&m, "v", 0, 4096).await, expect_v);
        assert_eq!(read(&m, "v", 16 * BSU, 4096).await, vec![2u8; 4096]);
        assert_eq!(read(&m, "v", 16 * BSU + 8192, 4096).await, vec![0xdd; 4096]);
        assert_eq!(read(&m, "s", 0, 4096).await, vec![1u8; 4096]);
        assert_eq!(read(&m, "s", 16 * BSU + 8192, 4096).await, vec![0u8; 4096]);
        // The volume wrote pages 0 and 1 anew, at its new generation; the frozen ones stay.
        let after = names(b.as_ref(), "pg.").await;
        assert!(after.is_superset(&pages_before));
        assert_eq!(after.len() as u64, pages + 2);
        m.verify("v").await.unwrap();
        m.verify("s").await.unwrap();
    }
}

#[tokio::test]
async fn a_clone_of_a_live_volumes_snapshot_reads_no_page_and_is_independent() {
    let (b, m) = setup();
    four_pages(&m, "v").await;
    m.snapshot("v", "s").await.unwrap();
    let (reads, writes) = (
        b.map_reads.load(Ordering::SeqCst),
        b.map_writes.load(Ordering::SeqCst),
    );
    m.clone_volume("s", "c", None).await.unwrap();
    assert_eq!(
        b.map_writes.load(Ordering::SeqCst) - writes,
        1,
        "one header"
    );
    // Headers only (the snapshot's, and the clone's name checked free): no page is read.
    let header_reads = b.map_reads.load(Ordering::SeqCst) - reads;
    assert!(header_reads <= 4, "{header_reads} map reads");
    check_four_pages(&m, "c", [1, 2, 3, 4]).await;
    write(&m, "c", 0, &[9; 4096]).await;
    write(&m, "v", 16 * BSU, &[8; 4096]).await;
    check_four_pages(&m, "c", [9, 2, 3, 4]).await;
    check_four_pages(&m, "v", [1, 8, 3, 4]).await;
    check_four_pages(&m, "s", [1, 2, 3, 4]).await;
    // A clone of the live volume itself, and a snapshot of that clone: headers only too.
    let before = names(b.as_ref(), "pg.").await;
    m.clone_volume("v", "c2", None).await.unwrap();
    m.snapshot("c2", "c2-s").await.unwrap();
    assert_eq!(names(b.as_ref(), "pg.").await, before);
    check_four_pages(&m, "c2", [1, 8, 3, 4]).await;
    check_four_pages(&m, "c2-s", [1, 8, 3, 4]).await;
    write(&m, "c2", 16 * BSU, &[7; 4096]).await;
    check_four_pages(&m, "c2-s", [1, 8, 3, 4]).await;
    check_four_pages(&m, "v", [1, 8, 3, 4]).await;
    check_four_pages(&m, "c2", [1, 7, 3, 4]).await;
}

#[tokio::test]
async fn reopened_maps_read_the_same_after_snapshots_of_a_live_volume() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    four_pages(&m, "v").await;
    m.snapshot("v", "s1").await.unwrap();
    write(&m, "v", 0, &[5; 4096]).await;
    m.close("v").await.unwrap();

    // A new mapper over the same storage: the volume at generation 1, own page 0 and pages
    // 1-3 inherited from its generation 0, which the snapshot reads too.
    let m2 = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    check_four_pages(&m2, "v", [5, 2, 3, 4]).await;
    check_four_pages(&m2, "s1", [1, 2, 3, 4]).await;
    write(&m2, "v", 32 * BSU, &[6; 4096]).await;
    m2.snapshot("v", "s2").await.unwrap();
    let v = stored_header(mem.as_ref(), "v").await;
    let s2 = stored_header(mem.as_ref(), "s2").await;
    assert_eq!(v.page_generation, 2);
    let gens: Vec<(u32, u64)> = s2
        .inherited
        .iter()
        .map(|&(p, o)| {
            assert_eq!(o.uuid, v.uuid);
            (p, o.generation)
        })
        .collect();
    assert_eq!(gens, [(0, 1), (1, 0), (2, 1), (3, 0)]);
    write(&m2, "v", 48 * BSU, &[7; 4096]).await;
    m2.close("v").await.unwrap();

    let m3 = Mapper::new(mem.clone(), LockOwner::new("n3").unwrap());
    check_four_pages(&m3, "v", [5, 2, 6, 7]).await;
    check_four_pages(&m3, "s2", [5, 2, 6, 4]).await;
    check_four_pages(&m3, "s1", [1, 2, 3, 4]).await;
    m3.gc(no_grace()).await.unwrap();
    assert_eq!(
        names(mem.as_ref(), "pg.").await,
        referenced_pages(mem.as_ref()).await
    );
    check_four_pages(&m3, "v", [5, 2, 6, 7]).await;
    check_four_pages(&m3, "s2", [5, 2, 6, 4]).await;
    check_four_pages(&m3, "s1", [1, 2, 3, 4]).await;
}

/// Every order of deleting a live volume, its snapshot, a clone of the snapshot and a snapshot
/// of the clone: after each delete, GC keeps exactly the page objects some header refers to
/// (and every survivor reads what it did), and after the last nothing is left.
#[tokio::test]
async fn gc_after_live_snapshots_keeps_exactly_what_a_header_refers_to_in_any_delete_order() {
    let maps = ["v", "s", "c", "cs"];
    let expect = |name: &str| match name {
        "v" => [1, 9, 3, 4],
        "s" => [1, 2, 3, 4],
        "c" => [1, 2, 8, 4],
        "cs" => [1, 2, 8, 4],
        _ => unreachable!(),
    };
    let mut orders: Vec<Vec<&str>> = vec![vec![]];
    for _ in 0..maps.len() {
        let mut longer = Vec::new();
        for o in &orders {
            for n in maps.iter().filter(|n| !o.contains(n)) {
                let mut o = o.clone();
                o.push(n);
                longer.push(o);
            }
        }
        orders = longer;
    }
    assert_eq!(orders.len(), 24);
    for order in orders {
        let mem = Arc::new(MemoryBlocker::new());
        let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
        four_pages(&m, "v").await;
        m.snapshot("v", "s").await.unwrap();
        m.clone_volume("s", "c", None).await.unwrap();
        write(&m, "v", 16 * BSU, &[9; 4096]).await;
        write(&m, "c", 32 * BSU, &[8; 4096]).await;
        m.snapshot("c", "cs").await.unwrap();
        let mut left: Vec<&str> = maps.to_vec();
        for gone in &order {
            m.delete(gone).await.unwrap();
            left.retain(|n| n != gone);
            m.gc(no_grace()).await.unwrap();
            assert_eq!(
                names(mem.as_ref(), "pg.").await,
                referenced_pages(mem.as_ref()).await,
                "order {order:?}, after deleting {gone}"
            );
            let fresh = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
            for name in &left {
                check_four_pages(&fresh, name, expect(name)).await;
            }
            fresh.close_all().await.unwrap();
        }
        assert!(names(mem.as_ref(), "pg.").await.is_empty(), "{order:?}");
        assert!(names(mem.as_ref(), "ob.").await.is_empty(), "{order:?}");
    }
}

#[tokio::test]
async fn a_page_the_volume_rewrote_is_freed_once_no_snapshot_shares_it() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    four_pages(&m, "v").await;
    m.snapshot("v", "s").await.unwrap();
    write(&m, "v", 0, &[9; 4096]).await;
    let frozen0 = page_object(PageOwner::new(m.info("v").await.unwrap().uuid), 0).to_string();
    m.gc(no_grace()).await.unwrap();
    assert!(
        names(mem.as_ref(), "pg.").await.contains(&frozen0),
        "the snapshot reads it"
    );
    m.delete("s").await.unwrap();
    m.gc(no_grace()).await.unwrap();
    let left = names(mem.as_ref(), "pg.").await;
    assert_eq!(left, referenced_pages(mem.as_ref()).await);
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(!left.contains(&frozen0), "{left:?}");
    check_four_pages(&m, "v", [9, 2, 3, 4]).await;
    let fresh = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    m.close_all().await.unwrap();
    check_four_pages(&fresh, "v", [9, 2, 3, 4]).await;
    // The next header the volume writes drops the page it has its own copy of.
    fresh.resize("v", 128 * BSU).await.unwrap();
    let v = stored_header(mem.as_ref(), "v").await;
    assert_eq!(
        v.inherited.iter().map(|&(p, _)| p).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    check_four_pages(&fresh, "v", [9, 2, 3, 4]).await;
}

/// A crash at every storage mutation of a snapshot of a live volume: afterwards the volume
/// reads as before and stays writable, the snapshot either exists and reads the old data or
/// does not exist and can be taken again, and GC frees nothing anyone needs.
#[tokio::test]
async fn a_crash_anywhere_in_a_live_snapshot_leaves_the_old_state_or_the_new() {
    use crate::blocker::faulty::{FaultPlan, FaultyBlocker};
    for crash_after in 0..6u64 {
        let mem = Arc::new(MemoryBlocker::new());
        let m0 = Mapper::new(mem.clone(), LockOwner::new("n0").unwrap());
        four_pages(&m0, "v").await;
        m0.close("v").await.unwrap();

        let faulty = Arc::new(FaultyBlocker::new(
            mem.clone(),
            FaultPlan {
                crash_after: Some(crash_after),
                ..FaultPlan::none(crash_after)
            },
        ));
        let m1 = Mapper::new(faulty.clone(), LockOwner::new("n1").unwrap());
        let r = m1.snapshot("v", "s").await;
        // (A crash at the lock release after the snapshot is not the snapshot's failure.)
        assert!(r.is_ok() || faulty.crashed(), "{crash_after}: {r:?}");
        drop(m1);

        let m = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
        m.break_lock("v").await.unwrap();
        check_four_pages(&m, "v", [1, 2, 3, 4]).await;
        let taken = mem
            .read_map(&header_object(&VolumeName::new("s").unwrap()))
            .await
            .unwrap()
            .is_some();
        if taken {
            check_four_pages(&m, "s", [1, 2, 3, 4]).await;
        } else {
            m.snapshot("v", "s").await.unwrap();
        }
        m.gc(no_grace()).await.unwrap();
        write(&m, "v", 0, &[9; 4096]).await;
        check_four_pages(&m, "v", [9, 2, 3, 4]).await;
        check_four_pages(&m, "s", [1, 2, 3, 4]).await;
        m.gc(no_grace()).await.unwrap();
        assert_eq!(
            names(mem.as_ref(), "pg.").await,
            referenced_pages(mem.as_ref()).await
        );
        let fresh = Mapper::new(mem.clone(), LockOwner::new("n3").unwrap());
        m.close_all().await.unwrap();
        check_four_pages(&fresh, "v", [9, 2, 3, 4]).await;
        check_four_pages(&fresh, "s", [1, 2, 3, 4]).await;
    }
}

#[tokio::test]
async fn format_2_maps_on_storage_keep_reading_and_snapshot_without_copies() {
    // A volume and a snapshot as format 2 wrote them: version 2 headers and version 1 pages at
    // `pg.<uuid>.<page>`, the snapshot with copies of the volume's pages.
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    four_pages(&m, "v").await;
    m.close("v").await.unwrap();
    for name in names(mem.as_ref(), "pg.").await {
        let object = ObjectName::new(name).unwrap();
        let raw = mem.read_map(&object).await.unwrap().unwrap();
        let mut v1 = raw.data[..32].to_vec();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&raw.data[40..raw.data.len() - 4]);
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        mem.write_map(&object, &v1, Expect::Version(raw.version), None)
            .await
            .unwrap();
    }
    let object = header_object(&VolumeName::new("v").unwrap());
    let raw = mem.read_map(&object).await.unwrap().unwrap();
    let h = MapHeader::decode(&raw.data).unwrap();
    assert!(h.inherited.is_empty() && h.page_generation == 0);
    // Version 2: no page generation (8 bytes before the empty inherited count).
    let end = raw.data.len() - 4 - 4;
    let mut v2 = raw.data[..end - 8].to_vec();
    v2[8..10].copy_from_slice(&2u16.to_le_bytes());
    v2.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&v2);
    v2.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(MapHeader::decode(&v2).unwrap(), h);
    mem.write_map(&object, &v2, Expect::Version(raw.version), None)
        .await
        .unwrap();

    let m = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    check_four_pages(&m, "v", [1, 2, 3, 4]).await;
    let before = names(mem.as_ref(), "pg.").await;
    m.snapshot("v", "s").await.unwrap();
    assert_eq!(names(mem.as_ref(), "pg.").await, before);
    write(&m, "v", 0, &[9; 4096]).await;
    check_four_pages(&m, "v", [9, 2, 3, 4]).await;
    check_four_pages(&m, "s", [1, 2, 3, 4]).await;
    m.gc(no_grace()).await.unwrap();
    let fresh = Mapper::new(mem.clone(), LockOwner::new("n3").unwrap());
    m.close_all().await.unwrap();
    check_four_pages(&fresh, "v", [9, 2, 3, 4]).await;
    check_four_pages(&fresh, "s", [1, 2, 3, 4]).await;
}

#[tokio::test]
async fn a_live_snapshot_whose_volume_header_landed_despite_an_error_can_be_retried() {
    let (b, m) = setup();
    four_pages(&m, "v").await;
    m.open("v").await.unwrap();
    // The volume's new header lands, its reply is lost: no snapshot, and the cache is unsure.
    b.lose_map_replies.store(1, Ordering::SeqCst);
    assert!(m.snapshot("v", "s").await.is_err());
    assert!(matches!(
        m.info("s").await,
        Err(MapperError::NotFound { .. })
    ));
    assert_eq!(stored_header(b.as_ref(), "v").await.page_generation, 1);
    // Read back from storage, the volume shares nothing yet but copies on write all the same.
    check_four_pages(&m, "v", [1, 2, 3, 4]).await;
    write(&m, "v", 0, &[9; 4096]).await;
    m.snapshot("v", "s").await.unwrap();
    assert_eq!(stored_header(b.as_ref(), "v").await.page_generation, 2);
    write(&m, "v", 16 * BSU, &[8; 4096]).await;
    check_four_pages(&m, "v", [9, 8, 3, 4]).await;
    check_four_pages(&m, "s", [9, 2, 3, 4]).await;
    m.gc(no_grace()).await.unwrap();
    assert_eq!(
        names(b.as_ref(), "pg.").await,
        referenced_pages(b.as_ref()).await
    );
    let fresh = Mapper::new(b.clone(), LockOwner::new("node-b").unwrap());
    m.close_all().await.unwrap();
    check_four_pages(&fresh, "v", [9, 8, 3, 4]).await;
    check_four_pages(&fresh, "s", [9, 2, 3, 4]).await;
}

#[tokio::test]
async fn dedup_of_a_live_volumes_snapshot_never_changes_the_pages_the_volume_reads() {
    let mem = Arc::new(MemoryBlocker::new());
    let m = Mapper::new(mem.clone(), LockOwner::new("n").unwrap());
    m.create("v", 64 * BSU, opts()).await.unwrap();
    for p in 0..4u64 {
        write(&m, "v", p * 16 * BSU, &vec![p as u8 + 1; BSU as usize]).await;
    }
    m.snapshot("v", "s").await.unwrap();
    let pages = || async {
        let mut out = Vec::new();
        for name in names(mem.as_ref(), "pg.").await {
            let o = ObjectName::new(name.clone()).unwrap();
            out.push((name, mem.read_map(&o).await.unwrap().unwrap()));
        }
        out
    };
    let before = pages().await;
    let r = m.dedup("s").await.unwrap();
    assert_eq!(r.converted, 4, "{r:?}");
    let after = pages().await;
    // The snapshot's converted pages are new objects of a new map; the volume's are untouched.
    for (name, page) in &before {
        let now = after.iter().find(|(n, _)| n == name).expect("still there");
        assert_eq!(&now.1, page, "{name} changed");
    }
    assert_eq!(after.len(), before.len() + 4);
    check_four_pages(&m, "v", [1, 2, 3, 4]).await;
    check_four_pages(&m, "s", [1, 2, 3, 4]).await;
    for p in 0..4u64 {
        assert_eq!(
            m.block_state("v", p * 16).await.unwrap(),
            BlockState::Shared
        );
        assert_eq!(
            m.block_state("s", p * 16).await.unwrap(),
            BlockState::Content
        );
    }
    m.gc(no_grace()).await.unwrap();
    write(&m, "v", 0, &[9; 4096]).await;
    let fresh = Mapper::new(mem.clone(), LockOwner::new("n2").unwrap());
    m.close_all().await.unwrap();
    check_four_pages(&fresh, "v", [9, 2, 3, 4]).await;
    check_four_pages(&fresh, "s", [1, 2, 3, 4]).await;
}
