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
    pub fn prefault(&self) {
        const PAGE: usize = 4096;
        let mut off = 0;
        while off < self.len {
            let mut b = [0u8; 1];
            if self.read(off as u64, &mut b).is_ok() {
                let _ = self.write(off as u64, &b);
            }
            off += PAGE;
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

    /// Fill `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), DeviceError> {
        let off = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(off), byte, len) };
        Ok(())
    }
}
