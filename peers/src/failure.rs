//! The peers' one failure type: what a failed request carries back to its sender (an xseg
//! status, a human message and, for a lock conflict, the lock's holder), and how the errors of
//! each layer below (blocker, mapper, xseg, another peer's reply) become one.

use xseg::{Request, Status};

use crate::blocker::BlockerError;
use crate::mapper::MapperError;
use crate::wire::{self, ErrorReply};

/// A failed request: what travels back.
#[derive(Debug)]
pub struct Failure {
    pub status: Status,
    pub message: String,
    /// Who holds the lock, when the failure is a lock conflict: a client can say who has the
    /// volume.
    pub holder: Option<String>,
}

impl Failure {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
            holder: None,
        }
    }

    /// The error a peer sent back, passed on with its message.
    pub fn from_reply(rep: &Request) -> Self {
        let e = ErrorReply::decode(rep.data().unwrap_or(&[])).unwrap_or_default();
        let status = match rep.status() {
            Status::Ok => Status::Io,
            s => s,
        };
        Failure {
            status,
            message: if e.message.is_empty() {
                status.to_string()
            } else {
                e.message
            },
            holder: e.holder,
        }
    }

    /// Puts the failure in `req`, ready to be sent back.
    pub fn apply(self, req: &mut Request) {
        wire::fail(req, self.status, &self.message, self.holder.as_deref());
    }
}

impl From<BlockerError> for Failure {
    fn from(e: BlockerError) -> Self {
        Failure::new(crate::blocker::peer::status_of(&e), e.to_string())
    }
}

impl From<MapperError> for Failure {
    fn from(e: MapperError) -> Self {
        Failure {
            status: crate::mapper::peer::status_of(&e),
            holder: match &e {
                MapperError::Locked { holder, .. } => Some(holder.clone()),
                _ => None,
            },
            message: e.to_string(),
        }
    }
}

/// A call a peer made itself (vlmc to the mapper or the blocker) that xseg could not carry.
impl From<xseg::Error> for Failure {
    fn from(e: xseg::Error) -> Self {
        let status = match e {
            xseg::Error::Timeout(_) => Status::TimedOut,
            xseg::Error::NoPeer(_) => Status::PeerGone,
            // The segment's pool, not the disk, is short: back-pressure that clears as other
            // requests finish. NoSpace would tell a filesystem its disk is full.
            xseg::Error::NoRequest | xseg::Error::NoBuffer(_) => Status::TimedOut,
            _ => Status::Io,
        };
        Failure::new(status, format!("vlmc: {e}"))
    }
}

/// A request (or a reply) whose fields or payload do not decode.
impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::new(s, format!("malformed request: {s}"))
    }
}
