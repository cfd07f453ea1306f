#!/usr/bin/env bash
# vfud demo: a Linux guest in QEMU 11.1 types a greeting on a serial port that lives in vfud.
#
#   1. provision QEMU 11.1 and the Linux guest kit (scripts/provision.sh; first run only)
#   2. build vfud (cargo build --release)
#   3. build the guest's initramfs (scripts/make-initramfs.sh)
#   4. start `vfud serve --device uart16550,backend=stdout`: what the guest writes to the UART
#      comes out on vfud's standard output, shown here as "vfud UART | ..."
#   5. boot the guest under TCG with that UART attached (vfio-user-pci); Linux's stock 8250_pci
#      driver binds it as ttyS4 and the guest writes the greeting to /dev/ttyS4, then powers off
#   6. check that the greeting arrived, stop vfud and remove the temporary files
#
# Exits 0 when the greeting arrived and the guest powered off cleanly, non-zero with a message
# otherwise. Needs root (provisioning uses debootstrap, QEMU runs in a chroot) and cargo.
# Usage: scripts/demo.sh      env: VFUD_DEMO_TIMEOUT (seconds, default 120), VFUD_DEMO_KEEP=1
#        (keep the work directory with logs)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GREETING="Hello from the guest through vfud's UART!"
TIMEOUT=${VFUD_DEMO_TIMEOUT:-120}
VFUD=$REPO/target/release/vfud
WORK=""          # temporary directory: sockets, logs, initramfs
VFUD_PID=""
QEMU_PID=""

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
fail() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  if [[ -n $WORK ]]; then
    show_log "vfud log" "$WORK/vfud.log"
    show_log "guest console" "$WORK/console.log"
    show_log "QEMU stderr" "$WORK/qemu.stderr"
  fi
  exit 1
}
show_log() {
  [[ -s $2 ]] || return 0
  printf -- '--- %s (last 25 lines of %s)\n' "$1" "$2" >&2
  tail -n 25 "$2" | tr -d '\r' >&2
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }'; }

cleanup() {
  local rc=$?
  if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  if [[ -n $VFUD_PID ]] && kill -0 "$VFUD_PID" 2>/dev/null; then
    kill -TERM "$VFUD_PID" 2>/dev/null || true
    wait "$VFUD_PID" 2>/dev/null || true
  fi
  if [[ -n $WORK ]]; then
    if [[ ${VFUD_DEMO_KEEP:-0} == 1 ]]; then
      printf 'work directory kept: %s\n' "$WORK" >&2
    else
      rm -rf -- "$WORK"
    fi
  fi
  exit "$rc"
}

check_host() {
  [[ $(id -u) == 0 ]] || fail "run as root: provisioning uses debootstrap and QEMU runs in a chroot"
  command -v cargo >/dev/null || fail "cargo not found: install a Rust toolchain (https://rustup.rs)"
}

provision() {
  step "Provisioning QEMU 11.1 and the Linux guest kit into target/vfud-env"
  if [[ -f $QEMU_ROOT/.vfud-provisioned && -f $GUEST_DIR/.vfud-provisioned ]]; then
    "$REPO/scripts/provision.sh" >"$WORK/provision.log" 2>&1 ||
      { show_log "provisioning" "$WORK/provision.log"; fail "scripts/provision.sh failed"; }
  else
    info "first run: debootstrap + apt, a few minutes"
    "$REPO/scripts/provision.sh" 2>&1 | sed -u 's/^/    /' || fail "scripts/provision.sh failed"
  fi
  info "$(cat "$QEMU_ROOT/.vfud-provisioned"); guest $(cat "$GUEST_DIR/.vfud-provisioned")"
}

build_vfud() {
  step "Building vfud (cargo build --release; a minute or two the first time)"
  (cd "$REPO" && cargo build --release --quiet) || fail "cargo build failed"
  info "$VFUD"
}

# The guest's /test.sh (run by the initramfs /init, which then powers off).
guest_script() {
  cat <<EOF
uart=
for d in /sys/bus/pci/devices/*; do
  if [ "\$(cat \$d/vendor)" = 0x5646 ] && [ "\$(cat \$d/device)" = 0x0002 ]; then uart=\$d; fi
done
[ -n "\$uart" ] || { echo "demo: no vfud UART (PCI 5646:0002) in the guest"; exit 1; }
tty=\$(ls "\$uart/tty" 2>/dev/null | head -n 1)
[ -n "\$tty" ] || { echo "demo: the serial driver did not bind \${uart##*/}"; exit 1; }
echo "demo: the vfud UART is PCI \${uart##*/}, bound by the '\$(basename "\$(readlink "\$uart/driver")")' driver as /dev/\$tty"
stty -F "/dev/\$tty" 115200 raw -echo
echo "demo: writing the greeting to /dev/\$tty"
sleep 1   # (only so that the host prints this line before vfud's output)
printf '%s\n' "$GREETING" > "/dev/\$tty" || exit 1
echo "demo: done, powering off"
EOF
}

make_guest() {
  step "Building the guest initramfs (busybox + a script that writes to the vfud UART)"
  guest_script >"$WORK/guest.sh"
  "$REPO/scripts/make-initramfs.sh" "$WORK/initramfs.cpio.gz" "$WORK/guest.sh" \
    >"$WORK/initramfs.log" 2>&1 ||
    { show_log "make-initramfs" "$WORK/initramfs.log"; fail "scripts/make-initramfs.sh failed"; }
}

# start_vfud SOCKET: serve a uart16550 on SOCKET; its host side is vfud's stdout, shown here
# and kept in $WORK/uart.out.
start_vfud() {
  local sock=$1 i
  step "Starting vfud: uart16550 on $sock, host side = vfud's standard output"
  NO_COLOR=1 "$VFUD" serve --device uart16550,backend=stdout --socket "$sock" \
    > >(tee "$WORK/uart.out" | sed -u 's/^/    vfud UART | /') 2>"$WORK/vfud.log" &
  VFUD_PID=$!
  for ((i = 0; i < 100; i++)); do
    [[ -S $sock ]] && { info "vfud pid $VFUD_PID, log $WORK/vfud.log"; return 0; }
    kill -0 "$VFUD_PID" 2>/dev/null || fail "vfud exited at startup"
    sleep 0.1
  done
  fail "vfud did not create $sock"
}

# start_guest SOCKET: boot the guest in QEMU 11.1 (TCG, shared memfd RAM) with the
# vfio-user-pci device on SOCKET; QMP on $WORK/qmp.sock, console in $WORK/console.log.
start_guest() {
  # Real paths: QEMU runs in a chroot where only the bound directories exist.
  local sock=$1 guest kernel
  guest=$(realpath "$GUEST_DIR")
  kernel=$guest/vmlinux
  [[ -f $kernel ]] || kernel=$guest/vmlinuz
  step "Booting Linux in QEMU 11.1 (TCG) with the vfud UART attached"
  VFUD_BIND_DIRS="$WORK:$guest" "$REPO/scripts/qemu.sh" \
    -accel tcg -nodefaults -no-reboot -display none \
    -object memory-backend-memfd,id=mem,size=256M,share=on \
    -machine q35,memory-backend=mem -m 256M \
    -serial "file:$WORK/console.log" \
    -qmp "unix:$WORK/qmp.sock,server=on,wait=off" \
    -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$sock\",\"type\":\"unix\"}}" \
    -kernel "$kernel" -initrd "$WORK/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 8250.nr_uarts=8" \
    </dev/null >"$WORK/qemu.stdout" 2>"$WORK/qemu.stderr" &
  QEMU_PID=$!
  info "QEMU pid $QEMU_PID, guest console $WORK/console.log"
}

# Print the guest's "demo:" console lines not printed yet.
GUEST_LINES=0
show_guest_lines() {
  local lines
  lines=$(grep -a '^demo: ' "$WORK/console.log" 2>/dev/null | tr -d '\r' || true)
  [[ -n $lines ]] || return 0
  tail -n +$((GUEST_LINES + 1)) <<<"$lines" | sed 's/^demo: /    guest | /'
  GUEST_LINES=$(wc -l <<<"$lines")
}

# wait_greeting T0: until the greeting is in vfud's output and QEMU has exited.
wait_greeting() {
  local t0=$1 deadline=$((SECONDS + TIMEOUT)) got=""
  while ((SECONDS < deadline)); do
    show_guest_lines
    if [[ -z $got ]] && grep -qF "$GREETING" "$WORK/uart.out" 2>/dev/null; then
      got=$(elapsed "$t0")
    fi
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then
      wait "$QEMU_PID" 2>/dev/null || fail "QEMU failed"
      QEMU_PID=""
      sleep 0.2   # vfud may still be flushing the last bytes
      show_guest_lines
      grep -qF "$GREETING" "$WORK/uart.out" 2>/dev/null ||
        fail "the guest powered off but the greeting never reached vfud"
      grep -qa 'VFUD-GUEST-EXIT 0' "$WORK/console.log" || fail "the guest script failed"
      step "Success: vfud received the guest's greeting ${got:+after $got} and the guest powered off"
      return 0
    fi
    sleep 0.2
  done
  fail "no greeting from the guest within ${TIMEOUT} s"
}

main() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  check_host
  WORK=$(realpath "$(mktemp -d /tmp/vfud-demo.XXXXXX)")
  provision
  build_vfud
  make_guest
  start_vfud "$WORK/uart.sock"
  local t0
  t0=$(date +%s.%N)
  start_guest "$WORK/uart.sock"
  wait_greeting "$t0"
}

main "$@"
