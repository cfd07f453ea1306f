//! The devices of a replug: where each sits ([`Placement`]), its vfud socket, and the
//! `device_del` / `DEVICE_DELETED` / `device_add` exchanges that move it.
//!
//! Devices must sit where hot-unplug works: on q35 that is behind a `pcie-root-port`, never on
//! `pcie.0` itself ([`Placement::hotplug_problem`]). QEMU's `DEVICE_DELETED` event carries the
//! QOM path of the device (`data.path`), also for devices without an id, so that is what the
//! waits match.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use vfud::qmp::Qmp;

use crate::qemu::guard::{QemuVersion, VfioUserDevice};

/// The QOM interface of PCI host bridges, whose root bus is the machine's.
const PCI_HOST_BRIDGE: &str = "pci-host-bridge";

/// Where a vfio-user device sits on the source, and how to plug it in again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The device as the guard found it.
    pub device: VfioUserDevice,
    /// Name of the bus it sits on (`bus` of `device_add`), e.g. `rp1` or `pcie.0`.
    pub bus: String,
    /// QOM type of the bus (`PCIE` or `PCI`).
    pub bus_type: String,
    /// Whether the bus is a host bridge's root bus.
    pub root_bus: bool,
    /// Whether the device has MSI-X and this QEMU is one whose `vfio-user-pci` aborts on
    /// unplugging such a device (measured with 11.1.3: an assertion in
    /// `memory_region_del_subregion` while the MSI-X PBA region is torn down).
    pub msix_unplug_aborts: bool,
}

impl Placement {
    /// What `device_del` takes: the id, or the QOM path of a device without one.
    pub fn qdev_id(&self) -> &str {
        self.device.id.as_deref().unwrap_or(&self.device.path)
    }

    /// The name messages and the report use: the id, or the QOM path.
    pub fn name(&self) -> &str {
        self.qdev_id()
    }

    /// Why this device cannot be hot-unplugged, if it cannot: a PCIe root bus (q35's
    /// `pcie.0`) has no hotplug slot; only devices behind a root port or bridge can go.
    pub fn hotplug_problem(&self) -> Option<String> {
        if self.msix_unplug_aborts {
            return Some(format!(
                "{} has MSI-X, and this QEMU's vfio-user-pci aborts when such a device is \
                 unplugged (QEMU 11.1.3 fails an assertion in memory_region_del_subregion); \
                 serve the device without MSI-X (e.g. `dma-engine,msix=off`) to replug it",
                self.device.describe()
            ));
        }
        (self.root_bus && self.bus_type == "PCIE").then(|| {
            format!(
                "{} sits directly on {}, the root bus of the PCIe host bridge, which cannot \
                 hot-unplug; put it behind a pcie-root-port (`-device \
                 pcie-root-port,id=rp1,bus={},chassis=1` and `\"bus\":\"rp1\"` on the \
                 vfio-user-pci device)",
                self.device.describe(),
                self.bus,
                self.bus
            )
        })
    }

    /// `device_add` arguments that recreate the device on `socket`.
    pub fn device_add_args(&self, socket: &Path) -> Value {
        let mut v = json!({
            "driver": self.device.type_name,
            "bus": self.bus,
            "socket": { "type": "unix", "path": socket },
        });
        if let Some(id) = &self.device.id {
            v["id"] = json!(id);
        }
        if let Some(addr) = &self.device.addr {
            v["addr"] = json!(addr);
        }
        v
    }
}

/// The last QEMU release measured to abort on unplugging a vfio-user device with MSI-X.
const MSIX_UNPLUG_ABORTS_UP_TO: (u64, u64) = (11, 1);

/// Find the bus of each device (`parent_bus`), whether it is a host bridge's root bus, and
/// whether unplugging it would crash `qemu` (a device with MSI-X owns a `msix-table[0]`
/// memory region child).
pub fn placements(
    q: &mut Qmp,
    qemu: &QemuVersion,
    devices: &[VfioUserDevice],
) -> Result<Vec<Placement>> {
    let msix_aborts = (qemu.major, qemu.minor) <= MSIX_UNPLUG_ABORTS_UP_TO;
    let bridges: Vec<String> = q
        .execute(
            "qom-list-types",
            Some(json!({ "implements": PCI_HOST_BRIDGE, "abstract": false })),
        )?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    let mut out = Vec::new();
    for d in devices {
        let bus_path = qom_get_str(q, &d.path, "parent_bus")?;
        let (parent, bus) = bus_path
            .rsplit_once('/')
            .ok_or_else(|| anyhow!("{}: unexpected parent_bus {bus_path:?}", d.path))?;
        let bus_type = qom_get_str(q, &bus_path, "type")?;
        let parent_type = qom_get_str(q, parent, "type")?;
        let children = q.execute("qom-list", Some(json!({ "path": d.path })))?;
        let msix = children.as_array().into_iter().flatten().any(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("msix-table"))
        });
        out.push(Placement {
            device: d.clone(),
            bus: bus.to_string(),
            bus_type,
            root_bus: bridges.contains(&parent_type),
            msix_unplug_aborts: msix && msix_aborts,
        });
    }
    Ok(out)
}

fn qom_get_str(q: &mut Qmp, path: &str, property: &str) -> Result<String> {
    let v = q.execute(
        "qom-get",
        Some(json!({ "path": path, "property": property })),
    )?;
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("qom-get {path} {property}: not a string: {v}"))
}

/// The vfud socket of each device, from `--socket ID=PATH` (the key may also be a device's
/// QOM path; a lone `PATH` is accepted when the VM has one device).
pub fn sockets_for(placements: &[Placement], args: &[String]) -> Result<Vec<PathBuf>> {
    let mut pairs: Vec<(Option<&str>, &str)> = Vec::new();
    for a in args {
        match a.split_once('=') {
            Some((k, v)) => pairs.push((Some(k), v)),
            None if args.len() == 1 && placements.len() == 1 => pairs.push((None, a)),
            None => bail!("--socket {a:?}: give ID=PATH (the VM has several vfio-user devices)"),
        }
    }
    for (k, _) in &pairs {
        if let Some(k) = k {
            if !placements
                .iter()
                .any(|p| p.device.id.as_deref() == Some(*k) || p.device.path == *k)
            {
                bail!("--socket {k}=…: the VM has no vfio-user device with that id");
            }
        }
    }
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for p in placements {
        let found = pairs.iter().find(|(k, _)| match k {
            None => true,
            Some(k) => p.device.id.as_deref() == Some(*k) || p.device.path == *k,
        });
        match found {
            Some((_, path)) => out.push(PathBuf::from(path)),
            None => missing.push(p.name().to_string()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "--replug needs the vfud socket of every vfio-user device (QEMU does not report \
             it): add --socket ID=PATH for {}",
            missing.join(", ")
        );
    }
    Ok(out)
}

/// `device_del` the devices and wait (until `timeout` in all) for the guest to release them.
/// Returns, per device, when `device_del` was sent and when `DEVICE_DELETED` arrived; on an
/// error, the devices already gone are in the error's `gone` list.
pub fn unplug(
    q: &mut Qmp,
    placements: &[Placement],
    timeout: Duration,
) -> std::result::Result<Vec<(Instant, Instant)>, UnplugError> {
    let mut sent = Vec::new();
    for (i, p) in placements.iter().enumerate() {
        let at = Instant::now();
        if let Err(e) = q.execute("device_del", Some(json!({ "id": p.qdev_id() }))) {
            // Nothing of this device changed; wait for the ones already asked to go.
            let gone = wait_deleted(q, &placements[..i], timeout).unwrap_or_default();
            return Err(UnplugError {
                gone: gone.into_iter().map(|(j, _)| j).collect(),
                pending: None,
                error: anyhow::Error::new(e).context(format!("device_del {}", p.name())),
            });
        }
        sent.push(at);
    }
    let deadline = Instant::now() + timeout;
    let mut done = Vec::new();
    for (i, p) in placements.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        match q.wait_event(&format!("DEVICE_DELETED for {}", p.name()), left, |e| {
            e["event"] == "DEVICE_DELETED" && e["data"]["path"] == p.device.path.as_str()
        }) {
            Ok(_) => done.push((sent[i], Instant::now())),
            Err(e) => {
                // The guest has not released it (yet): it cannot be plugged again now. Wait
                // for the rest so that they can.
                let rest = wait_deleted(q, &placements[i + 1..], Duration::ZERO)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(j, _)| j + i + 1);
                return Err(UnplugError {
                    gone: (0..i).chain(rest).collect(),
                    pending: Some(i),
                    error: anyhow::Error::new(e).context(format!(
                        "the guest did not release {} within {timeout:?} (it may still do \
                         so; then `device_add` it again)",
                        p.name()
                    )),
                });
            }
        }
    }
    Ok(done)
}

/// Wait for the `DEVICE_DELETED` of each of `placements`; returns the indexes that came.
fn wait_deleted(
    q: &mut Qmp,
    placements: &[Placement],
    timeout: Duration,
) -> Result<Vec<(usize, Instant)>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    for (i, p) in placements.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if q.wait_event("DEVICE_DELETED", left, |e| {
            e["event"] == "DEVICE_DELETED" && e["data"]["path"] == p.device.path.as_str()
        })
        .is_ok()
        {
            out.push((i, Instant::now()));
        }
    }
    Ok(out)
}

/// An unplug that did not complete.
#[derive(Debug)]
pub struct UnplugError {
    /// Indexes of the devices that are gone (to plug in again).
    pub gone: Vec<usize>,
    /// The device whose `device_del` is still pending in the guest, if any.
    pub pending: Option<usize>,
    /// What happened.
    pub error: anyhow::Error,
}

/// `device_add` each device on `q`; returns when each call returned, or the index that
/// failed with the error.
pub fn plug(
    q: &mut Qmp,
    placements: &[Placement],
    sockets: &[PathBuf],
) -> std::result::Result<Vec<Instant>, (usize, anyhow::Error)> {
    let mut out = Vec::new();
    for (i, (p, s)) in placements.iter().zip(sockets).enumerate() {
        if let Err(e) = q.execute("device_add", Some(p.device_add_args(s))) {
            return Err((
                i,
                anyhow::Error::new(e).context(format!("device_add {}", p.name())),
            ));
        }
        out.push(Instant::now());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(id: Option<&str>, bus: &str, bus_type: &str, root_bus: bool) -> Placement {
        Placement {
            device: VfioUserDevice {
                path: match id {
                    Some(id) => format!("/machine/peripheral/{id}"),
                    None => "/machine/peripheral-anon/device[0]".into(),
                },
                id: id.map(str::to_string),
                type_name: "vfio-user-pci".into(),
                addr: Some("00.0".into()),
                enable_migration: None,
            },
            bus: bus.into(),
            bus_type: bus_type.into(),
            root_bus,
            msix_unplug_aborts: false,
        }
    }

    #[test]
    fn device_add_args_keep_driver_id_bus_slot_and_point_at_the_socket() {
        let p = placement(Some("uart0"), "rp1", "PCIE", false);

        let v = p.device_add_args(Path::new("/run/u.sock"));

        assert_eq!(
            v,
            json!({"driver": "vfio-user-pci", "id": "uart0", "bus": "rp1", "addr": "00.0",
                   "socket": {"type": "unix", "path": "/run/u.sock"}})
        );
    }

    #[test]
    fn only_a_pcie_root_bus_is_a_hotplug_problem() {
        let on_root = placement(Some("d0"), "pcie.0", "PCIE", true);
        let on_port = placement(Some("d0"), "rp1", "PCIE", false);
        let on_piix = placement(Some("d0"), "pci.0", "PCI", true);

        let w = on_root.hotplug_problem().expect("pcie.0 must be flagged");

        assert!(w.contains("pcie.0") && w.contains("pcie-root-port"), "{w}");
        assert_eq!(on_port.hotplug_problem(), None);
        assert_eq!(on_piix.hotplug_problem(), None);
        let msix = Placement {
            msix_unplug_aborts: true,
            ..on_port
        };
        assert!(msix.hotplug_problem().unwrap().contains("msix=off"));
    }

    #[test]
    fn sockets_are_matched_by_id_or_path_and_missing_ones_named() {
        let ps = [
            placement(Some("u0"), "rp1", "PCIE", false),
            placement(None, "rp2", "PCIE", false),
        ];

        let ok = sockets_for(
            &ps,
            &[
                "/machine/peripheral-anon/device[0]=/b.sock".into(),
                "u0=/a.sock".into(),
            ],
        )
        .unwrap();
        let missing = sockets_for(&ps, &["u0=/a.sock".into()]).unwrap_err();
        let unknown = sockets_for(&ps, &["x=/a.sock".into()]).unwrap_err();
        let bare = sockets_for(&ps[..1], &["/a.sock".into()]).unwrap();

        assert_eq!(ok, [PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]);
        assert!(missing.to_string().contains("device[0]"), "{missing}");
        assert!(
            unknown.to_string().contains("no vfio-user device"),
            "{unknown}"
        );
        assert_eq!(bare, [PathBuf::from("/a.sock")]);
    }
}
