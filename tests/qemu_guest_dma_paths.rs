//! A Linux guest drives the dma-engine with no special driver, the way a user pokes a device:
//! COMMAND through sysfs `config`, registers through `devmem`, a buffer of RAM reserved with
//! `memmap=` and moved with `dd` on `/dev/mem`, STATUS polled as fast as the guest can. Both
//! memory modes: fd-backed RAM (vfud maps it) and plain RAM (vfud uses DMA_READ/DMA_WRITE,
//! which must never hold back a reply QEMU's vCPU is waiting for). And a generic INTx driver,
//! `uio_pci_generic`, which claims interrupts by the PCI 2.3 status bit.

mod common;

use common::qemu::{guest_values, QemuOpts, DMA_ENGINE_GUEST_LIB, GUEST_TIMEOUT, QMP_TIMEOUT};
use common::Vfud;

/// 8 MiB of guest RAM at 128 MiB, reserved from Linux for the device's DMA.
const MEMMAP: &str = "memmap=8M$0x8000000";
const MIB: usize = 1 << 20;

/// Jobs over the reserved RAM: FILL 4 MiB, CRC of it, COPY 4 MiB of random bytes and
/// compare, CRC of both copies. STATUS is polled without pause; every value is checked.
const JOBS: &str = r#"
buf=$((0x8000000))
poll() {
  wr 0x2c 1
  n=0
  while :; do
    s=$(rd 0x0c)
    if [ "$s" = 0xffffffff ]; then fail "STATUS all-ones after $n polls"; return 1; fi
    [ $(( s & 4 )) -eq 0 ] && break
    n=$((n + 1))
    if [ $n -gt 200000 ]; then fail "still BUSY: STATUS=$s"; return 1; fi
  done
  polls=$((polls + n))
}
polls=0
# FILL 4 MiB with 0x3c.
wr 0x18 $buf; wr 0x1c 0; wr 0x20 $((4 << 20)); wr 0x24 2; wr 0x28 0x3c
poll; ok "fill_status=$(rd 0x0c)"
wr 0x10 $buf; wr 0x14 0; wr 0x20 $((4 << 20)); wr 0x24 3
poll; ok "fill_crc=$(rd 0x30)"
# COPY 4 MiB of random bytes to the upper half and compare in the guest.
dd if=/dev/urandom of=/tmp/src bs=1M count=4 2>/dev/null
dd if=/tmp/src of=/dev/mem bs=1M seek=128 count=4 conv=notrunc 2>/dev/null
wr 0x10 $buf; wr 0x14 0; wr 0x18 $((buf + (4 << 20))); wr 0x1c 0; wr 0x20 $((4 << 20)); wr 0x24 1
poll; ok "copy_status=$(rd 0x0c)"
dd if=/dev/mem of=/tmp/dst bs=1M skip=132 count=4 2>/dev/null
if cmp -s /tmp/src /tmp/dst; then ok "copy_matches=yes"; else ok "copy_matches=no"; fi
wr 0x10 $buf; wr 0x20 $((4 << 20)); wr 0x24 3; poll; src_crc=$(rd 0x30)
wr 0x10 $((buf + (4 << 20))); wr 0x24 3; poll; dst_crc=$(rd 0x30)
ok "crc_equal=$([ "$src_crc" = "$dst_crc" ] && echo yes || echo no)"
ok "polls=$polls"
ok "id_after=$(rd 0x00) completions=$(rd 0x34)"
exit $fails
"#;

fn polling_guest(plain_ram: bool) {
    // Arrange
    let vfud = Vfud::start("dma-engine", &[]);
    let script = format!("{DMA_ENGINE_GUEST_LIB}{JOBS}");
    let mut opts = QemuOpts::new()
        .device(&vfud.socket)
        .kernel_arg(MEMMAP)
        .guest(&script);
    if plain_ram {
        opts = opts.plain_ram();
    }

    // Act
    let mut qemu = opts.start();
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let v = guest_values(&qemu.serial_log());
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| "<missing>".into());
    let diag = || qemu.diagnostics();

    // Assert
    let fill_crc = format!("0x{:08x}", crc32fast::hash(&vec![0x3c; 4 * MIB]));
    assert_eq!(get("fill_status"), "0x00000001", "{}", diag());
    assert_eq!(get("fill_crc"), fill_crc, "{}", diag());
    assert_eq!(get("copy_status"), "0x00000001", "{}", diag());
    assert_eq!(get("copy_matches"), "yes", "{}", diag());
    assert_eq!(get("crc_equal"), "yes", "{}", diag());
    assert_eq!(
        get("id_after"),
        "0x4d444656",
        "the device still answers: {}",
        diag()
    );
    assert_eq!(get("completions"), "0x00000005", "{}", diag());
    let stderr = qemu.stderr_log();
    for bad in ["timed out", "unexpected reply", "bad header"] {
        assert!(!stderr.contains(bad), "QEMU said {bad:?}: {}", diag());
    }
    assert_eq!(status, 0, "guest test failed: {}", diag());
    qemu.wait_exit(QMP_TIMEOUT);
}

#[test]
fn guest_polls_status_during_dma_with_fd_backed_ram() {
    polling_guest(false);
}

#[test]
fn guest_polls_status_during_socket_dma_with_plain_ram() {
    polling_guest(true);
}

/// `uio_pci_generic` on the dma-engine: one event on /dev/uio0 per job, and about one
/// interrupt per job in /proc/interrupts, not thousands.
const UIO: &str = r#"
insmod /modules/uio.ko
insmod /modules/uio_pci_generic.ko
echo 5646 0001 > /sys/bus/pci/drivers/uio_pci_generic/new_id
i=0; while [ ! -e /dev/uio0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/uio0 ] || { fail "no /dev/uio0"; exit 1; }
ok "driver=$(basename "$(readlink "$dev/driver")")"
irq=$(cat "$dev/irq")
count() { awk -v i="$irq:" '$1 == i { s = 0; for (k = 2; k <= NF && $k ~ /^[0-9]+$/; k++) s += $k; print s }' /proc/interrupts; }
before=$(count)
exec 3</dev/uio0
# uio_pci_generic masks INTx with COMMAND's Interrupt Disable when it claims an interrupt;
# userspace lets the next one through by clearing that bit in config space (COMMAND's high
# byte, offset 5, bit 2).
intx_on() {
  hi=$(( ($(cmdreg) >> 8) & ~4 ))
  if [ $hi -eq 0 ]; then dd if=/dev/zero bs=1 count=1 2>/dev/null
  else printf "\\$(printf %o $hi)"; fi | dd of="$dev/config" bs=1 seek=5 count=1 conv=notrunc 2>/dev/null
}
wr 0x08 1
wr 0x18 $((0x8000000)); wr 0x1c 0; wr 0x20 4096; wr 0x24 2; wr 0x28 0x11
events=
for j in 1 2 3 4 5 6 7 8 9 10; do
  intx_on
  wr 0x2c 1
  e=$(timeout 5 dd bs=4 count=1 <&3 2>/dev/null | od -An -tu4 | tr -d ' ')
  [ -n "$e" ] || { fail "no uio event for job $j: STATUS=$(rd 0x0c) command=$(cmdreg) status=$(od -An -tx2 -j6 -N2 "$dev/config") irqs=$(count)"; break; }
  events="$events $e"
  wr 0x0c 1                              # acknowledge: DONE cleared, the line drops
done
ok "events=$(echo $events | tr ' ' ,)"
ok "irqs=$(( $(count) - before ))"
ok "completions=$(rd 0x34)"
exit $fails
"#;

#[test]
fn uio_pci_generic_gets_one_event_per_job() {
    // Arrange
    let vfud = Vfud::start("dma-engine", &[]);
    let script = format!("{DMA_ENGINE_GUEST_LIB}{UIO}");

    // Act
    let mut qemu = QemuOpts::new()
        .device(&vfud.socket)
        .kernel_arg(MEMMAP)
        .guest(&script)
        .start();
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let v = guest_values(&qemu.serial_log());
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| "<missing>".into());
    let diag = || qemu.diagnostics();

    // Assert
    assert_eq!(get("driver"), "uio_pci_generic", "{}", diag());
    assert_eq!(get("events"), "1,2,3,4,5,6,7,8,9,10", "{}", diag());
    assert_eq!(get("completions"), "0x0000000a", "{}", diag());
    let irqs: u64 = get("irqs").parse().unwrap_or(u64::MAX);
    assert!(
        (10..=20).contains(&irqs),
        "about one interrupt per job, got {irqs}: {}",
        diag()
    );
    assert_eq!(status, 0, "guest test failed: {}", diag());
    qemu.wait_exit(QMP_TIMEOUT);
}
