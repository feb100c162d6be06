//! Dedup and import: content-addressed objects, so that identical blocks are stored once.
//!
//! A CONTENT object is named `ct.<sha256>` of its data with trailing zeros stripped (reads past
//! the end return zeros, so the stripped form reads back the same at any block size, and an
//! all-zero block is simply a ZERO entry). Before a map refers to one, the object is checked:
//! an existing object is reused only if it hashes to its name, otherwise it is rewritten; the
//! data blocker is flushed before the page that refers to it is written.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::volume::{BlockState, VolumeMap};
use super::{Mapper, MapperError, ResultExt};
use crate::blocker::ObjectName;
use crate::map_format::{MapPage, VolumeName, content_object};

/// What a dedup pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedupReport {
    /// Blocks that were OBJECT entries and are now CONTENT (or ZERO).
    pub converted: u64,
    /// Of those, blocks that turned out all zero.
    pub zero: u64,
    /// Content objects written (new data).
    pub written: u64,
    /// Content objects that already existed (data stored once).
    pub reused: u64,
    pub bytes_written: u64,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub blocks: u64,
    /// All-zero blocks, stored as ZERO entries.
    pub zero: u64,
    pub written: u64,
    pub reused: u64,
    pub bytes_written: u64,
}

fn strip_zeros(data: &[u8]) -> &[u8] {
    let end = data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    &data[..end]
}

impl Mapper {
    /// Make sure `ct.<hash>` holds exactly `data`. Returns whether it had to be written.
    /// Caller holds `self.content`.
    async fn ensure_content(
        &self,
        volume: &VolumeName,
        hash: &[u8; 32],
        data: &[u8],
    ) -> Result<bool, MapperError> {
        let object = content_object(hash);
        if let Some(info) = self.data.info(&object).await.ctx(volume)? {
            if info.size == data.len() as u64 {
                let mut existing = vec![0u8; data.len()];
                self.data
                    .read(&object, 0, &mut existing)
                    .await
                    .ctx(volume)?;
                if Sha256::digest(&existing).as_slice() == hash {
                    return Ok(false);
                }
            }
            tracing::warn!(object = %object, "content object does not match its name; rewriting");
            // In place: the blocker peer may hold a descriptor of this object open, and reads
            // through it must see the rewrite, not a deleted file's bad content.
            self.data.truncate(&object).await.ctx(volume)?;
        }
        self.data.write(&object, 0, data).await.ctx(volume)?;
        Ok(true)
    }

    /// Turn a snapshot's object blocks into content-addressed ones. Only the snapshot's map
    /// changes; objects it no longer refers to are left to GC.
    pub async fn dedup(&self, snapshot: &str) -> Result<DedupReport, MapperError> {
        let name = VolumeName::new(snapshot)?;
        let _g = self.gate.read().await;
        let _c = self.content.lock().await;
        let mut map = VolumeMap::load(self.maps.as_ref(), &name).await?;
        if !map.header.read_only() {
            return Err(MapperError::NotASnapshot {
                volume: name.to_string(),
            });
        }
        let mut report = DedupReport::default();
        let pe = u64::from(map.header.page_entries);
        let mut buf = vec![0u8; map.header.block_size as usize];
        let mut converted_pages = BTreeMap::new();
        for p in 0..map.pages.len() as u32 {
            let mut page = map.pages[p as usize].page.clone();
            let mut changed = false;
            let first = u64::from(p) * pe;
            for i in 0..page.len() {
                let block = first + i as u64;
                if block >= map.block_count() || map.state(block) != BlockState::Shared {
                    continue;
                }
                let object = map.object(block).expect("object entries have objects");
                let len = map.header.block_len(block) as usize;
                self.data
                    .read(&object, 0, &mut buf[..len])
                    .await
                    .ctx(&name)?;
                let data = strip_zeros(&buf[..len]);
                if data.is_empty() {
                    page.set(i, crate::map_format::MapEntry::Zero);
                    report.zero += 1;
                } else {
                    let hash: [u8; 32] = Sha256::digest(data).into();
                    if self.ensure_content(&name, &hash, data).await? {
                        report.written += 1;
                        report.bytes_written += data.len() as u64;
                    } else {
                        report.reused += 1;
                    }
                    page.set_content(i, hash);
                }
                report.converted += 1;
                changed = true;
            }
            if changed {
                converted_pages.insert(p, page);
            }
        }
        if !converted_pages.is_empty() {
            // The content must be durable before a map refers to it.
            self.data.flush().await.ctx(&name)?;
            // Under a new uuid, never in place: clones may inherit (and cache) the old pages,
            // which must keep naming the objects they read until nothing inherits them.
            let mut rebased = map.rebased(converted_pages);
            if let Err(e) = rebased.persist_replacement(self.maps.as_ref()).await {
                // The header swap may have landed all the same: a cached copy is unsure now.
                if let Some(v) = self.lookup(&name) {
                    v.mark_stale();
                }
                return Err(e);
            }
            map = rebased;
        }
        // A cached copy of the snapshot is now stale.
        if let Some(v) = self.lookup(&name) {
            v.install(map);
        }
        tracing::info!(snapshot = %name, ?report, "dedup done");
        Ok(report)
    }

    /// Write whole blocks of an image into a volume as content-addressed objects, skipping
    /// all-zero blocks. `offset` must be block-aligned, and `data` whole blocks (the last block
    /// of the volume may be short). The blocks' previous contents are replaced.
    pub async fn import(
        &self,
        volume: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<ImportReport, MapperError> {
        let name = VolumeName::new(volume)?;
        let vol = self.writable_volume(&name).await?;
        let _g = self.gate.read().await;
        let _c = self.content.lock().await;
        let _m = vol.mutate.lock().await;
        self.reload_locked(&vol).await?;
        vol.check_usable()?;
        let fence = vol.writable()?.clone();
        let (own, bs, pe, size) = {
            let map = vol.map();
            let h = &map.header;
            (
                h.own_pages(),
                u64::from(h.block_size),
                u64::from(h.page_entries),
                h.size,
            )
        };
        let length = data.len() as u64;
        let end =
            offset
                .checked_add(length)
                .filter(|&e| e <= size)
                .ok_or(MapperError::OutOfRange {
                    volume: name.to_string(),
                    offset,
                    length,
                    size,
                })?;
        if offset % bs != 0 || (length % bs != 0 && end != size) {
            return Err(MapperError::Unaligned {
                volume: name.to_string(),
                offset,
                length,
            });
        }
        let mut report = ImportReport::default();
        let mut pages: BTreeMap<u32, (MapPage, Option<u64>)> = BTreeMap::new();
        let mut doomed: Vec<ObjectName> = Vec::new();
        for (k, chunk) in data.chunks(bs as usize).enumerate() {
            let block = offset / bs + k as u64;
            let p = (block / pe) as u32;
            let i = (block % pe) as usize;
            let (old_owned, slot) = {
                let map = vol.map();
                let owned = (map.state(block) == BlockState::Owned)
                    .then(|| map.object(block).expect("owned"));
                let s = &map.pages[p as usize];
                (owned, (s.page.clone(), s.version))
            };
            let entry = pages.entry(p).or_insert(slot);
            let stripped = strip_zeros(chunk);
            report.blocks += 1;
            if stripped.is_empty() {
                entry.0.set(i, crate::map_format::MapEntry::Zero);
                report.zero += 1;
            } else {
                let hash: [u8; 32] = Sha256::digest(stripped).into();
                if self.ensure_content(&name, &hash, stripped).await? {
                    report.written += 1;
                    report.bytes_written += stripped.len() as u64;
                } else {
                    report.reused += 1;
                }
                entry.0.set_content(i, hash);
            }
            doomed.extend(old_owned);
        }
        self.data.flush().await.ctx(&name)?;
        let r = self.persist_pages(&vol, own, pages, &fence).await;
        vol.observe(r)?;
        // Truncated, not deleted: a later write to the block makes it OWNED again under the
        // same name (this epoch), as after a discard (see `io.rs`).
        for obj in doomed {
            self.data.truncate(&obj).await.ctx(&name)?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::strip_zeros;

    #[test]
    fn strips_only_trailing_zeros() {
        assert_eq!(strip_zeros(&[0, 1, 0, 2, 0, 0]), &[0, 1, 0, 2]);
        assert!(strip_zeros(&[0, 0]).is_empty());
        assert!(strip_zeros(&[]).is_empty());
    }
}
