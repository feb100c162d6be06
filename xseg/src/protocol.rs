//! The request protocol: op codes, flags, result codes and the payloads carried in data buffers.
//!
//! # Wire layout
//! A request slot (see [`crate::layout::RequestShm`]) carries `op` (u32), `flags` (u32),
//! `target` (≤ 256 bytes, not NUL-terminated), `offset` and `size` (u64 bytes within the target),
//! `serviced` (u64, bytes done), `result` (u32, 0 = success, else an errno-style [`Status`]),
//! and an optional data buffer inside the segment. Payloads in the buffer are little-endian:
//!
//! | payload | layout |
//! |---|---|
//! | [`MapReply`] (MAPR/MAPW reply) | `u32 count`, then per extent: `u64 offset_in_object`, `u64 len`, `u32 flags`, `u16 name_len`, name bytes |
//! | [`NamePayload`] (SNAPSHOT/CLONE source or new name, COPY source) | `u16 len`, name bytes, `u64 size` (0 = inherit) |
//! | INFO reply | `u64 size`, then op-specific bytes |
//!
//! Decoders check every length against the buffer and return [`Status::Invalid`] on garbage.

/// Operation codes. Unknown codes decode to `Unknown` and get an error reply, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Ping,
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Info,
    Open,
    Close,
    MapRead,
    MapWrite,
    Create,
    Snapshot,
    Clone,
    Delete,
    Resize,
    Copy,
    Acquire,
    Release,
    List,
    /// Write whole blocks as content-addressed (deduplicated) objects.
    Import,
    /// Convert a snapshot's objects into content-addressed ones.
    Dedup,
    /// Mark-and-sweep garbage collection of unreferenced objects.
    Gc,
    /// Who holds a volume's lock.
    LockInfo,
    /// Read a map back from storage and check it completely.
    Verify,
    /// Read (no payload) or set (with one) a volume's I/O limits.
    Qos,
    Unknown(u32),
}

impl Op {
    pub fn code(self) -> u32 {
        match self {
            Op::Ping => 0,
            Op::Read => 1,
            Op::Write => 2,
            Op::Flush => 3,
            Op::Discard => 4,
            Op::WriteZeroes => 5,
            Op::Info => 6,
            Op::Open => 7,
            Op::Close => 8,
            Op::MapRead => 9,
            Op::MapWrite => 10,
            Op::Create => 11,
            Op::Snapshot => 12,
            Op::Clone => 13,
            Op::Delete => 14,
            Op::Resize => 15,
            Op::Copy => 16,
            // 17 is not reused: peers of an older build meant another op by it.
            Op::Acquire => 18,
            Op::Release => 19,
            Op::List => 20,
            Op::Import => 21,
            Op::Dedup => 22,
            Op::Gc => 23,
            Op::LockInfo => 24,
            Op::Verify => 25,
            Op::Qos => 26,
            Op::Unknown(c) => c,
        }
    }

    pub fn from_code(code: u32) -> Op {
        match code {
            0 => Op::Ping,
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Discard,
            5 => Op::WriteZeroes,
            6 => Op::Info,
            7 => Op::Open,
            8 => Op::Close,
            9 => Op::MapRead,
            10 => Op::MapWrite,
            11 => Op::Create,
            12 => Op::Snapshot,
            13 => Op::Clone,
            14 => Op::Delete,
            15 => Op::Resize,
            16 => Op::Copy,
            18 => Op::Acquire,
            19 => Op::Release,
            20 => Op::List,
            21 => Op::Import,
            22 => Op::Dedup,
            23 => Op::Gc,
            24 => Op::LockInfo,
            25 => Op::Verify,
            26 => Op::Qos,
            c => Op::Unknown(c),
        }
    }
}

/// Request flags.
pub mod flags {
    /// Do not block (e.g. try a lock once).
    pub const NOWAIT: u32 = 1;
    /// Make the write durable before replying.
    pub const FUA: u32 = 2;
    /// Override an owner (lock break). Always logged by whoever honours it.
    pub const FORCE: u32 = 4;
    /// Open or map read-only.
    pub const READONLY: u32 = 8;
    /// OPEN shared: the live-migration mode of a volume attached on two nodes. No lock until
    /// the first write here (which takes it over), and no mapping served from a cache unless
    /// this node holds the lock.
    pub const SHARED: u32 = 16;
}

/// Result codes: 0 is success, the rest are errno values so they print meaningfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NotFound,
    Io,
    Invalid,
    Exists,
    Busy,
    NoSpace,
    /// The peer serving the request died; the transport failed it back.
    PeerGone,
    Unsupported,
    TimedOut,
    Stale,
    Range,
    Other(u32),
}

impl Status {
    pub fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::NotFound => libc::ENOENT as u32,
            Status::Io => libc::EIO as u32,
            Status::Invalid => libc::EINVAL as u32,
            Status::Exists => libc::EEXIST as u32,
            Status::Busy => libc::EBUSY as u32,
            Status::NoSpace => libc::ENOSPC as u32,
            Status::PeerGone => libc::EPIPE as u32,
            Status::Unsupported => libc::EOPNOTSUPP as u32,
            Status::TimedOut => libc::ETIMEDOUT as u32,
            Status::Stale => libc::ESTALE as u32,
            Status::Range => libc::ERANGE as u32,
            Status::Other(c) => c,
        }
    }

    pub fn from_code(c: u32) -> Status {
        match c as i32 {
            0 => Status::Ok,
            libc::ENOENT => Status::NotFound,
            libc::EIO => Status::Io,
            libc::EINVAL => Status::Invalid,
            libc::EEXIST => Status::Exists,
            libc::EBUSY => Status::Busy,
            libc::ENOSPC => Status::NoSpace,
            libc::EPIPE => Status::PeerGone,
            libc::EOPNOTSUPP => Status::Unsupported,
            libc::ETIMEDOUT => Status::TimedOut,
            libc::ESTALE => Status::Stale,
            libc::ERANGE => Status::Range,
            _ => Status::Other(c),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Status::Ok => "ok",
            Status::NotFound => "not found",
            Status::Io => "I/O error",
            Status::Invalid => "invalid request",
            Status::Exists => "already exists",
            Status::Busy => "busy or locked",
            Status::NoSpace => "no space",
            Status::PeerGone => "serving peer died",
            Status::Unsupported => "unsupported operation",
            Status::TimedOut => "timed out",
            Status::Stale => "stale (fenced)",
            Status::Range => "out of range",
            Status::Other(c) => return write!(f, "error {c}"),
        };
        f.write_str(text)
    }
}

/// Extent flags in a map reply.
pub mod extent {
    /// Reads return zeros; there is no object.
    pub const ZERO: u32 = 1;
    /// The object is shared; the requester may not write it.
    pub const READONLY: u32 = 2;
}

/// One object extent of a map reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub object: String,
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// Reply of MAPR/MAPW: the object extents that compose a volume range, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapReply {
    pub extents: Vec<Extent>,
}

/// Longest object name carried in payloads.
pub const MAX_NAME: usize = 255;

/// Little-endian reader that refuses to run past its buffer.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Status> {
        let end = self.pos.checked_add(n).ok_or(Status::Invalid)?;
        let s = self.buf.get(self.pos..end).ok_or(Status::Invalid)?;
        self.pos = end;
        Ok(s)
    }
    pub fn u16(&mut self) -> Result<u16, Status> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, Status> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, Status> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub fn name(&mut self) -> Result<String, Status> {
        let n = self.u16()? as usize;
        if n > MAX_NAME {
            return Err(Status::Invalid);
        }
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| Status::Invalid)
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Little-endian writer into a fixed buffer (a request's data buffer).
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), Status> {
        let end = self.pos.checked_add(b.len()).ok_or(Status::NoSpace)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(Status::NoSpace)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(())
    }
    pub fn u16(&mut self, v: u16) -> Result<(), Status> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u32(&mut self, v: u32) -> Result<(), Status> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> Result<(), Status> {
        self.bytes(&v.to_le_bytes())
    }
    pub fn name(&mut self, s: &str) -> Result<(), Status> {
        if s.len() > MAX_NAME {
            return Err(Status::Invalid);
        }
        self.u16(s.len() as u16)?;
        self.bytes(s.as_bytes())
    }
    pub fn written(&self) -> usize {
        self.pos
    }
}

impl MapReply {
    /// Most extents one reply may carry; bounds the work a garbage count can cause.
    pub const MAX_EXTENTS: u32 = 1 << 16;

    pub fn encoded_len(&self) -> usize {
        4 + self
            .extents
            .iter()
            .map(|e| 8 + 8 + 4 + 2 + e.object.len())
            .sum::<usize>()
    }

    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.u32(self.extents.len() as u32)?;
        for e in &self.extents {
            w.u64(e.offset)?;
            w.u64(e.len)?;
            w.u32(e.flags)?;
            w.name(&e.object)?;
        }
        Ok(w.written())
    }

    pub fn decode(buf: &[u8]) -> Result<MapReply, Status> {
        let mut r = Reader::new(buf);
        let n = r.u32()?;
        if n > Self::MAX_EXTENTS {
            return Err(Status::Invalid);
        }
        let mut extents = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            let offset = r.u64()?;
            let len = r.u64()?;
            let flags = r.u32()?;
            let object = r.name()?;
            extents.push(Extent {
                object,
                offset,
                len,
                flags,
            });
        }
        Ok(MapReply { extents })
    }
}

/// A name plus a size: the payload of SNAPSHOT, CLONE, COPY and similar requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePayload {
    pub name: String,
    pub size: u64,
}

impl NamePayload {
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Status> {
        let mut w = Writer::new(buf);
        w.name(&self.name)?;
        w.u64(self.size)?;
        Ok(w.written())
    }
    pub fn decode(buf: &[u8]) -> Result<NamePayload, Status> {
        let mut r = Reader::new(buf);
        let name = r.name()?;
        let size = r.u64()?;
        Ok(NamePayload { name, size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_codes_round_trip_and_unknown_is_kept() {
        for c in 0..64 {
            assert_eq!(Op::from_code(c).code(), c);
        }
        assert_eq!(Op::from_code(999), Op::Unknown(999));
    }

    #[test]
    fn map_reply_round_trips_and_garbage_is_refused() {
        let m = MapReply {
            extents: vec![
                Extent {
                    object: "v1_0_7".into(),
                    offset: 4096,
                    len: 512,
                    flags: extent::READONLY,
                },
                Extent {
                    object: String::new(),
                    offset: 0,
                    len: 1 << 22,
                    flags: extent::ZERO,
                },
            ],
        };
        let mut buf = vec![0; m.encoded_len()];
        assert_eq!(m.encode(&mut buf).unwrap(), buf.len());
        assert_eq!(MapReply::decode(&buf).unwrap(), m);
        assert_eq!(
            MapReply::decode(&buf[..buf.len() - 1]),
            Err(Status::Invalid)
        );
        assert_eq!(
            MapReply::decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(Status::Invalid)
        );
        let mut small = vec![0; 10];
        assert_eq!(m.encode(&mut small), Err(Status::NoSpace));
    }

    #[test]
    fn random_bytes_never_panic_the_decoders() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..10_000 {
            let n = rng.random_range(0..64);
            let buf: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            let _ = MapReply::decode(&buf);
            let _ = NamePayload::decode(&buf);
        }
    }

    #[test]
    fn status_codes_round_trip() {
        for s in [
            Status::Ok,
            Status::NotFound,
            Status::Io,
            Status::Invalid,
            Status::Exists,
            Status::Busy,
            Status::NoSpace,
            Status::PeerGone,
            Status::Unsupported,
            Status::TimedOut,
            Status::Stale,
            Status::Range,
            Status::Other(12345),
        ] {
            assert_eq!(Status::from_code(s.code()), s);
        }
    }
}
