//! The doorbell page offered for mmap (`doorbells=mmap`) and the thread that watches it.
//!
//! With `doorbells=trap` every doorbell write is a posted REGION_WRITE: the guest's store
//! exits to QEMU, which sends a message the event loop decodes. With `doorbells=mmap`, BAR0's
//! page at 0x1000 is device-owned shared memory offered as a sparse-mmap area, so QEMU maps it
//! into the guest and a doorbell is a plain store: no exit, no message. Nobody is told about
//! that store, so a [`Watcher`] thread polls the page: it spins for [`SPIN`] after the last
//! change it saw (a busy queue rings again soon), then naps, doubling the nap from
//! [`MIN_NAP`] to [`MAX_NAP`]. When a doorbell changes it wakes the event loop through an
//! eventfd, and the device takes the new values on the event loop thread, where all
//! controller state lives ([`super::Nvme::take_doorbells`]).
//!
//! **Take and reset.** A value only tells that the driver wrote if it differs from what the
//! page held, and the same tail can be written twice in a row: with shadow doorbells the
//! controller follows the tail through guest memory, the driver rings the register only now
//! and then, and after a wrap its value may equal the last one rung. So the device takes each
//! value and swaps [`EMPTY`] into the word with a compare-and-swap (a store the driver made in
//! between makes it fail, and that value is taken too): a word other than [`EMPTY`] is a
//! write not yet taken, whatever its value, and nothing needs remembering across a migration
//! or handover (a doorbell not yet taken is still in the page, which travels).
//!
//! The cost: one core busy while doorbells ring at least every [`SPIN`]; idle, about
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

/// A doorbell word the device has taken (no queue has 2³² entries, so no driver writes it).
pub const EMPTY: u32 = u32::MAX;

/// How long the watcher spins after the last doorbell change it saw.
pub(crate) const SPIN: Duration = Duration::from_micros(50);
/// First nap once the spin is over.
pub(crate) const MIN_NAP: Duration = Duration::from_micros(10);
/// Longest nap: the worst added latency of the first doorbell after idle.
pub(crate) const MAX_NAP: Duration = Duration::from_millis(1);

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
        [Self::Trap, Self::Mmap]
            .into_iter()
            .find(|m| m.as_str() == v)
    }

    /// The option value that selects this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Mmap => "mmap",
        }
    }
}

/// The eventfd the watcher signals and the event loop watches.
#[derive(Debug)]
pub(crate) struct Wake(Arc<EventFd>);

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
pub(crate) struct Watcher {
    mem: Arc<SharedMemory>,
    words: usize,
    /// Set by [`Watcher::take`], cleared by the thread when it wakes the event loop: one
    /// wake-up per take, however long a written word waits to be taken.
    armed: Arc<AtomicBool>,
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
        let armed = Arc::new(AtomicBool::new(true));
        let (m, a, s, w) = (mem.clone(), armed.clone(), stop.clone(), wake.0.clone());
        let thread = std::thread::Builder::new()
            .name("vfud-nvme-db".into())
            .spawn(move || poll(&m, words, &a, &s, &w))
            .map_err(|e| DeviceError::Other(format!("doorbell watcher thread: {e}")))?;
        Ok(Self {
            mem,
            words,
            armed,
            stop,
            thread: Some(thread),
        })
    }

    /// Take every doorbell written since last taken, as (word index, value), leaving
    /// [`EMPTY`] in its place.
    pub fn take(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        let mut page = vec![0u8; self.words * 4];
        read_page(&self.mem, &mut page);
        for (i, mut v) in doorbell_words(&page).enumerate() {
            let at = reg::DOORBELLS + 4 * i as u64;
            while v != EMPTY {
                out.push((i, v));
                match self.mem.compare_exchange_u32(at, v, EMPTY) {
                    Ok(found) if found == v => break,
                    Ok(newer) => v = newer, // written again meanwhile: take that too
                    Err(_) => break,
                }
            }
        }
        // After the words are emptied: a store from now on finds the thread armed.
        self.armed.store(true, Ordering::SeqCst);
        out
    }

    /// Empty every doorbell (controller reset: what the driver wrote before is void).
    pub fn clear(&self) {
        let _ = self.mem.fill(reg::DOORBELLS, self.words * 4, 0xff);
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

/// Copy the doorbell words (as many as `buf` holds) out of the page.
fn read_page(mem: &SharedMemory, buf: &mut [u8]) {
    let _ = mem.read(reg::DOORBELLS, buf);
}

/// The doorbell words of a page copy.
fn doorbell_words(page: &[u8]) -> impl Iterator<Item = u32> + '_ {
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

/// Adaptive polling: spin while doorbells ring, nap longer and longer once they stop. A word
/// other than [`EMPTY`] is a write not taken yet; the thread wakes the event loop for it once
/// per take (values are not compared: the same value rung twice is two writes).
fn poll(mem: &SharedMemory, words: usize, armed: &AtomicBool, stop: &AtomicBool, wake: &EventFd) {
    let mut now = vec![0u8; words * 4];
    let mut busy_until = Instant::now();
    let mut nap = MIN_NAP;
    while !stop.load(Ordering::Relaxed) {
        read_page(mem, &mut now);
        let pending = doorbell_words(&now).any(|w| w != EMPTY);
        if pending && armed.swap(false, Ordering::SeqCst) {
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
    }

    /// Take the doorbells written to the page since last taken, as the controller's effects
    /// (the caller applies them, or drops them when stopped).
    pub(super) fn take_doorbells(&mut self) -> Vec<Effect> {
        let Some(w) = &self.watcher else {
            return Vec::new();
        };
        w.take()
            .into_iter()
            .map(|(i, v)| self.ctrl.doorbell(i as u64 * 4, v))
            .collect()
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

    /// Controller reset: doorbells written before it are void.
    pub(super) fn clear_doorbells(&mut self) {
        if let Some(w) = &self.watcher {
            w.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    #[test]
    fn the_watcher_wakes_on_writes_and_the_device_takes_each_once() {
        let mem = SharedMemory::new("dbpage-test", 16 * 1024).unwrap();
        let wake = Wake::new().unwrap();
        let w = Watcher::start(mem.fd(), mem.len(), 4, &wake).unwrap();
        let wait = |ms: u16| {
            let mut fds = [PollFd::new(wake.0.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::from(ms)).unwrap();
            wake.drain();
            n
        };
        // A fresh page reads as writes of 0, taken once.
        assert_eq!(w.take(), (0..4).map(|i| (i, 0)).collect::<Vec<_>>());
        assert_eq!(w.take(), vec![]);
        let db = |i: u64, v: u32| mem.write(reg::DOORBELLS + 4 * i, &v.to_le_bytes()).unwrap();
        db(2, 5);
        // Bounded wait (the watcher naps at most MAX_NAP between looks).
        assert_eq!(wait(10_000), 1, "the watcher signalled the eventfd");
        assert_eq!(w.take(), vec![(2, 5)]);
        // The same value again is a new write: the word was emptied when taken.
        db(2, 5);
        assert_eq!(wait(10_000), 1, "the same value rung again wakes too");
        assert_eq!(w.take(), vec![(2, 5)]);
        db(1, 3);
        w.clear();
        assert_eq!(w.take(), vec![], "a reset voids what was written");
        drop(w); // joins the thread
    }
}
