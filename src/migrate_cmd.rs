//! `vfud migrate`: the migration driver on the command line, with a progress bar and a report.
//!
//! Exit status: 0 when the device moved; 1 when the migration failed and the source device
//! runs again with its state; [`EXIT_SOURCE_NOT_RESTORED`] when it failed *and* the source
//! could not be returned to RUNNING. With `--json` a failure prints a JSON report too, whose
//! `source_restored` says which.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use vfud::driver::{self, Endpoint, GuestRam, MigrateError, Options, Progress, Report, VmHooks};

/// Exit status when a migration failed and the source device could not be returned to RUNNING
/// (distinct from 1, "failed, source running with its state").
pub const EXIT_SOURCE_NOT_RESTORED: i32 = 3;

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
    /// Live handover: move a running device, with its attached client (e.g. QEMU), from the
    /// process whose `--control` socket is --from to the process started with
    /// `vfud serve --incoming` on --to.
    #[arg(long, requires_all = ["from", "to"])]
    pub handover: bool,
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
            "migrated over {} in {:.1} ms: {} pre-copy rounds, {} device bytes ({} during stop-copy), {} RAM bytes, downtime {:.2} ms, {}",
            r.channel,
            r.total_ms,
            r.rounds,
            r.device_bytes,
            r.stop_copy_bytes,
            r.ram_bytes,
            r.downtime_ms,
            if r.config_before_data { "config restored before device data" } else { "config restored after device data" }
        );
        let mut quirks = Vec::new();
        if !r.ordering_advertised {
            quirks.push("no ordering feature (0x4002): no ordering requirement assumed");
        }
        if r.rounds > 0 && !r.precopy_info {
            quirks.push("no pre-copy estimate (0x4001)");
        }
        if r.padded_mig_data {
            quirks.push("padded MIG_DATA_READ replies (padding ignored)");
        }
        if !quirks.is_empty() {
            println!("source server: {}", quirks.join("; "));
        }
    }
    Ok(())
}

fn handover(a: &MigrateArgs, from: &PathBuf, to: &PathBuf) -> Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use vfud_server::handover::{self as ho, kind, ControlCommand};
    let ctl = UnixStream::connect(from)
        .with_context(|| format!("connecting to control socket {}", from.display()))?;
    let to_abs = std::path::absolute(to).with_context(|| format!("{}", to.display()))?;
    ho::send_json(
        ctl.as_fd(),
        kind::COMMAND,
        &ControlCommand::Handover {
            to: to_abs.to_string_lossy().into_owned(),
            max_rounds: Some(a.max_rounds),
        },
    )?;
    let hooks = bar(a.json);
    let mut reader = vfud_protocol::FrameReader::new();
    let done = loop {
        let f = ho::recv(&ctl, &mut reader, Duration::from_secs(120))
            .context("waiting for the handover")?;
        let ev: serde_json::Value = serde_json::from_slice(&f.payload)?;
        match ev["event"].as_str() {
            Some("round") => {
                if let Some(b) = &hooks.0 {
                    b.set_position(ev["bytes"].as_u64().unwrap_or(0));
                    b.set_message(format!(
                        "pre-copy round {} ({} B left)",
                        ev["round"], ev["remaining"]
                    ));
                }
            }
            Some("done") => break ev,
            _ => {
                if let Some(b) = &hooks.0 {
                    b.finish_and_clear();
                }
                bail!(
                    "handover failed: {}; the device keeps running in the old process",
                    ev["message"].as_str().unwrap_or("unknown error")
                );
            }
        }
    };
    if let Some(b) = &hooks.0 {
        b.finish_and_clear();
    }
    // The pause the client saw ends with the new process's first reply; ask it.
    let mut pause_ms = None;
    let mut client_idle = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while pause_ms.is_none() && std::time::Instant::now() < deadline {
        if let Ok(st) = crate::status::query(to, Duration::from_secs(2)) {
            client_idle = st["handover_client_idle"].as_bool().unwrap_or(false);
            if let (Some(first), Some(stopped)) = (
                st["handover_first_reply_at_ns"].as_u64(),
                st["handover_stopped_at_ns"].as_u64(),
            ) {
                pause_ms = Some(first.saturating_sub(stopped) as f64 / 1e6);
            }
        }
        if pause_ms.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let report = serde_json::json!({
        "handover": true,
        "rounds": done["rounds"],
        "bytes": done["bytes"],
        "stop_copy_bytes": done["stop_copy_bytes"],
        "total_ms": done["total_ms"],
        "switchover_ms": done["switchover_ms"],
        "pause_ms": pause_ms,
        "client_idle": client_idle,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "handed over in {:.1} ms: {} pre-copy rounds, {} bytes ({} after the stop), switchover {:.2} ms, client pause {}",
            done["total_ms"].as_f64().unwrap_or(0.0),
            done["rounds"],
            done["bytes"],
            done["stop_copy_bytes"],
            done["switchover_ms"].as_f64().unwrap_or(0.0),
            match (pause_ms, client_idle) {
                (Some(p), false) => format!("{p:.2} ms"),
                (Some(p), true) => format!("none (no request was waiting; at most {p:.2} ms)"),
                (None, _) => "not measured".into(),
            }
        );
    }
    Ok(())
}

/// Report a failed migration. When the source could not be returned to RUNNING this says so
/// and ends the process with [`EXIT_SOURCE_NOT_RESTORED`]; otherwise the error goes back to
/// `main` (exit status 1) saying the source runs with its state.
fn failed(e: MigrateError, json: bool) -> anyhow::Error {
    let restored = e.source_restored();
    if json {
        let report = serde_json::json!({
            "ok": false,
            "error": format!("{e}"),
            "source_restored": restored,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    }
    if restored {
        return anyhow::Error::new(e)
            .context("migration failed; the source device is running with its state");
    }
    eprintln!(
        "vfud: migration failed AND the source device could not be returned to RUNNING: {e:#}\n\
         vfud: the source device may be stopped or in ERROR; it needs a reset (or its server a \
         restart) before its VM can use it again"
    );
    std::process::exit(EXIT_SOURCE_NOT_RESTORED);
}

/// Run the command.
pub fn run(a: &MigrateArgs) -> Result<()> {
    if a.handover {
        let (Some(from), Some(to)) = (&a.from, &a.to) else {
            bail!("--handover needs --from OLD.ctl and --to NEW.ctl");
        };
        return handover(a, from, to);
    }
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
        let mut e = Endpoint::connect(p).with_context(|| {
            format!(
                "connecting to {} (a device that already has a client, such as QEMU, refuses a \
                 second one: move it with --handover instead)",
                p.display()
            )
        })?;
        if let Some(r) = ram(a.ram_mib)? {
            e = e.with_ram(r).context("mapping guest RAM")?;
        }
        Ok(e)
    };
    let report = match (&a.from, &a.to, &a.to_file, &a.from_file) {
        (Some(from), None, Some(file), None) => {
            let mut src = connect(from)?;
            driver::save_to_file(&mut src, file, &opts).map_err(|e| failed(e, a.json))?
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
            match r {
                Ok(r) => r,
                Err(e) => return Err(failed(e, a.json)),
            }
        }
        _ => bail!("give --from and --to, --from and --to-file, or --from-file and --to"),
    };
    print_report(&report, a.json)
}
