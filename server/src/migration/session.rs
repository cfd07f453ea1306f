//! [`MigrationSession`]: the migration state of one device — the FSM walk, the stream being
//! saved or restored, SET_IRQS deferred while resuming, and device events missed while
//! stopped — and what each arc does to the device.
//!
//! # Ordering (vfud's reason to exist)
//! On the destination, restoring config space makes the client send SET_IRQS for MSI/MSI-X;
//! that must not take effect before the VM's interrupt controller is restored. So while
//! resuming, SET_IRQS is validated at once and queued ([`MigrationSession::set_irqs`]); the
//! queue is applied as one step at STOP→RUNNING, or the transition fails and nothing is
//! applied. A device that declares config-before-data gets the restored config in its load
//! step; if the client restored config only after the device data, that load is refused.

use vfud_protocol::messages::feature::vfud;
use vfud_protocol::messages::{MigState, SetIrqs};

use super::fsm::{self, permits};
use super::stream::{FinalState, Loader, Saver, Shape, StreamHeader};
use super::v1::V1Region;
use crate::device::{Device, Migratable};
use crate::dma::DmaTable;
use crate::error::{MigrationError, RequestError};
use crate::irq::Interrupts;
use crate::mmap::MemoryPart;
use crate::pci::PciFunction;

/// The parts of a device server a migration step touches.
pub struct Parts<'a> {
    /// The device model.
    pub device: &'a mut dyn Device,
    /// Config space, BAR memory, MSI-X and interrupts.
    pub function: &'a mut PciFunction,
    /// The DMA table (dirty logging).
    pub dma: &'a mut DmaTable,
    /// Set to ask for the device's deferred work.
    pub work: &'a mut bool,
}

impl Parts<'_> {
    fn migratable(&mut self) -> Result<&mut dyn Migratable, MigrationError> {
        self.device.migration().ok_or(MigrationError::Unsupported)
    }
}

/// Where the client's config writes during RESUMING fell relative to the device data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ClientConfig {
    /// The client did not write config: the stream's image is the restored config.
    #[default]
    Untouched,
    /// Written before any migration data arrived.
    BeforeData,
    /// Written after migration data arrived.
    AfterData,
}

/// Migration state of one device.
#[derive(Debug)]
pub struct MigrationSession {
    state: MigState,
    model: &'static str,
    migratable: bool,
    config_before_data: bool,
    saver: Option<Saver>,
    loader: Option<Loader>,
    /// Destination between RESUMING and RUNNING: SET_IRQS is queued, not applied.
    resuming: bool,
    deferred_irqs: Vec<SetIrqs>,
    data_seen: bool,
    client_config: ClientConfig,
    missed_events: Vec<u32>,
    /// The v1 migration region, when exposed.
    pub v1: Option<V1Region>,
}

impl MigrationSession {
    /// A session in RUNNING for a device of model `model`.
    pub fn new(model: &'static str, migratable: bool, config_before_data: bool, v1: bool) -> Self {
        Self {
            state: MigState::Running,
            model,
            migratable,
            config_before_data,
            saver: None,
            loader: None,
            resuming: false,
            deferred_irqs: Vec::new(),
            data_seen: false,
            client_config: ClientConfig::Untouched,
            missed_events: Vec::new(),
            v1: (v1 && migratable).then(V1Region::default),
        }
    }

    /// Current state.
    pub fn state(&self) -> MigState {
        self.state
    }

    /// Whether the device supports migration.
    pub fn migratable(&self) -> bool {
        self.migratable
    }

    /// Whether the device runs (deferred work, backend events, timers) in this state.
    pub fn device_runs(&self) -> bool {
        permits(self.state).device_runs
    }

    /// Ordering flags (`vfud::ORDERING_*`) of this device.
    pub fn ordering_flags(&self) -> u32 {
        let mut f = vfud::ORDERING_SET_IRQS_DEFERRED;
        if self.config_before_data {
            f |= vfud::ORDERING_CONFIG_BEFORE_DATA;
        }
        f
    }

    /// The saver of an outgoing stream.
    pub fn saver(&self) -> Option<&Saver> {
        self.saver.as_ref()
    }

    /// A restore's BAR `bar` now serves memory adopted from a peer process: forget what the
    /// stream overwrote in the memory served before (see [`Loader::forget_backup`]).
    pub fn forget_memory_backup(&mut self, bar: usize) {
        if let Some(l) = &mut self.loader {
            l.forget_backup(bar);
        }
    }

    /// DEVICE_RESET: back to RUNNING, dropping any migration in progress (device memory an
    /// unfinished restore overwrote is put back first).
    pub fn reset(&mut self, function: &PciFunction) {
        if let Some(l) = &mut self.loader {
            l.rollback(function.bars());
        }
        let v1 = self.v1.is_some();
        *self = Self::new(self.model, self.migratable, self.config_before_data, v1);
    }

    /// The client went away: what it queued (deferred SET_IRQS and their eventfds) belongs
    /// to its connection and goes with it.
    pub fn client_gone(&mut self) {
        self.deferred_irqs.clear();
    }

    /// A config write arrived; remember where it fell while resuming.
    pub fn note_config_write(&mut self) {
        if self.state == MigState::Resuming {
            self.client_config = match (self.client_config, self.data_seen) {
                (ClientConfig::AfterData, _) | (_, true) => ClientConfig::AfterData,
                _ => ClientConfig::BeforeData,
            };
        }
    }

    /// A device event fired while the device is stopped: replay it at RUNNING.
    pub fn miss_event(&mut self, token: u32) {
        if !self.missed_events.contains(&token) {
            self.missed_events.push(token);
        }
    }

    /// SET_IRQS: applied now, or — while resuming — validated now and applied at RUNNING.
    pub fn set_irqs(&mut self, s: SetIrqs, irqs: &mut Interrupts) -> Result<(), RequestError> {
        if self.resuming {
            irqs.validate(&s)?;
            self.deferred_irqs.push(s);
        } else {
            Interrupts::check_apply(&s)?;
            irqs.apply(s)?;
        }
        Ok(())
    }

    /// Walk from the current state to `target`, one direct arc at a time; a failing hop
    /// leaves the state at the last completed hop.
    pub fn set_state(
        &mut self,
        target: MigState,
        parts: &mut Parts<'_>,
    ) -> Result<(), RequestError> {
        if !self.migratable {
            return Err(MigrationError::Unsupported.into());
        }
        let from = self.state;
        let hops = fsm::path(from, target).ok_or(MigrationError::NoPath { from, to: target })?;
        for hop in hops {
            let cur = self.state;
            if let Err(e) = self.hop(cur, hop, parts) {
                let why = crate::error::chain(&e);
                tracing::warn!(
                    device = self.model,
                    ?cur,
                    ?hop,
                    "migration hop failed: {why}"
                );
                return Err(e);
            }
            tracing::debug!(device = self.model, ?cur, ?hop, "migration hop");
            self.state = hop;
        }
        Ok(())
    }

    fn hop(
        &mut self,
        from: MigState,
        to: MigState,
        parts: &mut Parts<'_>,
    ) -> Result<(), RequestError> {
        use MigState::*;
        match (from, to) {
            (Running, PreCopy) | (Stop, StopCopy) => {
                let header = StreamHeader {
                    ordering: self.ordering_flags(),
                    state_version: parts.migratable()?.save()?.version,
                    model: self.model.to_string(),
                };
                // From STOP nothing can change while saving: no pages to remember.
                let track = from == Running;
                self.saver = Some(Saver::new(&header, parts.function.bars(), track));
            }
            (PreCopy, Running) | (StopCopy, Stop) => self.saver = None,
            (PreCopy, StopCopy) | (Running, Stop) => parts.migratable()?.quiesce(),
            (Stop, Resuming) => {
                let f = &*parts.function;
                let mut bars = [0u64; 6];
                for (b, mem) in bars.iter_mut().zip(f.bars()) {
                    *b = mem.as_ref().map_or(0, |m| m.len() as u64);
                }
                let shape = Shape {
                    model: self.model.to_string(),
                    bars,
                    config_len: f.config().len(),
                    irq_len: f.irqs().save_pending().len(),
                    msix_len: f.msix().len_bytes() as usize,
                    max_device_state: parts.migratable()?.max_state_size(),
                };
                // Copy aside what a failed restore must put back, then take the page
                // faults: both now, not inside the downtime (in that order: the backup
                // skips pages never written, and prefaulting writes every page).
                let mut loader = Loader::new(shape);
                loader
                    .back_up(parts.function.bars())
                    .map_err(MigrationError::Stream)?;
                self.loader = Some(loader);
                // The incoming VM brings its own interrupt setup (replayed as deferred
                // SET_IRQS); whatever this side had before must not linger.
                parts.function.irqs_mut().disable_all();
                for mem in parts.function.bars().iter().flatten() {
                    mem.prefault();
                }
                self.resuming = true;
                self.data_seen = false;
                self.client_config = ClientConfig::Untouched;
                self.deferred_irqs.clear();
            }
            (Resuming, Stop) => self.finish_restore(parts)?,
            (Stop, Running) => self.resume_running(parts)?,
            _ => return Err(MigrationError::NoPath { from, to }.into()),
        }
        Ok(())
    }

    /// Up to `max` bytes of the outgoing stream (PRE_COPY or STOP_COPY).
    pub fn read_stream(
        &mut self,
        max: usize,
        parts: &mut Parts<'_>,
    ) -> Result<Vec<u8>, RequestError> {
        let mut v = Vec::new();
        self.read_stream_into(&mut v, max, parts)?;
        Ok(v)
    }

    /// The MIG_DATA_READ reply built in place in `buf` (a reused buffer): the
    /// `struct vfio_user_mig_data` header (argsz, size), then up to `max` stream bytes, some
    /// of which may be device memory left in place and listed in the second result (see
    /// [`Saver::read_reply`]).
    pub fn mig_data_reply(
        &mut self,
        mut buf: Vec<u8>,
        max: usize,
        parts: &mut Parts<'_>,
    ) -> Result<(Vec<u8>, Vec<MemoryPart>), RequestError> {
        buf.clear();
        buf.reserve(8 + max);
        buf.resize(8, 0);
        let mut mapped = Vec::new();
        let n = self.read_stream_parts(&mut buf, Some(&mut mapped), max, parts)?;
        buf[..4].copy_from_slice(&((8 + n) as u32).to_le_bytes());
        buf[4..8].copy_from_slice(&(n as u32).to_le_bytes());
        Ok((buf, mapped))
    }

    /// Append up to `max` bytes of the outgoing stream to `dst`; returns how many.
    pub fn read_stream_into(
        &mut self,
        dst: &mut Vec<u8>,
        max: usize,
        parts: &mut Parts<'_>,
    ) -> Result<usize, RequestError> {
        self.read_stream_parts(dst, None, max, parts)
    }

    /// [`MigrationSession::read_stream_into`], leaving device memory in place where
    /// `mapped` is given and the stream allows it.
    fn read_stream_parts(
        &mut self,
        dst: &mut Vec<u8>,
        mapped: Option<&mut Vec<MemoryPart>>,
        max: usize,
        parts: &mut Parts<'_>,
    ) -> Result<usize, RequestError> {
        let stop_copy = self.state == MigState::StopCopy;
        let saver = self.saver.as_mut().ok_or(MigrationError::NoStream)?;
        let Parts {
            device, function, ..
        } = parts;
        // Config space, interrupt state and the MSI-X table are captured only now, with the
        // device stopped and its data sent, so the destination gets their final values.
        let mut final_state = || {
            let dev = device
                .migration()
                .ok_or(crate::DeviceError::MigrationUnsupported)?;
            Ok(FinalState {
                config: function.config().image().to_vec(),
                irq: function.irqs().save_pending(),
                msix: function.msix().image(),
                device: dev.save()?,
            })
        };
        let f: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>> = if stop_copy {
            Some(&mut final_state)
        } else {
            None
        };
        Ok(match mapped {
            Some(m) => saver.read_reply(dst, m, max, function.bars(), f)?,
            None => saver.read_into(dst, max, function.bars(), f)?,
        })
    }

    /// Incoming stream bytes (RESUMING); device memory goes straight into `function`'s BARs
    /// (rolled back if the restore fails).
    pub fn write_stream(
        &mut self,
        data: &[u8],
        function: &PciFunction,
    ) -> Result<(), RequestError> {
        let loader = self.loader.as_mut().ok_or(MigrationError::NoStream)?;
        loader
            .write(data, function.bars())
            .map_err(MigrationError::Stream)?;
        self.data_seen |= !data.is_empty();
        Ok(())
    }

    /// Pre-copy counts (initial, dirty) while in PRE_COPY.
    pub fn precopy_info(&self, function: &PciFunction) -> Option<(u64, u64)> {
        let s = self
            .saver
            .as_ref()
            .filter(|_| self.state == MigState::PreCopy)?;
        Some((s.initial_bytes(), s.dirty_bytes(function.bars())))
    }

    /// Bytes a stop-copy would produce now (MIG_DATA_SIZE).
    pub fn data_size(&self, function: &PciFunction) -> u64 {
        match &self.saver {
            Some(s) => s.stop_copy_estimate(function.bars()),
            None => {
                function
                    .bars()
                    .iter()
                    .flatten()
                    .map(|b| b.len() as u64)
                    .sum::<u64>()
                    + 8192
            }
        }
    }

    /// Leaving RESUMING: apply the staged stream, or change nothing (device memory written
    /// while the stream arrived is rolled back).
    fn finish_restore(&mut self, parts: &mut Parts<'_>) -> Result<(), RequestError> {
        let mut loader = self.loader.take().ok_or(MigrationError::NoStream)?;
        let r = self.apply_restore(&mut loader, parts);
        if r.is_err() {
            loader.rollback(parts.function.bars());
        } else {
            // The loader holds the BARs' previous contents (up to their size): freeing that
            // is slow (unmapping every page) and has nothing to do with the downtime.
            std::thread::spawn(move || drop(loader));
        }
        r
    }

    fn apply_restore(
        &mut self,
        loader: &mut Loader,
        parts: &mut Parts<'_>,
    ) -> Result<(), RequestError> {
        let mismatch = |m: String| RequestError::from(MigrationError::Mismatch(m));
        let staged = loader.finish().map_err(MigrationError::Stream)?;
        let header = staged.header.as_ref().ok_or(MigrationError::NoStream)?;
        let theirs = header.ordering & vfud::ORDERING_CONFIG_BEFORE_DATA != 0;
        if theirs != self.config_before_data {
            return Err(mismatch(format!(
                "the stream says config-before-data is {theirs}, this device (model {}) says {}: \
                 source and destination builds differ",
                self.model, self.config_before_data
            )));
        }
        if self.config_before_data && self.client_config == ClientConfig::AfterData {
            return Err(mismatch(
                "the device needs its config space restored before its device data, and the \
                 client restored config after it"
                    .into(),
            ));
        }
        // The loader checked every section against this device as it arrived.
        let function = &mut *parts.function;
        let config = staged.config.unwrap_or_default();
        if config.len() != function.config().len() {
            return Err(mismatch("the stream has no config space".into()));
        }
        let irq = staged.irq.unwrap_or_default();
        Interrupts::new(&function.desc().irqs)
            .restore_pending(&irq)
            .map_err(|e| mismatch(e.to_string()))?;
        let device_state = staged
            .device
            .ok_or_else(|| mismatch("no device state".into()))?;
        // Config first: a config-before-data device loads against it. The client's own
        // config writes (made while resuming) win over the stream's image.
        let saved_config = function.config().image().to_vec();
        let saved_msix = function.msix().image();
        let image = match self.client_config {
            ClientConfig::Untouched => config,
            _ => saved_config.clone(),
        };
        function
            .restore(&image, staged.msix.as_deref())
            .map_err(|e| mismatch(e.to_string()))?;
        let view_wanted = self.config_before_data || self.client_config != ClientConfig::AfterData;
        let Parts {
            device, function, ..
        } = parts;
        let dev = device.migration().ok_or(MigrationError::Unsupported)?;
        let view = function.view();
        if let Err(e) = dev.load(&device_state, view_wanted.then_some(&view)) {
            // The device changed nothing; put config space back as it was.
            let _ = function.restore(&saved_config, Some(&saved_msix));
            return Err(MigrationError::Device(e).into());
        }
        function
            .irqs_mut()
            .restore_pending(&irq)
            .map_err(|e| mismatch(e.to_string()))?;
        *parts.work = true;
        tracing::info!(
            device = self.model,
            "device state restored from migration stream"
        );
        Ok(())
    }

    /// STOP→RUNNING: apply the SET_IRQS queued while resuming, all or nothing, then let the
    /// device run again. If applying fails nothing is applied and the transition fails; the
    /// requests that cannot apply are dropped and the rest stay queued, so a retry (after the
    /// client resent what it meant) applies them.
    fn resume_running(&mut self, parts: &mut Parts<'_>) -> Result<(), RequestError> {
        if self.resuming {
            let mut first_err = None;
            self.deferred_irqs
                .retain(|s| match Interrupts::check_apply(s) {
                    Ok(()) => true,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        false
                    }
                });
            if let Some(e) = first_err {
                return Err(MigrationError::DeferredIrqs(e).into());
            }
            let queue = std::mem::take(&mut self.deferred_irqs);
            let irqs = parts.function.irqs_mut();
            // Apply the batch as one step: nothing is delivered until all of it is in force,
            // so a vector masked later in the batch does not fire in between.
            irqs.set_hold(true);
            let applied = queue.into_iter().try_for_each(|s| irqs.apply(s));
            irqs.set_hold(false);
            applied.map_err(MigrationError::DeferredIrqs)?;
            self.resuming = false;
        }
        *parts.work = true;
        Ok(())
    }

    /// Events missed while stopped, to replay now that the device runs.
    pub fn take_missed_events(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.missed_events)
    }
}
