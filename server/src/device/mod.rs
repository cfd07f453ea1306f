//! The [`Device`] trait and the declarative description a device gives of itself.
//!
//! The server owns the PCI header, capabilities, interrupts, the DMA table and the migration
//! FSM. A device declares its identity, BARs and interrupt layout once
//! ([`DeviceDescription`]) and implements typed callbacks. Side effects go through
//! [`DeviceCtx`]: guest memory, interrupts, device-owned BAR memory, deferred work.
//!
//! The trait has a small core every device implements (describe, BAR access, reset,
//! deferred work) and two optional parts, each its own trait reached through one accessor:
//! [`Migratable`] (save/load for migration and handover) and [`HostIo`] (host-side backend
//! fds, timers, and moving the backend in a handover).

mod ctx;
mod describe;

use std::os::fd::{OwnedFd, RawFd};
use std::time::Instant;

pub use ctx::DeviceCtx;
pub use describe::{
    BarBacking, BarIndex, BarKind, BarSpec, DeviceDescription, IrqLayout, MsixPlacement, PciIds,
};

use crate::error::DeviceError;
use crate::migration::DeviceState;
use crate::pci::ConfigView;

/// A device model. See the module docs for the division of labour.
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

    /// Deferred work requested with [`DeviceCtx::schedule`], run from the event loop between
    /// client messages. A long job does a bounded slice and schedules itself again, so the
    /// client's requests are answered in between. Socket-backed guest memory answers
    /// [`crate::DmaError::Pending`] until the client's reply is in: keep the progress and
    /// return `Ok`; `run` is called again when the data has arrived.
    fn run(&mut self, _cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Migration support, if the device has it.
    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        None
    }

    /// A host-side backend (fds to watch, timers, handover of the backend), if any.
    fn host_io(&mut self) -> Option<&mut dyn HostIo> {
        None
    }
}

/// The optional migration part of a device.
pub trait Migratable {
    /// Whether the device needs its PCI config space restored before its device data on the
    /// destination (advertised in the ordering capability, feature and stream header). A
    /// device that says so receives the restored config in [`Migratable::load`].
    fn needs_config_before_data(&self) -> bool {
        false
    }

    /// Largest saved state the device accepts (bytes of its serialized struct). A stream
    /// that carries more is refused as it arrives, so a peer cannot make the destination
    /// buffer more than the device declares.
    fn max_state_size(&self) -> usize {
        1 << 20
    }

    /// The device is about to stop for migration (RUNNING→STOP, PRE_COPY→STOP_COPY): take in
    /// whatever backend input is already waiting, so the saved state holds it. Idempotent.
    fn quiesce(&mut self) {}

    /// Save the device's own state (registers, queues, a job in flight). Device-owned BAR
    /// memory, config space and interrupt state are saved by the server. Called stopped.
    fn save(&mut self) -> Result<DeviceState, DeviceError>;

    /// The state just loaded is a checkpoint from before a crash (`vfud serve --supervise`,
    /// `--on-crash restore`): the driver may be ahead of it, having written registers after
    /// the checkpoint that are now lost, and may wait for what those writes would have
    /// caused. Make the device safe for such a driver (e.g. raise the interrupt it waits
    /// for, which it will find nothing to do in if it was not waiting). Default: nothing.
    fn restored_after_crash(&mut self) {}

    /// Replace the device's state with a saved one. Must validate everything (the bytes come
    /// from a peer) and change nothing when it fails. `config` is the restored config space
    /// when it was restored before the device data (always so for a device that
    /// [needs it](Migratable::needs_config_before_data)); `None` otherwise.
    fn load(
        &mut self,
        state: &DeviceState,
        config: Option<&ConfigView<'_>>,
    ) -> Result<(), DeviceError>;
}

/// The optional host-side part of a device: backend fds, a timer, and moving the backend to
/// another vfud process in a live handover.
pub trait HostIo {
    /// File descriptors the event loop should watch, with device-chosen tokens.
    fn event_fds(&self) -> Vec<(RawFd, u32)>;

    /// One of [`HostIo::event_fds`] is readable.
    fn on_event(&mut self, token: u32, cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError>;

    /// When the device next wants [`HostIo::on_timer`].
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// The deadline passed.
    fn on_timer(&mut self, _cx: &mut DeviceCtx<'_>) {}

    /// Live handover: describe the backend and duplicate its fds so another vfud process can
    /// adopt it (e.g. a UART's host socket and its connection). `None`: nothing to hand over.
    fn export(&self) -> Option<(String, Vec<OwnedFd>)> {
        None
    }

    /// Live handover, receiving side: replace the backend with the one described.
    fn adopt(&mut self, _desc: &str, _fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        Err(DeviceError::Other(
            "this device has no backend to adopt".into(),
        ))
    }

    /// Live handover succeeded: let go of the backend without tearing it down (no unlinking
    /// of socket paths the new process now serves).
    fn release(&mut self) {}
}
