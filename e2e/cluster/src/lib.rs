//! The harness of the cluster e2e suite: reach a cluster (or say why not), install the chart,
//! create objects from JSON, wait on them through watches (never by sleeping), exec into pods.
//!
//! The suite itself is `tests/cluster.rs`; `e2e/README.md` says how to run it.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{AttachParams, DeleteParams, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Client, Resource};
use serde_json::Value;
use tokio::io::AsyncReadExt;

/// Set to 1 where a cluster must be there (a CI job with one): then an unreachable cluster
/// fails the suite instead of skipping it.
pub const REQUIRED_ENV: &str = "ARCHIP_E2E_CLUSTER";

/// How long one object may take to become what a step waits for.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A client of the cluster `KUBECONFIG` (or the in-cluster config) names, if one answers.
/// `Err` carries the reason it was not reached, for the skip message.
pub async fn reach() -> Result<Client, String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no kubeconfig or in-cluster config ({e}); set KUBECONFIG"))?;
    let url = config.cluster_url.clone();
    let client = Client::try_from(config).map_err(|e| format!("client for {url}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(15), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(client),
        Ok(Err(e)) => Err(format!("API server {url} did not answer: {e}")),
        Err(_) => Err(format!("API server {url} did not answer within 15 s")),
    }
}

/// Whether the environment insists on a cluster ([`REQUIRED_ENV`]).
pub fn required() -> bool {
    std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1")
}

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs a command, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm upgrade --install` of the repository's chart, waiting for its pods; `extra` are more
/// helm arguments (`--set image.repository=...`).
pub fn helm_install(release: &str, namespace: &str, extra: &[String]) -> anyhow::Result<()> {
    let chart = repo_root().join("charts/archipelago-csi");
    run(Command::new("helm")
        .args(["upgrade", "--install", release])
        .arg(&chart)
        .args(["--namespace", namespace, "--create-namespace"])
        .args(["--wait", "--timeout", "10m"])
        .args(extra))?;
    Ok(())
}

pub fn helm_uninstall(release: &str, namespace: &str) -> anyhow::Result<()> {
    run(Command::new("helm").args(["uninstall", release, "--namespace", namespace, "--wait"]))?;
    Ok(())
}

/// Whether a CustomResourceDefinition is installed (`snapshots.snapshot.storage.k8s.io`).
pub async fn crd_exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    Ok(crds.get_opt(name).await?.is_some())
}

/// An API of custom objects in a namespace.
pub fn dynamic(
    client: &Client,
    namespace: &str,
    (group, version, kind, plural): (&str, &str, &str, &str),
) -> (Api<DynamicObject>, ApiResource) {
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    (Api::namespaced_with(client.clone(), namespace, &ar), ar)
}

/// Creates an object from its JSON (which must name its kind and apiVersion).
pub async fn create<K>(api: &Api<K>, object: Value) -> anyhow::Result<K>
where
    K: Resource + Clone + Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let object: K = serde_json::from_value(object).context("object JSON")?;
    Ok(api.create(&PostParams::default(), &object).await?)
}

/// Waits (by watching) until `name` satisfies `cond`, for at most [`STEP_TIMEOUT`].
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    cond: impl Condition<K>,
) -> anyhow::Result<K>
where
    K: Resource + Clone + Debug + Send + serde::de::DeserializeOwned + 'static,
{
    match tokio::time::timeout(STEP_TIMEOUT, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => bail!("{name} is gone while waiting until {what}"),
        Ok(Err(e)) => bail!("watching {name} until {what}: {e}"),
        Err(_) => bail!("{name}: not {what} after {STEP_TIMEOUT:?}"),
    }
}

/// Deletes an object (if there) and waits until it is gone.
pub async fn delete_and_wait<K>(api: &Api<K>, name: &str) -> anyhow::Result<()>
where
    K: Resource + Clone + Debug + Send + serde::de::DeserializeOwned + 'static,
{
    if api.get_opt(name).await?.is_none() {
        return Ok(());
    }
    let _ = api.delete(name, &DeleteParams::foreground()).await?;
    let gone = |o: Option<&K>| o.is_none();
    match tokio::time::timeout(STEP_TIMEOUT, await_condition(api.clone(), name, gone)).await {
        Ok(_) => Ok(()),
        Err(_) => bail!("{name} not deleted after {STEP_TIMEOUT:?}"),
    }
}

/// A status field of a custom object, by JSON pointer (`/status/readyToUse`).
pub fn field<'a>(obj: Option<&'a DynamicObject>, pointer: &str) -> Option<&'a Value> {
    obj?.data.pointer(pointer)
}

/// Runs `command` in a pod's container and returns its stdout; a non-zero exit fails.
pub async fn exec(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    command: &[&str],
) -> anyhow::Result<String> {
    let params = AttachParams::default()
        .container(container)
        .stdout(true)
        .stderr(true);
    let mut attached = pods
        .exec(pod, command.to_vec(), &params)
        .await
        .with_context(|| format!("exec {command:?} in {pod}/{container}"))?;
    let mut stdout = attached.stdout().context("exec stdout")?;
    let mut stderr = attached.stderr().context("exec stderr")?;
    let status = attached.take_status().context("exec status")?;
    let (mut out, mut err) = (String::new(), String::new());
    let (r1, r2) = tokio::join!(
        stdout.read_to_string(&mut out),
        stderr.read_to_string(&mut err)
    );
    r1?;
    r2?;
    let status = status.await;
    attached.join().await?;
    match status.and_then(|s| s.status) {
        Some(s) if s == "Success" => Ok(out),
        other => bail!("{command:?} in {pod}: {other:?}: {err}"),
    }
}
