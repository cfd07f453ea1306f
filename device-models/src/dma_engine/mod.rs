//! `dma-engine`: a small DMA controller for vendor-driver prototyping and migration tests.
//!
//! # Layout
//! - BAR0 (4 KiB, 32-bit memory, trapped): registers below.
//! - BAR2 (1 MiB, 64-bit prefetchable memory, mmap-able): on-device memory.
//! - BAR4 (4 KiB, 32-bit memory): MSI-X table (4 vectors) at 0, PBA at 0x800.
//! - MSI (1 vector) and INTx pin A. PM, PCI Express and DSN capabilities.
//! - IDs: vendor 0x5646, device 0x0001, class 0x088000 (other system peripheral), so no stock
//!   driver binds it.
//!
//! # Registers (BAR0, 32-bit little-endian)
//! | off | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | ID | RO | `0x4d444656` ("VFDM") |
//! | 0x04 | VERSION | RO | `0x00010000` |
//! | 0x08 | CONTROL | RW | bit 0: raise an interrupt on completion |
//! | 0x0c | STATUS | RO/RW1C | bit 0 DONE, bit 1 ERROR (write 1 to clear), bit 2 BUSY |
//! | 0x10/0x14 | SRC_LO/HI | RW | source: guest IOVA, or BAR2 offset |
//! | 0x18/0x1c | DST_LO/HI | RW | destination: guest IOVA, or BAR2 offset |
//! | 0x20 | LEN | RW | bytes (≤ 16 MiB) |
//! | 0x24 | OPCODE | RW | see below |
//! | 0x28 | PATTERN | RW | FILL byte (low 8 bits) |
//! | 0x2c | DOORBELL | WO | write 1 to start the programmed operation |
//! | 0x30 | RESULT | RO | CRC32 of the last CRC operation |
//! | 0x34 | COMPLETIONS | RO | operations completed since reset |
//! | 0x38 | ERROR_CODE | RO | errno-like code of the last failure (0 = none) |
//! | 0x3c | IRQ_VECTOR | RW | MSI/MSI-X vector raised on completion |
//!
//! Opcodes: 1 COPY guest→guest, 2 FILL guest, 3 CRC32 guest, 4 COPY guest→device,
//! 5 COPY device→guest, 6 FILL device, 7 CRC32 device.
//!
//! # Jobs
//! The doorbell only marks the device BUSY; the job runs as deferred work in slices (1 MiB a
//! turn by default, `slice=` option), so a large job stays BUSY across many client requests,
//! which are answered in between. Its progress (bytes done, running CRC) is device state, so
//! a job in flight migrates and finishes on the destination with one completion interrupt.
//! Socket-backed guest memory never blocks: a slice stops where the data is not in yet.
//!
//! # Interrupts
//! Completion raises IRQ_VECTOR through MSI-X or MSI when the driver enabled them. With INTx
//! the line is level: asserted at completion (PCI STATUS bit 3 shows it) and lowered when the
//! driver clears DONE/ERROR in STATUS, so generic INTx drivers (`uio_pci_generic`) work.
//!
//! # Migration
//! The device declares config-before-data: restoring a job in flight needs bus mastering on
//! and, with MSI-X, its completion vector present among the restored config's MSI-X vectors; a load without
//! them is refused (the migration fails cleanly).

mod job;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use vfud_server::{
    BarIndex, BarSpec, ConfigView, Device, DeviceCtx, DeviceDescription, DeviceError, DeviceState,
    IrqLayout, Migratable, PciIds,
};

pub use job::Job;

/// Value of the ID register.
pub const ID: u32 = 0x4d44_4656;
/// Value of the VERSION register.
pub const VERSION: u32 = 0x0001_0000;
/// Size of on-device memory (BAR2).
pub const DEVICE_MEMORY_SIZE: u64 = 1 << 20;
/// Largest operation.
pub const MAX_LEN: u32 = 64 << 20;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u32 = 4;

/// Register offsets.
pub mod reg {
    /// ID.
    pub const ID: u64 = 0x00;
    /// VERSION.
    pub const VERSION: u64 = 0x04;
    /// CONTROL.
    pub const CONTROL: u64 = 0x08;
    /// STATUS.
    pub const STATUS: u64 = 0x0c;
    /// SRC_LO.
    pub const SRC_LO: u64 = 0x10;
    /// SRC_HI.
    pub const SRC_HI: u64 = 0x14;
    /// DST_LO.
    pub const DST_LO: u64 = 0x18;
    /// DST_HI.
    pub const DST_HI: u64 = 0x1c;
    /// LEN.
    pub const LEN: u64 = 0x20;
    /// OPCODE.
    pub const OPCODE: u64 = 0x24;
    /// PATTERN.
    pub const PATTERN: u64 = 0x28;
    /// DOORBELL.
    pub const DOORBELL: u64 = 0x2c;
    /// RESULT.
    pub const RESULT: u64 = 0x30;
    /// COMPLETIONS.
    pub const COMPLETIONS: u64 = 0x34;
    /// ERROR_CODE.
    pub const ERROR_CODE: u64 = 0x38;
    /// IRQ_VECTOR.
    pub const IRQ_VECTOR: u64 = 0x3c;
}

/// CONTROL bit: interrupt on completion.
pub const CONTROL_IRQ_ENABLE: u32 = 1 << 0;
/// STATUS bit: last operation completed.
pub const STATUS_DONE: u32 = 1 << 0;
/// STATUS bit: last operation failed.
pub const STATUS_ERROR: u32 = 1 << 1;
/// STATUS bit: an operation is running.
pub const STATUS_BUSY: u32 = 1 << 2;

/// Operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Opcode {
    /// Copy guest → guest.
    Copy = 1,
    /// Fill guest memory with PATTERN.
    Fill = 2,
    /// CRC32 of guest memory into RESULT.
    Crc32 = 3,
    /// Copy guest → device memory.
    CopyToDevice = 4,
    /// Copy device memory → guest.
    CopyFromDevice = 5,
    /// Fill device memory with PATTERN.
    FillDevice = 6,
    /// CRC32 of device memory into RESULT.
    Crc32Device = 7,
}

impl Opcode {
    pub(crate) fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Copy,
            2 => Self::Fill,
            3 => Self::Crc32,
            4 => Self::CopyToDevice,
            5 => Self::CopyFromDevice,
            6 => Self::FillDevice,
            7 => Self::Crc32Device,
            _ => return None,
        })
    }
}

const BAR_REGS: BarIndex = BarIndex(0);
const BAR_MEM: BarIndex = BarIndex(2);
/// Bytes of one DMA request.
const CHUNK: usize = 64 * 1024;
/// Default bytes a job moves per event-loop turn.
pub const DEFAULT_SLICE: u32 = 1 << 20;

/// Version of [`Registers`] in the migration stream (2 added the job in flight).
pub const STATE_VERSION: u16 = 2;

/// Register file of the engine plus the progress of a job in flight: the whole device state
/// (BAR2 memory is saved by the server).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    /// CONTROL.
    pub control: u32,
    /// STATUS.
    pub status: u32,
    /// SRC.
    pub src: u64,
    /// DST.
    pub dst: u64,
    /// LEN.
    pub len: u32,
    /// OPCODE.
    pub opcode: u32,
    /// PATTERN.
    pub pattern: u32,
    /// RESULT.
    pub result: u32,
    /// COMPLETIONS.
    pub completions: u32,
    /// ERROR_CODE.
    pub error_code: u32,
    /// IRQ_VECTOR.
    pub irq_vector: u32,
    /// Progress of the job in flight (STATUS.BUSY).
    #[serde(default)]
    pub job: Job,
}

/// The device.
#[derive(Debug)]
pub struct DmaEngine {
    regs: Registers,
    slice: u32,
    /// Whether the MSI-X capability is offered (`msix=off` leaves it out: QEMU 11.1's
    /// vfio-user client aborts when it unplugs a device with MSI-X, so a device that
    /// `vfud qemu-migrate --replug` must move goes without).
    msix: bool,
    /// Testing only (`crash-test=on`): writing [`CRASH_MAGIC`] to [`CRASH_TEST_REG`] panics,
    /// and writing [`HANG_MAGIC`] there or reading it never returns, to exercise crash and
    /// hang recovery (`vfud serve --supervise`).
    crash_test: bool,
}

/// Testing only: with `crash-test=on`, a write of [`CRASH_MAGIC`] here makes the model panic.
pub const CRASH_TEST_REG: u64 = 0xffc;
/// Testing only: the value that panics the model at [`CRASH_TEST_REG`].
pub const CRASH_MAGIC: u32 = 0xdead_dead;
/// Testing only: the value at [`CRASH_TEST_REG`] whose write never returns (the model hangs;
/// so does a read of that register).
pub const HANG_MAGIC: u32 = 0xdead_1001;

/// Testing only (`crash-test=on`): never return, as a model stuck in a request would.
fn hang_on_purpose() -> ! {
    tracing::error!("dma-engine: hang-test register accessed: hanging on purpose");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

impl Default for DmaEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl DmaEngine {
    /// A device in power-on state.
    pub fn new() -> Self {
        Self::with_slice(DEFAULT_SLICE)
    }

    /// A device whose jobs move at most `slice` bytes per event-loop turn.
    pub fn with_slice(slice: u32) -> Self {
        Self {
            regs: Registers::default(),
            slice: slice.max(CHUNK as u32),
            msix: true,
            crash_test: false,
        }
    }

    /// Testing only: the same device, but a write of [`CRASH_MAGIC`] to [`CRASH_TEST_REG`]
    /// panics and one of [`HANG_MAGIC`] hangs (stand-ins for a buggy model, for crash- and
    /// hang-recovery tests).
    pub fn with_crash_test(mut self) -> Self {
        self.crash_test = true;
        self
    }

    /// The same device without the MSI-X capability (MSI and INTx stay).
    pub fn without_msix(mut self) -> Self {
        self.msix = false;
        self
    }

    /// Finish the job in flight: DONE or ERROR, the completion count, and the interrupt.
    fn complete(&mut self, outcome: Result<(), DeviceError>, cx: &mut DeviceCtx<'_>) {
        let r = &mut self.regs;
        r.status &= !STATUS_BUSY;
        match &outcome {
            Ok(()) => {
                r.status |= STATUS_DONE;
                r.error_code = 0;
            }
            Err(e) => {
                r.status |= STATUS_ERROR;
                r.error_code = e.errno() as i32 as u32;
                tracing::debug!("dma-engine operation failed: {}", e);
            }
        }
        r.job = Job::default();
        r.completions = r.completions.wrapping_add(1);
        if r.control & CONTROL_IRQ_ENABLE != 0 {
            cx.raise(r.irq_vector);
        }
    }
}

fn access_u32(offset: u64, len: usize) -> Result<u64, DeviceError> {
    if len != 4 || !offset.is_multiple_of(4) {
        return Err(DeviceError::BadAccess(format!(
            "registers take aligned 4-byte accesses, not {len} at {offset:#x}"
        )));
    }
    Ok(offset)
}

fn set_lo(v: &mut u64, x: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(x);
}

fn set_hi(v: &mut u64, x: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(x) << 32);
}

impl Device for DmaEngine {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("dma-engine", PciIds::new(0x5646, 0x0001, 0x08_80_00))
            .bar(0, BarSpec::mem32(4096))
            .bar(
                2,
                BarSpec::mem64(DEVICE_MEMORY_SIZE).prefetchable().shared(),
            )
            .bar(4, BarSpec::mem32(4096))
            .irqs(if self.msix {
                IrqLayout::intx()
                    .with_msi(1)
                    .with_msix(MSIX_VECTORS, 4, 0, 0x800)
            } else {
                IrqLayout::intx().with_msi(1)
            })
            .pcie(Some(0x5646_0001_0000_0001))
    }

    fn bar_read(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        if bar != BAR_REGS {
            // MSI-X BAR space outside table and PBA reads as zero.
            data.fill(0);
            return Ok(());
        }
        if self.crash_test && offset == CRASH_TEST_REG {
            hang_on_purpose();
        }
        let r = &self.regs;
        let v = match access_u32(offset, data.len())? {
            reg::ID => ID,
            reg::VERSION => VERSION,
            reg::CONTROL => r.control,
            reg::STATUS => r.status,
            reg::SRC_LO => r.src as u32,
            reg::SRC_HI => (r.src >> 32) as u32,
            reg::DST_LO => r.dst as u32,
            reg::DST_HI => (r.dst >> 32) as u32,
            reg::LEN => r.len,
            reg::OPCODE => r.opcode,
            reg::PATTERN => r.pattern,
            reg::RESULT => r.result,
            reg::COMPLETIONS => r.completions,
            reg::ERROR_CODE => r.error_code,
            reg::IRQ_VECTOR => r.irq_vector,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }

    fn bar_write(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        if bar != BAR_REGS {
            return Ok(());
        }
        let off = access_u32(offset, data.len())?;
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if self.crash_test && off == CRASH_TEST_REG && v == CRASH_MAGIC {
            panic!("dma-engine: crash-test register written: panicking on purpose");
        }
        if self.crash_test && off == CRASH_TEST_REG && v == HANG_MAGIC {
            hang_on_purpose();
        }
        let r = &mut self.regs;
        match off {
            reg::CONTROL => r.control = v & CONTROL_IRQ_ENABLE,
            reg::STATUS => {
                r.status &= !(v & (STATUS_DONE | STATUS_ERROR));
                if r.status & (STATUS_DONE | STATUS_ERROR) == 0 {
                    // The driver acknowledged the completion: lower a level INTx.
                    cx.set_intx(false);
                }
            }
            reg::SRC_LO => set_lo(&mut r.src, v),
            reg::SRC_HI => set_hi(&mut r.src, v),
            reg::DST_LO => set_lo(&mut r.dst, v),
            reg::DST_HI => set_hi(&mut r.dst, v),
            reg::LEN => r.len = v,
            reg::OPCODE => r.opcode = v,
            reg::PATTERN => r.pattern = v,
            reg::IRQ_VECTOR => r.irq_vector = v,
            reg::DOORBELL if v & 1 != 0 && r.status & STATUS_BUSY == 0 => {
                r.status = (r.status | STATUS_BUSY) & !(STATUS_DONE | STATUS_ERROR);
                r.job = Job::default();
                cx.set_intx(false);
                cx.schedule();
            }
            _ => {} // read-only or reserved: ignored
        }
        Ok(())
    }

    fn reset(&mut self, _cx: &mut DeviceCtx<'_>) {
        self.regs = Registers::default();
    }

    fn run(&mut self, cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        if self.regs.status & STATUS_BUSY == 0 {
            return Ok(());
        }
        match job::advance(&mut self.regs, self.slice, cx) {
            job::Progress::Done(outcome) => self.complete(outcome, cx),
            job::Progress::More => cx.schedule(),
            job::Progress::Waiting => {} // run again when the client's DMA reply arrives
        }
        Ok(())
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for DmaEngine {
    fn needs_config_before_data(&self) -> bool {
        true
    }

    fn save(&mut self) -> Result<DeviceState, DeviceError> {
        DeviceState::encode(STATE_VERSION, &self.regs)
    }

    fn load(
        &mut self,
        state: &DeviceState,
        config: Option<&ConfigView<'_>>,
    ) -> Result<(), DeviceError> {
        let regs: Registers = state.decode(STATE_VERSION)?;
        let invalid = |m: &str| Err(DeviceError::InvalidState(m.into()));
        if regs.control & !CONTROL_IRQ_ENABLE != 0
            || regs.status & !(STATUS_DONE | STATUS_ERROR | STATUS_BUSY) != 0
        {
            return invalid("reserved register bits set");
        }
        if regs.status & STATUS_BUSY != 0 {
            if regs.len > MAX_LEN || u64::from(regs.len) < regs.job.done {
                return invalid("job progress beyond its length");
            }
            // A job in flight resumes DMA and raises its completion vector: both need the
            // restored config (this is why the device declares config-before-data).
            let Some(cfg) = config else {
                return invalid("a job in flight needs config space restored before device data");
            };
            if !cfg.bus_master() {
                return invalid("a job in flight, but bus mastering is off in the restored config");
            }
            if regs.control & CONTROL_IRQ_ENABLE != 0 && !cfg.vector_programmed(regs.irq_vector) {
                return invalid("a job in flight, but its MSI-X vector does not exist");
            }
        }
        self.regs = regs;
        Ok(())
    }
}
