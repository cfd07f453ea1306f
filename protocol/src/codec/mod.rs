//! Message framing over a UNIX stream socket, with `SCM_RIGHTS` file descriptors.
//!
//! This is the only code that touches the socket. A message is the 16-byte header followed by
//! `msg_size - 16` payload bytes; fds ride on the message's first bytes (spec "Protocol
//! Specification"). [`FrameReader`] assembles frames incrementally, so the same code serves a
//! blocking client and a non-blocking event loop. It never allocates from a length it has not
//! checked against [`Limits::max_msg_size`]. Received fds are `CLOEXEC` and owned, so any
//! surplus is closed when dropped.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use smallvec::SmallVec;
use zerocopy::IntoBytes;

use crate::error::ProtocolError;
use crate::header::Header;
use crate::messages::version::{Negotiated, DEFAULT_MAX_DATA_XFER_SIZE, MAX_MAX_DATA_XFER_SIZE};

mod reader;

pub use reader::{recv_some, FrameReader, ReadOutcome};

/// Most fds the kernel passes in one message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;
/// Room for headers around a maximal data transfer (largest fixed part is 24 bytes + header).
pub const MSG_OVERHEAD: usize = 64;
/// Largest command [`FrameReader::read_message`] skips rather than failing the stream on: no
/// negotiation can allow more than QEMU's 64 MiB transfer plus headers, so a larger `msg_size`
/// means the stream is garbage, not that one request was too big.
pub const MAX_SKIPPABLE_MSG_SIZE: u64 = MAX_MAX_DATA_XFER_SIZE + MSG_OVERHEAD as u64;

/// Limits of one side of a connection: what it accepts in incoming messages and how large a
/// data transfer it initiates.
///
/// Build them with [`Limits::from_negotiated`] (the server's side) or [`Limits::client`] after
/// VERSION; the two sides differ because each side's `max_data_xfer_size` is what *it* can
/// receive (see [`Negotiated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most fds accepted in one incoming message.
    pub max_msg_fds: usize,
    /// Largest data transfer this side puts in one message it initiates (the server's
    /// DMA_READ/DMA_WRITE `count`, the client's REGION_READ/WRITE `count`): the peer's limit.
    pub max_data_xfer_size: u64,
    /// Largest data transfer accepted in an incoming request (REGION_READ/WRITE `count`,
    /// MIG_DATA sizes at a server; DMA_READ/WRITE `count` at a client): this side's own limit.
    pub max_recv_xfer_size: u64,
    /// Largest whole incoming message, header included.
    pub max_msg_size: usize,
}

impl Default for Limits {
    /// Limits before negotiation: the spec defaults, except that up to 16 fds are tolerated.
    fn default() -> Self {
        Self::with_xfer(16, DEFAULT_MAX_DATA_XFER_SIZE)
    }
}

impl Limits {
    /// Limits for a given fd count and one transfer size used in both directions.
    pub fn with_xfer(max_msg_fds: usize, max_data_xfer_size: u64) -> Self {
        Self::directional(max_msg_fds, max_data_xfer_size, max_data_xfer_size)
    }

    /// Limits accepting transfers of `recv_xfer` and sending transfers of `send_xfer`; incoming
    /// messages may be as large as the larger of the two plus headers (a reply to our own
    /// transfer carries up to `send_xfer` bytes).
    pub fn directional(max_msg_fds: usize, recv_xfer: u64, send_xfer: u64) -> Self {
        Self {
            max_msg_fds,
            max_data_xfer_size: send_xfer,
            max_recv_xfer_size: recv_xfer,
            max_msg_size: usize::try_from(recv_xfer.max(send_xfer))
                .unwrap_or(usize::MAX / 2)
                .saturating_add(MSG_OVERHEAD)
                .max(8192),
        }
    }

    /// The server's limits after VERSION negotiation: it accepts what its reply stated, and
    /// sends DMA transfers no larger than either side's limit — the client's by the spec, and
    /// the server's own too because QEMU checks incoming DMA requests against the value the
    /// server replied with (`proxy.c`, `max_xfer_size`).
    pub fn from_negotiated(n: &Negotiated) -> Self {
        Self::directional(
            n.max_msg_fds as usize,
            n.max_data_xfer_size,
            n.max_data_xfer_size.min(n.client_max_data_xfer_size),
        )
    }

    /// The client's limits after VERSION negotiation: it accepts what it proposed and sends
    /// transfers up to the server's stated limit.
    pub fn client(n: &Negotiated) -> Self {
        Self::directional(
            n.client_max_msg_fds as usize,
            n.client_max_data_xfer_size,
            n.max_data_xfer_size,
        )
    }

    /// Fail when an incoming transfer exceeds this side's `max_data_xfer_size`
    /// ([`Limits::max_recv_xfer_size`]).
    pub fn check_xfer(&self, size: u64) -> Result<(), ProtocolError> {
        if size > self.max_recv_xfer_size {
            Err(ProtocolError::TransferTooLarge {
                size,
                max: self.max_recv_xfer_size,
            })
        } else {
            Ok(())
        }
    }
}

/// One whole message as received.
#[derive(Debug)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// `msg_size - 16` bytes.
    pub payload: Vec<u8>,
    /// File descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// How long one message may take to send. A peer that does not read for this long is
/// treated as gone ([`ProtocolError::Timeout`]), so a client that stops reading cannot hold a
/// server's loop (or its memory) for longer than this, however slowly it drains the socket.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Wait until `sock` is writable (used when a non-blocking socket's buffer is full), at
/// most until `deadline`.
fn wait_writable(sock: BorrowedFd<'_>, deadline: std::time::Instant) -> Result<(), ProtocolError> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    let mut p = [PollFd::new(sock, PollFlags::POLLOUT)];
    match poll(&mut p, PollTimeout::from(ms)) {
        Ok(0) => Err(ProtocolError::Timeout),
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Send one message: `header` (its `msg_size` must already be right), payload parts, and fds
/// attached to the first bytes. Handles short writes and `EAGAIN`.
pub fn send_message(
    sock: BorrowedFd<'_>,
    header: &Header,
    parts: &[&[u8]],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    // On the stack for the usual header + one or two parts: no allocation per message.
    let mut chunks: SmallVec<[&[u8]; 4]> = SmallVec::new();
    chunks.push(header.as_bytes());
    chunks.extend(parts.iter().copied().filter(|p| !p.is_empty()));
    debug_assert_eq!(
        chunks.iter().map(|c| c.len()).sum::<usize>(),
        header.msg_size as usize
    );
    send_chunks(sock, &chunks, fds)
}

/// Send `chunks` back to back as one byte stream with `fds` on the first byte.
/// Used directly only to send deliberately malformed bytes in tests.
pub fn send_chunks(
    sock: BorrowedFd<'_>,
    chunks: &[&[u8]],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    let raw: SmallVec<[RawFd; 4]> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut sent = 0usize;
    let mut first = true;
    let deadline = std::time::Instant::now() + SEND_TIMEOUT;
    while sent < total {
        // Build iovecs for what is left.
        let mut skip = sent;
        let mut iov: SmallVec<[IoSlice<'_>; 4]> = SmallVec::new();
        for c in chunks {
            if skip >= c.len() {
                skip -= c.len();
                continue;
            }
            iov.push(IoSlice::new(&c[skip..]));
            skip = 0;
        }
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if first && !raw.is_empty() { &cmsg } else { &[] };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                sent += n;
                first = false;
            }
            Err(Errno::EAGAIN) => wait_writable(sock, deadline)?,
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(ProtocolError::Disconnected),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Send a reply to `req` carrying `payload`.
pub fn send_reply(
    sock: BorrowedFd<'_>,
    req: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    send_message(sock, &req.reply(payload.len()), &[payload], fds)
}

/// Send the header-only error reply to `req`.
pub fn send_error(sock: BorrowedFd<'_>, req: &Header, errno: Errno) -> Result<(), ProtocolError> {
    send_message(sock, &req.error_reply(errno as i32), &[], &[])
}

/// Convenience for callers holding any `AsFd`.
pub fn borrow<T: AsFd>(t: &T) -> BorrowedFd<'_> {
    t.as_fd()
}
