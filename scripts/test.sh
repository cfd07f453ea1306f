#!/usr/bin/env bash
# Run every check and test of the project: formatting, lints, then all tests
# (unit, protocol, server over real sockets, and the QEMU/Linux-guest end-to-end tests,
# which provision QEMU 11.1 and the guest kit on first use; see scripts/provision.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# shellcheck source-path=SCRIPTDIR
source scripts/lib.sh
need_pkgs systemd   # systemd-socket-activate, for tests/activation.rs
cargo test --workspace --no-fail-fast
