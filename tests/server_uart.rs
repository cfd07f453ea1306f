//! `uart16550` over a real socket: the registers the 8250 driver relies on, INTx level
//! semantics, and the host backend socket carrying bytes both ways.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::Vfud;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vfud_protocol::messages::irq::IRQ_INDEX_INTX;
use vfud_protocol::messages::IrqAction;
use vfud_protocol::Client;

const BAR0: u32 = 0;

fn start() -> (Vfud, UnixStream) {
    start_with("")
}

/// The UART with extra device options (e.g. `,bar=io`).
fn start_with(options: &str) -> (Vfud, UnixStream) {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("uart.host");
    let v = Vfud::start_in(
        dir,
        &format!("uart16550,backend=socket:{}{options}", host.display()),
    );
    assert!(common::wait_for_path(&host, Duration::from_secs(5)));
    let s = UnixStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (v, s)
}

fn rd(c: &mut Client, off: u64) -> u8 {
    c.region_read(BAR0, off, 1).unwrap()[0]
}

fn wr(c: &mut Client, off: u64, v: u8) {
    c.region_write(BAR0, off, &[v]).unwrap();
}

fn fired(e: &EventFd, ms: u16) -> bool {
    let mut p = [PollFd::new(e.as_fd(), PollFlags::POLLIN)];
    if poll(&mut p, PollTimeout::from(ms)).unwrap_or(0) == 0 {
        return false;
    }
    let mut b = [0u8; 8];
    nix::unistd::read(e.as_fd(), &mut b).is_ok()
}

#[test]
fn identity_is_a_16550_compatible_serial_port_with_a_memory_bar_by_default() {
    let (v, _h) = start();
    let mut c = v.client();
    assert_eq!(c.region_read_u32(7, 8).unwrap() >> 8, 0x070002);
    // 10ec:816a, an entry of 8250_pci's table for a 16550 at BAR 0; subsystem 5646:0002.
    assert_eq!(c.region_read_u32(7, 0).unwrap(), 0x816a_10ec);
    assert_eq!(c.region_read_u32(7, 0x2c).unwrap(), 0x0002_5646);
    c.region_write_u32(7, 0x10, u32::MAX).unwrap();
    assert_eq!(
        c.region_read_u32(7, 0x10).unwrap(),
        0xffff_f000,
        "4 KiB 32-bit memory BAR"
    );
    assert_eq!(c.region_read(7, 0x3d, 1).unwrap(), vec![1], "INTA");
}

#[test]
fn identity_is_a_16550_compatible_serial_port_with_an_io_bar() {
    let (v, _h) = start_with(",bar=io");
    let mut c = v.client();
    assert_eq!(c.region_read_u32(7, 0).unwrap(), 0x0002_5646);
    assert_eq!(c.region_read_u32(7, 8).unwrap() >> 8, 0x070002);
    c.region_write_u32(7, 0x10, u32::MAX).unwrap();
    assert_eq!(
        c.region_read_u32(7, 0x10).unwrap(),
        0xffff_fff9,
        "8-byte I/O BAR"
    );
    assert_eq!(c.region_info(0).unwrap().0.info.size, 8);
    assert_eq!(c.region_read(7, 0x3d, 1).unwrap(), vec![1], "INTA");
}

#[test]
fn registers_behave_like_the_8250_driver_expects() {
    let (v, _h) = start();
    let mut c = v.client();
    wr(&mut c, 7, 0xa5);
    assert_eq!(rd(&mut c, 7), 0xa5, "scratch");
    // Divisor latch behind DLAB.
    wr(&mut c, 3, 0x80);
    wr(&mut c, 0, 0x01);
    wr(&mut c, 1, 0x00);
    assert_eq!((rd(&mut c, 0), rd(&mut c, 1)), (1, 0));
    wr(&mut c, 3, 0x03);
    // FIFO enable shows in IIR bits 6-7 (16550A detection).
    wr(&mut c, 2, 0xc7);
    assert_eq!(rd(&mut c, 2) & 0xc0, 0xc0);
    // Loopback: MCR outputs appear in MSR, and THR comes back on RBR.
    wr(&mut c, 4, 0x10 | 0x0a);
    assert_eq!(rd(&mut c, 6) & 0xf0, 0x90);
    wr(&mut c, 0, b'Z');
    assert_eq!(rd(&mut c, 5) & 0x01, 1, "data ready");
    assert_eq!(rd(&mut c, 0), b'Z');
    wr(&mut c, 4, 0x0b);
    assert_eq!(rd(&mut c, 5) & 0x60, 0x60, "THR and transmitter empty");
}

#[test]
fn bytes_flow_both_ways_with_level_triggered_intx() {
    let (v, mut host) = start();
    let mut c = v.client();
    let trig = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(IRQ_INDEX_INTX, 0, &[trig.as_fd()])
        .unwrap();
    wr(&mut c, 2, 0x07); // FIFO on, trigger 1
    wr(&mut c, 1, 0x01); // receive interrupts only
    assert!(!fired(&trig, 50));
    host.write_all(b"hi\n").unwrap();
    assert!(fired(&trig, 2000), "RX raises INTx");
    assert_eq!(rd(&mut c, 2) & 0x0f, 0x04, "IIR: received data");
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < 3 && t.elapsed() < Duration::from_secs(5) {
        if rd(&mut c, 5) & 1 == 1 {
            got.push(rd(&mut c, 0));
        }
    }
    assert_eq!(got, b"hi\n");
    assert_eq!(rd(&mut c, 2) & 0x01, 1, "no interrupt pending once drained");
    // Automasked: unmask, and the line is low now, so nothing fires.
    c.irq_action(IrqAction::Unmask, IRQ_INDEX_INTX, 0, 1)
        .unwrap();
    assert!(!fired(&trig, 50));
    // THR-empty interrupt on enable.
    wr(&mut c, 1, 0x03);
    assert!(fired(&trig, 2000));
    assert_eq!(rd(&mut c, 2) & 0x0f, 0x02, "IIR: THR empty");
    assert_eq!(rd(&mut c, 2) & 0x0f, 0x01, "reading IIR cleared it");
    // Guest output reaches the host intact.
    let msg: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    for b in &msg {
        wr(&mut c, 0, *b);
    }
    let mut back = vec![0u8; msg.len()];
    host.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn more_input_than_the_fifo_holds_is_not_lost() {
    let (v, mut host) = start();
    let mut c = v.client();
    wr(&mut c, 2, 0x07);
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    host.write_all(&data).unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < data.len() && t.elapsed() < Duration::from_secs(20) {
        if rd(&mut c, 5) & 1 == 1 {
            got.push(rd(&mut c, 0));
        }
    }
    assert_eq!(got, data);
    assert_eq!(rd(&mut c, 5) & 0x02, 0, "no overrun");
}
