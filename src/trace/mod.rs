//! `vfud trace`: a transparent vfio-user proxy that prints every message decoded.
//!
//! It sits between any vfio-user client (QEMU) and any vfio-user server, accepts clients on
//! `--listen`, opens one connection to `--connect` for each, and forwards every message and
//! every file descriptor unchanged in both directions — server-to-client DMA_READ/DMA_WRITE
//! included — while printing time, direction, id, command, decoded fields, reply errno and
//! reply latency. The answer to "which side is wrong?" without rebuilding either side.

mod decode;
mod output;
mod proxy;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

/// Arguments of `vfud trace`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  vfud trace --listen /tmp/qemu-side.sock --connect /tmp/uart.sock --filter REGION_READ,REGION_WRITE\n  (then point QEMU's vfio-user-pci socket at /tmp/qemu-side.sock)"
)]
pub struct TraceArgs {
    /// Socket the client (QEMU) connects to.
    #[arg(long)]
    pub listen: PathBuf,
    /// Socket of the vfio-user server to forward to.
    #[arg(long)]
    pub connect: PathBuf,
    /// Print one JSON object per message instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print only these commands (names like REGION_READ or GET_REGION_INFO, or numbers),
    /// comma-separated; everything is still forwarded.
    #[arg(long, value_delimiter = ',')]
    pub filter: Vec<String>,
}

/// Listen, and serve every client that connects until the process is stopped.
pub fn run(args: &TraceArgs) -> Result<()> {
    let filter = output::parse_filter(&args.filter).map_err(anyhow::Error::msg)?;
    let listener = vfud_server::event_loop::bind_socket(&args.listen, None)
        .with_context(|| format!("binding {}", args.listen.display()))?;
    tracing::info!(
        listen = %args.listen.display(),
        connect = %args.connect.display(),
        "tracing"
    );
    let printer = Arc::new(output::Printer::new(
        args.json,
        filter,
        Box::new(std::io::stdout()),
    ));
    let mut conn = 0u64;
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("accepting a client"),
        };
        conn += 1;
        let printer = printer.clone();
        let target = args.connect.clone();
        std::thread::Builder::new()
            .name(format!("trace-{conn}"))
            .spawn(move || proxy::handle(client, &target, printer, conn))
            .context("spawning a connection thread")?;
    }
    Ok(())
}
