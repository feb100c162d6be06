//! vlmc's I/O planning: an I/O is checked against the volume, split at block (object)
//! boundaries, mapped through the cache or the mapper, and then either forwarded whole (one
//! object) or sent as sub-requests whose replies are composed into the client's buffer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use xseg::protocol::{MapReply, extent};
use xseg::{Op, Request, Status};

use super::cache::{Mapping, Meta, Vol, lock};
use super::{Call, Inner, IntoOutcome, Outcome, Wait};
use crate::block_range::{Piece, split};
use crate::failure::Failure;
use crate::wire::{self, CONTROL_BUF, DiscardReply, VolumeInfo};

impl Inner {
    pub(super) async fn meta(&self, name: &str, vol: &Vol, refresh: bool) -> Result<Meta, Failure> {
        if !refresh && let Some(m) = *lock(&vol.meta) {
            return Ok(m);
        }
        let call = Call {
            op: Op::Info,
            target: name.as_bytes(),
            buffer: CONTROL_BUF,
            wait: Wait::Bounded,
        };
        let rep = self
            .call_again(self.config.mapper_port, call, |_| Ok(()))
            .await?;
        let info = VolumeInfo::decode(rep.data()?)?;
        let m = Meta {
            size: info.size,
            block_size: u64::from(info.block_size).max(512),
        };
        *lock(&vol.meta) = Some(m);
        Ok(m)
    }

    /// The volume's layout, with `[offset, offset + len)` checked against its size (asking the
    /// mapper again before refusing: the volume may have grown through another path).
    async fn checked_meta(
        &self,
        name: &str,
        vol: &Vol,
        offset: u64,
        len: u64,
    ) -> Result<Meta, Failure> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Failure::new(Status::Range, format!("{offset}+{len} overflows")))?;
        let m = self.meta(name, vol, false).await?;
        if end <= m.size {
            return Ok(m);
        }
        let m = self.meta(name, vol, true).await?;
        if end <= m.size {
            return Ok(m);
        }
        Err(Failure::new(
            Status::Range,
            format!("range {offset}+{len} is outside {name} ({} bytes)", m.size),
        ))
    }

    /// Mappings for `pieces`, from the cache or one MAPR/MAPW call covering the misses.
    async fn mappings(
        &self,
        name: &str,
        vol: &Vol,
        meta: Meta,
        pieces: &[Piece],
        write: bool,
    ) -> Result<Vec<Mapping>, Failure> {
        let shared = vol.shared.load(Ordering::Acquire);
        let mut out = if shared {
            vec![None; pieces.len()]
        } else {
            vol.cached(pieces.iter().map(|p| p.block), write)
        };
        let (Some(first), Some(last)) = (
            out.iter().position(Option::is_none),
            out.iter().rposition(Option::is_none),
        ) else {
            return Ok(out.into_iter().map(|m| m.expect("all hit")).collect());
        };
        let bs = meta.block_size;
        let start = pieces[first].block * bs + pieces[first].object_offset;
        let end = pieces[last].block * bs + pieces[last].object_offset + pieces[last].len;
        let blocks = pieces[last].block - pieces[first].block + 1;
        let generation = lock(&vol.cache).generation;
        let call = Call {
            op: if write { Op::MapWrite } else { Op::MapRead },
            target: name.as_bytes(),
            buffer: wire::map_reply_capacity(blocks).max(CONTROL_BUF),
            // A MAPW may copy a block and change the map: never abandoned.
            wait: if write { Wait::ToReply } else { Wait::Bounded },
        };
        let fill = |req: &mut Request| {
            req.set_offset(start);
            req.set_size(end - start);
            Ok(())
        };
        let answered = async {
            let rep = self.call_again(self.config.mapper_port, call, fill).await?;
            let reply = MapReply::decode(rep.data()?)?;
            vol.install(&reply, start, bs, (!shared).then_some(generation), write)
        }
        .await;
        let fresh = match answered {
            Ok(fresh) => fresh,
            Err(f) => {
                if write {
                    // A MAPW that failed may still have changed the map: a mapper that
                    // persisted the copy-on-write and died before its reply. The cached
                    // read-only objects of these blocks may then be garbage (GC deletes them),
                    // so they must not answer reads any more.
                    vol.forget(pieces[first].block..=pieces[last].block);
                }
                return Err(f);
            }
        };
        for (slot, p) in out.iter_mut().zip(pieces) {
            if slot.is_none() {
                *slot = fresh.get(&p.block).cloned();
            }
        }
        out.into_iter()
            .map(|m| {
                m.ok_or_else(|| Failure::new(Status::Io, "map reply does not cover the range"))
            })
            .collect()
    }

    pub(super) async fn io(self: &Arc<Self>, name: &str, mut req: Request) -> Outcome {
        let write = req.op() == Op::Write;
        let vol = match self.vol(name) {
            Ok(v) => v,
            Err(f) => return Err((f, Some(req))),
        };
        // Before the gate: a throttled I/O must not hold up a snapshot's barrier.
        let wait = self.throttle(name, &vol, req.size()).await;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let _shared = vol.gate.read().await;
        let _ticket = write.then(|| vol.begin_write());
        let (pieces, maps) = match self.plan(name, &vol, &mut req, write).await {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(Some(req)),
            Err(f) => return Err((f, Some(req))),
        };
        let (offset, len) = (req.offset(), req.size());
        if let [p] = pieces[..] {
            // Fits in one object: forward the request itself (zero copy), or for a ZERO block
            // fill zeros here without any I/O.
            let object = match &maps[0] {
                Mapping::Zero => {
                    let r = read_zeros(&mut req, len);
                    req.complete(len);
                    return r.outcome(req);
                }
                Mapping::Object { name: object, .. } => object.clone(),
            };
            if let Err(e) = req.set_target(object.as_bytes()) {
                return Err((Failure::from(e), Some(req)));
            }
            req.set_offset(p.object_offset);
            let restore = |mut r: Request| {
                // Both cannot fail: the name fitted when the client sent it.
                let _ = r.set_target(name.as_bytes());
                r.set_offset(offset);
                r
            };
            let port = self.config.blocker_port;
            return match self.forward(req, port).await {
                Ok(Some(rep)) => Ok(Some(restore(rep))),
                Err((f, Some(r))) => Err((f, Some(restore(r)))),
                other => other,
            };
        }
        let r = self.split_io(&mut req, &pieces, &maps, write).await;
        if r.is_ok() {
            req.complete(len);
        }
        r.outcome(req)
    }

    /// Checks an I/O and finds its mappings; `None` when there is nothing to do (length 0).
    async fn plan(
        &self,
        name: &str,
        vol: &Vol,
        req: &mut Request,
        write: bool,
    ) -> Result<Option<(Vec<Piece>, Vec<Mapping>)>, Failure> {
        let (offset, len) = (req.offset(), req.size());
        let meta = self.checked_meta(name, vol, offset, len).await?;
        if write && req.data_len() < len {
            return Err(Failure::new(
                Status::Invalid,
                format!("write of {len} bytes carries {} bytes", req.data_len()),
            ));
        }
        if !write && req.capacity() < len {
            return Err(Failure::new(
                Status::Invalid,
                format!("read of {len} bytes into a {} byte buffer", req.capacity()),
            ));
        }
        if len == 0 {
            req.complete(0);
            return Ok(None);
        }
        let pieces = split(offset, len, meta.block_size);
        let maps = self.mappings(name, vol, meta, &pieces, write).await?;
        if write {
            writable(name, &pieces, &maps)?;
        }
        Ok(Some((pieces, maps)))
    }

    /// An I/O spanning objects: one sub-request per non-zero piece, all in flight at once.
    async fn split_io(
        self: &Arc<Self>,
        req: &mut Request,
        pieces: &[Piece],
        maps: &[Mapping],
        write: bool,
    ) -> Result<(), Failure> {
        let mut calls = tokio::task::JoinSet::new();
        for (i, (p, m)) in pieces.iter().zip(maps).enumerate() {
            let object = match m {
                Mapping::Zero => {
                    if !write {
                        req.buffer_mut()?[p.at as usize..(p.at + p.len) as usize].fill(0);
                    }
                    continue;
                }
                Mapping::Object { name, .. } => name.clone(),
            };
            let op = if write { Op::Write } else { Op::Read };
            // Owned, so that the task can build the sub-request again if sending must be retried.
            let data = if write {
                req.data()?[p.at as usize..(p.at + p.len) as usize].to_vec()
            } else {
                Vec::new()
            };
            let p = *p;
            let me = self.clone();
            calls.spawn(async move {
                let port = me.config.blocker_port;
                let call = Call {
                    op,
                    target: object.as_bytes(),
                    buffer: p.len,
                    wait: if write { Wait::ToReply } else { Wait::Bounded },
                };
                let fill = |sub: &mut Request| {
                    if write {
                        sub.write_data(&data)?;
                    }
                    sub.set_offset(p.object_offset);
                    sub.set_size(p.len);
                    Ok(())
                };
                (i, me.call_again(port, call, fill).await)
            });
        }
        let mut first_error = None;
        while let Some(done) = calls.join_next().await {
            let (i, r) =
                done.map_err(|e| Failure::new(Status::Io, format!("sub-request task: {e}")))?;
            match r {
                Ok(rep) if !write => {
                    let p = pieces[i];
                    let data = rep.data()?;
                    if data.len() as u64 != p.len {
                        first_error.get_or_insert(Failure::new(Status::Io, "short object read"));
                        continue;
                    }
                    req.buffer_mut()?[p.at as usize..(p.at + p.len) as usize].copy_from_slice(data);
                }
                Ok(_) => {}
                Err(f) => {
                    first_error.get_or_insert(f);
                }
            }
        }
        if !write {
            req.set_data_len(req.size()).map_err(Failure::from)?;
        }
        match first_error {
            None => Ok(()),
            Some(f) => Err(f),
        }
    }

    /// DISCARD and WRITE_ZEROES: the mapper turns whole blocks into ZERO entries; vlmc writes
    /// zeros into the partial blocks it hands back.
    pub(super) async fn discard(
        self: &Arc<Self>,
        name: &str,
        req: &mut Request,
    ) -> Result<(), Failure> {
        let vol = self.vol(name)?;
        let _shared = vol.gate.read().await;
        let _ticket = vol.begin_write();
        let (offset, len) = (req.offset(), req.size());
        let meta = self.checked_meta(name, &vol, offset, len).await?;
        if len == 0 {
            req.complete(0);
            return Ok(());
        }
        let blocks: Vec<u64> = split(offset, len, meta.block_size)
            .iter()
            .map(|p| p.block)
            .collect();
        let forget = || vol.forget(blocks.iter().copied());
        forget();
        let blocks_n = blocks.len() as u64;
        let op = req.op();
        let call = Call {
            op,
            target: name.as_bytes(),
            // Partial blocks, at most one at each end, come back as extents; 4 is headroom.
            buffer: wire::discard_reply_capacity(blocks_n.min(4)).max(CONTROL_BUF),
            wait: Wait::ToReply,
        };
        let fill = |sub: &mut Request| {
            sub.set_offset(offset);
            sub.set_size(len);
            Ok(())
        };
        let rep = self.call_again(self.config.mapper_port, call, fill).await;
        // Entries changed at the mapper whatever the outcome; replies sent meanwhile are stale.
        forget();
        let rep = rep?;
        let outcome = DiscardReply::decode(rep.data()?)?;
        drop(rep);
        let mut calls = tokio::task::JoinSet::new();
        for e in outcome.zero_write.extents {
            if e.flags & extent::ZERO != 0 {
                continue;
            }
            let me = self.clone();
            calls.spawn(async move {
                let port = me.config.blocker_port;
                let call = Call {
                    op: Op::Write,
                    target: e.object.as_bytes(),
                    buffer: e.len,
                    wait: Wait::ToReply,
                };
                let fill = |sub: &mut Request| {
                    sub.buffer_mut()?[..e.len as usize].fill(0);
                    sub.set_data_len(e.len)?;
                    sub.set_offset(e.offset);
                    sub.set_size(e.len);
                    Ok(())
                };
                me.call_again(port, call, fill).await.map(drop)
            });
        }
        let mut first_error = None;
        while let Some(done) = calls.join_next().await {
            if let Err(f) = done.map_err(|e| Failure::new(Status::Io, e.to_string()))? {
                first_error.get_or_insert(f);
            }
        }
        if let Some(f) = first_error {
            return Err(f);
        }
        req.complete(len);
        Ok(())
    }
}

/// Answers a read of `len` bytes of a ZERO block: zeros in the reply buffer, no I/O.
pub(super) fn read_zeros(req: &mut Request, len: u64) -> Result<(), Failure> {
    req.buffer_mut()?[..len as usize].fill(0);
    req.set_data_len(len)?;
    Ok(())
}

/// A write needs a writable object for every piece: the mapper's MAPW promises one. A ZERO or
/// read-only mapping would have the write reported done with nothing stored (or stored in an
/// object a snapshot shares), so it fails the write instead.
fn writable(name: &str, pieces: &[Piece], maps: &[Mapping]) -> Result<(), Failure> {
    for (p, m) in pieces.iter().zip(maps) {
        let what = match m {
            Mapping::Object { writable: true, .. } => continue,
            Mapping::Object { name: object, .. } => format!("read-only object {object}"),
            Mapping::Zero => "no object (ZERO)".to_string(),
        };
        return Err(Failure::new(
            Status::Io,
            format!(
                "vlmc: the mapper mapped block {} of {name} to {what} for a write",
                p.block
            ),
        ));
    }
    Ok(())
}
