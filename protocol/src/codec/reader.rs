//! [`FrameReader`]: frames cut out of what a socket delivers, fds matched to their bytes.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use zerocopy::FromBytes;

use super::{Frame, Limits, MAX_SKIPPABLE_MSG_SIZE, SCM_MAX_FD};
use crate::error::ProtocolError;
use crate::header::{Command, Header, MessageKind, HEADER_SIZE};

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
    /// Receive large payloads straight into their own buffer ([`FrameReader::direct_payloads`]).
    direct: bool,
    /// A large frame whose payload is being received straight into its buffer.
    partial: Option<Partial>,
}

/// Payloads at least this large are received straight into their buffer when the reader
/// takes payloads directly.
const DIRECT_MIN: usize = 64 * 1024;

/// A frame being received straight into its payload buffer.
#[derive(Debug)]
struct Partial {
    header: Header,
    payload: Vec<u8>,
    /// Payload bytes received so far.
    have: usize,
    /// Stream offset of the frame's first byte.
    start: u64,
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
        self.end > self.start
            || !self.fds.is_empty()
            || self.skip.is_some()
            || self.partial.is_some()
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
            if self.partial.is_some() {
                return Ok(self.receive_direct(sock)?.map(ReadOutcome::Frame));
            }
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
                if self.direct && total - HEADER_SIZE >= DIRECT_MIN {
                    self.start_direct(h, total);
                    continue;
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
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if payload.capacity() > self.spare.capacity() {
            // Its length is kept: a direct receive sizes it without zeroing it again.
            self.spare = payload;
        }
    }

    /// Receive payloads of 64 KiB and more straight into their buffer instead of through
    /// the read buffer, sparing a copy of every byte (a client reading MIG_DATA). Not for a
    /// reader whose [`FrameReader::pending`] bytes are mirrored elsewhere (the supervised
    /// server's journal): the bytes of such a frame are never pending.
    pub fn direct_payloads(mut self) -> Self {
        self.direct = true;
        self
    }

    fn take_frame(&mut self, header: Header, total: usize) -> Frame {
        let mut payload = std::mem::take(&mut self.spare);
        payload.clear();
        payload.extend_from_slice(&self.buf[self.start + HEADER_SIZE..self.start + total]);
        let fds = self.fds_within(self.consumed, self.consumed + total as u64);
        self.start += total;
        self.consumed += total as u64;
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

    /// The fds received with stream bytes `lo..hi` (those before `lo` matched no frame and
    /// are closed).
    fn fds_within(&mut self, lo: u64, hi: u64) -> Vec<OwnedFd> {
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
        fds
    }

    /// Begin receiving the frame whose header (of `total` bytes in all, more than the buffer
    /// holds) starts the buffer straight into its payload buffer; the buffered part moves
    /// there now.
    fn start_direct(&mut self, header: Header, total: usize) {
        let mut payload = std::mem::take(&mut self.spare);
        payload.resize(total - HEADER_SIZE, 0);
        let have = self.end - self.start - HEADER_SIZE;
        payload[..have].copy_from_slice(&self.buf[self.start + HEADER_SIZE..self.end]);
        let start = self.consumed;
        self.consumed += (self.end - self.start) as u64;
        self.start = 0;
        self.end = 0;
        self.partial = Some(Partial {
            header,
            payload,
            have,
            start,
        });
    }

    /// Receive more of the partial frame; the frame once it is complete.
    fn receive_direct(&mut self, sock: BorrowedFd<'_>) -> Result<Option<Frame>, ProtocolError> {
        loop {
            let Some(p) = self.partial.as_mut() else {
                return Ok(None);
            };
            if p.have == p.payload.len() {
                let Partial {
                    header,
                    payload,
                    start,
                    ..
                } = self.partial.take().expect("partial frame");
                let fds = self.fds_within(start, start + u64::from(header.msg_size));
                return Ok(Some(Frame {
                    header,
                    payload,
                    fds,
                }));
            }
            let mut fds = Vec::new();
            let Some(n) = recv_some(sock, &mut p.payload[p.have..], &mut fds, &mut self.cmsg)?
            else {
                return Ok(None);
            };
            p.have += n;
            self.consumed += n as u64;
            if !fds.is_empty() {
                self.fds.push_back((self.consumed - 1, fds));
            }
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

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
