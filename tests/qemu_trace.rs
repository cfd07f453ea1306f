//! QEMU 11.1 and a Linux guest attached to vfud's `uart16550` through `vfud trace`: the guest
//! binds the stock 8250 driver and writes a line that reaches the UART's file backend, and
//! the trace shows QEMU's attach sequence (VERSION → DMA_MAP → DEVICE_GET_INFO →
//! DEVICE_GET_REGION_INFO …), the guest's port I/O and the INTx eventfd, all well-formed.

mod common;

use std::time::Duration;

use common::qemu::{
    guest_values, QemuOpts, GUEST_TIMEOUT, PCI_GUEST_LIB, QMP_TIMEOUT, UART_KERNEL_ARG,
};
use common::tracer::{names, Tracer};
use common::Vfud;

const LINE: &str = "through-the-tracer-12345";

fn guest_script() -> String {
    format!(
        r#"{PCI_GUEST_LIB}
open_uart || exit 1
echo "{LINE}" >&3 || fail "write to $tty"
exec 3>&-   # the last close waits until the output has drained
ok "written=1"
exit $fails
"#
    )
}

#[test]
fn guest_uart_works_through_the_tracer_and_the_trace_shows_the_attach() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("uart.out");
    let vfud = Vfud::start_in(dir, &format!("uart16550,backend=file:{}", out.display()));
    let tracer = Tracer::start(&vfud.socket, &[]);

    let mut qemu = QemuOpts::new()
        .device(&tracer.socket)
        .kernel_arg(UART_KERNEL_ARG)
        .guest(&guest_script())
        .start();
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(status, 0, "guest failed: {}", qemu.diagnostics());
    assert_eq!(get("uart_tty"), "ttyS4", "{}", qemu.diagnostics());
    assert_eq!(get("written"), "1", "{}", qemu.diagnostics());
    qemu.wait_exit(QMP_TIMEOUT);
    // The guest's line went QEMU → tracer → vfud → the UART's backend.
    let mut got = String::new();
    for _ in 0..200 {
        got = std::fs::read_to_string(&out).unwrap_or_default();
        if got.contains(LINE) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(got.contains(LINE), "UART backend got {got:?}");

    let recs = tracer.wait_for("QEMU disconnecting", |r| r["event"] == "closed");
    let text = tracer.text();
    let c2s = names(&recs, "c2s", "command");
    let at = |cmd: &str| {
        c2s.iter()
            .position(|c| c == cmd)
            .unwrap_or_else(|| panic!("QEMU never sent {cmd}: {c2s:?}"))
    };
    assert_eq!(at("VERSION"), 0, "{c2s:?}");
    assert!(at("VERSION") < at("DMA_MAP"), "{c2s:?}");
    assert!(at("DMA_MAP") < at("DEVICE_GET_INFO"), "{c2s:?}");
    assert!(
        at("DEVICE_GET_INFO") < at("DEVICE_GET_REGION_INFO"),
        "{c2s:?}"
    );
    assert!(
        at("DEVICE_GET_REGION_INFO") < at("DEVICE_GET_IRQ_INFO"),
        "{c2s:?}"
    );
    // QEMU's guest RAM is a shared memfd: its DMA maps carry fds.
    assert!(
        recs.iter()
            .any(|r| r["cmd"] == "DMA_MAP" && r["fields"]["fd_backed"] == true),
        "no fd-backed DMA_MAP"
    );
    // The 8250 driver's port I/O on BAR0 and the INTx eventfd.
    assert!(
        recs.iter()
            .any(|r| r["cmd"] == "REGION_WRITE" && r["fields"]["region"] == "BAR0"),
        "no BAR0 write"
    );
    assert!(
        recs.iter().any(|r| r["cmd"] == "DEVICE_SET_IRQS"
            && r["fields"]["irq"] == "INTx"
            && r["fields"]["fds"] == 1),
        "no INTx eventfd assignment"
    );
    // Nothing QEMU or vfud sent looked malformed, and no request failed.
    let bad: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r.get("malformed").is_some() || r["event"] == "malformed-stream")
        .collect();
    assert!(bad.is_empty(), "malformed traffic: {bad:?}");
    assert!(
        names(&recs, "s2c", "error").is_empty(),
        "error replies in the trace:\n{text}"
    );
}
