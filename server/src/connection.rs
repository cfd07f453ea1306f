//! [`Connection`]: the client's socket as the event loop owns it — frame assembly with the
//! fds that came along, replies, error replies, and the server→client requests of socket DMA.
//!
//! Nothing else touches the socket: devices reach guest memory through
//! [`crate::dma::SocketDma`], whose requests the event loop sends here after the reply to
//! the message in hand.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use vfud_protocol::codec::{send_error, send_message, FrameReader, Limits, ReadOutcome};
use vfud_protocol::{Header, ProtocolError};

use crate::dispatch::{borrowed, Reply};
use crate::dma::socket::Outgoing;
use crate::mmap::SharedMemory;

/// The connected client.
pub struct Connection {
    stream: UnixStream,
    reader: FrameReader,
}

impl Connection {
    /// Serve a connected socket (made non-blocking).
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            reader: FrameReader::new(),
        })
    }

    /// Receive payloads of 64 KiB and more straight into their buffer when `direct`
    /// ([`FrameReader::direct_payloads`]).
    pub fn with_direct_payloads(mut self, direct: bool) -> Self {
        if direct {
            self.reader = std::mem::replace(&mut self.reader, FrameReader::new()).direct_payloads();
        }
        self
    }

    /// The socket's fd (for poll registration).
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The next complete frame, or a command too large for the limits whose bytes were
    /// skipped (to be answered with an error); `None` when the socket has no more for now.
    pub fn read_message(&mut self, limits: &Limits) -> Result<Option<ReadOutcome>, ProtocolError> {
        self.reader.read_message(self.stream.as_fd(), limits)
    }

    /// Whether part of a frame has been read.
    pub fn in_progress(&self) -> bool {
        self.reader.in_progress()
    }

    /// Send the reply to `request`; device memory it refers to comes from `bars`.
    pub fn reply(
        &self,
        request: &Header,
        reply: &Reply,
        bars: &[Option<SharedMemory>; 6],
    ) -> Result<(), ProtocolError> {
        if reply.memory.is_empty() {
            return send_message(
                self.stream.as_fd(),
                &request.reply(reply.payload.len()),
                &[&reply.payload],
                &borrowed(&reply.fds),
            );
        }
        let pieces = match reply.pieces(bars) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("reply refers to device memory it cannot have: {e}");
                return self.error(request, Errno::EFAULT);
            }
        };
        send_message(
            self.stream.as_fd(),
            &request.reply(reply.len()),
            &pieces,
            &borrowed(&reply.fds),
        )
    }

    /// Send the header-only error reply to `request`.
    pub fn error(&self, request: &Header, errno: Errno) -> Result<(), ProtocolError> {
        send_error(self.stream.as_fd(), request, errno)
    }

    /// Send server→client requests.
    pub fn send_requests(&self, out: Vec<Outgoing>) -> Result<(), ProtocolError> {
        for m in out {
            send_message(self.stream.as_fd(), &m.header, &[&m.payload], &[])?;
        }
        Ok(())
    }

    /// A duplicate of the socket, to hand the connection to another process.
    pub fn dup(&self) -> io::Result<OwnedFd> {
        self.stream.as_fd().try_clone_to_owned()
    }

    /// The frame reader (a supervised server mirrors its pending bytes, see
    /// [`crate::supervisor`]).
    pub fn reader(&self) -> &FrameReader {
        &self.reader
    }

    /// The frame reader, to prefill it with bytes a crashed process had read.
    pub fn reader_mut(&mut self) -> &mut FrameReader {
        &mut self.reader
    }

    /// Whether the client has sent bytes nobody read yet.
    pub fn has_unread(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            nix::sys::socket::recv(
                self.stream.as_raw_fd(),
                &mut b,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ),
            Ok(n) if n > 0
        )
    }
}
