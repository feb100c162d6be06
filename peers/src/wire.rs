//! Payloads the peers exchange in request data buffers, beyond those xseg itself defines.
//!
//! Everything is little-endian and written with xseg's bounded [`Writer`]; every decoder reads
//! with xseg's [`Reader`], so a short or garbage buffer yields [`Status::Invalid`], never a panic
//! or an oversized allocation. The request fields (`target`, `offset`, `size`, `flags`) carry
//! what fits in them; payloads carry the rest.
//!
//! | op | target | request fields / payload | reply payload |
//! |---|---|---|---|
//! | READ, WRITE (vlmc) | volume | `offset`, `size`; WRITE data = `size` bytes | READ: the data |
//! | READ, WRITE (blocker) | object | same, offsets within the object | READ: the data |
//! | FLUSH | volume (vlmc) / empty (blocker) | - | - |
//! | DISCARD, WRITE_ZEROES (vlmc) | volume | `offset`, `size` | - |
//! | DISCARD, WRITE_ZEROES (mapper) | volume | `offset`, `size` | [`DiscardReply`] |
//! | CREATE | volume | [`CreateRequest`] | [`VolumeInfo`] |
//! | INFO (mapper) | volume | - | [`VolumeInfo`] |
//! | INFO (blocker) | object | - | [`ObjectStat`] |
//! | LIST | empty | `offset` = index of the first entry wanted | [`ListReply`] |
//! | RESIZE | volume | `size` = new size | [`VolumeInfo`] |
//! | DELETE | volume / object | - | - |
//! | SNAPSHOT | volume | `NamePayload` (snapshot name) | [`VolumeInfo`] of the snapshot |
//! | CLONE | source | `NamePayload` (new name, size 0 = the source's) | [`VolumeInfo`] |
//! | SNAPSHOT (vlmc) | empty | [`GroupSnapshotRequest`]: a group, cut under all barriers | - |
//! | OPEN, ACQUIRE | volume | - | [`VolumeInfo`] |
//! | CLOSE, RELEASE | volume | RELEASE with `FORCE` breaks the lock | RELEASE+FORCE: [`LockState`] before |
//! | MAPR, MAPW | volume | `offset`, `size` | `MapReply` |
//! | COPY (blocker) | destination object | `NamePayload` (source object) | - |
//! | IMPORT | volume | `offset` (block-aligned), data = whole blocks | [`ImportReport`] |
//! | DEDUP | snapshot | - | [`DedupReport`] |
//! | GC | empty | [`GcRequest`] | [`GcReport`] |
//! | QOS | volume | none (read) or [`QosReport`] (set: its limits) | [`QosReport`] |
//! | LOCK_INFO | volume | - | [`LockState`] |
//! | VERIFY | volume | - | [`VerifyReport`] |
//!
//! A failed reply carries an [`ErrorReply`] (a human message, and for `Busy` the lock holder)
//! when the request has a buffer, so that every client can show why, not just an errno.

use uuid::Uuid;
use xseg::Status;
use xseg::protocol::{Reader, Writer};

pub use crate::mapper::{DedupReport, GcReport, ImportReport, VerifyReport};

/// Longest string carried by [`put_str`]; longer messages are cut (at a char boundary).
pub const MAX_STRING: usize = 1024;

/// Room for a control reply (a volume info, a report, an error message): what a request that
/// carries no data of its own is allocated with, so that its reply can say why it failed.
pub const CONTROL_BUF: u64 = 4096;

/// Room for one extent of a `MapReply`, as xseg encodes it: offset (8) + length (8) + flags
/// (4) + a `u16`-prefixed object name (2 + at most [`crate::blocker::MAX_NAME_LEN`] = 200), so
/// 222 bytes at most; 300 leaves headroom for a longer name limit.
const MAP_EXTENT_ROOM: u64 = 300;

/// Bytes to allocate for a MAPR or MAPW reply of up to `extents` extents (one per block): the
/// extent count (4) and the extents.
pub fn map_reply_capacity(extents: u64) -> u64 {
    4 + extents * MAP_EXTENT_ROOM
}

/// Bytes to allocate for a [`DiscardReply`] of up to `extents` extents: the zeroed-block
/// count (8) before its map reply.
pub fn discard_reply_capacity(extents: u64) -> u64 {
    8 + map_reply_capacity(extents)
}

/// Writes a `u16`-length-prefixed UTF-8 string, cut to what `MAX_STRING` and the buffer allow.
/// Truncation rather than failure, because these are messages for humans.
pub fn put_str(w: &mut Writer<'_>, s: &str, room: usize) -> Result<(), Status> {
    let mut n = s.len().min(MAX_STRING).min(room.saturating_sub(2));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    w.u16(n as u16)?;
    w.bytes(&s.as_bytes()[..n])
}

/// Reads a string written by [`put_str`].
pub fn get_str(r: &mut Reader<'_>) -> Result<String, Status> {
    let n = r.u16()? as usize;
    if n > MAX_STRING {
        return Err(Status::Invalid);
    }
    String::from_utf8(r.bytes(n)?.to_vec()).map_err(|_| Status::Invalid)
}

fn put_opt(w: &mut Writer<'_>, s: Option<&str>) -> Result<(), Status> {
    match s {
        None => w.bytes(&[0]),
        Some(s) => {
            w.bytes(&[1])?;
            w.name(s)
        }
    }
}

fn get_opt(r: &mut Reader<'_>) -> Result<Option<String>, Status> {
    match r.bytes(1)?[0] {
        0 => Ok(None),
        1 => Ok(Some(r.name()?)),
        _ => Err(Status::Invalid),
    }
}

fn get_bool(r: &mut Reader<'_>) -> Result<bool, Status> {
    match r.bytes(1)?[0] {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Status::Invalid),
    }
}

/// Whether a catalogue entry is a writable volume or a read-only snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeKind {
    Volume,
    Snapshot,
}

/// A volume or snapshot as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub kind: VolumeKind,
    pub uuid: Uuid,
    /// Bytes.
    pub size: u64,
    /// Bytes per block (data object).
    pub block_size: u32,
    /// Incremented by every snapshot or clone of a volume; objects written later carry it.
    pub epoch: u64,
    /// The volume or snapshot this one was snapshotted or cloned from.
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

impl From<crate::mapper::VolumeInfo> for VolumeInfo {
    fn from(v: crate::mapper::VolumeInfo) -> Self {
        VolumeInfo {
            name: v.name,
            kind: if v.snapshot {
                VolumeKind::Snapshot
            } else {
                VolumeKind::Volume
            },
            uuid: v.uuid,
            size: v.size,
            block_size: v.block_size,
            epoch: v.epoch,
            parent: v.source,
            created: v.created,
        }
    }
}

impl VolumeInfo {
    /// Upper bound of the encoding: names are at most 255 bytes.
    pub const MAX_ENCODED: usize = 8 + 2 + 255 + 1 + 16 + 4 + 8 + 1 + 2 + 255 + 8;

    /// Starts with the size, as xseg's INFO convention asks.
    pub fn write(&self, w: &mut Writer<'_>) -> Result<(), Status> {
        w.u64(self.size)?;
        w.name(&self.name)?;
        w.bytes(&[match self.kind {
            VolumeKind::Volume => 0,
            VolumeKind::Snapshot => 1,
        }])?;
        w.bytes(self.uuid.as_bytes())?;
        w.u32(self.block_size)?;
        w.u64(self.epoch)?;
        put_opt(w, self.parent.as_deref())?;
        w.u64(self.created)
    }

    pub fn read(r: &mut Reader<'_>) -> Result<VolumeInfo, Status> {
        let size = r.u64()?;
        let name = r.name()?;
        let kind = match r.bytes(1)?[0] {
            0 => VolumeKind::Volume,
            1 => VolumeKind::Snapshot,
            _ => return Err(Status::Invalid),
        };
        let uuid = Uuid::from_bytes(r.bytes(16)?.try_into().map_err(|_| Status::Invalid)?);
        Ok(VolumeInfo {
            size,
            name,
            kind,
            uuid,
            block_size: r.u32()?,
            epoch: r.u64()?,
            parent: get_opt(r)?,
            created: r.u64()?,
        })
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        self.write(&mut w)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<VolumeInfo, Status> {
        Self::read(&mut Reader::new(buf))
    }
}

/// CREATE payload. Zero fields take the mapper's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreateRequest {
    pub size: u64,
    pub block_size: u32,
    pub page_entries: u32,
}

impl CreateRequest {
    pub const ENCODED: usize = 16;

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.u64(self.size)?;
        w.u32(self.block_size)?;
        w.u32(self.page_entries)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<CreateRequest, Status> {
        let mut r = Reader::new(buf);
        Ok(CreateRequest {
            size: r.u64()?,
            block_size: r.u32()?,
            page_entries: r.u32()?,
        })
    }
}

/// Most members of one group snapshot: bounds the payload (64 × 2 names of at most 128 bytes
/// fits a 64 KiB buffer) and the time a group holds I/O back.
pub const MAX_GROUP_MEMBERS: usize = 64;

/// SNAPSHOT with an empty target, sent to vlmc: cut snapshot `.1` of volume `.0` for every
/// member while every member's drain barrier is held, so the snapshots form one point in time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSnapshotRequest {
    pub members: Vec<(String, String)>,
}

impl GroupSnapshotRequest {
    /// Upper bound of the encoding.
    pub fn max_encoded(&self) -> usize {
        2 + self
            .members
            .iter()
            .map(|(v, s)| 4 + v.len() + s.len())
            .sum::<usize>()
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        if self.members.is_empty() || self.members.len() > MAX_GROUP_MEMBERS {
            return Err(Status::Invalid);
        }
        let mut w = Writer::new(buf);
        w.u16(self.members.len() as u16)?;
        for (volume, snapshot) in &self.members {
            w.name(volume)?;
            w.name(snapshot)?;
        }
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<GroupSnapshotRequest, Status> {
        let mut r = Reader::new(buf);
        let n = r.u16()? as usize;
        if n == 0 || n > MAX_GROUP_MEMBERS {
            return Err(Status::Invalid);
        }
        let mut members = Vec::with_capacity(n);
        for _ in 0..n {
            let volume = r.name()?;
            let snapshot = r.name()?;
            members.push((volume, snapshot));
        }
        Ok(GroupSnapshotRequest { members })
    }
}

/// LIST reply: one page of the catalogue. The client asks again from `first + entries.len()`
/// until it has `total`; paging keeps a large catalogue from needing one huge buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListReply {
    pub total: u32,
    pub entries: Vec<VolumeInfo>,
}

impl ListReply {
    /// Encodes as many entries from `all[first..]` as fit; returns the length written.
    pub fn encode_page(all: &[VolumeInfo], first: usize, buf: &mut [u8]) -> Result<usize, Status> {
        let cap = buf.len();
        let mut w = Writer::new(buf);
        w.u32(all.len() as u32)?;
        let count_at = w.written();
        w.u32(0)?;
        let mut scratch = [0u8; VolumeInfo::MAX_ENCODED];
        let mut n = 0u32;
        for v in all.iter().skip(first) {
            let len = v.encode(&mut scratch)?;
            if w.written() + len > cap {
                break;
            }
            w.bytes(&scratch[..len])?;
            n += 1;
        }
        let written = w.written();
        buf[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
        if n == 0 && first < all.len() {
            return Err(Status::NoSpace);
        }
        Ok(written)
    }

    pub fn decode(buf: &[u8]) -> Result<ListReply, Status> {
        let mut r = Reader::new(buf);
        let total = r.u32()?;
        let n = r.u32()?;
        if n > total {
            return Err(Status::Invalid);
        }
        let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / 40 + 1));
        for _ in 0..n {
            entries.push(VolumeInfo::read(&mut r)?);
        }
        Ok(ListReply { total, entries })
    }
}

/// Reply of the mapper's DISCARD and WRITE_ZEROES: whole blocks became ZERO entries; the
/// partial blocks that still hold data come back as writable extents the caller fills with
/// zeros (the mapper never moves data itself).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscardReply {
    pub zeroed_blocks: u64,
    pub zero_write: xseg::protocol::MapReply,
}

impl DiscardReply {
    pub fn encoded_len(&self) -> usize {
        8 + self.zero_write.encoded_len()
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        if buf.len() < 8 {
            return Err(Status::NoSpace);
        }
        buf[..8].copy_from_slice(&self.zeroed_blocks.to_le_bytes());
        Ok(8 + self.zero_write.encode(&mut buf[8..])?)
    }

    pub fn decode(buf: &[u8]) -> Result<DiscardReply, Status> {
        let mut r = Reader::new(buf);
        let zeroed_blocks = r.u64()?;
        let rest = r.bytes(r.remaining())?;
        Ok(DiscardReply {
            zeroed_blocks,
            zero_write: xseg::protocol::MapReply::decode(rest)?,
        })
    }
}

/// Reply of the blocker's INFO.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub exists: bool,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: u64,
}

impl ObjectStat {
    pub const ENCODED: usize = 17;

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.u64(self.size)?;
        w.bytes(&[u8::from(self.exists)])?;
        w.u64(self.modified_ns)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<ObjectStat, Status> {
        let mut r = Reader::new(buf);
        Ok(ObjectStat {
            size: r.u64()?,
            exists: get_bool(&mut r)?,
            modified_ns: r.u64()?,
        })
    }
}

/// A volume lock's state: LOCK_INFO reply, and RELEASE+FORCE (break) reply (the state before).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockState {
    pub holder: Option<String>,
    /// Fencing generation; 0 for a lock never taken.
    pub generation: u64,
}

impl LockState {
    pub const MAX_ENCODED: usize = 1 + 2 + 255 + 8;

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        put_opt(&mut w, self.holder.as_deref())?;
        w.u64(self.generation)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<LockState, Status> {
        let mut r = Reader::new(buf);
        Ok(LockState {
            holder: get_opt(&mut r)?,
            generation: r.u64()?,
        })
    }
}

impl From<crate::blocker::LockInfo> for LockState {
    fn from(l: crate::blocker::LockInfo) -> Self {
        LockState {
            holder: l.holder.map(|h| h.as_str().to_string()),
            generation: l.generation,
        }
    }
}

/// A volume's I/O limits (0 = unlimited), and how many I/Os the vlmc that answered has held
/// back to honour them (the mapper answers 0; vlmc fills in its own count on the way back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosReport {
    pub iops: u64,
    pub bytes_per_sec: u64,
    pub delayed_ios: u64,
}

impl QosReport {
    pub const ENCODED: usize = 24;

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.u64(self.iops)?;
        w.u64(self.bytes_per_sec)?;
        w.u64(self.delayed_ios)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<QosReport, Status> {
        let mut r = Reader::new(buf);
        Ok(QosReport {
            iops: r.u64()?,
            bytes_per_sec: r.u64()?,
            delayed_ios: r.u64()?,
        })
    }

    pub fn limits(&self) -> crate::mapper::QosLimits {
        crate::mapper::QosLimits {
            iops: self.iops,
            bytes_per_sec: self.bytes_per_sec,
        }
    }
}

/// GC request payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcRequest {
    /// Unreferenced objects younger than this are kept (they may belong to an operation of
    /// another process that has not committed its map yet).
    pub grace_secs: u64,
    pub dry_run: bool,
}

impl Default for GcRequest {
    fn default() -> Self {
        let d = crate::mapper::GcOptions::default();
        GcRequest {
            grace_secs: d.grace.as_secs(),
            dry_run: d.dry_run,
        }
    }
}

impl GcRequest {
    pub const ENCODED: usize = 9;

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.u64(self.grace_secs)?;
        w.bytes(&[u8::from(self.dry_run)])?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<GcRequest, Status> {
        let mut r = Reader::new(buf);
        Ok(GcRequest {
            grace_secs: r.u64()?,
            dry_run: get_bool(&mut r)?,
        })
    }
}

/// Fixed-size reports: a list of u64 counters in declaration order.
macro_rules! counters {
    ($t:ty, $n:literal, [$($f:ident),*]) => {
        impl WireCounters for $t {
            const ENCODED: usize = 8 * $n;
            fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
                let mut w = Writer::new(buf);
                $( w.u64(self.$f)?; )*
                Ok(w.written())
            }
            fn decode(buf: &[u8]) -> Result<Self, Status> {
                let mut r = Reader::new(buf);
                Ok(Self { $( $f: r.u64()?, )* })
            }
        }
    };
}

/// Encoding of the reports (all-u64 structs).
pub trait WireCounters: Sized {
    const ENCODED: usize;
    fn encode(&self, buf: &mut [u8]) -> Result<usize, Status>;
    fn decode(buf: &[u8]) -> Result<Self, Status>;
}

counters!(
    GcReport,
    7,
    [
        maps,
        examined,
        live,
        kept_recent,
        deleted_objects,
        deleted_pages,
        deleted_bytes
    ]
);
counters!(
    DedupReport,
    5,
    [converted, zero, written, reused, bytes_written]
);
counters!(
    ImportReport,
    5,
    [blocks, zero, written, reused, bytes_written]
);
counters!(VerifyReport, 5, [blocks, zero, owned, shared, content]);

/// The payload of a failed reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorReply {
    pub message: String,
    /// For `Busy`: who holds the lock.
    pub holder: Option<String>,
}

impl ErrorReply {
    /// Encodes as much as fits: a message is better cut than lost.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let cap = buf.len();
        let mut w = Writer::new(buf);
        put_opt(&mut w, self.holder.as_deref())?;
        let room = cap - w.written();
        put_str(&mut w, &self.message, room)?;
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<ErrorReply, Status> {
        let mut r = Reader::new(buf);
        let holder = get_opt(&mut r)?;
        let message = get_str(&mut r)?;
        Ok(ErrorReply { message, holder })
    }
}

/// Fails `req` with `status`, leaving `message` (and a lock holder) in its buffer if it has one.
pub fn fail(req: &mut xseg::Request, status: Status, message: &str, holder: Option<&str>) {
    let reply = ErrorReply {
        message: message.to_string(),
        holder: holder.map(str::to_string),
    };
    let len = match req.buffer_mut() {
        Ok(buf) if buf.len() >= 3 => reply.encode(buf).unwrap_or(0),
        _ => 0,
    };
    let _ = req.set_data_len(len as u64);
    req.fail(status);
}

/// Writes a reply payload into `req`'s buffer and completes it. A buffer too small for the
/// reply fails the request with `NoSpace` rather than sending a truncated payload.
pub fn reply_with(
    req: &mut xseg::Request,
    encode: impl FnOnce(&mut [u8]) -> Result<usize, Status>,
) {
    let r = match req.buffer_mut() {
        Ok(buf) => encode(buf),
        Err(s) => Err(s),
    };
    match r {
        Ok(n) => {
            let _ = req.set_data_len(n as u64);
            req.complete(n as u64);
        }
        Err(s) => fail(req, s, "reply does not fit the request's buffer", None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_snapshot_requests_round_trip_within_bounds() {
        let g = GroupSnapshotRequest {
            members: vec![("os".into(), "os-snap".into()), ("data".into(), "d".into())],
        };
        let mut buf = vec![0u8; g.max_encoded()];
        let n = g.encode(&mut buf).unwrap();
        assert_eq!(GroupSnapshotRequest::decode(&buf[..n]).unwrap(), g);
        assert!(
            GroupSnapshotRequest::decode(&buf[..n - 1]).is_err(),
            "truncated"
        );
        let empty = GroupSnapshotRequest::default();
        assert_eq!(empty.encode(&mut buf), Err(Status::Invalid));
        assert_eq!(GroupSnapshotRequest::decode(&[0, 0]), Err(Status::Invalid));
        let too_many = GroupSnapshotRequest {
            members: vec![("v".into(), "s".into()); MAX_GROUP_MEMBERS + 1],
        };
        let mut big = vec![0u8; too_many.max_encoded()];
        assert_eq!(too_many.encode(&mut big), Err(Status::Invalid));
        let count = (MAX_GROUP_MEMBERS as u16 + 1).to_le_bytes();
        assert_eq!(GroupSnapshotRequest::decode(&count), Err(Status::Invalid));
    }

    fn info() -> VolumeInfo {
        VolumeInfo {
            name: "disk-1".into(),
            kind: VolumeKind::Snapshot,
            uuid: Uuid::new_v4(),
            size: 1 << 30,
            block_size: 4 << 20,
            epoch: 3,
            parent: Some("disk".into()),
            created: 1_700_000_000,
        }
    }

    #[test]
    fn payloads_round_trip() {
        let mut buf = vec![0u8; 4096];
        let v = info();
        let n = v.encode(&mut buf).unwrap();
        assert_eq!(VolumeInfo::decode(&buf[..n]).unwrap(), v);
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), v.size);

        let c = CreateRequest {
            size: 5 << 20,
            block_size: 65536,
            page_entries: 16,
        };
        let n = c.encode(&mut buf).unwrap();
        assert_eq!(CreateRequest::decode(&buf[..n]).unwrap(), c);

        let l = LockState {
            holder: Some("node-a".into()),
            generation: 9,
        };
        let n = l.encode(&mut buf).unwrap();
        assert_eq!(LockState::decode(&buf[..n]).unwrap(), l);

        let g = GcReport {
            maps: 1,
            examined: 2,
            live: 3,
            kept_recent: 4,
            deleted_objects: 5,
            deleted_pages: 6,
            deleted_bytes: 7,
        };
        let n = g.encode(&mut buf).unwrap();
        assert_eq!(n, GcReport::ENCODED);
        assert_eq!(GcReport::decode(&buf[..n]).unwrap(), g);

        let e = ErrorReply {
            message: "volume x is locked by node-b".into(),
            holder: Some("node-b".into()),
        };
        let n = e.encode(&mut buf).unwrap();
        assert_eq!(ErrorReply::decode(&buf[..n]).unwrap(), e);
    }

    #[test]
    fn list_pages_fill_what_fits_and_resume() {
        let all: Vec<VolumeInfo> = (0..50)
            .map(|i| VolumeInfo {
                name: format!("v{i}"),
                ..info()
            })
            .collect();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 700];
        while got.len() < all.len() {
            let n = ListReply::encode_page(&all, got.len(), &mut buf).unwrap();
            let page = ListReply::decode(&buf[..n]).unwrap();
            assert_eq!(page.total, 50);
            assert!(!page.entries.is_empty());
            got.extend(page.entries);
        }
        assert_eq!(got, all);
        assert_eq!(
            ListReply::encode_page(&all, 0, &mut [0u8; 20]),
            Err(Status::NoSpace)
        );
    }

    #[test]
    fn long_messages_are_cut_not_lost() {
        let e = ErrorReply {
            message: "é".repeat(5000),
            holder: None,
        };
        let mut small = [0u8; 64];
        let n = e.encode(&mut small).unwrap();
        let back = ErrorReply::decode(&small[..n]).unwrap();
        assert!(!back.message.is_empty() && e.message.starts_with(&back.message));
    }

    #[test]
    fn garbage_never_panics_the_decoders() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..20_000 {
            let n = rng.random_range(0..128);
            let buf: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            let _ = VolumeInfo::decode(&buf);
            let _ = CreateRequest::decode(&buf);
            let _ = ListReply::decode(&buf);
            let _ = DiscardReply::decode(&buf);
            let _ = ObjectStat::decode(&buf);
            let _ = LockState::decode(&buf);
            let _ = GcRequest::decode(&buf);
            let _ = GcReport::decode(&buf);
            let _ = ErrorReply::decode(&buf);
        }
        // A count claiming more entries than the total is refused outright.
        let mut b = vec![0u8; 8];
        b[..4].copy_from_slice(&1u32.to_le_bytes());
        b[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(ListReply::decode(&b), Err(Status::Invalid));
    }

    #[test]
    fn map_reply_capacity_holds_extents_with_the_longest_object_names() {
        let e = xseg::protocol::Extent {
            object: "o".repeat(crate::blocker::MAX_NAME_LEN),
            offset: u64::MAX,
            len: u64::MAX,
            flags: u32::MAX,
        };
        for n in [1usize, 2, 4, 100] {
            let reply = xseg::protocol::MapReply {
                extents: vec![e.clone(); n],
            };
            assert!(reply.encoded_len() as u64 <= map_reply_capacity(n as u64));
            let discard = DiscardReply {
                zeroed_blocks: 1,
                zero_write: reply,
            };
            assert!(discard.encoded_len() as u64 <= discard_reply_capacity(n as u64));
        }
    }
}
