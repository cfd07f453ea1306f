//! [`Loader`]: consumes the stream on the destination, validating as bytes arrive.

use super::*;
use crate::migration::DeviceState;

/// What a complete, valid stream restores.
#[derive(Debug, Default)]
pub struct Staged {
    /// Header.
    pub header: Option<StreamHeader>,
    /// BAR memory writes (the stream's sections merged: later bytes win), by BAR and offset.
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

/// Largest CONFIG section (PCIe extended config space).
const MAX_CONFIG_LEN: usize = 4096;
/// Largest MSI-X table image (2048 vectors of 16 bytes).
const MAX_MSIX_LEN: usize = 2048 * 16;
/// Largest interrupt-state section.
const MAX_IRQ_LEN: usize = 64 * 1024;

/// BAR memory as it arrives: one image per BAR, allocated at the BAR's size on its first
/// section, and the byte ranges the stream covered (merged). However many rounds of dirty
/// pages a pre-copy sends, staging never holds more than the device's own BAR memory.
#[derive(Debug, Default)]
struct BarImage {
    bytes: Vec<u8>,
    covered: std::collections::BTreeMap<u64, u64>,
}

impl BarImage {
    fn put(&mut self, size: usize, off: u64, data: &[u8]) {
        if self.bytes.is_empty() {
            self.bytes = vec![0; size];
        }
        let (mut s, mut e) = (off, off + data.len() as u64);
        self.bytes[s as usize..e as usize].copy_from_slice(data);
        // Merge with every covered range that touches [s, e).
        let before = self
            .covered
            .range(..s)
            .next_back()
            .filter(|(_, re)| **re >= s);
        let touching: Vec<(u64, u64)> = before
            .into_iter()
            .chain(self.covered.range(s..=e))
            .map(|(rs, re)| (*rs, *re))
            .collect();
        for (rs, re) in touching {
            self.covered.remove(&rs);
            s = s.min(rs);
            e = e.max(re);
        }
        self.covered.insert(s, e);
    }
}

/// Consumes the stream on the destination, validating as bytes arrive.
#[derive(Debug)]
pub struct Loader {
    model: String,
    bar_sizes: [usize; 6],
    bars: [BarImage; 6],
    buf: Vec<u8>,
    consumed: u64,
    staged: Staged,
    ended: bool,
    poisoned: Option<String>,
}

impl Loader {
    /// A loader for device model `model` whose device has no BAR memory (see
    /// [`Loader::with_bar_sizes`]).
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            bar_sizes: [0; 6],
            bars: Default::default(),
            buf: Vec::new(),
            consumed: 0,
            staged: Staged::default(),
            ended: false,
            poisoned: None,
        }
    }

    /// The sizes of the device's own BAR memory (0 = none): BAR_MEMORY sections must fall
    /// inside them, and they bound what staging holds.
    pub fn with_bar_sizes(mut self, sizes: [usize; 6]) -> Self {
        self.bar_sizes = sizes;
        self
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
                let bar = usize::from(p[0]);
                let off = u64::from_le_bytes(p[8..16].try_into().unwrap_or_default());
                let size = self.bar_sizes[bar];
                let data = &p[16..];
                if !matches!(off.checked_add(data.len() as u64), Some(e) if e <= size as u64) {
                    return Err(StreamError::Malformed("BAR memory outside the BAR"));
                }
                self.bars[bar].put(size, off, data);
            }
            kind::CONFIG if p.len() <= MAX_CONFIG_LEN => self.staged.config = Some(p),
            kind::IRQ_STATE if p.len() <= MAX_IRQ_LEN => self.staged.irq = Some(p),
            kind::MSIX_TABLE if p.len() <= MAX_MSIX_LEN => self.staged.msix = Some(p),
            kind::CONFIG | kind::IRQ_STATE | kind::MSIX_TABLE => {
                return Err(StreamError::SectionTooLarge(p.len() as u64))
            }
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
    /// BAR memory comes out as one write per covered range, in BAR and offset order.
    pub fn finish(mut self) -> Result<Staged, StreamError> {
        if let Some(p) = self.poisoned {
            return Err(StreamError::Poisoned(p));
        }
        if !self.ended || !self.buf.is_empty() {
            return Err(StreamError::Truncated("no END section"));
        }
        if self.staged.device.is_none() || self.staged.config.is_none() {
            return Err(StreamError::Truncated("device state or config missing"));
        }
        for (bar, img) in self.bars.iter_mut().enumerate() {
            let bytes = std::mem::take(&mut img.bytes);
            for (s, e) in &img.covered {
                let data = bytes[*s as usize..*e as usize].to_vec();
                self.staged.memory.push((bar, *s, data));
            }
        }
        Ok(self.staged)
    }

    /// Bytes consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}
