//! `vfud bench`: performance scenarios, each reported as a ratio against a baseline measured
//! in the same run (placeholder; being written).

use anyhow::{bail, Result};

/// Arguments of `vfud bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Print results as JSON.
    #[arg(long)]
    pub json: bool,
    /// Run only scenarios whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

/// Run the benchmarks.
pub fn run(_a: &BenchArgs) -> Result<()> {
    bail!("not implemented yet")
}
