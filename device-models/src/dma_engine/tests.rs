//! Socket-free tests of the dma-engine on a [`TestBench`].

use super::*;
use vfud_server::testing::{RamMode, TestBench, RAM_BASE};

const MIB: usize = 1 << 20;

fn bench(mode: RamMode) -> TestBench {
    TestBench::with_ram(Box::new(DmaEngine::new()), mode, 8 * MIB)
}

fn start(b: &mut TestBench, op: Opcode, src: u64, dst: u64, len: u32) {
    b.write32(0, reg::SRC_LO, src as u32).unwrap();
    b.write32(0, reg::SRC_HI, (src >> 32) as u32).unwrap();
    b.write32(0, reg::DST_LO, dst as u32).unwrap();
    b.write32(0, reg::DST_HI, (dst >> 32) as u32).unwrap();
    b.write32(0, reg::LEN, len).unwrap();
    b.write32(0, reg::OPCODE, op as u32).unwrap();
    b.write32(0, reg::DOORBELL, 1).unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn identity_registers_read_back() {
    let mut b = bench(RamMode::Fd);
    assert_eq!(b.read32(0, reg::ID).unwrap(), ID);
    assert_eq!(b.read32(0, reg::VERSION).unwrap(), VERSION);
    assert!(
        b.read(0, reg::ID, 2).is_err(),
        "2-byte register access is refused"
    );
}

#[test]
fn copy_and_crc_in_fd_memory() {
    let mut b = bench(RamMode::Fd);
    let data = pattern(3 * MIB + 123);
    b.ram_write(RAM_BASE, &data);
    start(
        &mut b,
        Opcode::Copy,
        RAM_BASE,
        RAM_BASE + 4 * MIB as u64,
        data.len() as u32,
    );
    assert_eq!(b.read32(0, reg::STATUS).unwrap() & STATUS_BUSY, STATUS_BUSY);
    let turns = b.run(1000);
    assert!(turns >= 3, "a 3 MiB job takes several slices, took {turns}");
    assert_eq!(b.read32(0, reg::STATUS).unwrap(), STATUS_DONE);
    assert_eq!(b.ram_read(RAM_BASE + 4 * MIB as u64, data.len()), data);
    start(&mut b, Opcode::Crc32, RAM_BASE, 0, data.len() as u32);
    b.run(1000);
    assert_eq!(b.read32(0, reg::RESULT).unwrap(), crc32fast::hash(&data));
}

#[test]
fn socket_memory_never_blocks_and_gives_the_same_result() {
    let mut b = bench(RamMode::Socket);
    let data = pattern(MIB + 5);
    b.ram_write(RAM_BASE, &data);
    start(
        &mut b,
        Opcode::Copy,
        RAM_BASE,
        RAM_BASE + 2 * MIB as u64,
        data.len() as u32,
    );
    // Between slices the device answers register reads: BUSY, never a stall.
    b.step();
    assert_eq!(b.read32(0, reg::STATUS).unwrap() & STATUS_BUSY, STATUS_BUSY);
    b.run(10_000);
    assert_eq!(b.read32(0, reg::STATUS).unwrap(), STATUS_DONE);
    assert_eq!(b.ram_read(RAM_BASE + 2 * MIB as u64, data.len()), data);
    start(&mut b, Opcode::Crc32, RAM_BASE, 0, data.len() as u32);
    b.run(10_000);
    assert_eq!(b.read32(0, reg::RESULT).unwrap(), crc32fast::hash(&data));
}

#[test]
fn fill_device_memory_and_copy_it_out() {
    let mut b = bench(RamMode::Fd);
    b.write32(0, reg::PATTERN, 0xa5).unwrap();
    start(&mut b, Opcode::FillDevice, 0, 0x1000, 4096);
    b.run(100);
    start(&mut b, Opcode::CopyFromDevice, 0x1000, RAM_BASE, 4096);
    b.run(100);
    assert_eq!(b.ram_read(RAM_BASE, 4096), vec![0xa5; 4096]);
    assert_eq!(b.read32(0, reg::COMPLETIONS).unwrap(), 2);
}

#[test]
fn dma_outside_guest_memory_fails_cleanly() {
    let mut b = bench(RamMode::Fd);
    start(&mut b, Opcode::Copy, 0x10, RAM_BASE, 64);
    b.run(100);
    assert_eq!(b.read32(0, reg::STATUS).unwrap(), STATUS_ERROR);
    assert_ne!(b.read32(0, reg::ERROR_CODE).unwrap(), 0);
    start(&mut b, Opcode::Fill, 0, RAM_BASE, 64);
    b.run(100);
    assert_eq!(
        b.read32(0, reg::STATUS).unwrap(),
        STATUS_DONE,
        "the device recovers"
    );
}

#[test]
fn one_msix_interrupt_per_job() {
    let mut b = bench(RamMode::Fd);
    b.wire_irqs(2, MSIX_VECTORS);
    b.write32(0, reg::CONTROL, CONTROL_IRQ_ENABLE).unwrap();
    b.write32(0, reg::IRQ_VECTOR, 3).unwrap();
    for _ in 0..3 {
        start(&mut b, Opcode::Fill, 0, RAM_BASE, 2 * MIB as u32);
        b.run(100);
    }
    assert_eq!(b.interrupts(), vec![(2, 3, 3)]);
}

#[test]
fn intx_is_level_with_pci_status_until_acknowledged() {
    let mut b = bench(RamMode::Fd);
    b.wire_irqs(0, 1);
    b.write32(0, reg::CONTROL, CONTROL_IRQ_ENABLE).unwrap();
    start(&mut b, Opcode::Fill, 0, RAM_BASE, 4096);
    b.run(100);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
    assert_ne!(
        b.config16(6) & 0x08,
        0,
        "PCI STATUS interrupt bit while asserted"
    );
    // Interrupt Disable holds the line off but keeps it pending.
    b.set_config16(4, 0x0406);
    b.unmask_intx();
    assert!(b.interrupts().is_empty());
    b.set_config16(4, 0x0006);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)], "delivered when re-enabled");
    b.write32(0, reg::STATUS, STATUS_DONE).unwrap();
    assert_eq!(b.config16(6) & 0x08, 0, "lowered once acknowledged");
    b.unmask_intx();
    assert!(b.interrupts().is_empty(), "no re-fire once lowered");
}

#[test]
fn a_job_in_flight_migrates_and_completes_once_on_the_destination() {
    let mut a = TestBench::with_ram(
        Box::new(DmaEngine::with_slice(64 * 1024)),
        RamMode::Fd,
        8 * MIB,
    );
    let data = pattern(4 * MIB);
    a.ram_write(RAM_BASE, &data);
    a.set_config16(4, 0x0006); // memory + bus master
    a.wire_irqs(2, MSIX_VECTORS);
    a.write32(0, reg::CONTROL, CONTROL_IRQ_ENABLE).unwrap();
    start(&mut a, Opcode::Crc32, RAM_BASE, 0, data.len() as u32);
    for _ in 0..5 {
        a.step();
    }
    assert_eq!(a.read32(0, reg::STATUS).unwrap() & STATUS_BUSY, STATUS_BUSY);
    let stream = a.save_stream().unwrap();
    let mut b = TestBench::with_ram(Box::new(DmaEngine::new()), RamMode::Fd, 8 * MIB);
    b.ram_write(RAM_BASE, &data);
    b.restore_stream(&stream).unwrap();
    b.wire_irqs(2, MSIX_VECTORS);
    b.run(1000);
    assert_eq!(b.read32(0, reg::RESULT).unwrap(), crc32fast::hash(&data));
    assert_eq!(b.read32(0, reg::COMPLETIONS).unwrap(), 1);
    assert_eq!(b.interrupts(), vec![(2, 0, 1)]);
}

#[test]
fn a_job_in_flight_without_bus_mastering_is_refused() {
    let mut a = TestBench::with_ram(
        Box::new(DmaEngine::with_slice(64 * 1024)),
        RamMode::Fd,
        8 * MIB,
    );
    start(&mut a, Opcode::Fill, 0, RAM_BASE, 4 * MIB as u32);
    a.step();
    let stream = a.save_stream().unwrap();
    let mut b = bench(RamMode::Fd);
    let err = b.restore_stream(&stream).unwrap_err();
    assert!(
        vfud_server::error::chain(&err).contains("bus mastering"),
        "{err:?}"
    );
    assert_eq!(
        b.read32(0, reg::STATUS).unwrap(),
        0,
        "destination unchanged"
    );
}

vfud_server::migration_roundtrip_tests!(Box::new(DmaEngine::new()));
