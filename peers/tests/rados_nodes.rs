//! Two nodes on one RADOS pool and namespace: each node is a whole peer set in its own process
//! (its own segment, node identity and librados client, so its own client address), started
//! with the crash test's process harness. The test process talks to each node through its
//! segment, freezes a node with SIGSTOP, kills it with SIGKILL, and checks what the cluster
//! accepts from it afterwards:
//! - a volume opened for writing on A cannot be written through B, and B's error names A;
//!   once A closes it, B opens it and reads what A wrote;
//! - the live-migration handover (both nodes open the volume shared) works between them;
//! - fencing is the cluster's: A frozen with writes to its owned blocks queued, B breaks the
//!   lock (blocklisting A's client) and writes; A resumes, and every late write of A, data
//!   objects included, is refused with EBLOCKLISTED; the volume holds only B's data;
//! - a node killed with SIGKILL is fenced by breaking its lock, and B goes on;
//! - `fence_node` fences every lock of a lost node and nothing else, as often as it is run.
//!
//! Needs `--features rados` and a cluster: `CEPH_CONF` and `ARCHIP_CEPH_POOL` (and
//! `ARCHIP_CEPH_KEYRING` when the conf does not name one), as `eval "$(e2e/ceph/start-ceph.sh
//! DIR)"` exports them. The `ceph` and `rados` command-line tools read the blocklist and the
//! lock objects. Without the variables every test says so and returns.
#![cfg(feature = "rados")]

#[allow(dead_code, reason = "shared with the crash test, which uses the rest")]
mod crash_support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crash_support::procs::{self, PeerProcs};
use peers::backend::BackendConfig;
use peers::client::{ClientError, ClientOptions, VolumeClient};
use peers::fence::{FencedVolume, fence_node};
use peers::peerset::Ports;
use xseg::Segment;

const KIB: u64 = 1024;
/// Block size of the test volumes: small, so a few blocks make a volume.
const BS: u64 = 64 * KIB;
/// Bound on waiting for a process state or a cluster change that the test caused.
const DEADLINE: Duration = Duration::from_secs(30);

/// The cluster from the environment: (ceph.conf, pool, keyring), or None (and a message).
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

/// One pool and a namespace of this test's own, as both nodes see it.
struct Pool {
    conf: String,
    pool: String,
    keyring: Option<String>,
    namespace: String,
}

impl Pool {
    fn new() -> Option<Pool> {
        let (conf, pool, keyring) = cluster()?;
        Some(Pool {
            conf,
            pool,
            keyring,
            namespace: format!("nodes-{}", uuid::Uuid::new_v4().simple()),
        })
    }

    fn backend(&self) -> String {
        let mut b = format!(
            "rados:pool={},namespace={},conf={}",
            self.pool, self.namespace, self.conf
        );
        if let Some(k) = &self.keyring {
            b.push_str(&format!(",keyring={k}"));
        }
        b
    }

    /// Runs a Ceph command-line tool against the cluster and returns its stdout.
    fn tool(&self, tool: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(tool);
        cmd.arg("-c").arg(&self.conf);
        if let Some(k) = &self.keyring {
            cmd.arg("--keyring").arg(k);
        }
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// The client address recorded in a volume's lock object (empty when the lock is free).
    fn lock_address(&self, volume: &str) -> String {
        let object = format!("lk.{volume}.lock");
        let text = self.tool(
            "rados",
            &["-p", &self.pool, "-N", &self.namespace, "get", &object, "-"],
        );
        text.lines()
            .find_map(|l| l.strip_prefix("address="))
            .unwrap_or_else(|| panic!("no address in lock object {object}: {text:?}"))
            .to_owned()
    }

    /// Whether the OSD map blocklists `address` (as `rados_getaddrs` renders it: maybe with a
    /// `v2:` prefix, which the blocklist listing leaves out).
    fn blocklisted(&self, address: &str) -> bool {
        let bare = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .next()
            .unwrap_or_default();
        let bare = bare
            .strip_prefix("v2:")
            .or_else(|| bare.strip_prefix("v1:"))
            .unwrap_or(bare);
        assert!(!bare.is_empty(), "empty client address {address:?}");
        self.tool("ceph", &["osd", "blocklist", "ls"])
            .lines()
            .any(|l| l.split_whitespace().next() == Some(bare))
    }
}

/// One node: a peer set in a child process over a segment of its own, and a client of it.
struct Node {
    name: &'static str,
    procs: PeerProcs,
    segment: PathBuf,
    client: Option<Arc<VolumeClient>>,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start(test: &'static str, name: &'static str, pool: &Pool) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = PathBuf::from(format!(
            "/dev/shm/archip-nodes-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let seg = Segment::create(&segment, &procs::segment_config()).expect("segment");
        let backend = BackendConfig::parse(&pool.backend()).expect("backend description");
        let mut procs = PeerProcs::new(test, dir.path(), &backend).with_node(name);
        procs.spawn_set(&segment);
        let opts = ClientOptions {
            timeout: Duration::from_secs(40),
            admin_timeout: Duration::from_secs(60),
            ..ClientOptions::default()
        };
        let client = Arc::new(VolumeClient::connect_with(&seg, opts).expect("connect"));
        procs.wait_ready(0, &client).await;
        Node {
            name,
            procs,
            segment,
            client: Some(client),
            _dir: dir,
        }
    }

    fn client(&self) -> Arc<VolumeClient> {
        self.client.clone().expect("connected")
    }

    fn pid(&self) -> libc::pid_t {
        self.procs.pid(0).expect("node process running")
    }

    /// The process state letter in /proc (`T`: stopped).
    fn state(&self) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("stat");
        stat.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            .and_then(|s| s.chars().next())
            .expect("state field")
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain syscall on our own child, not yet waited for (so the pid is ours).
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// SIGSTOP, and wait until every thread of the node is stopped.
    async fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        poll(&format!("{} stopped", self.name), || self.state() == 'T').await;
    }

    fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// (requests the test's client has sent to vlmc, requests vlmc has taken).
    fn vlmc_traffic(&self) -> (u64, u64) {
        let client = self.client.as_ref().expect("connected");
        let seg = client.segment();
        let sent = seg.port_stats(client.port()).expect("client port stats");
        let vlmc = seg.port_stats(Ports::VLMC).expect("vlmc port stats");
        (sent.submitted, vlmc.accepted)
    }

    fn kill(&mut self) {
        self.procs.kill(0);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A frozen node must be able to die (SIGKILL works on a stopped process anyway).
        self.procs.kill_all();
        self.client = None;
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// Polls `ready` until it holds, failing after [`DEADLINE`].
async fn poll(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(u32::from(seed)) as u8 | 1)
        .collect()
}

async fn read(c: &VolumeClient, vol: &str, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    c.read(vol, offset, &mut buf).await.expect("read");
    buf
}

async fn holder(c: &VolumeClient, vol: &str) -> (Option<String>, u64) {
    let s = c.lock_info(vol).await.expect("lock info");
    (s.holder, s.generation)
}

/// Locked volumes stay locked across nodes; a clean close hands the data over; the shared
/// (live-migration) handover works between two clients of the cluster, and takes nothing
/// from the source but the lock of that one volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_share_one_pool() {
    const TEST: &str = "two_nodes_share_one_pool";
    procs::run_child_role();
    let Some(pool) = Pool::new() else { return };
    let a = Node::start(TEST, "node-a", &pool).await;
    let b = Node::start(TEST, "node-b", &pool).await;
    let (ca, cb) = (a.client(), b.client());

    ca.create("data", 8 * BS, Some(BS)).await.unwrap();
    ca.open("data").await.unwrap();
    let pa = pattern(1, 3 * BS);
    ca.write("data", BS / 2, &pa).await.unwrap();
    ca.flush("data").await.unwrap();
    assert_eq!(holder(&cb, "data").await.0.as_deref(), Some("node-a"));

    match cb.open("data").await {
        Err(ClientError::Locked { holder, message }) => {
            assert_eq!(holder, "node-a", "{message}");
            assert!(
                message.contains("node-a"),
                "the error names the holder: {message}"
            );
        }
        r => panic!("B opened a volume A holds: {r:?}"),
    }
    match cb.write("data", 0, &pattern(2, 4096)).await {
        Err(ClientError::Locked { holder, message }) => {
            assert_eq!(holder, "node-a", "{message}");
        }
        r => panic!("B wrote a volume A holds: {r:?}"),
    }
    assert_eq!(read(&ca, "data", BS / 2, pa.len() as u64).await, pa);

    ca.close("data").await.unwrap();
    cb.open("data").await.unwrap();
    assert_eq!(holder(&cb, "data").await.0.as_deref(), Some("node-b"));
    assert_eq!(read(&cb, "data", BS / 2, pa.len() as u64).await, pa);
    assert!(read(&cb, "data", 0, BS / 2).await.iter().all(|&x| x == 0));
    let pb = pattern(3, 5000);
    cb.write("data", 2 * BS + 7, &pb).await.unwrap();
    cb.flush("data").await.unwrap();
    cb.close("data").await.unwrap();

    // The handover: both nodes attach the volume shared; each write moves the lock.
    ca.create("vm", 8 * BS, Some(BS)).await.unwrap();
    ca.open_shared("vm").await.unwrap();
    cb.open_shared("vm").await.unwrap();
    assert!(read(&cb, "vm", 3 * BS, 4096).await.iter().all(|&x| x == 0));
    let p1 = pattern(4, 2 * BS);
    ca.write("vm", 3 * BS - 1000, &p1).await.unwrap();
    ca.flush("vm").await.unwrap();
    let (h, gen_a) = holder(&ca, "vm").await;
    assert_eq!(h.as_deref(), Some("node-a"));
    let address_a = pool.lock_address("vm");
    assert_eq!(read(&cb, "vm", 3 * BS - 1000, p1.len() as u64).await, p1);

    let p2 = pattern(5, 9000);
    cb.write("vm", 3 * BS + 50, &p2).await.unwrap();
    cb.write("vm", 6 * BS, &p2).await.unwrap();
    cb.flush("vm").await.unwrap();
    let (h, gen_b) = holder(&cb, "vm").await;
    assert_eq!(h.as_deref(), Some("node-b"));
    assert!(gen_b > gen_a, "the handover moved the fencing generation");
    // The source still works: it reads the target's data, not its cache, and its other
    // volumes are untouched (a handover is not a node loss: no blocklist).
    assert!(!pool.blocklisted(&address_a), "the handover blocklisted A");
    assert_eq!(read(&ca, "vm", 3 * BS + 50, p2.len() as u64).await, p2);
    assert_eq!(read(&ca, "vm", 6 * BS, p2.len() as u64).await, p2);
    assert_eq!(read(&ca, "data", 2 * BS + 7, pb.len() as u64).await, pb);
    ca.create("after-handover", 2 * BS, Some(BS)).await.unwrap();
    ca.open("after-handover").await.unwrap();
    ca.write("after-handover", 0, &p2).await.unwrap();
    ca.flush("after-handover").await.unwrap();
    assert_eq!(read(&ca, "after-handover", 0, p2.len() as u64).await, p2);

    // And back: the source writes again, which takes the lock back.
    let p3 = pattern(6, 4096);
    ca.write("vm", 6 * BS, &p3).await.unwrap();
    ca.flush("vm").await.unwrap();
    assert_eq!(holder(&cb, "vm").await.0.as_deref(), Some("node-a"));
    assert_eq!(read(&cb, "vm", 6 * BS, 4096).await, p3);
    cb.verify("vm").await.unwrap();
}

/// A frozen node's late writes are refused by the cluster, data objects included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_node_is_fenced_by_the_cluster() {
    const TEST: &str = "a_frozen_node_is_fenced_by_the_cluster";
    procs::run_child_role();
    let Some(pool) = Pool::new() else { return };
    let a = Node::start(TEST, "node-a", &pool).await;
    let b = Node::start(TEST, "node-b", &pool).await;
    let (ca, cb) = (a.client(), b.client());

    // A owns blocks 0..4 (whole-block writes), so its vlmc writes them straight to their
    // objects, with no mapper round trip.
    ca.create("vol", 8 * BS, Some(BS)).await.unwrap();
    ca.open("vol").await.unwrap();
    let before = pattern(1, 4 * BS);
    ca.write("vol", 0, &before).await.unwrap();
    ca.flush("vol").await.unwrap();
    let address_a = pool.lock_address("vol");
    assert!(!pool.blocklisted(&address_a));

    // Frozen with writes in hand: to its owned blocks 0..4 (data objects only) and to block
    // 5, which A never wrote (that one needs a map write).
    a.freeze().await;
    let (sent_before, taken_before) = a.vlmc_traffic();
    let late = pattern(9, BS);
    let mut writes = Vec::new();
    for block in [0u64, 1, 2, 3, 5] {
        let (ca, late) = (ca.clone(), late.clone());
        writes.push((
            block,
            tokio::spawn(async move { ca.write("vol", block * BS, &late).await }),
        ));
    }
    poll("A's late writes queued at its vlmc", || {
        a.vlmc_traffic().0 >= sent_before + writes.len() as u64
    })
    .await;
    assert_eq!(
        a.vlmc_traffic().1,
        taken_before,
        "A took a request while frozen"
    );

    // B breaks the lock (blocklisting A) and writes blocks 0 and 1.
    let broken = cb.break_lock("vol").await.unwrap();
    assert_eq!(broken.holder.as_deref(), Some("node-a"));
    assert!(
        pool.blocklisted(&address_a),
        "breaking A's lock blocklisted A's client {address_a}"
    );
    cb.open("vol").await.unwrap();
    let theirs = pattern(2, 2 * BS);
    cb.write("vol", 0, &theirs).await.unwrap();
    cb.flush("vol").await.unwrap();

    // A resumes: every late write fails, the cluster refusing A's client.
    a.thaw();
    for (block, w) in writes {
        let r = tokio::time::timeout(DEADLINE, w)
            .await
            .expect("A's late write answered")
            .expect("task");
        match r {
            // Refused by the OSDs (EBLOCKLISTED), not by our own lock check: for the owned
            // blocks, at the data object itself.
            Err(ClientError::Fenced(m)) => {
                assert!(m.contains("blocklisted"), "block {block}: {m}");
                if block < 4 {
                    assert!(m.contains("accessing ob."), "block {block}: {m}");
                }
            }
            r => panic!("A's late write to block {block} was not refused: {r:?}"),
        }
    }
    // And so is every write A tries from now on, though its vlmc still maps the block as
    // its own (nothing of ours told it otherwise: only the cluster stops it).
    match ca.write("vol", 2 * BS, &late).await {
        Err(ClientError::Fenced(m)) => assert!(m.contains("blocklisted"), "{m}"),
        r => panic!("A wrote after being fenced: {r:?}"),
    }

    // Only B's data where B wrote, A's data from before the freeze elsewhere, never A's late
    // data; the same through both nodes' clients (A's reads are refused or agree).
    let expect = {
        let mut e = theirs.clone();
        e.extend_from_slice(&before[(2 * BS) as usize..]);
        e.extend(std::iter::repeat_n(0u8, (4 * BS) as usize));
        e
    };
    let got = read(&cb, "vol", 0, 8 * BS).await;
    for block in 0..8 {
        let r = (block * BS) as usize..((block + 1) * BS) as usize;
        assert!(
            got[r.clone()] != late[..],
            "block {block} holds A's late data"
        );
        assert!(
            got[r.clone()] == expect[r],
            "block {block} is not as B left it"
        );
    }
    cb.write("vol", 6 * BS, &late).await.unwrap();
    cb.flush("vol").await.unwrap();
}

/// A node killed with SIGKILL: breaking its lock blocklists it, and B carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_is_fenced_and_its_volume_moves_on() {
    const TEST: &str = "a_killed_node_is_fenced_and_its_volume_moves_on";
    procs::run_child_role();
    let Some(pool) = Pool::new() else { return };
    let mut a = Node::start(TEST, "node-a", &pool).await;
    let b = Node::start(TEST, "node-b", &pool).await;
    let (ca, cb) = (a.client(), b.client());

    ca.create("vol", 4 * BS, Some(BS)).await.unwrap();
    ca.open("vol").await.unwrap();
    let pa = pattern(1, 2 * BS);
    ca.write("vol", 0, &pa).await.unwrap();
    ca.flush("vol").await.unwrap();
    let address_a = pool.lock_address("vol");
    a.kill();

    match cb.open("vol").await {
        Err(ClientError::Locked { holder, .. }) => assert_eq!(holder, "node-a"),
        r => panic!("a dead node's lock must be broken first: {r:?}"),
    }
    let broken = cb.break_lock("vol").await.unwrap();
    assert_eq!(broken.holder.as_deref(), Some("node-a"));
    assert!(
        pool.blocklisted(&address_a),
        "A's client {address_a} blocklisted"
    );
    cb.open("vol").await.unwrap();
    let (h, generation) = holder(&cb, "vol").await;
    assert_eq!(h.as_deref(), Some("node-b"));
    assert!(generation > broken.generation);
    assert_eq!(read(&cb, "vol", 0, pa.len() as u64).await, pa);
    let pb = pattern(2, BS + 100);
    cb.write("vol", BS, &pb).await.unwrap();
    cb.flush("vol").await.unwrap();
    assert_eq!(read(&cb, "vol", BS, pb.len() as u64).await, pb);
    assert_eq!(read(&cb, "vol", 0, BS).await, pa[..BS as usize]);
}

/// `fence_node` on RADOS: every lock of the lost node, with the blocklist; nothing else; twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fence_node_fences_every_lock_of_a_lost_node_and_nothing_else() {
    const TEST: &str = "fence_node_fences_every_lock_of_a_lost_node_and_nothing_else";
    procs::run_child_role();
    let Some(pool) = Pool::new() else { return };
    let a = Node::start(TEST, "node-a", &pool).await;
    let b = Node::start(TEST, "node-b", &pool).await;
    let (ca, cb) = (a.client(), b.client());

    for v in ["a1", "a2", "b1", "free"] {
        ca.create(v, 4 * BS, Some(BS)).await.unwrap();
    }
    let pa = pattern(1, BS);
    for v in ["a1", "a2"] {
        ca.open(v).await.unwrap();
        ca.write(v, 0, &pa).await.unwrap();
        ca.flush(v).await.unwrap();
    }
    cb.open("b1").await.unwrap();
    cb.write("b1", 0, &pa).await.unwrap();
    cb.flush("b1").await.unwrap();
    ca.snapshot("a1", "a1-snap").await.unwrap();
    let address_a = pool.lock_address("a1");
    let address_b = pool.lock_address("b1");
    assert_ne!(address_a, address_b, "two processes, two clients");

    let mut fenced = fence_node(&cb, "node-a").await.unwrap();
    fenced.sort_by(|x, y| x.volume.cmp(&y.volume));
    assert_eq!(
        fenced.iter().map(|f| f.volume.as_str()).collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    assert!(fenced.iter().all(|f: &FencedVolume| f.generation > 0));
    assert!(
        pool.blocklisted(&address_a),
        "A's client {address_a} blocklisted"
    );
    assert!(
        !pool.blocklisted(&address_b),
        "B's client {address_b} untouched"
    );
    assert_eq!(holder(&cb, "b1").await.0.as_deref(), Some("node-b"));
    for v in ["a1", "a2", "free"] {
        assert_eq!(holder(&cb, v).await.0, None, "{v}");
    }

    // Idempotent: nothing left to fence, and B still writes.
    assert!(fence_node(&cb, "node-a").await.unwrap().is_empty());
    assert!(fence_node(&cb, "node-nobody").await.unwrap().is_empty());
    cb.write("b1", BS, &pa).await.unwrap();
    cb.flush("b1").await.unwrap();
    assert_eq!(holder(&cb, "b1").await.0.as_deref(), Some("node-b"));

    // The lost node, still running, is refused by the cluster; B takes its volumes over.
    let late = pattern(9, BS);
    match ca.write("a1", 0, &late).await {
        Err(ClientError::Fenced(m)) => assert!(m.contains("blocklisted"), "{m}"),
        r => panic!("the fenced node wrote: {r:?}"),
    }
    for v in ["a1", "a2"] {
        cb.open(v).await.unwrap();
        assert_eq!(read(&cb, v, 0, BS).await, pa, "{v}");
    }
    assert_eq!(read(&cb, "a1-snap", 0, BS).await, pa);
}
