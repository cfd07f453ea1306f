//! DEVICE_FEATURE and its payloads, and MIG_DATA_READ/WRITE (spec "VFIO_USER_DEVICE_FEATURE",
//! "VFIO_USER_MIG_DATA_READ", "VFIO_USER_MIG_DATA_WRITE"; kernel `include/uapi/linux/vfio.h`).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::ProtocolError;
use crate::wire::{put, WireReader};

/// Feature index bits in `flags`.
pub const FEATURE_MASK: u32 = 0xffff;
/// Get the feature's data.
pub const FEATURE_GET: u32 = 1 << 16;
/// Set the feature's data.
pub const FEATURE_SET: u32 = 1 << 17;
/// Only ask whether the named operations are supported.
pub const FEATURE_PROBE: u32 = 1 << 18;

/// `VFIO_DEVICE_FEATURE_MIGRATION`: GET the migration flags.
pub const FEATURE_MIGRATION: u16 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: GET/SET the FSM state.
pub const FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`.
pub const FEATURE_DMA_LOGGING_START: u16 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
pub const FEATURE_DMA_LOGGING_STOP: u16 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`.
pub const FEATURE_DMA_LOGGING_REPORT: u16 = 8;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: GET the stop-copy length estimate.
pub const FEATURE_MIG_DATA_SIZE: u16 = 9;

/// Migration flag: STOP_COPY supported (mandatory).
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// Migration flag: P2P states supported.
pub const MIGRATION_P2P: u64 = 1 << 1;
/// Migration flag: PRE_COPY supported.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Fixed part of `struct vfio_user_device_feature`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct FeatureHeader {
    /// Request: reply room; reply: size.
    pub argsz: u32,
    /// Feature index and GET/SET/PROBE.
    pub flags: u32,
}

/// A DEVICE_FEATURE request or reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFeature {
    /// Request: reply room (header included); reply: size.
    pub argsz: u32,
    /// Feature index.
    pub feature: u16,
    /// GET requested.
    pub get: bool,
    /// SET requested.
    pub set: bool,
    /// PROBE requested.
    pub probe: bool,
    /// Feature data following the 8-byte header.
    pub data: Vec<u8>,
}

impl DeviceFeature {
    /// Wire flags.
    pub fn flags(&self) -> u32 {
        u32::from(self.feature)
            | if self.get { FEATURE_GET } else { 0 }
            | if self.set { FEATURE_SET } else { 0 }
            | if self.probe { FEATURE_PROBE } else { 0 }
    }

    /// Decode; at most one of GET and SET, and at least one operation.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(payload, "DEVICE_FEATURE");
        let h: FeatureHeader = r.read()?;
        if h.flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0 {
            return Err(ProtocolError::invalid(
                "flags",
                format!("unknown feature flags {:#x}", h.flags),
            ));
        }
        let f = Self {
            argsz: h.argsz,
            feature: (h.flags & FEATURE_MASK) as u16,
            get: h.flags & FEATURE_GET != 0,
            set: h.flags & FEATURE_SET != 0,
            probe: h.flags & FEATURE_PROBE != 0,
            data: r.rest().to_vec(),
        };
        if f.get && f.set {
            return Err(ProtocolError::invalid("flags", "GET and SET together"));
        }
        if !(f.get || f.set || f.probe) {
            return Err(ProtocolError::invalid("flags", "no operation"));
        }
        Ok(f)
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.data.len());
        put(
            &mut out,
            &FeatureHeader {
                argsz: self.argsz,
                flags: self.flags(),
            },
        );
        out.extend_from_slice(&self.data);
        out
    }
}

/// Migration FSM states (`enum vfio_device_mig_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum MigState {
    /// The device failed a transition; only reset leaves it.
    Error = 0,
    /// Stopped, state can be saved or loaded.
    Stop = 1,
    /// Running normally (initial state).
    Running = 2,
    /// Stopped and saving its final state.
    StopCopy = 3,
    /// Stopped and loading state.
    Resuming = 4,
    /// Running, peer-to-peer quiesced (unsupported in vfio-user).
    RunningP2p = 5,
    /// Running and saving initial state.
    PreCopy = 6,
    /// Pre-copy, P2P quiesced (unsupported in vfio-user).
    PreCopyP2p = 7,
}

impl MigState {
    /// All states in numeric order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];
}

impl TryFrom<u32> for MigState {
    type Error = ProtocolError;
    fn try_from(v: u32) -> Result<Self, ProtocolError> {
        MigState::ALL
            .get(v as usize)
            .copied()
            .ok_or_else(|| ProtocolError::invalid("device_state", format!("unknown state {v}")))
    }
}

/// `struct vfio_device_feature_mig_state`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MigDeviceState {
    /// The state (see [`MigState`]).
    pub device_state: u32,
    /// Unused in vfio-user (the data travels in MIG_DATA_READ/WRITE).
    pub data_fd: u32,
}

/// `struct vfio_device_feature_dma_logging_control` fixed part.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaLoggingControlHeader {
    /// Tracking granularity; the reply may change it.
    pub page_size: u64,
    /// Number of ranges following (0 = everything).
    pub num_ranges: u32,
    /// Reserved.
    pub reserved: u32,
}

/// An IOVA range for dirty logging.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaLoggingRange {
    /// Start IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
}

/// DMA_LOGGING_START payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaLoggingControl {
    /// Page size.
    pub page_size: u64,
    /// Ranges; empty = everything mapped.
    pub ranges: Vec<DmaLoggingRange>,
}

impl DmaLoggingControl {
    /// Decode, bounding `num_ranges` by the bytes present. Bytes after the ranges are ignored,
    /// as every command carrying `argsz` tolerates a tail (see `decode_argsz`).
    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(data, "DMA_LOGGING_START");
        let h: DmaLoggingControlHeader = r.read()?;
        if !h.page_size.is_power_of_two() {
            return Err(ProtocolError::invalid("page_size", "not a power of two"));
        }
        let n = h.num_ranges as usize;
        if r.remaining() < n.saturating_mul(16) {
            return Err(ProtocolError::PayloadLength {
                what: "DMA_LOGGING_START",
                got: data.len(),
                expected: 16 + n.saturating_mul(16),
            });
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let range: DmaLoggingRange = r.read()?;
            if range.length == 0 || range.iova.checked_add(range.length).is_none() {
                return Err(ProtocolError::invalid(
                    "range",
                    "empty or overflowing range",
                ));
            }
            ranges.push(range);
        }
        Ok(Self {
            page_size: h.page_size,
            ranges,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put(
            &mut out,
            &DmaLoggingControlHeader {
                page_size: self.page_size,
                num_ranges: self.ranges.len() as u32,
                reserved: 0,
            },
        );
        for r in &self.ranges {
            put(&mut out, r);
        }
        out
    }
}

/// DMA_LOGGING_REPORT request; the reply appends the bitmap inline.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DmaLoggingReport {
    /// Start IOVA.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// Bitmap granularity.
    pub page_size: u64,
}

impl DmaLoggingReport {
    /// Bytes of bitmap for this report: one bit per page, rounded up to u64 words.
    pub fn bitmap_len(&self) -> Result<usize, ProtocolError> {
        if !self.page_size.is_power_of_two() {
            return Err(ProtocolError::invalid("page_size", "not a power of two"));
        }
        let pages = self.length.div_ceil(self.page_size);
        usize::try_from(pages.div_ceil(64) * 8)
            .map_err(|_| ProtocolError::invalid("length", "bitmap too large"))
    }
}

/// `struct vfio_user_mig_data` fixed part.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MigData {
    /// Request: reply room; reply: 8 + size.
    pub argsz: u32,
    /// Bytes requested or carried.
    pub size: u32,
}
const _: () = assert!(core::mem::size_of::<MigData>() == 8);

impl MigData {
    /// Decode a MIG_DATA_READ request: the 8-byte struct, then an ignored tail up to `argsz`.
    pub fn decode_read(payload: &[u8]) -> Result<Self, ProtocolError> {
        super::decode_argsz(payload, "MIG_DATA_READ").map(|(m, _tail)| m)
    }

    /// Decode a MIG_DATA_WRITE request: the data is the first `size` bytes after the struct;
    /// anything after them is an ignored tail, allowed up to `argsz` (see `decode_argsz`).
    pub fn decode_write(payload: &[u8]) -> Result<&[u8], ProtocolError> {
        let h = read_mig_data(payload)?;
        let data = data_prefix(&h, &payload[8..])?;
        super::check_tail("MIG_DATA_WRITE", payload.len(), 8 + data.len(), h.argsz)?;
        Ok(data)
    }

    /// Decode a MIG_DATA_READ reply to a request of `requested` bytes: `(data, padding bytes)`.
    ///
    /// The data is the first `size` bytes. libvfio-user servers pad every reply to the requested
    /// size (`argsz` and `size` say how much is data; the message carries `requested` bytes), so
    /// bytes after the data are accepted as padding as long as the whole payload is no longer
    /// than the `8 + requested` bytes the request allowed. vfud's own server never pads (see
    /// [`MigData::encode_with_data`]).
    pub fn decode_read_reply(
        payload: &[u8],
        requested: u32,
    ) -> Result<(&[u8], usize), ProtocolError> {
        let h = read_mig_data(payload)?;
        if h.size > requested {
            return Err(ProtocolError::invalid(
                "size",
                format!("reply carries {} bytes for {requested} requested", h.size),
            ));
        }
        let data = data_prefix(&h, &payload[8..])?;
        if payload.len() > 8 + requested as usize {
            return Err(ProtocolError::PayloadLength {
                what: "MIG_DATA_READ reply",
                got: payload.len(),
                expected: 8 + requested as usize,
            });
        }
        Ok((data, payload.len() - 8 - data.len()))
    }

    /// Encode with data: exactly `8 + data.len()` bytes with `argsz = 8 + size`. vfud's server
    /// answers MIG_DATA_READ in this spec-exact form and never pads to the requested size (the
    /// spec's reply is `argsz, size, data`, `argsz` "including the size of the data").
    pub fn encode_with_data(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + data.len());
        put(
            &mut out,
            &MigData {
                argsz: (8 + data.len()) as u32,
                size: data.len() as u32,
            },
        );
        out.extend_from_slice(data);
        out
    }
}

/// The 8-byte MIG_DATA struct at the start of `payload`.
fn read_mig_data(payload: &[u8]) -> Result<MigData, ProtocolError> {
    WireReader::new(payload, "MIG_DATA").read()
}

/// The first `h.size` bytes of `rest`, or an error when fewer are present.
fn data_prefix<'a>(h: &MigData, rest: &'a [u8]) -> Result<&'a [u8], ProtocolError> {
    rest.get(..h.size as usize).ok_or_else(|| {
        ProtocolError::invalid(
            "size",
            format!("size {} but {} data bytes", h.size, rest.len()),
        )
    })
}

/// vfud's own DEVICE_FEATURE indices and region capability. The kernel numbers its features
/// from 1 upward; vfud's live at 0x4000 and above so they can never collide.
pub mod vfud {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// GET: [`PrecopyInfo`], the kernel's `VFIO_MIG_GET_PRECOPY_INFO` as a feature
    /// (vfio-user has no precopy-info message). Valid in PRE_COPY and PRE_COPY_P2P.
    pub const FEATURE_PRECOPY_INFO: u16 = 0x4001;
    /// GET: [`MigrationOrdering`], the device's ordering requirements.
    pub const FEATURE_MIGRATION_ORDERING: u16 = 0x4002;

    /// Ordering flag: the device needs PCI config space restored before its device data.
    pub const ORDERING_CONFIG_BEFORE_DATA: u32 = 1 << 0;
    /// Ordering flag: SET_IRQS during RESUMING/STOP is validated at once but applied only at
    /// the transition to RUNNING; interrupts raised meanwhile stay pending.
    pub const ORDERING_SET_IRQS_DEFERRED: u32 = 1 << 1;

    /// Region capability id of [`MigrationOrdering`] in the v1 migration region's chain.
    /// Kernel capability ids are small (1–5); 0x5646 ("VF") cannot collide.
    pub const REGION_CAP_MIGRATION_ORDERING: u16 = 0x5646;

    /// Payload of [`FEATURE_PRECOPY_INFO`] (`struct vfio_precopy_info` minus argsz/flags).
    #[derive(
        Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
    )]
    #[repr(C)]
    pub struct PrecopyInfo {
        /// Initial data not yet read.
        pub initial_bytes: u64,
        /// Data dirtied since it was read (an estimate).
        pub dirty_bytes: u64,
    }

    /// Payload of [`FEATURE_MIGRATION_ORDERING`] and body of the region capability.
    #[derive(
        Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
    )]
    #[repr(C)]
    pub struct MigrationOrdering {
        /// `ORDERING_*` flags.
        pub flags: u32,
        /// Reserved, zero.
        pub reserved: u32,
    }
}

/// The v1 migration region (`struct vfio_device_migration_info`, kernel ≤ 5.17, QEMU 5.2–7.2):
/// registers at offset 0 of a device-specific region of type 3 / subtype 1; the rest of the
/// region is the data window.
pub mod v1 {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// Region type `VFIO_REGION_TYPE_MIGRATION_DEPRECATED`.
    pub const REGION_TYPE_MIGRATION: u32 = 3;
    /// Region subtype `VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED`.
    pub const REGION_SUBTYPE_MIGRATION: u32 = 1;
    /// `device_state` bit: running.
    pub const DEVICE_STATE_RUNNING: u32 = 1 << 0;
    /// `device_state` bit: saving.
    pub const DEVICE_STATE_SAVING: u32 = 1 << 1;
    /// `device_state` bit: resuming.
    pub const DEVICE_STATE_RESUMING: u32 = 1 << 2;
    /// Offset of `device_state`.
    pub const OFF_DEVICE_STATE: u64 = 0;
    /// Offset of `pending_bytes`.
    pub const OFF_PENDING_BYTES: u64 = 8;
    /// Offset of `data_offset`.
    pub const OFF_DATA_OFFSET: u64 = 16;
    /// Offset of `data_size`.
    pub const OFF_DATA_SIZE: u64 = 24;

    /// `device_state` bits for a v2 state (STOP and anything without a v1 form read as 0).
    pub fn bits_for(s: super::MigState) -> u32 {
        use super::MigState;
        match s {
            MigState::Running => DEVICE_STATE_RUNNING,
            MigState::PreCopy => DEVICE_STATE_RUNNING | DEVICE_STATE_SAVING,
            MigState::StopCopy => DEVICE_STATE_SAVING,
            MigState::Resuming => DEVICE_STATE_RESUMING,
            _ => 0,
        }
    }

    /// The v2 state a `device_state` value asks for; `None` for SAVING|RESUMING and unknown bits.
    pub fn state_for(bits: u32) -> Option<super::MigState> {
        use super::MigState;
        const RS: u32 = DEVICE_STATE_RUNNING | DEVICE_STATE_SAVING;
        Some(match bits {
            0 => MigState::Stop,
            DEVICE_STATE_RUNNING => MigState::Running,
            RS => MigState::PreCopy,
            DEVICE_STATE_SAVING => MigState::StopCopy,
            DEVICE_STATE_RESUMING => MigState::Resuming,
            _ => return None,
        })
    }

    /// The register block.
    #[derive(
        Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
    )]
    #[repr(C)]
    pub struct MigrationInfo {
        /// RUNNING/SAVING/RESUMING bits.
        pub device_state: u32,
        /// Reserved.
        pub reserved: u32,
        /// Bytes still to save.
        pub pending_bytes: u64,
        /// Where the data window starts in the region.
        pub data_offset: u64,
        /// Bytes staged in (save) or written to (resume) the window.
        pub data_size: u64,
    }
    const _: () = assert!(core::mem::size_of::<MigrationInfo>() == 32);
}
