#!/usr/bin/env bash
# End-to-end test on kind (DESIGN.md §10): cluster with 3 workers on 3 "physical hosts",
# images built and loaded, chart installed, a 2-plex MirroredVolume, data written through one
# path and read through the other, one worker stopped (I/O continues, volume Degraded),
# restarted (resync to Healthy), data verified, cluster deleted.
# Exits 0 with a message where Docker (a running engine), kind, kubectl or helm are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=sva-e2e
NS=default
HELM=${HELM:-$(command -v helm || echo "$HOME/.cache/sva-tools/helm")}

skip() { echo "kind e2e SKIPPED: $*"; exit 0; }
command -v docker >/dev/null || skip "no docker client"
docker info >/dev/null 2>&1 || skip "docker client present but no running Docker engine"
command -v kind >/dev/null || skip "kind not installed"
command -v kubectl >/dev/null || skip "kubectl not installed"
[ -x "$HELM" ] || skip "helm not found (tests/operator-checks.sh installs one)"

cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
wait_phase() { # volume phase timeout_s
  local deadline=$((SECONDS + $3))
  until [ "$(kubectl get mv "$1" -n $NS -o jsonpath='{.status.phase}')" = "$2" ]; do
    [ $SECONDS -lt $deadline ] || { kubectl get mv,plex,pods -n $NS -o wide; echo "timeout waiting for $1 $2"; exit 1; }
    sleep 3
  done
  echo "$1 is $2"
}

step "cluster"
mkdir -p /tmp/sva-kind/worker{1,2,3}
kind create cluster --config kind/cluster.yaml --wait 120s

step "images"
docker build -q -f images/sva-node.Dockerfile -t sva-node:0.1.0 .
docker build -q -f images/operator.Dockerfile -t sva-operator:0.1.0 .
docker build -q -f images/initiator.Dockerfile -t sva-initiator:0.1.0 images
for img in sva-node:0.1.0 sva-operator:0.1.0 sva-initiator:0.1.0; do kind load docker-image "$img" --name "$CLUSTER"; done

step "chart + storage"
"$HELM" install sva charts/sva-operator --namespace sva-system --create-namespace --wait --timeout 180s
kubectl apply -f kind/local-storage.yaml

step "volume"
kubectl apply -f kind/mirroredvolume.yaml
wait_phase vol1 Healthy 300
kubectl get mv vol1 -n $NS
IQN=$(kubectl get mv vol1 -n $NS -o jsonpath='{.status.targetIqn}')
mapfile -t PORTALS < <(kubectl get mv vol1 -n $NS -o jsonpath='{range .status.paths[*]}{.portal}{"\n"}{end}')
[ "${#PORTALS[@]}" -eq 2 ] || { echo "expected 2 paths, got ${PORTALS[*]}"; exit 1; }
URL_A="iscsi://${PORTALS[0]}/$IQN/0"; URL_B="iscsi://${PORTALS[1]}/$IQN/0"
INIT=iqn.2024-01.io.sva:e2e-initiator

step "initiator pod"
kubectl run initiator -n $NS --image=sva-initiator:0.1.0 --image-pull-policy=Never --restart=Never
kubectl wait -n $NS --for=condition=Ready pod/initiator --timeout=120s
qio() { kubectl exec -n $NS initiator -- env LIBISCSI_INITIATOR_NAME=$INIT qemu-io -f raw "$@"; }
# qemu's iscsi driver takes the initiator name from the URL query (initiator-name=...).
qio -c 'write -P 0x11 1M 64k' "$URL_A?initiator-name=$INIT"
qio -c 'read -P 0x11 1M 64k' "$URL_B?initiator-name=$INIT"
echo "ok: written through path A, read through path B"

step "stop one worker"
NODE_B=$(kubectl get plex -n $NS -l sva.io/volume=vol1 -o jsonpath='{.items[1].spec.node}')
docker stop "$NODE_B"
qio -c 'write -P 0x22 2M 64k' "$URL_A?initiator-name=$INIT"
qio -c 'read -P 0x22 2M 64k' "$URL_A?initiator-name=$INIT"
echo "ok: I/O continues through path A with $NODE_B down"
wait_phase vol1 Degraded 120

step "restart it, wait for resync"
docker start "$NODE_B"
wait_phase vol1 Healthy 600
qio -c 'read -P 0x22 2M 64k' "$URL_B?initiator-name=$INIT"
qio -c 'read -P 0x11 1M 64k' "$URL_B?initiator-name=$INIT"
echo "ok: data written while $NODE_B was down is readable through its path"
kubectl get mv,plex -n $NS

step "delete"
kubectl delete mv vol1 -n $NS --wait --timeout=120s
echo "kind e2e PASSED"
