//! Shared helpers for the protocol crate's integration tests: socketpairs, real eventfds, memfds
//! and pipes, and a send → `FrameReader` → `Request::decode` round trip over a real socket.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vfud_protocol::codec::{send_message, Frame, FrameReader, Limits};
use vfud_protocol::header::{Command, Header, MessageKind, HEADER_SIZE};
use vfud_protocol::messages::irq::IRQ_INDEX_MSIX;
use vfud_protocol::messages::{IrqAction, IrqData, Request, SetIrqs};
use vfud_protocol::ProtocolError;

/// How long a test waits for bytes that should already be in the socket.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected `AF_UNIX SOCK_STREAM` pair with a receive timeout on both ends, so a missing
/// frame fails the test instead of hanging it.
pub fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
    b.set_read_timeout(Some(RECV_TIMEOUT)).expect("timeout");
    (a, b)
}

/// A non-blocking eventfd with counter 0.
pub fn eventfd_nb() -> OwnedFd {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .expect("eventfd")
        .into()
}

/// Add 1 to the counter of `fd` (an eventfd), as a device raising an interrupt does.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let n = nix::unistd::write(fd, &1u64.to_ne_bytes()).expect("eventfd write");
    assert_eq!(n, 8);
}

/// Read and reset the counter of a non-blocking eventfd; `None` when it is 0.
pub fn eventfd_take(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut b = [0u8; 8];
    match nix::unistd::read(fd, &mut b) {
        Ok(8) => Some(u64::from_ne_bytes(b)),
        Ok(n) => panic!("short eventfd read of {n} bytes"),
        Err(nix::errno::Errno::EAGAIN) => None,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// A memfd holding `contents` at `offset`.
pub fn memfd_with(contents: &[u8], offset: i64) -> OwnedFd {
    let fd = memfd_create("vfud-test", MFdFlags::MFD_CLOEXEC).expect("memfd_create");
    let n = nix::sys::uio::pwrite(&fd, contents, offset).expect("pwrite");
    assert_eq!(n, contents.len());
    fd
}

/// `len` bytes of `fd` at `offset`.
pub fn pread_vec(fd: BorrowedFd<'_>, offset: i64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let n = nix::sys::uio::pread(fd, &mut b, offset).expect("pread");
    b.truncate(n);
    b
}

/// Whether two descriptors name the same open file (same device and inode).
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let sa = nix::sys::stat::fstat(a).expect("fstat");
    let sb = nix::sys::stat::fstat(b).expect("fstat");
    sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino
}

/// A non-blocking pipe: `(read end, write end)`.
pub fn pipe_nb() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe2")
}

/// Whether every write end of the pipe whose read end is `r` has been closed (read gives EOF
/// rather than `EAGAIN`). This is how tests prove that received fds were closed, without the
/// races of counting `/proc/self/fd` while other tests run in parallel threads.
pub fn pipe_writers_closed(r: BorrowedFd<'_>) -> bool {
    let mut b = [0u8; 1];
    match nix::unistd::read(r, &mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data in test pipe"),
        Err(nix::errno::Errno::EAGAIN) => false,
        Err(e) => panic!("pipe read: {e}"),
    }
}

/// Read one whole frame from a blocking socket, failing after [`RECV_TIMEOUT`].
pub fn recv_frame(sock: &UnixStream, limits: &Limits) -> Result<Frame, ProtocolError> {
    let mut reader = FrameReader::new();
    recv_frame_with(&mut reader, sock, limits)
}

/// Like [`recv_frame`], with a caller-owned reader (for several frames on one stream).
pub fn recv_frame_with(
    reader: &mut FrameReader,
    sock: &UnixStream,
    limits: &Limits,
) -> Result<Frame, ProtocolError> {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        if let Some(f) = reader.read_frame(sock.as_fd(), limits)? {
            return Ok(f);
        }
        assert!(
            Instant::now() < deadline,
            "no whole frame within {RECV_TIMEOUT:?}"
        );
    }
}

/// Send `req` as a command (encoded with [`Request::encode`], fds attached).
pub fn send_request(sock: &UnixStream, msg_id: u16, req: &Request, no_reply: bool) -> Header {
    let (payload, fds) = req.encode();
    let h = Header::command(msg_id, req.command(), payload.len(), no_reply);
    send_message(sock.as_fd(), &h, &[&payload], &fds).expect("send_message");
    h
}

/// Send `req` over a real socketpair, receive it with [`FrameReader`], check the header, and
/// decode it with [`Request::decode`] under `limits`.
pub fn roundtrip_with(req: &Request, limits: &Limits) -> Result<Request, ProtocolError> {
    let (client, server) = pair();
    let sent = send_request(&client, 0x1234, req, false);
    let frame = recv_frame(&server, limits)?;
    assert_eq!(frame.header, sent, "header must arrive unchanged");
    assert_eq!(frame.header.cmd, req.command() as u16);
    assert_eq!(
        frame.header.msg_size as usize,
        HEADER_SIZE + frame.payload.len()
    );
    assert_eq!(
        frame.header.kind().expect("kind"),
        MessageKind::Command { no_reply: false }
    );
    Request::decode(frame.header.cmd, &frame.payload, frame.fds, limits)
}

/// [`roundtrip_with`] under the default (pre-negotiation) limits, expecting success.
pub fn roundtrip(req: &Request) -> Request {
    roundtrip_with(req, &Limits::default()).expect("round trip decodes")
}

/// Encode `req` and decode the bytes directly (no socket, no fds).
pub fn decode_direct(req: &Request) -> Result<Request, ProtocolError> {
    let (payload, fds) = req.encode();
    assert!(fds.is_empty(), "decode_direct is for fd-less requests");
    Request::decode(
        req.command() as u16,
        &payload,
        Vec::new(),
        &Limits::default(),
    )
}

/// A SET_IRQS request on the MSI-X index.
pub fn set_irqs(action: IrqAction, start: u32, count: u32, data: IrqData) -> Request {
    Request::SetIrqs(SetIrqs {
        index: IRQ_INDEX_MSIX,
        start,
        count,
        action,
        data,
    })
}

/// Decode `payload` as command `cmd` with no fds and default limits.
pub fn decode(cmd: Command, payload: &[u8]) -> Result<Request, ProtocolError> {
    Request::decode(cmd as u16, payload, Vec::new(), &Limits::default())
}

/// Whether `res` is an `InvalidField` error naming `want`.
pub fn is_invalid(res: &Result<Request, ProtocolError>, want: &str) -> bool {
    matches!(res, Err(ProtocolError::InvalidField { field, .. }) if *field == want)
}
