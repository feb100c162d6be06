//! Attaching to a segment whose header page another local process wrote: the fuzz bytes are
//! laid over the header of a valid image (and may cut or grow the file), then the real
//! `Segment::attach` validates it. What attaches must then be safe to use: its ports listed,
//! its dead owners reaped, its counters read, a port bound.
#![no_main]

#[path = "../common/segment.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use xseg::Segment;
use xseg::layout::PAGE;

fuzz_target!(|data: &[u8]| {
    let base = common::base();
    let mut image = base.image.clone();
    let page = PAGE as usize;
    let n = data.len().min(page);
    image[..n].copy_from_slice(&data[..n]);
    // A byte past the page scales the file length: short files and long ones both occur.
    if let Some(&scale) = data.get(page) {
        let len = image.len() * usize::from(scale) / 128;
        image.resize(len.max(1), 0);
    }
    let path = common::fresh_path();
    std::fs::write(&path, &image).expect("write the segment file");
    if let Ok(seg) = Segment::attach(&path) {
        let ports = seg.config().nr_ports;
        let _ = seg.live_ports();
        let _ = seg.reap();
        for p in 0..ports + 1 {
            let _ = seg.port_stats(p);
        }
        let _ = seg.requests_in_use();
        let _ = seg.buffers_in_use();
        if let Ok(port) = seg.bind_dynamic("fuzz") {
            if let Ok(req) = port.alloc(xseg::Op::Ping, b"t", 1) {
                port.free(req);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
});
