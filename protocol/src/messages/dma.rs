//! DMA_MAP, DMA_UNMAP (client → server) and DMA_READ/DMA_WRITE (server → client).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{check_argsz, decode_argsz, decode_fixed};
use crate::error::ProtocolError;
use crate::wire::{put, WireReader};

/// DMA_MAP flag: the client allows the server to read the region.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// DMA_MAP flag: the client allows the server to write the region.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag: v1 dirty bitmap in the reply (obsolete, rejected).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: unmap everything; requires `addr = size = 0`.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// `struct vfio_user_dma_map` (spec "VFIO_USER_DMA_MAP").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaMap {
    /// Size of this struct.
    pub argsz: u32,
    /// READ/WRITE protection.
    pub flags: u32,
    /// Offset into the fd of the region's first byte.
    pub offset: u64,
    /// IOVA of the region.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}
const _: () = assert!(core::mem::size_of::<DmaMap>() == 32);

impl DmaMap {
    /// Decode and check flags, size and address overflow. A payload longer than the struct is
    /// accepted up to `argsz`, the tail ignored.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (m, _tail): (DmaMap, _) = decode_argsz(payload, "DMA_MAP")?;
        check_argsz(m.argsz, core::mem::size_of::<Self>())?;
        if m.flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 {
            return Err(ProtocolError::invalid(
                "flags",
                format!("unknown DMA_MAP flags {:#x}", m.flags),
            ));
        }
        if m.size == 0 {
            return Err(ProtocolError::invalid("size", "zero-length DMA map"));
        }
        if m.addr.checked_add(m.size).is_none() || m.offset.checked_add(m.size).is_none() {
            return Err(ProtocolError::invalid("addr", "range overflows 64 bits"));
        }
        Ok(m)
    }
}

/// `struct vfio_user_dma_unmap` (spec "VFIO_USER_DMA_UNMAP"); the reply echoes it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaUnmap {
    /// Size of this struct.
    pub argsz: u32,
    /// ALL or the obsolete GET_DIRTY_BITMAP.
    pub flags: u32,
    /// IOVA of the mapping.
    pub addr: u64,
    /// Its length.
    pub size: u64,
}
const _: () = assert!(core::mem::size_of::<DmaUnmap>() == 24);

impl DmaUnmap {
    /// Whether this unmaps everything.
    pub fn is_all(&self) -> bool {
        self.flags & DMA_UNMAP_FLAG_ALL != 0
    }

    /// Decode and check the flag rules (a tail up to `argsz` is ignored).
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (u, _tail): (DmaUnmap, _) = decode_argsz(payload, "DMA_UNMAP")?;
        check_argsz(u.argsz, core::mem::size_of::<Self>())?;
        if u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(ProtocolError::invalid(
                "flags",
                "GET_DIRTY_BITMAP is the obsolete v1 dirty interface; use DMA_LOGGING_REPORT",
            ));
        }
        if u.flags & !DMA_UNMAP_FLAG_ALL != 0 {
            return Err(ProtocolError::invalid(
                "flags",
                format!("unknown DMA_UNMAP flags {:#x}", u.flags),
            ));
        }
        if u.is_all() && (u.addr != 0 || u.size != 0) {
            return Err(ProtocolError::invalid(
                "flags",
                "ALL requires addr = size = 0",
            ));
        }
        if !u.is_all() && u.size == 0 {
            return Err(ProtocolError::invalid("size", "zero-length unmap"));
        }
        Ok(u)
    }
}

/// `struct vfio_user_dma_region_access` used by DMA_READ and DMA_WRITE (server → client).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaAccess {
    /// IOVA.
    pub addr: u64,
    /// Bytes.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<DmaAccess>() == 16);

impl DmaAccess {
    /// Decode a DMA_READ request (no data).
    pub fn decode_read(payload: &[u8]) -> Result<Self, ProtocolError> {
        decode_fixed(payload, "DMA_READ")
    }

    /// Decode a payload carrying data (DMA_WRITE request or DMA_READ reply): `count` must match.
    pub fn decode_with_data(payload: &[u8]) -> Result<(Self, &[u8]), ProtocolError> {
        let mut r = WireReader::new(payload, "DMA access");
        let a = r.read::<DmaAccess>()?;
        let data = r.rest();
        if a.count != data.len() as u64 {
            return Err(ProtocolError::invalid(
                "count",
                format!("count {} but {} data bytes", a.count, data.len()),
            ));
        }
        Ok((a, data))
    }

    /// Encode with trailing data.
    pub fn encode_with_data(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + data.len());
        put(&mut out, self);
        out.extend_from_slice(data);
        out
    }
}
