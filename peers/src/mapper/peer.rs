//! The mapper peer: the volume catalogue and block mappings over xseg, served by a [`Mapper`].
//!
//! Every request runs as its own task: the mapper is built for concurrent callers (it orders
//! what must be ordered itself), and a slow catalogue operation must not hold up MAPW of other
//! volumes. Failures travel as an xseg [`Status`] plus a human message in the reply buffer; a
//! lock conflict also names the holder, so a client can say who has the volume.

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use xseg::protocol::{Extent as WireExtent, MapReply, NamePayload, extent, flags};
use xseg::{Op, Peer, Request, Sender, Status};

use crate::blocker::peer as blocker_peer;
use crate::failure::Failure;
use crate::map_format::{ObjectKind, parse_object};
use crate::mapper::{CreateOptions, Extent, GcOptions, Mapper, MapperError};
use crate::wire::{
    self, CreateRequest, DiscardReply, GcRequest, ListReply, LockState, QosReport, VolumeInfo,
    WireCounters,
};

/// Serves a [`Mapper`] on a port; drive it with an [`xseg::Runner`].
pub struct MapperPeer {
    mapper: Arc<Mapper>,
    rt: Handle,
}

impl MapperPeer {
    pub fn new(mapper: Arc<Mapper>, rt: Handle) -> Self {
        MapperPeer { mapper, rt }
    }
}

impl Peer for MapperPeer {
    fn request(&mut self, mut req: Request, tx: &Sender) {
        let mapper = self.mapper.clone();
        let tx = tx.clone();
        self.rt.spawn(async move {
            if let Err(f) = serve(&mapper, &mut req).await {
                f.apply(&mut req);
            }
            tx.respond(req);
        });
    }
}

/// The status each mapper error travels as. `ReadOnly` uses EROFS, which xseg has no name for.
pub fn status_of(e: &MapperError) -> Status {
    use MapperError::*;
    match e {
        NotFound { .. } => Status::NotFound,
        AlreadyExists { .. } => Status::Exists,
        InvalidName(_)
        | NotASnapshot { .. }
        | InvalidSize { .. }
        | InvalidBlockSize { .. }
        | InvalidPageEntries { .. }
        | Unaligned { .. } => Status::Invalid,
        ReadOnly { .. } => Status::Other(libc::EROFS as u32),
        OutOfRange { .. } | ShrinkRefused { .. } => Status::Range,
        Locked { .. } => Status::Busy,
        Fenced { .. } => Status::Stale,
        TooManyOrigins { .. } | EpochExhausted { .. } => Status::NoSpace,
        Blocker { source, .. } => match blocker_peer::status_of(source) {
            // A missing object inside an operation is a fault, not "no such volume".
            Status::NotFound => Status::Io,
            s => s,
        },
        Closed { .. } | Conflict { .. } | Corrupt(_) | LockRegressed { .. } => Status::Io,
    }
}

fn name_of(req: &Request) -> Result<String, Failure> {
    let t = req.target()?;
    Ok(t.as_str()?.to_string())
}

fn payload<T>(
    req: &Request,
    decode: fn(&[u8]) -> Result<T, Status>,
    what: &str,
) -> Result<T, Failure> {
    decode(req.data().unwrap_or(&[])).map_err(|_| {
        Failure::new(
            Status::Invalid,
            format!("missing or malformed {what} payload"),
        )
    })
}

fn info_reply(req: &mut Request, info: crate::mapper::VolumeInfo) {
    let info = VolumeInfo::from(info);
    wire::reply_with(req, |buf| info.encode(buf));
}

fn counters_reply<T: WireCounters>(req: &mut Request, report: &T) {
    wire::reply_with(req, |buf| report.encode(buf));
}

/// Extents in the order they compose the range. `writable` says which objects the caller may
/// write: everything MAPW returns, and for MAPR only blocks this volume owns.
fn map_reply(extents: &[Extent], writable: &dyn Fn(&Extent) -> bool) -> MapReply {
    MapReply {
        extents: extents
            .iter()
            .map(|e| match e.object() {
                None => WireExtent {
                    object: String::new(),
                    offset: e.object_offset,
                    len: e.length,
                    flags: extent::ZERO,
                },
                Some(o) => WireExtent {
                    object: o.as_str().to_string(),
                    offset: e.object_offset,
                    len: e.length,
                    flags: if writable(e) { 0 } else { extent::READONLY },
                },
            })
            .collect(),
    }
}

async fn serve(mapper: &Arc<Mapper>, req: &mut Request) -> Result<(), Failure> {
    let op = req.op();
    match op {
        Op::Create => {
            let name = name_of(req)?;
            let c = payload(req, CreateRequest::decode, "CREATE")?;
            let d = CreateOptions::default();
            let opts = CreateOptions {
                block_size: if c.block_size == 0 {
                    d.block_size
                } else {
                    c.block_size
                },
                page_entries: if c.page_entries == 0 {
                    d.page_entries
                } else {
                    c.page_entries
                },
            };
            let info = mapper.create(&name, c.size, opts).await?;
            info_reply(req, info);
        }
        Op::Info => {
            let info = mapper.info(&name_of(req)?).await?;
            info_reply(req, info);
        }
        Op::List => {
            let all: Vec<VolumeInfo> = mapper
                .list()
                .await?
                .into_iter()
                .map(VolumeInfo::from)
                .collect();
            let first = usize::try_from(req.offset()).unwrap_or(usize::MAX);
            wire::reply_with(req, |buf| ListReply::encode_page(&all, first, buf));
        }
        Op::Resize => {
            let info = mapper.resize(&name_of(req)?, req.size()).await?;
            info_reply(req, info);
        }
        Op::Delete => {
            mapper.delete(&name_of(req)?).await?;
            req.complete(0);
        }
        Op::Snapshot => {
            let name = name_of(req)?;
            let p = payload(req, NamePayload::decode, "SNAPSHOT name")?;
            let info = mapper.snapshot(&name, &p.name).await?;
            info_reply(req, info);
        }
        Op::Clone => {
            let name = name_of(req)?;
            let p = payload(req, NamePayload::decode, "CLONE name")?;
            let size = (p.size != 0).then_some(p.size);
            let info = mapper.clone_volume(&name, &p.name, size).await?;
            info_reply(req, info);
        }
        Op::Open if req.flags() & flags::SHARED != 0 => {
            let info = mapper.open_shared(&name_of(req)?).await?;
            info_reply(req, info);
        }
        Op::Open | Op::Acquire => {
            let info = mapper.open(&name_of(req)?).await?;
            info_reply(req, info);
        }
        Op::Release if req.flags() & flags::FORCE != 0 => {
            let name = name_of(req)?;
            tracing::warn!(volume = %name, port = req.source(), "lock break requested over xseg");
            let before = LockState::from(mapper.break_lock(&name).await?);
            wire::reply_with(req, |buf| before.encode(buf));
        }
        Op::Close | Op::Release => {
            mapper.close(&name_of(req)?).await?;
            req.complete(0);
        }
        Op::Qos => {
            let name = name_of(req)?;
            if req.data_len() > 0 {
                let want = payload(req, QosReport::decode, "QOS")?;
                mapper.set_qos(&name, want.limits()).await?;
            }
            let l = mapper.qos(&name).await?;
            let report = QosReport {
                iops: l.iops,
                bytes_per_sec: l.bytes_per_sec,
                delayed_ios: 0,
            };
            wire::reply_with(req, |buf| report.encode(buf));
        }
        Op::LockInfo => {
            let state = LockState::from(mapper.lock_info(&name_of(req)?).await?);
            wire::reply_with(req, |buf| state.encode(buf));
        }
        Op::MapRead => {
            let name = name_of(req)?;
            let extents = mapper.map_read(&name, req.offset(), req.size()).await?;
            // Read after the extents: if the epoch moved in between, old objects are reported
            // read-only, which is safe; the reverse order could report a shared object writable.
            let info = mapper.info(&name).await?;
            let owned = |e: &Extent| {
                !info.snapshot
                    && e.object().is_some_and(|o| {
                        matches!(parse_object(o), ObjectKind::Owned { uuid, epoch, .. }
                            if uuid == info.uuid && epoch == info.epoch)
                    })
            };
            let reply = map_reply(&extents, &owned);
            wire::reply_with(req, |buf| reply.encode(buf));
        }
        Op::MapWrite => {
            let name = name_of(req)?;
            let extents = mapper.map_write(&name, req.offset(), req.size()).await?;
            let reply = map_reply(&extents, &|_| true);
            wire::reply_with(req, |buf| reply.encode(buf));
        }
        Op::Discard | Op::WriteZeroes => {
            let name = name_of(req)?;
            let outcome = mapper.discard(&name, req.offset(), req.size()).await?;
            let reply = DiscardReply {
                zeroed_blocks: outcome.zeroed_blocks,
                zero_write: map_reply(&outcome.zero_write, &|_| true),
            };
            wire::reply_with(req, |buf| reply.encode(buf));
        }
        Op::Import => {
            let name = name_of(req)?;
            let len = usize::try_from(req.size()).unwrap_or(usize::MAX);
            let data = req.data()?;
            let data = data.get(..len).ok_or_else(|| {
                Failure::new(Status::Invalid, "IMPORT size exceeds the data carried")
            })?;
            let report = mapper.import(&name, req.offset(), data).await?;
            counters_reply(req, &report);
        }
        Op::Dedup => {
            let report = mapper.dedup(&name_of(req)?).await?;
            counters_reply(req, &report);
        }
        Op::Gc => {
            let g = if req.data_len() == 0 {
                GcRequest::default()
            } else {
                payload(req, GcRequest::decode, "GC")?
            };
            let report = mapper
                .gc(GcOptions {
                    grace: Duration::from_secs(g.grace_secs),
                    dry_run: g.dry_run,
                })
                .await?;
            counters_reply(req, &report);
        }
        Op::Verify => {
            // A cache that differs from storage is a Corrupt error (Status::Io), not a panic.
            let report = mapper.verify(&name_of(req)?).await?;
            counters_reply(req, &report);
        }
        op => {
            return Err(Failure::new(
                Status::Unsupported,
                format!("the mapper does not serve {op:?}"),
            ));
        }
    }
    Ok(())
}
