//! The `archip` command line against a real `archip up` child process: every command, its
//! output and exit code, bad input that must change nothing, an import/export round trip with
//! dedup, locks across two nodes, and the lifecycle of `up` itself.
//!
//! Each test starts its own `up` on a temporary data directory, a unique segment under
//! /dev/shm and a temporary control socket, waits for its `archip: ready` line (bounded), and
//! kills it on drop, so a failing test leaves no process and no segment behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ARCHIP: &str = env!("CARGO_BIN_EXE_archip");
/// Bound on waiting for `up` to be ready or to stop (a debug build on a busy CI machine).
const WAIT: Duration = Duration::from_secs(120);

/// The result of one command.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A running `archip up`.
struct Up {
    child: Option<Child>,
    data_dir: PathBuf,
    control: PathBuf,
    segment: PathBuf,
    node: String,
    log: PathBuf,
    /// Where the peer set registers (shared by instances that must see each other); `None`:
    /// the default directory.
    peerset_dir: Option<PathBuf>,
    /// Holds the control socket and the log; the data directory too unless shared.
    _scratch: tempfile::TempDir,
}

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "archip-cli-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Up {
    /// `up` on a fresh data directory.
    fn start(node: &str) -> Up {
        Self::start_on(None, node)
    }

    /// `up` on `data_dir` (another instance's, to play a second node), or a fresh one.
    fn start_on(data_dir: Option<&Path>, node: &str) -> Up {
        Self::start_registered(data_dir, node, None)
    }

    /// [`start_on`](Self::start_on) registering in `peerset_dir` (shared with another
    /// instance, so the two see each other), or in the default directory.
    fn start_registered(data_dir: Option<&Path>, node: &str, peerset_dir: Option<&Path>) -> Up {
        let scratch = tempfile::tempdir().expect("tempdir");
        let peerset_dir = peerset_dir.map(Path::to_owned);
        let data_dir = data_dir.map_or_else(|| scratch.path().join("data"), Path::to_owned);
        let control = scratch.path().join("control.sock");
        let segment = PathBuf::from("/dev/shm").join(unique(node));
        let log = scratch.path().join("up.log");
        let mut up = Up {
            child: None,
            data_dir,
            control,
            segment,
            node: node.to_string(),
            log,
            peerset_dir,
            _scratch: scratch,
        };
        up.launch();
        up
    }

    fn flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--segment".into(),
            self.segment.display().to_string(),
            "--node".into(),
            self.node.clone(),
            "--control".into(),
            self.control.display().to_string(),
        ];
        if let Some(d) = &self.peerset_dir {
            flags.extend(["--peerset-dir".into(), d.display().to_string()]);
        }
        flags
    }

    /// Starts the child and waits for its ready line.
    fn launch(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let mut child = Command::new(ARCHIP)
            .arg("up")
            .args(self.flags())
            .args(["--workers", "2"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn archip up");
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_default();
        assert!(
            line.starts_with("archip: ready control="),
            "archip up did not become ready: stdout {line:?}, log:\n{}",
            self.log_text()
        );
        assert!(line.contains(&format!("node={}", self.node)), "{line}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> Out {
        let out = Command::new(ARCHIP)
            .args(args)
            .args(self.flags())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run archip");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "archip {args:?} failed: {o:?}");
        o.stdout
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Runs a command that must fail with `code`, saying `message` on stderr.
    fn fails(&self, args: &[&str], code: i32, message: &str) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, code, "archip {args:?}: wrong exit code: {o:?}");
        assert!(
            o.stderr.contains(message),
            "archip {args:?}: expected {message:?} in stderr: {o:?}"
        );
        assert!(
            o.stdout.is_empty(),
            "archip {args:?} printed a result: {o:?}"
        );
        o
    }

    /// Everything a command could change: the catalogue, as JSON.
    fn catalogue(&self) -> (serde_json::Value, serde_json::Value) {
        (
            self.json(&["volume", "list"]),
            self.json(&["snapshot", "list"]),
        )
    }

    /// One raw request line over the control socket; returns the reply line.
    fn raw(&self, line: &[u8]) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.control).expect("connect");
        s.write_all(line).unwrap();
        s.write_all(b"\n").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns the exit code.
    fn stop(&mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which we have not waited for yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait().map(|s| s.code().unwrap_or(-1)));
        });
        match rx.recv_timeout(WAIT) {
            Ok(code) => code.expect("wait"),
            Err(_) => {
                // SAFETY: as above; the waiting thread reaps it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!(
                    "archip up did not stop on SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
        }
    }

    /// Bytes of data objects (owned `ob.*` and content `ct.*`) in the data directory.
    fn object_bytes(&self) -> u64 {
        let dir = self.data_dir.join("objects");
        let mut total = 0;
        for e in walk(&dir) {
            let name = e.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("ob.") || name.starts_with("ct.") {
                total += std::fs::metadata(&e).unwrap().len();
            }
        }
        total
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

/// A reproducible pseudo-random byte stream (xorshift64*), seeded from ARCHIP_SEED or the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
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
        eprintln!("seed: ARCHIP_SEED={seed}");
        Rng(seed)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const MIB: usize = 1 << 20;

#[test]
fn catalogue_commands_and_status() {
    let up = Up::start("cat");
    let out = up.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "64M",
        "--block-size",
        "64K",
    ]);
    assert_eq!(
        out.trim(),
        "created volume db: 64 MiB (67108864 bytes), block size 64 KiB"
    );
    let info = up.json(&["volume", "info", "db"]);
    assert_eq!(info["size"], 64 * MIB);
    assert_eq!(info["block_size"], 65536);
    assert_eq!(info["kind"], "volume");

    // QoS limits: none at first, set one at a time, the other kept, 0 lifts one.
    assert_eq!(
        up.ok(&["qos", "db"]).trim(),
        "volume db: iops unlimited, bandwidth unlimited; 0 I/Os delayed here"
    );
    up.ok(&["qos", "db", "--iops", "500"]);
    let q = up.json(&["qos", "db", "--bandwidth", "10M"]);
    assert_eq!(
        (q["iops"].as_u64(), q["bytes_per_sec"].as_u64()),
        (Some(500), Some(10 * MIB as u64))
    );
    let q = up.json(&["qos", "db", "--iops", "0"]);
    assert_eq!(
        (q["iops"].as_u64(), q["bytes_per_sec"].as_u64()),
        (Some(0), Some(10 * MIB as u64))
    );
    up.ok(&["qos", "db", "--bandwidth", "0"]);
    assert!(up.ok(&["volume", "info", "db"]).contains("uuid:"));
    assert!(
        up.ok(&["volume", "list"])
            .lines()
            .any(|l| l.starts_with("db "))
    );

    let out = up.ok(&["volume", "resize", "db", "--size", "128M"]);
    assert!(out.contains("resized volume db: 128 MiB"), "{out}");
    assert_eq!(up.json(&["volume", "info", "db"])["size"], 128 * MIB);

    assert!(
        up.ok(&["snapshot", "create", "db", "s1"])
            .contains("snapshot s1")
    );
    let snaps = up.json(&["snapshot", "list", "db"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["name"], "s1");
    assert_eq!(snaps[0]["parent"], "db");
    let out = up.ok(&["clone", "s1", "c1", "--size", "256M"]);
    assert!(out.contains("created volume c1: 256 MiB"), "{out}");
    let c1 = up.json(&["volume", "info", "c1"]);
    assert_eq!(c1["parent"], "s1");
    assert_eq!(c1["size"], 256 * MIB);
    // A clone of a volume (implicit snapshot) works too.
    up.ok(&["clone", "db", "c2"]);
    let vols = up.json(&["volume", "list"]);
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c1", "c2", "db"]);

    // Status: the three peers answer PING, and vlmc has counted the requests above.
    let st = up.json(&["status"]);
    let peers = st["peers"].as_array().unwrap();
    let mut peer_names: Vec<&str> = peers.iter().map(|p| p["name"].as_str().unwrap()).collect();
    peer_names.sort();
    assert_eq!(peer_names, ["blocker", "mapper", "vlmc"]);
    assert!(
        peers
            .iter()
            .all(|p| p["up"] == true && p["latency_us"].is_number()),
        "{st}"
    );
    let vlmc = st["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 1)
        .expect("vlmc port");
    assert!(vlmc["requests"].as_u64().unwrap() > 5, "{vlmc}");
    assert!(vlmc["p50_ns"].is_u64() && vlmc["p99_ns"].is_u64(), "{vlmc}");
    let text = up.ok(&["status"]);
    for p in ["blocker", "mapper", "vlmc"] {
        assert!(
            text.lines().any(|l| l.starts_with(p) && l.contains(" up ")),
            "{text}"
        );
    }

    // Deletion, then GC reclaims what only the deleted volumes referenced.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.raw");
    let mut data = vec![0u8; MIB];
    Rng::new().fill(&mut data);
    // Content objects are stored without trailing zero bytes; a block of random data ending in
    // a zero byte would legitimately store one byte less than the check below counts.
    for block in data.chunks_mut(64 << 10) {
        *block.last_mut().unwrap() |= 1;
    }
    std::fs::write(&img, &data).unwrap();
    up.ok(&["import", img.to_str().unwrap(), "c2"]);
    assert!(
        up.object_bytes() >= MIB as u64,
        "object bytes {} after import: {}",
        up.object_bytes(),
        up.ok(&["volume", "info", "c2"])
    );
    assert!(
        up.ok(&["volume", "delete", "c2"])
            .contains("deleted volume c2")
    );
    up.ok(&["volume", "delete", "c1"]);
    up.ok(&["snapshot", "delete", "s1"]);
    assert_eq!(up.json(&["snapshot", "list"]), serde_json::json!([]));
    let dry = up.json(&["gc", "--dry-run", "--grace", "0"]);
    assert_eq!(dry["dry_run"], true);
    let gc = up.json(&["gc", "--grace", "0"]);
    assert_eq!(gc["deleted_pages"], dry["deleted_pages"], "{gc} vs {dry}");
    assert_eq!(
        gc["deleted_objects"], dry["deleted_objects"],
        "{gc} vs {dry}"
    );
    assert!(sum_u64(&gc, "deleted_objects") >= 16, "{gc}");
    assert!(sum_u64(&gc, "deleted_bytes") >= MIB as u64, "{gc}");
    assert_eq!(up.object_bytes(), 0, "objects left after gc");
    let again = up.json(&["gc", "--grace", "0"]);
    assert_eq!(again["deleted_objects"], 0, "{again}");
    assert!(
        up.ok(&["gc", "--dry-run"])
            .starts_with("gc (dry run): would reclaim")
    );
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let up = Up::start("bad");
    up.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "64M",
        "--block-size",
        "64K",
    ]);
    up.ok(&["snapshot", "create", "db", "s1"]);
    let before = up.catalogue();
    let long = "a".repeat(129);
    let cases: &[(&[&str], i32, &str)] = &[
        (&["volume", "info", "nope"], 1, "volume nope not found"),
        (
            &["volume", "resize", "nope", "--size", "1G"],
            1,
            "volume nope not found",
        ),
        (&["volume", "delete", "nope"], 1, "volume nope not found"),
        (
            &["volume", "create", "x", "--size", "12Q"],
            2,
            "bad size \"12Q\"",
        ),
        (
            &["volume", "create", "x", "--size", "0"],
            2,
            "must be positive",
        ),
        (
            &["volume", "create", "x", "--size", "1000"],
            2,
            "multiple of 512",
        ),
        (
            &[
                "volume",
                "create",
                "x",
                "--size",
                "1M",
                "--block-size",
                "3K",
            ],
            2,
            "invalid block size",
        ),
        (
            &["volume", "create", "a/b", "--size", "1M"],
            2,
            "invalid volume name \"a/b\": contains '/'",
        ),
        (
            &["volume", "create", "..", "--size", "1M"],
            2,
            "invalid volume name \"..\"",
        ),
        (
            &["volume", "create", "a..b", "--size", "1M"],
            2,
            "contains '..'",
        ),
        (
            &["volume", "create", &long, "--size", "1M"],
            2,
            "longer than 128 bytes",
        ),
        (
            &["volume", "create", "x.tmp", "--size", "1M"],
            2,
            "reserved suffix",
        ),
        (
            &["volume", "create", "x.lock", "--size", "1M"],
            2,
            "reserved suffix",
        ),
        (
            &["volume", "create", "db", "--size", "1M"],
            1,
            "volume db already exists",
        ),
        (
            &["volume", "resize", "db", "--size", "1M"],
            2,
            "refused (volumes only grow)",
        ),
        (
            &["volume", "resize", "s1", "--size", "1G"],
            1,
            "s1 is a snapshot",
        ),
        (&["volume", "delete", "s1"], 2, "archip snapshot delete s1"),
        (&["snapshot", "delete", "db"], 2, "not a snapshot"),
        (
            &["snapshot", "create", "nope", "s2"],
            1,
            "volume nope not found",
        ),
        (
            &["snapshot", "create", "db", "s1"],
            1,
            "volume s1 already exists",
        ),
        (
            &["snapshot", "create", "db", "../s"],
            2,
            "invalid snapshot name",
        ),
        (&["snapshot", "list", "nope"], 1, "volume nope not found"),
        (&["clone", "s1", "db"], 1, "volume db already exists"),
        (&["clone", "nope", "c"], 1, "volume nope not found"),
        (&["clone", "s1", "c", "--size", "1M"], 2, "shrinking"),
        (&["dedup", "db"], 2, "db is a volume"),
        (&["lock", "info", "nope"], 1, "volume nope not found"),
        (&["qos", "nope", "--iops", "5"], 1, "volume nope not found"),
        (
            &["qos", "s1", "--iops", "5"],
            1,
            "s1 is a read-only snapshot",
        ),
        (&["qos", "db", "--bandwidth", "lots"], 2, "lots"),
        (&["lock", "break", "s1"], 2, "snapshots have no lock"),
        (
            &["import", "/nonexistent/image", "v"],
            1,
            "opening /nonexistent/image",
        ),
        (
            &["export", "nope", "/tmp/archip-never-written"],
            1,
            "volume nope not found",
        ),
        (&["peer", "bogus"], 2, "unknown peer \"bogus\""),
    ];
    for (args, code, message) in cases {
        up.fails(args, *code, message);
        assert_eq!(
            up.catalogue(),
            before,
            "archip {args:?} changed the catalogue"
        );
    }
    assert!(!Path::new("/tmp/archip-never-written").exists());

    // The server checks again what a client might send without the CLI's checks.
    let r = up
        .raw(br#"{"v":1,"op":"volume_create","name":"a\u0000b","size":1048576,"block_size":null}"#);
    assert_eq!(r["type"], "error");
    assert_eq!(r["kind"], "invalid_argument", "{r}");
    assert!(r["message"].as_str().unwrap().contains("NUL"), "{r}");
    let r =
        up.raw(br#"{"v":1,"op":"volume_create","name":"../x","size":1048576,"block_size":null}"#);
    assert_eq!(r["kind"], "invalid_argument", "{r}");
    let r = up.raw(br#"{"v":99,"op":"volume_list"}"#);
    assert_eq!(r["kind"], "version", "{r}");
    let r = up.raw(b"not json");
    assert_eq!(r["kind"], "protocol", "{r}");
    let r = up.raw(br#"{"v":1,"op":"format_everything"}"#);
    assert_eq!(r["kind"], "protocol", "{r}");
    let r = up.raw(br#"{"v":1,"op":"volume_info","name":"nope"}"#);
    assert_eq!(r["kind"], "not_found", "{r}");
    assert_eq!(up.catalogue(), before);
}

fn image(rng: &mut Rng) -> Vec<u8> {
    // Random and zero regions that do not line up with 4 MiB blocks; the tail is 1000 sectors
    // past the last whole block, so the volume's last block is short.
    let mut img = vec![0u8; 20 * MIB + 1000 * 512];
    rng.fill(&mut img[..3 * MIB]);
    rng.fill(&mut img[12 * MIB..17 * MIB]);
    rng.fill(&mut img[18 * MIB..]);
    img
}

fn sum_u64(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn import_export_round_trip_with_dedup_and_holes() {
    let up = Up::start("img");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new();
    let img = image(&mut rng);
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, &img).unwrap();
    let p = path.to_str().unwrap();

    // Blocks of 4 MiB: [0,4) data, [4,8) and [8,12) zero, [12,16) [16,20) [20,20.5) data.
    let r = up.json(&["import", p, "vm1"]);
    assert_eq!(r["created"], true);
    assert_eq!(sum_u64(&r, "blocks"), 6, "{r}");
    assert_eq!(sum_u64(&r, "zero_blocks"), 2, "{r}");
    assert_eq!(sum_u64(&r, "written_blocks"), 4, "{r}");
    assert_eq!(sum_u64(&r, "deduplicated_blocks"), 0, "{r}");
    assert_eq!(up.json(&["volume", "info", "vm1"])["size"], img.len());
    let stored = up.object_bytes();
    assert!(
        stored > 0 && stored <= sum_u64(&r, "bytes_written"),
        "{stored} {r}"
    );

    // The same image again: every block already exists.
    let text = up.ok(&["import", p, "vm2"]);
    assert!(text.contains("4 deduplicated"), "{text}");
    assert!(text.contains("0 written (0 B stored)"), "{text}");
    assert_eq!(up.object_bytes(), stored, "a second import stored data");

    // Export: identical bytes, and the zero blocks are holes.
    for vol in ["vm1", "vm2"] {
        let out = dir.path().join(format!("{vol}.raw"));
        let s = up.json(&["export", vol, out.to_str().unwrap()]);
        assert_eq!(sum_u64(&s, "zero_bytes"), 8 * MIB as u64, "{s}");
        let back = std::fs::read(&out).unwrap();
        assert_eq!(back.len(), img.len());
        assert!(back == img, "{vol}: exported image differs");
        let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
        assert!(
            allocated <= (img.len() - 8 * MIB) as u64 + MIB as u64,
            "{vol}: {allocated} bytes allocated, the zero blocks are not holes"
        );
    }

    // Re-import a changed image into an existing volume: blocks that became zero must read
    // back as zero (not as the old data).
    let mut img2 = img.clone();
    img2[..4 * MIB].fill(0);
    rng.fill(&mut img2[5 * MIB..5 * MIB + 4096]);
    let path2 = dir.path().join("disk2.raw");
    std::fs::write(&path2, &img2).unwrap();
    let r = up.json(&["import", path2.to_str().unwrap(), "vm1"]);
    assert_eq!(r["created"], false);
    assert_eq!(sum_u64(&r, "zero_blocks"), 2, "{r}");
    assert_eq!(sum_u64(&r, "deduplicated_blocks"), 3, "{r}");
    let out = dir.path().join("vm1-2.raw");
    up.ok(&["export", "vm1", out.to_str().unwrap()]);
    assert!(
        std::fs::read(&out).unwrap() == img2,
        "re-imported vm1 differs"
    );
    // vm2 still holds the first image.
    up.ok(&["export", "vm2", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == img, "vm2 changed");

    // An image larger than an existing volume is refused, and nothing changes.
    up.ok(&["volume", "create", "small", "--size", "1M"]);
    let before = up.catalogue();
    up.fails(&["import", p, "small"], 2, "does not fit volume small");
    assert_eq!(up.catalogue(), before);
    // A snapshot exports too, and dedup of a snapshot of imported data finds it stored.
    up.ok(&["snapshot", "create", "vm2", "vm2-s"]);
    let d = up.json(&["dedup", "vm2-s"]);
    assert_eq!(sum_u64(&d, "written"), 0, "{d}");
    assert!(
        up.ok(&["export", "vm2-s", out.to_str().unwrap()])
            .contains("exported snapshot vm2-s")
    );
    assert!(std::fs::read(&out).unwrap() == img);
}

#[test]
fn locks_across_two_nodes() {
    let a = Up::start("node-a");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.raw");
    let mut data = vec![0u8; MIB];
    Rng::new().fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let img = img.to_str().unwrap();
    a.ok(&[
        "volume",
        "create",
        "shared",
        "--size",
        "8M",
        "--block-size",
        "64K",
    ]);
    // The import opens the volume on node-a, which keeps it until it stops.
    a.ok(&["import", img, "shared"]);
    let out = a.ok(&["lock", "info", "shared"]);
    assert!(
        out.starts_with("volume shared is locked by node-a"),
        "{out}"
    );

    let b = Up::start_on(Some(&a.data_dir), "node-b");
    let before = b.catalogue();
    let o = b.fails(
        &["volume", "resize", "shared", "--size", "16M"],
        1,
        "volume shared is locked by node-a",
    );
    assert!(o.stderr.contains("archip lock break"), "{o:?}");
    b.fails(&["import", img, "shared"], 1, "locked by node-a");
    b.fails(&["volume", "delete", "shared"], 1, "locked by node-a");
    assert_eq!(b.catalogue(), before);
    assert_eq!(b.json(&["lock", "info", "shared"])["holder"], "node-a");

    let out = b.ok(&["lock", "break", "shared"]);
    assert!(
        out.contains("broke the lock of volume shared held by node-a"),
        "{out}"
    );
    assert!(
        b.log_text().contains("lock broken on request"),
        "the break was not logged:\n{}",
        b.log_text()
    );
    b.ok(&["volume", "resize", "shared", "--size", "16M"]);
    // The resize took the lock for itself only; the import keeps it.
    assert_eq!(
        b.json(&["lock", "info", "shared"])["holder"],
        serde_json::Value::Null
    );
    b.ok(&["import", img, "shared"]);
    assert_eq!(b.json(&["lock", "info", "shared"])["holder"], "node-b");
    // node-a's lock is gone: its writes are refused rather than mixed with node-b's.
    let o = a.run(&["import", img, "shared"]);
    assert_ne!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains("fenced") || o.stderr.contains("locked by node-b"),
        "{o:?}"
    );
}

#[test]
fn up_lifecycle_and_not_running() {
    let scratch = tempfile::tempdir().unwrap();
    let nowhere = scratch.path().join("none.sock");
    let out = Command::new(ARCHIP)
        .args(["volume", "list"])
        .env("ARCHIP_CONTROL", &nowhere)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no archip running at {}; start it with `archip up`",
            nowhere.display()
        )),
        "{err}"
    );

    let mut up = Up::start("life");
    up.ok(&["volume", "create", "keep", "--size", "1M"]);
    // The environment alone finds the instance.
    let out = Command::new(ARCHIP)
        .args(["volume", "list"])
        .env("ARCHIP_CONTROL", &up.control)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("keep"));
    let mode = std::fs::metadata(&up.control).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is owner-only");

    // A second `up` on the same control socket is refused and leaves the first alone.
    let second = Command::new(ARCHIP)
        .arg("up")
        .args(up.flags())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(second.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));
    up.ok(&["volume", "info", "keep"]);

    // SIGTERM: a clean stop that removes the socket and the segment, keeps the data.
    assert_eq!(up.stop(), 0, "log:\n{}", up.log_text());
    assert!(!up.control.exists(), "control socket left behind");
    assert!(!up.segment.exists(), "segment left behind");
    up.fails(&["volume", "list"], 3, "no archip running at");

    // A stale socket file (as after kill -9) is replaced; the volume is still there.
    std::os::unix::net::UnixListener::bind(&up.control).unwrap();
    up.launch();
    assert_eq!(up.json(&["volume", "info", "keep"])["size"], MIB);
    let mut status = String::new();
    UnixStream::connect(&up.control)
        .and_then(|mut s| {
            s.write_all(b"{\"v\":1,\"op\":\"status\"}\n")?;
            s.read_to_string(&mut status)
        })
        .unwrap();
    assert!(status.starts_with("{\"type\":\"ok\""), "{status}");
}

/// Runs `archip ARGS` to completion with no instance around it.
fn archip_plain(args: &[&str]) -> Out {
    let out = Command::new(ARCHIP)
        .args(args)
        .env_remove("ARCHIP_SEGMENT")
        .output()
        .expect("run archip");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn completions_and_man_page_come_from_the_command_tree() {
    let bash = archip_plain(&["completions", "bash"]);
    assert_eq!(bash.code, 0, "{bash:?}");
    // Every subcommand the operator types is completed, not only the top level.
    for word in ["showmapped", "controller", "snapshot", "completions"] {
        assert!(bash.stdout.contains(word), "bash completion lacks {word}");
    }
    let bad = archip_plain(&["completions", "no-such-shell"]);
    assert_eq!(bad.code, 2, "an unknown shell is bad input: {bad:?}");

    let man = archip_plain(&["man"]);
    assert_eq!(man.code, 0, "{man:?}");
    assert!(
        man.stdout.starts_with(".ie") || man.stdout.contains(".TH archip"),
        "roff: {}",
        &man.stdout[..man.stdout.len().min(200)]
    );
    assert!(
        man.stdout.contains("showmapped"),
        "the man page lists the subcommands"
    );
}

#[test]
fn controller_and_node_default_to_segments_of_their_own() {
    // The help text is what an operator reads; the defaults must differ so that both roles
    // can run on one host with no flags.
    let c = archip_plain(&["controller", "--help"]);
    let n = archip_plain(&["node", "--help"]);
    assert_eq!((c.code, n.code), (0, 0), "{c:?} {n:?}");
    for help in [&c.stdout, &n.stdout] {
        assert!(
            help.contains("archipelago-controller") && help.contains("archipelago-node"),
            "the role defaults are documented: {help}"
        );
    }
}

/// `gc --grace 0` deletes every unreferenced object, including those another peer set on the
/// same backend wrote for an operation still in flight: the server refuses it while the
/// registry shows such a peer set, changes nothing, and `--force` proceeds.
#[test]
fn gc_without_grace_is_refused_while_another_peer_set_shares_the_backend() {
    let registry = tempfile::tempdir().unwrap();
    let a = Up::start_registered(None, "node-a", Some(registry.path()));
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    let mut data = vec![0u8; MIB];
    Rng::new().fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    a.ok(&[
        "volume",
        "create",
        "g",
        "--size",
        "4M",
        "--block-size",
        "64K",
    ]);
    a.ok(&["import", img.to_str().unwrap(), "g"]);
    a.ok(&["volume", "delete", "g"]);
    let garbage = a.object_bytes();
    // (What the objects take depends on the random data: seen one byte short of the MiB.)
    assert!(
        garbage >= MIB as u64 / 2,
        "no garbage to collect: {garbage}"
    );

    let mut b = Up::start_registered(Some(&a.data_dir), "node-b", Some(registry.path()));
    let o = a.run(&["gc", "--grace", "0"]);
    assert_eq!(o.code, 2, "not refused as bad input: {o:?}");
    assert!(o.stderr.contains("gc --grace 0 refused"), "{o:?}");
    assert!(
        o.stderr.contains("node-b"),
        "the other peer set is not named: {o:?}"
    );
    assert!(o.stdout.is_empty(), "{o:?}");
    assert_eq!(a.object_bytes(), garbage, "a refused gc deleted objects");
    // A dry run deletes nothing, so it is allowed.
    let dry = a.json(&["gc", "--dry-run", "--grace", "0"]);
    assert!(sum_u64(&dry, "deleted_objects") >= 16, "{dry}");
    assert_eq!(a.object_bytes(), garbage);
    // --force takes the risk on purpose.
    let gc = a.json(&["gc", "--grace", "0", "--force"]);
    assert!(sum_u64(&gc, "deleted_bytes") >= garbage, "{gc}");
    assert_eq!(a.object_bytes(), 0, "objects left after a forced gc");
    // With node-b stopped (its registration gone), no --force is needed.
    assert_eq!(b.stop(), 0);
    let again = a.json(&["gc", "--grace", "0"]);
    assert_eq!(again["deleted_objects"], 0, "{again}");
}

/// A hand-rolled NBD client (newstyle, EXPORT_NAME, simple replies): enough to keep many
/// writes in flight and see which were acknowledged.
struct NbdClient(UnixStream);

impl NbdClient {
    fn connect(socket: &Path, export: &str) -> (NbdClient, u64) {
        use node::nbd::proto;
        let mut s = UnixStream::connect(socket).expect("connect to the NBD socket");
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(
            u64::from_be_bytes(hello[..8].try_into().unwrap()),
            proto::NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            proto::IHAVEOPT
        );
        s.write_all(&proto::client_flags::KNOWN.to_be_bytes())
            .unwrap();
        let mut o = Vec::new();
        o.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&proto::opt::EXPORT_NAME.to_be_bytes());
        o.extend_from_slice(&(export.len() as u32).to_be_bytes());
        o.extend_from_slice(export.as_bytes());
        s.write_all(&o).unwrap();
        let mut r = [0u8; 10];
        s.read_exact(&mut r).unwrap();
        (NbdClient(s), u64::from_be_bytes(r[..8].try_into().unwrap()))
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, data: &[u8], len: u32) {
        use node::nbd::proto;
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.0.write_all(&h).unwrap();
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(
            node::nbd::proto::cmd::WRITE,
            handle,
            offset,
            data,
            data.len() as u32,
        );
    }

    fn flush(&mut self, handle: u64) {
        self.request(node::nbd::proto::cmd::FLUSH, handle, 0, &[], 0);
    }

    /// The next simple reply (error, handle), or `None` once the server closed the connection.
    fn reply(&mut self) -> Option<(u32, u64)> {
        let mut r = [0u8; 16];
        match self.0.read_exact(&mut r) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading an NBD reply: {e}"),
        }
        assert_eq!(
            u32::from_be_bytes(r[..4].try_into().unwrap()),
            node::nbd::proto::SIMPLE_REPLY_MAGIC
        );
        Some((
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..].try_into().unwrap()),
        ))
    }
}

/// Polls (bounded) until `path` exists.
fn wait_for_path(path: &Path, what: &str, child: &mut Child) {
    let deadline = std::time::Instant::now() + WAIT;
    while !path.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited ({st}) before {} appeared", path.display());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to a child, then its exit code (bounded wait) and its stderr.
fn terminate(child: Child) -> (i32, String) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    terminate_wait(child)
}

/// `export-nbd`: its unix socket is owner-only unless widened, and SIGTERM drains: requests
/// in flight finish and every acknowledged write is in the volume, then a clean exit.
#[test]
fn export_nbd_socket_mode_and_sigterm_drain() {
    use std::os::unix::fs::PermissionsExt;
    let up = Up::start("nbd");
    up.ok(&[
        "volume",
        "create",
        "disk",
        "--size",
        "16M",
        "--block-size",
        "1M",
    ]);
    let scratch = tempfile::tempdir().unwrap();
    let export = |socket: &Path, extra: &[&str]| -> Child {
        Command::new(ARCHIP)
            .args(["export-nbd", "disk", "--socket"])
            .arg(socket)
            .args(extra)
            .args(up.flags())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn export-nbd")
    };
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;

    // Widened on request; SIGTERM with no client is a clean exit that removes the socket.
    let wide = scratch.path().join("wide.sock");
    let mut child = export(&wide, &["--socket-mode", "660"]);
    wait_for_path(&wide, "export-nbd", &mut child);
    assert_eq!(mode(&wide), 0o660);
    let (code, err) = terminate(child);
    assert_eq!(code, 0, "{err}");
    assert!(!wide.exists(), "socket left behind");
    let o = up.run(&[
        "export-nbd",
        "disk",
        "--socket",
        "/tmp/x.sock",
        "--socket-mode",
        "1777",
    ]);
    assert_eq!(o.code, 2, "{o:?}");

    // Owner-only by default.
    let sock = scratch.path().join("disk.sock");
    let mut child = export(&sock, &[]);
    wait_for_path(&sock, "export-nbd", &mut child);
    assert_eq!(mode(&sock), 0o600);
    let (mut c, size) = NbdClient::connect(&sock, "disk");
    assert_eq!(size, 16 << 20);
    let mut rng = Rng::new();
    const CHUNK: usize = 64 << 10;
    let mut expect = vec![0u8; 16 << 20];
    // Phase 1: written and flushed before any signal.
    rng.fill(&mut expect[..2 * MIB]);
    for (i, chunk) in expect[..2 * MIB].chunks(CHUNK).enumerate() {
        c.write(i as u64, (i * CHUNK) as u64, chunk);
    }
    c.flush(999);
    for _ in 0..=(2 * MIB / CHUNK) {
        assert_eq!(c.reply().expect("reply before the signal").0, 0);
    }
    // Phase 2: a burst of writes and a FLUSH in flight when SIGTERM arrives.
    let mut burst = vec![0u8; 12 * MIB];
    rng.fill(&mut burst);
    let base = 3 * MIB;
    let n = burst.len() / CHUNK;
    for i in 0..n {
        c.write(
            1000 + i as u64,
            (base + i * CHUNK) as u64,
            &burst[i * CHUNK..][..CHUNK],
        );
    }
    c.flush(5000);
    // One answer from the burst: the server is working on it when the signal comes.
    let first = c.reply().expect("first reply of the burst");
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child, still running (not waited for).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut acked = vec![first];
    while let Some(r) = c.reply() {
        acked.push(r);
    }
    let (code, err) = terminate_wait(child);
    assert_eq!(code, 0, "export-nbd did not exit cleanly: {err}");
    assert!(!sock.exists(), "socket left behind");
    let mut written = 0;
    for (e, h) in &acked {
        assert_eq!(*e, 0, "request {h} failed while draining: {err}");
        if (1000..5000).contains(h) {
            let i = (*h - 1000) as usize;
            expect[base + i * CHUNK..][..CHUNK].copy_from_slice(&burst[i * CHUNK..][..CHUNK]);
            written += 1;
        }
    }
    eprintln!("{written} of {n} burst writes acknowledged before the drain ended");
    // Every acknowledged write is in the volume (the untouched and unacknowledged ranges are
    // compared only where nothing could have been written).
    let out = scratch.path().join("out.raw");
    up.ok(&["export", "disk", out.to_str().unwrap()]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(
        got[..2 * MIB] == expect[..2 * MIB],
        "flushed phase-1 data differs"
    );
    for (e, h) in &acked {
        if *e == 0 && (1000..5000).contains(h) {
            let off = base + (*h - 1000) as usize * CHUNK;
            assert!(
                got[off..][..CHUNK] == expect[off..][..CHUNK],
                "acknowledged write {h} lost"
            );
        }
    }
    assert!(
        got[2 * MIB..base].iter().all(|&b| b == 0),
        "unwritten range changed"
    );
}

/// Waits (bounded) for a child already sent SIGTERM; its exit code and stderr.
fn terminate_wait(mut child: Child) -> (i32, String) {
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let code = child.wait().map(|s| s.code().unwrap_or(-1));
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = tx.send((code, err));
    });
    match rx.recv_timeout(WAIT) {
        Ok((code, err)) => (code.expect("wait"), err),
        Err(_) => {
            // SAFETY: kill(2) on our own child; the waiting thread reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("export-nbd did not stop after SIGTERM");
        }
    }
}
