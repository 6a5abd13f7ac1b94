#!/usr/bin/env bash
# Run every cargo-fuzz target of sva-node for SECONDS each (default 60); exit non-zero if
# any target crashes (panic, timeout, OOM). Prints per-target exec counts and a closing
# "fuzz: N passed, M failed" line.
#
#   sva-node/fuzz/run.sh [SECONDS]
#
# Works on stable rustc: cargo-fuzz passes -Z flags, which RUSTC_BOOTSTRAP=1 lets stable
# accept. The sanitizer is off by default (FUZZ_SANITIZER=address to turn ASan on): the
# fuzzed code has no `unsafe`, so ASan only costs throughput; overflow checks and debug
# assertions stay on. cargo-fuzz is installed into ~/.cargo/bin once, pinned.
# Corpora accumulate in sva-node/fuzz/corpus/<target> (gitignored), so reruns start
# from where the last run left off; crash inputs go to sva-node/fuzz/artifacts/<target>.
set -euo pipefail

secs="${1:-60}"
cargo_fuzz_version="0.13.2"
sanitizer="${FUZZ_SANITIZER:-none}"
# Per-input limits: a hang of more than 10 s or 2 GiB of memory is a failure.
timeout_s=10
rss_limit_mb=2048

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.." # sva-node: cargo fuzz looks for ./fuzz
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version"
    cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version"
fi

start=$(date +%s)
cargo fuzz build --sanitizer "$sanitizer"
echo "fuzz: build took $(($(date +%s) - start)) s"

passed=0
failed=0
logdir="$(mktemp -d)"
trap 'rm -rf "$logdir"' EXIT
for t in $(cargo fuzz list); do
    log="$logdir/$t.log"
    mkdir -p "fuzz/corpus/$t"
    t0=$(date +%s)
    if cargo fuzz run --sanitizer "$sanitizer" "$t" -- \
        -max_total_time="$secs" -timeout="$timeout_s" -rss_limit_mb="$rss_limit_mb" \
        -print_final_stats=1 >"$log" 2>&1; then
        rc=0
    else
        rc=$?
    fi
    runs=$(grep -o '^stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)
    cov=$(grep -o 'DONE *cov: [0-9]*' "$log" | grep -o '[0-9]*$' || true)
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "fuzz: $t ok: ${runs:-?} execs in $(($(date +%s) - t0)) s, coverage ${cov:-?}"
    else
        failed=$((failed + 1))
        echo "fuzz: $t FAILED (exit $rc) after ${runs:-?} execs; log tail:"
        tail -n 40 "$log"
        ls -1 "fuzz/artifacts/$t" 2>/dev/null | sed "s|^|  artifact: fuzz/artifacts/$t/|" || true
    fi
done

echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
