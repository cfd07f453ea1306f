//! PCI as QEMU and the guest see it: `query-pci` ([`PciDevice`], [`Qemu::query_pci`]) and
//! lines of sysfs `resource` files ([`SysfsResource`]).
//!
//! Facts about QEMU 11.1's `query-pci` (see [`PciDevice`]): the reply is a list of buses, each
//! `{"bus": n, "devices": [...]}`; a device has `bus`, `slot`, `function`, `class_info`
//! (`{"class": 0x0880}` plus `desc` for classes QEMU knows), `id` (`vendor`, `device`,
//! `subsystem`, `subsystem-vendor`), `irq_pin`, `irq` (only when a pin is used), `qdev_id` and
//! `regions`: one per implemented BAR, `{"bar", "type": "memory"|"io", "address", "size"}` plus
//! `prefetch` and `mem_type_64` for memory BARs. An unassigned BAR has `"address": -1`.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::process::Qemu;

impl Qemu {
    /// `query-pci`, flattened over all buses and bridges.
    pub fn query_pci(&mut self) -> Vec<PciDevice> {
        let v = self.execute("query-pci", None);
        let buses: Vec<PciBus> = match serde_json::from_value(v.clone()) {
            Ok(b) => b,
            Err(e) => panic!("unexpected query-pci reply ({e}): {v:#}"),
        };
        let mut out = Vec::new();
        for b in buses {
            flatten(b.devices, &mut out);
        }
        out
    }

    /// Poll `query-pci` until a device `vendor:device` satisfies `ready`; returns it.
    /// Panics with the last reply and diagnostics at the deadline.
    pub fn wait_pci_device(
        &mut self,
        vendor: u16,
        device: u16,
        timeout: Duration,
        ready: impl Fn(&PciDevice) -> bool,
    ) -> PciDevice {
        let deadline = Instant::now() + timeout;
        loop {
            let devs = self.query_pci();
            let found = devs
                .iter()
                .find(|d| d.id.vendor == vendor && d.id.device == device)
                .cloned();
            if let Some(d) = &found {
                if ready(d) {
                    return d.clone();
                }
            }
            if let Some(st) = self.try_exit() {
                panic!("QEMU exited ({st}) while waiting for {vendor:04x}:{device:04x}; last: {found:#?}\n{}", self.diagnostics());
            }
            if Instant::now() >= deadline {
                panic!(
                    "{vendor:04x}:{device:04x} not ready within {timeout:?}; last query-pci: {devs:#?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One line of a sysfs `resource` file (Linux `resource_show`: start, end and flags in hex).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysfsResource {
    /// First address (0 when the BAR is not implemented).
    pub start: u64,
    /// Last address.
    pub end: u64,
    /// `IORESOURCE_*` flags.
    pub flags: u64,
}

impl SysfsResource {
    /// `IORESOURCE_IO`.
    pub const IO: u64 = 0x100;
    /// `IORESOURCE_MEM`.
    pub const MEM: u64 = 0x200;
    /// `IORESOURCE_PREFETCH`.
    pub const PREFETCH: u64 = 0x2000;
    /// `IORESOURCE_MEM_64`.
    pub const MEM_64: u64 = 0x10_0000;

    /// Parse `start,end,flags` as [`PCI_GUEST_LIB`]'s `report_pci` prints it.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s
            .split(',')
            .map(|w| u64::from_str_radix(w.trim().trim_start_matches("0x"), 16).ok());
        let r = Self {
            start: it.next()??,
            end: it.next()??,
            flags: it.next()??,
        };
        it.next().is_none().then_some(r)
    }

    /// Size in bytes (0 for an unimplemented BAR).
    pub fn size(&self) -> u64 {
        if self.flags == 0 || self.end < self.start {
            0
        } else {
            self.end - self.start + 1
        }
    }

    /// Whether every flag in `mask` is set.
    pub fn has(&self, mask: u64) -> bool {
        self.flags & mask == mask
    }
}

fn flatten(devices: Vec<PciDevice>, out: &mut Vec<PciDevice>) {
    for mut d in devices {
        if let Some(br) = d.pci_bridge.take() {
            flatten(br.devices, out);
        }
        out.push(d);
    }
}

/// One bus of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciBus {
    /// Bus number.
    pub bus: u8,
    /// Devices on it.
    pub devices: Vec<PciDevice>,
}

/// A device of `query-pci` (QEMU `PciDeviceInfo`).
#[derive(Clone, Debug, Deserialize)]
pub struct PciDevice {
    /// Bus number.
    pub bus: u8,
    /// Slot.
    pub slot: u8,
    /// Function.
    pub function: u8,
    /// Class.
    pub class_info: PciClass,
    /// IDs.
    pub id: PciIds,
    /// Assigned INTx line, if the device uses a pin.
    pub irq: Option<u32>,
    /// INTx pin (0 none, 1 = INTA).
    pub irq_pin: u32,
    /// `id` of the -device option, or "".
    #[serde(default)]
    pub qdev_id: String,
    /// Implemented BARs.
    pub regions: Vec<PciRegion>,
    /// Behind a bridge.
    #[serde(default)]
    pub pci_bridge: Option<PciBridge>,
}

impl PciDevice {
    /// The region of BAR `bar`.
    pub fn bar(&self, bar: u8) -> Option<&PciRegion> {
        self.regions.iter().find(|r| r.bar == bar)
    }

    /// Whether every BAR in `bars` is present and assigned.
    pub fn bars_assigned(&self, bars: &[u8]) -> bool {
        bars.iter()
            .all(|b| self.bar(*b).is_some_and(PciRegion::assigned))
    }
}

/// `class_info` of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciClass {
    /// Base class and subclass (the class code without the programming interface).
    pub class: u16,
    /// Description, for classes QEMU knows.
    #[serde(default)]
    pub desc: Option<String>,
}

/// `id` of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem ID.
    pub subsystem: Option<u16>,
    /// Subsystem vendor ID.
    #[serde(rename = "subsystem-vendor")]
    pub subsystem_vendor: Option<u16>,
}

/// A region (BAR) of `query-pci`.
#[derive(Clone, Debug, Deserialize)]
pub struct PciRegion {
    /// BAR number (6 = expansion ROM).
    pub bar: u8,
    /// `memory` or `io`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Guest-physical address, or -1 when unassigned.
    pub address: i64,
    /// Size in bytes.
    pub size: u64,
    /// Prefetchable (memory BARs).
    pub prefetch: Option<bool>,
    /// 64-bit (memory BARs).
    pub mem_type_64: Option<bool>,
}

impl PciRegion {
    /// Whether firmware or the guest assigned an address.
    pub fn assigned(&self) -> bool {
        self.address != -1 && self.address != 0
    }
}

/// `pci_bridge` of `query-pci` (only the devices behind it are used).
#[derive(Clone, Debug, Deserialize)]
pub struct PciBridge {
    /// Devices behind the bridge.
    #[serde(default)]
    pub devices: Vec<PciDevice>,
}
