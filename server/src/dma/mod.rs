//! The DMA map table and guest-memory access (spec "VFIO_USER_DMA_MAP"/"UNMAP",
//! "VFIO_USER_DMA_READ"/"WRITE").
//!
//! The client maps guest RAM in one of two ways. With an fd, the server mmaps it through
//! `vm-memory` (`GuestRegionMmap` with an `AtomicBitmap`, so every write through it is
//! dirty-logged for migration). Without an fd, the server must ask the client with
//! DMA_READ/DMA_WRITE over the socket. Mappings never overlap, and lookup is O(log n) in a
//! `BTreeMap` keyed by IOVA. An access must lie inside a single mapping; anything else is an
//! error to the device, never a wild pointer.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vfud_protocol::messages::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use crate::error::DmaError;

mod guest_mem;
pub mod socket;

pub use guest_mem::GuestMem;
pub use socket::{SocketDma, SocketDmaCounters};

/// Largest single DMA mapping (1 TiB). Every mapping carries a dirty bitmap sized by the
/// mapping, so the size a client sends is checked against this before anything is allocated.
pub const MAX_MAP_SIZE: u64 = 1 << 40;

/// Page size used for dirty tracking.
pub const DIRTY_PAGE_SIZE: usize = 4096;

/// A guest I/O virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

/// How a mapping's bytes are reached.
#[derive(Debug)]
pub(crate) enum Backing {
    /// Mapped from the client's fd.
    Mmap(Arc<GuestRegionMmap<AtomicBitmap>>),
    /// Reached with DMA_READ/DMA_WRITE; the bitmap logs what the device wrote.
    Socket(AtomicBitmap),
}

impl Backing {
    pub(crate) fn bitmap(&self) -> &AtomicBitmap {
        match self {
            Backing::Mmap(r) => r.bitmap(),
            Backing::Socket(b) => b,
        }
    }
}

/// One DMA mapping.
#[derive(Debug)]
pub struct Mapping {
    /// Start IOVA.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// The device may read.
    pub readable: bool,
    /// The device may write.
    pub writable: bool,
    /// Offset into the client's fd.
    pub offset: u64,
    pub(crate) backing: Backing,
}

impl Mapping {
    /// Whether the mapping is fd-backed.
    pub fn is_mmapped(&self) -> bool {
        matches!(self.backing, Backing::Mmap(_))
    }

    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// All DMA mappings of the current client.
#[derive(Debug, Default)]
pub struct DmaTable {
    maps: BTreeMap<u64, Mapping>,
    max_maps: usize,
    logging: Option<u64>,
}

impl DmaTable {
    /// An empty table allowing `max_maps` mappings.
    pub fn new(max_maps: usize) -> Self {
        Self {
            maps: BTreeMap::new(),
            max_maps,
            logging: None,
        }
    }

    /// Change the limit (after VERSION).
    pub fn set_max_maps(&mut self, max: usize) {
        self.max_maps = max;
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Iterate mappings in IOVA order.
    pub fn iter(&self) -> impl Iterator<Item = &Mapping> {
        self.maps.values()
    }

    /// Add a mapping. Overlaps are refused with `EEXIST` (spec "VFIO_USER_DMA_MAP").
    pub fn map(&mut self, m: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DmaError> {
        let overlap = |iova: u64, size: u64| DmaError::MapOverlap { iova, size };
        let end = m.addr.checked_add(m.size).ok_or(overlap(m.addr, m.size))?;
        if let Some((_, prev)) = self.maps.range(..end).next_back() {
            if prev.end() > m.addr {
                return Err(overlap(m.addr, m.size));
            }
        }
        if self.maps.len() >= self.max_maps {
            return Err(DmaError::TooManyMappings(self.max_maps));
        }
        if m.size == 0 || m.size > MAX_MAP_SIZE {
            return Err(DmaError::MapFailed(format!(
                "size {:#x} is zero or above the {MAX_MAP_SIZE:#x}-byte limit",
                m.size
            )));
        }
        let readable = m.flags & DMA_MAP_FLAG_READ != 0;
        let writable = m.flags & DMA_MAP_FLAG_WRITE != 0;
        let backing = match fd {
            Some(fd) => Backing::Mmap(Arc::new(map_fd(fd, m, readable, writable)?)),
            None => Backing::Socket(AtomicBitmap::new(
                usize::try_from(m.size)
                    .map_err(|_| DmaError::MapFailed("size too large".into()))?,
                dirty_page_size(),
            )),
        };
        self.maps.insert(
            m.addr,
            Mapping {
                iova: m.addr,
                size: m.size,
                readable,
                writable,
                offset: m.offset,
                backing,
            },
        );
        Ok(())
    }

    /// Remove the mapping that is exactly `iova`+`size`.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        match self.maps.get(&iova) {
            Some(m) if m.size == size => {
                self.maps.remove(&iova);
                Ok(())
            }
            _ => Err(DmaError::NoSuchMapping { iova, size }),
        }
    }

    /// Remove everything.
    pub fn unmap_all(&mut self) {
        self.maps.clear();
    }

    /// Every mapping as the DMA_MAP that made it, with a duplicate of its fd (for handing the
    /// session to another process).
    pub fn export(&self) -> std::io::Result<Vec<(DmaMap, Option<OwnedFd>)>> {
        self.maps
            .values()
            .map(|m| {
                let flags = if m.readable { DMA_MAP_FLAG_READ } else { 0 }
                    | if m.writable { DMA_MAP_FLAG_WRITE } else { 0 };
                let fd = match &m.backing {
                    Backing::Mmap(r) => match r.file_offset() {
                        Some(fo) => Some(OwnedFd::from(fo.file().try_clone()?)),
                        None => None,
                    },
                    Backing::Socket(_) => None,
                };
                Ok((
                    DmaMap {
                        argsz: 32,
                        flags,
                        offset: m.offset,
                        addr: m.iova,
                        size: m.size,
                    },
                    fd,
                ))
            })
            .collect()
    }

    /// DMA_LOGGING_START: clear every mapping's dirty bitmap and start reporting. Mappings
    /// added later are covered too (each has its own bitmap from birth). Returns the page
    /// size in force, which may differ from the one asked for (the reply says so).
    pub fn start_logging(&mut self, _requested_page_size: u64) -> Result<u64, DmaError> {
        if self.logging.is_some() {
            return Err(DmaError::LoggingActive);
        }
        for m in self.maps.values() {
            m.backing.bitmap().reset();
        }
        self.logging = Some(DIRTY_PAGE_SIZE as u64);
        Ok(DIRTY_PAGE_SIZE as u64)
    }

    /// DMA_LOGGING_STOP.
    pub fn stop_logging(&mut self) {
        self.logging = None;
    }

    /// Whether dirty logging is on.
    pub fn logging(&self) -> bool {
        self.logging.is_some()
    }

    /// DMA_LOGGING_REPORT: the bitmap of `iova..iova+length` at `page_size` granularity
    /// (u64 words, bit i = page i), clearing what it reports. Unmapped pages report clean.
    pub fn report_dirty(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u8>, DmaError> {
        if self.logging.is_none() {
            return Err(DmaError::LoggingInactive);
        }
        if !page_size.is_power_of_two() || page_size < DIRTY_PAGE_SIZE as u64 {
            return Err(DmaError::BadReport("page size"));
        }
        let end = iova
            .checked_add(length)
            .ok_or(DmaError::BadReport("range overflows"))?;
        let pages = length.div_ceil(page_size);
        let words =
            usize::try_from(pages.div_ceil(64)).map_err(|_| DmaError::BadReport("range"))?;
        let mut bitmap = vec![0u64; words];
        for (addr, m) in self.maps.range(..end) {
            let (s, e) = (iova.max(*addr), end.min(m.end()));
            if s >= e {
                continue;
            }
            let bm = m.backing.bitmap();
            let mut off = s - m.iova;
            while off < e - m.iova {
                if bm.is_addr_set(off as usize) {
                    let page = (m.iova + off - iova) / page_size;
                    bitmap[(page / 64) as usize] |= 1 << (page % 64);
                }
                off += DIRTY_PAGE_SIZE as u64;
            }
            bm.reset_addr_range((s - m.iova) as usize, (e - s) as usize);
        }
        Ok(bitmap.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// The mapping covering `iova`, if any.
    pub fn lookup(&self, iova: u64) -> Option<&Mapping> {
        self.maps
            .range(..=iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| iova < m.end())
    }

    /// The mapping that holds all of `iova..iova+len`.
    pub(crate) fn covering(&self, iova: u64, len: usize) -> Result<&Mapping, DmaError> {
        let m = self.lookup(iova).ok_or(DmaError::NotMapped(iova))?;
        let end = iova
            .checked_add(len as u64)
            .ok_or(DmaError::CrossesMapping { iova, len })?;
        if end > m.end() {
            return Err(DmaError::CrossesMapping { iova, len });
        }
        Ok(m)
    }
}

pub(crate) fn dirty_page_size() -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(DIRTY_PAGE_SIZE - 1)
}

fn map_fd(
    fd: OwnedFd,
    m: &DmaMap,
    readable: bool,
    writable: bool,
) -> Result<GuestRegionMmap<AtomicBitmap>, DmaError> {
    let size = usize::try_from(m.size).map_err(|_| DmaError::MapFailed("size too large".into()))?;
    let mut prot = 0;
    if readable {
        prot |= libc_prot::READ;
    }
    if writable {
        prot |= libc_prot::WRITE;
    }
    // A mapping must not outgrow its file: touching pages past EOF would kill the process
    // with SIGBUS (spec "VFIO_USER_DMA_MAP": offset and size describe a range of the fd).
    let file = File::from(fd);
    let file_len = file
        .metadata()
        .map_err(|e| DmaError::MapFailed(format!("fstat: {e}")))?
        .len();
    if !matches!(m.offset.checked_add(m.size), Some(end) if end <= file_len) {
        return Err(DmaError::MapFailed(format!(
            "offset {:#x} + size {:#x} is beyond the {file_len:#x}-byte file",
            m.offset, m.size
        )));
    }
    let bitmap = AtomicBitmap::new(size, dirty_page_size());
    let region = MmapRegionBuilder::new_with_bitmap(size, bitmap)
        .with_file_offset(FileOffset::new(file, m.offset))
        .with_mmap_prot(prot)
        .with_mmap_flags(libc_prot::SHARED)
        .build()
        .map_err(|e| DmaError::MapFailed(e.to_string()))?;
    GuestRegionMmap::new(region, GuestAddress(m.addr))
        .ok_or_else(|| DmaError::MapFailed("address overflow".into()))
}

/// mmap constants (values of the Linux ABI, which `nix` exposes only as bitflags).
mod libc_prot {
    pub const READ: i32 = nix::sys::mman::ProtFlags::PROT_READ.bits();
    pub const WRITE: i32 = nix::sys::mman::ProtFlags::PROT_WRITE.bits();
    pub const SHARED: i32 = nix::sys::mman::MapFlags::MAP_SHARED.bits();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(t: &mut DmaTable, addr: u64, size: u64) -> Result<(), DmaError> {
        t.map(
            &DmaMap {
                argsz: 32,
                flags: 3,
                offset: 0,
                addr,
                size,
            },
            None,
        )
    }

    #[test]
    fn overlapping_maps_are_refused() {
        let mut t = DmaTable::new(16);
        map(&mut t, 0x1000, 0x1000).unwrap();
        assert!(matches!(
            map(&mut t, 0x1800, 0x1000),
            Err(DmaError::MapOverlap { .. })
        ));
        assert!(matches!(
            map(&mut t, 0x0, 0x1001),
            Err(DmaError::MapOverlap { .. })
        ));
        map(&mut t, 0x2000, 0x1000).unwrap();
        map(&mut t, 0x0, 0x1000).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn unmap_must_match_exactly() {
        let mut t = DmaTable::new(16);
        map(&mut t, 0x1000, 0x2000).unwrap();
        assert!(t.unmap(0x1000, 0x1000).is_err());
        assert!(t.unmap(0x2000, 0x1000).is_err());
        t.unmap(0x1000, 0x2000).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn max_maps_is_enforced() {
        let mut t = DmaTable::new(2);
        map(&mut t, 0, 0x1000).unwrap();
        map(&mut t, 0x1000, 0x1000).unwrap();
        assert!(matches!(
            map(&mut t, 0x2000, 0x1000),
            Err(DmaError::TooManyMappings(2))
        ));
    }

    #[test]
    fn access_that_straddles_a_mapping_fails() {
        let mut t = DmaTable::new(4);
        map(&mut t, 0x1000, 0x1000).unwrap();
        map(&mut t, 0x2000, 0x1000).unwrap();
        assert!(matches!(
            t.covering(0x1ffc, 8),
            Err(DmaError::CrossesMapping { .. })
        ));
        assert!(matches!(
            t.covering(0x3000, 1),
            Err(DmaError::NotMapped(0x3000))
        ));
        assert!(t.covering(0x1ff8, 8).is_ok());
    }
}
