//! `vfud serve --config FILE`: the serve flags in a TOML file, for many devices.
//!
//! ```toml
//! socket_mode = "660"                      # --socket-mode
//! # control = "/run/vfud/uart.ctl"         # --control (one device only)
//!
//! [[device]]
//! spec = "uart16550,backend=socket:/run/vfud/uart.host"   # --device
//! socket = "/run/vfud/uart.sock"                          # --socket (or "fd:NAME")
//!
//! [[device]]
//! spec = "dma-engine"
//! socket = "/run/vfud/dma.sock"
//! ```
//!
//! Devices from the file come after those given as flags; a flag given on the command line
//! wins over the same setting in the file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::ServeArgs;

/// The file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeConfig {
    #[serde(default)]
    device: Vec<DeviceEntry>,
    control: Option<PathBuf>,
    incoming: Option<PathBuf>,
    socket_mode: Option<String>,
}

/// One `[[device]]`: `--device SPEC --socket PATH`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    spec: String,
    socket: Option<PathBuf>,
}

/// Read `path` and merge it into `args`.
pub fn apply(path: &Path, args: &mut ServeArgs) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let c: ServeConfig = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    for d in c.device {
        args.devices.push(d.spec);
        args.sockets.extend(d.socket);
    }
    args.control = args.control.take().or(c.control);
    args.incoming = args.incoming.take().or(c.incoming);
    if args.socket_mode.is_none() {
        if let Some(m) = c.socket_mode {
            args.socket_mode = Some(
                crate::parse_octal(&m)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("socket_mode in {}", path.display()))?,
            );
        }
    }
    if args.devices.is_empty() {
        anyhow::bail!("{}: no [[device]] and no --device", path.display());
    }
    Ok(())
}
