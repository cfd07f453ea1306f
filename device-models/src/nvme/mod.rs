//! `nvme`: an NVMe 1.4 controller with one namespace on a regular file, bound by Linux's
//! stock `nvme` driver (class 0x010802).
//!
//! # Layout
//! - BAR0 (16 KiB, 64-bit memory): controller registers (CAP, VS, INTMS/INTMC, CC, CSTS,
//!   AQA, ASQ, ACQ), trapped, and, from 0x1000, the doorbells with stride 4 bytes
//!   (CAP.DSTRD 0): SQ y tail at `0x1000 + 8y`, CQ y head at `0x1000 + 8y + 4`. With
//!   `doorbells=trap` (the default) they are trapped too; with `doorbells=mmap` the page at
//!   0x1000 is shared memory offered for mmap and watched by a thread (see [`dbpage`]).
//! - BAR4 (4 KiB, 32-bit memory): MSI-X table (one vector per completion queue) at 0, PBA at
//!   0x800. MSI (1 vector) and INTx as fallbacks; with INTx the line is a level that stays up
//!   while an interrupt-enabled completion queue holds entries the driver has not consumed.
//!   Without MSI-X, INTMS/INTMC mask and unmask vectors: a masked vector is not signalled
//!   (INTx drops), and unmasking signals it if its queues still hold entries.
//!
//! # Commands
//! Admin: Identify (CNS 0 namespace, 1 controller, 2 active namespace list, 3 namespace
//! descriptors), Create/Delete I/O SQ and CQ, Get Log Page (error, SMART, firmware slot),
//! Set/Get Features (number of queues, coalescing and the other basic features are accepted
//! and remembered), Abort (aborts a command still queued or fetched and not started, else
//! "not aborted"),
//! Asynchronous Event Request (parked: the controller
//! reports no events), Doorbell Buffer Config (shadow doorbells with event indexes).
//! NVM: Read, Write, Flush (`fdatasync`), Write Zeroes and Dataset Management deallocate (a
//! hole punched in the file). Data pointers are PRPs (no SGLs); MDTS is 128 KiB.
//! Bad commands complete with NVMe status codes; bad register values set CSTS.CFS.
//!
//! # Execution
//! Doorbells only record the new tail and ask for deferred work; commands run in
//! `Device::run` turns of at most `slice` bytes of data each (see [`engine`]), so a slow
//! backing file never holds up the client's other requests for long.
//!
//! # Migration
//! State: registers, queues (addresses, sizes, heads, tails, phases, vectors), shadow doorbell
//! addresses and event indexes, features, parked AERs and the commands in flight. With
//! `doorbells=mmap` a doorbell not yet taken is still in the page, which is BAR memory the
//! server migrates; a live handover passes its memfd, which QEMU keeps mapped, so doorbells
//! the guest rings during the handover are found on the other side. A command
//! whose completion entry was not written yet is saved to run again from its start on the
//! destination (reads and writes are idempotent until completed: the driver does not touch
//! the buffers before the completion); one whose entry was written is saved with the entry,
//! which the destination writes again at the same slot before raising the interrupt. So no
//! write is lost and no completion is doubled. The namespace file is shared storage: it is
//! never copied, the destination opens the same path (a live handover passes the open file).
//! The device declares config-before-data: resuming commands needs bus mastering and the
//! completion vectors from the restored config.

mod admin;
mod command;
mod ctrl;
pub mod dbpage;
mod engine;
mod identify;
mod namespace;
mod prp;
pub mod spec;
#[cfg(test)]
mod tests;

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vfud_server::{
    BarIndex, BarSpec, ConfigView, Device, DeviceCtx, DeviceDescription, DeviceError, DeviceState,
    HostIo, IrqLayout, Migratable, PciIds,
};

use command::{Command, Stage};
use ctrl::{Ctrl, Effect};
use dbpage::{DoorbellMode, Wake, Watcher};
pub use namespace::{Namespace, LBA_SIZE};

/// Default number of I/O queue pairs.
pub const DEFAULT_QUEUES: u16 = 4;
/// Most I/O queue pairs (the MSI-X table in BAR4 holds 128 vectors).
pub const MAX_QUEUES: u16 = 127;
/// Default bytes of data a turn of deferred work moves.
pub const DEFAULT_SLICE: u64 = 1 << 20;
/// Version of the migrated state.
pub const STATE_VERSION: u16 = 1;

const BAR_REGS: BarIndex = BarIndex(0);
const BAR0_SIZE: u64 = 16 * 1024;

/// The device.
#[derive(Debug)]
pub struct Nvme {
    ctrl: Ctrl,
    inflight: Vec<Command>,
    ns: Namespace,
    io_queues: u16,
    serial: String,
    offer_dbbuf: bool,
    slice: u64,
    doorbells: DoorbellMode,
    /// `doorbells=mmap`: the watcher's eventfd, the watcher once started, and whether
    /// `on_timer` must (re)start the watcher and run a turn (at start, after a load, after a
    /// stop).
    wake: Option<Wake>,
    watcher: Option<Watcher>,
    rewatch: bool,
}

/// The migrated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Saved {
    ctrl: Ctrl,
    inflight: Vec<Command>,
    /// Namespace size in blocks: the destination must see the same storage.
    blocks: u64,
}

impl Nvme {
    /// A controller with `io_queues` I/O queue pairs over `ns`.
    pub fn new(ns: Namespace, io_queues: u16) -> Result<Self, DeviceError> {
        if io_queues == 0 || io_queues > MAX_QUEUES {
            return Err(DeviceError::Other(format!(
                "queues={io_queues}: give 1 to {MAX_QUEUES}"
            )));
        }
        Ok(Self {
            ctrl: Ctrl::new(io_queues),
            inflight: Vec::new(),
            ns,
            io_queues,
            serial: "VFUD0001".into(),
            offer_dbbuf: true,
            slice: DEFAULT_SLICE,
            doorbells: DoorbellMode::Trap,
            wake: None,
            watcher: None,
            rewatch: false,
        })
    }

    /// Serve doorbells the given way (see [`dbpage`]).
    pub fn with_doorbells(mut self, mode: DoorbellMode) -> Result<Self, DeviceError> {
        self.doorbells = mode;
        self.wake = match mode {
            DoorbellMode::Mmap => Some(Wake::new()?),
            DoorbellMode::Trap => None,
        };
        self.rewatch = mode == DoorbellMode::Mmap;
        Ok(self)
    }

    /// Build from the registry's options (`backing=`, `size=`, `queues=`, `shadow=`).
    pub fn from_options(
        backing: Option<PathBuf>,
        size: Option<u64>,
        queues: Option<u64>,
        shadow: bool,
    ) -> Result<Self, DeviceError> {
        let q = queues.unwrap_or(u64::from(DEFAULT_QUEUES));
        let q =
            u16::try_from(q).map_err(|_| DeviceError::Other(format!("queues={q} is too many")))?;
        let mut n = Self::new(Namespace::open(backing, size)?, q)?;
        n.offer_dbbuf = shadow;
        Ok(n)
    }

    /// Signal completion vector `iv` unless INTMS masks it (MSI-X ignores INTMS).
    fn signal(&mut self, iv: u16, cx: &mut DeviceCtx<'_>) {
        if cx.msix_active() || !self.ctrl.masked(iv) {
            cx.raise(u32::from(iv));
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// Complete a shutdown (CC.SHN) once nothing but parked AERs is in flight.
    fn finish_shutdown(&mut self) {
        let busy = self.ctrl.csts & spec::CSTS_SHST_MASK == spec::CSTS_SHST_BUSY;
        if busy && self.inflight.iter().all(|c| c.stage == Stage::Parked) {
            self.ctrl.csts = (self.ctrl.csts & !spec::CSTS_SHST_MASK) | spec::CSTS_SHST_DONE;
        }
    }

    fn apply(&mut self, effect: Effect, cx: &mut DeviceCtx<'_>) {
        match effect {
            Effect::None => {}
            Effect::Reset => {
                self.inflight.clear();
                self.clear_doorbells();
                cx.set_intx(false);
            }
            Effect::Masked(bits) => {
                if bits & 1 != 0 && !cx.msix_active() {
                    cx.set_intx(false);
                }
            }
            Effect::Unmasked(bits) => {
                let due = self.ctrl.pending_vectors() & bits & !self.ctrl.intms;
                for iv in (0..32u16).filter(|v| due & 1 << v != 0) {
                    self.signal(iv, cx);
                }
            }
            Effect::Kick => cx.schedule(),
            Effect::CqHead => {
                if !self.ctrl.irq_pending() {
                    cx.set_intx(false);
                }
                cx.schedule(); // completions may have waited for room
            }
        }
        self.finish_shutdown();
    }
}

fn access(offset: u64, len: usize) -> Result<(), DeviceError> {
    if (len == 4 || len == 8) && offset.is_multiple_of(len as u64) {
        return Ok(());
    }
    Err(DeviceError::BadAccess(format!(
        "NVMe registers take aligned 4- or 8-byte accesses, not {len} at {offset:#x}"
    )))
}

impl Device for Nvme {
    fn describe(&self) -> DeviceDescription {
        let vectors = u32::from(self.io_queues) + 1;
        let bar0 = match self.doorbells {
            DoorbellMode::Trap => BarSpec::mem64(BAR0_SIZE),
            DoorbellMode::Mmap => {
                BarSpec::mem64(BAR0_SIZE).shared_sparse(vec![(spec::reg::DOORBELLS, spec::PAGE)])
            }
        };
        DeviceDescription::new("nvme", PciIds::new(identify::VENDOR, 0x0010, 0x01_08_02))
            .bar(0, bar0)
            .bar(4, BarSpec::mem32(4096))
            .irqs(
                IrqLayout::intx()
                    .with_msi(1)
                    .with_msix(vectors, 4, 0, 0x800),
            )
            .pcie(Some(0x5646_0010_0000_0001))
    }

    fn bar_read(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &mut [u8],
        _cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        if bar != BAR_REGS || offset >= spec::reg::DOORBELLS {
            // Doorbells are write-only; the MSI-X BAR outside table and PBA reads as zero.
            data.fill(0);
            return Ok(());
        }
        access(offset, data.len())?;
        let v = self.ctrl.read(offset, data.len()).unwrap_or(0);
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn bar_write(
        &mut self,
        bar: BarIndex,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<(), DeviceError> {
        if bar != BAR_REGS {
            return Ok(());
        }
        access(offset, data.len())?;
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        if offset >= spec::reg::DOORBELLS && self.page_doorbell(offset, data, cx)? {
            return Ok(());
        }
        let effect = if offset >= spec::reg::DOORBELLS {
            self.ctrl.doorbell(offset - spec::reg::DOORBELLS, v as u32)
        } else {
            self.ctrl.write(offset, v, data.len())
        };
        self.apply(effect, cx);
        Ok(())
    }

    fn reset(&mut self, cx: &mut DeviceCtx<'_>) {
        self.ctrl = Ctrl::new(self.io_queues);
        self.inflight.clear();
        self.clear_doorbells();
        cx.set_intx(false);
    }

    fn run(&mut self, cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        if self.ctrl.ready() && self.turn(cx) {
            cx.schedule();
        }
        if self.ctrl.dbbuf.is_some() && !self.ctrl.irq_pending() {
            cx.set_intx(false);
        }
        self.finish_shutdown();
        Ok(())
    }

    fn migration(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }

    fn host_io(&mut self) -> Option<&mut dyn HostIo> {
        Some(self)
    }
}

impl Migratable for Nvme {
    fn needs_config_before_data(&self) -> bool {
        true
    }

    fn quiesce(&mut self) {
        // Doorbells the guest rang into the page before it stopped belong to this state.
        self.take_doorbells();
        self.rewatch |= self.doorbells == DoorbellMode::Mmap;
    }

    fn save(&mut self) -> Result<DeviceState, DeviceError> {
        // Park: commands not yet completed run again from their start on the destination;
        // written completion entries are written again there (see the module docs).
        let mut inflight = self.inflight.clone();
        inflight.iter_mut().for_each(Command::restart);
        let saved = Saved {
            ctrl: self.ctrl.clone(),
            inflight,
            blocks: self.ns.blocks(),
        };
        DeviceState::encode(STATE_VERSION, &saved)
    }

    fn load(
        &mut self,
        state: &DeviceState,
        config: Option<&ConfigView<'_>>,
    ) -> Result<(), DeviceError> {
        let s: Saved = state.decode(STATE_VERSION)?;
        let invalid = |m: String| Err(DeviceError::InvalidState(m));
        if s.blocks != self.ns.blocks() {
            return invalid(format!(
                "the source's namespace has {} blocks, this backing file {}",
                s.blocks,
                self.ns.blocks()
            ));
        }
        s.ctrl.validate(self.io_queues)?;
        if s.inflight.len() > engine::MAX_IN_FLIGHT {
            return invalid("too many commands in flight".into());
        }
        for c in &s.inflight {
            let q = |id: u16, qs: usize| usize::from(id) < qs;
            if !q(c.sqid, s.ctrl.sqs.len()) || !q(c.cqid, s.ctrl.cqs.len()) {
                return invalid("a command in flight names a queue out of range".into());
            }
            if let Stage::Posted { cqid, slot, .. } = c.stage {
                let ok = s.ctrl.cqs[usize::from(cqid)]
                    .as_ref()
                    .is_some_and(|cq| slot < cq.size);
                if !ok {
                    return invalid("a posted completion outside its queue".into());
                }
            }
        }
        if s.ctrl.ready() {
            // Resuming queues means DMA and completion interrupts: both need the restored
            // config (this is why the device declares config-before-data).
            let Some(cfg) = config else {
                return invalid("live queues need config space restored before device data".into());
            };
            if !cfg.bus_master() {
                return invalid(
                    "live queues, but bus mastering is off in the restored config".into(),
                );
            }
            // With MSI-X on, every completion vector must exist in the table. (Whether an
            // entry holds an address is not asked: QEMU keeps the guest's MSI-X table to
            // itself and wires vectors with SET_IRQS, so the server's copy may be blank.)
            if cfg.msix_enabled() {
                for cq in s.ctrl.cqs.iter().flatten().filter(|c| c.ien) {
                    if cfg.msix_entry(u32::from(cq.iv)).is_none() {
                        return invalid(format!(
                            "completion vector {} is not in the MSI-X table",
                            cq.iv
                        ));
                    }
                }
            }
        }
        self.ctrl = s.ctrl;
        self.inflight = s.inflight;
        // The page this process watched may not be the one the client maps (a handover
        // passes the old process's memfd after this): watch afresh once running.
        self.watcher = None;
        self.rewatch = self.doorbells == DoorbellMode::Mmap;
        Ok(())
    }
}

/// A handover passes the open namespace file, so the new process serves the same storage
/// even when it is an anonymous memfd.
impl HostIo for Nvme {
    fn event_fds(&self) -> Vec<(RawFd, u32)> {
        self.wake.iter().map(|w| (w.raw(), 0)).collect()
    }

    fn on_event(&mut self, _token: u32, cx: &mut DeviceCtx<'_>) -> Result<(), DeviceError> {
        if let Some(w) = &self.wake {
            w.drain();
        }
        self.ring_from_page(cx);
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.rewatch.then(Instant::now)
    }

    fn on_timer(&mut self, cx: &mut DeviceCtx<'_>) {
        self.rewatch = false;
        self.ring_from_page(cx);
        cx.schedule();
    }

    fn release(&mut self) {
        self.watcher = None;
    }

    fn export(&self) -> Option<(String, Vec<OwnedFd>)> {
        let fd = self.ns.dup().ok()?;
        Some((
            format!("nvme-namespace blocks={}", self.ns.blocks()),
            vec![fd],
        ))
    }

    fn adopt(&mut self, desc: &str, mut fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        let blocks = desc
            .strip_prefix("nvme-namespace blocks=")
            .and_then(|b| b.parse::<u64>().ok())
            .ok_or_else(|| DeviceError::InvalidState(format!("not an nvme namespace: {desc}")))?;
        if blocks != self.ns.blocks() || fds.len() != 1 {
            return Err(DeviceError::InvalidState(
                "the handed-over namespace does not match this one".into(),
            ));
        }
        let fd = fds
            .pop()
            .ok_or_else(|| DeviceError::Other("no fd".into()))?;
        self.ns = Namespace::adopt(fd, blocks)?;
        Ok(())
    }
}
