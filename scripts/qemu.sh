#!/usr/bin/env bash
# Run QEMU 11.1's qemu-system-x86_64 from the chroot made by scripts/provision-qemu.sh.
# Usage: [VFUD_BIND_DIRS=/abs/dir1:/abs/dir2] scripts/qemu.sh [QEMU ARGS...]
# In a private mount namespace (nothing leaks to the host; it vanishes with QEMU) it
# bind-mounts into the root, at the same paths: /dev (recursively, incl. /dev/pts), /proc,
# /sys, /tmp, every directory of VFUD_BIND_DIRS, and the current directory (so relative
# paths in QEMU ARGS work; skipped if it is /), then runs QEMU in that directory.
# Every step execs, so this script's pid becomes QEMU's: signals go straight to QEMU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ -f $QEMU_ROOT/.vfud-provisioned ]] ||
  die "QEMU root not provisioned ($QEMU_ROOT): run scripts/provision-qemu.sh first"

# shellcheck disable=SC2016  # the inner script expands its own arguments
exec unshare --mount --propagation private -- sh -euc '
  R=$1 BINDS=$2 CWD=$3; shift 3
  mount --rbind /dev "$R/dev"
  mount --rbind /proc "$R/proc"
  mount --rbind /sys "$R/sys"
  # /tmp first, so that binds below /tmp are not hidden by it.
  for d in /tmp $(printf %s "$BINDS" | tr ":" " ") "$CWD"; do
    case $d in
      /) continue ;;                                  # never over the root itself
      /*) ;;
      *) echo "qemu.sh: VFUD_BIND_DIRS entries must be absolute: $d" >&2; exit 1 ;;
    esac
    case $d/ in "$R"/*) continue ;; esac               # already inside the root
    [ -d "$d" ] || { echo "qemu.sh: no such directory: $d" >&2; exit 1; }
    mkdir -p "$R$d"
    mount --bind "$d" "$R$d"
  done
  exec chroot "$R" /bin/sh -c "cd \"\$0\" && exec qemu-system-x86_64 \"\$@\"" "$CWD" "$@"
' sh "$QEMU_ROOT" "${VFUD_BIND_DIRS:-}" "$PWD" "$@"
