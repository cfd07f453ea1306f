//! QEMU harness: provision QEMU 11.1 and the guest kit, start `qemu-system-x86_64` (through
//! `scripts/qemu.sh`) with vfio-user-pci devices attached to vfud sockets, talk QMP to it, and
//! watch its serial console.
//!
//! Every QEMU runs under TCG on a q35 machine whose 256 MiB of RAM is a shared memfd (so DMA
//! maps carry fds), with `-nodefaults -display none -no-reboot`, the serial console in a file
//! and QMP on a UNIX socket, all in a per-instance temporary directory. With a guest script the
//! Debian kernel of the guest kit boots an initramfs made by `scripts/make-initramfs.sh`; its
//! `/init` runs the script, prints `VFUD-GUEST-EXIT <status>` and powers off.
//!
//! Every wait has a deadline. [`Qemu`] kills QEMU's process group on drop, and QEMU also gets
//! SIGKILL if the thread that started it dies; when dropped during a panic it prints the serial
//! log, QEMU's stderr and the trace log (vfud's stderr is inherited and already on the console).
//!
//! Facts about QEMU 11.1's `query-pci` (see [`PciDevice`]): the reply is a list of buses, each
//! `{"bus": n, "devices": [...]}`; a device has `bus`, `slot`, `function`, `class_info`
//! (`{"class": 0x0880}` plus `desc` for classes QEMU knows), `id` (`vendor`, `device`,
//! `subsystem`, `subsystem-vendor`), `irq_pin`, `irq` (only when a pin is used), `qdev_id` and
//! `regions`: one per implemented BAR, `{"bar", "type": "memory"|"io", "address", "size"}` plus
//! `prefetch` and `mem_type_64` for memory BARs. An unassigned BAR has `"address": -1`.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{json, Value};

/// Deadline for a Linux guest to print `VFUD-GUEST-EXIT` (TCG boot + test ≈ 5–10 s).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for QMP replies and for QEMU to exit after `quit`.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(20);
/// Prefix of result lines printed by guest test scripts (see [`guest_values`]).
pub const GUEST_RESULT_PREFIX: &str = "VFUD-TEST:";

/// The repository (workspace root).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest kit directory made by `scripts/provision-guest.sh`.
pub fn guest_dir() -> PathBuf {
    repo_root().join("target/vfud-env/guest")
}

/// The kernel to boot from the guest kit `dir`: the uncompressed `vmlinux` (PVH entry, about
/// 4 s faster under TCG than having the guest decompress `vmlinuz`) when provisioning made it.
pub fn guest_kernel(dir: &Path) -> PathBuf {
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        vmlinux
    } else {
        dir.join("vmlinuz")
    }
}

/// Run `scripts/provision.sh` once per test process; panics with its output on failure.
pub fn provision() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let t = Instant::now();
        let out = Command::new(repo_root().join("scripts/provision.sh"))
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run scripts/provision.sh: {e}"))?;
        if out.status.success() {
            eprintln!("[qemu harness] provisioned in {:.1?}", t.elapsed());
            Ok(())
        } else {
            Err(format!(
                "scripts/provision.sh failed ({})\n--- stdout\n{}\n--- stderr\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Build an initramfs at `out` whose `/test.sh` is `script` (see `scripts/make-initramfs.sh`).
pub fn make_initramfs(out: &Path, script: &str) {
    provision();
    let script_path = out.with_extension("test.sh");
    fs::write(&script_path, script).expect("write guest test script");
    let res = Command::new(repo_root().join("scripts/make-initramfs.sh"))
        .arg(out)
        .arg(&script_path)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-initramfs.sh");
    assert!(
        res.status.success(),
        "scripts/make-initramfs.sh failed ({})\n{}{}",
        res.status,
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}

/// How to start QEMU; build with the methods, then [`QemuOpts::start`].
#[derive(Clone, Debug, Default)]
pub struct QemuOpts {
    devices: Vec<PathBuf>,
    guest_script: Option<String>,
    append: Vec<String>,
    extra: Vec<String>,
    trace: Vec<String>,
}

impl QemuOpts {
    /// No devices, no guest (SeaBIOS only).
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach a `vfio-user-pci` device connected to the vfud socket `path`.
    pub fn device(mut self, path: impl AsRef<Path>) -> Self {
        self.devices.push(path.as_ref().to_path_buf());
        self
    }

    /// Boot the guest kernel with an initramfs running `script` as `/test.sh`.
    pub fn guest(mut self, script: &str) -> Self {
        self.guest_script = Some(script.to_string());
        self
    }

    /// Append to the kernel command line.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.append.push(arg.to_string());
        self
    }

    /// Pass extra arguments to QEMU.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Enable QEMU trace events matching `pattern` (e.g. `vfio*`), logged to a file in the
    /// instance directory (see [`Qemu::trace_log`]).
    pub fn trace(mut self, pattern: &str) -> Self {
        self.trace.push(pattern.to_string());
        self
    }

    /// Provision if needed, start QEMU and connect QMP. The environment variable
    /// `VFUD_QEMU_TRACE` (e.g. `vfio*`) adds a trace pattern to every QEMU, for debugging. Panics (with QEMU's stderr) if QEMU
    /// exits or QMP does not come up.
    pub fn start(self) -> Qemu {
        provision();
        let dir = tempfile::Builder::new()
            .prefix("vfud-qemu-")
            .tempdir()
            .expect("tempdir");
        // Canonical paths: QEMU runs in a chroot where only the bound directories exist, so
        // a symlink on the way (a symlinked TMPDIR or target/) would dangle there.
        let d = fs::canonicalize(dir.path()).expect("canonical tempdir");
        let serial = d.join("serial.log");
        let qmp_path = d.join("qmp.sock");
        let stderr = d.join("qemu.stderr");
        let trace = d.join("trace.log");

        let mut bind_dirs = vec![d.clone()];
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-object".into(),
            "memory-backend-memfd,id=mem,size=256M,share=on".into(),
            "-machine".into(),
            "q35,memory-backend=mem".into(),
            "-m".into(),
            "256M".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
        ];
        for sock in &self.devices {
            let sock = fs::canonicalize(sock)
                .unwrap_or_else(|e| panic!("vfio-user socket {}: {e}", sock.display()));
            bind_dirs.push(sock.parent().expect("socket dir").to_path_buf());
            let dev = json!({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}});
            args.extend(["-device".into(), dev.to_string()]);
        }
        if let Some(script) = &self.guest_script {
            let initrd = d.join("initramfs.cpio.gz");
            make_initramfs(&initrd, script);
            let guest = fs::canonicalize(guest_dir()).expect("guest kit dir");
            let kernel = guest_kernel(&guest);
            bind_dirs.push(guest);
            let mut append = vec!["console=ttyS0", "panic=-1", "oops=panic"];
            append.extend(self.append.iter().map(String::as_str));
            args.extend([
                "-kernel".into(),
                kernel.display().to_string(),
                "-initrd".into(),
                initrd.display().to_string(),
                "-append".into(),
                append.join(" "),
            ]);
        }
        let mut traces = self.trace.clone();
        if let Ok(t) = std::env::var("VFUD_QEMU_TRACE") {
            traces.push(t);
        }
        if !traces.is_empty() {
            for t in &traces {
                args.extend(["-trace".into(), t.clone()]);
            }
            args.extend(["-D".into(), trace.display().to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        bind_dirs.sort();
        bind_dirs.dedup();
        let bind_dirs: Vec<String> = bind_dirs.iter().map(|p| p.display().to_string()).collect();

        let mut cmd = Command::new(repo_root().join("scripts/qemu.sh"));
        cmd.args(&args)
            .current_dir(repo_root())
            .env("VFUD_BIND_DIRS", bind_dirs.join(":"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(d.join("qemu.stdout")).expect("qemu.stdout"))
            .stderr(fs::File::create(&stderr).expect("qemu.stderr"))
            .process_group(0);
        // QEMU dies with the thread that started it, even if this process is SIGKILLed.
        let parent = Pid::this();
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe prctl(2) and getppid(2) system calls.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(io::Error::other("parent already gone"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn scripts/qemu.sh");
        let mut q = Qemu {
            child,
            exit: None,
            qmp: None,
            serial,
            stderr,
            trace,
            args,
            started: Instant::now(),
            reported: Cell::new(false),
            dir,
        };
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            if let Some(st) = q.try_exit() {
                panic!("QEMU exited at startup ({st})\n{}", q.diagnostics());
            }
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path) {
                    Ok(c) => {
                        q.qmp = Some(c);
                        break;
                    }
                    Err(e) if Instant::now() >= deadline => {
                        panic!("QMP connect failed: {e}\n{}", q.diagnostics())
                    }
                    Err(_) => {}
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "QMP socket did not appear within {QMP_TIMEOUT:?}\n{}",
                    q.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

/// A running QEMU, killed (with its process group) on drop.
pub struct Qemu {
    child: Child,
    exit: Option<ExitStatus>,
    qmp: Option<Qmp>,
    serial: PathBuf,
    stderr: PathBuf,
    trace: PathBuf,
    args: Vec<String>,
    started: Instant,
    /// Set once [`Qemu::diagnostics`] went into a message, so drop does not repeat it.
    reported: Cell<bool>,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The instance's temporary directory (serial log, QMP socket, initramfs, traces).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().expect("QMP connection")
    }

    /// Run a QMP command, panicking (with diagnostics) on any error.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        match self.qmp().execute(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("QMP {cmd}: {e}\n{}", self.diagnostics()),
        }
    }

    /// The serial console output so far.
    pub fn serial_log(&self) -> String {
        read_lossy(&self.serial)
    }

    /// QEMU's stderr so far.
    pub fn stderr_log(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// The trace log so far (empty unless [`QemuOpts::trace`] was used).
    pub fn trace_log(&self) -> String {
        read_lossy(&self.trace)
    }

    /// Command line, stderr, serial log and the tail of the trace log, for failure messages.
    pub fn diagnostics(&self) -> String {
        self.reported.set(true);
        let mut s = format!(
            "===== QEMU (pid {}) args: {}\n===== QEMU stderr\n{}\n===== serial log\n{}\n",
            self.child.id(),
            self.args.join(" "),
            self.stderr_log(),
            self.serial_log(),
        );
        let trace = self.trace_log();
        if !trace.is_empty() {
            let lines: Vec<&str> = trace.lines().collect();
            let tail = lines[lines.len().saturating_sub(200)..].join("\n");
            s += &format!(
                "===== trace log {} (last 200 lines)\n{tail}\n",
                self.trace.display()
            );
        }
        s += "===== (vfud's stderr is not captured here: it goes to the test's stderr)";
        s
    }

    /// QEMU's exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Wait until the serial log contains `needle`; returns the log. Panics with diagnostics
    /// on timeout or if QEMU exits first.
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.try_exit();
            let log = self.serial_log();
            if log.contains(needle) {
                return log;
            }
            if let Some(st) = exited {
                panic!(
                    "QEMU exited ({st}) before the guest printed {needle:?}\n{}",
                    self.diagnostics()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "guest did not print {needle:?} within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the guest's `VFUD-GUEST-EXIT <n>` line and return `n`.
    pub fn wait_guest_exit(&mut self, timeout: Duration) -> i32 {
        let log = self.wait_for_serial("VFUD-GUEST-EXIT ", timeout);
        // The status is complete once its line ends; wait briefly for the newline.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = log;
        loop {
            if let Some(n) = parse_guest_exit(&log) {
                for l in log.lines().filter(|l| l.contains(GUEST_RESULT_PREFIX)) {
                    eprintln!("[guest] {}", l.trim_end());
                }
                eprintln!(
                    "[guest] VFUD-GUEST-EXIT {n} after {:.1?}",
                    self.started.elapsed()
                );
                return n;
            }
            if Instant::now() >= deadline {
                panic!("malformed VFUD-GUEST-EXIT line\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(20));
            log = self.serial_log();
        }
    }

    /// Wait for QEMU to exit by itself (e.g. after the guest powered off).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "QEMU did not exit within {timeout:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// QMP `quit` and wait for QEMU to exit.
    pub fn quit(&mut self) -> ExitStatus {
        match self.qmp().execute("quit", None) {
            Ok(_) => {}
            // QEMU may close the socket before its reply arrives.
            Err(QmpError::Io(_)) | Err(QmpError::Closed) => {}
            Err(e) => panic!("QMP quit: {e}\n{}", self.diagnostics()),
        }
        self.wait_exit(QMP_TIMEOUT)
    }

    /// `query-pci`, flattened over all buses and bridges.
    pub fn query_pci(&mut self) -> Vec<PciDevice> {
        let v = self.execute("query-pci", None);
        let buses: Vec<PciBus> = match serde_json::from_value(v.clone()) {
            Ok(b) => b,
            Err(e) => panic!("unexpected query-pci reply ({e}): {v:#}"),
        };
        let mut out = Vec::new();
        for b in buses {
            flatten(b.devices, &mut out);
        }
        out
    }

    /// Poll `query-pci` until a device `vendor:device` satisfies `ready`; returns it.
    /// Panics with the last reply and diagnostics at the deadline.
    pub fn wait_pci_device(
        &mut self,
        vendor: u16,
        device: u16,
        timeout: Duration,
        ready: impl Fn(&PciDevice) -> bool,
    ) -> PciDevice {
        let deadline = Instant::now() + timeout;
        loop {
            let devs = self.query_pci();
            let found = devs
                .iter()
                .find(|d| d.id.vendor == vendor && d.id.device == device)
                .cloned();
            if let Some(d) = &found {
                if ready(d) {
                    return d.clone();
                }
            }
            if let Some(st) = self.try_exit() {
                panic!("QEMU exited ({st}) while waiting for {vendor:04x}:{device:04x}; last: {found:#?}\n{}", self.diagnostics());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{vendor:04x}:{device:04x} not ready within {timeout:?}; last query-pci: {devs:#?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // QEMU leads its own process group (scripts/qemu.sh execs into it).
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        if let Ok(st) = self.child.wait() {
            self.exit = Some(st);
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.reported.get() {
            eprintln!("{}", self.diagnostics());
        }
    }
}

/// Guest shell prelude for the dma-engine: `$dev` (sysfs directory of 5646:0001,
/// after enabling memory decoding and bus mastering), `$bar0`/`$bar2`
/// (physical addresses), `rd OFF`/`wr OFF VAL` (BAR0 registers), `rd2 OFF`/`wr2 OFF VAL`
/// (BAR2 words), `run_op` (doorbell and wait while BUSY), `ok`/`fail` (result lines).
pub const DMA_ENGINE_GUEST_LIB: &str = r#"
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }
dev=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat "$d/vendor")" = 0x5646 ] && [ "$(cat "$d/device")" = 0x0001 ]; then dev=$d; fi
done
if [ -z "$dev" ]; then
  fail "no 5646:0001 device"
  for d in /sys/bus/pci/devices/*; do echo "$d $(cat "$d/vendor") $(cat "$d/device")"; done
  exit 1
fi
ok "dev=${dev##*/} class=$(cat "$dev/class") irq=$(cat "$dev/irq")"
i=0
while read -r start end flags && [ $i -le 6 ]; do
  ok "resource$i=$start,$end,$flags"
  i=$((i + 1))
done < "$dev/resource"
cmdreg() { printf '0x%04x' "0x$(od -An -tx2 -j4 -N2 "$dev/config" | tr -d ' ')"; }
ok "command_before=$(cmdreg)"
# Memory decoding (bit 1) and bus mastering (bit 2); only the low byte is written.
printf '\006' | dd of="$dev/config" bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
ok "command=$(cmdreg)"
bar0=$(awk 'NR == 1 { print $1 }' "$dev/resource")
bar2=$(awk 'NR == 3 { print $1 }' "$dev/resource")
rd() { printf '0x%08x' "$(devmem $((bar0 + $1)) 32)"; }
wr() { devmem $((bar0 + $1)) 32 "$2"; }
rd2() { printf '0x%08x' "$(devmem $((bar2 + $1)) 32)"; }
wr2() { devmem $((bar2 + $1)) 32 "$2"; }
run_op() {
  wr 0x2c 1
  n=0
  while [ $(( $(rd 0x0c) & 4 )) -ne 0 ]; do
    n=$((n + 1))
    if [ $n -gt 5000 ]; then fail "still BUSY: STATUS=$(rd 0x0c) CONTROL=$(rd 0x08)"; return 1; fi
  done
}
"#;

/// Kernel command-line argument for guests with a vfud `uart16550`: the 8250 driver then has
/// slots past the four legacy ports (ttyS0 is QEMU's ISA console UART, ttyS1–3 stay
/// placeholders), so the first PCI UART becomes ttyS4.
pub const UART_KERNEL_ARG: &str = "8250.nr_uarts=8";

/// Guest shell prelude for PCI enumeration and interrupts:
/// - `ok TEXT` / `fail TEXT`: result lines (`VFUD-TEST: …`; `fail` counts into `$fails`);
/// - `find_pci VENDOR DEVICE`: prints the sysfs directory of the first match (`0x5646` form);
/// - `report_pci NAME DIR`: result values `NAME_slot`, `NAME_vendor`, `NAME_device`,
///   `NAME_subsystem` (`vendor:device`), `NAME_class`, `NAME_irq`, `NAME_pin` (config 0x3d),
///   `NAME_driver` and `NAME_tty` (`none` when absent) and `NAME_res0`…`NAME_res6` (the first
///   seven lines of sysfs `resource` as `start,end,flags`; see [`SysfsResource`]);
/// - `irq_count IRQ`: the total count of IRQ over all CPUs in `/proc/interrupts`, or `none`
///   when the IRQ has no handler (e.g. the serial driver frees it while the tty is closed);
/// - `irq_line IRQ`: that line of `/proc/interrupts`;
/// - `open_uart`: find vfud's `uart16550`, report it as `uart_*`, hold its tty open on fd 3
///   in raw 8-bit mode; sets `$uart` (sysfs directory) and `$tty`; fails when there is none.
pub const PCI_GUEST_LIB: &str = r##"
fails=0
ok() { echo "VFUD-TEST: $*"; }
fail() { echo "VFUD-TEST: FAIL $*"; fails=$((fails + 1)); }
find_pci() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ]; then echo "$d"; return 0; fi
  done
  return 1
}
report_pci() {
  n=$1 d=$2
  drv=none; [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
  tty=none; [ -d "$d/tty" ] && tty=$(ls "$d/tty" | head -n 1)
  pin=$(od -An -tu1 -j61 -N1 "$d/config" | tr -d ' ')
  ok "${n}_slot=${d##*/} ${n}_vendor=$(cat "$d/vendor") ${n}_device=$(cat "$d/device")" \
     "${n}_subsystem=$(cat "$d/subsystem_vendor"):$(cat "$d/subsystem_device")" \
     "${n}_class=$(cat "$d/class") ${n}_irq=$(cat "$d/irq") ${n}_pin=$pin" \
     "${n}_driver=$drv ${n}_tty=$tty"
  i=0
  while read -r start end flags && [ $i -le 6 ]; do
    ok "${n}_res$i=$start,$end,$flags"
    i=$((i + 1))
  done < "$d/resource"
}
irq_count() {
  awk -v k="$1:" '$1 == k { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s; f = 1 }
                  END { if (!f) print "none" }' /proc/interrupts
}
irq_line() { grep "^ *$1:" /proc/interrupts; }
open_uart() {
  uart=$(find_pci 0x5646 0x0002) || { fail "no 5646:0002 (uart16550)"; return 1; }
  report_pci uart "$uart"
  tty=/dev/$(ls "$uart/tty" | head -n 1)
  exec 3<>"$tty"
  stty -F "$tty" 115200 raw -echo -echoe -echok -echonl -onlcr -crtscts clocal cs8 -parenb \
    || fail "stty"
}
"##;

/// One line of a sysfs `resource` file (Linux `resource_show`: start, end and flags in hex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysfsResource {
    /// First address (0 when the BAR is not implemented).
    pub start: u64,
    /// Last address.
    pub end: u64,
    /// `IORESOURCE_*` flags.
    pub flags: u64,
}

impl SysfsResource {
    /// `IORESOURCE_IO`.
    pub const IO: u64 = 0x100;
    /// `IORESOURCE_MEM`.
    pub const MEM: u64 = 0x200;
    /// `IORESOURCE_PREFETCH`.
    pub const PREFETCH: u64 = 0x2000;
    /// `IORESOURCE_MEM_64`.
    pub const MEM_64: u64 = 0x10_0000;

    /// Parse `start,end,flags` as [`PCI_GUEST_LIB`]'s `report_pci` prints it.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s
            .split(',')
            .map(|w| u64::from_str_radix(w.trim().trim_start_matches("0x"), 16).ok());
        let r = Self {
            start: it.next()??,
            end: it.next()??,
            flags: it.next()??,
        };
        it.next().is_none().then_some(r)
    }

    /// Size in bytes (0 for an unimplemented BAR).
    pub fn size(&self) -> u64 {
        if self.flags == 0 || self.end < self.start {
            0
        } else {
            self.end - self.start + 1
        }
    }

    /// Whether every flag in `mask` is set.
    pub fn has(&self, mask: u64) -> bool {
        self.flags & mask == mask
    }
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The status of the first complete `VFUD-GUEST-EXIT <n>` line of a serial log.
pub fn parse_guest_exit(log: &str) -> Option<i32> {
    let i = log.find("VFUD-GUEST-EXIT ")?;
    let rest = &log[i + "VFUD-GUEST-EXIT ".len()..];
    let end = rest.find(['\r', '\n'])?;
    rest[..end].trim().parse().ok()
}

/// `key=value` pairs from guest lines `VFUD-TEST: k1=v1 k2=v2 …` (later lines win).
pub fn guest_values(log: &str) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for line in log.lines() {
        let Some(i) = line.find(GUEST_RESULT_PREFIX) else {
            continue;
        };
        for word in line[i + GUEST_RESULT_PREFIX.len()..].split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                m.insert(k.to_string(), v.to_string());
            }
        }
    }
    m
}

fn flatten(devices: Vec<PciDevice>, out: &mut Vec<PciDevice>) {
    for mut d in devices {
        if let Some(br) = d.pci_bridge.take() {
            flatten(br.devices, out);
        }
        out.push(d);
    }
}

/// One bus of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciBus {
    /// Bus number.
    pub bus: u8,
    /// Devices on it.
    pub devices: Vec<PciDevice>,
}

/// A device of `query-pci` (QEMU `PciDeviceInfo`).
#[derive(Clone, Debug, Deserialize)]
pub struct PciDevice {
    /// Bus number.
    pub bus: u8,
    /// Slot.
    pub slot: u8,
    /// Function.
    pub function: u8,
    /// Class.
    pub class_info: PciClass,
    /// IDs.
    pub id: PciIds,
    /// Assigned INTx line, if the device uses a pin.
    pub irq: Option<u32>,
    /// INTx pin (0 none, 1 = INTA).
    pub irq_pin: u32,
    /// `id` of the -device option, or "".
    #[serde(default)]
    pub qdev_id: String,
    /// Implemented BARs.
    pub regions: Vec<PciRegion>,
    /// Behind a bridge.
    #[serde(default)]
    pub pci_bridge: Option<PciBridge>,
}

impl PciDevice {
    /// The region of BAR `bar`.
    pub fn bar(&self, bar: u8) -> Option<&PciRegion> {
        self.regions.iter().find(|r| r.bar == bar)
    }

    /// Whether every BAR in `bars` is present and assigned.
    pub fn bars_assigned(&self, bars: &[u8]) -> bool {
        bars.iter()
            .all(|b| self.bar(*b).is_some_and(PciRegion::assigned))
    }
}

/// `class_info` of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciClass {
    /// Base class and subclass (the class code without the programming interface).
    pub class: u16,
    /// Description, for classes QEMU knows.
    #[serde(default)]
    pub desc: Option<String>,
}

/// `id` of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem ID.
    pub subsystem: Option<u16>,
    /// Subsystem vendor ID.
    #[serde(rename = "subsystem-vendor")]
    pub subsystem_vendor: Option<u16>,
}

/// A region (BAR) of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciRegion {
    /// BAR number (6 = expansion ROM).
    pub bar: u8,
    /// `memory` or `io`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Guest-physical address, or -1 when unassigned.
    pub address: i64,
    /// Size in bytes.
    pub size: u64,
    /// Prefetchable (memory BARs).
    pub prefetch: Option<bool>,
    /// 64-bit (memory BARs).
    pub mem_type_64: Option<bool>,
}

impl PciRegion {
    /// Whether firmware or the guest assigned an address.
    pub fn assigned(&self) -> bool {
        self.address != -1 && self.address != 0
    }
}

/// `pci_bridge` of `query-pci` (only the devices behind it are used).
#[derive(Clone, Debug, Deserialize)]
pub struct PciBridge {
    /// Devices behind the bridge.
    #[serde(default)]
    pub devices: Vec<PciDevice>,
}

/// A QMP failure.
#[derive(Debug)]
pub enum QmpError {
    /// The socket was closed.
    Closed,
    /// The command failed: QMP `error` `class` and `desc`.
    Command { class: String, desc: String },
    /// Socket error (including the read timeout).
    Io(io::Error),
    /// Not QMP.
    Protocol(String),
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => write!(f, "QMP connection closed"),
            Self::Command { class, desc } => write!(f, "{class}: {desc}"),
            Self::Io(e) => write!(f, "QMP i/o: {e}"),
            Self::Protocol(s) => write!(f, "QMP protocol: {s}"),
        }
    }
}

impl From<io::Error> for QmpError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A minimal synchronous QMP client (one command at a time).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Greeting (`{"QMP": {...}}`).
    pub greeting: Value,
    /// Asynchronous events received so far, in order.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect, read the greeting and leave capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(QMP_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            greeting: Value::Null,
            events: Vec::new(),
        };
        let g = q.read_message()?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("no greeting: {g}")));
        }
        q.greeting = g;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }

    /// Run `cmd` and return its `return` value; events read meanwhile go to `events`.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let mut m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message {m}")));
        }
    }

    /// Whether an event named `name` has been received.
    pub fn saw_event(&self, name: &str) -> bool {
        self.events.iter().any(|e| e["event"] == name)
    }
}

/// QEMU arguments that make the trace log (see [`QemuOpts::trace`]) timestamp every line
/// (`2026-01-02T03:04:05.123456Z event …`, wall-clock UTC), for [`vfio_user_round_trips`].
pub const TRACE_TIMESTAMPS: [&str; 2] = ["-msg", "timestamp=on"];

/// Trace events (for [`QemuOpts::trace`]) that [`vfio_user_round_trips`] needs: QEMU's send of
/// each vfio-user message and the header of each message it receives.
pub const VFIO_USER_ROUND_TRIP_EVENTS: [&str; 2] = ["vfio_user_send_write", "vfio_user_recv_hdr"];

/// One request QEMU sent to a vfio-user server and the reply it got, as QEMU saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioUserRoundTrip {
    /// Message id.
    pub id: u32,
    /// When QEMU sent the request (Unix time, ns).
    pub sent_ns: u64,
    /// When QEMU received the reply's header (Unix time, ns).
    pub replied_ns: u64,
}

impl VfioUserRoundTrip {
    /// How long QEMU waited for the reply.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.replied_ns.saturating_sub(self.sent_ns))
    }

    /// Whether QEMU was waiting for this reply at some moment in `[from_ns, to_ns]`.
    pub fn overlaps(&self, from_ns: u64, to_ns: u64) -> bool {
        self.sent_ns <= to_ns && self.replied_ns >= from_ns
    }
}

/// Requests and their replies, in order, from a trace log recorded with
/// [`VFIO_USER_ROUND_TRIP_EVENTS`] and [`TRACE_TIMESTAMPS`] (QEMU 11.1's
/// `vfio_user_send_write  id 0x1d1 wrote 0x24` and
/// `vfio_user_recv_hdr  (unix:PATH) id 0x1d1 cmd 0x8 size 0x10 flags 0x1`; flag bit 0 marks a
/// reply). Requests without a reply in the log are left out.
pub fn vfio_user_round_trips(trace: &str) -> Vec<VfioUserRoundTrip> {
    let mut sent: HashMap<u32, u64> = HashMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        let mut words = line.split_whitespace();
        let (Some(ts), Some(event)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(t) = parse_utc_ns(ts) else {
            continue;
        };
        let rest: Vec<&str> = words.collect();
        let field = |name: &str| -> Option<u32> {
            let i = rest.iter().position(|w| *w == name)?;
            u32::from_str_radix(rest.get(i + 1)?.trim_start_matches("0x"), 16).ok()
        };
        match (event, field("id")) {
            ("vfio_user_send_write", Some(id)) => {
                sent.insert(id, t);
            }
            ("vfio_user_recv_hdr", Some(id)) if field("flags").is_some_and(|f| f & 1 != 0) => {
                if let Some(s) = sent.remove(&id) {
                    out.push(VfioUserRoundTrip {
                        id,
                        sent_ns: s,
                        replied_ns: t,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (QEMU's `-msg timestamp=on`) as Unix time in ns.
pub fn parse_utc_ns(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let frac_ns: i64 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1_000_000_000 + frac_ns).ok()
}
