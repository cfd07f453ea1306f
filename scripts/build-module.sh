#!/usr/bin/env bash
# Build an out-of-tree Linux kernel module for the guest kit's kernel.
# Usage: scripts/build-module.sh SRC_DIR OUT_DIR
#   SRC_DIR  module source with a Kbuild file or a kbuild-style Makefile (obj-m := ...)
#   OUT_DIR  receives the built *.ko files; their paths are printed on stdout, one a line
# The headers are Debian's linux-headers-<kit kernel version> (the same package version as the
# kit's linux-image), installed on the host with apt-get on first use and kept by dpkg, so later
# builds take a couple of seconds. SRC_DIR is copied to a scratch directory first and built
# there, so the source tree stays free of build products.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# == 2)) || die "usage: $0 SRC_DIR OUT_DIR"
SRC=$1 OUT=$2
[[ -d $SRC ]] || die "no module source directory $SRC"
[[ -f $SRC/Kbuild || -f $SRC/Makefile ]] || die "$SRC has neither a Kbuild file nor a Makefile"
[[ -f $GUEST_DIR/kernel-version ]] || die "guest kit missing: run scripts/provision-guest.sh"
KVER=$(cat "$GUEST_DIR/kernel-version")
KDIR=/lib/modules/$KVER/build

if [[ ! -f $KDIR/Makefile ]]; then
  [[ $(id -u) == 0 ]] || die "linux-headers-$KVER is not installed and installing it needs root"
  need_pkgs make "linux-headers-$KVER" ||
    die "cannot install linux-headers-$KVER; if Debian moved to a newer kernel, re-provision the" \
        "guest kit (rm -rf $GUEST_DIR; scripts/provision-guest.sh)"
fi

B=$(mktemp -d); trap 'rm -rf "$B"' EXIT
cp -a "$SRC/." "$B/"
# Only the module's own lines reach the console on success; the full log on failure.
if ! make -C "$KDIR" M="$B" modules >"$B/.build.log" 2>&1; then
  cat "$B/.build.log" >&2
  die "module build failed in $SRC (kernel $KVER)"
fi
grep -E '(warning|error):' "$B/.build.log" >&2 || true
mkdir -p "$OUT"
found=0
while IFS= read -r -d '' ko; do
  cp "$ko" "$OUT/"
  echo "$OUT/$(basename "$ko")"
  found=1
done < <(find "$B" -name '*.ko' -print0)
((found)) || die "the build in $SRC produced no .ko file"
log "built $(cd "$OUT" && ls -- *.ko | tr '\n' ' ')for kernel $KVER"
