//! PCI configuration space emulation (region 7): the type-0 header with its read-only, RW and
//! RW1C bits, BAR sizing, and the capability chain (PM, MSI, MSI-X, PCI Express, DSN).
//!
//! QEMU forwards every config write to the server ("write everything to VFIO, let it
//! filter") and overlays its own emulation of MSI/MSI-X and the ROM BAR, so writes to bits the
//! server does not implement are accepted and ignored, never refused.

pub mod caps;
pub mod config;

pub use config::{ConfigEffect, ConfigSpace};
