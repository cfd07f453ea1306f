//! vfud's migration stream: a sequence of sections, each `{kind u16, flags u16, crc32 u32,
//! len u64}` followed by `len` bytes. The CRC32 (`crc32fast`) covers kind, flags, len and the
//! payload, so any single-bit flip anywhere is detected (a longer `len` runs past the end and
//! is refused as truncated).
//!
//! Sections, in order:
//! 1. `HEADER`: magic `VFUDMIG1`, format version, ordering flags
//!    (`vfud::ORDERING_*`), device state version, device model name.
//! 2. `BAR_MEMORY` (any number): `{bar u8, pad[7], offset u64, bytes}` — device-owned BAR
//!    memory; first a full copy (pre-copy's initial data), then pages that changed since they
//!    were sent.
//! 3. `CONFIG`: the PCI config space image.
//! 4. `IRQ_STATE`: pending interrupt bits.
//! 5. `DEVICE_STATE`: `{version u16, payload}` of the device's own state struct.
//! 6. `END`.
//!
//! The destination stages everything and applies it only when it leaves RESUMING with a
//! complete, valid stream; otherwise the device is left exactly as it was.

use crate::migration::DeviceState;
use crate::mmap::SharedMemory;

/// First bytes of the header section's payload.
pub const MAGIC: [u8; 8] = *b"VFUDMIG1";
/// Stream format version.
pub const FORMAT_VERSION: u16 = 1;
/// Section size on the wire before the payload.
pub const SECTION_HEADER_LEN: usize = 16;
/// Largest section the loader accepts.
pub const MAX_SECTION_LEN: u64 = 64 << 20;
/// Page granularity of BAR memory deltas.
pub const PAGE: usize = 4096;
/// Largest BAR_MEMORY payload the saver makes.
pub const MEMORY_CHUNK: usize = 256 * 1024;

/// Section kinds.
pub mod kind {
    /// Stream header.
    pub const HEADER: u16 = 1;
    /// Config space image.
    pub const CONFIG: u16 = 2;
    /// Device state.
    pub const DEVICE_STATE: u16 = 3;
    /// Device-owned BAR memory.
    pub const BAR_MEMORY: u16 = 4;
    /// Interrupt state.
    pub const IRQ_STATE: u16 = 5;
    /// End of stream.
    pub const END: u16 = 0xffff;
}

/// Stream errors, reported on MIG_DATA_WRITE or when leaving RESUMING.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// A section's CRC does not match.
    #[error("section {kind:#x} at stream offset {offset}: CRC mismatch")]
    CrcMismatch {
        /// Section kind as read.
        kind: u16,
        /// Offset of the section in the stream.
        offset: u64,
    },
    /// The first section is not a valid header.
    #[error("not a vfud migration stream (bad magic or header)")]
    BadMagic,
    /// Data after END.
    #[error("data after the end of the stream")]
    DataAfterEnd,
    /// Unsupported stream format version.
    #[error("stream format version {0} is not supported (this build reads {FORMAT_VERSION})")]
    FormatVersion(u16),
    /// A section is malformed.
    #[error("malformed {0} section")]
    Malformed(&'static str),
    /// The stream is for another device model.
    #[error("stream is for device {got:?}, this is {want:?}")]
    ModelMismatch {
        /// Model in the stream.
        got: String,
        /// This device.
        want: String,
    },
    /// An earlier error poisoned the load.
    #[error("stream rejected earlier: {0}")]
    Poisoned(String),
    /// A section is larger than the loader accepts.
    #[error("section of {0} bytes is too large")]
    SectionTooLarge(u64),
    /// The stream ended early.
    #[error("stream truncated: {0}")]
    Truncated(&'static str),
    /// Unknown section kind.
    #[error("unknown section kind {0:#x}")]
    UnknownSection(u16),
}

fn section_crc(kind: u16, flags: u16, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&kind.to_le_bytes());
    h.update(&flags.to_le_bytes());
    h.update(&(payload.len() as u64).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Append one section to `out`.
pub fn put_section(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&section_crc(kind, 0, payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The stream header's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// `vfud::ORDERING_*` flags of the source device.
    pub ordering: u32,
    /// Device state version.
    pub state_version: u16,
    /// Device model name.
    pub model: String,
}

impl StreamHeader {
    fn encode(&self) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend(FORMAT_VERSION.to_le_bytes());
        p.extend(self.ordering.to_le_bytes());
        p.extend(self.state_version.to_le_bytes());
        p.extend((self.model.len() as u16).to_le_bytes());
        p.extend(self.model.as_bytes());
        p
    }

    fn decode(p: &[u8]) -> Result<Self, StreamError> {
        if p.len() < 18 || p[..8] != MAGIC {
            return Err(StreamError::BadMagic);
        }
        let u16_at = |o: usize| u16::from_le_bytes([p[o], p[o + 1]]);
        let version = u16_at(8);
        if version != FORMAT_VERSION {
            return Err(StreamError::FormatVersion(version));
        }
        let ordering = u32::from_le_bytes([p[10], p[11], p[12], p[13]]);
        let state_version = u16_at(14);
        let n = usize::from(u16_at(16));
        let name = p.get(18..18 + n).ok_or(StreamError::Malformed("header"))?;
        if p.len() != 18 + n {
            return Err(StreamError::Malformed("header"));
        }
        let model =
            String::from_utf8(name.to_vec()).map_err(|_| StreamError::Malformed("header"))?;
        Ok(Self {
            ordering,
            state_version,
            model,
        })
    }
}

/// The final, non-iterable part of the state, captured when stop-copy data runs out.
#[derive(Clone, Debug)]
pub struct FinalState {
    /// Config space image.
    pub config: Vec<u8>,
    /// Interrupt state bytes.
    pub irq: Vec<u8>,
    /// Device state.
    pub device: DeviceState,
}

/// Produces the stream on the source.
#[derive(Debug)]
pub struct Saver {
    /// Produced bytes; `out[pos..]` has not been read yet.
    out: Vec<u8>,
    pos: usize,
    /// Copy of each shared BAR as last sent, to find changed pages.
    shadows: Vec<(usize, Vec<u8>)>,
    /// Next (shadow index, offset) of the initial full copy; `None` once sent.
    initial: Option<(usize, usize)>,
    finished: bool,
    /// Bytes of BAR memory sent after the initial copy.
    pub delta_bytes: u64,
}

impl Saver {
    /// Start a stream: the header is queued at once.
    pub fn new(header: &StreamHeader, bars: &[Option<SharedMemory>; 6]) -> Self {
        let mut out = Vec::new();
        put_section(&mut out, kind::HEADER, &header.encode());
        let shadows = bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|m| (i, vec![0u8; m.len()])))
            .collect::<Vec<_>>();
        let initial = (!shadows.is_empty()).then_some((0, 0));
        Self {
            out,
            pos: 0,
            shadows,
            initial,
            finished: false,
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
                .shadows
                .iter()
                .skip(si)
                .map(|(_, s)| s.len() as u64)
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
        for (bar, shadow) in &self.shadows {
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

    /// Whether END has been produced and read.
    pub fn is_finished(&self) -> bool {
        self.finished && self.pending() == 0
    }

    fn memory_section(&mut self, bar: usize, offset: usize, data: &[u8]) {
        let mut p = Vec::with_capacity(16 + data.len());
        p.push(bar as u8);
        p.extend([0u8; 7]);
        p.extend((offset as u64).to_le_bytes());
        p.extend_from_slice(data);
        put_section(&mut self.out, kind::BAR_MEMORY, &p);
    }

    /// Produce the next piece of initial data; false when there is none left.
    fn step_initial(&mut self, bars: &[Option<SharedMemory>; 6]) -> bool {
        let Some((si, off)) = self.initial else {
            return false;
        };
        let (bar, len) = (self.shadows[si].0, self.shadows[si].1.len());
        let n = (len - off).min(MEMORY_CHUNK);
        let mut chunk = vec![0u8; n];
        if let Some(mem) = &bars[bar] {
            let _ = mem.read(off as u64, &mut chunk);
        }
        self.shadows[si].1[off..off + n].copy_from_slice(&chunk);
        self.memory_section(bar, off, &chunk);
        self.initial = if off + n < len {
            Some((si, off + n))
        } else if si + 1 < self.shadows.len() {
            Some((si + 1, 0))
        } else {
            None
        };
        true
    }

    /// Produce sections for pages that changed since sent; false when nothing changed.
    fn step_delta(&mut self, bars: &[Option<SharedMemory>; 6]) -> bool {
        let before = self.pending();
        let mut page = vec![0u8; PAGE];
        for si in 0..self.shadows.len() {
            let bar = self.shadows[si].0;
            let Some(mem) = &bars[bar] else { continue };
            let len = self.shadows[si].1.len();
            let mut run: Option<(usize, Vec<u8>)> = None;
            let mut off = 0;
            while off < len {
                let n = (len - off).min(PAGE);
                let p = &mut page[..n];
                let _ = mem.read(off as u64, p);
                let changed = p != &self.shadows[si].1[off..off + n];
                if changed {
                    self.shadows[si].1[off..off + n].copy_from_slice(p);
                    match &mut run {
                        Some((_, data)) if data.len() < MEMORY_CHUNK => data.extend_from_slice(p),
                        _ => {
                            if let Some((o, d)) = run.take() {
                                self.delta_bytes += d.len() as u64;
                                self.memory_section(bar, o, &d);
                            }
                            run = Some((off, p.to_vec()));
                        }
                    }
                } else if let Some((o, d)) = run.take() {
                    self.delta_bytes += d.len() as u64;
                    self.memory_section(bar, o, &d);
                }
                off += n;
            }
            if let Some((o, d)) = run.take() {
                self.delta_bytes += d.len() as u64;
                self.memory_section(bar, o, &d);
            }
        }
        self.pending() > before
    }

    /// Fill up to `max` bytes. In pre-copy (`final_state` = None) only memory is produced and
    /// a short result means "nothing more for now"; in stop-copy the final sections and END
    /// follow, and an empty result means the stream is complete.
    pub fn read(
        &mut self,
        max: usize,
        bars: &[Option<SharedMemory>; 6],
        final_state: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>>,
    ) -> Result<Vec<u8>, crate::DeviceError> {
        let stop_copy = final_state.is_some();
        let mut final_state = final_state;
        while self.pending() < max {
            if self.step_initial(bars) {
                continue;
            }
            if !self.finished && self.step_delta(bars) {
                continue;
            }
            match final_state.as_mut() {
                Some(f) if stop_copy && !self.finished => {
                    let st = f()?;
                    put_section(&mut self.out, kind::CONFIG, &st.config);
                    put_section(&mut self.out, kind::IRQ_STATE, &st.irq);
                    let mut d = st.device.version.to_le_bytes().to_vec();
                    d.extend_from_slice(&st.device.payload);
                    put_section(&mut self.out, kind::DEVICE_STATE, &d);
                    put_section(&mut self.out, kind::END, &[]);
                    self.finished = true;
                }
                _ => break,
            }
        }
        let n = self.pending().min(max);
        let chunk = self.out[self.pos..self.pos + n].to_vec();
        self.pos += n;
        if self.pos == self.out.len() {
            self.out.clear();
            self.pos = 0;
        } else if self.pos >= MEMORY_CHUNK * 4 {
            self.out.drain(..self.pos);
            self.pos = 0;
        }
        Ok(chunk)
    }

    /// Bytes the stop-copy phase would still produce (estimate for MIG_DATA_SIZE).
    pub fn stop_copy_estimate(&self, bars: &[Option<SharedMemory>; 6]) -> u64 {
        self.initial_bytes() + self.dirty_bytes(bars) + 8192
    }
}

/// What a complete, valid stream restores.
#[derive(Debug, Default)]
pub struct Staged {
    /// Header.
    pub header: Option<StreamHeader>,
    /// BAR memory writes, in stream order.
    pub memory: Vec<(usize, u64, Vec<u8>)>,
    /// Config image.
    pub config: Option<Vec<u8>>,
    /// Interrupt state.
    pub irq: Option<Vec<u8>>,
    /// Device state.
    pub device: Option<DeviceState>,
}

/// Consumes the stream on the destination, validating as bytes arrive.
#[derive(Debug)]
pub struct Loader {
    model: String,
    buf: Vec<u8>,
    consumed: u64,
    staged: Staged,
    ended: bool,
    poisoned: Option<String>,
}

impl Loader {
    /// A loader for device model `model`.
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            buf: Vec::new(),
            consumed: 0,
            staged: Staged::default(),
            ended: false,
            poisoned: None,
        }
    }

    /// Feed bytes; complete sections are checked and staged. After an error every later
    /// call fails too.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if let Some(p) = &self.poisoned {
            return Err(StreamError::Poisoned(p.clone()));
        }
        let r = self.write_inner(data);
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
        }
        r
    }

    fn write_inner(&mut self, data: &[u8]) -> Result<(), StreamError> {
        if self.ended && !data.is_empty() {
            return Err(StreamError::DataAfterEnd);
        }
        self.buf.extend_from_slice(data);
        loop {
            if self.buf.len() < SECTION_HEADER_LEN {
                return Ok(());
            }
            let b = &self.buf;
            let k = u16::from_le_bytes([b[0], b[1]]);
            let flags = u16::from_le_bytes([b[2], b[3]]);
            let crc = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let len = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
            if len > MAX_SECTION_LEN {
                return Err(StreamError::SectionTooLarge(len));
            }
            let total = SECTION_HEADER_LEN + len as usize;
            if self.buf.len() < total {
                return Ok(());
            }
            let payload = &self.buf[SECTION_HEADER_LEN..total];
            if section_crc(k, flags, payload) != crc {
                return Err(StreamError::CrcMismatch {
                    kind: k,
                    offset: self.consumed,
                });
            }
            if flags != 0 {
                return Err(StreamError::Malformed("section flags"));
            }
            let payload = payload.to_vec();
            self.buf.drain(..total);
            self.consumed += total as u64;
            self.stage(k, payload)?;
            if self.ended && !self.buf.is_empty() {
                return Err(StreamError::DataAfterEnd);
            }
        }
    }

    fn stage(&mut self, k: u16, p: Vec<u8>) -> Result<(), StreamError> {
        if self.staged.header.is_none() && k != kind::HEADER {
            return Err(StreamError::BadMagic);
        }
        match k {
            kind::HEADER => {
                if self.staged.header.is_some() {
                    return Err(StreamError::Malformed("second header"));
                }
                let h = StreamHeader::decode(&p)?;
                if h.model != self.model {
                    return Err(StreamError::ModelMismatch {
                        got: h.model,
                        want: self.model.clone(),
                    });
                }
                self.staged.header = Some(h);
            }
            kind::BAR_MEMORY => {
                if p.len() < 16 || usize::from(p[0]) >= 6 {
                    return Err(StreamError::Malformed("BAR memory"));
                }
                let off = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                self.staged
                    .memory
                    .push((usize::from(p[0]), off, p[16..].to_vec()));
            }
            kind::CONFIG => self.staged.config = Some(p),
            kind::IRQ_STATE => self.staged.irq = Some(p),
            kind::DEVICE_STATE => {
                if p.len() < 2 {
                    return Err(StreamError::Malformed("device state"));
                }
                self.staged.device = Some(DeviceState {
                    version: u16::from_le_bytes([p[0], p[1]]),
                    payload: p[2..].to_vec(),
                });
            }
            kind::END => self.ended = true,
            other => return Err(StreamError::UnknownSection(other)),
        }
        Ok(())
    }

    /// The staged state, only if the stream was complete and valid.
    pub fn finish(self) -> Result<Staged, StreamError> {
        if let Some(p) = self.poisoned {
            return Err(StreamError::Poisoned(p));
        }
        if !self.ended || !self.buf.is_empty() {
            return Err(StreamError::Truncated("no END section"));
        }
        if self.staged.device.is_none() || self.staged.config.is_none() {
            return Err(StreamError::Truncated("device state or config missing"));
        }
        Ok(self.staged)
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bars() -> [Option<SharedMemory>; 6] {
        let mut b: [Option<SharedMemory>; 6] = Default::default();
        b[2] = Some(SharedMemory::new("t", 64 * 1024).unwrap());
        b
    }

    fn header() -> StreamHeader {
        StreamHeader {
            ordering: 2,
            state_version: 1,
            model: "dma-engine".into(),
        }
    }

    fn final_state() -> Result<FinalState, crate::DeviceError> {
        Ok(FinalState {
            config: vec![7; 256],
            irq: vec![0; 4],
            device: DeviceState {
                version: 1,
                payload: b"{}".to_vec(),
            },
        })
    }

    fn whole_stream(b: &[Option<SharedMemory>; 6]) -> Vec<u8> {
        let mut s = Saver::new(&header(), b);
        let mut f = final_state;
        let mut out = Vec::new();
        loop {
            let chunk = s.read(10_000, b, Some(&mut f)).unwrap();
            if chunk.is_empty() {
                break;
            }
            out.extend(chunk);
        }
        out
    }

    #[test]
    fn stream_round_trips_and_stages_memory() {
        let b = bars();
        b[2].as_ref().unwrap().write(100, b"payload").unwrap();
        let s = whole_stream(&b);
        let mut l = Loader::new("dma-engine");
        for c in s.chunks(777) {
            l.write(c).unwrap();
        }
        let st = l.finish().unwrap();
        assert_eq!(st.header.unwrap(), header());
        assert_eq!(st.config.unwrap(), vec![7; 256]);
        let (bar, off, data) = &st.memory[0];
        assert_eq!((*bar, *off), (2, 0));
        assert_eq!(&data[100..107], b"payload");
    }

    #[test]
    fn precopy_reports_shrinking_initial_and_growing_dirty_bytes() {
        let b = bars();
        let mut s = Saver::new(&header(), &b);
        let start = s.initial_bytes();
        assert!(start >= 64 * 1024);
        let first = s.read(16 * 1024, &b, None).unwrap();
        assert_eq!(first.len(), 16 * 1024, "full chunks");
        assert!(s.initial_bytes() < start);
        while !s.read(1 << 20, &b, None).unwrap().is_empty() {}
        assert_eq!(s.initial_bytes(), 0);
        assert_eq!(s.dirty_bytes(&b), 0);
        b[2].as_ref().unwrap().write(5000, &[1]).unwrap();
        assert_eq!(s.dirty_bytes(&b), 4096);
        let delta = s.read(1 << 20, &b, None).unwrap();
        assert!(delta.len() > 4096 && delta.len() < 2 * 4096);
        assert_eq!(s.dirty_bytes(&b), 0);
    }

    #[test]
    fn every_sampled_bit_flip_is_refused() {
        let b = bars();
        let s = whole_stream(&b);
        let step = (s.len() * 8 / 1200).max(1);
        let mut tried = 0;
        for bit in (0..s.len() * 8).step_by(step) {
            let mut m = s.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            let mut l = Loader::new("dma-engine");
            let ok = l.write(&m).is_ok() && l.finish().is_ok();
            assert!(!ok, "flip of bit {bit} accepted");
            tried += 1;
        }
        assert!(tried >= 1000);
    }

    #[test]
    fn wrong_model_and_truncation_are_refused() {
        let b = bars();
        let s = whole_stream(&b);
        let mut l = Loader::new("uart16550");
        assert!(matches!(
            l.write(&s),
            Err(StreamError::ModelMismatch { .. })
        ));
        let mut l = Loader::new("dma-engine");
        l.write(&s[..s.len() - 1]).unwrap();
        assert!(matches!(l.finish(), Err(StreamError::Truncated(_))));
        let mut l = Loader::new("dma-engine");
        assert_eq!(
            l.write(&[0xff; 40]),
            Err(StreamError::SectionTooLarge(u64::MAX))
        );
        let mut l = Loader::new("dma-engine");
        let mut bad = vec![1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0];
        bad.extend([1, 2, 3, 4]);
        assert!(matches!(
            l.write(&bad),
            Err(StreamError::CrcMismatch { offset: 0, .. })
        ));
    }
}
