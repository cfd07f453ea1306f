//! A migration driver that follows QEMU's VFIO migration choreography for kernel devices
//! (`hw/vfio/migration.c`, `hw/vfio/pci.c`), so vfud's server half is exercised exactly as a
//! VFIO-capable VMM would exercise it:
//!
//! 1. setup: destination RUNNING→RESUMING; source RUNNING→PRE_COPY when supported, with dirty
//!    logging of guest RAM started and RAM copied;
//! 2. iterate: read source data until a short read, write it to the destination, copy RAM
//!    pages dirtied meanwhile, repeat until the data left is small or the round limit is hit;
//! 3. stop (the VM's vCPUs pause): the VMM's view of config space is captured (see
//!    [`vm::ConfigView`]) — only now, so the destination gets the values the guest last
//!    wrote — then source →STOP_COPY, read until the empty read, final RAM sync;
//! 4. non-iterable state: PCI config (the view captured at the stop) and interrupt setup
//!    restored on the destination while it is RESUMING, with SET_IRQS sent before RUNNING
//!    (vfud validates them at once and applies them at RUNNING). Without config-before-data
//!    the device data was written as it was read and config follows it; with it, the driver
//!    holds the device data (pre-copy rounds included) until the stop, then writes config
//!    first and the data after — the price is that all of it crosses inside the downtime;
//! 5. destination →RUNNING, source →STOP.
//!
//! Any failure returns the source to RUNNING with its state and resets the destination; when
//! the source cannot be returned to RUNNING the error says so
//! ([`MigrateError::SourceNotRestored`]).
//!
//! Foreign servers (libvfio-user's, for one) are driven the same way: a server that rejects
//! vfud's DEVICE_FEATUREs 0x4001/0x4002 is taken to have no ordering requirement and no
//! pre-copy estimate (the [`Report`] says so), padded MIG_DATA_READ replies are accepted, and
//! no region is touched on a source in STOP_COPY.
//! The driver reaches the device through v2 (DEVICE_FEATURE + MIG_DATA) or, when that is
//! absent, the v1 migration region — see [`channel`].

pub mod channel;
pub mod vm;

use std::time::{Duration, Instant};

use serde::Serialize;
use vfud_protocol::messages::feature::vfud;
use vfud_protocol::messages::MigState;
use vfud_protocol::ProtocolError;

pub use channel::{Channel, ChannelKind};
pub use vm::{Endpoint, GuestRam, IrqSetup};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The device offers neither v2 migration nor the v1 region.
    #[error("device does not support migration")]
    NotMigratable,
    /// A protocol exchange failed.
    #[error("{step}")]
    Protocol {
        /// What the driver was doing.
        step: &'static str,
        /// The failure.
        #[source]
        source: ProtocolError,
    },
    /// Guest RAM copy failed.
    #[error("guest RAM: {0}")]
    Ram(#[from] std::io::Error),
    /// Source and destination RAM layouts differ.
    #[error("source and destination guest RAM differ in layout")]
    RamMismatch,
    /// The migration failed, and returning the source device to RUNNING failed too: the device
    /// may be stopped, in ERROR, or gone. Its state is not known to be intact.
    #[error("{cause}; the source device could NOT be returned to RUNNING ({rollback})")]
    SourceNotRestored {
        /// Why the migration failed.
        #[source]
        cause: Box<MigrateError>,
        /// Why the rollback failed.
        rollback: String,
    },
}

impl MigrateError {
    /// False only when the source could not be returned to RUNNING after the failure.
    pub fn source_restored(&self) -> bool {
        !matches!(self, MigrateError::SourceNotRestored { .. })
    }
}

/// Attach a step name to protocol errors.
pub(crate) trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, MigrateError>;
}

impl<T> Step<T> for Result<T, ProtocolError> {
    fn step(self, step: &'static str) -> Result<T, MigrateError> {
        self.map_err(|source| MigrateError::Protocol { step, source })
    }
}

/// Tuning knobs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Most pre-copy rounds before stopping the VM.
    pub max_rounds: u32,
    /// Stop iterating once the device reports at most this much data left (and no initial data).
    pub stop_threshold: u64,
    /// Bytes per MIG_DATA_READ.
    pub chunk: u32,
    /// Force the v1 region even when v2 is available.
    pub force_v1: bool,
    /// Fault injection for tests: flip one bit of the device stream at this byte offset on
    /// its way to the destination. The destination must refuse it.
    pub corrupt_stream_at: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_rounds: 8,
            stop_threshold: 64 * 1024,
            chunk: 1 << 20,
            force_v1: false,
            corrupt_stream_at: None,
        }
    }
}

/// Progress as reported during the migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    /// Current phase ("setup", "precopy", "stop-copy", "restore", "done").
    pub phase: &'static str,
    /// Pre-copy round.
    pub round: u32,
    /// Device data moved so far.
    pub device_bytes: u64,
    /// Guest RAM bytes copied so far.
    pub ram_bytes: u64,
    /// Device data the source still reports (pre-copy).
    pub remaining: u64,
}

/// What happened.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// v2 or v1.
    pub channel: String,
    /// Whether config space went before the device data.
    pub config_before_data: bool,
    /// Pre-copy rounds run.
    pub rounds: u32,
    /// Device data bytes moved.
    pub device_bytes: u64,
    /// Device data bytes moved while the VM was stopped.
    pub stop_copy_bytes: u64,
    /// Guest RAM bytes copied.
    pub ram_bytes: u64,
    /// Whole migration.
    pub total_ms: f64,
    /// From stopping the source to the destination running.
    pub downtime_ms: f64,
    /// Whether the source answered vfud's ordering feature (0x4002, or the v1 region's
    /// capability). A foreign server that rejects it is treated as having no ordering
    /// requirement.
    pub ordering_advertised: bool,
    /// Whether the source answered vfud's pre-copy estimate (0x4001) in every round. Without
    /// it pre-copy stops after one round.
    pub precopy_info: bool,
    /// Whether the source padded its MIG_DATA_READ replies (libvfio-user does); the padding
    /// was ignored.
    pub padded_mig_data: bool,
}

/// Callbacks into the VM that owns the device: keep it busy during pre-copy, pause its vCPUs
/// for stop-copy, and resume it (on the destination or, after a failure, on the source).
pub trait VmHooks {
    /// Called between pre-copy rounds while the VM runs on the source.
    fn tick(&mut self, _src: &mut Endpoint) {}
    /// The VM's vCPUs stop.
    fn stop(&mut self, _src: &mut Endpoint) {}
    /// The VM resumes; `on_destination` is false after a failed migration whose source device
    /// was returned to RUNNING. Not called when that failed
    /// ([`MigrateError::SourceNotRestored`]): whether to resume a VM whose device is not
    /// running is the caller's decision.
    fn resume(&mut self, _on_destination: bool) {}
    /// Progress update.
    fn progress(&mut self, _p: &Progress) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl VmHooks for NoHooks {}

/// Migrate the device of `src` to `dst` (both already connected and negotiated, with their
/// guest RAM mapped). On failure the source runs again with its state and the destination is
/// reset.
pub fn migrate(
    src: &mut Endpoint,
    dst: &mut Endpoint,
    opts: &Options,
    hooks: &mut dyn VmHooks,
) -> Result<Report, MigrateError> {
    let start = Instant::now();
    let mut report = Report::default();
    let result = run(src, dst, opts, hooks, &mut report, start);
    match result {
        Ok(()) => {
            report.total_ms = ms(start.elapsed());
            hooks.resume(true);
            Ok(report)
        }
        Err(e) => {
            tracing::warn!("migration failed: {e}; returning the source to RUNNING");
            let rollback = Channel::open(&mut src.client, opts.force_v1)
                .map_err(|e| match e {
                    MigrateError::Protocol { source, .. } => source,
                    other => ProtocolError::UnexpectedReply(other.to_string()),
                })
                .and_then(|ch| ch.set_state(&mut src.client, MigState::Running));
            // Best effort: logging may never have started, and a destination that died needs
            // no reset.
            let _ = src.client.dma_logging_stop();
            let _ = dst.client.device_reset();
            match rollback {
                Ok(()) => {
                    hooks.resume(false);
                    Err(e)
                }
                Err(rollback) => {
                    tracing::error!(
                        "the source device could not be returned to RUNNING: {rollback}"
                    );
                    Err(MigrateError::SourceNotRestored {
                        cause: Box::new(e),
                        rollback: rollback.to_string(),
                    })
                }
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(
    src: &mut Endpoint,
    dst: &mut Endpoint,
    opts: &Options,
    hooks: &mut dyn VmHooks,
    report: &mut Report,
    start: Instant,
) -> Result<(), MigrateError> {
    let ch = Channel::open(&mut src.client, opts.force_v1)?;
    let dch = Channel::open(&mut dst.client, opts.force_v1)?;
    report.channel = format!("{:?}", ch.kind).to_lowercase();
    let ordering = ch.ordering(&mut src.client);
    let config_first = ordering & vfud::ORDERING_CONFIG_BEFORE_DATA != 0;
    report.config_before_data = config_first;
    report.ordering_advertised = ch.ordering_advertised();
    if !report.ordering_advertised {
        tracing::info!("source did not answer vfud's ordering feature: no ordering requirement");
    }
    // One MIG_DATA_READ may carry no more than either side accepts.
    let chunk = {
        let n = src.client.negotiated();
        let limit = n.max_data_xfer_size.min(n.client_max_data_xfer_size);
        u32::try_from(limit)
            .unwrap_or(u32::MAX)
            .min(opts.chunk)
            .max(1)
    };
    let mut p = Progress {
        phase: "setup",
        ..Progress::default()
    };
    let mut fault = Fault {
        at: opts.corrupt_stream_at,
        offset: 0,
    };
    hooks.progress(&p);

    // Setup (QEMU's load_setup / save_setup).
    dch.set_state(&mut dst.client, MigState::Resuming)
        .step("destination to RESUMING")?;
    // A config-before-data device gets its config (final only at the stop) before any of its
    // data: hold the data until then.
    let mut held: Option<Vec<Vec<u8>>> = config_first.then(Vec::new);
    let ram = vm::RamSync::start(src, dst)?;
    p.ram_bytes = ram.copied;
    // `max_rounds: 0` asks for plain stop-and-copy.
    let precopy = ch.supports_precopy(&mut src.client) && opts.max_rounds > 0;
    if precopy {
        ch.set_state(&mut src.client, MigState::PreCopy)
            .step("source to PRE_COPY")?;
        p.phase = "precopy";
        report.precopy_info = true;
        loop {
            hooks.tick(src);
            let n = pump(&ch, &dch, src, dst, chunk, &mut fault, held.as_mut())?;
            p.device_bytes += n;
            p.ram_bytes += ram.sync(src, dst)?;
            p.round += 1;
            let info = if report.precopy_info {
                ch.precopy_info(&mut src.client)
            } else {
                None
            };
            if info.is_none() && report.precopy_info {
                report.precopy_info = false;
                tracing::info!("source gives no pre-copy estimate (0x4001): one round only");
            }
            let (initial, dirty) = info.unwrap_or((0, 0));
            p.remaining = initial + dirty;
            hooks.progress(&p);
            if (initial == 0 && dirty <= opts.stop_threshold) || p.round >= opts.max_rounds {
                break;
            }
        }
    }
    // Stop-copy: the VM stops. Its vCPUs can no longer touch config space, so the VMM's view
    // is final: capture it now, while every server still serves region access (libvfio-user
    // refuses it in STOP_COPY). Nothing below touches a source region.
    hooks.stop(src);
    let stopped = Instant::now();
    p.phase = "stop-copy";
    let config = vm::ConfigView::capture(&mut src.client).step("capture config")?;
    src.config = Some(config.clone());
    ch.set_state(&mut src.client, MigState::StopCopy)
        .step("source to STOP_COPY")?;
    let stop_bytes = drain(&ch, &dch, src, dst, chunk, &mut fault, held.as_mut())?;
    p.device_bytes += stop_bytes;
    p.ram_bytes += ram.sync(src, dst)?;
    ram.stop(src);
    // Non-iterable state: config (unless sent first) and interrupts, while RESUMING.
    p.phase = "restore";
    hooks.progress(&p);
    config.restore(&mut dst.client).step("restore config")?;
    dst.config = Some(config);
    for data in held.take().unwrap_or_default() {
        dch.write(&mut dst.client, &data)
            .step("write migration data after config")?;
    }
    report.padded_mig_data = src.client.saw_padded_mig_data();
    dst.irqs = src.irqs.try_clone().map_err(MigrateError::Ram)?;
    dst.irqs.replay(&mut dst.client).step("replay SET_IRQS")?;
    dch.set_state(&mut dst.client, MigState::Running)
        .step("destination to RUNNING")?;
    report.downtime_ms = ms(stopped.elapsed());
    ch.set_state(&mut src.client, MigState::Stop)
        .step("source to STOP")?;
    p.phase = "done";
    hooks.progress(&p);
    report.rounds = p.round;
    report.device_bytes = p.device_bytes;
    report.stop_copy_bytes = stop_bytes;
    report.ram_bytes = p.ram_bytes;
    report.total_ms = ms(start.elapsed());
    Ok(())
}

/// Where the stream is, and the bit to flip (fault injection).
struct Fault {
    at: Option<u64>,
    offset: u64,
}

/// Move the rest of a stop-copy stream from source to destination (the source in
/// STOP_COPY, the destination in RESUMING); the bytes moved.
pub fn copy_stream(
    ch: &Channel,
    dch: &Channel,
    src: &mut Endpoint,
    dst: &mut Endpoint,
    chunk: u32,
) -> Result<u64, MigrateError> {
    let mut no_fault = Fault {
        at: None,
        offset: 0,
    };
    drain(ch, dch, src, dst, chunk, &mut no_fault, None)
}

/// [`pump`] until the source's stream is empty (stop-copy: a short read is not the end).
fn drain(
    ch: &Channel,
    dch: &Channel,
    src: &mut Endpoint,
    dst: &mut Endpoint,
    chunk: u32,
    fault: &mut Fault,
    mut held: Option<&mut Vec<Vec<u8>>>,
) -> Result<u64, MigrateError> {
    let mut total = 0;
    loop {
        let n = pump(ch, dch, src, dst, chunk, fault, held.as_deref_mut())?;
        if n == 0 {
            return Ok(total);
        }
        total += n;
    }
}

/// Move device data from source to destination until the source has nothing more for now.
fn pump(
    ch: &Channel,
    dch: &Channel,
    src: &mut Endpoint,
    dst: &mut Endpoint,
    chunk: u32,
    fault: &mut Fault,
    mut held: Option<&mut Vec<Vec<u8>>>,
) -> Result<u64, MigrateError> {
    let mut total = 0u64;
    loop {
        let mut data = ch
            .read_piece(&mut src.client, chunk)
            .step("read migration data")?;
        let n = data.len();
        if let Some(at) = fault
            .at
            .filter(|at| (fault.offset..fault.offset + n as u64).contains(at))
        {
            data[(at - fault.offset) as usize] ^= 0x10;
            fault.at = None;
        }
        fault.offset += n as u64;
        let written = match held.as_deref_mut() {
            _ if n == 0 => Ok(()),
            Some(h) => {
                h.push(data.to_vec());
                Ok(())
            }
            None => dch
                .write(&mut dst.client, &data)
                .step("write migration data"),
        };
        src.client.recycle_mig_data(data);
        written?;
        total += n as u64;
        // Empty: the end (stop-copy) or nothing now; short: nothing more for now (spec
        // "VFIO_USER_MIG_DATA_READ").
        if n == 0 || (n < chunk as usize && ch.kind == ChannelKind::V2) {
            return Ok(total);
        }
    }
}

/// Save the device's state to a file (a snapshot; the source keeps running).
pub fn save_to_file(
    src: &mut Endpoint,
    path: &std::path::Path,
    opts: &Options,
) -> Result<Report, MigrateError> {
    let start = Instant::now();
    let ch = Channel::open(&mut src.client, opts.force_v1)?;
    let mut out = Vec::new();
    let r = (|| {
        ch.set_state(&mut src.client, MigState::StopCopy)
            .step("source to STOP_COPY")?;
        while ch
            .read(&mut src.client, opts.chunk, &mut out)
            .step("read migration data")?
            > 0
        {}
        Ok::<(), MigrateError>(())
    })();
    let back = ch.set_state(&mut src.client, MigState::Running);
    r.map_err(|cause| match &back {
        Err(e) => MigrateError::SourceNotRestored {
            cause: Box::new(cause),
            rollback: e.to_string(),
        },
        Ok(()) => cause,
    })?;
    std::fs::write(path, &out)?;
    back.map_err(|e| MigrateError::SourceNotRestored {
        cause: Box::new(MigrateError::Protocol {
            step: "snapshot written, source back to RUNNING",
            source: e,
        }),
        rollback: "the device stayed stopped after saving its state".into(),
    })?;
    Ok(Report {
        channel: format!("{:?}", ch.kind).to_lowercase(),
        device_bytes: out.len() as u64,
        stop_copy_bytes: out.len() as u64,
        total_ms: ms(start.elapsed()),
        downtime_ms: ms(start.elapsed()),
        ..Report::default()
    })
}

/// Restore a device from a file written by [`save_to_file`]; the device then runs.
pub fn restore_from_file(
    dst: &mut Endpoint,
    path: &std::path::Path,
    opts: &Options,
) -> Result<Report, MigrateError> {
    let start = Instant::now();
    let data = std::fs::read(path)?;
    let ch = Channel::open(&mut dst.client, opts.force_v1)?;
    let r = (|| {
        ch.set_state(&mut dst.client, MigState::Resuming)
            .step("destination to RESUMING")?;
        for c in data.chunks(opts.chunk as usize) {
            ch.write(&mut dst.client, c).step("write migration data")?;
        }
        ch.set_state(&mut dst.client, MigState::Running)
            .step("destination to RUNNING")
    })();
    if r.is_err() {
        let _ = dst.client.device_reset();
    }
    r?;
    Ok(Report {
        channel: format!("{:?}", ch.kind).to_lowercase(),
        device_bytes: data.len() as u64,
        total_ms: ms(start.elapsed()),
        ..Report::default()
    })
}
