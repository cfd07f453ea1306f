#!/usr/bin/env bash
# Build target/vfud-env/guest-tools/: what real storage users run, for guests that test block
# devices (nvme): fio and mkfs.ext4 (e2fsprogs) from the host's Debian (bookworm, like the guest
# kit's kernel), with every shared library ldd lists and the dynamic loader, laid out as an
# initramfs overlay:
#   opt/tools/bin/{fio,mke2fs}   the binaries        opt/tools/lib/   their libraries
#   lib64/ld-linux-x86-64.so.2   the loader          usr/bin/fio, usr/sbin/mkfs.ext4  wrappers
# make-initramfs.sh adds it when VFUD_GUEST_TOOLS=1 (it grows the image by ~35 MB and the boot by
# a few seconds under TCG, so other guests go without).
# Usage: scripts/provision-guest-tools.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TOOLS=$VFUD_ENV/guest-tools
STAMP=$TOOLS/.vfud-provisioned
if [[ -f $STAMP ]]; then
  log "guest tools already provisioned: $(cat "$STAMP")"
  exit 0
fi
need_pkgs fio e2fsprogs

TMP=$TOOLS.tmp
safe_rm "$TMP" "$TOOLS"
mkdir -p "$TMP/opt/tools/bin" "$TMP/opt/tools/lib" "$TMP/lib64" "$TMP/usr/bin" "$TMP/usr/sbin"
for b in /usr/bin/fio /usr/sbin/mke2fs; do
  cp "$b" "$TMP/opt/tools/bin/"
  ldd "$b" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | while read -r lib; do
    case $lib in
      */ld-linux-x86-64.so.2) cp -L "$lib" "$TMP/lib64/ld-linux-x86-64.so.2" ;;
      *) cp -L "$lib" "$TMP/opt/tools/lib/" ;;
    esac
  done
done
[[ -f $TMP/lib64/ld-linux-x86-64.so.2 ]] || cp -L /lib64/ld-linux-x86-64.so.2 "$TMP/lib64/"
cat >"$TMP/usr/bin/fio" <<'W'
#!/bin/sh
LD_LIBRARY_PATH=/opt/tools/lib exec /opt/tools/bin/fio "$@"
W
cat >"$TMP/usr/sbin/mkfs.ext4" <<'W'
#!/bin/sh
LD_LIBRARY_PATH=/opt/tools/lib exec /opt/tools/bin/mke2fs -t ext4 "$@"
W
chmod 755 "$TMP/usr/bin/fio" "$TMP/usr/sbin/mkfs.ext4"
echo "$(fio --version), mke2fs $(dpkg-query -W -f='${Version}' e2fsprogs)" >"$TMP/.vfud-provisioned"
mv -T "$TMP" "$TOOLS"
log "provisioned: $(cat "$STAMP")"
report "$TOOLS"
