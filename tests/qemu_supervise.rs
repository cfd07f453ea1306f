//! A Linux guest streams lines both ways through a vfud `uart16550` served with `--supervise`
//! (`--on-crash restore`, the host on the UART's socket backend) while the device process —
//! not the supervisor — is killed with SIGKILL five times at random moments (a seeded RNG;
//! the seed is printed, `VFUD_TEST_SEED=N` repeats a run). The guest sees no I/O error, every
//! line written after each restart arrives (guest → host and host → guest), and what is lost
//! around each crash is what the supervisor's status says a restore may lose:
//! - guest → host: only bytes the UART took in from the guest after the last checkpoint, one
//!   posted register write each, so at most `requests_after_checkpoint` (plus the request in
//!   progress) bytes, which spoil at most that many lines plus the two where the streams join;
//! - host → guest: only bytes the UART read from its host socket after the last checkpoint
//!   (a checkpoint takes in everything already in the socket), so only lines whose write
//!   ended after `at_unix_ns − checkpoint_age_ms`, plus the lines spoilt where two streams
//!   join (below).
//!
//! And a guest driving a dma-engine through `devmem` carries on, with its registers and a new
//! job, after the model panics on a test-only register write and after it hangs in one (the
//! supervisor notices the request in progress and restarts the process before QEMU's 5 s
//! message timeout).
//!
//! Bytes in flight at the checkpoint may arrive twice (the restored device sends them
//! again), and where the stream before a crash ends mid-line and the restored one goes on,
//! the line at the join is garbled; the test takes the last whole number of each line,
//! counts the repeats and asserts nothing about them.

mod common;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::qemu::{
    guest_values, last_tick, Qemu, QemuOpts, DMA_ENGINE_GUEST_LIB, GUEST_TIMEOUT, PCI_GUEST_LIB,
    UART_KERNEL_ARG,
};
use common::supervised::Supervised;
use serde_json::Value;

/// Device-process kills.
const KILLS: usize = 5;
/// Deadline for the guest, from boot to power-off.
const GUEST_DEADLINE: Duration = Duration::from_secs(50);
/// Host → guest line period.
const HOST_LINE_EVERY: Duration = Duration::from_millis(20);

/// The guest: hold the UART's tty open, copy what the host sends into /tmp/hin in the
/// background, and write `G <n>` lines until the host sends STOP, with a tick (lines written
/// so far) on the console every 200 lines.
fn guest_script() -> String {
    format!(
        r#"{PCI_GUEST_LIB}
open_uart || exit 1
cat <&3 > /tmp/hin &
reader=$!
i=0 t=0 bad=0
ok "streaming=1"
end=$(( $(date +%s) + 40 ))
while :; do
  k=0
  while [ $k -lt 200 ]; do
    echo "G $i" >&3 || bad=$((bad + 1))
    i=$((i + 1)) k=$((k + 1))
  done
  t=$((t + 1))
  ok "tick=$t g=$i"
  grep -q STOP /tmp/hin && break
  [ "$(date +%s)" -lt $end ] || {{ fail "no STOP from the host"; break; }}
done
ok "g_total=$i write_errors=$bad"
kill -0 $reader 2>/dev/null || fail "the tty reader ended early"
kill $reader
ok "hin=$(grep -oE 'H [0-9]+$' /tmp/hin | cut -d' ' -f2 | tr '\n' ',')"
line=$(grep "^${{tty#/dev/ttyS}}:" /proc/tty/driver/serial)
echo "VFUD-TEST: serial: $line"
ok "kernel_errors=$(dmesg | grep -ciE 'i/o error|vfio|ttyS4.*(error|timed out)')"
exec 3>&-
exit $fails
"#
    )
}

/// xorshift64*: the kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let seed = std::env::var("VFUD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| vfud_server::handover::now_ns() | 1);
        eprintln!("[test] seed {seed} (VFUD_TEST_SEED={seed} repeats this run)");
        Self(seed)
    }

    /// Uniform in `lo..hi` ms.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Duration::from_millis(lo + r % (hi - lo))
    }
}

/// A host-side thread that appends to a shared log until stopped.
struct Worker<T, R> {
    log: Arc<Mutex<Vec<T>>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<R>,
}

impl<T: Send + 'static, R: Send + 'static> Worker<T, R> {
    fn spawn(body: impl FnOnce(&Mutex<Vec<T>>, &AtomicBool) -> R + Send + 'static) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || body(&log2, &stop2));
        Self { log, stop, thread }
    }

    /// Stop; what the thread returned, and the log.
    fn finish(self) -> (R, Vec<T>) {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.thread.join().expect("host thread");
        (
            r,
            Arc::try_unwrap(self.log)
                .ok()
                .unwrap()
                .into_inner()
                .unwrap(),
        )
    }
}

/// The host's reader: every byte the UART passes on.
fn host_reader(mut s: UnixStream) -> Worker<u8, ()> {
    Worker::spawn(move |got, stop| {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 8192];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => panic!("the UART host connection closed"),
                Ok(n) => got.lock().unwrap().extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading the UART host socket: {e}"),
            }
        }
    })
}

/// The host's writer: `H <n>` every [`HOST_LINE_EVERY`]; logs when each write ended (Unix
/// ns) and returns the socket.
fn host_writer(mut s: UnixStream) -> Worker<u64, UnixStream> {
    Worker::spawn(move |sent, stop| {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            s.write_all(format!("H {n}\n").as_bytes())
                .expect("write to the UART host socket");
            sent.lock().unwrap().push(vfud_server::handover::now_ns());
            n += 1;
            std::thread::sleep(HOST_LINE_EVERY);
        }
        s
    })
}

/// The guest lines the host has received so far.
fn received(reader: &Worker<u8, ()>) -> GuestLines {
    GuestLines::parse(&reader.log.lock().unwrap())
}

/// Guest → host lines as received: which numbers arrived whole, and how often.
struct GuestLines {
    seen: BTreeSet<u64>,
    repeats: usize,
}

impl GuestLines {
    fn parse(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let mut seen = BTreeSet::new();
        let mut repeats = 0;
        // The last piece may be a line still arriving.
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        for l in complete.split('\n') {
            // The last `G <n>` of the line: a restart may glue a line's head to another.
            let last = l.rfind("G ").map(|i| &l[i + 2..]);
            if let Some(n) = last.and_then(|n| n.parse().ok()) {
                if !seen.insert(n) {
                    repeats += 1;
                }
            }
        }
        Self { seen, repeats }
    }

    /// The highest line whose predecessor arrived too: a line glued together where two
    /// streams join can read as any number, but hardly as one right after a real one.
    fn max(&self) -> Option<u64> {
        self.seen
            .iter()
            .rev()
            .find(|&&n| n > 0 && self.seen.contains(&(n - 1)))
            .copied()
    }
}

/// One kill and what was known around it.
struct Kill {
    /// Highest guest line the host had before the kill.
    host_had: Option<u64>,
    /// Guest lines written by the first tick printed after the restart: every line from
    /// here on was written after it.
    written_after: u64,
    /// Host lines sent when the restart was seen.
    host_sent: usize,
    /// The supervisor's report of the crash.
    crash: Value,
}

impl Kill {
    fn crash_u64(&self, k: &str) -> u64 {
        self.crash[k]
            .as_u64()
            .unwrap_or_else(|| panic!("last_crash.{k}: {}", self.crash))
    }

    /// Guest bytes a restore may lose: those taken in after the checkpoint (one request
    /// each), and a posted write the process died in.
    fn guest_bytes_at_risk(&self) -> u64 {
        self.crash_u64("requests_after_checkpoint")
            + u64::from(self.crash["request_in_progress"] == true)
    }

    /// The checkpoint the device went back to (Unix ns; the age is whole ms, so 1 ms early).
    fn checkpoint_ns(&self) -> u64 {
        let age = (self.crash_u64("checkpoint_age_ms") + 1) * 1_000_000;
        self.crash_u64("at_unix_ns").saturating_sub(age)
    }
}

/// QEMU got a reply to every request in time, and no stray one (it logs each such fault).
fn assert_qemu_got_every_reply(qemu: &Qemu) {
    let stderr = qemu.stderr_log();
    for bad in ["timed out", "unexpected reply", "bad header"] {
        assert!(
            !stderr.contains(bad),
            "QEMU said {bad:?}: {}",
            qemu.diagnostics()
        );
    }
}

/// The number of the last complete tick on the console, and its `g=`.
fn tick(log: &str) -> (u64, u64) {
    last_tick(log).map_or((0, 0), |(n, v)| {
        (n, v.get("g").and_then(|g| g.parse().ok()).unwrap_or(0))
    })
}

#[test]
fn guest_streams_both_ways_through_five_device_process_kills() {
    // Arrange: the supervised UART, its host peer connected before the guest boots.
    let host_dir = tempfile::tempdir().expect("tempdir");
    let host_path = host_dir.path().join("uart.host");
    let s = Supervised::start(
        &format!("uart16550,backend=socket:{}", host_path.display()),
        &["--on-crash", "restore", "--max-restarts", "10/60"],
    );
    assert!(common::wait_for_path(&host_path, Duration::from_secs(5)));
    let host = UnixStream::connect(&host_path).expect("connect to the UART backend");
    let reader = host_reader(host.try_clone().expect("clone"));
    let mut rng = Rng::seeded();
    let mut qemu = QemuOpts::new()
        .device(s.sock())
        .kernel_arg(UART_KERNEL_ARG)
        .guest(&guest_script())
        .start();
    let deadline = Instant::now() + GUEST_DEADLINE;
    qemu.wait_for_serial("streaming=1", GUEST_DEADLINE);
    let writer = host_writer(host);

    // Act: five kills at random moments, each waited out until the guest wrote on.
    let mut kills = Vec::new();
    for k in 0..KILLS {
        std::thread::sleep(rng.millis(300, 1500));
        let host_had = received(&reader).max();
        let crash = s.kill_device()["last_crash"].clone();
        let host_sent = writer.log.lock().unwrap().len();
        let (t, _) = tick(&qemu.serial_log());
        // A tick printed after the restart (one more than needed, for the console's lag).
        let seen = Instant::now();
        let (_, v) = qemu.wait_tick(t + 1);
        let written_after = v["g"].parse().expect("tick g=");
        eprintln!(
            "[test] kill {k}: host had line {host_had:?}, restart seen with {host_sent} host \
             lines sent, guest at line {written_after} {:.1?} later; {crash}",
            seen.elapsed()
        );
        kills.push(Kill {
            host_had,
            written_after,
            host_sent,
            crash,
        });
    }
    // The guest writes on a little after the last restart, then the host says STOP.
    let (t, _) = tick(&qemu.serial_log());
    qemu.wait_tick(t + 1);
    let (mut host, sent) = writer.finish();
    host.write_all(b"STOP\n").expect("send STOP");
    let status = qemu.wait_guest_exit(deadline.saturating_duration_since(Instant::now()));
    let log = qemu.serial_log();
    let v = guest_values(&log);
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| "<missing>".into());
    let total: u64 = get("g_total").parse().expect("g_total");
    // The guest's last close waited for its output to drain: the tail is on its way.
    let t = Instant::now();
    while !received(&reader).seen.contains(&(total - 1)) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = GuestLines::parse(&reader.finish().1);
    let host_lines: BTreeSet<usize> = get("hin")
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    let diag = || qemu.diagnostics();

    // Assert: no I/O error in the guest, and the guest ran to its end.
    assert_eq!(get("write_errors"), "0", "{}", diag());
    assert_eq!(get("kernel_errors"), "0", "{}", diag());
    assert_eq!(status, 0, "guest failures: {}", diag());
    assert_qemu_got_every_reply(&qemu);
    assert_eq!(s.status()["restarts"], KILLS as u64);
    for (k, kill) in kills.iter().enumerate() {
        assert_eq!(kill.crash["how"], "signal 9", "kill {k}");
    }

    // Guest → host: every missing line falls into one crash's window — after what the host
    // had before the kill, before what the guest wrote after the restart — and no crash
    // spoils more lines than its bytes at risk allow.
    let missing: Vec<u64> = (0..total).filter(|n| !got.seen.contains(n)).collect();
    let mut per_kill = [0u64; KILLS];
    for &m in &missing {
        let k = kills
            .iter()
            .position(|c| c.host_had.is_none_or(|h| m > h) && m < c.written_after)
            .unwrap_or_else(|| panic!("guest line {m} lost outside every crash window"));
        per_kill[k] += 1;
    }
    for (k, kill) in kills.iter().enumerate() {
        assert!(
            per_kill[k] <= kill.guest_bytes_at_risk() + 2,
            "kill {k}: {} guest lines lost, status allows {} bytes: {}",
            per_kill[k],
            kill.guest_bytes_at_risk(),
            kill.crash
        );
    }

    // Host → guest: every line sent after the last restart arrived; any other missing line
    // belongs to the next restart after it was sent, and was written to the socket after that
    // crash's checkpoint — except at most the two lines where the streams join.
    let lost: Vec<usize> = (0..sent.len())
        .filter(|n| !host_lines.contains(n))
        .collect();
    let mut joins = [0u64; KILLS];
    for &m in &lost {
        let k = kills
            .iter()
            .position(|c| m < c.host_sent)
            .unwrap_or_else(|| panic!("host line {m}, sent after the last restart, is lost"));
        if sent[m] <= kills[k].checkpoint_ns() {
            joins[k] += 1;
        }
    }
    for (k, kill) in kills.iter().enumerate() {
        assert!(
            joins[k] <= 2,
            "kill {k}: {} host lines lost that were in the socket before the checkpoint: {}",
            joins[k],
            kill.crash
        );
    }
    eprintln!(
        "[test] guest lines {total}, lost {} {per_kill:?}, repeated {}; host lines {}, lost {}",
        missing.len(),
        got.repeats,
        sent.len(),
        lost.len()
    );
    assert!(
        host_lines.len() > sent.len() / 2,
        "host lines mostly arrive"
    );
}

#[test]
fn guest_carries_on_after_the_model_panics_and_after_it_hangs() {
    // Arrange: a dma-engine with the test-only fault register, hangs noticed after 1 s.
    let s = Supervised::start(
        "dma-engine,crash-test=on",
        &["--on-crash", "restore", "--hang-timeout", "1000"],
    );
    let script = format!(
        "{DMA_ENGINE_GUEST_LIB}{}",
        r#"
ok "id0=$(rd 0x00)"
wr 0x28 0x5a
sleep 1   # a checkpoint holds PATTERN now
# Posted writes: the model panics in the first; the read after it waits for the new process.
wr 0xffc 0xdeaddead
ok "id1=$(rd 0x00) pattern1=$(rd 0x28)"
# A job in the new process: FILL_DEVICE, 4 KiB of 0x5a at BAR2 offset 0.
wr 0x0c 3
wr 0x18 0; wr 0x1c 0; wr 0x20 4096; wr 0x24 6
run_op
ok "fill_status=$(rd 0x0c) bar2=$(rd2 0x0)"
# The model hangs in this write; the read waits until the hung process is replaced.
wr 0xffc 0xdead1001
ok "id2=$(rd 0x00) pattern2=$(rd 0x28)"
exit $fails
"#
    );

    // Act
    let mut qemu = QemuOpts::new().device(s.sock()).guest(&script).start();
    let status = qemu.wait_guest_exit(GUEST_TIMEOUT);
    let v = guest_values(&qemu.serial_log());
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    let st = s.status();

    // Assert: the same device throughout (never all-ones), its state from the checkpoint,
    // a job run by the restarted process, one restart per fault, the last one a hang.
    let diag = || qemu.diagnostics();
    for k in ["id0", "id1", "id2"] {
        assert_eq!(get(k), "0x4d444656", "{k}: {}", diag());
    }
    assert_eq!(get("pattern1"), "0x0000005a", "{}", diag());
    assert_eq!(get("pattern2"), "0x0000005a", "{}", diag());
    assert_eq!(get("fill_status"), "0x00000001", "DONE only: {}", diag());
    assert_eq!(get("bar2"), "0x5a5a5a5a", "{}", diag());
    assert_eq!(status, 0, "guest failures: {}", diag());
    assert_qemu_got_every_reply(&qemu);
    assert_eq!(st["restarts"], 2, "{st}");
    let how = st["last_crash"]["how"].as_str().unwrap_or_default();
    assert!(how.starts_with("hung"), "{st}");
}
