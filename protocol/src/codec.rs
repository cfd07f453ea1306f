//! Message framing over a UNIX stream socket, with `SCM_RIGHTS` file descriptors.
//!
//! This is the only code that touches the socket. A message is the 16-byte header followed by
//! `msg_size - 16` payload bytes; fds ride on the message's first bytes (spec "Protocol
//! Specification"). [`FrameReader`] assembles frames incrementally, so the same code serves a
//! blocking client and a non-blocking event loop. It never allocates from a length it has not
//! checked against [`Limits::max_msg_size`]. Received fds are `CLOEXEC` and owned, so any
//! surplus is closed when dropped.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::ProtocolError;
use crate::header::{Header, HEADER_SIZE};
use crate::messages::version::{Negotiated, DEFAULT_MAX_DATA_XFER_SIZE};

/// Most fds the kernel passes in one message (`SCM_MAX_FD`).
pub const SCM_MAX_FD: usize = 253;
/// Room for headers around a maximal data transfer (largest fixed part is 24 bytes + header).
pub const MSG_OVERHEAD: usize = 64;

/// Limits enforced on incoming messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most fds accepted in one message.
    pub max_msg_fds: usize,
    /// Largest data transfer (REGION_READ/WRITE count, MIG_DATA size, DMA count).
    pub max_data_xfer_size: u64,
    /// Largest whole message, header included.
    pub max_msg_size: usize,
}

impl Default for Limits {
    /// Limits before negotiation: the spec defaults, except that up to 16 fds are tolerated.
    fn default() -> Self {
        Self::with_xfer(16, DEFAULT_MAX_DATA_XFER_SIZE)
    }
}

impl Limits {
    /// Limits for a given fd count and transfer size.
    pub fn with_xfer(max_msg_fds: usize, max_data_xfer_size: u64) -> Self {
        Self {
            max_msg_fds,
            max_data_xfer_size,
            max_msg_size: usize::try_from(max_data_xfer_size)
                .unwrap_or(usize::MAX / 2)
                .saturating_add(MSG_OVERHEAD)
                .max(8192),
        }
    }

    /// Limits after VERSION negotiation.
    pub fn from_negotiated(n: &Negotiated) -> Self {
        Self::with_xfer(n.max_msg_fds as usize, n.max_data_xfer_size)
    }

    /// Fail when a transfer exceeds `max_data_xfer_size`.
    pub fn check_xfer(&self, size: u64) -> Result<(), ProtocolError> {
        if size > self.max_data_xfer_size {
            Err(ProtocolError::TransferTooLarge {
                size,
                max: self.max_data_xfer_size,
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

/// Incremental frame assembler: call [`FrameReader::read_frame`] whenever the socket is
/// readable (or in a loop on a blocking socket).
///
/// It reads whatever the socket has into a per-connection buffer — one `recvmsg` per wakeup
/// rather than per header and payload — and cuts whole frames out of it. File descriptors are
/// matched to frames by position: a Unix stream `recvmsg` stops right after the segment that
/// carried descriptors, and a sender attaches them to the first byte of a message sent with one
/// `sendmsg`, so they belong to the frame holding the last byte of the read that brought them.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    consumed: u64,
    /// Descriptors received, keyed by the stream offset of the last byte of their read.
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>)>,
    /// Ancillary-data buffer, allocated once per reader rather than per `recvmsg`.
    cmsg: Vec<u8>,
}

/// Smallest receive buffer.
const READ_BUFFER: usize = 64 * 1024;

/// Receive into `buf`, appending any fds to `fds`. `Ok(0)` means EOF.
fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    cmsg: &mut Vec<u8>,
) -> Result<usize, Errno> {
    if cmsg.capacity() == 0 {
        *cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    }
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this message;
                // nothing else owns it, so taking ownership here is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if truncated {
        return Err(Errno::EMSGSIZE);
    }
    Ok(n)
}

/// Receive at least one byte: `Ok(None)` when the socket would block; EOF is
/// [`ProtocolError::Disconnected`].
fn recv_some(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    cmsg: &mut Vec<u8>,
) -> Result<Option<usize>, ProtocolError> {
    loop {
        return match recv_with_fds(sock, buf, fds, cmsg) {
            Ok(0) => Err(ProtocolError::Disconnected),
            Ok(n) => Ok(Some(n)),
            Err(Errno::EAGAIN) => Ok(None),
            Err(Errno::EINTR) => continue,
            Err(Errno::EMSGSIZE) => Err(ProtocolError::FdsTruncated),
            Err(e) => Err(e.into()),
        };
    }
}

impl FrameReader {
    /// A fresh reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether bytes or descriptors of a frame not yet returned are held here.
    pub fn in_progress(&self) -> bool {
        self.end > self.start || !self.fds.is_empty()
    }

    /// Return the next whole frame, reading from the socket only when the buffer holds none.
    /// `Ok(None)` when the socket would block. A malformed header is an error after which
    /// the stream cannot be resynchronised: the caller should drop the connection.
    pub fn read_frame(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
    ) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let avail = self.end - self.start;
            let need = if avail >= HEADER_SIZE {
                let h = Header::read_from_bytes(&self.buf[self.start..self.start + HEADER_SIZE])
                    .map_err(|_| ProtocolError::MsgSizeTooSmall(0))?;
                h.payload_len()?;
                if h.msg_size as usize > limits.max_msg_size {
                    return Err(ProtocolError::MsgTooLarge {
                        size: h.msg_size,
                        max: limits.max_msg_size,
                    });
                }
                let total = h.msg_size as usize;
                if avail >= total {
                    return Ok(Some(self.take_frame(h, total)));
                }
                total
            } else {
                HEADER_SIZE
            };
            // Make room for at least the rest of this frame.
            if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < need {
                    self.buf.resize(need.max(READ_BUFFER), 0);
                }
            } else if self.buf.is_empty() {
                self.buf.resize(READ_BUFFER, 0);
            }
            let mut fds = Vec::new();
            let Some(n) = recv_some(sock, &mut self.buf[self.end..], &mut fds, &mut self.cmsg)?
            else {
                return Ok(None);
            };
            self.end += n;
            if !fds.is_empty() {
                let last = self.consumed + (self.end - self.start) as u64 - 1;
                self.fds.push_back((last, fds));
            }
        }
    }

    fn take_frame(&mut self, header: Header, total: usize) -> Frame {
        let payload = self.buf[self.start + HEADER_SIZE..self.start + total].to_vec();
        let (lo, hi) = (self.consumed, self.consumed + total as u64);
        let mut fds = Vec::new();
        while self.fds.front().is_some_and(|(off, _)| *off < hi) {
            if let Some((off, v)) = self.fds.pop_front() {
                if off >= lo {
                    fds.extend(v);
                } else {
                    tracing::debug!(n = v.len(), "closing descriptors that matched no frame");
                }
            }
        }
        self.start += total;
        self.consumed = hi;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Frame {
            header,
            payload,
            fds,
        }
    }
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
    let mut chunks: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
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
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let mut sent = 0usize;
    let mut first = true;
    let deadline = std::time::Instant::now() + SEND_TIMEOUT;
    while sent < total {
        // Build iovecs for what is left.
        let mut skip = sent;
        let mut iov = Vec::with_capacity(chunks.len());
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
