//! A blocking vfio-user client: connect, negotiate, one method per client→server command,
//! and service of the server's DMA_READ/DMA_WRITE requests while waiting for replies.
//!
//! Used by the tests, `vfud probe` and the migration driver. Requests are sent one at a time
//! except posted writes (`NO_REPLY`), which QEMU also pipelines.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;

use crate::codec::{send_chunks, send_error, send_message, send_reply, Frame, FrameReader, Limits};
use crate::error::ProtocolError;
use crate::header::{Command, Header, MessageKind};
use crate::messages::dma::{DmaAccess, DmaMap, DmaUnmap, DMA_UNMAP_FLAG_ALL};
use crate::messages::region::{
    IoFdSubRegion, RegionAccess, RegionInfo, RegionInfoReply, RegionIoFds, WriteMultiEntry,
};
use crate::messages::version::{accept_reply, Negotiated, VersionMessage};
use crate::messages::DeviceInfo;
use crate::wire::put;

mod irq;
mod migration;

pub use migration::MigDataBuf;

/// Serves the server's DMA_READ/DMA_WRITE requests (memory the client did not map with an fd).
pub trait DmaHandler: Send {
    /// Fill `buf` from guest memory at `addr`.
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Store `data` to guest memory at `addr`.
    fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), Errno>;
}

/// A connected client.
pub struct Client {
    stream: UnixStream,
    reader: FrameReader,
    limits: Limits,
    negotiated: Negotiated,
    next_id: u16,
    dma: Option<Box<dyn DmaHandler>>,
    /// A MIG_DATA_READ reply carried padding (logged once).
    padded_mig_data: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

/// A reply: header, payload and any fds.
pub type Reply = Frame;

impl Client {
    /// Connect to a server socket (no negotiation yet).
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ProtocolError> {
        let stream = UnixStream::connect(path)?;
        Self::from_stream(stream)
    }

    /// Wrap a connected stream.
    pub fn from_stream(stream: UnixStream) -> Result<Self, ProtocolError> {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            reader: FrameReader::new().direct_payloads(),
            limits: Limits::default(),
            negotiated: Negotiated::default(),
            next_id: 0,
            dma: None,
            padded_mig_data: false,
        })
    }

    /// Connect and negotiate with QEMU's proposal.
    pub fn connect_negotiated(path: impl AsRef<Path>) -> Result<Self, ProtocolError> {
        let mut c = Self::connect(path)?;
        c.negotiate(&VersionMessage::qemu_proposal())?;
        Ok(c)
    }

    /// Set how long to wait for a reply.
    pub fn set_timeout(&self, t: Duration) -> Result<(), ProtocolError> {
        Ok(self.stream.set_read_timeout(Some(t))?)
    }

    /// Install the handler for server-initiated DMA.
    pub fn set_dma_handler(&mut self, h: Box<dyn DmaHandler>) {
        self.dma = Some(h);
    }

    /// Parameters agreed in VERSION.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// The socket, e.g. to hand it to another process.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn alloc_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Send a command without waiting. Returns the header sent.
    pub fn send_command(
        &mut self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        no_reply: bool,
    ) -> Result<Header, ProtocolError> {
        let h = Header::command(self.alloc_id(), cmd, payload.len(), no_reply);
        send_message(self.stream.as_fd(), &h, &[payload], fds)?;
        Ok(h)
    }

    /// Send a command by number (possibly one the server does not know) and wait for the reply.
    pub fn request_raw(
        &mut self,
        cmd: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ProtocolError> {
        let h = Header {
            msg_id: self.alloc_id(),
            cmd,
            msg_size: (crate::header::HEADER_SIZE + payload.len()) as u32,
            flags: crate::header::FLAG_TYPE_COMMAND,
            error_no: 0,
        };
        send_message(self.stream.as_fd(), &h, &[payload], fds)?;
        self.recv_reply(&h)
    }

    /// Send raw bytes, possibly malformed, with fds (for tests of hostile input).
    pub fn send_raw(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ProtocolError> {
        send_chunks(self.stream.as_fd(), &[bytes], fds)
    }

    /// Receive the next whole frame as it comes (no DMA service), for tests.
    pub fn recv_frame(&mut self) -> Result<Frame, ProtocolError> {
        match self.reader.read_frame(self.stream.as_fd(), &self.limits) {
            Ok(Some(f)) => Ok(f),
            Ok(None) => Err(ProtocolError::Timeout),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(ProtocolError::Timeout)
            }
            Err(e) => Err(e),
        }
    }

    /// Receive the next frame, serving DMA requests from the server in between.
    pub fn recv_reply(&mut self, sent: &Header) -> Result<Reply, ProtocolError> {
        loop {
            let frame = self.recv_frame()?;
            match frame.header.kind()? {
                MessageKind::Command { no_reply } => {
                    self.serve_server_request(&frame, no_reply)?;
                }
                kind => {
                    if frame.header.msg_id != sent.msg_id || frame.header.cmd != sent.cmd {
                        return Err(ProtocolError::UnexpectedReply(format!(
                            "reply id {} cmd {} to request id {} cmd {}",
                            frame.header.msg_id, frame.header.cmd, sent.msg_id, sent.cmd
                        )));
                    }
                    if let MessageKind::ErrorReply(e) = kind {
                        return Err(ProtocolError::Remote(Errno::from_raw(e as i32)));
                    }
                    return Ok(frame);
                }
            }
        }
    }

    fn serve_server_request(&mut self, f: &Frame, no_reply: bool) -> Result<(), ProtocolError> {
        let sock = self.stream.as_fd();
        let cmd = Command::try_from(f.header.cmd);
        let result: Result<Vec<u8>, Errno> = match (cmd, self.dma.as_mut()) {
            (Ok(Command::DmaRead), Some(h)) => match DmaAccess::decode_read(&f.payload) {
                Ok(a) if a.count <= self.limits.max_recv_xfer_size => {
                    let mut buf = vec![0u8; a.count as usize];
                    h.dma_read(a.addr, &mut buf)
                        .map(|()| a.encode_with_data(&buf))
                }
                Ok(_) => Err(Errno::E2BIG),
                Err(_) => Err(Errno::EINVAL),
            },
            (Ok(Command::DmaWrite), Some(h)) => match DmaAccess::decode_with_data(&f.payload) {
                Ok((a, data)) => h.dma_write(a.addr, data).map(|()| {
                    let mut out = Vec::new();
                    put(&mut out, &a);
                    out
                }),
                Err(_) => Err(Errno::EINVAL),
            },
            (Ok(Command::DmaRead | Command::DmaWrite), None) => Err(Errno::ENODEV),
            _ => Err(Errno::ENOSYS),
        };
        if no_reply {
            return Ok(());
        }
        match result {
            Ok(payload) => send_reply(sock, &f.header, &payload, &[]),
            Err(e) => send_error(sock, &f.header, e),
        }
    }

    /// Send a command and wait for its reply.
    pub fn request(
        &mut self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ProtocolError> {
        let h = self.send_command(cmd, payload, fds, false)?;
        self.recv_reply(&h)
    }

    /// [`Client::request`] with the payload in `parts`, sent back to back from where they
    /// lie (one `sendmsg`, no copy into one buffer: a 1 MiB MIG_DATA_WRITE stays 1 MiB).
    pub fn request_parts(&mut self, cmd: Command, parts: &[&[u8]]) -> Result<Reply, ProtocolError> {
        let len = parts.iter().map(|p| p.len()).sum();
        let h = Header::command(self.alloc_id(), cmd, len, false);
        send_message(self.stream.as_fd(), &h, parts, &[])?;
        self.recv_reply(&h)
    }

    /// VERSION: propose and accept the server's answer.
    pub fn negotiate(&mut self, proposal: &VersionMessage) -> Result<Negotiated, ProtocolError> {
        let reply = self.request(Command::Version, &proposal.encode(), &[])?;
        let v = VersionMessage::decode(&reply.payload)?;
        let n = accept_reply(proposal, &v)?;
        self.limits = Limits::client(&n);
        self.negotiated = n.clone();
        Ok(n)
    }

    /// DMA_MAP, with `fd` for fd-backed memory.
    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        addr: u64,
        size: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ProtocolError> {
        let m = DmaMap {
            argsz: 32,
            flags,
            offset,
            addr,
            size,
        };
        let mut p = Vec::new();
        put(&mut p, &m);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.request(Command::DmaMap, &p, &fds)?;
        Ok(())
    }

    /// DMA_UNMAP of exactly one earlier mapping.
    pub fn dma_unmap(&mut self, addr: u64, size: u64) -> Result<DmaUnmap, ProtocolError> {
        self.dma_unmap_flags(0, addr, size)
    }

    /// DMA_UNMAP of everything.
    pub fn dma_unmap_all(&mut self) -> Result<DmaUnmap, ProtocolError> {
        self.dma_unmap_flags(DMA_UNMAP_FLAG_ALL, 0, 0)
    }

    fn dma_unmap_flags(
        &mut self,
        flags: u32,
        addr: u64,
        size: u64,
    ) -> Result<DmaUnmap, ProtocolError> {
        let u = DmaUnmap {
            argsz: 24,
            flags,
            addr,
            size,
        };
        let mut p = Vec::new();
        put(&mut p, &u);
        let r = self.request(Command::DmaUnmap, &p, &[])?;
        crate::messages::decode_fixed(&r.payload, "DMA_UNMAP reply")
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<DeviceInfo, ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &DeviceInfo {
                argsz: 16,
                ..DeviceInfo::default()
            },
        );
        let r = self.request(Command::DeviceGetInfo, &p, &[])?;
        crate::messages::decode_fixed(&r.payload, "DEVICE_GET_INFO reply")
    }

    /// DEVICE_GET_REGION_INFO, asking again with more room when the caps did not fit.
    pub fn region_info(
        &mut self,
        index: u32,
    ) -> Result<(RegionInfoReply, Option<OwnedFd>), ProtocolError> {
        let mut argsz = 32u32;
        for _ in 0..2 {
            let mut p = Vec::new();
            put(
                &mut p,
                &RegionInfo {
                    argsz,
                    index,
                    ..RegionInfo::default()
                },
            );
            let mut r = self.request(Command::DeviceGetRegionInfo, &p, &[])?;
            let info = RegionInfoReply::decode(&r.payload)?;
            if info.info.argsz > argsz {
                argsz = info.info.argsz;
                continue;
            }
            if r.fds.len() > 1 {
                return Err(ProtocolError::FdCountExceeded {
                    got: r.fds.len(),
                    max: 1,
                });
            }
            return Ok((info, r.fds.pop()));
        }
        Err(ProtocolError::UnexpectedReply(
            "region info argsz kept growing".into(),
        ))
    }

    /// DEVICE_GET_REGION_IO_FDS.
    pub fn region_io_fds(
        &mut self,
        index: u32,
    ) -> Result<(Vec<IoFdSubRegion>, Vec<OwnedFd>), ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &RegionIoFds {
                argsz: 4096,
                index,
                ..RegionIoFds::default()
            },
        );
        let r = self.request(Command::DeviceGetRegionIoFds, &p, &[])?;
        let (_, subs) = RegionIoFds::decode_reply(&r.payload)?;
        Ok((subs, r.fds))
    }

    /// REGION_READ.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, ProtocolError> {
        let mut p = Vec::new();
        put(
            &mut p,
            &RegionAccess {
                offset,
                region,
                count,
            },
        );
        let r = self.request(Command::RegionRead, &p, &[])?;
        let (a, data) = RegionAccess::decode_write(&r.payload)?;
        if a.count > count {
            return Err(ProtocolError::UnexpectedReply(format!(
                "read reply of {} bytes for {count} requested",
                a.count
            )));
        }
        Ok(data.to_vec())
    }

    /// Read a little-endian u32 from a region.
    pub fn region_read_u32(&mut self, region: u32, offset: u64) -> Result<u32, ProtocolError> {
        let b = self.region_read(region, offset, 4)?;
        let arr: [u8; 4] = b
            .as_slice()
            .try_into()
            .map_err(|_| ProtocolError::UnexpectedReply("short read".into()))?;
        Ok(u32::from_le_bytes(arr))
    }

    /// REGION_WRITE, waiting for the reply.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        self.request(
            Command::RegionWrite,
            &write_payload(region, offset, data),
            &[],
        )?;
        Ok(())
    }

    /// Write a little-endian u32 to a region.
    pub fn region_write_u32(
        &mut self,
        region: u32,
        offset: u64,
        v: u32,
    ) -> Result<(), ProtocolError> {
        self.region_write(region, offset, &v.to_le_bytes())
    }

    /// REGION_WRITE with NO_REPLY (a posted write, as QEMU sends BAR writes).
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtocolError> {
        let p = write_payload(region, offset, data);
        self.send_command(Command::RegionWrite, &p, &[], true)?;
        Ok(())
    }

    /// REGION_WRITE_MULTI (always NO_REPLY, as QEMU sends it).
    pub fn region_write_multi(&mut self, entries: &[WriteMultiEntry]) -> Result<(), ProtocolError> {
        self.send_command(
            Command::RegionWriteMulti,
            &WriteMultiEntry::encode_batch(entries),
            &[],
            true,
        )?;
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn device_reset(&mut self) -> Result<(), ProtocolError> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }
}

/// The payload of a REGION_WRITE of `data` at `offset` in `region`.
fn write_payload(region: u32, offset: u64, data: &[u8]) -> Vec<u8> {
    RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    }
    .encode_with_data(data)
}
