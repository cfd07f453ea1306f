//! [`Saver`]: produces the stream on the source.

use std::ops::Range;

use super::{kind, put_section, StreamHeader, MEMORY_CHUNK, PAGE, SECTION_HEADER_LEN};
use crate::migration::DeviceState;
use crate::mmap::{MemoryPart, SharedMemory};

/// The final, non-iterable part of the state, captured when stop-copy data runs out.
#[derive(Clone, Debug)]
pub struct FinalState {
    /// Config space image.
    pub config: Vec<u8>,
    /// Interrupt state bytes.
    pub irq: Vec<u8>,
    /// MSI-X table image (empty without MSI-X).
    pub msix: Vec<u8>,
    /// Device state.
    pub device: DeviceState,
}

/// Produces the stream on the source.
#[derive(Debug)]
pub struct Saver {
    /// Produced bytes; `out[pos..]` has not been read yet.
    out: Vec<u8>,
    pos: usize,
    /// Each shared BAR: (index, size).
    regions: Vec<(usize, usize)>,
    /// Copy of each shared BAR as last sent, to find changed pages; `None` when nothing can
    /// change while saving (a stream that starts stopped needs no second look).
    shadows: Option<Vec<Vec<u8>>>,
    /// Next (shadow index, offset) of the initial full copy; `None` once sent.
    initial: Option<(usize, usize)>,
    finished: bool,
    /// A full pass over device memory has been made in stop-copy. Nothing writes device
    /// memory once the device and the VM are stopped, so one pass finds every change left;
    /// a second (which found nothing and doubled the downtime of a large BAR) is skipped.
    /// (A flag rather than dropping the shadows after the pass: freeing a BAR-sized copy
    /// inside the downtime costs 15–20 ms for 256 MiB.)
    stopped_scan_done: bool,
    /// Bytes of BAR memory sent after the initial copy.
    pub delta_bytes: u64,
}

impl Saver {
    /// Start a stream: the header is queued at once. `track_changes`: the device (and the
    /// guest, through mmap) may still write its memory (pre-copy), so pages sent are
    /// remembered and re-sent when they change.
    pub fn new(
        header: &StreamHeader,
        bars: &[Option<SharedMemory>; 6],
        track_changes: bool,
    ) -> Self {
        let mut out = Vec::new();
        put_section(&mut out, kind::HEADER, &header.encode());
        let regions: Vec<(usize, usize)> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|m| (i, m.len())))
            .collect();
        let shadows = track_changes.then(|| regions.iter().map(|(_, n)| vec![0u8; *n]).collect());
        for mem in bars.iter().flatten() {
            mem.populate_for_reading();
        }
        let initial = (!regions.is_empty()).then_some((0, 0));
        Self {
            out,
            pos: 0,
            regions,
            shadows,
            initial,
            finished: false,
            stopped_scan_done: false,
            delta_bytes: 0,
        }
    }

    fn pending(&self) -> usize {
        self.out.len() - self.pos
    }

    /// Initial data not yet read (the kernel's `initial_bytes`).
    pub fn initial_bytes(&self) -> u64 {
        let mut n = 0u64;
        if let Some((si, off)) = self.initial {
            n += self
                .regions
                .iter()
                .skip(si)
                .map(|(_, len)| *len as u64)
                .sum::<u64>()
                - off as u64;
            n += self.pending() as u64;
        }
        n
    }

    /// Bytes dirtied since they were sent (a scan; the kernel's `dirty_bytes`).
    pub fn dirty_bytes(&self, bars: &[Option<SharedMemory>; 6]) -> u64 {
        if self.initial.is_some() {
            // Everything queued still counts as initial data.
            return 0;
        }
        let mut page = vec![0u8; PAGE];
        let mut n = self.pending() as u64;
        let Some(shadows) = self.shadows.as_ref().filter(|_| !self.stopped_scan_done) else {
            return n;
        };
        for ((bar, _), shadow) in self.regions.iter().zip(shadows) {
            let Some(mem) = &bars[*bar] else { continue };
            for (i, s) in shadow.chunks(PAGE).enumerate() {
                let p = &mut page[..s.len()];
                if mem.read((i * PAGE) as u64, p).is_ok() && p != s {
                    n += s.len() as u64;
                }
            }
        }
        n
    }

    /// Bytes still to come (the kernel v1 `pending_bytes`): exact once the stream is
    /// finished, an estimate before (the final sections are counted as 8 KiB in stop-copy).
    /// Zero in pre-copy means nothing more for now.
    pub fn remaining(&self, bars: &[Option<SharedMemory>; 6], stop_copy: bool) -> u64 {
        if self.finished {
            return self.pending() as u64;
        }
        let final_sections = if stop_copy { 8192 } else { 0 };
        self.initial_bytes() + self.dirty_bytes(bars) + final_sections
    }

    /// Whether END has been produced and read.
    pub fn is_finished(&self) -> bool {
        self.finished && self.pending() == 0
    }

    fn memory_section(&mut self, bar: usize, offset: usize, data: &[u8]) {
        let mut head = memory_head(bar, offset, data.len());
        seal_memory_head(&mut head, data);
        self.out.extend_from_slice(&head);
        self.out.extend_from_slice(data);
    }

    /// Produce the next piece of initial data; false when there is none left. The memory is
    /// read straight into the stream buffer (one copy) and from there into the shadow.
    fn step_initial(&mut self, bars: &[Option<SharedMemory>; 6]) -> bool {
        let mut out = std::mem::take(&mut self.out);
        let produced = self.initial_section(bars, &mut out, usize::MAX);
        self.out = out;
        produced
    }

    /// Append the next section of initial data to `out` if it fits in `room` bytes; false
    /// when there is none left or it does not fit.
    fn initial_section(
        &mut self,
        bars: &[Option<SharedMemory>; 6],
        out: &mut Vec<u8>,
        room: usize,
    ) -> bool {
        let Some((si, off)) = self.initial else {
            return false;
        };
        let (bar, len) = self.regions[si];
        let n = (len - off).min(MEMORY_CHUNK);
        if MEMORY_HEAD_LEN + n > room {
            return false;
        }
        let at = out.len();
        out.extend_from_slice(&memory_head(bar, off, n));
        let data = out.len();
        let copied = bars[bar]
            .as_ref()
            .is_some_and(|mem| mem.append_to(off as u64, n, out).is_ok());
        if !copied {
            out.resize(data + n, 0);
        }
        if let Some(shadows) = &mut self.shadows {
            shadows[si][off..off + n].copy_from_slice(&out[data..]);
        }
        let (head, data) = out[at..].split_at_mut(MEMORY_HEAD_LEN);
        seal_memory_head(head, data);
        self.next_initial(si, off + n);
        true
    }

    /// [`Saver::initial_section`] leaving the memory where it is: the section's header goes
    /// into `out` and the memory is noted in `parts` (its CRC computed over the mapping), to
    /// be sent from the mapping. Only where nothing can change while saving (a stream started
    /// in STOP keeps no shadow); false when there is nothing left, it does not fit, or the
    /// memory cannot be referenced (then the copying path takes over).
    fn initial_section_mapped(
        &mut self,
        bars: &[Option<SharedMemory>; 6],
        out: &mut Vec<u8>,
        parts: &mut Vec<MemoryPart>,
        room: usize,
    ) -> bool {
        let (Some((si, off)), None) = (self.initial, &self.shadows) else {
            return false;
        };
        // The last section is cut to the room left, so replies stay full: a section split
        // across two replies would have to go through the stream buffer, copied.
        let (bar, len) = self.regions[si];
        let Some(room) = room.checked_sub(MEMORY_HEAD_LEN).filter(|r| *r > 0) else {
            return false;
        };
        let n = (len - off).min(MEMORY_CHUNK).min(room);
        let Some(data) = bars[bar]
            .as_ref()
            .and_then(|m| m.bytes_while_stopped(off as u64, n).ok())
        else {
            return false;
        };
        let mut head = memory_head(bar, off, n);
        seal_memory_head(&mut head, data);
        out.extend_from_slice(&head);
        parts.push(MemoryPart {
            at: out.len(),
            bar,
            offset: off,
            len: n,
        });
        self.next_initial(si, off + n);
        true
    }

    /// Move the initial copy on to `off` in shared BAR `si`, or to the next BAR at its end.
    fn next_initial(&mut self, si: usize, off: usize) {
        self.initial = if off < self.regions[si].1 {
            Some((si, off))
        } else if si + 1 < self.regions.len() {
            Some((si + 1, 0))
        } else {
            None
        };
    }

    /// Produce sections for pages that changed since sent; false when nothing changed. In
    /// stop-copy (`parallel`) the pass is split across CPUs: it is the downtime's longest step
    /// and memory-bound, while in pre-copy the CPUs belong to the running VM.
    fn step_delta(&mut self, bars: &[Option<SharedMemory>; 6], parallel: bool) -> bool {
        let Some(mut shadows) = self.shadows.take() else {
            return false;
        };
        let before = self.pending();
        let threads = match parallel {
            true => std::thread::available_parallelism().map_or(1, |n| n.get().min(SCAN_THREADS)),
            false => 1,
        };
        for (&(bar, _), shadow) in self.regions.clone().iter().zip(shadows.iter_mut()) {
            let Some(mem) = &bars[bar] else { continue };
            for run in changed_runs(mem, shadow, threads) {
                self.delta_bytes += run.len() as u64;
                let mut off = run.start;
                while off < run.end {
                    let n = (run.end - off).min(MEMORY_CHUNK);
                    self.memory_section(bar, off, &shadow[off..off + n]);
                    off += n;
                }
            }
        }
        self.shadows = Some(shadows);
        self.pending() > before
    }

    /// Up to `max` bytes as a new buffer; see [`Saver::read_into`].
    pub fn read(
        &mut self,
        max: usize,
        bars: &[Option<SharedMemory>; 6],
        final_state: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>>,
    ) -> Result<Vec<u8>, crate::DeviceError> {
        let mut v = Vec::new();
        self.read_into(&mut v, max, bars, final_state)?;
        Ok(v)
    }

    /// [`Saver::read_into`] for a MIG_DATA_READ reply: device memory that cannot change
    /// while saving (a stream started in STOP) is not copied into `dst` but noted in `parts`,
    /// for the reply to be sent from the mapping (one copy fewer, by the kernel). The count
    /// returned includes those bytes.
    pub fn read_reply(
        &mut self,
        dst: &mut Vec<u8>,
        parts: &mut Vec<MemoryPart>,
        max: usize,
        bars: &[Option<SharedMemory>; 6],
        final_state: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>>,
    ) -> Result<usize, crate::DeviceError> {
        // What is queued goes first (the stream header, at the start).
        let mut n = 0;
        if self.pending() <= max {
            n = self.take_pending(dst, max);
        }
        if self.pending() == 0 {
            while self.initial_section_mapped(bars, dst, parts, max - n) {
                n += MEMORY_HEAD_LEN + parts.last().map_or(0, |p| p.len);
            }
        }
        Ok(n + self.read_into(dst, max - n, bars, final_state)?)
    }

    /// Move up to `max` queued bytes to `dst`; how many.
    fn take_pending(&mut self, dst: &mut Vec<u8>, max: usize) -> usize {
        let n = self.pending().min(max);
        dst.extend_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        } else if self.pos >= MEMORY_CHUNK * 4 {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
        n
    }

    /// Append up to `max` bytes to `dst` (e.g. straight after a MIG_DATA_READ reply header);
    /// returns how many. In pre-copy (`final_state` = None) only memory is produced and a
    /// short result means "nothing more for now"; in stop-copy the final sections and END
    /// follow, and an empty result means the stream is complete.
    pub fn read_into(
        &mut self,
        dst: &mut Vec<u8>,
        max: usize,
        bars: &[Option<SharedMemory>; 6],
        final_state: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>>,
    ) -> Result<usize, crate::DeviceError> {
        let stop_copy = final_state.is_some();
        let mut final_state = final_state;
        // Nothing queued: whole sections of initial data go straight into `dst` (the reply),
        // sparing the copy through the stream buffer.
        let mut direct = 0;
        if self.pending() == 0 {
            let start = dst.len();
            while self.initial_section(bars, dst, max - (dst.len() - start)) {}
            direct = dst.len() - start;
        }
        let max = max - direct;
        // At most one pass over device memory per call: a pass that finds nothing means
        // nothing more for now (pre-copy) or time for the final sections (stop-copy).
        let mut scanned = false;
        while self.pending() < max {
            if self.step_initial(bars) {
                continue;
            }
            if !self.finished && !scanned && !self.stopped_scan_done {
                scanned = true;
                self.stopped_scan_done = stop_copy;
                if self.step_delta(bars, stop_copy) {
                    continue;
                }
            }
            match final_state.as_mut() {
                Some(f) if stop_copy && !self.finished => {
                    let st = f()?;
                    put_section(&mut self.out, kind::CONFIG, &st.config);
                    put_section(&mut self.out, kind::IRQ_STATE, &st.irq);
                    put_section(&mut self.out, kind::MSIX_TABLE, &st.msix);
                    let mut d = st.device.version.to_le_bytes().to_vec();
                    d.extend_from_slice(&st.device.payload);
                    put_section(&mut self.out, kind::DEVICE_STATE, &d);
                    put_section(&mut self.out, kind::END, &[]);
                    self.finished = true;
                }
                _ => break,
            }
        }
        if max == 0 {
            return Ok(direct);
        }
        Ok(direct + self.take_pending(dst, max))
    }

    /// Bytes the stop-copy phase would still produce (estimate for MIG_DATA_SIZE).
    pub fn stop_copy_estimate(&self, bars: &[Option<SharedMemory>; 6]) -> u64 {
        self.initial_bytes() + self.dirty_bytes(bars) + 8192
    }
}

/// Bytes of a BAR_MEMORY section before its data: the section header and `{bar, pad, offset}`.
const MEMORY_HEAD_LEN: usize = SECTION_HEADER_LEN + 16;

/// The head of a BAR_MEMORY section of `n` bytes of BAR `bar` at `offset`, its CRC still zero
/// (see [`seal_memory_head`]).
fn memory_head(bar: usize, offset: usize, n: usize) -> [u8; MEMORY_HEAD_LEN] {
    let mut head = [0u8; MEMORY_HEAD_LEN];
    head[..2].copy_from_slice(&kind::BAR_MEMORY.to_le_bytes());
    head[8..16].copy_from_slice(&((16 + n) as u64).to_le_bytes());
    head[16] = bar as u8;
    head[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
    head
}

/// Put the section CRC into `head` (from [`memory_head`]) for `data`: the CRC covers kind,
/// flags, length and the payload (`{bar, pad, offset}` then the data), as
/// `section_crc` computes it, without the data having to follow the head in memory.
fn seal_memory_head(head: &mut [u8], data: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[..4]);
    crc.update(&head[8..MEMORY_HEAD_LEN]);
    crc.update(data);
    head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// Most threads one stop-copy pass over device memory uses.
const SCAN_THREADS: usize = 4;
/// Memory smaller than this is compared on one thread (spawning would cost more).
const PARALLEL_MIN: usize = 16 << 20;

/// Compare `mem` with `shadow` page by page, copy each changed page into `shadow`, and
/// return the runs of changed pages as byte ranges, in order. Memory of at least
/// [`PARALLEL_MIN`] bytes is split across `threads` scoped threads, each owning a disjoint
/// part of the shadow.
fn changed_runs(mem: &SharedMemory, shadow: &mut [u8], threads: usize) -> Vec<Range<usize>> {
    if threads <= 1 || shadow.len() < PARALLEL_MIN {
        return scan(mem, shadow, 0);
    }
    let per = shadow.len().div_ceil(threads).next_multiple_of(PAGE);
    std::thread::scope(|s| {
        let parts: Vec<_> = shadow
            .chunks_mut(per)
            .enumerate()
            .map(|(i, part)| s.spawn(move || scan(mem, part, i * per)))
            .collect();
        let mut runs: Vec<Range<usize>> = Vec::new();
        for part in parts {
            let found = part.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            for r in found {
                match runs.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => runs.push(r),
                }
            }
        }
        runs
    })
}

/// [`changed_runs`] over one part of the shadow, which starts at byte `base` of `mem`.
fn scan(mem: &SharedMemory, shadow: &mut [u8], base: usize) -> Vec<Range<usize>> {
    let mut page = [0u8; PAGE];
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, s) in shadow.chunks_mut(PAGE).enumerate() {
        let off = base + i * PAGE;
        let p = &mut page[..s.len()];
        if mem.read(off as u64, p).is_err() || p == s {
            continue;
        }
        s.copy_from_slice(p);
        match runs.last_mut() {
            Some(r) if r.end == off => r.end = off + p.len(),
            _ => runs.push(off..off + p.len()),
        }
    }
    runs
}
