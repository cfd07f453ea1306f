#!/usr/bin/env bash
# Build the Linux guest kit in target/vfud-env/guest/ from Debian bookworm packages:
#   vmlinuz                 the kernel linux-image-amd64 depends on (linux-image-6.1.*-amd64)
#   vmlinux                 the same kernel uncompressed (ELF with a PVH entry note): QEMU boots it
#                           directly, skipping the XZ decompression that takes ~4 s under TCG
#                           (absent if vmlinuz is not XZ or lacks PVH; then boot vmlinuz)
#   kernel-version          its release string, e.g. 6.1.0-56-amd64
#   lib/modules/<ver>/      all its modules (+ modules.dep from depmod); NOT put in initramfs
#   modules -> lib/modules/<ver>   shortcut for tests picking modules
#   kit/                    base initramfs content: bin/busybox (static), modules/uio*.ko
# Initramfs images are then made with scripts/make-initramfs.sh.
# Built in guest.tmp and renamed when complete (stamp inside), so reruns are instant.
# Usage: scripts/provision-guest.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Extract DIR/vmlinux from DIR/vmlinuz (like the kernel's scripts/extract-vmlinux) if it is
# missing; kept only if it is an ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 18).
make_vmlinux() {
  local dir=$1 off
  [[ -f $dir/vmlinux || -f $dir/.no-vmlinux ]] && return 0
  need_pkgs xz-utils
  off=$(LC_ALL=C grep -obUaP -m1 '\xfd7zXZ\x00' "$dir/vmlinuz" | head -1 | cut -d: -f1) || true
  if [[ -n $off ]]; then
    tail -c +$((off + 1)) "$dir/vmlinuz" | xz -dc >"$dir/vmlinux.tmp" 2>/dev/null || true  # trailing data
  fi
  if [[ -s $dir/vmlinux.tmp && $(head -c 4 "$dir/vmlinux.tmp") == $'\x7fELF' ]] &&
     LC_ALL=C grep -qUaP '\x04\x00\x00\x00\x08\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$dir/vmlinux.tmp"; then
    mv "$dir/vmlinux.tmp" "$dir/vmlinux"
    log "extracted vmlinux (PVH boot)"
  else
    rm -f "$dir/vmlinux.tmp"
    touch "$dir/.no-vmlinux"
    log "no PVH-bootable vmlinux in vmlinuz; guests boot vmlinuz"
  fi
}

STAMP=$GUEST_DIR/.vfud-provisioned
if [[ -f $STAMP ]]; then
  make_vmlinux "$GUEST_DIR"   # kits provisioned before vmlinux existed
  log "guest kit already provisioned: $(cat "$STAMP")"
  exit 0
fi

need_pkgs kmod cpio   # depmod (modules.dep); cpio for make-initramfs.sh
kernel_pkg() {  # the linux-image-6.1.*-amd64 package that bookworm's linux-image-amd64 depends on
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\..*-amd64$/ { print $2; exit }'
}
# Use the host's apt lists; refresh them only if they lack the package.
KPKG=$(kernel_pkg)
[[ -n $KPKG ]] || { apt-get update -qq || true; KPKG=$(kernel_pkg); }
[[ -n $KPKG ]] || die "cannot find the kernel package linux-image-amd64 depends on"

TMP=$GUEST_DIR.tmp
safe_rm "$TMP" "$GUEST_DIR"   # partial leftovers of an interrupted run
mkdir -p "$TMP/dl" "$TMP/x" "$TMP/kit/bin" "$TMP/kit/modules"
chmod 777 "$TMP/dl"  # let apt's _apt user write there (avoids the "unsandboxed" warning)

log "apt-get download $KPKG busybox-static"
download() { (cd "$TMP/dl" && apt-get download -qq "$KPKG" busybox-static); }
download || { log "download failed; refreshing stale apt lists and retrying"
              apt-get update -qq || true; KPKG=$(kernel_pkg); download; }
for deb in "$TMP"/dl/*.deb; do dpkg -x "$deb" "$TMP/x"; done

KVER=${KPKG#linux-image-}
cp "$TMP/x/boot/vmlinuz-$KVER" "$TMP/vmlinuz"
echo "$KVER" >"$TMP/kernel-version"
mkdir -p "$TMP/lib/modules"
mv "$TMP/x/lib/modules/$KVER" "$TMP/lib/modules/$KVER"
ln -s "lib/modules/$KVER" "$TMP/modules"
depmod -b "$TMP" "$KVER"
cp "$TMP/x/bin/busybox" "$TMP/kit/bin/busybox"

# Base module set present in every initramfs under /modules (the test insmods what it needs).
for m in drivers/uio/uio.ko drivers/uio/uio_pci_generic.ko; do
  [[ -f $TMP/modules/kernel/$m ]] && cp "$TMP/modules/kernel/$m" "$TMP/kit/modules/"
done

rm -rf "$TMP/dl" "$TMP/x"
make_vmlinux "$TMP"
echo "kernel $KVER, busybox $("$TMP/kit/bin/busybox" | head -1 | awk '{print $2}')" >"$TMP/.vfud-provisioned"
mv -T "$TMP" "$GUEST_DIR"
log "provisioned: $(cat "$STAMP")"
report "$GUEST_DIR"
