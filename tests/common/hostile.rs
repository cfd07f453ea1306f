//! A raw vfio-user peer for hostile-client tests: an in-process server on a temporary
//! socket, frames sent byte for byte, and what the server did about each one.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use vfud_protocol::codec::{send_chunks, FrameReader, Limits};
use vfud_protocol::header::{Command, Header, MessageKind};
use vfud_protocol::messages::version::{Capabilities, VersionMessage, PROTOCOL_MAJOR};
use vfud_protocol::messages::DeviceInfo;
use vfud_protocol::wire::put;
use vfud_server::{ServeOptions, ShutdownHandle};

/// What the server did with a hostile frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A successful reply.
    Ok,
    /// An error reply with this errno.
    Errno(Errno),
    /// No reply at all (the probe that followed was answered first).
    Silent,
    /// The server closed the connection.
    Disconnect,
    /// Nothing at all within the read timeout (the server neither answered nor closed).
    Timeout,
}

/// `vfud_server::serve` of one device on a temporary socket, on its own thread.
pub struct InProcess {
    pub path: PathBuf,
    pub shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    /// Serve the device `spec` (a `vfud_devices` spec).
    pub fn start(spec: &str) -> InProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev.sock");
        let shutdown = ShutdownHandle::new();
        let device = vfud_devices::create(spec).expect("device");
        let (p, s) = (path.clone(), shutdown.clone());
        let thread =
            std::thread::spawn(move || vfud_server::serve(device, &ServeOptions::new(p), &s));
        assert!(super::wait_for_path(&path, Duration::from_secs(10)));
        InProcess {
            path,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Whether the serving thread is still running.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw connection.
pub struct Raw {
    pub s: UnixStream,
    reader: FrameReader,
    timed_out: bool,
}

/// A frame's bytes: header with `msg_size` covering `payload`, then the payload.
pub fn frame(id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    frame_sized(id, cmd, flags, (16 + payload.len()) as u32, payload)
}

/// A frame whose header claims `msg_size` whatever the payload.
pub fn frame_sized(id: u16, cmd: u16, flags: u32, msg_size: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        msg_id: id,
        cmd,
        msg_size,
        flags,
        error_no: 0,
    };
    let mut out = h.as_wire_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A VERSION payload with these capabilities.
pub fn version_payload(caps: Option<Capabilities>) -> Vec<u8> {
    VersionMessage {
        major: PROTOCOL_MAJOR,
        minor: 0,
        caps,
    }
    .encode()
}

/// Message id of hostile frames; the probe after them uses [`PROBE_ID`].
pub const CASE_ID: u16 = 0x4242;
/// Message id of the probe.
pub const PROBE_ID: u16 = 0x5151;

impl Raw {
    /// Connect (retrying while the server still holds the previous client).
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            s,
            reader: FrameReader::new(),
            timed_out: false,
        }
    }

    /// Send bytes with fds on the first byte; errors (the server hung up) are ignored.
    pub fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let _ = send_chunks(self.s.as_fd(), &[bytes], fds);
    }

    /// The next frame; `None` on EOF, error or timeout (which sets `timed_out`).
    pub fn recv(&mut self) -> Option<vfud_protocol::codec::Frame> {
        match self
            .reader
            .read_frame(self.s.as_fd(), &Limits::with_xfer(64, 64 << 20))
        {
            Ok(Some(f)) => Some(f),
            Ok(None) => {
                self.timed_out = true;
                None
            }
            Err(vfud_protocol::ProtocolError::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                self.timed_out = true;
                None
            }
            Err(_) => None,
        }
    }

    /// Send a request and return its outcome (no probe).
    pub fn request(&mut self, cmd: Command, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Outcome {
        self.send(&frame(CASE_ID, cmd as u16, 0, payload), fds);
        self.outcome(false)
    }

    /// Negotiate; `caps` as given.
    pub fn negotiate(&mut self, caps: Option<Capabilities>) {
        let o = self.request(Command::Version, &version_payload(caps), &[]);
        assert_eq!(o, Outcome::Ok, "VERSION");
    }

    /// Read until the reply to the case (or, with `probe`, the probe's reply) arrives.
    pub fn outcome(&mut self, probe: bool) -> Outcome {
        if probe {
            let mut p = Vec::new();
            put(
                &mut p,
                &DeviceInfo {
                    argsz: 16,
                    ..Default::default()
                },
            );
            self.send(&frame(PROBE_ID, Command::DeviceGetInfo as u16, 0, &p), &[]);
        }
        loop {
            let Some(f) = self.recv() else {
                return match self.timed_out {
                    true => Outcome::Timeout,
                    false => Outcome::Disconnect,
                };
            };
            let id = f.header.msg_id;
            let kind = f.header.kind();
            if id == PROBE_ID && probe {
                return Outcome::Silent;
            }
            if id != CASE_ID {
                continue; // a socket-DMA request of the device: not what we wait for
            }
            return match kind {
                Ok(MessageKind::ErrorReply(e)) => Outcome::Errno(Errno::from_raw(e as i32)),
                Ok(MessageKind::Reply) => Outcome::Ok,
                _ => continue,
            };
        }
    }
}

/// Connect and negotiate a fresh client, retrying while the server is still letting go of
/// the previous one (a second client is refused while one is attached); then check that it
/// is served (config space vendor id of the device).
pub fn fresh_client_is_served(path: &Path) -> Raw {
    for _ in 0..500 {
        let mut r = Raw::connect(path);
        r.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        r.send(
            &frame(1, Command::Version as u16, 0, &version_payload(None)),
            &[],
        );
        match r.recv() {
            Some(f) if matches!(f.header.kind(), Ok(MessageKind::Reply)) => {
                r.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return r;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("no fresh client was served");
}

/// Own an fd for passing.
pub fn owned<T: Into<OwnedFd>>(t: T) -> OwnedFd {
    t.into()
}
