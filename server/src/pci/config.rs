//! The configuration space image with its masks, and config region reads and writes.

use crate::device::{BarKind, DeviceDescription};
use crate::pci::caps::{CapBlock, EXT_CAP_ID_DSN};

/// Conventional PCI config space size.
pub const CONFIG_SIZE: usize = 256;
/// PCI Express config space size.
pub const PCIE_CONFIG_SIZE: usize = 4096;

/// Command register offset.
pub const PCI_COMMAND: usize = 0x04;
/// Status register offset.
pub const PCI_STATUS: usize = 0x06;
/// Command bit: INTx Disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Capabilities pointer.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// First BAR.
pub const PCI_BASE_ADDRESS_0: usize = 0x10;
/// Interrupt pin.
pub const PCI_INTERRUPT_PIN: usize = 0x3d;

/// What a config write changed that the server must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigEffect {
    /// Nothing outside config space.
    None,
    /// The command register changed to this value.
    Command(u16),
}

/// A config space image plus writable and RW1C masks (cloud-hypervisor's
/// `PciConfiguration` idea: data and masks side by side, BAR sizing falls out of the masks).
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    initial: Vec<u8>,
    /// Offset of each standard capability by id, for lookups.
    caps: Vec<(u8, usize)>,
}

fn put16(v: &mut [u8], off: usize, x: u16) {
    v[off..off + 2].copy_from_slice(&x.to_le_bytes());
}

fn put32(v: &mut [u8], off: usize, x: u32) {
    v[off..off + 4].copy_from_slice(&x.to_le_bytes());
}

impl ConfigSpace {
    /// Build the image for a device.
    pub fn new(desc: &DeviceDescription) -> Self {
        let size = if desc.pcie {
            PCIE_CONFIG_SIZE
        } else {
            CONFIG_SIZE
        };
        let mut b = vec![0u8; size];
        let mut w = vec![0u8; size];
        let mut c = vec![0u8; size];
        let ids = &desc.ids;
        put16(&mut b, 0x00, ids.vendor);
        put16(&mut b, 0x02, ids.device);
        put16(&mut w, PCI_COMMAND, 0x0557); // IO, MEM, BME, MWI, PERR, SERR, INTx disable
        put16(&mut c, PCI_STATUS, 0xf900); // error bits are RW1C
        b[0x08] = ids.revision;
        b[0x09] = ids.class_code as u8;
        b[0x0a] = (ids.class_code >> 8) as u8;
        b[0x0b] = (ids.class_code >> 16) as u8;
        w[0x0c] = 0xff; // cache line size
        w[0x0d] = 0xff; // latency timer
        put16(&mut b, 0x2c, ids.subsystem_vendor);
        put16(&mut b, 0x2e, ids.subsystem);
        w[0x3c] = 0xff; // interrupt line
        b[PCI_INTERRUPT_PIN] = u8::from(desc.irqs.intx);

        // BARs: flag bits read-only, address bits above the size writable, so writing
        // all-ones reads back the size mask (PCI 3.0 §6.2.5.1).
        let mut i = 0;
        while i < 6 {
            let Some(bar) = &desc.bars[i] else {
                i += 1;
                continue;
            };
            let off = PCI_BASE_ADDRESS_0 + 4 * i;
            let size_mask = !(bar.size.max(16) - 1);
            match bar.kind {
                BarKind::Io => {
                    put32(&mut b, off, 0x1);
                    put32(&mut w, off, (!(bar.size.max(4) - 1)) as u32 & !0x3);
                }
                BarKind::Mem32 => {
                    put32(&mut b, off, if bar.prefetchable { 0x8 } else { 0 });
                    put32(&mut w, off, size_mask as u32 & !0xf);
                }
                BarKind::Mem64 => {
                    put32(&mut b, off, 0x4 | if bar.prefetchable { 0x8 } else { 0 });
                    put32(&mut w, off, size_mask as u32 & !0xf);
                    if i + 1 < 6 {
                        put32(&mut w, off + 4, (size_mask >> 32) as u32);
                    }
                    i += 1;
                }
            }
            i += 1;
        }

        // Capability chain from 0x40.
        let mut blocks = Vec::new();
        if desc.pm {
            blocks.push(CapBlock::power_management());
        }
        if desc.irqs.msi_vectors > 0 {
            blocks.push(CapBlock::msi(desc.irqs.msi_vectors));
        }
        if let Some((n, p)) = desc.irqs.msix {
            blocks.push(CapBlock::msix(n, p.bar.0, p.table_offset, p.pba_offset));
        }
        if desc.pcie {
            blocks.push(CapBlock::pcie_endpoint());
        }
        let mut caps = Vec::new();
        let mut off = 0x40usize;
        let mut prev_next = PCI_CAPABILITY_LIST;
        for blk in &blocks {
            b[prev_next] = off as u8;
            b[off..off + blk.bytes.len()].copy_from_slice(&blk.bytes);
            w[off..off + blk.wmask.len()].copy_from_slice(&blk.wmask);
            c[off..off + blk.w1c.len()].copy_from_slice(&blk.w1c);
            caps.push((blk.id, off));
            prev_next = off + 1;
            off = (off + blk.bytes.len()).next_multiple_of(4);
        }
        if !blocks.is_empty() {
            b[PCI_STATUS] |= 0x10; // capabilities list
        }
        if desc.pcie {
            if let Some(serial) = desc.dsn {
                put32(&mut b, 0x100, u32::from(EXT_CAP_ID_DSN) | (1 << 16));
                b[0x104..0x10c].copy_from_slice(&serial.to_le_bytes());
            }
        }
        Self {
            initial: b.clone(),
            bytes: b,
            wmask: w,
            w1c: c,
            caps,
        }
    }

    /// Size of the space (256 or 4096).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false; config space has a header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Offset of a standard capability.
    pub fn find_cap(&self, id: u8) -> Option<usize> {
        self.caps.iter().find(|(i, _)| *i == id).map(|(_, o)| *o)
    }

    /// Read; `None` when the range leaves config space.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let off = usize::try_from(offset).ok()?;
        let src = self.bytes.get(off..off.checked_add(buf.len())?)?;
        buf.copy_from_slice(src);
        Some(())
    }

    /// Write through the masks; `None` when the range leaves config space.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<ConfigEffect> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(data.len())?;
        if end > self.bytes.len() {
            return None;
        }
        let old_cmd = self.u16_at(PCI_COMMAND);
        for (i, v) in data.iter().enumerate() {
            let o = off + i;
            let kept = self.bytes[o] & !self.wmask[o];
            let mut nb = kept | (v & self.wmask[o]);
            nb &= !(v & self.w1c[o]);
            self.bytes[o] = nb;
        }
        let cmd = self.u16_at(PCI_COMMAND);
        Some(if cmd != old_cmd {
            ConfigEffect::Command(cmd)
        } else {
            ConfigEffect::None
        })
    }

    /// A little-endian u16 of the image.
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    /// A little-endian u32 of the image.
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }

    /// Back to power-on values.
    pub fn reset(&mut self) {
        self.bytes.copy_from_slice(&self.initial);
    }

    /// The whole image (for migration).
    pub fn image(&self) -> &[u8] {
        &self.bytes
    }

    /// Replace the image, keeping read-only bits as built (restored bytes are peer input).
    pub fn restore(&mut self, image: &[u8]) -> Result<(), crate::error::ImageSizeError> {
        if image.len() != self.bytes.len() {
            return Err(crate::error::ImageSizeError {
                what: "config image",
                got: image.len(),
                want: self.bytes.len(),
            });
        }
        for (o, v) in image.iter().enumerate() {
            let rw = self.wmask[o] | self.w1c[o];
            self.bytes[o] = (self.initial[o] & !rw) | (v & rw);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BarBacking, BarIndex, BarSpec, IrqLayout, MsixPlacement, PciIds};

    fn desc() -> DeviceDescription {
        let mem = |size, kind| {
            Some(BarSpec {
                size,
                kind,
                prefetchable: false,
                backing: BarBacking::Trapped,
            })
        };
        DeviceDescription {
            name: "t",
            ids: PciIds {
                vendor: 0x1af4,
                device: 0x1234,
                subsystem_vendor: 0x1af4,
                subsystem: 1,
                class_code: 0x0c0330,
                revision: 2,
            },
            bars: [
                mem(0x1000, BarKind::Mem32),
                mem(0x8, BarKind::Io),
                mem(1 << 33, BarKind::Mem64),
                None,
                mem(0x1000, BarKind::Mem32),
                None,
            ],
            irqs: IrqLayout {
                intx: true,
                msi_vectors: 4,
                msix: Some((
                    4,
                    MsixPlacement {
                        bar: BarIndex(4),
                        table_offset: 0,
                        pba_offset: 0x800,
                    },
                )),
                err: false,
                req: false,
            },
            pm: true,
            pcie: true,
            dsn: Some(0x1122334455667788),
        }
    }

    fn probe(c: &mut ConfigSpace, off: u64) -> u32 {
        c.write(off, &u32::MAX.to_le_bytes()).unwrap();
        let mut b = [0u8; 4];
        c.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_size_probe_returns_size_mask() {
        let mut c = ConfigSpace::new(&desc());
        assert_eq!(probe(&mut c, 0x10), 0xffff_f000);
        assert_eq!(probe(&mut c, 0x14), 0xffff_fff9);
        assert_eq!(probe(&mut c, 0x18), 0x0000_0004);
        assert_eq!(probe(&mut c, 0x1c), 0xffff_fffe);
    }

    #[test]
    fn ids_and_class_are_read_only() {
        let mut c = ConfigSpace::new(&desc());
        c.write(0, &[0; 12]).unwrap();
        assert_eq!(c.u16_at(0), 0x1af4);
        assert_eq!(c.u32_at(8) >> 8, 0x0c0330);
    }

    #[test]
    fn status_error_bits_are_write_one_to_clear() {
        let mut c = ConfigSpace::new(&desc());
        c.bytes[PCI_STATUS + 1] |= 0x80;
        c.write(PCI_STATUS as u64, &[0, 0]).unwrap();
        assert_eq!(c.u16_at(PCI_STATUS) & 0x8000, 0x8000);
        c.write(PCI_STATUS as u64, &[0, 0x80]).unwrap();
        assert_eq!(c.u16_at(PCI_STATUS) & 0x8000, 0);
        assert_eq!(c.u16_at(PCI_STATUS) & 0x10, 0x10, "cap list bit survives");
    }

    #[test]
    fn capability_chain_links_all_caps() {
        let c = ConfigSpace::new(&desc());
        let mut ids = Vec::new();
        let mut p = c.bytes[PCI_CAPABILITY_LIST] as usize;
        while p != 0 {
            ids.push(c.bytes[p]);
            p = c.bytes[p + 1] as usize;
        }
        assert_eq!(ids, vec![0x01, 0x05, 0x11, 0x10]);
        assert_eq!(c.u32_at(0x100) & 0xffff, 3);
    }

    #[test]
    fn msix_table_size_is_n_minus_one() {
        let c = ConfigSpace::new(&desc());
        let off = c.find_cap(0x11).unwrap();
        assert_eq!(c.u16_at(off + 2) & 0x7ff, 3);
        assert_eq!(c.u32_at(off + 8), 0x800 | 4);
    }

    #[test]
    fn command_change_is_reported_and_out_of_range_refused() {
        let mut c = ConfigSpace::new(&desc());
        assert_eq!(
            c.write(4, &[0x06, 0x04]),
            Some(ConfigEffect::Command(0x0406))
        );
        assert_eq!(c.write(4095, &[0, 0]), None);
        c.reset();
        assert_eq!(c.u16_at(4), 0);
    }
}
