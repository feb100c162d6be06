//! Lock-free multi-producer, single-consumer ring of request indices across processes.
//!
//! Each slot is one u64: the position it is meant for (low 32 bits of the ring position) in the
//! high half, and a tag in the low half: `EMPTY`, `SKIPPED`, or a request index + 2.
//! A producer claims a position by compare-and-swap on `tail`, then publishes by
//! compare-and-swap of the slot from `EMPTY(pos)` to `FULL(pos, index)`. A producer killed
//! between the two steps would leave a hole that blocks the consumer forever in a classic
//! bounded queue; here the consumer, after the hole has lasted [`HOLE_PATIENCE`], marks it
//! `SKIPPED` and moves on, and a slow producer whose slot was skipped retries at a new position.
//! So no state that a dead process leaves behind can stall the ring: nothing here is a lock.
//!
//! Positions carry the lap number, so a stale or replayed slot value is recognised (no ABA).
//! Head and tail are free-running counters read from shared memory, so garbage can put them
//! anywhere: all arithmetic on them wraps.

use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

const EMPTY: u64 = 0;
const SKIPPED: u64 = 1;
const FIRST_INDEX: u64 = 2;

/// How long a claimed but unpublished slot may block the consumer before it is skipped.
pub const HOLE_PATIENCE: Duration = Duration::from_millis(20);
/// Bound on a producer's retries; reached only when the ring memory is corrupted.
const MAX_PUSH_ATTEMPTS: u32 = 1_000;

fn slot_value(pos: u64, tag: u64) -> u64 {
    (pos & 0xffff_ffff) << 32 | tag
}

/// A ring view: raw pointers into the segment plus the capacity (never read from the segment).
#[derive(Clone, Copy)]
pub struct Ring {
    head: *const AtomicU64,
    tail: *const AtomicU64,
    slots: *const AtomicU64,
    capacity: u64,
}

// SAFETY: a Ring only hands out shared references to atomics in a MAP_SHARED mapping that the
// owning Segment keeps alive; atomics are safe to use from any thread.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

/// What the consumer found.
#[derive(Debug, PartialEq, Eq)]
pub enum Pop {
    Item(u32),
    Empty,
    /// A producer has claimed the next slot but not published it yet.
    Pending,
    /// A slot or counter held garbage and was discarded.
    Corrupt,
}

/// Consumer-side memory of a hole, kept in the consuming process (not in the segment).
#[derive(Default, Debug)]
pub struct HoleWatch {
    pos: Option<(u64, Instant)>,
}

impl Ring {
    /// # Safety
    /// `base` must point to `RING_HEADER + capacity * 8` bytes inside a live mapping, 8-aligned,
    /// that stays mapped for as long as the returned value is used.
    pub unsafe fn from_raw(base: *mut u8, capacity: u64) -> Ring {
        debug_assert!(capacity.is_power_of_two());
        Ring {
            head: base as *const AtomicU64,
            // SAFETY: both offsets are within the region the caller vouched for.
            tail: unsafe { base.add(64) } as *const AtomicU64,
            // SAFETY: as above.
            slots: unsafe { base.add(crate::layout::RING_HEADER as usize) } as *const AtomicU64,
            capacity,
        }
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: see from_raw.
        unsafe { &*self.head }
    }
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: see from_raw.
        unsafe { &*self.tail }
    }
    fn slot(&self, pos: u64) -> &AtomicU64 {
        // SAFETY: the index is reduced modulo the capacity the caller vouched for.
        unsafe { &*self.slots.add((pos & (self.capacity - 1)) as usize) }
    }

    /// Writes an empty ring. Only while nobody else can touch it (creation or reclaim).
    pub fn init(&self) {
        for pos in 0..self.capacity {
            self.slot(pos).store(slot_value(pos, EMPTY), Relaxed);
        }
        self.head().store(0, Relaxed);
        self.tail().store(0, Release);
    }

    /// Publishes `index`. Fails only when the ring is full or corrupted.
    pub fn push(&self, index: u32) -> Result<(), PushError> {
        let tag = u64::from(index) + FIRST_INDEX;
        let mut full = false;
        for _ in 0..MAX_PUSH_ATTEMPTS {
            // Head first: it only grows, so a tail read afterwards is never behind it, and the
            // difference can only overstate the fill (which a retry corrects), never wrap.
            let head = self.head().load(Acquire);
            let tail = self.tail().load(Acquire);
            let used = tail.wrapping_sub(head);
            if used >= self.capacity {
                full = used == self.capacity;
                std::hint::spin_loop();
                continue;
            }
            if self
                .tail()
                .compare_exchange_weak(tail, tail.wrapping_add(1), AcqRel, Relaxed)
                .is_err()
            {
                std::hint::spin_loop();
                continue;
            }
            if self
                .slot(tail)
                .compare_exchange(
                    slot_value(tail, EMPTY),
                    slot_value(tail, tag),
                    AcqRel,
                    Relaxed,
                )
                .is_ok()
            {
                return Ok(());
            }
            // The consumer skipped our slot (we were too slow): try again at a new position.
        }
        Err(if full {
            PushError::Full
        } else {
            PushError::Corrupt
        })
    }

    /// True when a pop might find something (cheap check for the wait loop).
    pub fn maybe_nonempty(&self) -> bool {
        self.tail().load(Acquire) != self.head().load(Relaxed)
    }

    /// Takes the next index. Single consumer: the caller must be the port's only consumer.
    pub fn pop(&self, watch: &mut HoleWatch) -> Pop {
        let head = self.head().load(Relaxed);
        let tail = self.tail().load(Acquire);
        if tail == head {
            return Pop::Empty;
        }
        if tail.wrapping_sub(head) > self.capacity {
            // Garbage in the counters: resynchronise to an empty ring at the current head.
            for i in 0..self.capacity {
                let pos = head.wrapping_add(i);
                self.slot(pos).store(slot_value(pos, EMPTY), Relaxed);
            }
            self.tail().store(head, Release);
            return Pop::Corrupt;
        }
        let slot = self.slot(head);
        let value = slot.load(Acquire);
        let expect_pos = head & 0xffff_ffff;
        let (pos, tag) = (value >> 32, value & 0xffff_ffff);
        if pos == expect_pos && tag >= FIRST_INDEX {
            self.advance(head);
            watch.pos = None;
            return Pop::Item((tag - FIRST_INDEX) as u32);
        }
        if pos == expect_pos && tag == EMPTY {
            let now = Instant::now();
            match watch.pos {
                Some((p, since)) if p == head => {
                    if now.duration_since(since) < HOLE_PATIENCE {
                        return Pop::Pending;
                    }
                    if slot
                        .compare_exchange(value, slot_value(head, SKIPPED), AcqRel, Relaxed)
                        .is_err()
                    {
                        // Published just now: take it next time round.
                        return Pop::Pending;
                    }
                    self.advance(head);
                    watch.pos = None;
                    return Pop::Corrupt;
                }
                _ => {
                    watch.pos = Some((head, now));
                    return Pop::Pending;
                }
            }
        }
        // SKIPPED left behind, or garbage: discard the slot.
        self.advance(head);
        watch.pos = None;
        Pop::Corrupt
    }

    fn advance(&self, head: u64) {
        self.slot(head)
            .store(slot_value(head.wrapping_add(self.capacity), EMPTY), Release);
        self.head().store(head.wrapping_add(1), Release);
    }

    /// Entries between head and tail (approximate under concurrency).
    pub fn queued(&self) -> u64 {
        self.tail()
            .load(Acquire)
            .wrapping_sub(self.head().load(Acquire))
            .min(self.capacity)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    Full,
    Corrupt,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Mem(Vec<AtomicU64>);
    fn ring(cap: u64) -> (Arc<Mem>, Ring) {
        let words = (crate::layout::RING_HEADER / 8 + cap) as usize;
        let mem = Arc::new(Mem((0..words).map(|_| AtomicU64::new(0)).collect()));
        // SAFETY: the vector is large enough and outlives the ring in each test.
        let r = unsafe { Ring::from_raw(mem.0.as_ptr() as *mut u8, cap) };
        r.init();
        (mem, r)
    }

    #[test]
    fn fifo_and_full() {
        let (_m, r) = ring(4);
        let mut w = HoleWatch::default();
        assert_eq!(r.pop(&mut w), Pop::Empty);
        for i in 0..4 {
            r.push(i).unwrap();
        }
        assert_eq!(r.push(9), Err(PushError::Full));
        for i in 0..4 {
            assert_eq!(r.pop(&mut w), Pop::Item(i));
        }
        assert_eq!(r.pop(&mut w), Pop::Empty);
        // Wrap around many laps.
        for i in 0..1000 {
            r.push(i).unwrap();
            assert_eq!(r.pop(&mut w), Pop::Item(i));
        }
    }

    #[test]
    fn a_hole_left_by_a_dead_producer_is_skipped() {
        let (_m, r) = ring(8);
        let mut w = HoleWatch::default();
        // A producer that claimed position 0 and died before publishing.
        r.tail().store(1, Release);
        r.push(7).unwrap();
        assert_eq!(r.pop(&mut w), Pop::Pending);
        let start = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() {
            match r.pop(&mut w) {
                Pop::Item(i) => got.push(i),
                Pop::Pending | Pop::Corrupt => std::thread::yield_now(),
                Pop::Empty => panic!("lost the item"),
            }
            assert!(start.elapsed() < Duration::from_secs(10));
        }
        assert_eq!(got, vec![7]);
        assert!(start.elapsed() >= HOLE_PATIENCE);
    }

    #[test]
    fn positions_at_the_top_of_u64_wrap_around() {
        // Head and tail are read from shared memory: garbage can put them anywhere, the very
        // top included (found by fuzz/fuzz_targets/xseg_requests.rs as an overflow panic).
        let (_m, r) = ring(8);
        let start = u64::MAX - 2;
        for i in 0..8 {
            let pos = start.wrapping_add(i);
            r.slot(pos).store(slot_value(pos, EMPTY), Relaxed);
        }
        r.head().store(start, Relaxed);
        r.tail().store(start, Relaxed);
        let mut w = HoleWatch::default();
        for i in 0..6 {
            r.push(i).unwrap();
        }
        for i in 0..6 {
            assert_eq!(r.pop(&mut w), Pop::Item(i));
        }
        assert_eq!(r.pop(&mut w), Pop::Empty);
        // A tail far beyond the head: the ring resynchronises without overflowing.
        r.head().store(u64::MAX - 1, Relaxed);
        r.tail().store(100, Relaxed);
        assert_eq!(r.pop(&mut w), Pop::Corrupt);
        r.push(4).unwrap();
        assert_eq!(r.pop(&mut w), Pop::Item(4));
    }

    #[test]
    fn garbage_never_panics_and_ring_recovers() {
        use rand::Rng;
        let (m, r) = ring(16);
        let mut rng = rand::rng();
        let mut w = HoleWatch::default();
        for _ in 0..2000 {
            let i = rng.random_range(0..m.0.len());
            m.0[i].store(rng.random(), Relaxed);
            let _ = r.push(rng.random_range(0..100));
            for _ in 0..4 {
                if let Pop::Item(x) = r.pop(&mut w) {
                    let _ = x;
                }
            }
        }
        // Reinitialise and check it still works as a queue.
        r.init();
        r.push(3).unwrap();
        assert_eq!(r.pop(&mut w), Pop::Item(3));
    }

    #[test]
    fn many_producers_one_consumer_lose_nothing() {
        let (m, r) = ring(64);
        let producers = 4;
        let per = 20_000u32;
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let _keep = m;
                    for i in 0..per {
                        loop {
                            match r.push(p * per + i) {
                                Ok(()) => break,
                                Err(PushError::Full) => std::thread::yield_now(),
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                    }
                })
            })
            .collect();
        let mut seen = vec![false; (producers * per) as usize];
        let mut w = HoleWatch::default();
        let mut n = 0;
        while n < seen.len() {
            match r.pop(&mut w) {
                Pop::Item(i) => {
                    assert!(!seen[i as usize], "duplicate {i}");
                    seen[i as usize] = true;
                    n += 1;
                }
                _ => std::thread::yield_now(),
            }
        }
        for h in handles {
            h.join().unwrap();
        }
    }
}
