//! vlmc's hardening under trouble: a segment short of requests, a blocker that holds a write
//! back, a mapper that answers a write with no writable object, and clients that send endless
//! volume names. Each test runs vlmc on its own loop over a scratch segment, with a blocker
//! peer the test controls (objects in memory, writes held back on demand) and either the real
//! mapper or a fake one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use xseg::protocol::{Extent, MapReply, extent};
use xseg::{AsyncClient, Op, Peer, Port, Request, Runner, Segment, Sender, Status, Stopper};

use super::cache::lock;
use super::{Inner, MAX_VOLUMES, Vlmc, VlmcConfig, Volumes};
use crate::blocker::{Blocker, MemoryBlocker};
use crate::client::{ClientError, ClientOptions, VolumeClient};
use crate::peerset::{PeerConfig, Ports, RunningPeer, spawn_peer};
use crate::testing::ScratchDir;
use crate::wire::{self, VolumeInfo, VolumeKind};

/// Objects in memory, served on the blocker port; the next `hold` writes are kept unanswered
/// (and unapplied) until [`Objects::release`].
#[derive(Default)]
struct Objects {
    data: HashMap<String, Vec<u8>>,
    hold: usize,
    held: Vec<Request>,
    writes: usize,
}

fn target_of(req: &Request) -> String {
    req.target()
        .ok()
        .and_then(|t| t.as_str().ok().map(str::to_string))
        .unwrap_or_default()
}

impl Objects {
    fn apply(&mut self, req: &mut Request) {
        let object = target_of(req);
        let (off, len) = (req.offset() as usize, req.size() as usize);
        match req.op() {
            Op::Write => {
                let data = req.data().expect("write data")[..len].to_vec();
                let o = self.data.entry(object).or_default();
                if o.len() < off + len {
                    o.resize(off + len, 0);
                }
                o[off..off + len].copy_from_slice(&data);
                self.writes += 1;
                req.complete(len as u64);
            }
            Op::Read => {
                let o = self.data.get(&object).cloned().unwrap_or_default();
                let buf = req.buffer_mut().expect("read buffer");
                for (i, b) in buf[..len].iter_mut().enumerate() {
                    *b = o.get(off + i).copied().unwrap_or(0);
                }
                req.set_data_len(len as u64).expect("data length");
                req.complete(len as u64);
            }
            Op::Flush => req.complete(0),
            op => wire::fail(req, Status::Unsupported, &format!("{op:?}"), None),
        }
    }

    /// Applies and answers the held writes, in the order they arrived.
    fn release(&mut self, tx: &Sender) {
        for mut req in std::mem::take(&mut self.held) {
            self.apply(&mut req);
            tx.respond(req);
        }
    }
}

struct BlockerStub(Arc<Mutex<Objects>>);

impl Peer for BlockerStub {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        let mut o = lock(&self.0);
        if req.op() == Op::Write && o.hold > 0 {
            o.hold -= 1;
            o.held.push(req);
            return;
        }
        o.apply(&mut req);
        tx.respond(req);
    }
}

/// A mapper that knows one volume and maps every block of it to no object (ZERO), or to a
/// read-only object: what a broken or hostile mapper could answer to a MAPW.
struct MapperStub {
    size: u64,
    block_size: u64,
    readonly: bool,
}

impl Peer for MapperStub {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        match req.op() {
            Op::Info => {
                let info = VolumeInfo {
                    name: target_of(&req),
                    kind: VolumeKind::Volume,
                    uuid: uuid::Uuid::nil(),
                    size: self.size,
                    block_size: self.block_size as u32,
                    epoch: 1,
                    parent: None,
                    created: 0,
                };
                wire::reply_with(&mut req, |buf| info.encode(buf));
            }
            Op::MapRead | Op::MapWrite => {
                let bs = self.block_size;
                let (mut pos, end) = (req.offset(), req.offset() + req.size());
                let mut extents = Vec::new();
                while pos < end {
                    let len = (bs - pos % bs).min(end - pos);
                    let (object, flags) = if self.readonly {
                        (format!("shared.{}", pos / bs), extent::READONLY)
                    } else {
                        (String::new(), extent::ZERO)
                    };
                    extents.push(Extent {
                        object,
                        offset: pos % bs,
                        len,
                        flags,
                    });
                    pos += len;
                }
                let reply = MapReply { extents };
                wire::reply_with(&mut req, |buf| reply.encode(buf));
            }
            op => wire::fail(&mut req, Status::NotFound, &format!("{op:?}"), None),
        }
        tx.respond(req);
    }
}

/// Runs `make`'s peer on `port` on a thread of its own, with a runtime for it.
fn run<P: Peer>(
    port: Port,
    make: impl FnOnce(&mut Runner, tokio::runtime::Handle) -> P + Send + 'static,
) -> (Stopper, JoinHandle<()>) {
    let mut runner = Runner::new(port);
    let stopper = runner.stopper();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut peer = make(&mut runner, rt.handle().clone());
        runner.run(&mut peer);
        drop(peer);
        rt.shutdown_timeout(Duration::from_secs(5));
    });
    (stopper, thread)
}

/// vlmc over a scratch segment, with the blocker stub and the real mapper (over a memory
/// blocker) or a mapper stub.
struct Harness {
    seg: Arc<Segment>,
    path: PathBuf,
    vlmc: Arc<Inner>,
    objects: Arc<Mutex<Objects>>,
    blocker_tx: Sender,
    loops: Vec<(Stopper, JoinHandle<()>)>,
    mapper: Option<RunningPeer>,
    _dir: ScratchDir,
}

impl Harness {
    fn start(tag: &str, xseg: xseg::Config, timeout: Duration, stub: Option<MapperStub>) -> Self {
        match stub {
            Some(stub) => Self::start_with(tag, xseg, timeout, Some(move |_| stub)),
            None => Self::start_with(tag, xseg, timeout, None::<fn(_) -> MapperStub>),
        }
    }

    /// With `make`'s peer on the mapper port (it gets the blocker stub's objects), or else the
    /// real mapper.
    fn start_with<P: Peer>(
        tag: &str,
        xseg: xseg::Config,
        timeout: Duration,
        make: Option<impl FnOnce(Arc<Mutex<Objects>>) -> P + Send + 'static>,
    ) -> Self {
        let dir = ScratchDir::new(tag);
        let path = dir.path().join("segment");
        let seg = Segment::create(&path, &xseg).expect("segment");
        let objects = Arc::new(Mutex::new(Objects::default()));
        let mut loops = Vec::new();
        let port = seg.bind(Ports::BLOCKER, "blocker").expect("blocker port");
        let blocker_tx = port.sender().clone();
        let o = objects.clone();
        loops.push(run(port, move |_, _| BlockerStub(o)));
        let mapper = match make {
            Some(make) => {
                let port = seg.bind(Ports::MAPPER, "mapper").expect("mapper port");
                let o = objects.clone();
                loops.push(run(port, move |_, _| make(o)));
                None
            }
            None => {
                let mut config = PeerConfig::new(dir.path(), path.to_str().unwrap(), "node-test");
                config.workers = 2;
                let memory: Arc<dyn Blocker> = Arc::new(MemoryBlocker::new());
                Some(spawn_peer("mapper", &config, &seg, Some(memory)).expect("mapper"))
            }
        };
        let client = AsyncClient::new(&seg, "vlmc-client").expect("vlmc client");
        let port = seg.bind(Ports::VLMC, "vlmc").expect("vlmc port");
        let config = VlmcConfig {
            timeout,
            ..VlmcConfig::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        loops.push(run(port, move |runner, rt| {
            let vlmc = Vlmc::new(runner.port_mut().sender().clone(), client, config, rt);
            tx.send(vlmc.inner.clone()).expect("harness waits");
            vlmc
        }));
        let vlmc = rx.recv().expect("vlmc started");
        Harness {
            seg,
            path,
            vlmc,
            objects,
            blocker_tx,
            loops,
            mapper,
            _dir: dir,
        }
    }

    fn client(&self) -> VolumeClient {
        VolumeClient::connect(&self.seg).expect("connect")
    }

    fn volumes(&self) -> usize {
        lock(&self.vlmc.volumes).map.len()
    }

    fn release_held(&self) {
        lock(&self.objects).release(&self.blocker_tx);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // vlmc first (it was started last), then the mapper, then the blocker stub.
        let mut loops = std::mem::take(&mut self.loops);
        let vlmc = loops.pop();
        let stop = |(stopper, thread): (Stopper, JoinHandle<()>)| {
            stopper.stop();
            let _ = thread.join();
        };
        vlmc.into_iter().for_each(stop);
        if let Some(m) = self.mapper.take() {
            m.stop();
        }
        loops.into_iter().rev().for_each(stop);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Retries a client call while the segment has no request or buffer for it, as the NBD and
/// ublk frontends do; anything else is the call's answer.
async fn patiently<T, F, Fut>(mut f: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Err(ClientError::Transport(
                xseg::Error::NoRequest | xseg::Error::NoBuffer(_) | xseg::Error::QueueFull(_),
            )) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            r => return r,
        }
    }
}

const KIB: u64 = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_segment_slows_io_down_and_never_fails_it_with_no_space() {
    // Few requests and buffers: each client write (8 KiB over three 4 KiB blocks) needs a
    // 64 KiB buffer of the client's and three sub-requests plus mapper calls of vlmc's.
    let tiny = xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 16,
        buffer_classes: vec![(4 << 10, 6), (64 << 10, 6)],
    };
    let h = Harness::start("vlmc-tiny", tiny, Duration::from_secs(30), None);
    let c = Arc::new(h.client());
    c.create("tiny", 1 << 20, Some(4 * KIB)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..12u64 {
        let c = c.clone();
        tasks.spawn(async move {
            let mut failures = Vec::new();
            for i in 0..8u64 {
                let off = (t * 8 + i) * 8 * KIB + 2 * KIB;
                let data = vec![(t * 8 + i) as u8 + 1; 8 * KIB as usize];
                if let Err(e) = patiently(|| c.write("tiny", off, &data)).await {
                    failures.push(format!("write at {off}: {e}"));
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        failures.extend(r.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} writes failed under back-pressure, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    for n in 0..96u64 {
        let off = n * 8 * KIB + 2 * KIB;
        let buf = patiently(|| async {
            let mut buf = vec![0u8; 8 * KIB as usize];
            c.read("tiny", off, &mut buf).await.map(|()| buf)
        })
        .await
        .unwrap();
        assert!(buf.iter().all(|&b| b == n as u8 + 1), "data of write {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_held_at_the_blocker_is_not_answered_so_a_resend_cannot_be_overtaken() {
    let timeout = Duration::from_millis(50);
    let h = Harness::start("vlmc-held", crate::testing::test_config(), timeout, None);
    // A client as patient as ublk's queue, and one (NBD's) whose own limit is shorter than
    // the blocker's delay; an I/O of three objects (split by vlmc) and one of one (forwarded).
    let impatient = ClientOptions {
        timeout,
        ..ClientOptions::default()
    };
    let clients = [
        Arc::new(h.client()),
        Arc::new(VolumeClient::connect_with(&h.seg, impatient).unwrap()),
    ];
    for (n, c) in clients.iter().enumerate() {
        for (off, len) in [(2 * KIB, 8 * KIB), (KIB, 2 * KIB)] {
            let vol = format!("held-{n}-{off}");
            c.create(&vol, 1 << 20, Some(4 * KIB)).await.unwrap();
            held_write_then_newer_data(&h, c, &vol, off, len, timeout).await;
        }
    }
}

/// The first object write of `[off, off + len)` is held back at the blocker; the client
/// resends on TimedOut (as ublk does), then writes newer data; the held write is let go.
/// The newer data must be what stays.
async fn held_write_then_newer_data(
    h: &Harness,
    c: &Arc<VolumeClient>,
    vol: &str,
    off: u64,
    len: u64,
    timeout: Duration,
) {
    let (old, new) = (vec![0xaa_u8; len as usize], vec![0xbb_u8; len as usize]);
    lock(&h.objects).hold = 1;
    let mut first = {
        let (c, old, vol) = (c.clone(), old.clone(), vol.to_string());
        tokio::spawn(async move { c.write(&vol, off, &old).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(&h.objects).held.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the write never reached the blocker"
        );
        tokio::task::yield_now().await;
    }
    // The frontend's side: wait for the answer (ten of vlmc's time-outs), and resend on
    // TimedOut as ublk does.
    match tokio::time::timeout(timeout * 10, &mut first).await {
        Ok(r) => {
            let e = r.unwrap().expect_err("a held write cannot have succeeded");
            assert!(matches!(e, ClientError::Timeout(_)), "{e}");
            c.write(vol, off, &old).await.unwrap();
        }
        Err(_) => {
            // Still waiting for its held piece: the fix. It ends once the blocker answers.
            h.release_held();
            first.await.unwrap().unwrap();
        }
    }
    // The client moves on to newer data, then the held piece of the first attempt (if it is
    // still held) lands.
    c.write(vol, off, &new).await.unwrap();
    h.release_held();
    let mut buf = vec![0u8; len as usize];
    c.read(vol, off, &mut buf).await.unwrap();
    assert!(
        buf == new,
        "{vol}: an abandoned write landed over a newer one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_mapped_to_no_writable_object_fails_and_stores_nothing() {
    for readonly in [false, true] {
        let stub = MapperStub {
            size: 1 << 20,
            block_size: 4 * KIB,
            readonly,
        };
        let h = Harness::start(
            "vlmc-zero",
            crate::testing::test_config(),
            Duration::from_secs(30),
            Some(stub),
        );
        let c = h.client();
        // One object (forwarded whole) and three (split).
        for (off, len) in [(0, 4 * KIB), (2 * KIB, 8 * KIB)] {
            match c.write("vol", off, &vec![7u8; len as usize]).await {
                Err(ClientError::Io(m)) => assert!(m.contains("for a write"), "{m}"),
                other => panic!("readonly={readonly} {off}+{len}: {other:?}"),
            }
        }
        assert_eq!(lock(&h.objects).writes, 0, "nothing reached the blocker");
        if !readonly {
            // Reads of ZERO blocks stay zeros without any I/O.
            let mut buf = vec![1u8; 8 * KIB as usize];
            c.read("vol", 2 * KIB, &mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
}

/// A mapper of one volume whose blocks start SHARED (read-only `shared.<block>`) and whose
/// MAPW does the copy-on-write (into `owned.<block>`, in the blocker stub's objects) and then
/// fails, like a mapper killed after persisting the change and before replying.
struct DyingMapper {
    objects: Arc<Mutex<Objects>>,
    size: u64,
    block_size: u64,
    owned: std::collections::HashSet<u64>,
}

impl Peer for DyingMapper {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        let bs = self.block_size;
        match req.op() {
            Op::Info => {
                let info = VolumeInfo {
                    name: target_of(&req),
                    kind: VolumeKind::Volume,
                    uuid: uuid::Uuid::nil(),
                    size: self.size,
                    block_size: bs as u32,
                    epoch: 2,
                    parent: None,
                    created: 0,
                };
                wire::reply_with(&mut req, |buf| info.encode(buf));
            }
            Op::MapRead => {
                let (mut pos, end) = (req.offset(), req.offset() + req.size());
                let mut extents = Vec::new();
                while pos < end {
                    let len = (bs - pos % bs).min(end - pos);
                    let b = pos / bs;
                    let (object, flags) = if self.owned.contains(&b) {
                        (format!("owned.{b}"), 0)
                    } else {
                        (format!("shared.{b}"), extent::READONLY)
                    };
                    extents.push(Extent {
                        object,
                        offset: pos % bs,
                        len,
                        flags,
                    });
                    pos += len;
                }
                let reply = MapReply { extents };
                wire::reply_with(&mut req, |buf| reply.encode(buf));
            }
            Op::MapWrite => {
                let (start, end) = (req.offset() / bs, (req.offset() + req.size()).div_ceil(bs));
                let mut o = lock(&self.objects);
                for b in start..end {
                    if self.owned.insert(b) {
                        let old = o.data.get(&format!("shared.{b}")).cloned();
                        o.data.insert(format!("owned.{b}"), old.unwrap_or_default());
                    }
                }
                wire::fail(
                    &mut req,
                    Status::PeerGone,
                    "mapper died after the change",
                    None,
                );
            }
            op => wire::fail(&mut req, Status::NotFound, &format!("{op:?}"), None),
        }
        tx.respond(req);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_map_write_does_not_leave_reads_on_the_object_it_replaced() {
    let bs = 4 * KIB;
    let h = Harness::start_with(
        "vlmc-dying-mapw",
        crate::testing::test_config(),
        Duration::from_secs(30),
        Some(move |objects| DyingMapper {
            objects,
            size: 1 << 20,
            block_size: bs,
            owned: Default::default(),
        }),
    );
    let old: Vec<u8> = (0..bs).map(|i| (i % 251) as u8 + 1).collect();
    lock(&h.objects).data.insert("shared.0".into(), old.clone());
    let c = h.client();
    let mut buf = vec![0u8; bs as usize];
    c.read("vol", 0, &mut buf).await.unwrap();
    assert_eq!(
        buf, old,
        "block 0 reads the shared object (and vlmc caches that)"
    );
    let err = c.write("vol", 512, &[9u8; 512]).await;
    assert!(err.is_err(), "the MAPW failed, so did the write: {err:?}");
    // The mapper had moved block 0 to its own copy; nothing refers to the shared object now,
    // and GC takes it.
    lock(&h.objects).data.remove("shared.0");
    c.read("vol", 0, &mut buf).await.unwrap();
    assert_eq!(
        buf, old,
        "after the failed MAPW, block 0 must be read where the mapper now has it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endless_volume_names_do_not_grow_vlmc_past_its_cap() {
    let h = Harness::start(
        "vlmc-names",
        crate::testing::test_config(),
        Duration::from_secs(30),
        None,
    );
    let c = Arc::new(h.client());
    c.create("real", 1 << 20, Some(4 * KIB)).await.unwrap();
    c.write("real", 0, b"kept").await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8usize {
        let c = c.clone();
        tasks.spawn(async move {
            let mut buf = [0u8; 512];
            for i in (t..MAX_VOLUMES + 200).step_by(8) {
                let ghost = format!("ghost-{i}");
                match c.read(&ghost, 0, &mut buf).await {
                    Err(ClientError::NotFound(_)) => {}
                    other => panic!("{ghost}: {other:?}"),
                }
                let bad = format!("../bad-{i}");
                match c.read(&bad, 0, &mut buf).await {
                    Err(ClientError::InvalidArgument(_)) => {}
                    other => panic!("{bad}: {other:?}"),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let n = h.volumes();
    assert!(n <= MAX_VOLUMES, "{n} volumes tracked, cap {MAX_VOLUMES}");
    assert!(
        !lock(&h.vlmc.volumes)
            .map
            .keys()
            .any(|k| k.starts_with(".."))
    );
    let counted = crate::metrics::global().volumes();
    assert!(
        !counted
            .iter()
            .any(|(k, _)| k.starts_with("ghost-") || k.starts_with("../bad-")),
        "names of no volume took per-volume metric slots"
    );
    let mut buf = [0u8; 4];
    c.read("real", 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"kept");
}

#[test]
fn eviction_spares_volumes_in_use_and_volumes_opened_shared() {
    let mut v = Volumes::default();
    let busy = v.get("busy");
    v.get("shared")
        .shared
        .store(true, std::sync::atomic::Ordering::Release);
    for i in 0..MAX_VOLUMES * 2 {
        v.get(&format!("v{i}"));
        assert!(v.map.len() <= MAX_VOLUMES);
    }
    assert!(v.map.contains_key("busy") && v.map.contains_key("shared"));
    // Least recently used goes first: a name used again survives the next eviction.
    let last = format!("v{}", MAX_VOLUMES * 2 - 1);
    let second = format!("v{}", MAX_VOLUMES * 2 - 2);
    v.get(&second);
    for i in 0..MAX_VOLUMES - 3 {
        v.get(&format!("w{i}"));
    }
    assert!(v.map.contains_key(&second) && !v.map.contains_key(&last));
    drop(busy);
}

/// The fast path holds the drain gate from its forward to its reply: a snapshot asked for
/// while a fast-path write is at the blocker waits for it, and the first write after the
/// snapshot does not reuse the mapping cached before it (it would land in the object the
/// snapshot now shares).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_waits_for_a_fast_path_write_and_freezes_its_data() {
    let bs = 4 * KIB;
    let h = Harness::start(
        "vlmc-fast-snap",
        crate::testing::test_config(),
        Duration::from_secs(30),
        None,
    );
    let c = Arc::new(h.client());
    c.create("fast", 1 << 20, Some(bs)).await.unwrap();
    let fill = |n: u8| vec![n; bs as usize];
    // Whole blocks, so that no copy-on-write needs the data (it is in the stub, not the
    // mapper's blocker).
    c.write("fast", 0, &fill(1)).await.unwrap();
    let before = h.vlmc.fast_ios.load(std::sync::atomic::Ordering::Relaxed);
    c.write("fast", 0, &fill(2)).await.unwrap();
    let mut buf = vec![0u8; bs as usize];
    c.read("fast", 0, &mut buf).await.unwrap();
    assert_eq!(buf, fill(2));
    let after = h.vlmc.fast_ios.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        after - before,
        2,
        "a write and a read of a cached owned block take the fast path"
    );

    lock(&h.objects).hold = 1;
    let held = {
        let c = c.clone();
        let data = fill(3);
        tokio::spawn(async move { c.write("fast", 0, &data).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(&h.objects).held.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the write never reached the blocker"
        );
        tokio::task::yield_now().await;
    }
    let mut snapshot = {
        let c = c.clone();
        tokio::spawn(async move { c.snapshot("fast", "fast-snap").await })
    };
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut snapshot)
            .await
            .is_err(),
        "the snapshot finished while a write to the volume was still at the blocker"
    );
    h.release_held();
    held.await.unwrap().unwrap();
    snapshot.await.unwrap().unwrap();

    c.write("fast", 0, &fill(4)).await.unwrap();
    c.read("fast-snap", 0, &mut buf).await.unwrap();
    assert_eq!(buf, fill(3), "the snapshot holds the write it waited for");
    c.read("fast", 0, &mut buf).await.unwrap();
    assert_eq!(
        buf,
        fill(4),
        "the volume holds the write after the snapshot"
    );
}
