#!/usr/bin/env bash
# CPU per mirrored write, per node: runs `sva-node demo` (2 plexes, write-back) once with the
# link's op polling at its default and once with `mirror.opSpinMicros: 0`, puts WRITES QD1
# 4 KiB writes through path 1 with `qemu-img bench`, and reports each node's CPU time per
# write (`perf stat -e task-clock`) and the wall time per write (README, "Mirrored writes").
# Needs perf (linux-perf) and qemu-img with iSCSI (qemu-block-extra); run as root.
#   tests/cpu-per-write.sh [WRITES]       (default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
WRITES=${1:-20000}
for tool in perf qemu-img; do
  command -v "$tool" >/dev/null || { echo "cpu-per-write: $tool not found" >&2; exit 2; }
done
cargo build --release -q -p sva-node
BIN=$PWD/target/release/sva-node
WORK=$(mktemp -d)
trap 'pkill -INT -f "sva-node demo --dir $WORK" || true; sleep 1; rm -rf "$WORK"' EXIT

# Start the demo in $1 and wait until it serves (it prints the Ctrl-C line then).
start_demo() {
  "$BIN" demo --dir "$1" --cache-mode writeBack >"$1.log" 2>&1 &
  DEMO=$!
  for _ in $(seq 240); do
    grep -q "Ctrl-C" "$1.log" && return 0
    kill -0 "$DEMO" 2>/dev/null || break
    sleep 0.5
  done
  echo "cpu-per-write: the demo did not come up:" >&2
  cat "$1.log" >&2
  exit 1
}

stop_demo() {
  kill -INT "$DEMO"
  wait "$DEMO" || true
}

measure() { # DIR LABEL
  local dir=$1 label=$2 url p1 p2 t0 t1
  url=$(grep -o 'iscsi://[^ ]*' "$dir.log" | head -1)
  p1=$(pgrep -f "serve --config $dir/node-1.yaml" | head -1)
  p2=$(pgrep -f "serve --config $dir/node-2.yaml" | head -1)
  perf stat -e task-clock -x, -o "$dir.p1" -p "$p1" &
  local s1=$!
  perf stat -e task-clock -x, -o "$dir.p2" -p "$p2" &
  local s2=$!
  sleep 0.5
  t0=$(date +%s%N)
  qemu-img bench -f raw -w -c "$WRITES" -d 1 -s 4k "$url" >"$dir.bench" 2>&1
  t1=$(date +%s%N)
  kill -INT "$s1" "$s2"
  wait "$s1" "$s2" || true
  local c1 c2
  c1=$(grep task-clock "$dir.p1" | cut -d, -f1)
  c2=$(grep task-clock "$dir.p2" | cut -d, -f1)
  # task-clock is in ms; the counting window also holds about 0.5 s of idle before the load.
  awk -v n="$WRITES" -v t=$((t1 - t0)) -v c1="$c1" -v c2="$c2" -v l="$label" 'BEGIN {
    printf "%-22s %7.1f us/write wall; CPU per write: origin %6.1f us, peer %6.1f us\n",
      l, t / n / 1000, c1 * 1000 / n, c2 * 1000 / n }'
}

start_demo "$WORK/poll"
measure "$WORK/poll" "opSpinMicros default"
stop_demo

# The same volume directory restarts from its node configs; set the op poll off in them.
start_demo "$WORK/nopoll"
stop_demo
sed -i 's/^mirror:$/mirror:\n  opSpinMicros: 0/' "$WORK"/nopoll/node-*.yaml
start_demo "$WORK/nopoll"
measure "$WORK/nopoll" "opSpinMicros: 0"
stop_demo
