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
