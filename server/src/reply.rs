//! [`Reply`]: what a request's handler answers — bytes, fds, and device memory sent from
//! where it lies.

use std::os::fd::{AsFd, OwnedFd};

use crate::error::DeviceError;
use crate::mmap::{MemoryPart, SharedMemory};

/// A reply payload and the fds to send with it.
#[derive(Debug, Default)]
pub struct Reply {
    /// Payload after the header (with `memory` spliced in, the bytes around it).
    pub payload: Vec<u8>,
    /// File descriptors.
    pub fds: Vec<OwnedFd>,
    /// Device memory the payload carries by reference, in order: a MIG_DATA_READ reply
    /// of a stopped device is sent from the BAR mapping itself.
    pub memory: Vec<MemoryPart>,
}

impl Reply {
    /// A reply of these bytes.
    pub fn bytes(payload: Vec<u8>) -> Self {
        Self {
            payload,
            ..Self::default()
        }
    }

    /// Payload length on the wire: the bytes plus the memory spliced in.
    pub fn len(&self) -> usize {
        self.payload.len() + self.memory.iter().map(|m| m.len).sum::<usize>()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole payload in one buffer (the memory copied in), for in-process callers.
    pub fn to_bytes(&self, bars: &[Option<SharedMemory>; 6]) -> Result<Vec<u8>, DeviceError> {
        Ok(self.pieces(bars)?.concat())
    }

    /// The payload as the pieces to send back to back: bytes and, where `memory` says, BAR
    /// memory from `bars` (refused if a part lies outside its BAR).
    pub fn pieces<'a>(
        &'a self,
        bars: &'a [Option<SharedMemory>; 6],
    ) -> Result<Vec<&'a [u8]>, DeviceError> {
        let mut out = Vec::with_capacity(2 * self.memory.len() + 1);
        let mut at = 0;
        for m in &self.memory {
            let mem = bars
                .get(m.bar)
                .and_then(Option::as_ref)
                .ok_or_else(|| DeviceError::BadAccess(format!("no memory in BAR {}", m.bar)))?;
            let before = self.payload.get(at..m.at).ok_or_else(|| {
                DeviceError::BadAccess(format!("memory part at {} out of order", m.at))
            })?;
            out.push(before);
            out.push(mem.bytes_while_stopped(m.offset as u64, m.len)?);
            at = m.at;
        }
        out.push(&self.payload[at..]);
        Ok(out)
    }
}

/// Borrow the fds of a reply for sending.
pub fn borrowed(fds: &[OwnedFd]) -> Vec<std::os::fd::BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: Miri cannot run it")]
    fn memory_is_spliced_in_order_and_bad_parts_are_refused() {
        let mut bars: [Option<SharedMemory>; 6] = Default::default();
        let mem = SharedMemory::new("r", 8192).unwrap();
        mem.write(100, b"MEM").unwrap();
        bars[1] = Some(mem);
        let part = |bar, offset, len| MemoryPart {
            at: 2,
            bar,
            offset,
            len,
        };
        let mut r = Reply {
            payload: b"<<>>".to_vec(),
            memory: vec![part(1, 100, 3)],
            ..Reply::default()
        };
        assert_eq!(r.len(), 7);
        assert_eq!(r.to_bytes(&bars).unwrap(), b"<<MEM>>");
        r.memory = vec![part(1, 8190, 3)];
        assert!(r.pieces(&bars).is_err(), "past the end of the BAR");
        r.memory = vec![part(2, 0, 3)];
        assert!(r.pieces(&bars).is_err(), "a BAR without memory");
        r.memory = vec![MemoryPart {
            at: 9,
            ..part(1, 0, 3)
        }];
        assert!(r.pieces(&bars).is_err(), "beyond the payload");
    }
}
