//! The archipelago-csi chart on a live cluster, end to end: install, provision, write through a
//! pod, snapshot, clone (from the snapshot and from the claim), read the data back from the
//! clones, expand, group-snapshot, delete everything and check that the backend keeps nothing;
//! then, where KubeVirt (and CDI) are installed, boot a VM from a cloned disk and live-migrate
//! it.
//!
//! Without a reachable cluster (no `KUBECONFIG`, or an API server that does not answer) the
//! suite says so and skips, unless `ARCHIP_E2E_CLUSTER=1` insists on one. See e2e/README.md.

use std::collections::BTreeMap;

use anyhow::{Context, bail, ensure};
use cluster_e2e::{
    REQUIRED_ENV, crd_exists, create, delete_and_wait, dynamic, exec, field, helm_install,
    helm_uninstall, reach, required, wait_for,
};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DynamicObject, ListParams, LogParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Everything the suite reads from the environment, with its default.
struct Settings {
    release: String,
    release_namespace: String,
    namespace: String,
    storage_class: String,
    snapshot_class: String,
    group_snapshot_class: String,
    busybox: String,
    helm_args: Vec<String>,
    skip_install: bool,
    keep: bool,
    vm_image: String,
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            release: env("ARCHIP_E2E_RELEASE", "archip-e2e"),
            release_namespace: env("ARCHIP_E2E_RELEASE_NAMESPACE", "archipelago-e2e"),
            namespace: env("ARCHIP_E2E_NAMESPACE", "archip-e2e-work"),
            storage_class: env("ARCHIP_E2E_STORAGE_CLASS", "archipelago-file"),
            snapshot_class: env("ARCHIP_E2E_SNAPSHOT_CLASS", "archipelago-snapshot"),
            group_snapshot_class: env(
                "ARCHIP_E2E_GROUP_SNAPSHOT_CLASS",
                "archipelago-group-snapshot",
            ),
            busybox: env("ARCHIP_E2E_BUSYBOX", "busybox:1.36"),
            helm_args: env("ARCHIP_E2E_HELM_ARGS", "")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            skip_install: env("ARCHIP_E2E_SKIP_INSTALL", "0") == "1",
            keep: env("ARCHIP_E2E_KEEP", "0") == "1",
            vm_image: env(
                "ARCHIP_E2E_VM_IMAGE",
                "docker://quay.io/kubevirt/cirros-container-disk-demo",
            ),
        }
    }
}

const PAYLOAD: &str = "archipelago-e2e-payload-7f3a";

const SNAPSHOT: (&str, &str, &str, &str) = (
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshot",
    "volumesnapshots",
);
const SNAPSHOT_CONTENT: (&str, &str, &str, &str) = (
    "snapshot.storage.k8s.io",
    "v1",
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
);
const GROUP_SNAPSHOT: (&str, &str, &str, &str) = (
    "groupsnapshot.storage.k8s.io",
    "v1beta1",
    "VolumeGroupSnapshot",
    "volumegroupsnapshots",
);
const VM: (&str, &str, &str, &str) = ("kubevirt.io", "v1", "VirtualMachine", "virtualmachines");
const VMI: (&str, &str, &str, &str) = (
    "kubevirt.io",
    "v1",
    "VirtualMachineInstance",
    "virtualmachineinstances",
);
const MIGRATION: (&str, &str, &str, &str) = (
    "kubevirt.io",
    "v1",
    "VirtualMachineInstanceMigration",
    "virtualmachineinstancemigrations",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_volumes_snapshots_clones_expansion_groups_and_vms() {
    let client = match reach().await {
        Ok(c) => c,
        Err(why) if !required() => {
            eprintln!(
                "SKIP cluster e2e: no cluster reachable: {why} (set {REQUIRED_ENV}=1 to fail instead)"
            );
            return;
        }
        Err(why) => panic!("{REQUIRED_ENV}=1 but no cluster is reachable: {why}"),
    };
    let s = Settings::from_env();
    let result = suite(&client, &s).await;
    if !s.keep {
        if let Err(e) = cleanup(&client, &s).await {
            eprintln!("e2e: cleanup: {e:#}");
        }
    }
    result.unwrap();
}

fn step(what: &str) {
    eprintln!("e2e: {what}");
}

async fn suite(client: &Client, s: &Settings) -> anyhow::Result<()> {
    if s.skip_install {
        step("chart: already installed (ARCHIP_E2E_SKIP_INSTALL=1)");
    } else {
        step("chart: helm install, waiting for its pods");
        helm_install(&s.release, &s.release_namespace, &s.helm_args)?;
    }
    node_pods_ready(client, s).await?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(&s.namespace).await?.is_none() {
        create(
            &namespaces,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": s.namespace}}),
        )
        .await?;
    }
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &s.namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.namespace);
    let mut handles = Vec::new();

    step("PVC: provision and write through a pod");
    create(&pvcs, pvc(s, "data", "64Mi", None)).await?;
    run_pod(
        &pods,
        s,
        "writer",
        "data",
        &format!("echo {PAYLOAD} > /data/file && sync"),
    )
    .await?;
    handles.push(bound_handle(client, &pvcs, "data").await?);

    step("snapshot");
    let (snapshots, _) = dynamic(client, &s.namespace, SNAPSHOT);
    create(
        &snapshots,
        json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "data-snap"},
            "spec": {"volumeSnapshotClassName": s.snapshot_class,
                     "source": {"persistentVolumeClaimName": "data"}}
        }),
    )
    .await?;
    let snap = wait_for(
        &snapshots,
        "data-snap",
        "ready to use",
        |o: Option<&DynamicObject>| field(o, "/status/readyToUse") == Some(&json!(true)),
    )
    .await?;
    let mut snapshot_handles = vec![snapshot_handle(client, &snap).await?];

    step("clones: from the snapshot and from the claim; read the data back");
    let from_snap = json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "data-snap"});
    let from_pvc = json!({"kind": "PersistentVolumeClaim", "name": "data"});
    create(&pvcs, pvc(s, "restored", "64Mi", Some(from_snap))).await?;
    create(&pvcs, pvc(s, "cloned", "64Mi", Some(from_pvc))).await?;
    for claim in ["restored", "cloned"] {
        let pod = format!("reader-{claim}");
        run_pod(&pods, s, &pod, claim, "cat /data/file").await?;
        let log = pods.logs(&pod, &LogParams::default()).await?;
        ensure!(
            log.contains(PAYLOAD),
            "{claim} reads {log:?}, not the payload"
        );
        handles.push(bound_handle(client, &pvcs, claim).await?);
    }

    step("expand: 64Mi to 128Mi, seen by a pod");
    pvcs.patch(
        "restored",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "128Mi"}}}})),
    )
    .await?;
    // A filesystem grows when a pod mounts it (offline expansion) or at once (online).
    run_pod(&pods, s, "grown", "restored", "df -k /data").await?;
    wait_for(
        &pvcs,
        "restored",
        "expanded to 128Mi",
        |o: Option<&PersistentVolumeClaim>| {
            o.and_then(|p| p.status.as_ref())
                .and_then(|st| st.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .is_some_and(|q| q.0 == "128Mi")
        },
    )
    .await?;
    let df = pods.logs("grown", &LogParams::default()).await?;
    eprintln!("e2e: df after expansion: {}", df.trim());

    if crd_exists(client, "volumegroupsnapshots.groupsnapshot.storage.k8s.io").await? {
        step("group snapshot of the claims labelled group=e2e");
        for claim in ["data", "cloned"] {
            pvcs.patch(
                claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"group": "e2e"}}})),
            )
            .await?;
        }
        let (groups, _) = dynamic(client, &s.namespace, GROUP_SNAPSHOT);
        create(
            &groups,
            json!({
                "apiVersion": "groupsnapshot.storage.k8s.io/v1beta1", "kind": "VolumeGroupSnapshot",
                "metadata": {"name": "group"},
                "spec": {"volumeGroupSnapshotClassName": s.group_snapshot_class,
                         "source": {"selector": {"matchLabels": {"group": "e2e"}}}}
            }),
        )
        .await?;
        wait_for(
            &groups,
            "group",
            "ready to use",
            |o: Option<&DynamicObject>| field(o, "/status/readyToUse") == Some(&json!(true)),
        )
        .await?;
        // Its member snapshots are VolumeSnapshots owned by the group.
        for member in snapshots.list(&ListParams::default()).await? {
            if member.name_any() != "data-snap" {
                snapshot_handles.push(snapshot_handle(client, &member).await?);
            }
        }
        step("group snapshot: delete");
        delete_and_wait(&groups, "group").await?;
    } else {
        step("SKIP group snapshot: the groupsnapshot.storage.k8s.io CRDs are not installed");
    }

    vm_boot_and_migrate(client, s, &mut handles).await?;

    step("delete everything and check the backend keeps nothing");
    for pod in pods.list(&ListParams::default()).await? {
        delete_and_wait(&pods, &pod.name_any()).await?;
    }
    for snap in snapshots.list(&ListParams::default()).await? {
        delete_and_wait(&snapshots, &snap.name_any()).await?;
    }
    for claim in pvcs.list(&ListParams::default()).await? {
        delete_and_wait(&pvcs, &claim.name_any()).await?;
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for (pv, _) in &handles {
        delete_and_wait(&pvs, pv).await?;
    }
    let mut ids: Vec<String> = handles.into_iter().map(|(_, h)| h).collect();
    ids.extend(snapshot_handles);
    backend_has_none_of(client, s, &ids).await
}

/// The node plugin pods of the release are all ready.
async fn node_pods_ready(client: &Client, s: &Settings) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.release_namespace);
    let lp = ListParams::default().labels("app.kubernetes.io/component=node");
    let list = pods.list(&lp).await?.items;
    ensure!(
        !list.is_empty(),
        "no node plugin pod in namespace {}",
        s.release_namespace
    );
    for p in &list {
        wait_for(&pods, &p.name_any(), "ready", |o: Option<&Pod>| {
            o.and_then(|p| p.status.as_ref())
                .and_then(|st| st.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await?;
    }
    Ok(list)
}

fn pvc(
    s: &Settings,
    name: &str,
    size: &str,
    source: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut spec = json!({
        "storageClassName": s.storage_class,
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    });
    if let Some(source) = source {
        spec["dataSource"] = source;
    }
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})
}

/// Runs `script` in a busybox pod with `claim` at /data, and waits for it to succeed.
async fn run_pod(
    pods: &Api<Pod>,
    s: &Settings,
    name: &str,
    claim: &str,
    script: &str,
) -> anyhow::Result<()> {
    create(
        pods,
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "c", "image": s.busybox, "command": ["sh", "-c", script],
                                "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
                "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": claim}}]
            }
        }),
    )
    .await?;
    let done = wait_for(pods, name, "finished", |o: Option<&Pod>| {
        o.and_then(|p| p.status.as_ref())
            .and_then(|st| st.phase.as_deref())
            .is_some_and(|ph| ph == "Succeeded" || ph == "Failed")
    })
    .await?;
    let phase = done.status.and_then(|st| st.phase).unwrap_or_default();
    if phase != "Succeeded" {
        let log = pods
            .logs(name, &LogParams::default())
            .await
            .unwrap_or_default();
        bail!("pod {name} {phase}: {log}");
    }
    Ok(())
}

/// The bound PV of a claim and its CSI volume handle (the backend volume's name).
async fn bound_handle(
    client: &Client,
    pvcs: &Api<PersistentVolumeClaim>,
    claim: &str,
) -> anyhow::Result<(String, String)> {
    let bound = wait_for(pvcs, claim, "bound", |o: Option<&PersistentVolumeClaim>| {
        o.and_then(|p| p.spec.as_ref())
            .and_then(|sp| sp.volume_name.as_ref())
            .is_some()
    })
    .await?;
    let pv_name = bound.spec.and_then(|sp| sp.volume_name).unwrap_or_default();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&pv_name).await?;
    let handle = pv
        .spec
        .and_then(|sp| sp.csi)
        .map(|c| c.volume_handle)
        .with_context(|| format!("PV {pv_name} is not a CSI volume"))?;
    Ok((pv_name, handle))
}

/// The CSI snapshot handle of a ready VolumeSnapshot.
async fn snapshot_handle(client: &Client, snap: &DynamicObject) -> anyhow::Result<String> {
    let content = field(Some(snap), "/status/boundVolumeSnapshotContentName")
        .and_then(|v| v.as_str())
        .context("snapshot without a content")?
        .to_string();
    // Cluster-scoped: only the ApiResource of the namespaced helper is used.
    let (_, ar) = dynamic(client, "", SNAPSHOT_CONTENT);
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let c = wait_for(
        &contents,
        &content,
        "with a snapshot handle",
        |o: Option<&DynamicObject>| field(o, "/status/snapshotHandle").is_some(),
    )
    .await?;
    Ok(field(Some(&c), "/status/snapshotHandle")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string())
}

/// Looks in every node plugin's data directory (file backend) for the volume header of each
/// id; none may be left. With the RADOS backend the objects are in Ceph and this check says so.
async fn backend_has_none_of(client: &Client, s: &Settings, ids: &[String]) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.release_namespace);
    let mut left = BTreeMap::new();
    for pod in node_pods_ready(client, s).await? {
        let name = pod.name_any();
        let listing = exec(
            &pods,
            &name,
            "archip-node",
            &[
                "sh",
                "-c",
                "ls -1 \"$ARCHIP_DATA_DIR/objects\" 2>/dev/null || true",
            ],
        )
        .await?;
        if listing.trim().is_empty() {
            step(&format!(
                "{name}: no file backend objects here (RADOS backend or empty)"
            ));
        }
        for id in ids {
            if listing.lines().any(|l| l == format!("vol.{id}")) {
                left.insert(id.clone(), name.clone());
            }
        }
    }
    ensure!(left.is_empty(), "the backend still holds {left:?}");
    Ok(())
}

/// Where KubeVirt (and CDI, to import a bootable image) are installed: import a small image,
/// boot a VM from a CSI clone of it (RWX block) and live-migrate it.
async fn vm_boot_and_migrate(
    client: &Client,
    s: &Settings,
    handles: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    if !crd_exists(client, "virtualmachines.kubevirt.io").await? {
        step("SKIP KubeVirt: virtualmachines.kubevirt.io is not installed");
        return Ok(());
    }
    if !crd_exists(client, "datavolumes.cdi.kubevirt.io").await? {
        step("SKIP KubeVirt: CDI (datavolumes.cdi.kubevirt.io) is needed to import the image");
        return Ok(());
    }
    step("KubeVirt: import the golden image");
    let (dvs, _) = dynamic(
        client,
        &s.namespace,
        ("cdi.kubevirt.io", "v1beta1", "DataVolume", "datavolumes"),
    );
    let storage = |size: &str| {
        json!({"storageClassName": s.storage_class, "accessModes": ["ReadWriteMany"],
               "volumeMode": "Block", "resources": {"requests": {"storage": size}}})
    };
    create(
        &dvs,
        json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
            "metadata": {"name": "golden"},
            "spec": {"source": {"registry": {"url": s.vm_image}}, "storage": storage("1Gi")}
        }),
    )
    .await?;
    wait_for(&dvs, "golden", "imported", |o: Option<&DynamicObject>| {
        field(o, "/status/phase") == Some(&json!("Succeeded"))
    })
    .await?;

    step("KubeVirt: boot a VM from a clone of it");
    let (vms, _) = dynamic(client, &s.namespace, VM);
    create(
        &vms,
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
            "metadata": {"name": "vm"},
            "spec": {
                "runStrategy": "Always",
                "dataVolumeTemplates": [{
                    "metadata": {"name": "vm-root"},
                    "spec": {"source": {"pvc": {"namespace": s.namespace, "name": "golden"}},
                             "storage": storage("1Gi")}
                }],
                "template": {"spec": {
                    "evictionStrategy": "LiveMigrate",
                    "domain": {"devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                               "resources": {"requests": {"memory": "128Mi"}}},
                    "volumes": [{"name": "root", "dataVolume": {"name": "vm-root"}}]
                }}
            }
        }),
    )
    .await?;
    let (vmis, _) = dynamic(client, &s.namespace, VMI);
    let running = wait_for(&vmis, "vm", "running", |o: Option<&DynamicObject>| {
        field(o, "/status/phase") == Some(&json!("Running"))
    })
    .await?;
    let from = field(Some(&running), "/status/nodeName").cloned();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &s.namespace);
    handles.push(bound_handle(client, &pvcs, "golden").await?);
    handles.push(bound_handle(client, &pvcs, "vm-root").await?);

    step("KubeVirt: live-migrate the VM");
    let (migrations, _) = dynamic(client, &s.namespace, MIGRATION);
    create(
        &migrations,
        json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "vm-migration"}, "spec": {"vmiName": "vm"}
        }),
    )
    .await?;
    let done = wait_for(
        &migrations,
        "vm-migration",
        "finished",
        |o: Option<&DynamicObject>| {
            matches!(
                field(o, "/status/phase").and_then(|v| v.as_str()),
                Some("Succeeded" | "Failed")
            )
        },
    )
    .await?;
    let phase = field(Some(&done), "/status/phase").cloned();
    ensure!(phase == Some(json!("Succeeded")), "migration {phase:?}");
    let after = vmis.get("vm").await?;
    let to = field(Some(&after), "/status/nodeName").cloned();
    ensure!(from != to, "the VM is still on {from:?} after migrating");

    step("KubeVirt: delete the VM");
    delete_and_wait(&vms, "vm").await?;
    delete_and_wait(&dvs, "golden").await?;
    Ok(())
}

/// Remove the test namespace (and, unless it was pre-installed, the release).
async fn cleanup(client: &Client, s: &Settings) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    delete_and_wait(&namespaces, &s.namespace).await?;
    if !s.skip_install {
        helm_uninstall(&s.release, &s.release_namespace)?;
    }
    Ok(())
}
