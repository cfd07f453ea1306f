//! [`Loader`]: consumes the stream on the destination, validating as bytes arrive.
//!
//! Device memory (BAR_MEMORY sections) is written into the device's BARs as it arrives,
//! after the BAR's previous contents were copied aside once; a stream that fails (or a
//! restore that is abandoned) puts them back with [`Loader::rollback`]. So the destination is
//! unchanged after a failure, and restoring memory costs nothing inside the downtime beyond
//! the pages the last rounds carry. Everything else is staged and applied when the device
//! leaves RESUMING.

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
    backup: [Option<Vec<u8>>; 6],
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
                let _ = m.write(0, &b);
            }
        }
    }

    fn write_inner(
        &mut self,
        data: &[u8],
        bars: &[Option<SharedMemory>; 6],
    ) -> Result<(), StreamError> {
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
            if k == kind::BAR_MEMORY && self.staged.header.is_some() {
                let buf = std::mem::take(&mut self.buf);
                let r = self.write_memory(&buf[SECTION_HEADER_LEN..total], bars);
                self.buf = buf;
                self.buf.drain(..total);
                self.consumed += total as u64;
                r?;
                continue;
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
            let mut b = vec![0u8; mem.len()];
            mem.read(0, &mut b)
                .map_err(|_| StreamError::Malformed("BAR memory"))?;
            self.backup[bar] = Some(b);
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

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}
