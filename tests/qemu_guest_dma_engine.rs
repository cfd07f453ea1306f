//! A Linux guest drives the dma-engine through QEMU 11.1: it finds the device in sysfs, reads
//! ID and VERSION from BAR0, runs FILL_DEVICE and CRC32_DEVICE over 4 KiB of BAR2, and reads
//! the filled bytes back through BAR2 (mmap-ed device memory).

mod common;

use common::qemu::{guest_values, QemuOpts, DMA_ENGINE_GUEST_LIB, GUEST_TIMEOUT, QMP_TIMEOUT};
use common::Vfud;

#[test]
fn linux_guest_runs_fill_and_crc32_on_device_memory() {
    // Arrange
    let vfud = Vfud::start("dma-engine", &[]);
    let script = format!(
        "{DMA_ENGINE_GUEST_LIB}{}",
        r#"
ok "id=$(rd 0x00) version=$(rd 0x04)"
# FILL_DEVICE: 4096 bytes of 0x5a at BAR2 offset 0.
wr 0x0c 3
wr 0x18 0; wr 0x1c 0; wr 0x20 4096; wr 0x24 6; wr 0x28 0x5a
run_op
ok "fill_status=$(rd 0x0c) fill_error=$(rd 0x38)"
# CRC32_DEVICE over the same range.
wr 0x10 0; wr 0x14 0; wr 0x20 4096; wr 0x24 7
run_op
ok "crc_status=$(rd 0x0c) crc=$(rd 0x30) completions=$(rd 0x34)"
for off in 0x0 0x4 0x100 0x800 0xffc 0x1000; do ok "bar2_$off=$(rd2 $off)"; done
exit $fails
"#
    );

    // Act
    let mut qemu = QemuOpts::new().device(&vfud.socket).guest(&script).start();
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");

    // Assert
    let expected_crc = format!("0x{:08x}", crc32fast::hash(&[0x5a; 4096]));
    let diag = || qemu.diagnostics();
    assert_eq!(get("class"), "0x088000", "{}", diag());
    assert_eq!(get("id"), "0x4d444656", "{}", diag());
    assert_eq!(get("version"), "0x00010000", "{}", diag());
    assert_eq!(get("fill_status"), "0x00000001", "DONE only: {}", diag());
    assert_eq!(get("fill_error"), "0x00000000", "{}", diag());
    assert_eq!(get("crc_status"), "0x00000001", "DONE only: {}", diag());
    assert_eq!(get("crc"), expected_crc, "{}", diag());
    assert_eq!(get("completions"), "0x00000002", "{}", diag());
    for off in ["0x0", "0x4", "0x100", "0x800", "0xffc"] {
        assert_eq!(
            get(&format!("bar2_{off}")),
            "0x5a5a5a5a",
            "BAR2 at {off}: {}",
            diag()
        );
    }
    assert_eq!(
        get("bar2_0x1000"),
        "0x00000000",
        "past the fill: {}",
        diag()
    );
    assert_eq!(status, 0, "guest test failed: {}", diag());
    qemu.wait_exit(QMP_TIMEOUT);
}
