//! DEVICE_GET_INFO (spec "VFIO_USER_DEVICE_GET_INFO").

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{check_argsz, decode_argsz};
use crate::error::ProtocolError;

/// Device flag: the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// Device flag: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `struct vfio_device_info`, request and reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DeviceInfo {
    /// Request: reply room; reply: size needed.
    pub argsz: u32,
    /// RESET / PCI.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indices.
    pub num_irqs: u32,
}
const _: () = assert!(core::mem::size_of::<DeviceInfo>() == 16);

impl DeviceInfo {
    /// Decode a request: `argsz` must leave room for the reply; a longer payload is accepted up to
    /// `argsz` and its tail ignored (see `decode_argsz`).
    pub fn decode_request(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (i, _tail): (DeviceInfo, _) = decode_argsz(payload, "DEVICE_GET_INFO")?;
        check_argsz(i.argsz, core::mem::size_of::<Self>())?;
        Ok(i)
    }
}
