//! `bench-bigmem`: a bench-only device whose state is dominated by 256 MiB of device memory,
//! to measure migration-stream bandwidth and downtime at a size where they matter.
//!
//! - BAR0 (4 KiB, trapped): one read/write scratch register at 0 (the whole device state
//!   besides memory), the rest reads as zero.
//! - BAR2 (256 MiB, 64-bit prefetchable, mmap-able): device memory, saved by the server as
//!   `BAR_MEMORY` sections, pre-copied and re-sent when it changes.
//! - No interrupts.

use serde::{Deserialize, Serialize};
use vfud_server::{
    BarIndex, BarSpec, ConfigView, Device, DeviceCtx, DeviceDescription, DeviceError, DeviceState,
    Migratable, PciIds,
};

/// Size of the device memory BAR.
pub const MEMORY_SIZE: u64 = 256 << 20;
/// Region index of the device memory BAR.
pub const MEMORY_BAR: u32 = 2;
const STATE_VERSION: u16 = 1;

/// The device's own state (memory is the server's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BigMemState {
    /// The scratch register.
    pub scratch: u32,
}

/// The device.
#[derive(Debug, Default)]
pub struct BigMem {
    state: BigMemState,
}

impl BigMem {
    /// Power-on state.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Device for BigMem {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("bench-bigmem", PciIds::new(0x5646, 0x00b1, 0x05_00_00))
            .bar(0, BarSpec::mem32(4096))
            .bar(2, BarSpec::mem64(MEMORY_SIZE).prefetchable().shared())
    }

    fn bar_read(
        &mut self,
        _bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.state.scratch.to_le_bytes());
        }
        Ok(())
    }

    fn bar_write(
        &mut self,
        _bar: BarIndex,
        offset: u64,
        data: &[u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        if let (0, Ok(b)) = (offset, <[u8; 4]>::try_from(data)) {
            self.state.scratch = u32::from_le_bytes(b);
        }
        Ok(())
    }

    fn reset(&mut self, _cx: &mut DeviceCtx<'_>) {
        self.state = BigMemState::default();
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for BigMem {
    fn save(&mut self) -> Result<DeviceState, DeviceError> {
        DeviceState::encode(STATE_VERSION, &self.state)
    }

    fn load(&mut self, state: &DeviceState, _: Option<&ConfigView<'_>>) -> Result<(), DeviceError> {
        self.state = state.decode(STATE_VERSION)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        let mut d = BigMem::new();
        d.state.scratch = 7;
        let s = d.save().unwrap();
        let mut e = BigMem::new();
        e.load(&s, None).unwrap();
        assert_eq!(e.state, d.state);
    }

    #[test]
    fn the_server_accepts_the_layout() {
        let s =
            vfud_server::dispatch::DeviceServer::new(Box::new(BigMem::new()), Default::default())
                .unwrap();
        assert_eq!(
            s.description().bars[2].as_ref().map(|b| b.size),
            Some(MEMORY_SIZE)
        );
    }
}
