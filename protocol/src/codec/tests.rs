//! Unit tests of the frame reader and writer.

use std::os::fd::AsFd;

use zerocopy::IntoBytes;

use super::*;
use crate::codec::send_chunks;

#[test]
#[cfg_attr(miri, ignore = "sendmsg/recvmsg on a socketpair: Miri cannot run them")]
fn skipping_a_60_mib_command_never_grows_the_buffer() {
    let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let size = 60usize << 20;
    let writer = std::thread::spawn(move || {
        let h = Header::command(1, Command::RegionWrite, size - HEADER_SIZE, false);
        let zeros = vec![0u8; 1 << 20];
        send_chunks(tx.as_fd(), &[h.as_bytes()], &[]).unwrap();
        let mut left = size - HEADER_SIZE;
        while left > 0 {
            let n = left.min(zeros.len());
            send_chunks(tx.as_fd(), &[&zeros[..n]], &[]).unwrap();
            left -= n;
        }
    });
    let limits = Limits::with_xfer(1, 4096);
    let mut r = FrameReader::new();
    let outcome = loop {
        if let Some(o) = r.read_message(rx.as_fd(), &limits).unwrap() {
            break o;
        }
    };
    writer.join().unwrap();
    assert!(matches!(outcome, ReadOutcome::Oversize(h) if h.msg_size as usize == size));
    assert!(r.buf.len() <= READ_BUFFER, "buffer grew to {}", r.buf.len());
}

#[test]
#[cfg_attr(miri, ignore = "sendmsg/recvmsg on a socketpair: Miri cannot run them")]
fn a_recycled_payload_buffer_carries_the_next_frame() {
    let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let payload = vec![7u8; 64 * 1024];
    for id in 1..=2 {
        let h = Header::command(id, Command::RegionWrite, payload.len(), false);
        send_chunks(tx.as_fd(), &[h.as_bytes(), &payload], &[]).unwrap();
    }
    let limits = Limits::with_xfer(1, 1 << 20);
    let mut r = FrameReader::new();
    let first = r
        .read_frame(rx.as_fd(), &limits)
        .unwrap()
        .expect("first frame");
    let reused = first.payload.as_ptr();
    r.recycle(first.payload);
    let second = r
        .read_frame(rx.as_fd(), &limits)
        .unwrap()
        .expect("second frame");
    assert_eq!(second.header.msg_id, 2);
    assert_eq!(second.payload, payload);
    assert_eq!(
        second.payload.as_ptr(),
        reused,
        "no new allocation for the second frame"
    );
}

#[test]
#[cfg_attr(miri, ignore = "sendmsg/recvmsg on a socketpair: Miri cannot run them")]
fn large_payloads_received_directly_match_and_keep_their_fds() {
    let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let writer = std::thread::spawn(move || {
        let (r, w) = nix::unistd::pipe().unwrap();
        for id in 1..=3u16 {
            let payload: &[u8] = if id == 2 { &[1, 2, 3] } else { &big };
            let h = Header::command(id, Command::RegionWrite, payload.len(), false);
            let fds = if id == 3 { vec![r.as_fd()] } else { vec![] };
            // In pieces, so the reader sees each frame arrive in several reads.
            let head = payload.len().min(10);
            send_chunks(tx.as_fd(), &[h.as_bytes(), &payload[..head]], &fds).unwrap();
            for piece in payload[head..].chunks(50_000) {
                send_chunks(tx.as_fd(), &[piece], &[]).unwrap();
            }
        }
        drop(w);
        big
    });
    let limits = Limits::with_xfer(4, 1 << 20);
    let mut r = FrameReader::new().direct_payloads();
    let mut frames = Vec::new();
    while frames.len() < 3 {
        if let Some(f) = r.read_frame(rx.as_fd(), &limits).unwrap() {
            let done = f.payload.clone();
            frames.push(f);
            r.recycle(done);
        }
    }
    let big = writer.join().unwrap();
    assert_eq!(frames[0].payload, big);
    assert_eq!(frames[1].payload, [1, 2, 3]);
    assert_eq!(frames[2].payload, big);
    assert_eq!(
        frames.iter().map(|f| f.fds.len()).collect::<Vec<_>>(),
        [0, 0, 1]
    );
    assert!(!r.in_progress());
    assert_eq!(r.stream_offset(), 3 * 16 + 2 * 300_000 + 3);
}
