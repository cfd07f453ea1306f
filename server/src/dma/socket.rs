//! Socket DMA without waiting: DMA_READ/DMA_WRITE to the client as asynchronous requests
//! (spec "VFIO_USER_DMA_READ"/"VFIO_USER_DMA_WRITE").
//!
//! # Why asynchronous
//! QEMU's vCPU thread waits for the reply to a BAR access while holding its global lock, and
//! QEMU serves the server's DMA_READ/DMA_WRITE only from its main loop, which needs that lock.
//! A server that holds back any reply until its own DMA request is answered therefore
//! deadlocks QEMU until its message timeout, after which QEMU drops the connection. So no
//! request ever waits on the client here:
//! - a device's read of socket-backed memory queues DMA_READ requests and answers
//!   [`DmaError::Pending`]; when every chunk's reply is in, the same read (same IOVA and
//!   length) returns the data — the device keeps its progress and is run again on each reply;
//! - writes are posted: DMA_WRITE requests are queued and the device carries on; before it
//!   reports completion it calls [`SocketDma::settle`] (through
//!   [`crate::dma::GuestMem::settle`]), which is `Pending` until every write was acknowledged,
//!   so a guest that sees "done" also sees the data;
//! - requests in flight are bounded ([`MAX_IN_FLIGHT`]); past that, reads and writes answer
//!   `Pending` without sending;
//! - replies are matched by message id; a reply nobody waits for is dropped with a log line;
//! - the queued requests go out after the reply to the client's current request (the event
//!   loop sends [`SocketDma::take_outbox`] right after it).
//!
//! The transport is the only way guest memory reaches the client: devices never see the
//! socket, and the event loop never learns about DMA by looking at message ids.

use std::collections::HashMap;

use nix::errno::Errno;
use vfud_protocol::codec::Frame;
use vfud_protocol::header::{Command, Header, MessageKind};
use vfud_protocol::messages::dma::DmaAccess;
use vfud_protocol::ProtocolError;

use crate::error::DmaError;

/// Most DMA requests outstanding at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// An encoded message for the client: header plus payload.
#[derive(Debug)]
pub struct Outgoing {
    /// Header.
    pub header: Header,
    /// Payload.
    pub payload: Vec<u8>,
}

#[derive(Debug)]
enum Op {
    /// Chunk of the read keyed by `key`, at `offset` within it.
    Read {
        key: (u64, usize),
        offset: usize,
    },
    Write,
}

#[derive(Debug)]
struct Read {
    buf: Vec<u8>,
    chunks_left: usize,
    failed: Option<Errno>,
}

/// Counters of socket DMA, for logs and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketDmaCounters {
    /// DMA_READ requests sent.
    pub reads: u64,
    /// DMA_WRITE requests sent.
    pub writes: u64,
    /// Bytes moved either way.
    pub bytes: u64,
}

/// Asynchronous DMA_READ/DMA_WRITE requests of one connection. See the module docs.
#[derive(Debug)]
pub struct SocketDma {
    next_id: u16,
    chunk: usize,
    in_flight: HashMap<u16, Op>,
    reads: HashMap<(u64, usize), Read>,
    write_error: Option<DmaError>,
    outbox: Vec<Outgoing>,
    counters: SocketDmaCounters,
}

impl SocketDma {
    /// A transport whose requests move at most `max_data_xfer_size` bytes each; message
    /// ids start at `first_id` (distinct from the client's own ids for readability in traces).
    pub fn new(max_data_xfer_size: usize, first_id: u16) -> Self {
        Self {
            next_id: first_id,
            chunk: max_data_xfer_size.max(1),
            in_flight: HashMap::new(),
            reads: HashMap::new(),
            write_error: None,
            outbox: Vec::new(),
            counters: SocketDmaCounters::default(),
        }
    }

    /// Change the request size (after VERSION).
    pub fn set_max_xfer(&mut self, max_data_xfer_size: usize) {
        self.chunk = max_data_xfer_size.max(1);
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> SocketDmaCounters {
        self.counters
    }

    fn send(&mut self, cmd: Command, payload: Vec<u8>, op: Op) {
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(self.next_id, cmd, payload.len(), false);
        self.in_flight.insert(self.next_id, op);
        self.outbox.push(Outgoing { header, payload });
    }

    /// Read `buf.len()` bytes at `iova`: the data once every chunk has arrived, `Pending`
    /// until then (the first call sends the requests).
    pub fn read(&mut self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let key = (iova, buf.len());
        if let Some(r) = self.reads.get(&key) {
            if r.chunks_left > 0 {
                return Err(DmaError::Pending);
            }
            let r = self.reads.remove(&key).ok_or(DmaError::Pending)?;
            if let Some(errno) = r.failed {
                return Err(DmaError::Socket(ProtocolError::Remote(errno)));
            }
            buf.copy_from_slice(&r.buf);
            return Ok(());
        }
        let chunks = buf.len().div_ceil(self.chunk).max(1);
        if !self.in_flight.is_empty() && self.in_flight.len() + chunks > MAX_IN_FLIGHT {
            return Err(DmaError::Pending);
        }
        self.reads.insert(
            key,
            Read {
                buf: vec![0; buf.len()],
                chunks_left: chunks,
                failed: None,
            },
        );
        for i in 0..chunks {
            let offset = i * self.chunk;
            let n = (buf.len() - offset).min(self.chunk);
            let req = DmaAccess {
                addr: iova + offset as u64,
                count: n as u64,
            };
            self.counters.reads += 1;
            let p = vfud_protocol::wire::encode(&req);
            self.send(Command::DmaRead, p, Op::Read { key, offset });
        }
        Err(DmaError::Pending)
    }

    /// Post a write of `data` at `iova`. `Pending` (nothing sent) while too many requests are
    /// in flight; a failure of an earlier write is returned once.
    pub fn write(&mut self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if let Some(e) = self.write_error.take() {
            return Err(e);
        }
        let chunks = data.len().div_ceil(self.chunk).max(1);
        if !self.in_flight.is_empty() && self.in_flight.len() + chunks > MAX_IN_FLIGHT {
            return Err(DmaError::Pending);
        }
        for (i, piece) in data.chunks(self.chunk).enumerate() {
            let req = DmaAccess {
                addr: iova + (i * self.chunk) as u64,
                count: piece.len() as u64,
            };
            self.counters.writes += 1;
            self.counters.bytes += piece.len() as u64;
            self.send(Command::DmaWrite, req.encode_with_data(piece), Op::Write);
        }
        Ok(())
    }

    /// `Ok` once every posted write was acknowledged; the first failed write's error once;
    /// `Pending` while writes are in flight.
    pub fn settle(&mut self) -> Result<(), DmaError> {
        if let Some(e) = self.write_error.take() {
            return Err(e);
        }
        if self.in_flight.values().any(|op| matches!(op, Op::Write)) {
            return Err(DmaError::Pending);
        }
        Ok(())
    }

    /// A reply (or error reply) from the client. Returns whether it answered one of our
    /// requests; anything else is dropped by the caller with a log line.
    pub fn on_reply(&mut self, frame: &Frame) -> bool {
        let h = &frame.header;
        let Some(op) = self.in_flight.remove(&h.msg_id) else {
            return false;
        };
        let errno = match h.kind() {
            Ok(MessageKind::ErrorReply(e)) => Some(Errno::from_raw(e as i32)),
            _ => None,
        };
        match op {
            Op::Write => {
                if let Some(e) = errno {
                    self.write_error
                        .get_or_insert(DmaError::Socket(ProtocolError::Remote(e)));
                }
            }
            Op::Read { key, offset } => {
                let Some(r) = self.reads.get_mut(&key) else {
                    return true;
                };
                r.chunks_left = r.chunks_left.saturating_sub(1);
                let want = (key.1 - offset).min(self.chunk);
                match (errno, DmaAccess::decode_with_data(&frame.payload)) {
                    (None, Ok((a, data))) if a.count as usize == want => {
                        r.buf[offset..offset + want].copy_from_slice(data);
                        self.counters.bytes += want as u64;
                    }
                    (Some(e), _) => r.failed = Some(e),
                    _ => r.failed = Some(Errno::EPROTO),
                }
            }
        }
        true
    }

    /// Requests to send now, in order.
    pub fn take_outbox(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether requests wait to be sent.
    pub fn has_outbox(&self) -> bool {
        !self.outbox.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_to(out: &Outgoing, data: &[u8]) -> Frame {
        let a = DmaAccess::decode_read(&out.payload).unwrap();
        let payload = a.encode_with_data(data);
        Frame {
            header: out.header.reply(payload.len()),
            payload,
            fds: Vec::new(),
        }
    }

    #[test]
    fn read_is_pending_until_every_chunk_arrives() {
        let mut s = SocketDma::new(4, 0x8000);
        let mut buf = [0u8; 10];
        assert!(matches!(s.read(0x1000, &mut buf), Err(DmaError::Pending)));
        let out = s.take_outbox();
        assert_eq!(out.len(), 3);
        // Replies out of order.
        assert!(s.on_reply(&reply_to(&out[2], &[9, 10])));
        assert!(s.on_reply(&reply_to(&out[0], &[1, 2, 3, 4])));
        assert!(matches!(s.read(0x1000, &mut buf), Err(DmaError::Pending)));
        assert!(s.on_reply(&reply_to(&out[1], &[5, 6, 7, 8])));
        s.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn writes_are_posted_and_settle_waits_for_acks() {
        let mut s = SocketDma::new(1 << 20, 0);
        s.write(0x2000, &[1; 8]).unwrap();
        assert!(matches!(s.settle(), Err(DmaError::Pending)));
        let out = s.take_outbox();
        let ack = Frame {
            header: out[0].header.reply(16),
            payload: out[0].payload[..16].to_vec(),
            fds: Vec::new(),
        };
        assert!(s.on_reply(&ack));
        s.settle().unwrap();
    }

    #[test]
    fn error_reply_fails_the_write_once() {
        let mut s = SocketDma::new(64, 0);
        s.write(0, &[0; 4]).unwrap();
        let out = s.take_outbox();
        let err = Frame {
            header: out[0].header.error_reply(Errno::EFAULT as i32),
            payload: Vec::new(),
            fds: Vec::new(),
        };
        assert!(s.on_reply(&err));
        assert!(matches!(s.settle(), Err(DmaError::Socket(_))));
        s.settle().unwrap();
    }

    #[test]
    fn in_flight_is_bounded() {
        let mut s = SocketDma::new(1, 0);
        let mut big = vec![0u8; MAX_IN_FLIGHT];
        assert!(matches!(s.read(0, &mut big), Err(DmaError::Pending)));
        assert_eq!(s.in_flight(), MAX_IN_FLIGHT);
        assert!(matches!(s.write(0x100, &[1]), Err(DmaError::Pending)));
        assert_eq!(s.take_outbox().len(), MAX_IN_FLIGHT);
    }

    #[test]
    fn stray_reply_is_not_ours() {
        let mut s = SocketDma::new(64, 0);
        let f = Frame {
            header: Header::command(77, Command::DmaRead, 0, false).reply(0),
            payload: Vec::new(),
            fds: Vec::new(),
        };
        assert!(!s.on_reply(&f));
    }
}
