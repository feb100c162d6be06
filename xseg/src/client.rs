//! An asynchronous client: many requests in flight from async code over one dynamic port.
//!
//! A receiver thread owns the port's consumer side and completes a oneshot channel per request,
//! so callers `await` replies without polling. Used by peers (vlmc to mapper and blockers) and
//! by the CLI and CSI layers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::port::{Port, Sender};
use crate::protocol::Op;
use crate::request::Request;
use crate::retry::SendRetry;
use crate::segment::Segment;

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Request>, foldhash::fast::RandomState>>>;

pub struct AsyncClient {
    tx: Sender,
    pending: Pending,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AsyncClient {
    /// Binds a dynamic port and starts its receiver thread.
    pub fn new(seg: &Arc<Segment>, name: &str) -> Result<AsyncClient> {
        let port = seg.bind_dynamic(name)?;
        Ok(Self::with_port(port))
    }

    pub fn with_port(mut port: Port) -> AsyncClient {
        let tx = port.sender().clone();
        let pending: Pending = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let pending = pending.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("xseg-rx-{}", tx.number()))
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        let mut got = false;
                        while let Some(rep) = port.receive() {
                            got = true;
                            let waiter = pending.lock().unwrap().remove(&rep.index());
                            match waiter {
                                Some(w) => {
                                    // A caller that gave up drops its receiver: the reply is
                                    // dropped with the error and so freed.
                                    let _ = w.send(rep);
                                }
                                None => port.free(rep),
                            }
                        }
                        if !got {
                            port.wait(Duration::from_millis(200));
                        }
                    }
                })
                .expect("spawn receiver thread")
        };
        AsyncClient {
            tx,
            pending,
            stop,
            thread: Some(thread),
        }
    }

    pub fn sender(&self) -> &Sender {
        &self.tx
    }

    pub fn alloc(&self, op: Op, target: &[u8], data_len: u64) -> Result<Request> {
        self.tx.alloc(op, target, data_len)
    }

    /// Queues `req` to `dst` with a waiter for its reply; a request that cannot be sent is
    /// freed.
    fn submit(&self, req: Request, dst: u32) -> Result<(u32, oneshot::Receiver<Request>)> {
        let (w, r) = oneshot::channel();
        let index = req.index();
        self.pending.lock().unwrap().insert(index, w);
        if let Err((e, req)) = self.tx.submit(req, dst) {
            self.pending.lock().unwrap().remove(&index);
            self.tx.free(req);
            return Err(e);
        }
        Ok((index, r))
    }

    /// Sends `req` to `dst` and waits for the reply, at most `timeout`.
    pub async fn call(&self, req: Request, dst: u32, timeout: Duration) -> Result<Request> {
        let (index, r) = self.submit(req, dst)?;
        match tokio::time::timeout(timeout, r).await {
            Ok(Ok(rep)) => Ok(rep),
            Ok(Err(_)) => Err(Error::Invalid("receiver thread stopped")),
            Err(_) => {
                self.pending.lock().unwrap().remove(&index);
                self.tx.segment().reap();
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// [`call`](Self::call) without giving up: for a request whose late execution would do
    /// harm once its caller had moved on (a write that lands after a newer write to the same
    /// place). Every sent request gets a reply: its peer answers, or, when that peer dies, the
    /// segment's recovery fails it back; so this ends unless the peer hangs while alive. Each
    /// `every` without a reply, dead owners are reaped (which fails such requests back) and
    /// `slow` is told how long the call has waited so far.
    pub async fn call_to_reply(
        &self,
        req: Request,
        dst: u32,
        every: Duration,
        mut slow: impl FnMut(Duration),
    ) -> Result<Request> {
        // A zero period would spin.
        let every = every.max(Duration::from_millis(1));
        let (_, mut r) = self.submit(req, dst)?;
        let started = std::time::Instant::now();
        loop {
            match tokio::time::timeout(every, &mut r).await {
                Ok(Ok(rep)) => return Ok(rep),
                Ok(Err(_)) => return Err(Error::Invalid("receiver thread stopped")),
                Err(_) => {
                    self.tx.segment().reap();
                    slow(started.elapsed());
                }
            }
        }
    }

    /// [`call`](Self::call) for a request that `make` can build again: a send refused for a
    /// moment is retried by the [`SendRetry`] policy, each time with a fresh request, because
    /// `call` frees a request it could not send. A failure of `make` ends the call.
    pub async fn call_again<E: From<Error>>(
        &self,
        make: impl Fn() -> std::result::Result<Request, E>,
        dst: u32,
        timeout: Duration,
    ) -> std::result::Result<Request, E> {
        let mut retry = SendRetry::new();
        loop {
            match self.call(make()?, dst, timeout).await {
                Err(e) if retry.allows(&e) => retry.pause().await,
                r => return r.map_err(E::from),
            }
        }
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        self.tx.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
