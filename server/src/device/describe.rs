//! The declarative description a device gives of itself ([`DeviceDescription`]) and builders
//! that keep a model's `describe()` to a few lines.
//!
//! ```
//! use vfud_server::{BarSpec, DeviceDescription, IrqLayout, PciIds};
//! let desc = DeviceDescription::new("example", PciIds::new(0x5646, 0x00ff, 0x088000))
//!     .bar(0, BarSpec::mem32(4096))
//!     .bar(2, BarSpec::mem64(1 << 20).prefetchable().shared())
//!     .irqs(IrqLayout::intx().with_msi(1).with_msix(4, 4, 0, 0x800));
//! assert_eq!(desc.bars[2].as_ref().unwrap().size, 1 << 20);
//! ```

/// Index of a PCI BAR, 0–5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BarIndex(pub u8);

/// PCI identity (PCI Local Bus 3.0 §6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// 24-bit class code (class, subclass, prog-if).
    pub class_code: u32,
    /// Revision id.
    pub revision: u8,
}

impl PciIds {
    /// Vendor, device and class; the subsystem ids repeat vendor and device, revision 1.
    pub fn new(vendor: u16, device: u16, class_code: u32) -> Self {
        Self {
            vendor,
            device,
            subsystem_vendor: vendor,
            subsystem: device,
            class_code,
            revision: 1,
        }
    }
}

/// Address space of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory; takes this BAR and the next.
    Mem64,
}

/// How BAR accesses are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BarBacking {
    /// Every access is a REGION_READ/WRITE forwarded to [`crate::Device::bar_read`]/
    /// [`crate::Device::bar_write`].
    Trapped,
    /// Device-owned shared memory (a memfd) the client may mmap. `mmap_areas` lists the
    /// (offset, size) areas offered for mmap (sparse mmap capability); `None` offers the whole
    /// BAR, and the server serves socket accesses from the memory. With sparse areas the BAR
    /// mixes registers and memory (an NVMe doorbell page beside trapped registers), so every
    /// socket access goes to the device's `bar_read`/`bar_write`, which reach the memory
    /// through [`crate::DeviceCtx::bar_memory`] where they need to.
    Shared {
        /// Sparse areas, or the whole BAR.
        mmap_areas: Option<Vec<(u64, u64)>>,
    },
}

/// One BAR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Size in bytes, a power of two (≥ 16 for memory, ≥ 4 for I/O).
    pub size: u64,
    /// Address space.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// How accesses are served.
    pub backing: BarBacking,
}

impl BarSpec {
    fn new(size: u64, kind: BarKind) -> Self {
        Self {
            size,
            kind,
            prefetchable: false,
            backing: BarBacking::Trapped,
        }
    }

    /// A trapped 32-bit memory BAR.
    pub fn mem32(size: u64) -> Self {
        Self::new(size, BarKind::Mem32)
    }

    /// A trapped 64-bit memory BAR (it also takes the next BAR slot).
    pub fn mem64(size: u64) -> Self {
        Self::new(size, BarKind::Mem64)
    }

    /// A trapped I/O BAR.
    pub fn io(size: u64) -> Self {
        Self::new(size, BarKind::Io)
    }

    /// Mark the BAR prefetchable.
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    /// Back the BAR with device-owned shared memory the client may mmap whole.
    pub fn shared(mut self) -> Self {
        self.backing = BarBacking::Shared { mmap_areas: None };
        self
    }

    /// Back the BAR with device-owned shared memory of which the client may mmap only
    /// `areas` (offset, size; page-aligned); socket accesses are all trapped.
    pub fn shared_sparse(mut self, areas: Vec<(u64, u64)>) -> Self {
        self.backing = BarBacking::Shared {
            mmap_areas: Some(areas),
        };
        self
    }
}

/// Where the MSI-X table and PBA live (PCI Local Bus 3.0 §6.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixPlacement {
    /// BAR holding both.
    pub bar: BarIndex,
    /// Table offset (8-byte aligned).
    pub table_offset: u64,
    /// PBA offset (8-byte aligned).
    pub pba_offset: u64,
}

/// Interrupts the device has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IrqLayout {
    /// INTx (pin A).
    pub intx: bool,
    /// MSI vectors (0 = no MSI capability; otherwise a power of two ≤ 32).
    pub msi_vectors: u32,
    /// MSI-X vectors and placement.
    pub msix: Option<(u32, MsixPlacement)>,
    /// Error notification index (ERR).
    pub err: bool,
    /// Device request index (REQ).
    pub req: bool,
}

impl IrqLayout {
    /// INTx pin A only.
    pub fn intx() -> Self {
        Self {
            intx: true,
            ..Self::default()
        }
    }

    /// Add an MSI capability with `vectors` vectors.
    pub fn with_msi(mut self, vectors: u32) -> Self {
        self.msi_vectors = vectors;
        self
    }

    /// Add MSI-X: `vectors` vectors, table and PBA in `bar` at the given offsets.
    pub fn with_msix(mut self, vectors: u32, bar: u8, table_offset: u64, pba_offset: u64) -> Self {
        let p = MsixPlacement {
            bar: BarIndex(bar),
            table_offset,
            pba_offset,
        };
        self.msix = Some((vectors, p));
        self
    }
}

/// Everything the server needs to present the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Model name (used in logs and in the migration stream).
    pub name: &'static str,
    /// PCI identity.
    pub ids: PciIds,
    /// BARs 0–5.
    pub bars: [Option<BarSpec>; 6],
    /// Interrupts.
    pub irqs: IrqLayout,
    /// Power-management capability.
    pub pm: bool,
    /// PCI Express endpoint capability (config space becomes 4 KiB).
    pub pcie: bool,
    /// Device serial number extended capability (PCIe only).
    pub dsn: Option<u64>,
}

impl DeviceDescription {
    /// A conventional PCI function with no BARs and no interrupts yet.
    pub fn new(name: &'static str, ids: PciIds) -> Self {
        Self {
            name,
            ids,
            bars: Default::default(),
            irqs: IrqLayout::default(),
            pm: false,
            pcie: false,
            dsn: None,
        }
    }

    /// Set BAR `index`.
    pub fn bar(mut self, index: usize, spec: BarSpec) -> Self {
        self.bars[index] = Some(spec);
        self
    }

    /// Set the interrupt layout.
    pub fn irqs(mut self, irqs: IrqLayout) -> Self {
        self.irqs = irqs;
        self
    }

    /// A PCI Express endpoint with PM and, when given, a device serial number.
    pub fn pcie(mut self, dsn: Option<u64>) -> Self {
        self.pcie = true;
        self.pm = true;
        self.dsn = dsn;
        self
    }
}
