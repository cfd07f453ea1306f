//! The doorbell page offered for mmap (`doorbells=mmap`) and the thread that watches it.
//!
//! With `doorbells=trap` every doorbell write is a posted REGION_WRITE: the guest's store
//! exits to QEMU, which sends a message the event loop decodes. With `doorbells=mmap`, BAR0's
//! page at 0x1000 is device-owned shared memory offered as a sparse-mmap area, so QEMU maps it
//! into the guest and a doorbell is a plain store: no exit, no message. Nobody is told about
//! that store, so a [`Watcher`] thread polls the page: it spins for [`SPIN`] after the last
//! change it saw (a busy queue rings again soon), then naps, doubling the nap from
//! [`MIN_NAP`] to [`MAX_NAP`]. When a doorbell changes it wakes the event loop through an
//! eventfd, and the device compares the page with the values it last took
//! ([`super::Nvme::take_doorbells`]) on the event loop thread, where all controller state
//! lives. The cost: one core busy while doorbells ring at least every [`SPIN`]; idle, about
//! 1 000 naps a second, measured at 1.2 % of a core. The first doorbell after idle waits up
//! to [`MAX_NAP`] (about 0.9 ms median in `vfud bench --only nvme-doorbell`), which is why
//! `trap` is the default: on hosts without a core to spare, polling costs more than it saves.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use vfud_server::mmap::SharedMemory;
use vfud_server::{DeviceCtx, DeviceError};

use super::ctrl::Effect;
use super::spec::reg;

/// How long the watcher spins after the last doorbell change it saw.
pub const SPIN: Duration = Duration::from_micros(50);
/// First nap once the spin is over.
pub const MIN_NAP: Duration = Duration::from_micros(10);
/// Longest nap: the worst added latency of the first doorbell after idle.
pub const MAX_NAP: Duration = Duration::from_millis(1);

/// How doorbell writes reach the controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DoorbellMode {
    /// Posted REGION_WRITEs (BAR0 trapped whole).
    #[default]
    Trap,
    /// The doorbell page is shared memory the client maps; a thread watches it.
    Mmap,
}

impl DoorbellMode {
    /// Parse the `doorbells=` option.
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "trap" => Some(Self::Trap),
            "mmap" => Some(Self::Mmap),
            _ => None,
        }
    }
}

/// The eventfd the watcher signals and the event loop watches.
#[derive(Debug)]
pub struct Wake(Arc<EventFd>);

impl Wake {
    /// A non-blocking eventfd.
    pub fn new() -> Result<Self, DeviceError> {
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map(|e| Self(Arc::new(e)))
            .map_err(|e| DeviceError::Other(format!("eventfd: {e}")))
    }

    /// The fd for the event loop.
    pub fn raw(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }

    /// Consume the pending wake-ups.
    pub fn drain(&self) {
        let _ = self.0.read();
    }
}

/// A mapping of the doorbell page and the thread polling it. Dropping it stops the thread.
#[derive(Debug)]
pub struct Watcher {
    mem: Arc<SharedMemory>,
    words: usize,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Map BAR0's memory (`fd`, `bar_size` bytes) and poll its first `words` doorbells.
    pub fn start(
        fd: BorrowedFd<'_>,
        bar_size: usize,
        words: usize,
        wake: &Wake,
    ) -> Result<Self, DeviceError> {
        let fd = fd
            .try_clone_to_owned()
            .map_err(|e| DeviceError::Other(format!("dup of the doorbell page: {e}")))?;
        let mem = Arc::new(SharedMemory::from_fd(fd, bar_size)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, w) = (mem.clone(), stop.clone(), wake.0.clone());
        // The baseline is read before the caller looks at the page itself: a doorbell rung
        // after this read is seen as a change, one rung before it by the caller.
        let last = read_words(&mem, words);
        let thread = std::thread::Builder::new()
            .name("vfud-nvme-db".into())
            .spawn(move || poll(&m, last, &s, &w))
            .map_err(|e| DeviceError::Other(format!("doorbell watcher thread: {e}")))?;
        Ok(Self {
            mem,
            words,
            stop,
            thread: Some(thread),
        })
    }

    /// The doorbell values now in the page.
    pub fn read(&self) -> Vec<u32> {
        read_words(&self.mem, self.words)
    }

    /// Zero the doorbells (controller reset: the driver starts again from 0).
    pub fn clear(&self) {
        let _ = self.mem.fill(reg::DOORBELLS, self.words * 4, 0);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_words(mem: &SharedMemory, words: usize) -> Vec<u32> {
    let mut b = vec![0u8; words * 4];
    let _ = mem.read(reg::DOORBELLS, &mut b);
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Adaptive polling: spin while doorbells ring, nap longer and longer once they stop. Reads
/// the page into a buffer it keeps (no allocation per look).
fn poll(mem: &SharedMemory, last: Vec<u32>, stop: &AtomicBool, wake: &EventFd) {
    let mut last: Vec<u8> = last.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut now = vec![0u8; last.len()];
    let mut busy_until = Instant::now();
    let mut nap = MIN_NAP;
    while !stop.load(Ordering::Relaxed) {
        let _ = mem.read(reg::DOORBELLS, &mut now);
        if now != last {
            std::mem::swap(&mut now, &mut last);
            let _ = wake.write(1);
            busy_until = Instant::now() + SPIN;
            nap = MIN_NAP;
        } else if Instant::now() < busy_until {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(nap);
            nap = (nap * 2).min(MAX_NAP);
        }
    }
}

impl super::Nvme {
    /// Doorbell words: an SQ tail and a CQ head per queue pair.
    pub(super) fn doorbell_words(&self) -> usize {
        2 * (usize::from(self.io_queues) + 1)
    }

    /// Start the watcher over the server's BAR0 memory, if doorbells are mmap'd and it is
    /// not running.
    fn ensure_watcher(&mut self, cx: &DeviceCtx<'_>) {
        if self.watcher.is_some() {
            return;
        }
        let words = self.doorbell_words();
        let (Some(wake), Some(mem)) = (&self.wake, cx.bar_memory(super::BAR_REGS)) else {
            return;
        };
        match Watcher::start(mem.fd(), mem.len(), words, wake) {
            Ok(w) => self.watcher = Some(w),
            Err(e) => tracing::error!("nvme: cannot watch the doorbell page: {e}"),
        }
        if self.seen.len() != words {
            self.seen = vec![0; words];
        }
    }

    /// Take the doorbells that changed in the page since last taken, as the controller's
    /// effects (the caller applies them, or drops them when stopped).
    pub(super) fn take_doorbells(&mut self) -> Vec<Effect> {
        let Some(w) = &self.watcher else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        for (i, (now, seen)) in w.read().into_iter().zip(self.seen.iter_mut()).enumerate() {
            if now != *seen {
                *seen = now;
                effects.push(self.ctrl.doorbell(i as u64 * 4, now));
            }
        }
        effects
    }

    /// Act on every doorbell rung in the page.
    pub(super) fn ring_from_page(&mut self, cx: &mut DeviceCtx<'_>) {
        self.ensure_watcher(cx);
        for e in self.take_doorbells() {
            self.apply(e, cx);
        }
    }

    /// A doorbell write over the socket while the page is shared (a client that did not map
    /// it): store it in the page and take it from there, so the page stays the one source.
    /// Returns false when doorbells are trapped (the caller handles the write).
    pub(super) fn page_doorbell(
        &mut self,
        offset: u64,
        data: &[u8],
        cx: &mut DeviceCtx<'_>,
    ) -> Result<bool, DeviceError> {
        if self.doorbells != DoorbellMode::Mmap {
            return Ok(false);
        }
        self.ensure_watcher(cx);
        match (&self.watcher, cx.bar_memory(super::BAR_REGS)) {
            (Some(_), Some(mem)) => mem.write(offset, data)?,
            _ => return Ok(false),
        }
        self.ring_from_page(cx);
        Ok(true)
    }

    /// Controller reset: the driver counts from 0 again, so must the page.
    pub(super) fn clear_doorbells(&mut self) {
        if let Some(w) = &self.watcher {
            w.clear();
        }
        self.seen.iter_mut().for_each(|s| *s = 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    #[test]
    fn the_watcher_wakes_the_event_loop_when_a_doorbell_changes() {
        let mem = SharedMemory::new("dbpage-test", 16 * 1024).unwrap();
        let wake = Wake::new().unwrap();
        let w = Watcher::start(mem.fd(), mem.len(), 4, &wake).unwrap();
        mem.write(reg::DOORBELLS + 8, &5u32.to_le_bytes()).unwrap();
        let mut fds = [PollFd::new(wake.0.as_fd(), PollFlags::POLLIN)];
        // Bounded wait (the watcher naps at most MAX_NAP between looks).
        let n = poll(&mut fds, PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(n, 1, "the watcher signalled the eventfd");
        wake.drain();
        assert_eq!(w.read(), vec![0, 0, 5, 0]);
        w.clear();
        assert_eq!(w.read(), vec![0; 4]);
        drop(w); // joins the thread
    }
}
