//! [`Loader`]: consumes the stream on the destination, validating as bytes arrive.

use super::*;
use crate::migration::DeviceState;

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

/// BAR memory restored from the stream: the BAR's bytes as the stream left them, and which
/// pages the stream wrote.
#[derive(Debug)]
pub struct StagedBar {
    /// The bytes (the BAR's size).
    pub data: Vec<u8>,
    /// Pages the stream wrote.
    pub touched: Vec<bool>,
}

/// What a complete, valid stream restores.
#[derive(Debug, Default)]
pub struct Staged {
    /// Header.
    pub header: Option<StreamHeader>,
    /// BAR memory, per BAR.
    pub memory: [Option<StagedBar>; 6],
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
                if h.model != self.shape.model {
                    return Err(StreamError::ModelMismatch {
                        got: h.model,
                        want: self.shape.model.clone(),
                    });
                }
                self.staged.header = Some(h);
            }
            kind::BAR_MEMORY => self.stage_memory(&p)?,
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

    /// `{bar u8, pad[7], offset u64, bytes}` into the BAR's staging copy.
    fn stage_memory(&mut self, p: &[u8]) -> Result<(), StreamError> {
        if p.len() < 16 {
            return Err(StreamError::Malformed("BAR memory"));
        }
        let bar = usize::from(p[0]);
        let size = *self
            .shape
            .bars
            .get(bar)
            .ok_or(StreamError::NoSuchBar(p[0]))?;
        if size == 0 {
            return Err(StreamError::NoSuchBar(p[0]));
        }
        let offset = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
        let data = &p[16..];
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= size);
        let Some(end) = end else {
            return Err(StreamError::OutOfRange {
                bar: p[0],
                offset,
                len: data.len() as u64,
            });
        };
        let staged = self.staged.memory[bar].get_or_insert_with(|| StagedBar {
            data: vec![0; size as usize],
            touched: vec![false; (size as usize).div_ceil(PAGE)],
        });
        staged.data[offset as usize..end as usize].copy_from_slice(data);
        let first = offset as usize / PAGE;
        let last = (end as usize).div_ceil(PAGE);
        staged.touched[first..last]
            .iter_mut()
            .for_each(|t| *t = true);
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
