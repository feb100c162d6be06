//! Cutting a volume byte range at block boundaries. A block is one object, so each piece is
//! one object I/O: vlmc splits client I/O this way and the mapper its MAPR, MAPW and discard
//! ranges, and both must cut in the same places.

/// One piece of a range, within one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub block: u64,
    /// Offset within the block's object.
    pub object_offset: u64,
    /// Offset within the volume.
    pub volume_offset: u64,
    /// Offset within the range (within the request's data, for vlmc).
    pub at: u64,
    pub len: u64,
}

impl Piece {
    /// Whether the piece covers its whole block, `block_len` long (the last block of a volume
    /// may be short): a write of it replaces the block's data, with nothing to copy first.
    pub fn covers(&self, block_len: u64) -> bool {
        self.object_offset == 0 && self.len == block_len
    }
}

/// `[offset, offset + len)` cut at multiples of `block_size`; empty for `len == 0`. The caller
/// has checked that the range does not overflow.
pub(crate) fn split(offset: u64, len: u64, block_size: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity((len / block_size + 2) as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let block = pos / block_size;
        let object_offset = pos % block_size;
        let n = (block_size - object_offset).min(end - pos);
        out.push(Piece {
            block,
            object_offset,
            volume_offset: pos,
            at: pos - offset,
            len: n,
        });
        pos += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_cuts_at_block_boundaries() {
        let p = split(100, 300, 128);
        let v: Vec<_> = p
            .iter()
            .map(|p| (p.block, p.object_offset, p.at, p.len))
            .collect();
        assert_eq!(
            v,
            vec![
                (0, 100, 0, 28),
                (1, 0, 28, 128),
                (2, 0, 156, 128),
                (3, 0, 284, 16)
            ]
        );
        assert!(split(5, 0, 128).is_empty());
        assert_eq!(split(128, 128, 128).len(), 1);
    }

    #[test]
    fn pieces_carry_their_volume_offset_and_know_whole_blocks() {
        let p = split(100, 300, 128);
        let offsets: Vec<_> = p.iter().map(|p| p.volume_offset).collect();
        assert_eq!(offsets, vec![100, 128, 256, 384]);
        let whole: Vec<_> = p.iter().map(|p| p.covers(128)).collect();
        assert_eq!(whole, vec![false, true, true, false]);
        // A short last block, covered entirely.
        assert!(split(384, 16, 128)[0].covers(16));
    }
}
