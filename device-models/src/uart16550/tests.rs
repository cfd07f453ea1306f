//! Socket-free tests of the UART on a [`TestBench`] (the host side uses real sockets and
//! files, the vfio-user side none).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

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
    assert_ne!(rd(&mut b, LSR) & LSR_THRE, 0);
    assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_NO_INT);
    assert_eq!(std::fs::read(&path).unwrap(), b"hello");
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
    rd(&mut b, IIR); // the handler's last IIR read hands the output over
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

fn file_bench() -> (tempfile::TempDir, std::path::PathBuf, TestBench) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    let backend = Backend::parse(&format!("file:{}", path.display())).unwrap();
    let b = bench_with(backend);
    (dir, path, b)
}

fn socket_bench() -> (tempfile::TempDir, UnixStream, TestBench) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.sock");
    let backend = Backend::parse(&format!("socket:{}", path.display())).unwrap();
    let mut b = bench_with(backend);
    let host = UnixStream::connect(&path).unwrap();
    b.server().device_event(TOKEN_LISTENER);
    (dir, host, b)
}

/// Sleep past `d` and run the device's timer, as the event loop does at its deadline.
fn after(b: &mut TestBench, d: Duration) {
    std::thread::sleep(d + Duration::from_millis(1));
    b.server().device_timer();
}

#[test]
fn output_is_held_until_a_flush_point_not_written_per_byte() {
    let (_dir, path, mut b) = file_bench();
    wr(&mut b, IER, IER_THRI);
    for c in b"batch" {
        wr(&mut b, RBR, *c);
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"", "no write per byte");
    // The driver's stop_tx (IER loses THRI) is the moment its buffer ran dry.
    wr(&mut b, IER, 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"batch");
}

#[test]
fn output_is_flushed_at_flush_size() {
    let (_dir, path, mut b) = file_bench();
    let data: Vec<u8> = (0..FLUSH_SIZE + 3).map(|i| (i % 251) as u8).collect();
    for c in &data {
        wr(&mut b, RBR, *c);
    }
    assert_eq!(std::fs::read(&path).unwrap(), &data[..FLUSH_SIZE]);
    assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_NO_INT);
    assert_eq!(std::fs::read(&path).unwrap(), data);
}

#[test]
fn output_is_flushed_by_the_tick_when_the_driver_goes_quiet() {
    let (_dir, path, mut b) = file_bench();
    wr(&mut b, RBR, b'x');
    let (_, deadline) = b.server().device_sources();
    let deadline = deadline.expect("a flush deadline while output waits");
    assert!(deadline <= Instant::now() + FLUSH_TICK);
    after(&mut b, FLUSH_TICK);
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
    assert_eq!(b.server().device_sources().1, None, "nothing left to time");
}

/// Host input of `n` bytes, the UART set up as Linux's 8250 driver does (FIFO, RX interrupt).
fn rx_bench(n: usize) -> (tempfile::TempDir, UnixStream, TestBench, Vec<u8>) {
    let (dir, mut host, mut b) = socket_bench();
    b.wire_irqs(0, 1);
    wr(&mut b, IIR, FCR_ENABLE | 0x80); // FIFO on, trigger at 8
    wr(&mut b, MCR, 0x08);
    wr(&mut b, IER, IER_RDI | IER_RLSI);
    let data: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
    host.write_all(&data).unwrap();
    b.server().device_event(TOKEN_CONN);
    (dir, host, b, data)
}

/// The 8250 receive loop: RBR then LSR while LSR says data ready.
fn drain_fifo(b: &mut TestBench, got: &mut Vec<u8>) -> usize {
    let mut n = 0;
    while rd(b, LSR) & LSR_DR != 0 {
        got.push(rd(b, RBR));
        n += 1;
    }
    n
}

#[test]
fn input_arrives_in_batches_one_interrupt_each_and_no_refire_on_unmask() {
    let (_dir, _host, mut b, data) = rx_bench(FIFO_SIZE + RX_BATCH + 20);
    let mut got = Vec::new();
    let mut batches = Vec::new();
    loop {
        let irqs = b.interrupts();
        if irqs.is_empty() {
            break;
        }
        assert_eq!(irqs, vec![(0, 0, 1)], "one interrupt per batch");
        // The 8250 handler: IIR, then (QEMU's EOI at that first access) the unmask, which
        // must not fire again while the handler runs.
        assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_RDI);
        b.unmask_intx();
        assert!(b.interrupts().is_empty(), "no re-raise inside the handler");
        batches.push(drain_fifo(&mut b, &mut got));
        assert_eq!(rd(&mut b, IIR) & 0x0f, IIR_NO_INT, "handler done");
    }
    assert_eq!(got, data);
    // The FIFO filled before the interrupt, then a byte for each one read, up to RX_BATCH.
    assert_eq!(batches, vec![FIFO_SIZE + RX_BATCH, 20]);
}

#[test]
fn a_service_window_left_alone_raises_what_is_still_pending() {
    let (_dir, _host, mut b, _data) = rx_bench(4);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
    assert_ne!(rd(&mut b, IIR) & 0x0f, IIR_NO_INT);
    b.unmask_intx();
    assert!(b.interrupts().is_empty());
    // A driver that returns without emptying the FIFO gets the interrupt again.
    let (_, deadline) = b.server().device_sources();
    assert!(deadline.is_some_and(|d| d <= Instant::now() + SERVICE_GRACE));
    after(&mut b, SERVICE_GRACE);
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
}

#[test]
fn a_polling_reader_gets_the_whole_stream_without_iir() {
    let (_dir, _host, mut b, data) = rx_bench(100);
    wr(&mut b, IER, 0);
    let mut got = Vec::new();
    drain_fifo(&mut b, &mut got);
    assert_eq!(got, data, "RBR reads outside an interrupt refill the FIFO");
}

#[test]
fn transmit_interrupts_batch_without_refiring_and_output_flushes_at_handler_end() {
    let (_dir, mut host, mut b) = socket_bench();
    b.wire_irqs(0, 1);
    wr(&mut b, MCR, 0x08);
    wr(&mut b, IER, IER_THRI);
    let data: Vec<u8> = (0..48u8).collect();
    let mut sent = 0;
    assert_eq!(b.interrupts(), vec![(0, 0, 1)]);
    // One handler run: IIR says THR empty, 16 bytes per pass, until the data is sent.
    let mut first = true;
    loop {
        let iir = rd(&mut b, IIR) & 0x0f;
        if first {
            b.unmask_intx();
            first = false;
        }
        assert!(b.interrupts().is_empty(), "no re-raise inside the handler");
        if iir == IIR_NO_INT {
            break;
        }
        assert_eq!(iir, IIR_THRI);
        for c in &data[sent..sent + 16] {
            wr(&mut b, RBR, *c);
        }
        sent += 16;
        if sent == data.len() {
            wr(&mut b, IER, 0); // stop_tx
        }
    }
    let mut got = vec![0u8; data.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn a_restored_uart_raises_what_its_driver_left_pending_in_a_service_window() {
    let (_dir, _host, mut a, _data) = rx_bench(4);
    assert_eq!(a.interrupts(), vec![(0, 0, 1)]);
    // The driver's handler has started (line held low) when the VM stops.
    assert_ne!(rd(&mut a, IIR) & 0x0f, IIR_NO_INT);
    let stream = a.save_stream().unwrap();

    let mut b = bench_with(Backend::Null);
    b.restore_stream(&stream).unwrap();
    b.wire_irqs(0, 1);
    // The event loop runs the timer only at a deadline the device asks for.
    let (_, deadline) = b.server().device_sources();
    assert!(deadline.is_some(), "a timer for what is pending");
    after(&mut b, SERVICE_GRACE);
    assert_eq!(
        b.interrupts(),
        vec![(0, 0, 1)],
        "the data waiting is announced"
    );
    let got: Vec<u8> = (0..4).map(|_| rd(&mut b, RBR)).collect();
    assert_eq!(got, b"abcd");
}

#[test]
fn nothing_runs_between_stop_and_running() {
    use vfud_server::vfud_protocol_reexport::MigState;
    let (_dir, mut host, mut b) = socket_bench();
    b.set_state(MigState::Stop).unwrap();
    host.write_all(b"late").unwrap();
    // The event fires while stopped: the device must not take the bytes in (they would be
    // neither in a saved state nor left for the new owner).
    b.server().device_event(TOKEN_CONN);
    let st: UartState = b.device_state().decode(STATE_VERSION).unwrap();
    assert!(st.regs.rx_fifo.is_empty() && st.input.is_empty(), "{st:?}");
    // Back to RUNNING, the missed event is replayed.
    b.set_state(MigState::Running).unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        while rd(&mut b, LSR) & LSR_DR != 0 {
            got.push(rd(&mut b, RBR));
        }
        if got.len() >= 4 {
            break;
        }
        b.server().device_event(TOKEN_CONN);
    }
    assert_eq!(got, b"late");
}

#[test]
fn a_crash_restore_of_an_open_port_offers_a_thr_empty_interrupt_and_a_closed_one_stays_quiet() {
    let mut open = Uart16550::new(Backend::Null);
    open.regs.ier = IER_RDI | IER_RLSI; // as 8250 leaves it while the port is open
    let mut closed = Uart16550::new(Backend::Null);

    Migratable::restored_after_crash(&mut open);
    Migratable::restored_after_crash(&mut closed);

    assert_eq!(open.regs.pending_iir(), IIR_THRI);
    assert_eq!(closed.regs.ier, 0);
    assert_eq!(closed.regs.pending_iir(), IIR_NO_INT);
}
