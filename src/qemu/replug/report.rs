//! The report of a replug: each phase's duration, what QEMU said about the migration, and per
//! device how long the guest took to release it, the gap the guest saw, and where it is now.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::devices::Placement;
use crate::qemu::migrate::MigrationStats;

/// Where a device is plugged in after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugged {
    /// On the destination QEMU: moved.
    Destination,
    /// Unplugged and not plugged in anywhere (a failure the report explains).
    Nowhere,
    /// Its `device_del` is still waiting for the guest.
    PendingUnplug,
    /// On the source QEMU: never unplugged, or plugged in again after a failure.
    Source,
}

impl Plugged {
    fn as_str(self) -> &'static str {
        match self {
            Self::Destination => "destination",
            Self::Nowhere => "nowhere",
            Self::PendingUnplug => "pending-unplug",
            Self::Source => "source",
        }
    }
}

/// One device's part of the report.
#[derive(Clone, Debug)]
pub struct DeviceReport {
    name: String,
    bus: String,
    addr: Option<String>,
    /// When `device_del` was sent.
    del_sent: Option<Instant>,
    /// `device_del` → `DEVICE_DELETED`: the guest releasing the device.
    pub unplug: Option<Duration>,
    /// `device_del` → `device_add` returned: the time the guest had no device.
    pub gap: Option<Duration>,
    /// Where it is now.
    pub plugged: Plugged,
}

impl DeviceReport {
    /// The guest released the device: `device_del` sent at `sent`, `DEVICE_DELETED` at `gone`.
    pub fn unplugged(&mut self, sent: Instant, gone: Instant) {
        self.del_sent = Some(sent);
        self.unplug = Some(gone - sent);
        self.plugged = Plugged::Nowhere;
    }

    /// `device_add` on `side` returned at `at`.
    pub fn plugged_in(&mut self, side: Plugged, at: Instant) {
        self.gap = self.del_sent.map(|s| at - s);
        self.plugged = side;
    }
}

/// The whole report.
#[derive(Clone, Debug)]
pub struct Report {
    /// Phases in order, with their durations.
    pub phases: Vec<(&'static str, Duration)>,
    /// Per device, in the order they were found.
    pub devices: Vec<DeviceReport>,
    /// QEMU's figures for the migration, once it completed.
    pub qemu: Option<MigrationStats>,
    /// Whether the VM now runs on the destination with its devices.
    pub moved: bool,
    /// What the way back did, after a failure.
    pub rollback: Option<String>,
    /// The failure.
    pub error: Option<String>,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl Report {
    /// An empty report for `placements`, all still on the source.
    pub fn new(placements: &[Placement]) -> Self {
        Self {
            phases: Vec::new(),
            devices: placements
                .iter()
                .map(|p| DeviceReport {
                    name: p.name().to_string(),
                    bus: p.bus.clone(),
                    addr: p.device.addr.clone(),
                    del_sent: None,
                    unplug: None,
                    gap: None,
                    plugged: Plugged::Source,
                })
                .collect(),
            qemu: None,
            moved: false,
            rollback: None,
            error: None,
        }
    }

    /// Record a finished phase.
    pub fn phase(&mut self, name: &'static str, took: Duration) {
        self.phases.push((name, took));
    }

    /// The report as one JSON object (`--json`). Durations are in milliseconds.
    pub fn to_json(&self) -> Value {
        json!({
            "moved": self.moved,
            "phases": self.phases.iter().map(|(n, d)| json!({"phase": n, "ms": ms(*d)}))
                .collect::<Vec<_>>(),
            "qemu": self.qemu.map(|q| json!({
                "total_ms": q.total_ms, "downtime_ms": q.downtime_ms,
            })),
            "devices": self.devices.iter().map(|d| json!({
                "device": d.name,
                "bus": d.bus,
                "addr": d.addr,
                "unplug_ms": d.unplug.map(ms),
                "gap_ms": d.gap.map(ms),
                "plugged_on": d.plugged.as_str(),
            })).collect::<Vec<_>>(),
            "rollback": self.rollback,
            "error": self.error,
        })
    }

    /// The report as a few aligned lines.
    pub fn to_text(&self) -> String {
        let mut s = String::from("replug report\n");
        for (n, d) in &self.phases {
            let _ = write!(s, "  {n:<18} {:>10.1} ms", ms(*d));
            if *n == "migrate" {
                if let Some(q) = self.qemu {
                    let _ = write!(
                        s,
                        "  (QEMU: total {} ms, downtime {} ms)",
                        q.total_ms, q.downtime_ms
                    );
                }
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "  {:<24} {:<10} {:<5} {:>10} {:>12}  now on",
            "device", "bus", "slot", "unplug ms", "guest gap ms"
        );
        let opt = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}", ms(d)));
        for d in &self.devices {
            let _ = writeln!(
                s,
                "  {:<24} {:<10} {:<5} {:>10} {:>12}  {}",
                d.name,
                d.bus,
                d.addr.as_deref().unwrap_or("-"),
                opt(d.unplug),
                opt(d.gap),
                d.plugged.as_str()
            );
        }
        s.pop();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::guard::VfioUserDevice;

    fn report() -> Report {
        Report::new(&[Placement {
            device: VfioUserDevice {
                path: "/machine/peripheral/uart0".into(),
                id: Some("uart0".into()),
                type_name: "vfio-user-pci".into(),
                addr: Some("00.0".into()),
                enable_migration: None,
            },
            bus: "rp1".into(),
            bus_type: "PCIE".into(),
            root_bus: false,
            msix_unplug_aborts: false,
        }])
    }

    #[test]
    fn gap_runs_from_device_del_to_device_add() {
        let mut r = report();
        let t0 = Instant::now();

        r.devices[0].unplugged(t0, t0 + Duration::from_millis(30));
        r.devices[0].plugged_in(Plugged::Destination, t0 + Duration::from_millis(900));
        let j = r.to_json();

        assert_eq!(j["devices"][0]["unplug_ms"], 30.0);
        assert_eq!(j["devices"][0]["gap_ms"], 900.0);
        assert_eq!(j["devices"][0]["plugged_on"], "destination");
        assert_eq!(j["devices"][0]["bus"], "rp1");
    }

    #[test]
    fn json_and_text_carry_phases_qemu_figures_and_the_failure() {
        let mut r = report();
        r.phase("unplug", Duration::from_millis(31));
        r.phase("migrate", Duration::from_millis(1500));
        r.qemu = Some(MigrationStats {
            total_ms: 1400,
            downtime_ms: 45,
        });
        r.error = Some("migration failed".into());
        r.rollback = Some("the source VM is running with uart0 plugged in again".into());

        let j = r.to_json();
        let t = r.to_text();

        assert_eq!(j["moved"], false);
        assert_eq!(j["phases"][1]["phase"], "migrate");
        assert_eq!(j["phases"][1]["ms"], 1500.0);
        assert_eq!(j["qemu"]["downtime_ms"], 45);
        assert_eq!(j["error"], "migration failed");
        assert!(j["rollback"].as_str().unwrap().contains("uart0"));
        assert!(t.contains("downtime 45 ms"), "{t}");
        assert!(t.contains("uart0") && t.contains("source"), "{t}");
    }
}
