//! Shared test plumbing: a plugin served on a socket in a temp dir, and a
//! tonic channel that reaches it through that socket.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::{Channel, Endpoint, Uri};

use csi::server::{ServeError, UnixEndpoint};

/// A running server; dropping the handle's sender stops it.
pub struct Running {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl Running {
    /// Asks the server to stop and waits for it to finish. The temp dir
    /// lives on until `self` is dropped, so callers can inspect it.
    pub async fn stop(&mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .expect("server task panicked")
    }
}

/// Binds `routes` on `<tempdir>/plugin/csi.sock` and serves it in a task.
/// Returns once the socket is bound, so clients may connect at once.
pub fn start(routes: Routes) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugin").join("csi.sock");
    let endpoint = UnixEndpoint::parse(&format!("unix://{}", socket.display())).unwrap();
    let bound = endpoint.bind().expect("bind");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(routes, async {
        let _ = rx.await;
    }));
    Running {
        dir,
        socket,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A gRPC channel over the unix socket at `path`.
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: the connector decides
    // where bytes go.
    Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .expect("connect over unix socket")
}
