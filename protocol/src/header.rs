//! The 16-byte message header and the command numbers (QEMU `vfio-user.rst`, "Header").

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::ProtocolError;

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;

/// Flag bits 0–3: message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Message type: command.
pub const FLAG_TYPE_COMMAND: u32 = 0;
/// Message type: reply.
pub const FLAG_TYPE_REPLY: u32 = 1;
/// The sender wants no reply, not even an error reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// The reply reports an error in `error_no`.
pub const FLAG_ERROR: u32 = 1 << 5;

/// Message header, `struct vfio_user_header`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Header {
    /// Sender-chosen id echoed in the reply; not necessarily unique.
    pub msg_id: u16,
    /// Command number ([`Command`]).
    pub cmd: u16,
    /// Whole message size, header included.
    pub msg_size: u32,
    /// Type, NO_REPLY and ERROR bits.
    pub flags: u32,
    /// errno of an error reply.
    pub error_no: u32,
}
const _: () = assert!(core::mem::size_of::<Header>() == HEADER_SIZE);

/// Whether a message is a command or a reply, and its modifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// A command; `no_reply` set when the sender wants no answer.
    Command {
        /// `NO_REPLY` flag.
        no_reply: bool,
    },
    /// A successful reply.
    Reply,
    /// An error reply carrying an errno.
    ErrorReply(u32),
}

impl Header {
    /// A command header for `cmd` with `payload_len` bytes following.
    pub fn command(msg_id: u16, cmd: Command, payload_len: usize, no_reply: bool) -> Self {
        Self {
            msg_id,
            cmd: cmd as u16,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 },
            error_no: 0,
        }
    }

    /// The reply header that answers `self` with `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Self {
        Self {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_REPLY,
            error_no: 0,
        }
    }

    /// The header-only error reply (`REPLY|ERROR`, spec "Header") that answers `self`.
    pub fn error_reply(&self, errno: i32) -> Self {
        Self {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error_no: errno as u32,
        }
    }

    /// The 16 bytes as sent on the wire.
    pub fn as_wire_bytes(&self) -> &[u8] {
        zerocopy::IntoBytes::as_bytes(self)
    }

    /// Classify the message.
    pub fn kind(&self) -> Result<MessageKind, ProtocolError> {
        match self.flags & FLAG_TYPE_MASK {
            FLAG_TYPE_COMMAND => Ok(MessageKind::Command {
                no_reply: self.flags & FLAG_NO_REPLY != 0,
            }),
            FLAG_TYPE_REPLY if self.flags & FLAG_ERROR != 0 => {
                Ok(MessageKind::ErrorReply(self.error_no))
            }
            FLAG_TYPE_REPLY => Ok(MessageKind::Reply),
            other => Err(ProtocolError::invalid(
                "flags",
                format!("unknown message type {other}"),
            )),
        }
    }

    /// The command, or [`ProtocolError::UnsupportedCommand`].
    pub fn command_kind(&self) -> Result<Command, ProtocolError> {
        Command::try_from(self.cmd)
    }

    /// Payload length declared by `msg_size`.
    pub fn payload_len(&self) -> Result<usize, ProtocolError> {
        (self.msg_size as usize)
            .checked_sub(HEADER_SIZE)
            .ok_or(ProtocolError::MsgSizeTooSmall(self.msg_size))
    }
}

/// vfio-user command numbers (spec "Commands"). 14 (`DIRTY_PAGES`) is obsolete and unsupported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// `VFIO_USER_VERSION`
    Version = 1,
    /// `VFIO_USER_DMA_MAP`
    DmaMap = 2,
    /// `VFIO_USER_DMA_UNMAP`
    DmaUnmap = 3,
    /// `VFIO_USER_DEVICE_GET_INFO`
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`
    DeviceGetRegionIoFds = 6,
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`
    DeviceGetIrqInfo = 7,
    /// `VFIO_USER_DEVICE_SET_IRQS`
    DeviceSetIrqs = 8,
    /// `VFIO_USER_REGION_READ`
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE`
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ` (server → client)
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE` (server → client)
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET`
    DeviceReset = 13,
    /// `VFIO_USER_REGION_WRITE_MULTI`
    RegionWriteMulti = 15,
    /// `VFIO_USER_DEVICE_FEATURE`
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ`
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE`
    MigDataWrite = 18,
}

impl Command {
    /// Every supported command, in numeric order.
    pub const ALL: [Command; 17] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];
}

impl Command {
    /// The spec's name without its `VFIO_USER_` prefix (`DEVICE_GET_REGION_INFO`), as tools
    /// print it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Version => "VERSION",
            Command::DmaMap => "DMA_MAP",
            Command::DmaUnmap => "DMA_UNMAP",
            Command::DeviceGetInfo => "DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "DEVICE_SET_IRQS",
            Command::RegionRead => "REGION_READ",
            Command::RegionWrite => "REGION_WRITE",
            Command::DmaRead => "DMA_READ",
            Command::DmaWrite => "DMA_WRITE",
            Command::DeviceReset => "DEVICE_RESET",
            Command::RegionWriteMulti => "REGION_WRITE_MULTI",
            Command::DeviceFeature => "DEVICE_FEATURE",
            Command::MigDataRead => "MIG_DATA_READ",
            Command::MigDataWrite => "MIG_DATA_WRITE",
        }
    }
}

impl TryFrom<u16> for Command {
    type Error = ProtocolError;

    fn try_from(v: u16) -> Result<Self, ProtocolError> {
        Command::ALL
            .iter()
            .copied()
            .find(|c| *c as u16 == v)
            .ok_or(ProtocolError::UnsupportedCommand(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_14_and_unknown_numbers_are_unsupported() {
        for n in [0u16, 14, 19, 0xffff] {
            assert!(matches!(
                Command::try_from(n),
                Err(ProtocolError::UnsupportedCommand(x)) if x == n
            ));
        }
    }

    #[test]
    fn every_command_round_trips_through_its_number() {
        for c in Command::ALL {
            assert_eq!(Command::try_from(c as u16).ok(), Some(c));
        }
    }

    #[test]
    fn error_reply_is_header_only_with_reply_and_error_bits() {
        let req = Header::command(7, Command::RegionRead, 16, false);
        let e = req.error_reply(22);
        assert_eq!(e.msg_size, 16);
        assert_eq!(e.flags, FLAG_TYPE_REPLY | FLAG_ERROR);
        assert_eq!(e.kind().ok(), Some(MessageKind::ErrorReply(22)));
        assert_eq!(e.msg_id, 7);
    }

    #[test]
    fn msg_size_smaller_than_header_is_rejected() {
        let h = Header {
            msg_size: 8,
            ..Header::default()
        };
        assert!(matches!(
            h.payload_len(),
            Err(ProtocolError::MsgSizeTooSmall(8))
        ));
    }

    #[test]
    fn unknown_message_type_is_rejected() {
        let h = Header {
            flags: 3,
            ..Header::default()
        };
        assert!(h.kind().is_err());
    }
}
