//! [`Loader`]: consumes the stream on the destination, validating as bytes arrive.

use super::*;
use crate::migration::DeviceState;

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
    /// MSI-X table image.
    pub msix: Option<Vec<u8>>,
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
            kind::MSIX_TABLE => self.staged.msix = Some(p),
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
