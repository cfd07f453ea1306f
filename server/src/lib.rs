//! vfud's server runtime: the event loop, the client connection, PCI function emulation
//! (config space, capabilities, MSI-X, interrupts), the DMA map table with guest-memory
//! accessors and asynchronous socket DMA, migration, live handover, and the [`Device`] trait
//! that device models implement.
//!
//! Data flows one way: socket → [`connection`] → [`vfud_protocol::codec`] → [`dispatch`] →
//! [`Device`]. Devices never see protocol bytes or fds: they get typed BAR accesses and a
//! [`DeviceCtx`] with a bounds-checked guest-memory handle and an interrupt handle.
//! [`testing::TestBench`] runs a device with none of that: in-memory guest RAM and recorded
//! interrupts.

#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod connection;
pub mod device;
pub mod dispatch;
pub mod dma;
pub mod error;
pub mod event_loop;
pub mod fuzzing;
pub mod handover;
pub mod irq;
pub mod migration;
pub mod mmap;
pub mod pci;
pub mod reply;
pub mod stats;
pub mod supervisor;
pub mod testing;

pub use device::{
    BarBacking, BarIndex, BarKind, BarSpec, Device, DeviceCtx, DeviceDescription, HostIo,
    IrqLayout, Migratable, MsixPlacement, PciIds,
};
pub use dispatch::ServerSettings;
pub use error::{DeviceError, DmaError};
pub use event_loop::{serve, ServeOptions, ShutdownHandle};
pub use migration::DeviceState;
pub use pci::ConfigView;

#[doc(hidden)]
pub use vfud_protocol::messages as vfud_protocol_reexport;
