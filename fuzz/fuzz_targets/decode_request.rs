//! Fuzz target for vfud's request decoding: the input's first two bytes are a command number
//! and the rest its payload, fed straight into `Request::decode`; the whole input is also
//! written to a socketpair and read back with `FrameReader`, each frame decoded in turn.
//! Neither path may panic, and whatever decodes must re-encode into something that decodes.

#![no_main]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vfud_protocol::codec::{send_chunks, FrameReader, Limits};
use vfud_protocol::messages::Request;

fn check(cmd: u16, payload: &[u8], limits: &Limits) {
    if let Ok(req) = Request::decode(cmd, payload, Vec::new(), limits) {
        assert_eq!(req.command() as u16, cmd);
        let (bytes, fds) = req.encode();
        assert!(fds.is_empty());
        assert!(
            Request::decode(cmd, &bytes, Vec::new(), limits).is_ok(),
            "re-encoded {req:?} does not decode"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::with_xfer(4, 4096);

    // Path 1: direct decode, cmd from the first two bytes.
    if let [a, b, payload @ ..] = data {
        check(u16::from_le_bytes([*a, *b]), payload, &limits);
    }

    // Path 2: the raw bytes as a stream from a peer that then hangs up.
    let Ok((tx, rx)) = UnixStream::pair() else {
        return;
    };
    if send_chunks(tx.as_fd(), &[data], &[]).is_err() {
        return;
    }
    drop(tx);
    let mut reader = FrameReader::new();
    let mut consumed = 0usize;
    while let Ok(Some(frame)) = reader.read_frame(rx.as_fd(), &limits) {
        consumed += frame.header.msg_size as usize;
        assert!(
            consumed <= data.len(),
            "reader returned bytes that were never sent"
        );
        assert_eq!(frame.payload.len() + 16, frame.header.msg_size as usize);
        check(frame.header.cmd, &frame.payload, &limits);
    }
});
