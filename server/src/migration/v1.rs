//! The v1 migration region (index 9, type 3 / subtype 1): registers at offset 0 laid out as
//! the kernel's `struct vfio_device_migration_info` (kernel ≤ 5.17 `vfio.h`), data window at
//! [`V1_WINDOW_OFFSET`], mapped onto the same state machine and stream as v2.
//!
//! `pending_bytes` follows the kernel's v1 semantics (`vfio.h` before 5.18, "sequence to be
//! followed while in pre-copy state"): the bytes still to be saved, counting the chunk in the
//! window until it has been consumed; repeated reads have no side effect. Reading
//! `data_offset` stages the next chunk in the window when the previous one was consumed, and
//! `data_size` gives its size; the next read of `pending_bytes` after `data_size` marks the
//! chunk consumed.

use vfud_protocol::messages::feature::{v1, vfud};
use vfud_protocol::messages::region::{RegionCap, RegionInfo, REGION_FLAG_READ, REGION_FLAG_WRITE};
use vfud_protocol::messages::MigState;

use super::session::{MigrationSession, Parts};
use crate::error::{MigrationError, RequestError};
use crate::pci::Access;

/// Index of the v1 migration region.
pub const V1_REGION_INDEX: u32 = 9;
/// Offset of the v1 data window in its region.
pub const V1_WINDOW_OFFSET: u64 = 4096;
/// Size of the v1 data window.
pub const V1_WINDOW_SIZE: usize = 1 << 20;

/// State of the v1 region's data window.
#[derive(Debug, Default)]
pub struct V1Region {
    window: Vec<u8>,
    staged: usize,
    size_read: bool,
}

impl V1Region {
    fn window(&mut self) -> &mut Vec<u8> {
        if self.window.len() < V1_WINDOW_SIZE {
            self.window.resize(V1_WINDOW_SIZE, 0);
        }
        &mut self.window
    }
}

/// REGION_INFO of the v1 migration region: its size, the migration type capability and
/// vfud's ordering capability (the same 8 bytes as DEVICE_FEATURE 0x4002).
pub fn region_info(ordering_flags: u32) -> (RegionInfo, Vec<RegionCap>) {
    let info = RegionInfo {
        argsz: 0,
        flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
        index: V1_REGION_INDEX,
        cap_offset: 0,
        size: V1_WINDOW_OFFSET + V1_WINDOW_SIZE as u64,
        offset: 0,
    };
    let ordering = vfud_protocol::wire::encode(&vfud::MigrationOrdering {
        flags: ordering_flags,
        reserved: 0,
    });
    let caps = vec![
        RegionCap::Type {
            region_type: v1::REGION_TYPE_MIGRATION,
            subtype: v1::REGION_SUBTYPE_MIGRATION,
        },
        RegionCap::Other {
            id: vfud::REGION_CAP_MIGRATION_ORDERING,
            version: 1,
            data: ordering,
        },
    ];
    (info, caps)
}

fn v1_err(msg: impl Into<String>) -> RequestError {
    MigrationError::V1(msg.into()).into()
}

impl MigrationSession {
    /// A REGION_READ/WRITE of the v1 migration region.
    pub fn v1_access(
        &mut self,
        offset: u64,
        access: Access<'_>,
        parts: &mut Parts<'_>,
    ) -> Result<(), RequestError> {
        let len = access.len();
        if offset >= V1_WINDOW_OFFSET {
            let off = (offset - V1_WINDOW_OFFSET) as usize;
            let end = off.checked_add(len).filter(|e| *e <= V1_WINDOW_SIZE);
            let end = end.ok_or_else(|| v1_err("access outside the data window"))?;
            let w = self
                .v1
                .as_mut()
                .ok_or(RequestError::NoRegion(V1_REGION_INDEX))?
                .window();
            match access {
                Access::Read(buf) => buf.copy_from_slice(&w[off..end]),
                Access::Write(data) => w[off..end].copy_from_slice(data),
            }
            return Ok(());
        }
        let reg = match (offset, len) {
            (v1::OFF_DEVICE_STATE, 4) => v1::OFF_DEVICE_STATE,
            (o @ (v1::OFF_PENDING_BYTES | v1::OFF_DATA_OFFSET | v1::OFF_DATA_SIZE), 8) => o,
            _ => {
                return Err(v1_err(format!(
                    "register access of {len} bytes at {offset:#x}"
                )))
            }
        };
        match access {
            Access::Read(buf) => {
                let v: u64 = match reg {
                    v1::OFF_DEVICE_STATE => u64::from(v1::bits_for(self.state())),
                    v1::OFF_PENDING_BYTES => self.v1_pending(parts)?,
                    v1::OFF_DATA_OFFSET => {
                        self.v1_stage(parts)?;
                        V1_WINDOW_OFFSET
                    }
                    _ => {
                        let r = self.v1_region()?;
                        r.size_read = true;
                        r.staged as u64
                    }
                };
                buf.copy_from_slice(&v.to_le_bytes()[..len]);
            }
            Access::Write(data) => match reg {
                v1::OFF_DEVICE_STATE => {
                    let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    let target = v1::state_for(bits)
                        .ok_or_else(|| v1_err(format!("invalid device_state {bits:#x}")))?;
                    self.set_state(target, parts)?;
                    let r = self.v1_region()?;
                    r.staged = 0;
                    r.size_read = false;
                }
                v1::OFF_DATA_SIZE => {
                    if self.state() != MigState::Resuming {
                        return Err(v1_err("data_size is written only while resuming"));
                    }
                    let n = u64::from_le_bytes(data.try_into().unwrap_or_default());
                    let r = self.v1_region()?;
                    if n > V1_WINDOW_SIZE as u64 || (r.window.len() as u64) < n {
                        return Err(v1_err("data_size larger than the data window"));
                    }
                    let chunk = r.window[..n as usize].to_vec();
                    self.write_stream(&chunk, parts.function)?;
                }
                _ => return Err(v1_err("register is read-only")),
            },
        }
        Ok(())
    }

    fn v1_region(&mut self) -> Result<&mut V1Region, RequestError> {
        self.v1
            .as_mut()
            .ok_or(RequestError::NoRegion(V1_REGION_INDEX))
    }

    /// `pending_bytes`: the chunk in the window (until consumed) plus what the saver has left.
    fn v1_pending(&mut self, parts: &mut Parts<'_>) -> Result<u64, RequestError> {
        let stop_copy = self.state() == MigState::StopCopy;
        let r = self.v1_region()?;
        if r.size_read {
            r.staged = 0;
            r.size_read = false;
        }
        let staged = r.staged as u64;
        let rest = match self.saver() {
            Some(s) if matches!(self.state(), MigState::PreCopy | MigState::StopCopy) => {
                s.remaining(parts.function.bars(), stop_copy)
            }
            _ => 0,
        };
        Ok(staged + rest)
    }

    /// Stage the next chunk of the save stream in the window (unless one is there, not yet
    /// consumed); returns its size.
    fn v1_stage(&mut self, parts: &mut Parts<'_>) -> Result<usize, RequestError> {
        if !matches!(self.state(), MigState::PreCopy | MigState::StopCopy) {
            return Ok(0);
        }
        if self.v1_region()?.staged == 0 {
            let data = self.read_stream(V1_WINDOW_SIZE, parts)?;
            let r = self.v1_region()?;
            r.window()[..data.len()].copy_from_slice(&data);
            r.staged = data.len();
            r.size_read = false;
        }
        Ok(self.v1_region()?.staged)
    }
}
