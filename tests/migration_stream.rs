//! The server half of live migration over real sockets, its stream: end-of-stream and
//! pre-copy counts, save on one `vfud serve` process and restore on another, integrity
//! checks on bad streams, dirty logging, and the v1 region. The state machine is in
//! `migration.rs`.

mod common;

use common::dma_engine::{r, run_op, w};
use common::memfd;
use common::migration::{restore, save, CHUNK, RAM_IOVA, RAM_SIZE, RW};

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::Vfud;
use nix::errno::Errno;
use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE};
use vfud_protocol::messages::feature::{v1, vfud, DmaLoggingControl, DmaLoggingReport};
use vfud_protocol::messages::region::RegionCap;
use vfud_protocol::messages::MigState;
use vfud_protocol::{Client, ProtocolError};

/// Sections of a stream as (kind, payload).
fn sections(s: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    let mut o = 0;
    while o + 16 <= s.len() {
        let kind = u16::from_le_bytes([s[o], s[o + 1]]);
        let len = u64::from_le_bytes(s[o + 8..o + 16].try_into().unwrap()) as usize;
        v.push((kind, s[o + 16..o + 16 + len].to_vec()));
        o += 16 + len;
    }
    assert_eq!(o, s.len());
    v
}

fn device_state_of(stream: &[u8]) -> Vec<u8> {
    sections(stream)
        .into_iter()
        .find(|(k, _)| *k == 3)
        .expect("device state")
        .1
}

/// Put a dma-engine into a recognisable state.
fn busy_dma_engine(c: &mut Client, ram: &File) {
    c.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
    ram.write_at(b"0123456789abcdef", 0).unwrap();
    run_op(c, Opcode::Crc32, RAM_IOVA, 0, 16, 0);
    run_op(c, Opcode::FillDevice, 0, 0x3000, 8192, 0x42);
    w(c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    w(c, reg::IRQ_VECTOR, 3);
    w(c, reg::SRC_LO, 0xdead_beef);
    c.region_write(0, 0, &[]).ok();
    c.region_write(2, 0x10, b"device memory!").unwrap();
    c.region_write(7, 4, &[0x06, 0x04]).unwrap();
}

#[test]
fn stop_copy_stream_ends_with_an_empty_read_and_chunks_are_full() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    c.set_mig_state(MigState::StopCopy).unwrap();
    let mut sizes = Vec::new();
    loop {
        let d = c.mig_data_read(100_000).unwrap();
        sizes.push(d.len());
        if d.is_empty() {
            break;
        }
    }
    let n = sizes.len();
    assert!(n > 3);
    assert!(sizes[..n - 2].iter().all(|s| *s == 100_000), "{sizes:?}");
    assert!(sizes[n - 2] > 0 && sizes[n - 2] <= 100_000);
    assert_eq!(c.mig_data_read(100_000).unwrap().len(), 0, "still the end");
    assert!(c.mig_data_size().unwrap() > 0);
    c.set_mig_state(MigState::Running).unwrap();
    assert!(matches!(
        c.mig_data_read(16),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
}

fn precopy_info(c: &mut Client) -> (u64, u64) {
    let d = c.feature_get(vfud::FEATURE_PRECOPY_INFO, &[], 16).unwrap();
    (
        u64::from_le_bytes(d[..8].try_into().unwrap()),
        u64::from_le_bytes(d[8..16].try_into().unwrap()),
    )
}

#[test]
fn pre_copy_counts_shrink_when_read_and_grow_when_the_device_dirties_memory() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    c.set_mig_state(MigState::PreCopy).unwrap();
    let (initial, dirty) = precopy_info(&mut c);
    assert!(initial >= 1 << 20, "BAR2 is initial data: {initial}");
    assert_eq!(dirty, 0);
    c.mig_data_read(300_000).unwrap();
    assert!(precopy_info(&mut c).0 < initial);
    while !c.mig_data_read(CHUNK).unwrap().is_empty() {}
    assert_eq!(
        precopy_info(&mut c),
        (0, 0),
        "a short read means nothing more for now"
    );
    // The device keeps running in PRE_COPY and dirties its memory.
    run_op(&mut c, Opcode::FillDevice, 0, 0x8000, 3 * 4096, 0x11);
    assert_eq!(precopy_info(&mut c), (0, 3 * 4096));
    let delta = c.mig_data_read(CHUNK).unwrap();
    assert!(delta.len() > 3 * 4096 && delta.len() < 4 * 4096);
    assert_eq!(precopy_info(&mut c).1, 0);
    assert!(matches!(
        c.feature_get(vfud::FEATURE_PRECOPY_INFO, &[], 16)
            .map(|_| ()),
        Ok(())
    ));
    c.set_mig_state(MigState::Running).unwrap();
    assert!(
        c.feature_get(vfud::FEATURE_PRECOPY_INFO, &[], 16).is_err(),
        "only in PRE_COPY"
    );
}

#[test]
fn dma_engine_saved_in_one_process_is_restored_in_another_field_by_field() {
    let src_v = Vfud::start("dma-engine", &[]);
    let dst_v = Vfud::start("dma-engine", &[]);
    let mut src = src_v.client();
    let mut dst = dst_v.client();
    let ram = memfd(RAM_SIZE);
    busy_dma_engine(&mut src, &ram);
    let regs: Vec<u32> = (0..16).map(|i| r(&mut src, i * 4)).collect();
    let cfg = src.region_read(7, 0, 256).unwrap();
    let stream = save(&mut src);
    restore(&mut dst, &stream).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    let regs2: Vec<u32> = (0..16).map(|i| r(&mut dst, i * 4)).collect();
    assert_eq!(regs2, regs, "every register");
    assert_eq!(dst.region_read(7, 0, 256).unwrap(), cfg, "config space");
    assert_eq!(dst.region_read(2, 0x10, 14).unwrap(), b"device memory!");
    assert_eq!(dst.region_read(2, 0x3000, 8192).unwrap(), vec![0x42; 8192]);
    // The destination's own save equals the source's, section by section.
    src.set_mig_state(MigState::Running).unwrap();
    let again_src = save(&mut src);
    let again_dst = save(&mut dst);
    assert_eq!(device_state_of(&again_dst), device_state_of(&again_src));
    assert_eq!(sections(&again_dst), sections(&again_src));
}

#[test]
fn uart_saved_in_one_process_is_restored_in_another_field_by_field() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let src_v = Vfud::start_in(dir_a, "uart16550,backend=null");
    let dst_v = Vfud::start_in(dir_b, "uart16550,backend=null");
    let mut src = src_v.client();
    let mut dst = dst_v.client();
    let b = |c: &mut Client, off: u64, v: u8| c.region_write(0, off, &[v]).unwrap();
    b(&mut src, 3, 0x80);
    b(&mut src, 0, 0x0c);
    b(&mut src, 3, 0x03);
    b(&mut src, 2, 0x87);
    b(&mut src, 1, 0x05);
    b(&mut src, 7, 0x77);
    b(&mut src, 4, 0x1b); // loopback, so THR lands in the receive FIFO
    for ch in b"queued" {
        b(&mut src, 0, *ch);
    }
    let stream = save(&mut src);
    restore(&mut dst, &stream).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    src.set_mig_state(MigState::Running).unwrap();
    assert_eq!(
        device_state_of(&save(&mut dst)),
        device_state_of(&save(&mut src))
    );
    dst.set_mig_state(MigState::Running).unwrap();
    let rd = |c: &mut Client, off: u64| c.region_read(0, off, 1).unwrap()[0];
    assert_eq!(
        (
            rd(&mut dst, 1),
            rd(&mut dst, 3),
            rd(&mut dst, 4),
            rd(&mut dst, 7)
        ),
        (0x05, 0x03, 0x1b, 0x77)
    );
    let fifo: Vec<u8> = (0..6).map(|_| rd(&mut dst, 0)).collect();
    assert_eq!(fifo, b"queued");
}

#[test]
fn bad_streams_are_refused_and_leave_the_destination_untouched() {
    let src_v = Vfud::start("dma-engine", &[]);
    let dst_v = Vfud::start("dma-engine", &[]);
    let uart_dir = tempfile::tempdir().unwrap();
    let uart_v = Vfud::start_in(uart_dir, "uart16550,backend=null");
    let mut src = src_v.client();
    let mut dst = dst_v.client();
    let mut uart = uart_v.client();
    src.region_write(2, 0, b"from the source").unwrap();
    let stream = save(&mut src);
    dst.region_write(2, 0, b"destination own").unwrap();
    w(&mut dst, reg::PATTERN, 5);
    // Wrong model.
    uart.set_mig_state(MigState::Resuming).unwrap();
    assert!(matches!(
        uart.mig_data_write(&stream[..4096]),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    // Truncated: refused when leaving RESUMING.
    assert!(matches!(
        restore(&mut dst, &stream[..stream.len() - 10]),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    assert_eq!(dst.mig_state().unwrap(), MigState::Resuming);
    dst.device_reset().unwrap();
    assert_eq!(
        dst.region_read(2, 0, 15).unwrap(),
        b"destination own",
        "nothing half-loaded"
    );
    // Sampled single-bit flips: every one refused, on the write or on leaving RESUMING.
    let mut positions: Vec<usize> = (0..64 * 8).collect();
    positions.extend((0..500).map(|i| (i * 7919 * 8 + 3) % (stream.len() * 8)));
    positions.extend((stream.len() - 64) * 8..stream.len() * 8);
    assert!(positions.len() >= 1000);
    for bit in positions {
        let mut m = stream.clone();
        m[bit / 8] ^= 1 << (bit % 8);
        dst.device_reset().unwrap();
        assert!(restore(&mut dst, &m).is_err(), "flip at bit {bit} accepted");
    }
    dst.device_reset().unwrap();
    assert_eq!(dst.region_read(2, 0, 15).unwrap(), b"destination own");
    restore(&mut dst, &stream).unwrap();
    assert_eq!(dst.region_read(2, 0, 15).unwrap(), b"from the source");
}

fn v1_read(c: &mut Client, off: u64, n: u32) -> u64 {
    let b = c.region_read(9, off, n).unwrap();
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(&b);
    u64::from_le_bytes(a)
}

#[test]
fn v1_region_client_and_v2_client_migrate_the_same_device() {
    let a_v = Vfud::start("dma-engine", &[]);
    let b_v = Vfud::start("dma-engine", &[]);
    let mut a = a_v.client();
    let mut b = b_v.client();
    // The v1 region and its capabilities.
    let (info, _) = a.region_info(9).unwrap();
    assert!(info.caps.contains(&RegionCap::Type {
        region_type: v1::REGION_TYPE_MIGRATION,
        subtype: v1::REGION_SUBTYPE_MIGRATION
    }));
    let ord = info
        .caps
        .iter()
        .find_map(|c| match c {
            RegionCap::Other { id, data, .. } if *id == vfud::REGION_CAP_MIGRATION_ORDERING => {
                Some(data.clone())
            }
            _ => None,
        })
        .expect("ordering capability");
    let feat = a
        .feature_get(vfud::FEATURE_MIGRATION_ORDERING, &[], 8)
        .unwrap();
    assert_eq!(&ord[..8], &feat[..8], "same fact through both");
    assert_eq!(
        u32::from_le_bytes(feat[..4].try_into().unwrap()),
        vfud::ORDERING_SET_IRQS_DEFERRED | vfud::ORDERING_CONFIG_BEFORE_DATA,
        "the dma-engine restores jobs in flight against its config"
    );

    a.region_write(2, 0x100, b"v1 migrated").unwrap();
    w(&mut a, reg::PATTERN, 0x1234);
    // Save through the v1 region: RUNNING|SAVING (pre-copy), then SAVING (stop-and-copy).
    let set = |c: &mut Client, bits: u32| c.region_write(9, 0, &bits.to_le_bytes()).unwrap();
    set(&mut a, v1::DEVICE_STATE_RUNNING | v1::DEVICE_STATE_SAVING);
    assert_eq!(a.mig_state().unwrap(), MigState::PreCopy);
    let mut stream = Vec::new();
    let drain = |c: &mut Client, stream: &mut Vec<u8>| loop {
        let pending = v1_read(c, v1::OFF_PENDING_BYTES, 8);
        if pending == 0 {
            break;
        }
        let off = v1_read(c, v1::OFF_DATA_OFFSET, 8);
        let size = v1_read(c, v1::OFF_DATA_SIZE, 8) as usize;
        let mut done = 0;
        while done < size {
            let n = (size - done).min(1 << 19);
            stream.extend(c.region_read(9, off + done as u64, n as u32).unwrap());
            done += n;
        }
    };
    drain(&mut a, &mut stream);
    set(&mut a, v1::DEVICE_STATE_SAVING);
    assert_eq!(v1_read(&mut a, 0, 4) as u32, v1::DEVICE_STATE_SAVING);
    drain(&mut a, &mut stream);
    // Restore through v2 on the other process.
    restore(&mut b, &stream).unwrap();
    b.set_mig_state(MigState::Running).unwrap();
    assert_eq!(b.region_read(2, 0x100, 11).unwrap(), b"v1 migrated");
    assert_eq!(r(&mut b, reg::PATTERN), 0x1234);
    // And back: save with v2, restore with v1.
    b.region_write(2, 0x200, b"and back").unwrap();
    let back = save(&mut b);
    set(&mut a, 0);
    set(&mut a, v1::DEVICE_STATE_RESUMING);
    for chunk in back.chunks(1 << 19) {
        a.region_write(9, 4096, chunk).unwrap();
        a.region_write(9, v1::OFF_DATA_SIZE, &(chunk.len() as u64).to_le_bytes())
            .unwrap();
    }
    set(&mut a, v1::DEVICE_STATE_RUNNING);
    assert_eq!(a.mig_state().unwrap(), MigState::Running);
    assert_eq!(a.region_read(2, 0x200, 8).unwrap(), b"and back");
    // SAVING|RESUMING is not a state.
    assert!(a.region_write(9, 0, &6u32.to_le_bytes()).is_err());
}

#[test]
fn dirty_logging_reports_pages_the_device_wrote() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    let ram = memfd(RAM_SIZE);
    c.dma_map(RW, 0, RAM_IOVA, RAM_SIZE, Some(ram.as_fd()))
        .unwrap();
    let rep = DmaLoggingReport {
        iova: RAM_IOVA,
        length: RAM_SIZE,
        page_size: 4096,
    };
    assert!(c.dma_logging_report(&rep).is_err(), "not started");
    c.dma_logging_start(&DmaLoggingControl {
        page_size: 4096,
        ranges: vec![],
    })
    .unwrap();
    run_op(&mut c, Opcode::Fill, 0, RAM_IOVA + 2 * 4096 + 100, 4096, 1);
    let bm = c.dma_logging_report(&rep).unwrap();
    assert_eq!(bm.len(), 256 / 8);
    assert_eq!(bm[0], 0b1100, "pages 2 and 3");
    assert!(bm[1..].iter().all(|b| *b == 0));
    assert!(
        c.dma_logging_report(&rep).unwrap().iter().all(|b| *b == 0),
        "report clears"
    );
    // A map added after START is covered.
    let ram2 = memfd(0x10000);
    c.dma_map(RW, 0, 0x9000_0000, 0x10000, Some(ram2.as_fd()))
        .unwrap();
    run_op(&mut c, Opcode::Fill, 0, 0x9000_0000 + 0x5000, 16, 2);
    let bm = c
        .dma_logging_report(&DmaLoggingReport {
            iova: 0x9000_0000,
            length: 0x10000,
            page_size: 4096,
        })
        .unwrap();
    assert_eq!(bm[0], 1 << 5);
    c.dma_logging_stop().unwrap();
    assert!(c.dma_logging_report(&rep).is_err());
}
