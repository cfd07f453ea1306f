//! `vfud qemu-migrate`: drive a QEMU-to-QEMU live migration over QMP, and refuse it when
//! QEMU's vfio-user client cannot carry the state of the VM's vfio-user devices — or, with
//! `--replug`, move the VM anyway by unplugging those devices and plugging them in again on
//! the destination.
//!
//! - [`guard`]: what the VM has and whether QEMU can migrate it (read-only, QMP);
//! - [`migrate`]: the migration itself (`migrate`, `query-migrate`, the destination's start);
//! - [`replug`]: unplug → migrate → replug, with its report and its way back on failure.
//!
//! The plain flow: inspect the source (and the destination, given `--dest-qmp`); refuse with
//! an explanation and a non-zero exit, without sending `migrate`, when a device's state would
//! be lost; otherwise make sure no migration is running or blocked, send `migrate`, poll
//! `query-migrate` until `completed` or `failed`, and wait until the destination runs.

mod guard;
mod migrate;
mod replug;

use std::fmt::Display;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vfud::qmp::Qmp;

use guard::{inspect, refusal_message, Side};
use migrate::{ensure_incoming, migrate, preflight_source, query_status, wait_destination};

/// Arguments of `vfud qemu-migrate`.
#[derive(clap::Args, Debug)]
pub struct QemuMigrateArgs {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    pub qmp: PathBuf,
    /// Migration URI for the destination (e.g. `unix:/tmp/dst.mig`).
    #[arg(long)]
    pub to: String,
    /// QMP socket of the destination QEMU (started with `-incoming`), to wait for completion.
    #[arg(long, required_if_eq("replug", "true"))]
    pub dest_qmp: Option<PathBuf>,
    /// Only check whether the VM can be migrated (with `--replug`: replugged); migrate
    /// nothing. Warns about devices on a bus that cannot hot-unplug.
    #[arg(long)]
    pub check: bool,
    /// Move the VM although QEMU cannot migrate its vfio-user devices: unplug them on the
    /// source, migrate, and plug them in again on the destination (the guest sees a hot-unplug
    /// and a hot-plug). Any failure plugs them in again on the source.
    #[arg(long)]
    pub replug: bool,
    /// With --replug: the vfud socket of a device, `ID=PATH` (ID: the device's id or QOM
    /// path; a lone PATH when the VM has one device). Repeat per device.
    #[arg(long = "socket", value_name = "ID=PATH")]
    pub sockets: Vec<String>,
    /// With --replug: seconds to wait for the guest to release each device.
    #[arg(long, default_value_t = 30)]
    pub unplug_timeout: u64,
    /// With --replug: leave the source QEMU paused after a successful move instead of
    /// quitting it.
    #[arg(long)]
    pub keep_source: bool,
    /// With --replug: print the report as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds: cancel the migration and fail.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Where progress lines go: stdout, or stderr when stdout carries the JSON report.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    to_stderr: bool,
}

impl Progress {
    /// Print one line.
    pub fn line(self, s: impl Display) {
        if self.to_stderr {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    }
}

/// Run the command.
pub fn run(args: &QemuMigrateArgs) -> Result<()> {
    let out = Progress {
        to_stderr: args.json,
    };
    let mut src = Qmp::connect(&args.qmp)?;
    let source = inspect(&mut src).context("inspecting the source QEMU")?;
    out.line(format_args!("source: {}", source.summary()));
    if args.check || args.replug {
        let placements = replug::placements(&mut src, &source.version, &source.devices)
            .context("finding the buses of the source's vfio-user devices")?;
        if args.check {
            for w in placements.iter().filter_map(|p| p.hotplug_problem()) {
                eprintln!("warning: {w}");
            }
        }
        if args.replug {
            return replug::run(args, &mut src, &placements, out);
        }
    }
    let affected = source.affected();
    if !affected.is_empty() {
        let status = query_status(&mut src).unwrap_or_else(|e| format!("unknown: {e:#}"));
        bail!(
            "{}",
            refusal_message(&source.version, Side::Source, &affected, &status)
        );
    }
    preflight_source(&mut src)?;

    let mut dst = match &args.dest_qmp {
        Some(p) => {
            let mut q = Qmp::connect(p)?;
            let dest = inspect(&mut q).context("inspecting the destination QEMU")?;
            out.line(format_args!("destination: {}", dest.summary()));
            let affected = dest.affected();
            if !affected.is_empty() {
                let status = query_status(&mut src).unwrap_or_else(|e| format!("unknown: {e:#}"));
                bail!(
                    "{}",
                    refusal_message(&dest.version, Side::Destination, &affected, &status)
                );
            }
            ensure_incoming(&mut q, p, &args.to)?;
            Some(q)
        }
        None => None,
    };

    if args.check {
        out.line(format_args!(
            "check passed: every vfio-user device can migrate its state ({} device(s)); \
             nothing was started",
            source.devices.len()
        ));
        return Ok(());
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let was_running = query_status(&mut src)? == "running";
    migrate(&mut src, &args.to, deadline, source.devices.len(), out)?;
    if let Some(q) = dst.as_mut() {
        wait_destination(q, was_running, deadline, out)?;
    }
    Ok(())
}
