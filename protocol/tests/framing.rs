//! Framing over real `AF_UNIX` socketpairs: `send_message`/`send_chunks` with `SCM_RIGHTS`
//! fds, and `FrameReader` reassembling frames from split writes, back-to-back frames and
//! non-blocking sockets.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::thread;
use std::time::Duration;

use common::{
    eventfd_nb, eventfd_signal, eventfd_take, memfd_with, pair, pread_vec, recv_frame,
    recv_frame_with, same_file,
};
use nix::errno::Errno;
use vfud_protocol::codec::{
    send_chunks, send_error, send_message, send_reply, FrameReader, Limits,
};
use vfud_protocol::header::{Command, Header, MessageKind};
use vfud_protocol::ProtocolError;
use zerocopy::IntoBytes;

fn command(cmd: Command, payload_len: usize) -> Header {
    Header::command(42, cmd, payload_len, false)
}

fn frame_bytes(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut v = h.as_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

#[test]
fn send_message_delivers_header_payload_and_usable_fds() {
    let (tx, rx) = pair();
    let ev = eventfd_nb();
    let mem = memfd_with(b"shared", 0);
    let part1 = [1u8, 2, 3];
    let part2 = [4u8; 29];
    let h = command(Command::DeviceSetIrqs, part1.len() + part2.len());

    send_message(
        tx.as_fd(),
        &h,
        &[&part1, &[], &part2],
        &[ev.as_fd(), mem.as_fd()],
    )
    .expect("send");
    let f = recv_frame(&rx, &Limits::default()).expect("frame");

    assert_eq!(f.header, h);
    assert_eq!(f.payload, [&part1[..], &part2[..]].concat());
    assert_eq!(f.fds.len(), 2);
    // The fds are live duplicates of what was sent, in order.
    assert!(same_file(f.fds[0].as_fd(), ev.as_fd()));
    eventfd_signal(f.fds[0].as_fd());
    assert_eq!(eventfd_take(ev.as_fd()), Some(1));
    assert!(same_file(f.fds[1].as_fd(), mem.as_fd()));
    assert_eq!(pread_vec(f.fds[1].as_fd(), 0, 6), b"shared");
}

#[test]
fn received_fds_are_close_on_exec() {
    let (tx, rx) = pair();
    let ev = eventfd_nb();
    let h = command(Command::DmaMap, 0);
    send_message(tx.as_fd(), &h, &[], &[ev.as_fd()]).expect("send");

    let f = recv_frame(&rx, &Limits::default()).expect("frame");

    let flags = nix::fcntl::fcntl(f.fds[0].as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("getfd");
    assert_ne!(flags & nix::libc::FD_CLOEXEC, 0);
}

#[test]
fn sixteen_fds_arrive_in_order() {
    let (tx, rx) = pair();
    let evs: Vec<OwnedFd> = (0..16).map(|_| eventfd_nb()).collect();
    let b: Vec<BorrowedFd<'_>> = evs.iter().map(|e| e.as_fd()).collect();
    send_message(tx.as_fd(), &command(Command::DeviceSetIrqs, 0), &[], &b).expect("send");

    let f = recv_frame(&rx, &Limits::default()).expect("frame");

    assert_eq!(f.fds.len(), 16);
    for (got, sent) in f.fds.iter().zip(&evs) {
        assert!(same_file(got.as_fd(), sent.as_fd()));
    }
}

#[test]
fn a_frame_split_into_single_bytes_is_reassembled_with_its_fds() {
    let (tx, rx) = pair();
    let ev = eventfd_nb();
    let payload: Vec<u8> = (0..100u8).collect();
    let h = command(Command::RegionWrite, payload.len());
    let bytes = frame_bytes(&h, &payload);
    let ev_for_writer = ev.try_clone().expect("dup");

    let writer = thread::spawn(move || {
        for (i, byte) in bytes.iter().enumerate() {
            let fds = if i == 0 {
                vec![ev_for_writer.as_fd()]
            } else {
                vec![]
            };
            send_chunks(tx.as_fd(), &[std::slice::from_ref(byte)], &fds).expect("send byte");
            if i % 8 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
        }
        tx
    });
    let f = recv_frame(&rx, &Limits::default()).expect("frame");
    let _tx = writer.join().expect("writer");

    assert_eq!(f.header, h);
    assert_eq!(f.payload, payload);
    assert_eq!(f.fds.len(), 1);
    assert!(same_file(f.fds[0].as_fd(), ev.as_fd()));
}

#[test]
fn a_frame_split_at_odd_offsets_is_reassembled() {
    let (tx, rx) = pair();
    let payload = vec![0xabu8; 1000];
    let h = command(Command::MigDataWrite, payload.len());
    let bytes = frame_bytes(&h, &payload);

    let writer = thread::spawn(move || {
        // Boundaries inside the header, at its end, and inside the payload.
        let cuts = [0usize, 3, 11, 16, 17, 500, 999, bytes.len()];
        for w in cuts.windows(2) {
            send_chunks(tx.as_fd(), &[&bytes[w[0]..w[1]]], &[]).expect("send");
            thread::sleep(Duration::from_millis(2));
        }
        tx
    });
    let f = recv_frame(&rx, &Limits::default()).expect("frame");
    let _tx = writer.join().expect("writer");

    assert_eq!(f.header, h);
    assert_eq!(f.payload, payload);
    assert!(f.fds.is_empty());
}

#[test]
fn two_frames_in_one_write_are_returned_one_at_a_time() {
    let (tx, rx) = pair();
    let h1 = command(Command::RegionRead, 16);
    let h2 = Header::command(43, Command::DeviceReset, 0, true);
    let h3 = command(Command::MigDataWrite, 3);
    let stream = [
        frame_bytes(&h1, &[1; 16]),
        frame_bytes(&h2, &[]),
        frame_bytes(&h3, &[7, 8, 9]),
    ]
    .concat();
    send_chunks(tx.as_fd(), &[&stream], &[]).expect("send");
    rx.set_nonblocking(true).expect("nonblocking");
    let mut reader = FrameReader::new();
    let l = Limits::default();

    let f1 = reader.read_frame(rx.as_fd(), &l).expect("read 1");
    let f2 = reader.read_frame(rx.as_fd(), &l).expect("read 2");
    let f3 = reader.read_frame(rx.as_fd(), &l).expect("read 3");
    let none = reader.read_frame(rx.as_fd(), &l).expect("read 4");

    let (f1, f2, f3) = (
        f1.expect("frame 1"),
        f2.expect("frame 2"),
        f3.expect("frame 3"),
    );
    assert_eq!((f1.header, f1.payload), (h1, vec![1; 16]));
    assert_eq!((f2.header, f2.payload.len()), (h2, 0));
    assert_eq!(
        f2.header.kind().expect("kind"),
        MessageKind::Command { no_reply: true }
    );
    assert_eq!((f3.header, f3.payload), (h3, vec![7, 8, 9]));
    assert!(none.is_none(), "nothing more is buffered");
    assert!(!reader.in_progress());
}

#[test]
fn fds_stay_with_the_frame_they_were_sent_with() {
    let (tx, rx) = pair();
    let ev = eventfd_nb();
    send_message(
        tx.as_fd(),
        &command(Command::RegionRead, 4),
        &[&[0; 4]],
        &[],
    )
    .expect("send 1");
    send_message(
        tx.as_fd(),
        &command(Command::DeviceSetIrqs, 4),
        &[&[0; 4]],
        &[ev.as_fd()],
    )
    .expect("send 2");
    send_message(
        tx.as_fd(),
        &command(Command::RegionRead, 4),
        &[&[0; 4]],
        &[],
    )
    .expect("send 3");
    let mut reader = FrameReader::new();
    let l = Limits::default();

    let a = recv_frame_with(&mut reader, &rx, &l).expect("a");
    let b = recv_frame_with(&mut reader, &rx, &l).expect("b");
    let c = recv_frame_with(&mut reader, &rx, &l).expect("c");

    assert!(a.fds.is_empty());
    assert_eq!(b.fds.len(), 1);
    assert!(same_file(b.fds[0].as_fd(), ev.as_fd()));
    assert!(c.fds.is_empty());
}

#[test]
fn nonblocking_partial_frame_returns_none_and_later_completes() {
    let (tx, rx) = pair();
    rx.set_nonblocking(true).expect("nonblocking");
    let ev = eventfd_nb();
    let payload = vec![5u8; 40];
    let h = command(Command::RegionWrite, payload.len());
    let bytes = frame_bytes(&h, &payload);
    let mut reader = FrameReader::new();
    let l = Limits::default();

    assert!(reader.read_frame(rx.as_fd(), &l).expect("empty").is_none());
    assert!(!reader.in_progress());

    send_chunks(tx.as_fd(), &[&bytes[..10]], &[ev.as_fd()]).expect("part 1");
    assert!(reader.read_frame(rx.as_fd(), &l).expect("part 1").is_none());
    assert!(reader.in_progress(), "10 header bytes buffered");

    send_chunks(tx.as_fd(), &[&bytes[10..30]], &[]).expect("part 2");
    assert!(reader.read_frame(rx.as_fd(), &l).expect("part 2").is_none());
    assert!(
        reader.in_progress(),
        "header and part of the payload buffered"
    );

    send_chunks(tx.as_fd(), &[&bytes[30..]], &[]).expect("part 3");
    let f = reader
        .read_frame(rx.as_fd(), &l)
        .expect("part 3")
        .expect("whole frame");

    assert_eq!(f.header, h);
    assert_eq!(f.payload, payload);
    assert_eq!(f.fds.len(), 1, "fds from the first part are kept");
    assert!(!reader.in_progress());
    assert!(reader.read_frame(rx.as_fd(), &l).expect("after").is_none());
}

#[test]
fn header_only_frame_has_an_empty_payload() {
    let (tx, rx) = pair();
    let h = command(Command::DeviceReset, 0);
    send_message(tx.as_fd(), &h, &[], &[]).expect("send");

    let f = recv_frame(&rx, &Limits::default()).expect("frame");

    assert_eq!(f.header.msg_size, 16);
    assert!(f.payload.is_empty());
    assert!(f.fds.is_empty());
}

#[test]
fn a_frame_of_exactly_max_msg_size_is_accepted() {
    let (tx, rx) = pair();
    let l = Limits::with_xfer(2, 4096);
    let payload = vec![9u8; l.max_msg_size - 16];
    let h = command(Command::MigDataWrite, payload.len());
    send_message(tx.as_fd(), &h, &[&payload], &[]).expect("send");

    let f = recv_frame(&rx, &l).expect("frame");

    assert_eq!(f.header.msg_size as usize, l.max_msg_size);
    assert_eq!(f.payload.len(), payload.len());
}

#[test]
fn a_maximal_transfer_from_a_nonblocking_sender_arrives_whole() {
    // 1 MiB + header is larger than the socket buffer: send_chunks must handle short writes
    // and EAGAIN (by polling) while the reader drains the other end.
    let (tx, rx) = pair();
    tx.set_nonblocking(true).expect("nonblocking");
    let l = Limits::default();
    let payload: Vec<u8> = (0..(1usize << 20)).map(|i| (i % 251) as u8).collect();
    let h = command(Command::MigDataWrite, payload.len());
    let expected = payload.clone();

    let writer = thread::spawn(move || {
        send_message(tx.as_fd(), &h, &[&payload], &[]).expect("send 1 MiB");
        tx
    });
    let f = recv_frame(&rx, &l).expect("frame");
    let _tx = writer.join().expect("writer");

    assert_eq!(f.header, h);
    assert!(f.payload == expected, "payload differs");
}

#[test]
fn send_reply_and_send_error_answer_the_request_header() {
    let (server, client) = pair();
    let req = Header::command(777, Command::DeviceGetInfo, 16, false);

    send_reply(server.as_fd(), &req, &[1, 2, 3, 4], &[]).expect("reply");
    send_error(server.as_fd(), &req, Errno::EINVAL).expect("error");
    let mut reader = FrameReader::new();
    let ok = recv_frame_with(&mut reader, &client, &Limits::default()).expect("reply frame");
    let err = recv_frame_with(&mut reader, &client, &Limits::default()).expect("error frame");

    assert_eq!(ok.header.msg_id, 777);
    assert_eq!(ok.header.cmd, Command::DeviceGetInfo as u16);
    assert_eq!(ok.header.kind().expect("kind"), MessageKind::Reply);
    assert_eq!(ok.payload, [1, 2, 3, 4]);
    assert_eq!(err.header.msg_id, 777);
    assert_eq!(err.header.msg_size, 16);
    assert_eq!(err.header.flags, 0x21, "REPLY|ERROR");
    assert_eq!(
        err.header.kind().expect("kind"),
        MessageKind::ErrorReply(Errno::EINVAL as u32)
    );
    assert!(err.payload.is_empty());
}

#[test]
fn peer_closing_before_any_byte_is_disconnected() {
    let (tx, rx) = pair();
    drop(tx);

    let res = recv_frame(&rx, &Limits::default());

    assert!(matches!(res, Err(ProtocolError::Disconnected)));
}

#[test]
fn sending_to_a_closed_peer_is_disconnected_not_sigpipe() {
    let (tx, rx) = pair();
    drop(rx);

    let res = send_message(tx.as_fd(), &command(Command::DeviceReset, 0), &[], &[]);

    assert!(matches!(res, Err(ProtocolError::Disconnected)), "{res:?}");
}

#[test]
fn frames_written_with_std_io_are_read_the_same() {
    // FrameReader does not depend on how the peer wrote its bytes.
    let (mut tx, rx) = pair();
    let h = command(Command::RegionRead, 16);
    tx.write_all(&frame_bytes(&h, &[3; 16])).expect("write");

    let f = recv_frame(&rx, &Limits::default()).expect("frame");

    assert_eq!(f.header, h);
    assert_eq!(f.payload, [3; 16]);
}

#[test]
fn fds_of_several_buffered_frames_each_stay_with_their_frame() {
    let (tx, rx) = pair();
    let evs: Vec<OwnedFd> = (0..3).map(|_| eventfd_nb()).collect();
    // Frames 0, 2 and 5 carry one fd each; all are sent before anything is read.
    let with_fd = [Some(0usize), None, Some(1), None, None, Some(2), None];
    for (i, fd) in with_fd.iter().enumerate() {
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|k| evs[*k].as_fd()).collect();
        send_message(
            tx.as_fd(),
            &command(Command::RegionRead, i),
            &[&vec![i as u8; i]],
            &fds,
        )
        .expect("send");
    }
    let mut reader = FrameReader::new();
    let l = Limits::default();
    for (i, fd) in with_fd.iter().enumerate() {
        let f = recv_frame_with(&mut reader, &rx, &l).expect("frame");
        assert_eq!(f.payload, vec![i as u8; i], "frame {i} payload");
        match fd {
            Some(k) => {
                assert_eq!(f.fds.len(), 1, "frame {i}");
                assert!(same_file(f.fds[0].as_fd(), evs[*k].as_fd()), "frame {i}");
            }
            None => assert!(f.fds.is_empty(), "frame {i} has no fds"),
        }
    }
    assert!(!reader.in_progress());
}
