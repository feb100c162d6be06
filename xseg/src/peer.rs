//! A small framework for peers: accept requests, hand them to a handler, deliver replies.
//!
//! Synchronous peers respond inside [`Peer::request`]. Asynchronous peers keep the request,
//! clone the [`Sender`], and respond later from any thread or task (for example a tokio task).
//! PING is answered and unknown op codes are failed by the loop itself, so no handler has to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::time::Duration;

use crate::port::{Port, Sender};
use crate::protocol::{Op, Status};
use crate::request::Request;

pub trait Peer {
    /// A request arrived. Respond now or later through `tx`.
    fn request(&mut self, req: Request, tx: &Sender);

    /// A reply to a request this peer sent came back.
    fn reply(&mut self, req: Request, tx: &Sender) {
        tx.free(req);
    }

    /// Called when the loop found nothing to do, before it waits.
    fn idle(&mut self, _tx: &Sender) {}
}

/// Tells a running loop to stop, from any thread.
#[derive(Clone)]
pub struct Stopper {
    flag: Arc<AtomicBool>,
    tx: Sender,
}

impl Stopper {
    pub fn stop(&self) {
        self.flag.store(true, SeqCst);
        self.tx.wake();
    }
}

/// Runs a peer on a port until stopped.
pub struct Runner {
    port: Port,
    flag: Arc<AtomicBool>,
}

impl Runner {
    pub fn new(port: Port) -> Runner {
        Runner {
            port,
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            flag: self.flag.clone(),
            tx: self.port.sender().clone(),
        }
    }

    pub fn port_mut(&mut self) -> &mut Port {
        &mut self.port
    }

    pub fn run<P: Peer>(&mut self, peer: &mut P) {
        while !self.flag.load(Relaxed) {
            let mut busy = false;
            while let Some(mut req) = self.port.accept() {
                busy = true;
                match req.op() {
                    Op::Ping => {
                        req.complete(0);
                        self.port.respond(req);
                    }
                    Op::Unknown(code) => {
                        tracing::debug!(code, "unknown op");
                        req.fail(Status::Unsupported);
                        self.port.respond(req);
                    }
                    _ => peer.request(req, self.port.sender()),
                }
            }
            while let Some(rep) = self.port.receive() {
                busy = true;
                peer.reply(rep, self.port.sender());
            }
            if !busy {
                peer.idle(self.port.sender());
                self.port.wait(Duration::from_secs(1));
            }
        }
    }
}
