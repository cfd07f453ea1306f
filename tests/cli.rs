//! The `vfud` command line: probe, serve (several devices, stale sockets, signals), help.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn vfud(args: &[&str]) -> std::process::Output {
    Command::new(common::vfud_bin())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn probe_of_a_missing_socket_fails_with_one_line() {
    let out = vfud(&["probe", "/nonexistent.sock"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent.sock") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn probe_prints_the_full_layout() {
    let v = common::Vfud::start("dma-engine", &[]);
    let out = vfud(&["probe", v.socket.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "max_msg_fds=16",
        "regions=10 irqs=5",
        "BAR2      size 0x100000 flags R,W,MMAP,CAPS (fd)",
        "mmap area 0x0+0x100000",
        "type 3 subtype 1",
        "MSI-X  count 4 flags EVENTFD,MASKABLE",
        "5646:0001 rev 01 class 088000",
        "cap [0x60] MSI-X table size 4 table BAR4+0x0 PBA BAR4+0x800",
        "serial 5646000100000001",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn one_process_serves_several_devices_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sock");
    let b = dir.path().join("b.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&b).unwrap());
    assert!(b.exists());
    let mut child = Command::new(common::vfud_bin())
        .args(["serve", "--device", "dma-engine", "--socket"])
        .arg(&a)
        .args(["--device", "uart16550,backend=null", "--socket"])
        .arg(&b)
        .args(["--socket-mode", "600"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !(a.exists() && common::wait_for_path(&b, Duration::from_millis(10))) {
        assert!(t.elapsed() < Duration::from_secs(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pa = vfud(&["probe", a.to_str().unwrap()]);
    let pb = vfud(&["probe", b.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&pa.stdout).contains("5646:0001"));
    assert!(String::from_utf8_lossy(&pb.stdout).contains("5646:0002"));
    // A second server on a live socket is refused.
    let busy = vfud(&[
        "serve",
        "--device",
        "dma-engine",
        "--socket",
        a.to_str().unwrap(),
    ]);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "vfud did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    assert!(!a.exists() && !b.exists(), "sockets removed on exit");
}

#[test]
fn bad_arguments_get_readable_errors_and_every_subcommand_has_help() {
    let out = vfud(&["serve", "--device", "nope", "--socket", "/tmp/x.sock"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device \"nope\""));
    let out = vfud(&[
        "serve",
        "--device",
        "uart16550,speed=9",
        "--socket",
        "/tmp/x.sock",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no option \"speed\""));
    for sub in [
        "serve",
        "probe",
        "migrate",
        "qemu-migrate",
        "bench",
        "devices",
        "trace",
        "status",
        "completions",
        "man",
        "guest",
    ] {
        let out = vfud(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Usage"), "{sub}");
        assert!(
            help.contains(&format!("Example:\n  vfud {sub}")),
            "{sub} --help shows an example line: {help}"
        );
    }
    let top = vfud(&["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("Example:\n  vfud serve"));
    let out = vfud(&["devices"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        common::model_names(&text),
        ["dma-engine", "uart16550"],
        "{text}"
    );
    assert!(text.contains("backend=…"), "options are listed: {text}");
}
