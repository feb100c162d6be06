//! Helpers shared by the xseg integration tests: scratch segments and child processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;

use xseg::{Config, Peer, Request, Segment, Sender};

/// A segment file removed on drop.
pub struct Scratch {
    pub path: PathBuf,
    pub seg: Arc<Segment>,
}

impl Scratch {
    pub fn new(tag: &str, config: &Config) -> Scratch {
        let path = PathBuf::from(format!(
            "/dev/shm/xseg-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let seg = Segment::create(&path, config).expect("create segment");
        Scratch { path, seg }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A small config so tests run fast and exhaust pools quickly.
pub fn small_config() -> Config {
    Config {
        nr_ports: 16,
        dynamic_start: 4,
        nr_requests: 256,
        buffer_classes: vec![(4096, 128), (64 << 10, 16)],
    }
}

/// Answers each request with its data XOR 0x5a, serviced = data length.
pub struct Echo;

impl Peer for Echo {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        let n = match req.data_mut() {
            Ok(d) => {
                for b in d.iter_mut() {
                    *b ^= 0x5a;
                }
                d.len() as u64
            }
            Err(s) => {
                req.fail(s);
                tx.respond(req);
                return;
            }
        };
        req.complete(n);
        tx.respond(req);
    }
}

/// Deterministic payload for (client, sequence).
pub fn pattern(client: u64, seq: u64, buf: &mut [u8]) {
    let mut x =
        client.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Re-runs this test binary as a child playing `role` in test `test`.
pub fn spawn_child(test: &str, role: &str, seg: &PathBuf, extra: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("XSEG_TEST_ROLE", role)
        .env("XSEG_TEST_SEGMENT", seg)
        .stdout(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn child")
}

/// Reads lines from a child until one starts with `prefix`; panics if the child ends first.
pub fn expect_line(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited before printing {prefix:?}");
        // The harness prints "test NAME ... " without a newline, so a marker may share a line.
        if let Some(at) = line.find(&format!("@@{prefix}")) {
            return line[at + 2..].trim().to_string();
        }
    }
}

pub fn role() -> Option<(String, PathBuf)> {
    let role = std::env::var("XSEG_TEST_ROLE").ok()?;
    let seg = std::env::var("XSEG_TEST_SEGMENT").ok()?;
    Some((role, PathBuf::from(seg)))
}

/// Tells the parent something, straight on fd 1: the test harness may capture `println!`.
pub fn say(line: &str) {
    let text = format!("\n@@{line}\n");
    // SAFETY: writes a valid buffer to fd 1, which the parent set up as a pipe.
    unsafe { libc::write(1, text.as_ptr().cast(), text.len()) };
}
