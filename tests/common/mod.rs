//! Shared test support: start `vfud serve` processes on temporary sockets and connect to them.
#![allow(dead_code)]

pub mod qemu;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vfud_protocol::Client;

/// Path of the built `vfud` binary.
pub fn vfud_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vfud")
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
        let dir = tempfile::tempdir().expect("tempdir");
        let model = device.split(',').next().unwrap_or(device);
        let socket = dir.path().join(format!("{model}.sock"));
        let child = Command::new(vfud_bin())
            .arg("serve")
            .arg("--device")
            .arg(device)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vfud");
        assert!(
            wait_for_path(&socket, Duration::from_secs(10)),
            "vfud did not create {}",
            socket.display()
        );
        Vfud { child, socket, dir }
    }

    /// Start with a temp dir chosen by the caller (for device options that name paths in it).
    pub fn start_in(dir: tempfile::TempDir, device: &str) -> Vfud {
        let model = device.split(',').next().unwrap_or(device);
        let socket = dir.path().join(format!("{model}.sock"));
        let child = Command::new(vfud_bin())
            .args(["serve", "--device", device, "--socket"])
            .arg(&socket)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vfud");
        assert!(
            wait_for_path(&socket, Duration::from_secs(10)),
            "vfud did not start"
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
