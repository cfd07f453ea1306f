#!/usr/bin/env bash
# Run the tests that reach vfud's unsafe code and mmap handling under AddressSanitizer, and
# the pure parts of the protocol crate under Miri. Needs the nightly toolchain with
# `rust-src` and `miri` (`rustup toolchain install nightly --component rust-src,miri`).
#
#   scripts/sanitize.sh          # both
#   scripts/sanitize.sh asan     # AddressSanitizer only
#   scripts/sanitize.sh miri     # Miri only
#
# ASan: the whole dependency tree and std are rebuilt instrumented (-Zbuild-std) into
# target/asan, so a first run takes a while. What runs: the unit tests of the three library
# crates (codec fd passing, BAR memfd mappings, SIGBUS containment, guest memory, migration
# stream) and the integration tests that pass fds and map guest memory over real sockets.
# `handle_sigbus=0` leaves SIGBUS to vfud's own containment handler (server/src/dma/sigbus.rs),
# which the tests provoke on purpose; leaks are reported (detect_leaks=1).
#
# Miri cannot run code that makes the syscalls vfud's unsafe blocks wrap (sendmsg with
# SCM_RIGHTS, mmap of a memfd, sigaction), so it runs the protocol crate's decoders and
# message codecs; tests that need those syscalls are `#[cfg_attr(miri, ignore)]`.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
host=$(rustc -vV | sed -n 's/^host: //p')

asan() {
  RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address" \
    ASAN_OPTIONS="handle_sigbus=0:detect_leaks=1" \
    cargo +nightly test -Zbuild-std --target "$host" --target-dir target/asan \
    -p vfud-protocol -p vfud-server -p vfud-devices --lib
  RUSTFLAGS="-Zsanitizer=address" \
    ASAN_OPTIONS="handle_sigbus=0:detect_leaks=1" \
    cargo +nightly test -Zbuild-std --target "$host" --target-dir target/asan \
    -p vfud --test socket_dma --test hostile --test server_dma_engine --test migration \
    --test migration_stream --test handover --test isolation
}

miri() {
  cargo +nightly miri test -p vfud-protocol --lib
}

case $what in
  asan) asan ;;
  miri) miri ;;
  all) asan; miri ;;
  *) echo "usage: $0 [asan|miri|all]" >&2; exit 2 ;;
esac
