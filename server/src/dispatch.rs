//! Request dispatch: the only code that matches on the decoded command. It owns the device
//! and everything the server emulates around it (config space, shared BAR memory, MSI-X table
//! and PBA, interrupts, DMA table) and turns each [`Request`] into a reply payload.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use vfud_protocol::codec::{Frame, FrameReader, Limits};
use vfud_protocol::messages::device::{DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET};
use vfud_protocol::messages::irq::IRQ_INDEX_COUNT;
use vfud_protocol::messages::region::{
    RegionCap, RegionInfo, RegionInfoReply, RegionIoFds, SparseArea, PCI_CONFIG_REGION_INDEX,
    PCI_NUM_REGIONS, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};
use vfud_protocol::messages::version::{negotiate, Negotiated, ServerOffer};
use vfud_protocol::messages::{DeviceInfo, Request};
use vfud_protocol::wire::put;

use crate::device::{BarBacking, BarIndex, BarKind, Device, DeviceCtx, DeviceDescription};
use crate::dma::{ClientChannel, DmaTable, GuestMem};
use crate::error::RequestError;
use crate::irq::Interrupts;
use crate::mmap::SharedMemory;
use crate::pci::{ConfigEffect, ConfigSpace};

/// A reply payload and the fds to send with it.
#[derive(Debug, Default)]
pub struct Reply {
    /// Payload after the header.
    pub payload: Vec<u8>,
    /// File descriptors.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn bytes(payload: Vec<u8>) -> Self {
        Self {
            payload,
            fds: Vec::new(),
        }
    }
}

/// The connected client's socket state, kept here so deferred work can do socket DMA.
pub struct ClientConn {
    /// The socket (non-blocking).
    pub stream: UnixStream,
    /// Frame assembler.
    pub reader: FrameReader,
    /// Commands that arrived while the server waited for a DMA reply.
    pub backlog: VecDeque<Frame>,
    /// Ids of server→client requests.
    pub next_id: u16,
}

/// One device and all server-side emulation around it.
pub struct DeviceServer {
    device: Box<dyn Device>,
    desc: DeviceDescription,
    config: ConfigSpace,
    bars: [Option<SharedMemory>; 6],
    msix_table: Vec<u8>,
    irqs: Interrupts,
    dma: DmaTable,
    offer: ServerOffer,
    negotiated: Option<Negotiated>,
    work: bool,
    /// The connected client, if any.
    pub client: Option<ClientConn>,
}

fn einval(msg: impl Into<String>) -> RequestError {
    RequestError::new(Errno::EINVAL, msg)
}

/// Which part of a BAR an access hits.
enum BarTarget {
    MsixTable(u64),
    MsixPba(u64),
    Shared,
    Trapped,
}

impl DeviceServer {
    /// Wrap a device, allocating shared memory for its shared BARs.
    pub fn new(device: Box<dyn Device>, offer: ServerOffer) -> Result<Self, crate::DeviceError> {
        let desc = device.describe();
        let mut bars: [Option<SharedMemory>; 6] = Default::default();
        for (i, b) in desc.bars.iter().enumerate() {
            if let Some(spec) = b {
                if matches!(spec.backing, BarBacking::Shared { .. }) {
                    let len = usize::try_from(spec.size)
                        .map_err(|_| crate::DeviceError::Other("BAR too large".into()))?;
                    bars[i] = Some(SharedMemory::new(
                        &format!("vfud-{}-bar{i}", desc.name),
                        len,
                    )?);
                }
            }
        }
        let msix_len = desc.irqs.msix.map(|(n, _)| n as usize * 16).unwrap_or(0);
        let mut msix_table = vec![0u8; msix_len];
        // Vector control: every vector starts masked (PCI 3.0 §6.8.2.9).
        for v in msix_table.chunks_mut(16) {
            v[12] = 1;
        }
        Ok(Self {
            config: ConfigSpace::new(&desc),
            irqs: Interrupts::new(&desc.irqs),
            dma: DmaTable::new(offer.max_dma_maps as usize),
            device,
            desc,
            bars,
            msix_table,
            offer,
            negotiated: None,
            work: false,
            client: None,
        })
    }

    /// The device's description.
    pub fn description(&self) -> &DeviceDescription {
        &self.desc
    }

    /// Limits for incoming frames (negotiated, or defaults before VERSION).
    pub fn limits(&self) -> Limits {
        self.negotiated
            .as_ref()
            .map(Limits::from_negotiated)
            .unwrap_or_default()
    }

    /// Interrupt state (for the event loop's INTx unmask eventfd).
    pub fn irqs_mut(&mut self) -> &mut Interrupts {
        &mut self.irqs
    }

    /// The INTx unmask eventfd to watch, if assigned.
    pub fn irqs_fd(&self) -> Option<std::os::fd::RawFd> {
        self.irqs.intx_unmask_fd()
    }

    /// Forget everything that belonged to the client, keeping device state
    /// (spec "Client Disconnection").
    pub fn client_gone(&mut self) {
        self.client = None;
        self.dma.unmap_all();
        self.irqs.disable_all();
        self.negotiated = None;
    }

    /// Whether deferred device work is pending.
    pub fn work_pending(&self) -> bool {
        self.work
    }

    /// Call `f` with the device and a context whose guest memory may use the socket.
    fn with_device<R>(
        &mut self,
        allow_socket_dma: bool,
        f: impl FnOnce(&mut dyn Device, &mut DeviceCtx<'_>) -> R,
    ) -> R {
        let limits = self.limits();
        let Self {
            device,
            irqs,
            bars,
            dma,
            work,
            client,
            ..
        } = self;
        let channel = match (allow_socket_dma, client.as_mut()) {
            (true, Some(c)) => Some(ClientChannel {
                stream: &c.stream,
                reader: &mut c.reader,
                backlog: &mut c.backlog,
                limits,
                next_id: &mut c.next_id,
            }),
            _ => None,
        };
        let mut cx = DeviceCtx {
            mem: GuestMem::new(dma, channel),
            irqs,
            bars,
            work,
        };
        f(device.as_mut(), &mut cx)
    }

    /// Run deferred device work (no client request is outstanding now).
    pub fn run_deferred(&mut self) {
        let mut rounds = 0;
        while self.work && rounds < 64 {
            self.work = false;
            rounds += 1;
            if let Err(e) = self.with_device(true, |d, cx| d.run(cx)) {
                tracing::warn!(device = self.desc.name, "deferred work failed: {e}");
            }
        }
    }

    /// A device event fd became readable.
    pub fn device_event(&mut self, token: u32) {
        if let Err(e) = self.with_device(false, |d, cx| d.on_event(token, cx)) {
            tracing::warn!(device = self.desc.name, token, "device event failed: {e}");
        }
    }

    /// The device's timer expired.
    pub fn device_timer(&mut self) {
        self.with_device(false, |d, cx| d.on_timer(cx));
    }

    /// The device's event fds and next deadline.
    pub fn device_sources(&self) -> (Vec<(std::os::fd::RawFd, u32)>, Option<std::time::Instant>) {
        (self.device.event_fds(), self.device.next_deadline())
    }

    /// Handle one decoded request. `request_len` is the payload size (VERSION needs it).
    pub fn handle(&mut self, req: Request, request_len: usize) -> Result<Reply, RequestError> {
        if self.negotiated.is_none() && !matches!(req, Request::Version(_)) {
            return Err(einval("VERSION must be the first command"));
        }
        match req {
            Request::Version(v) => {
                let (reply, n) = negotiate(&v, &self.offer, request_len)?;
                self.dma.set_max_maps(n.max_dma_maps as usize);
                tracing::info!(device = self.desc.name, ?n, "client negotiated");
                self.negotiated = Some(n);
                Ok(Reply::bytes(reply.encode()))
            }
            Request::DmaMap(m, fd) => {
                self.dma.map(&m, fd)?;
                Ok(Reply::default())
            }
            Request::DmaUnmap(u) => {
                if u.is_all() {
                    self.dma.unmap_all();
                } else {
                    self.dma.unmap(u.addr, u.size)?;
                }
                let mut p = Vec::new();
                put(&mut p, &u);
                Ok(Reply::bytes(p))
            }
            Request::DeviceGetInfo(_) => {
                let mut p = Vec::new();
                put(
                    &mut p,
                    &DeviceInfo {
                        argsz: 16,
                        flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
                        num_regions: PCI_NUM_REGIONS,
                        num_irqs: IRQ_INDEX_COUNT,
                    },
                );
                Ok(Reply::bytes(p))
            }
            Request::GetRegionInfo(r) => self.region_info(r),
            Request::GetRegionIoFds(r) => {
                if r.index >= PCI_NUM_REGIONS {
                    return Err(einval(format!("no region {}", r.index)));
                }
                Ok(Reply::bytes(RegionIoFds::encode_reply(r.index, &[])))
            }
            Request::GetIrqInfo(i) => {
                let mut p = Vec::new();
                put(&mut p, &self.irqs.info(i.index)?);
                Ok(Reply::bytes(p))
            }
            Request::SetIrqs(s) => {
                self.irqs.apply(s)?;
                Ok(Reply::default())
            }
            Request::RegionRead(a) => {
                let mut buf = vec![0u8; a.count as usize];
                self.region_access(a.region, a.offset, Access::Read(&mut buf))?;
                Ok(Reply::bytes(a.encode_with_data(&buf)))
            }
            Request::RegionWrite(a, data) => {
                self.region_access(a.region, a.offset, Access::Write(&data))?;
                let mut p = Vec::new();
                put(&mut p, &a);
                Ok(Reply::bytes(p))
            }
            Request::RegionWriteMulti(entries) => {
                for e in entries {
                    if let Err(err) =
                        self.region_access(e.region, e.offset, Access::Write(e.bytes()))
                    {
                        tracing::debug!(
                            region = e.region,
                            offset = e.offset,
                            "write-multi entry failed: {err}"
                        );
                    }
                }
                Ok(Reply::default())
            }
            Request::DeviceReset => {
                self.reset();
                Ok(Reply::default())
            }
            Request::DeviceFeature(f) => Err(RequestError::new(
                Errno::ENOTTY,
                format!("device feature {} is not supported", f.feature),
            )),
            Request::MigDataRead(_) | Request::MigDataWrite(_) => {
                Err(einval("migration data outside a migration"))
            }
        }
    }

    fn reset(&mut self) {
        self.config.reset();
        self.irqs.disable_all();
        for v in self.msix_table.chunks_mut(16) {
            v.fill(0);
            v[12] = 1;
        }
        self.with_device(false, |d, cx| d.reset(cx));
    }

    fn region_info(&self, r: RegionInfo) -> Result<Reply, RequestError> {
        let mut info = RegionInfo {
            argsz: 0,
            flags: 0,
            index: r.index,
            cap_offset: 0,
            size: 0,
            offset: 0,
        };
        let mut caps = Vec::new();
        let mut fds = Vec::new();
        match r.index {
            0..=5 => {
                if let Some(spec) = &self.desc.bars[r.index as usize] {
                    info.size = spec.size;
                    info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
                    if let (BarBacking::Shared { mmap_areas }, Some(mem)) =
                        (&spec.backing, &self.bars[r.index as usize])
                    {
                        info.flags |= REGION_FLAG_MMAP;
                        let areas = mmap_areas.clone().unwrap_or_else(|| vec![(0, spec.size)]);
                        caps.push(RegionCap::SparseMmap(
                            areas
                                .into_iter()
                                .map(|(offset, size)| SparseArea { offset, size })
                                .collect(),
                        ));
                        let fd = mem
                            .fd()
                            .try_clone_to_owned()
                            .map_err(|e| RequestError::new(Errno::EIO, e.to_string()))?;
                        fds.push(fd);
                    }
                }
            }
            PCI_CONFIG_REGION_INDEX => {
                info.size = self.config.len() as u64;
                info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
            }
            6 | 8 => {}
            n => return Err(einval(format!("no region {n}"))),
        }
        let payload = RegionInfoReply { info, caps }.encode(r.argsz);
        // No fd when the caps did not fit: the client will ask again.
        if payload.len() < 32 + 8 && info.flags & REGION_FLAG_MMAP != 0 {
            fds.clear();
        }
        Ok(Reply { payload, fds })
    }

    fn bar_target(&self, bar: usize, offset: u64, len: u64) -> BarTarget {
        if let Some((n, p)) = self.desc.irqs.msix {
            if usize::from(p.bar.0) == bar {
                let table_end = p.table_offset + u64::from(n) * 16;
                let pba_end = p.pba_offset + u64::from(n).div_ceil(64) * 8;
                if offset >= p.table_offset && offset + len <= table_end {
                    return BarTarget::MsixTable(offset - p.table_offset);
                }
                if offset >= p.pba_offset && offset + len <= pba_end {
                    return BarTarget::MsixPba(offset - p.pba_offset);
                }
            }
        }
        match self.desc.bars[bar].as_ref().map(|b| &b.backing) {
            Some(BarBacking::Shared { .. }) => BarTarget::Shared,
            _ => BarTarget::Trapped,
        }
    }

    fn region_access(
        &mut self,
        region: u32,
        offset: u64,
        access: Access<'_>,
    ) -> Result<(), RequestError> {
        let len = access.len() as u64;
        match region {
            0..=5 => {
                let bar = region as usize;
                let spec = self.desc.bars[bar]
                    .as_ref()
                    .ok_or_else(|| einval(format!("BAR {bar} is not implemented")))?;
                let end = offset
                    .checked_add(len)
                    .ok_or_else(|| einval("offset overflow"))?;
                if end > spec.size || len == 0 {
                    return Err(einval(format!(
                        "{len} bytes at {offset:#x} outside BAR {bar} of {:#x} bytes",
                        spec.size
                    )));
                }
                let _io = spec.kind == BarKind::Io;
                match (self.bar_target(bar, offset, len), access) {
                    (BarTarget::MsixTable(o), Access::Read(buf)) => {
                        buf.copy_from_slice(&self.msix_table[o as usize..(o + len) as usize]);
                    }
                    (BarTarget::MsixTable(o), Access::Write(data)) => {
                        self.msix_table[o as usize..(o + len) as usize].copy_from_slice(data);
                        let vector = (o / 16) as u32;
                        let ctl = (vector as usize) * 16 + 12;
                        let masked = self.msix_table[ctl] & 1 != 0;
                        self.irqs.set_msix_masked(vector, masked);
                    }
                    (BarTarget::MsixPba(o), Access::Read(buf)) => self.irqs.read_pba(o, buf),
                    (BarTarget::MsixPba(_), Access::Write(_)) => {
                        tracing::debug!("PBA write dropped");
                    }
                    (BarTarget::Shared, Access::Read(buf)) => self.bars[bar]
                        .as_ref()
                        .ok_or_else(|| einval("no memory"))?
                        .read(offset, buf)?,
                    (BarTarget::Shared, Access::Write(data)) => self.bars[bar]
                        .as_ref()
                        .ok_or_else(|| einval("no memory"))?
                        .write(offset, data)?,
                    (BarTarget::Trapped, Access::Read(buf)) => self
                        .with_device(false, |d, cx| {
                            d.bar_read(BarIndex(bar as u8), offset, buf, cx)
                        })?,
                    (BarTarget::Trapped, Access::Write(data)) => self
                        .with_device(false, |d, cx| {
                            d.bar_write(BarIndex(bar as u8), offset, data, cx)
                        })?,
                }
                Ok(())
            }
            PCI_CONFIG_REGION_INDEX => match access {
                Access::Read(buf) => self.config.read(offset, buf).ok_or_else(|| {
                    einval(format!("config read of {len} at {offset:#x} out of range"))
                }),
                Access::Write(data) => {
                    let effect = self.config.write(offset, data).ok_or_else(|| {
                        einval(format!("config write of {len} at {offset:#x} out of range"))
                    })?;
                    if let ConfigEffect::Command(cmd) = effect {
                        self.irqs.set_intx_disabled(
                            cmd & crate::pci::config::PCI_COMMAND_INTX_DISABLE != 0,
                        );
                    }
                    Ok(())
                }
            },
            n => Err(einval(format!("region {n} has no accessible bytes"))),
        }
    }
}

/// A read into, or a write from, a buffer.
enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Access<'_> {
    fn len(&self) -> usize {
        match self {
            Access::Read(b) => b.len(),
            Access::Write(b) => b.len(),
        }
    }
}

/// Send the fds of a reply as borrowed.
pub fn borrowed(fds: &[OwnedFd]) -> Vec<std::os::fd::BorrowedFd<'_>> {
    fds.iter().map(|f| f.as_fd()).collect()
}
