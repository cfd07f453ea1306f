//! Hostile peers over a real socketpair: each row sends raw bytes (and fds), reads them with
//! `FrameReader::read_frame`, decodes with `Request::decode`, and asserts the specific
//! `ProtocolError` variant and the errno an error reply would carry. Also proves that the fds
//! of rejected messages are closed.
//!
//! The table's rows live in one module per message family (`framing`, `session`,
//! `region_dma`, `irq_migration`); this file holds the row type, the frame builders they share,
//! and the runner.

#[path = "../common/mod.rs"]
mod common;
mod framing;
mod irq_migration;
mod region_dma;
mod session;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use common::{eventfd_nb, pair, pipe_nb, pipe_writers_closed, recv_frame, recv_frame_with};
use nix::errno::Errno;
use vfud_protocol::codec::{send_chunks, FrameReader, Limits};
use vfud_protocol::header::{Command, Header};
use vfud_protocol::messages::irq::{
    IrqSetHeader, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
};
use vfud_protocol::messages::{IrqInfo, RegionAccess, Request};
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

/// One malformed message and what decoding it must fail with.
struct Row {
    name: &'static str,
    limits: Limits,
    bytes: Vec<u8>,
    /// Number of real eventfds attached to the first byte.
    eventfds: usize,
    expect: fn(&ProtocolError) -> bool,
    errno: Errno,
}

/// Every family's rows, in one table for one runner.
fn rows() -> Vec<Row> {
    [
        framing::rows(),
        session::rows(),
        region_dma::rows(),
        irq_migration::rows(),
    ]
    .into_iter()
    .flatten()
    .collect()
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
