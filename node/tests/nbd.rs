//! The NBD export against qemu's own tools (qemu-img, qemu-io, qemu-nbd from Debian's
//! qemu-utils) and against a hand-rolled client that sends what those tools never do:
//! malformed options, out-of-range and unknown requests, and plain garbage.
//!
//! Each test runs a peer set in this process on a scratch directory and /dev/shm segment
//! (removed afterwards) and binds the server before any client connects, so no test waits
//! on timing.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use node::nbd::bench::ScratchPeerSet;
use node::nbd::proto::{self, cmd, errno, opt, rep};
use node::nbd::{IoStats, NbdConfig, NbdServer};
use peers::client::VolumeClient;
use peers::peerset::Ports;
use tokio::sync::oneshot;

const MIB: u64 = 1 << 20;

/// Small pools, so that a depth-32 client and several connections reach their limits.
fn test_xseg() -> xseg::Config {
    xseg::Config {
        nr_ports: 64,
        dynamic_start: Ports::DYNAMIC_START,
        nr_requests: 1024,
        buffer_classes: vec![(4 << 10, 256), (64 << 10, 128), (1 << 20, 32)],
    }
}

/// A peer set, a client, and an NBD server running until dropped (or [`Served::stop`]).
struct Served {
    peers: ScratchPeerSet,
    client: Arc<VolumeClient>,
    socket: PathBuf,
    tcp: Option<std::net::SocketAddr>,
    stats: Arc<IoStats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<Arc<IoStats>, node::nbd::NbdError>>>,
}

impl Served {
    /// Creates `volume` (`size` bytes, 1 MiB blocks) and serves with `config` (socket filled in).
    async fn start(tag: &str, volume: &str, size: u64, mut config: NbdConfig) -> Served {
        let peers = ScratchPeerSet::start(tag, test_xseg()).expect("peer set");
        let client = Arc::new(peers.client().expect("client"));
        client
            .create(volume, size, Some(MIB))
            .await
            .expect("create");
        let socket = peers.dir().join("nbd.sock");
        config.unix_socket = Some(socket.clone());
        let server = NbdServer::bind(client.clone(), config).expect("bind");
        let stats = server.stats();
        let tcp = server.tcp_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Served {
            peers,
            client,
            socket,
            tcp,
            stats,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn url(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Stops the server and waits for it; the socket file must be gone afterwards.
    async fn stop(mut self) -> Arc<IoStats> {
        let _ = self.stop.take().unwrap().send(());
        let stats = self.task.take().unwrap().await.unwrap().expect("server");
        assert!(!self.socket.exists(), "socket file left behind");
        stats
    }

    async fn read(&self, volume: &str, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.client.read(volume, offset, &mut buf).await.unwrap();
        buf
    }
}

/// Runs a command on a blocking thread (the server keeps running on the runtime meanwhile).
async fn run(program: &str, args: Vec<String>) -> Output {
    let shown = format!("{program} {}", args.join(" "));
    let program = program.to_string();
    let out = tokio::task::spawn_blocking(move || Command::new(program).args(args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{shown}: {e}"));
    eprintln!(
        "$ {shown}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args.iter().map(|s| s.to_string()).collect()).await;
    assert!(out.status.success(), "{program} {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// qemu-io commands against `url`; every command must succeed and every pattern match.
async fn qemu_io(url: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(url);
    let out = run_ok("qemu-io", &args).await;
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Deterministic bytes (xorshift), with zero runs: whole MiBs, and a partial run inside
/// every third MiB, so that both aligned and unaligned zero regions occur.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, b) in v.iter_mut().enumerate() {
        let mib = i >> 20;
        let within = i & (MIB as usize - 1);
        if mib % 4 == 1 || (mib % 3 == 0 && (100_000..300_000).contains(&within)) {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_img_convert_in_and_compare() {
    let size = 24 * MIB;
    let s = Served::start("nbd-convert", "disk", size, NbdConfig::volume("disk")).await;
    // Something to overwrite: stale data where the image has zeros must not survive.
    s.client
        .write("disk", MIB, &vec![0xee; MIB as usize])
        .await
        .unwrap();

    let data = image(size as usize, 42);
    let file = s.peers.dir().join("image.raw");
    write_file(&file, &data);
    let f = file.to_str().unwrap();
    let url = s.url("disk");
    run_ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", f, &url],
    )
    .await;
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", f, &url]).await;

    // Byte for byte through the volume client, past the NBD layer.
    let back = s.read("disk", 0, size as usize).await;
    assert!(back == data, "volume content differs from the image");
    let info = run_ok("qemu-img", &["info", "--output=json", &url]).await;
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );

    // A changed byte must make compare fail: the check above can fail.
    s.client
        .write("disk", 5 * MIB + 3, &[data[(5 * MIB + 3) as usize] ^ 1])
        .await
        .unwrap();
    let out = run(
        "qemu-img",
        ["compare", "-f", "raw", "-F", "raw", f, &url]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "compare missed a difference");

    let stats = s.stop().await;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(stats.writes.load(Relaxed) > 0);
    assert!(stats.bytes_written.load(Relaxed) > 0);
    assert!(
        stats.flushes.load(Relaxed) > 0,
        "convert flushes at the end"
    );
    assert_eq!(stats.protocol_errors.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_io_patterns_discard_and_write_zeroes() {
    let s = Served::start("nbd-io", "disk", 8 * MIB, NbdConfig::volume("disk")).await;
    let url = s.url("disk");
    qemu_io(
        &url,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Unaligned, crossing a 1 MiB block boundary.
            "write -P 0xcd 1048000 3000",
            "read -P 0xcd 1048000 3000",
            "read -P 0xab 0 1000",
            // Never written: zeros.
            "read -P 0 4M 64k",
            // FUA write.
            "write -f -P 0x11 2M 8k",
            "flush",
        ],
    )
    .await;
    assert_eq!(s.read("disk", 0, 65536).await, vec![0xab; 65536]);
    assert_eq!(s.read("disk", 1_048_000, 3000).await, vec![0xcd; 3000]);
    assert_eq!(s.read("disk", 2 * MIB, 8192).await, vec![0x11; 8192]);

    // Discard a whole block and part of another; write-zeroes over data; NO_HOLE variant.
    qemu_io(
        &url,
        &[
            "write -P 0x77 3M 1M",
            "write -P 0x66 5M 256k",
            "discard 3M 1M",
            "read -P 0 3M 1M",
            "write -z 5M 64k",
            "read -P 0 5M 64k",
            "read -P 0x66 5308416 64k",
            // -z without -u asks for NO_HOLE: zeros are stored.
            "write -P 0x55 6M 128k",
            "write -z 6M 4k",
            "read -P 0 6M 4k",
            "read -P 0x55 6295552 124k",
            "write -z -u 6M 128k",
            "read -P 0 6M 128k",
        ],
    )
    .await;
    assert_eq!(
        s.read("disk", 3 * MIB, MIB as usize).await,
        vec![0; MIB as usize]
    );
    assert_eq!(s.read("disk", 5 * MIB, 65536).await, vec![0; 65536]);
    assert_eq!(
        s.read("disk", 5 * MIB + 65536, 65536).await,
        vec![0x66; 65536]
    );

    // A pattern check that must fail does: qemu-io's verification is live.
    let out = run(
        "qemu-io",
        ["-f", "raw", "-c", "read -P 0x99 0 4k", &url]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");

    // Out of range through qemu: refused, nothing written.
    let out = run(
        "qemu-io",
        ["-f", "raw", "-c", "write -P 1 8M 4k", &url]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("failed"), "{text}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_connections_and_deep_queues() {
    let s = Served::start("nbd-multi", "disk", 16 * MIB, NbdConfig::volume("disk")).await;
    let url = s.url("disk");
    // Four qemu-io processes at once, each on its own 2 MiB region and pattern, writing with
    // many requests in flight (aio_write) and reading back.
    let mut jobs = Vec::new();
    for i in 0..4u64 {
        let url = url.clone();
        let base = i * 2 * MIB;
        jobs.push(tokio::spawn(async move {
            let mut cmds = Vec::new();
            for k in 0..32u64 {
                cmds.push(format!(
                    "aio_write -P {} {} 64k",
                    0x10 + i,
                    base + k * 65536
                ));
            }
            cmds.push("aio_flush".into());
            cmds.push(format!("read -P {} {base} 2M", 0x10 + i));
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            qemu_io(&url, &refs).await;
        }));
    }
    // Meanwhile qemu-img bench: depth 32, 4 KiB writes of a pattern, over the upper half
    // exactly (it wraps around at the end of the image).
    let bench_args = [
        "bench",
        "-f",
        "raw",
        "-w",
        "-t",
        "none",
        "-d",
        "32",
        "-c",
        "2048",
        "-s",
        "4k",
        "-o",
        "8M",
        "--pattern=90",
        &url,
    ];
    let bench = run_ok("qemu-img", &bench_args);
    let (bench, _) = tokio::join!(bench, async {
        for j in jobs {
            j.await.unwrap();
        }
    });
    assert!(bench.contains("Run completed"), "{bench}");
    for i in 0..4u64 {
        let got = s.read("disk", i * 2 * MIB, 2 * MIB as usize).await;
        assert!(got.iter().all(|&b| b == 0x10 + i as u8), "region {i}");
    }
    // 2048 x 4 KiB from 8 MiB: the whole upper half, pattern 90.
    let got = s.read("disk", 8 * MIB, 8 * MIB as usize).await;
    assert!(got.iter().all(|&b| b == 90), "bench region");
    use std::sync::atomic::Ordering::Relaxed;
    assert!(s.stats.connections.load(Relaxed) >= 5);
    s.stop().await;
}

/// A minimal NBD client over a blocking unix socket, for what qemu never sends.
struct Raw(UnixStream);

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw(s);
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], &proto::NBDMAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &proto::IHAVEOPT.to_be_bytes());
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        r
    }

    /// Connects and sends fixed-newstyle + no-zeroes client flags.
    fn start(path: &Path) -> Raw {
        let mut r = Raw::connect(path);
        r.0.write_all(&3u32.to_be_bytes()).unwrap();
        r
    }

    fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// One option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.0.read_exact(&mut d).unwrap();
        (option, kind, d)
    }

    fn info_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_GO; returns (size, transmission flags) from NBD_INFO_EXPORT.
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.send_option(opt::GO, &Self::info_payload(name, &[3]));
        let mut export = None;
        loop {
            let (o, kind, d) = self.option_reply();
            assert_eq!(o, opt::GO);
            match kind {
                rep::INFO if u16::from_be_bytes([d[0], d[1]]) == 0 => {
                    export = Some((
                        u64::from_be_bytes(d[2..10].try_into().unwrap()),
                        u16::from_be_bytes([d[10], d[11]]),
                    ));
                }
                rep::INFO => {}
                rep::ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                k => panic!("GO failed: {k:#x} {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let mut b = Vec::new();
        b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&b).unwrap();
    }

    /// A simple reply: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// True once the server has closed the connection (EOF or reset), within the timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Runs blocking raw-socket code off the runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshake_options_by_hand() {
    let s = Served::start("nbd-opts", "disk", 4 * MIB, NbdConfig::volume("disk")).await;
    let path = s.socket.clone();
    blocking(move || {
        let mut c = Raw::start(&path);
        // LIST: one export, then ACK; LIST with data is invalid.
        c.send_option(opt::LIST, &[]);
        let (_, kind, d) = c.option_reply();
        assert_eq!(kind, rep::SERVER);
        assert_eq!(&d[4..], b"disk");
        assert_eq!(c.option_reply().1, rep::ACK);
        c.send_option(opt::LIST, b"x");
        assert_eq!(c.option_reply().1, rep::ERR_INVALID);
        // INFO: unknown export, malformed payload, then a good one with name and block size.
        c.send_option(opt::INFO, &Raw::info_payload("nope", &[]));
        assert_eq!(c.option_reply().1, rep::ERR_UNKNOWN);
        let mut bad = Raw::info_payload("disk", &[1]);
        bad.pop();
        c.send_option(opt::INFO, &bad);
        assert_eq!(c.option_reply().1, rep::ERR_INVALID);
        let mut bad = Raw::info_payload("disk", &[]);
        bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        c.send_option(opt::INFO, &bad);
        assert_eq!(c.option_reply().1, rep::ERR_INVALID);
        c.send_option(opt::INFO, &Raw::info_payload("disk", &[1, 3, 2, 999]));
        let mut seen = Vec::new();
        loop {
            let (o, kind, d) = c.option_reply();
            assert_eq!(o, opt::INFO);
            if kind == rep::ACK {
                break;
            }
            assert_eq!(kind, rep::INFO);
            let t = u16::from_be_bytes([d[0], d[1]]);
            match t {
                0 => {
                    assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 4 * MIB);
                    let flags = u16::from_be_bytes([d[10], d[11]]);
                    // HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, MULTI_CONN; not read-only.
                    assert_eq!(flags, 1 | 4 | 8 | 32 | 64 | 256);
                }
                1 => assert_eq!(&d[2..], b"disk"),
                3 => {
                    let w = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                    assert_eq!((w(2), w(6), w(10)), (1, 4096, 32 << 20));
                }
                _ => {}
            }
            seen.push(t);
        }
        seen.sort();
        assert_eq!(seen, [0, 1, 2, 3]);
        // Refused: structured replies, TLS, unknown options.
        c.send_option(opt::STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_reply().1, rep::ERR_UNSUP);
        c.send_option(opt::STARTTLS, &[]);
        assert_eq!(c.option_reply().1, rep::ERR_POLICY);
        c.send_option(4242, b"whatever");
        assert_eq!(c.option_reply().1, rep::ERR_UNSUP);
        // The default export name is the volume.
        assert_eq!(c.go(""), (4 * MIB, 1 | 4 | 8 | 32 | 64 | 256));
        c.request(cmd::DISC, 0, 0, 0, 0);
        assert!(c.closed_by_server());

        // ABORT ends the session with an ACK.
        let mut c = Raw::start(&path);
        c.send_option(opt::ABORT, &[]);
        assert_eq!(c.option_reply().1, rep::ACK);
        assert!(c.closed_by_server());

        // EXPORT_NAME without NO_ZEROES: size, flags, 124 zero bytes.
        let mut c = Raw::connect(&path);
        c.0.write_all(&1u32.to_be_bytes()).unwrap();
        c.send_option(opt::EXPORT_NAME, b"disk");
        let mut r = [0xffu8; 8 + 2 + 124];
        c.0.read_exact(&mut r).unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 4 * MIB);
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(cmd::FLUSH, 0, 9, 0, 0);
        assert_eq!(c.reply(), (0, 9));
        // EXPORT_NAME of an unknown export: the only answer is to hang up.
        let mut c = Raw::start(&path);
        c.send_option(opt::EXPORT_NAME, b"other");
        assert!(c.closed_by_server());
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_by_hand_checked_and_pipelined() {
    let s = Served::start("nbd-reqs", "disk", 4 * MIB, NbdConfig::volume("disk")).await;
    s.client.write("disk", 0, &[7u8; 8192]).await.unwrap();
    let path = s.socket.clone();
    blocking(move || {
        let mut c = Raw::start(&path);
        c.go("disk");
        let size = 4 * MIB;
        // Out of range: read EINVAL, write ENOSPC (its payload is skipped), trim EINVAL,
        // write-zeroes ENOSPC; over-long read EINVAL; unknown command and flags EINVAL.
        c.request(cmd::READ, 0, 1, size - 10, 20);
        assert_eq!(c.reply(), (errno::EINVAL, 1));
        c.request(cmd::WRITE, 0, 2, size - 10, 20);
        c.0.write_all(&[0xaa; 20]).unwrap();
        assert_eq!(c.reply(), (errno::ENOSPC, 2));
        c.request(cmd::TRIM, 0, 3, size, 1);
        assert_eq!(c.reply(), (errno::EINVAL, 3));
        c.request(cmd::WRITE_ZEROES, 0, 4, u64::MAX, 2);
        assert_eq!(c.reply(), (errno::ENOSPC, 4));
        c.request(cmd::READ, 0, 5, 0, (32 << 20) + 1);
        assert_eq!(c.reply(), (errno::EINVAL, 5));
        c.request(5, 0, 6, 0, 0);
        assert_eq!(c.reply(), (errno::EINVAL, 6));
        c.request(cmd::READ, 0x8000, 7, 0, 512);
        assert_eq!(c.reply(), (errno::EINVAL, 7));
        c.request(cmd::WRITE, 2, 8, 0, 4);
        c.0.write_all(&[0xbb; 4]).unwrap();
        assert_eq!(c.reply(), (errno::EINVAL, 8));
        // A write far over the maximum is refused and its payload skipped: still in step.
        let big = (32 << 20) + 4096;
        c.request(cmd::WRITE, 0, 9, 0, big);
        c.0.write_all(&vec![0xcc; big as usize]).unwrap();
        assert_eq!(c.reply(), (errno::EINVAL, 9));
        // Zero-length requests succeed and change nothing.
        c.request(cmd::READ, 0, 10, 0, 0);
        assert_eq!(c.reply(), (0, 10));
        c.request(cmd::WRITE, 0, 11, size, 0);
        assert_eq!(c.reply(), (0, 11));

        // Pipelined: 64 reads of distinct 4 KiB blocks, all sent before any reply is read;
        // every handle answered exactly once with its data.
        c.request(cmd::WRITE, 0, 100, 64 * 4096, 4096);
        c.0.write_all(&[9u8; 4096]).unwrap();
        assert_eq!(c.reply(), (0, 100));
        for h in 0..64u64 {
            c.request(cmd::READ, 0, 1000 + h, h * 4096, 4096);
        }
        let mut seen = [false; 64];
        for _ in 0..64 {
            let (e, h) = c.reply();
            assert_eq!(e, 0);
            let i = (h - 1000) as usize;
            assert!(
                !std::mem::replace(&mut seen[i], true),
                "handle {h} answered twice"
            );
            let mut d = vec![0u8; 4096];
            c.0.read_exact(&mut d).unwrap();
            let want = if i < 2 { 7 } else { 0 };
            assert!(d.iter().all(|&b| b == want), "block {i}");
        }
        // Pipelined writes then FLUSH with garbage in its reserved fields (as Linux sends).
        for h in 0..32u64 {
            c.request(cmd::WRITE, 1, 2000 + h, MIB + h * 512, 512);
            c.0.write_all(&[h as u8; 512]).unwrap();
        }
        let mut got: Vec<u64> = (0..32)
            .map(|_| c.reply())
            .map(|(e, h)| {
                assert_eq!(e, 0);
                h
            })
            .collect();
        got.sort();
        assert_eq!(got, (2000..2032).collect::<Vec<_>>());
        c.request(cmd::FLUSH, 0, 3000, 12345, 0);
        assert_eq!(c.reply(), (0, 3000));
        c.request(cmd::DISC, 0, 0, 0, 0);
        assert!(c.closed_by_server());
    })
    .await;
    for h in 0..32u64 {
        assert_eq!(s.read("disk", MIB + h * 512, 512).await, vec![h as u8; 512]);
    }
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(s.stats.refused.load(Relaxed), 9);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_disconnects_cleanly_and_the_server_survives() {
    let s = Served::start("nbd-garbage", "disk", 4 * MIB, NbdConfig::volume("disk")).await;
    let path = s.socket.clone();
    // A client in transmission stays usable through all of it.
    let steady = {
        let path = path.clone();
        blocking(move || {
            let mut c = Raw::start(&path);
            c.go("disk");
            c
        })
        .await
    };
    let p = path.clone();
    blocking(move || {
        // Random bytes instead of client flags.
        let mut c = Raw::connect(&p);
        c.0.write_all(&[0x5a; 64]).unwrap();
        assert!(c.closed_by_server());
        // Unknown client flag bits.
        let mut c = Raw::connect(&p);
        c.0.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
        assert!(c.closed_by_server());
        // Bad option magic.
        let mut c = Raw::start(&p);
        c.0.write_all(&[0u8; 16]).unwrap();
        assert!(c.closed_by_server());
        // An option claiming 4 GiB of data.
        let mut c = Raw::start(&p);
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt::GO.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        c.0.write_all(&b).unwrap();
        assert!(c.closed_by_server());
        // Garbage after a good GO, with a request in flight before it.
        let mut c = Raw::start(&p);
        c.go("disk");
        c.request(cmd::READ, 0, 1, 0, 4096);
        c.0.write_all(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
            .unwrap();
        // The accepted read is still answered before the hang-up.
        assert_eq!(c.reply(), (0, 1));
        let mut d = vec![0u8; 4096];
        c.0.read_exact(&mut d).unwrap();
        assert!(c.closed_by_server());
        // A client that vanishes mid-request.
        let mut c = Raw::start(&p);
        c.go("disk");
        c.request(cmd::WRITE, 0, 1, 0, 4096);
        c.0.write_all(&[1u8; 100]).unwrap();
        drop(c);
    })
    .await;
    // The steady client and a fresh qemu-io still work.
    let mut steady = blocking(move || {
        let mut c = steady;
        c.request(cmd::WRITE, 0, 5, 8192, 4);
        c.0.write_all(b"okay").unwrap();
        assert_eq!(c.reply(), (0, 5));
        c
    })
    .await;
    assert_eq!(s.read("disk", 8192, 4).await, b"okay");
    qemu_io(&s.url("disk"), &["write -P 0x42 0 4k", "read -P 0x42 0 4k"]).await;
    blocking(move || {
        steady.request(cmd::DISC, 0, 0, 0, 0);
        assert!(steady.closed_by_server());
    })
    .await;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(s.stats.protocol_errors.load(Relaxed) >= 5, "{:?}", s.stats);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_volumes_over_tcp_with_read_only_snapshots() {
    let mut config = NbdConfig::all();
    config.tcp = Some("127.0.0.1:0".parse().unwrap());
    let s = Served::start("nbd-all", "disk", 4 * MIB, config).await;
    s.client.write("disk", 0, &[0x31; 4096]).await.unwrap();
    s.client.snapshot("disk", "disk-snap").await.unwrap();
    s.client.write("disk", 0, &[0x32; 4096]).await.unwrap();
    let port = s.tcp.unwrap().port();
    let tcp = |e: &str| format!("nbd://127.0.0.1:{port}/{e}");
    qemu_io(&tcp("disk"), &["read -P 0x32 0 4k", "write -P 0x33 4k 4k"]).await;
    let snap = tcp("disk-snap");
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x31 0 4k",
            "-c",
            "read -P 0 4k 4k",
            &snap,
        ],
    )
    .await;
    // A snapshot is exported read-only: qemu will not open it for writing, and a client that
    // writes anyway gets EPERM; the content is unchanged.
    let out = run(
        "qemu-io",
        ["-f", "raw", "-c", "write -P 1 0 4k", &snap]
            .map(String::from)
            .to_vec(),
    )
    .await;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "{text}"
    );
    let path = s.socket.clone();
    blocking(move || {
        let mut c = Raw::start(&path);
        let (_, flags) = c.go("disk-snap");
        assert_ne!(flags & 2, 0, "READ_ONLY flag");
        c.request(cmd::WRITE, 0, 1, 0, 4);
        c.0.write_all(b"nope").unwrap();
        assert_eq!(c.reply(), (errno::EPERM, 1));
        c.request(cmd::TRIM, 0, 2, 0, 4096);
        assert_eq!(c.reply(), (errno::EPERM, 2));
    })
    .await;
    assert_eq!(s.read("disk-snap", 0, 4096).await, vec![0x31; 4096]);
    // The export list, as qemu-nbd sees it, names both.
    let list = run_ok("qemu-nbd", &["--list", "-k", s.socket.to_str().unwrap()]).await;
    assert!(
        list.contains("disk") && list.contains("disk-snap"),
        "{list}"
    );
    // No default export, and unknown names are refused.
    let out = run(
        "qemu-io",
        ["-f", "raw", "-c", "read 0 4k", &tcp("missing")]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(!out.status.success());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_refuses_non_loopback_and_live_sockets() {
    let peers = ScratchPeerSet::start("nbd-bind", test_xseg()).expect("peer set");
    let client = Arc::new(peers.client().unwrap());
    let mut c = NbdConfig::volume("disk");
    c.tcp = Some("0.0.0.0:0".parse().unwrap());
    assert!(matches!(
        NbdServer::bind(client.clone(), c),
        Err(node::nbd::NbdError::NotLoopback(_))
    ));
    let sock = peers.dir().join("x.sock");
    let mut c = NbdConfig::volume("disk");
    c.unix_socket = Some(sock.clone());
    let first = NbdServer::bind(client.clone(), c.clone()).unwrap();
    assert!(matches!(
        NbdServer::bind(client.clone(), c.clone()),
        Err(node::nbd::NbdError::SocketInUse(_))
    ));
    drop(first);
    assert!(!sock.exists());
    // A regular file is never replaced.
    std::fs::write(&sock, b"precious").unwrap();
    assert!(matches!(
        NbdServer::bind(client.clone(), c),
        Err(node::nbd::NbdError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_is_owner_only_unless_widened() {
    use std::os::unix::fs::PermissionsExt;
    let peers = ScratchPeerSet::start("nbd-mode", test_xseg()).expect("peer set");
    let client = Arc::new(peers.client().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("disk.sock");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // Whatever the umask would have given (it is not touched here: the mode is set exactly).
    let mut c = NbdConfig::volume("disk");
    c.unix_socket = Some(sock.clone());
    assert_eq!(c.socket_mode, 0o600);
    let server = NbdServer::bind(client.clone(), c.clone()).unwrap();
    assert_eq!(mode(&sock), 0o600);
    // Nothing but the socket is left beside it (the directory it was bound in is gone).
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(dir.path()), ["disk.sock"]);
    // The socket moved into place is the listening one: a connection reaches its backlog
    // (the server is bound, not yet serving).
    UnixStream::connect(&sock).expect("connect to the renamed socket");
    drop(server);
    // Nobody listens once the server is gone, and the file went with it.
    assert!(UnixStream::connect(&sock).is_err());
    assert!(!sock.exists());

    c.socket_mode = 0o660;
    let server = NbdServer::bind(client.clone(), c.clone()).unwrap();
    assert_eq!(mode(&sock), 0o660);
    drop(server);

    // Modes that lock the owner out, or are not permission bits, are refused before anything
    // is created.
    for bad in [0o400, 0o060, 0o1777, 0o10600] {
        c.socket_mode = bad;
        let e = NbdServer::bind(client.clone(), c.clone()).unwrap_err();
        assert!(
            matches!(e, node::nbd::NbdError::Config(_)),
            "mode {bad:o}: {e}"
        );
        assert_eq!(names(dir.path()), Vec::<String>::new(), "mode {bad:o}");
    }
}
