//! `vfud qemu-migrate`: drive a QEMU-to-QEMU live migration over QMP, and refuse it when
//! QEMU's vfio-user client cannot carry the state of the VM's vfio-user devices.
//!
//! - [`guard`]: what the VM has and whether QEMU can migrate it (read-only, QMP);
//! - [`migrate`]: the migration itself (`migrate`, `query-migrate`, the destination's start).
//!
//! The flow: inspect the source (and the destination, given `--dest-qmp`); refuse with an
//! explanation and a non-zero exit, without sending `migrate`, when a device's state would be
//! lost; otherwise make sure no migration is running or blocked, send `migrate`, poll
//! `query-migrate` until `completed` or `failed`, and wait until the destination runs.

mod guard;
mod migrate;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vfud::qmp::Qmp;

use guard::{inspect, refusal_message, Side};
use migrate::{migrate, preflight_source, query_status, wait_destination};

/// Arguments of `vfud qemu-migrate`.
#[derive(clap::Args, Debug)]
pub struct QemuMigrateArgs {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    pub qmp: std::path::PathBuf,
    /// Migration URI for the destination (e.g. `unix:/tmp/dst.mig`).
    #[arg(long)]
    pub to: String,
    /// QMP socket of the destination QEMU (started with `-incoming`), to wait for completion.
    #[arg(long)]
    pub dest_qmp: Option<std::path::PathBuf>,
    /// Only check whether the VM can be migrated without losing device state; migrate nothing.
    #[arg(long)]
    pub check: bool,
    /// Give up after this many seconds: cancel the migration and fail.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

/// Run the command.
pub fn run(args: &QemuMigrateArgs) -> Result<()> {
    let mut src = Qmp::connect(&args.qmp)?;
    let source = inspect(&mut src).context("inspecting the source QEMU")?;
    println!("source: {}", source.summary());
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
            println!("destination: {}", dest.summary());
            let affected = dest.affected();
            if !affected.is_empty() {
                let status = query_status(&mut src).unwrap_or_else(|e| format!("unknown: {e:#}"));
                bail!(
                    "{}",
                    refusal_message(&dest.version, Side::Destination, &affected, &status)
                );
            }
            let st = query_status(&mut q)?;
            if st != "inmigrate" {
                bail!(
                    "the destination QEMU ({}) is not waiting for a migration (status {st}): \
                     start it with `-incoming {}` (or `-incoming defer` and QMP \
                     `migrate-incoming`)",
                    p.display(),
                    args.to
                );
            }
            Some(q)
        }
        None => None,
    };

    if args.check {
        println!(
            "check passed: every vfio-user device can migrate its state ({} device(s)); \
             nothing was started",
            source.devices.len()
        );
        return Ok(());
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let was_running = query_status(&mut src)? == "running";
    migrate(&mut src, &args.to, deadline, source.devices.len())?;
    if let Some(q) = dst.as_mut() {
        wait_destination(q, was_running, deadline)?;
    }
    Ok(())
}
