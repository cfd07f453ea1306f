//! [`GuestMem`]: the bounds- and permission-checked guest-memory handle devices get.

use vm_memory::{Bytes, MemoryRegionAddress};

use super::sigbus::Guard;
use super::socket::SocketDma;
use super::{Backing, DmaTable, Iova};
use crate::error::DmaError;

/// Guest-memory handle given to devices. Every access must lie inside one mapping and respect
/// its permissions. Fd-backed memory is read and written in place; socket-backed memory goes
/// through [`SocketDma`] and may answer [`DmaError::Pending`] (see its docs).
pub struct GuestMem<'a> {
    table: &'a DmaTable,
    socket: Option<&'a mut SocketDma>,
}

impl<'a> GuestMem<'a> {
    /// A handle over `table`; `socket` reaches socket-backed mappings (without it they
    /// answer [`DmaError::ClientUnavailable`]).
    pub fn new(table: &'a DmaTable, socket: Option<&'a mut SocketDma>) -> Self {
        Self { table, socket }
    }

    fn socket(&mut self) -> Result<&mut SocketDma, DmaError> {
        self.socket
            .as_deref_mut()
            .ok_or(DmaError::ClientUnavailable)
    }

    /// Read `buf.len()` bytes at `iova`.
    pub fn read(&mut self, iova: Iova, buf: &mut [u8]) -> Result<(), DmaError> {
        let m = self.table.covering(iova.0, buf.len())?;
        if !m.readable {
            return Err(DmaError::Protection {
                iova: iova.0,
                access: "readable",
            });
        }
        match &m.backing {
            Backing::Mmap { guard, region } => {
                region
                    .read_slice(buf, MemoryRegionAddress(iova.0 - m.iova))
                    .map_err(|e| DmaError::MapFailed(e.to_string()))?;
                revoked(guard, iova)
            }
            Backing::Socket => self.socket()?.read(iova.0, buf),
        }
    }

    /// Write `data` at `iova` (posted for socket-backed memory: see [`GuestMem::settle`]).
    pub fn write(&mut self, iova: Iova, data: &[u8]) -> Result<(), DmaError> {
        let m = self.table.covering(iova.0, data.len())?;
        if !m.writable {
            return Err(DmaError::Protection {
                iova: iova.0,
                access: "writable",
            });
        }
        match &m.backing {
            Backing::Mmap { guard, region } => {
                region
                    .write_slice(data, MemoryRegionAddress(iova.0 - m.iova))
                    .map_err(|e| DmaError::MapFailed(e.to_string()))?;
                revoked(guard, iova)?;
            }
            Backing::Socket => self.socket()?.write(iova.0, data)?,
        }
        m.mark_dirty(iova.0 - m.iova, data.len());
        Ok(())
    }

    /// Whether every write so far has reached guest memory: `Ok` at once for fd-backed
    /// memory, `Pending` while posted socket writes await the client's acknowledgement.
    /// Call it before telling the guest that an operation completed.
    pub fn settle(&mut self) -> Result<(), DmaError> {
        match self.socket.as_deref_mut() {
            Some(s) => s.settle(),
            None => Ok(()),
        }
    }

    /// Read a little-endian u32.
    pub fn read_u32(&mut self, iova: Iova) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.read(iova, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Write a little-endian u32.
    pub fn write_u32(&mut self, iova: Iova, v: u32) -> Result<(), DmaError> {
        self.write(iova, &v.to_le_bytes())
    }
}

/// Fail an access whose mapping a truncation of the client's file revoked (see
/// [`super::sigbus`]): the bytes it moved were not guest memory.
fn revoked(guard: &Guard, iova: Iova) -> Result<(), DmaError> {
    match guard.revoked() {
        true => Err(DmaError::Revoked(iova.0)),
        false => Ok(()),
    }
}
