//! PCI function emulation: config space (region 7) with its read-only, RW and RW1C bits, BAR
//! sizing and the capability chain (PM, MSI, MSI-X, PCI Express, DSN); the MSI-X table; and
//! [`PciFunction`], which ties them to interrupts and device-owned BAR memory and routes BAR
//! accesses.
//!
//! QEMU forwards every config write to the server ("write everything to VFIO, let it
//! filter") and overlays its own emulation of MSI/MSI-X and the ROM BAR, so writes to bits the
//! server does not implement are accepted and ignored, never refused.

pub mod caps;
pub mod config;
pub mod function;
pub mod msix;
pub mod view;

pub use config::{ConfigEffect, ConfigSpace};
pub use function::{Access, BarTarget, PciFunction};
pub use view::ConfigView;
