//! The processes of `vfud guest`: the device servers (`vfud serve`, this same binary) and
//! QEMU (through `scripts/qemu.sh`), with the serial console streamed to stdout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::kit::Kit;

/// Line the guest's `/init` prints with the test's status before it powers off.
const EXIT_MARKER: &str = "VFUD-GUEST-EXIT ";
/// How long `vfud serve` may take to create its sockets.
const SERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Ram {
    /// A shared memfd: QEMU passes its fd with each DMA map, vfud maps guest RAM.
    Memfd,
    /// Anonymous memory: vfud reaches guest RAM with DMA_READ/DMA_WRITE messages.
    Plain,
}

/// The `vfud serve` child serving every device, stopped with SIGTERM when dropped.
pub struct Servers {
    child: Child,
    /// Device sockets, in `--device` order.
    pub sockets: Vec<PathBuf>,
}

impl Servers {
    /// Serve `devices` on `dir/dev<i>-<model>.sock`, with an optional handover control socket.
    pub fn start(devices: &[String], dir: &Path, control: Option<&Path>) -> Result<Servers> {
        let mut cmd = Command::new(std::env::current_exe().context("locating vfud")?);
        cmd.arg("serve").stdin(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut sockets = Vec::new();
        for (i, spec) in devices.iter().enumerate() {
            let model = spec.split(',').next().unwrap_or_default();
            let sock = dir.join(format!("dev{i}-{model}.sock"));
            if sock.exists() {
                std::fs::remove_file(&sock)
                    .with_context(|| format!("removing stale {}", sock.display()))?;
            }
            cmd.arg("--device").arg(spec).arg("--socket").arg(&sock);
            sockets.push(sock);
        }
        if let Some(c) = control {
            cmd.arg("--control").arg(c);
        }
        let mut s = Servers {
            child: cmd.spawn().context("starting vfud serve")?,
            sockets,
        };
        let deadline = Instant::now() + SERVE_TIMEOUT;
        while !s.sockets.iter().all(|p| p.exists()) {
            if let Some(st) = s.child.try_wait()? {
                bail!("vfud serve exited ({st}) before creating its sockets (see its error above)");
            }
            if Instant::now() >= deadline {
                bail!("vfud serve did not create its sockets within {SERVE_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }
}

impl Drop for Servers {
    /// SIGTERM and wait (the process may already be gone after a handover).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// What to boot.
pub struct BootSpec<'a> {
    /// Scripts and guest kit.
    pub kit: &'a Kit,
    /// Scratch directory (bound into QEMU's chroot).
    pub work_dir: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// vfio-user sockets to attach.
    pub sockets: &'a [PathBuf],
    /// RAM backing.
    pub ram: Ram,
    /// RAM size.
    pub mem_mib: u32,
    /// Extra kernel arguments.
    pub append: Option<&'a str>,
    /// Extra QEMU arguments.
    pub extra: &'a [String],
    /// Interactive console (stdin goes to the guest).
    pub keep: bool,
    /// Kill QEMU after this long.
    pub timeout: Option<Duration>,
}

fn qemu_args(spec: &BootSpec<'_>, guest: &Path) -> Vec<String> {
    let mem = format!("{}M", spec.mem_mib);
    let mut a: Vec<String> = [
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ]
    .map(String::from)
    .to_vec();
    let mut pair = |k: &str, v: String| {
        a.push(k.to_string());
        a.push(v);
    };
    match spec.ram {
        Ram::Memfd => {
            pair(
                "-object",
                format!("memory-backend-memfd,id=ram,size={mem},share=on"),
            );
            pair("-machine", "q35,memory-backend=ram".into());
        }
        Ram::Plain => pair("-machine", "q35".into()),
    }
    pair("-m", mem);
    // `mon:` multiplexes QEMU's monitor (Ctrl-A C) and Ctrl-A X onto an interactive console.
    pair(
        "-serial",
        if spec.keep { "mon:stdio" } else { "stdio" }.into(),
    );
    for s in spec.sockets {
        let dev =
            serde_json::json!({"driver": "vfio-user-pci", "socket": {"type": "unix", "path": s}});
        pair("-device", dev.to_string());
    }
    let vmlinux = guest.join("vmlinux");
    let kernel = if vmlinux.is_file() {
        vmlinux // PVH entry: no in-guest decompression, seconds faster under TCG
    } else {
        guest.join("vmlinuz")
    };
    pair("-kernel", kernel.display().to_string());
    pair("-initrd", spec.initrd.display().to_string());
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    if let Some(extra) = spec.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    pair("-append", cmdline);
    a.extend(spec.extra.iter().cloned());
    a
}

/// Boot the guest, stream its console to stdout and return the test's status.
pub fn boot(spec: &BootSpec<'_>) -> Result<i32> {
    let guest = spec.kit.guest_dir()?;
    let mut binds: Vec<String> = vec![
        spec.work_dir.display().to_string(),
        guest.display().to_string(),
    ];
    for s in spec.sockets {
        if let Some(d) = s.parent() {
            binds.push(d.display().to_string());
        }
    }
    binds.sort();
    binds.dedup();
    let mut qemu = Command::new(spec.kit.script("qemu.sh"))
        .args(qemu_args(spec, &guest))
        .env("VFUD_BIND_DIRS", binds.join(":"))
        .current_dir(spec.work_dir)
        .stdin(if spec.keep {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .spawn()
        .context("starting scripts/qemu.sh")?;
    let stdout = qemu.stdout.take().context("QEMU stdout")?;
    let (tx, rx) = mpsc::channel();
    let console = std::thread::spawn(move || stream_console(stdout, tx));

    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let exit = loop {
        match qemu.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => {
                let _ = qemu.kill();
                return Err(e).context("waiting for QEMU");
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = qemu.kill();
            let _ = qemu.wait();
            bail!(
                "the guest did not finish within {:?} (--timeout); QEMU killed",
                spec.timeout.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = console.join();
    match rx.try_recv() {
        Ok(status) => Ok(status),
        Err(_) => bail!("QEMU exited ({exit}) before the guest reported its test status"),
    }
}

/// Copy the console to stdout as it comes, and send the status of the first
/// `VFUD-GUEST-EXIT <n>` line.
fn stream_console(mut from: impl Read, status: mpsc::Sender<i32>) {
    let mut out = std::io::stdout();
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = false;
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        let _ = out.write_all(&buf[..n]);
        let _ = out.flush();
        for &b in &buf[..n] {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            if !sent {
                if let Some(st) = parse_exit_line(&line) {
                    let _ = status.send(st);
                    sent = true;
                }
            }
            line.clear();
        }
    }
}

fn parse_exit_line(line: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(line);
    let rest = &text[text.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
    rest.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_line_is_parsed_with_console_noise() {
        assert_eq!(parse_exit_line(b"VFUD-GUEST-EXIT 3\r"), Some(3));
        assert_eq!(parse_exit_line(b"\x1b[0mVFUD-GUEST-EXIT 0"), Some(0));
        assert_eq!(parse_exit_line(b"VFUD-GUEST-EXIT x"), None);
        assert_eq!(parse_exit_line(b"echo VFUD-GUEST-EXIT"), None);
    }
}
