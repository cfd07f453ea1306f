#!/usr/bin/env bash
# vfud demo: a Linux guest in QEMU 11.1 talks through a serial port that lives in vfud, and the
# serial port moves to another vfud process twice while the guest keeps talking (live handover).
#
#   1. provision QEMU 11.1 and the Linux guest kit (scripts/provision.sh; first run only)
#   2. build vfud (cargo build --release)
#   3. build the guest's initramfs (scripts/make-initramfs.sh): its script writes a greeting to
#      the vfud UART, then a numbered line "count N" every ~0.2 s, then powers off
#   4. start vfud A: `vfud serve --device uart16550,backend=stdout --socket … --control A.ctl`;
#      what the guest writes to the UART comes out on A's standard output, shown as "vfud A | …"
#   5. boot the guest under TCG with that UART attached (vfio-user-pci); Linux's stock 8250_pci
#      driver binds it as ttyS4
#   6. while the guest counts, hand the UART over twice: start vfud B with
#      `vfud serve --device uart16550 --incoming B.ctl` and run
#      `vfud migrate --handover --from A.ctl --to B.ctl`: the device state, the bytes in flight,
#      QEMU's connection, DMA maps and interrupt eventfds move to B while QEMU stays attached;
#      A exits and the guest's lines continue as "vfud B | …". Then the same from B to C.
#      Each handover's report (rounds, bytes, switchover, the pause QEMU saw) is printed.
#   7. when the guest powered off: check that the greeting and count 1..N arrived complete and
#      in order across A's, B's and C's outputs; stop vfud C and remove the temporary files
#
# Exits 0 when all of that holds, non-zero with a message otherwise. Needs root (provisioning
# uses debootstrap, QEMU runs in a chroot) and cargo.
# Usage: scripts/demo.sh      env: VFUD_DEMO_TIMEOUT (seconds for the run, default 120),
#        VFUD_DEMO_COUNT (counter lines, default 40), VFUD_DEMO_KEEP=1 (keep the work directory)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GREETING="Hello from the guest through vfud's UART!"
COUNT=${VFUD_DEMO_COUNT:-40}    # counter lines, one every ~0.2 s
GAP=2                           # seconds of guest output before each handover
TIMEOUT=${VFUD_DEMO_TIMEOUT:-120}
VFUD=$REPO/target/release/vfud
WORK=""                         # temporary directory: sockets, logs, initramfs, outputs
QEMU_PID=""
declare -A VFUD_PID=()          # vfud process name (A, B, C) → pid
PAUSES=()                       # each handover's switchover and client pause, for the summary
DEADLINE=0                      # $SECONDS by which the run must be over

step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
fail() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  if [[ -n $WORK ]]; then
    local n
    for n in A B C; do show_log "vfud $n log" "$WORK/vfud.$n.log"; done
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
  local rc=$? n
  if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  for n in "${!VFUD_PID[@]}"; do
    if kill -0 "${VFUD_PID[$n]}" 2>/dev/null; then
      kill -TERM "${VFUD_PID[$n]}" 2>/dev/null || true
      wait "${VFUD_PID[$n]}" 2>/dev/null || true
    fi
  done
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
  if ! [[ $COUNT =~ ^[0-9]+$ ]] || ((COUNT < 20)); then
    fail "VFUD_DEMO_COUNT must be a number of at least 20 (the guest must outlast two handovers)"
  fi
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

# The guest's /test.sh (run by the initramfs /init, which then powers off). It keeps the tty
# open on fd 3 for the whole run, so the driver keeps the port set up between lines.
guest_script() {
  cat <<EOF
uart=
for d in /sys/bus/pci/devices/*; do
  if [ "\$(cat \$d/subsystem_vendor)" = 0x5646 ] && [ "\$(cat \$d/subsystem_device)" = 0x0002 ]; then uart=\$d; fi
done
[ -n "\$uart" ] || { echo "demo: no vfud UART (PCI subsystem 5646:0002) in the guest"; exit 1; }
tty=\$(ls "\$uart/tty" 2>/dev/null | head -n 1)
[ -n "\$tty" ] || { echo "demo: the serial driver did not bind \${uart##*/}"; exit 1; }
echo "demo: the vfud UART is PCI \${uart##*/}, bound by the '\$(basename "\$(readlink "\$uart/driver")")' driver as /dev/\$tty"
exec 3<>"/dev/\$tty"
stty -F "/dev/\$tty" 115200 raw -echo
echo "demo: writing the greeting to /dev/\$tty, then count 1..$COUNT, one line every 0.2 s"
sleep 1   # (only so that the host prints this line before vfud's output)
printf '%s\n' "$GREETING" >&3 || { echo "demo: writing the greeting failed"; exit 1; }
n=1
while [ \$n -le $COUNT ]; do
  usleep 200000
  echo "count \$n" >&3 || { echo "demo: writing count \$n failed"; exit 1; }
  n=\$((n + 1))
done
exec 3>&-   # the last close waits until the UART has sent everything
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

# prefix NAME: copy stdin to stdout line by line as "    vfud NAME | line"; a last line without
# newline (the process was handed over in the middle of a guest line) is marked as such.
prefix() {
  local line
  while IFS= read -r line; do
    printf '    vfud %s | %s\n' "$1" "$line"
  done
  [[ -z $line ]] || printf '    vfud %s | %s   (the line continues in the next process)\n' "$1" "$line"
}

# start_vfud NAME READY_PATH SERVE_ARGS...: run `vfud serve SERVE_ARGS...` as process NAME,
# its standard output (the UART's host side) shown with a "vfud NAME |" prefix and kept in
# $WORK/out.NAME, its log in $WORK/vfud.NAME.log; wait until READY_PATH exists.
start_vfud() {
  local name=$1 ready=$2 i pid
  shift 2
  NO_COLOR=1 "$VFUD" serve "$@" \
    > >(tee "$WORK/out.$name" | prefix "$name") 2>"$WORK/vfud.$name.log" &
  pid=$!
  VFUD_PID[$name]=$pid
  for ((i = 0; i < 100; i++)); do
    [[ -S $ready ]] && { info "vfud $name: pid $pid, log $WORK/vfud.$name.log"; return 0; }
    kill -0 "$pid" 2>/dev/null || fail "vfud $name exited at startup"
    sleep 0.1
  done
  fail "vfud $name did not create $ready"
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

# All the UART output so far, in process order.
uart_output() { cat "$WORK/out.A" "$WORK/out.B" "$WORK/out.C" 2>/dev/null || true; }

# The guest must still be running (a deadline and QEMU's exit end the demo early).
guest_alive() {
  ((SECONDS < DEADLINE)) || fail "the demo did not finish within ${TIMEOUT} s"
  kill -0 "$QEMU_PID" 2>/dev/null || fail "QEMU exited early (the guest should still be counting)"
}

# wait_greeting T0: until the greeting is in vfud A's output.
wait_greeting() {
  local t0=$1
  until grep -qF "$GREETING" "$WORK/out.A" 2>/dev/null; do
    show_guest_lines
    guest_alive
    sleep 0.2
  done
  info "(the greeting arrived $(elapsed "$t0") after QEMU started)"
}

# listen_for SECONDS: let the guest talk for a while.
listen_for() {
  local until=$((SECONDS + $1))
  while ((SECONDS < until)); do
    show_guest_lines
    guest_alive
    sleep 0.2
  done
}

# handover FROM TO: move the UART from process FROM to a new process TO while the guest talks.
handover() {
  local from=$1 to=$2 report rc=0 i pause switchover
  step "Live handover of the UART: vfud $from → vfud $to (QEMU stays attached, the guest keeps counting)"
  start_vfud "$to" "$WORK/$to.ctl" --device uart16550 --incoming "$WORK/$to.ctl"
  info "vfud migrate --handover --from $from.ctl --to $to.ctl"
  report=$("$VFUD" migrate --handover --from "$WORK/$from.ctl" --to "$WORK/$to.ctl" \
    2>"$WORK/migrate.$to.err") || rc=$?
  ((rc == 0)) || { show_log "vfud migrate" "$WORK/migrate.$to.err"; fail "handover $from → $to failed"; }
  info "report | $report"
  switchover=$(sed -n 's/.*switchover \([0-9.]* ms\).*/\1/p' <<<"$report")
  pause=$(sed -n 's/.*client pause \(.*\)$/\1/p' <<<"$report")
  PAUSES+=("$from→$to: switchover ${switchover:-?}, client pause ${pause:-n/a};")
  # The old process lets go and exits 0 once the new one runs the device.
  for ((i = 0; i < 50; i++)); do
    kill -0 "${VFUD_PID[$from]}" 2>/dev/null || break
    sleep 0.1
  done
  ! kill -0 "${VFUD_PID[$from]}" 2>/dev/null || fail "vfud $from still runs 5 s after the handover"
  rc=0
  wait "${VFUD_PID[$from]}" 2>/dev/null || rc=$?
  ((rc == 0)) || fail "vfud $from exited with status $rc after the handover"
  unset "VFUD_PID[$from]"
  info "vfud $from exited (status 0); the UART now lives in vfud $to (pid ${VFUD_PID[$to]})"
}

# wait_guest_exit: until QEMU exited after the guest powered off.
wait_guest_exit() {
  while kill -0 "$QEMU_PID" 2>/dev/null; do
    ((SECONDS < DEADLINE)) || fail "the guest did not power off within ${TIMEOUT} s"
    show_guest_lines
    sleep 0.2
  done
  wait "$QEMU_PID" 2>/dev/null || fail "QEMU failed"
  QEMU_PID=""
  sleep 0.2   # vfud may still be flushing the last bytes
  show_guest_lines
  grep -qa 'VFUD-GUEST-EXIT 0' "$WORK/console.log" || fail "the guest script failed"
}

# range NAME: the first and last complete counter lines vfud NAME printed.
range() {
  grep -a '^count [0-9]*$' "$WORK/out.$1" 2>/dev/null | sed -n '1s/count //p;$s/count //p' |
    paste -sd- || true
}

# check_stream: the greeting and count 1..COUNT, complete and in order, across A, B and C.
check_stream() {
  local n got
  { printf '%s\n' "$GREETING"; seq 1 "$COUNT" | sed 's/^/count /'; } >"$WORK/expected"
  uart_output >"$WORK/received"
  if ! cmp -s "$WORK/expected" "$WORK/received"; then
    printf -- '--- expected vs received UART output (diff)\n' >&2
    diff "$WORK/expected" "$WORK/received" | head -n 20 >&2 || true
    fail "the guest's lines did not arrive complete and in order across vfud A, B and C"
  fi
  for n in B C; do
    got=$(range "$n")
    [[ -n $got ]] || fail "vfud $n carried no counter line: the guest finished before the handover"
  done
  step "Success: the greeting and count 1..$COUNT arrived complete and in order"
  info "vfud A printed the greeting and count $(range A), vfud B count $(range B), vfud C count $(range C)"
  got="${PAUSES[*]}"
  info "handovers: ${got%;}"
}

main() {
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  check_host
  WORK=$(realpath "$(mktemp -d /tmp/vfud-demo.XXXXXX)")
  provision
  build_vfud
  make_guest
  DEADLINE=$((SECONDS + TIMEOUT))
  step "Starting vfud A: uart16550 on $WORK/uart.sock, host side = vfud's standard output"
  start_vfud A "$WORK/A.ctl" --device uart16550,backend=stdout \
    --socket "$WORK/uart.sock" --control "$WORK/A.ctl"
  local t0
  t0=$(date +%s.%N)
  start_guest "$WORK/uart.sock"
  wait_greeting "$t0"
  listen_for "$GAP"
  handover A B
  listen_for "$GAP"
  handover B C
  wait_guest_exit
  check_stream
}

main "$@"
