//! A peer killed with SIGKILL while it holds requests: senders get errors, the port is rebound,
//! and nothing leaks. Also the other way round: a sender killed while its requests are served.

mod common;

use std::io::BufReader;
use std::time::{Duration, Instant};

use common::*;
use xseg::{Op, Peer, Request, Runner, Segment, Sender, Status};

const PORT: u32 = 1;
const HELD: u64 = 8;

/// Accepts requests and never answers them, like a peer stuck on a dead disk.
struct Holder(Vec<Request>);

impl Peer for Holder {
    fn request(&mut self, req: Request, _tx: &Sender) {
        self.0.push(req);
        if self.0.len() as u64 == HELD {
            say(&format!("held {HELD}"));
        }
    }
}

#[test]
fn killed_server_fails_back_in_flight_requests_and_port_is_rebound() {
    if let Some((role, path)) = role() {
        let seg = Segment::attach(&path).unwrap();
        let mut runner = Runner::new(seg.bind(PORT, &role).unwrap());
        say("ready");
        match role.as_str() {
            "holder" => runner.run(&mut Holder(Vec::new())),
            _ => runner.run(&mut Echo),
        }
        return;
    }
    const TEST: &str = "killed_server_fails_back_in_flight_requests_and_port_is_rebound";
    let s = Scratch::new("kill", &small_config());
    let mut holder = spawn_child(TEST, "holder", &s.path, &[]);
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    expect_line(&mut out, "ready");

    let mut client = s.seg.bind_dynamic("client").unwrap();
    for i in 0..HELD {
        let mut req = client.alloc(Op::Write, b"v", 4096).unwrap();
        req.set_tag(i);
        client.submit(req, PORT).map_err(|(e, _)| e).unwrap();
    }
    expect_line(&mut out, "held");

    holder.kill().unwrap();
    holder.wait().unwrap();
    let killed = Instant::now();
    let mut failed = Vec::new();
    while (failed.len() as u64) < HELD {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "only {} of {HELD} requests came back after the kill",
            failed.len()
        );
        match client.receive() {
            Some(rep) => {
                assert_eq!(rep.status(), Status::PeerGone);
                failed.push(rep.tag());
                client.free(rep);
            }
            None => {
                client.wait(Duration::from_millis(100));
            }
        }
    }
    failed.sort();
    assert_eq!(failed, (0..HELD).collect::<Vec<_>>());
    eprintln!("senders saw errors {:?} after the kill", killed.elapsed());

    // A new peer binds the same port and serves.
    let mut echo = spawn_child(TEST, "echo", &s.path, &[]);
    let mut out = BufReader::new(echo.stdout.take().unwrap());
    expect_line(&mut out, "ready");
    let mut req = client.alloc(Op::Write, b"v", 16).unwrap();
    req.write_data(&[1; 16]).unwrap();
    let rep = client.call(req, PORT, Duration::from_secs(10)).unwrap();
    assert_eq!(rep.status(), Status::Ok);
    assert_eq!(rep.data().unwrap(), &[1 ^ 0x5a; 16]);
    client.free(rep);
    echo.kill().unwrap();
    echo.wait().unwrap();
    drop(client);
    s.seg.reap();
    assert_eq!(s.seg.requests_in_use(), 0, "requests leaked");
    assert_eq!(s.seg.buffers_in_use(), 0, "buffers leaked");
}

#[test]
fn killed_sender_leaves_nothing_behind() {
    if let Some((_, path)) = role() {
        let seg = Segment::attach(&path).unwrap();
        let client = seg.bind_dynamic("doomed").unwrap();
        for _ in 0..HELD {
            let req = client.alloc(Op::Write, b"v", 4096).unwrap();
            client.submit(req, PORT).map_err(|(e, _)| e).unwrap();
        }
        // Also a request allocated but never sent.
        std::mem::forget(client.alloc(Op::Read, b"v", 4096).unwrap());
        say("sent");
        loop {
            std::thread::park();
        }
    }
    let s = Scratch::new("killc", &small_config());
    let mut server = s.seg.bind(PORT, "server").unwrap();
    let mut child = spawn_child(
        "killed_sender_leaves_nothing_behind",
        "client",
        &s.path,
        &[],
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut out, "sent");
    let mut held = Vec::new();
    while (held.len() as u64) < HELD {
        match server.accept() {
            Some(r) => held.push(r),
            None => {
                server.wait(Duration::from_millis(100));
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    s.seg.reap();
    // Answering requests whose sender died frees them instead of queueing them forever.
    for mut r in held {
        r.complete(0);
        server.respond(r);
    }
    assert_eq!(s.seg.requests_in_use(), 0, "requests leaked");
    assert_eq!(s.seg.buffers_in_use(), 0, "buffers leaked");
}
