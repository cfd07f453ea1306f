//! `vfud migrate`: the migration driver on the command line, with a progress bar and a report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use vfud::driver::{self, Endpoint, GuestRam, Options, Progress, Report, VmHooks};

/// Arguments of `vfud migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Source: a device server socket (or, with --handover, its control socket).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Destination: a device server socket (or, with --handover, the new process's control socket).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Save the source device's state to this file (a snapshot; the source keeps running).
    #[arg(long, conflicts_with_all = ["to", "from_file"])]
    pub to_file: Option<PathBuf>,
    /// Restore the destination device from this file.
    #[arg(long, conflicts_with = "from")]
    pub from_file: Option<PathBuf>,
    /// Give both servers this much driver-owned guest RAM (MiB, at IOVA 0) and keep it in sync.
    #[arg(long, default_value_t = 0)]
    pub ram_mib: u64,
    /// Most pre-copy rounds.
    #[arg(long, default_value_t = 8)]
    pub max_rounds: u32,
    /// Use the v1 migration region even when v2 is offered.
    #[arg(long)]
    pub v1: bool,
    /// Print the report as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

struct Bar(Option<ProgressBar>);

impl VmHooks for Bar {
    fn progress(&mut self, p: &Progress) {
        if let Some(b) = &self.0 {
            b.set_position(p.device_bytes + p.ram_bytes);
            b.set_message(format!(
                "{} round {} (device {} B, RAM {} B)",
                p.phase, p.round, p.device_bytes, p.ram_bytes
            ));
        }
    }
}

fn bar(json: bool) -> Bar {
    if json {
        return Bar(None);
    }
    let b = ProgressBar::new_spinner();
    b.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} {bytes} at {bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    b.enable_steady_tick(Duration::from_millis(100));
    Bar(Some(b))
}

fn print_report(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "migrated over {} in {:.1} ms: {} pre-copy rounds, {} device bytes ({} during stop-copy), {} RAM bytes, downtime {:.2} ms{}",
            r.channel,
            r.total_ms,
            r.rounds,
            r.device_bytes,
            r.stop_copy_bytes,
            r.ram_bytes,
            r.downtime_ms,
            if r.config_before_data { ", config before data" } else { "" }
        );
    }
    Ok(())
}

/// Run the command.
pub fn run(a: &MigrateArgs) -> Result<()> {
    let opts = Options {
        max_rounds: a.max_rounds,
        force_v1: a.v1,
        ..Options::default()
    };
    let ram = |mib: u64| -> Result<Option<GuestRam>> {
        Ok(if mib == 0 {
            None
        } else {
            Some(GuestRam::new(&[(0, mib << 20)])?)
        })
    };
    let connect = |p: &PathBuf| -> Result<Endpoint> {
        let mut e =
            Endpoint::connect(p).with_context(|| format!("connecting to {}", p.display()))?;
        if let Some(r) = ram(a.ram_mib)? {
            e = e.with_ram(r).context("mapping guest RAM")?;
        }
        Ok(e)
    };
    let report = match (&a.from, &a.to, &a.to_file, &a.from_file) {
        (Some(from), None, Some(file), None) => {
            let mut src = connect(from)?;
            driver::save_to_file(&mut src, file, &opts).context("snapshot")?
        }
        (None, Some(to), None, Some(file)) => {
            let mut dst = connect(to)?;
            driver::restore_from_file(&mut dst, file, &opts).context("restore")?
        }
        (Some(from), Some(to), None, None) => {
            let mut src = connect(from)?;
            let mut dst = connect(to)?;
            let mut hooks = bar(a.json);
            let r = driver::migrate(&mut src, &mut dst, &opts, &mut hooks);
            if let Some(b) = &hooks.0 {
                b.finish_and_clear();
            }
            r.context("migration failed; the source device is running with its state")?
        }
        _ => bail!("give --from and --to, --from and --to-file, or --from-file and --to"),
    };
    print_report(&report, a.json)
}
