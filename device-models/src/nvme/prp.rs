//! Physical Region Page lists (NVMe 1.4 §4.3): turning PRP1/PRP2 into guest segments, and
//! moving a command's data between those segments and the namespace in restartable steps.
//!
//! Every step is restartable because socket-backed guest memory answers `Pending` until the
//! client's reply is in: the same read (same IOVA, same length) is simply asked again, so the
//! chunking below depends only on the segments and the bytes already done.

use serde::{Deserialize, Serialize};
use vfud_server::dma::Iova;
use vfud_server::{DeviceCtx, DmaError};

use super::spec::{status, PAGE};

/// Largest piece moved with one guest-memory access.
const PIECE: u64 = 128 * 1024;

/// A resolved (or resolving) data pointer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prp {
    /// Guest segments (IOVA, length), in transfer order.
    pub segs: Vec<(u64, u32)>,
    /// Next PRP list entry to read, while the list is being read.
    pub list: u64,
    /// Bytes not yet covered by `segs`.
    pub left: u64,
}

/// Why a step stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// Waiting for the client's DMA reply; retry later.
    Pending,
    /// The command fails with this status.
    Status(u16),
}

impl From<DmaError> for Stop {
    fn from(e: DmaError) -> Self {
        match e {
            DmaError::Pending => Stop::Pending,
            e => {
                tracing::debug!("nvme: guest memory access failed: {e}");
                Stop::Status(status::DATA_TRANSFER_ERROR)
            }
        }
    }
}

fn push(segs: &mut Vec<(u64, u32)>, iova: u64, len: u64) {
    if let Some(last) = segs.last_mut() {
        if last.0 + u64::from(last.1) == iova {
            last.1 += len as u32;
            return;
        }
    }
    segs.push((iova, len as u32));
}

impl Prp {
    /// Start resolving a transfer of `len` bytes described by PRP1/PRP2.
    pub fn new(prp1: u64, prp2: u64, len: u64) -> Result<Self, Stop> {
        if prp1 & 3 != 0 {
            return Err(Stop::Status(status::INVALID_PRP_OFFSET));
        }
        let mut p = Prp::default();
        let first = len.min(PAGE - prp1 % PAGE);
        push(&mut p.segs, prp1, first);
        let rest = len - first;
        if rest == 0 {
            return Ok(p);
        }
        if rest <= PAGE {
            if !prp2.is_multiple_of(PAGE) {
                return Err(Stop::Status(status::INVALID_PRP_OFFSET));
            }
            push(&mut p.segs, prp2, rest);
            return Ok(p);
        }
        if prp2 & 7 != 0 {
            return Err(Stop::Status(status::INVALID_PRP_OFFSET));
        }
        p.list = prp2;
        p.left = rest;
        Ok(p)
    }

    /// Read the PRP list until every byte has a segment.
    pub fn resolve(&mut self, cx: &mut DeviceCtx<'_>) -> Result<(), Stop> {
        while self.left > 0 {
            let in_page = (PAGE - self.list % PAGE) / 8;
            let needed = self.left.div_ceil(PAGE);
            // The last entry of a list page points to the next list page when more follow.
            let chained = needed > in_page;
            let n = if chained { in_page } else { needed };
            let mut raw = vec![0u8; n as usize * 8];
            cx.mem().read(Iova(self.list), &mut raw)?;
            let entries: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            let data = if chained {
                &entries[..n as usize - 1]
            } else {
                &entries[..]
            };
            for &e in data {
                if e % PAGE != 0 {
                    return Err(Stop::Status(status::INVALID_PRP_OFFSET));
                }
                let l = self.left.min(PAGE);
                push(&mut self.segs, e, l);
                self.left -= l;
            }
            if chained {
                let next = entries[n as usize - 1];
                if next & 7 != 0 {
                    return Err(Stop::Status(status::INVALID_PRP_OFFSET));
                }
                self.list = next;
            }
        }
        Ok(())
    }

    /// The next piece at byte `done` of the transfer: (IOVA, length).
    fn piece(&self, done: u64) -> Option<(u64, u64)> {
        let mut at = 0u64;
        for &(iova, len) in &self.segs {
            let len = u64::from(len);
            if done < at + len {
                let skip = done - at;
                return Some((iova + skip, (len - skip).min(PIECE)));
            }
            at += len;
        }
        None
    }

    /// Guest → `sink(bytes, transfer offset)`, from `*done` on, at most `budget` bytes;
    /// `*done` advances as pieces complete.
    pub fn gather(
        &self,
        done: &mut u64,
        budget: &mut u64,
        cx: &mut DeviceCtx<'_>,
        mut sink: impl FnMut(&[u8], u64) -> Result<(), Stop>,
    ) -> Result<bool, Stop> {
        let mut buf = Vec::new();
        while let Some((iova, n)) = self.piece(*done) {
            if *budget == 0 {
                return Ok(false);
            }
            buf.resize(n as usize, 0);
            cx.mem().read(Iova(iova), &mut buf)?;
            sink(&buf, *done)?;
            *done += n;
            *budget = budget.saturating_sub(n);
        }
        Ok(true)
    }

    /// `source(buffer, transfer offset)` → guest, from `*done` on, at most `budget` bytes.
    pub fn scatter(
        &self,
        done: &mut u64,
        budget: &mut u64,
        cx: &mut DeviceCtx<'_>,
        mut source: impl FnMut(&mut [u8], u64) -> Result<(), Stop>,
    ) -> Result<bool, Stop> {
        let mut buf = Vec::new();
        while let Some((iova, n)) = self.piece(*done) {
            if *budget == 0 {
                return Ok(false);
            }
            buf.resize(n as usize, 0);
            source(&mut buf, *done)?;
            cx.mem().write(Iova(iova), &buf)?;
            *done += n;
            *budget = budget.saturating_sub(n);
        }
        Ok(true)
    }
}
