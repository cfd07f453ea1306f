//! `vfud qemu-migrate`: drive a QEMU-to-QEMU live migration over QMP, refusing when QEMU's
//! vfio-user client cannot migrate device state (placeholder; being written).

use anyhow::{bail, Result};

/// Arguments of `vfud qemu-migrate`.
#[derive(clap::Args, Debug)]
pub struct QemuMigrateArgs {
    /// QMP socket of the source QEMU.
    #[arg(long)]
    pub qmp: std::path::PathBuf,
    /// Migration URI for the destination (e.g. `unix:/tmp/dst.mig`).
    #[arg(long)]
    pub to: String,
    /// QMP socket of the destination QEMU (started with `-incoming`), to wait for completion.
    #[arg(long)]
    pub dest_qmp: Option<std::path::PathBuf>,
}

/// Run the command.
pub fn run(_args: &QemuMigrateArgs) -> Result<()> {
    bail!("not implemented yet")
}
