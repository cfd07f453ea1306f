//! `vfud`: a vfio-user device server. CLI parsing and wiring only.

mod migrate_cmd;
mod probe;
mod qemu_guard;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
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
    /// List the device models this build provides.
    Devices,
    /// Live-migrate a QEMU VM to another QEMU over QMP, refusing when QEMU's vfio-user client
    /// cannot migrate device state (QEMU 11.1 would silently drop it).
    QemuMigrate(qemu_guard::QemuMigrateArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Device model to serve, `NAME[,key=value...]` (e.g. `uart16550,backend=socket:/tmp/u.sock`);
    /// repeat with --socket for several devices.
    #[arg(long = "device", required = true)]
    devices: Vec<String>,
    /// Socket path for the device at the same position.
    #[arg(long = "socket", required = true)]
    sockets: Vec<PathBuf>,
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
    if args.devices.len() != args.sockets.len() {
        bail!(
            "{} --device but {} --socket: give one socket per device",
            args.devices.len(),
            args.sockets.len()
        );
    }
    let shutdown = ShutdownHandle::new();
    install_signal_thread(shutdown.clone())?;
    let mut threads = Vec::new();
    for (name, path) in args.devices.iter().zip(&args.sockets) {
        let device = vfud_devices::create(name).map_err(anyhow::Error::msg)?;
        let mut opts = ServeOptions::new(path);
        opts.socket_mode = args.socket_mode;
        let listener = vfud_server::event_loop::bind_socket(&opts.socket_path, opts.socket_mode)
            .with_context(|| format!("binding {}", path.display()))?;
        let shutdown = shutdown.clone();
        let name = name.clone();
        let path = path.clone();
        threads.push(
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let r = vfud_server::event_loop::serve_listener(
                        device,
                        listener,
                        &opts.settings,
                        &shutdown,
                    );
                    let _ = std::fs::remove_file(&path);
                    r.with_context(|| format!("device {name} on {}", path.display()))
                })?,
        );
        tracing::info!(device = %args.devices[threads.len() - 1], socket = %args.sockets[threads.len() - 1].display(), "listening");
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
        Cmd::QemuMigrate(a) => qemu_guard::run(&a),
        Cmd::Migrate(a) => migrate_cmd::run(&a),
        Cmd::Devices => {
            for d in vfud_devices::DEVICE_NAMES {
                println!("{d}");
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
