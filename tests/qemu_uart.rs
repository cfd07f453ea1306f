//! The Linux guest's tty on a vfud `uart16550` (registers in a memory BAR, stock 8250_pci
//! driver, ttyS4), with a host client on the UART's backend socket: 64 KiB written by the guest
//! reach the host byte for byte, a line sent by the host is read by the guest, and the UART's
//! interrupt count in `/proc/interrupts` rises while that happens.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::qemu::{
    guest_values, QemuOpts, SysfsResource, GUEST_TIMEOUT, PCI_GUEST_LIB, QMP_TIMEOUT,
    UART_KERNEL_ARG,
};
use common::Vfud;

/// Bytes the guest writes.
const PATTERN_LEN: usize = 64 * 1024;
/// The line the host sends.
const HOST_LINE: &str = "hello-guest-from-the-vfud-host-side:0123456789";

/// The pattern: every byte value once (0x00…0xff, so raw mode must pass all of them
/// untranslated), then the decimal numbers 0, 1, 2, … one per line, cut at `PATTERN_LEN`.
/// Position-dependent, so lost, repeated or reordered bytes show.
fn pattern() -> Vec<u8> {
    let mut p: Vec<u8> = (0..=255u8).collect();
    let mut i = 0u32;
    while p.len() < PATTERN_LEN {
        p.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    p.truncate(PATTERN_LEN);
    p
}

/// The guest script: the same pattern built with busybox (`printf` octal escapes for the
/// byte values, `seq` for the numbers), the tty held open on fd 3 in raw mode.
fn guest_script() -> String {
    let all_bytes: String = (0..=255u8).map(|b| format!("\\{b:03o}")).collect();
    format!(
        r#"{PCI_GUEST_LIB}
uart=$(find_pci_sub 0x5646 0x0002) || {{ fail "no subsystem 5646:0002 (uart16550)"; exit 1; }}
report_pci uart "$uart"
tty=/dev/$(ls "$uart/tty" | head -n 1)
irq=$(cat "$uart/irq")
# Hold the port open (the driver frees its IRQ on last close) and make it 8-bit clean:
# no output post-processing (onlcr), no input translation or flow control, no echo.
exec 3<>"$tty"
stty -F "$tty" 115200 raw -echo -echoe -echok -echonl -onlcr -crtscts clocal cs8 -parenb \
  || fail "stty"
echo "VFUD-TEST: stty: $(stty -F "$tty")"
echo "VFUD-TEST: irq_line_before: $(irq_line "$irq")"
ok "irq_before=$(irq_count "$irq")"
printf '{all_bytes}' > /tmp/pattern
seq 0 20000 >> /tmp/pattern
head -c {PATTERN_LEN} /tmp/pattern > /tmp/out
ok "pattern_len=$(wc -c < /tmp/out)"
cat /tmp/out >&3 || fail "write to $tty"
ok "pattern_written=1"
ok "ready_to_read=1"
if read -t 20 -r line <&3; then ok "guest_read=$line"; else fail "read from $tty timed out"; fi
echo "VFUD-TEST: irq_line_after: $(irq_line "$irq")"
ok "irq_after=$(irq_count "$irq")"
exec 3>&-   # the last close waits until the output has drained
# The driver's own counters (/proc/tty/driver/serial "N: uart:16550A … tx:T rx:R …").
line=$(grep "^${{tty#/dev/ttyS}}:" /proc/tty/driver/serial)
echo "VFUD-TEST: serial: $line"
ok "driver_tx=$(echo "$line" | sed -n 's/.* tx:\([0-9]*\).*/\1/p')" \
   "driver_rx=$(echo "$line" | sed -n 's/.* rx:\([0-9]*\).*/\1/p')"
exit $fails
"#
    )
}

/// The host side of the UART: a thread that keeps every byte read from the backend socket.
struct HostReader {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: JoinHandle<Vec<u8>>,
}

impl HostReader {
    fn spawn(mut s: UnixStream) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let (stop2, received2) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("read timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            while !stop2.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        received2.store(got.len(), Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("reading the UART host socket: {e}"),
                }
            }
            got
        });
        Self {
            stop,
            received,
            thread,
        }
    }

    /// Wait (up to `timeout`) until `len` bytes arrived, then a little longer so that
    /// surplus bytes would show too; stop and return everything received.
    fn finish(self, len: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        while self.received.load(Ordering::Relaxed) < len && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("reader thread")
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn guest_tty_on_vfud_uart_carries_64k_out_and_a_line_in_with_interrupts() {
    // Arrange: vfud with the UART's backend on a socket, and the host client connected
    // before the guest boots.
    let dir = tempfile::tempdir().expect("tempdir");
    let host_sock = dir.path().join("uart.host.sock");
    let vfud = Vfud::start_in(
        dir,
        &format!("uart16550,backend=socket:{}", host_sock.display()),
    );
    assert!(
        common::wait_for_path(&host_sock, Duration::from_secs(5)),
        "no backend socket"
    );
    let host = UnixStream::connect(&host_sock).expect("connect to the UART backend");
    let mut host_tx = host.try_clone().expect("clone");
    let reader = HostReader::spawn(host);
    let expected = pattern();

    // Act: the guest writes the pattern; when it is ready to read, the host sends a line.
    let started = Instant::now();
    let mut qemu = QemuOpts::new()
        .device(&vfud.socket)
        .kernel_arg(UART_KERNEL_ARG)
        .guest(&guest_script())
        .start();
    qemu.wait_for_serial("ready_to_read=1", GUEST_TIMEOUT);
    let written = started.elapsed();
    host_tx
        .write_all(format!("{HOST_LINE}\n").as_bytes())
        .expect("send the line to the guest");
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    // The guest's last close of the tty waited for its output to drain, so all of it has
    // left the UART by now; vfud may still be passing the tail to the socket.
    let got = reader.finish(PATTERN_LEN, Duration::from_secs(5));
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    let diag = || qemu.diagnostics();
    eprintln!(
        "[test] guest wrote {} bytes, host received {} (guest ready to read after {written:.1?})",
        get("pattern_len"),
        got.len()
    );

    // Assert: (a) guest → host, byte for byte.
    assert_eq!(get("uart_tty"), "ttyS4", "{}", diag());
    assert_eq!(get("uart_driver"), "serial", "{}", diag());
    let bar0 =
        SysfsResource::parse(get("uart_res0")).unwrap_or_else(|| panic!("uart_res0: {}", diag()));
    assert!(
        bar0.has(SysfsResource::MEM),
        "BAR0 is memory (posted writes): {bar0:x?}"
    );
    assert_eq!(
        get("pattern_len"),
        PATTERN_LEN.to_string(),
        "guest-side generator: {}",
        diag()
    );
    if let Some(at) = first_difference(&got, &expected) {
        let ctx = |b: &[u8]| b[at.min(b.len())..(at + 32).min(b.len())].to_vec();
        panic!(
            "host received {} bytes, expected {}; first difference at offset {at}: got {:?}…, expected {:?}…\n{}",
            got.len(),
            expected.len(),
            ctx(&got),
            ctx(&expected),
            diag()
        );
    }
    assert_eq!(get("driver_tx"), PATTERN_LEN.to_string(), "{}", diag());
    // (b) host → guest.
    assert_eq!(get("guest_read"), HOST_LINE, "{}", diag());
    assert_eq!(
        get("driver_rx"),
        (HOST_LINE.len() + 1).to_string(),
        "{}",
        diag()
    );
    // (c) the UART's interrupt line fired.
    let before: u64 = get("irq_before")
        .parse()
        .unwrap_or_else(|_| panic!("irq_before: {}", diag()));
    let after: u64 = get("irq_after")
        .parse()
        .unwrap_or_else(|_| panic!("irq_after: {}", diag()));
    assert!(
        after > before,
        "UART interrupts did not rise ({before} → {after}): {}",
        diag()
    );
    let irq_line = log
        .lines()
        .find(|l| l.contains("irq_line_after:"))
        .unwrap_or("");
    assert!(
        irq_line.trim_end().ends_with("ttyS4"),
        "the counted IRQ belongs to ttyS4: {irq_line:?}"
    );
    assert_eq!(status, 0, "guest reported failures: {}", diag());
    qemu.wait_exit(QMP_TIMEOUT);
}
