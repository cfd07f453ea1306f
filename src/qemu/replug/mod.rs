//! `vfud qemu-migrate --replug`: move a VM with vfio-user devices to another QEMU that cannot
//! migrate their state, by unplugging them, migrating, and plugging them in again.
//!
//! QEMU 11.1's vfio-user client cannot migrate device state (see [`super::guard`]), but it can
//! hot-unplug and hot-plug a device, and a vfud device keeps its state when its client goes
//! away. So, all over QMP:
//! 1. **unplug** on the source: `device_del` every vfio-user-pci device and wait for
//!    `DEVICE_DELETED` (the guest has released it; with q35's ACPI hotplug this takes tens
//!    of milliseconds, with native PCIe hotplug several seconds). QEMU closes the socket and
//!    vfud is ready for a new client on the same path;
//! 2. **migrate** RAM, CPUs and every other device over the migration URI into the
//!    destination QEMU (started with `-incoming`, the same root ports, no vfio-user device:
//!    vfud serves one client per socket, so a destination that attaches at start-up fails);
//! 3. **replug** on the destination, once it runs: `device_add` with the same driver, id, bus
//!    and slot, pointing at the vfud socket given with `--socket` (`vfio-user-pci`'s `socket`
//!    property can be set but not read over QMP);
//! 4. **quit** the source QEMU, now an empty shell in `postmigrate` (unless `--keep-source`).
//!
//! The guest sees a hot-unplug and a hot-plug: its driver unbinds and binds again; what it
//! kept in RAM survives, what it had programmed into the device is set up again by the
//! driver's probe. The report ([`report`]) gives each phase's duration and, per device, the
//! gap between `device_del` on the source and `device_add` on the destination.
//!
//! **The way back.** Every failure ends with the source VM running and its devices plugged in
//! again there: a refused `device_del` or a guest that does not release a device plugs the
//! ones already gone back in; a failed migration (e.g. the destination died) plugs all back
//! in on the source, which QEMU keeps running; a destination that does not start, or refuses a
//! `device_add`, gets its added devices unplugged and is paused, then the source continues
//! (`cont`: its guest resumes from the moment of the switchover) and gets its devices back.

mod devices;
mod report;

pub use devices::placements;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use vfud::qmp::{Qmp, QmpError};

use super::guard::inspect;
use super::migrate::{ensure_incoming, migrate, preflight_source, query_status, wait_destination};
use super::{Progress, QemuMigrateArgs};
use devices::{plug, sockets_for, unplug, Placement};
use report::{Plugged, Report};

/// Run `vfud qemu-migrate --replug` on the source `src` whose devices are `placements`.
pub fn run(
    args: &QemuMigrateArgs,
    src: &mut Qmp,
    placements: &[Placement],
    out: Progress,
) -> Result<()> {
    let mut report = Report::new(placements);
    let result = move_vm(args, src, placements, &mut report, out);
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    if args.json {
        println!("{}", report.to_json());
    } else if !args.check {
        out.line(report.to_text());
    }
    result
}

/// Everything the flow needs at each step.
struct Move<'a> {
    src: &'a mut Qmp,
    dst: Qmp,
    placements: &'a [Placement],
    sockets: Vec<PathBuf>,
    was_running: bool,
    out: Progress,
}

fn move_vm(
    args: &QemuMigrateArgs,
    src: &mut Qmp,
    placements: &[Placement],
    report: &mut Report,
    out: Progress,
) -> Result<()> {
    // Preconditions: nothing is touched before all of them hold.
    let problems: Vec<String> = placements
        .iter()
        .filter_map(Placement::hotplug_problem)
        .collect();
    if !problems.is_empty() {
        bail!(
            "cannot replug: {}\nnothing was started",
            problems.join("\n")
        );
    }
    let sockets = sockets_for(placements, &args.sockets)?;
    let dest_path = args
        .dest_qmp
        .as_ref()
        .ok_or_else(|| anyhow!("--replug needs --dest-qmp"))?;
    let mut dst = Qmp::connect(dest_path)?;
    let dest = inspect(&mut dst)?;
    out.line(format_args!("destination: {}", dest.summary()));
    let taken: Vec<&str> = placements
        .iter()
        .filter_map(|p| p.device.id.as_deref())
        .filter(|id| dest.devices.iter().any(|d| d.id.as_deref() == Some(*id)))
        .collect();
    if !taken.is_empty() {
        bail!(
            "the destination already has vfio-user devices with the ids {}: start it without \
             them (vfud serves one client per socket); nothing was started",
            taken.join(", ")
        );
    }
    ensure_incoming(&mut dst, dest_path, &args.to)?;
    preflight_source(src)?;
    if args.check {
        out.line(format_args!(
            "check passed: {} vfio-user device(s) can be unplugged, and the destination waits \
             for the VM; nothing was started",
            placements.len()
        ));
        return Ok(());
    }

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut m = Move {
        was_running: query_status(src)? == "running",
        src,
        dst,
        placements,
        sockets,
        out,
    };

    // 1. Unplug on the source.
    let t = Instant::now();
    out.line(format_args!(
        "unplugging {} device(s) on the source",
        placements.len()
    ));
    match unplug(m.src, placements, Duration::from_secs(args.unplug_timeout)) {
        Ok(times) => {
            for (i, (sent, gone)) in times.into_iter().enumerate() {
                report.devices[i].unplugged(sent, gone);
            }
        }
        Err(e) => {
            let back = m.back_on_source(&e.gone, report, false);
            if let Some(i) = e.pending {
                report.devices[i].plugged = Plugged::PendingUnplug;
            }
            return Err(after_rollback(e.error, back));
        }
    }
    report.phase("unplug", t.elapsed());

    // 2. Migrate.
    let t = Instant::now();
    match migrate(m.src, &args.to, deadline, 0, out) {
        Ok(stats) => report.qemu = Some(stats),
        Err(e) => {
            report.phase("migrate", t.elapsed());
            let back = m.back_on_source(&all(placements), report, false);
            return Err(after_rollback(e, back));
        }
    }
    report.phase("migrate", t.elapsed());

    // 3. The destination runs the VM.
    let t = Instant::now();
    if let Err(e) = wait_destination(&mut m.dst, m.was_running, deadline, out) {
        let back = m.back_on_source(&all(placements), report, true);
        return Err(after_rollback(e, back));
    }
    report.phase("destination-start", t.elapsed());

    // 4. Replug on the destination.
    let t = Instant::now();
    out.line(format_args!(
        "plugging {} device(s) in on the destination",
        placements.len()
    ));
    match plug(&mut m.dst, placements, &m.sockets) {
        Ok(times) => {
            for (i, at) in times.into_iter().enumerate() {
                report.devices[i].plugged_in(Plugged::Destination, at);
            }
        }
        Err((failed, e)) => {
            report.phase("replug", t.elapsed());
            // Free the sockets of the devices the destination took, then hand the VM back.
            let added: Vec<usize> = (0..failed).collect();
            let freed = unplug(&mut m.dst, &subset(placements, &added), unplug_wait(args));
            let back = match freed {
                Ok(_) => m.back_on_source(&all(placements), report, true),
                Err(u) => format!(
                    "{}; could not unplug the devices already added on the destination ({:#}), \
                     so the source did not get them back",
                    m.back_on_source(&[], report, true),
                    u.error
                ),
            };
            return Err(after_rollback(e, back));
        }
    }
    report.phase("replug", t.elapsed());

    // 5. The source QEMU has nothing left to run.
    if !args.keep_source {
        let t = Instant::now();
        match m.src.execute("quit", None) {
            // QEMU may close the socket before its reply arrives.
            Ok(_) | Err(QmpError::Closed { .. }) | Err(QmpError::Io { .. }) => {}
            Err(e) => out.line(format_args!("warning: quitting the source QEMU: {e:#}")),
        }
        report.phase("quit-source", t.elapsed());
    }
    report.moved = true;
    Ok(())
}

/// The error of a failed step, followed by how the way back left the source.
fn after_rollback(e: anyhow::Error, back: String) -> anyhow::Error {
    anyhow!("{e:#}\n{back}")
}

/// How long to wait for the guest to release devices when undoing a failed step.
fn unplug_wait(args: &QemuMigrateArgs) -> Duration {
    Duration::from_secs(args.unplug_timeout)
}

fn all(placements: &[Placement]) -> Vec<usize> {
    (0..placements.len()).collect()
}

fn subset(placements: &[Placement], which: &[usize]) -> Vec<Placement> {
    which.iter().map(|&i| placements[i].clone()).collect()
}

impl Move<'_> {
    /// Bring the VM back to the source: with `pause_destination`, pause the destination (which
    /// may have run the guest) and let the source continue; then plug the devices `which` in
    /// again on the source. Returns what happened, for the error message.
    fn back_on_source(
        &mut self,
        which: &[usize],
        report: &mut Report,
        pause_destination: bool,
    ) -> String {
        let mut notes = Vec::new();
        if pause_destination {
            match self.dst.execute("stop", None) {
                Ok(_) => notes.push("the destination VM was paused".to_string()),
                Err(e) => notes.push(format!("could not pause the destination VM ({e})")),
            }
        }
        let status = query_status(self.src).unwrap_or_else(|e| format!("unknown ({e:#})"));
        if self.was_running && status != "running" {
            match self.src.execute("cont", None) {
                Ok(_) => notes.push(format!(
                    "the source VM continues (it was {status}; its guest resumes from the \
                     switchover)"
                )),
                Err(e) => notes.push(format!("could not resume the source VM: {e}")),
            }
        }
        let which_p = subset(self.placements, which);
        let socks: Vec<PathBuf> = which.iter().map(|&i| self.sockets[i].clone()).collect();
        let plugged = match plug(self.src, &which_p, &socks) {
            Ok(times) => {
                for (&i, at) in which.iter().zip(times) {
                    report.devices[i].plugged_in(Plugged::Source, at);
                }
                which.len()
            }
            Err((k, e)) => {
                for &i in &which[..k] {
                    report.devices[i].plugged = Plugged::Source;
                }
                notes.push(format!("plugging back in on the source failed: {e:#}"));
                k
            }
        };
        let names: Vec<&str> = which[..plugged]
            .iter()
            .map(|&i| self.placements[i].name())
            .collect();
        let status = query_status(self.src).unwrap_or_else(|e| format!("unknown ({e:#})"));
        let mut s = format!("the source VM is {status}");
        if !names.is_empty() {
            s += &format!(" with {} plugged in again", names.join(", "));
        }
        for n in notes {
            s += "; ";
            s += &n;
        }
        self.out.line(format_args!("rolled back: {s}"));
        report.rollback = Some(s.clone());
        s
    }
}
