//! Separate processes exchange a million requests carrying data over one segment.
//!
//! Two server processes answer with the data transformed; two client processes keep many
//! requests in flight to both and check every reply byte. Nothing may be lost or duplicated.

mod common;

use std::io::BufReader;
use std::time::Duration;

use common::*;
use xseg::{Op, Runner, Segment, Status};

const SERVERS: [u32; 2] = [1, 2];
const CLIENTS: u64 = 2;
const PAYLOAD: usize = 256;
const IN_FLIGHT: usize = 32;

fn per_client() -> u64 {
    std::env::var("XSEG_TEST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
        / CLIENTS
}

#[test]
fn four_processes_exchange_a_million_checked_requests() {
    if let Some((role, path)) = role() {
        let seg = Segment::attach(&path).unwrap();
        if let Some(port) = role.strip_prefix("server") {
            let port: u32 = port.parse().unwrap();
            let mut runner = Runner::new(seg.bind(port, "echo").unwrap());
            say("ready");
            runner.run(&mut Echo);
        } else if let Some(id) = role.strip_prefix("client") {
            std::process::exit(client(&seg, id.parse().unwrap()));
        }
        return;
    }

    let s = Scratch::new("mp", &xseg::Config::default());
    let mut servers = Vec::new();
    for p in SERVERS {
        let mut child = spawn_child(
            "four_processes_exchange_a_million_checked_requests",
            &format!("server{p}"),
            &s.path,
            &[],
        );
        let mut out = BufReader::new(child.stdout.take().unwrap());
        expect_line(&mut out, "ready");
        servers.push(child);
    }
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            spawn_child(
                "four_processes_exchange_a_million_checked_requests",
                &format!("client{c}"),
                &s.path,
                &[],
            )
        })
        .collect();
    for mut c in clients {
        let status = c.wait().unwrap();
        assert!(status.success(), "client failed: {status}");
    }
    let served: u64 = SERVERS
        .iter()
        .map(|&p| s.seg.port_stats(p).unwrap().accepted)
        .sum();
    assert_eq!(served, per_client() * CLIENTS);
    for mut srv in servers {
        srv.kill().unwrap();
        srv.wait().unwrap();
    }
}

/// Sends `per_client()` requests, spread over both servers, and checks every reply.
fn client(seg: &std::sync::Arc<Segment>, id: u64) -> i32 {
    let mut port = seg.bind_dynamic("client").unwrap();
    let total = per_client();
    let (mut sent, mut done, mut inflight) = (0u64, 0u64, 0usize);
    let mut seen = vec![false; total as usize];
    let mut want = [0u8; PAYLOAD];
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while done < total {
        while inflight < IN_FLIGHT && sent < total {
            let mut req = port.alloc(Op::Write, b"mp", PAYLOAD as u64).unwrap();
            pattern(id, sent, &mut want);
            req.write_data(&want).unwrap();
            req.set_tag(sent);
            let dst = SERVERS[(sent % 2) as usize];
            if let Err((e, _)) = port.submit(req, dst) {
                eprintln!("submit failed: {e}");
                return 2;
            }
            sent += 1;
            inflight += 1;
        }
        let mut got = false;
        while let Some(rep) = port.receive() {
            got = true;
            let seq = rep.tag();
            if rep.status() != Status::Ok || rep.serviced() != PAYLOAD as u64 {
                eprintln!("request {seq} failed: {}", rep.status());
                return 3;
            }
            if seq >= total || seen[seq as usize] {
                eprintln!("reply {seq} unexpected or duplicated");
                return 4;
            }
            seen[seq as usize] = true;
            pattern(id, seq, &mut want);
            let data = rep.data().unwrap();
            if data.len() != PAYLOAD || data.iter().zip(&want).any(|(g, w)| *g != w ^ 0x5a) {
                eprintln!("request {seq} came back with wrong data");
                return 5;
            }
            port.free(rep);
            done += 1;
            inflight -= 1;
        }
        if !got {
            if std::time::Instant::now() > deadline {
                eprintln!("gave up with {done} of {total} done");
                return 6;
            }
            port.wait(Duration::from_millis(100));
        }
    }
    0
}
