//! Plumbing shared by the scenarios: a scratch directory, child processes (vfud servers and the
//! raw peer) that are always stopped, latency statistics, and the result rows with their table
//! and JSON forms.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::raw::{Mode, RawConn};

/// A scratch directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let p = std::env::temp_dir().join(format!("vfud-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process in its own process group, stopped when dropped: SIGINT (which `vfud serve`
/// and profilers such as `perf` and `strace` handle by finishing cleanly), then SIGKILL.
/// Only the group this bench created is signalled.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn spawn(mut cmd: Command, wait_for: &[PathBuf]) -> Result<Self> {
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "error");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut p = Self { child };
        let start = Instant::now();
        while !wait_for.iter().all(|w| w.exists()) {
            if let Ok(Some(st)) = p.child.try_wait() {
                bail!("{:?} exited early: {st}", cmd.get_program());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("{:?} did not create its sockets", cmd.get_program());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(p)
    }

    /// Process id (of the wrapper, with `--wrap`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, s: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), s);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(Signal::SIGINT);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Everything a scenario needs: where to put sockets and how to start processes.
pub struct Ctx {
    // Fields drop in order: the peer stops before its directory goes.
    peer: Option<(Proc, PathBuf)>,
    dir: TempDir,
    exe: PathBuf,
    wrap: Option<Vec<String>>,
    verbose: bool,
    next: u32,
    server_cpu: Option<usize>,
    nproc: usize,
}

impl Ctx {
    /// A context; `wrap` prefixes every spawned server's command line.
    pub fn new(wrap: Option<String>, verbose: bool) -> Result<Self> {
        Ok(Self {
            exe: std::env::current_exe().context("locating the vfud executable")?,
            wrap: wrap.map(|w| w.split_whitespace().map(String::from).collect()),
            verbose,
            dir: TempDir::new()?,
            next: 0,
            peer: None,
            server_cpu: None,
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    /// CPUs this process could use when it started (before any pinning).
    pub fn nproc(&self) -> usize {
        self.nproc
    }

    /// The vfud executable.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Progress line on stderr (table mode only).
    pub fn say(&self, msg: &str) {
        if self.verbose {
            eprintln!("{msg}");
        }
    }

    /// A fresh path in the scratch directory.
    pub fn path(&mut self, stem: &str) -> PathBuf {
        self.next += 1;
        self.dir.0.join(format!("{stem}-{}.sock", self.next))
    }

    fn command(&self, wrapped: bool) -> Command {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(cpu) = self.server_cpu {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string().into()]);
        }
        if let (Some(w), true) = (&self.wrap, wrapped) {
            argv.extend(w.iter().map(OsString::from));
        }
        argv.push(self.exe.clone().into());
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    }

    /// Run `f` with this thread on CPU `client` and every process `f` starts (servers and a
    /// fresh raw peer) on CPU `server`, so vfud and its baseline are placed alike. Nests.
    pub fn placed<R>(
        &mut self,
        client: usize,
        server: usize,
        f: impl FnOnce(&mut Ctx) -> Result<R>,
    ) -> Result<R> {
        let own = std::fs::read_to_string("/proc/self/status")?
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string())
            .context("no Cpus_allowed_list")?;
        set_affinity(&client.to_string())?;
        let outer_peer = self.peer.take();
        let outer_cpu = self.server_cpu.replace(server);
        let r = f(self);
        self.server_cpu = outer_cpu;
        self.peer = outer_peer;
        set_affinity(&own)?;
        r
    }

    /// `vfud serve ARGS…`, waiting until every path in `wait_for` exists.
    pub fn serve(&self, args: &[OsString], wait_for: &[PathBuf]) -> Result<Proc> {
        let mut c = self.command(true);
        c.arg("serve").args(args);
        Proc::spawn(c, wait_for)
    }

    /// `vfud serve --device MODEL --socket P`; returns the process and P.
    pub fn serve_device(&mut self, model: &str) -> Result<(Proc, PathBuf)> {
        let sock = self.path(model);
        let args = [
            "--device".into(),
            model.into(),
            "--socket".into(),
            sock.clone().into(),
        ];
        Ok((self.serve(&args, std::slice::from_ref(&sock))?, sock))
    }

    /// A bench-only model (see `bench::serve_internal`) in a child process.
    pub fn serve_bench_model(&mut self, model: &str) -> Result<(Proc, PathBuf)> {
        let sock = self.path(model);
        let mut c = self.command(true);
        c.args(["bench", "--internal-serve", model, "--socket"])
            .arg(&sock);
        Ok((Proc::spawn(c, std::slice::from_ref(&sock))?, sock))
    }

    /// A connection to the raw peer (started on first use).
    pub fn raw(&mut self, mode: Mode) -> Result<RawConn> {
        if self.peer.is_none() {
            let sock = self.path("peer");
            let mut c = self.command(false);
            c.arg("bench").arg("--internal-peer").arg(&sock);
            self.peer = Some((Proc::spawn(c, std::slice::from_ref(&sock))?, sock));
        }
        let Some((_, sock)) = &self.peer else {
            bail!("raw peer missing");
        };
        RawConn::connect(sock, mode).context("connecting to the raw peer")
    }
}

/// Pin this process's main thread (the one running the scenarios) to `cpus` with `taskset`.
fn set_affinity(cpus: &str) -> Result<()> {
    let st = Command::new("taskset")
        .args(["-p", "-c", cpus])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !st.success() {
        bail!("taskset -p -c {cpus} failed: {st}");
    }
    Ok(())
}

/// Whether CPU placement can be controlled (`taskset` runs).
pub fn can_place() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Nanoseconds since `t`.
pub fn ns(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Latency samples in nanoseconds.
#[derive(Default)]
pub struct Samples(pub Vec<u64>);

impl Samples {
    /// Time one call of `f` and keep the sample.
    pub fn time<T, E>(&mut self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let t = Instant::now();
        let r = f()?;
        self.0.push(ns(t));
        Ok(r)
    }

    /// The `p`-th percentile (0–100) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() - 1) as f64 * p / 100.0).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1e3
    }

    /// Mean in microseconds.
    pub fn mean_us(&self) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.iter().map(|&x| x as f64).sum::<f64>() / self.0.len() as f64 / 1e3
    }
}

/// Median of a few repeated measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Seconds taken by `f`.
pub fn seconds<E>(f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Unit of a row's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds (lower is better).
    Ns,
    /// Microseconds (lower is better).
    Us,
    /// Milliseconds (lower is better).
    Ms,
    /// Operations per second (higher is better).
    PerSec,
    /// Gigabytes (10⁹ B) per second (higher is better).
    GBps,
    /// Kibibytes of memory (lower is better).
    KiB,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "us",
            Unit::Ms => "ms",
            Unit::PerSec => "1/s",
            Unit::GBps => "GB/s",
            Unit::KiB => "KiB",
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Unit::Ns => format!("{v:.1} ns"),
            Unit::Us => format!("{v:.2} µs"),
            Unit::Ms if v.abs() < 1.0 => format!("{v:.3} ms"),
            Unit::Ms => format!("{v:.1} ms"),
            Unit::PerSec if v >= 1e6 => format!("{:.2} M/s", v / 1e6),
            Unit::PerSec => format!("{:.0} k/s", v / 1e3),
            Unit::GBps => format!("{v:.2} GB/s"),
            Unit::KiB => format!("{v:.0} KiB"),
        }
    }
}

/// What a row should reach. Ratios are always vfud ÷ baseline.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// Reported for information.
    None,
    /// Ratio at most this.
    RatioMax(f64),
    /// Ratio at least this.
    RatioMin(f64),
    /// The vfud figure itself at least this (in the row's unit).
    AtLeast(f64),
}

impl Goal {
    fn describe(self, unit: Unit) -> String {
        match self {
            Goal::None => "—".into(),
            Goal::RatioMax(x) => format!("ratio ≤ {x}"),
            Goal::RatioMin(x) => format!("ratio ≥ {x}"),
            Goal::AtLeast(x) => format!("≥ {}", unit.format(x)),
        }
    }

    fn met(self, vfud: f64, ratio: f64) -> Option<bool> {
        match self {
            Goal::None => None,
            Goal::RatioMax(x) => Some(ratio <= x),
            Goal::RatioMin(x) => Some(ratio >= x),
            Goal::AtLeast(x) => Some(vfud >= x),
        }
    }
}

/// One result line.
#[derive(Clone, Debug)]
pub struct Row {
    /// Scenario and metric, e.g. `region-rtt read p99`.
    pub name: String,
    /// Unit of both figures.
    pub unit: Unit,
    /// vfud's figure.
    pub vfud: f64,
    /// The baseline's figure.
    pub baseline: f64,
    /// What the baseline is.
    pub baseline_is: &'static str,
    /// Target.
    pub goal: Goal,
}

impl Row {
    /// A row.
    pub fn new(
        name: impl Into<String>,
        unit: Unit,
        vfud: f64,
        baseline: f64,
        baseline_is: &'static str,
        goal: Goal,
    ) -> Self {
        Self {
            name: name.into(),
            unit,
            vfud,
            baseline,
            baseline_is,
            goal,
        }
    }

    /// A latency row: the `pct`-th percentile of vfud's and the baseline's samples, in µs.
    pub fn percentile(
        name: impl Into<String>,
        vfud: &Samples,
        baseline: &Samples,
        pct: f64,
        baseline_is: &'static str,
        goal: Goal,
    ) -> Self {
        let (v, b) = (vfud.percentile_us(pct), baseline.percentile_us(pct));
        Self::new(name, Unit::Us, v, b, baseline_is, goal)
    }

    /// vfud ÷ baseline.
    pub fn ratio(&self) -> f64 {
        self.vfud / self.baseline
    }

    /// For `--json`.
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.name,
            "unit": self.unit.name(),
            "vfud": self.vfud,
            "baseline": self.baseline,
            "baseline_is": self.baseline_is,
            "ratio": self.ratio(),
            "goal": match self.goal {
                Goal::None => Value::Null,
                g => g.describe(self.unit).into(),
            },
            "met": self.goal.met(self.vfud, self.ratio()),
        })
    }
}

/// The rows as a fixed-width table, with a legend of baselines.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let met = match r.goal.met(r.vfud, r.ratio()) {
                Some(true) => " ok",
                Some(false) => " MISS",
                None => "",
            };
            [
                r.name.clone(),
                r.unit.format(r.vfud),
                r.unit.format(r.baseline),
                format!("{:.3}", r.ratio()),
                format!("{}{met}", r.goal.describe(r.unit)),
            ]
        })
        .collect();
    let head = ["scenario", "vfud", "baseline", "ratio", "goal"];
    let mut w = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String; 5]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            let pad = w[i] - x.chars().count();
            if i == 0 || i == 4 {
                let _ = write!(s, "{x}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(s, "{}{x}  ", " ".repeat(pad));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&head.map(String::from));
    out += &line(&w.map(|n| "-".repeat(n)));
    for c in &cells {
        out += &line(c);
    }
    out += "\nbaselines:\n";
    let mut seen = Vec::new();
    for r in rows {
        let key = r.name.split_whitespace().next().unwrap_or_default();
        if !seen.contains(&(key, r.baseline_is)) {
            seen.push((key, r.baseline_is));
            let _ = writeln!(out, "  {key}: {}", r.baseline_is);
        }
    }
    out
}

/// CPU count (`nproc`), CPU model and kernel of this machine.
pub fn machine(nproc: usize) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    json!({"nproc": nproc, "cpu": cpu, "kernel": kernel})
}

/// Resident set size of a process in KiB (`VmRSS` in `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let s = Samples((1..=100).rev().map(|x| x * 1000).collect());
        assert_eq!(s.percentile_us(50.0), 51.0);
        assert_eq!(s.percentile_us(99.0), 99.0);
        assert_eq!(s.percentile_us(100.0), 100.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn goals_compare_the_ratio_or_the_figure() {
        let r = |vfud, baseline, goal| Row::new("x", Unit::Us, vfud, baseline, "b", goal);
        let met = |row: Row| row.goal.met(row.vfud, row.ratio());
        assert_eq!(met(r(10.0, 10.0, Goal::RatioMax(1.05))), Some(true));
        assert_eq!(met(r(11.0, 10.0, Goal::RatioMax(1.05))), Some(false));
        assert_eq!(met(r(7.0, 10.0, Goal::RatioMin(0.7))), Some(true));
        assert_eq!(met(r(2e6, 1.0, Goal::AtLeast(1e6))), Some(true));
        assert_eq!(met(r(1.0, 1.0, Goal::None)), None);
    }

    #[test]
    fn table_lists_every_row_and_its_baseline() {
        let rows = [
            Row::new("a one", Unit::GBps, 1.0, 2.0, "base a", Goal::RatioMin(0.7)),
            Row::new("b two", Unit::PerSec, 2e6, 1e6, "base b", Goal::None),
        ];
        let t = table(&rows);
        assert!(t.contains("a one") && t.contains("0.500") && t.contains("MISS"));
        assert!(t.contains("2.00 M/s") && t.contains("  b: base b"));
    }
}
