//! The [`Device`] trait and the declarative description a device gives of itself.
//!
//! The server owns the PCI header, capabilities, interrupts, the DMA table (and later the
//! migration FSM). A device declares its identity, BARs and interrupt layout once
//! ([`DeviceDescription`]) and implements typed callbacks. Side effects go through
//! [`DeviceCtx`]: guest memory, interrupts, device-owned BAR memory, deferred work.

use std::os::fd::RawFd;
use std::time::Instant;

use crate::dma::GuestMem;
use crate::error::DeviceError;
use crate::irq::Interrupts;
use crate::migration::DeviceState;
use crate::mmap::SharedMemory;

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
    /// Every access is a REGION_READ/WRITE forwarded to [`Device::bar_read`]/[`Device::bar_write`].
    Trapped,
    /// Device-owned shared memory (a memfd) the client may mmap. `mmap_areas` lists the
    /// (offset, size) areas offered for mmap (sparse mmap capability); `None` offers the whole
    /// BAR. Accesses outside the areas that come over the socket still read/write the memory.
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

/// Everything the server needs to present the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Model name (used in logs and, later, the migration stream).
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

/// What a device callback can do besides returning data.
pub struct DeviceCtx<'a> {
    pub(crate) mem: GuestMem<'a>,
    pub(crate) irqs: &'a mut Interrupts,
    pub(crate) bars: &'a [Option<SharedMemory>; 6],
    pub(crate) work: &'a mut bool,
}

impl<'a> DeviceCtx<'a> {
    /// Guest memory (bounds-checked; writes are dirty-logged).
    pub fn mem(&mut self) -> &mut GuestMem<'a> {
        &mut self.mem
    }

    /// Raise interrupt `vector` in whatever mode the driver enabled (MSI-X, MSI, else a pulse
    /// on INTx). Masked vectors are latched as pending and delivered on unmask.
    pub fn raise(&mut self, vector: u32) {
        self.irqs.raise(vector);
    }

    /// Set the INTx line level (level-triggered devices such as a UART).
    pub fn set_intx(&mut self, level: bool) {
        self.irqs.set_intx_level(level);
    }

    /// Device-owned memory of a shared BAR.
    pub fn bar_memory(&self, bar: BarIndex) -> Option<&SharedMemory> {
        self.bars.get(usize::from(bar.0)).and_then(|b| b.as_ref())
    }

    /// Ask for [`Device::run`] to be called once the current request has been answered.
    pub fn schedule(&mut self) {
        *self.work = true;
    }
}

/// A device model. See the crate docs for the division of labour.
pub trait Device: Send {
    /// The device's identity and layout. Called once at start.
    fn describe(&self) -> DeviceDescription;

    /// Read from a trapped BAR.
    fn bar_read(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError>;

    /// Write to a trapped BAR.
    fn bar_write(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError>;

    /// DEVICE_RESET: return to power-on state (the server resets config space and interrupts).
    fn reset(&mut self, _cx: &mut DeviceCtx<'_>) {}

    /// Deferred work requested with [`DeviceCtx::schedule`]. Runs with no client request
    /// outstanding, so it may use socket-backed DMA.
    fn run(&mut self, _cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The device is about to stop for migration (RUNNING→STOP, PRE_COPY→STOP_COPY): take in
    /// whatever backend input is already waiting, so the saved state holds it. Idempotent.
    fn quiesce(&mut self) {}

    /// Whether the device can be migrated ([`Device::save`] and [`Device::load`] work).
    fn supports_migration(&self) -> bool {
        false
    }

    /// Whether the device needs its PCI config space restored before its device data on the
    /// destination (advertised in the ordering capability, feature and stream header).
    fn needs_config_before_data(&self) -> bool {
        false
    }

    /// Save the device's own state (registers, queues). Device-owned BAR memory is saved by
    /// the server. Called with the device stopped.
    fn save(&self) -> Result<DeviceState, DeviceError> {
        Err(DeviceError::MigrationUnsupported)
    }

    /// Replace the device's state with a saved one. Must validate everything (the bytes come
    /// from a peer) and change nothing when it fails.
    fn load(&mut self, _state: &DeviceState) -> Result<(), DeviceError> {
        Err(DeviceError::MigrationUnsupported)
    }

    /// Live handover: describe the host-side backend and duplicate its fds so another vfud
    /// process can adopt it (e.g. a UART's host socket and its connection). `None`: nothing to
    /// hand over.
    fn export_backend(&self) -> Option<(String, Vec<std::os::fd::OwnedFd>)> {
        None
    }

    /// Live handover, receiving side: replace the backend with the one described.
    fn adopt_backend(
        &mut self,
        _desc: &str,
        _fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), DeviceError> {
        Err(DeviceError::Other(
            "this device has no backend to adopt".into(),
        ))
    }

    /// Live handover succeeded: let go of the backend without tearing it down (no unlinking of
    /// socket paths the new process now serves).
    fn release_backend(&mut self) {}

    /// File descriptors the event loop should watch for the device (backends), with tokens.
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }

    /// One of [`Device::event_fds`] is readable.
    fn on_event(&mut self, _token: u32, _cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    /// When the device next wants [`Device::on_timer`].
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// The deadline passed.
    fn on_timer(&mut self, _cx: &mut DeviceCtx<'_>) {}
}
