//! The commands' side of the control protocol: a blocking connection that sends one request
//! and reads its reply. Blocking on purpose: a command does one thing at a time, and the
//! streaming ones (import, export) are a plain read-file/write-socket loop.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::protocol::{Envelope, ErrorKind, MAX_LINE, Reply, Request};

/// A failure the server reported (or that the command found itself before asking), with the
/// typed kind that decides the exit code.
#[derive(Debug, Clone)]
pub struct Refused {
    pub kind: ErrorKind,
    pub message: String,
    pub holder: Option<String>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let (ErrorKind::Locked, Some(h)) = (self.kind, &self.holder) {
            write!(
                f,
                " (if node {h} is gone for good, `archip lock break VOLUME` frees the lock)"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

impl Refused {
    pub fn invalid(message: impl Into<String>) -> Self {
        Refused {
            kind: ErrorKind::InvalidArgument,
            message: message.into(),
            holder: None,
        }
    }

    fn protocol(message: impl Into<String>) -> Self {
        Refused {
            kind: ErrorKind::Protocol,
            message: message.into(),
            holder: None,
        }
    }
}

/// No `archip up` answers at the control socket.
#[derive(Debug)]
pub struct NotRunning {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for NotRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no archip running at {}; start it with `archip up` ({})",
            self.socket.display(),
            self.source
        )
    }
}

impl std::error::Error for NotRunning {}

/// One request's connection.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
}

impl Connection {
    /// Connects and sends `request`.
    pub fn open(socket: &Path, request: &Request) -> anyhow::Result<Connection> {
        let stream = UnixStream::connect(socket).map_err(|source| NotRunning {
            socket: socket.to_owned(),
            source,
        })?;
        let mut c = Connection {
            reader: BufReader::with_capacity(1 << 20, stream.try_clone()?),
            writer: BufWriter::with_capacity(1 << 20, stream),
        };
        c.send(&Envelope::new(request.clone()))?;
        c.writer.flush()?;
        Ok(c)
    }

    /// Sends a request and returns the value of its result.
    pub fn call<T: DeserializeOwned>(socket: &Path, request: &Request) -> anyhow::Result<T> {
        Connection::open(socket, request)?.result()
    }

    pub fn send<T: serde::Serialize>(&mut self, msg: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.writer, msg)?;
        self.writer.write_all(b"\n")
    }

    pub fn send_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(data)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    /// The next line from the server.
    pub fn next(&mut self) -> anyhow::Result<Reply> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(
                Refused::protocol("archip up closed the connection without a result").into(),
            );
        }
        let reply: Reply = serde_json::from_slice(&line)
            .map_err(|e| Refused::protocol(format!("unreadable reply from archip up: {e}")))?;
        match reply {
            Reply::Error {
                kind,
                message,
                holder,
            } => Err(Refused {
                kind,
                message,
                holder,
            }
            .into()),
            other => Ok(other),
        }
    }

    /// Reads exactly `buf.len()` bytes of a data frame.
    pub fn read_bytes(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.reader.read_exact(buf)
    }

    /// Reads lines up to the result and decodes its value.
    pub fn result<T: DeserializeOwned>(mut self) -> anyhow::Result<T> {
        match self.next()? {
            Reply::Ok { value } => Ok(serde_json::from_value(value).map_err(|e| {
                Refused::protocol(format!("unexpected result from archip up: {e}"))
            })?),
            other => Err(Refused::protocol(format!("expected a result, got {other:?}")).into()),
        }
    }

    /// After a failed write: the server has most likely sent an error and closed; prefer its
    /// message to "broken pipe".
    pub fn error_after_write_failure(mut self, e: std::io::Error) -> anyhow::Error {
        match self.next() {
            Err(server) => server,
            Ok(_) => anyhow::Error::from(e).context("sending to archip up"),
        }
    }
}
