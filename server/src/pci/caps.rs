//! Capability builders: each places one capability's registers and its writable/RW1C masks.

/// Standard capability id: power management (PCI PM 1.2).
pub const CAP_ID_PM: u8 = 0x01;
/// Standard capability id: MSI (PCI 3.0 §6.8.1).
pub const CAP_ID_MSI: u8 = 0x05;
/// Standard capability id: PCI Express (PCIe 4.0 §7.5.3).
pub const CAP_ID_PCIE: u8 = 0x10;
/// Standard capability id: MSI-X (PCI 3.0 §6.8.2).
pub const CAP_ID_MSIX: u8 = 0x11;
/// Extended capability id: device serial number (PCIe 4.0 §7.9.3).
pub const EXT_CAP_ID_DSN: u16 = 0x0003;

/// A capability's bytes and masks, before it is placed in the chain.
#[derive(Clone, Debug)]
pub struct CapBlock {
    /// Capability id.
    pub id: u8,
    /// Register bytes (byte 1, the next pointer, is filled in when placed).
    pub bytes: Vec<u8>,
    /// Writable bits.
    pub wmask: Vec<u8>,
    /// Write-1-to-clear bits.
    pub w1c: Vec<u8>,
}

impl CapBlock {
    fn new(id: u8, len: usize) -> Self {
        let mut bytes = vec![0; len];
        bytes[0] = id;
        Self {
            id,
            bytes,
            wmask: vec![0; len],
            w1c: vec![0; len],
        }
    }

    fn set16(v: &mut [u8], off: usize, x: u16) {
        v[off..off + 2].copy_from_slice(&x.to_le_bytes());
    }

    fn set32(v: &mut [u8], off: usize, x: u32) {
        v[off..off + 4].copy_from_slice(&x.to_le_bytes());
    }

    /// Power management: D0–D3hot via PMCSR, No_Soft_Reset set.
    pub fn power_management() -> Self {
        let mut c = Self::new(CAP_ID_PM, 8);
        Self::set16(&mut c.bytes, 2, 0x0003); // PMC: version 1.2
        Self::set16(&mut c.bytes, 4, 0x0008); // PMCSR: No_Soft_Reset
        Self::set16(&mut c.wmask, 4, 0x0003); // PowerState
        Self::set16(&mut c.w1c, 4, 0x8000); // PME_Status
        c
    }

    /// 64-bit MSI with per-vector masking for `vectors` (a power of two ≤ 32).
    pub fn msi(vectors: u32) -> Self {
        let mmc = vectors.max(1).trailing_zeros() as u16;
        let mut c = Self::new(CAP_ID_MSI, 0x18);
        Self::set16(&mut c.bytes, 2, (mmc << 1) | (1 << 7) | (1 << 8));
        Self::set16(&mut c.wmask, 2, 0x0071); // enable + multiple message enable
        Self::set32(&mut c.wmask, 4, 0xffff_fffc); // address low
        Self::set32(&mut c.wmask, 8, 0xffff_ffff); // address high
        Self::set16(&mut c.wmask, 0xc, 0xffff); // data
        let mask = if vectors >= 32 {
            u32::MAX
        } else {
            (1u32 << vectors) - 1
        };
        Self::set32(&mut c.wmask, 0x10, mask); // per-vector mask
        c
    }

    /// MSI-X with `vectors` entries; table and PBA in `bar` at the given offsets.
    pub fn msix(vectors: u32, bar: u8, table_offset: u64, pba_offset: u64) -> Self {
        let mut c = Self::new(CAP_ID_MSIX, 12);
        Self::set16(&mut c.bytes, 2, (vectors.saturating_sub(1) as u16) & 0x7ff);
        Self::set16(&mut c.wmask, 2, 0xc000); // enable + function mask
        Self::set32(&mut c.bytes, 4, (table_offset as u32 & !7) | u32::from(bar));
        Self::set32(&mut c.bytes, 8, (pba_offset as u32 & !7) | u32::from(bar));
        c
    }

    /// PCI Express v2 endpoint, x1 at 2.5 GT/s.
    pub fn pcie_endpoint() -> Self {
        let mut c = Self::new(CAP_ID_PCIE, 0x3c);
        Self::set16(&mut c.bytes, 2, 0x0002); // version 2, endpoint
        Self::set32(&mut c.bytes, 4, 0x0000_8000); // DevCap: role-based error reporting
        Self::set16(&mut c.wmask, 8, 0x7fff); // DevCtl
        Self::set16(&mut c.w1c, 0xa, 0x000f); // DevSta error bits
        Self::set32(&mut c.bytes, 0xc, 0x0000_0011); // LnkCap: 2.5 GT/s x1
        Self::set16(&mut c.wmask, 0x10, 0x01c3); // LnkCtl
        Self::set16(&mut c.bytes, 0x12, 0x0011); // LnkSta: 2.5 GT/s x1
        Self::set16(&mut c.wmask, 0x28, 0x0fff); // DevCtl2
        Self::set32(&mut c.bytes, 0x2c, 0x0000_0002); // LnkCap2: 2.5 GT/s supported
        Self::set16(&mut c.bytes, 0x30, 0x0001); // LnkCtl2 target speed
        Self::set16(&mut c.wmask, 0x30, 0x000f);
        c
    }
}
