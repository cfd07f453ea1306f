//! Starting QEMU ([`QemuOpts`]), watching its console and logs, and stopping it ([`Qemu`]).

use std::cell::Cell;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::guest::{parse_guest_exit, GUEST_RESULT_PREFIX};
use super::provision::{guest_dir, guest_kernel, make_initramfs, provision, repo_root};
use super::qmp::{self, Qmp, QmpError, QMP_TIMEOUT};

/// How to start QEMU; build with the methods, then [`QemuOpts::start`].
#[derive(Clone, Debug, Default)]
pub struct QemuOpts {
    /// vfio-user sockets, each with an optional `(id, root port)`.
    devices: Vec<(PathBuf, Option<(String, String)>)>,
    root_ports: Vec<String>,
    incoming: Option<String>,
    guest_script: Option<String>,
    append: Vec<String>,
    extra: Vec<String>,
    trace: Vec<String>,
    plain_ram: bool,
}

impl QemuOpts {
    /// No devices, no guest (SeaBIOS only).
    pub fn new() -> Self {
        Self::default()
    }

    /// Attach a `vfio-user-pci` device connected to the vfud socket `path`.
    pub fn device(mut self, path: impl AsRef<Path>) -> Self {
        self.devices.push((path.as_ref().to_path_buf(), None));
        self
    }

    /// Add a `pcie-root-port` with this id on `pcie.0`: a slot where a device can be
    /// hot-unplugged and hot-plugged (q35's root bus has none).
    pub fn root_port(mut self, id: &str) -> Self {
        self.root_ports.push(id.to_string());
        self
    }

    /// Attach a `vfio-user-pci` device with `id`, connected to the vfud socket `path`, behind
    /// the root port `port` (see [`QemuOpts::root_port`]).
    pub fn device_on(mut self, path: impl AsRef<Path>, id: &str, port: &str) -> Self {
        self.devices.push((
            path.as_ref().to_path_buf(),
            Some((id.to_string(), port.to_string())),
        ));
        self
    }

    /// Wait for an incoming migration on `uri` (`-incoming`) instead of starting the VM.
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.to_string());
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

    /// Plain guest RAM (QEMU's default, no fd): vfud reaches it with DMA_READ/DMA_WRITE.
    pub fn plain_ram(mut self) -> Self {
        self.plain_ram = true;
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
        let memory = match self.plain_ram {
            false => "memory-backend-memfd,id=mem,size=256M,share=on",
            true => "memory-backend-ram,id=mem,size=256M",
        };
        let mut args: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-object".into(),
            memory.into(),
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
        for (chassis, id) in self.root_ports.iter().enumerate() {
            args.extend([
                "-device".into(),
                format!("pcie-root-port,id={id},bus=pcie.0,chassis={}", chassis + 1),
            ]);
        }
        for (sock, place) in &self.devices {
            let sock = fs::canonicalize(sock)
                .unwrap_or_else(|e| panic!("vfio-user socket {}: {e}", sock.display()));
            bind_dirs.push(sock.parent().expect("socket dir").to_path_buf());
            let mut dev =
                json!({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}});
            if let Some((id, port)) = place {
                dev["id"] = json!(id);
                dev["bus"] = json!(port);
            }
            args.extend(["-device".into(), dev.to_string()]);
        }
        if let Some(uri) = &self.incoming {
            args.extend(["-incoming".into(), uri.clone()]);
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
                match qmp::connect(&qmp_path) {
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
            Err(QmpError::Io { .. }) | Err(QmpError::Closed { .. }) => {}
            Err(e) => panic!("QMP quit: {e}\n{}", self.diagnostics()),
        }
        self.wait_exit(QMP_TIMEOUT)
    }

    /// SIGKILL QEMU's process group now and reap it (as a crash would end it).
    pub fn kill(&mut self) {
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

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
