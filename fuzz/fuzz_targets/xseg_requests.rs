//! Garbage in the shared structures of a live segment: a hostile or buggy local process can
//! write any word of the port table, the rings, the request slots and the buffer owner table.
//! A valid segment gets two bound ports and a few requests in flight; then the input (a list
//! of `(u32 offset, u64 value)` writes) is applied to those regions, and the real receive
//! paths run: accept and serve on one port, receive replies on the other, reap dead owners.
//! Each may fail requests, but must never read out of bounds, panic or spin.
#![no_main]

#[path = "../common/segment.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use xseg::protocol::{MapReply, NamePayload};
use xseg::{Op, Segment};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, writes)) = data.split_first() else {
        return;
    };
    let path = common::fresh_path();
    std::fs::write(&path, &common::base().image).expect("write the segment file");
    let seg = Segment::attach(&path).expect("the base image attaches");
    let server = seg.bind(0, "server").expect("bind port 0");
    let client = seg.bind(1, "client").expect("bind port 1");

    // A few requests in flight from the client to the server, with targets and data.
    for i in 0..u64::from(sel % 5) {
        let Ok(mut req) = client.alloc(Op::Write, b"volume-1", 100 + i * 3000) else {
            break;
        };
        req.set_offset(i << 12);
        req.set_size(100 + i * 3000);
        if client.submit(req, 0).is_err() {
            break;
        }
    }

    // The damage: 8-byte-aligned words anywhere from the port table up to the buffers.
    let layout = seg.layout().clone();
    let start = layout.ports_off as usize;
    let end = layout.classes[0].offset as usize;
    let (base, len) = seg.raw();
    assert!(end <= len);
    for w in writes.chunks_exact(12) {
        let off = u32::from_le_bytes(w[..4].try_into().unwrap()) as usize;
        let off = start + (off % (end - start)) / 8 * 8;
        let value = u64::from_le_bytes(w[4..].try_into().unwrap());
        // SAFETY: `off` is 8-aligned (every region starts page aligned) and inside the
        // mapping, which `seg` keeps alive; other processes write these words the same way,
        // so an atomic store is the honest model of them.
        unsafe { (*base.add(off).cast::<AtomicU64>()).store(value, Ordering::Release) };
    }

    // The server side: every field of an accepted request is read through its checks.
    let mut server = server;
    for _ in 0..16 {
        let Some(mut req) = server.accept() else {
            break;
        };
        let _ = (req.op(), req.flags(), req.offset(), req.size(), req.tag());
        if let Ok(t) = req.target() {
            let _ = t.as_str();
        }
        let _ = req.capacity();
        if let Ok(d) = req.data() {
            let _ = MapReply::decode(d);
            let _ = NamePayload::decode(d);
        }
        if let Ok(b) = req.buffer_mut() {
            let n = b.len().min(16);
            b[..n].fill(0xa5);
        }
        let _ = req.data_mut();
        if sel & 0x80 != 0 {
            req.fail(xseg::Status::Io);
        } else {
            let size = req.size();
            req.complete(size);
        }
        server.respond(req);
    }

    // The client side: replies, each read and freed.
    let mut client = client;
    for _ in 0..16 {
        let Some(req) = client.receive() else {
            break;
        };
        let _ = (req.status(), req.serviced(), req.data().map(|d| d.len()));
        client.free(req);
    }

    let _ = seg.reap();
    let _ = seg.live_ports();
    for p in 0..layout.config.nr_ports {
        let _ = seg.port_stats(p);
    }
    let _ = seg.requests_in_use();
    let _ = seg.buffers_in_use();
    drop(server);
    drop(client);
    let _ = seg.reap();
    drop(seg);
    let _ = std::fs::remove_file(&path);
});
