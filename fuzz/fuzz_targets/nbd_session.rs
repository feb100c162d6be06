//! A whole NBD session against the real server: the fuzz bytes are everything a client sends
//! (client flags, options, then transmission requests and their data), over a unix socket to
//! an `NbdServer` on a peer set running in this process. Whatever arrives, the server must
//! answer or hang up, and close the connection once the client has stopped sending.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use node::nbd::bench::ScratchPeerSet;
use node::nbd::{NbdConfig, NbdServer};

/// The tag in the names of the scratch directory and segment (e2e/fuzz.sh removes them).
const TAG: &str = "nbdfuzz";

struct Served {
    socket: PathBuf,
    _peers: ScratchPeerSet,
    _runtime: tokio::runtime::Runtime,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        // libFuzzer's main is not Rust's: a write to a socket the server closed must be an
        // error, not a SIGPIPE that ends the run.
        // SAFETY: setting a signal disposition to SIG_IGN has no handler to get wrong.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let peers = ScratchPeerSet::start(
            TAG,
            xseg::Config {
                nr_ports: 64,
                dynamic_start: peers::peerset::Ports::DYNAMIC_START,
                nr_requests: 256,
                buffer_classes: vec![(4 << 10, 128), (64 << 10, 32), (1 << 20, 8)],
            },
        )
        .expect("peer set");
        let client = Arc::new(peers.client().expect("client"));
        let socket = peers.dir().join("nbd.sock");
        runtime.block_on(async {
            client
                .create("v", 4 << 20, Some(1 << 20))
                .await
                .expect("create volume v");
            let mut config = NbdConfig::all();
            config.unix_socket = Some(socket.clone());
            config.max_io = 1 << 20;
            config.inflight_bytes = 4 << 20;
            config.handshake_timeout = Duration::from_secs(5);
            let server = NbdServer::bind(client.clone(), config).expect("bind");
            tokio::spawn(server.run(std::future::pending::<()>()));
        });
        Served {
            socket,
            _peers: peers,
            _runtime: runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = served();
    let mut conn = UnixStream::connect(&s.socket).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The server may hang up part-way: a failed write is an answer, not a finding.
    let _ = conn.write_all(data);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    // Each request header (28 bytes) earns at most one reply of max_io bytes.
    let bound = (data.len() / 28 + 1) * ((1 << 20) + 16) + (1 << 20);
    let mut reply = Vec::new();
    let mut buf = [0u8; 64 << 10];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                assert!(reply.len() <= bound, "the server sends more than was asked");
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }
});
