//! Operations on a volume in use, across machines: a node that needs a snapshot or a resize of
//! a volume another node holds asks the holder over RADOS watch/notify
//! (`peers::blocker::rados::watch`), and the holder does it through its own vlmc, behind the
//! drain barrier.
//!
//! Each node is a whole peer set in its own process (its own segment, node id, librados client
//! and peer-set registry directory), started with the crash test's process harness. The host
//! registry path cannot reach A from B's side: B's registry has no entry for A (checked), and
//! the test forwards with B's client and a notifier only, never touching A's segment for it.
//! The test process writes to A through A's segment, as A's workload would.
//! - a snapshot forwarded from B while A writes holds every write A acknowledged before it, a
//!   prefix of A's sequential writes, and none A made after it returned; A keeps writing;
//! - a resize forwarded from B grows the volume in A's vlmc (A writes past the old end);
//! - a notify to a killed holder ends with the typed "fence it" error instead of hanging, and
//!   after fencing B does the snapshot itself.
//!
//! Needs `--features rados` and a cluster: `CEPH_CONF` and `ARCHIP_CEPH_POOL` (and
//! `ARCHIP_CEPH_KEYRING` when the conf does not name one), as `eval "$(e2e/ceph/start-ceph.sh
//! DIR)"` exports them. Without the variables every test says so and returns.
#![cfg(feature = "rados")]

#[allow(dead_code, reason = "shared with the crash test, which uses the rest")]
mod crash_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crash_support::procs::{self, PeerProcs};
use peers::backend::{BackendConfig, Store};
use peers::blocker::rados::watch::{ForwardError, ForwardOp, Notifier};
use peers::client::{ClientError, ClientOptions, VolumeClient, VolumeKind};
use peers::fence::fence_node;
use peers::registry::Registry;
use xseg::Segment;

const KIB: u64 = 1024;
const BS: u64 = 64 * KIB;
/// Size of one write of A's sequential workload.
const SLOT: u64 = 4 * KIB;
/// Bound on a call that must end (a forwarded operation to a dead holder included): a guard
/// against a hang, not a timing assertion.
const HANG_GUARD: Duration = Duration::from_secs(120);

fn cluster() -> Option<(String, String, Option<String>)> {
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
    Some((conf, pool, std::env::var("ARCHIP_CEPH_KEYRING").ok()))
}

/// The backend both nodes use: one pool, a namespace of this test's own.
fn backend() -> Option<String> {
    let (conf, pool, keyring) = cluster()?;
    let mut b = format!(
        "rados:pool={pool},namespace=fwd-{},conf={conf}",
        uuid::Uuid::new_v4().simple()
    );
    if let Some(k) = keyring {
        b.push_str(&format!(",keyring={k}"));
    }
    Some(b)
}

/// One node: a peer set in a child process, with a segment and a registry directory of its
/// own, and a client of it.
struct Node {
    procs: PeerProcs,
    segment: PathBuf,
    registry: PathBuf,
    client: Option<Arc<VolumeClient>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(test: &'static str, name: &'static str, backend: &str) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("registry");
        let segment = PathBuf::from(format!(
            "/dev/shm/archip-fwd-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let seg = Segment::create(&segment, &procs::segment_config()).expect("segment");
        let backend = BackendConfig::parse(backend).expect("backend description");
        let mut procs = PeerProcs::new(test, dir.path(), &backend)
            .with_node(name)
            .with_registry(&registry);
        procs.spawn_set(&segment);
        let opts = ClientOptions {
            timeout: Duration::from_secs(40),
            admin_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let client = Arc::new(VolumeClient::connect_with(&seg, opts).expect("connect"));
        procs.wait_ready(0, &client).await;
        Node {
            procs,
            segment,
            registry,
            client: Some(client),
            _dir: dir,
        }
    }

    fn client(&self) -> Arc<VolumeClient> {
        self.client.clone().expect("connected")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.procs.kill_all();
        self.client = None;
        let _ = std::fs::remove_file(&self.segment);
    }
}

fn notifier(backend: &str) -> Notifier {
    let blocker = BackendConfig::parse(backend)
        .expect("backend")
        .open_rados(Store::Objects)
        .expect("connect the notifier");
    Notifier::new(&blocker).expect("notifier")
}

/// The content of slot `i` of A's workload: its number, so a read tells which write it was.
fn slot_data(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; SLOT as usize];
    for (k, chunk) in v.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i * 1000 + k as u64 + 1).to_le_bytes());
    }
    v
}

/// The host-local path cannot serve B: B's registry does not know A (A's own does).
fn assert_no_shared_registry(a: &Node, b: &Node) {
    assert!(
        Registry::new(&a.registry)
            .lookup("node-a")
            .expect("A's registry")
            .is_some(),
        "A records itself in its own registry"
    );
    assert!(
        Registry::new(&b.registry)
            .lookup("node-a")
            .expect("B's registry")
            .is_none(),
        "B's registry must not reach A"
    );
}

/// A writes slots 0, 1, 2, ... one at a time, until told to stop; `acked` counts the writes
/// it got an answer for.
fn spawn_writer(
    ca: Arc<VolumeClient>,
    vol: &'static str,
    slots: u64,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..slots {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            ca.write(vol, i * SLOT, &slot_data(i))
                .await
                .unwrap_or_else(|e| panic!("A's write {i}: {e}"));
            acked.store(i + 1, Ordering::SeqCst);
        }
    })
}

async fn wait_acked(acked: &AtomicU64, n: u64) {
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < n {
        assert!(start.elapsed() < HANG_GUARD, "A's writes stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A snapshot and a resize of a volume A holds and writes, asked for from B's side over
/// RADOS notify, done by A behind its drain barrier.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_and_expand_through_the_holder() {
    const TEST: &str = "snapshot_and_expand_through_the_holder";
    procs::run_child_role();
    let Some(backend) = backend() else { return };
    let a = Node::start(TEST, "node-a", &backend).await;
    let b = Node::start(TEST, "node-b", &backend).await;
    let (ca, cb) = (a.client(), b.client());
    assert_no_shared_registry(&a, &b);
    let notifier = notifier(&backend);

    const VOL: &str = "live";
    let size = 32 * BS;
    let slots = size / SLOT;
    ca.create(VOL, size, Some(BS)).await.unwrap();
    ca.open(VOL).await.unwrap();

    // B alone cannot: A holds the volume.
    match cb.snapshot(VOL, "direct").await {
        Err(ClientError::Locked { holder, .. }) => assert_eq!(holder, "node-a"),
        r => panic!("B snapshotted a volume A holds: {r:?}"),
    }

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(ca.clone(), VOL, slots, acked.clone(), stop.clone());
    wait_acked(&acked, 40).await;

    let before = acked.load(Ordering::SeqCst);
    let op = ForwardOp::Snapshot {
        volume: VOL.into(),
        snapshot: "live-snap".into(),
    };
    let snap_size = tokio::time::timeout(HANG_GUARD, notifier.on_holder(&cb, &op))
        .await
        .expect("the forwarded snapshot ended")
        .expect("snapshot through A");
    let after = acked.load(Ordering::SeqCst);
    assert_eq!(snap_size, size);

    // A keeps writing after the snapshot.
    wait_acked(&acked, (after + 40).min(slots)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let last = acked.load(Ordering::SeqCst);
    assert!(
        last > after + 1,
        "A wrote after the snapshot ({after} -> {last})"
    );

    let info = cb.info("live-snap").await.unwrap();
    assert_eq!(info.kind, VolumeKind::Snapshot);

    // The snapshot is a prefix of A's sequential writes: everything acknowledged before the
    // call, nothing started after it returned (write `after` may have been cut either way).
    let mut snap = vec![0u8; (last * SLOT) as usize];
    cb.read("live-snap", 0, &mut snap).await.unwrap();
    let zeros = vec![0u8; SLOT as usize];
    let mut cut = None;
    for i in 0..last {
        let got = &snap[(i * SLOT) as usize..((i + 1) * SLOT) as usize];
        if got == slot_data(i).as_slice() {
            assert!(
                cut.is_none(),
                "slot {i} is in the snapshot after a missing slot {cut:?}"
            );
        } else {
            assert_eq!(got, zeros.as_slice(), "slot {i} of the snapshot is torn");
            cut.get_or_insert(i);
        }
    }
    let cut = cut.unwrap_or(last);
    eprintln!("snapshot: A had acknowledged {before} slots before, {after} after; it holds {cut}");
    assert!(
        (before..=after + 1).contains(&cut),
        "the snapshot holds slots 0..{cut}; A had acknowledged {before} before the call and \
         {after} when it returned"
    );

    // The volume has every write A made, before and after.
    let mut live = vec![0u8; (last * SLOT) as usize];
    ca.read(VOL, 0, &mut live).await.unwrap();
    for i in 0..last {
        assert_eq!(
            &live[(i * SLOT) as usize..((i + 1) * SLOT) as usize],
            slot_data(i).as_slice(),
            "slot {i} of the volume"
        );
    }

    // Anyone who may write the pool may notify: garbage is refused by A (and acknowledged,
    // so the notifier does not wait), and A goes on serving.
    for junk in [
        &b"not json"[..],
        br#"{"v":1,"op":{"op":"resize","volume":"live","size":0}}"#,
    ] {
        rados_notify(&backend, "archip.node.node-a", junk);
    }

    // Expand through A: A's vlmc takes writes past the old end at once.
    let op = ForwardOp::Resize {
        volume: VOL.into(),
        size: 2 * size,
    };
    let grown = tokio::time::timeout(HANG_GUARD, notifier.on_holder(&cb, &op))
        .await
        .expect("the forwarded resize ended")
        .expect("resize through A");
    assert_eq!(grown, 2 * size);
    assert_eq!(ca.info(VOL).await.unwrap().size, 2 * size);
    let tail = slot_data(9999);
    ca.write(VOL, size + BS, &tail).await.unwrap();
    let mut back = vec![0u8; tail.len()];
    ca.read(VOL, size + BS, &mut back).await.unwrap();
    assert_eq!(back, tail);
    assert_eq!(holder_of(&cb, VOL).await.as_deref(), Some("node-a"));

    // A live clone and a group snapshot go the same way.
    let op = ForwardOp::Clone {
        source: VOL.into(),
        name: "live-copy".into(),
        size: None,
    };
    notifier.on_holder(&cb, &op).await.expect("clone through A");
    let mut copied = vec![0u8; tail.len()];
    cb.read("live-copy", size + BS, &mut copied).await.unwrap();
    assert_eq!(copied, tail, "the clone holds A's write past the old end");
    ca.create("other", size, Some(BS)).await.unwrap();
    ca.open("other").await.unwrap();
    ca.write("other", 0, &slot_data(7)).await.unwrap();
    let op = ForwardOp::GroupSnapshot {
        members: vec![
            (VOL.into(), "g-live".into()),
            ("other".into(), "g-other".into()),
        ],
    };
    notifier
        .on_holder(&cb, &op)
        .await
        .expect("group snapshot through A");
    let mut member = vec![0u8; SLOT as usize];
    cb.read("g-other", 0, &mut member).await.unwrap();
    assert_eq!(member, slot_data(7));
    cb.read("g-live", size + BS, &mut copied).await.unwrap();
    assert_eq!(copied, tail);

    // Members held by two nodes cannot be cut together, and nothing is cut.
    cb.create("mine", size, Some(BS)).await.unwrap();
    cb.open("mine").await.unwrap();
    let op = ForwardOp::GroupSnapshot {
        members: vec![
            ("mine".into(), "h-mine".into()),
            (VOL.into(), "h-live".into()),
        ],
    };
    match notifier.on_holder(&cb, &op).await {
        Err(ForwardError::Invalid(why)) => assert!(why.contains("different nodes"), "{why}"),
        r => panic!("a group held by two nodes: {r:?}"),
    }
    for s in ["h-mine", "h-live"] {
        assert!(
            matches!(cb.info(s).await, Err(ClientError::NotFound(_))),
            "{s} was cut"
        );
    }

    // Errors come back typed from the holder: a snapshot name that exists already (sent to
    // A directly; B's own mapper would refuse it before any forwarding).
    let op = ForwardOp::Snapshot {
        volume: VOL.into(),
        snapshot: "live-snap".into(),
    };
    match notifier.forward("node-a", &op).await {
        Err(ForwardError::Refused {
            node,
            source: ClientError::AlreadyExists(_),
        }) => assert_eq!(node, "node-a"),
        r => panic!("a second snapshot of the same name: {r:?}"),
    }
}

/// Sends `payload` to `object` with the `rados` tool (a notifier that is not ours), which
/// must see every watcher acknowledge.
fn rados_notify(backend: &str, object: &str, payload: &[u8]) {
    let arg = |key: &str| {
        backend
            .split([':', ','])
            .find_map(|kv| kv.strip_prefix(key).map(str::to_owned))
    };
    let mut cmd = std::process::Command::new("rados");
    cmd.arg("-c").arg(arg("conf=").expect("conf"));
    if let Some(k) = arg("keyring=") {
        cmd.arg("--keyring").arg(k);
    }
    let out = cmd
        .args(["-p", &arg("pool=").expect("pool")])
        .args(["-N", &arg("namespace=").expect("namespace")])
        .args(["notify", object])
        .arg(std::str::from_utf8(payload).expect("a text payload"))
        .output()
        .expect("rados notify");
    assert!(
        out.status.success(),
        "rados notify {object}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn holder_of(c: &VolumeClient, vol: &str) -> Option<String> {
    c.lock_info(vol).await.expect("lock info").holder
}

/// A notify to a holder that was killed ends with the error that says to fence it; once
/// fenced, B does the snapshot itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_holder_is_a_clear_error() {
    const TEST: &str = "a_dead_holder_is_a_clear_error";
    procs::run_child_role();
    let Some(backend) = backend() else { return };
    let mut a = Node::start(TEST, "node-a", &backend).await;
    let b = Node::start(TEST, "node-b", &backend).await;
    let (ca, cb) = (a.client(), b.client());
    assert_no_shared_registry(&a, &b);
    let notifier = notifier(&backend).with_timeout(Duration::from_secs(5));

    const VOL: &str = "orphan";
    ca.create(VOL, 8 * BS, Some(BS)).await.unwrap();
    ca.open(VOL).await.unwrap();
    ca.write(VOL, 0, &slot_data(1)).await.unwrap();
    ca.flush(VOL).await.unwrap();

    // Alive, A answers.
    let op = ForwardOp::Snapshot {
        volume: VOL.into(),
        snapshot: "s1".into(),
    };
    notifier
        .on_holder(&cb, &op)
        .await
        .expect("snapshot through A");

    a.procs.kill(0);
    a.client = None;
    let op = ForwardOp::Snapshot {
        volume: VOL.into(),
        snapshot: "s2".into(),
    };
    let r = tokio::time::timeout(HANG_GUARD, notifier.on_holder(&cb, &op))
        .await
        .expect("a notify to a dead holder must end");
    match r {
        Err(e @ ForwardError::Unanswered { .. }) => {
            let text = e.to_string();
            eprintln!("to a killed holder: {text}");
            assert!(text.contains("node-a") && text.contains("fence"), "{text}");
        }
        r => panic!("a notify to a killed holder: {r:?}"),
    }
    assert!(
        cb.info("s2").await.is_err(),
        "no snapshot was made by anyone"
    );

    // The way out the error names: fence A, then B does it itself.
    let fenced = fence_node(&cb, "node-a").await.expect("fence node-a");
    assert_eq!(fenced.len(), 1);
    notifier
        .on_holder(&cb, &op)
        .await
        .expect("snapshot by B after fencing");
    let mut got = vec![0u8; SLOT as usize];
    cb.read("s2", 0, &mut got).await.unwrap();
    assert_eq!(got, slot_data(1));
}
