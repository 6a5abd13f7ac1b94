#!/usr/bin/env bash
# Runs every test: THE test command of the README (and of .ci/run).
#
# On a fresh Debian machine (as root) it first installs the real initiators and the reference
# target the integration tests use (DESIGN.md §10). Then: fmt check, clippy, release build of
# sva-node (the tests use it via SVA_NODE_BIN for speed), the whole workspace test suite
# (including the iscsi-test-cu conformance run), and tests/operator-checks.sh if present.
# Every step runs even if an earlier one failed; the script fails if any step failed and ends
# with a summary line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(libiscsi-bin tgt fio iproute2 nftables)
passed=0
failed=0
failed_steps=()

log() { printf '\n=== %s\n' "$*"; }

step() {
    local name=$1
    shift
    log "$name: $*"
    local start=$SECONDS
    if "$@"; then
        passed=$((passed + 1))
        echo "--- $name: ok ($((SECONDS - start))s)"
    else
        failed=$((failed + 1))
        failed_steps+=("$name")
        echo "--- $name: FAILED ($((SECONDS - start))s)"
    fi
}

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        apt-get update -q || return 1
        apt_updated=1
    fi
}

# QEMU's iscsi:// driver is a module in qemu-block-extra, which must match qemu-utils' version
# exactly. Some machines carry qemu-utils from backports (10.x) while qemu-block-extra exists only
# as the stable release (7.2): pin qemu-utils to qemu-block-extra's candidate version.
qemu_has_iscsi() {
    command -v qemu-io >/dev/null && command -v qemu-img >/dev/null || return 1
    # With the module loaded the error names the iSCSI driver; without it: "Unknown protocol".
    local out
    out=$(qemu-io -f raw -c quit iscsi://127.0.0.1:1/iqn.2000-01.invalid:probe/0 2>&1)
    grep -q 'iSCSI' <<<"$out"
}

install_qemu() {
    apt_update_once || return 1
    local version
    version=$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        echo "no installable qemu-block-extra" >&2
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --allow-downgrades \
        "qemu-utils=$version" "qemu-block-extra=$version"
}

install_deps() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "missing packages ${missing[*]} and cannot install them (need root + apt-get)" >&2
            return 1
        fi
        apt_update_once || return 1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" || return 1
    fi
    if ! qemu_has_iscsi; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            echo "qemu-io lacks the iscsi driver and cannot install it (need root + apt-get)" >&2
            return 1
        fi
        install_qemu || return 1
        qemu_has_iscsi || { echo "qemu-io still cannot open iscsi:// URLs" >&2; return 1; }
    fi
    for tool in iscsi-test-cu iscsi-inq iscsi-ls qemu-io qemu-img tgtd tgtadm fio; do
        command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null ||
            { echo "$tool not found after install" >&2; return 1; }
    done
}

target_dir=${CARGO_TARGET_DIR:-$PWD/target}
export PATH="$PATH:/usr/sbin:/sbin"
# Missing external tools fail tests instead of skipping them (the deps step installed them).
export SVA_REQUIRE_TOOLS=1
export SVA_NODE_BIN="$target_dir/release/sva-node"

step deps install_deps
step fmt cargo fmt --all -- --check
step clippy cargo clippy --workspace --all-targets -- -D warnings
step build-release cargo build --release -p sva-node
step test cargo test --workspace --no-fail-fast
# A short fuzz run of every cargo-fuzz target (PDU decode, login text, CDB parse, whole
# session, replication messages): SVA_FUZZ_SECONDS per target (default 10; 0 skips).
# Longer: sva-node/fuzz/run.sh 60.
if [ "${SVA_FUZZ_SECONDS:-10}" != 0 ]; then
    step fuzz bash sva-node/fuzz/run.sh "${SVA_FUZZ_SECONDS:-10}"
fi
if [ -x tests/operator-checks.sh ]; then
    step operator-checks tests/operator-checks.sh
elif [ -f tests/operator-checks.sh ]; then
    step operator-checks bash tests/operator-checks.sh
fi

echo
if [ "$failed" -gt 0 ]; then
    echo "failed steps: ${failed_steps[*]}"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
