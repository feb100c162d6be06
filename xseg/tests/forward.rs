//! A forwarding peer (vlmc's role) that holds a reply on its way back: the request still
//! belongs to the original sender, so dropping it or dying with it must send it on as an
//! error, never free it under the sender (which would then reuse its index while a caller
//! still waits for it).

mod common;

use std::io::BufReader;
use std::time::{Duration, Instant};

use common::*;
use xseg::{Op, Port, Request, Segment, Status};

const FORWARDER: u32 = 1;
const SERVER: u32 = 2;

/// Waits for the next reply on `port`, at most 10 s.
fn next_reply(port: &mut Port) -> Option<Request> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(rep) = port.receive() {
            return Some(rep);
        }
        port.wait(Duration::from_millis(50));
    }
    None
}

/// Waits for the next request on `port`, at most 10 s.
fn next_request(port: &mut Port) -> Request {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(req) = port.accept() {
            return req;
        }
        port.wait(Duration::from_millis(50));
    }
    panic!("no request arrived");
}

/// client → forwarder → server, answered by the server; returns the forwarder's view of the
/// reply and the client's request index.
fn round_trip_to_forwarder(
    client: &Port,
    forwarder: &mut Port,
    server: &mut Port,
) -> (Request, u32) {
    let req = client.alloc(Op::Write, b"v", 4096).unwrap();
    let index = req.index();
    client.submit(req, FORWARDER).map_err(|(e, _)| e).unwrap();
    let req = next_request(forwarder);
    forwarder.forward(req, SERVER).map_err(|(e, _)| e).unwrap();
    let mut req = next_request(server);
    req.complete(4096);
    server.respond(req);
    let rep = next_reply(forwarder).expect("reply back at the forwarder");
    assert_eq!(rep.index(), index);
    (rep, index)
}

#[test]
fn forwarder_dropping_a_reply_sends_it_on_as_an_error() {
    let s = Scratch::new("fwd-drop", &small_config());
    let mut client = s.seg.bind_dynamic("client").unwrap();
    let mut forwarder = s.seg.bind(FORWARDER, "forwarder").unwrap();
    let mut server = s.seg.bind(SERVER, "server").unwrap();

    let (rep, index) = round_trip_to_forwarder(&client, &mut forwarder, &mut server);
    // The forwarder has nobody waiting for this reply (its task is gone) and drops it.
    drop(rep);
    // The request still belongs to the client: it must not be back in the pool...
    let other = client.alloc(Op::Read, b"v", 0).unwrap();
    assert_ne!(
        other.index(),
        index,
        "the client's request was freed under it"
    );
    client.free(other);
    // ...and the client gets it back, failed.
    let rep = next_reply(&mut client).expect("the client never got its request back");
    assert_eq!(rep.index(), index);
    assert_eq!(rep.status(), Status::Io);
    client.free(rep);
    assert_eq!(s.seg.requests_in_use(), 0, "requests leaked");
}

#[test]
fn forwarder_that_fails_to_forward_again_still_owes_a_reply() {
    let s = Scratch::new("fwd-full", &small_config());
    let mut client = s.seg.bind_dynamic("client").unwrap();
    let mut forwarder = s.seg.bind(FORWARDER, "forwarder").unwrap();
    let req = client.alloc(Op::Write, b"v", 0).unwrap();
    let index = req.index();
    client.submit(req, FORWARDER).map_err(|(e, _)| e).unwrap();
    let req = next_request(&mut forwarder);
    // Nobody serves port 5: the forward fails and hands the request back; dropping it then
    // must answer the client, not free its request.
    let (_, back) = forwarder.forward(req, 5).unwrap_err();
    drop(back);
    let rep = next_reply(&mut client).expect("the client never got its request back");
    assert_eq!(rep.index(), index);
    assert_ne!(rep.status(), Status::Ok);
    client.free(rep);
    assert_eq!(s.seg.requests_in_use(), 0, "requests leaked");
}

#[test]
fn forwarder_killed_holding_a_reply_fails_it_back() {
    const TEST: &str = "forwarder_killed_holding_a_reply_fails_it_back";
    if let Some((role, path)) = role() {
        assert_eq!(role, "forwarder");
        let seg = Segment::attach(&path).unwrap();
        let mut forwarder = seg.bind(FORWARDER, "forwarder").unwrap();
        say("ready");
        let req = next_request(&mut forwarder);
        forwarder.forward(req, SERVER).map_err(|(e, _)| e).unwrap();
        let rep = next_reply(&mut forwarder).expect("reply back at the forwarder");
        // Killed right after taking the reply back, before passing it on.
        std::mem::forget(rep);
        say("holding");
        loop {
            std::thread::park();
        }
    }
    let s = Scratch::new("fwd-kill", &small_config());
    let mut client = s.seg.bind_dynamic("client").unwrap();
    let mut server = s.seg.bind(SERVER, "server").unwrap();
    let mut child = spawn_child(TEST, "forwarder", &s.path, &[]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    expect_line(&mut out, "ready");

    let req = client.alloc(Op::Write, b"v", 4096).unwrap();
    let index = req.index();
    client.submit(req, FORWARDER).map_err(|(e, _)| e).unwrap();
    let mut req = next_request(&mut server);
    req.complete(4096);
    server.respond(req);
    expect_line(&mut out, "holding");
    child.kill().unwrap();
    child.wait().unwrap();
    s.seg.reap();
    let rep = next_reply(&mut client).expect("the request died with the forwarder");
    assert_eq!(rep.index(), index);
    assert_eq!(rep.status(), Status::PeerGone);
    client.free(rep);
    assert_eq!(s.seg.requests_in_use(), 0, "requests leaked");
}
