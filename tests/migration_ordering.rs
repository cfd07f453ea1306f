//! The ordering capability with real semantics, over real sockets: a dma-engine job in
//! flight at STOP migrates and finishes on the destination only when config space (bus
//! mastering) was restored before the device data; restored in the wrong order the
//! migration fails cleanly and the source finishes the job. Also: ordering flags that
//! disagree, SET_IRQS queued by a client that went away, the MSI-X table in the stream, and
//! the v1 region's `pending_bytes`.

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{eventfd as efd, memfd, wait_eventfd as fired, Vfud};
use nix::errno::Errno;
use vfud_devices::dma_engine::{reg, Opcode, CONTROL_IRQ_ENABLE, STATUS_BUSY, STATUS_DONE};
use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::feature::v1;
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::{IrqAction, MigState};
use vfud_protocol::{Client, ProtocolError};
use vfud_server::migration::stream::{kind, put_section};

const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const RAM_IOVA: u64 = 0x1_0000_0000;
const JOB: u32 = 64 << 20;
/// A slow engine (64 KiB per event-loop turn) so a 64 MiB job is surely in flight at STOP.
const SLOW: &str = "dma-engine,slice=65536";
/// COMMAND with memory decoding and bus mastering.
const COMMAND_MEM_BME: [u8; 2] = [0x06, 0x00];

fn w(c: &mut Client, off: u64, v: u32) {
    c.region_write_u32(0, off, v).unwrap();
}

fn r(c: &mut Client, off: u64) -> u32 {
    c.region_read_u32(0, off).unwrap()
}

/// Guest RAM shared by both sides (as the VMM's RAM is), filled with a pattern.
fn ram() -> (File, Vec<u8>) {
    let f = memfd(u64::from(JOB));
    let data: Vec<u8> = (0..JOB)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    f.write_all_at(&data, 0).unwrap();
    (f, data)
}

/// A source running a 64 MiB CRC job with its completion on MSI-X vector 0.
fn source_with_job_in_flight(ram: &File) -> (Vfud, Client, nix::sys::eventfd::EventFd) {
    let v = Vfud::start(SLOW, &[]);
    let mut c = v.client();
    c.dma_map(RW, 0, RAM_IOVA, u64::from(JOB), Some(ram.as_fd()))
        .unwrap();
    c.region_write(7, 4, &COMMAND_MEM_BME).unwrap();
    let e = efd();
    c.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[e.as_fd()]).unwrap();
    w(&mut c, reg::CONTROL, CONTROL_IRQ_ENABLE);
    for (o, val) in [
        (reg::SRC_LO, RAM_IOVA as u32),
        (reg::SRC_HI, (RAM_IOVA >> 32) as u32),
        (reg::LEN, JOB),
        (reg::OPCODE, Opcode::Crc32 as u32),
        (reg::DOORBELL, 1),
    ] {
        w(&mut c, o, val);
    }
    (v, c, e)
}

fn save(c: &mut Client) -> Vec<u8> {
    c.set_mig_state(MigState::StopCopy).unwrap();
    let mut out = Vec::new();
    loop {
        let d = c.mig_data_read(1 << 20).unwrap();
        if d.is_empty() {
            return out;
        }
        out.extend(d);
    }
}

fn write_stream(c: &mut Client, stream: &[u8]) -> Result<(), ProtocolError> {
    for chunk in stream.chunks(1 << 20) {
        c.mig_data_write(chunk)?;
    }
    Ok(())
}

fn wait_done(c: &mut Client) -> u32 {
    for _ in 0..20_000 {
        let s = r(c, reg::STATUS);
        if s & STATUS_BUSY == 0 {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("job never finished");
}

fn destination(ram: &File) -> (Vfud, Client) {
    let v = Vfud::start(SLOW, &[]);
    let mut c = v.client();
    c.dma_map(RW, 0, RAM_IOVA, u64::from(JOB), Some(ram.as_fd()))
        .unwrap();
    (v, c)
}

#[test]
fn a_job_in_flight_finishes_on_the_destination_with_config_restored_first() {
    let (ram, data) = ram();
    let (_sv, mut src, src_irq) = source_with_job_in_flight(&ram);
    let stream = save(&mut src);
    let (_dv, mut dst) = destination(&ram);
    let dst_irq = efd();
    // QEMU's order for a config-before-data device: RESUMING, config, data, STOP, SET_IRQS
    // (validated now, applied at RUNNING), RUNNING.
    dst.set_mig_state(MigState::Resuming).unwrap();
    dst.region_write(7, 4, &COMMAND_MEM_BME).unwrap();
    write_stream(&mut dst, &stream).unwrap();
    dst.set_mig_state(MigState::Stop).unwrap();
    assert_eq!(
        r(&mut dst, reg::STATUS) & STATUS_BUSY,
        STATUS_BUSY,
        "the job was in flight"
    );
    dst.set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[dst_irq.as_fd()])
        .unwrap();
    assert_eq!(fired(&dst_irq, 50), 0, "nothing before RUNNING");
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(wait_done(&mut dst), STATUS_DONE);
    assert_eq!(r(&mut dst, reg::RESULT), crc32fast::hash(&data));
    assert_eq!(r(&mut dst, reg::COMPLETIONS), 1);
    assert_eq!(fired(&dst_irq, 2000), 1, "one completion interrupt");
    assert_eq!(fired(&dst_irq, 200), 0, "and only one");
    assert_eq!(fired(&src_irq, 50), 0, "none on the source");
}

#[test]
fn config_restored_after_the_data_fails_cleanly_and_the_source_finishes() {
    let (ram, data) = ram();
    let (_sv, mut src, src_irq) = source_with_job_in_flight(&ram);
    let stream = save(&mut src);
    let (_dv, mut dst) = destination(&ram);
    dst.set_mig_state(MigState::Resuming).unwrap();
    write_stream(&mut dst, &stream).unwrap();
    dst.region_write(7, 4, &COMMAND_MEM_BME).unwrap();
    assert!(matches!(
        dst.set_mig_state(MigState::Stop),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    dst.device_reset().unwrap();
    assert_eq!(r(&mut dst, reg::COMPLETIONS), 0, "destination unchanged");
    // The source goes back to RUNNING with its job and finishes it.
    src.set_mig_state(MigState::Running).unwrap();
    assert_eq!(wait_done(&mut src), STATUS_DONE);
    assert_eq!(r(&mut src, reg::RESULT), crc32fast::hash(&data));
    assert_eq!(fired(&src_irq, 2000), 1);
}

/// The stream with its header's ordering flags replaced (CRC recomputed: a consistent lie).
fn with_ordering(stream: &[u8], flags: u32) -> Vec<u8> {
    let len = u64::from_le_bytes(stream[8..16].try_into().unwrap()) as usize;
    let mut header = stream[16..16 + len].to_vec();
    header[10..14].copy_from_slice(&flags.to_le_bytes());
    let mut out = Vec::new();
    put_section(&mut out, kind::HEADER, &header);
    out.extend_from_slice(&stream[16 + len..]);
    out
}

#[test]
fn a_stream_whose_ordering_flags_disagree_is_refused() {
    let v = Vfud::start("dma-engine", &[]);
    let mut src = v.client();
    let stream = save(&mut src);
    let lie = with_ordering(&stream, 2); // SET_IRQS_DEFERRED only: "no config-before-data"
    let d = Vfud::start("dma-engine", &[]);
    let mut dst = d.client();
    dst.set_mig_state(MigState::Resuming).unwrap();
    write_stream(&mut dst, &lie).unwrap();
    assert!(matches!(
        dst.set_mig_state(MigState::Stop),
        Err(ProtocolError::Remote(Errno::EINVAL))
    ));
    dst.device_reset().unwrap();
    dst.set_mig_state(MigState::Resuming).unwrap();
    write_stream(&mut dst, &stream).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
}

#[test]
fn set_irqs_queued_by_a_client_that_left_is_not_applied_for_the_next() {
    let v = Vfud::start("dma-engine", &[]);
    let stream = save(&mut v.client());
    let d = Vfud::start("dma-engine", &[]);
    let old = efd();
    {
        let mut first = d.client();
        first.set_mig_state(MigState::Resuming).unwrap();
        first
            .set_irq_eventfds(IRQ_INDEX_MSIX, 0, &[old.as_fd()])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut second = d.client();
    write_stream(&mut second, &stream).unwrap();
    second.set_mig_state(MigState::Running).unwrap();
    second
        .irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 0, 1)
        .unwrap();
    assert_eq!(
        fired(&old, 200),
        0,
        "the first client's eventfd went with it"
    );
}

#[test]
fn the_msix_table_travels_in_the_stream() {
    let v = Vfud::start("dma-engine", &[]);
    let mut src = v.client();
    let entry: Vec<u8> = [0xfee0_1000u32, 0, 0x4041, 0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    src.region_write(4, 16, &entry).unwrap();
    let stream = save(&mut src);
    let d = Vfud::start("dma-engine", &[]);
    let mut dst = d.client();
    dst.set_mig_state(MigState::Resuming).unwrap();
    write_stream(&mut dst, &stream).unwrap();
    dst.set_mig_state(MigState::Running).unwrap();
    assert_eq!(dst.region_read(4, 16, 16).unwrap(), entry);
}

fn v1_u64(c: &mut Client, off: u64) -> u64 {
    let b = c.region_read(9, off, 8).unwrap();
    u64::from_le_bytes(b.try_into().unwrap())
}

#[test]
fn v1_pending_bytes_counts_what_remains_and_reaches_zero() {
    let v = Vfud::start("dma-engine", &[]);
    let mut c = v.client();
    c.region_write(
        9,
        v1::OFF_DEVICE_STATE,
        &v1::DEVICE_STATE_SAVING.to_le_bytes(),
    )
    .unwrap();
    let first = v1_u64(&mut c, v1::OFF_PENDING_BYTES);
    assert_eq!(
        v1_u64(&mut c, v1::OFF_PENDING_BYTES),
        first,
        "a repeated read has no effect"
    );
    assert!(
        first >= 1 << 20,
        "the whole 1 MiB of device memory is pending: {first}"
    );
    let mut total = 0u64;
    let mut last = first;
    loop {
        let pending = v1_u64(&mut c, v1::OFF_PENDING_BYTES);
        if pending == 0 {
            break;
        }
        assert!(
            pending <= last + 8192,
            "pending only shrinks: {pending} after {last}"
        );
        last = pending;
        let off = v1_u64(&mut c, v1::OFF_DATA_OFFSET);
        let size = v1_u64(&mut c, v1::OFF_DATA_SIZE);
        assert_eq!(
            v1_u64(&mut c, v1::OFF_DATA_OFFSET),
            off,
            "offset re-read: same chunk"
        );
        assert!(size > 0 && size <= pending);
        total += size;
    }
    assert!(total > 1 << 20);
}

/// The guest changes config while pre-copy runs: COMMAND toggled (memory decoding on, INTx
/// disabled) and, on the dma-engine, MSI-X vector 1 rewritten and masked.
struct GuestTouchesConfig {
    msix: bool,
    done: bool,
}

const GUEST_COMMAND: [u8; 2] = [0x06, 0x04];
const MSIX_ENTRY: [u32; 4] = [0xfee0_2000, 0, 0x4077, 1];

impl vfud::driver::VmHooks for GuestTouchesConfig {
    fn tick(&mut self, src: &mut vfud::driver::Endpoint) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        src.client.region_write(7, 4, &GUEST_COMMAND).unwrap();
        if self.msix {
            let e: Vec<u8> = MSIX_ENTRY.iter().flat_map(|x| x.to_le_bytes()).collect();
            src.client.region_write(4, 16, &e).unwrap();
        }
    }
}

fn migrate_with_config_changes(device: &str, force_v1: bool) -> vfud::driver::Report {
    use vfud::driver::{Endpoint, GuestRam, Options};
    let msix = device.starts_with("dma-engine");
    let (a, b) = (Vfud::start(device, &[]), Vfud::start(device, &[]));
    let ep = |v: &Vfud| {
        Endpoint::connect(&v.socket)
            .unwrap()
            .with_ram(GuestRam::new(&[(RAM_IOVA, 1 << 20)]).unwrap())
            .unwrap()
    };
    let (mut src, mut dst) = (ep(&a), ep(&b));
    let opts = Options {
        max_rounds: 3,
        stop_threshold: 0,
        force_v1,
        ..Options::default()
    };
    let mut hooks = GuestTouchesConfig { msix, done: false };
    let report = vfud::driver::migrate(&mut src, &mut dst, &opts, &mut hooks).unwrap();
    assert!(hooks.done, "pre-copy ran at least one round");
    let cmd = dst.client.region_read(7, 4, 2).unwrap();
    assert_eq!(
        cmd, GUEST_COMMAND,
        "{device} v1={force_v1}: COMMAND as the guest left it"
    );
    if msix {
        let e: Vec<u8> = MSIX_ENTRY.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(
            dst.client.region_read(4, 16, 16).unwrap(),
            e,
            "MSI-X entry, masked"
        );
        // Masked on the destination too: with an eventfd wired, a trigger latches in the PBA
        // instead of firing.
        let e = efd();
        dst.client
            .set_irq_eventfds(IRQ_INDEX_MSIX, 1, &[e.as_fd()])
            .unwrap();
        dst.client
            .irq_action(IrqAction::Trigger, IRQ_INDEX_MSIX, 1, 1)
            .unwrap();
        assert_eq!(fired(&e, 100), 0, "vector 1 is masked: not delivered");
        let pba = dst.client.region_read(4, 0x800, 8).unwrap();
        assert_eq!(pba[0] & 2, 2, "but pending");
    }
    report
}

#[test]
fn config_changed_during_precopy_arrives_in_both_orders_v2_and_v1() {
    for v1 in [false, true] {
        let r = migrate_with_config_changes("dma-engine", v1);
        assert!(r.config_before_data, "the dma-engine restores config first");
        let r = migrate_with_config_changes("uart16550,backend=null", v1);
        assert!(
            !r.config_before_data,
            "the UART restores config after its data"
        );
    }
}
