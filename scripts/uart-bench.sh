#!/usr/bin/env bash
# Guest benchmark of vfud's uart16550 against QEMU's own pci-serial: one Linux guest under
# QEMU 11.1 (TCG) with both attached, each tty set to 115200 baud, the same pattern streamed
# guest → host and host → guest through each, every byte checked. Prints a Markdown table of
# bytes/s, the vfud/QEMU ratio and vfio-user messages per byte (from QEMU's trace); the goals
# (≥ 0.25 × pci-serial each way, never below the line rate) are reported, not enforced.
#
# Usage: scripts/uart-bench.sh [--bytes N] [--bar mem|io] [--no-trace]
# Needs what the QEMU tests need: root (QEMU runs in the provisioned chroot) and cargo; the
# first run provisions target/vfud-env (scripts/provision.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root: QEMU runs in a chroot"
command -v cargo >/dev/null || die "cargo not found"
cd "$REPO"
exec cargo bench --quiet --bench uart_guest -- "$@"
