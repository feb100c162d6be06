//! Dead-peer recovery: finding ports whose owner process died and failing back, freeing or
//! passing on every request the dead peer held, so that no sender waits forever and nothing in
//! the segment leaks. Nothing in the segment is a lock, so any peer may do this at any time.

use std::sync::atomic::Ordering::*;

use crate::layout::*;
use crate::owner::{ProcessId, pid_alive};
use crate::protocol::Status;
use crate::ring::{HoleWatch, Pop, Ring};
use crate::segment::{RingKind, Segment};

impl Segment {
    fn fail_back(&self, r: u32) {
        let q = self.req(r);
        q.result.store(Status::PeerGone.code(), Relaxed);
        q.serviced.store(0, Relaxed);
        self.respond_raw(r);
    }

    /// Finds ports whose owner died and recovers them: requests they were serving are failed
    /// back to their senders, requests they had sent are freed, and the port becomes free.
    /// Any peer may call it at any time; a compare-and-swap makes one of them do the work.
    /// Returns the number of ports recovered.
    pub fn reap(&self) -> usize {
        let mut recovered = 0;
        for p in 0..self.layout().config.nr_ports {
            let port = self.port(p);
            let w = port.owner.load(Acquire);
            let pid = (w >> 32) as u32;
            let dead = match w & 0xffff_ffff {
                PORT_BOUND => !ProcessId {
                    pid,
                    start: port.owner_start.load(Acquire),
                }
                .is_alive(),
                PORT_BINDING | PORT_RECLAIMING => !pid_alive(pid),
                PORT_FREE => {
                    self.ring(p, RingKind::Requests).maybe_nonempty()
                        || self.ring(p, RingKind::Replies).maybe_nonempty()
                }
                _ => true, // garbage in the owner word
            };
            if !dead {
                continue;
            }
            let mine = u64::from(self.me().pid) << 32 | PORT_RECLAIMING;
            if port
                .owner
                .compare_exchange(w, mine, AcqRel, Relaxed)
                .is_err()
            {
                continue;
            }
            if w & 0xffff_ffff != PORT_FREE {
                tracing::warn!(port = p, pid, "port owner died; failing back its requests");
                recovered += 1;
            }
            self.retire_port(p);
        }
        if recovered > 0 {
            self.sweep_buffers();
        }
        recovered
    }

    /// Fails back and frees what port `p` held, then frees the port. The caller has put the
    /// owner word in the RECLAIMING state, which keeps everyone else off the port's rings.
    pub(crate) fn retire_port(&self, p: u32) {
        self.recover_port(p);
        let port = self.port(p);
        port.generation.fetch_add(1, AcqRel);
        port.sleeping.store(0, Relaxed);
        port.owner.store(PORT_FREE, Release);
    }

    fn recover_port(&self, p: u32) {
        let epoch = self.port(p).generation.load(Acquire);
        let me_hop = u64::from(epoch) << 32 | u64::from(p);
        let mut watch = HoleWatch::default();
        let requests = self.ring(p, RingKind::Requests);
        self.drain(&requests, &mut watch, |r| {
            let q = self.req(r);
            if q.holder.load(Acquire) == p
                && q.state
                    .compare_exchange(REQ_QUEUED, REQ_SERVING, AcqRel, Relaxed)
                    .is_ok()
            {
                self.fail_back(r);
            }
        });
        let replies = self.ring(p, RingKind::Replies);
        let mut watch = HoleWatch::default();
        self.drain(&replies, &mut watch, |r| {
            let q = self.req(r);
            if q.holder.load(Acquire) == p && q.state.load(Acquire) == REQ_REPLIED {
                self.reply_to_dead(r, me_hop);
            }
        });
        for r in 0..self.layout().config.nr_requests {
            let q = self.req(r);
            let state = q.state.load(Acquire);
            let owner = q.owner.load(Acquire);
            let holder = q.holder.load(Acquire);
            let server = q.dst_port.load(Acquire);
            match state {
                REQ_SERVING if holder == p => self.fail_back(r),
                REQ_ALLOCATED if owner as u32 == p => self.free_request(r),
                REQ_REPLIED if holder == p => self.reply_to_dead(r, me_hop),
                // `p` died inside `respond_raw`, after choosing the port the reply goes to
                // (`holder`) but before it was queued there: nobody else would ever pass it
                // on, and the sender would wait forever. Finish the hand-off. A reply that was
                // queued already gets a second ring entry, which its receiver drops (it takes
                // a request only in the REPLIED state, once).
                REQ_SERVING
                    if holder != p
                        && server == p
                        && q.state
                            .compare_exchange(REQ_SERVING, REQ_REPLIED, AcqRel, Relaxed)
                            .is_ok() =>
                {
                    self.requeue_reply(r, holder)
                }
                REQ_REPLIED if holder != p && server == p => self.requeue_reply(r, holder),
                // `p` sent or forwarded it (it is the last hop of the path) and died inside
                // the ring push: a claimed but never published slot, which the consumer skips
                // after a while. Queue it again; a duplicate entry of a request that did
                // arrive is dropped by the consumer, which takes it only while QUEUED.
                REQ_QUEUED
                    if holder != p
                        && self.last_hop(r) == Some(p)
                        && self.valid_port(holder)
                        && self.ring(holder, RingKind::Requests).push(r).is_ok() =>
                {
                    self.wake(holder)
                }
                _ => {}
            }
        }
        // No re-initialisation of the rings: a sender that checked the port just before it was
        // taken over may still push, and wiping the ring would lose that request. Whatever
        // arrives late is drained by the next reap of the now free port, or served by the next
        // peer that binds it.
    }

    /// The port of the last hop on `r`'s return path: the port that sent it on last.
    fn last_hop(&self, r: u32) -> Option<u32> {
        let q = self.req(r);
        let len = q.path_len.load(Acquire) as usize;
        (1..=MAX_HOPS)
            .contains(&len)
            .then(|| q.path[len - 1].load(Acquire) as u32)
    }

    /// Queues reply `r` (again) to port `to`, for a responder that died before queueing it.
    fn requeue_reply(&self, r: u32, to: u32) {
        if !self.valid_port(to) {
            self.free_request(r);
            return;
        }
        tracing::debug!(request = r, port = to, "finishing a dead peer's reply");
        if self.ring(to, RingKind::Replies).push(r).is_ok() {
            self.wake(to);
        }
    }

    /// A reply reached a port whose owner died: free it if that port sent it, else pass the
    /// error on down the return path.
    fn reply_to_dead(&self, r: u32, dead_hop: u64) {
        let q = self.req(r);
        if q.owner.load(Acquire) as u32 == dead_hop as u32 {
            self.free_request(r);
        } else {
            q.result.store(Status::PeerGone.code(), Relaxed);
            self.respond_raw(r);
        }
    }

    fn drain(&self, ring: &Ring, watch: &mut HoleWatch, mut f: impl FnMut(u32)) {
        let deadline = std::time::Instant::now() + crate::ring::HOLE_PATIENCE * 4;
        loop {
            match ring.pop(watch) {
                Pop::Item(r) if r < self.layout().config.nr_requests => f(r),
                Pop::Item(_) | Pop::Corrupt => {}
                Pop::Empty => return,
                Pop::Pending => {
                    if std::time::Instant::now() > deadline {
                        return;
                    }
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Frees buffers whose owning request is free (left by a process killed mid-free).
    fn sweep_buffers(&self) {
        for b in 0..self.layout().total_buffers {
            let o = self.buffer_owner(b).load(Acquire);
            if o == 0 {
                continue;
            }
            let r = o - 1;
            if r >= self.layout().config.nr_requests || self.req(r).state.load(Acquire) == REQ_FREE
            {
                let _ = self.buffer_owner(b).compare_exchange(o, 0, AcqRel, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Op;

    /// A small segment of its own for one test, unlinked at once (the mapping keeps it).
    fn scratch_segment(tag: &str) -> std::sync::Arc<Segment> {
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/xseg-unit-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let config = Config {
            nr_ports: 8,
            dynamic_start: 4,
            nr_requests: 16,
            buffer_classes: vec![(4096, 4)],
        };
        let seg = Segment::create(&path, &config).unwrap();
        let _ = std::fs::remove_file(&path);
        seg
    }

    /// A responder killed inside `respond_raw`, after it stored the reply's destination but
    /// before the reply was queued there: the reaper must finish the hand-off.
    #[test]
    fn reply_cut_short_by_the_responders_death_still_arrives() {
        let seg = scratch_segment("respond");
        let mut client = seg.bind(4, "client").unwrap();
        let mut server = seg.bind(1, "server").unwrap();
        for cut_after_state in [false, true] {
            let req = client.alloc(Op::Write, b"v", 0).unwrap();
            let index = req.index();
            client.submit(req, 1).map_err(|(e, _)| e).unwrap();
            let req = server.accept().expect("request");
            assert_eq!(req.index(), index);
            // What respond_raw stores before its push, then the process dies.
            let q = seg.req(index);
            q.path_len.store(0, Release);
            q.holder.store(4, Release);
            if cut_after_state {
                q.state.store(REQ_REPLIED, Release);
            }
            std::mem::forget(req);
            assert!(client.receive().is_none());
            // The server dies: its start time no longer matches.
            seg.port(1).owner_start.store(1, Release);
            assert_eq!(seg.reap(), 1);
            let rep = client
                .receive()
                .expect("the reply was lost with the responder");
            assert_eq!(rep.index(), index);
            client.free(rep);
            assert_eq!(seg.requests_in_use(), 0);
            // Rebind the port for the next round (the old handle's drop finds it taken).
            std::mem::forget(server);
            server = seg.bind(1, "server").unwrap();
        }
        drop(server);
    }

    /// A forwarder killed inside the ring push (slot claimed, never published): the request
    /// is QUEUED to a live peer but not on its ring. The reaper queues it again.
    #[test]
    fn request_cut_short_by_the_forwarders_death_still_arrives() {
        let seg = scratch_segment("forward");
        let client = seg.bind(4, "client").unwrap();
        let mut forwarder = seg.bind(1, "forwarder").unwrap();
        let mut server = seg.bind(2, "server").unwrap();
        let req = client.alloc(Op::Write, b"v", 0).unwrap();
        let index = req.index();
        client.submit(req, 1).map_err(|(e, _)| e).unwrap();
        let req = forwarder.accept().expect("request");
        // What forward stores before the ring push, then the process dies.
        let q = seg.req(index);
        let len = q.path_len.load(Acquire) as usize;
        let hop = u64::from(seg.port(1).generation.load(Acquire)) << 32 | 1;
        q.path[len].store(hop, Release);
        q.path_len.store(len as u32 + 1, Release);
        q.dst_port.store(2, Release);
        q.holder.store(2, Release);
        q.state.store(REQ_QUEUED, Release);
        std::mem::forget(req);
        assert!(server.accept().is_none());
        seg.port(1).owner_start.store(1, Release);
        assert_eq!(seg.reap(), 1);
        let req = server
            .accept()
            .expect("the request was lost with the forwarder");
        assert_eq!(req.index(), index);
        drop(req);
        std::mem::forget(forwarder);
    }
}
