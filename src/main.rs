//! `vfud`: a vfio-user device server. CLI parsing and wiring only.

mod bench;
mod guest;
mod migrate_cmd;
mod probe;
mod qemu;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vfud_server::event_loop::Outcome;
use vfud_server::{ServeOptions, ShutdownHandle};

/// vfio-user device server with live migration.
#[derive(Parser)]
#[command(name = "vfud", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve emulated devices on vfio-user sockets (one thread per device).
    Serve(ServeArgs),
    /// Connect to a vfio-user server as a client and print its device layout, lspci-style.
    Probe {
        /// Path of the server's UNIX socket.
        socket: PathBuf,
    },
    /// Live-migrate a device between two vfud servers as a QEMU-faithful VFIO VMM would,
    /// or snapshot/restore it to/from a file.
    Migrate(migrate_cmd::MigrateArgs),
    /// Run the performance scenarios and print each against its same-run baseline.
    Bench(bench::BenchArgs),
    /// List the device models this build provides.
    Devices,
    /// Live-migrate a QEMU VM to another QEMU over QMP, refusing when QEMU's vfio-user client
    /// cannot migrate device state (QEMU 11.1 would silently drop it).
    QemuMigrate(qemu::QemuMigrateArgs),
    /// Boot a Linux guest in QEMU with these devices, load a kernel module (built from source
    /// or prebuilt), run a test script in the guest and exit with its status.
    Guest(guest::GuestArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Device model to serve, `NAME[,key=value...]` (e.g. `uart16550,backend=socket:/tmp/u.sock`);
    /// repeat with --socket for several devices.
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Socket path for the device at the same position.
    #[arg(long = "socket", required_unless_present = "incoming")]
    sockets: Vec<PathBuf>,
    /// Control socket for live handover (`vfud migrate --handover --from THIS`); one device.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Start without a client socket and wait on this control socket for a device handed
    /// over by another vfud process (`vfud migrate --handover --to THIS`); one device.
    #[arg(long, conflicts_with = "sockets")]
    incoming: Option<PathBuf>,
    /// Octal permissions for the socket files (e.g. 660).
    #[arg(long, value_parser = parse_octal)]
    socket_mode: Option<u32>,
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("not an octal mode: {e}"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Block SIGINT/SIGTERM in every thread and stop all loops when one arrives.
fn install_signal_thread(shutdown: ShutdownHandle) -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!(?sig, "signal received, shutting down");
            }
            shutdown.trigger();
        })
        .context("spawning the signal thread")?;
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    let control_path = args.control.as_ref().or(args.incoming.as_ref());
    if control_path.is_some() && args.devices.len() != 1 {
        bail!("--control and --incoming take exactly one --device");
    }
    if args.incoming.is_none() && args.devices.len() != args.sockets.len() {
        bail!(
            "{} --device but {} --socket: give one socket per device",
            args.devices.len(),
            args.sockets.len()
        );
    }
    let shutdown = ShutdownHandle::new();
    install_signal_thread(shutdown.clone())?;
    let mut threads = Vec::new();
    for (i, spec) in args.devices.iter().enumerate() {
        let device = vfud_devices::create(spec).map_err(anyhow::Error::msg)?;
        let path = args.sockets.get(i).cloned();
        let listener = match &path {
            Some(p) => Some(
                vfud_server::event_loop::bind_socket(p, args.socket_mode)
                    .with_context(|| format!("binding {}", p.display()))?,
            ),
            None => None,
        };
        let control = match control_path {
            Some(p) => Some(
                vfud_server::event_loop::bind_socket(p, Some(0o600))
                    .with_context(|| format!("binding control socket {}", p.display()))?,
            ),
            None => None,
        };
        let settings = ServeOptions::new(path.clone().unwrap_or_default()).settings;
        let shutdown = shutdown.clone();
        let name = spec.clone();
        let ctl = control_path.cloned();
        match &path {
            Some(p) => tracing::info!(device = %spec, socket = %p.display(), "listening"),
            None => tracing::info!(device = %spec, "waiting for a handover"),
        }
        threads.push(
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let r = vfud_server::event_loop::serve_listener(
                        device, listener, control, &settings, &shutdown,
                    );
                    // After a handover the new process serves these paths: leave them.
                    if !matches!(r, Ok(Outcome::HandedOver)) {
                        if let Some(p) = &path {
                            let _ = std::fs::remove_file(p);
                        }
                    }
                    if let Some(c) = &ctl {
                        let _ = std::fs::remove_file(c);
                    }
                    r.map(|_| ()).with_context(|| format!("device {name}"))
                })?,
        );
    }
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("{e:#}");
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a device thread panicked"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Serve(a) => serve(a),
        Cmd::Probe { socket } => probe::run(&socket),
        Cmd::QemuMigrate(a) => qemu::run(&a),
        Cmd::Migrate(a) => migrate_cmd::run(&a),
        Cmd::Bench(a) => bench::run(&a),
        Cmd::Guest(a) => guest::run(&a),
        Cmd::Devices => {
            for m in vfud_devices::MODELS {
                println!("{:<12} {}", m.name, m.help);
                for (k, help) in m.options {
                    println!("{:<12}   {k}=…  {help}", "");
                }
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfud: {e:#}");
            ExitCode::FAILURE
        }
    }
}
