//! [`DeviceCtx`]: what a device callback can do besides returning data.

use crate::device::BarIndex;
use crate::dma::GuestMem;
use crate::irq::Interrupts;
use crate::mmap::SharedMemory;

/// Side effects available to a device callback: guest memory, interrupts, device-owned BAR
/// memory and deferred work. The server builds one per callback; tests build one with
/// [`crate::testing::TestBench`].
pub struct DeviceCtx<'a> {
    mem: GuestMem<'a>,
    irqs: &'a mut Interrupts,
    bars: &'a [Option<SharedMemory>; 6],
    work: &'a mut bool,
}

impl<'a> DeviceCtx<'a> {
    /// A context over the given parts. `work` is set when the device asks for
    /// [`crate::Device::run`].
    pub fn new(
        mem: GuestMem<'a>,
        irqs: &'a mut Interrupts,
        bars: &'a [Option<SharedMemory>; 6],
        work: &'a mut bool,
    ) -> Self {
        Self {
            mem,
            irqs,
            bars,
            work,
        }
    }

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

    /// Whether interrupts go out as MSI-X (rather than MSI or INTx). Some devices mask the
    /// other modes themselves (NVMe's INTMS/INTMC apply only without MSI-X).
    pub fn msix_active(&self) -> bool {
        self.irqs.active_index() == Some(vfud_protocol::messages::irq::IRQ_INDEX_MSIX)
    }

    /// Device-owned memory of a shared BAR.
    pub fn bar_memory(&self, bar: BarIndex) -> Option<&SharedMemory> {
        self.bars.get(usize::from(bar.0)).and_then(|b| b.as_ref())
    }

    /// Ask for [`crate::Device::run`] to be called again once the current callback has
    /// returned and the client's request (if any) has been answered.
    pub fn schedule(&mut self) {
        *self.work = true;
    }
}
