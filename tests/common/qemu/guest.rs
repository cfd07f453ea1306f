//! Guest scripts: shell preludes for the busybox initramfs and the result lines they print.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::process::Qemu;

/// Deadline for a Linux guest to print `VFUD-GUEST-EXIT` (TCG boot + test ≈ 5–10 s).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of result lines printed by guest test scripts (see [`guest_values`]).
pub const GUEST_RESULT_PREFIX: &str = "VFUD-TEST:";

/// Guest shell prelude for the dma-engine: `$dev` (sysfs directory of 5646:0001,
/// after enabling memory decoding and bus mastering), `$bar0`/`$bar2`
/// (physical addresses), `rd OFF`/`wr OFF VAL` (BAR0 registers), `rd2 OFF`/`wr2 OFF VAL`
/// (BAR2 words), `run_op` (doorbell and wait while BUSY), `ok`/`fail` (result lines).
pub const DMA_ENGINE_GUEST_LIB: &str = r#"
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }
dev=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x5646 ] && [ "$(cat "$d/device")" = 0x0001 ]; then dev=$d; fi
done
if [ -z "$dev" ]; then
  fail "no 5646:0001 device"
  for d in /sys/bus/pci/devices/*; do echo "$d $(cat "$d/vendor") $(cat "$d/device")"; done
  exit 1
fi
ok "dev=${dev##*/} class=$(cat "$dev/class") irq=$(cat "$dev/irq")"
i=0
while read -r start end flags && [ $i -le 6 ]; do
  ok "resource$i=$start,$end,$flags"
  i=$((i + 1))
done < "$dev/resource"
cmdreg() { printf '0x%04x' "0x$(od -An -tx2 -j4 -N2 "$dev/config" | tr -d ' ')"; }
ok "command_before=$(cmdreg)"
# Memory decoding (bit 1) and bus mastering (bit 2); only the low byte is written.
printf '\006' | dd of="$dev/config" bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
ok "command=$(cmdreg)"
bar0=$(awk 'NR == 1 { print $1 }' "$dev/resource")
bar2=$(awk 'NR == 3 { print $1 }' "$dev/resource")
rd() { printf '0x%08x' "$(devmem $((bar0 + $1)) 32)"; }
wr() { devmem $((bar0 + $1)) 32 "$2"; }
rd2() { printf '0x%08x' "$(devmem $((bar2 + $1)) 32)"; }
wr2() { devmem $((bar2 + $1)) 32 "$2"; }
run_op() {
  wr 0x2c 1
  n=0
  while [ $(( $(rd 0x0c) & 4 )) -ne 0 ]; do
    n=$((n + 1))
    if [ $n -gt 5000 ]; then fail "still BUSY: STATUS=$(rd 0x0c) CONTROL=$(rd 0x08)"; return 1; fi
  done
}
"#;

/// Kernel command-line argument for guests with a vfud `uart16550`: the 8250 driver then has
/// slots past the four legacy ports (ttyS0 is QEMU's ISA console UART, ttyS1–3 stay
/// placeholders), so the first PCI UART becomes ttyS4.
pub const UART_KERNEL_ARG: &str = "8250.nr_uarts=8";

/// Guest shell prelude for PCI enumeration and interrupts:
/// - `ok TEXT` / `fail TEXT`: result lines (`VFUD-TEST: …`; `fail` counts into `$fails`);
/// - `find_pci VENDOR DEVICE`: prints the sysfs directory of the first match (`0x5646` form);
/// - `report_pci NAME DIR`: result values `NAME_slot`, `NAME_vendor`, `NAME_device`,
///   `NAME_subsystem` (`vendor:device`), `NAME_class`, `NAME_irq`, `NAME_pin` (config 0x3d),
///   `NAME_driver` and `NAME_tty` (`none` when absent) and `NAME_res0`…`NAME_res6` (the first
///   seven lines of sysfs `resource` as `start,end,flags`; see [`SysfsResource`]);
/// - `irq_count IRQ`: the total count of IRQ over all CPUs in `/proc/interrupts`, or `none`
///   when the IRQ has no handler (e.g. the serial driver frees it while the tty is closed);
/// - `irq_line IRQ`: that line of `/proc/interrupts`;
/// - `open_uart`: find vfud's `uart16550`, report it as `uart_*`, hold its tty open on fd 3
///   in raw 8-bit mode; sets `$uart` (sysfs directory) and `$tty`; fails when there is none.
pub const PCI_GUEST_LIB: &str = r##"
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }
find_pci() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then echo "$d"; return 0; fi
  done
  return 1
}
# The function whose subsystem ids are $1 $2 (vfud's UART is 5646:0002 in both BAR modes).
find_pci_sub() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/subsystem_vendor")" = "$1" ] && [ "$(cat "$d/subsystem_device")" = "$2" ]; then
      echo "$d"; return 0
    fi
  done
  return 1
}
report_pci() {
  n=$1 d=$2
  drv=none; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
  tty=none; [ -d "$d/tty" ] && tty=$(ls "$d/tty" | head -n 1)
  pin=$(od -An -tu1 -j61 -N1 "$d/config" | tr -d ' ')
  ok "${n}_slot=${d##*/} ${n}_vendor=$(cat "$d/vendor") ${n}_device=$(cat "$d/device")" \
     "${n}_subsystem=$(cat "$d/subsystem_vendor"):$(cat "$d/subsystem_device")" \
     "${n}_class=$(cat "$d/class") ${n}_irq=$(cat "$d/irq") ${n}_pin=$pin" \
     "${n}_driver=$drv ${n}_tty=$tty"
  i=0
  while read -r start end flags && [ $i -le 6 ]; do
    ok "${n}_res$i=$start,$end,$flags"
    i=$((i + 1))
  done < "$d/resource"
}
irq_count() {
  awk -v k="$1:" '$1 == k { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s; f = 1 }
                  END { if (!f) print "none" }' /proc/interrupts
}
irq_line() { grep "^ *$1:" /proc/interrupts; }
open_uart() {
  uart=$(find_pci_sub 0x5646 0x0002) || { fail "no subsystem 5646:0002 (uart16550)"; return 1; }
  report_pci uart "$uart"
  tty=/dev/$(ls "$uart/tty" | head -n 1)
  exec 3<>"$tty"
  stty -F "$tty" 115200 raw -echo -echoe -echok -echonl -onlcr -crtscts clocal cs8 -parenb \
    || fail "stty"
}
"##;

/// The status of the first complete `VFUD-GUEST-EXIT <n>` line of a serial log.
pub fn parse_guest_exit(log: &str) -> Option<i32> {
    let i = log.find("VFUD-GUEST-EXIT ")?;
    let rest = &log[i + "VFUD-GUEST-EXIT ".len()..];
    let end = rest.find(['\r', '\n'])?;
    rest[..end].trim().parse().ok()
}

/// `key=value` pairs from guest lines `VFUD-TEST: k1=v1 k2=v2 …` (later lines win).
pub fn guest_values(log: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in log.lines() {
        let Some(i) = line.find(GUEST_RESULT_PREFIX) else {
            continue;
        };
        for word in line[i + GUEST_RESULT_PREFIX.len()..].split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

/// Deadline for a ticking guest (see [`last_tick`]) to print its next tick.
pub const TICK_TIMEOUT: Duration = Duration::from_secs(15);

/// The values of the last complete `VFUD-TEST: tick=N k=v …` line of a serial log: guests
/// that run for a while print one such line per step.
pub fn last_tick(log: &str) -> Option<(u64, HashMap<String, String>)> {
    let complete = &log[..log.rfind('\n')?];
    complete.lines().rev().find_map(|line| {
        let rest = &line[line.find(GUEST_RESULT_PREFIX)? + GUEST_RESULT_PREFIX.len()..];
        let m: HashMap<String, String> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let n = m.get("tick")?.parse().ok()?;
        Some((n, m))
    })
}

impl Qemu {
    /// Wait (up to [`TICK_TIMEOUT`]) for a tick numbered above `after` on the serial console.
    pub fn wait_tick(&mut self, after: u64) -> (u64, HashMap<String, String>) {
        self.wait_tick_where(after, |_| true)
    }

    /// Wait (up to [`TICK_TIMEOUT`] per tick) for a tick numbered above `after` whose values
    /// satisfy `want`.
    pub fn wait_tick_where(
        &mut self,
        after: u64,
        want: impl Fn(&HashMap<String, String>) -> bool,
    ) -> (u64, HashMap<String, String>) {
        let mut after = after;
        let mut deadline = Instant::now() + TICK_TIMEOUT;
        loop {
            if let Some((n, m)) = last_tick(&self.serial_log()) {
                if n > after {
                    if want(&m) {
                        return (n, m);
                    }
                    after = n;
                    deadline = Instant::now() + TICK_TIMEOUT;
                }
            }
            if let Some(st) = self.try_exit() {
                panic!(
                    "QEMU exited ({st}) waiting for a tick after {after}\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "no wanted guest tick after {after} within {TICK_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
