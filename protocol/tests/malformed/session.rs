//! Session-level messages: VERSION's JSON, DEVICE_GET_INFO, DEVICE_RESET and DEVICE_FEATURE.

use nix::errno::Errno;
use vfud_protocol::header::Command;
use vfud_protocol::messages::feature::{FEATURE_GET, FEATURE_MIGRATION, FEATURE_SET};
use vfud_protocol::messages::DeviceInfo;
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

use super::{cat, msg, small, Row};

/// The rows of this family, for the runner in `main.rs`.
pub fn rows() -> Vec<Row> {
    let l = small();
    vec![
        Row {
            name: "DEVICE_GET_INFO argsz 8 < 16",
            limits: l,
            bytes: msg(
                Command::DeviceGetInfo,
                DeviceInfo {
                    argsz: 8,
                    ..DeviceInfo::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 8,
                        needed: 16
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "DEVICE_GET_INFO with an fd",
            limits: l,
            bytes: msg(
                Command::DeviceGetInfo,
                DeviceInfo {
                    argsz: 16,
                    ..DeviceInfo::default()
                }
                .as_bytes(),
            ),
            eventfds: 1,
            expect: |e| matches!(e, ProtocolError::FdCountExceeded { got: 1, max: 0 }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "DEVICE_RESET with a payload",
            limits: l,
            bytes: msg(Command::DeviceReset, &[0; 4]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadLength {
                        what: "DEVICE_RESET",
                        got: 4,
                        expected: 0
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "DEVICE_FEATURE with GET and SET",
            limits: l,
            bytes: msg(
                Command::DeviceFeature,
                &cat(&[
                    &16u32.to_ne_bytes(),
                    &(FEATURE_GET | FEATURE_SET | u32::from(FEATURE_MIGRATION)).to_ne_bytes(),
                ]),
            ),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "flags", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "VERSION capabilities without NUL",
            limits: l,
            bytes: msg(Command::Version, b"\0\0\0\0{\"capabilities\":{}}"),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "VERSION with broken JSON",
            limits: l,
            bytes: msg(Command::Version, b"\0\0\0\0{\"capabilities\":\0"),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidJson(_)),
            errno: Errno::EINVAL,
        },
    ]
}
