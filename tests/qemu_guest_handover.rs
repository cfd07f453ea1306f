//! The example driver keeps running jobs while its dma-engine is handed over twice between
//! vfud processes (`vfud guest --control`, then `vfud serve --incoming` + `vfud migrate
//! --handover`): every job completes and verifies, and none is lost or completed twice — the
//! driver's job count, its interrupt count, `/proc/interrupts` and the device's own COMPLETIONS
//! register (which moved with the device state) all agree — and jobs go on after the last
//! handover.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{guest_values, repo_root};
use common::{serve_incoming, KillOnDrop};

/// How long the guest runs jobs (busybox `date +%s` seconds).
const LOOP_SECONDS: u32 = 8;
/// When the handovers happen, counted from the guest's first job.
const HANDOVER_AT: [Duration; 2] = [Duration::from_millis(1500), Duration::from_millis(4000)];
/// Deadline for the whole run.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// The guest script: jobs of every kind in turn for LOOP_SECONDS, a progress line every 300
/// jobs, then the driver's statistics and the interrupt count.
fn guest_script() -> String {
    format!(
        r#"
ok() {{ echo "VFUD-TEST: $*"; }}
dev=
for d in /sys/bus/pci/drivers/vfud_dma/0000:*; do [ -e "$d/job" ] && dev=$d; done
[ -n "$dev" ] || {{ ok "FAIL vfud_dma is bound to no device"; exit 1; }}
set -- $(cat "$dev/irq_info")
irq=$2
irqs() {{ awk -v k="$irq:" '$1 == k {{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }} END {{ print s + 0 }}' /proc/interrupts; }}
before=$(irqs)
ok "looping=1"
end=$(( $(date +%s) + {LOOP_SECONDS} ))
n=0 bad=0
while [ "$(date +%s)" -lt $end ]; do
  for kind in copy fill crc; do
    n=$((n + 1))
    echo "$kind $(( (n * 4099) % 65536 + 1 )) $n" > "$dev/job" 2>/dev/null || {{
      bad=$((bad + 1)); ok "FAIL job $n ($kind): $(dmesg | tail -n 1)"; }}
  done
  [ $((n % 300)) = 0 ] && echo "VFUD-TEST: progress=$n"
done
ok "jobs=$n bad=$bad proc_irqs=$(( $(irqs) - before ))"
ok "$(cat "$dev/stats")"
warnings=$(dmesg | grep -cE 'WARNING|BUG|Oops|Call Trace|vfud_dma.*(error|timed out)')
ok "kernel_warnings=$warnings"
[ $bad = 0 ] && [ $warnings = 0 ]
"#
    )
}

/// Wait until a console line contains `needle`; returns the console so far.
fn wait_console(console: &Mutex<String>, needle: &str, deadline: Instant) -> String {
    loop {
        let text = console.lock().expect("console").clone();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `progress=N` on the console.
fn last_progress(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .filter_map(|l| l.split("VFUD-TEST: progress=").nth(1))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn driver_jobs_survive_two_handovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let ctl: Vec<PathBuf> = ["a", "b", "c"]
        .iter()
        .map(|n| d.join(format!("{n}.ctl")))
        .collect();
    let script = d.join("loop.sh");
    std::fs::write(&script, guest_script()).expect("guest script");
    let mut guest = Command::new(common::vfud_bin());
    guest
        .args(["guest", "--device", "dma-engine", "--module-src"])
        .arg(repo_root().join("examples/dma-engine-driver"))
        .arg("--script")
        .arg(&script)
        .arg("--socket-dir")
        .arg(&d)
        .arg("--control")
        .arg(&ctl[0])
        .args(["--timeout", "80"])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut guest = KillOnDrop(guest.spawn().expect("spawn vfud guest"));
    let console = Arc::new(Mutex::new(String::new()));
    let reader = {
        let console = console.clone();
        let stdout = guest.0.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                eprintln!("[guest] {}", line.trim_end());
                console.lock().expect("console").push_str(&line);
                console.lock().expect("console").push('\n');
            }
        })
    };
    let deadline = Instant::now() + RUN_TIMEOUT;
    let text = wait_console(&console, "VFUD-TEST: looping=1", deadline);
    assert!(
        text.contains("looping=1"),
        "the guest never started its jobs"
    );
    let t0 = Instant::now();

    let mut incoming_procs = Vec::new();
    let mut progress_at_last_handover = 0;
    for (i, at) in HANDOVER_AT.iter().enumerate() {
        std::thread::sleep((t0 + *at).saturating_duration_since(Instant::now()));
        incoming_procs.push(serve_incoming("dma-engine", &ctl[i + 1]));
        common::handover(&ctl[i], &ctl[i + 1]);
        progress_at_last_handover = last_progress(&console.lock().expect("console"));
        eprintln!(
            "[test] handover {i} done at {:.1?}, guest progress {progress_at_last_handover}",
            t0.elapsed()
        );
    }

    let status = loop {
        if let Some(st) = guest.0.try_wait().expect("wait vfud guest") {
            break st;
        }
        assert!(Instant::now() < deadline, "vfud guest did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    reader.join().expect("console reader");
    let text = console.lock().expect("console").clone();
    let v = guest_values(&text);
    let get = |k: &str| -> u64 {
        v.get(k)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no numeric {k} from the guest"))
    };
    let jobs = get("jobs");
    assert_eq!(get("bad"), 0, "failed jobs");
    assert_eq!(get("failures"), 0, "jobs the driver found wrong");
    assert_eq!(get("copy") + get("fill") + get("crc"), jobs);
    assert_eq!(get("irqs"), jobs, "one handled interrupt per job");
    assert_eq!(
        get("proc_irqs"),
        jobs,
        "one interrupt per job in /proc/interrupts"
    );
    assert_eq!(
        get("completions"),
        jobs,
        "the device completed each job exactly once"
    );
    assert_eq!(get("spurious"), 0);
    assert_eq!(get("kernel_warnings"), 0);
    assert!(
        jobs > progress_at_last_handover + 300,
        "jobs went on after the last handover ({progress_at_last_handover} then {jobs})"
    );
    assert!(status.success(), "vfud guest: {status}");
}
