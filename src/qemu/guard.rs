//! The guard's inspection of a QEMU over QMP, and its refusal.
//!
//! Why a guard: QEMU's vfio-user client (`vfio-user-pci`, QEMU ≥ 10.1) reuses the kernel-VFIO
//! migration code only when it has the `enable-migration` property that `vfio-pci` has.
//! QEMU 11.1's client has no such property, registers no migration blocker and sends no
//! migration message to the server, yet a `migrate` completes: the stream simply has no
//! section for the device, and the destination guest finds it freshly reset (COMMAND cleared,
//! BARs unassigned) under a driver that believes it is configured. A server cannot repair
//! that afterwards, so `vfud qemu-migrate` checks before it starts anything.
//!
//! The check, all over QMP (`docs/interop/qmp-spec.rst`), read-only:
//! - `query-version` names the QEMU in messages;
//! - `qom-list-types` (`implements: vfio-user-pci`) gives the vfio-user device types, and
//!   `device-list-properties` says whether each has `enable-migration`;
//! - `qom-list` of `/machine/peripheral` (devices with an `id`) and
//!   `/machine/peripheral-anon` (without) finds the VM's devices: a child property of type
//!   `child<vfio-user-pci>` is one.
//!
//! A device whose type lacks `enable-migration`, or whose `enable-migration` is `off`, is
//! *affected*: a plain migration would lose its state.

use std::fmt::{self, Write as _};

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use vfud::qmp::Qmp;

/// The QOM type of QEMU's vfio-user client device.
pub const VFIO_USER_PCI: &str = "vfio-user-pci";
/// The property a vfio device type has when QEMU can migrate its state (`vfio-pci` has it).
const ENABLE_MIGRATION: &str = "enable-migration";
/// QOM containers of user-created devices: with an `id`, and without.
const PERIPHERAL_CONTAINERS: [&str; 2] = ["/machine/peripheral", "/machine/peripheral-anon"];

/// Which QEMU a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Destination,
    Source,
}

/// The QEMU version as `query-version` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Distribution package string (e.g. `Debian 1:11.1.3+ds-1~bpo13+1`), may be empty.
    pub package: String,
}

impl QemuVersion {
    fn from_qmp(v: &Value) -> Result<Self> {
        let n = |k: &str| {
            v["qemu"][k]
                .as_u64()
                .ok_or_else(|| anyhow!("query-version: no qemu.{k} in {v}"))
        };
        Ok(Self {
            major: n("major")?,
            minor: n("minor")?,
            micro: n("micro")?,
            package: v["package"].as_str().unwrap_or("").trim().to_string(),
        })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU {}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// A vfio-user device type of the QEMU binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceType {
    pub name: String,
    /// Whether the type has the `enable-migration` property.
    pub migratable: bool,
}

/// A vfio-user device of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioUserDevice {
    /// QOM path, e.g. `/machine/peripheral/dma0` or `/machine/peripheral-anon/device[0]`.
    pub path: String,
    /// The `id` given to `-device`/`device_add`, if any.
    pub id: Option<String>,
    /// QOM type.
    pub type_name: String,
    /// PCI device/function on its bus (`addr` property), e.g. `02.0`.
    pub addr: Option<String>,
    /// Value of `enable-migration` (`on`, `off`, `auto`), when the type has it.
    pub enable_migration: Option<String>,
}

impl VfioUserDevice {
    /// The device as messages name it: QOM path, id, slot and type.
    pub fn describe(&self) -> String {
        let mut s = self.path.clone();
        s += &match &self.id {
            Some(id) => format!(" (id \"{id}\""),
            None => " (no id".to_string(),
        };
        if let Some(a) = &self.addr {
            s += &format!(", PCI slot {a}");
        }
        s += &format!(", {})", self.type_name);
        s
    }
}

/// Why a device's state cannot migrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The device type has no `enable-migration`: the client cannot migrate at all.
    NoClientSupport,
    /// `enable-migration=off` on the device.
    Disabled,
}

/// What the guard learnt about one QEMU.
#[derive(Clone, Debug)]
pub struct Inspection {
    pub version: QemuVersion,
    pub types: Vec<DeviceType>,
    pub devices: Vec<VfioUserDevice>,
}

impl Inspection {
    /// The devices whose state a migration would lose, with the reason.
    pub fn affected(&self) -> Vec<(VfioUserDevice, Reason)> {
        self.devices
            .iter()
            .filter_map(|d| {
                let migratable = self
                    .types
                    .iter()
                    .any(|t| t.name == d.type_name && t.migratable);
                if !migratable {
                    Some((d.clone(), Reason::NoClientSupport))
                } else if d.enable_migration.as_deref() == Some("off") {
                    Some((d.clone(), Reason::Disabled))
                } else {
                    None
                }
            })
            .collect()
    }

    /// One line: version, client support and device count.
    pub fn summary(&self) -> String {
        let support = if self.types.is_empty() {
            "no vfio-user client".to_string()
        } else {
            self.types
                .iter()
                .map(|t| {
                    format!(
                        "{} {} {ENABLE_MIGRATION}",
                        t.name,
                        if t.migratable { "has" } else { "lacks" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "{}, {support}, {} vfio-user device(s)",
            self.version,
            self.devices.len()
        )
    }
}

/// Read-only inspection of a QEMU: version, vfio-user device types and devices.
pub fn inspect(q: &mut Qmp) -> Result<Inspection> {
    let version = QemuVersion::from_qmp(&q.execute("query-version", None)?)?;
    // Types implementing vfio-user-pci (itself and any subtype). A QEMU without the client
    // has none.
    let listed = q.try_execute(
        "qom-list-types",
        Some(json!({ "implements": VFIO_USER_PCI, "abstract": false })),
    )?;
    let type_names: Vec<String> = match listed {
        Ok(v) => v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let mut types = Vec::new();
    for name in type_names {
        let props = q.execute(
            "device-list-properties",
            Some(json!({ "typename": name.as_str() })),
        )?;
        types.push(DeviceType {
            migratable: has_property(&props, ENABLE_MIGRATION),
            name,
        });
    }

    let mut devices = Vec::new();
    if !types.is_empty() {
        for container in PERIPHERAL_CONTAINERS {
            let children = match q.try_execute("qom-list", Some(json!({ "path": container })))? {
                Ok(v) => v,
                // No device of that kind was ever created.
                Err(_) => continue,
            };
            for child in children.as_array().into_iter().flatten() {
                let (Some(name), Some(ty)) = (child["name"].as_str(), child["type"].as_str())
                else {
                    continue;
                };
                let Some(t) = types
                    .iter()
                    .find(|t| child_type(ty) == Some(t.name.as_str()))
                else {
                    continue;
                };
                let path = format!("{container}/{name}");
                let addr = q
                    .try_execute("qom-get", Some(json!({ "path": path, "property": "addr" })))?
                    .ok()
                    .and_then(|v| v.as_u64())
                    .map(format_devfn);
                let enable_migration = if t.migratable {
                    q.try_execute(
                        "qom-get",
                        Some(json!({ "path": path, "property": ENABLE_MIGRATION })),
                    )?
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                } else {
                    None
                };
                devices.push(VfioUserDevice {
                    id: (container == PERIPHERAL_CONTAINERS[0]).then(|| name.to_string()),
                    path,
                    type_name: t.name.clone(),
                    addr,
                    enable_migration,
                });
            }
        }
    }
    Ok(Inspection {
        version,
        types,
        devices,
    })
}

/// Whether a `device-list-properties` reply lists `name`.
fn has_property(props: &Value, name: &str) -> bool {
    props
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p["name"] == name))
}

/// `T` of a QOM child property type `child<T>`.
fn child_type(ty: &str) -> Option<&str> {
    ty.strip_prefix("child<")?.strip_suffix('>')
}

/// A PCI `addr` property (devfn) as `slot.function`.
fn format_devfn(devfn: u64) -> String {
    format!("{:02x}.{:x}", (devfn >> 3) & 0x1f, devfn & 7)
}

/// The explanation printed when the guard refuses.
pub fn refusal_message(
    version: &QemuVersion,
    side: Side,
    affected: &[(VfioUserDevice, Reason)],
    source_status: &str,
) -> String {
    let which = match side {
        Side::Source => "source",
        Side::Destination => "destination",
    };
    let n = affected.len();
    let plural = if n == 1 { "" } else { "s" };
    let mut m = format!(
        "refusing to migrate: the {which} runs {version}, which cannot migrate the state of \
         the VM's vfio-user device{plural}\n"
    );
    let _ = writeln!(m, "affected device{plural}:");
    for (d, r) in affected {
        let why = match r {
            Reason::NoClientSupport => format!(
                "{} has no `{ENABLE_MIGRATION}` property: this QEMU's vfio-user client \
                 cannot migrate device state",
                d.type_name
            ),
            Reason::Disabled => format!("{ENABLE_MIGRATION}=off on this device"),
        };
        let _ = writeln!(m, "  {}: {why}", d.describe());
    }
    let _ = writeln!(
        m,
        "a QEMU migration would still complete, but without the device state: registers, \
         device memory and interrupt setup would be lost, and the destination guest would see \
         a freshly reset device (PCI COMMAND cleared, BARs unassigned) under a driver that \
         believes it is configured"
    );
    let _ = writeln!(
        m,
        "nothing was started: no `migrate` was sent and the source VM is unchanged \
         (status: {source_status})"
    );
    let _ = writeln!(m, "what to do instead:");
    let _ = writeln!(
        m,
        "  - to move a device to another vfud process (to upgrade or restart vfud) while the VM \
         keeps running, use vfud's live handover, `vfud migrate --handover` (see `vfud migrate \
         --help`): QEMU stays attached and the device state moves between the vfud processes"
    );
    let _ = write!(
        m,
        "  - to move the VM to another QEMU, use a QEMU whose {VFIO_USER_PCI} has \
         `{ENABLE_MIGRATION}`, or move it with `vfud qemu-migrate --replug`, which unplugs \
         the vfio-user devices before migrating and plugs them in again on the destination \
         (the guest sees a hot-unplug and a hot-plug; the devices must sit behind a \
         pcie-root-port)"
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_11_1() -> QemuVersion {
        QemuVersion::from_qmp(&json!({
            "qemu": {"micro": 3, "minor": 1, "major": 11},
            "package": "Debian 1:11.1.3+ds-1~bpo13+1"
        }))
        .unwrap()
    }

    fn device(path: &str, id: Option<&str>, enable_migration: Option<&str>) -> VfioUserDevice {
        VfioUserDevice {
            path: path.into(),
            id: id.map(str::to_string),
            type_name: VFIO_USER_PCI.into(),
            addr: Some("02.0".into()),
            enable_migration: enable_migration.map(str::to_string),
        }
    }

    #[test]
    fn version_displays_numbers_and_package() {
        assert_eq!(
            qemu_11_1().to_string(),
            "QEMU 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)"
        );
    }

    #[test]
    fn devices_of_a_type_without_enable_migration_are_affected() {
        let i = Inspection {
            version: qemu_11_1(),
            types: vec![DeviceType {
                name: VFIO_USER_PCI.into(),
                migratable: false,
            }],
            devices: vec![device("/machine/peripheral-anon/device[0]", None, None)],
        };

        let affected = i.affected();

        assert_eq!(affected.len(), 1);
        assert_eq!(affected[0].1, Reason::NoClientSupport);
    }

    #[test]
    fn only_devices_with_enable_migration_off_are_affected_when_supported() {
        let i = Inspection {
            version: qemu_11_1(),
            types: vec![DeviceType {
                name: VFIO_USER_PCI.into(),
                migratable: true,
            }],
            devices: vec![
                device("/machine/peripheral/a", Some("a"), Some("auto")),
                device("/machine/peripheral/b", Some("b"), Some("off")),
            ],
        };

        let affected = i.affected();

        assert_eq!(affected.len(), 1);
        assert_eq!(affected[0].0.path, "/machine/peripheral/b");
        assert_eq!(affected[0].1, Reason::Disabled);
    }

    #[test]
    fn refusal_names_version_devices_loss_and_handover() {
        let d = device("/machine/peripheral/dma0", Some("dma0"), None);

        let m = refusal_message(
            &qemu_11_1(),
            Side::Source,
            &[(d, Reason::NoClientSupport)],
            "running",
        );

        assert!(m.starts_with("refusing to migrate: the source runs QEMU 11.1.3 (Debian"));
        assert!(m.contains("/machine/peripheral/dma0 (id \"dma0\", PCI slot 02.0"));
        assert!(m.contains("would be lost"));
        assert!(m.contains("freshly reset device"));
        assert!(m.contains("vfud migrate --handover"));
        assert!(m.contains("(status: running)"));
        assert!(m.contains("--replug"));
    }

    #[test]
    fn helpers_parse_qom_types_and_devfn() {
        assert_eq!(child_type("child<vfio-user-pci>"), Some("vfio-user-pci"));
        assert_eq!(child_type("link<bus>"), None);
        assert_eq!(format_devfn(0x10), "02.0");
        assert_eq!(format_devfn(0x1b), "03.3");
        assert!(has_property(
            &json!([{"name": "socket"}, {"name": "enable-migration"}]),
            ENABLE_MIGRATION
        ));
        assert!(!has_property(
            &json!([{"name": "socket"}]),
            ENABLE_MIGRATION
        ));
    }
}
