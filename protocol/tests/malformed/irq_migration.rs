//! Interrupt and migration messages: GET_IRQ_INFO, SET_IRQS (data that disagrees with its
//! count, eventfds over the limit), and MIG_DATA_READ/WRITE sizes.

use nix::errno::Errno;
use vfud_protocol::header::Command;
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
};
use vfud_protocol::messages::{IrqInfo, MigData};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

use super::{cat, msg, small, Row};

/// The rows of this family, for the runner in `main.rs`.
pub fn rows() -> Vec<Row> {
    let l = small();
    let mig_write = |size: u32, data: &[u8]| {
        msg(
            Command::MigDataWrite,
            &cat(&[
                MigData {
                    argsz: 8 + size,
                    size,
                }
                .as_bytes(),
                data,
            ]),
        )
    };
    let irq_set = |flags: u32, count: u32, data: &[u8]| {
        msg(
            Command::DeviceSetIrqs,
            &cat(&[
                IrqSetHeader {
                    argsz: 20 + data.len() as u32,
                    flags,
                    index: 2,
                    start: 0,
                    count,
                }
                .as_bytes(),
                data,
            ]),
        )
    };
    vec![
        Row {
            name: "GET_IRQ_INFO argsz 4 < 16",
            limits: l,
            bytes: msg(
                Command::DeviceGetIrqInfo,
                IrqInfo {
                    argsz: 4,
                    ..IrqInfo::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 4,
                        needed: 16
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "SET_IRQS argsz 19 < 20",
            limits: l,
            bytes: msg(
                Command::DeviceSetIrqs,
                IrqSetHeader {
                    argsz: 19,
                    flags: IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                    index: 2,
                    start: 0,
                    count: 1,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 19,
                        needed: 20
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "SET_IRQS DATA_BOOL count 4 but 2 bytes",
            limits: l,
            bytes: irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL, 4, &[1, 0]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "data", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "SET_IRQS with 3 eventfds over max_msg_fds 2",
            limits: l,
            bytes: irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD, 3, &[]),
            eventfds: 3,
            expect: |e| matches!(e, ProtocolError::FdCountExceeded { got: 3, max: 2 }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "SET_IRQS eventfd count 2 but count 1",
            limits: l,
            bytes: irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD, 1, &[]),
            eventfds: 2,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "data", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "MIG_DATA_WRITE size 100 but 50 data bytes",
            limits: l,
            bytes: mig_write(100, &[7; 50]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "size", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "MIG_DATA_WRITE size 0 with 8 bytes beyond argsz",
            limits: l,
            bytes: mig_write(0, &[7; 8]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadLength {
                        got: 16,
                        expected: 8,
                        ..
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "MIG_DATA_WRITE of max_data_xfer_size + 1",
            limits: l,
            bytes: mig_write(4097, &[0; 4097]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::TransferTooLarge {
                        size: 4097,
                        max: 4096
                    }
                )
            },
            errno: Errno::E2BIG,
        },
        Row {
            name: "MIG_DATA_READ of max_data_xfer_size + 1",
            limits: l,
            bytes: msg(
                Command::MigDataRead,
                MigData {
                    argsz: 8 + 4097,
                    size: 4097,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::TransferTooLarge {
                        size: 4097,
                        max: 4096
                    }
                )
            },
            errno: Errno::E2BIG,
        },
    ]
}
