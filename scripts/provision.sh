#!/usr/bin/env bash
# Provision the whole vfud test environment under target/vfud-env/:
# QEMU 11.1 chroot (provision-qemu.sh), Linux guest kit (provision-guest.sh) and the guest's
# storage tools (provision-guest-tools.sh: fio, mkfs.ext4).
# Idempotent; a rerun on a provisioned tree takes about a second.
# Usage: scripts/provision.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$REPO/scripts/provision-qemu.sh"
"$REPO/scripts/provision-guest.sh"
"$REPO/scripts/provision-guest-tools.sh"
report "$VFUD_ENV"
