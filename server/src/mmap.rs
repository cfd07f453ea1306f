//! Device-owned shared memory for mmap-able BARs: a memfd mapped here and handed to the client
//! in GET_REGION_INFO. The only module of the server with `unsafe`.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::MmapRaw;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::error::DeviceError;

/// A run of BAR memory a reply carries by reference: sent from the mapping itself instead
/// of being copied into the reply first (see [`SharedMemory::bytes_while_stopped`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPart {
    /// Position in the reply's payload bytes the memory goes in front of.
    pub at: usize,
    /// BAR index.
    pub bar: usize,
    /// Offset in the BAR.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// A memfd of fixed size mapped read/write into this process. The client may map the same
/// memory, so every access is a copy through raw pointers, never a Rust reference.
#[derive(Debug)]
pub struct SharedMemory {
    file: File,
    map: MmapRaw,
    len: usize,
}

impl SharedMemory {
    /// Create `len` bytes of zeroed shared memory named `name` (visible in /proc/PID/fd).
    pub fn new(name: &str, len: usize) -> Result<Self, DeviceError> {
        let fd: OwnedFd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .map_err(|e| DeviceError::Other(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(len as u64)
            .map_err(|e| DeviceError::Other(format!("memfd size: {e}")))?;
        // The client gets this fd (GET_REGION_INFO): seal its size so that a client cannot
        // shrink it under our mapping (SIGBUS) or grow it to waste memory.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(&file, FcntlArg::F_ADD_SEALS(seals))
            .map_err(|e| DeviceError::Other(format!("memfd seals: {e}")))?;
        let map = MmapRaw::map_raw(&file).map_err(|e| DeviceError::Other(format!("mmap: {e}")))?;
        Ok(Self { file, map, len })
    }

    /// Map `len` bytes of an existing memfd (one another process created and passed on).
    pub fn from_fd(fd: OwnedFd, len: usize) -> Result<Self, DeviceError> {
        let file = File::from(fd);
        let have = file
            .metadata()
            .map_err(|e| DeviceError::Other(format!("memfd size: {e}")))?
            .len();
        if have < len as u64 {
            return Err(DeviceError::Other(format!(
                "shared memory of {have} bytes, {len} needed"
            )));
        }
        let map = MmapRaw::map_raw(&file).map_err(|e| DeviceError::Other(format!("mmap: {e}")))?;
        Ok(Self { file, map, len })
    }

    /// Map `len` bytes of BAR memory a peer vfud process passed on (a handover, or the
    /// supervisor after a crash), refusing a memfd whose size is not sealed: shrunk under
    /// the mapping, it would fault this process.
    pub fn from_sealed_fd(fd: OwnedFd, len: usize) -> Result<Self, DeviceError> {
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
            .map(SealFlag::from_bits_truncate)
            .map_err(|e| DeviceError::Other(format!("BAR memory seals: {e}")))?;
        if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Err(DeviceError::Other(
                "BAR memory from the peer is not sealed against resizing".into(),
            ));
        }
        Self::from_fd(fd, len)
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the size is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to the client.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn check(&self, offset: u64, n: usize) -> Result<usize, DeviceError> {
        let off = usize::try_from(offset).map_err(|_| DeviceError::BadAccess("offset".into()))?;
        match off.checked_add(n) {
            Some(end) if end <= self.len => Ok(off),
            _ => Err(DeviceError::BadAccess(format!(
                "{n} bytes at {offset:#x} outside {}-byte memory",
                self.len
            ))),
        }
    }

    /// Copy out `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let off = self.check(offset, buf.len())?;
        // SAFETY: `check` proved off..off+len lies inside the live mapping of `self.len`
        // bytes; `buf` is a distinct local buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Append `n` bytes at `offset` to `out` (no zero-fill of the destination first: the
    /// migration saver streams device memory this way).
    pub fn append_to(&self, offset: u64, n: usize, out: &mut Vec<u8>) -> Result<(), DeviceError> {
        let off = self.check(offset, n)?;
        out.reserve(n);
        let len = out.len();
        // SAFETY: `check` proved the source range lies inside the mapping; `reserve` made
        // room for `n` more bytes in `out`, which is a distinct allocation. `set_len` covers
        // exactly the bytes just copied in.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), out.as_mut_ptr().add(len), n);
            out.set_len(len + n);
        }
        Ok(())
    }

    /// Copy `data` in at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let off = self.check(offset, data.len())?;
        // SAFETY: as in `read`: the destination range is inside the mapping and `data` is
        // not part of it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// Fault every page in for writing without changing its contents, so a later bulk write
    /// (restoring migrated memory inside the downtime) does not pay for page faults.
    /// `MADV_POPULATE_WRITE` (Linux 5.14) does it in one call; elsewhere each page takes an
    /// atomic no-op write, which the compiler cannot drop — a plain read and write back of
    /// the same byte was removed as dead in release builds, and would race with the client.
    pub fn prefault(&self) {
        if self
            .populate(nix::sys::mman::MmapAdvise::MADV_POPULATE_WRITE)
            .is_err()
        {
            self.touch_pages();
        }
    }

    /// Map every page of the memory into this process's page tables for reading, in one
    /// call (`MADV_POPULATE_READ`, Linux 5.14; nothing elsewhere). Memory the client wrote
    /// through its own mapping is not mapped here yet, and reading it page by page (the
    /// migration saver's pass over a BAR) would take a fault every few pages.
    pub fn populate_for_reading(&self) {
        let _ = self.populate(nix::sys::mman::MmapAdvise::MADV_POPULATE_READ);
    }

    /// `madvise` the whole mapping with one of the `MADV_POPULATE_*` advices.
    fn populate(&self, advice: nix::sys::mman::MmapAdvise) -> nix::Result<()> {
        let start = std::ptr::NonNull::new(self.map.as_mut_ptr().cast::<std::ffi::c_void>())
            .ok_or(nix::errno::Errno::EINVAL)?;
        // SAFETY: the range is exactly this live mapping; the MADV_POPULATE_* advices only
        // fault pages in and never change their contents.
        unsafe { nix::sys::mman::madvise(start, self.len, advice) }
    }

    /// [`SharedMemory::prefault`] without `MADV_POPULATE_WRITE`: an atomic no-op write to
    /// every page.
    fn touch_pages(&self) {
        use std::sync::atomic::{AtomicU8, Ordering};
        const PAGE: usize = 4096;
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: `off < len`, so the byte lies inside the live mapping; an atomic is
            // valid for any byte, and other writers to shared memory are what atomics allow.
            let byte = unsafe { AtomicU8::from_ptr(self.map.as_mut_ptr().add(off)) };
            // A compare-exchange of a byte with itself: a write fault, no change. (An
            // idempotent `fetch_or(0)` is compiled to a plain load on x86, which does not
            // allocate the page.)
            let v = byte.load(Ordering::Relaxed);
            let _ = byte.compare_exchange(v, v, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Atomically replace the 4-byte word at `offset` (4-aligned) with `new` if it holds
    /// `current`; returns the value found (equal to `current` when replaced). For words the
    /// client writes through its own mapping while the device takes and resets them (NVMe
    /// doorbells): a plain read-then-write could overwrite a value written in between.
    pub fn compare_exchange_u32(
        &self,
        offset: u64,
        current: u32,
        new: u32,
    ) -> Result<u32, DeviceError> {
        let off = self.check(offset, 4)?;
        if off % 4 != 0 {
            return Err(DeviceError::BadAccess(format!(
                "atomic word at {offset:#x} is not 4-byte aligned"
            )));
        }
        // SAFETY: the word lies inside the live mapping (checked), which is page-aligned, so
        // `off % 4 == 0` makes the pointer 4-byte aligned as AtomicU32 needs. Every access to
        // the mapping goes through raw pointers (no Rust reference aliases it), and other
        // processes sharing the memory can only race on its bytes, which atomics tolerate.
        let word = unsafe {
            std::sync::atomic::AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast::<u32>())
        };
        let order = std::sync::atomic::Ordering::SeqCst;
        Ok(match word.compare_exchange(current, new, order, order) {
            Ok(v) | Err(v) => v,
        })
    }

    /// The byte ranges of the memfd that hold data, in order (`lseek` `SEEK_DATA` /
    /// `SEEK_HOLE`); pages never written are holes and read as zeros. The whole memory when
    /// the file system cannot tell.
    pub fn data_ranges(&self) -> Vec<std::ops::Range<usize>> {
        use nix::unistd::{lseek, Whence};
        let whole = std::iter::once(0..self.len).collect();
        let end = self.len as i64;
        let mut ranges = Vec::new();
        let mut at = 0i64;
        while at < end {
            let start = match lseek(&self.file, at, Whence::SeekData) {
                Ok(s) => s,
                Err(nix::errno::Errno::ENXIO) => break,
                Err(_) => return whole,
            };
            if start >= end {
                break;
            }
            let stop = match lseek(&self.file, start, Whence::SeekHole) {
                Ok(h) => h.min(end),
                Err(_) => return whole,
            };
            ranges.push(start as usize..stop as usize);
            at = stop;
        }
        ranges
    }

    /// Make `len` bytes at `offset` zero again, giving their pages back to the system
    /// (`fallocate` punching a hole; zero-filled where that is refused). The client's
    /// mapping sees zeros too.
    pub fn discard(&self, offset: u64, len: usize) -> Result<(), DeviceError> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let off = self.check(offset, len)?;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if len == 0 || fallocate(&self.file, flags, off as i64, len as i64).is_ok() {
            return Ok(());
        }
        self.fill(offset, len, 0)
    }

    /// `len` bytes at `offset` as a slice, for a device that is stopped: to checksum them
    /// and hand them to the kernel (`sendmsg`) without a copy. Every other access copies,
    /// because the client may write this memory through its own mapping at any time; once
    /// the device and the VM are stopped nothing should, and a client that writes anyway
    /// only changes bytes under a checksum the destination verifies, so the change is
    /// caught there, not lost.
    pub(crate) fn bytes_while_stopped(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<&[u8], DeviceError> {
        let off = self.check(offset, len)?;
        // SAFETY: `check` proved the range lies inside the mapping, which lives as long as
        // `self` (the slice borrows it). The bytes are plain `u8`s, valid for any value;
        // concurrent writes by the client (documented above) can only change what is read.
        Ok(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(off), len) })
    }

    /// Fill `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), DeviceError> {
        let off = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(off), byte, len) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: Miri cannot run it")]
    fn data_ranges_follow_writes_prefault_and_discard() {
        let m = SharedMemory::new("t", 64 * 4096).unwrap();
        assert!(m.data_ranges().is_empty(), "fresh memory is all holes");
        m.write(5 * 4096 + 7, &[1]).unwrap();
        m.write(9 * 4096, &[1; 8192]).unwrap();
        assert_eq!(
            m.data_ranges(),
            vec![5 * 4096..6 * 4096, 9 * 4096..11 * 4096]
        );
        m.discard(9 * 4096, 4096).unwrap();
        assert_eq!(
            m.data_ranges(),
            vec![5 * 4096..6 * 4096, 10 * 4096..11 * 4096]
        );
        let mut b = [9u8; 4];
        m.read(9 * 4096, &mut b).unwrap();
        assert_eq!(b, [0; 4], "discarded memory reads as zeros");
        m.prefault();
        assert_eq!(
            m.data_ranges(),
            vec![0..64 * 4096],
            "prefault allocates every page"
        );
        let mut b = [0u8; 2];
        m.read(5 * 4096 + 6, &mut b).unwrap();
        assert_eq!(b, [0, 1], "prefault keeps the contents");
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: Miri cannot run it")]
    fn touching_pages_allocates_them_and_keeps_contents() {
        let m = SharedMemory::new("t", 16 * 4096).unwrap();
        m.write(3 * 4096, &[7]).unwrap();
        m.touch_pages();
        assert_eq!(m.data_ranges(), vec![0..16 * 4096]);
        let mut b = [0u8; 1];
        m.read(3 * 4096, &mut b).unwrap();
        assert_eq!(b, [7]);
    }
}
