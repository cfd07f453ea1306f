#!/usr/bin/env bash
# Provision QEMU 11.1 (with the vfio-user-pci client) in a Debian trixie chroot:
#   target/vfud-env/qemu-root/   (run it with scripts/qemu.sh)
# Bookworm's QEMU 7.2 has no vfio-user-pci and trixie-backports' QEMU needs glibc >= 2.38,
# hence the chroot. The root is built in qemu-root.tmp and renamed when complete, with a
# stamp inside, so an interrupted run is redone from scratch and a rerun is instant.
# Usage: scripts/provision-qemu.sh
# The mirror is the one the host's apt uses for Debian; env VFUD_DEBIAN_MIRROR overrides it
# (scripts/apt-mirror.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

STAMP=$QEMU_ROOT/.vfud-provisioned
if [[ -f $STAMP ]]; then
  log "QEMU root already provisioned: $(cat "$STAMP")"
  exit 0
fi

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap/chroot)"
need_pkgs debootstrap
MIRROR=$(debian_mirror)
TMP=$QEMU_ROOT.tmp
safe_rm "$TMP" "$QEMU_ROOT"          # partial leftovers of an interrupted run
mkdir -p "$VFUD_ENV"

# debootstrap mounts /proc etc. in the target itself; a private mount namespace guarantees
# that nothing stays mounted if it is interrupted.
log "debootstrap --variant=minbase trixie -> $TMP"
unshare --mount --propagation private -- \
  debootstrap --variant=minbase trixie "$TMP" "$MIRROR" >"$VFUD_ENV/debootstrap.log" 2>&1 \
  || { tail -20 "$VFUD_ENV/debootstrap.log" >&2; die "debootstrap failed (log: $VFUD_ENV/debootstrap.log)"; }

echo "deb $MIRROR trixie-backports main" >"$TMP/etc/apt/sources.list.d/trixie-backports.list"
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"   # never start services in the root
chmod +x "$TMP/usr/sbin/policy-rc.d"

log "installing qemu-system-x86 from trixie-backports inside the root"
# shellcheck disable=SC2016  # the inner script expands its own arguments
unshare --mount --propagation private -- sh -euc '
  R=$1
  mount -t proc proc "$R/proc"
  mount --rbind /dev "$R/dev"
  mount --rbind /sys "$R/sys"
  chroot "$R" env DEBIAN_FRONTEND=noninteractive sh -euc "
    apt-get update -qq
    apt-get install -y -qq -t trixie-backports --no-install-recommends qemu-system-x86 >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    qemu-system-x86_64 --version | head -1 > /.vfud-provisioned"
' sh "$TMP"

mv -T "$TMP" "$QEMU_ROOT"                # atomic: the stamp appears together with the root
log "provisioned: $(cat "$STAMP")"
report "$QEMU_ROOT"
