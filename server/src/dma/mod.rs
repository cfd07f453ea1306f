//! The DMA map table and guest-memory access (spec "VFIO_USER_DMA_MAP"/"UNMAP",
//! "VFIO_USER_DMA_READ"/"WRITE").
//!
//! The client maps guest RAM in one of two ways. With an fd, the server mmaps it through
//! `vm-memory` (a `GuestRegionMmap`), after checking that the range lies inside the file; a
//! later truncation by the client is contained by [`sigbus`]. Without an fd, the server must
//! ask the client with DMA_READ/DMA_WRITE over the socket. Mappings never overlap, and lookup
//! is O(log n) in a `BTreeMap` keyed by IOVA. An access must lie inside a single mapping;
//! anything else is an error to the device, never a wild pointer.
//!
//! Dirty bitmaps exist only while DMA logging is on, only for the mappings that meet the
//! logged ranges, and all of one client's bitmaps together stay under
//! [`MAX_DIRTY_BITMAP_BYTES`]: a client cannot make the server allocate by mapping.

use std::collections::BTreeMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;

use vfud_protocol::messages::dma::{DmaMap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::version::DEFAULT_MAX_DATA_XFER_SIZE;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

use crate::error::DmaError;

mod guest_mem;
mod sigbus;
pub mod socket;

pub use guest_mem::GuestMem;
pub use socket::{SocketDma, SocketDmaCounters};

/// Largest single DMA mapping (1 TiB). A mapping costs nothing until dirty logging covers
/// it; then its bitmap is one bit per 4 KiB page (32 MiB for the largest mapping).
pub const MAX_MAP_SIZE: u64 = 1 << 40;

/// Most dirty-bitmap memory one client can make the server hold (64 MiB: 2 TiB of guest
/// memory at 4 KiB pages). DMA_LOGGING_START over more, or a DMA_MAP that would push a
/// logged client past it, fails with `ENOMEM`.
pub const MAX_DIRTY_BITMAP_BYTES: usize = 64 << 20;

/// Page size used for dirty tracking.
pub const DIRTY_PAGE_SIZE: usize = 4096;

/// A guest I/O virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

/// How a mapping's bytes are reached.
#[derive(Debug)]
pub(crate) enum Backing {
    /// Mapped from the client's fd. The guard is declared first so that it unregisters the
    /// range before the region is unmapped.
    Mmap {
        guard: sigbus::Guard,
        region: GuestRegionMmap,
    },
    /// Reached with DMA_READ/DMA_WRITE.
    Socket,
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
    /// Pages the device wrote since the last report; only while logging covers this mapping.
    pub(crate) dirty: Option<AtomicBitmap>,
}

impl Mapping {
    /// Whether the mapping is fd-backed.
    pub fn is_mmapped(&self) -> bool {
        matches!(self.backing, Backing::Mmap { .. })
    }

    fn end(&self) -> u64 {
        self.iova + self.size
    }

    /// Record a device write of `len` bytes at `off` into the mapping.
    pub(crate) fn mark_dirty(&self, off: u64, len: usize) {
        if let Some(bm) = &self.dirty {
            vm_memory::bitmap::Bitmap::mark_dirty(bm, off as usize, len);
        }
    }
}

/// Dirty logging in force: the page size and the ranges asked for (empty = everything).
#[derive(Debug)]
struct Logging {
    ranges: Vec<(u64, u64)>,
    bitmap_bytes: usize,
}

impl Logging {
    fn covers(&self, iova: u64, size: u64) -> bool {
        self.ranges.is_empty()
            || self
                .ranges
                .iter()
                .any(|(s, l)| *s < iova.saturating_add(size) && iova < s.saturating_add(*l))
    }
}

/// Bytes of an `AtomicBitmap` over `size` bytes at [`DIRTY_PAGE_SIZE`].
fn bitmap_bytes(size: u64) -> usize {
    (size.div_ceil(DIRTY_PAGE_SIZE as u64).div_ceil(64) * 8) as usize
}

/// All DMA mappings of the current client.
#[derive(Debug)]
pub struct DmaTable {
    maps: BTreeMap<u64, Mapping>,
    max_maps: usize,
    max_report: usize,
    logging: Option<Logging>,
}

impl Default for DmaTable {
    fn default() -> Self {
        Self::new(0)
    }
}

impl DmaTable {
    /// An empty table allowing `max_maps` mappings.
    pub fn new(max_maps: usize) -> Self {
        Self {
            maps: BTreeMap::new(),
            max_maps,
            max_report: DEFAULT_MAX_DATA_XFER_SIZE as usize,
            logging: None,
        }
    }

    /// Change the limit (after VERSION).
    pub fn set_max_maps(&mut self, max: usize) {
        self.max_maps = max;
    }

    /// Largest DMA_LOGGING_REPORT bitmap (the negotiated `max_data_xfer_size`).
    pub fn set_max_report(&mut self, bytes: usize) {
        self.max_report = bytes;
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

    /// Bytes of dirty bitmap held now (zero unless logging).
    pub fn dirty_bitmap_bytes(&self) -> usize {
        self.logging.as_ref().map_or(0, |l| l.bitmap_bytes)
    }

    /// Add a mapping. Overlaps are refused with `EEXIST` (spec "VFIO_USER_DMA_MAP").
    /// Everything is checked before anything is allocated or mapped.
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
        if !(m.addr | m.size | m.offset).is_multiple_of(DIRTY_PAGE_SIZE as u64) {
            return Err(DmaError::Unaligned {
                iova: m.addr,
                size: m.size,
                offset: m.offset,
            });
        }
        let logged = self
            .logging
            .as_ref()
            .is_some_and(|l| l.covers(m.addr, m.size));
        let extra = if logged { bitmap_bytes(m.size) } else { 0 };
        if self.dirty_bitmap_bytes() + extra > MAX_DIRTY_BITMAP_BYTES {
            return Err(DmaError::BitmapBudget {
                bytes: self.dirty_bitmap_bytes() + extra,
            });
        }
        let readable = m.flags & DMA_MAP_FLAG_READ != 0;
        let writable = m.flags & DMA_MAP_FLAG_WRITE != 0;
        let backing = match fd {
            Some(fd) => map_fd(fd, m, readable, writable)?,
            None => Backing::Socket,
        };
        if let Some(l) = &mut self.logging {
            l.bitmap_bytes += extra;
        }
        self.maps.insert(
            m.addr,
            Mapping {
                iova: m.addr,
                size: m.size,
                readable,
                writable,
                offset: m.offset,
                backing,
                dirty: logged.then(|| new_bitmap(m.size)),
            },
        );
        Ok(())
    }

    /// Remove the mapping that is exactly `iova`+`size`.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaError> {
        match self.maps.get(&iova) {
            Some(m) if m.size == size => {
                let freed = if m.dirty.is_some() {
                    bitmap_bytes(size)
                } else {
                    0
                };
                if let Some(l) = &mut self.logging {
                    l.bitmap_bytes -= freed;
                }
                self.maps.remove(&iova);
                Ok(())
            }
            _ => Err(DmaError::NoSuchMapping { iova, size }),
        }
    }

    /// Remove everything.
    pub fn unmap_all(&mut self) {
        self.maps.clear();
        if let Some(l) = &mut self.logging {
            l.bitmap_bytes = 0;
        }
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
                    Backing::Mmap { region, .. } => match region.file_offset() {
                        Some(fo) => Some(OwnedFd::from(fo.file().try_clone()?)),
                        None => None,
                    },
                    Backing::Socket => None,
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

    /// DMA_LOGGING_START over `ranges` (`(iova, length)`; empty = every mapping): give each
    /// mapping that meets them a clean bitmap. Mappings added while logging get one too if
    /// they meet the ranges. Returns the page size in force, which may differ from the one
    /// asked for (the reply says so).
    pub fn start_logging(
        &mut self,
        _requested_page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<u64, DmaError> {
        if self.logging.is_some() {
            return Err(DmaError::LoggingActive);
        }
        let mut l = Logging {
            ranges: ranges.to_vec(),
            bitmap_bytes: 0,
        };
        l.bitmap_bytes = self
            .maps
            .values()
            .filter(|m| l.covers(m.iova, m.size))
            .fold(0usize, |n, m| n.saturating_add(bitmap_bytes(m.size)));
        if l.bitmap_bytes > MAX_DIRTY_BITMAP_BYTES {
            return Err(DmaError::BitmapBudget {
                bytes: l.bitmap_bytes,
            });
        }
        for m in self.maps.values_mut() {
            if l.covers(m.iova, m.size) {
                m.dirty = Some(new_bitmap(m.size));
            }
        }
        self.logging = Some(l);
        Ok(DIRTY_PAGE_SIZE as u64)
    }

    /// DMA_LOGGING_STOP: the bitmaps are freed.
    pub fn stop_logging(&mut self) {
        self.logging = None;
        for m in self.maps.values_mut() {
            m.dirty = None;
        }
    }

    /// Whether dirty logging is on.
    pub fn logging(&self) -> bool {
        self.logging.is_some()
    }

    /// DMA_LOGGING_REPORT: the bitmap of `iova..iova+length` at `page_size` granularity
    /// (u64 words, bit i = page i), clearing what it reports. Pages outside logged mappings
    /// report clean. The bitmap may not exceed the negotiated `max_data_xfer_size`.
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
        let words = length.div_ceil(page_size).div_ceil(64);
        if words.saturating_mul(8) > self.max_report as u64 {
            return Err(DmaError::ReportTooLarge {
                bytes: words.saturating_mul(8),
                max: self.max_report,
            });
        }
        let mut bitmap = vec![0u64; words as usize];
        for (addr, m) in self.maps.range(..end) {
            let (s, e) = (iova.max(*addr), end.min(m.end()));
            let Some(bm) = m.dirty.as_ref().filter(|_| s < e) else {
                continue;
            };
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

fn new_bitmap(size: u64) -> AtomicBitmap {
    AtomicBitmap::new(size as usize, dirty_page_size())
}

pub(crate) fn dirty_page_size() -> NonZeroUsize {
    NonZeroUsize::MIN.saturating_add(DIRTY_PAGE_SIZE - 1)
}

fn map_fd(fd: OwnedFd, m: &DmaMap, readable: bool, writable: bool) -> Result<Backing, DmaError> {
    let size = usize::try_from(m.size).map_err(|_| DmaError::MapFailed("size too large".into()))?;
    let mut prot = 0;
    if readable {
        prot |= libc_prot::READ;
    }
    if writable {
        prot |= libc_prot::WRITE;
    }
    // A mapping must not outgrow its file: touching pages past EOF would raise SIGBUS
    // (spec "VFIO_USER_DMA_MAP": offset and size describe a range of the fd). Only regular
    // files (memfds, tmpfs/hugetlbfs files) can back guest RAM; a directory, socket or pipe
    // is refused here rather than by whatever mmap makes of it.
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| DmaError::MapFailed(format!("fstat: {e}")))?;
    if !meta.is_file() {
        return Err(DmaError::MapFailed(format!(
            "the fd is not a regular file or memfd ({:?})",
            meta.file_type()
        )));
    }
    let file_len = meta.len();
    if !matches!(m.offset.checked_add(m.size), Some(end) if end <= file_len) {
        return Err(DmaError::MapFailed(format!(
            "offset {:#x} + size {:#x} is beyond the {file_len:#x}-byte file",
            m.offset, m.size
        )));
    }
    let region = MmapRegionBuilder::new(size)
        .with_file_offset(FileOffset::new(file, m.offset))
        .with_mmap_prot(prot)
        .with_mmap_flags(libc_prot::SHARED)
        .build()
        .map_err(|e| DmaError::MapFailed(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(m.addr))
        .ok_or_else(|| DmaError::MapFailed("address overflow".into()))?;
    let host = vm_memory::GuestMemoryRegion::get_host_address(&region, MemoryRegionAddress(0))
        .map_err(|e| DmaError::MapFailed(e.to_string()))?;
    let guard = sigbus::Guard::register(host, size)
        .map_err(|e| DmaError::MapFailed(format!("SIGBUS guard: {e}")))?;
    Ok(Backing::Mmap { guard, region })
}

/// mmap constants (values of the Linux ABI, which `nix` exposes only as bitflags).
mod libc_prot {
    pub const READ: i32 = nix::sys::mman::ProtFlags::PROT_READ.bits();
    pub const WRITE: i32 = nix::sys::mman::ProtFlags::PROT_WRITE.bits();
    pub const SHARED: i32 = nix::sys::mman::MapFlags::MAP_SHARED.bits();
}

#[cfg(test)]
mod tests;
