//! A handle on one request slot, and the checked accessors that read it.
//!
//! Whoever holds a `Request` value is the one party allowed to touch the slot; the handle moves
//! along with the request (allocated → submitted → accepted → responded → received).
//! Every field read from shared memory is validated here, at the boundary.

use std::sync::Arc;
use std::sync::atomic::Ordering::*;

use crate::error::{Error, Result};
use crate::layout::*;
use crate::protocol::{Op, Status};
use crate::segment::Segment;

/// A request owned by the caller.
pub struct Request {
    pub(crate) seg: Arc<Segment>,
    pub(crate) index: u32,
}

/// A copied-out target name (at most 256 bytes).
#[derive(Clone)]
pub struct Target {
    len: usize,
    bytes: [u8; MAX_TARGET_LEN],
}

impl std::ops::Deref for Target {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Target {
    /// The name as UTF-8, or an error for garbage.
    pub fn as_str(&self) -> std::result::Result<&str, Status> {
        std::str::from_utf8(self).map_err(|_| Status::Invalid)
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self))
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("index", &self.index)
            .field("op", &self.op())
            .field("offset", &self.offset())
            .field("size", &self.size())
            .finish()
    }
}

impl Request {
    fn shm(&self) -> &RequestShm {
        self.seg.req(self.index)
    }

    pub fn index(&self) -> u32 {
        self.index
    }
    pub fn op(&self) -> Op {
        Op::from_code(self.shm().op.load(Relaxed))
    }
    pub fn set_op(&mut self, op: Op) {
        self.shm().op.store(op.code(), Relaxed)
    }
    pub fn flags(&self) -> u32 {
        self.shm().flags.load(Relaxed)
    }
    pub fn set_flags(&mut self, f: u32) {
        self.shm().flags.store(f, Relaxed)
    }
    pub fn offset(&self) -> u64 {
        self.shm().offset.load(Relaxed)
    }
    pub fn set_offset(&mut self, v: u64) {
        self.shm().offset.store(v, Relaxed)
    }
    pub fn size(&self) -> u64 {
        self.shm().size.load(Relaxed)
    }
    pub fn set_size(&mut self, v: u64) {
        self.shm().size.store(v, Relaxed)
    }
    pub fn serviced(&self) -> u64 {
        self.shm().serviced.load(Relaxed)
    }
    pub fn tag(&self) -> u64 {
        self.shm().tag.load(Relaxed)
    }
    pub fn set_tag(&mut self, v: u64) {
        self.shm().tag.store(v, Relaxed)
    }
    /// Port that sent the request (its first hop).
    pub fn source(&self) -> u32 {
        self.shm().src_port.load(Relaxed)
    }

    /// The outcome carried by a reply.
    pub fn status(&self) -> Status {
        Status::from_code(self.shm().result.load(Relaxed))
    }

    /// Marks success with the number of bytes done.
    pub fn complete(&mut self, serviced: u64) {
        self.shm().serviced.store(serviced, Relaxed);
        self.shm().result.store(0, Relaxed);
    }

    /// Marks failure.
    pub fn fail(&mut self, status: Status) {
        let code = match status {
            Status::Ok => Status::Io.code(),
            s => s.code(),
        };
        self.shm().serviced.store(0, Relaxed);
        self.shm().result.store(code, Relaxed);
    }

    /// Resets the outcome before (re)submitting.
    pub fn clear_result(&mut self) {
        self.shm().serviced.store(0, Relaxed);
        self.shm().result.store(0, Relaxed);
    }

    pub fn target(&self) -> std::result::Result<Target, Status> {
        let len = self.shm().target_len.load(Relaxed) as usize;
        if len > MAX_TARGET_LEN {
            return Err(Status::Invalid);
        }
        let mut bytes = [0u8; MAX_TARGET_LEN];
        for (i, w) in self.shm().target.iter().enumerate().take(len.div_ceil(8)) {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
        Ok(Target { len, bytes })
    }

    pub fn set_target(&mut self, name: &[u8]) -> Result<()> {
        if name.len() > MAX_TARGET_LEN {
            return Err(Error::TargetTooLong(name.len()));
        }
        for (i, chunk) in name.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.shm().target[i].store(u64::from_le_bytes(w), Relaxed);
        }
        self.shm().target_len.store(name.len() as u32, Relaxed);
        Ok(())
    }

    /// Validated location of this request's buffer: the buffer must be owned by this request.
    fn buffer(&self) -> Option<(*mut u8, u64)> {
        let b = self.shm().buffer.load(Relaxed);
        if b == 0 || b > self.seg.layout().total_buffers {
            return None;
        }
        if self.seg.buffer_owner(b - 1).load(Acquire) != self.index + 1 {
            return None;
        }
        Some(self.seg.buffer(b - 1))
    }

    /// Capacity of the data buffer (0 without one).
    pub fn capacity(&self) -> u64 {
        self.buffer().map_or(0, |b| b.1)
    }

    /// Length of the data in the buffer.
    pub fn data_len(&self) -> u64 {
        self.shm().data_len.load(Relaxed)
    }

    pub fn set_data_len(&mut self, len: u64) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::Invalid("data length exceeds buffer"));
        }
        self.shm().data_len.store(len, Relaxed);
        Ok(())
    }

    /// The data, `data_len` bytes. Garbage lengths give an error, never an out-of-bounds slice.
    pub fn data(&self) -> std::result::Result<&[u8], Status> {
        let len = self.data_len();
        match self.buffer() {
            None if len == 0 => Ok(&[]),
            Some((ptr, cap)) if len <= cap => {
                // SAFETY: the buffer is owned by this request (checked), lies inside the mapping,
                // and the protocol gives its holder exclusive use while the handle is held.
                Ok(unsafe { std::slice::from_raw_parts(ptr, len as usize) })
            }
            _ => Err(Status::Invalid),
        }
    }

    /// The whole buffer, for filling (its capacity, not `data_len`).
    pub fn buffer_mut(&mut self) -> std::result::Result<&mut [u8], Status> {
        match self.buffer() {
            None => Ok(&mut []),
            Some((ptr, cap)) => {
                // SAFETY: as in `data`; `&mut self` makes this the only live view in-process.
                Ok(unsafe { std::slice::from_raw_parts_mut(ptr, cap as usize) })
            }
        }
    }

    /// The first `data_len` bytes, writable.
    pub fn data_mut(&mut self) -> std::result::Result<&mut [u8], Status> {
        let len = self.data_len();
        let buf = self.buffer_mut()?;
        if len as usize > buf.len() {
            return Err(Status::Invalid);
        }
        Ok(&mut buf[..len as usize])
    }

    /// Copies `data` in and sets `data_len`.
    pub fn write_data(&mut self, data: &[u8]) -> Result<()> {
        let buf = self.buffer_mut().map_err(|_| Error::Invalid("no buffer"))?;
        if data.len() > buf.len() {
            return Err(Error::Invalid("data exceeds buffer"));
        }
        buf[..data.len()].copy_from_slice(data);
        self.set_data_len(data.len() as u64)
    }
}
