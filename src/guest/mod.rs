//! `vfud guest`: the driver-prototyping loop in one command.
//!
//! It starts the given device models in a `vfud serve` child process (one socket each, in a
//! scratch directory), builds the kernel module from a source directory against the guest
//! kit's kernel headers (or takes prebuilt `.ko` files), packs an initramfs whose script loads
//! the modules and runs the user's test script, boots the guest kit's Debian kernel in QEMU 11.1
//! (TCG, q35) with every device attached as `vfio-user-pci`, streams the serial console to
//! stdout and exits with the test script's status. With `--keep` the guest stays up with a
//! shell on the console afterwards.
//!
//! The heavy lifting is shared with the test harness through the repository's scripts
//! (`scripts/provision.sh`, `build-module.sh`, `make-initramfs.sh`, `qemu.sh`), so the command
//! needs the vfud source tree: the one it was built from, or `$VFUD_REPO`.

mod kit;
mod vm;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

pub use vm::Ram;

/// How long a guest may run without `--timeout` (and without `--keep`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Arguments of `vfud guest`.
#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// Device model to attach, `NAME[,key=value...]` as for `vfud serve`; repeatable.
    #[arg(long = "device", required = true)]
    pub devices: Vec<String>,
    /// Kernel module source directory (Kbuild/Makefile), built against the guest kernel's
    /// Debian headers (installed with apt-get on first use) and loaded before the script.
    #[arg(long)]
    pub module_src: Option<PathBuf>,
    /// Prebuilt kernel module to load before the script; repeatable.
    #[arg(long = "module")]
    pub modules: Vec<PathBuf>,
    /// Test script run by busybox sh in the guest; its exit status is this command's.
    #[arg(long)]
    pub script: Option<PathBuf>,
    /// Extra file or directory copied to /extra in the guest; repeatable.
    #[arg(long = "file")]
    pub files: Vec<PathBuf>,
    /// Guest RAM: `memfd` (shared, so DMA uses fds) or `plain` (DMA through vfio-user messages).
    #[arg(long, value_enum, default_value_t = Ram::Memfd)]
    pub ram: Ram,
    /// Guest RAM size in MiB.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u32,
    /// Extra kernel command-line arguments.
    #[arg(long)]
    pub append: Option<String>,
    /// Extra QEMU argument (e.g. `--qemu-arg=-smp --qemu-arg=2`); repeatable.
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// After the script, keep the guest running with a shell on the console (Ctrl-A X quits).
    #[arg(long)]
    pub keep: bool,
    /// Kill the guest if it has not finished after this many seconds (default 600; none
    /// with --keep unless given).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Directory for the device sockets (default: a scratch directory removed at exit).
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Handover control socket of the device (`vfud serve --control`); one --device only.
    #[arg(long)]
    pub control: Option<PathBuf>,
}

/// Run `vfud guest`. Returns when the guest has powered off; exits the process with the
/// script's status when that is not 0 (after every child is gone).
pub fn run(args: &GuestArgs) -> Result<()> {
    let status = run_guest(args)?;
    if status != 0 {
        std::process::exit(status);
    }
    Ok(())
}

fn run_guest(args: &GuestArgs) -> Result<i32> {
    if args.control.is_some() && args.devices.len() != 1 {
        bail!("--control takes exactly one --device");
    }
    let kit = kit::Kit::locate()?;
    for p in args.modules.iter().chain(&args.files).chain(&args.script) {
        if !p.exists() {
            bail!("{}: no such file", p.display());
        }
    }
    kit.provision()?;
    let work = tempfile::Builder::new().prefix("vfud-guest-").tempdir()?;
    let work_dir = std::fs::canonicalize(work.path())?;

    let mut modules = args.modules.clone();
    if let Some(src) = &args.module_src {
        modules.extend(kit.build_module(src, &work_dir.join("modules"))?);
    }
    let socket_dir = match &args.socket_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            std::fs::canonicalize(d)?
        }
        None => work_dir.clone(),
    };
    let servers = vm::Servers::start(&args.devices, &socket_dir, args.control.as_deref())?;

    let initrd = work_dir.join("initramfs.cpio.gz");
    kit.make_initramfs(
        &initrd,
        &kit::InitramfsSpec {
            modules: &modules,
            script: args.script.as_deref(),
            files: &args.files,
            keep: args.keep,
        },
    )?;
    let timeout = match (args.timeout, args.keep) {
        (Some(s), _) => Some(Duration::from_secs(s)),
        (None, false) => Some(DEFAULT_TIMEOUT),
        (None, true) => None,
    };
    let status = vm::boot(&vm::BootSpec {
        kit: &kit,
        work_dir: &work_dir,
        initrd: &initrd,
        sockets: &servers.sockets,
        ram: args.ram,
        mem_mib: args.mem_mib,
        append: args.append.as_deref(),
        extra: &args.qemu_args,
        keep: args.keep,
        timeout,
    });
    drop(servers);
    status
}
