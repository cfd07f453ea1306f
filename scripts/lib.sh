# shellcheck shell=bash
# Shared helpers for the vfud test-environment scripts. Source it; do not run it.
# Everything built lives under $VFUD_ENV = $REPO/target/vfud-env, so `cargo clean` removes it.

# shellcheck disable=SC2034  # variables used by the scripts that source this file
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VFUD_ENV=$REPO/target/vfud-env
QEMU_ROOT=$VFUD_ENV/qemu-root          # Debian trixie chroot holding QEMU 11.1
GUEST_DIR=$VFUD_ENV/guest              # guest kernel, modules and initramfs kit
_T0=$(date +%s.%N)

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the Debian mirror to provision from ($VFUD_DEBIAN_MIRROR, else the host's apt
# configuration: scripts/apt-mirror.sh); dies with that script's message if there is none.
debian_mirror() { "$REPO/scripts/apt-mirror.sh" || die "no Debian mirror (see above)"; }

# Install missing host packages; runs `apt-get update` only if something is missing.
need_pkgs() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing host packages: ${missing[*]}"
  apt-get update -qq || log "warning: apt-get update reported errors (continuing)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${missing[@]}" >/dev/null
}

# rm -rf a directory we built, refusing if anything is still mounted below it
# (a leftover bind mount of /dev would otherwise get its contents deleted).
safe_rm() {
  local d
  for d in "$@"; do
    [[ -e $d ]] || continue
    if awk -v p="$d" '$5 == p || index($5, p "/") == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
      die "something is mounted under $d; unmount it first (findmnt | grep $d)"
    fi
    rm -rf -- "$d"
  done
}

# Print elapsed time and the disk use of the given paths.
report() {
  log "elapsed $(awk -v a="$_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }')"
  du -sh "$@" 2>/dev/null | sed 's/^/  disk use: /' >&2 || true
}
