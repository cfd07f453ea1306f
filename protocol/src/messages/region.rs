//! Regions: GET_REGION_INFO with its capability chain, GET_REGION_IO_FDS,
//! REGION_READ/REGION_WRITE and REGION_WRITE_MULTI.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{check_argsz, decode_argsz, decode_fixed};
use crate::error::ProtocolError;
use crate::wire::{put, WireReader};

/// Region flag: readable.
pub const REGION_FLAG_READ: u32 = 1 << 0;
/// Region flag: writable.
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
/// Region flag: mmap-able; the reply carries one fd, mapped at `offset`.
pub const REGION_FLAG_MMAP: u32 = 1 << 2;
/// Region flag: a capability chain follows the struct.
pub const REGION_FLAG_CAPS: u32 = 1 << 3;

/// Capability id: sparse mmap areas (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// Capability id: region type/subtype (`VFIO_REGION_INFO_CAP_TYPE`).
pub const REGION_CAP_TYPE: u16 = 2;

/// Region index of PCI BAR 0 (BARs are 0–5).
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of the PCI expansion ROM.
pub const PCI_ROM_REGION_INDEX: u32 = 6;
/// Region index of PCI configuration space.
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
/// Region index of legacy VGA.
pub const PCI_VGA_REGION_INDEX: u32 = 8;
/// Number of fixed PCI regions; device-specific regions start here.
pub const PCI_NUM_REGIONS: u32 = 9;

/// Most capabilities walked in one chain; bounds work on hostile input.
const MAX_CAPS: usize = 16;

/// `struct vfio_region_info` (spec "VFIO_USER_DEVICE_GET_REGION_INFO").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionInfo {
    /// Request: reply room; reply: size needed for struct plus caps.
    pub argsz: u32,
    /// READ/WRITE/MMAP/CAPS.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this struct (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// Offset to use with the region's fd.
    pub offset: u64,
}
const _: () = assert!(core::mem::size_of::<RegionInfo>() == 32);

/// `struct vfio_info_cap_header`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct CapHeader {
    /// Capability id.
    pub id: u16,
    /// Capability version.
    pub version: u16,
    /// Offset of the next capability from the start of the info struct, 0 = last.
    pub next: u32,
}

/// One area of a sparse mmap capability.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SparseArea {
    /// Offset inside the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// A decoded region capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` v1: the areas that may be mmapped.
    SparseMmap(Vec<SparseArea>),
    /// `VFIO_REGION_INFO_CAP_TYPE` v1.
    Type {
        /// Region type (e.g. 3 = migration).
        region_type: u32,
        /// Subtype.
        subtype: u32,
    },
    /// Any other capability, kept as bytes after its header.
    Other {
        /// Capability id.
        id: u16,
        /// Version.
        version: u16,
        /// Body after the 8-byte header.
        data: Vec<u8>,
    },
}

impl RegionCap {
    fn encode_body(&self) -> (u16, u16, Vec<u8>) {
        let mut body = Vec::new();
        match self {
            RegionCap::SparseMmap(areas) => {
                put(&mut body, &(areas.len() as u32));
                put(&mut body, &0u32);
                for a in areas {
                    put(&mut body, a);
                }
                (REGION_CAP_SPARSE_MMAP, 1, body)
            }
            RegionCap::Type {
                region_type,
                subtype,
            } => {
                put(&mut body, region_type);
                put(&mut body, subtype);
                (REGION_CAP_TYPE, 1, body)
            }
            RegionCap::Other { id, version, data } => (*id, *version, data.clone()),
        }
    }

    fn decode_body(id: u16, version: u16, body: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(body, "region capability");
        Ok(match id {
            REGION_CAP_SPARSE_MMAP => {
                let n: u32 = r.read()?;
                let _pad: u32 = r.read()?;
                let n = n as usize;
                if n > r.remaining() / core::mem::size_of::<SparseArea>() {
                    return Err(ProtocolError::invalid("nr_areas", "more areas than bytes"));
                }
                let mut areas = Vec::with_capacity(n);
                for _ in 0..n {
                    areas.push(r.read::<SparseArea>()?);
                }
                RegionCap::SparseMmap(areas)
            }
            REGION_CAP_TYPE => RegionCap::Type {
                region_type: r.read()?,
                subtype: r.read()?,
            },
            _ => RegionCap::Other {
                id,
                version,
                data: body.to_vec(),
            },
        })
    }
}

/// A GET_REGION_INFO reply: the struct plus its capabilities.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfoReply {
    /// The fixed struct (`argsz` and `cap_offset` are filled in by [`Self::encode`]).
    pub info: RegionInfo,
    /// Capability chain.
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// Decode a request. libvfio-user's client sends `argsz` bytes (64 when asking again for
    /// the caps); the tail up to `argsz` is ignored.
    pub fn decode_request(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (i, _tail): (RegionInfo, _) = decode_argsz(payload, "DEVICE_GET_REGION_INFO")?;
        check_argsz(i.argsz, core::mem::size_of::<Self>())?;
        Ok(i)
    }
}

impl RegionInfoReply {
    /// Encode for a client that offered `client_argsz` bytes of room. `argsz` always states the
    /// full size; the caps are left out when they do not fit (spec "Message sizes"), and the
    /// client asks again with more room.
    pub fn encode(&self, client_argsz: u32) -> Vec<u8> {
        let mut chain = Vec::new();
        let base = core::mem::size_of::<RegionInfo>();
        let n = self.caps.len();
        for (i, cap) in self.caps.iter().enumerate() {
            let (id, version, body) = cap.encode_body();
            // Keep each capability 8-byte aligned.
            let len = (8 + body.len()).next_multiple_of(8);
            let next = if i + 1 == n {
                0
            } else {
                (base + chain.len() + len) as u32
            };
            put(&mut chain, &CapHeader { id, version, next });
            chain.extend_from_slice(&body);
            chain.resize(chain.len().next_multiple_of(8), 0);
        }
        let full = (base + chain.len()) as u32;
        let mut info = self.info;
        info.argsz = full;
        let fits = full <= client_argsz;
        if chain.is_empty() {
            info.flags &= !REGION_FLAG_CAPS;
            info.cap_offset = 0;
        } else {
            info.flags |= REGION_FLAG_CAPS;
            // A truncated reply keeps FLAG_CAPS and cap_offset = 32 even though the chain is
            // left out: QEMU 11.1 (`hw/vfio-user/device.c`) rejects FLAG_CAPS with a
            // cap_offset below 32 as EINVAL instead of retrying with the larger argsz, so the
            // kernel's "cap_offset 0 when truncated" convention breaks attach.
            info.cap_offset = base as u32;
        }
        let mut out = Vec::with_capacity(full as usize);
        put(&mut out, &info);
        if fits {
            out.extend_from_slice(&chain);
        }
        out
    }

    /// Decode a reply; the chain is walked with loop and bounds protection.
    /// When the reply was truncated (`argsz` larger than received), `caps` is empty and
    /// `info.argsz` says how much room to ask for.
    pub fn decode(payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(payload, "REGION_INFO reply");
        let info: RegionInfo = r.read()?;
        let mut caps = Vec::new();
        let truncated = (info.argsz as usize) > payload.len();
        if info.flags & REGION_FLAG_CAPS != 0 && info.cap_offset != 0 && !truncated {
            let mut off = info.cap_offset as usize;
            loop {
                if caps.len() >= MAX_CAPS {
                    return Err(ProtocolError::invalid("cap chain", "too many capabilities"));
                }
                let hdr_bytes = payload.get(off..).ok_or_else(|| {
                    ProtocolError::invalid("cap_offset", format!("{off} past end of reply"))
                })?;
                let (hdr, _) = CapHeader::read_from_prefix(hdr_bytes).map_err(|_| {
                    ProtocolError::invalid("cap_offset", format!("{off}: header truncated"))
                })?;
                let next = hdr.next as usize;
                let end = if next == 0 { payload.len() } else { next };
                if next != 0 && next <= off {
                    return Err(ProtocolError::invalid(
                        "cap next",
                        "chain does not move forward",
                    ));
                }
                let body = payload.get(off + 8..end).ok_or_else(|| {
                    ProtocolError::invalid("cap next", format!("{next} past end of reply"))
                })?;
                caps.push(RegionCap::decode_body(hdr.id, hdr.version, body)?);
                if next == 0 {
                    break;
                }
                off = next;
            }
        }
        Ok(Self { info, caps })
    }
}

/// `struct vfio_user_region_io_fds_request` (spec "VFIO_USER_DEVICE_GET_REGION_IO_FDS").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionIoFds {
    /// Request: reply room; reply: size needed.
    pub argsz: u32,
    /// Reserved.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Reply: number of sub-regions.
    pub count: u32,
}

/// One ioeventfd sub-region in a GET_REGION_IO_FDS reply (40 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IoFdSubRegion {
    /// Offset in the region.
    pub offset: u64,
    /// Access size.
    pub size: u64,
    /// Index into the reply's fd array.
    pub fd_index: u32,
    /// 0 = ioeventfd, 1 = ioregionfd.
    pub kind: u32,
    /// Flags (datamatch).
    pub flags: u32,
    /// Padding.
    pub padding: u32,
    /// Value to match.
    pub datamatch: u64,
}
const _: () = assert!(core::mem::size_of::<IoFdSubRegion>() == 40);

impl RegionIoFds {
    /// Decode a request (a tail up to `argsz` is ignored).
    pub fn decode_request(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (i, _tail): (RegionIoFds, _) = decode_argsz(payload, "DEVICE_GET_REGION_IO_FDS")?;
        check_argsz(i.argsz, core::mem::size_of::<Self>())?;
        Ok(i)
    }

    /// Encode a reply with sub-regions (their fds are sent alongside).
    pub fn encode_reply(index: u32, subs: &[IoFdSubRegion]) -> Vec<u8> {
        let mut out = Vec::new();
        let argsz = (16 + 40 * subs.len()) as u32;
        put(
            &mut out,
            &RegionIoFds {
                argsz,
                flags: 0,
                index,
                count: subs.len() as u32,
            },
        );
        for s in subs {
            put(&mut out, s);
        }
        out
    }

    /// Decode a reply.
    pub fn decode_reply(payload: &[u8]) -> Result<(Self, Vec<IoFdSubRegion>), ProtocolError> {
        let mut r = WireReader::new(payload, "REGION_IO_FDS reply");
        let h: RegionIoFds = r.read()?;
        if h.count as usize > r.remaining() / 40 {
            return Err(ProtocolError::invalid(
                "count",
                "more sub-regions than bytes",
            ));
        }
        let mut subs = Vec::with_capacity(h.count as usize);
        for _ in 0..h.count {
            subs.push(r.read()?);
        }
        Ok((h, subs))
    }
}

/// `struct vfio_user_region_access` (spec "VFIO_USER_REGION_READ"/"WRITE").
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct RegionAccess {
    /// Offset inside the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<RegionAccess>() == 16);

impl RegionAccess {
    /// Decode a REGION_READ request (no data).
    pub fn decode_read(payload: &[u8]) -> Result<Self, ProtocolError> {
        decode_fixed(payload, "REGION_READ")
    }

    /// Decode a REGION_WRITE request or REGION_READ reply: `count` must equal the data length.
    pub fn decode_write(payload: &[u8]) -> Result<(Self, &[u8]), ProtocolError> {
        let mut r = WireReader::new(payload, "REGION access");
        let a: RegionAccess = r.read()?;
        let data = r.rest();
        if a.count as usize != data.len() {
            return Err(ProtocolError::invalid(
                "count",
                format!("count {} but {} data bytes", a.count, data.len()),
            ));
        }
        Ok((a, data))
    }

    /// Encode with data.
    pub fn encode_with_data(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + data.len());
        put(&mut out, self);
        out.extend_from_slice(data);
        out
    }
}

/// Most entries in one REGION_WRITE_MULTI (QEMU's `VFIO_USER_MULTI_MAX`).
pub const WRITE_MULTI_MAX: u64 = 200;
/// Most data bytes in one entry.
pub const WRITE_MULTI_DATA: usize = 8;

/// One REGION_WRITE_MULTI entry.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct WriteMultiEntry {
    /// Offset inside the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes used of `data` (1..=8).
    pub count: u32,
    /// The bytes.
    pub data: [u8; WRITE_MULTI_DATA],
}
const _: () = assert!(core::mem::size_of::<WriteMultiEntry>() == 24);

impl WriteMultiEntry {
    /// The bytes this entry writes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..(self.count as usize).min(WRITE_MULTI_DATA)]
    }

    /// Decode a batch (`u64 wr_cnt` then entries).
    pub fn decode_batch(payload: &[u8]) -> Result<Vec<Self>, ProtocolError> {
        let mut r = WireReader::new(payload, "REGION_WRITE_MULTI");
        let n: u64 = r.read()?;
        if n == 0 || n > WRITE_MULTI_MAX {
            return Err(ProtocolError::invalid(
                "wr_cnt",
                format!("{n} entries, 1..={WRITE_MULTI_MAX} allowed"),
            ));
        }
        let expected = 8 + n as usize * 24;
        if payload.len() != expected {
            return Err(ProtocolError::PayloadLength {
                what: "REGION_WRITE_MULTI",
                got: payload.len(),
                expected,
            });
        }
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let e: WriteMultiEntry = r.read()?;
            if e.count == 0 || e.count as usize > WRITE_MULTI_DATA {
                return Err(ProtocolError::invalid(
                    "count",
                    format!("write-multi entry of {} bytes", e.count),
                ));
            }
            v.push(e);
        }
        Ok(v)
    }

    /// Encode a batch.
    pub fn encode_batch(entries: &[Self]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 24 * entries.len());
        put(&mut out, &(entries.len() as u64));
        for e in entries {
            put(&mut out, e);
        }
        out
    }
}
