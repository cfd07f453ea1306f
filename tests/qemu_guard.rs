//! `vfud qemu-migrate` against QEMU 11.1: a VM with a vfud dma-engine, a destination QEMU
//! waiting with `-incoming`, and the guard run between them.
//!
//! QEMU 11.1's vfio-user client cannot migrate device state (its `vfio-user-pci` has no
//! `enable-migration` property, and a `migrate` completes with the device freshly reset on the
//! destination). On such a QEMU the test expects a refusal: non-zero exit, a message naming
//! the QEMU version, the device and the loss, no migration started, the source still running
//! and its guest still driving the device. On a QEMU whose `vfio-user-pci` has
//! `enable-migration` (the test asks QEMU itself) it expects a real live migration instead, after
//! which the guest, now on the destination, still reads the device's ID from BAR0 and a marker
//! from device memory (BAR2), with memory decoding still enabled in COMMAND.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::qemu::{last_tick, Qemu, QemuOpts, DMA_ENGINE_GUEST_LIB, GUEST_TIMEOUT};
use common::{run_vfud, wait_for_path};
use serde_json::json;

/// dma-engine ID register (BAR0 offset 0).
const ID: &str = "0x4d444656";
/// Written by the guest into device memory (BAR2 offset 0x1000).
const MARKER: &str = "0x600dcafe";
/// PCI COMMAND: memory space enable.
const COMMAND_MEM: u64 = 0x2;
/// Deadline for `vfud qemu-migrate` to finish.
const GUARD_TIMEOUT: Duration = Duration::from_secs(45);

/// The guest writes the marker into device memory, then every 0.2 s prints a tick with what
/// it reads from the device: ID (BAR0), marker (BAR2) and the COMMAND register.
const GUEST: &str = r#"
wr2 0x1000 0x600dcafe
ok "ready_id=$(rd 0x00) ready_marker=$(rd2 0x1000) ready_cmd=$(cmdreg)"
i=0
while [ $i -lt 3000 ]; do
  i=$((i + 1))
  ok "tick=$i id=$(rd 0x00) marker=$(rd2 0x1000) cmd=$(cmdreg)"
  sleep 0.2
done
"#;

/// A `vfud serve --device dma-engine` on a socket of our choosing, killed on drop.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str) -> Server {
        let socket = dir.join(format!("{name}.sock"));
        let child = common::serve_command()
            .args(["--device", "dma-engine", "--socket"])
            .arg(&socket)
            .spawn()
            .expect("spawn vfud serve");
        assert!(
            wait_for_path(&socket, Duration::from_secs(10)),
            "vfud did not create {}",
            socket.display()
        );
        Server { child, socket }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Assert that a tick shows a device with its state: ID, marker, memory decoding.
fn assert_device_alive(q: &Qemu, when: &str, tick: &HashMap<String, String>) {
    let get = |k: &str| tick.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(
        get("id"),
        ID,
        "{when}: BAR0 ID; {tick:?}\n{}",
        q.diagnostics()
    );
    assert_eq!(
        get("marker"),
        MARKER,
        "{when}: device memory marker; {tick:?}\n{}",
        q.diagnostics()
    );
    let cmd = u64::from_str_radix(get("cmd").trim_start_matches("0x"), 16)
        .unwrap_or_else(|_| panic!("{when}: bad cmd in {tick:?}"));
    assert_ne!(
        cmd & COMMAND_MEM,
        0,
        "{when}: COMMAND {cmd:#06x} lost memory decoding (device reset?)\n{}",
        q.diagnostics()
    );
}

fn status(q: &mut Qemu) -> String {
    q.execute("query-status", None)["status"]
        .as_str()
        .unwrap_or("<none>")
        .to_string()
}

#[test]
fn qemu_migrate_refuses_or_keeps_vfio_user_device_state() {
    let t0 = Instant::now();
    // Arrange: one directory (bound into both QEMUs) for the vfud sockets, the migration
    // socket and a second QMP socket per QEMU for vfud (a QMP socket serves one client, and
    // the harness holds the first).
    let tmp = tempfile::Builder::new()
        .prefix("vfud-guard-")
        .tempdir()
        .expect("tempdir");
    let dir = fs::canonicalize(tmp.path()).expect("canonical tempdir");
    let src_server = Server::start(&dir, "src");
    let dst_server = Server::start(&dir, "dst");
    let uri = format!("unix:{}", dir.join("migration.sock").display());
    let src_qmp = dir.join("src-guard.qmp");
    let dst_qmp = dir.join("dst-guard.qmp");
    let qmp_arg = |p: &Path| format!("unix:{},server=on,wait=off", p.display());
    let script = format!("{DMA_ENGINE_GUEST_LIB}{GUEST}");
    let mut src = QemuOpts::new()
        .device(&src_server.socket)
        .guest(&script)
        .args(&["-qmp", &qmp_arg(&src_qmp)])
        .start();
    let mut dst = QemuOpts::new()
        .device(&dst_server.socket)
        .guest(&script)
        .args(&["-qmp", &qmp_arg(&dst_qmp), "-incoming", &uri])
        .start();
    src.wait_for_serial("ready_id=", GUEST_TIMEOUT);
    let (first, tick) = src.wait_tick(0);
    assert_device_alive(&src, "before migrating", &tick);
    assert_eq!(status(&mut dst), "inmigrate", "{}", dst.diagnostics());
    let v = src.execute("query-version", None);
    let version = format!(
        "QEMU {}.{}.{}",
        v["qemu"]["major"], v["qemu"]["minor"], v["qemu"]["micro"]
    );
    let props = src.execute(
        "device-list-properties",
        Some(json!({ "typename": "vfio-user-pci" })),
    );
    let migratable = props
        .as_array()
        .expect("property list")
        .iter()
        .any(|p| p["name"] == "enable-migration");
    eprintln!(
        "[guard] {version}, vfio-user-pci enable-migration: {migratable}; guest ticking after {:.1?}",
        t0.elapsed()
    );

    // Act
    let t = Instant::now();
    let out = run_vfud(
        &[
            "qemu-migrate",
            "--qmp",
            src_qmp.to_str().expect("utf-8 path"),
            "--to",
            &uri,
            "--dest-qmp",
            dst_qmp.to_str().expect("utf-8 path"),
            "--timeout",
            "30",
        ],
        GUARD_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "[guard] vfud qemu-migrate: {} after {:.1?}\n--- stdout\n{stdout}--- stderr\n{stderr}---",
        out.status,
        t.elapsed()
    );
    let ctx = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");

    // Assert
    if !migratable {
        // QEMU would drop the device state: the guard must refuse and leave the VM alone.
        assert!(!out.status.success(), "the guard let it migrate\n{ctx}");
        for needle in [
            version.as_str(),
            "refusing to migrate",
            "device state",
            "lost",
            "freshly reset",
            "/machine/peripheral-anon/device[0]",
            "vfud migrate --handover",
            "nothing was started",
        ] {
            assert!(stderr.contains(needle), "message lacks {needle:?}\n{ctx}");
        }
        assert_eq!(status(&mut src), "running", "{}", src.diagnostics());
        let m = src.execute("query-migrate", None);
        assert!(
            m.get("status").is_none_or(|s| s == "none"),
            "a migration was started: {m}"
        );
        assert_eq!(status(&mut dst), "inmigrate", "the destination got a VM");
        let refused_at = last_tick(&src.serial_log()).map_or(first, |t| t.0);
        let (n, tick) = src.wait_tick(refused_at);
        assert_device_alive(&src, "after the refusal", &tick);
        eprintln!("[guard] refused; source guest at tick {n} still drives the device");
    } else {
        // QEMU can migrate vfio-user state: a real live migration must keep it.
        assert!(out.status.success(), "migration failed\n{ctx}");
        assert!(stdout.contains("migration completed"), "{ctx}");
        assert_eq!(status(&mut src), "postmigrate", "{}", src.diagnostics());
        let m = src.execute("query-migrate", None);
        assert_eq!(m["status"], "completed", "{m}");
        assert!(
            m["vfio"]["transferred"].as_u64().unwrap_or(0) > 0,
            "no vfio device state in the stream: {m}"
        );
        assert_eq!(status(&mut dst), "running", "{}", dst.diagnostics());
        let src_last = last_tick(&src.serial_log()).map_or(first, |t| t.0);
        let (n, tick) = dst.wait_tick(src_last);
        assert_device_alive(&dst, "on the destination after migrating", &tick);
        eprintln!("[guard] migrated; destination guest at tick {n} still drives the device");
    }
    eprintln!("[guard] total {:.1?}", t0.elapsed());
}
