//! `vfud`: a vfio-user device server. CLI parsing and wiring only.

mod activation;
mod bench;
mod config;
mod docs;
mod guest;
mod migrate_cmd;
mod probe;
mod qemu;
mod status;
mod supervise;
mod trace;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use vfud_server::event_loop::Outcome;
use vfud_server::{ServeOptions, ShutdownHandle};

/// vfio-user device server with live migration.
#[derive(Parser)]
#[command(
    name = "vfud",
    version,
    about,
    long_about = None,
    after_help = "Example:\n  vfud serve --device dma-engine --socket /tmp/dma.sock &\n  vfud probe /tmp/dma.sock"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve emulated devices on vfio-user sockets (one thread per device).
    #[command(
        after_help = "Example:\n  vfud serve --device uart16550,backend=socket:/tmp/u.host --socket /tmp/u.sock --control /tmp/u.ctl\n  vfud serve --config /etc/vfud/vfud.toml"
    )]
    Serve(ServeArgs),
    /// Connect to a vfio-user server as a client and print its device layout, lspci-style.
    #[command(after_help = "Example:\n  vfud probe /tmp/dma.sock")]
    Probe {
        /// Path of the server's UNIX socket.
        socket: PathBuf,
    },
    /// Live-migrate a device between two vfud servers as a QEMU-faithful VFIO VMM would,
    /// or snapshot/restore it to/from a file.
    #[command(
        after_help = "Example:\n  vfud migrate --from /tmp/a.sock --to /tmp/b.sock --ram-mib 64\n  vfud migrate --handover --from /tmp/a.ctl --to /tmp/b.ctl"
    )]
    Migrate(migrate_cmd::MigrateArgs),
    /// Run the performance scenarios and print each against its same-run baseline.
    #[command(after_help = "Example:\n  vfud bench --list\n  vfud bench --json > bench.json")]
    Bench(bench::BenchArgs),
    /// List the device models this build provides.
    #[command(after_help = "Example:\n  vfud devices")]
    Devices,
    /// Live-migrate a QEMU VM to another QEMU over QMP, refusing when QEMU's vfio-user client
    /// cannot migrate device state (QEMU 11.1 would silently drop it).
    #[command(
        after_help = "Example:\n  vfud qemu-migrate --qmp /tmp/src.qmp --to tcp:dst-host:4444 --check"
    )]
    QemuMigrate(qemu::QemuMigrateArgs),
    /// Sit between a vfio-user client and server, forward everything unchanged and print
    /// every message decoded.
    Trace(trace::TraceArgs),
    /// Report a serving device's state and counters over its control socket.
    Status(status::StatusArgs),
    /// Print shell completions for vfud.
    Completions(docs::CompletionsArgs),
    /// Print vfud's manual page (or write one per subcommand with --out-dir).
    Man(docs::ManArgs),
    /// Boot a Linux guest in QEMU with these devices, load a kernel module (built from source
    /// or prebuilt), run a test script in the guest and exit with its status.
    #[command(
        after_help = "Example:\n  vfud guest --device dma-engine --module-src examples/dma-engine-driver --script examples/dma-engine-driver/test.sh"
    )]
    Guest(guest::GuestArgs),
    /// Internal: one supervised device process (started by `serve --supervise`).
    #[command(hide = true)]
    DeviceProcess(supervise::DeviceProcessArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Device model to serve, `NAME[,key=value...]` (e.g. `uart16550,backend=socket:/tmp/u.sock`);
    /// repeat with --socket for several devices.
    #[arg(long = "device", required_unless_present = "config")]
    devices: Vec<String>,
    /// Socket path for the device at the same position.
    #[arg(long = "socket", required_unless_present_any = ["incoming", "config"])]
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
    /// Read devices and settings from a TOML file (the same as these flags; see README).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    supervise: supervise::SuperviseArgs,
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

fn serve(mut args: ServeArgs) -> Result<()> {
    if let Some(path) = args.config.clone() {
        config::apply(&path, &mut args)?;
    }
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
    // Before any thread starts: this reads and clears the LISTEN_* variables.
    let mut passed = activation::Passed::from_env()?;
    let shutdown = ShutdownHandle::new();
    install_signal_thread(shutdown.clone())?;
    if args.supervise.supervise {
        let (ctl, mode) = (args.control.as_deref(), args.socket_mode);
        return supervise::run(
            &args.supervise,
            &args.devices,
            &args.sockets,
            ctl,
            mode,
            &shutdown,
        );
    }
    let mut threads = Vec::new();
    for (i, spec) in args.devices.iter().enumerate() {
        let device = vfud_devices::create(spec).map_err(anyhow::Error::msg)?;
        let path = args.sockets.get(i).cloned();
        let (listener, owns_path) = match &path {
            Some(p) => {
                let a = passed.acquire(p, args.socket_mode)?;
                (Some(a.listener), a.owns_path)
            }
            None => (None, false),
        };
        let control = match control_path {
            Some(p) => Some(
                vfud_server::event_loop::bind_socket(p, args.socket_mode)
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
                    if owns_path && !matches!(r, Ok(Outcome::HandedOver)) {
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
    passed.warn_unclaimed();
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
        Cmd::Trace(a) => trace::run(&a),
        Cmd::Status(a) => status::run(&a),
        Cmd::Completions(a) => docs::completions(&a, Cli::command()),
        Cmd::Man(a) => docs::man(&a, Cli::command()),
        Cmd::DeviceProcess(a) => supervise::device_process(&a),
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
