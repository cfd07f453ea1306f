//! vfud's server runtime: the event loop, the per-client session, PCI configuration space and
//! capability emulation, the DMA map table with guest-memory accessors, interrupts, and the
//! [`Device`] trait that device models implement.
//!
//! Data flows one way: socket → [`vfud_protocol::codec`] → [`dispatch`] → [`Device`]. Devices
//! never see protocol bytes or fds: they get typed BAR accesses and a [`DeviceCtx`] with a
//! bounds-checked guest-memory handle and an interrupt handle.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod device;
pub mod dispatch;
pub mod dma;
pub mod error;
pub mod event_loop;
pub mod handover;
pub mod irq;
pub mod migration;
pub mod mmap;
pub mod pci;
pub mod stats;

pub use device::{
    BarBacking, BarIndex, BarKind, BarSpec, Device, DeviceCtx, DeviceDescription, IrqLayout,
    MsixPlacement, PciIds,
};
pub use dispatch::ServerSettings;
pub use error::{DeviceError, DmaError};
pub use event_loop::{serve, ServeOptions, ShutdownHandle};
pub use migration::DeviceState;
