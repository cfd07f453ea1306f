//! Socket-free tests of the UART on a [`TestBench`] (the host side uses real sockets and
//! files, the vfio-user side none).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;
use vfud_server::testing::TestBench;

fn bench_with(backend: Backend) -> TestBench {
    TestBench::new(Box::new(Uart16550::new(backend)))
}

fn rd(b: &mut TestBench, off: u64) -> u8 {
    b.read(0, off, 1).unwrap()[0]
}

fn wr(b: &mut TestBench, off: u64, v: u8) {
    b.write(0, off, &[v]).unwrap();
}

#[test]
fn scratch_and_divisor_latch() {
    let mut b = bench_with(Backend::Null);
    wr(&mut b, SCR, 0x5a);
    assert_eq!(rd(&mut b, SCR), 0x5a);
    wr(&mut b, LCR, LCR_DLAB);
    wr(&mut b, RBR, 0x01);
    wr(&mut b, IER, 0x02);
    assert_eq!((rd(&mut b, RBR), rd(&mut b, IER)), (0x01, 0x02));
    wr(&mut b, LCR, 0x03);
    assert_eq!(rd(&mut b, IER), 0, "IER untouched by divisor writes");
}

#[test]
fn loopback_returns_what_was_sent() {
    let mut b = bench_with(Backend::Null);
    wr(&mut b, MCR, MCR_LOOP);
    wr(&mut b, RBR, b'x');
    assert_ne!(rd(&mut b, LSR) & LSR_DR, 0);
    assert_eq!(rd(&mut b, RBR), b'x');
    assert_eq!(rd(&mut b, LSR) & LSR_DR, 0);
}

#[test]
fn output_reaches_a_file_backend_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let backend = Backend::parse(&format!("file:{}", path.display())).unwrap();
    let mut b = bench_with(backend);
    for c in b"hello" {
        wr(&mut b, RBR, *c);
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    assert_ne!(rd(&mut b, LSR) & LSR_THRE, 0);
}

#[test]
fn thr_empty_interrupt_is_level_until_iir_read() {
    let mut b = bench_with(Backend::Null);
    b.wire_irqs(0, 1);
    wr(&mut b, MCR, 0x08); // OUT2, as Linux sets it
    wr(&mut b, IER, IER_THRI);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
    assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_THRI);
    assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_NO_INT, "IIR read cleared THRI");
    b.unmask_intx();
    assert!(
        b.interrupts().is_empty(),
        "the line is low: no re-fire on unmask"
    );
}

#[test]
fn host_input_fills_the_fifo_and_raises_rx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.sock");
    let backend = Backend::parse(&format!("socket:{}", path.display())).unwrap();
    let mut b = bench_with(backend);
    b.wire_irqs(0, 1);
    wr(&mut b, IER, IER_RDI);
    let mut host = UnixStream::connect(&path).unwrap();
    b.server().device_event(TOKEN_LISTENER);
    host.write_all(b"abc").unwrap();
    b.server().device_event(TOKEN_CONN);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
    let got: Vec<u8> = (0..3).map(|_| rd(&mut b, RBR)).collect();
    assert_eq!(got, b"abc");
    wr(&mut b, RBR, b'!');
    let mut c = [0u8; 1];
    host.read_exact(&mut c).unwrap();
    assert_eq!(&c, b"!");
}

#[test]
fn fifo_longer_than_sixteen_is_refused_on_load() {
    let mut u = Uart16550::new(Backend::Null);
    let st = UartState {
        regs: UartRegs {
            rx_fifo: (0..17).collect(),
            ..UartRegs::default()
        },
        ..UartState::default()
    };
    let s = DeviceState::encode(STATE_VERSION, &st).unwrap();
    assert!(u.load(&s, None).is_err());
}

vfud_server::migration_roundtrip_tests!(Box::new(Uart16550::new(Backend::Null)));

#[test]
fn nothing_runs_between_stop_and_running() {
    use vfud_server::vfud_protocol_reexport::MigState;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.sock");
    let backend = Backend::parse(&format!("socket:{}", path.display())).unwrap();
    let mut b = bench_with(backend);
    let mut host = UnixStream::connect(&path).unwrap();
    b.server().device_event(TOKEN_LISTENER);
    b.set_state(MigState::Stop).unwrap();
    host.write_all(b"late").unwrap();
    // The event fires while stopped: the device must not take the bytes in (they would be
    // neither in a saved state nor left for the new owner).
    b.server().device_event(TOKEN_CONN);
    let saved = b.device_state();
    let st: UartState = saved.decode(STATE_VERSION).unwrap();
    assert!(st.regs.rx_fifo.is_empty() && st.input.is_empty(), "{st:?}");
    // Back to RUNNING, the missed event is replayed.
    b.set_state(MigState::Running).unwrap();
    let got: Vec<u8> = (0..4).map(|_| rd(&mut b, RBR)).collect();
    assert_eq!(got, b"late");
}
