//! `vfud guest` with the example driver (examples/dma-engine-driver) on a real QEMU 11.1 and
//! Linux guest: the README guide's command builds the driver against the guest kernel's
//! headers, loads it, and the guest script runs 100 COPY, FILL and CRC jobs each (results
//! verified by the driver, CRCs by the driver and here), with one MSI-X interrupt per job in
//! `/proc/interrupts`, then reloads it with MSI, INTx and MSI-X again, with a clean kernel log.
//! The same runs with plain (non-fd) guest RAM from a prebuilt `.ko`, and the command's own
//! contract (exit status, bad input) is checked.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::qemu::{guest_values, provision, repo_root};

/// Upper bound for one `vfud guest` run (about 6 s here); passed as `--timeout`.
const RUN_TIMEOUT_S: &str = "100";

/// The `vfud guest` arguments of the README's guide ("Prototyping a device and its driver").
fn guide_args() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Prototyping a device and its driver"))
        .expect("README section 'Prototyping a device and its driver'");
    let line = section
        .lines()
        .find(|l| l.starts_with("cargo run --release -- guest "))
        .expect("the guide's `cargo run --release -- guest` command");
    line.split_whitespace()
        .skip_while(|w| *w != "--")
        .skip(1)
        .map(String::from)
        .collect()
}

/// Run the vfud binary with `args` (and a timeout) in the repository; prints its output.
fn vfud_guest<S: AsRef<str>>(args: &[S]) -> Output {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new(common::vfud_bin())
        .args(&args)
        .args(["--timeout", RUN_TIMEOUT_S])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run vfud guest");
    eprintln!(
        "----- vfud {} ({})\n{}\n----- stderr\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The example's xorshift32 byte pattern (`vdma_pattern` in vfud_dma.c).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = if seed == 0 { 1 } else { seed };
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// CRC32 of the last crc job of a round of `n` jobs in test.sh (job `n`: length
/// `(n * 4099) % 65536 + 1`, seed `n`).
fn last_crc(n: u32) -> String {
    let len = (n * 4099) % 65536 + 1;
    format!("0x{:08x}", crc32fast::hash(&pattern(len as usize, n)))
}

/// Everything the example's test.sh must have reported for a successful run.
fn assert_example_results(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: HashMap<String, String> = guest_values(&stdout);
    let get = |k: &str| v.get(k).map(String::as_str).unwrap_or("<missing>");
    let rounds = [
        ("first", "msix", 100),
        ("msi", "msi", 10),
        ("intx", "intx", 10),
        ("reload", "msix", 10),
    ];
    let mut total = 0;
    for (round, mode, n) in rounds {
        let key = |k: &str| format!("{round}_{k}");
        assert_eq!(get(&key("mode")), mode, "{round}: interrupt type");
        for kind in ["copy", "fill", "crc"] {
            assert_eq!(get(&key(kind)), n.to_string(), "{round}: {kind} jobs");
        }
        assert_eq!(get(&key("failures")), "0", "{round}: failed jobs");
        assert_eq!(get(&key("bad")), "0", "{round}: failed job writes");
        // One interrupt per job handled by the driver, and in /proc/interrupts. INTx may
        // fire again when QEMU unmasks it at the handler's first BAR read, before the
        // handler's STATUS write lowers the line; the driver counts those as spurious.
        let jobs = 3 * n;
        assert_eq!(get(&key("irqs")), jobs.to_string(), "{round}: interrupts");
        let spurious: u32 = get(&key("spurious")).parse().expect("spurious count");
        if mode == "intx" {
            assert!(spurious <= jobs, "{round}: {spurious} spurious interrupts");
        } else {
            assert_eq!(spurious, 0, "{round}: spurious interrupts");
        }
        assert_eq!(
            get(&key("proc_irqs")),
            (jobs + spurious).to_string(),
            "{round}: /proc/interrupts"
        );
        // The device's counter runs since its reset, across driver reloads.
        total += 3 * n;
        assert_eq!(
            get(&key("completions")),
            total.to_string(),
            "{round}: device completions"
        );
        assert_eq!(get(&key("device_crc")), last_crc(n), "{round}: device CRC");
        assert_eq!(get(&key("driver_crc")), last_crc(n), "{round}: driver CRC");
    }
    assert_eq!(get("kernel_warnings"), "0");
    assert!(
        stdout.contains("vfud_dma 0000:00:01.0: dma-engine version 0x10000, msix interrupt"),
        "probe message on the console"
    );
    assert!(!stdout.contains("FAIL"), "a guest check failed");
    assert_eq!(out.status.code(), Some(0), "vfud guest exit status");
}

#[test]
fn guide_command_builds_loads_and_runs_the_example_driver() {
    let args = guide_args();
    assert_eq!(args.first().map(String::as_str), Some("guest"), "{args:?}");
    let out = vfud_guest(&args);
    assert_example_results(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built vfud_dma.ko for kernel"),
        "module built from source"
    );
}

/// Build the example with scripts/build-module.sh, as a vendor's CI would, into `out`.
fn prebuilt_module(out: &Path) -> PathBuf {
    provision();
    let res = Command::new(repo_root().join("scripts/build-module.sh"))
        .arg(repo_root().join("examples/dma-engine-driver"))
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/build-module.sh");
    assert!(
        res.status.success(),
        "build-module.sh: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let ko = PathBuf::from(String::from_utf8_lossy(&res.stdout).trim());
    assert_eq!(ko, out.join("vfud_dma.ko"));
    assert!(ko.is_file());
    ko
}

#[test]
fn plain_ram_runs_the_example_driver_from_a_prebuilt_module() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ko = prebuilt_module(dir.path());
    let ko = ko.to_str().expect("utf-8 path");
    let trace = std::fs::canonicalize(dir.path())
        .expect("canonical")
        .join("trace.log");
    let trace_arg = format!("--qemu-arg={}", trace.display());
    let script = "examples/dma-engine-driver/test.sh";
    let args = [
        "guest",
        "--device",
        "dma-engine",
        "--ram",
        "plain",
        "--module",
        ko,
        "--script",
        script,
        "--qemu-arg=-trace",
        "--qemu-arg=vfio_user_recv_hdr",
        "--qemu-arg=-D",
        &trace_arg,
    ];
    let out = vfud_guest(&args);
    assert_example_results(&out);
    // The data went through vfio-user DMA_READ (0xb) / DMA_WRITE (0xc) requests from vfud
    // (flags 0), as plain RAM has no fd to map: at least one per copy, fill and crc job.
    let log = std::fs::read_to_string(&trace).expect("QEMU trace log");
    let requests = |cmd: &str| {
        log.lines()
            .filter(|l| l.contains(&format!(" cmd {cmd} ")) && l.ends_with("flags 0x0"))
            .count()
    };
    let (reads, writes) = (requests("0xb"), requests("0xc"));
    eprintln!("[test] DMA_READ requests {reads}, DMA_WRITE requests {writes}");
    assert!(reads >= 200, "DMA_READ requests: {reads}");
    assert!(writes >= 200, "DMA_WRITE requests: {writes}");
}

#[test]
fn exit_status_is_the_scripts_and_bad_input_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("status.sh");
    std::fs::write(&script, "echo \"modules: [$VFUD_MODULES]\"\nexit 7\n").expect("script");
    let script = script.to_str().expect("utf-8 path");
    let out = vfud_guest(&["guest", "--device", "dma-engine", "--script", script]);
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stdout).contains("modules: []"));

    // Bad input: a clear message, no guest.
    let empty = dir.path().to_str().expect("utf-8 path");
    for (bad, message) in [
        (
            ["--device", "no-such-device"],
            "unknown device \"no-such-device\"",
        ),
        (
            ["--module", "/nonexistent/x.ko"],
            "/nonexistent/x.ko: no such file",
        ),
        (
            ["--module-src", empty],
            "neither a Kbuild file nor a Makefile",
        ),
    ] {
        let mut args = vec!["guest", "--device", "dma-engine"];
        args.extend(bad);
        let out = vfud_guest(&args);
        assert!(!out.status.success(), "{args:?} refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: expected {message:?}");
    }
}

#[test]
fn keep_leaves_a_shell_on_the_console() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("three.sh");
    std::fs::write(&script, "exit 3\n").expect("script");
    let mut child = Command::new(common::vfud_bin())
        .args([
            "guest",
            "--device",
            "dma-engine",
            "--keep",
            "--timeout",
            RUN_TIMEOUT_S,
        ])
        .arg("--script")
        .arg(&script)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn vfud guest --keep");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    // Type into the console once the shell is announced; `exit` ends the guest.
    let mut console = String::new();
    for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
        let line = String::from_utf8_lossy(&line).into_owned();
        eprintln!("[guest] {}", line.trim_end());
        if line.contains("shell on the console") {
            stdin
                .write_all(b"echo kept-$((6 * 7))\nexit\n")
                .expect("type into the console");
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().expect("wait vfud guest");
    assert!(
        console.contains("script status 3"),
        "the wrapper reports the status"
    );
    assert!(
        console.contains("kept-42"),
        "the shell ran the typed command"
    );
    assert_eq!(status.code(), Some(3), "exit status is still the script's");
}
