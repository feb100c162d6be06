//! A real `/dev/ublkbN` served in-process over a real peer set (file backend).
//!
//! Needs root and the ublk driver: on a host without `/dev/ublk-control` every test returns
//! early (and says so), so plain `cargo test` stays green. The VM suite runs this binary inside
//! a Debian kernel with ublk (`e2e/vm/ublk-suite.sh`, or by hand with
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/e2e/vm/run-in-vm.sh --runner" cargo test -p node`).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use node::devices::{DeviceRecord, DeviceTable, Target};
use node::ublk::{self, ServeMode, ServeRequest, UblkConfig};
use peers::client::VolumeClient;
use peers::peerset::{PeerConfig, PeerSet};

fn skip() -> bool {
    if !ublk::available() {
        eprintln!("skipping: no /dev/ublk-control here (the VM suite runs this for real)");
        return true;
    }
    false
}

/// A buffer aligned for O_DIRECT, without unsafe: an aligned window of a larger Vec.
struct Aligned {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        Aligned { v, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }
}

fn pattern(seed: u64, buf: &mut [u8]) {
    for (i, c) in buf.chunks_mut(8).enumerate() {
        let v = (seed + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_5A5A_DEAD_BEEF;
        c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
    }
}

const BLKDISCARD: libc::c_ulong = 0x1277; // _IO(0x12, 119)

fn roundtrip(user_copy: bool) {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg").display().to_string();
    let set = PeerSet::start(&PeerConfig::new(dir.path().join("data"), &seg, "node-t")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = VolumeClient::connect(set.segment()).unwrap();
    let vol = if user_copy { "uc" } else { "copy" };
    rt.block_on(client.create(vol, 32 << 20, Some(1 << 20)))
        .unwrap();

    let table = DeviceTable::new(dir.path().join("state.json"));
    let req = ServeRequest {
        volume: vol.into(),
        segment: seg.clone(),
        config: UblkConfig {
            user_copy,
            ..UblkConfig::default()
        },
        mode: ServeMode::Add { dev_id: None },
        table: table.clone(),
    };
    let (tx, rx) = mpsc::channel::<DeviceRecord>();
    let server =
        std::thread::spawn(move || ublk::serve(&req, move |r| tx.send(r.clone()).unwrap()));
    let rec = rx.recv().expect("device came up");
    assert_eq!(rec.volume, vol);
    assert_eq!(
        rec.user_copy, user_copy,
        "the kernels we test on all have USER_COPY"
    );
    assert_eq!(
        table.by_volume(vol).unwrap().as_ref(),
        Some(&rec),
        "recorded"
    );
    assert_eq!(ublk::device_state(rec.dev_id), ublk::DeviceState::Live);
    let path = rec.block_device();
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();

    // 3 MiB at 512 KiB: crosses volume blocks, so vlmc splits some requests.
    let mut w = Aligned::new(3 << 20);
    pattern(1, w.buf());
    dev.seek(SeekFrom::Start(512 << 10)).unwrap();
    dev.write_all(w.buf()).unwrap();
    dev.sync_all().unwrap(); // FLUSH: carries no sector
    let mut r = Aligned::new(3 << 20);
    dev.seek(SeekFrom::Start(512 << 10)).unwrap();
    dev.read_exact(r.buf()).unwrap();
    assert!(w.buf() == r.buf(), "device read != device write");
    let mut via_client = vec![0u8; 3 << 20];
    rt.block_on(client.read(vol, 512 << 10, &mut via_client))
        .unwrap();
    assert!(via_client == w.buf(), "VolumeClient read != device write");

    // The other way round.
    let mut p = vec![0u8; 1 << 20];
    pattern(2, &mut p);
    rt.block_on(client.write(vol, 8 << 20, &p)).unwrap();
    let mut r = Aligned::new(1 << 20);
    dev.seek(SeekFrom::Start(8 << 20)).unwrap();
    dev.read_exact(r.buf()).unwrap();
    assert!(r.buf() == &p[..], "device read != VolumeClient write");

    // DISCARD of two whole written blocks (1 and 2 MiB) makes them ZERO entries.
    let before = rt.block_on(client.verify(vol)).unwrap();
    let range: [u64; 2] = [1 << 20, 2 << 20];
    // SAFETY: BLKDISCARD reads two u64 (offset, length) from a live array.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    assert_eq!(rc, 0, "BLKDISCARD: {}", std::io::Error::last_os_error());
    let after = rt.block_on(client.verify(vol)).unwrap();
    assert_eq!(after.zero, before.zero + 2, "{before:?} -> {after:?}");
    let mut r = Aligned::new(2 << 20);
    dev.seek(SeekFrom::Start(1 << 20)).unwrap();
    dev.read_exact(r.buf()).unwrap();
    assert!(
        r.buf().iter().all(|&b| b == 0),
        "discarded range reads zeros"
    );
    drop(dev);

    let gone = ublk::unmap(&table, &Target::parse(&path.display().to_string())).unwrap();
    assert_eq!(gone, Some(rec.clone()));
    let report = server.join().unwrap().unwrap();
    assert!(
        !path.exists(),
        "{} still exists after unmap",
        path.display()
    );
    assert!(table.load().unwrap().is_empty());
    let s = &report.stats;
    assert_eq!(s.errors.load(Relaxed), 0);
    assert!(s.flushes.load(Relaxed) >= 1);
    assert!(s.discards.load(Relaxed) >= 1);
    let moved = s.bytes_read.load(Relaxed) + s.bytes_written.load(Relaxed);
    assert!(moved >= 6 << 20, "moved {moved}");
    if user_copy {
        assert_eq!(s.memcpy_bytes.load(Relaxed), 0);
        assert_eq!(s.user_copy_bytes.load(Relaxed), moved);
    } else {
        assert_eq!(s.user_copy_bytes.load(Relaxed), 0);
        assert_eq!(s.memcpy_bytes.load(Relaxed), moved);
    }
    set.stop();
}

#[test]
fn device_roundtrip_user_copy() {
    if skip() {
        return;
    }
    roundtrip(true);
}

#[test]
fn device_roundtrip_copy_fallback() {
    if skip() {
        return;
    }
    roundtrip(false);
}

#[test]
fn serve_fails_cleanly_for_a_missing_volume() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg").display().to_string();
    let _set = PeerSet::start(&PeerConfig::new(dir.path().join("data"), &seg, "node-t")).unwrap();
    let req = ServeRequest {
        volume: "nope".into(),
        segment: seg,
        config: UblkConfig::default(),
        mode: ServeMode::Add { dev_id: None },
        table: DeviceTable::new(dir.path().join("state.json")),
    };
    let err = ublk::serve(&req, |_| panic!("no device expected")).unwrap_err();
    assert!(
        matches!(err, ublk::UblkError::Volume(_)),
        "unexpected error {err}"
    );
}

/// One shared device per node over one backend: what a KubeVirt live migration does with a
/// multi-node block volume. The target reads the source's writes through its own device (no
/// stale mapping), its first write takes the lock over, and the source then reads the
/// target's data. Both devices are O_DIRECT, like QEMU's cache=none.
#[test]
fn live_migration_handover_between_two_devices() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let start = |node: &str| {
        let seg = dir.path().join(format!("seg-{node}")).display().to_string();
        let set = PeerSet::start(&PeerConfig::new(&data, &seg, node)).unwrap();
        (set, seg)
    };
    let (set_a, seg_a) = start("node-a");
    let (set_b, seg_b) = start("node-b");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = VolumeClient::connect(set_a.segment()).unwrap();
    let cb = VolumeClient::connect(set_b.segment()).unwrap();
    rt.block_on(ca.create("vm-disk", 16 << 20, Some(1 << 20)))
        .unwrap();

    // Each node has its own device table, as on two machines.
    let table_a = DeviceTable::new(dir.path().join("state-a.json"));
    let table_b = DeviceTable::new(dir.path().join("state-b.json"));
    let serve = |seg: &str, table: &DeviceTable| {
        let req = ServeRequest {
            volume: "vm-disk".into(),
            segment: seg.to_string(),
            config: UblkConfig {
                shared: true,
                ..UblkConfig::default()
            },
            mode: ServeMode::Add { dev_id: None },
            table: table.clone(),
        };
        let (tx, rx) = mpsc::channel::<DeviceRecord>();
        let server =
            std::thread::spawn(move || ublk::serve(&req, move |r| tx.send(r.clone()).unwrap()));
        let Ok(rec) = rx.recv() else {
            panic!("no device on {seg}: {:?}", server.join().map(|r| r.err()));
        };
        assert!(
            rec.shared,
            "recorded as shared, so recovery reopens it shared"
        );
        (rec, server)
    };
    let (rec_a, server_a) = serve(&seg_a, &table_a);
    let (rec_b, server_b) = serve(&seg_b, &table_b);
    assert_ne!(rec_a.dev_id, rec_b.dev_id);
    let open = |rec: &DeviceRecord| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(rec.block_device())
            .unwrap()
    };
    let (mut dev_a, mut dev_b) = (open(&rec_a), open(&rec_b));
    let holder = |c: &VolumeClient| rt.block_on(c.lock_info("vm-disk")).unwrap().holder;
    assert_eq!(
        holder(&ca),
        None,
        "attached on both nodes, nobody writes yet"
    );

    let io = |dev: &mut std::fs::File, at: u64, write: Option<u64>, len: usize| -> Vec<u8> {
        let mut b = Aligned::new(len);
        dev.seek(SeekFrom::Start(at)).unwrap();
        match write {
            Some(seed) => {
                pattern(seed, b.buf());
                dev.write_all(b.buf()).unwrap();
                dev.sync_all().unwrap();
            }
            None => dev.read_exact(b.buf()).unwrap(),
        }
        b.buf().to_vec()
    };
    // The target reads a still-empty region first (a caching node would keep the zeros).
    assert!(
        io(&mut dev_b, 5 << 20, None, 1 << 20)
            .iter()
            .all(|&x| x == 0)
    );
    // The source VM runs.
    let a1 = io(&mut dev_a, (5 << 20) - 4096, Some(11), 2 << 20);
    assert_eq!(holder(&ca).as_deref(), Some("node-a"));
    assert!(
        io(&mut dev_b, (5 << 20) - 4096, None, 2 << 20) == a1,
        "target sees source data"
    );
    // Switch-over: the target writes; the lock moves; the source sees the target's data.
    let b1 = io(&mut dev_b, 5 << 20, Some(22), 64 << 10);
    assert_eq!(holder(&cb).as_deref(), Some("node-b"));
    assert!(
        io(&mut dev_a, 5 << 20, None, 64 << 10) == b1,
        "source sees target data"
    );
    let mut want = a1.clone();
    want[4096..4096 + b1.len()].copy_from_slice(&b1);
    assert!(io(&mut dev_a, (5 << 20) - 4096, None, 2 << 20) == want);
    assert!(io(&mut dev_b, (5 << 20) - 4096, None, 2 << 20) == want);
    rt.block_on(cb.verify("vm-disk")).unwrap();

    // The source detaches (its pod ends); the target keeps the lock and the data.
    drop(dev_a);
    ublk::unmap(&table_a, &Target::Device(rec_a.dev_id)).unwrap();
    server_a.join().unwrap().unwrap();
    assert_eq!(holder(&cb).as_deref(), Some("node-b"));
    let b2 = io(&mut dev_b, 12 << 20, Some(33), 1 << 20);
    assert!(io(&mut dev_b, 12 << 20, None, 1 << 20) == b2);
    drop(dev_b);
    ublk::unmap(&table_b, &Target::Device(rec_b.dev_id)).unwrap();
    server_b.join().unwrap().unwrap();
    assert_eq!(
        holder(&cb),
        None,
        "unmapping the last device releases the lock"
    );
    let mut back = vec![0u8; 1 << 20];
    rt.block_on(ca.read("vm-disk", 12 << 20, &mut back))
        .unwrap();
    assert!(back == b2);
    set_b.stop();
    set_a.stop();
}
