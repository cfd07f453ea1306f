//! `vfud serve --supervise` as a child process: its control socket's status, and killing
//! its device process.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use vfud_server::handover::{self as ho, kind, ControlCommand};

/// A supervisor serving one device on `DIR/dev.sock`, its status on `DIR/ctl.sock`; stopped
/// (SIGTERM, then SIGKILL) on drop.
pub struct Supervised {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // SIGTERM: the supervisor stops its device process itself.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Supervised {
    /// Start `vfud serve --supervise --device SPEC` with extra arguments.
    pub fn start(spec: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (sock, ctl) = (dir.path().join("dev.sock"), dir.path().join("ctl.sock"));
        let child = super::serve_command()
            .args(["--supervise", "--device", spec, "--socket"])
            .arg(&sock)
            .arg("--control")
            .arg(&ctl)
            .args(extra)
            .spawn()
            .unwrap();
        assert!(super::wait_for_path(&ctl, Duration::from_secs(10)));
        assert!(super::wait_for_path(&sock, Duration::from_secs(10)));
        Self { child, dir }
    }

    /// The device's vfio-user socket.
    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("dev.sock")
    }

    /// The supervisor's status (`supervised` of the control socket's status event).
    pub fn status(&self) -> Value {
        let s = UnixStream::connect(self.dir.path().join("ctl.sock")).unwrap();
        ho::send_json(s.as_fd(), kind::COMMAND, &ControlCommand::Status).unwrap();
        let mut r = vfud_protocol::FrameReader::new();
        let f = ho::recv(&s, &mut r, Duration::from_secs(5)).unwrap();
        let v: Value = serde_json::from_slice(&f.payload).unwrap();
        v["supervised"].clone()
    }

    /// Wait until `f` holds for the status (10 s at most).
    pub fn wait_status(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let st = self.status();
            if f(&st) {
                return st;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: {st}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The current device process (waits for one).
    pub fn device_pid(&self) -> i32 {
        let st = self.wait_status("a device process", |s| s["device_pid"].is_u64());
        st["device_pid"].as_u64().unwrap() as i32
    }

    /// SIGKILL the device process and wait for its successor to run.
    pub fn kill_device(&self) -> Value {
        let pid = self.device_pid();
        let restarts = self.status()["restarts"].as_u64().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.wait_status("restart", |s| {
            s["restarts"].as_u64() == Some(restarts + 1) && s["state"] == "running"
        })
    }
}
