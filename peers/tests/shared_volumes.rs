//! The live-migration handover: one volume attached through two peer sets (two nodes) over
//! one backend (the one `ARCHIP_TEST_BACKEND` names), both opened shared. Each node reads what the other wrote (no stale cache), the
//! first write on a node takes the lock over from the other, and the map stays consistent.

mod common;

use peers::backend::{BackendConfig, Store};
use peers::client::{ClientError, VolumeClient};
use peers::peerset::{PeerConfig, PeerSet};
use peers::testing::test_config;
use xseg::Segment;

const KIB: u64 = 1024;
const BS: u64 = 64 * KIB;

/// One node: its own segment, data directory and peer set, over the shared backend.
struct Node {
    set: Option<PeerSet>,
    segment: std::path::PathBuf,
    _data_dir: tempfile::TempDir,
}

impl Node {
    fn start(backend: &BackendConfig, name: &str) -> Node {
        let data_dir = tempfile::tempdir().unwrap();
        let segment = std::path::PathBuf::from(format!(
            "/dev/shm/xseg-test-shared-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let mut config = PeerConfig::new(data_dir.path(), segment.to_str().unwrap(), name);
        config.backend = backend.clone();
        config.xseg = test_config();
        config.workers = 2;
        let seg = Segment::create(&segment, &config.xseg).expect("segment");
        let blocker = config.backend.open(Store::Objects).expect("blocker");
        let set = PeerSet::start_with(&config, seg, blocker).expect("peer set");
        Node {
            set: Some(set),
            segment,
            _data_dir: data_dir,
        }
    }

    fn client(&self) -> VolumeClient {
        VolumeClient::connect(self.set.as_ref().unwrap().segment()).expect("connect")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8 | 1)
        .collect()
}

async fn read(c: &VolumeClient, vol: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    c.read(vol, offset, &mut buf).await.expect("read");
    buf
}

async fn holder(c: &VolumeClient, vol: &str) -> (Option<String>, u64) {
    let s = c.lock_info(vol).await.expect("lock info");
    (s.holder, s.generation)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handover_between_two_nodes_serves_no_stale_data() {
    let backend = common::TestBackend::fresh("shared");
    let a = Node::start(backend.config(), "node-a");
    let b = Node::start(backend.config(), "node-b");
    let (ca, cb) = (a.client(), b.client());
    ca.create("vm", 16 * BS, Some(BS)).await.unwrap();
    ca.open_shared("vm").await.unwrap();
    cb.open_shared("vm").await.unwrap();
    assert_eq!(
        holder(&ca, "vm").await.0,
        None,
        "opening shared takes no lock"
    );

    // The target reads a block while it is still ZERO (a non-shared vlmc would cache that).
    assert!(read(&cb, "vm", 3 * BS, 4096).await.iter().all(|&x| x == 0));

    // The source runs the VM: partial and whole-block writes, across a block boundary.
    let p1 = pattern(1, (2 * BS) as usize);
    ca.write("vm", 3 * BS - 1000, &p1).await.unwrap();
    ca.flush("vm").await.unwrap();
    let (h, gen_a) = holder(&ca, "vm").await;
    assert_eq!(h.as_deref(), Some("node-a"));
    assert_eq!(read(&cb, "vm", 3 * BS - 1000, p1.len()).await, p1);

    // The source writes again over blocks it owns (its mapper answers from its cache, after
    // checking it still holds the lock); the target sees it at once.
    let p2 = pattern(2, 5000);
    ca.write("vm", 3 * BS + 100, &p2).await.unwrap();
    assert_eq!(read(&cb, "vm", 3 * BS + 100, p2.len()).await, p2);

    // Switch-over: the target's first write takes the lock from the source.
    let p3 = pattern(3, 9000);
    cb.write("vm", 3 * BS + 50, &p3).await.unwrap();
    cb.write("vm", 10 * BS, &p3).await.unwrap();
    cb.flush("vm").await.unwrap();
    let (h, gen_b) = holder(&cb, "vm").await;
    assert_eq!(h.as_deref(), Some("node-b"));
    assert!(gen_b > gen_a, "the handover moved the fencing generation");

    // The source no longer holds the lock: it reads what the target wrote, not its cache.
    assert_eq!(read(&ca, "vm", 3 * BS + 50, p3.len()).await, p3);
    assert_eq!(read(&ca, "vm", 10 * BS, p3.len()).await, p3);
    let mut expect = p1.clone();
    let base = 3 * BS - 1000;
    let put = |buf: &mut Vec<u8>, at: u64, data: &[u8]| {
        let s = (at - base) as usize;
        buf[s..s + data.len()].copy_from_slice(data);
    };
    put(&mut expect, 3 * BS + 100, &p2);
    put(&mut expect, 3 * BS + 50, &p3);
    assert_eq!(read(&ca, "vm", base, expect.len()).await, expect);
    assert_eq!(read(&cb, "vm", base, expect.len()).await, expect);

    // A rollback (the source writes again) hands the lock back the same way.
    let p4 = pattern(4, 3000);
    ca.write("vm", 10 * BS + 10, &p4).await.unwrap();
    assert_eq!(holder(&ca, "vm").await.0.as_deref(), Some("node-a"));
    let mut want = p3.clone();
    want[10..10 + p4.len()].copy_from_slice(&p4);
    assert_eq!(read(&cb, "vm", 10 * BS, want.len()).await, want);

    // The map is whole and consistent after the ping-pong, seen from either node.
    ca.verify("vm").await.unwrap();
    cb.verify("vm").await.unwrap();

    // The holder can snapshot it; the snapshot holds the latest data.
    ca.snapshot("vm", "vm-snap").await.unwrap();
    assert_eq!(read(&cb, "vm-snap", base, expect.len()).await, expect);

    // Detach both: the lock is free again.
    cb.close("vm").await.unwrap();
    ca.close("vm").await.unwrap();
    assert_eq!(holder(&ca, "vm").await.0, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exclusive_open_still_refuses_a_second_writer() {
    let backend = common::TestBackend::fresh("shared");
    let a = Node::start(backend.config(), "node-a");
    let b = Node::start(backend.config(), "node-b");
    let (ca, cb) = (a.client(), b.client());
    ca.create("db", 4 * BS, Some(BS)).await.unwrap();
    ca.open("db").await.unwrap();
    ca.write("db", 0, &[7u8; 4096]).await.unwrap();
    // A node that did not open shared is refused, naming the holder; nothing changes.
    let e = cb.write("db", 0, &[9u8; 4096]).await.unwrap_err();
    assert!(
        matches!(&e, ClientError::Locked { holder, .. } if holder == "node-a"),
        "{e:?}"
    );
    assert_eq!(read(&ca, "db", 0, 4096).await, vec![7u8; 4096]);
    assert_eq!(holder(&ca, "db").await.0.as_deref(), Some("node-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_open_checks_its_input() {
    let backend = common::TestBackend::fresh("shared-input");
    let a = Node::start(backend.config(), "node-a");
    let c = a.client();
    let e = c.open_shared("missing").await.unwrap_err();
    assert!(matches!(e, ClientError::NotFound(_)), "{e:?}");
    let e = c.open_shared("../etc").await.unwrap_err();
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");
    // A snapshot opens read-only as usual; writes are refused.
    c.create("v", 2 * BS, Some(BS)).await.unwrap();
    c.write("v", 0, &[5u8; 100]).await.unwrap();
    c.snapshot("v", "v-s").await.unwrap();
    let info = c.open_shared("v-s").await.unwrap();
    assert_eq!(info.size, 2 * BS);
    let e = c.write("v-s", 0, b"x").await.unwrap_err();
    assert!(matches!(e, ClientError::ReadOnly(_)), "{e:?}");
    assert_eq!(read(&c, "v-s", 0, 100).await, vec![5u8; 100]);
}
