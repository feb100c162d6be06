//! NBD export: volumes served over the Network Block Device protocol on a unix socket or a
//! TCP loopback address, so that `qemu-img`, `qemu-io`, qemu itself and `nbd-client` can read
//! and write volumes on hosts without ublk (image import and export, VM disks without a
//! kernel driver, tests).
//!
//! The server speaks the fixed newstyle handshake (`NBD_OPT_GO`, `NBD_OPT_INFO`,
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`; structured replies and TLS are
//! refused, so every reply is a simple one) and the commands READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES and DISC. Each connection reads requests in order but runs them concurrently
//! (up to a queue depth) and answers by handle as they complete; contiguous READs or WRITEs that
//! arrive together are merged into one volume call, since a client such as qemu does not merge
//! them itself and each call crosses several peers; any number of connections may
//! share an export, and because every connection goes through the same vlmc, FLUSH on one is
//! visible on all (`NBD_FLAG_CAN_MULTI_CONN`).
//!
//! Layout: [`proto`] parses and checks what comes off the wire, `handshake` negotiates an
//! export, `transmission` runs the request loop, and [`bench`] compares an export of a clone
//! against `qemu-nbd` serving a qcow2 overlay.
//!
//! ```no_run
//! # async fn demo(client: std::sync::Arc<peers::client::VolumeClient>) -> Result<(), node::nbd::NbdError> {
//! use node::nbd::{NbdConfig, serve};
//! let mut config = NbdConfig::volume("db");
//! config.unix_socket = Some("/run/archip/db.nbd".into());
//! // Serves until ctrl-c; `qemu-img info nbd+unix:///db?socket=/run/archip/db.nbd` works meanwhile.
//! serve(client, config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod bench;
mod handshake;
pub mod proto;
mod transmission;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use peers::client::VolumeClient;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use crate::io_stats::IoStats;
use crate::io_stats::{Frontend, bump};
pub use bench::{BenchOptions, bench};

/// The unix socket's permission bits unless asked otherwise: owner only.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Which volumes a server exports, by NBD export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exports {
    /// One volume (or snapshot), under its own name and as the default (empty) export name.
    Volume(String),
    /// Every volume and snapshot, each under its name; there is no default export.
    All,
}

/// How to serve. Every limit bounds something a client could otherwise grow without end.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    pub exports: Exports,
    /// A unix socket to listen on; a stale socket file at the path is replaced, a live one is
    /// refused.
    pub unix_socket: Option<PathBuf>,
    /// Permission bits of the unix socket, exactly (whatever the umask). Whoever may connect
    /// reads and writes every exported volume, and NBD here has no authentication, so the
    /// default is owner-only ([`DEFAULT_SOCKET_MODE`]).
    pub socket_mode: u32,
    /// A TCP address to listen on; must be loopback, since NBD here has neither TLS nor
    /// authentication. Port 0 picks a free port (see [`NbdServer::tcp_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Largest READ or WRITE, advertised as the maximum block size (the spec recommends at
    /// least 32 MiB); longer requests get EINVAL.
    pub max_io: u32,
    /// Requests of one connection in flight at once; the connection stops reading beyond it.
    pub queue_depth: usize,
    /// Contiguous READs (or WRITEs) that arrive together are merged into one volume call of at
    /// most this many bytes (0: never merge). Each still gets its own reply.
    pub merge_limit: u32,
    /// Bytes of READ and WRITE data in flight across all connections: bounds memory and the
    /// segment buffers this server can hold.
    pub inflight_bytes: u32,
    /// Connections at once; more are accepted and closed straight away.
    pub max_connections: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
    /// Time in-flight requests get to finish once shutdown is asked for.
    pub drain_timeout: Duration,
}

impl NbdConfig {
    /// Defaults serving one volume; set a socket or address before binding.
    pub fn volume(name: impl Into<String>) -> NbdConfig {
        NbdConfig {
            exports: Exports::Volume(name.into()),
            ..NbdConfig::all()
        }
    }

    /// Defaults serving every volume by name.
    pub fn all() -> NbdConfig {
        NbdConfig {
            exports: Exports::All,
            unix_socket: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            tcp: None,
            max_io: 32 << 20,
            queue_depth: 128,
            merge_limit: 256 << 10,
            inflight_bytes: 128 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
        }
    }

    fn validate(&self) -> Result<(), NbdError> {
        let bad = |s: String| Err(NbdError::Config(s));
        if self.unix_socket.is_none() && self.tcp.is_none() {
            return bad("neither a unix socket nor a TCP address to listen on".into());
        }
        if let Some(a) = self.tcp
            && !a.ip().is_loopback()
        {
            return Err(NbdError::NotLoopback(a));
        }
        // The owner must keep read and write (connecting needs write), or the server would
        // lock out the very user that started it.
        if self.socket_mode & !0o777 != 0 || self.socket_mode & 0o600 != 0o600 {
            return bad(format!(
                "socket mode {:o} is not a permission mode that lets the owner connect (600..777)",
                self.socket_mode
            ));
        }
        if let Exports::Volume(v) = &self.exports
            && proto::parse_name(v.as_bytes()).is_err()
        {
            return bad(format!("{v:?} cannot be an NBD export name"));
        }
        if self.max_io < 4096 || self.max_io > 1 << 30 {
            return bad(format!("max_io {} not in 4 KiB..=1 GiB", self.max_io));
        }
        if self.inflight_bytes < self.max_io {
            return bad(format!(
                "inflight_bytes {} is below max_io {}: a largest request could never run",
                self.inflight_bytes, self.max_io
            ));
        }
        if self.merge_limit > self.max_io {
            return bad(format!(
                "merge_limit {} is above max_io {}",
                self.merge_limit, self.max_io
            ));
        }
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            return bad(format!("queue_depth {} not in 1..=4096", self.queue_depth));
        }
        if self.max_connections == 0 {
            return bad("max_connections is 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("bad NBD configuration: {0}")]
    Config(String),
    #[error("refusing to listen on {0}: NBD has no authentication here, use a loopback address")]
    NotLoopback(SocketAddr),
    #[error("{} is in use by a live server", .0.display())]
    SocketInUse(PathBuf),
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("listening on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume client: {0}")]
    Client(#[from] peers::client::ClientError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("benchmark: {0}")]
    Bench(String),
}

/// What every connection of a server shares.
struct Shared {
    client: Arc<VolumeClient>,
    config: NbdConfig,
    /// Bytes of READ/WRITE data in flight, server-wide.
    budget: Arc<Semaphore>,
    stats: Arc<IoStats>,
}

/// Removes the unix socket file when the server goes away, however it ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A bound server, not yet serving: binding first lets a caller (a test, a CLI printing the
/// address) know the socket accepts connections before any client tries.
pub struct NbdServer {
    unix: Option<(UnixListener, SocketFile)>,
    tcp: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("unix", &self.unix.as_ref().map(|(_, p)| &p.0))
            .field("tcp", &self.tcp_addr())
            .field("exports", &self.shared.config.exports)
            .finish()
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, SocketFile), NbdError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(NbdError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(NbdError::SocketInUse(path.to_path_buf()));
        }
        // Nobody answers: left behind by a server that died. Replace it.
        let _ = std::fs::remove_file(path);
    }
    let listen_err = |source| NbdError::Listen {
        what: path.display().to_string(),
        source,
    };
    // bind(2) creates the socket with the umask's bits, and a chmod after it leaves a window
    // in which anyone the umask lets in can connect. So it is bound inside a fresh owner-only
    // directory beside the path, given its mode there, and only then renamed into place.
    let private = private_dir_beside(path).map_err(listen_err)?;
    let staged = private.0.join("nbd.sock");
    let bound = UnixListener::bind(&staged)
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map(|()| l)
        })
        .and_then(|l| std::fs::rename(&staged, path).map(|()| l))
        .map_err(listen_err)?;
    Ok((bound, SocketFile(path.to_path_buf())))
}

/// A directory only its owner can enter, removed (with whatever is left in it) when dropped.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn private_dir_beside(path: &Path) -> std::io::Result<PrivateDir> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "nbd".to_owned(), |n| n.to_string_lossy().into_owned());
    let dir = parent.join(format!(
        ".{name}.bind-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(PrivateDir(dir))
}

impl NbdServer {
    /// Checks the configuration and binds the listeners. Must run inside a tokio runtime.
    pub fn bind(client: Arc<VolumeClient>, config: NbdConfig) -> Result<NbdServer, NbdError> {
        config.validate()?;
        let unix = config
            .unix_socket
            .as_deref()
            .map(|p| bind_unix(p, config.socket_mode))
            .transpose()?;
        let tcp = match config.tcp {
            None => None,
            Some(addr) => {
                let std = std::net::TcpListener::bind(addr)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .and_then(TcpListener::from_std)
                    .map_err(|source| NbdError::Listen {
                        what: addr.to_string(),
                        source,
                    })?;
                Some(std)
            }
        };
        Ok(NbdServer {
            unix,
            tcp,
            shared: Arc::new(Shared {
                client,
                budget: Arc::new(Semaphore::new(config.inflight_bytes as usize)),
                config,
                stats: Arc::new(IoStats::new(Frontend::Nbd)),
            }),
        })
    }

    /// The TCP address actually bound (with the port chosen when asked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Live counters (also returned by [`run`](Self::run) at the end).
    pub fn stats(&self) -> Arc<IoStats> {
        self.shared.stats.clone()
    }

    /// Accepts and serves connections until `shutdown` completes; then stops accepting, lets
    /// in-flight requests finish (up to the drain timeout), flushes what connections wrote,
    /// closes them and removes the unix socket.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<Arc<IoStats>, NbdError> {
        let NbdServer { unix, tcp, shared } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(shared.config.max_connections));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let accepted: std::io::Result<Conn> = tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = accept_unix(unix.as_ref().map(|u| &u.0)) => r.map(Conn::Unix),
                r = accept_tcp(tcp.as_ref()) => r.map(Conn::Tcp),
            };
            let conn = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or similar: back off a little instead of spinning.
                    tracing::warn!(error = %e, "nbd: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(
                    max = shared.config.max_connections,
                    "nbd: connection limit reached, closing a new connection"
                );
                continue;
            };
            bump(&shared.stats.connections, 1);
            let shared = shared.clone();
            let stop = stop_rx.clone();
            conns.spawn(async move {
                match conn {
                    Conn::Unix(s) => serve_connection(s, shared, stop).await,
                    Conn::Tcp(s) => {
                        let _ = s.set_nodelay(true);
                        serve_connection(s, shared, stop).await
                    }
                }
                drop(slot);
            });
        }
        drop(unix);
        drop(tcp);
        let _ = stop_tx.send(true);
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(shared.config.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!("nbd: connections still busy after the drain timeout; dropping them");
            conns.shutdown().await;
        }
        Ok(shared.stats.clone())
    }
}

/// Binds and serves until `shutdown` completes (see [`NbdServer::run`]).
pub async fn serve(
    client: Arc<VolumeClient>,
    config: NbdConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Arc<IoStats>, NbdError> {
    NbdServer::bind(client, config)?.run(shutdown).await
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept_unix(l: Option<&UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn accept_tcp(l: Option<&TcpListener>) -> std::io::Result<tokio::net::TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Resolves once the server is asked to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the server is gone: stop too.
    let _ = stop.wait_for(|&s| s).await;
}

/// One connection: handshake, then transmission. Protocol violations end it and are counted;
/// they never reach the server loop.
async fn serve_connection<S: transmission::IntoHalves>(
    stream: S,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = stream;
    let negotiated = tokio::select! {
        _ = stopped(&mut stop) => return,
        r = tokio::time::timeout(
            shared.config.handshake_timeout,
            handshake::negotiate(&mut stream, &shared),
        ) => r,
    };
    let export = match negotiated {
        Ok(Ok(Some(export))) => export,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if e.is_violation() {
                bump(&shared.stats.protocol_errors, 1);
            }
            tracing::debug!(error = %e, "nbd: handshake ended");
            return;
        }
        Err(_) => {
            bump(&shared.stats.protocol_errors, 1);
            tracing::debug!("nbd: handshake timed out");
            return;
        }
    };
    tracing::debug!(export = %export.name, size = export.size, "nbd: transmission");
    transmission::run(stream, export, shared, stop).await;
}
