//! Device models for vfud. Each device is one module built only on `vfud-server`'s API.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dma_engine;
pub mod uart16550;

use vfud_server::Device;

/// Names of the devices `vfud serve --device` accepts.
pub const DEVICE_NAMES: &[&str] = &["dma-engine", "uart16550"];

/// Construct a device from `NAME[,key=value...]`, e.g. `uart16550,backend=socket:/tmp/u.sock`.
pub fn create(spec: &str) -> Result<Box<dyn Device>, String> {
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let mut opts = Vec::new();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("device option {p:?} is not key=value"))?;
        opts.push((k, v));
    }
    let unknown = |k: &str| Err(format!("device {name} has no option {k:?}"));
    match name {
        "dma-engine" => {
            if let Some((k, _)) = opts.first() {
                return unknown(k);
            }
            Ok(Box::new(dma_engine::DmaEngine::new()))
        }
        "uart16550" => {
            let mut backend = uart16550::Backend::Stdout;
            for (k, v) in opts {
                match k {
                    "backend" => backend = uart16550::Backend::parse(v)?,
                    _ => return unknown(k),
                }
            }
            Ok(Box::new(uart16550::Uart16550::new(backend)))
        }
        _ => Err(format!(
            "unknown device {name:?}; available: {}",
            DEVICE_NAMES.join(", ")
        )),
    }
}
