//! Node-loss recovery against a fake API server (tower-test's mock service behind
//! `kube::Client`) and real file-backend peer sets: node-a, node-b and the controller's own,
//! over one data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, Event, Node, NodeSpec, ObjectReference, PersistentVolume,
    PersistentVolumeSpec, Taint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use peers::client::{ClientError, VolumeClient};
use peers::peerset::{PeerConfig, PeerSet, Ports};
use tokio::sync::{mpsc, oneshot};

use super::*;

const MI: u64 = 1 << 20;

/// A peer set locking as `owner`, on its own segment, over `data`.
struct Peers {
    set: Option<PeerSet>,
    segment: PathBuf,
    client: Arc<VolumeClient>,
}

impl Peers {
    fn start(data: &Path, owner: &str) -> Peers {
        let segment = PathBuf::from(format!(
            "/dev/shm/archip-nodeloss-{owner}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&segment);
        let mut config = PeerConfig::new(data, segment.to_str().unwrap(), owner);
        config.xseg = xseg::Config {
            nr_ports: 64,
            dynamic_start: Ports::DYNAMIC_START,
            nr_requests: 256,
            buffer_classes: vec![(4 << 10, 64), (64 << 10, 32), (1 << 20, 8)],
        };
        config.workers = 2;
        config.registry = Some(data.join("registry"));
        let set = PeerSet::start(&config).expect("peer set");
        let client = Arc::new(VolumeClient::connect(set.segment()).expect("client"));
        Peers {
            set: Some(set),
            segment,
            client,
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.stop();
        }
        let _ = std::fs::remove_file(&self.segment);
    }
}

fn node(name: &str, tainted: bool) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: tainted.then(|| {
                vec![Taint {
                    key: OUT_OF_SERVICE_TAINT.into(),
                    value: Some("nodeshutdown".into()),
                    effect: "NoExecute".into(),
                    time_added: None,
                }]
            }),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

fn pv(name: &str, driver: &str, handle: &str, claim: (&str, &str)) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.into(),
                volume_handle: handle.into(),
                ..CSIPersistentVolumeSource::default()
            }),
            claim_ref: Some(ObjectReference {
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(claim.0.into()),
                name: Some(claim.1.into()),
                uid: Some(format!("uid-{}", claim.1)),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).unwrap()))
        .unwrap()
}

fn list<T: serde::Serialize>(kind: &str, items: &[T]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": kind,
        "metadata": { "resourceVersion": "1" },
        "items": items,
    })
}

/// The fake API server: lists Nodes and PersistentVolumes, holds every watch open without
/// sending anything, and hands each created Event to `events`. Any other request fails the test.
async fn fake_api(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    nodes: Vec<Node>,
    pvs: Vec<PersistentVolume>,
    events: mpsc::UnboundedSender<(String, Event)>,
) {
    let mut watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let watch = parts.uri.query().unwrap_or("").contains("watch=true");
        match (&parts.method, path.as_str()) {
            (&Method::GET, "/api/v1/nodes") if watch => watches.push(send),
            (&Method::GET, "/api/v1/nodes") => {
                send.send_response(json(StatusCode::OK, &list("NodeList", &nodes)))
            }
            (&Method::GET, "/api/v1/persistentvolumes") if !watch => {
                send.send_response(json(StatusCode::OK, &list("PersistentVolumeList", &pvs)))
            }
            (&Method::POST, p)
                if p.starts_with("/api/v1/namespaces/") && p.ends_with("/events") =>
            {
                let namespace = p.split('/').nth(4).unwrap().to_string();
                let bytes = body.collect_bytes().await.unwrap();
                let mut event: Event = serde_json::from_slice(&bytes).unwrap();
                event.metadata.name = Some("created".into());
                send.send_response(json(StatusCode::CREATED, &event));
                let _ = events.send((namespace, event));
            }
            (m, p) => panic!("unexpected request {m} {p}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_service_node_loses_its_locks_and_its_claims_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let node_a = Peers::start(dir.path(), "node-a");
    let node_b = Peers::start(dir.path(), "node-b");
    let controller = Peers::start(dir.path(), "csi-controller@node-c");

    // node-a writes two volumes; node-b one; a snapshot is never locked.
    for v in ["v-db", "v-web", "v-cache"] {
        controller.client.create(v, 16 * MI, None).await.unwrap();
    }
    controller.client.snapshot("v-web", "s-web").await.unwrap();
    for v in ["v-db", "v-web"] {
        node_a.client.open(v).await.unwrap();
        node_a.client.write(v, 0, b"node-a data").await.unwrap();
        node_a.client.flush(v).await.unwrap();
    }
    node_b.client.open("v-cache").await.unwrap();
    let held = controller.client.lock_info("v-db").await.unwrap();
    assert_eq!(held.holder.as_deref(), Some("node-a"));
    let cache_before = controller.client.lock_info("v-cache").await.unwrap();

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let kube = Client::new(service, "default");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let nodes = vec![node("node-a", true), node("node-b", false)];
    let pvs = vec![
        pv("pv-db", crate::DRIVER_NAME, "v-db", ("shop", "db")),
        pv("pv-web", crate::DRIVER_NAME, "v-web", ("shop", "web")),
        // Another driver's volume with the same handle: not ours.
        pv(
            "pv-foreign",
            "other.csi.io",
            "v-db",
            ("elsewhere", "foreign"),
        ),
        pv("pv-cache", crate::DRIVER_NAME, "v-cache", ("shop", "cache")),
    ];
    let api = tokio::spawn(fake_api(handle, nodes, pvs, events_tx));

    let watcher = NodeLoss::new(kube.clone(), controller.client.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(watcher.run(async {
        let _ = stopped.await;
    }));

    // Bounded wait for the two events; the watch itself never ends.
    let mut posted = Vec::new();
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .expect("an event within a minute")
            .expect("the fake API server is up");
        posted.push(e);
    }
    stop.send(()).unwrap();
    running.await.unwrap();

    posted.sort_by_key(|(_, e)| e.involved_object.name.clone());
    let claims: Vec<(String, String)> = posted
        .iter()
        .map(|(ns, e)| (ns.clone(), e.involved_object.name.clone().unwrap()))
        .collect();
    assert_eq!(
        claims,
        vec![("shop".into(), "db".into()), ("shop".into(), "web".into())]
    );
    for (_, e) in &posted {
        assert_eq!(e.reason.as_deref(), Some(REASON_FENCED));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(
            e.involved_object.kind.as_deref(),
            Some("PersistentVolumeClaim")
        );
        assert!(e.message.as_deref().unwrap().contains("node-a"), "{e:?}");
        assert_eq!(
            e.involved_object.uid.as_deref(),
            Some(format!("uid-{}", e.involved_object.name.as_deref().unwrap()).as_str())
        );
    }
    assert!(
        events.try_recv().is_err(),
        "no event beyond the fenced volumes"
    );

    // The locks are free, node-b's is untouched.
    for v in ["v-db", "v-web"] {
        let l = controller.client.lock_info(v).await.unwrap();
        assert_eq!(l.holder, None, "{v} fenced");
    }
    assert_eq!(
        controller.client.lock_info("v-cache").await.unwrap(),
        cache_before,
        "an untainted node's lock is not touched"
    );

    // node-a's late map updates are refused; node-b takes the volume at a new generation and
    // sees node-a's acknowledged data.
    let late = node_a.client.write("v-db", 8 * MI, b"late").await;
    assert!(
        matches!(late, Err(ClientError::Fenced(_))),
        "fenced node writes: {late:?}"
    );
    node_b.client.open("v-db").await.unwrap();
    let mut buf = [0u8; 11];
    node_b.client.read("v-db", 0, &mut buf).await.unwrap();
    assert_eq!(&buf, b"node-a data");
    let taken = controller.client.lock_info("v-db").await.unwrap();
    assert_eq!(taken.holder.as_deref(), Some("node-b"));
    assert!(
        taken.generation > held.generation,
        "a new fencing generation"
    );

    // A second pass fences nothing and posts nothing.
    let again = NodeLoss::new(kube.clone(), controller.client.clone());
    assert!(
        again
            .reconcile(&node("node-a", true))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(events.try_recv().is_err());

    // A node without the taint keeps its locks, whatever it holds.
    controller
        .client
        .create("v-new", 16 * MI, None)
        .await
        .unwrap();
    node_a.client.open("v-new").await.unwrap();
    assert!(
        again
            .reconcile(&node("node-a", false))
            .await
            .unwrap()
            .is_empty()
    );
    let new = controller.client.lock_info("v-new").await.unwrap();
    assert_eq!(new.holder.as_deref(), Some("node-a"));

    // A panic in the fake API server (an unexpected request) fails the test here.
    api.abort();
    match api.await {
        Ok(()) => {}
        Err(e) => assert!(e.is_cancelled(), "fake API server: {e}"),
    }
}
