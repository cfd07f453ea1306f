//! systemd socket activation: `vfud serve` started by `systemd-socket-activate` (what a
//! socket unit does) adopts the passed listening socket, by name (`--socket fd:NAME`) or by
//! path, serves a client on it and leaves the socket file to systemd. The first test runs
//! the command lines of `contrib/systemd/vfud@.{socket,service}` as written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vfud_protocol::Client;

/// `systemd-socket-activate` (Debian package `systemd`).
fn activator() -> Command {
    let bin = "/usr/bin/systemd-socket-activate";
    assert!(
        Path::new(bin).exists(),
        "{bin} is missing: apt-get install -y systemd"
    );
    Command::new(bin)
}

/// Kills the activated server (systemd-socket-activate execs it, so the pid is the same).
struct Activated(Child);

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Listen on `sock` named `fdname` and run `vfud ARGS` on the first connection.
fn activate(sock: &Path, fdname: &str, args: &[String]) -> Activated {
    let child = activator()
        .arg("-l")
        .arg(sock)
        .arg(format!("--fdname={fdname}"))
        .args(["-E", "RUST_LOG=warn", common::vfud_bin()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    assert!(
        common::wait_for_path(sock, Duration::from_secs(10)),
        "systemd-socket-activate did not listen on {}",
        sock.display()
    );
    Activated(child)
}

/// `Key=value` of a unit file, with `%i` expanded and /run/vfud moved into `run`.
fn unit_value(file: &str, key: &str, instance: &str, run: &Path) -> String {
    let text =
        std::fs::read_to_string(common::qemu::repo_root().join("contrib/systemd").join(file))
            .expect("unit file");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{file} has no {key}="));
    line.replace("%i", instance)
        .replace("/run/vfud", &run.to_string_lossy())
}

#[test]
fn the_example_units_activate_vfud_on_the_first_client() {
    let run = tempfile::tempdir().expect("tempdir");
    let listen = PathBuf::from(unit_value(
        "vfud@.socket",
        "ListenStream",
        "dma-engine",
        run.path(),
    ));
    let name = unit_value(
        "vfud@.socket",
        "FileDescriptorName",
        "dma-engine",
        run.path(),
    );
    let exec = unit_value("vfud@.service", "ExecStart", "dma-engine", run.path());
    let mut words = exec.split_whitespace().map(str::to_string);
    assert_eq!(words.next().as_deref(), Some("/usr/bin/vfud"), "{exec}");
    let args: Vec<String> = words.collect();
    let _server = activate(&listen, &name, &args);

    let mut c = Client::connect_negotiated(&listen).expect("the first client starts vfud");
    let info = c.device_info().expect("DEVICE_GET_INFO");
    assert_eq!(info.num_regions, 10);
    // The control socket named in ExecStart answers `vfud status`.
    let ctl = run.path().join("dma-engine.ctl");
    assert!(common::wait_for_path(&ctl, Duration::from_secs(5)));
    let out = common::vfud_command(&["status"])
        .arg("--control")
        .arg(&ctl)
        .arg("--json")
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(s["model"], "dma-engine", "{s}");
    assert_eq!(s["client_connected"], true, "{s}");
}

#[test]
fn a_socket_passed_for_the_same_path_is_adopted_and_left_to_systemd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("uart.sock");
    let mut server = activate(
        &sock,
        "whatever",
        &[
            "serve".into(),
            "--device".into(),
            "uart16550".into(),
            "--socket".into(),
            sock.to_string_lossy().into_owned(),
        ],
    );
    // Binding the path anew would fail: systemd's socket is listening on it.
    let mut c = Client::connect_negotiated(&sock).expect("served on the passed socket");
    assert_eq!(c.device_info().unwrap().num_irqs, 5);
    drop(c);
    // A second client on the same passed socket after the first left.
    let mut c = Client::connect_negotiated(&sock).expect("second client");
    c.device_info().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = server.0.wait().unwrap();
    assert!(st.success(), "vfud exits cleanly on SIGTERM: {st}");
    assert!(
        sock.exists(),
        "the socket file is systemd's: vfud must leave it"
    );
}

#[test]
fn a_missing_socket_name_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("x.sock");
    let mut server = activate(
        &sock,
        "other",
        &[
            "serve".into(),
            "--device".into(),
            "uart16550".into(),
            "--socket".into(),
            "fd:uart".into(),
        ],
    );
    // The connection triggers the start; vfud then refuses and exits.
    let _ = std::os::unix::net::UnixStream::connect(&sock);
    let st = server.0.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = server.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).unwrap();
    }
    assert!(!st.success(), "{err}");
    assert!(
        err.contains(r#"no socket named "uart" was passed (LISTEN_FDNAMES has ["other"])"#),
        "{err}"
    );
}
