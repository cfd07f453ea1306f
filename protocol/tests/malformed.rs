//! Hostile peers over a real socketpair: each row sends raw bytes (and fds), reads them with
//! `FrameReader::read_frame`, decodes with `Request::decode`, and asserts the specific
//! `ProtocolError` variant and the errno an error reply would carry. Also proves that the fds
//! of rejected messages are closed.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use common::{eventfd_nb, pair, pipe_nb, pipe_writers_closed, recv_frame, recv_frame_with};
use nix::errno::Errno;
use vfud_protocol::codec::{send_chunks, FrameReader, Limits};
use vfud_protocol::header::{Command, Header};
use vfud_protocol::messages::dma::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
use vfud_protocol::messages::feature::{FEATURE_GET, FEATURE_MIGRATION, FEATURE_SET};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
};
use vfud_protocol::messages::{
    DeviceInfo, DmaMap, DmaUnmap, IrqInfo, MigData, RegionAccess, RegionInfo, RegionIoFds, Request,
};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

/// Limits used by most rows: 2 fds, 4 KiB transfers, so an 8 KiB message limit.
fn small() -> Limits {
    Limits::with_xfer(2, 4096)
}

/// A header for `cmd` claiming `msg_size` bytes.
fn header(cmd: u16, msg_size: u32) -> Vec<u8> {
    Header {
        msg_id: 1,
        cmd,
        msg_size,
        flags: 0,
        error_no: 0,
    }
    .as_bytes()
    .to_vec()
}

/// A well-framed message: correct `msg_size` for `payload`.
fn msg(cmd: Command, payload: &[u8]) -> Vec<u8> {
    msg_raw(cmd as u16, payload)
}

fn msg_raw(cmd: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = header(cmd, (16 + payload.len()) as u32);
    v.extend_from_slice(payload);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Send `bytes` with `fds` on the first byte, close the sending end, then read one frame and
/// decode it.
fn exchange(
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    limits: &Limits,
) -> Result<Request, ProtocolError> {
    let (tx, rx) = pair();
    send_chunks(tx.as_fd(), &[bytes], fds).expect("send");
    drop(tx);
    let f = recv_frame(&rx, limits)?;
    Request::decode(f.header.cmd, &f.payload, f.fds, limits)
}

struct Row {
    name: &'static str,
    limits: Limits,
    bytes: Vec<u8>,
    /// Number of real eventfds attached to the first byte.
    eventfds: usize,
    expect: fn(&ProtocolError) -> bool,
    errno: Errno,
}

fn rows() -> Vec<Row> {
    let l = small();
    let region_write = |count: u32, data: &[u8]| {
        msg(
            Command::RegionWrite,
            &cat(&[
                RegionAccess {
                    offset: 0,
                    region: 0,
                    count,
                }
                .as_bytes(),
                data,
            ]),
        )
    };
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
        // ---- framing ----------------------------------------------------------------------
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
        // ---- argsz lies -------------------------------------------------------------------
        Row {
            name: "DMA_MAP argsz 16 < 32",
            limits: l,
            bytes: msg(
                Command::DmaMap,
                DmaMap {
                    argsz: 16,
                    flags: 3,
                    offset: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 16,
                        needed: 32
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "DMA_UNMAP argsz 0 < 24",
            limits: l,
            bytes: msg(
                Command::DmaUnmap,
                DmaUnmap {
                    argsz: 0,
                    flags: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 0,
                        needed: 24
                    }
                )
            },
            errno: Errno::EINVAL,
        },
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
            name: "GET_REGION_INFO argsz 31 < 32",
            limits: l,
            bytes: msg(
                Command::DeviceGetRegionInfo,
                RegionInfo {
                    argsz: 31,
                    ..RegionInfo::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 31,
                        needed: 32
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "GET_REGION_IO_FDS argsz 15 < 16",
            limits: l,
            bytes: msg(
                Command::DeviceGetRegionIoFds,
                RegionIoFds {
                    argsz: 15,
                    ..RegionIoFds::default()
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::ArgszTooSmall {
                        argsz: 15,
                        needed: 16
                    }
                )
            },
            errno: Errno::EINVAL,
        },
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
        // ---- counts that disagree with the data ---------------------------------------------
        Row {
            name: "REGION_WRITE count 8 but 4 data bytes",
            limits: l,
            bytes: region_write(8, &[1, 2, 3, 4]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "count", .. }),
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_WRITE count 2 but 4 data bytes",
            limits: l,
            bytes: region_write(2, &[1, 2, 3, 4]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "count", .. }),
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
            name: "SET_IRQS DATA_BOOL count 4 but 2 bytes",
            limits: l,
            bytes: irq_set(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL, 4, &[1, 0]),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "data", .. }),
            errno: Errno::EINVAL,
        },
        // ---- fds --------------------------------------------------------------------------
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
            name: "DMA_MAP with 2 fds",
            limits: Limits::default(),
            bytes: msg(
                Command::DmaMap,
                DmaMap {
                    argsz: 32,
                    flags: 3,
                    offset: 0,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 2,
            expect: |e| matches!(e, ProtocolError::FdCountExceeded { got: 2, max: 1 }),
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
        // ---- commands ---------------------------------------------------------------------
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
        // ---- transfer sizes ---------------------------------------------------------------
        Row {
            name: "REGION_READ of max_data_xfer_size + 1",
            limits: l,
            bytes: msg(
                Command::RegionRead,
                RegionAccess {
                    offset: 0,
                    region: 2,
                    count: 4097,
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
        Row {
            name: "REGION_WRITE of max_data_xfer_size + 1",
            limits: l,
            bytes: region_write(4097, &[0; 4097]),
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
        // ---- payload lengths and flags ----------------------------------------------------
        Row {
            name: "REGION_READ payload of 12 bytes",
            limits: l,
            bytes: msg(Command::RegionRead, &[0; 12]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadTooShort {
                        got: 12,
                        needed: 16,
                        ..
                    }
                )
            },
            errno: Errno::EINVAL,
        },
        Row {
            name: "REGION_READ payload of 20 bytes",
            limits: l,
            bytes: msg(Command::RegionRead, &[0; 20]),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::PayloadLength {
                        got: 20,
                        expected: 16,
                        ..
                    }
                )
            },
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
            name: "DMA_UNMAP with the obsolete GET_DIRTY_BITMAP",
            limits: l,
            bytes: msg(
                Command::DmaUnmap,
                DmaUnmap {
                    argsz: 24,
                    flags: DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
                    addr: 0,
                    size: 4096,
                }
                .as_bytes(),
            ),
            eventfds: 0,
            expect: |e| matches!(e, ProtocolError::InvalidField { field: "flags", .. }),
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
            name: "REGION_WRITE_MULTI with wr_cnt 0",
            limits: l,
            bytes: msg(Command::RegionWriteMulti, &0u64.to_ne_bytes()),
            eventfds: 0,
            expect: |e| {
                matches!(
                    e,
                    ProtocolError::InvalidField {
                        field: "wr_cnt",
                        ..
                    }
                )
            },
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

#[test]
fn malformed_messages_over_a_socket_fail_with_the_specific_error() {
    let rows = rows();
    assert!(rows.len() >= 30, "the table lost rows");
    for row in rows {
        let fds: Vec<OwnedFd> = (0..row.eventfds).map(|_| eventfd_nb()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();

        let got = exchange(&row.bytes, &borrowed, &row.limits);

        match got {
            Err(e) => {
                assert!((row.expect)(&e), "{}: wrong error {e:?}", row.name);
                assert_eq!(e.errno(), row.errno, "{}: errno of {e:?}", row.name);
            }
            Ok(req) => panic!("{}: accepted as {req:?}", row.name),
        }
    }
}

#[test]
fn a_valid_message_passes_the_same_path() {
    // Control for the table: the harness itself accepts a well-formed message.
    let bytes = msg(
        Command::RegionRead,
        RegionAccess {
            offset: 0,
            region: 2,
            count: 4096,
        }
        .as_bytes(),
    );

    let got = exchange(&bytes, &[], &small());

    assert!(matches!(got, Ok(Request::RegionRead(a)) if a.count == 4096));
}

/// Send `bytes` with the write ends of `n` fresh pipes attached; return the read ends, the
/// received frame's decode result, after closing our own write ends.
fn send_pipe_ends_and_decode(
    bytes: &[u8],
    n: usize,
    limits: &Limits,
) -> (Vec<OwnedFd>, Result<Request, ProtocolError>) {
    let (tx, rx) = pair();
    let pipes: Vec<(OwnedFd, OwnedFd)> = (0..n).map(|_| pipe_nb()).collect();
    let writers: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
    send_chunks(tx.as_fd(), &[bytes], &writers).expect("send");
    let (readers, our_writers): (Vec<OwnedFd>, Vec<OwnedFd>) = pipes.into_iter().unzip();
    drop(our_writers);
    let f = recv_frame(&rx, limits).expect("frame");
    assert_eq!(f.fds.len(), n, "all fds arrive with the frame");
    for r in &readers {
        assert!(
            !pipe_writers_closed(r.as_fd()),
            "the received copy keeps the pipe open until decode drops it"
        );
    }
    let res = Request::decode(f.header.cmd, &f.payload, f.fds, limits);
    (readers, res)
}

#[test]
fn fds_over_the_negotiated_max_are_closed() {
    let bytes = msg(
        Command::DeviceSetIrqs,
        IrqSetHeader {
            argsz: 20,
            flags: IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            index: 2,
            start: 0,
            count: 3,
        }
        .as_bytes(),
    );

    let (readers, res) = send_pipe_ends_and_decode(&bytes, 3, &small());

    assert!(matches!(
        res,
        Err(ProtocolError::FdCountExceeded { got: 3, max: 2 })
    ));
    for r in &readers {
        assert!(pipe_writers_closed(r.as_fd()), "rejected fd left open");
    }
}

#[test]
fn fds_on_a_command_that_takes_none_are_closed() {
    let bytes = msg(
        Command::DeviceGetIrqInfo,
        IrqInfo {
            argsz: 16,
            ..IrqInfo::default()
        }
        .as_bytes(),
    );

    let (readers, res) = send_pipe_ends_and_decode(&bytes, 1, &small());

    assert!(matches!(
        res,
        Err(ProtocolError::FdCountExceeded { got: 1, max: 0 })
    ));
    assert!(pipe_writers_closed(readers[0].as_fd()));
}

#[test]
fn fds_on_an_unsupported_command_are_closed() {
    let bytes = msg_raw(14, &[0; 8]);

    let (readers, res) = send_pipe_ends_and_decode(&bytes, 2, &small());

    assert!(matches!(res, Err(ProtocolError::UnsupportedCommand(14))));
    for r in &readers {
        assert!(pipe_writers_closed(r.as_fd()));
    }
}

#[test]
fn fds_on_a_request_that_fails_validation_are_closed() {
    // Right fd count, but SET_IRQS with DATA_BOOL must not carry fds.
    let bytes = msg(
        Command::DeviceSetIrqs,
        &cat(&[
            IrqSetHeader {
                argsz: 21,
                flags: IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
                index: 2,
                start: 0,
                count: 1,
            }
            .as_bytes(),
            &[1],
        ]),
    );

    let (readers, res) = send_pipe_ends_and_decode(&bytes, 1, &small());

    assert!(matches!(
        res,
        Err(ProtocolError::InvalidField { field: "data", .. })
    ));
    assert!(pipe_writers_closed(readers[0].as_fd()));
}

#[test]
fn fds_of_a_frame_rejected_by_the_reader_are_closed_with_the_reader() {
    let (tx, rx) = pair();
    let (r, w) = pipe_nb();
    send_chunks(
        tx.as_fd(),
        &[&header(Command::DeviceSetIrqs as u16, 1 << 30)],
        &[w.as_fd()],
    )
    .expect("send");
    drop(w);
    let mut reader = FrameReader::new();

    let res = recv_frame_with(&mut reader, &rx, &small());

    assert!(matches!(res, Err(ProtocolError::MsgTooLarge { .. })));
    assert!(!pipe_writers_closed(r.as_fd()), "reader still holds the fd");
    drop(reader);
    assert!(
        pipe_writers_closed(r.as_fd()),
        "dropping the reader closes it"
    );
}

#[test]
fn a_too_large_header_is_rejected_before_any_payload_arrives() {
    // The reader must fail on the header alone, without waiting for (or allocating) 1 GiB.
    let (tx, rx) = pair();
    send_chunks(
        tx.as_fd(),
        &[&header(Command::RegionWrite as u16, 1 << 30)],
        &[],
    )
    .expect("send");

    let res = recv_frame(&rx, &Limits::default());

    assert!(matches!(res, Err(ProtocolError::MsgTooLarge { size, .. }) if size == 1 << 30));
    drop(tx);
}
