//! One `vfud serve` process with two devices, `dma-engine` and `uart16550`, attached to one
//! QEMU 11.1: the Linux guest enumerates both with their IDs, classes, BAR resources and INTx
//! lines, and the stock 8250_pci driver (`serial`) binds the UART — in its I/O-BAR form,
//! `bar=io`, which the driver finds by class — as a ttyS port.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::qemu::{
    guest_values, QemuOpts, SysfsResource, GUEST_TIMEOUT, PCI_GUEST_LIB, QMP_TIMEOUT,
    UART_KERNEL_ARG,
};
use common::Vfud;

const VENDOR: u16 = 0x5646;
const DMA_ENGINE: u16 = 0x0001;
const UART: u16 = 0x0002;

const GUEST: &str = r#"
dma=$(find_pci 0x5646 0x0001) || fail "no 5646:0001 (dma-engine)"
uart=$(find_pci 0x5646 0x0002) || fail "no 5646:0002 (uart16550)"
[ -n "$dma" ] && report_pci dma "$dma"
[ -n "$uart" ] && report_pci uart "$uart"
# The 8250 driver's registration line, e.g. "0000:00:02.0: ttyS4 at I/O 0xc060 (irq = 22, …".
line=$(dmesg | grep "${uart##*/}: ttyS[0-9]* at I/O" | head -n 1)
echo "VFUD-TEST: dmesg: $line"
ok "dmesg_tty=$(echo "$line" | sed -n 's/.*: \(ttyS[0-9]*\) at I\/O.*/\1/p')" \
   "dmesg_io=$(echo "$line" | sed -n 's/.* at I\/O \(0x[0-9a-f]*\) .*/\1/p')" \
   "dmesg_irq=$(echo "$line" | sed -n 's/.*(irq = \([0-9]*\),.*/\1/p')" \
   "dmesg_uart=$(echo "$line" | sed -n 's/.* is a \(.*\)$/\1/p')"
exit $fails
"#;

fn res(v: &HashMap<String, String>, key: &str) -> SysfsResource {
    let s = v
        .get(key)
        .unwrap_or_else(|| panic!("guest printed no {key}"));
    SysfsResource::parse(s).unwrap_or_else(|| panic!("bad resource line {key}={s}"))
}

#[test]
fn guest_enumerates_dma_engine_and_uart_served_by_one_vfud() {
    // Arrange: one vfud process serving both devices.
    let uart_dir = tempfile::tempdir().expect("tempdir");
    let uart_sock = uart_dir.path().join("uart16550.sock");
    let uart_out = uart_dir.path().join("uart.out");
    let uart_spec = format!("uart16550,bar=io,backend=file:{}", uart_out.display());
    let uart_sock_arg = uart_sock.to_str().expect("utf-8 path");
    let vfud = Vfud::start(
        "dma-engine",
        &["--device", &uart_spec, "--socket", uart_sock_arg],
    );
    assert!(
        common::wait_for_path(&uart_sock, Duration::from_secs(10)),
        "vfud did not create {uart_sock_arg}"
    );

    // Act
    let mut qemu = QemuOpts::new()
        .device(&vfud.socket)
        .device(&uart_sock)
        .kernel_arg(UART_KERNEL_ARG)
        .guest(&format!("{PCI_GUEST_LIB}{GUEST}"))
        .start();
    // The host's view while the guest runs (SeaBIOS assigns the BARs before Linux boots).
    let host_uart = qemu.wait_pci_device(VENDOR, UART, Duration::from_secs(30), |d| {
        d.bars_assigned(&[0])
    });
    let host_dma = qemu.wait_pci_device(VENDOR, DMA_ENGINE, Duration::from_secs(30), |d| {
        d.bars_assigned(&[0, 2, 4])
    });
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    let diag = || qemu.diagnostics();

    // Assert: the dma-engine.
    assert_eq!(get("dma_vendor"), "0x5646", "{}", diag());
    assert_eq!(get("dma_device"), "0x0001", "{}", diag());
    assert_eq!(get("dma_subsystem"), "0x5646:0x0001", "{}", diag());
    assert_eq!(get("dma_class"), "0x088000", "{}", diag());
    assert_eq!(get("dma_pin"), "1", "INTA: {}", diag());
    let dma_irq: u32 = get("dma_irq").parse().unwrap_or(0);
    assert!(dma_irq > 0, "dma-engine has no IRQ: {}", diag());
    assert_eq!(get("dma_driver"), "none", "{}", diag());
    let bar0 = res(&v, "dma_res0");
    assert_eq!(bar0.size(), 4096, "BAR0 {bar0:x?}");
    assert!(bar0.has(SysfsResource::MEM), "BAR0 {bar0:x?}");
    assert!(
        !bar0.has(SysfsResource::MEM_64),
        "BAR0 is 32-bit: {bar0:x?}"
    );
    assert!(!bar0.has(SysfsResource::PREFETCH), "BAR0 {bar0:x?}");
    let bar2 = res(&v, "dma_res2");
    assert_eq!(bar2.size(), 1 << 20, "BAR2 {bar2:x?}");
    assert!(
        bar2.has(SysfsResource::MEM | SysfsResource::MEM_64 | SysfsResource::PREFETCH),
        "BAR2 is 64-bit prefetchable memory: {bar2:x?}"
    );
    assert_eq!(bar2.start % (1 << 20), 0, "BAR2 alignment {bar2:x?}");
    let bar4 = res(&v, "dma_res4");
    assert_eq!(bar4.size(), 4096, "BAR4 {bar4:x?}");
    assert!(bar4.has(SysfsResource::MEM), "BAR4 {bar4:x?}");
    for i in [1, 3, 5, 6] {
        let r = res(&v, &format!("dma_res{i}"));
        assert_eq!(r.size(), 0, "dma-engine BAR{i} should be absent: {r:x?}");
    }

    // Assert: the UART, bound by the serial driver as a ttyS port.
    assert_eq!(get("uart_vendor"), "0x5646", "{}", diag());
    assert_eq!(get("uart_device"), "0x0002", "{}", diag());
    assert_eq!(get("uart_subsystem"), "0x5646:0x0002", "{}", diag());
    assert_eq!(get("uart_class"), "0x070002", "{}", diag());
    assert_eq!(get("uart_pin"), "1", "INTA: {}", diag());
    let uart_irq: u32 = get("uart_irq").parse().unwrap_or(0);
    assert!(uart_irq > 0, "UART has no IRQ: {}", diag());
    let io = res(&v, "uart_res0");
    assert_eq!(io.size(), 8, "UART BAR0 {io:x?}");
    assert!(io.has(SysfsResource::IO), "UART BAR0 is I/O: {io:x?}");
    assert_eq!(io.start % 8, 0, "UART BAR0 alignment {io:x?}");
    for i in 1..=6 {
        let r = res(&v, &format!("uart_res{i}"));
        assert_eq!(r.size(), 0, "UART BAR{i} should be absent: {r:x?}");
    }
    assert_eq!(get("uart_driver"), "serial", "8250_pci: {}", diag());
    assert_eq!(get("uart_tty"), "ttyS4", "{}", diag());
    assert_eq!(get("dmesg_tty"), "ttyS4", "{}", diag());
    assert_eq!(get("dmesg_io"), format!("{:#x}", io.start), "{}", diag());
    assert_eq!(get("dmesg_irq"), uart_irq.to_string(), "{}", diag());
    assert_eq!(get("dmesg_uart"), "16550A", "autoconfig: {}", diag());

    // Assert: QEMU's view agrees with the guest's.
    assert_eq!(host_uart.class_info.class, 0x0700, "{host_uart:#?}");
    let host_bar0 = host_uart.bar(0).expect("BAR0 in query-pci");
    assert_eq!(
        (host_bar0.kind.as_str(), host_bar0.size),
        ("io", 8),
        "{host_uart:#?}"
    );
    assert_eq!(host_bar0.address as u64, io.start, "{host_uart:#?}");
    assert_eq!(host_dma.class_info.class, 0x0880, "{host_dma:#?}");
    for (bar, r) in [(0, bar0), (2, bar2), (4, bar4)] {
        let h = host_dma.bar(bar).expect("dma-engine BAR in query-pci");
        assert_eq!(
            (h.address as u64, h.size),
            (r.start, r.size()),
            "dma-engine BAR{bar}: {host_dma:#?}"
        );
    }
    assert_eq!(status, 0, "guest reported failures: {}", diag());
    qemu.wait_exit(QMP_TIMEOUT);
}
