#!/usr/bin/env bash
# Build a gzip'd cpio (newc) initramfs for a test guest from the kit of provision-guest.sh.
# Usage: scripts/make-initramfs.sh OUT.cpio.gz TEST_SCRIPT [EXTRA_FILE...]
#   /test.sh        TEST_SCRIPT, run by busybox sh with output on the console
#   /extra/<name>   each EXTRA_FILE (files or directories)
#   /modules/*.ko   base modules (uio.ko, uio_pci_generic.ko) to insmod from the test
#   env VFUD_GUEST_MODULES="name ..."  (optional) also copies those kernel modules and their
#                   modules.dep dependencies into /modules and /init insmods them, in order,
#                   before /test.sh (soft deps are not followed: list them explicitly first).
#   env VFUD_GUEST_TOOLS=1  (optional) adds fio and mkfs.ext4 (scripts/provision-guest-tools.sh).
# The guest's /init mounts proc, sysfs, devtmpfs, devpts, runs /test.sh, prints
# "VFUD-GUEST-EXIT <status>" and powers off (poweroff -f).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

(($# >= 2)) || die "usage: $0 OUT.cpio.gz TEST_SCRIPT [EXTRA_FILE...]"
OUT=$1 TEST=$2; shift 2
[[ -f $GUEST_DIR/.vfud-provisioned ]] || die "guest kit missing: run scripts/provision-guest.sh"
[[ -f $TEST ]] || die "no test script $TEST"
need_pkgs cpio

S=$(mktemp -d); trap 'rm -rf "$S"' EXIT
cp -a "$GUEST_DIR/kit/." "$S/"
mkdir -p "$S"/{dev,proc,sys,tmp,run,sbin,usr/bin,usr/sbin,extra}
mknod -m 600 "$S/dev/console" c 5 1 2>/dev/null || true   # console for /init before devtmpfs
install -m 755 "$TEST" "$S/test.sh"
if [[ ${VFUD_GUEST_TOOLS:-} == 1 ]]; then
  [[ -f $VFUD_ENV/guest-tools/.vfud-provisioned ]] || die "guest tools missing: run scripts/provision-guest-tools.sh"
  cp -a "$VFUD_ENV/guest-tools/." "$S/"
  rm -f "$S/.vfud-provisioned"
fi
for f in "$@"; do cp -a "$f" "$S/extra/"; done

# Optional kernel modules with their dependencies, in load order (modules.dep lists a
# module's dependencies so that loading them in reverse order works).
: >"$S/modules/autoload"
for name in ${VFUD_GUEST_MODULES:-}; do
  paths=$(awk -v n="${name//-/_}" '{ m = $1; sub(/:$/, "", m); b = m; sub(/.*\//, "", b); sub(/\.ko$/, "", b);
            gsub(/-/, "_", b); if (b == n) { for (i = NF; i > 1; i--) print $i; print m; exit } }' \
          "$GUEST_DIR/modules/modules.dep")
  [[ -n $paths ]] || die "kernel module $name not found"
  for p in $paths; do
    b=$(basename "$p")
    grep -qxF "$b" "$S/modules/autoload" && continue
    cp "$GUEST_DIR/modules/$p" "$S/modules/$b"
    echo "$b" >>"$S/modules/autoload"
  done
done

cat >"$S/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
for m in $(cat /modules/autoload); do insmod "/modules/$m" || echo "VFUD-GUEST: insmod $m failed"; done
cd /
sh /test.sh
echo "VFUD-GUEST-EXIT $?"
sync
poweroff -f
INIT
chmod 755 "$S/init"

mkdir -p "$(dirname "$OUT")"
(cd "$S" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
log "wrote $OUT ($(du -h "$OUT" | cut -f1))"
