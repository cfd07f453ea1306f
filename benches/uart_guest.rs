//! Guest benchmark of the UART: one Linux guest under QEMU 11.1 (TCG) with vfud's `uart16550`
//! and QEMU's own `pci-serial` side by side, both set to 115200 baud. Each tty carries the same
//! pattern guest → host (the guest `cat`s it into the tty; the host checks every byte and
//! times first to last byte) and host → guest (the host writes it; the guest reads exactly that
//! many bytes with `head -c`, compares them with its own copy and reports their MD5, which
//! the host compares with its own). QEMU traces its vfio-user messages, so each vfud
//! direction also reports the messages QEMU sent per byte, how many of them waited for a reply
//! (round trips) and how many interrupts the guest took.
//!
//! `cargo bench --bench uart_guest -- [--bytes N] [--bar mem|io] [--no-trace]`, or
//! `scripts/uart-bench.sh`. Needs the provisioned QEMU environment (as the QEMU tests do).
//! Prints a Markdown table; the goals are vfud ≥ 0.25 × `pci-serial` in each direction and
//! never below the line rate. No thresholds are enforced: this is a measurement.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::qemu::{
    guest_values, parse_utc_ns, vfio_user_round_trips, QemuOpts, PCI_GUEST_LIB, TRACE_TIMESTAMPS,
    UART_KERNEL_ARG, VFIO_USER_ROUND_TRIP_EVENTS,
};
use common::Vfud;

/// Bytes per second of 115200 baud with 8N1 framing (10 bits per byte).
const LINE_RATE: f64 = 11_520.0;
/// Longest a phase may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(180);

struct Args {
    bytes: usize,
    bar: String,
    trace: bool,
}

fn args() -> Args {
    let mut a = Args {
        bytes: 128 * 1024,
        bar: "mem".into(),
        trace: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bytes" => a.bytes = it.next().and_then(|v| v.parse().ok()).expect("--bytes N"),
            "--bar" => a.bar = it.next().expect("--bar mem|io"),
            "--no-trace" => a.trace = false,
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}; use --bytes N, --bar mem|io, --no-trace"),
        }
    }
    a
}

/// The decimal numbers 0, 1, 2, … one per line, cut at `len` bytes (busybox `seq` in the
/// guest makes the same), so lost, repeated or reordered bytes show.
fn pattern(len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len + 8);
    let mut i = 0u32;
    while p.len() < len {
        p.extend_from_slice(format!("{i}\n").as_bytes());
        i += 1;
    }
    p.truncate(len);
    p
}

fn guest_script(n: usize) -> String {
    format!(
        r#"{PCI_GUEST_LIB}
v=$(find_pci_sub 0x5646 0x0002) || {{ fail "no vfud uart16550"; exit 1; }}
q=$(find_pci 0x1b36 0x0002) || {{ fail "no pci-serial"; exit 1; }}
seq 0 999999 | head -c {n} > /tmp/pattern
for d in vfud qemu; do
  if [ $d = vfud ]; then p=$v; else p=$q; fi
  tty=/dev/$(ls "$p/tty" | head -n 1)
  irq=$(cat "$p/irq")
  exec 3<>"$tty"
  stty -F "$tty" 115200 raw -echo -echoe -echok -echonl -onlcr -crtscts -ixon -ixoff clocal cs8 -parenb \
    || fail "stty $tty"
  ok "${{d}}_tty=${{tty#/dev/}} ${{d}}_bar0=$(head -n 1 "$p/resource" | cut -d' ' -f3)"
  ok "${{d}}_irq_tx0=$(irq_count "$irq")"
  ok "tx_go_$d=1"
  cat /tmp/pattern >&3 || fail "write $tty"
  ok "tx_written_$d=1"
  sleep 1   # the host counts the tail; the tty drains meanwhile
  ok "${{d}}_irq_rx0=$(irq_count "$irq")"
  ok "rx_ready_$d=1"
  head -c {n} <&3 > /tmp/rx || fail "read $tty"
  ok "rx_done_$d=1"
  ok "${{d}}_irq_rx1=$(irq_count "$irq")"
  ok "rx_len_$d=$(wc -c < /tmp/rx) rx_md5_$d=$(md5sum < /tmp/rx | cut -d' ' -f1)"
  cmp /tmp/rx /tmp/pattern > /tmp/cmp 2>&1 || fail "$d host->guest differs: $(cat /tmp/cmp)"
  exec 3>&-
done
exit $fails
"#
    )
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Wait until the guest printed `VFUD-TEST: key=1`; returns the wall clock (ns) when seen.
fn wait_marker(serial: &Path, key: &str) -> u64 {
    let needle = format!("{key}=1");
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let log = std::fs::read(serial).unwrap_or_default();
        if String::from_utf8_lossy(&log).contains(&needle) {
            return now_ns();
        }
        assert!(Instant::now() < deadline, "guest never printed {needle}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Read exactly `expected.len()` bytes from `s`; check them; the wall clock (ns) of the first
/// and the last byte.
fn receive(s: &mut UnixStream, expected: &[u8], what: &str) -> (u64, u64) {
    let mut got = Vec::with_capacity(expected.len());
    let mut buf = vec![0u8; 65536];
    let mut first = 0;
    s.set_read_timeout(Some(PHASE_TIMEOUT)).expect("timeout");
    while got.len() < expected.len() {
        let n = s
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert!(n > 0, "{what}: EOF after {} bytes", got.len());
        if got.is_empty() {
            first = now_ns();
        }
        got.extend_from_slice(&buf[..n]);
    }
    let last = now_ns();
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: guest → host differs at byte {at}");
    }
    assert_eq!(got.len(), expected.len(), "{what}: surplus bytes");
    (first, last)
}

fn md5(data: &[u8]) -> String {
    let mut c = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("md5sum input");
    let out = c.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// vfio-user traffic in a window of the trace: messages QEMU sent, how many replies it got,
/// the median time QEMU waited for one and the time it waited in all.
#[derive(Default, Clone, Copy)]
struct Traffic {
    sent: u64,
    replies: u64,
    median_wait: Duration,
    total_wait: Duration,
}

fn traffic(trace: &str, from_ns: u64, to_ns: u64) -> Traffic {
    let mut t = Traffic::default();
    for line in trace.lines() {
        let mut w = line.split_whitespace();
        let (Some(ts), Some(ev)) = (w.next(), w.next()) else {
            continue;
        };
        let Some(ns) = parse_utc_ns(ts) else { continue };
        if ns < from_ns || ns > to_ns {
            continue;
        }
        match ev {
            "vfio_user_send_write" => t.sent += 1,
            "vfio_user_recv_hdr" if line.contains("flags 0x1") => t.replies += 1,
            _ => {}
        }
    }
    let mut waits: Vec<Duration> = vfio_user_round_trips(trace)
        .iter()
        .filter(|r| r.sent_ns >= from_ns && r.replied_ns <= to_ns)
        .map(|r| r.latency())
        .collect();
    waits.sort();
    t.total_wait = waits.iter().sum();
    t.median_wait = waits.get(waits.len() / 2).copied().unwrap_or_default();
    t
}

struct Phase {
    bytes_per_s: f64,
    window: (u64, u64),
    irqs: Option<u64>,
}

fn rate(n: usize, (a, b): (u64, u64)) -> f64 {
    n as f64 / ((b.saturating_sub(a)).max(1) as f64 / 1e9)
}

fn main() {
    let a = args();
    let n = a.bytes;
    let expected = pattern(n);
    let dir = tempfile::tempdir().expect("tempdir");
    let d = std::fs::canonicalize(dir.path()).expect("canonical dir");
    let host_sock = d.join("uart.host");
    let ps_sock = d.join("pci-serial.host");
    let spec = format!(
        "uart16550,bar={},backend=socket:{}",
        a.bar,
        host_sock.display()
    );
    let vfud = Vfud::start_in(dir, &spec);
    let mut vfud_host = UnixStream::connect(&host_sock).expect("connect to the UART backend");

    let chardev = format!("socket,id=ps,path={},server=on,wait=off", ps_sock.display());
    let mut opts = QemuOpts::new()
        .device(&vfud.socket)
        .kernel_arg(UART_KERNEL_ARG)
        .guest(&guest_script(n))
        .args(&["-chardev", &chardev, "-device", "pci-serial,chardev=ps"]);
    if a.trace {
        for ev in VFIO_USER_ROUND_TRIP_EVENTS {
            opts = opts.trace(ev);
        }
        opts = opts.args(&TRACE_TIMESTAMPS);
    }
    let started = Instant::now();
    let mut qemu = opts.start();
    let serial = qemu.dir().join("serial.log");
    let mut ps_host = loop {
        match UnixStream::connect(&ps_sock) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("connect to pci-serial's chardev: {e}"),
        }
    };

    let mut results = Vec::new();
    for (name, host) in [("vfud", &mut vfud_host), ("qemu", &mut ps_host)] {
        // Guest → host.
        wait_marker(&serial, &format!("tx_go_{name}"));
        let tx = receive(host, &expected, name);
        // Host → guest.
        wait_marker(&serial, &format!("rx_ready_{name}"));
        let t0 = now_ns();
        let mut w = host.try_clone().expect("clone");
        let data = expected.clone();
        let writer = std::thread::spawn(move || w.write_all(&data).expect("host → guest write"));
        let t1 = wait_marker(&serial, &format!("rx_done_{name}"));
        writer.join().expect("writer");
        results.push((name, tx, (t0, t1)));
    }
    let status = qemu.wait_guest_exit(PHASE_TIMEOUT);
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| "<missing>".into());
    assert_eq!(status, 0, "guest failed:\n{}", qemu.diagnostics());
    let want_md5 = md5(&expected);
    for name in ["vfud", "qemu"] {
        assert_eq!(get(&format!("rx_len_{name}")), n.to_string(), "{name}");
        assert_eq!(
            get(&format!("rx_md5_{name}")),
            want_md5,
            "{name} host → guest"
        );
    }
    let _ = qemu.quit();
    let trace = qemu.trace_log();

    let num = |k: &str| get(k).parse::<u64>().ok();
    let irq_delta = |name: &str, a: &str, b: &str| {
        Some(num(&format!("{name}_irq_{b}"))? - num(&format!("{name}_irq_{a}"))?)
    };
    let phases: Vec<(Phase, Phase)> = results
        .iter()
        .map(|(name, tx, rx)| {
            (
                Phase {
                    bytes_per_s: rate(n, *tx),
                    window: *tx,
                    irqs: irq_delta(name, "tx0", "rx0"),
                },
                Phase {
                    bytes_per_s: rate(n, *rx),
                    window: *rx,
                    irqs: irq_delta(name, "rx0", "rx1"),
                },
            )
        })
        .collect();
    let (vf, qe) = (&phases[0], &phases[1]);

    println!(
        "\nuart16550 (bar={}, ttyS {} / BAR0 flags {}) vs QEMU pci-serial ({}), {} bytes each way, 115200 baud set, TCG guest{}\n",
        a.bar,
        get("vfud_tty"),
        get("vfud_bar0"),
        get("qemu_tty"),
        n,
        if a.trace { ", QEMU tracing vfio-user messages" } else { "" }
    );
    println!("| direction | vfud uart16550 | QEMU pci-serial | ratio | goal ≥ 0.25 and ≥ line rate (11.5 KB/s) |");
    println!("|---|---|---|---|---|");
    for (dir, v, q) in [
        ("guest → host", &vf.0, &qe.0),
        ("host → guest", &vf.1, &qe.1),
    ] {
        let ratio = v.bytes_per_s / q.bytes_per_s;
        let ok = ratio >= 0.25 && v.bytes_per_s >= LINE_RATE;
        println!(
            "| {dir} | {:.1} KB/s | {:.1} KB/s | {ratio:.3} | {} |",
            v.bytes_per_s / 1e3,
            q.bytes_per_s / 1e3,
            if ok { "met" } else { "MISSED" }
        );
    }
    println!();
    println!("| vfud direction | interrupts | QEMU → vfud messages / byte | of which round trips / byte | posted / byte | median round trip | share of the phase spent waiting for vfud |");
    println!("|---|---|---|---|---|---|---|");
    for (dir, p) in [("guest → host", &vf.0), ("host → guest", &vf.1)] {
        let irqs = p.irqs.map_or("?".into(), |i| i.to_string());
        if a.trace {
            let t = traffic(&trace, p.window.0, p.window.1);
            let per = |x: u64| x as f64 / n as f64;
            println!(
                "| {dir} | {irqs} | {:.3} | {:.3} | {:.3} | {:.1?} | {:.0} % |",
                per(t.sent),
                per(t.replies),
                per(t.sent.saturating_sub(t.replies)),
                t.median_wait,
                100.0 * t.total_wait.as_nanos() as f64
                    / (p.window.1.saturating_sub(p.window.0)).max(1) as f64
            );
        } else {
            println!("| {dir} | {irqs} | — | — | — | — | — |");
        }
    }
    println!(
        "\nwhole run {:.1?} (guest boot included); message counts are the trace events \
         between the phase's first and last byte",
        started.elapsed()
    );
}
