//! The device process under a supervisor: the hooks the event loop calls (journal, snapshots)
//! and what a restarted process does with the request the dead one was handling.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use mio::Token;
use nix::errno::Errno;
use vfud_protocol::codec::{Frame, FrameReader};
use vfud_protocol::header::MessageKind;
use vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX;
use vfud_protocol::messages::MigState;
use vfud_protocol::{Command, Header};

use super::journal::{Journal, Recovered};
use super::{kind, Policy, Supervise};
use crate::device::Device;
use crate::dispatch::{DeviceServer, ServerSettings};
use crate::error::chain;
use crate::event_loop::{Loop, ShutdownHandle, CONTROL_BASE};
use crate::handover;

/// Supervision state of a device process's loop.
pub(crate) struct Supervised {
    link: UnixStream,
    reader: Option<FrameReader>,
    journal: Journal,
    policy: Policy,
    interval: Duration,
    last: Instant,
    /// Never checkpointed yet.
    first: bool,
    dirty: bool,
    had_client: bool,
    broken: bool,
    /// The device's host fds (a UART backend's listener and connection) in the last
    /// snapshot: when they change, the supervisor needs the new ones.
    host_fds: Vec<RawFd>,
    /// What the dead process left, until the session is adopted.
    recovered: Option<Recovered>,
    /// The first frame of the adopted stream was being handled when the old process died.
    crashed_in: bool,
    /// The old process was killed for hanging in that frame: never re-run it.
    hung: bool,
}

/// Run one device as a supervised device process: `link` is the socket to the supervisor
/// (the process's stdin). Returns when shutdown is requested.
pub fn serve_device_process(
    device: Box<dyn Device>,
    link: UnixStream,
    settings: &ServerSettings,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let mut reader = FrameReader::new();
    let f = handover::recv(&link, &mut reader, Duration::from_secs(30))
        .map_err(|e| io::Error::other(format!("no word from the supervisor: {e}")))?;
    if f.header.cmd != kind::SUPERVISE {
        return Err(io::Error::other(format!(
            "unexpected first frame {:#x} from the supervisor",
            f.header.cmd
        )));
    }
    let sup: Supervise = serde_json::from_slice(&f.payload).map_err(io::Error::other)?;
    let mut fds: Vec<Option<OwnedFd>> = f.fds.into_iter().map(Some).collect();
    let mut take = |i: usize| {
        fds.get_mut(i)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other(format!("supervisor fd {i} missing")))
    };
    let journal = Journal::open(take(sup.journal)?).map_err(|e| io::Error::other(chain(&e)))?;
    let listener = sup
        .listener
        .map(&mut take)
        .transpose()?
        .map(UnixListener::from);
    // Read before this process writes anything: the dead process's last words.
    let recovered = (sup.generation > 0).then(|| journal.recover());
    tracing::info!(generation = sup.generation, policy = ?sup.policy, "device process started");
    let s = Supervised {
        link,
        reader: Some(reader),
        journal,
        policy: sup.policy,
        interval: Duration::from_millis(sup.checkpoint_ms.max(1)),
        last: Instant::now(),
        first: true,
        dirty: false,
        had_client: false,
        broken: false,
        host_fds: Vec::new(),
        recovered,
        crashed_in: false,
        hung: sup.hung,
    };
    crate::event_loop::serve_inner(device, listener, None, Some(s), settings, shutdown).map(|_| ())
}

/// Commands a restarted process may simply run again for the request the old one died in:
/// they only read, their effect is already undone by restoring the last session snapshot
/// (which is taken before any session-changing request is answered), or running them twice
/// is running them once (an interrupt mask or unmask).
fn rerunnable(cmd: u16, payload: &[u8]) -> bool {
    match Command::try_from(cmd) {
        Ok(
            Command::Version
            | Command::DeviceGetInfo
            | Command::DeviceGetRegionInfo
            | Command::DeviceGetIrqInfo
            | Command::RegionRead
            | Command::DmaUnmap
            | Command::DeviceReset,
        ) => true,
        Ok(Command::RegionWrite) => is_config_write(payload),
        Ok(Command::DeviceSetIrqs) => is_mask_or_unmask(payload),
        _ => false,
    }
}

/// A SET_IRQS that masks or unmasks without eventfds (`vfio_irq_set`: argsz, flags, ...):
/// setting a mask again is harmless, and an error would leave QEMU's INTx masked for good
/// (it unmasks INTx this way after every interrupt). One with eventfds cannot be re-run:
/// its fds died with the old process.
fn is_mask_or_unmask(payload: &[u8]) -> bool {
    use vfud_protocol::messages::irq::{
        IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD,
    };
    payload
        .get(4..8)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .is_some_and(|f| {
            f & IRQ_SET_DATA_EVENTFD == 0 && f & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK) != 0
        })
}

/// A REGION_WRITE to config space (`RegionAccess`: offset u64, then the region index).
fn is_config_write(payload: &[u8]) -> bool {
    payload
        .get(8..12)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .is_some_and(|b| u32::from_le_bytes(b) == PCI_CONFIG_REGION_INDEX)
}

/// Requests after which the supervisor must hold a fresh snapshot before the client hears
/// the reply: they change what the session is (limits, maps, interrupt wiring, config).
pub(crate) fn changes_session(h: &Header, payload: &[u8]) -> bool {
    match Command::try_from(h.cmd) {
        Ok(
            Command::Version
            | Command::DmaMap
            | Command::DmaUnmap
            | Command::DeviceSetIrqs
            | Command::DeviceReset,
        ) => true,
        Ok(Command::RegionWrite) => is_config_write(payload),
        _ => false,
    }
}

impl DeviceServer {
    /// The whole device state as a migration stream, taken between two messages without
    /// the client noticing: RUNNING → STOP_COPY, read everything, back to RUNNING.
    fn checkpoint_stream(&mut self) -> Result<Vec<u8>, String> {
        self.set_mig_state(MigState::StopCopy)
            .map_err(|e| chain(&e))?;
        let mut stream = Vec::new();
        let r = loop {
            match self.handover_read(16 << 20) {
                Ok(d) if d.is_empty() => break Ok(()),
                Ok(d) => stream.extend_from_slice(&d),
                Err(e) => break Err(chain(&e)),
            }
        };
        let back = self.set_mig_state(MigState::Running).map_err(|e| chain(&e));
        r.and(back).map(|()| stream)
    }

    /// `Policy::Reset` after a restore: the device model back to its reset state, the PCI
    /// function (config, interrupts) and DMA maps as they were.
    fn reset_model(&mut self) {
        self.with_device(|d, cx| d.reset(cx));
    }

    /// `Policy::Restore`: tell the model its state is a checkpoint the driver may be ahead of.
    fn restored_after_crash(&mut self) {
        if let Some(m) = self.device.migration() {
            m.restored_after_crash();
        }
    }
}

impl Loop {
    /// Take over the supervisor link: it is read as a control socket, so the supervisor
    /// hands a restarted device its session with the ordinary incoming-handover frames.
    pub(crate) fn adopt_supervision(&mut self, mut s: Supervised) -> io::Result<()> {
        let link = s.link.try_clone()?;
        link.set_nonblocking(true)?;
        let t = Token(CONTROL_BASE + self.next_control);
        self.next_control += 1;
        self.register(link.as_raw_fd(), t)?;
        let reader = s.reader.take().unwrap_or_default();
        self.controls.insert(t, (link, reader));
        self.sup = Some(s);
        // Frames that arrived with SUPERVISE are already in the reader.
        self.read_control(t);
        Ok(())
    }

    /// The poll timeout, shortened to the next checkpoint when one is due.
    pub(crate) fn supervise_timeout(&self, t: Option<Duration>) -> Option<Duration> {
        match &self.sup {
            Some(s) if s.dirty && !s.broken => {
                let left = s.interval.saturating_sub(s.last.elapsed());
                Some(t.map_or(left, |t| t.min(left)))
            }
            _ => t,
        }
    }

    /// End of a loop turn: checkpoint when the client came or went, when the device's host
    /// fds changed (a UART's host peer connected or left), or when the device was active and
    /// the interval has passed.
    pub(crate) fn supervise_turn(&mut self, active: bool) {
        if self.sup.is_none() {
            return;
        }
        let client = self.client.is_some();
        let host_fds = self.host_fds();
        let Some(s) = &mut self.sup else {
            return;
        };
        s.dirty |= active;
        if !client && s.had_client {
            s.journal.clear();
        }
        if s.first
            || client != s.had_client
            || host_fds != s.host_fds
            || (s.dirty && s.last.elapsed() >= s.interval)
        {
            self.checkpoint_now();
        }
    }

    /// The device's host fds, as the event loop watches them. Compared by number, without a
    /// system call per turn: a connection closed and another accepted under the same number
    /// within one turn goes unnoticed until the next checkpoint.
    fn host_fds(&mut self) -> Vec<RawFd> {
        let (fds, _) = self.server.device_sources();
        fds.into_iter().map(|(fd, _)| fd).collect()
    }

    /// Send the supervisor a snapshot: the session (with its fds) and a checkpoint. Skipped
    /// (and retried next turn) while a migration or socket DMA is in flight.
    pub(crate) fn checkpoint_now(&mut self) {
        let quiet = self.server.mig_state() == MigState::Running
            && self.outgoing.is_none()
            && self.server.socket_dma_in_flight() == 0;
        if !quiet || self.sup.as_ref().is_none_or(|s| s.broken) {
            return;
        }
        let at = handover::now_ns();
        let stream = match self.server.checkpoint_stream() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(device = self.server.description().name, "checkpoint: {e}");
                return;
            }
        };
        let mut fds = Vec::new();
        let sent = self
            .server
            .export_session(self.client.as_ref(), &mut fds)
            .map_err(|e| e.to_string())
            .and_then(|info| super::encode_snapshot(&info, &stream).map_err(|e| e.to_string()))
            .and_then(|p| {
                let s = self.sup.as_ref().ok_or("not supervised")?;
                let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                handover::send(s.link.as_fd(), kind::SNAPSHOT, &p, &b).map_err(|e| e.to_string())
            });
        let client = self.client.is_some();
        let host_fds = self.host_fds();
        let Some(s) = &mut self.sup else {
            return;
        };
        match sent {
            Ok(()) => {
                s.host_fds = host_fds;
                s.journal.checkpointed(at);
                s.first = false;
                s.dirty = false;
                s.had_client = client;
                s.last = Instant::now();
            }
            Err(e) => {
                tracing::error!(
                    "cannot reach the supervisor ({e}): this device will not survive a crash"
                );
                s.broken = true;
            }
        }
    }

    /// The session was adopted from the supervisor: apply the crash policy and queue the
    /// client bytes the dead process had read but not handled.
    pub(crate) fn supervised_adopted(&mut self) {
        let Some(s) = &mut self.sup else {
            return;
        };
        let Some(rec) = s.recovered.take() else {
            return;
        };
        let name = self.server.description().name;
        let ago_ms = handover::now_ns().saturating_sub(rec.checkpoint_unix_ns) / 1_000_000;
        tracing::warn!(
            device = name,
            policy = ?s.policy,
            requests_after_checkpoint = rec.frames_since_checkpoint,
            checkpoint_age_ms = ago_ms,
            unhandled_bytes = rec.unhandled.len(),
            request_in_progress = rec.busy,
            "device restarted after a crash: state from the last checkpoint; the effect of {} \
             request(s) handled after it is lost",
            rec.frames_since_checkpoint
        );
        s.had_client = self.client.is_some();
        s.crashed_in = rec.busy;
        let policy = s.policy;
        if let Some(c) = &mut self.client {
            c.reader_mut().prefill(&rec.unhandled);
        }
        match policy {
            Policy::Reset => self.server.reset_model(),
            Policy::Restore => self.server.restored_after_crash(),
        }
    }

    /// A frame was cut out of the client stream: journal it. `None` when the frame was the
    /// one the dead process died in and this hook answered it already.
    pub(crate) fn journal_take(&mut self, frame: Frame) -> Option<Frame> {
        let (Some(s), Some(c)) = (&mut self.sup, &self.client) else {
            return Some(frame);
        };
        s.journal.take(&frame, c.reader());
        let first = c.reader().stream_offset() == s.journal.frame_len();
        if !std::mem::take(&mut s.crashed_in) || !first {
            return Some(frame);
        }
        let h = frame.header;
        let name = self.server.description().name;
        match h.kind() {
            Ok(MessageKind::Command { no_reply })
                if s.hung || !rerunnable(h.cmd, &frame.payload) =>
            {
                if no_reply {
                    tracing::warn!(
                        device = name,
                        msg_id = h.msg_id,
                        cmd = h.cmd,
                        "the posted request the old process died in is dropped"
                    );
                } else {
                    tracing::warn!(
                        device = name,
                        msg_id = h.msg_id,
                        cmd = h.cmd,
                        "the request the old process died in is answered with EIO"
                    );
                    if let Err(e) = c.error(&h, Errno::EIO) {
                        tracing::warn!("error reply: {e}");
                    }
                }
                s.journal.handled(c.reader());
                None
            }
            _ => {
                tracing::info!(
                    device = name,
                    msg_id = h.msg_id,
                    cmd = h.cmd,
                    "re-running the request the old process died in"
                );
                Some(frame)
            }
        }
    }

    /// The frame in hand was handled and its reply is about to be sent (or it needs none).
    /// Marked *before* the reply goes out: a crash between the two then costs the client
    /// that one reply (QEMU times the request out), where marking after would risk a second
    /// reply, which QEMU cannot tell from a reply to its next request. Idempotent.
    pub(crate) fn journal_handled(&mut self) {
        if let (Some(s), Some(c)) = (&mut self.sup, &self.client) {
            s.journal.handled(c.reader());
        }
    }

    /// The client socket has no whole frame: journal a partial one.
    pub(crate) fn journal_idle(&mut self) {
        if let (Some(s), Some(c)) = (&mut self.sup, &self.client) {
            s.journal.idle(c.reader());
        }
    }

    /// Whether the supervisor must get a snapshot before this request is answered (a crash
    /// after the reply must not take back what the client was told).
    pub(crate) fn needs_snapshot(&self, h: &Header, payload: &[u8]) -> bool {
        self.sup.is_some() && changes_session(h, payload)
    }

    /// A client connection was adopted: its stream offsets start afresh.
    pub(crate) fn journal_new_stream(&mut self) {
        if let Some(s) = &mut self.sup {
            s.journal.new_stream();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfud_protocol::messages::region::RegionAccess;
    use zerocopy::IntoBytes;

    fn write(region: u32) -> (Header, Vec<u8>) {
        let a = RegionAccess {
            offset: 4,
            region,
            count: 2,
        };
        let mut p = a.as_bytes().to_vec();
        p.extend_from_slice(&[6, 0]);
        (Header::command(1, Command::RegionWrite, p.len(), false), p)
    }

    #[test]
    fn config_writes_change_the_session_and_bar_writes_do_not() {
        let (h, p) = write(PCI_CONFIG_REGION_INDEX);
        assert!(changes_session(&h, &p) && rerunnable(h.cmd, &p));
        let (h, p) = write(0);
        assert!(!changes_session(&h, &p) && !rerunnable(h.cmd, &p));
        assert!(rerunnable(Command::RegionRead as u16, &[]));
        assert!(!rerunnable(Command::DmaMap as u16, &[]));
    }

    #[test]
    fn only_set_irqs_that_mask_or_unmask_without_fds_are_rerun() {
        use vfud_protocol::messages::irq::*;
        let set_irqs = |flags: u32| [20u32, flags, 0, 0, 1].as_bytes().to_vec();
        let cmd = Command::DeviceSetIrqs as u16;

        let unmask = rerunnable(cmd, &set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK));
        let mask = rerunnable(cmd, &set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK));
        let fds = rerunnable(
            cmd,
            &set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER),
        );
        let trigger = rerunnable(cmd, &set_irqs(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER));

        assert!(unmask && mask);
        assert!(!fds && !trigger);
        assert!(!rerunnable(cmd, &[1, 2]), "truncated");
    }
}
