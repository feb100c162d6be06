//! Soak through the real binaries: `archip up` plus `archip export-nbd --all`, driven by
//! `qemu-io` over NBD with snapshots, clones, deletes, GC and QoS changes, and kill -9 of both
//! processes at random points, including while a `qemu-io` is writing.
//!
//! Ignored by default (it runs for minutes); CI runs it with a bounded duration:
//! `ARCHIP_SOAK_SECS=60 cargo test --test soak_nbd -- --ignored --nocapture`. Replay a run with
//! the `ARCHIP_SEED` it prints.
//!
//! The model: every 4 KiB block of every volume and snapshot holds one fill byte, and the model
//! keeps the set of bytes each block may hold. A write that a flush acknowledged narrows the
//! set to its byte; a write cut by a kill widens it to {old, new}. After every restart and at the
//! end, each volume and snapshot is exported to a file and every block is checked against it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ARCHIP: &str = env!("CARGO_BIN_EXE_archip");
/// Bound on waiting for a process to be ready (a debug build on a busy CI machine).
const WAIT: Duration = Duration::from_secs(120);
const BLOCK: usize = 4096;
const VOLUME_BLOCKS: usize = 2048; // 8 MiB, as created

/// What each block of one volume or snapshot may hold.
#[derive(Clone)]
struct Image(Vec<BTreeSet<u8>>);

impl Image {
    fn zero() -> Image {
        Image(vec![BTreeSet::from([0u8]); VOLUME_BLOCKS])
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `archip up` and its NBD export, restartable on the same data directory.
struct Stack {
    scratch: tempfile::TempDir,
    segment: PathBuf,
    up: Option<Child>,
    nbd: Option<Child>,
}

impl Stack {
    fn flags(&self) -> Vec<String> {
        let dir = self.scratch.path();
        vec![
            "--data-dir".into(),
            dir.join("data").display().to_string(),
            "--segment".into(),
            self.segment.display().to_string(),
            "--node".into(),
            "soak".into(),
            "--control".into(),
            dir.join("control.sock").display().to_string(),
        ]
    }

    fn socket(&self) -> PathBuf {
        self.scratch.path().join("nbd.sock")
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.scratch.path().join("up.log"))
            .expect("log");
        let mut child = Command::new(ARCHIP)
            .arg("up")
            .args(self.flags())
            .args(["--workers", "2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn archip up");
        let stdout = child.stdout.take().expect("stdout");
        self.up = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_default();
        assert!(
            line.starts_with("archip: ready"),
            "archip up did not become ready ({line:?}); log:\n{}",
            self.log()
        );
        let _ = std::fs::remove_file(self.socket());
        let nbd_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.scratch.path().join("nbd.log"))
            .expect("log");
        self.nbd = Some(
            Command::new(ARCHIP)
                .args(["export-nbd", "--all", "--socket"])
                .arg(self.socket())
                .args(self.flags())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(nbd_log)
                .spawn()
                .expect("spawn archip export-nbd"),
        );
        // Poll for the listening socket, bounded: a condition, not a sleep for its own sake.
        let deadline = Instant::now() + WAIT;
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "export-nbd never listened; log:\n{}",
                std::fs::read_to_string(self.scratch.path().join("nbd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        for c in [self.nbd.take(), self.up.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.scratch.path().join("up.log")).unwrap_or_default()
    }

    fn archip(&self, args: &[&str]) -> String {
        let out = Command::new(ARCHIP)
            .args(args)
            .args(self.flags())
            .stdin(Stdio::null())
            .output()
            .expect("run archip");
        assert!(
            out.status.success(),
            "archip {args:?} failed: {}\n{}\nup log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn qemu_io(&self, volume: &str, commands: &[String]) -> Command {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        cmd.arg(format!(
            "nbd+unix:///{volume}?socket={}",
            self.socket().display()
        ));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Exports `name` (volume or snapshot) and checks every block against the model.
    fn verify(&self, name: &str, image: &Image, seed: u64) {
        let out = self.scratch.path().join("verify.img");
        let _ = std::fs::remove_file(&out);
        self.archip(&["export", name, out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).expect("exported image");
        assert_eq!(bytes.len(), VOLUME_BLOCKS * BLOCK, "{name}: size");
        for (b, allowed) in image.0.iter().enumerate() {
            let block = &bytes[b * BLOCK..(b + 1) * BLOCK];
            let first = block[0];
            assert!(
                block.iter().all(|&x| x == first) && allowed.contains(&first),
                "ARCHIP_SEED={seed}: {name} block {b} holds {first:#x}.. (uniform: {}), \
                 the model allows {allowed:?}",
                block.iter().all(|&x| x == first)
            );
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.segment);
    }
}

fn write_commands(rng: &mut Rng, image: &mut Image, certain: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    for _ in 0..1 + rng.below(8) {
        let start = rng.below(VOLUME_BLOCKS as u64) as usize;
        let len = (1 + rng.below(16) as usize).min(VOLUME_BLOCKS - start);
        let byte = 1 + rng.below(255) as u8;
        cmds.push(format!("write -P {byte} {} {}", start * BLOCK, len * BLOCK));
        for set in &mut image.0[start..start + len] {
            if certain {
                *set = BTreeSet::from([byte]);
            } else {
                set.insert(byte);
            }
        }
    }
    cmds.push("flush".into());
    cmds
}

#[test]
#[ignore = "minutes long; CI runs it with ARCHIP_SOAK_SECS"]
fn soak_through_nbd_with_kill_9_keeps_every_flushed_byte() {
    let seed = std::env::var("ARCHIP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1;
    let secs: u64 = std::env::var("ARCHIP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    eprintln!("soak_nbd: ARCHIP_SEED={seed} ARCHIP_SOAK_SECS={secs}");
    let mut rng = Rng(seed);
    let scratch = tempfile::tempdir().expect("tempdir");
    let segment = PathBuf::from("/dev/shm").join(format!("archip-soak-nbd-{}", std::process::id()));
    let mut stack = Stack {
        scratch,
        segment,
        up: None,
        nbd: None,
    };
    stack.start();

    let mut volumes: BTreeMap<String, Image> = BTreeMap::new();
    let mut snapshots: BTreeMap<String, Image> = BTreeMap::new();
    let mut next = 0u32;
    stack.archip(&["volume", "create", "base", "--size", "8M"]);
    volumes.insert("base".into(), Image::zero());

    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut ops) = (0u32, 0u32);
    while Instant::now() < deadline {
        ops += 1;
        let names: Vec<String> = volumes.keys().cloned().collect();
        let volume = names[rng.below(names.len() as u64) as usize].clone();
        match rng.below(100) {
            // Acknowledged, flushed writes.
            0..=49 => {
                let cmds = write_commands(&mut rng, volumes.get_mut(&volume).unwrap(), true);
                let out = stack.qemu_io(&volume, &cmds).output().expect("qemu-io");
                let text = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() && !text.contains("failed"),
                    "ARCHIP_SEED={seed}: qemu-io on {volume}: {text}"
                );
            }
            // A writer cut by kill -9 of the whole stack, then a restart and a full check.
            50..=59 => {
                let cmds = write_commands(&mut rng, volumes.get_mut(&volume).unwrap(), false);
                let mut writer = stack.qemu_io(&volume, &cmds).spawn().expect("qemu-io");
                stack.kill();
                let _ = writer.kill();
                let _ = writer.wait();
                kills += 1;
                stack.start();
                for (name, image) in volumes.iter().chain(snapshots.iter()) {
                    stack.verify(name, image, seed);
                }
            }
            60..=69 if snapshots.len() < 4 => {
                let snap = format!("s{next}");
                next += 1;
                stack.archip(&["snapshot", "create", &volume, &snap]);
                snapshots.insert(snap, volumes[&volume].clone());
            }
            70..=79 if !snapshots.is_empty() && volumes.len() < 5 => {
                let snaps: Vec<String> = snapshots.keys().cloned().collect();
                let snap = &snaps[rng.below(snaps.len() as u64) as usize];
                let clone = format!("c{next}");
                next += 1;
                stack.archip(&["clone", snap, &clone]);
                volumes.insert(clone, snapshots[snap].clone());
            }
            80..=87 if volume != "base" => {
                stack.archip(&["volume", "delete", &volume]);
                volumes.remove(&volume);
            }
            88..=91 if !snapshots.is_empty() => {
                let snaps: Vec<String> = snapshots.keys().cloned().collect();
                let snap = snaps[rng.below(snaps.len() as u64) as usize].clone();
                // A snapshot with clones may refuse deletion; either outcome keeps the model.
                let out = Command::new(ARCHIP)
                    .args(["snapshot", "delete", &snap])
                    .args(stack.flags())
                    .output()
                    .expect("run archip");
                if out.status.success() {
                    snapshots.remove(&snap);
                }
            }
            92..=95 => {
                stack.archip(&["gc", "--grace", "0"]);
            }
            _ => {
                let iops = ["0", "5000", "50000"][rng.below(3) as usize];
                stack.archip(&["qos", &volume, "--iops", iops]);
            }
        }
    }

    // The end: one more kill -9 and restart, then every volume and snapshot, GC, and again.
    stack.kill();
    stack.start();
    for (name, image) in volumes.iter().chain(snapshots.iter()) {
        stack.verify(name, image, seed);
    }
    stack.archip(&["gc", "--grace", "0"]);
    for (name, image) in volumes.iter().chain(snapshots.iter()) {
        stack.verify(name, image, seed);
    }
    eprintln!(
        "soak_nbd: ARCHIP_SEED={seed}: {ops} operations, {kills} kills, {} volumes and {} snapshots verified",
        volumes.len(),
        snapshots.len()
    );
    assert!(
        kills > 0 || secs < 10,
        "a soak without a kill tests nothing"
    );
}
