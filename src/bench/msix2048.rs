//! `bench-msix2048`: a bench-only device with the most MSI-X vectors PCI allows (2 048, PCI
//! Local Bus 3.0 §6.8.2.3), to measure enabling them all with SET_IRQS.
//!
//! - BAR0 (4 KiB, trapped): reads as zero, writes are ignored.
//! - BAR2 (64 KiB, trapped): MSI-X table (2 048 × 16 bytes) at 0, PBA (256 bytes) at 0x8000.

use vfud_server::{
    BarBacking, BarIndex, BarKind, BarSpec, Device, DeviceCtx, DeviceDescription, DeviceError,
    IrqLayout, MsixPlacement, PciIds,
};

/// Number of MSI-X vectors.
pub const VECTORS: u32 = 2048;

/// The device (stateless).
#[derive(Debug, Default)]
pub struct ManyVectors;

impl ManyVectors {
    /// A device.
    pub fn new() -> Self {
        Self
    }
}

fn bar(size: u64) -> Option<BarSpec> {
    Some(BarSpec {
        size,
        kind: BarKind::Mem32,
        prefetchable: false,
        backing: BarBacking::Trapped,
    })
}

impl Device for ManyVectors {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription {
            name: "bench-msix2048",
            ids: PciIds {
                vendor: 0x5646,
                device: 0x00b2,
                subsystem_vendor: 0x5646,
                subsystem: 0x00b2,
                class_code: 0x08_80_00,
                revision: 1,
            },
            bars: [bar(4096), None, bar(64 * 1024), None, None, None],
            irqs: IrqLayout {
                intx: false,
                msi_vectors: 0,
                msix: Some((
                    VECTORS,
                    MsixPlacement {
                        bar: BarIndex(2),
                        table_offset: 0,
                        pba_offset: 0x8000,
                    },
                )),
                err: false,
                req: false,
            },
            pm: false,
            pcie: true,
            dsn: None,
        }
    }

    fn bar_read(
        &mut self,
        _bar: BarIndex,
        _offset: u64,
        data: &mut [u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn bar_write(
        &mut self,
        _bar: BarIndex,
        _offset: u64,
        _data: &[u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfud_server::dispatch::DeviceServer;

    #[test]
    fn the_server_accepts_the_layout() {
        let s = DeviceServer::new(Box::new(ManyVectors::new()), Default::default()).unwrap();
        assert_eq!(s.description().irqs.msix.map(|(n, _)| n), Some(VECTORS));
    }
}
