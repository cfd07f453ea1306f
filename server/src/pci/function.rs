//! [`PciFunction`]: everything the server emulates around a device model — config space, the
//! device-owned BAR memory, the MSI-X table and PBA, and interrupts — and the routing of a BAR
//! access to the part that serves it.

use std::os::fd::{AsFd, OwnedFd};

use vfud_protocol::messages::region::{
    RegionCap, RegionInfo, SparseArea, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};

use crate::device::{BarBacking, DeviceDescription};
use crate::error::{DeviceError, RequestError};
use crate::irq::Interrupts;
use crate::mmap::SharedMemory;
use crate::pci::config::{PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_STATUS};
use crate::pci::msix::MsixTable;
use crate::pci::{ConfigEffect, ConfigSpace, ConfigView};

/// PCI STATUS bit 3: Interrupt Status (PCI 2.3).
const PCI_STATUS_INTERRUPT: u8 = 1 << 3;

/// A read into, or a write from, a buffer.
pub enum Access<'a> {
    /// Read into the buffer.
    Read(&'a mut [u8]),
    /// Write the bytes.
    Write(&'a [u8]),
}

impl Access<'_> {
    /// Bytes accessed.
    pub fn len(&self) -> usize {
        match self {
            Access::Read(b) => b.len(),
            Access::Write(b) => b.len(),
        }
    }

    /// Whether no byte is accessed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Who serves an access to a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarTarget {
    /// The MSI-X table, at this offset in it (the server).
    MsixTable(u64),
    /// The MSI-X PBA, at this offset in it (the server).
    MsixPba(u64),
    /// Device-owned shared memory (the server).
    Shared,
    /// The device model.
    Trapped,
}

/// The emulated PCI function of one device.
pub struct PciFunction {
    desc: DeviceDescription,
    config: ConfigSpace,
    bars: [Option<SharedMemory>; 6],
    msix: MsixTable,
    irqs: Interrupts,
}

impl PciFunction {
    /// Build the function for a description, allocating shared memory for its shared BARs.
    pub fn new(desc: DeviceDescription) -> Result<Self, DeviceError> {
        let mut bars: [Option<SharedMemory>; 6] = Default::default();
        for (i, b) in desc.bars.iter().enumerate() {
            if let Some(spec) = b.as_ref().filter(|s| s.backing != BarBacking::Trapped) {
                let len = usize::try_from(spec.size)
                    .map_err(|_| DeviceError::Other(format!("BAR {i} too large")))?;
                bars[i] = Some(SharedMemory::new(
                    &format!("vfud-{}-bar{i}", desc.name),
                    len,
                )?);
            }
        }
        Ok(Self {
            config: ConfigSpace::new(&desc),
            irqs: Interrupts::new(&desc.irqs),
            msix: MsixTable::new(desc.irqs.msix.map(|(n, _)| n).unwrap_or(0)),
            bars,
            desc,
        })
    }

    /// The device's description.
    pub fn desc(&self) -> &DeviceDescription {
        &self.desc
    }

    /// Device-owned BAR memory.
    pub fn bars(&self) -> &[Option<SharedMemory>; 6] {
        &self.bars
    }

    /// Serve shared BAR `bar` from `fd`, the memfd a peer vfud process served it from (a live
    /// handover, a supervised restart). The client mapped that memfd, not this process's, so
    /// only the same memory keeps what either side writes there visible to the other. The fd
    /// comes from a peer: it must be sealed against shrinking, which would SIGBUS this
    /// process. Returns the memory served until now, for [`PciFunction::restore_bar_memory`].
    pub fn adopt_bar_memory(
        &mut self,
        bar: usize,
        fd: OwnedFd,
    ) -> Result<SharedMemory, DeviceError> {
        let Some(Some(own)) = self.bars.get_mut(bar) else {
            return Err(DeviceError::Other(format!(
                "BAR {bar} has no shared memory"
            )));
        };
        let mem = SharedMemory::from_sealed_fd(fd, own.len())?;
        Ok(std::mem::replace(own, mem))
    }

    /// Serve BAR `bar` from `mem` again (the import that adopted another memory failed).
    pub fn restore_bar_memory(&mut self, bar: usize, mem: SharedMemory) {
        if let Some(slot) = self.bars.get_mut(bar) {
            *slot = Some(mem);
        }
    }

    /// Interrupt state.
    pub fn irqs(&self) -> &Interrupts {
        &self.irqs
    }

    /// Interrupt state, mutable.
    pub fn irqs_mut(&mut self) -> &mut Interrupts {
        &mut self.irqs
    }

    /// Config space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// The MSI-X table.
    pub fn msix(&self) -> &MsixTable {
        &self.msix
    }

    /// Config space and MSI-X table as a device sees them when it restores its state.
    pub fn view(&self) -> ConfigView<'_> {
        ConfigView::new(&self.config, &self.msix)
    }

    /// The parts a device callback needs: BAR memory and interrupts.
    pub fn device_parts(&mut self) -> (&[Option<SharedMemory>; 6], &mut Interrupts) {
        (&self.bars, &mut self.irqs)
    }

    /// Power-on state of config space, MSI-X table and interrupts (DEVICE_RESET).
    pub fn reset(&mut self) {
        self.config.reset();
        self.msix.reset();
        self.irqs.disable_all();
    }

    /// Which part serves `len` bytes at `offset` of BAR `bar`; the range is checked.
    pub fn route(&self, bar: usize, offset: u64, len: u64) -> Result<BarTarget, RequestError> {
        let out = || RequestError::OutOfRange {
            region: bar as u32,
            offset,
            len,
        };
        let spec = self.desc.bars[bar]
            .as_ref()
            .ok_or(RequestError::NoRegion(bar as u32))?;
        let end = offset.checked_add(len).ok_or_else(out)?;
        if end > spec.size || len == 0 {
            return Err(out());
        }
        if let Some((n, p)) = self
            .desc
            .irqs
            .msix
            .filter(|(_, p)| usize::from(p.bar.0) == bar)
        {
            let table_end = p.table_offset + self.msix.len_bytes();
            let pba_end = p.pba_offset + u64::from(n).div_ceil(64) * 8;
            if offset >= p.table_offset && end <= table_end {
                return Ok(BarTarget::MsixTable(offset - p.table_offset));
            }
            if offset >= p.pba_offset && end <= pba_end {
                return Ok(BarTarget::MsixPba(offset - p.pba_offset));
            }
        }
        Ok(match spec.backing {
            BarBacking::Shared { mmap_areas: None } => BarTarget::Shared,
            BarBacking::Shared {
                mmap_areas: Some(_),
            }
            | BarBacking::Trapped => BarTarget::Trapped,
        })
    }

    /// Serve an access whose target is the server's ([`BarTarget::Trapped`] is the
    /// caller's to forward to the device).
    pub fn bar_access(
        &mut self,
        bar: usize,
        target: BarTarget,
        offset: u64,
        access: Access<'_>,
    ) -> Result<(), RequestError> {
        match (target, access) {
            (BarTarget::MsixTable(o), Access::Read(buf)) => self.msix.read(o, buf),
            (BarTarget::MsixTable(o), Access::Write(data)) => {
                for c in self.msix.write(o, data) {
                    self.irqs.set_msix_masked(c.vector, c.masked);
                }
            }
            (BarTarget::MsixPba(o), Access::Read(buf)) => self.irqs.read_pba(o, buf),
            (BarTarget::MsixPba(_), Access::Write(_)) => tracing::debug!("PBA write dropped"),
            (BarTarget::Shared, access) => {
                let mem = self.bars[bar]
                    .as_ref()
                    .ok_or(RequestError::NoRegion(bar as u32))?;
                match access {
                    Access::Read(buf) => mem.read(offset, buf)?,
                    Access::Write(data) => mem.write(offset, data)?,
                }
            }
            (BarTarget::Trapped, _) => {
                return Err(RequestError::invalid(
                    "trapped BAR access reached the server",
                ))
            }
        }
        Ok(())
    }

    /// A config space access. Reads show the live PCI 2.3 Interrupt Status bit; a write to
    /// COMMAND's Interrupt Disable gates INTx (holding the line off keeps it pending).
    pub fn config_access(&mut self, offset: u64, access: Access<'_>) -> Result<(), RequestError> {
        let out = |len| RequestError::OutOfRange {
            region: vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX,
            offset,
            len,
        };
        match access {
            Access::Read(buf) => {
                let len = buf.len() as u64;
                self.config.read(offset, buf).ok_or_else(|| out(len))?;
                let status = PCI_STATUS as u64;
                if (offset..offset + len).contains(&status) && self.irqs.intx_status() {
                    buf[(status - offset) as usize] |= PCI_STATUS_INTERRUPT;
                }
            }
            Access::Write(data) => {
                let effect = self
                    .config
                    .write(offset, data)
                    .ok_or_else(|| out(data.len() as u64))?;
                if let ConfigEffect::Command(cmd) = effect {
                    self.irqs
                        .set_intx_disabled(cmd & PCI_COMMAND_INTX_DISABLE != 0);
                }
            }
        }
        Ok(())
    }

    /// Replace config space and the MSI-X table from migrated images and bring the INTx
    /// gating in line with the restored COMMAND register. Vector masks are not taken from
    /// the table: the client's SET_IRQS (replayed on the destination, or carried by a
    /// handover) say which vectors are masked, as they did before the migration.
    pub fn restore(
        &mut self,
        config: &[u8],
        msix: Option<&[u8]>,
    ) -> Result<(), crate::error::ImageSizeError> {
        self.config.restore(config)?;
        if let Some(m) = msix {
            self.msix.restore(m)?;
        }
        let cmd = self.config.u16_at(PCI_COMMAND);
        self.irqs
            .set_intx_disabled(cmd & PCI_COMMAND_INTX_DISABLE != 0);
        Ok(())
    }

    /// REGION_INFO of a BAR or config space (index 0–7): the info, its capabilities and the
    /// fd of a shared BAR.
    pub fn region_info(
        &self,
        index: u32,
    ) -> Result<(RegionInfo, Vec<RegionCap>, Vec<OwnedFd>), RequestError> {
        let mut info = RegionInfo {
            argsz: 0,
            flags: 0,
            index,
            cap_offset: 0,
            size: 0,
            offset: 0,
        };
        let (mut caps, mut fds) = (Vec::new(), Vec::new());
        match index {
            0..=5 => {
                if let Some(spec) = &self.desc.bars[index as usize] {
                    info.size = spec.size;
                    info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
                    if let (BarBacking::Shared { mmap_areas }, Some(mem)) =
                        (&spec.backing, &self.bars[index as usize])
                    {
                        info.flags |= REGION_FLAG_MMAP;
                        let areas = mmap_areas.clone().unwrap_or_else(|| vec![(0, spec.size)]);
                        caps.push(RegionCap::SparseMmap(
                            areas
                                .into_iter()
                                .map(|(offset, size)| SparseArea { offset, size })
                                .collect(),
                        ));
                        let fd = mem.fd().as_fd().try_clone_to_owned().map_err(|source| {
                            RequestError::Io {
                                context: "duplicating the BAR memory fd",
                                source,
                            }
                        })?;
                        fds.push(fd);
                    }
                }
            }
            vfud_protocol::messages::region::PCI_CONFIG_REGION_INDEX => {
                info.size = self.config.len() as u64;
                info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
            }
            6 => {} // ROM: none
            n => return Err(RequestError::NoRegion(n)),
        }
        Ok((info, caps, fds))
    }
}
