//! One vfud, two QEMUs in turn: the first is shut down with QMP `quit`, the second attaches to
//! the same vfud process and gets the device again, with its device memory (BAR2) intact.

mod common;

use std::time::Duration;

use common::qemu::{guest_values, QemuOpts, DMA_ENGINE_GUEST_LIB, GUEST_TIMEOUT, QMP_TIMEOUT};
use common::Vfud;

const VENDOR: u16 = 0x5646;
const DEVICE: u16 = 0x0001;
const MARKER: &str = "0xc0ffee01";

/// First guest: a marker written through the BAR2 mapping at 0x1000, and 256 bytes of 0xa5
/// filled by the engine at 0x2000; then it waits to be shut down from the host.
const FIRST_GUEST: &str = r#"
wr2 0x1000 0xc0ffee01
ok "marker_written=$(rd2 0x1000)"
wr 0x0c 3
wr 0x18 0x2000; wr 0x1c 0; wr 0x20 256; wr 0x24 6; wr 0x28 0xa5
run_op
ok "fill_status=$(rd 0x0c) fill_word=$(rd2 0x2000)"
ok "first_guest_ready=$fails"
sleep 600
"#;

/// Second guest: reads the marker back and has the engine CRC the filled range.
const SECOND_GUEST: &str = r#"
ok "completions_after_attach=$(rd 0x34)"
ok "marker=$(rd2 0x1000) fill_word=$(rd2 0x2000)"
wr 0x0c 3
wr 0x10 0x2000; wr 0x14 0; wr 0x20 256; wr 0x24 7
run_op
ok "crc_status=$(rd 0x0c) crc=$(rd 0x30)"
exit $fails
"#;

#[test]
fn second_qemu_attaches_to_same_vfud_and_device_memory_survives() {
    // Arrange: the first QEMU writes device state, then is shut down over QMP.
    let mut vfud = Vfud::start("dma-engine", &[]);
    let mut first = QemuOpts::new()
        .device(&vfud.socket)
        .guest(&format!("{DMA_ENGINE_GUEST_LIB}{FIRST_GUEST}"))
        .start();
    first.wait_pci_device(VENDOR, DEVICE, Duration::from_secs(30), |d| {
        d.bars_assigned(&[0, 2, 4])
    });
    let log = first.wait_for_serial("first_guest_ready=", GUEST_TIMEOUT);
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(
        get("first_guest_ready"),
        "0",
        "{}\nvfud: {}",
        first.diagnostics(),
        if vfud.alive() { "alive" } else { "exited" }
    );
    assert_eq!(get("marker_written"), MARKER, "{}", first.diagnostics());
    assert_eq!(get("fill_status"), "0x00000001", "{}", first.diagnostics());
    assert_eq!(get("fill_word"), "0xa5a5a5a5", "{}", first.diagnostics());
    let status = first.quit();
    assert!(
        status.success(),
        "first QEMU exit status {status}\n{}",
        first.diagnostics()
    );
    drop(first);
    assert!(vfud.alive(), "vfud died with the first QEMU");

    // Act: a second QEMU on the same socket.
    let mut second = QemuOpts::new()
        .device(&vfud.socket)
        .guest(&format!("{DMA_ENGINE_GUEST_LIB}{SECOND_GUEST}"))
        .start();
    let dev = second.wait_pci_device(VENDOR, DEVICE, Duration::from_secs(30), |d| {
        d.bars_assigned(&[0, 2, 4])
    });
    let exit = second.wait_guest_exit(GUEST_TIMEOUT);
    let log = second.serial_log();

    // Assert
    assert_eq!(dev.class_info.class, 0x0880, "{dev:#?}");
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    let expected_crc = format!("0x{:08x}", crc32fast::hash(&[0xa5; 256]));
    assert_eq!(
        get("marker"),
        MARKER,
        "device memory lost: {}",
        second.diagnostics()
    );
    assert_eq!(get("fill_word"), "0xa5a5a5a5", "{}", second.diagnostics());
    assert_eq!(get("crc_status"), "0x00000001", "{}", second.diagnostics());
    assert_eq!(get("crc"), expected_crc, "{}", second.diagnostics());
    assert_eq!(exit, 0, "second guest failed: {}", second.diagnostics());
    second.wait_exit(QMP_TIMEOUT);
    assert!(vfud.alive(), "vfud died with the second QEMU");
}
