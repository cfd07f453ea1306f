//! Shared test support: start `vfud serve` processes on temporary sockets and connect to them.
#![allow(dead_code)]

pub mod dma_engine;
pub mod foreign;
pub mod hostile;
pub mod hostile_payloads;
pub mod migration;
pub mod qemu;
pub mod supervised;
pub mod tracer;
pub mod uart_host;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use vfud_protocol::Client;

/// Path of the built `vfud` binary.
pub fn vfud_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vfud")
}

/// `vfud serve`, with the test's `RUST_LOG` (default `warn`) and no stdin; add arguments.
pub fn serve_command() -> Command {
    let mut c = Command::new(vfud_bin());
    c.arg("serve")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null());
    c
}

/// `vfud ARGS…` with the test's `RUST_LOG` (default `warn`), no stdin, stdout and stderr piped.
pub fn vfud_command(args: &[&str]) -> Command {
    let mut c = Command::new(vfud_bin());
    c.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Wait for `child` (spawned with piped output) until `timeout`; returns its output. Panics
/// with the output so far, after killing it, at the deadline.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().expect("wait for child").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("child output");
            panic!(
                "child did not finish within {timeout:?}\n--- stdout\n{}\n--- stderr\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("child output")
}

/// Run `vfud ARGS…` (see [`vfud_command`]) with a deadline; returns its output.
pub fn run_vfud(args: &[&str], timeout: Duration) -> Output {
    wait_output(vfud_command(args).spawn().expect("spawn vfud"), timeout)
}

/// A `vfud serve` child process, killed on drop.
pub struct Vfud {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Vfud {
    /// Start `vfud serve --device SPEC --socket DIR/NAME.sock` with extra args.
    pub fn start(device: &str, extra: &[&str]) -> Vfud {
        Self::spawn(tempfile::tempdir().expect("tempdir"), device, extra)
    }

    /// Start with a temp dir chosen by the caller (for device options that name paths in it).
    pub fn start_in(dir: tempfile::TempDir, device: &str) -> Vfud {
        Self::spawn(dir, device, &[])
    }

    fn spawn(dir: tempfile::TempDir, device: &str, extra: &[&str]) -> Vfud {
        let model = device.split(',').next().unwrap_or(device);
        let socket = dir.path().join(format!("{model}.sock"));
        let child = serve_command()
            .args(["--device", device, "--socket"])
            .arg(&socket)
            .args(extra)
            .spawn()
            .expect("spawn vfud");
        assert!(
            wait_for_path(&socket, Duration::from_secs(10)),
            "vfud did not create {}",
            socket.display()
        );
        Vfud { child, socket, dir }
    }

    /// Connect and negotiate as QEMU does.
    pub fn client(&self) -> Client {
        Client::connect_negotiated(&self.socket).expect("connect")
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Vfud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The model names in `vfud devices` output (options are the indented lines).
pub fn model_names(devices_output: &str) -> Vec<&str> {
    devices_output
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// Zeroed memfd of `size` bytes, e.g. guest RAM to DMA-map.
pub fn memfd(size: u64) -> std::fs::File {
    let fd = nix::sys::memfd::memfd_create(c"vfud-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd");
    let f = std::fs::File::from(fd);
    f.set_len(size).expect("memfd size");
    f
}

/// A non-blocking eventfd, as a VMM hands out for interrupts.
pub fn eventfd() -> nix::sys::eventfd::EventFd {
    nix::sys::eventfd::EventFd::from_value_and_flags(0, nix::sys::eventfd::EfdFlags::EFD_NONBLOCK)
        .expect("eventfd")
}

/// Wait up to `ms` for an eventfd to fire; returns (and clears) its counter, 0 if it did not.
pub fn wait_eventfd(e: &nix::sys::eventfd::EventFd, ms: u16) -> u64 {
    use std::os::fd::AsFd;
    let mut p = [nix::poll::PollFd::new(
        e.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    if nix::poll::poll(&mut p, nix::poll::PollTimeout::from(ms)).unwrap_or(0) == 0 {
        return 0;
    }
    let mut b = [0u8; 8];
    match nix::unistd::read(e.as_fd(), &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

/// Wait for a path to appear.
pub fn wait_for_path(p: &Path, timeout: Duration) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < timeout {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Run `vfud migrate --handover --json --from FROM --to TO` to completion.
pub fn handover_output(from: &Path, to: &Path) -> std::process::Output {
    Command::new(vfud_bin())
        .args(["migrate", "--handover", "--json", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .expect("vfud migrate --handover")
}

/// [`handover_output`]; panics with its output on failure.
pub fn handover(from: &Path, to: &Path) {
    let out = handover_output(from, to);
    assert!(
        out.status.success(),
        "handover {} -> {} failed: {}{}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Wait up to `timeout` for the process to exit: its exit code (-1 when a signal ended
    /// it), or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(st)) = self.0.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `vfud serve --device SPEC --incoming CTL`, returned once CTL exists.
pub fn serve_incoming(spec: &str, ctl: &Path) -> KillOnDrop {
    let child = serve_command()
        .arg("--device")
        .arg(spec)
        .arg("--incoming")
        .arg(ctl)
        .spawn()
        .expect("spawn vfud serve --incoming");
    assert!(
        wait_for_path(ctl, Duration::from_secs(10)),
        "no {}",
        ctl.display()
    );
    KillOnDrop(child)
}
