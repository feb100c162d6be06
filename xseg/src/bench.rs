//! `archip bench xseg`: request round trips over xseg against the same pattern over a Unix
//! socket pair, in one run, so the ratio is measured on the same machine at the same moment.
//!
//! Each round trip carries `payload` bytes to the server, which reads all of them, and returns
//! a reply without data (the shape of a block write). Besides the direct client-server pair,
//! a two-hop pipeline (client -> forwarder -> server, as client -> vlmc -> blocker) shows the
//! cost when more peers than cores are busy. An idle peer's CPU use is measured over a second.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::peer::{Peer, Runner};
use crate::port::Sender;
use crate::protocol::Op;
use crate::request::Request;
use crate::segment::Segment;
use crate::{Config, Port};

/// Latency summary of one scenario.
#[derive(Debug, Clone)]
pub struct Figures {
    pub requests: u64,
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Figures {
    fn from(mut samples: Vec<u64>, elapsed: Duration) -> Figures {
        samples.sort_unstable();
        let q = |f: f64| samples[((samples.len() as f64 * f) as usize).min(samples.len() - 1)];
        Figures {
            requests: samples.len() as u64,
            per_sec: samples.len() as f64 / elapsed.as_secs_f64(),
            p50_us: q(0.50) as f64 / 1000.0,
            p99_us: q(0.99) as f64 / 1000.0,
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"requests\":{},\"requests_per_sec\":{:.0},\"p50_us\":{:.3},\"p99_us\":{:.3}}}",
            self.requests, self.per_sec, self.p50_us, self.p99_us
        )
    }
}

/// Reads every byte, so neither transport gets away without touching the payload.
fn fold(data: &[u8]) -> u64 {
    data.chunks(8).fold(0u64, |acc, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        acc ^ u64::from_le_bytes(w)
    })
}

struct Sink;

impl Peer for Sink {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        let n = req.data().map(|d| (d.len(), fold(d)));
        let (len, sum) = n.unwrap_or((0, 0));
        req.set_tag(sum);
        req.complete(len as u64);
        tx.respond(req);
    }
}

/// Forwards every request to `next` and passes replies back: a vlmc stand-in.
struct Forwarder {
    next: u32,
}

impl Peer for Forwarder {
    fn request(&mut self, req: Request, tx: &Sender) {
        if let Err((_, mut req)) = tx.forward(req, self.next) {
            req.fail(crate::Status::PeerGone);
            tx.respond(req);
        }
    }
    fn reply(&mut self, req: Request, tx: &Sender) {
        tx.respond(req);
    }
}

fn xseg_round_trips(seg: &Arc<Segment>, dst: u32, payload: usize, n: u64) -> Figures {
    let mut client = seg.bind_dynamic("bench-client").expect("client port");
    let data = vec![0xa5u8; payload];
    let mut samples = Vec::with_capacity(n as usize);
    let warm = n / 10;
    let mut started = Instant::now();
    for i in 0..n + warm {
        if i == warm {
            samples.clear();
            started = Instant::now();
        }
        let t = Instant::now();
        let mut req = client
            .alloc(Op::Write, b"bench", payload as u64)
            .expect("alloc");
        if payload > 0 {
            req.write_data(&data).expect("data");
        }
        let rep = client
            .call(req, dst, Duration::from_secs(10))
            .expect("round trip");
        assert_eq!(rep.serviced(), payload as u64);
        client.free(rep);
        samples.push(t.elapsed().as_nanos() as u64);
    }
    Figures::from(samples, started.elapsed())
}

fn uds_round_trips(payload: usize, n: u64) -> Figures {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let server = std::thread::spawn(move || {
        let mut buf = vec![0u8; payload.max(8)];
        let mut hdr = [0u8; 8];
        loop {
            if b.read_exact(&mut hdr).is_err() {
                return;
            }
            let len = u64::from_le_bytes(hdr) as usize;
            if b.read_exact(&mut buf[..len]).is_err() {
                return;
            }
            let sum = fold(&buf[..len]);
            let mut reply = [0u8; 16];
            reply[..8].copy_from_slice(&(len as u64).to_le_bytes());
            reply[8..].copy_from_slice(&sum.to_le_bytes());
            if b.write_all(&reply).is_err() {
                return;
            }
        }
    });
    let mut msg = vec![0xa5u8; 8 + payload];
    msg[..8].copy_from_slice(&(payload as u64).to_le_bytes());
    let mut reply = [0u8; 16];
    let mut samples = Vec::with_capacity(n as usize);
    let warm = n / 10;
    let mut started = Instant::now();
    for i in 0..n + warm {
        if i == warm {
            samples.clear();
            started = Instant::now();
        }
        let t = Instant::now();
        a.write_all(&msg).expect("send");
        a.read_exact(&mut reply).expect("reply");
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = started.elapsed();
    drop(a);
    let _ = server.join();
    Figures::from(samples, elapsed)
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into ts.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs every scenario and returns one JSON object.
pub fn run(requests: u64) -> String {
    let path = std::path::PathBuf::from(format!("/dev/shm/archip-bench-{}", std::process::id()));
    let seg = Segment::create(&path, &Config::default()).expect("segment");
    let mut stoppers = Vec::new();
    let mut threads = Vec::new();
    let mut serve = |port: Port, peer: Box<dyn FnOnce(&mut Runner) + Send>| {
        let mut runner = Runner::new(port);
        stoppers.push(runner.stopper());
        threads.push(std::thread::spawn(move || peer(&mut runner)));
    };
    serve(
        seg.bind(1, "bench-sink").unwrap(),
        Box::new(|r| r.run(&mut Sink)),
    );
    serve(
        seg.bind(2, "bench-forwarder").unwrap(),
        Box::new(|r| r.run(&mut Forwarder { next: 1 })),
    );

    let mut out = Vec::new();
    let mut ratios = Vec::new();
    for payload in [0usize, 4096] {
        let x = xseg_round_trips(&seg, 1, payload, requests);
        let u = uds_round_trips(payload, requests);
        let hop2 = xseg_round_trips(&seg, 2, payload, requests / 2);
        let ratio = x.per_sec / u.per_sec;
        ratios.push(ratio);
        out.push(format!(
            "\"payload_{payload}\":{{\"xseg\":{},\"uds\":{},\"xseg_two_hops\":{},\"ratio_xseg_vs_uds\":{:.1},\"ratio_two_hops_vs_uds\":{:.1}}}",
            x.json(),
            u.json(),
            hop2.json(),
            ratio,
            hop2.per_sec / u.per_sec
        ));
    }

    // An idle peer: CPU time used by a serving thread that gets no work for one second.
    let idle_port = seg.bind(3, "bench-idle").unwrap();
    let mut runner = Runner::new(idle_port);
    let stop = runner.stopper();
    let idle = std::thread::spawn(move || {
        let before = thread_cpu();
        let wall = Instant::now();
        runner.run(&mut Sink);
        (thread_cpu() - before, wall.elapsed())
    });
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        std::thread::park_timeout(until - Instant::now());
    }
    stop.stop();
    let (cpu, wall) = idle.join().unwrap();
    for s in stoppers {
        s.stop();
    }
    for t in threads {
        let _ = t.join();
    }
    drop(seg);
    let _ = std::fs::remove_file(&path);
    format!(
        "{{\"bench\":\"xseg\",{},\"ratio_xseg_vs_uds\":{:.1},\"idle_peer_cpu_percent\":{:.3}}}",
        out.join(","),
        ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    )
}
