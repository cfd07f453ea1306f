//! [`ConfigView`]: restored config space as a device model reads it.

use crate::pci::caps::{CAP_ID_MSI, CAP_ID_MSIX};
use crate::pci::config::{PCI_BASE_ADDRESS_0, PCI_COMMAND};
use crate::pci::msix::{MsixEntry, MsixTable};
use crate::pci::ConfigSpace;

/// COMMAND bit 1: Memory Space Enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// COMMAND bit 2: Bus Master Enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// A read-only view of config space and the MSI-X table, handed to
/// [`crate::Migratable::load`] so a device can resume work that depends on them (bus
/// mastering, completion vectors).
pub struct ConfigView<'a> {
    config: &'a ConfigSpace,
    msix: &'a MsixTable,
}

impl<'a> ConfigView<'a> {
    /// A view over the parts.
    pub fn new(config: &'a ConfigSpace, msix: &'a MsixTable) -> Self {
        Self { config, msix }
    }

    /// The COMMAND register.
    pub fn command(&self) -> u16 {
        self.config.u16_at(PCI_COMMAND)
    }

    /// Bus mastering enabled: the device may do DMA.
    pub fn bus_master(&self) -> bool {
        self.command() & PCI_COMMAND_MASTER != 0
    }

    /// Raw BAR register `i` (0–5).
    pub fn bar_register(&self, i: usize) -> u32 {
        self.config.u32_at(PCI_BASE_ADDRESS_0 + 4 * i)
    }

    /// MSI enabled in its capability.
    pub fn msi_enabled(&self) -> bool {
        self.config
            .find_cap(CAP_ID_MSI)
            .is_some_and(|o| self.config.u16_at(o + 2) & 1 != 0)
    }

    /// MSI-X enabled in its capability (and the function not masked as a whole).
    pub fn msix_enabled(&self) -> bool {
        self.config
            .find_cap(CAP_ID_MSIX)
            .is_some_and(|o| self.config.u16_at(o + 2) & 0xc000 == 0x8000)
    }

    /// MSI-X table entry `vector`.
    pub fn msix_entry(&self, vector: u32) -> Option<MsixEntry> {
        self.msix.entry(vector)
    }

    /// Whether an interrupt on `vector` has somewhere to go: with MSI-X enabled, the vector
    /// exists in the table; otherwise MSI or INTx take it. The table's contents are not
    /// checked: QEMU emulates the MSI-X table for the guest and wires vectors with SET_IRQS,
    /// so the server's copy of the table stays as it was reset.
    pub fn vector_programmed(&self, vector: u32) -> bool {
        if self.msix_enabled() {
            return self.msix_entry(vector).is_some();
        }
        true
    }
}
