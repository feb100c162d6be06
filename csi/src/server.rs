//! Serving CSI on a unix socket.
//!
//! COs reach a CSI plugin through a unix socket given as an endpoint such
//! as `unix:///csi/csi.sock`. A plugin restarted by kubelet finds its old
//! socket file still there, so a stale socket is removed; but a live one
//! (another instance still serving) or a file that is not a socket at all
//! is refused, because deleting either would break something that is not
//! ours to break.
//!
//! Every call gets a request id ([`RequestIdLayer`]): a tracing span `csi{request_id, method}`
//! around the handler, so each log line of the call carries the id, and the same id in the
//! response metadata `x-request-id`, so an operator can go from a sidecar's error to our logs.
//!
//! Binding ([`UnixEndpoint::bind`]) is separate from serving
//! ([`BoundSocket::serve`]) so that callers know the socket accepts
//! connections before they go on (tests connect right after `bind`, with
//! no sleeping).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

/// Owner and group may connect (kubelet and the sidecars run as root or
/// share the group); nobody else may.
pub const SOCKET_MODE: u32 = 0o660;

/// The longest path a unix socket address can hold (`sun_path` is 108
/// bytes on Linux, including the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint string is not one we can serve on.
    #[error("invalid CSI endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Something other than a socket sits at the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process is serving on the socket.
    #[error("{0} is in use by a running server; refusing to replace it")]
    InUse(PathBuf),
    /// A filesystem or socket operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server on {path}: {source}")]
    Transport {
        /// The socket served.
        path: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
}

/// A validated `unix://` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixEndpoint {
    path: PathBuf,
}

impl UnixEndpoint {
    /// Parses `unix:///abs/path` (also `unix:/abs/path`, as some sidecars
    /// write it). Only unix sockets are accepted: CSI over TCP would expose
    /// an unauthenticated storage API on the network.
    pub fn parse(endpoint: &str) -> Result<Self, ServeError> {
        let invalid = |reason: &str| ServeError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = endpoint.split_once(':') else {
            return Err(invalid("expected unix:///path/to/socket"));
        };
        if !scheme.eq_ignore_ascii_case("unix") {
            return Err(invalid(&format!(
                "scheme {scheme:?} is not supported, only unix:// sockets are"
            )));
        }
        let path = match rest.strip_prefix("//") {
            Some(after_authority) => after_authority,
            None => rest,
        };
        if path.is_empty() {
            return Err(invalid("the socket path is empty"));
        }
        if !path.starts_with('/') {
            return Err(invalid(
                "the socket path must be absolute (unix:///path/to/socket)",
            ));
        }
        if path.contains('\0') {
            return Err(invalid("the socket path contains a NUL byte"));
        }
        if path.len() > MAX_SOCKET_PATH {
            return Err(invalid(&format!(
                "the socket path is {} bytes, unix sockets allow at most {MAX_SOCKET_PATH}",
                path.len()
            )));
        }
        if path.ends_with('/') {
            return Err(invalid("the socket path names a directory"));
        }
        Ok(Self {
            path: PathBuf::from(path),
        })
    }

    /// The socket's filesystem path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prepares the path (parent directory, stale socket) and binds it with
    /// mode 0660. Must be called inside a tokio runtime.
    pub fn bind(&self) -> Result<BoundSocket, ServeError> {
        let path = &self.path;
        let io_err = |context: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| ServeError::Io {
                context,
                path: p,
                source,
            }
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating directory", parent))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // A socket nobody answers on is left over from a previous
                // run; one that answers belongs to a live server.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(ServeError::InUse(path.clone())),
                    Err(_) => {
                        std::fs::remove_file(path).map_err(io_err("removing stale socket", path))?
                    }
                }
                tracing::info!(path = %path.display(), "removed stale socket");
            }
            Ok(_) => return Err(ServeError::NotASocket(path.clone())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspecting", path)(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_err("setting permissions on", path))?;
        Ok(BoundSocket {
            listener,
            path: path.clone(),
        })
    }
}

impl FromStr for UnixEndpoint {
    type Err = ServeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for UnixEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

/// A listening socket, not yet serving. Connections made now wait in the
/// backlog until [`BoundSocket::serve`] runs.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl BoundSocket {
    /// The socket's filesystem path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `routes` until `shutdown` completes, then lets in-flight RPCs
    /// finish and removes the socket file, so the next start finds a clean
    /// directory.
    pub async fn serve<F>(self, routes: Routes, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send,
    {
        let BoundSocket { listener, path } = self;
        tracing::info!(path = %path.display(), "serving CSI");
        let result = Server::builder()
            .layer(RequestIdLayer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove socket");
            }
            _ => {}
        }
        result.map_err(|source| ServeError::Transport { path, source })
    }
}

/// The response metadata key that carries a call's request id.
pub const REQUEST_ID: &str = "x-request-id";

/// A fresh request id: 16 hex digits, unique within the process (a counter) and unlikely to
/// repeat across restarts (a random start).
fn next_request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    let next = NEXT.get_or_init(|| {
        AtomicU64::new(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        )
    });
    format!("{:016x}", next.fetch_add(1, Ordering::Relaxed))
}

/// Gives every CSI call a request id: see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

/// The service [`RequestIdLayer`] wraps around the routes.
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for RequestId<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<http::Response<R>, S::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        use tracing::Instrument;
        let id = next_request_id();
        // "/csi.v1.Controller/CreateVolume" -> "Controller/CreateVolume".
        let path = req.uri().path();
        let method = path
            .rsplit_once('/')
            .map(|(service, m)| {
                let service = service.rsplit('.').next().unwrap_or(service);
                format!("{}/{m}", service.trim_start_matches('/'))
            })
            .unwrap_or_else(|| path.to_owned());
        let span = tracing::info_span!("csi", request_id = %id, method = %method);
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let mut response = future.await?;
                if let Ok(v) = http::HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID, v);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

/// Parses `endpoint`, binds it and serves `routes` until `shutdown`.
pub async fn serve<F>(endpoint: &str, routes: Routes, shutdown: F) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    UnixEndpoint::parse(endpoint)?
        .bind()?
        .serve(routes, shutdown)
        .await
}

/// Completes on SIGTERM (how kubelet stops a pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            // Without signal handlers the process dies on the default
            // action anyway; serving on is the useful choice.
            tracing::warn!(error = %e, "cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_unix_endpoints() {
        let e = UnixEndpoint::parse("unix:///csi/csi.sock").unwrap();
        assert_eq!(e.path(), Path::new("/csi/csi.sock"));
        assert_eq!(e.to_string(), "unix:///csi/csi.sock");
        let e: UnixEndpoint = "unix:/var/lib/kubelet/plugins/x/csi.sock".parse().unwrap();
        assert_eq!(e.path(), Path::new("/var/lib/kubelet/plugins/x/csi.sock"));
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        let long = format!("unix:///{}", "s".repeat(MAX_SOCKET_PATH));
        for (endpoint, needle) in [
            ("tcp://127.0.0.1:10000", "only unix://"),
            ("/csi/csi.sock", "expected unix://"),
            ("unix://", "empty"),
            ("unix://csi.sock", "absolute"),
            ("unix:///csi/", "directory"),
            (long.as_str(), "at most"),
        ] {
            let err = UnixEndpoint::parse(endpoint).unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, ServeError::InvalidEndpoint { .. }) && msg.contains(needle),
                "{endpoint}: {msg}"
            );
        }
    }
}
