//! The namespace: a regular file (or, with no `backing=`, an anonymous memfd) read and
//! written with `pread`/`pwrite`, 4 KiB logical blocks.
//!
//! The file is shared storage: migration and handover never copy it; the destination opens
//! the same path (or, in a handover, adopts the same open file).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use nix::fcntl::{fallocate, FallocateFlags};

/// Logical block size (LBADS 12).
pub const LBA_SIZE: u64 = 4096;
/// Namespace size when neither `size=` nor an existing file gives one.
pub const DEFAULT_SIZE: u64 = 64 << 20;

/// One namespace on a file.
#[derive(Debug)]
pub struct Namespace {
    file: File,
    path: Option<PathBuf>,
    blocks: u64,
}

impl Namespace {
    /// Open (creating it sparse if needed) `path`; `size` grows a smaller file to that size.
    /// Without `size` an existing file keeps its size and a new one gets [`DEFAULT_SIZE`].
    pub fn open(path: Option<PathBuf>, size: Option<u64>) -> Result<Self, String> {
        if let Some(s) = size {
            if s < LBA_SIZE {
                return Err(format!(
                    "size={s} is smaller than one {LBA_SIZE}-byte block"
                ));
            }
        }
        let file = match &path {
            Some(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| format!("backing file {}: {e}", p.display()))?,
            None => {
                let fd = nix::sys::memfd::memfd_create(
                    c"vfud-nvme",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )
                .map_err(|e| format!("memfd for the namespace: {e}"))?;
                File::from(fd)
            }
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("backing must be a regular file".into());
        }
        let len = meta.len();
        let want = size.unwrap_or(if len == 0 { DEFAULT_SIZE } else { len });
        if len < want {
            // set_len makes a sparse file: no blocks are written.
            file.set_len(want)
                .map_err(|e| format!("sizing the backing file: {e}"))?;
        }
        Ok(Self {
            file,
            path,
            blocks: want / LBA_SIZE,
        })
    }

    /// Adopt an open file handed over by another vfud process.
    pub fn adopt(fd: OwnedFd, blocks: u64) -> Result<Self, String> {
        let file = File::from(fd);
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < blocks * LBA_SIZE {
            return Err(format!(
                "handed-over namespace file has {len} bytes, need {}",
                blocks * LBA_SIZE
            ));
        }
        Ok(Self {
            file,
            path: None,
            blocks,
        })
    }

    /// A duplicate of the open file, for a handover.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.file.as_fd().try_clone_to_owned()
    }

    /// The backing path, if any.
    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// Size in logical blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether `nlb` blocks from `slba` lie inside the namespace.
    pub fn in_range(&self, slba: u64, nlb: u64) -> bool {
        slba.checked_add(nlb).is_some_and(|end| end <= self.blocks)
    }

    /// Read at byte offset `off`; a short file reads as zeros.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    /// Write at byte offset `off`.
    pub fn write_at(&self, data: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(data, off)
    }

    /// Make blocks read as zeros and give their space back (Dataset Management deallocate,
    /// Write Zeroes): a hole punched in the file, or zeros written where punching is
    /// unsupported.
    pub fn zero(&self, slba: u64, nlb: u64) -> io::Result<()> {
        let (off, len) = (slba * LBA_SIZE, nlb * LBA_SIZE);
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(self.file.as_fd(), flags, off as i64, len as i64) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                let zeros = vec![0u8; LBA_SIZE as usize * 32];
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], off + at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Flush: the data reaches stable storage.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
