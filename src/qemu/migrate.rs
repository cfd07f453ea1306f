//! Driving a QEMU migration over QMP: preflight, `migrate`, progress, completion, and the
//! destination's start.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use vfud::qmp::Qmp;

use super::Progress;

/// Interval between `query-migrate` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Interval between progress lines while the status does not change.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// `query-migrate` states in which a migration is under way (QAPI `MigrationStatus`).
const MIGRATION_ACTIVE_STATES: [&str; 11] = [
    "setup",
    "cancelling",
    "active",
    "postcopy-device",
    "postcopy-active",
    "postcopy-paused",
    "postcopy-recover-setup",
    "postcopy-recover",
    "colo",
    "pre-switchover",
    "device",
];

/// `query-status` → `status`.
pub fn query_status(q: &mut Qmp) -> Result<String> {
    let v = q.execute("query-status", None)?;
    v["status"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("query-status: no status in {v}"))
}

/// Refuse unless the destination QEMU at `path` waits for an incoming migration.
pub fn ensure_incoming(q: &mut Qmp, path: &Path, uri: &str) -> Result<()> {
    let st = query_status(q)?;
    if st != "inmigrate" {
        bail!(
            "the destination QEMU ({}) is not waiting for a migration (status {st}): \
             start it with `-incoming {uri}` (or `-incoming defer` and QMP \
             `migrate-incoming`)",
            path.display()
        );
    }
    Ok(())
}

/// Refuse when a migration is already under way or QEMU reports blockers.
pub fn preflight_source(q: &mut Qmp) -> Result<()> {
    let v = q.execute("query-migrate", None)?;
    if let Some(st) = v["status"].as_str() {
        if MIGRATION_ACTIVE_STATES.contains(&st) {
            bail!("a migration of the source QEMU is already under way (status {st})");
        }
    }
    if let Some(reasons) = v["blocked-reasons"].as_array() {
        if !reasons.is_empty() {
            let list: Vec<String> = reasons
                .iter()
                .map(|r| format!("  - {}", r.as_str().unwrap_or("?")))
                .collect();
            bail!(
                "the source QEMU blocks migration:\n{}\nnothing was started",
                list.join("\n")
            );
        }
    }
    Ok(())
}

/// What QEMU reported about a completed migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// `total-time`, ms.
    pub total_ms: u64,
    /// `downtime` (the VM paused for the switchover), ms.
    pub downtime_ms: u64,
}

/// Send `migrate` and poll `query-migrate` until it completes; cancel at `deadline`.
/// `vfio_user_devices` is how many vfio-user devices the migrating VM has: QEMU must then
/// have transferred vfio state.
pub fn migrate(
    q: &mut Qmp,
    uri: &str,
    deadline: Instant,
    vfio_user_devices: usize,
    out: Progress,
) -> Result<MigrationStats> {
    out.line(format_args!("migrating to {uri}"));
    let started = Instant::now();
    if let Err(e) = q.try_execute("migrate", Some(json!({ "uri": uri })))? {
        bail!("QEMU refused to start the migration: {e} (the source VM keeps running)");
    }
    let mut last_status = String::new();
    let mut last_print = Instant::now();
    loop {
        let v = q.execute("query-migrate", None)?;
        let status = v["status"].as_str().unwrap_or("none").to_string();
        if status != last_status || last_print.elapsed() >= PROGRESS_INTERVAL {
            out.line(format_args!(
                "  {:>6.1?} {}",
                started.elapsed(),
                progress_line(&status, &v)
            ));
            last_status = status.clone();
            last_print = Instant::now();
        }
        match status.as_str() {
            "completed" => {
                let total = v["total-time"].as_u64().unwrap_or(0);
                let downtime = v["downtime"].as_u64().unwrap_or(0);
                out.line(format_args!(
                    "migration completed in {total} ms (downtime {downtime} ms)"
                ));
                let vfio = v["vfio"]["transferred"].as_u64().unwrap_or(0);
                if vfio_user_devices > 0 && vfio == 0 {
                    bail!(
                        "the migration completed but QEMU transferred no vfio device state \
                         ({vfio_user_devices} vfio-user device(s)): the destination's devices \
                         are likely freshly reset; do not resume the source's workload \
                         elsewhere before checking them"
                    );
                }
                return Ok(MigrationStats {
                    total_ms: total,
                    downtime_ms: downtime,
                });
            }
            "failed" | "cancelled" => {
                let desc = v["error-desc"].as_str().unwrap_or("no error description");
                bail!("migration {status}: {desc} (the source VM keeps its state)");
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            let _ = q.try_execute("migrate_cancel", None)?;
            bail!("migration not completed within the timeout (status {status}); cancelled it");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// One progress line from a `query-migrate` reply.
pub fn progress_line(status: &str, v: &Value) -> String {
    let mib = |x: &Value| x.as_u64().map(|b| b as f64 / (1024.0 * 1024.0));
    let mut s = status.to_string();
    let ram = &v["ram"];
    if let (Some(t), Some(total)) = (mib(&ram["transferred"]), mib(&ram["total"])) {
        let _ = write!(s, ", RAM {t:.1} MiB sent of {total:.1} MiB");
        if let Some(r) = mib(&ram["remaining"]) {
            let _ = write!(s, ", {r:.1} MiB remaining");
        }
        if let Some(n) = ram["dirty-sync-count"].as_u64() {
            let _ = write!(s, ", pass {n}");
        }
    }
    if let Some(b) = v["vfio"]["transferred"].as_u64() {
        let _ = write!(s, ", vfio {b} B");
    }
    s
}

/// Wait until the destination QEMU has loaded the VM and (if the source ran) runs it.
pub fn wait_destination(
    q: &mut Qmp,
    expect_running: bool,
    deadline: Instant,
    out: Progress,
) -> Result<()> {
    loop {
        let st = query_status(q)?;
        let done = if expect_running {
            st == "running"
        } else {
            st != "inmigrate"
        };
        if done {
            out.line(format_args!("destination status: {st}"));
            return Ok(());
        }
        if st == "guest-panicked" || st == "internal-error" || st == "shutdown" {
            bail!("the destination QEMU is in state {st} after the migration");
        }
        if Instant::now() >= deadline {
            bail!(
                "the destination QEMU did not {} within the timeout (status {st})",
                if expect_running {
                    "start running"
                } else {
                    "finish loading"
                }
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}
