//! Helpers shared by the integration tests: volume I/O the way vlmc will do it (MAPW then object
//! writes; MAPR then object reads with zero-fill), and seed handling.

#![allow(dead_code)]

use peers::mapper::{Mapper, MapperError};

/// Write `data` at `offset`: MAPW, then one blocker write per extent.
pub async fn write(m: &Mapper, vol: &str, offset: u64, data: &[u8]) -> Result<(), MapperError> {
    let extents = m.map_write(vol, offset, data.len() as u64).await?;
    let mut covered = 0;
    for e in extents {
        let at = (e.volume_offset - offset) as usize;
        let obj = e.object().expect("MAPW never returns a ZERO extent");
        m.data_blocker()
            .write(obj, e.object_offset, &data[at..at + e.length as usize])
            .await
            .expect("blocker write");
        covered += e.length;
    }
    assert_eq!(covered, data.len() as u64, "extents cover the range");
    Ok(())
}

/// Read `len` bytes at `offset`: MAPR, then blocker reads, ZERO extents zero-filled locally.
pub async fn read(m: &Mapper, vol: &str, offset: u64, len: usize) -> Result<Vec<u8>, MapperError> {
    let mut out = vec![0xa5u8; len];
    let mut covered = 0;
    for e in m.map_read(vol, offset, len as u64).await? {
        let at = (e.volume_offset - offset) as usize;
        let buf = &mut out[at..at + e.length as usize];
        match e.object() {
            None => buf.fill(0),
            Some(o) => m
                .data_blocker()
                .read(o, e.object_offset, buf)
                .await
                .expect("blocker read"),
        }
        covered += e.length;
    }
    assert_eq!(covered, len as u64, "extents cover the range");
    Ok(out)
}

/// Discard a range and zero-write the partial blocks it hands back, as vlmc will.
pub async fn discard(m: &Mapper, vol: &str, offset: u64, len: u64) -> Result<(), MapperError> {
    let outcome = m.discard(vol, offset, len).await?;
    for e in outcome.zero_write {
        let obj = e.object().expect("zero-write extents are writable objects");
        let zeros = vec![0u8; e.length as usize];
        m.data_blocker()
            .write(obj, e.object_offset, &zeros)
            .await
            .expect("blocker write");
    }
    Ok(())
}

/// The seed of a randomized test: `ARCHIP_SEED` if set, else fresh. Always printed, so that a
/// failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("ARCHIP_SEED") {
        Ok(s) => s.parse().expect("ARCHIP_SEED must be a u64"),
        Err(_) => rand::random(),
    };
    eprintln!("{test}: ARCHIP_SEED={seed}");
    seed
}
