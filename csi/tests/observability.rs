//! Observability: `/metrics` scraped over HTTP while real I/O goes through the volume client
//! (the counters move by exactly what was done), `/healthz`, and the request id of a CSI call
//! (in its log lines and in the response metadata).

mod common;

use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use peers::testing::ScratchPeerSet;
use tonic::service::Routes;

use csi::identity::{Health, IdentityService, ProbeError};
use csi::pb::ProbeRequest;
use csi::pb::identity_client::IdentityClient;

/// GET `path` from the metrics server at `addr`; status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// The value of the series `name` with exactly these `labels` (rendered as Prometheus does).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_volume_io_scraped_over_http() {
    let h = ScratchPeerSet::start("metrics");
    let c = h.client();
    let listener = csi::metrics::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(csi::metrics::serve(listener, h.segment().clone(), async {
        let _ = stopped.await;
    }));

    // A volume of its own: other tests in this process count into the same totals.
    let vol = "metrics-vol";
    c.create(vol, 1 << 20, Some(64 * 1024)).await.unwrap();
    let series = |what: &str, op: &str| format!("{what}{{volume=\"{vol}\",op=\"{op}\"}}");
    let (code, before) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let cow_before = value(&before, "archip_cow_copies_total");
    let snaps_before = value(&before, "archip_snapshots_total");

    for i in 0..3u64 {
        c.write(vol, i * 4096, &[7u8; 4096]).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    c.read(vol, 0, &mut buf).await.unwrap();
    c.read(vol, 8192, &mut buf).await.unwrap();
    c.flush(vol).await.unwrap();
    c.snapshot(vol, "metrics-vol-s").await.unwrap();
    // A partial write to a block the snapshot now shares: one copy-on-write.
    c.write(vol, 0, &[1u8; 512]).await.unwrap();

    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        value(&text, &series("archip_volume_io_total", "write")),
        4.0
    );
    assert_eq!(value(&text, &series("archip_volume_io_total", "read")), 2.0);
    assert_eq!(
        value(&text, &series("archip_volume_io_total", "flush")),
        1.0
    );
    assert_eq!(
        value(&text, &series("archip_volume_io_bytes_total", "write")),
        f64::from(3 * 4096 + 512)
    );
    assert_eq!(
        value(&text, &series("archip_volume_io_bytes_total", "read")),
        8192.0
    );
    assert_eq!(
        value(
            &text,
            &series("archip_volume_io_latency_seconds_count", "write")
        ),
        4.0
    );
    assert_eq!(
        value(&text, &series("archip_volume_io_errors_total", "read")),
        0.0
    );
    assert!(value(&text, "archip_cow_copies_total") >= cow_before + 1.0);
    assert!(value(&text, "archip_snapshots_total") >= snaps_before + 1.0);
    // The vlmc port served every one of those requests and has none outstanding now.
    let vlmc = text
        .lines()
        .find(|l| l.starts_with("archip_port_requests_total{") && l.contains("vlmc"))
        .unwrap_or_else(|| panic!("no vlmc port series in:\n{text}"));
    assert!(vlmc.rsplit(' ').next().unwrap().parse::<u64>().unwrap() >= 8);
    assert!(text.contains("# TYPE archip_port_service_seconds histogram"));

    let (code, body) = get(addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(get(addr, "/nothing").await.0, 404);

    let _ = stop.send(());
    server.await.unwrap();
}

/// A health source that logs inside the call, so that the log line must carry the id.
struct Unhealthy;

impl Health for Unhealthy {
    async fn probe(&self) -> Result<(), ProbeError> {
        Err(ProbeError::Unhealthy("the test says so".into()))
    }
}

/// A writer the test subscriber formats into.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_csi_call_has_a_request_id_in_its_logs_and_metadata() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(move || writer.clone())
        .finish();
    // The runtime is this thread only, so the server's handlers log through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut server = common::start(Routes::new(IdentityService::new(Unhealthy).into_server()));
    let mut client = IdentityClient::new(common::connect(&server.socket).await);
    let status = client.probe(ProbeRequest {}).await.unwrap_err();
    let id = status
        .metadata()
        .get(csi::server::REQUEST_ID)
        .expect("x-request-id in the metadata")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 16, "{id}");
    let second = client.probe(ProbeRequest {}).await.unwrap_err();
    assert_ne!(
        second.metadata().get(csi::server::REQUEST_ID).unwrap(),
        id.as_str(),
        "ids repeat"
    );
    server.stop().await.unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("probe: unhealthy") && l.contains(&id))
        .unwrap_or_else(|| panic!("no log line of the call with id {id}:\n{text}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["span"]["request_id"], id.as_str(), "{line}");
    assert_eq!(json["span"]["method"], "Identity/Probe", "{line}");
}
