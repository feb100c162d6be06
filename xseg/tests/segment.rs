//! Segment lifecycle, ports, requests, buffers and the peer loop, within one process.

mod common;

use std::time::Duration;

use common::*;
use xseg::{Config, Error, Op, Runner, Segment, Status};

const T: Duration = Duration::from_secs(10);

#[test]
fn attach_checks_magic_version_and_sizes() {
    let s = Scratch::new("attach", &small_config());
    let again = Segment::attach(&s.path).unwrap();
    assert_eq!(again.config(), &small_config());
    assert!(matches!(
        Segment::create(&s.path, &small_config()),
        Err(Error::Exists { .. })
    ));

    // A different layout version is refused with a clear error.
    let (base, _) = s.seg.raw();
    // SAFETY: the version field is at offset 8 of the header page, inside the mapping.
    unsafe { std::ptr::write_volatile(base.add(8).cast::<u32>(), 999) };
    match Segment::attach(&s.path) {
        Err(Error::LayoutVersion { found: 999, .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("attached a segment of another layout"),
    }
    // SAFETY: as above.
    unsafe { std::ptr::write_volatile(base.cast::<u64>(), 0) };
    assert!(matches!(
        Segment::attach(&s.path),
        Err(Error::BadMagic { .. })
    ));
}

#[test]
fn destroy_is_refused_while_a_peer_holds_a_port() {
    let path =
        std::path::PathBuf::from(format!("/dev/shm/xseg-test-destroy-{}", std::process::id()));
    let seg = Segment::create(&path, &small_config()).unwrap();
    let port = seg.bind(1, "holder").unwrap();
    assert!(matches!(
        Segment::destroy(&path),
        Err(Error::InUse { ref ports }) if ports == &[1]
    ));
    drop(port);
    Segment::destroy(&path).unwrap();
    assert!(!path.exists());
}

#[test]
fn ports_bind_once_and_dynamic_ports_come_from_the_range() {
    let s = Scratch::new("bind", &small_config());
    let a = s.seg.bind(2, "a").unwrap();
    assert!(matches!(
        s.seg.bind(2, "b"),
        Err(Error::PortBusy { port: 2, .. })
    ));
    assert!(matches!(s.seg.bind(99, "x"), Err(Error::NoSuchPort(99))));
    let dynamic: Vec<_> = (0..12).map(|_| s.seg.bind_dynamic("d").unwrap()).collect();
    for d in &dynamic {
        assert!(d.number() >= 4);
    }
    assert!(matches!(s.seg.bind_dynamic("x"), Err(Error::NoFreePort)));
    drop(dynamic);
    drop(a);
    s.seg.bind(2, "again").unwrap();
}

#[test]
fn round_trip_through_a_peer_loop_carries_data_and_counts() {
    let s = Scratch::new("rt", &small_config());
    let mut runner = Runner::new(s.seg.bind(1, "echo").unwrap());
    let stop = runner.stopper();
    let server = std::thread::spawn(move || runner.run(&mut Echo));

    let mut client = s.seg.bind_dynamic("client").unwrap();
    for seq in 0..500u64 {
        let len = 1 + (seq as usize * 37) % 5000;
        let mut req = client.alloc(Op::Write, b"vol", len as u64).unwrap();
        let mut want = vec![0u8; len];
        pattern(1, seq, &mut want);
        req.write_data(&want).unwrap();
        req.set_offset(seq);
        let rep = client.call(req, 1, T).unwrap();
        assert_eq!(rep.status(), Status::Ok);
        assert_eq!(rep.serviced(), len as u64);
        assert_eq!(rep.offset(), seq);
        assert_eq!(&*rep.target().unwrap(), b"vol");
        let got = rep.data().unwrap();
        assert!(got.iter().zip(&want).all(|(g, w)| *g == w ^ 0x5a));
        client.free(rep);
    }

    // Unknown ops and pings are answered by the loop itself.
    let req = client.alloc(Op::Unknown(777), b"", 0).unwrap();
    assert_eq!(
        client.call(req, 1, T).unwrap().status(),
        Status::Unsupported
    );
    let req = client.alloc(Op::Ping, b"", 0).unwrap();
    assert_eq!(client.call(req, 1, T).unwrap().status(), Status::Ok);

    let stats = s.seg.port_stats(1).unwrap();
    assert_eq!(stats.accepted, 502);
    assert_eq!(stats.errors, 1);
    assert_eq!(stats.name, "echo");
    assert!(stats.service_quantile_ns(0.5).is_some());

    // Submitting to a port nobody bound fails at once and hands the request back.
    let req = client.alloc(Op::Read, b"x", 0).unwrap();
    let (err, req) = client.submit(req, 3).unwrap_err();
    assert!(matches!(err, Error::NoPeer(3)));
    client.free(req);

    stop.stop();
    server.join().unwrap();
    drop(client);
    assert_eq!(s.seg.requests_in_use(), 0);
    assert_eq!(s.seg.buffers_in_use(), 0);
}

#[test]
fn buffers_never_fail_while_a_fitting_buffer_is_free() {
    let s = Scratch::new("buf", &small_config());
    let port = s.seg.bind_dynamic("alloc").unwrap();
    // Take every small buffer, then small requests spill into the large class.
    let mut held: Vec<_> = (0..128)
        .map(|_| port.alloc(Op::Write, b"", 4096).unwrap())
        .collect();
    let spill = port.alloc(Op::Write, b"", 100).unwrap();
    assert_eq!(spill.capacity(), 64 << 10);
    // Interleaved frees fragment nothing: every freed slot serves the next request.
    for i in (0..128).step_by(2) {
        let r = std::mem::replace(&mut held[i], port.alloc(Op::Write, b"", 0).unwrap());
        port.free(r);
    }
    for i in (0..128).step_by(2) {
        let old = std::mem::replace(&mut held[i], port.alloc(Op::Write, b"", 4096).unwrap());
        assert_eq!(held[i].capacity(), 4096);
        port.free(old);
    }
    assert!(matches!(
        port.alloc(Op::Write, b"", 1 << 20),
        Err(Error::TooLarge(_))
    ));
    assert!(matches!(
        port.alloc(Op::Write, &[b'x'; 257], 0),
        Err(Error::TargetTooLong(257))
    ));
    drop(spill);
    drop(held);
    assert_eq!(s.seg.buffers_in_use(), 0);
}

#[test]
fn request_pool_exhaustion_is_an_error_not_a_hang() {
    let config = Config {
        nr_requests: 8,
        ..small_config()
    };
    let s = Scratch::new("pool", &config);
    let port = s.seg.bind_dynamic("alloc").unwrap();
    let held: Vec<_> = (0..8)
        .map(|_| port.alloc(Op::Read, b"", 0).unwrap())
        .collect();
    assert!(matches!(
        port.alloc(Op::Read, b"", 0),
        Err(Error::NoRequest)
    ));
    drop(held);
    port.alloc(Op::Read, b"", 0).unwrap();
}

#[test]
fn an_idle_peer_sleeps_without_burning_cpu() {
    let s = Scratch::new("idle", &small_config());
    let mut runner = Runner::new(s.seg.bind(1, "idle").unwrap());
    let stop = runner.stopper();
    let server = std::thread::spawn(move || {
        let before = thread_cpu();
        runner.run(&mut Echo);
        thread_cpu() - before
    });
    // Let it go idle for a while, then wake it with one request to prove it still serves.
    let mut client = s.seg.bind_dynamic("c").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(600);
    while std::time::Instant::now() < deadline {
        std::thread::park_timeout(deadline - std::time::Instant::now());
    }
    let req = client.alloc(Op::Ping, b"", 0).unwrap();
    assert_eq!(client.call(req, 1, T).unwrap().status(), Status::Ok);
    stop.stop();
    let cpu = server.join().unwrap();
    // A spinning peer would have used ~600 ms; a sleeping one a tiny fraction.
    assert!(
        cpu < Duration::from_millis(150),
        "idle peer used {cpu:?} of CPU"
    );
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

#[test]
fn new_segment_is_owner_only_unless_widened() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new("mode", &small_config());
    let mode = std::fs::metadata(&s.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "segment mode {mode:o}");

    let path =
        std::path::PathBuf::from(format!("/dev/shm/xseg-test-mode660-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let seg = Segment::create_with_mode(&path, &small_config(), 0o660).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    std::fs::remove_file(&path).unwrap();
    drop(seg);
    assert_eq!(mode, 0o660, "widened segment mode {mode:o}");
}

#[test]
fn segment_of_another_user_is_refused() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to give the segment to another user");
        return;
    }
    // A local user (uid 65534) created the well-known name first, with a valid header.
    let s = Scratch::new("foreign", &small_config());
    std::os::unix::fs::chown(&s.path, Some(65534), Some(65534)).unwrap();
    match Segment::attach(&s.path) {
        Err(e @ Error::ForeignOwner { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("65534"), "error names the owner: {msg}");
            assert!(msg.contains("remove it"), "error says what to do: {msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("attached a segment owned by another user"),
    }
    assert!(matches!(
        Segment::open_or_create(&s.path, &small_config()),
        Err(Error::ForeignOwner { .. })
    ));
    // Our own (root's) segment still attaches.
    std::os::unix::fs::chown(&s.path, Some(0), Some(0)).unwrap();
    Segment::attach(&s.path).unwrap();
}

/// A request handed on (submitted, forwarded, responded) gives up its handle without running
/// its Drop; its reference to the port's mapping must still be released, or every port a
/// process ever bound keeps its mapping and file descriptor forever (found by the fuzz target
/// xseg_requests as a LeakSanitizer report).
#[test]
fn handed_on_requests_release_their_mapping() {
    let s = Scratch::new("leak", &small_config());
    let mut server = s.seg.bind(1, "server").unwrap();
    let mut client = s.seg.bind_dynamic("client").unwrap();
    for _ in 0..3 {
        let req = client.alloc(Op::Read, b"vol", 0).unwrap();
        client.submit(req, 1).map_err(|(e, _)| e).unwrap();
        let mut got = server.accept().expect("the request arrived");
        got.complete(0);
        server.respond(got);
        let rep = client.receive().expect("the reply arrived");
        client.free(rep);
    }
    assert_eq!(
        std::sync::Arc::strong_count(client.segment()),
        1,
        "client mapping leaked"
    );
    assert_eq!(
        std::sync::Arc::strong_count(server.segment()),
        1,
        "server mapping leaked"
    );
}

/// A sleep carried out by the caller (the ublk queue's io_uring FUTEX_WAIT): the port is marked
/// sleeping only when nothing is there, and a reply clears the word (which is what wakes a
/// FUTEX_WAIT on it); a reply already there refuses the sleep.
#[test]
fn a_reply_ends_a_sleep_begun_outside_the_port() {
    use std::sync::atomic::Ordering::SeqCst;
    let s = Scratch::new("ext-sleep", &small_config());
    let mut server = s.seg.bind(1, "server").unwrap();
    let mut client = s.seg.bind_dynamic("client").unwrap();
    assert!(client.begin_sleep(), "nothing there: the sleep may begin");
    assert_eq!(
        client.sleep_word().load(SeqCst),
        1,
        "marked sleeping: the value to wait on"
    );
    let req = client.alloc(Op::Read, b"vol", 0).unwrap();
    client.submit(req, 1).map_err(|(e, _)| e).unwrap();
    let mut got = server.accept().expect("the request arrived");
    got.complete(0);
    server.respond(got);
    assert_eq!(
        client.sleep_word().load(SeqCst),
        0,
        "the reply cleared the word (and woke it)"
    );
    assert!(client.end_sleep(), "the reply is there after the wake");
    let rep = client.receive().expect("the reply arrived");
    client.free(rep);

    let req = client.alloc(Op::Read, b"vol", 0).unwrap();
    client.submit(req, 1).map_err(|(e, _)| e).unwrap();
    let mut got = server.accept().expect("the request arrived");
    got.complete(0);
    server.respond(got);
    assert!(!client.begin_sleep(), "a reply is waiting: no sleep");
    assert_eq!(
        client.sleep_word().load(SeqCst),
        0,
        "and the port is not marked"
    );
    let rep = client.receive().expect("the reply arrived");
    client.free(rep);
}
