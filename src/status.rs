//! `vfud status`: ask a serving device, over its control socket, how it is doing.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vfud_server::handover::{self as ho, kind, ControlCommand};

/// Arguments of `vfud status`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vfud status --control /run/vfud/uart.ctl\n  (for a device served with `vfud serve ... --control /run/vfud/uart.ctl`)"
)]
pub struct StatusArgs {
    /// The device's control socket (`vfud serve --control`).
    #[arg(long)]
    pub control: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Send `Status` on the control socket at `path` and return the device's report.
pub fn query(path: &Path, timeout: Duration) -> Result<Value> {
    let s = UnixStream::connect(path)
        .with_context(|| format!("connecting to control socket {}", path.display()))?;
    ho::send_json(s.as_fd(), kind::COMMAND, &ControlCommand::Status)?;
    let mut r = vfud_protocol::FrameReader::new();
    let f = ho::recv(&s, &mut r, timeout).context("waiting for the status report")?;
    let v: Value = serde_json::from_slice(&f.payload).context("status report is not JSON")?;
    if v["event"] != "status" {
        bail!("unexpected answer: {v}");
    }
    Ok(v)
}

/// Print the report.
pub fn run(a: &StatusArgs) -> Result<()> {
    let v = query(&a.control, Duration::from_secs(5))?;
    if a.json {
        println!("{v}");
        return Ok(());
    }
    let n = &v["negotiated"];
    println!("device      {}", v["model"].as_str().unwrap_or("?"));
    println!("uptime      {:.1} s", v["uptime_s"].as_f64().unwrap_or(0.0));
    println!(
        "client      {} ({} accepted so far)",
        if v["client_connected"] == true {
            "connected"
        } else {
            "none"
        },
        v["clients_accepted"]
    );
    if n.is_object() {
        println!(
            "negotiated  max_msg_fds={} max_data_xfer_size={} max_dma_maps={} pgsizes={:#x} write_multiple={}",
            n["max_msg_fds"],
            n["max_data_xfer_size"],
            n["max_dma_maps"],
            n["pgsizes"].as_u64().unwrap_or(0),
            n["write_multiple"]
        );
    } else {
        println!("negotiated  - (no VERSION yet)");
    }
    println!(
        "migration   {}",
        v["migration_state"].as_str().unwrap_or("?")
    );
    println!(
        "dma         {} maps, {} bytes mapped ({} fd-backed){}",
        v["dma_maps"],
        v["dma_bytes_mapped"],
        v["dma_maps_fd_backed"],
        if v["dma_logging"] == true {
            ", dirty logging on"
        } else {
            ""
        }
    );
    println!("interrupts  {}", v["irq_mode"].as_str().unwrap_or("?"));
    println!(
        "messages    {} served, {} errors",
        v["messages_total"], v["errors_total"]
    );
    if let Some(m) = v["messages"].as_object() {
        for (cmd, c) in m {
            println!("  {cmd:<26} {:>10} {:>6} errors", c["served"], c["errors"]);
        }
    }
    Ok(())
}
