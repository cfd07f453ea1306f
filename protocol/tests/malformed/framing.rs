//! Frames that break before any message is decoded: the peer hanging up mid-frame, a
//! `msg_size` outside the header and limit bounds, and command numbers a server must not take
//! (unknown, obsolete, or server-to-client).

use nix::errno::Errno;
use vfud_protocol::codec::Limits;
use vfud_protocol::header::Command;
use vfud_protocol::ProtocolError;

use super::{cat, header, msg, msg_raw, small, Row};

/// The rows of this family, for the runner in `main.rs`.
pub fn rows() -> Vec<Row> {
    let l = small();
    vec![
        Row {
            name: "peer closes after 8 header bytes",
            limits: l,
            bytes: header(Command::DeviceReset as u16, 16)[..8].to_vec(),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::Disconnected),
            errno: Errno::ENOTCONN,
        },
        Row {
            name: "peer closes mid-payload",
            limits: l,
            bytes: cat(&[&header(Command::RegionRead as u16, 32), &[0u8; 10]]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::Disconnected),
            errno: Errno::ENOTCONN,
        },
        Row {
            name: "msg_size 8 is smaller than the header",
            limits: l,
            bytes: header(Command::DeviceReset as u16, 8),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::MsgSizeTooSmall(8)),
            errno: Errno::EINVAL,
        },
        Row {
            name: "msg_size 0",
            limits: l,
            bytes: header(Command::Version as u16, 0),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::MsgSizeTooSmall(0)),
            errno: Errno::EINVAL,
        },
        Row {
            name: "msg_size 15",
            limits: l,
            bytes: header(Command::Version as u16, 15),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::MsgSizeTooSmall(15)),
            errno: Errno::EINVAL,
        },
        Row {
            name: "msg_size one past max_msg_size",
            limits: l,
            bytes: header(Command::RegionWrite as u16, 8193),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::MsgTooLarge {
                        size: 8193,
                        max: 8192
                    }
                )
            },
            errno: Errno::E2BIG,
        },
        Row {
            name: "msg_size u32::MAX",
            limits: Limits::default(),
            bytes: header(Command::MigDataWrite as u16, u32::MAX),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::MsgTooLarge { size: u32::MAX, .. }),
            errno: Errno::E2BIG,
        },
        Row {
            name: "command 14 (obsolete DIRTY_PAGES)",
            limits: l,
            bytes: msg_raw(14, &[0; 16]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::UnsupportedCommand(14)),
            errno: Errno::ENOSYS,
        },
        Row {
            name: "command 99",
            limits: l,
            bytes: msg_raw(99, &[]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::UnsupportedCommand(99)),
            errno: Errno::ENOSYS,
        },
        Row {
            name: "command 0",
            limits: l,
            bytes: msg_raw(0, &[]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::UnsupportedCommand(0)),
            errno: Errno::ENOSYS,
        },
        Row {
            name: "DMA_READ sent by a client",
            limits: l,
            bytes: msg(Command::DmaRead, &[0; 16]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "cmd", .. }),
            errno: Errno::EINVAL,
        },
    ]
}
