//! The VMM's side of a device: the connection, guest RAM the driver owns (memfds mapped with
//! DMA_MAP), and the interrupt setup the VMM gave the device — everything a destination
//! needs besides the device's own stream.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use vfud_protocol::messages::dma::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};
use vfud_protocol::messages::feature::{DmaLoggingControl, DmaLoggingReport};
use vfud_protocol::messages::irq::{IRQ_INDEX_INTX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};
use vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX;
use vfud_protocol::messages::IrqAction;
use vfud_protocol::{Client, ProtocolError};

use super::{MigrateError, Step};

/// Page size of guest RAM dirty tracking.
pub const PAGE: u64 = 4096;

/// One region of guest RAM: a memfd mapped at `iova`.
#[derive(Debug)]
pub struct RamRegion {
    /// IOVA.
    pub iova: u64,
    /// Size.
    pub size: u64,
    /// The memory.
    pub file: File,
    cpu_dirty: Vec<AtomicU64>,
}

/// Guest RAM owned by the driver (it plays the VMM).
#[derive(Debug, Default)]
pub struct GuestRam {
    /// Regions in IOVA order.
    pub regions: Vec<RamRegion>,
}

impl GuestRam {
    /// Create zeroed RAM with the given (iova, size) layout.
    pub fn new(layout: &[(u64, u64)]) -> io::Result<Self> {
        let mut regions = Vec::new();
        for &(iova, size) in layout {
            let fd = nix::sys::memfd::memfd_create(
                c"vfud-guest-ram",
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let file = File::from(fd);
            file.set_len(size)?;
            let words = size.div_ceil(PAGE).div_ceil(64) as usize;
            regions.push(RamRegion {
                iova,
                size,
                file,
                cpu_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            });
        }
        Ok(Self { regions })
    }

    fn region(&self, iova: u64, len: usize) -> io::Result<&RamRegion> {
        self.regions
            .iter()
            .find(|r| iova >= r.iova && iova + len as u64 <= r.iova + r.size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{iova:#x} not in guest RAM"),
                )
            })
    }

    /// A CPU write to guest RAM (dirty-tracked, as KVM's dirty log would).
    pub fn write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        let r = self.region(iova, data.len())?;
        r.file.write_all_at(data, iova - r.iova)?;
        let first = (iova - r.iova) / PAGE;
        let last = (iova - r.iova + data.len().max(1) as u64 - 1) / PAGE;
        for p in first..=last {
            r.cpu_dirty[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
        Ok(())
    }

    /// A CPU read of guest RAM.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.region(iova, buf.len())?;
        r.file.read_exact_at(buf, iova - r.iova)
    }

    /// DMA-map every region into the server behind `c`.
    pub fn map(&self, c: &mut Client) -> Result<(), ProtocolError> {
        for r in &self.regions {
            c.dma_map(
                DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                0,
                r.iova,
                r.size,
                Some(r.file.as_fd()),
            )?;
        }
        Ok(())
    }

    /// Whole contents, for comparisons.
    pub fn snapshot(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for r in &self.regions {
            let mut b = vec![0u8; r.size as usize];
            r.file.read_exact_at(&mut b, 0)?;
            out.extend(b);
        }
        Ok(out)
    }
}

/// Interrupt setup the VMM gave the device, replayable on a destination.
#[derive(Debug, Default)]
pub struct IrqSetup {
    assigned: Vec<(u32, u32, Vec<OwnedFd>)>,
    masked: BTreeSet<(u32, u32)>,
    intx_unmask: Option<OwnedFd>,
}

impl IrqSetup {
    /// Assign trigger eventfds (recorded for replay).
    pub fn assign(
        &mut self,
        c: &mut Client,
        index: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ProtocolError> {
        c.set_irq_eventfds(index, start, fds)?;
        let owned = fds
            .iter()
            .map(|f| f.try_clone_to_owned())
            .collect::<io::Result<Vec<_>>>()?;
        self.assigned.push((index, start, owned));
        Ok(())
    }

    /// Mask or unmask a vector (recorded for replay).
    pub fn set_masked(
        &mut self,
        c: &mut Client,
        index: u32,
        vector: u32,
        masked: bool,
    ) -> Result<(), ProtocolError> {
        let action = if masked {
            IrqAction::Mask
        } else {
            IrqAction::Unmask
        };
        c.irq_action(action, index, vector, 1)?;
        if masked {
            self.masked.insert((index, vector));
        } else {
            self.masked.remove(&(index, vector));
        }
        Ok(())
    }

    /// Assign the INTx unmask (resample) eventfd.
    pub fn set_intx_unmask(
        &mut self,
        c: &mut Client,
        fd: BorrowedFd<'_>,
    ) -> Result<(), ProtocolError> {
        c.set_irq_unmask_eventfd(IRQ_INDEX_INTX, fd)?;
        self.intx_unmask = Some(fd.try_clone_to_owned()?);
        Ok(())
    }

    /// Send the whole setup to another server (during RESUMING it is deferred there).
    pub fn replay(&self, c: &mut Client) -> Result<(), ProtocolError> {
        for (index, start, fds) in &self.assigned {
            let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            c.set_irqs_raw(
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                *index,
                *start,
                b.len() as u32,
                &[],
                &b,
            )?;
        }
        for (index, vector) in &self.masked {
            c.irq_action(IrqAction::Mask, *index, *vector, 1)?;
        }
        if let Some(fd) = &self.intx_unmask {
            c.set_irq_unmask_eventfd(IRQ_INDEX_INTX, fd.as_fd())?;
        }
        Ok(())
    }

    /// Duplicate (fds are dup'ed).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            assigned: self
                .assigned
                .iter()
                .map(|(i, s, fds)| {
                    Ok((
                        *i,
                        *s,
                        fds.iter()
                            .map(|f| f.try_clone())
                            .collect::<io::Result<Vec<_>>>()?,
                    ))
                })
                .collect::<io::Result<Vec<_>>>()?,
            masked: self.masked.clone(),
            intx_unmask: self
                .intx_unmask
                .as_ref()
                .map(|f| f.try_clone())
                .transpose()?,
        })
    }
}

/// One side of a migration: the device connection plus what the VMM owns for it.
#[derive(Debug)]
pub struct Endpoint {
    /// Connection to the device server.
    pub client: Client,
    /// Guest RAM mapped into it, if the driver plays the VMM.
    pub ram: Option<GuestRam>,
    /// Interrupt setup.
    pub irqs: IrqSetup,
    /// The VMM's view of the device's config space: on a source, captured when its VM stopped
    /// during a migration; on a destination, what was restored to it.
    pub config: Option<ConfigView>,
}

impl Endpoint {
    /// Connect and negotiate.
    pub fn connect(path: &Path) -> Result<Self, ProtocolError> {
        Ok(Self {
            client: Client::connect_negotiated(path)?,
            ram: None,
            irqs: IrqSetup::default(),
            config: None,
        })
    }

    /// Give the endpoint guest RAM, DMA-mapped into its server.
    pub fn with_ram(mut self, ram: GuestRam) -> Result<Self, ProtocolError> {
        ram.map(&mut self.client)?;
        self.ram = Some(ram);
        Ok(self)
    }
}

/// Copies guest RAM from source to destination: everything once, then what the device
/// (DMA logging) or the CPU (the VM's writes) dirtied.
pub(crate) struct RamSync {
    active: bool,
    pub(crate) copied: u64,
}

fn copy_page(src: &RamRegion, dst: &RamRegion, page: u64, buf: &mut [u8]) -> io::Result<u64> {
    let off = page * PAGE;
    let n = PAGE.min(src.size - off) as usize;
    src.file.read_exact_at(&mut buf[..n], off)?;
    dst.file.write_all_at(&buf[..n], off)?;
    Ok(n as u64)
}

impl RamSync {
    pub(crate) fn start(src: &mut Endpoint, dst: &mut Endpoint) -> Result<Self, MigrateError> {
        let (Some(sr), Some(dr)) = (&src.ram, &dst.ram) else {
            return Ok(Self {
                active: false,
                copied: 0,
            });
        };
        if sr.regions.len() != dr.regions.len()
            || sr
                .regions
                .iter()
                .zip(&dr.regions)
                .any(|(a, b)| a.iova != b.iova || a.size != b.size)
        {
            return Err(MigrateError::RamMismatch);
        }
        src.client
            .dma_logging_start(&DmaLoggingControl {
                page_size: PAGE,
                ranges: vec![],
            })
            .step("start dirty logging")?;
        let mut copied = 0;
        let mut buf = vec![0u8; PAGE as usize];
        for (s, d) in sr.regions.iter().zip(&dr.regions) {
            for w in &s.cpu_dirty {
                w.store(0, Ordering::Relaxed);
            }
            for p in 0..s.size.div_ceil(PAGE) {
                copied += copy_page(s, d, p, &mut buf)?;
            }
        }
        Ok(Self {
            active: true,
            copied,
        })
    }

    /// Copy pages dirtied since the last sync; returns bytes copied.
    pub(crate) fn sync(&self, src: &mut Endpoint, dst: &mut Endpoint) -> Result<u64, MigrateError> {
        if !self.active {
            return Ok(0);
        }
        let (Some(sr), Some(dr)) = (&src.ram, &dst.ram) else {
            return Ok(0);
        };
        let mut copied = 0;
        let mut buf = vec![0u8; PAGE as usize];
        let max_pages = (src.client.negotiated().max_data_xfer_size / 2) * 8;
        for (s, d) in sr.regions.iter().zip(&dr.regions) {
            let pages = s.size.div_ceil(PAGE);
            let mut first = 0;
            while first < pages {
                let n = (pages - first).min(max_pages);
                let rep = DmaLoggingReport {
                    iova: s.iova + first * PAGE,
                    length: n * PAGE,
                    page_size: PAGE,
                };
                let bm = src.client.dma_logging_report(&rep).step("dirty report")?;
                for p in 0..n {
                    let device = bm
                        .get((p / 8) as usize)
                        .is_some_and(|b| b & (1 << (p % 8)) != 0);
                    let g = first + p;
                    let cpu = s.cpu_dirty[(g / 64) as usize]
                        .fetch_and(!(1 << (g % 64)), Ordering::Relaxed)
                        & (1 << (g % 64))
                        != 0;
                    if device || cpu {
                        copied += copy_page(s, d, g, &mut buf)?;
                    }
                }
                first += n;
            }
        }
        Ok(copied)
    }

    pub(crate) fn stop(&self, src: &mut Endpoint) {
        if self.active {
            let _ = src.client.dma_logging_stop();
        }
    }
}

/// The VMM's view of a device's PCI config space (region 7): the bytes the VMM read from it,
/// as QEMU keeps its own emulated copy (`pdev->config`, kept current by every guest config
/// access it forwards).
///
/// Why a view rather than reading the device when the state is saved: QEMU saves config space
/// from that copy (`hw/vfio/pci.c vfio_pci_save_config`: `VMSTATE_PCI_DEVICE` plus MSI-X), after
/// the final stop-copy data, without touching the device; and libvfio-user servers refuse
/// region access — and GET_REGION_INFO — while the device is in STOP_COPY. The driver, playing
/// the VMM, therefore captures its view at the moment the guest can no longer change config:
/// right after the VM's vCPUs stop ([`super::VmHooks::stop`]) and before the device enters
/// STOP_COPY, a point where every server still serves region reads. Guest-visible config cannot
/// change after that, so the destination still gets the final values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigView {
    bytes: Vec<u8>,
}

impl ConfigView {
    /// Read the device's whole config space (at most 4 KiB, in 256-byte reads).
    pub fn capture(c: &mut Client) -> Result<Self, ProtocolError> {
        let (info, _) = c.region_info(PCI_CONFIG_REGION_INDEX)?;
        let len = info.info.size.min(4096) as u32;
        Ok(Self {
            bytes: read_config(c, len)?,
        })
    }

    /// The captured bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Bring `dst`'s config space to this view: every dword that differs from the 8th byte on
    /// (IDs and revision are the device's own), the command register last (QEMU's
    /// `vfio_pci_load_config` order).
    pub fn restore(&self, dst: &mut Client) -> Result<(), ProtocolError> {
        let s = &self.bytes;
        if s.len() < 8 {
            return Err(ProtocolError::UnexpectedReply(
                "config space view shorter than 8 bytes".into(),
            ));
        }
        let d = read_config(dst, s.len() as u32)?;
        for off in (0x08..s.len().min(d.len()) & !3).step_by(4) {
            if s[off..off + 4] != d[off..off + 4] {
                dst.region_write(PCI_CONFIG_REGION_INDEX, off as u64, &s[off..off + 4])?;
            }
        }
        dst.region_write(PCI_CONFIG_REGION_INDEX, 4, &s[4..6])
    }
}

fn read_config(c: &mut Client, len: u32) -> Result<Vec<u8>, ProtocolError> {
    let mut v = Vec::with_capacity(len as usize);
    let mut off = 0;
    while off < len {
        v.extend(c.region_read(PCI_CONFIG_REGION_INDEX, off.into(), 256.min(len - off))?);
        off += 256;
    }
    Ok(v)
}

/// Restore PCI config space on the destination as the source has it now (a capture followed
/// by [`ConfigView::restore`]).
pub fn restore_config(src: &mut Client, dst: &mut Client) -> Result<(), ProtocolError> {
    ConfigView::capture(src)?.restore(dst)
}
