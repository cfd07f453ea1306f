//! Oversize commands at the framing layer: [`FrameReader::read_message`] discards a command that
//! is larger than the limits but otherwise sane — in bounded steps, closing its fds — and
//! reports it as [`ReadOutcome::Oversize`] so the server can answer `E2BIG` and keep serving;
//! the stream stays in step for the next frame. Insane headers still fail the stream, and
//! [`FrameReader::read_frame`] keeps failing on any oversize frame.

mod common;

use std::os::fd::{AsFd, BorrowedFd};
use std::thread;
use std::time::Instant;

use common::{pair, pipe_nb, pipe_writers_closed, RECV_TIMEOUT};
use vfud_protocol::codec::{send_chunks, FrameReader, Limits, ReadOutcome, MAX_SKIPPABLE_MSG_SIZE};
use vfud_protocol::header::{Command, Header, FLAG_TYPE_REPLY};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

/// 8 KiB messages: the smallest limit vfud uses.
fn small() -> Limits {
    Limits::with_xfer(4, 1024)
}

/// A REGION_WRITE of `count` data bytes.
fn region_write(msg_id: u16, count: usize) -> Vec<u8> {
    let h = Header::command(msg_id, Command::RegionWrite, 16 + count, false);
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&(count as u32).to_le_bytes());
    v.extend((0..count).map(|i| i as u8));
    v
}

fn next(
    r: &mut FrameReader,
    sock: BorrowedFd<'_>,
    limits: &Limits,
) -> Result<ReadOutcome, ProtocolError> {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        if let Some(o) = r.read_message(sock, limits)? {
            return Ok(o);
        }
        assert!(Instant::now() < deadline, "nothing within {RECV_TIMEOUT:?}");
    }
}

#[test]
fn an_oversize_command_is_reported_and_the_next_frame_follows() {
    let (tx, rx) = pair();
    let big = region_write(7, 16 << 10);
    let after = region_write(8, 4);
    send_chunks(tx.as_fd(), &[&big, &after], &[]).unwrap();
    let mut r = FrameReader::new();
    match next(&mut r, rx.as_fd(), &small()).unwrap() {
        ReadOutcome::Oversize(h) => {
            assert_eq!((h.msg_id, h.cmd), (7, Command::RegionWrite as u16));
            assert_eq!(h.msg_size as usize, big.len());
        }
        other => panic!("{other:?}"),
    }
    match next(&mut r, rx.as_fd(), &small()).unwrap() {
        ReadOutcome::Frame(f) => {
            assert_eq!(f.header.msg_id, 8);
            assert_eq!(f.payload, after[16..]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!r.in_progress());
}

#[test]
fn an_oversize_command_arriving_in_pieces_is_skipped_across_reads() {
    let (tx, rx) = pair();
    rx.set_nonblocking(true).unwrap();
    let big = region_write(1, 300 << 10);
    let after = region_write(2, 8);
    let writer = thread::spawn(move || {
        for piece in big.chunks(7001) {
            send_chunks(tx.as_fd(), &[piece], &[]).unwrap();
            thread::yield_now();
        }
        send_chunks(tx.as_fd(), &[&after], &[]).unwrap();
        tx
    });
    let mut r = FrameReader::new();
    let deadline = Instant::now() + RECV_TIMEOUT;
    let first = loop {
        match r.read_message(rx.as_fd(), &small()).unwrap() {
            Some(o) => break o,
            None => {
                assert!(Instant::now() < deadline);
                thread::yield_now();
            }
        }
    };
    assert!(
        matches!(first, ReadOutcome::Oversize(h) if h.msg_id == 1),
        "{first:?}"
    );
    let _tx = writer.join().unwrap();
    let second = loop {
        if let Some(o) = r.read_message(rx.as_fd(), &small()).unwrap() {
            break o;
        }
        assert!(Instant::now() < deadline);
    };
    assert!(
        matches!(second, ReadOutcome::Frame(ref f) if f.header.msg_id == 2),
        "{second:?}"
    );
}

#[test]
fn fds_sent_with_an_oversize_command_are_closed_and_not_given_to_the_next() {
    let (tx, rx) = pair();
    let (pr, pw) = pipe_nb();
    let (qr, qw) = pipe_nb();
    let big = region_write(1, 20 << 10);
    let after = region_write(2, 4);
    send_chunks(tx.as_fd(), &[&big], &[pw.as_fd()]).unwrap();
    send_chunks(tx.as_fd(), &[&after], &[qw.as_fd()]).unwrap();
    drop((pw, qw));
    let mut r = FrameReader::new();
    assert!(matches!(
        next(&mut r, rx.as_fd(), &small()).unwrap(),
        ReadOutcome::Oversize(_)
    ));
    assert!(
        pipe_writers_closed(pr.as_fd()),
        "the oversize command's fd was kept"
    );
    match next(&mut r, rx.as_fd(), &small()).unwrap() {
        ReadOutcome::Frame(f) => {
            assert_eq!(f.fds.len(), 1, "the next frame gets only its own fd");
            assert!(!pipe_writers_closed(qr.as_fd()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn insane_oversize_headers_still_fail_the_stream() {
    let mut reply = Header::command(1, Command::RegionWrite, 16 << 10, false);
    reply.flags = FLAG_TYPE_REPLY;
    let mut unknown = Header::command(1, Command::RegionWrite, 16 << 10, false);
    unknown.cmd = 14; // the obsolete DIRTY_PAGES
    let mut huge = Header::command(1, Command::RegionWrite, 0, false);
    huge.msg_size = u32::try_from(MAX_SKIPPABLE_MSG_SIZE + 1).unwrap();
    for (name, h) in [
        ("reply", reply),
        ("unknown command", unknown),
        ("huge", huge),
    ] {
        let (tx, rx) = pair();
        send_chunks(tx.as_fd(), &[h.as_bytes()], &[]).unwrap();
        let res = next(&mut FrameReader::new(), rx.as_fd(), &small());
        assert!(
            matches!(res, Err(ProtocolError::MsgTooLarge { size, .. }) if size == h.msg_size),
            "{name}: {res:?}"
        );
    }
}

#[test]
fn read_frame_keeps_failing_on_oversize_frames() {
    let (tx, rx) = pair();
    send_chunks(tx.as_fd(), &[&region_write(1, 16 << 10)], &[]).unwrap();
    let res = FrameReader::new().read_frame(rx.as_fd(), &small());
    assert!(
        matches!(res, Err(ProtocolError::MsgTooLarge { .. })),
        "{res:?}"
    );
}

#[test]
fn a_frame_within_the_limits_is_a_frame() {
    let (tx, rx) = pair();
    let ok = region_write(3, 1024);
    send_chunks(tx.as_fd(), &[&ok], &[]).unwrap();
    match next(&mut FrameReader::new(), rx.as_fd(), &small()).unwrap() {
        ReadOutcome::Frame(f) => assert_eq!(f.payload.len(), 16 + 1024),
        other => panic!("{other:?}"),
    }
}
