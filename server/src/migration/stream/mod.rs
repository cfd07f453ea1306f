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

mod loader;
mod saver;
#[cfg(test)]
mod tests;

pub use loader::{Loader, Shape, Staged};
pub use saver::{FinalState, Saver};

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
    /// The MSI-X table (address, data, vector control per vector).
    pub const MSIX_TABLE: u16 = 6;
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
    /// BAR memory for a BAR the device has no memory in.
    #[error("memory for BAR {0}, which has no device memory here")]
    NoSuchBar(u8),
    /// BAR memory outside the BAR.
    #[error("memory {offset:#x}+{len:#x} is outside BAR {bar}")]
    OutOfRange {
        /// BAR.
        bar: u8,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A section whose size must match the device's does not.
    #[error("{what} of {got} bytes, the device has {want}")]
    SizeMismatch {
        /// What.
        what: &'static str,
        /// Size in the stream.
        got: usize,
        /// Size here.
        want: usize,
    },
    /// More than the device declares it can hold.
    #[error("{what} of {len} bytes is more than this device takes ({max})")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Size in the stream.
        len: usize,
        /// Limit.
        max: usize,
    },
}

pub(crate) fn section_crc(kind: u16, flags: u16, payload: &[u8]) -> u32 {
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
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend(FORMAT_VERSION.to_le_bytes());
        p.extend(self.ordering.to_le_bytes());
        p.extend(self.state_version.to_le_bytes());
        p.extend((self.model.len() as u16).to_le_bytes());
        p.extend(self.model.as_bytes());
        p
    }

    pub(crate) fn decode(p: &[u8]) -> Result<Self, StreamError> {
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
