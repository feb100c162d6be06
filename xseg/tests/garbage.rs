//! Random bytes written over request slots, ring entries and the header while peers run:
//! requests may fail, but no peer panics, reads out of bounds or hangs, and service resumes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use xseg::{Op, Runner, Segment, Status};

#[test]
fn peers_survive_garbage_in_the_segment() {
    let seed: u64 = std::env::var("XSEG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("XSEG_SEED={seed}");
    let s = Scratch::new("garbage", &small_config());
    let layout = s.seg.layout().clone();

    let mut runner = Runner::new(s.seg.bind(1, "echo").unwrap());
    let stop_server = runner.stopper();
    let server = std::thread::spawn(move || runner.run(&mut Echo));

    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let seg = s.seg.clone();
            let done = done.clone();
            let progress = progress.clone();
            std::thread::spawn(move || {
                let mut port = seg.bind_dynamic("client").unwrap();
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut seq = 0;
                while !done.load(Relaxed) {
                    seq += 1;
                    progress.fetch_add(1, Relaxed);
                    let Ok(mut req) = port.alloc(Op::Write, b"garbage", 512) else {
                        failed += 1;
                        continue;
                    };
                    let mut data = [0u8; 512];
                    pattern(c, seq, &mut data);
                    if req.write_data(&data).is_err() {
                        failed += 1;
                        continue;
                    }
                    match port.call(req, 1, Duration::from_millis(100)) {
                        Ok(rep) if rep.status() == Status::Ok => {
                            ok += 1;
                            port.free(rep);
                        }
                        Ok(rep) => {
                            failed += 1;
                            port.free(rep);
                        }
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    // Scribble over the header, the rings and the request slots with atomic stores (so the test
    // itself has no data race): 8-byte words at random aligned offsets.
    let (base, _) = s.seg.raw();
    // The rings actually in use (the server's and the two clients' ports), all request slots,
    // and the header.
    let ring = |p: u64, kind: u64| {
        (
            layout.rings_off + (p * 2 + kind) * layout.ring_size,
            128 + 64,
        )
    };
    let regions = [
        (0u64, 4096u64),
        ring(1, 0),
        ring(4, 1),
        ring(5, 1),
        (
            layout.requests_off,
            u64::from(layout.config.nr_requests) * 448,
        ),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..3000 {
        let (off, len) = regions[i % regions.len()];
        let at = off + rng.random_range(0..len / 8) * 8;
        // SAFETY: `at` is 8-aligned and inside the mapping (regions come from the layout).
        let word = unsafe { &*(base.add(at as usize) as *const AtomicU64) };
        word.store(rng.random(), Relaxed);
        // Pace the damage by the clients' progress, so it lands while requests are in flight.
        let target = progress.load(Relaxed) + 2;
        while progress.load(Relaxed) < target {
            std::thread::yield_now();
        }
    }
    done.store(true, Relaxed);
    let mut total_ok = 0;
    for c in clients {
        let (ok, failed) = c.join().expect("a client panicked");
        eprintln!("client: {ok} ok, {failed} failed");
        total_ok += ok;
    }
    assert!(total_ok > 0);

    // The header is garbage now: attaching again fails cleanly instead of mapping nonsense...
    match Segment::attach(&s.path) {
        Ok(seg) => assert_eq!(seg.layout(), &layout, "attached with a different layout"),
        Err(e) => eprintln!("attach refused as expected: {e}"),
    }
    // ...while the running peers keep serving with the layout they computed at attach time.
    // Bounded by time, not by a count of attempts: garbage in the request slots can leave the
    // pool looking empty until dead or stale requests are reaped, which on a loaded machine
    // takes longer than a burst of immediate retries (50 of them once failed in CI).
    let mut port = s.seg.bind_dynamic("after").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = String::from("no attempt");
    let served = loop {
        if std::time::Instant::now() > deadline {
            break false;
        }
        let req = match port.alloc(Op::Ping, b"", 0) {
            Ok(req) => req,
            Err(e) => {
                last = format!("alloc: {e}");
                std::thread::yield_now();
                continue;
            }
        };
        match port.call(req, 1, Duration::from_secs(2)) {
            Ok(rep) if rep.status() == Status::Ok => break true,
            Ok(rep) => last = format!("reply status {}", rep.status()),
            Err(e) => last = format!("call: {e}"),
        }
    };
    assert!(
        served,
        "the echo peer stopped serving after the garbage (XSEG_SEED={seed}; last: {last})"
    );
    stop_server.stop();
    server.join().expect("the server panicked");
}
