//! DEVICE_GET_IRQ_INFO and DEVICE_SET_IRQS (spec sections of the same names).

use std::os::fd::OwnedFd;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{check_argsz, check_tail, decode_argsz};
use crate::error::ProtocolError;
use crate::wire::{put, WireReader};

/// IRQ info flag: eventfds can be assigned.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flag: vectors can be masked.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flag: the interrupt masks itself when it fires (INTx).
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flag: the vector count cannot change while enabled.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// SET_IRQS data type: none.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data type: one bool byte per vector.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// SET_IRQS data type: one eventfd per vector (or none to de-assign).
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
const ACTION_MASK: u32 = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// IRQ index of INTx.
pub const IRQ_INDEX_INTX: u32 = 0;
/// IRQ index of MSI.
pub const IRQ_INDEX_MSI: u32 = 1;
/// IRQ index of MSI-X.
pub const IRQ_INDEX_MSIX: u32 = 2;
/// IRQ index of error notification.
pub const IRQ_INDEX_ERR: u32 = 3;
/// IRQ index of device request.
pub const IRQ_INDEX_REQ: u32 = 4;
/// Number of PCI IRQ indices.
pub const IRQ_INDEX_COUNT: u32 = 5;

/// `struct vfio_irq_info`, request and reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IrqInfo {
    /// Request: reply room; reply: size.
    pub argsz: u32,
    /// EVENTFD/MASKABLE/AUTOMASKED/NORESIZE.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<IrqInfo>() == 16);

impl IrqInfo {
    /// Decode a request (a tail up to `argsz` is ignored).
    pub fn decode_request(payload: &[u8]) -> Result<Self, ProtocolError> {
        let (i, _tail): (IrqInfo, _) = decode_argsz(payload, "DEVICE_GET_IRQ_INFO")?;
        check_argsz(i.argsz, core::mem::size_of::<Self>())?;
        Ok(i)
    }
}

/// Fixed part of `struct vfio_irq_set`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IrqSetHeader {
    /// Size of the struct.
    pub argsz: u32,
    /// One action bit and one data bit.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<IrqSetHeader>() == 20);

/// The action of a SET_IRQS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// Mask the vectors.
    Mask,
    /// Unmask the vectors (for INTx with an eventfd: assign the resample/unmask fd).
    Unmask,
    /// Trigger the vectors, or (with eventfds) assign their trigger eventfds.
    Trigger,
}

/// The data of a SET_IRQS.
#[derive(Debug)]
pub enum IrqData {
    /// No data: apply the action to every vector in range.
    None,
    /// One bool per vector: apply the action where true.
    Bool(Vec<bool>),
    /// One eventfd per vector; an empty list de-assigns the range (spec "VFIO_USER_DEVICE_SET_IRQS").
    Eventfds(Vec<OwnedFd>),
}

/// A decoded, well-formed DEVICE_SET_IRQS.
#[derive(Debug)]
pub struct SetIrqs {
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// The action.
    pub action: IrqAction,
    /// The data.
    pub data: IrqData,
}

impl SetIrqs {
    /// Whether this is the "disable the whole index" form (`TRIGGER|NONE`, `count = 0`).
    pub fn is_disable(&self) -> bool {
        self.count == 0
    }

    /// Decode and check the flag, count and fd rules that need no device knowledge. Bytes after
    /// the data are ignored when `argsz` covers them.
    pub fn decode(payload: &[u8], fds: Vec<OwnedFd>) -> Result<Self, ProtocolError> {
        let mut r = WireReader::new(payload, "DEVICE_SET_IRQS");
        let h: IrqSetHeader = r.read()?;
        check_argsz(h.argsz, core::mem::size_of::<IrqSetHeader>())?;
        if h.flags & !(DATA_MASK | ACTION_MASK) != 0 {
            return Err(ProtocolError::invalid(
                "flags",
                format!("unknown SET_IRQS flags {:#x}", h.flags),
            ));
        }
        let action = match h.flags & ACTION_MASK {
            IRQ_SET_ACTION_MASK => IrqAction::Mask,
            IRQ_SET_ACTION_UNMASK => IrqAction::Unmask,
            IRQ_SET_ACTION_TRIGGER => IrqAction::Trigger,
            _ => return Err(ProtocolError::invalid("flags", "need exactly one action")),
        };
        if h.start.checked_add(h.count).is_none() {
            return Err(ProtocolError::invalid("start", "start + count overflows"));
        }
        let rest = r.rest();
        // Bytes after the data the flags call for are an ignored tail, allowed up to `argsz`
        // (spec: `argsz` is the size of the whole request payload; see `decode_argsz`).
        let tail = |data_len: usize| {
            check_tail(
                "DEVICE_SET_IRQS",
                payload.len(),
                core::mem::size_of::<IrqSetHeader>() + data_len,
                h.argsz,
            )
        };
        let data = match h.flags & DATA_MASK {
            IRQ_SET_DATA_NONE => {
                if !fds.is_empty() {
                    return Err(ProtocolError::invalid("data", "DATA_NONE with fds"));
                }
                tail(0)?;
                IrqData::None
            }
            IRQ_SET_DATA_BOOL => {
                let n = h.count as usize;
                if rest.len() < n || !fds.is_empty() {
                    return Err(ProtocolError::invalid(
                        "data",
                        format!("DATA_BOOL needs {} bytes, got {}", h.count, rest.len()),
                    ));
                }
                tail(n)?;
                IrqData::Bool(rest[..n].iter().map(|b| *b != 0).collect())
            }
            IRQ_SET_DATA_EVENTFD => {
                tail(0)?;
                if !fds.is_empty() && fds.len() != h.count as usize {
                    return Err(ProtocolError::invalid(
                        "data",
                        format!("{} eventfds for {} vectors", fds.len(), h.count),
                    ));
                }
                IrqData::Eventfds(fds)
            }
            _ => {
                return Err(ProtocolError::invalid(
                    "flags",
                    "need exactly one data type",
                ))
            }
        };
        if h.count == 0
            && !(action == IrqAction::Trigger && matches!(data, IrqData::None) && h.start == 0)
        {
            return Err(ProtocolError::invalid(
                "count",
                "count 0 is only valid with TRIGGER|DATA_NONE and start 0",
            ));
        }
        Ok(Self {
            index: h.index,
            start: h.start,
            count: h.count,
            action,
            data,
        })
    }

    /// The wire flags for this request.
    pub fn flags(&self) -> u32 {
        let a = match self.action {
            IrqAction::Mask => IRQ_SET_ACTION_MASK,
            IrqAction::Unmask => IRQ_SET_ACTION_UNMASK,
            IrqAction::Trigger => IRQ_SET_ACTION_TRIGGER,
        };
        let d = match self.data {
            IrqData::None => IRQ_SET_DATA_NONE,
            IrqData::Bool(_) => IRQ_SET_DATA_BOOL,
            IrqData::Eventfds(_) => IRQ_SET_DATA_EVENTFD,
        };
        a | d
    }

    /// Encode the payload (fds travel separately).
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let extra = match &self.data {
            IrqData::Bool(v) => v.len(),
            _ => 0,
        };
        put(
            &mut out,
            &IrqSetHeader {
                argsz: (20 + extra) as u32,
                flags: self.flags(),
                index: self.index,
                start: self.start,
                count: self.count,
            },
        );
        if let IrqData::Bool(v) = &self.data {
            out.extend(v.iter().map(|b| u8::from(*b)));
        }
        out
    }
}
