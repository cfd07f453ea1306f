//! `vfud qemu-migrate --replug` between two real QEMU 11.1 instances with a Linux guest
//! (TCG): the VM's vfio-user devices, each behind a `pcie-root-port`, are unplugged on the
//! source, the VM migrates over a UNIX socket into a destination started with `-incoming`,
//! and the devices are plugged in again there, served by the same vfud processes.
//!
//! The guest counts on its console (ttyS0, QEMU's serial file) and, every tick, looks up the
//! vfud UART's tty (the stock 8250 driver binds it as ttyS4) and writes the tick through it to
//! the UART's host socket; with the dma-engine it also reads the engine's ID register and a
//! marker it wrote into device memory at boot. So the tests see from outside whether the
//! guest kept running without a reboot (its counter continues on the destination's console),
//! whether the driver bound the UART again (the kernel's `ttyS4 at MMIO` line, and ticks
//! arriving at the host after the move), and whether vfud kept the device (the marker).

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{
    last_tick, Qemu, QemuOpts, PCI_GUEST_LIB, QMP_TIMEOUT, TICK_TIMEOUT, UART_KERNEL_ARG,
};
use common::{run_vfud, vfud_command, wait_output, Vfud};
use serde_json::{json, Value};

/// dma-engine ID register (BAR0 offset 0).
const DMA_ID: &str = "0x4d444656";
/// Written by the guest into the dma-engine's device memory (BAR2 offset 0x1000) at boot.
const MARKER: &str = "0x600dcafe";
/// Deadline for `vfud qemu-migrate`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(50);
/// The kernel's line when the 8250 driver binds the vfud UART (registers in a memory BAR).
const UART_BOUND: &str = "ttyS4 at MMIO";

/// The guest: set up the dma-engine if there is one, then tick every 0.2 s.
fn guest_script() -> String {
    format!(
        r#"{PCI_GUEST_LIB}
uart_tty() {{ d=$(find_pci_sub 0x5646 0x0002) && [ -d "$d/tty" ] && ls "$d/tty" | head -n 1; }}
dma_bars() {{
  d=$(find_pci 0x5646 0x0001) || return 1
  # Memory decoding and bus mastering: no driver binds the engine, so the script enables it
  # (again after each hot-plug).
  printf '\006' | dd of="$d/config" bs=1 seek=4 count=1 conv=notrunc 2>/dev/null
  b0=$(awk 'NR == 1 {{ print $1 }}' "$d/resource")
  b2=$(awk 'NR == 3 {{ print $1 }}' "$d/resource")
}}
dma_probe() {{
  if dma_bars; then
    echo "dma_id=$(printf '0x%08x' "$(devmem $((b0)) 32)")" \
         "dma_marker=$(printf '0x%08x' "$(devmem $((b2 + 0x1000)) 32)")"
  else
    echo "dma=none"
  fi
}}
if dma_bars; then devmem $((b2 + 0x1000)) 32 {MARKER}; fi
i=0
while [ $i -lt 100000 ]; do
  i=$((i + 1))
  t=$(uart_tty)
  w=0
  if [ -n "$t" ] && echo "uart-tick=$i" > "/dev/$t" 2>/dev/null; then w=1; fi
  ok "tick=$i tty=${{t:-none}} uart_write=$w $(dma_probe)"
  sleep 0.2
done
"#
    )
}

/// The host side of the UART: a thread keeping every byte read from the backend socket.
struct UartHost {
    got: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl UartHost {
    fn connect(path: &Path) -> Self {
        assert!(
            common::wait_for_path(path, Duration::from_secs(5)),
            "no UART backend socket {}",
            path.display()
        );
        let mut s = UnixStream::connect(path).expect("connect to the UART backend");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (got2, stop2) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop2.load(Ordering::Relaxed) {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got2.lock().unwrap().extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => panic!("reading the UART host socket: {e}"),
                }
            }
        });
        Self { got, stop }
    }

    /// The highest `uart-tick=N` received so far.
    fn last_uart_tick(&self) -> Option<u64> {
        let text = String::from_utf8_lossy(&self.got.lock().unwrap()).into_owned();
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix("uart-tick=")?.parse().ok())
            .max()
    }

    /// Wait for a `uart-tick=N` with N above `after` to reach the host; returns N.
    fn wait_above(&self, after: u64, q: &Qemu) -> u64 {
        let deadline = Instant::now() + TICK_TIMEOUT;
        loop {
            if let Some(n) = self.last_uart_tick().filter(|n| *n > after) {
                return n;
            }
            if Instant::now() >= deadline {
                panic!(
                    "no uart-tick above {after} reached the host within {TICK_TIMEOUT:?} \
                     (last {:?})\n{}",
                    self.last_uart_tick(),
                    q.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UartHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Two QEMUs, the vfud servers, the UART's host side, and the sockets between them.
struct Rig {
    uart: Vfud,
    dma: Option<Vfud>,
    host: UartHost,
    src: Qemu,
    dst: Qemu,
    src_qmp: PathBuf,
    dst_qmp: PathBuf,
    uri: String,
    /// Holds the migration socket and the tool's QMP sockets (under /tmp, which
    /// `scripts/qemu.sh` binds into every QEMU).
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Start vfud (UART, and the dma-engine `dma`, e.g. `dma-engine,msix=off`), the source QEMU with each
    /// device behind its own root port, and a destination waiting with `-incoming`, the same
    /// root ports and no vfio-user device. Returns once the source guest ticks with the UART
    /// bound and written to (and the dma-engine answering).
    fn start(dma: Option<&str>) -> Rig {
        let with_dma = dma.is_some();
        let dir = tempfile::Builder::new()
            .prefix("vfud-replug-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = fs::canonicalize(dir.path()).expect("canonical tempdir");
        let uart_dir = tempfile::tempdir().expect("tempdir");
        let backend = uart_dir.path().join("uart.host.sock");
        let uart = Vfud::start_in(
            uart_dir,
            &format!("uart16550,backend=socket:{}", backend.display()),
        );
        let host = UartHost::connect(&backend);
        let dma = dma.map(|spec| Vfud::start(spec, &[]));
        let (src_qmp, dst_qmp) = (d.join("src.qmp"), d.join("dst.qmp"));
        let uri = format!("unix:{}", d.join("migration.sock").display());
        let qmp_arg = |p: &Path| format!("unix:{},server=on,wait=off", p.display());
        let script = guest_script();
        let base = |qmp: &Path| {
            let mut o = QemuOpts::new().root_port("rp1");
            if with_dma {
                o = o.root_port("rp2");
            }
            o.kernel_arg(UART_KERNEL_ARG)
                .guest(&script)
                .args(&["-qmp", &qmp_arg(qmp)])
        };
        let mut src_opts = base(&src_qmp).device_on(&uart.socket, "uart0", "rp1");
        if let Some(dma) = &dma {
            src_opts = src_opts.device_on(&dma.socket, "dma0", "rp2");
        }
        let mut src = src_opts.start();
        let dst = base(&dst_qmp).incoming(&uri).start();
        let (n, _) = src.wait_tick_where(0, |m| ready(m, with_dma));
        host.wait_above(n.saturating_sub(1), &src);
        Rig {
            uart,
            dma,
            host,
            src,
            dst,
            src_qmp,
            dst_qmp,
            uri,
            _dir: dir,
        }
    }

    /// The arguments of `vfud qemu-migrate --replug --json` for this rig.
    fn replug_args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let mut a: Vec<String> = [
            "qemu-migrate",
            "--replug",
            "--json",
            "--qmp",
            &p(&self.src_qmp),
            "--dest-qmp",
            &p(&self.dst_qmp),
            "--to",
            &self.uri,
            "--timeout",
            "40",
            "--socket",
            &format!("uart0={}", p(&self.uart.socket)),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(dma) = &self.dma {
            a.extend(["--socket".into(), format!("dma0={}", p(&dma.socket))]);
        }
        a
    }
}

/// Whether a tick shows the UART bound as ttyS4 and written to, and (with the dma-engine)
/// the engine answering with its ID and the marker.
fn ready(m: &HashMap<String, String>, with_dma: bool) -> bool {
    let is = |k: &str, v: &str| m.get(k).map(String::as_str) == Some(v);
    is("tty", "ttyS4")
        && is("uart_write", "1")
        && (!with_dma || (is("dma_id", DMA_ID) && is("dma_marker", MARKER)))
}

/// The `--json` report on stdout.
fn report(stdout: &str, ctx: &str) -> Value {
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("--json output is not one JSON value ({e})\n{ctx}"))
}

fn status(q: &mut Qemu) -> String {
    q.execute("query-status", None)["status"]
        .as_str()
        .unwrap_or("<none>")
        .to_string()
}

/// Move the VM and check the guest, the devices, the report and the source's exit.
fn replug_moves_the_vm(with_dma: bool) {
    let t0 = Instant::now();
    // Arrange
    // QEMU 11.1 aborts when a vfio-user device with MSI-X is unplugged: serve it without.
    let mut rig = Rig::start(with_dma.then_some("dma-engine,msix=off"));
    eprintln!("[replug] source guest ready after {:.1?}", t0.elapsed());

    // Act
    let args = rig.replug_args();
    let out = run_vfud(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        TOOL_TIMEOUT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ctx = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    eprintln!("[replug] vfud qemu-migrate --replug: {}\n{ctx}", out.status);

    // Assert: the tool's verdict and report.
    assert!(out.status.success(), "replug failed\n{ctx}");
    let r = report(&stdout, &ctx);
    assert_eq!(r["moved"], true, "{r:#}");
    let phases: Vec<&str> = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(
        phases,
        [
            "unplug",
            "migrate",
            "destination-start",
            "replug",
            "quit-source"
        ]
    );
    let devices = r["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), if with_dma { 2 } else { 1 }, "{r:#}");
    for d in devices {
        assert_eq!(d["plugged_on"], "destination", "{r:#}");
        let (unplug, gap) = (d["unplug_ms"].as_f64(), d["gap_ms"].as_f64());
        assert!(
            matches!((unplug, gap), (Some(u), Some(g)) if u > 0.0 && g > u),
            "unplug_ms and gap_ms: {d}"
        );
    }
    assert_eq!(r["devices"][0]["bus"], "rp1");

    // The source QEMU quit cleanly; the guest kept counting on the destination, without a
    // reboot, and the 8250 driver bound the UART again there.
    let st = rig.src.wait_exit(QMP_TIMEOUT);
    assert!(
        st.success(),
        "source QEMU exit: {st}\n{}",
        rig.src.diagnostics()
    );
    let src_last = last_tick(&rig.src.serial_log()).expect("source ticks").0;
    assert_eq!(status(&mut rig.dst), "running");
    let (n, tick) = rig.dst.wait_tick_where(src_last, |m| ready(m, with_dma));
    let dst_log = rig.dst.serial_log();
    let first_on_dst = dst_log
        .lines()
        .find_map(|l| last_tick(&format!("{l}\n")))
        .expect("a tick on the destination")
        .0;
    assert!(
        first_on_dst >= src_last,
        "the destination's counter restarted ({first_on_dst} after {src_last})\n{}",
        rig.dst.diagnostics()
    );
    assert!(
        !dst_log.contains("Linux version"),
        "the guest booted again on the destination\n{}",
        rig.dst.diagnostics()
    );
    assert!(
        dst_log.contains(UART_BOUND),
        "no 8250 bind on the destination\n{}",
        rig.dst.diagnostics()
    );
    // What the guest writes through the UART after the move reaches the host.
    let host_n = rig.host.wait_above(src_last, &rig.dst);
    eprintln!(
        "[replug] source stopped at tick {src_last}; destination at {n} ({tick:?}); \
         host got uart-tick={host_n}; total {:.1?}",
        t0.elapsed()
    );
}

#[test]
fn replug_moves_a_guest_with_a_vfud_uart_to_another_qemu() {
    replug_moves_the_vm(false);
}

#[test]
fn replug_moves_a_guest_with_a_uart_and_a_dma_engine() {
    replug_moves_the_vm(true);
}

#[test]
fn replug_with_a_destination_killed_mid_migration_gives_the_source_its_uart_back() {
    let t0 = Instant::now();
    // Arrange: a slow migration, so that the destination dies while it runs.
    let mut rig = Rig::start(None);
    rig.src.execute(
        "migrate-set-parameters",
        Some(json!({ "max-bandwidth": 8 * 1024 * 1024 })),
    );

    // Act
    let args = rig.replug_args();
    let child = vfud_command(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .spawn()
        .expect("spawn vfud");
    let deadline = Instant::now() + TOOL_TIMEOUT;
    loop {
        let m = rig.src.execute("query-migrate", None);
        if m["status"] == "active" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never became active: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    rig.dst.kill();
    let killed_at = last_tick(&rig.src.serial_log()).map_or(0, |t| t.0);
    let out = wait_output(child, TOOL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ctx = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    eprintln!("[replug] with a killed destination: {}\n{ctx}", out.status);

    // Assert: the tool failed and said how it left things.
    assert!(!out.status.success(), "the tool reported success\n{ctx}");
    assert!(stderr.contains("migration failed"), "{ctx}");
    let r = report(&stdout, &ctx);
    assert_eq!(r["moved"], false, "{r:#}");
    assert_eq!(r["devices"][0]["plugged_on"], "source", "{r:#}");
    let rollback = r["rollback"].as_str().unwrap_or_default();
    assert!(
        rollback.contains("running") && rollback.contains("uart0"),
        "{r:#}"
    );
    // The source runs, the driver bound the UART again, and the guest writes through it.
    assert_eq!(status(&mut rig.src), "running", "{}", rig.src.diagnostics());
    let (n, _) = rig.src.wait_tick_where(killed_at, |m| ready(m, false));
    assert!(
        rig.src.serial_log().matches(UART_BOUND).count() >= 2,
        "the UART was not bound again on the source\n{}",
        rig.src.diagnostics()
    );
    let host_n = rig.host.wait_above(n.saturating_sub(1), &rig.src);
    eprintln!(
        "[replug] source back at tick {n}, host got uart-tick={host_n}; total {:.1?}",
        t0.elapsed()
    );
}

#[test]
fn replug_refuses_up_front_a_device_whose_unplug_would_abort_qemu() {
    // Arrange: the dma-engine with MSI-X, which QEMU 11.1 cannot unplug without aborting.
    let mut rig = Rig::start(Some("dma-engine"));
    let args = rig.replug_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let version = rig.src.execute("query-version", None);
    let old_qemu = (
        version["qemu"]["major"].as_u64(),
        version["qemu"]["minor"].as_u64(),
    ) <= (Some(11), Some(1));

    // Act: --check (the plain guard), then --replug.
    let check = run_vfud(
        &[
            "qemu-migrate",
            "--check",
            "--qmp",
            args[4],
            "--to",
            &rig.uri,
        ],
        TOOL_TIMEOUT,
    );
    let out = run_vfud(&args, TOOL_TIMEOUT);
    let check_err = String::from_utf8_lossy(&check.stderr).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "[replug] --check:\n{check_err}\n--replug: {}\n{stderr}",
        out.status
    );

    // Assert
    if !old_qemu {
        eprintln!("[replug] QEMU {version} may unplug MSI-X devices: nothing to refuse");
        return;
    }
    assert!(
        check_err.contains("warning: ") && check_err.contains("has MSI-X"),
        "{check_err}"
    );
    assert!(!out.status.success(), "--replug went ahead\n{stderr}");
    for needle in [
        "cannot replug",
        "dma0",
        "MSI-X",
        "msix=off",
        "nothing was started",
    ] {
        assert!(
            stderr.contains(needle),
            "message lacks {needle:?}\n{stderr}"
        );
    }
    assert_eq!(status(&mut rig.src), "running");
    assert_eq!(status(&mut rig.dst), "inmigrate");
    let at = last_tick(&rig.src.serial_log()).map_or(0, |t| t.0);
    rig.src.wait_tick_where(at, |m| ready(m, true));
}
