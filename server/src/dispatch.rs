//! Request dispatch: decode → route → encode. [`DeviceServer`] holds one device and the
//! emulation around it — the [`PciFunction`], the DMA table, the socket-DMA transport and the
//! [`MigrationSession`] — and this is the one place that matches on the decoded command.

use vfud_protocol::codec::{Frame, Limits};
use vfud_protocol::messages::device::{DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET};
use vfud_protocol::messages::irq::IRQ_INDEX_COUNT;
use vfud_protocol::messages::region::{
    RegionInfo, RegionInfoReply, RegionIoFds, PCI_CONFIG_REGION_INDEX, PCI_NUM_REGIONS,
};
use vfud_protocol::messages::version::{negotiate, Negotiated, ServerOffer};
use vfud_protocol::messages::{DeviceInfo, MigState, Request};
use vfud_protocol::wire::{encode, put};

use crate::device::{BarIndex, Device, DeviceCtx, DeviceDescription};
use crate::dma::socket::Outgoing;
use crate::dma::{DmaTable, GuestMem, SocketDma, SocketDmaCounters};
use crate::error::{DeviceError, RequestError};
use crate::migration::fsm::permits;
use crate::migration::v1::V1_REGION_INDEX;
use crate::migration::{MigrationSession, Parts};
use crate::mmap::SharedMemory;
use crate::pci::{Access, BarTarget, PciFunction};
pub use crate::reply::{borrowed, Reply};

/// Server-side settings of a device.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Capabilities offered in VERSION.
    pub offer: ServerOffer,
    /// Expose the v1 migration region (index 9) when the device supports migration.
    pub v1_region: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            offer: ServerOffer::default(),
            v1_region: true,
        }
    }
}

/// One device and all server-side emulation around it.
pub struct DeviceServer {
    pub(crate) device: Box<dyn Device>,
    pub(crate) function: PciFunction,
    pub(crate) dma: DmaTable,
    pub(crate) socket_dma: SocketDma,
    pub(crate) mig: MigrationSession,
    pub(crate) offer: ServerOffer,
    pub(crate) negotiated: Option<Negotiated>,
    pub(crate) work: bool,
    socket_dma_warned: bool,
    /// A large reply buffer handed back after sending, reused by the next MIG_DATA_READ so
    /// megabyte replies do not allocate (and fault in) fresh pages every time.
    spare: Vec<u8>,
}

impl DeviceServer {
    /// Wrap a device, allocating shared memory for its shared BARs.
    pub fn new(mut device: Box<dyn Device>, settings: ServerSettings) -> Result<Self, DeviceError> {
        let desc = device.describe();
        let (migratable, config_first) = match device.migration() {
            Some(m) => (true, m.needs_config_before_data()),
            None => (false, false),
        };
        let offer = settings.offer;
        Ok(Self {
            mig: MigrationSession::new(desc.name, migratable, config_first, settings.v1_region),
            function: PciFunction::new(desc)?,
            dma: DmaTable::new(offer.max_dma_maps as usize),
            socket_dma: SocketDma::new(offer.max_data_xfer_size as usize, 0x8000),
            device,
            offer,
            negotiated: None,
            work: false,
            socket_dma_warned: false,
            spare: Vec::new(),
        })
    }

    /// The device model (tests and tools reach its optional parts through this).
    pub fn device_mut(&mut self) -> &mut dyn Device {
        self.device.as_mut()
    }

    /// Current migration state.
    pub fn mig_state(&self) -> MigState {
        self.mig.state()
    }

    /// Ordering flags (`vfud::ORDERING_*`) of this device.
    pub fn ordering_flags(&self) -> u32 {
        self.mig.ordering_flags()
    }

    /// The device's description.
    pub fn description(&self) -> &DeviceDescription {
        self.function.desc()
    }

    /// Limits for incoming frames (negotiated, or defaults before VERSION).
    pub fn limits(&self) -> Limits {
        self.negotiated
            .as_ref()
            .map(Limits::from_negotiated)
            .unwrap_or_default()
    }

    /// The INTx unmask eventfd to watch, if assigned.
    pub fn irqs_fd(&self) -> Option<std::os::fd::RawFd> {
        self.function.irqs().intx_unmask_fd()
    }

    /// The INTx unmask eventfd fired.
    pub fn intx_unmask_event(&mut self) {
        self.function.irqs_mut().on_intx_unmask_event();
    }

    /// Socket-DMA counters of the current client.
    pub fn socket_dma_counters(&self) -> SocketDmaCounters {
        self.socket_dma.counters()
    }

    /// Socket-DMA requests awaiting the client's reply.
    pub fn socket_dma_in_flight(&self) -> usize {
        self.socket_dma.in_flight()
    }

    /// Forget everything that belonged to the client, keeping device state (spec "Client
    /// Disconnection"). Socket DMA in flight is dropped with the maps; the device sees that
    /// when it next runs.
    pub fn client_gone(&mut self) {
        // Dirty logging belongs to the client that started it (and its bitmaps to its maps).
        self.dma.stop_logging();
        self.dma.unmap_all();
        self.function.irqs_mut().disable_all();
        self.negotiated = None;
        // A fresh transport: the maps are gone, so nothing in flight can complete, and the
        // device's next access fails (NotMapped) and ends its job with an error.
        self.socket_dma = SocketDma::new(self.offer.max_data_xfer_size as usize, 0x8000);
        self.mig.client_gone();
        self.work = true;
    }

    /// Whether deferred device work is pending and allowed to run now.
    pub fn work_pending(&self) -> bool {
        self.work && self.mig.device_runs()
    }

    fn parts(&mut self) -> (&mut MigrationSession, Parts<'_>) {
        let Self {
            device,
            function,
            dma,
            mig,
            work,
            ..
        } = self;
        (
            mig,
            Parts {
                device: device.as_mut(),
                function,
                dma,
                work,
            },
        )
    }

    /// Call `f` with the device and a context over guest memory, interrupts and BAR memory.
    pub(crate) fn with_device<R>(
        &mut self,
        f: impl FnOnce(&mut dyn Device, &mut DeviceCtx<'_>) -> R,
    ) -> R {
        let Self {
            device,
            function,
            dma,
            socket_dma,
            work,
            ..
        } = self;
        let (bars, irqs) = function.device_parts();
        let mut cx = DeviceCtx::new(GuestMem::new(dma, Some(socket_dma)), irqs, bars, work);
        f(device.as_mut(), &mut cx)
    }

    /// Run one slice of deferred device work (the event loop calls this between messages,
    /// and again while [`DeviceServer::work_pending`]).
    pub fn run_deferred(&mut self) {
        if !self.work_pending() {
            return;
        }
        self.work = false;
        if let Err(e) = self.with_device(|d, cx| d.run(cx)) {
            let why = crate::error::chain(&e);
            tracing::warn!(
                device = self.description().name,
                "deferred work failed: {why}"
            );
        }
    }

    /// A reply from the client: one of our DMA requests answered (the device runs again to
    /// pick up the data), or a stray one, dropped.
    pub fn client_reply(&mut self, frame: &Frame) {
        if self.socket_dma.on_reply(frame) {
            self.work = true;
        } else {
            tracing::debug!(
                msg_id = frame.header.msg_id,
                "unexpected reply from client dropped"
            );
        }
    }

    /// Give back a buffer (a sent reply's, a handled write's) for the next reply to be built
    /// in; the larger of it and the one held is kept, so steady traffic allocates nothing.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > self.spare.capacity() {
            buf.clear();
            self.spare = buf;
        }
    }

    /// The recycled buffer (empty), or a new one.
    fn take_spare(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.spare);
        b.clear();
        b
    }

    /// Server→client requests (socket DMA) to send now.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        self.socket_dma.take_outbox()
    }

    /// A device event fd became readable.
    pub fn device_event(&mut self, token: u32) {
        if !self.mig.device_runs() {
            self.mig.miss_event(token);
            return;
        }
        let r = self.with_device(|d, cx| match d.host_io() {
            Some(h) => h.on_event(token, cx),
            None => Ok(()),
        });
        if let Err(e) = r {
            let why = crate::error::chain(&e);
            tracing::warn!(
                device = self.description().name,
                token,
                "device event failed: {why}"
            );
        }
    }

    /// Once the device runs again, deliver the backend events it missed while stopped.
    fn replay_missed_events(&mut self) {
        if self.mig.device_runs() {
            for token in self.mig.take_missed_events() {
                self.device_event(token);
            }
        }
    }

    /// The device's timer expired (never while stopped).
    pub fn device_timer(&mut self) {
        if self.mig.device_runs() {
            self.with_device(|d, cx| {
                if let Some(h) = d.host_io() {
                    h.on_timer(cx)
                }
            });
        }
    }

    /// The device's event fds and next deadline (none while stopped).
    pub fn device_sources(
        &mut self,
    ) -> (Vec<(std::os::fd::RawFd, u32)>, Option<std::time::Instant>) {
        let runs = self.mig.device_runs();
        match self.device.host_io() {
            Some(h) => (h.event_fds(), h.next_deadline().filter(|_| runs)),
            None => (Vec::new(), None),
        }
    }

    /// Handle one decoded request. `request_len` is the payload size (VERSION needs it).
    pub fn handle(&mut self, req: Request, request_len: usize) -> Result<Reply, RequestError> {
        let r = self.route(req, request_len);
        // A request may have moved the device to RUNNING.
        self.replay_missed_events();
        r
    }

    fn route(&mut self, req: Request, request_len: usize) -> Result<Reply, RequestError> {
        if self.negotiated.is_none() && !matches!(req, Request::Version(_)) {
            return Err(RequestError::NotNegotiated);
        }
        let state = self.mig.state();
        let allowed = permits(state);
        let busy = |what| RequestError::Busy { what, state };
        match req {
            Request::Version(_) if self.negotiated.is_some() => Err(RequestError::invalid(
                "VERSION was already negotiated on this connection",
            )),
            Request::Version(v) => {
                let (reply, n) = negotiate(&v, &self.offer, request_len)?;
                self.dma.set_max_maps(n.max_dma_maps as usize);
                self.dma.set_max_report(n.max_data_xfer_size as usize);
                // DMA requests must fit what the client receives: the smaller of both limits.
                let send_max = Limits::from_negotiated(&n).max_data_xfer_size;
                self.socket_dma.set_max_xfer(send_max as usize);
                tracing::info!(device = self.description().name, ?n, "client negotiated");
                self.negotiated = Some(n);
                Ok(Reply::bytes(reply.encode()))
            }
            Request::DmaMap(m, fd) => {
                if !allowed.dma_map {
                    return Err(busy("DMA_MAP"));
                }
                let via_fd = fd.is_some();
                self.dma.map(&m, fd)?;
                self.log_dma_path(m.addr, m.size, via_fd);
                Ok(Reply::default())
            }
            Request::DmaUnmap(u) => {
                if !allowed.dma_map {
                    return Err(busy("DMA_UNMAP"));
                }
                if u.is_all() {
                    self.dma.unmap_all();
                } else {
                    self.dma.unmap(u.addr, u.size)?;
                }
                Ok(Reply::bytes(encode(&u)))
            }
            Request::DeviceGetInfo(_) => Ok(Reply::bytes(encode(&DeviceInfo {
                argsz: 16,
                flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
                num_regions: self.num_regions(),
                num_irqs: IRQ_INDEX_COUNT,
            }))),
            Request::GetRegionInfo(r) => self.region_info(r),
            Request::GetRegionIoFds(r) => {
                if r.index >= self.num_regions() {
                    return Err(RequestError::NoRegion(r.index));
                }
                Ok(Reply::bytes(RegionIoFds::encode_reply(r.index, &[])))
            }
            Request::GetIrqInfo(i) => {
                Ok(Reply::bytes(encode(&self.function.irqs().info(i.index)?)))
            }
            Request::SetIrqs(s) => {
                if !allowed.set_irqs {
                    return Err(busy("SET_IRQS"));
                }
                self.mig.set_irqs(s, self.function.irqs_mut())?;
                Ok(Reply::default())
            }
            Request::RegionRead(a) => {
                if !allowed.region_read {
                    return Err(busy("REGION_READ"));
                }
                // The reply is built in place in a recycled buffer: the fixed part, then
                // the device reads straight into the data after it.
                let mut out = self.take_spare();
                put(&mut out, &a);
                out.resize(out.len() + a.count as usize, 0);
                let at = out.len() - a.count as usize;
                let read = self.region_access(a.region, a.offset, Access::Read(&mut out[at..]));
                if let Err(e) = read {
                    self.recycle(out);
                    return Err(e);
                }
                Ok(Reply::bytes(out))
            }
            Request::RegionWrite(a, data) => {
                self.check_write_allowed(a.region)?;
                let written = self.region_access(a.region, a.offset, Access::Write(&data));
                self.recycle(data);
                written?;
                let mut out = self.take_spare();
                put(&mut out, &a);
                Ok(Reply::bytes(out))
            }
            Request::RegionWriteMulti(entries) => {
                for e in entries {
                    let r = self.check_write_allowed(e.region).and_then(|()| {
                        self.region_access(e.region, e.offset, Access::Write(e.bytes()))
                    });
                    if let Err(err) = r {
                        let why = crate::error::chain(&err);
                        tracing::debug!(
                            region = e.region,
                            offset = e.offset,
                            "write-multi entry failed: {why}"
                        );
                    }
                }
                Ok(Reply::default())
            }
            Request::DeviceReset => {
                self.reset();
                Ok(Reply::default())
            }
            Request::DeviceFeature(f) => {
                let (mig, mut parts) = self.parts();
                Ok(Reply::bytes(mig.device_feature(f, &mut parts)?))
            }
            Request::MigDataRead(m) => {
                if !allowed.mig_data_read {
                    return Err(RequestError::WrongState {
                        what: "MIG_DATA_READ",
                        state,
                    });
                }
                let max = (m.size as usize).min(self.limits().max_data_xfer_size as usize);
                let buf = self.take_spare();
                let (mig, mut parts) = self.parts();
                let (payload, memory) = mig.mig_data_reply(buf, max, &mut parts)?;
                Ok(Reply {
                    payload,
                    memory,
                    ..Reply::default()
                })
            }
            Request::MigDataWrite(data) => {
                if !allowed.mig_data_write {
                    return Err(RequestError::WrongState {
                        what: "MIG_DATA_WRITE",
                        state,
                    });
                }
                let written = self.mig.write_stream(&data, &self.function);
                // The data's buffer carries the (empty) reply, so it goes back to the frame
                // reader for the next write, as a REGION_WRITE's does.
                let mut buf = data;
                buf.clear();
                match written {
                    Ok(()) => Ok(Reply::bytes(buf)),
                    Err(e) => {
                        self.recycle(buf);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Say at DMA_MAP which path guest memory takes; warn once when it is the socket.
    fn log_dma_path(&mut self, iova: u64, size: u64, via_fd: bool) {
        let name = self.description().name;
        let path = if via_fd {
            "mmap of the client's fd"
        } else {
            "DMA_READ/DMA_WRITE over the socket"
        };
        tracing::debug!(device = name, iova, size, path, "DMA map");
        if !via_fd && !self.socket_dma_warned {
            self.socket_dma_warned = true;
            tracing::info!(
                device = name,
                "guest memory without an fd: device DMA goes over the socket (DMA_READ/DMA_WRITE), \
                 which is slower; give QEMU fd-backed RAM (-object memory-backend-memfd,share=on)"
            );
        }
    }

    /// The device's shared BAR memory (what [`Reply::memory`] refers to).
    pub fn bar_memory(&self) -> &[Option<SharedMemory>; 6] {
        self.function.bars()
    }

    fn num_regions(&self) -> u32 {
        if self.mig.v1.is_some() {
            V1_REGION_INDEX + 1
        } else {
            PCI_NUM_REGIONS
        }
    }

    fn check_write_allowed(&mut self, region: u32) -> Result<(), RequestError> {
        let state = self.mig.state();
        let allowed = permits(state);
        let ok = match region {
            PCI_CONFIG_REGION_INDEX => allowed.config_write,
            V1_REGION_INDEX => true,
            _ => allowed.bar_write,
        };
        if !ok {
            return Err(RequestError::Busy {
                what: "region write",
                state,
            });
        }
        if region == PCI_CONFIG_REGION_INDEX {
            self.mig.note_config_write();
        }
        Ok(())
    }

    pub(crate) fn read_stream(&mut self, max: usize) -> Result<Vec<u8>, RequestError> {
        let (mig, mut parts) = self.parts();
        mig.read_stream(max, &mut parts)
    }

    /// DEVICE_RESET: back to power-on state; the migration FSM returns to RUNNING and any
    /// migration and dirty logging are dropped.
    pub(crate) fn reset(&mut self) {
        self.mig.reset(&self.function);
        self.dma.stop_logging();
        self.function.reset();
        self.with_device(|d, cx| d.reset(cx));
    }

    fn region_info(&self, r: RegionInfo) -> Result<Reply, RequestError> {
        let (info, caps, mut fds) = match r.index {
            V1_REGION_INDEX if self.mig.v1.is_some() => {
                let (info, caps) = crate::migration::v1::region_info(self.ordering_flags());
                (info, caps, Vec::new())
            }
            8 => (
                RegionInfo {
                    index: 8,
                    ..RegionInfo::default()
                },
                Vec::new(),
                Vec::new(),
            ),
            n => self.function.region_info(n)?,
        };
        let has_caps = !caps.is_empty();
        let payload = RegionInfoReply { info, caps }.encode(r.argsz);
        // No fd when the caps did not fit (the reply is the bare struct): the client asks again.
        if has_caps && payload.len() == std::mem::size_of::<RegionInfo>() {
            fds.clear();
        }
        Ok(Reply {
            payload,
            fds,
            ..Reply::default()
        })
    }

    fn region_access(
        &mut self,
        region: u32,
        offset: u64,
        access: Access<'_>,
    ) -> Result<(), RequestError> {
        match region {
            0..=5 => {
                let bar = region as usize;
                match self.function.route(bar, offset, access.len() as u64)? {
                    BarTarget::Trapped => {
                        let b = BarIndex(bar as u8);
                        Ok(self.with_device(|d, cx| match access {
                            Access::Read(buf) => d.bar_read(b, offset, buf, cx),
                            Access::Write(data) => d.bar_write(b, offset, data, cx),
                        })?)
                    }
                    target => self.function.bar_access(bar, target, offset, access),
                }
            }
            PCI_CONFIG_REGION_INDEX => self.function.config_access(offset, access),
            V1_REGION_INDEX if self.mig.v1.is_some() => {
                let (mig, mut parts) = self.parts();
                mig.v1_access(offset, access, &mut parts)
            }
            n => Err(RequestError::NoRegion(n)),
        }
    }

    /// Pre-copy counts (initial, dirty) while in PRE_COPY.
    pub fn precopy_info(&self) -> Option<(u64, u64)> {
        self.mig.precopy_info(&self.function)
    }

    /// Walk from the current state to `target`, one direct arc at a time.
    pub fn set_mig_state(&mut self, target: MigState) -> Result<(), RequestError> {
        let (mig, mut parts) = self.parts();
        mig.set_state(target, &mut parts)?;
        self.replay_missed_events();
        Ok(())
    }
}
