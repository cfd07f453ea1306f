#!/bin/sh
# SPDX-License-Identifier: GPL-2.0
# Guest test for the vfud_dma example driver, run by `vfud guest` after it loaded the module
# ($VFUD_MODULES names the module file). For each round it checks that vfud_dma is bound to
# the dma-engine, runs JOBS jobs of each kind (copy, fill, crc; the driver verifies every
# result, the CRC against the kernel's crc32) and compares the interrupt count in
# /proc/interrupts with the number of jobs. With INTx under TCG, QEMU unmasks the line at the
# handler's first BAR read, while the device still asserts it (the handler clears STATUS just
# after), so the line may fire once more: the driver finds STATUS clear and returns IRQ_NONE;
# those count as "spurious". Rounds: MSI-X as loaded, then rmmod + insmod with
# irq_mode=msi, irq_mode=intx, and plain insmod again. Finally the kernel log must be free of
# warnings. Prints `VFUD-TEST: key=value` lines; exits with the number of failures.
JOBS=${JOBS:-100}
RELOAD_JOBS=${RELOAD_JOBS:-10}
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }

# The PCI device vfud_dma is bound to.
bound_dev() {
  for d in /sys/bus/pci/drivers/vfud_dma/0000:*; do
    [ -e "$d/job" ] && { echo "$d"; return 0; }
  done
  return 1
}

# Total count of IRQ $1 over all CPUs.
irq_count() {
  awk -v k="$1:" '$1 == k { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; f = 1 }
                  END { print f ? s : 0 }' /proc/interrupts
}

# run_jobs DEV KIND N: N jobs of KIND with lengths from 1 byte to 64 KiB; prints failures.
run_jobs() {
  i=1 bad=0
  while [ "$i" -le "$3" ]; do
    len=$(( (i * 4099) % 65536 + 1 ))
    if ! echo "$2 $len $i" > "$1/job" 2>/dev/null; then
      bad=$((bad + 1))
      [ $bad -le 3 ] && echo "VFUD-TEST: $2 job $i (len $len) failed: $(dmesg | tail -n 1)"
    fi
    i=$((i + 1))
  done
  echo $bad
}

# round NAME N: bind check, N jobs of each kind, interrupt accounting.
round() {
  name=$1 n=$2
  dev=$(bound_dev) || { fail "$name: vfud_dma is bound to no device"; return; }
  set -- $(cat "$dev/irq_info")
  mode=$1 irq=$2
  before=$(irq_count "$irq")
  bad=0
  for kind in copy fill crc; do
    bad=$((bad + $(run_jobs "$dev" $kind "$n")))
  done
  delta=$(( $(irq_count "$irq") - before ))
  ok "${name}_device=${dev##*/} ${name}_mode=$mode ${name}_jobs=$((3 * n))" \
     "${name}_proc_irqs=$delta ${name}_bad=$bad"
  stats=$(cat "$dev/stats")
  ok "$(echo "$stats" | sed "s/\([a-z_]*\)=/${name}_\1=/g")"
  spurious=$(echo "$stats" | sed 's/.*spurious=\([0-9]*\).*/\1/')
  [ "$bad" = 0 ] || fail "$name: $bad jobs failed"
  # One interrupt per job, plus (INTx only) the spurious ones the driver declined.
  [ "$delta" = $((3 * n + spurious)) ] ||
    fail "$name: $delta interrupts for $((3 * n)) jobs and $spurious spurious"
}

# reload ARGS...: rmmod, check the device is unbound, insmod with ARGS.
reload() {
  rmmod vfud_dma || fail "rmmod vfud_dma"
  bound_dev >/dev/null && fail "still bound after rmmod"
  insmod "$VFUD_MODULES" "$@" || fail "insmod $VFUD_MODULES $*"
}

round first "$JOBS"
reload irq_mode=msi
round msi "$RELOAD_JOBS"
reload irq_mode=intx
round intx "$RELOAD_JOBS"
reload
round reload "$RELOAD_JOBS"

warnings=$(dmesg | grep -cE 'WARNING|BUG|Oops|Call Trace|nobody cared|vfud_dma.*(error|timed out)')
ok "kernel_warnings=$warnings"
[ "$warnings" = 0 ] || { fail "kernel warnings"; dmesg | tail -n 40; }
exit $fails
