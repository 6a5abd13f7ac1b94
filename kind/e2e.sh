#!/usr/bin/env bash
# End-to-end test on kind (DESIGN.md §8, §10). The story:
#   1. cluster: 3 workers labelled as 3 physical hosts; images built and loaded; chart
#      installed; directory-backed local PVs; a 2-plex MirroredVolume with CHAP and an
#      initiator ACL.
#   2. data written through path A, read through path B (CHAP login, allowed initiator).
#   3. node loss: worker of path B stopped -> I/O continues on A, volume Degraded, plex Lost.
#   4. node back: worker restarted -> resync progress shown -> Healthy; data written while it
#      was down is read through its path.
#   5. replacement: replacementTimeoutSeconds lowered to 30, the same worker stopped again ->
#      a new plex on the third host (full resync), the lost plex removed -> Healthy; every
#      byte written so far is read through the new path.
#   6. deletion: the volume's plexes, pods and PVCs are gone, the finalizer released.
# Needs a running Docker engine, kind, kubectl and helm; where any is missing it says which and
# exits 0 (the project's build machines have no Docker engine).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=sva-e2e
NS=default
VOL=vol1
HELM=${HELM:-$(command -v helm || echo "$HOME/.cache/sva-tools/helm")}
INIT=iqn.2024-01.io.sva:e2e-initiator # kind/mirroredvolume.yaml allowedInitiators
CHAP_USER=e2e-user                    # kind/chap-secret.yaml
CHAP_PASS=e2e-chap-secret-0123

skip() {
  echo "kind e2e SKIPPED: $*"
  echo "(it needs a running Docker engine, kind, kubectl and helm; nothing was run)"
  exit 0
}
command -v docker >/dev/null || skip "no docker client on this machine"
docker info >/dev/null 2>&1 || skip "a docker client is installed but no Docker engine is running (docker info fails)"
command -v kind >/dev/null || skip "kind is not installed"
command -v kubectl >/dev/null || skip "kubectl is not installed"
[ -x "$HELM" ] || skip "helm not found (tests/operator-checks.sh installs one under ~/.cache/sva-tools)"

cleanup() { kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; }
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "FAIL: $*"
  kubectl get mv,plex,pods,pvc -n "$NS" -o wide || true
  kubectl get events -n "$NS" --sort-by=.lastTimestamp | tail -30 || true
  exit 1
}
mv_field() { kubectl get mv "$VOL" -n "$NS" -o jsonpath="$1"; }
wait_phase() { # phase timeout_s
  local deadline=$((SECONDS + $2))
  until [ "$(mv_field '{.status.phase}')" = "$1" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timeout waiting for $VOL to be $1"
    # The wide listing shows resync progress (Resync %, ETA) while a plex catches up.
    kubectl get mv "$VOL" -n "$NS" -o wide --no-headers || true
    sleep 5
  done
  echo "$VOL is $1"
}
# The path (portal) of the plex on node $1.
portal_of() { mv_field "{.status.paths[?(@.node==\"$1\")].portal}"; }
# qemu-io in the initiator pod against portal $1, logged in as the allowed initiator with CHAP.
qio() {
  local portal=$1
  shift
  kubectl exec -n "$NS" initiator -- qemu-io \
    --object "secret,id=chap,data=$CHAP_PASS" \
    --image-opts "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal=$portal,file.target=$IQN,file.lun=0,file.initiator-name=$INIT,file.user=$CHAP_USER,file.password-secret=chap" \
    "$@"
}

step "cluster"
# World-writable: the sva-node pods run as uid 65532 and the local PVs are these directories.
mkdir -p /tmp/sva-kind/worker1 /tmp/sva-kind/worker2 /tmp/sva-kind/worker3
chmod 0777 /tmp/sva-kind/worker1 /tmp/sva-kind/worker2 /tmp/sva-kind/worker3
kind create cluster --config kind/cluster.yaml --wait 120s

step "images"
docker build -q -f images/sva-node.Dockerfile -t sva-node:0.1.0 .
docker build -q -f images/operator.Dockerfile -t sva-operator:0.1.0 .
docker build -q -f images/initiator.Dockerfile -t sva-initiator:0.1.0 images
for img in sva-node:0.1.0 sva-operator:0.1.0 sva-initiator:0.1.0; do
  kind load docker-image "$img" --name "$CLUSTER"
done

step "chart + storage"
"$HELM" install sva charts/sva-operator --namespace sva-system --create-namespace --wait --timeout 180s
kubectl apply -f kind/local-storage.yaml

step "volume"
kubectl apply -f kind/chap-secret.yaml
kubectl apply -f kind/mirroredvolume.yaml
wait_phase Healthy 300
kubectl get mv "$VOL" -n "$NS" -o wide
IQN=$(mv_field '{.status.targetIqn}')
mapfile -t NODES < <(mv_field '{range .status.paths[*]}{.node}{"\n"}{end}')
[ "${#NODES[@]}" -eq 2 ] || fail "expected 2 paths, got ${NODES[*]}"
NODE_A=${NODES[0]}
NODE_B=${NODES[1]}
PORTAL_A=$(portal_of "$NODE_A")
PORTAL_B=$(portal_of "$NODE_B")
echo "path A: $NODE_A $PORTAL_A; path B: $NODE_B $PORTAL_B; target $IQN"

step "initiator pod"
kubectl run initiator -n "$NS" --image=sva-initiator:0.1.0 --image-pull-policy=Never --restart=Never
kubectl wait -n "$NS" --for=condition=Ready pod/initiator --timeout=120s
qio "$PORTAL_A" -c 'write -P 0x11 1M 64k'
qio "$PORTAL_B" -c 'read -P 0x11 1M 64k'
echo "ok: written through path A, read through path B"

step "node loss: stop $NODE_B"
docker stop "$NODE_B"
qio "$PORTAL_A" -c 'write -P 0x22 2M 64k'
qio "$PORTAL_A" -c 'read -P 0x22 2M 64k'
echo "ok: I/O continues through path A with $NODE_B down"
wait_phase Degraded 180
[ "$(kubectl get plex -n "$NS" -l sva.io/volume="$VOL" -o jsonpath="{.items[?(@.spec.node==\"$NODE_B\")].status.state}")" = Lost ] ||
  fail "plex on $NODE_B is not Lost"
kubectl get events -n "$NS" --field-selector reason=PlexLost | grep -q PlexLost || fail "no PlexLost event"

step "node back: start $NODE_B, resync"
docker start "$NODE_B"
wait_phase Healthy 600
qio "$PORTAL_B" -c 'read -P 0x22 2M 64k'
qio "$PORTAL_B" -c 'read -P 0x11 1M 64k'
echo "ok: data written while $NODE_B was down is readable through its path"
kubectl get mv,plex -n "$NS" -o wide

step "replacement: timeout 30s, stop $NODE_B again"
kubectl patch mv "$VOL" -n "$NS" --type merge -p '{"spec":{"replacementTimeoutSeconds":30}}'
docker stop "$NODE_B"
qio "$PORTAL_A" -c 'write -P 0x33 3M 64k'
deadline=$((SECONDS + 600))
until kubectl get plex -n "$NS" -l sva.io/volume="$VOL" -o jsonpath='{.items[*].spec.replaces}' | grep -q '[0-9]'; do
  [ "$SECONDS" -lt "$deadline" ] || fail "no replacement plex"
  kubectl get plex -n "$NS" -o wide --no-headers || true
  sleep 5
done
kubectl get events -n "$NS" --field-selector reason=ReplacingPlex | grep -q ReplacingPlex || fail "no ReplacingPlex event"
wait_phase Healthy 900
NODE_C=$(mv_field '{range .status.paths[*]}{.node}{"\n"}{end}' | grep -vx -e "$NODE_A" -e "$NODE_B" | head -n 1)
[ -n "$NODE_C" ] || fail "no path on a third node"
if kubectl get plex -n "$NS" -o jsonpath='{.items[*].spec.node}' | tr ' ' '\n' | grep -qx "$NODE_B"; then
  fail "the lost plex on $NODE_B was not removed"
fi
PORTAL_C=$(portal_of "$NODE_C")
for check in 'read -P 0x11 1M 64k' 'read -P 0x22 2M 64k' 'read -P 0x33 3M 64k'; do
  qio "$PORTAL_C" -c "$check"
done
echo "ok: replacement plex on $NODE_C holds every write (full resync)"
kubectl get mv,plex -n "$NS" -o wide

step "delete"
# Bring $NODE_B back first: a pod on a stopped node never finishes terminating, and its PVC
# (pvc-protection) would stay with it.
docker start "$NODE_B"
kubectl wait --for=condition=Ready "node/$NODE_B" --timeout=180s
kubectl delete mv "$VOL" -n "$NS" --wait --timeout=180s
deadline=$((SECONDS + 180))
until [ -z "$(kubectl get plex,pod,pvc -n "$NS" -l sva.io/volume="$VOL" -o name)" ]; do
  [ "$SECONDS" -lt "$deadline" ] || fail "left behind: $(kubectl get plex,pod,pvc -n "$NS" -l sva.io/volume="$VOL" -o name)"
  sleep 3
done
echo "ok: plexes, pods and PVCs of $VOL are gone"
echo "kind e2e PASSED"
