//! QEMU 11.1 attaches `vfud serve --device dma-engine`: `query-pci` shows its IDs, class and
//! all BARs assigned by SeaBIOS; after QMP `quit` vfud is still serving and takes a new client.

mod common;

use std::time::{Duration, Instant};

use common::qemu::QemuOpts;
use common::Vfud;

const VENDOR: u16 = 0x5646;
const DEVICE: u16 = 0x0001;

#[test]
fn qemu_attaches_dma_engine_and_firmware_assigns_bars() {
    // Arrange: vfud, and QEMU with no guest (SeaBIOS assigns BARs, then finds nothing to boot).
    let mut vfud = Vfud::start("dma-engine", &[]);
    let mut qemu = QemuOpts::new().device(&vfud.socket).start();

    // Act
    let dev = qemu.wait_pci_device(VENDOR, DEVICE, Duration::from_secs(30), |d| {
        d.bars_assigned(&[0, 2, 4])
    });

    // Assert
    assert_eq!(dev.class_info.class, 0x0880, "{dev:#?}");
    assert_eq!(dev.id.subsystem_vendor, Some(0x5646), "{dev:#?}");
    assert_eq!(dev.id.subsystem, Some(0x0001), "{dev:#?}");
    assert_eq!(dev.irq_pin, 1, "INTA: {dev:#?}");
    let bar0 = dev.bar(0).unwrap();
    assert_eq!(
        (bar0.kind.as_str(), bar0.size),
        ("memory", 4096),
        "{dev:#?}"
    );
    assert_eq!(bar0.mem_type_64, Some(false), "{dev:#?}");
    let bar2 = dev.bar(2).unwrap();
    assert_eq!(
        (bar2.kind.as_str(), bar2.size),
        ("memory", 1 << 20),
        "{dev:#?}"
    );
    assert_eq!(
        (bar2.mem_type_64, bar2.prefetch),
        (Some(true), Some(true)),
        "{dev:#?}"
    );
    let bar4 = dev.bar(4).unwrap();
    assert_eq!(
        (bar4.kind.as_str(), bar4.size),
        ("memory", 4096),
        "{dev:#?}"
    );
    for r in &dev.regions {
        assert_eq!(
            r.address as u64 % r.size,
            0,
            "BAR{} misaligned: {dev:#?}",
            r.bar
        );
    }
    let mut bars: Vec<u8> = dev.regions.iter().map(|r| r.bar).collect();
    bars.sort();
    assert_eq!(bars, [0, 2, 4], "exactly BARs 0, 2, 4: {dev:#?}");

    // Act: quit QEMU.
    let status = qemu.quit();
    assert!(
        status.success(),
        "QEMU exit status {status}\n{}",
        qemu.diagnostics()
    );
    drop(qemu);

    // Assert: vfud survived, dropped the client and serves a new one (it refuses a second
    // client while it still thinks the first is connected).
    assert!(vfud.alive(), "vfud died with QEMU");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match vfud_protocol::Client::connect_negotiated(&vfud.socket) {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline => {
                panic!("vfud does not take a new client after QEMU quit: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    assert!(vfud.alive(), "vfud died after the new client");
}
