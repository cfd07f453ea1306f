//! Device models for vfud. Each device is one module built only on `vfud-server`'s API.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dma_engine;

use vfud_server::Device;

/// Names of the devices `vfud serve --device` accepts.
pub const DEVICE_NAMES: &[&str] = &["dma-engine"];

/// Construct a device by name.
pub fn create(name: &str) -> Option<Box<dyn Device>> {
    match name {
        "dma-engine" => Some(Box::new(dma_engine::DmaEngine::new())),
        _ => None,
    }
}
