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
use smallvec::SmallVec;
use zerocopy::{FromBytes, IntoBytes};

use crate::error::ProtocolError;
use crate::header::{Command, Header, MessageKind, HEADER_SIZE};
use crate::messages::version::{Negotiated, DEFAULT_MAX_DATA_XFER_SIZE, MAX_MAX_DATA_XFER_SIZE};

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
    /// An oversize command being discarded.
    skip: Option<Skip>,
    /// A payload buffer handed back by [`FrameReader::recycle`], filled by the next frame
    /// instead of a fresh allocation (a 1 MiB reply allocated and freed per message costs
    /// its page faults every time once the allocator returns the memory to the system).
    spare: Vec<u8>,
}

/// An oversize command whose bytes are being discarded as they arrive.
#[derive(Debug)]
struct Skip {
    header: Header,
    /// Bytes of it not yet discarded.
    left: u64,
    /// Stream offset just past its last byte.
    end: u64,
}

/// What [`FrameReader::read_message`] found.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole frame within the limits.
    Frame(Frame),
    /// A command whose `msg_size` exceeded [`Limits::max_msg_size`] but whose header was sane
    /// (command type, a known command, `msg_size` at most [`MAX_SKIPPABLE_MSG_SIZE`]). Its
    /// bytes have been discarded as they arrived — never buffered whole — and any fds that came
    /// with it closed, so the stream is in step again. Answer it with an error reply
    /// (`E2BIG`) unless it has `NO_REPLY`, and keep serving.
    Oversize(Header),
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

/// Receive at least one byte into `buf`, appending any descriptors to `fds` (`cmsg` is the
/// caller's reusable ancillary-data buffer): `Ok(None)` when the socket would block; EOF is
/// [`ProtocolError::Disconnected`]. Frame-level callers use [`FrameReader`]; this is for a
/// proxy passing on bytes it can no longer cut into frames.
pub fn recv_some(
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

    /// Whether bytes or descriptors of a frame not yet returned are held here, or an oversize
    /// command is being discarded.
    pub fn in_progress(&self) -> bool {
        self.end > self.start || !self.fds.is_empty() || self.skip.is_some()
    }

    /// Hand back every byte and descriptor received but not yet returned as a frame, leaving
    /// the reader empty. After a malformed header the stream cannot be cut into frames any
    /// more; a proxy (`vfud trace`) uses this to pass what it holds on untouched.
    pub fn take_unparsed(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let bytes = self.buf[self.start..self.end].to_vec();
        self.consumed += bytes.len() as u64;
        self.start = 0;
        self.end = 0;
        let fds = self.fds.drain(..).flat_map(|(_, v)| v).collect();
        (bytes, fds)
    }

    /// Bytes read from the socket but not yet returned as a frame (the rest of a burst, or
    /// the start of a frame still arriving). A supervised server mirrors them so a process
    /// that replaces it after a crash can carry on mid-stream ([`FrameReader::prefill`]).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Stream offset, counted from this reader's first byte, of the first pending byte
    /// (the end of the last frame returned).
    pub fn stream_offset(&self) -> u64 {
        self.consumed
    }

    /// Queue `bytes` as if they had been received before anything still in the socket: the
    /// [`FrameReader::pending`] bytes of a reader in a process that died.
    pub fn prefill(&mut self, bytes: &[u8]) {
        self.buf.truncate(self.end);
        self.buf.extend_from_slice(bytes);
        self.end += bytes.len();
        if self.buf.len() < READ_BUFFER {
            self.buf.resize(READ_BUFFER, 0);
        }
    }

    /// Return the next whole frame, reading from the socket only when the buffer holds none.
    /// `Ok(None)` when the socket would block. A malformed header is an error after which
    /// the stream cannot be resynchronised: the caller should drop the connection. So is a
    /// frame larger than [`Limits::max_msg_size`]; [`FrameReader::read_message`] instead skips
    /// a sane one so that it can be answered.
    pub fn read_frame(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
    ) -> Result<Option<Frame>, ProtocolError> {
        match self.read(sock, limits, false)? {
            Some(ReadOutcome::Frame(f)) => Ok(Some(f)),
            // Not produced without `skip_oversize`.
            Some(ReadOutcome::Oversize(h)) => Err(ProtocolError::MsgTooLarge {
                size: h.msg_size,
                max: limits.max_msg_size,
            }),
            None => Ok(None),
        }
    }

    /// Like [`FrameReader::read_frame`], but a command too large for `limits` whose header is
    /// otherwise sane is discarded in bounded steps and reported as [`ReadOutcome::Oversize`]
    /// instead of failing the connection, so that a device is not lost to one bad write.
    /// While it is being discarded this returns `Ok(None)` whenever the socket runs dry, and
    /// [`FrameReader::in_progress`] is true.
    pub fn read_message(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
    ) -> Result<Option<ReadOutcome>, ProtocolError> {
        self.read(sock, limits, true)
    }

    fn read(
        &mut self,
        sock: BorrowedFd<'_>,
        limits: &Limits,
        skip_oversize: bool,
    ) -> Result<Option<ReadOutcome>, ProtocolError> {
        loop {
            if self.skip.is_some() {
                if let Some(h) = self.discard() {
                    return Ok(Some(ReadOutcome::Oversize(h)));
                }
                if self.buf.is_empty() {
                    self.buf.resize(READ_BUFFER, 0);
                }
                if !self.fill(sock)? {
                    return Ok(None);
                }
                continue;
            }
            let avail = self.end - self.start;
            let need = if avail >= HEADER_SIZE {
                let h = Header::read_from_bytes(&self.buf[self.start..self.start + HEADER_SIZE])
                    .map_err(|_| ProtocolError::MsgSizeTooSmall(0))?;
                h.payload_len()?;
                if h.msg_size as usize > limits.max_msg_size {
                    if skip_oversize && skippable(&h) {
                        tracing::debug!(
                            msg_id = h.msg_id,
                            cmd = h.cmd,
                            size = h.msg_size,
                            max = limits.max_msg_size,
                            "discarding an oversize command"
                        );
                        self.skip = Some(Skip {
                            header: h,
                            left: h.msg_size.into(),
                            end: self.consumed + u64::from(h.msg_size),
                        });
                        continue;
                    }
                    return Err(ProtocolError::MsgTooLarge {
                        size: h.msg_size,
                        max: limits.max_msg_size,
                    });
                }
                let total = h.msg_size as usize;
                if avail >= total {
                    return Ok(Some(ReadOutcome::Frame(self.take_frame(h, total))));
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
            if !self.fill(sock)? {
                return Ok(None);
            }
        }
    }

    /// One `recvmsg` into the free end of the buffer; `false` when the socket would block.
    fn fill(&mut self, sock: BorrowedFd<'_>) -> Result<bool, ProtocolError> {
        let mut fds = Vec::new();
        let Some(n) = recv_some(sock, &mut self.buf[self.end..], &mut fds, &mut self.cmsg)? else {
            return Ok(false);
        };
        self.end += n;
        if !fds.is_empty() {
            let last = self.consumed + (self.end - self.start) as u64 - 1;
            self.fds.push_back((last, fds));
        }
        Ok(true)
    }

    /// Drop buffered bytes of the command being skipped; when its last byte is gone, close the
    /// fds that came with it and return its header.
    fn discard(&mut self) -> Option<Header> {
        let skip = self.skip.as_mut()?;
        let n = ((self.end - self.start) as u64).min(skip.left);
        self.start += n as usize;
        self.consumed += n;
        skip.left -= n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if skip.left > 0 {
            return None;
        }
        let end = skip.end;
        let header = skip.header;
        self.skip = None;
        while self.fds.front().is_some_and(|(off, _)| *off < end) {
            if let Some((_, v)) = self.fds.pop_front() {
                tracing::debug!(n = v.len(), "closing descriptors of an oversize command");
            }
        }
        Some(header)
    }

    /// Whether a recycled buffer is waiting for the next frame.
    pub fn has_spare(&self) -> bool {
        self.spare.capacity() > 0
    }

    /// Give a frame's payload buffer back for the next frame to reuse (the larger of it and
    /// the one already held is kept).
    pub fn recycle(&mut self, mut payload: Vec<u8>) {
        if payload.capacity() > self.spare.capacity() {
            payload.clear();
            self.spare = payload;
        }
    }

    fn take_frame(&mut self, header: Header, total: usize) -> Frame {
        let mut payload = std::mem::take(&mut self.spare);
        payload.extend_from_slice(&self.buf[self.start + HEADER_SIZE..self.start + total]);
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

/// Whether an oversize frame looks like a real command that was merely too large, rather than
/// a stream gone out of step (see [`ReadOutcome::Oversize`]).
fn skippable(h: &Header) -> bool {
    u64::from(h.msg_size) <= MAX_SKIPPABLE_MSG_SIZE
        && matches!(h.kind(), Ok(MessageKind::Command { .. }))
        && Command::try_from(h.cmd).is_ok()
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

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
