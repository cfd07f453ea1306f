//! The raw-socket baseline: a peer process that does the least a vfio-user server must do —
//! read whole messages off an AF_UNIX stream socket and answer the ones that want an answer —
//! and the client end that drives it.
//!
//! Messages use the vfio-user header layout (16 bytes: id, command, `msg_size`, flags, errno)
//! so they are byte for byte the size of the vfud messages they stand in for. The request
//! says how long the reply must be in the `error_no` field; the `NO_REPLY` flag (bit 4) asks
//! for none. The peer reads as much as the socket holds into one buffer and walks the
//! messages in it (the socket's floor: one `read` may carry many posted messages), answers
//! from a preallocated buffer with one `write`, decodes nothing and copies nothing. A
//! connection opened in fd mode reads with `recvmsg` and closes any `SCM_RIGHTS` fds it
//! receives, as a server taking eventfds must.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use anyhow::{Context, Result};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Header size (as vfio-user's).
pub const HEADER: usize = 16;
const FLAG_REPLY: u32 = 1;
const FLAG_NO_REPLY: u32 = 1 << 4;
/// Largest message either side handles.
const MAX_MSG: usize = 2 << 20;

/// A request of `len` bytes (header included) asking for a reply of `reply` bytes, or none.
pub fn message(len: usize, reply: Option<usize>) -> Vec<u8> {
    assert!(len >= HEADER && reply.is_none_or(|r| r >= HEADER));
    let mut m = vec![0u8; len];
    let flags = if reply.is_some() { 0 } else { FLAG_NO_REPLY };
    m[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    m[8..12].copy_from_slice(&flags.to_le_bytes());
    m[12..16].copy_from_slice(&(reply.unwrap_or(0) as u32).to_le_bytes());
    m
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The peer: accept connections on `path` and serve each in its own thread until killed.
pub fn serve_peer(path: &Path) -> Result<()> {
    // Listen under a temporary name and rename: the bench waits for the path to appear, and
    // a path bound but not yet listening refuses connections.
    let _ = std::fs::remove_file(path);
    let tmp = path.with_extension("binding");
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("naming {}", path.display()))?;
    for s in l.incoming() {
        let s = s?;
        std::thread::spawn(move || {
            let _ = serve_conn(s);
        });
    }
    Ok(())
}

fn recv_fds(s: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut cmsg = nix::cmsg_space!([RawFd; 253]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                let _ = nix::unistd::close(fd);
            }
        }
    }
    Ok(n)
}

fn serve_conn(mut s: UnixStream) -> Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    let fds = mode[0] == b'f';
    let epoll = if mode[0] == b'e' {
        let e = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        e.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        Some(e)
    } else {
        None
    };
    let mut events = [EpollEvent::empty()];
    let mut buf = vec![0u8; 2 * MAX_MSG];
    let mut reply = vec![0u8; MAX_MSG];
    let mut have = 0usize;
    loop {
        if let Some(e) = &epoll {
            e.wait(&mut events, EpollTimeout::NONE)?;
        }
        let n = if fds {
            recv_fds(&s, &mut buf[have..])?
        } else {
            s.read(&mut buf[have..])?
        };
        if n == 0 {
            return Ok(());
        }
        have += n;
        let mut off = 0;
        while have - off >= HEADER {
            let h = &buf[off..off + HEADER];
            let len = le32(h, 4) as usize;
            if !(HEADER..=MAX_MSG).contains(&len) {
                anyhow::bail!("bad message length {len}");
            }
            if have - off < len {
                break;
            }
            if le32(h, 8) & FLAG_NO_REPLY == 0 {
                let rlen = (le32(h, 12) as usize).clamp(HEADER, MAX_MSG);
                reply[..4].copy_from_slice(&h[..4]);
                reply[4..8].copy_from_slice(&(rlen as u32).to_le_bytes());
                reply[8..12].copy_from_slice(&FLAG_REPLY.to_le_bytes());
                s.write_all(&reply[..rlen])?;
            }
            off += len;
        }
        buf.copy_within(off..have, 0);
        have -= off;
    }
}

/// How the peer serves a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Blocking `read`.
    Plain,
    /// Blocking `recvmsg`, closing received fds.
    Fds,
    /// Sleep in `epoll_wait` for readability, then `read` (as an event loop does).
    Epoll,
}

/// The client end of a connection to the peer.
pub struct RawConn {
    s: UnixStream,
}

impl RawConn {
    /// Connect; in fd mode the peer reads with `recvmsg` and closes passed fds.
    pub fn connect(path: &Path, mode: Mode) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(path)?;
        s.write_all(match mode {
            Mode::Plain => b"p",
            Mode::Fds => b"f",
            Mode::Epoll => b"e",
        })?;
        Ok(Self { s })
    }

    /// Send `req` and read the whole reply into `reply` (sized as the request asked).
    pub fn round_trip(&mut self, req: &[u8], reply: &mut [u8]) -> std::io::Result<()> {
        self.s.write_all(req)?;
        self.s.read_exact(reply)
    }

    /// Send a message that wants no reply.
    pub fn post(&mut self, msg: &[u8]) -> std::io::Result<()> {
        self.s.write_all(msg)
    }

    /// Send `req` with `fds` attached (one `sendmsg`) and read the reply.
    pub fn round_trip_fds(
        &mut self,
        req: &[u8],
        fds: &[BorrowedFd<'_>],
        reply: &mut [u8],
    ) -> std::io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &[IoSlice::new(req)],
            &cmsg,
            MsgFlags::empty(),
            None,
        )?;
        self.s.write_all(&req[n..])?;
        self.s.read_exact(reply)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn message_has_the_vfio_user_header_layout() {
        let m = message(36, Some(32));
        assert_eq!(m.len(), 36);
        assert_eq!(le32(&m, 4), 36, "msg_size");
        assert_eq!(le32(&m, 8) & FLAG_NO_REPLY, 0);
        assert_eq!(le32(&m, 12), 32, "reply length rides in error_no");
        assert_ne!(le32(&message(16, None), 8) & FLAG_NO_REPLY, 0);
    }

    #[test]
    fn peer_answers_with_the_requested_size_and_skips_posted_messages() {
        let dir = std::env::temp_dir().join(format!("vfud-raw-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("peer.sock");
        let p = path.clone();
        std::thread::spawn(move || serve_peer(&p));
        while !path.exists() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for mode in [Mode::Plain, Mode::Fds, Mode::Epoll] {
            let mut c = RawConn::connect(&path, mode).unwrap();
            c.post(&message(100, None)).unwrap();
            let mut reply = vec![0u8; 70_000];
            c.round_trip(&message(32, Some(70_000)), &mut reply)
                .unwrap();
            assert_eq!(le32(&reply, 4), 70_000);
            assert_eq!(le32(&reply, 8), FLAG_REPLY);
        }
        let mut c = RawConn::connect(&path, Mode::Fds).unwrap();
        let e = nix::sys::eventfd::EventFd::new().unwrap();
        let mut reply = [0u8; 16];
        c.round_trip_fds(&message(36, Some(16)), &[e.as_fd()], &mut reply)
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
