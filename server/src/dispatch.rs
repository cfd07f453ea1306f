//! Request dispatch: the only code that matches on the decoded command. It owns the device
//! and everything the server emulates around it (config space, shared BAR memory, MSI-X table
//! and PBA, interrupts, DMA table) and turns each [`Request`] into a reply payload.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use vfud_protocol::codec::{Frame, FrameReader, Limits};
use vfud_protocol::messages::device::{DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET};
use vfud_protocol::messages::feature::{
    v1, vfud, DeviceFeature, DmaLoggingControl, DmaLoggingReport, MigData, MigDeviceState,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP,
    FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE, MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
};
use vfud_protocol::messages::irq::IRQ_INDEX_COUNT;
use vfud_protocol::messages::region::{
    RegionCap, RegionInfo, RegionInfoReply, RegionIoFds, SparseArea, PCI_CONFIG_REGION_INDEX,
    PCI_NUM_REGIONS, REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE,
};
use vfud_protocol::messages::version::{negotiate, Negotiated, ServerOffer};
use vfud_protocol::messages::{DeviceInfo, MigState, Request, SetIrqs};
use vfud_protocol::wire::put;
use zerocopy::FromBytes;

use crate::device::{BarBacking, BarIndex, Device, DeviceCtx, DeviceDescription};
use crate::dma::{ClientChannel, DmaTable, GuestMem};
use crate::error::RequestError;
use crate::irq::Interrupts;
use crate::migration::fsm::{self, permits};
use crate::migration::stream::{FinalState, Loader, Saver, StreamHeader};
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

impl ClientConn {
    /// A connection on a non-blocking socket; server→client request ids start at `first_id`.
    pub fn new(stream: UnixStream, first_id: u16) -> Self {
        Self {
            stream,
            reader: FrameReader::new(),
            backlog: VecDeque::new(),
            next_id: first_id,
        }
    }
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
    mig: Migration,
}

/// Index of the v1 migration region.
pub const V1_REGION_INDEX: u32 = 9;
/// Offset of the v1 data window in its region.
pub const V1_WINDOW_OFFSET: u64 = 4096;
/// Size of the v1 data window.
pub const V1_WINDOW_SIZE: usize = 1 << 20;

/// Migration session state of one device.
#[derive(Debug)]
struct Migration {
    state: MigState,
    saver: Option<Saver>,
    loader: Option<Loader>,
    /// A migration began on this side as destination and RUNNING has not been reached yet:
    /// SET_IRQS is validated and queued, applied at the transition to RUNNING.
    resuming: bool,
    deferred_irqs: Vec<SetIrqs>,
    /// The client wrote config space during RESUMING; its image wins over the stream's.
    config_written: bool,
    /// Device event tokens that fired while the device was stopped.
    missed_events: Vec<u32>,
    v1_enabled: bool,
    v1_window: Vec<u8>,
    v1_staged: usize,
    v1_size_read: bool,
}

impl Migration {
    fn new(v1_enabled: bool) -> Self {
        Self {
            state: MigState::Running,
            saver: None,
            loader: None,
            resuming: false,
            deferred_irqs: Vec::new(),
            config_written: false,
            missed_events: Vec::new(),
            v1_enabled,
            v1_window: Vec::new(),
            v1_staged: 0,
            v1_size_read: false,
        }
    }
}

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
    pub fn new(
        device: Box<dyn Device>,
        settings: ServerSettings,
    ) -> Result<Self, crate::DeviceError> {
        let offer = settings.offer;
        let v1 = settings.v1_region && device.supports_migration();
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
            mig: Migration::new(v1),
        })
    }

    /// Current migration state.
    pub fn mig_state(&self) -> MigState {
        self.mig.state
    }

    /// Ordering flags (`vfud::ORDERING_*`) of this device.
    pub fn ordering_flags(&self) -> u32 {
        let mut f = vfud::ORDERING_SET_IRQS_DEFERRED;
        if self.device.needs_config_before_data() {
            f |= vfud::ORDERING_CONFIG_BEFORE_DATA;
        }
        f
    }

    fn num_regions(&self) -> u32 {
        if self.mig.v1_enabled {
            V1_REGION_INDEX + 1
        } else {
            PCI_NUM_REGIONS
        }
    }

    /// The device's description.
    pub fn description(&self) -> &DeviceDescription {
        &self.desc
    }

    /// The session's negotiated parameters (none before VERSION).
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The client's DMA mappings.
    pub fn dma_table(&self) -> &DmaTable {
        &self.dma
    }

    /// Interrupt state, read-only.
    pub fn interrupts(&self) -> &Interrupts {
        &self.irqs
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

    /// Run deferred device work (no client request is outstanding now). Returns whether it
    /// talked to the client (socket DMA), which may have left client bytes unread.
    pub fn run_deferred(&mut self) -> bool {
        if !permits(self.mig.state).device_runs || !self.work {
            return false;
        }
        let id_before = self.client.as_ref().map(|c| c.next_id);
        let mut rounds = 0;
        while self.work && rounds < 64 {
            self.work = false;
            rounds += 1;
            if let Err(e) = self.with_device(true, |d, cx| d.run(cx)) {
                tracing::warn!(device = self.desc.name, "deferred work failed: {e}");
            }
        }
        self.client.as_ref().map(|c| c.next_id) != id_before
    }

    /// A device event fd became readable.
    pub fn device_event(&mut self, token: u32) {
        if !permits(self.mig.state).device_runs {
            if !self.mig.missed_events.contains(&token) {
                self.mig.missed_events.push(token);
            }
            return;
        }
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
        let deadline = if permits(self.mig.state).device_runs {
            self.device.next_deadline()
        } else {
            None
        };
        (self.device.event_fds(), deadline)
    }

    /// Handle one decoded request. `request_len` is the payload size (VERSION needs it).
    pub fn handle(&mut self, req: Request, request_len: usize) -> Result<Reply, RequestError> {
        if self.negotiated.is_none() && !matches!(req, Request::Version(_)) {
            return Err(einval("VERSION must be the first command"));
        }
        let state = self.mig.state;
        let allowed = permits(state);
        let refuse = |what: &str| {
            RequestError::new(
                Errno::EBUSY,
                format!("{what} not allowed in migration state {state:?}"),
            )
        };
        match req {
            Request::Version(v) => {
                let (reply, n) = negotiate(&v, &self.offer, request_len)?;
                self.dma.set_max_maps(n.max_dma_maps as usize);
                tracing::info!(device = self.desc.name, ?n, "client negotiated");
                self.negotiated = Some(n);
                Ok(Reply::bytes(reply.encode()))
            }
            Request::DmaMap(m, fd) => {
                if !allowed.dma_map {
                    return Err(refuse("DMA_MAP"));
                }
                self.dma.map(&m, fd)?;
                Ok(Reply::default())
            }
            Request::DmaUnmap(u) => {
                if !allowed.dma_map {
                    return Err(refuse("DMA_UNMAP"));
                }
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
                        num_regions: self.num_regions(),
                        num_irqs: IRQ_INDEX_COUNT,
                    },
                );
                Ok(Reply::bytes(p))
            }
            Request::GetRegionInfo(r) => self.region_info(r),
            Request::GetRegionIoFds(r) => {
                if r.index >= self.num_regions() {
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
                if !allowed.set_irqs {
                    return Err(refuse("SET_IRQS"));
                }
                if self.mig.resuming {
                    // Validate now, apply at the transition to RUNNING (vfud's ordering rule:
                    // interrupts must not be wired before the VM's interrupt controller is).
                    self.irqs.validate(&s)?;
                    self.mig.deferred_irqs.push(s);
                } else {
                    Interrupts::check_apply(&s)?;
                    self.irqs.apply(s)?;
                }
                Ok(Reply::default())
            }
            Request::RegionRead(a) => {
                if !allowed.region_read {
                    return Err(refuse("REGION_READ"));
                }
                let mut buf = vec![0u8; a.count as usize];
                self.region_access(a.region, a.offset, Access::Read(&mut buf))?;
                Ok(Reply::bytes(a.encode_with_data(&buf)))
            }
            Request::RegionWrite(a, data) => {
                self.check_write_allowed(a.region)?;
                self.region_access(a.region, a.offset, Access::Write(&data))?;
                let mut p = Vec::new();
                put(&mut p, &a);
                Ok(Reply::bytes(p))
            }
            Request::RegionWriteMulti(entries) => {
                for e in entries {
                    if let Err(err) = self.check_write_allowed(e.region).and_then(|()| {
                        self.region_access(e.region, e.offset, Access::Write(e.bytes()))
                    }) {
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
            Request::DeviceFeature(f) => self.device_feature(f),
            Request::MigDataRead(m) => {
                if !allowed.mig_data_read {
                    return Err(einval(format!("MIG_DATA_READ in state {state:?}")));
                }
                let data = self.read_stream(m.size as usize)?;
                Ok(Reply::bytes(MigData::encode_with_data(&data)))
            }
            Request::MigDataWrite(data) => {
                if !allowed.mig_data_write {
                    return Err(einval(format!("MIG_DATA_WRITE in state {state:?}")));
                }
                self.write_stream(&data)?;
                Ok(Reply::default())
            }
        }
    }

    fn check_write_allowed(&mut self, region: u32) -> Result<(), RequestError> {
        let state = self.mig.state;
        let allowed = permits(state);
        let ok = match region {
            PCI_CONFIG_REGION_INDEX => allowed.config_write,
            V1_REGION_INDEX => true,
            _ => allowed.bar_write,
        };
        if !ok {
            return Err(RequestError::new(
                Errno::EBUSY,
                format!("writes to region {region} not allowed in migration state {state:?}"),
            ));
        }
        if region == PCI_CONFIG_REGION_INDEX && state == MigState::Resuming {
            self.mig.config_written = true;
        }
        Ok(())
    }

    fn stream_header(&self) -> StreamHeader {
        StreamHeader {
            ordering: self.ordering_flags(),
            state_version: self.device.save().map(|s| s.version).unwrap_or(0),
            model: self.desc.name.to_string(),
        }
    }

    /// Up to `max` bytes of the migration stream (PRE_COPY or STOP_COPY).
    fn read_stream(&mut self, max: usize) -> Result<Vec<u8>, RequestError> {
        let stop_copy = self.mig.state == MigState::StopCopy;
        let Self {
            mig,
            bars,
            device,
            config,
            irqs,
            ..
        } = self;
        let saver = mig
            .saver
            .as_mut()
            .ok_or_else(|| einval("no migration stream in progress"))?;
        let mut final_state = || {
            Ok(FinalState {
                config: config.image().to_vec(),
                irq: irqs.save_pending(),
                device: device.save()?,
            })
        };
        let f: Option<&mut dyn FnMut() -> Result<FinalState, crate::DeviceError>> = if stop_copy {
            Some(&mut final_state)
        } else {
            None
        };
        Ok(saver.read(max, bars, f)?)
    }

    fn write_stream(&mut self, data: &[u8]) -> Result<(), RequestError> {
        let loader = self
            .mig
            .loader
            .as_mut()
            .ok_or_else(|| einval("no migration stream being restored"))?;
        loader
            .write(data)
            .map_err(|e| RequestError::new(Errno::EINVAL, format!("migration stream refused: {e}")))
    }

    /// Up to `max` bytes of the outgoing stream, for a live handover (PRE_COPY/STOP_COPY).
    pub fn handover_read(&mut self, max: usize) -> Result<Vec<u8>, RequestError> {
        self.read_stream(max)
    }

    /// Feed incoming stream bytes, for a live handover (RESUMING).
    pub fn handover_write(&mut self, data: &[u8]) -> Result<(), RequestError> {
        self.write_stream(data)
    }

    /// Pre-copy counts (initial, dirty) while in PRE_COPY.
    pub fn precopy_info(&self) -> Option<(u64, u64)> {
        let s = self.mig.saver.as_ref()?;
        Some((s.initial_bytes(), s.dirty_bytes(&self.bars)))
    }

    /// Everything about the attached client that a new process needs to carry on the same
    /// connection: negotiated caps, DMA maps and interrupt setup, with duplicated fds.
    /// `fds` receives the descriptors; the returned description indexes into it.
    pub fn export_session(
        &self,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<crate::handover::SessionInfo> {
        use crate::handover::{IrqEntry, MapEntry, SessionInfo};
        let push = |fd: OwnedFd, fds: &mut Vec<OwnedFd>| {
            fds.push(fd);
            fds.len() - 1
        };
        let mut maps = Vec::new();
        for (m, fd) in self.dma.export()? {
            maps.push(MapEntry {
                iova: m.addr,
                size: m.size,
                offset: m.offset,
                flags: m.flags,
                fd: fd.map(|f| push(f, fds)),
            });
        }
        let mut irqs = Vec::new();
        for s in self.irqs.export()? {
            let action = match s.action {
                vfud_protocol::messages::IrqAction::Mask => "mask",
                vfud_protocol::messages::IrqAction::Unmask => "unmask",
                vfud_protocol::messages::IrqAction::Trigger => "trigger",
            };
            let fd = match s.data {
                vfud_protocol::messages::IrqData::Eventfds(mut v) => v.pop().map(|f| push(f, fds)),
                _ => None,
            };
            irqs.push(IrqEntry {
                index: s.index,
                vector: s.start,
                action: action.into(),
                fd,
            });
        }
        let client = match &self.client {
            Some(c) => Some(push(c.stream.as_fd().try_clone_to_owned()?, fds)),
            None => None,
        };
        let backend = self.device.export_backend().map(|(desc, bfds)| {
            let idx = bfds.into_iter().map(|f| push(f, fds)).collect();
            (desc, idx)
        });
        Ok(SessionInfo {
            model: self.desc.name.to_string(),
            negotiated: self.negotiated.clone(),
            maps,
            irqs,
            client,
            listener: None,
            backend,
            stopped_at_unix_ns: 0,
        })
    }

    /// Receiving side of a live handover (called in RESUMING, after the stream): adopt the
    /// session and go to RUNNING. On failure the device is reset and nothing is adopted.
    pub fn import_session(
        &mut self,
        info: &crate::handover::SessionInfo,
        fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), RequestError> {
        let r = self.import_inner(info, fds);
        if r.is_err() {
            self.client = None;
            self.dma.unmap_all();
            self.reset();
            self.negotiated = None;
        }
        r
    }

    fn import_inner(
        &mut self,
        info: &crate::handover::SessionInfo,
        mut fds: Vec<Option<OwnedFd>>,
    ) -> Result<(), RequestError> {
        use vfud_protocol::messages::{IrqAction, IrqData};
        if info.model != self.desc.name {
            return Err(einval(format!(
                "handover of a {} to a {}",
                info.model, self.desc.name
            )));
        }
        if self.mig.state != MigState::Resuming {
            return Err(einval("handover session outside RESUMING"));
        }
        let mut take = |i: Option<usize>| -> Result<Option<OwnedFd>, RequestError> {
            match i {
                None => Ok(None),
                Some(i) => fds
                    .get_mut(i)
                    .and_then(Option::take)
                    .map(Some)
                    .ok_or_else(|| einval(format!("handover fd {i} missing"))),
            }
        };
        if let Some(n) = &info.negotiated {
            self.dma.set_max_maps(n.max_dma_maps as usize);
        }
        self.negotiated = info.negotiated.clone();
        for m in &info.maps {
            let map = vfud_protocol::messages::DmaMap {
                argsz: 32,
                flags: m.flags,
                offset: m.offset,
                addr: m.iova,
                size: m.size,
            };
            self.dma.map(&map, take(m.fd)?)?;
        }
        for e in &info.irqs {
            let action = match e.action.as_str() {
                "mask" => IrqAction::Mask,
                "unmask" => IrqAction::Unmask,
                "trigger" => IrqAction::Trigger,
                other => return Err(einval(format!("unknown IRQ action {other}"))),
            };
            let data = match take(e.fd)? {
                Some(fd) => IrqData::Eventfds(vec![fd]),
                None => IrqData::None,
            };
            let s = SetIrqs {
                index: e.index,
                start: e.vector,
                count: 1,
                action,
                data,
            };
            self.irqs.validate(&s)?;
            self.mig.deferred_irqs.push(s);
        }
        if let Some((desc, idx)) = &info.backend {
            let mut b = Vec::new();
            for i in idx {
                b.extend(take(Some(*i))?);
            }
            self.device.adopt_backend(desc, b)?;
        }
        let client = take(info.client)?;
        self.set_mig_state(MigState::Running)?;
        if let Some(fd) = client {
            let stream = UnixStream::from(fd);
            stream
                .set_nonblocking(true)
                .map_err(|e| RequestError::new(Errno::EIO, e.to_string()))?;
            self.client = Some(ClientConn::new(stream, 0x8000));
        }
        Ok(())
    }

    /// After handing the device over: let go of the backend without tearing it down.
    pub fn release_after_handover(&mut self) {
        self.device.release_backend();
    }

    /// Walk from the current state to `target`, one direct arc at a time.
    pub fn set_mig_state(&mut self, target: MigState) -> Result<(), RequestError> {
        if !self.device.supports_migration() {
            return Err(RequestError::new(
                Errno::ENOTTY,
                "device does not support migration",
            ));
        }
        let from = self.mig.state;
        let hops = fsm::path(from, target).ok_or_else(|| {
            einval(format!(
                "no migration transition from {from:?} to {target:?}"
            ))
        })?;
        for hop in hops {
            let cur = self.mig.state;
            if let Err(e) = self.hop(cur, hop) {
                let name = self.desc.name;
                tracing::warn!(
                    device = name,
                    ?cur,
                    ?hop,
                    "migration hop failed: {}",
                    e.message
                );
                return Err(e);
            }
            tracing::debug!(device = self.desc.name, ?cur, ?hop, "migration hop");
            self.mig.state = hop;
        }
        Ok(())
    }

    fn hop(&mut self, from: MigState, to: MigState) -> Result<(), RequestError> {
        use MigState::*;
        match (from, to) {
            (Running, PreCopy) | (Stop, StopCopy) => {
                self.mig.saver = Some(Saver::new(&self.stream_header(), &self.bars));
            }
            (PreCopy, Running) | (StopCopy, Stop) => self.mig.saver = None,
            (PreCopy, StopCopy) | (Running, Stop) => self.device.quiesce(),
            (Stop, Resuming) => {
                self.mig.loader = Some(Loader::new(self.desc.name));
                // The incoming VM brings its own interrupt setup (replayed as deferred
                // SET_IRQS); whatever this side had before must not linger.
                self.irqs.disable_all();
                // Restoring memory happens inside the downtime: take the page faults now.
                for mem in self.bars.iter().flatten() {
                    mem.prefault();
                }
                self.mig.resuming = true;
                self.mig.config_written = false;
                self.mig.deferred_irqs.clear();
            }
            (Resuming, Stop) => self.finish_restore()?,
            (Stop, Running) => self.resume_running()?,
            _ => return Err(einval(format!("{from:?}->{to:?} is not a direct arc"))),
        }
        Ok(())
    }

    /// Leaving RESUMING: apply the staged stream, or change nothing.
    fn finish_restore(&mut self) -> Result<(), RequestError> {
        let loader = self
            .mig
            .loader
            .take()
            .ok_or_else(|| einval("no migration stream was written"))?;
        let staged = loader.finish().map_err(|e| {
            RequestError::new(Errno::EINVAL, format!("migration stream refused: {e}"))
        })?;
        // Validate everything before touching anything.
        for (bar, off, data) in &staged.memory {
            let mem = self.bars[*bar].as_ref().ok_or_else(|| {
                einval(format!("stream has memory for BAR {bar}, device has none"))
            })?;
            let end = off.checked_add(data.len() as u64).unwrap_or(u64::MAX);
            if end > mem.len() as u64 {
                return Err(einval(format!(
                    "stream memory {off:#x}+{:#x} outside BAR {bar}",
                    data.len()
                )));
            }
        }
        let config = staged.config.unwrap_or_default();
        if config.len() != self.config.len() {
            return Err(einval("stream config image has the wrong size"));
        }
        let irq = staged.irq.unwrap_or_default();
        let mut irq_check = Interrupts::new(&self.desc.irqs);
        irq_check.restore_pending(&irq).map_err(einval)?;
        let device_state = staged
            .device
            .ok_or_else(|| einval("stream has no device state"))?;
        // The device validates its own state and changes nothing on failure.
        self.device.load(&device_state)?;
        for (bar, off, data) in &staged.memory {
            if let Some(mem) = &self.bars[*bar] {
                mem.write(*off, data)?;
            }
        }
        if self.mig.config_written {
            tracing::debug!(
                device = self.desc.name,
                "client restored config itself; stream image not applied"
            );
        } else {
            self.config.restore(&config).map_err(einval)?;
        }
        let cmd = self.config.u16_at(crate::pci::config::PCI_COMMAND);
        self.irqs
            .set_intx_disabled(cmd & crate::pci::config::PCI_COMMAND_INTX_DISABLE != 0);
        self.irqs.restore_pending(&irq).map_err(einval)?;
        self.work = true;
        tracing::info!(
            device = self.desc.name,
            "device state restored from migration stream"
        );
        Ok(())
    }

    /// STOP→RUNNING: apply the SET_IRQS queued while resuming, all or nothing, then let the
    /// device run again (deferred work, missed backend events).
    fn resume_running(&mut self) -> Result<(), RequestError> {
        if self.mig.resuming {
            let queue = std::mem::take(&mut self.mig.deferred_irqs);
            for s in &queue {
                Interrupts::check_apply(s)?;
            }
            // Apply the batch as one step: nothing is delivered until all of it is in force,
            // so a vector masked later in the batch does not fire in between.
            self.irqs.set_hold(true);
            let applied = queue.into_iter().try_for_each(|s| self.irqs.apply(s));
            self.irqs.set_hold(false);
            applied?;
            self.mig.resuming = false;
        }
        self.work = true;
        for token in std::mem::take(&mut self.mig.missed_events) {
            self.mig.state = MigState::Running;
            self.device_event(token);
        }
        Ok(())
    }

    fn device_feature(&mut self, f: DeviceFeature) -> Result<Reply, RequestError> {
        let migration = self.device.supports_migration();
        let unsupported = || {
            RequestError::new(
                Errno::ENOTTY,
                format!("device feature {:#x} is not supported", f.feature),
            )
        };
        // (GET supported, SET supported) per feature.
        let (can_get, can_set) = match f.feature {
            FEATURE_MIGRATION if migration => (true, false),
            FEATURE_MIG_DEVICE_STATE if migration => (true, true),
            FEATURE_MIG_DATA_SIZE if migration => (true, false),
            FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP => (false, true),
            FEATURE_DMA_LOGGING_REPORT => (true, false),
            vfud::FEATURE_PRECOPY_INFO if migration => (true, false),
            vfud::FEATURE_MIGRATION_ORDERING if migration => (true, false),
            _ => return Err(unsupported()),
        };
        if (f.get && !can_get) || (f.set && !can_set) {
            return Err(RequestError::new(
                Errno::EINVAL,
                format!("feature {:#x} does not support this operation", f.feature),
            ));
        }
        if f.probe {
            return Ok(Reply::bytes(f.encode()));
        }
        let data: Vec<u8> = match f.feature {
            FEATURE_MIGRATION => (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY)
                .to_le_bytes()
                .to_vec(),
            FEATURE_MIG_DEVICE_STATE if f.set => {
                let (req, _) = MigDeviceState::read_from_prefix(&f.data)
                    .map_err(|_| einval("MIG_DEVICE_STATE payload too short"))?;
                let target = MigState::try_from(req.device_state)?;
                self.set_mig_state(target)?;
                let mut p = Vec::new();
                put(
                    &mut p,
                    &MigDeviceState {
                        device_state: self.mig.state as u32,
                        data_fd: u32::MAX,
                    },
                );
                p
            }
            FEATURE_MIG_DEVICE_STATE => {
                let mut p = Vec::new();
                put(
                    &mut p,
                    &MigDeviceState {
                        device_state: self.mig.state as u32,
                        data_fd: u32::MAX,
                    },
                );
                p
            }
            FEATURE_MIG_DATA_SIZE => {
                let n = match &self.mig.saver {
                    Some(s) => s.stop_copy_estimate(&self.bars),
                    None => {
                        self.bars
                            .iter()
                            .flatten()
                            .map(|b| b.len() as u64)
                            .sum::<u64>()
                            + 8192
                    }
                };
                n.to_le_bytes().to_vec()
            }
            FEATURE_DMA_LOGGING_START => {
                let ctl = DmaLoggingControl::decode(&f.data)?;
                let page = self.dma.start_logging(ctl.page_size)?;
                DmaLoggingControl {
                    page_size: page,
                    ranges: ctl.ranges,
                }
                .encode()
            }
            FEATURE_DMA_LOGGING_STOP => {
                if !self.dma.logging() {
                    return Err(crate::DmaError::LoggingInactive.into());
                }
                self.dma.stop_logging();
                f.data.clone()
            }
            FEATURE_DMA_LOGGING_REPORT => {
                let (rep, _) = DmaLoggingReport::read_from_prefix(&f.data)
                    .map_err(|_| einval("DMA_LOGGING_REPORT payload too short"))?;
                let need = 8 + 24 + rep.bitmap_len()?;
                if (f.argsz as usize) < need {
                    return Err(einval(format!(
                        "argsz {} too small for the bitmap ({need})",
                        f.argsz
                    )));
                }
                let bitmap = self.dma.report_dirty(rep.iova, rep.length, rep.page_size)?;
                let mut p = Vec::with_capacity(24 + bitmap.len());
                put(&mut p, &rep);
                p.extend(bitmap);
                p
            }
            vfud::FEATURE_PRECOPY_INFO => {
                let Some(saver) = self
                    .mig
                    .saver
                    .as_ref()
                    .filter(|_| self.mig.state == MigState::PreCopy)
                else {
                    return Err(einval("precopy info is only valid in PRE_COPY"));
                };
                let mut p = Vec::new();
                put(
                    &mut p,
                    &vfud::PrecopyInfo {
                        initial_bytes: saver.initial_bytes(),
                        dirty_bytes: saver.dirty_bytes(&self.bars),
                    },
                );
                p
            }
            vfud::FEATURE_MIGRATION_ORDERING => {
                let mut p = Vec::new();
                put(
                    &mut p,
                    &vfud::MigrationOrdering {
                        flags: self.ordering_flags(),
                        reserved: 0,
                    },
                );
                p
            }
            _ => return Err(unsupported()),
        };
        Ok(Reply::bytes(
            DeviceFeature {
                argsz: (8 + data.len()) as u32,
                data,
                ..f
            }
            .encode(),
        ))
    }

    fn reset(&mut self) {
        // DEVICE_RESET returns the FSM to RUNNING and drops any migration and dirty logging.
        let v1 = self.mig.v1_enabled;
        self.mig = Migration::new(v1);
        self.dma.stop_logging();
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
            V1_REGION_INDEX if self.mig.v1_enabled => {
                info.size = V1_WINDOW_OFFSET + V1_WINDOW_SIZE as u64;
                info.flags = REGION_FLAG_READ | REGION_FLAG_WRITE;
                caps.push(RegionCap::Type {
                    region_type: v1::REGION_TYPE_MIGRATION,
                    subtype: v1::REGION_SUBTYPE_MIGRATION,
                });
                let mut body = Vec::new();
                put(
                    &mut body,
                    &vfud::MigrationOrdering {
                        flags: self.ordering_flags(),
                        reserved: 0,
                    },
                );
                caps.push(RegionCap::Other {
                    id: vfud::REGION_CAP_MIGRATION_ORDERING,
                    version: 1,
                    data: body,
                });
            }
            n => return Err(einval(format!("no region {n}"))),
        }
        let has_caps = !caps.is_empty();
        let payload = RegionInfoReply { info, caps }.encode(r.argsz);
        // No fd when the caps did not fit (the reply is the bare struct): the client asks again.
        if has_caps && payload.len() == std::mem::size_of::<RegionInfo>() {
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
            V1_REGION_INDEX if self.mig.v1_enabled => self.v1_access(offset, access),
            n => Err(einval(format!("region {n} has no accessible bytes"))),
        }
    }

    /// The v1 migration region: registers at 0, data window at [`V1_WINDOW_OFFSET`]
    /// (kernel ≤ 5.17 `struct vfio_device_migration_info`), mapped onto the v2 FSM.
    fn v1_access(&mut self, offset: u64, access: Access<'_>) -> Result<(), RequestError> {
        let len = access.len();
        if offset >= V1_WINDOW_OFFSET {
            let off = (offset - V1_WINDOW_OFFSET) as usize;
            let end = off.checked_add(len).filter(|e| *e <= V1_WINDOW_SIZE);
            let end = end.ok_or_else(|| einval("access outside the v1 data window"))?;
            if self.mig.v1_window.len() < V1_WINDOW_SIZE {
                self.mig.v1_window.resize(V1_WINDOW_SIZE, 0);
            }
            match access {
                Access::Read(buf) => buf.copy_from_slice(&self.mig.v1_window[off..end]),
                Access::Write(data) => self.mig.v1_window[off..end].copy_from_slice(data),
            }
            return Ok(());
        }
        let reg = match (offset, len) {
            (v1::OFF_DEVICE_STATE, 4) => v1::OFF_DEVICE_STATE,
            (o @ (v1::OFF_PENDING_BYTES | v1::OFF_DATA_OFFSET | v1::OFF_DATA_SIZE), 8) => o,
            _ => {
                return Err(einval(format!(
                    "v1 register access of {len} bytes at {offset:#x}"
                )))
            }
        };
        match access {
            Access::Read(buf) => {
                let v: u64 = match reg {
                    v1::OFF_DEVICE_STATE => u64::from(v1::bits_for(self.mig.state)),
                    v1::OFF_PENDING_BYTES => self.v1_stage()? as u64,
                    v1::OFF_DATA_OFFSET => {
                        self.v1_stage()?;
                        V1_WINDOW_OFFSET
                    }
                    _ => {
                        self.mig.v1_size_read = true;
                        self.mig.v1_staged as u64
                    }
                };
                buf.copy_from_slice(&v.to_le_bytes()[..len]);
            }
            Access::Write(data) => match reg {
                v1::OFF_DEVICE_STATE => {
                    let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                    let target = v1::state_for(bits)
                        .ok_or_else(|| einval(format!("invalid v1 device_state {bits:#x}")))?;
                    self.set_mig_state(target)?;
                    self.mig.v1_staged = 0;
                    self.mig.v1_size_read = false;
                }
                v1::OFF_DATA_SIZE => {
                    if self.mig.state != MigState::Resuming {
                        return Err(einval("data_size is written only while resuming"));
                    }
                    let n = u64::from_le_bytes(data.try_into().unwrap_or_default()) as usize;
                    if n > V1_WINDOW_SIZE || self.mig.v1_window.len() < n {
                        return Err(einval("data_size larger than the data window"));
                    }
                    let chunk = self.mig.v1_window[..n].to_vec();
                    self.write_stream(&chunk)?;
                }
                _ => return Err(einval("v1 register is read-only")),
            },
        }
        Ok(())
    }

    /// Stage the next chunk of the save stream in the v1 window; returns its size.
    fn v1_stage(&mut self) -> Result<usize, RequestError> {
        if !matches!(self.mig.state, MigState::PreCopy | MigState::StopCopy) {
            return Ok(0);
        }
        if self.mig.v1_staged == 0 || self.mig.v1_size_read {
            let data = self.read_stream(V1_WINDOW_SIZE)?;
            if self.mig.v1_window.len() < V1_WINDOW_SIZE {
                self.mig.v1_window.resize(V1_WINDOW_SIZE, 0);
            }
            self.mig.v1_window[..data.len()].copy_from_slice(&data);
            self.mig.v1_staged = data.len();
            self.mig.v1_size_read = false;
        }
        Ok(self.mig.v1_staged)
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
