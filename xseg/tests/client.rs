//! The asynchronous client's patient call: a request whose peer holds it longer than any
//! timeout is waited for, never abandoned, and its reply is the call's result.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use common::*;
use xseg::{AsyncClient, Op};

const SERVER: u32 = 2;

#[tokio::test]
async fn call_to_reply_outlasts_its_period_and_returns_the_reply() {
    let s = Scratch::new("call-to-reply", &small_config());
    let client = AsyncClient::new(&s.seg, "client").unwrap();
    let mut server = s.seg.bind(SERVER, "server").unwrap();
    let slow = Arc::new(AtomicU32::new(0));
    // The server answers only after the caller has been told three times that it waits.
    let serving = {
        let slow = slow.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut req = loop {
                if let Some(req) = server.accept() {
                    break req;
                }
                assert!(Instant::now() < deadline, "no request arrived");
                server.wait(Duration::from_millis(10));
            };
            while slow.load(SeqCst) < 3 {
                assert!(
                    Instant::now() < deadline,
                    "the caller was never told it waits"
                );
                std::thread::yield_now();
            }
            req.complete(512);
            server.respond(req);
        })
    };
    let req = client.alloc(Op::Write, b"object", 512).unwrap();
    let counted = slow.clone();
    let rep = client
        .call_to_reply(req, SERVER, Duration::from_millis(1), move |_| {
            counted.fetch_add(1, SeqCst);
        })
        .await
        .expect("the reply, however late");
    assert_eq!(rep.serviced(), 512);
    assert!(slow.load(SeqCst) >= 3);
    serving.join().unwrap();
}
