//! [`Loader`]: consumes the stream on the destination, validating as bytes arrive.
//!
//! Device memory (BAR_MEMORY sections) is written into the device's BARs as it arrives,
//! after the BAR's previous contents were copied aside once ([`Loader::back_up`], when the
//! device enters RESUMING: before the source stops); a stream that fails (or a restore that
//! is abandoned) puts them back with [`Loader::rollback`]. So the destination is unchanged
//! after a failure, and restoring memory costs nothing inside the downtime beyond the pages
//! the last rounds carry. Only the parts of a BAR that hold data are copied aside: a
//! destination's memory is usually fresh, all holes, and then the backup is empty and the
//! rollback gives the pages back. Everything else is staged and applied when the device
//! leaves RESUMING.
//!
//! Sections are checked and applied where they lie in the written bytes; only a section
//! split across two writes is gathered in a buffer first.

use super::*;
use crate::migration::DeviceState;
use crate::mmap::SharedMemory;

/// What the destination device can take. Sections that do not fit are refused as they
/// arrive, so what a peer sends can never make the loader hold more than the device has.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    /// Device model.
    pub model: String,
    /// Size of each shared BAR (0: none).
    pub bars: [u64; 6],
    /// Config space size.
    pub config_len: usize,
    /// Interrupt state size.
    pub irq_len: usize,
    /// MSI-X table size.
    pub msix_len: usize,
    /// Largest device state accepted.
    pub max_device_state: usize,
}

/// What a complete, valid stream restores.
#[derive(Debug, Default)]
pub struct Staged {
    /// Header.
    pub header: Option<StreamHeader>,
    /// Config image.
    pub config: Option<Vec<u8>>,
    /// Interrupt state.
    pub irq: Option<Vec<u8>>,
    /// MSI-X table image.
    pub msix: Option<Vec<u8>>,
    /// Device state.
    pub device: Option<DeviceState>,
}

/// Consumes the stream on the destination, validating as bytes arrive.
#[derive(Debug)]
pub struct Loader {
    shape: Shape,
    buf: Vec<u8>,
    consumed: u64,
    staged: Staged,
    ended: bool,
    poisoned: Option<String>,
    /// Each BAR's contents from before the stream wrote it.
    backup: [Option<Backup>; 6],
}

/// A BAR's contents from before the stream wrote into it: the ranges that held data, each
/// with a copy (everything else was a hole, which reads as zeros).
#[derive(Debug, Default)]
struct Backup {
    parts: Vec<(usize, Vec<u8>)>,
}

impl Backup {
    fn take(mem: &SharedMemory) -> Result<Self, StreamError> {
        let mut parts = Vec::new();
        for r in mem.data_ranges() {
            let mut b = vec![0u8; r.len()];
            mem.read(r.start as u64, &mut b)
                .map_err(|_| StreamError::Malformed("BAR memory"))?;
            parts.push((r.start, b));
        }
        Ok(Self { parts })
    }

    fn restore(self, mem: &SharedMemory) {
        let _ = mem.discard(0, mem.len());
        for (at, b) in self.parts {
            let _ = mem.write(at as u64, &b);
        }
    }
}

impl Loader {
    /// A loader for a device of this shape.
    pub fn new(shape: Shape) -> Self {
        Self {
            shape,
            buf: Vec::new(),
            consumed: 0,
            staged: Staged::default(),
            ended: false,
            poisoned: None,
            backup: Default::default(),
        }
    }

    /// Feed bytes; complete sections are checked, memory is written to `bars` (see the
    /// module docs) and the rest staged. After an error every later call fails too, and the
    /// memory is already rolled back.
    pub fn write(
        &mut self,
        data: &[u8],
        bars: &[Option<SharedMemory>; 6],
    ) -> Result<(), StreamError> {
        if let Some(p) = &self.poisoned {
            return Err(StreamError::Poisoned(p.clone()));
        }
        let r = self.write_inner(data, bars);
        if let Err(e) = &r {
            self.poisoned = Some(e.to_string());
            self.rollback(bars);
        }
        r
    }

    /// Forget BAR `bar`'s backup: the memory the stream wrote is no longer served (a
    /// handover adopted the old process's), and putting the backup back would write into
    /// the adopted memory instead.
    pub fn forget_backup(&mut self, bar: usize) {
        if let Some(b) = self.backup.get_mut(bar) {
            *b = None;
        }
    }

    /// Put back what the stream overwrote in the device's memory.
    pub fn rollback(&mut self, bars: &[Option<SharedMemory>; 6]) {
        for (backup, mem) in self.backup.iter_mut().zip(bars) {
            if let (Some(b), Some(m)) = (backup.take(), mem) {
                b.restore(m);
            }
        }
    }

    /// Copy aside the contents of every BAR this device takes memory for, now rather than
    /// at the first BAR_MEMORY section (which a stop-and-copy receives inside the downtime).
    pub fn back_up(&mut self, bars: &[Option<SharedMemory>; 6]) -> Result<(), StreamError> {
        for (bar, mem) in bars.iter().enumerate() {
            if let Some(mem) = mem
                .as_ref()
                .filter(|m| m.len() as u64 == self.shape.bars[bar])
            {
                if self.backup[bar].is_none() && !mem.is_empty() {
                    self.backup[bar] = Some(Backup::take(mem)?);
                }
            }
        }
        Ok(())
    }

    fn write_inner(
        &mut self,
        mut data: &[u8],
        bars: &[Option<SharedMemory>; 6],
    ) -> Result<(), StreamError> {
        loop {
            if self.ended && !(data.is_empty() && self.buf.is_empty()) {
                return Err(StreamError::DataAfterEnd);
            }
            if !self.buf.is_empty() {
                // Complete the section an earlier write began: its header first, for its
                // length, then the rest.
                let want = section_len(&self.buf)?.unwrap_or(SECTION_HEADER_LEN);
                let take = (want - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < want {
                    return Ok(());
                }
                if section_len(&self.buf)? == Some(self.buf.len()) {
                    let buf = std::mem::take(&mut self.buf);
                    let r = self.section(&buf, bars);
                    self.buf = buf;
                    self.buf.clear();
                    r?;
                }
                continue;
            }
            match section_len(data)? {
                Some(total) if total <= data.len() => {
                    self.section(&data[..total], bars)?;
                    data = &data[total..];
                }
                _ => {
                    self.buf.extend_from_slice(data);
                    return Ok(());
                }
            }
        }
    }

    /// Check and apply one whole section (header included).
    fn section(&mut self, s: &[u8], bars: &[Option<SharedMemory>; 6]) -> Result<(), StreamError> {
        let k = u16::from_le_bytes([s[0], s[1]]);
        let flags = u16::from_le_bytes([s[2], s[3]]);
        let crc = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
        let payload = &s[SECTION_HEADER_LEN..];
        if section_crc(k, flags, payload) != crc {
            return Err(StreamError::CrcMismatch {
                kind: k,
                offset: self.consumed,
            });
        }
        if flags != 0 {
            return Err(StreamError::Malformed("section flags"));
        }
        self.consumed += s.len() as u64;
        if k == kind::BAR_MEMORY && self.staged.header.is_some() {
            return self.write_memory(payload, bars);
        }
        self.stage(k, payload.to_vec())
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
                if h.model != self.shape.model {
                    return Err(StreamError::ModelMismatch {
                        got: h.model,
                        want: self.shape.model.clone(),
                    });
                }
                self.staged.header = Some(h);
            }
            kind::CONFIG => {
                self.staged.config = Some(self.sized(p, "config", self.shape.config_len)?)
            }
            kind::IRQ_STATE => {
                self.staged.irq = Some(self.sized(p, "interrupt state", self.shape.irq_len)?)
            }
            kind::MSIX_TABLE => {
                self.staged.msix = Some(self.sized(p, "MSI-X table", self.shape.msix_len)?)
            }
            kind::DEVICE_STATE => {
                if p.len() < 2 {
                    return Err(StreamError::Malformed("device state"));
                }
                if p.len() - 2 > self.shape.max_device_state {
                    return Err(StreamError::TooLarge {
                        what: "device state",
                        len: p.len() - 2,
                        max: self.shape.max_device_state,
                    });
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

    fn sized(&self, p: Vec<u8>, what: &'static str, want: usize) -> Result<Vec<u8>, StreamError> {
        if p.len() != want {
            return Err(StreamError::SizeMismatch {
                what,
                got: p.len(),
                want,
            });
        }
        Ok(p)
    }

    /// `{bar u8, pad[7], offset u64, bytes}`: checked against the device, then written into
    /// the BAR (whose contents are copied aside the first time).
    fn write_memory(
        &mut self,
        p: &[u8],
        bars: &[Option<SharedMemory>; 6],
    ) -> Result<(), StreamError> {
        if p.len() < 16 {
            return Err(StreamError::Malformed("BAR memory"));
        }
        let bar = usize::from(p[0]);
        let size = *self
            .shape
            .bars
            .get(bar)
            .ok_or(StreamError::NoSuchBar(p[0]))?;
        let mem = bars.get(bar).and_then(Option::as_ref);
        let Some(mem) = mem.filter(|m| size != 0 && m.len() as u64 == size) else {
            return Err(StreamError::NoSuchBar(p[0]));
        };
        let offset = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
        let data = &p[16..];
        if !matches!(offset.checked_add(data.len() as u64), Some(end) if end <= size) {
            return Err(StreamError::OutOfRange {
                bar: p[0],
                offset,
                len: data.len() as u64,
            });
        }
        if self.backup[bar].is_none() {
            self.backup[bar] = Some(Backup::take(mem)?);
        }
        mem.write(offset, data)
            .map_err(|_| StreamError::Malformed("BAR memory"))
    }

    /// The staged state, only if the stream was complete and valid.
    /// Memory was written in place: on failure, or if anything later fails, call
    /// [`Loader::rollback`]; on success drop the loader (and its backups).
    pub fn finish(&mut self) -> Result<Staged, StreamError> {
        if let Some(p) = &self.poisoned {
            return Err(StreamError::Poisoned(p.clone()));
        }
        if !self.ended || !self.buf.is_empty() {
            return Err(StreamError::Truncated("no END section"));
        }
        if self.staged.device.is_none() || self.staged.config.is_none() {
            return Err(StreamError::Truncated("device state or config missing"));
        }
        Ok(std::mem::take(&mut self.staged))
    }

    /// Bytes consumed so far (whole sections).
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

/// The whole length of the section `b` begins with, once its header is there (`None`
/// before); a length over [`MAX_SECTION_LEN`] is refused before anything is buffered for it.
fn section_len(b: &[u8]) -> Result<Option<usize>, StreamError> {
    let Some(h) = b.get(..SECTION_HEADER_LEN) else {
        return Ok(None);
    };
    let len = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    if len > MAX_SECTION_LEN {
        return Err(StreamError::SectionTooLarge(len));
    }
    Ok(Some(SECTION_HEADER_LEN + len as usize))
}
