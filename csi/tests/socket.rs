//! Socket handling: stale sockets, foreign files, permissions, cleanup.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use tonic::service::Routes;

use csi::identity::{AlwaysHealthy, IdentityService};
use csi::pb::GetPluginInfoRequest;
use csi::pb::identity_client::IdentityClient;
use csi::server::{ServeError, UnixEndpoint};

fn routes() -> Routes {
    Routes::new(IdentityService::new(AlwaysHealthy).into_server())
}

fn endpoint(path: &std::path::Path) -> UnixEndpoint {
    UnixEndpoint::parse(&format!("unix://{}", path.display())).unwrap()
}

#[tokio::test]
async fn creates_parent_dirs_and_sets_mode_0660() {
    let mut server = common::start(routes());
    let meta = std::fs::symlink_metadata(&server.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn removes_the_socket_on_shutdown() {
    let mut server = common::start(routes());
    let socket = server.socket.clone();
    let dir = server.dir.path().to_path_buf();
    server.stop().await.unwrap();
    assert!(dir.exists());
    assert!(!socket.exists(), "socket left behind after shutdown");
}

#[tokio::test]
async fn replaces_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    // A socket left over from a crashed run: bound, then its listener gone.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(
        std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_socket()
    );

    let bound = endpoint(&path)
        .bind()
        .expect("stale socket should be replaced");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bound.serve(routes(), async {
        let _ = rx.await;
    }));
    let mut client = IdentityClient::new(common::connect(&path).await);
    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().name, csi::DRIVER_NAME);
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn refuses_a_file_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    std::fs::write(&path, b"precious data").unwrap();

    let err = endpoint(&path).bind().unwrap_err();
    assert!(
        matches!(err, ServeError::NotASocket(ref p) if p == &path),
        "{err}"
    );
    assert!(err.to_string().contains("not a socket"));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious data");
}

#[tokio::test]
async fn refuses_a_directory_at_the_socket_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("csi.sock");
    std::fs::create_dir(&path).unwrap();
    let err = endpoint(&path).bind().unwrap_err();
    assert!(matches!(err, ServeError::NotASocket(_)), "{err}");
    assert!(path.is_dir());
}

#[tokio::test]
async fn refuses_a_socket_a_live_server_is_using() {
    let mut server = common::start(routes());
    let err = endpoint(&server.socket).bind().unwrap_err();
    assert!(matches!(err, ServeError::InUse(_)), "{err}");

    // The running server is unharmed.
    let mut client = IdentityClient::new(common::connect(&server.socket).await);
    client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn serve_rejects_non_unix_endpoints_before_touching_anything() {
    let err = csi::server::serve("tcp://127.0.0.1:1", routes(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::InvalidEndpoint { .. }), "{err}");
    assert!(err.to_string().contains("only unix://"), "{err}");
}
