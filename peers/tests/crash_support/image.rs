//! What a volume or snapshot must contain: its bytes as last written, and per byte range how
//! sure we are of them (flushed, only acknowledged, or unknown).
//!
//! States are kept as runs (not per byte) so that checking a few MiB per iteration is a handful
//! of `memcmp`s even in a debug build.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Certainty {
    /// Written, acknowledged, and a flush of the volume returned Ok since: must read back
    /// exactly, crash or no crash.
    Flushed,
    /// Written and acknowledged, not flushed: must read back while no peer has died since.
    Acked,
    /// A write that failed, or acknowledged data that was not flushed when a peer died:
    /// anything may be there.
    Unknown,
}

/// Runs of equal certainty covering `[0, len)`: `(start, certainty)`, sorted, the first at 0,
/// neighbours different.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Runs(Vec<(u64, Certainty)>);

impl Runs {
    fn new(c: Certainty) -> Runs {
        Runs(vec![(0, c)])
    }

    fn at(&self, offset: u64) -> Certainty {
        let i = self.0.partition_point(|&(s, _)| s <= offset);
        self.0[i - 1].1
    }

    fn set(&mut self, start: u64, end: u64, c: Certainty, len: u64) {
        assert!(
            start < end && end <= len,
            "run {start}..{end} outside 0..{len}"
        );
        let after = (end < len).then(|| self.at(end));
        let mut runs = Vec::with_capacity(self.0.len() + 2);
        runs.extend(self.0.iter().copied().filter(|&(s, _)| s < start));
        runs.push((start, c));
        if let Some(a) = after {
            runs.push((end, a));
        }
        runs.extend(self.0.iter().copied().filter(|&(s, _)| s > end));
        self.0 = runs;
        self.merge();
    }

    fn map(&mut self, f: impl Fn(Certainty) -> Certainty) {
        for r in &mut self.0 {
            r.1 = f(r.1);
        }
        self.merge();
    }

    fn merge(&mut self) {
        self.0.dedup_by(|later, earlier| later.1 == earlier.1);
        debug_assert_eq!(self.0[0].0, 0);
        debug_assert!(
            self.0
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 != w[1].1)
        );
    }

    /// `(start, end, certainty)` for every run, clipped to `[from, to)`.
    fn within(&self, from: u64, to: u64, len: u64) -> impl Iterator<Item = (u64, u64, Certainty)> {
        let ends = self
            .0
            .iter()
            .skip(1)
            .map(|r| r.0)
            .chain(std::iter::once(len));
        self.0
            .iter()
            .zip(ends)
            .filter(move |&(&(s, _), e)| s < to && e > from)
            .map(move |(&(s, c), e)| (s.max(from), e.min(to), c))
    }
}

/// A byte that did not read back as it must.
#[derive(Debug)]
pub struct Mismatch {
    pub offset: u64,
    pub certainty: Certainty,
    /// The run of that certainty the byte lies in.
    pub run: (u64, u64),
    pub expected: Vec<u8>,
    pub actual: Vec<u8>,
    /// Bytes of the run that differ.
    pub differing: u64,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "first bad byte at {} ({:?} run {}..{}, {} bytes of it differ): expected {:02x?}, read {:02x?}",
            self.offset,
            self.certainty,
            self.run.0,
            self.run.1,
            self.differing,
            self.expected,
            self.actual
        )
    }
}

/// A volume's expected content.
#[derive(Clone, Debug)]
pub struct Image {
    data: Vec<u8>,
    runs: Runs,
}

impl Image {
    /// A new volume: zeros, and durable as such (its map is, once create returned).
    pub fn zeroed(len: u64) -> Image {
        Image {
            data: vec![0; len as usize],
            runs: Runs::new(Certainty::Flushed),
        }
    }

    pub fn len(&self) -> u64 {
        self.data.len() as u64
    }

    pub fn write_acked(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        self.data[offset as usize..end as usize].copy_from_slice(bytes);
        self.runs.set(offset, end, Certainty::Acked, self.len());
    }

    pub fn write_failed(&mut self, offset: u64, len: u64) {
        self.runs
            .set(offset, offset + len, Certainty::Unknown, self.len());
    }

    /// A flush of the volume returned Ok: everything acknowledged before it is durable.
    pub fn flushed(&mut self) {
        self.runs.map(|c| match c {
            Certainty::Acked => Certainty::Flushed,
            c => c,
        });
    }

    /// A peer died: what was not flushed may be old or new.
    pub fn crashed(&mut self) {
        self.runs.map(|c| match c {
            Certainty::Acked => Certainty::Unknown,
            c => c,
        });
    }

    /// The content a snapshot or clone taken now starts with. Unflushed bytes are shared with
    /// the source's objects but not promised by any flush of the new map: not asserted on.
    pub fn frozen(&self) -> Image {
        let mut i = self.clone();
        i.crashed();
        i
    }

    /// The bytes the model has at `[offset, offset + len)`, whatever their certainty.
    pub fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        &self.data[offset as usize..(offset + len) as usize]
    }

    /// The flushed runs within `[from, to)`.
    pub fn flushed_runs(&self, from: u64, to: u64) -> Vec<(u64, u64)> {
        self.runs
            .within(from, to, self.len())
            .filter(|r| r.2 == Certainty::Flushed)
            .map(|(s, e, _)| (s, e))
            .collect()
    }

    /// Bytes of each certainty.
    pub fn census(&self) -> [u64; 3] {
        let mut n = [0; 3];
        for (s, e, c) in self.runs.within(0, self.len(), self.len()) {
            n[c as usize] += e - s;
        }
        n
    }

    /// Compares what was read at `offset` with what must be there: flushed bytes always,
    /// acknowledged ones too when `acked_too` (no peer died since they were written).
    pub fn check(&self, offset: u64, actual: &[u8], acked_too: bool) -> Result<(), Mismatch> {
        let to = offset + actual.len() as u64;
        for (s, e, c) in self.runs.within(offset, to, self.len()) {
            let asserted = c == Certainty::Flushed || (acked_too && c == Certainty::Acked);
            if !asserted {
                continue;
            }
            let want = &self.data[s as usize..e as usize];
            let got = &actual[(s - offset) as usize..(e - offset) as usize];
            if want == got {
                continue;
            }
            let first = want.iter().zip(got).position(|(a, b)| a != b).unwrap();
            let differing = want.iter().zip(got).filter(|(a, b)| a != b).count() as u64;
            let show = first..(first + 16).min(want.len());
            return Err(Mismatch {
                offset: s + first as u64,
                certainty: c,
                run: (s, e),
                expected: want[show.clone()].to_vec(),
                actual: got[show].to_vec(),
                differing,
            });
        }
        Ok(())
    }

    /// Of the bytes that were acknowledged but not flushed in `before` (this image as it was
    /// when peers died), how many read back as written: `(acked, survived)`.
    pub fn acked_survival(before: &Image, actual: &[u8]) -> (u64, u64) {
        let (mut acked, mut survived) = (0, 0);
        for (s, e, c) in before.runs.within(0, before.len(), before.len()) {
            if c != Certainty::Acked {
                continue;
            }
            let want = &before.data[s as usize..e as usize];
            let got = &actual[s as usize..e as usize];
            acked += e - s;
            survived += if want == got {
                e - s
            } else {
                want.iter().zip(got).filter(|(a, b)| a == b).count() as u64
            };
        }
        (acked, survived)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_track_writes_flushes_and_crashes() {
        let mut i = Image::zeroed(100);
        i.write_acked(10, &[1; 20]);
        i.write_failed(25, 10);
        assert_eq!(i.census(), [75, 15, 10]);
        i.flushed();
        assert_eq!(i.census(), [90, 0, 10]);
        i.write_acked(0, &[2; 5]);
        i.crashed();
        assert_eq!(i.census(), [85, 0, 15]);
        let mut read = vec![0u8; 100];
        read[10..25].fill(1);
        read[25..35].fill(9);
        assert!(i.check(0, &read, true).is_ok());
        read[40] = 7;
        let m = i.check(0, &read, true).unwrap_err();
        assert_eq!(m.offset, 40);
        assert!(i.check(41, &read[41..], true).is_ok());
    }
}
