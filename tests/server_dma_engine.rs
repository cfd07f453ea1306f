//! `vfud serve --device dma-engine` driven over a real socket by the protocol client, the way
//! QEMU drives it: attach sequence, BAR sizing, capabilities, DMA through fds and through the
//! socket, interrupts, reset, reconnect, and hostile input.

mod common;

use common::dma_engine::{r, run_op, w, VecMemory};
use common::{eventfd as efd, memfd, wait_eventfd as wait_efd};

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Vfud;
use nix::errno::Errno;
use nix::sys::eventfd::EventFd;
use vfud_devices::dma_engine::{
    reg, Opcode, CONTROL_IRQ_ENABLE, ID, STATUS_DONE, STATUS_ERROR, VERSION,
};
use vfud_protocol::header::{Command, Header};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::irq::*;
use vfud_protocol::messages::region::{RegionCap, WriteMultiEntry, REGION_FLAG_MMAP};
use vfud_protocol::messages::IrqAction;
use vfud_protocol::{Client, ProtocolError};

const CFG: u32 = 7;
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const BAR4: u32 = 4;
const RAM_IOVA: u64 = 0x1_0000_0000;
const RAM_SIZE: u64 = 4 << 20;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// A client with guest RAM (a memfd) mapped at RAM_IOVA.
fn attached(v: &Vfud) -> (Client, File) {
    let mut c = v.client();
    let ram = memfd(RAM_SIZE);
    c.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
    (c, ram)
}

#[test]
fn attach_sequence_as_qemu_does_it() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let n = c.negotiated().clone();
    assert_eq!(n.max_msg_fds, 16);
    assert_eq!(n.max_data_xfer_size, 1 << 20);
    // Two RAM regions, as SeaBIOS-era QEMU maps them.
    let ram = memfd(RAM_SIZE);
    c.dma_map(RW, 0, 0, 0xa0000, Some(ram.as_fd())).unwrap();
    c.dma_map(
        RW,
        0x100000,
        0x100000,
        RAM_SIZE - 0x100000,
        Some(ram.as_fd()),
    )
    .unwrap();
    let info = c.device_info().unwrap();
    assert_eq!((info.num_regions, info.num_irqs, info.flags), (10, 5, 3));
    let sizes: Vec<u64> = (0..10)
        .map(|i| c.region_info(i).unwrap().0.info.size)
        .collect();
    assert_eq!(
        sizes,
        vec![4096, 0, 1 << 20, 0, 4096, 0, 0, 4096, 0, 4096 + (1 << 20)]
    );
    let msix = c.irq_info(IRQ_INDEX_MSIX).unwrap();
    assert_eq!(msix.count, 4);
    assert_eq!(c.region_read_u32(CFG, 0).unwrap(), 0x0001_5646);
    // MSI-X enable: first vector without an fd, as QEMU does.
    c.set_irqs_raw(
        IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
        IRQ_INDEX_MSIX,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    c.device_reset().unwrap();
    c.dma_unmap(0, 0xa0000).unwrap();
    c.dma_unmap_all().unwrap();
    assert_eq!(r(&mut c, reg::ID), ID);
}

#[test]
fn bar_sizing_reads_back_size_masks_and_type_bits() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let mut got = Vec::new();
    for i in 0..6u64 {
        c.region_write_u32(CFG, 0x10 + 4 * i, u32::MAX).unwrap();
        got.push(c.region_read_u32(CFG, 0x10 + 4 * i).unwrap());
    }
    assert_eq!(
        got,
        vec![0xffff_f000, 0, 0xfff0_000c, 0xffff_ffff, 0xffff_f000, 0]
    );
    // Programming an address keeps the type bits.
    c.region_write_u32(CFG, 0x18, 0xfe00_0000).unwrap();
    assert_eq!(c.region_read_u32(CFG, 0x18).unwrap(), 0xfe00_000c);
    // The ROM BAR is absent.
    c.region_write_u32(CFG, 0x30, u32::MAX).unwrap();
    assert_eq!(c.region_read_u32(CFG, 0x30).unwrap(), 0);
}

#[test]
fn capability_chain_is_walkable() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let cfg = [
        c.region_read(CFG, 0, 256).unwrap(),
        c.region_read(CFG, 256, 256).unwrap(),
    ]
    .concat();
    assert_ne!(cfg[6] & 0x10, 0, "capability list bit");
    let mut p = cfg[0x34] as usize;
    let mut ids = Vec::new();
    while p != 0 && ids.len() < 16 {
        ids.push(cfg[p]);
        if cfg[p] == 0x11 {
            let ctl = u16::from_le_bytes([cfg[p + 2], cfg[p + 3]]);
            assert_eq!(ctl & 0x7ff, 3, "MSI-X table size is N-1");
            assert_eq!(cfg[p + 4] & 7, 4, "table in BAR4");
            assert_eq!(
                u32::from_le_bytes(cfg[p + 8..p + 12].try_into().unwrap()),
                0x800 | 4
            );
        }
        p = cfg[p + 1] as usize;
    }
    assert_eq!(ids, vec![0x01, 0x05, 0x11, 0x10]);
    assert_eq!(u16::from_le_bytes([cfg[0x100], cfg[0x101]]), 3, "DSN");
    assert_eq!(cfg[0x3d], 1, "INTA");
}

#[test]
fn shared_bar_is_mmapable_and_matches_region_access() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let (info, fd) = c.region_info(BAR2).unwrap();
    assert_ne!(info.info.flags & REGION_FLAG_MMAP, 0);
    assert!(
        matches!(&info.caps[..], [RegionCap::SparseMmap(a)] if a.len() == 1 && a[0].size == 1 << 20)
    );
    let f = File::from(fd.expect("BAR2 fd"));
    f.write_at(b"through the mmap fd", info.info.offset + 0x100)
        .unwrap();
    assert_eq!(
        c.region_read(BAR2, 0x100, 19).unwrap(),
        b"through the mmap fd"
    );
    c.region_write(BAR2, 0x200, b"over the socket").unwrap();
    let mut buf = [0u8; 15];
    f.read_exact_at(&mut buf, info.info.offset + 0x200).unwrap();
    assert_eq!(&buf, b"over the socket");
}

#[test]
fn registers_identify_the_device() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    assert_eq!((r(&mut c, reg::ID), r(&mut c, reg::VERSION)), (ID, VERSION));
    w(&mut c, reg::SRC_LO, 0x1234_5678);
    assert_eq!(r(&mut c, reg::SRC_LO), 0x1234_5678);
    // Unaligned or odd-sized register access is refused.
    assert!(matches!(
        c.region_read(BAR0, 2, 4),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    assert!(matches!(
        c.region_read(BAR0, 0, 2),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
}

#[test]
fn fill_copy_and_crc_through_fd_mapped_memory() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, ram) = attached(&v);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
    ram.write_at(&data, 0).unwrap();
    let s = run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, data.len() as u32, 0);
    assert_eq!(s & STATUS_DONE, STATUS_DONE);
    assert_eq!(r(&mut c, reg::RESULT), crc32fast::hash(&data));
    run_op(
        &mut c,
        Opcode::Copy,
        RAM_IOVA,
        RAM_IOVA + 0x20_0000,
        data.len() as u32,
        0,
    );
    let mut back = vec![0u8; data.len()];
    ram.read_exact_at(&mut back, 0x20_0000).unwrap();
    assert_eq!(back, data);
    run_op(&mut c, Opcode::Fill, 0, RAM_IOVA + 0x30_0000, 5000, 0xa5);
    let mut filled = vec![0u8; 5001];
    ram.read_exact_at(&mut filled, 0x30_0000).unwrap();
    assert!(filled[..5000].iter().all(|b| *b == 0xa5) && filled[5000] == 0);
    assert_eq!(r(&mut c, reg::COMPLETIONS), 3);
}

#[test]
fn copy_between_guest_and_device_memory() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, ram) = attached(&v);
    ram.write_at(b"hello device memory", 0x1000).unwrap();
    run_op(&mut c, Opcode::CopyToDevice, RAM_IOVA + 0x1000, 0x40, 19, 0);
    assert_eq!(
        c.region_read(BAR2, 0x40, 19).unwrap(),
        b"hello device memory"
    );
    run_op(
        &mut c,
        Opcode::CopyFromDevice,
        0x40,
        RAM_IOVA + 0x9000,
        19,
        0,
    );
    let mut b = [0u8; 19];
    ram.read_exact_at(&mut b, 0x9000).unwrap();
    assert_eq!(&b, b"hello device memory");
    run_op(&mut c, Opcode::FillDevice, 0, 0x1000, 4096, 0x5a);
    run_op(&mut c, Opcode::Crc32Device, 0x1000, 0, 4096, 0);
    assert_eq!(r(&mut c, reg::RESULT), crc32fast::hash(&[0x5a; 4096]));
}

#[test]
fn dma_outside_mappings_fails_with_error_status() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, _ram) = attached(&v);
    // Straddles the end of the mapping.
    let s = run_op(&mut c, Opcode::Crc32, RAM_IOVA + RAM_SIZE - 8, 0, 16, 0);
    assert_eq!(s & STATUS_ERROR, STATUS_ERROR);
    assert_eq!(r(&mut c, reg::ERROR_CODE), Errno::EFAULT as u32);
    // Read-only mapping cannot be written.
    let ro = memfd(0x10000);
    c.dma_map(DMA_MAP_FLAG_READ, 0, 0x10_0000, 0x10000, Some(ro.as_fd()))
        .unwrap();
    let s = run_op(&mut c, Opcode::Fill, 0, 0x10_0000, 16, 1);
    assert_eq!(s & STATUS_ERROR, STATUS_ERROR);
    assert_eq!(r(&mut c, reg::ERROR_CODE), Errno::EPERM as u32);
}

#[test]
fn dma_without_fd_goes_through_dma_read_and_write_messages() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let mem = Arc::new(Mutex::new(vec![0u8; 3 << 20]));
    let pattern: Vec<u8> = (0..(2 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
    mem.lock().unwrap()[..pattern.len()].copy_from_slice(&pattern);
    c.set_dma_handler(Box::new(VecMemory(mem.clone(), 0x4000_0000)));
    c.dma_map(RW, 0, 0x4000_0000, 3 << 20, None).unwrap();
    // More than max_data_xfer_size: the server must split its DMA requests.
    let s = run_op(
        &mut c,
        Opcode::Crc32,
        0x4000_0000,
        0,
        pattern.len() as u32,
        0,
    );
    assert_eq!(s & STATUS_DONE, STATUS_DONE);
    assert_eq!(r(&mut c, reg::RESULT), crc32fast::hash(&pattern));
    run_op(&mut c, Opcode::Fill, 0, 0x4000_0000 + 0x10, 64, 0x77);
    assert!(mem.lock().unwrap()[0x10..0x50].iter().all(|b| *b == 0x77));
}

#[test]
fn msix_eventfd_fires_after_an_operation() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, ram) = attached(&v);
    ram.write_at(&[1, 2, 3, 4], 0).unwrap();
    let fds: Vec<EventFd> = (0..4).map(|_| efd()).collect();
    let borrowed: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &borrowed).unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    w(&mut c, reg::IRQ_VECTOR, 2);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&fds[2], 2000), 1);
    for i in [0, 1, 3] {
        assert_eq!(wait_efd(&fds[i], 0), 0, "vector {i} must stay quiet");
    }
}

#[test]
fn masked_msix_vector_is_pending_in_pba_and_fires_on_unmask() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, _ram) = attached(&v);
    let e = efd();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 1, &[e.as_fd()]).unwrap();
    c.irq_action(IrqAction::Mask, IRQ_INDEX_MSIX, 1, 1).unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    w(&mut c, reg::IRQ_VECTOR, 1);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&e, 100), 0);
    assert_eq!(c.region_read(BAR4, 0x800, 8).unwrap()[0], 0b10, "PBA bit 1");
    c.irq_action(IrqAction::Unmask, IRQ_INDEX_MSIX, 1, 1)
        .unwrap();
    assert_eq!(wait_efd(&e, 2000), 1);
    assert_eq!(c.region_read(BAR4, 0x800, 8).unwrap()[0], 0);
}

#[test]
fn intx_is_automasked_until_unmasked_by_eventfd_or_set_irqs() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, _ram) = attached(&v);
    let trig = efd();
    let unmask = efd();
    c.set_irq_eventfds(IRQ_INDEX_INTX, 0, &[trig.as_fd()])
        .unwrap();
    c.set_irq_unmask_eventfd(IRQ_INDEX_INTX, unmask.as_fd())
        .unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&trig, 2000), 1);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&trig, 100), 0, "masked until unmask");
    // The resample eventfd unmasks; the pending edge fires.
    nix::unistd::write(unmask.as_fd(), &1u64.to_ne_bytes()).unwrap();
    assert_eq!(wait_efd(&trig, 2000), 1);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&trig, 100), 0);
    c.irq_action(IrqAction::Unmask, IRQ_INDEX_INTX, 0, 1)
        .unwrap();
    assert_eq!(wait_efd(&trig, 2000), 1);
}

#[test]
fn client_triggered_interrupts_and_disable() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let fds: Vec<EventFd> = (0..4).map(|_| efd()).collect();
    let borrowed: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &borrowed).unwrap();
    c.irq_action_bools(
        IrqAction::Trigger,
        IRQ_INDEX_MSIX,
        0,
        &[false, true, false, true],
    )
    .unwrap();
    let fired: Vec<u64> = fds.iter().map(|e| wait_efd(e, 200)).collect();
    assert_eq!(fired, vec![0, 1, 0, 1]);
    c.disable_irqs(IRQ_INDEX_MSIX).unwrap();
    c.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 0, 4)
        .unwrap();
    assert!(
        fds.iter().all(|e| wait_efd(e, 50) == 0),
        "disabled index fires nothing"
    );
}

#[test]
fn reset_restores_registers_config_and_disables_interrupts() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, _ram) = attached(&v);
    let e = efd();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[e.as_fd()]).unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    w(&mut c, reg::SRC_LO, 77);
    c.region_write(CFG, 4, &[0x06, 0x00]).unwrap();
    c.device_reset().unwrap();
    assert_eq!(r(&mut c, reg::SRC_LO), 0);
    assert_eq!(c.region_read(CFG, 4, 2).unwrap(), vec![0, 0]);
    run_op(&mut c, Opcode::Crc32, RAM_IOVA, 0, 4, 0);
    assert_eq!(wait_efd(&e, 100), 0, "interrupts are disabled by reset");
    // DMA maps survive reset.
    assert_eq!(r(&mut c, reg::STATUS) & STATUS_DONE, STATUS_DONE);
}

#[test]
fn reconnect_keeps_device_state_and_drops_maps() {
    let v = Vfud::start("dma-engine", &[]);
    {
        let (mut c, _ram) = attached(&v);
        c.region_write(BAR2, 0x1234, b"persist me").unwrap();
        w(&mut c, reg::PATTERN, 0xabcd);
    }
    let mut c = v.client();
    assert_eq!(c.region_read(BAR2, 0x1234, 10).unwrap(), b"persist me");
    assert_eq!(r(&mut c, reg::PATTERN), 0xabcd);
    // The old client's mapping is gone: the same IOVA can be mapped again.
    let ram = memfd(RAM_SIZE);
    c.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
}

#[test]
fn second_client_is_refused_while_one_is_attached() {
    let v = Vfud::start("dma-engine", &[]);
    let mut first = v.client();
    let mut second = Client::connect(&v.socket).unwrap();
    second.set_timeout(Duration::from_secs(5)).unwrap();
    let r = second.negotiate(&vfud_protocol::messages::VersionMessage::qemu_proposal());
    assert!(
        matches!(
            r,
            Err(ProtocolError::Disconnected) | Err(ProtocolError::Io(_))
        ),
        "{r:?}"
    );
    assert!(first.device_info().is_ok());
}

#[test]
fn write_multi_applies_every_entry_without_a_reply() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let e = |off: u64, val: u32| WriteMultiEntry {
        offset: off,
        region: BAR0,
        count: 4,
        data: {
            let mut d = [0u8; 8];
            d[..4].copy_from_slice(&val.to_le_bytes());
            d
        },
    };
    c.region_write_multi(&[e(reg::SRC_LO, 11), e(reg::DST_LO, 22), e(reg::LEN, 33)])
        .unwrap();
    c.region_write_posted(BAR0, reg::PATTERN, &44u32.to_le_bytes())
        .unwrap();
    // The next reply we get is for this read: nothing was answered in between.
    assert_eq!(r(&mut c, reg::SRC_LO), 11);
    assert_eq!(
        (
            r(&mut c, reg::DST_LO),
            r(&mut c, reg::LEN),
            r(&mut c, reg::PATTERN)
        ),
        (22, 33, 44)
    );
}

fn expect_errno(res: Result<impl std::fmt::Debug, ProtocolError>, want: Errno) {
    match res {
        Err(ProtocolError::Remote(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn hostile_inputs_get_error_replies_and_the_server_keeps_serving() {
    let v = Vfud::start("dma-engine", &[]);
    let (mut c, ram) = attached(&v);
    let e1 = efd();
    let e2 = efd();
    let e3 = efd();
    // 1. unknown command number
    expect_errno(c.request_raw(99, &[], &[]), Errno::ENOSYS);
    // 2. the obsolete DIRTY_PAGES (14)
    expect_errno(c.request_raw(14, &[0; 8], &[]), Errno::ENOSYS);
    // 3. BAR access past the end
    expect_errno(c.region_read(BAR0, 4094, 4), Errno::EINVAL);
    // 4. a region that does not exist
    expect_errno(c.region_read(42, 0, 4), Errno::EINVAL);
    // 5. overlapping DMA map
    expect_errno(
        c.dma_map(RW, 0, RAM_IOVA + 0x1000, 0x1000, Some(ram.as_fd())),
        Errno::EEXIST,
    );
    // 6. unmap of something never mapped / not exactly
    expect_errno(c.dma_unmap(RAM_IOVA, 0x1000), Errno::ENOENT);
    // 7. two actions at once
    expect_errno(
        c.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE,
            2,
            0,
            1,
            &[],
            &[],
        ),
        Errno::EINVAL,
    );
    // 8. vectors out of range
    expect_errno(
        c.irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 3, 2),
        Errno::EINVAL,
    );
    // 9. more eventfds than vectors named
    expect_errno(
        c.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            2,
            0,
            2,
            &[],
            &[e1.as_fd(), e2.as_fd(), e3.as_fd()],
        ),
        Errno::EINVAL,
    );
    // 10. REGION_WRITE whose count disagrees with its data
    let mut p = Vec::new();
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&BAR0.to_le_bytes());
    p.extend_from_slice(&8u32.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    expect_errno(
        c.request_raw(Command::RegionWrite as u16, &p, &[]),
        Errno::EINVAL,
    );
    // 11. a read larger than max_data_xfer_size
    expect_errno(c.region_read(BAR2, 0, (1 << 20) + 1), Errno::E2BIG);
    // 12. an fd on a command that takes none
    expect_errno(
        c.request_raw(
            Command::DeviceGetInfo as u16,
            &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[e1.as_fd()],
        ),
        Errno::EINVAL,
    );
    // 13. DMA_UNMAP ALL with an address
    let mut p = Vec::new();
    p.extend_from_slice(&24u32.to_le_bytes());
    p.extend_from_slice(&2u32.to_le_bytes());
    p.extend_from_slice(&RAM_IOVA.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    expect_errno(
        c.request_raw(Command::DmaUnmap as u16, &p, &[]),
        Errno::EINVAL,
    );
    // 14. a bad posted write is not answered at all: the next reply is the next request's
    c.region_write_posted(BAR0, 4093, &[0; 4]).unwrap();
    assert_eq!(r(&mut c, reg::ID), ID);
    // 15. migration data outside a migration
    expect_errno(c.mig_data_read(16), Errno::EINVAL);
    // Still serving, state intact.
    assert_eq!(c.device_info().unwrap().num_regions, 10);
    assert_eq!(c.region_read_u32(CFG, 0).unwrap(), 0x0001_5646);
}

#[test]
fn commands_before_version_are_refused() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = Client::connect(&v.socket).unwrap();
    expect_errno(c.device_info(), Errno::EINVAL);
    let mut bad = vfud_protocol::messages::VersionMessage::qemu_proposal();
    bad.major = 1;
    assert!(matches!(c.negotiate(&bad), Err(ProtocolError::Remote(_))));
    c.negotiate(&vfud_protocol::messages::VersionMessage::qemu_proposal())
        .unwrap();
    assert_eq!(c.device_info().unwrap().num_irqs, 5);
}

#[test]
fn oversized_frame_drops_the_connection_but_not_the_server() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let h = Header::command(1, Command::RegionWrite, 64 << 20, false);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(zerocopy_bytes(&h));
    c.send_raw(&bytes, &[]).unwrap();
    let mut probe = [0u8; 1];
    use std::io::Read;
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        c.stream().read(&mut probe).unwrap_or(0),
        0,
        "server closes the connection"
    );
    drop(c);
    let mut again = v.client();
    assert_eq!(again.device_info().unwrap().num_regions, 10);
}

fn zerocopy_bytes(h: &Header) -> &[u8] {
    h.as_wire_bytes()
}
