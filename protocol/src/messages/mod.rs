//! Typed messages, one module per command family, and [`Request`]: a decoded client→server command.
//!
//! Decoding checks every length, flag and count that the spec pins down without device
//! knowledge; range checks against the device (region sizes, IRQ counts) belong to the server.

pub mod device;
pub mod dma;
pub mod feature;
pub mod irq;
pub mod region;
pub mod version;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::codec::Limits;
use crate::error::ProtocolError;
use crate::header::Command;
use crate::wire::{put, WireReader};

pub use device::DeviceInfo;
pub use dma::{DmaAccess, DmaMap, DmaUnmap};
pub use feature::{DeviceFeature, MigData, MigState};
pub use irq::{IrqAction, IrqData, IrqInfo, SetIrqs};
pub use region::{
    RegionAccess, RegionCap, RegionInfo, RegionInfoReply, RegionIoFds, WriteMultiEntry,
};
pub use version::{Capabilities, VersionMessage};

/// A client→server command, decoded and checked.
#[derive(Debug)]
pub enum Request {
    /// VERSION: the client's proposal.
    Version(VersionMessage),
    /// DMA_MAP, with the fd when the memory is fd-backed.
    DmaMap(DmaMap, Option<OwnedFd>),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo(RegionInfo),
    /// DEVICE_GET_REGION_IO_FDS.
    GetRegionIoFds(RegionIoFds),
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo(IrqInfo),
    /// DEVICE_SET_IRQS.
    SetIrqs(SetIrqs),
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE: where, and the bytes.
    RegionWrite(RegionAccess, Vec<u8>),
    /// DEVICE_RESET.
    DeviceReset,
    /// REGION_WRITE_MULTI: a batch of small posted writes.
    RegionWriteMulti(Vec<WriteMultiEntry>),
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature),
    /// MIG_DATA_READ: how much the client wants.
    MigDataRead(MigData),
    /// MIG_DATA_WRITE: the bytes.
    MigDataWrite(Vec<u8>),
}

fn no_fds(cmd: Command, fds: &[OwnedFd]) -> Result<(), ProtocolError> {
    if fds.is_empty() {
        Ok(())
    } else {
        tracing::debug!(?cmd, n = fds.len(), "closing unexpected file descriptors");
        Err(ProtocolError::FdCountExceeded {
            got: fds.len(),
            max: 0,
        })
    }
}

/// A REGION_WRITE's fixed part and data, checked against `limits`.
fn region_write<'a>(
    payload: &'a [u8],
    fds: &[OwnedFd],
    limits: &Limits,
) -> Result<(RegionAccess, &'a [u8]), ProtocolError> {
    no_fds(Command::RegionWrite, fds)?;
    let (a, data) = RegionAccess::decode_write(payload)?;
    limits.check_xfer(a.count.into())?;
    Ok((a, data))
}

/// A MIG_DATA_WRITE's data, checked against `limits`.
fn mig_data_write<'a>(
    payload: &'a [u8],
    fds: &[OwnedFd],
    limits: &Limits,
) -> Result<&'a [u8], ProtocolError> {
    no_fds(Command::MigDataWrite, fds)?;
    let data = MigData::decode_write(payload)?;
    limits.check_xfer(data.len() as u64)?;
    Ok(data)
}

/// Turn `payload` into its bytes `at..at + len` in place (the data of a write, whose fixed
/// part goes).
fn keep_only(mut payload: Vec<u8>, at: usize, len: usize) -> Vec<u8> {
    payload.truncate(at + len);
    payload.drain(..at);
    payload
}

impl Request {
    /// [`Request::decode`] taking the payload by value. A REGION_WRITE or MIG_DATA_WRITE
    /// keeps the payload buffer itself as its data (the fixed part drained off) rather than
    /// a copy, so a server that recycles its buffers takes writes without allocating; for
    /// every other command, and on error, the buffer comes back as the second value for
    /// reuse.
    pub fn decode_owned(
        cmd: u16,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
        limits: &Limits,
    ) -> (Result<Request, ProtocolError>, Option<Vec<u8>>) {
        // Where the data lies in the payload: (offset, length).
        let span = |d: &[u8]| (d.as_ptr() as usize - payload.as_ptr() as usize, d.len());
        if cmd == Command::MigDataWrite as u16 {
            return match mig_data_write(&payload, &fds, limits).map(span) {
                Ok((at, n)) => (Ok(Request::MigDataWrite(keep_only(payload, at, n))), None),
                Err(e) => (Err(e), Some(payload)),
            };
        }
        if cmd != Command::RegionWrite as u16 {
            let r = Self::decode(cmd, &payload, fds, limits);
            return (r, Some(payload));
        }
        match region_write(&payload, &fds, limits).map(|(a, d)| (a, span(d))) {
            Ok((a, (at, n))) => (Ok(Request::RegionWrite(a, keep_only(payload, at, n))), None),
            Err(e) => (Err(e), Some(payload)),
        }
    }

    /// The command this request is.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap(..) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Request::GetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Request::GetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Request::GetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Request::SetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead(_) => Command::RegionRead,
            Request::RegionWrite(..) => Command::RegionWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Request::DeviceFeature(_) => Command::DeviceFeature,
            Request::MigDataRead(_) => Command::MigDataRead,
            Request::MigDataWrite(_) => Command::MigDataWrite,
        }
    }

    /// Decode the payload of command `cmd`. Unexpected fds are closed (dropped) and rejected.
    pub fn decode(
        cmd: u16,
        payload: &[u8],
        mut fds: Vec<OwnedFd>,
        limits: &Limits,
    ) -> Result<Request, ProtocolError> {
        let cmd = Command::try_from(cmd)?;
        if fds.len() > limits.max_msg_fds {
            return Err(ProtocolError::FdCountExceeded {
                got: fds.len(),
                max: limits.max_msg_fds,
            });
        }
        let req = match cmd {
            Command::Version => {
                no_fds(cmd, &fds)?;
                Request::Version(VersionMessage::decode(payload)?)
            }
            Command::DmaMap => {
                if fds.len() > 1 {
                    return Err(ProtocolError::FdCountExceeded {
                        got: fds.len(),
                        max: 1,
                    });
                }
                Request::DmaMap(DmaMap::decode(payload)?, fds.pop())
            }
            Command::DmaUnmap => {
                no_fds(cmd, &fds)?;
                Request::DmaUnmap(DmaUnmap::decode(payload)?)
            }
            Command::DeviceGetInfo => {
                no_fds(cmd, &fds)?;
                Request::DeviceGetInfo(DeviceInfo::decode_request(payload)?)
            }
            Command::DeviceGetRegionInfo => {
                no_fds(cmd, &fds)?;
                Request::GetRegionInfo(RegionInfo::decode_request(payload)?)
            }
            Command::DeviceGetRegionIoFds => {
                no_fds(cmd, &fds)?;
                Request::GetRegionIoFds(RegionIoFds::decode_request(payload)?)
            }
            Command::DeviceGetIrqInfo => {
                no_fds(cmd, &fds)?;
                Request::GetIrqInfo(IrqInfo::decode_request(payload)?)
            }
            Command::DeviceSetIrqs => Request::SetIrqs(SetIrqs::decode(payload, fds)?),
            Command::RegionRead => {
                no_fds(cmd, &fds)?;
                let a = RegionAccess::decode_read(payload)?;
                limits.check_xfer(a.count.into())?;
                Request::RegionRead(a)
            }
            Command::RegionWrite => {
                let (a, data) = region_write(payload, &fds, limits)?;
                Request::RegionWrite(a, data.to_vec())
            }
            Command::DeviceReset => {
                no_fds(cmd, &fds)?;
                if !payload.is_empty() {
                    return Err(ProtocolError::PayloadLength {
                        what: "DEVICE_RESET",
                        got: payload.len(),
                        expected: 0,
                    });
                }
                Request::DeviceReset
            }
            Command::RegionWriteMulti => {
                no_fds(cmd, &fds)?;
                Request::RegionWriteMulti(WriteMultiEntry::decode_batch(payload)?)
            }
            Command::DeviceFeature => {
                no_fds(cmd, &fds)?;
                Request::DeviceFeature(DeviceFeature::decode(payload)?)
            }
            Command::MigDataRead => {
                no_fds(cmd, &fds)?;
                let m = MigData::decode_read(payload)?;
                limits.check_xfer(m.size.into())?;
                Request::MigDataRead(m)
            }
            Command::MigDataWrite => {
                Request::MigDataWrite(mig_data_write(payload, &fds, limits)?.to_vec())
            }
            Command::DmaRead | Command::DmaWrite => {
                return Err(ProtocolError::invalid(
                    "cmd",
                    "DMA_READ/DMA_WRITE are server-to-client commands",
                ))
            }
        };
        Ok(req)
    }

    /// Encode the payload (without header) and borrow the fds to send with it.
    pub fn encode(&self) -> (Vec<u8>, Vec<BorrowedFd<'_>>) {
        let mut out = Vec::new();
        let mut fds = Vec::new();
        match self {
            Request::Version(v) => out = v.encode(),
            Request::DmaMap(m, fd) => {
                put(&mut out, m);
                fds.extend(fd.as_ref().map(|f| f.as_fd()));
            }
            Request::DmaUnmap(u) => put(&mut out, u),
            Request::DeviceGetInfo(i) => put(&mut out, i),
            Request::GetRegionInfo(i) => put(&mut out, i),
            Request::GetRegionIoFds(i) => put(&mut out, i),
            Request::GetIrqInfo(i) => put(&mut out, i),
            Request::SetIrqs(s) => {
                out = s.encode_payload();
                if let IrqData::Eventfds(v) = &s.data {
                    fds.extend(v.iter().map(|f| f.as_fd()));
                }
            }
            Request::RegionRead(a) => put(&mut out, a),
            Request::RegionWrite(a, data) => {
                put(&mut out, a);
                out.extend_from_slice(data);
            }
            Request::DeviceReset => {}
            Request::RegionWriteMulti(v) => out = WriteMultiEntry::encode_batch(v),
            Request::DeviceFeature(f) => out = f.encode(),
            Request::MigDataRead(m) => put(&mut out, m),
            Request::MigDataWrite(data) => out = MigData::encode_with_data(data),
        }
        (out, fds)
    }
}

/// Decode a fixed-size struct that must fill the payload exactly (replies, and requests without
/// `argsz`).
pub(crate) fn decode_fixed<T>(payload: &[u8], what: &'static str) -> Result<T, ProtocolError>
where
    T: zerocopy::FromBytes + zerocopy::KnownLayout + zerocopy::Immutable,
{
    let mut r = WireReader::new(payload, what);
    let v = r.read::<T>()?;
    r.finish(core::mem::size_of::<T>())?;
    Ok(v)
}

/// A request struct whose first field is `argsz`.
pub(crate) trait Argsz {
    /// The `argsz` the peer sent.
    fn argsz(&self) -> u32;
}

/// Decode the fixed part of a request that carries `argsz`, accepting a longer payload.
///
/// Why: the spec defines the *request* size by `msg_size`, not by `argsz` (QEMU
/// `docs/interop/vfio-user.rst`, "Message sizes"), and libvfio-user's client sends `argsz`
/// bytes of request (e.g. 64 bytes of GET_REGION_INFO after the server said the caps need 64),
/// while libvfio-user's server accepts any request at least as long as the struct. vfud does the
/// same, bounded: bytes after the fixed part are ignored as long as the payload is no longer than
/// `argsz` (and the frame limit already bounds the whole message). Returns the struct and the
/// bytes after it, so a command with trailing data (SET_IRQS, MIG_DATA_WRITE) can take its data
/// and check the rest with [`check_tail`].
pub(crate) fn decode_argsz<'a, T>(
    payload: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), ProtocolError>
where
    T: zerocopy::FromBytes + zerocopy::KnownLayout + zerocopy::Immutable + Argsz,
{
    let mut r = WireReader::new(payload, what);
    let v = r.read::<T>()?;
    check_tail(what, payload.len(), core::mem::size_of::<T>(), v.argsz())?;
    Ok((v, r.rest()))
}

/// Accept a payload of `len` bytes whose meaningful part is `used` bytes: anything after it is
/// an ignored tail, allowed only up to `argsz` (see [`decode_argsz`]).
pub(crate) fn check_tail(
    what: &'static str,
    len: usize,
    used: usize,
    argsz: u32,
) -> Result<(), ProtocolError> {
    if len <= used || len <= argsz as usize {
        Ok(())
    } else {
        Err(ProtocolError::PayloadLength {
            what,
            got: len,
            expected: used.max(argsz as usize),
        })
    }
}

/// Check that a request's `argsz` covers at least the fixed struct.
pub(crate) fn check_argsz(argsz: u32, needed: usize) -> Result<(), ProtocolError> {
    if (argsz as usize) < needed {
        Err(ProtocolError::ArgszTooSmall { argsz, needed })
    } else {
        Ok(())
    }
}

/// Implement [`Argsz`] for request structs whose first field is `argsz`.
macro_rules! impl_argsz {
    ($($t:ty),*) => {
        $(impl Argsz for $t {
            fn argsz(&self) -> u32 {
                self.argsz
            }
        })*
    };
}
impl_argsz!(
    DmaMap,
    DmaUnmap,
    DeviceInfo,
    RegionInfo,
    RegionIoFds,
    IrqInfo,
    irq::IrqSetHeader,
    feature::MigData
);
