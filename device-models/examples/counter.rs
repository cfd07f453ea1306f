//! The smallest useful vfud device: a counter with an interrupt, migratable. Walked through
//! in docs/writing-a-device.md. Serve it with
//! `cargo run -p vfud-devices --example counter -- /tmp/counter.sock`.
//!
//! BAR0 (4 KiB): 0x0 COUNT (read/write), 0x4 ADD (write: COUNT += value, then raise
//! interrupt vector 0 when COUNT crosses 100).

use serde::{Deserialize, Serialize};
use vfud_server::{
    BarIndex, BarSpec, ConfigView, Device, DeviceCtx, DeviceDescription, DeviceError, DeviceState,
    IrqLayout, Migratable, PciIds,
};

/// The device's whole state: a plain versioned struct.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    count: u32,
}

impl Device for Counter {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("counter", PciIds::new(0x5646, 0x00c0, 0xff_00_00))
            .bar(0, BarSpec::mem32(4096))
            .irqs(IrqLayout::intx().with_msi(1))
    }

    fn bar_read(
        &mut self,
        _: BarIndex,
        off: u64,
        data: &mut [u8],
        _: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        let v = if off == 0 { self.count } else { 0 };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        Ok(())
    }

    fn bar_write(
        &mut self,
        _: BarIndex,
        off: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        let v: [u8; 4] = data
            .try_into()
            .map_err(|_| DeviceError::BadAccess(format!("{} bytes at {off:#x}", data.len())))?;
        let v = u32::from_le_bytes(v);
        match off {
            0 => self.count = v,
            4 => {
                let before = self.count;
                self.count = self.count.wrapping_add(v);
                if before < 100 && self.count >= 100 {
                    cx.raise(0);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self, _: &mut DeviceCtx<'_>) {
        *self = Self::default();
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for Counter {
    fn save(&mut self) -> Result<DeviceState, DeviceError> {
        DeviceState::encode(1, self)
    }

    fn load(&mut self, state: &DeviceState, _: Option<&ConfigView<'_>>) -> Result<(), DeviceError> {
        *self = state.decode(1)?;
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/counter.sock".into());
    let opts = vfud_server::ServeOptions::new(path);
    vfud_server::serve(
        Box::new(Counter::default()),
        &opts,
        &vfud_server::ShutdownHandle::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfud_server::testing::TestBench;

    #[test]
    fn add_counts_and_interrupts_once_at_one_hundred() {
        let mut b = TestBench::new(Box::new(Counter::default()));
        b.wire_irqs(1, 1); // MSI, vector 0
        b.write32(0, 4, 60).unwrap();
        b.write32(0, 4, 60).unwrap();
        b.write32(0, 4, 60).unwrap();
        assert_eq!(b.read32(0, 0).unwrap(), 180);
        assert_eq!(b.interrupts(), vec![(1, 0, 1)]);
    }

    vfud_server::migration_roundtrip_tests!(Box::new(Counter::default()));
}
