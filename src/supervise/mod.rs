//! `vfud serve --supervise`: each device runs in a device process of its own under a small
//! supervisor that never reads client input, and a device process that dies (signal, abort,
//! a device model's panic, OOM kill) is replaced under the same client connection.
//!
//! The supervisor ([`device`]) holds the listening socket, the request journal, and the last
//! snapshot the device process sent (session description + fds + device checkpoint; see
//! `vfud_server::supervisor`). It starts a device process (`vfud device-process`, with the
//! link to the supervisor as its stdin) and, after a crash, starts another and hands it the
//! snapshot the way a live handover does. Too many crashes in a window and it stops
//! restarting: [`fallback`] then answers every request on the connection with an error.

mod device;
mod fallback;

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vfud_server::handover::{self as ho, kind, ControlCommand};
use vfud_server::supervisor::Policy;
use vfud_server::{ServerSettings, ShutdownHandle};

pub use device::Status;

/// `serve` options for supervision.
#[derive(clap::Args, Clone, Debug)]
pub struct SuperviseArgs {
    /// Run each device in its own process under a supervisor that restarts it, under the same
    /// client connection, when it dies (see the README, "Reliability").
    #[arg(long, conflicts_with = "incoming")]
    pub supervise: bool,
    /// Device state after a crash: `restore` (the last checkpoint) or `reset` (the last
    /// checkpoint's PCI configuration, DMA maps and interrupt wiring, the device model reset).
    #[arg(long, default_value = "restore", requires = "supervise")]
    pub on_crash: Policy,
    /// Checkpoint interval while the device is active, in ms (also taken before answering
    /// any request that changes the session: VERSION, DMA_MAP/UNMAP, SET_IRQS, config writes).
    #[arg(long, default_value_t = 100, requires = "supervise")]
    pub checkpoint_ms: u64,
    /// Crash-loop limit `N/SECONDS`: after N crashes within SECONDS, stop restarting and
    /// answer every request with an error.
    #[arg(long, default_value = "5/60", requires = "supervise")]
    pub max_restarts: RestartLimit,
    /// A device process that has handled one request for this long (ms) is taken for hung:
    /// it is killed and restarted like one that crashed (0: never). Below QEMU's 5 s
    /// `x-msg-timeout`, so QEMU gets the reply before it gives up on the request.
    #[arg(long, default_value_t = 3000, requires = "supervise")]
    pub hang_timeout: u64,
}

/// At most `count` restarts within `window`.
#[derive(Clone, Copy, Debug)]
pub struct RestartLimit {
    /// Crashes tolerated within the window.
    pub count: usize,
    /// The window.
    pub window: Duration,
}

impl std::str::FromStr for RestartLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not N/SECONDS (e.g. 5/60)");
        let (n, secs) = s.split_once('/').ok_or_else(bad)?;
        Ok(Self {
            count: n.parse().map_err(|_| bad())?,
            window: Duration::from_secs(secs.parse().map_err(|_| bad())?),
        })
    }
}

/// Arguments of the internal `device-process` command.
#[derive(clap::Args, Debug)]
pub struct DeviceProcessArgs {
    /// Device spec, as for `serve --device`.
    #[arg(long)]
    device: String,
    /// The backend comes with the session the supervisor hands over (a restart): build the
    /// device without opening it (see `vfud_devices::create_detached`).
    #[arg(long)]
    adopt_backend: bool,
}

/// The device process: serve one device with the supervisor link on stdin. A panic aborts
/// the process (the supervisor restarts it) rather than unwinding into a half-updated device.
pub fn device_process(a: &DeviceProcessArgs) -> Result<()> {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("device model panicked: {info}; the process aborts for a restart");
        std::process::abort();
    }));
    // A supervisor that dies takes its device processes with it: nobody would restart them,
    // and a client is better off seeing EOF than a server nobody watches.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("parent-death signal")?;
    let device = match a.adopt_backend {
        true => vfud_devices::create_detached(&a.device)?,
        false => vfud_devices::create(&a.device)?,
    };
    let link = UnixStream::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("supervisor link on stdin")?,
    );
    // No signal handling here: the process is in its own process group and the supervisor
    // stops it with SIGTERM when it shuts down itself.
    let shutdown = ShutdownHandle::new();
    vfud_server::supervisor::serve_device_process(
        device,
        link,
        &ServerSettings::default(),
        &shutdown,
    )
    .context("device process")
}

/// Serve `devices` on `sockets` under supervision until `shutdown`.
pub fn run(
    a: &SuperviseArgs,
    devices: &[String],
    sockets: &[PathBuf],
    control: Option<&Path>,
    mode: Option<u32>,
    shutdown: &ShutdownHandle,
) -> Result<()> {
    if control.is_some() && devices.len() != 1 {
        bail!("--control takes exactly one --device");
    }
    let mut threads = Vec::new();
    let mut statuses = Vec::new();
    for (spec, path) in devices.iter().zip(sockets) {
        let mut probe = vfud_devices::create(spec)?;
        if probe.migration().is_none() {
            bail!("{spec}: --supervise needs a device that can save its state (Migratable)");
        }
        drop(probe);
        let listener = vfud_server::event_loop::bind_socket(path, mode)
            .with_context(|| format!("binding {}", path.display()))?;
        let sup = device::Supervisor::new(spec, listener, a)?;
        statuses.push(sup.status());
        let (shutdown, path, spec) = (shutdown.clone(), path.clone(), spec.clone());
        tracing::info!(device = %spec, socket = %path.display(), "listening (supervised)");
        threads.push(
            std::thread::Builder::new()
                .name(spec.clone())
                .spawn(move || {
                    let r = sup.run(&shutdown);
                    let _ = std::fs::remove_file(&path);
                    r.with_context(|| format!("supervising {spec}"))
                })?,
        );
    }
    if let (Some(c), Some(st)) = (control, statuses.first()) {
        let l = vfud_server::event_loop::bind_socket(c, mode)
            .with_context(|| format!("binding control socket {}", c.display()))?;
        let st = st.clone();
        std::thread::Builder::new()
            .name("status".into())
            .spawn(move || serve_status(&l, &st))?;
    }
    let results: Vec<Result<()>> = threads
        .into_iter()
        .map(|t| {
            t.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a supervisor thread panicked")))
        })
        .collect();
    if let Some(c) = control {
        let _ = std::fs::remove_file(c);
    }
    // Every device's error is logged; the first one is the exit status.
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        tracing::error!("{e:#}");
    }
    results.into_iter().find(Result::is_err).unwrap_or(Ok(()))
}

/// The supervisor's control socket: `status` reports the supervision state (device
/// process id, restarts, the last crash and what it lost).
fn serve_status(l: &UnixListener, st: &Arc<Mutex<Status>>) {
    for s in l.incoming().flatten() {
        let mut r = vfud_protocol::FrameReader::new();
        let Ok(f) = ho::recv(&s, &mut r, Duration::from_secs(5)) else {
            continue;
        };
        let ev = match serde_json::from_slice::<ControlCommand>(&f.payload) {
            Ok(ControlCommand::Status) => {
                let st = st.lock().map(|g| g.clone()).unwrap_or_default();
                serde_json::json!({"event": "status", "supervised": st})
            }
            Ok(_) => serde_json::json!({"event": "error",
                "message": "handover is not available under --supervise"}),
            Err(e) => serde_json::json!({"event": "error", "message": e.to_string()}),
        };
        let _ = ho::send_json(s.as_fd(), kind::EVENT, &ev);
    }
}
