//! Live handover of a device, with its attached client, from one vfud process to another.
//!
//! A vfio-user connection is one socket plus fds (DMA maps, interrupt eventfds), and all of
//! them can cross a UNIX socket with `SCM_RIGHTS`. So the old process (A) streams the device
//! state to the new one (B) while still serving the client (pre-copy), then finishes the
//! message in hand, stops reading the client's socket, sends the rest of the state and the
//! session — negotiated caps, maps, interrupt setup, the client socket and listening socket —
//! and B resumes the device (its deferred SET_IRQS applied at RUNNING) and reads on from the
//! same socket. The client never notices beyond a pause. Until B confirms RUNNING, A can go
//! back to serving as if nothing happened.
//!
//! Control sockets (`vfud serve --control`, `--incoming`) carry frames with the vfio-user
//! header layout and private command numbers ([`kind`]); payloads are JSON or stream bytes.
//!
//! This module is the control protocol; [`export`] turns a session into a description plus
//! fds and back, and the two process roles are [`outgoing`] (A) and [`incoming`] (B).

pub mod export;
mod incoming;
mod outgoing;

pub(crate) use outgoing::OutgoingHandover;

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vfud_protocol::codec::{send_message, Frame, FrameReader, Limits};
use vfud_protocol::messages::version::Negotiated;
use vfud_protocol::{Header, ProtocolError};

/// Frame kinds on control sockets (the header's `cmd` field).
pub mod kind {
    /// Tool → server: a JSON [`super::ControlCommand`].
    pub const COMMAND: u16 = 0x7e01;
    /// Server → tool: a JSON event (progress, result, status).
    pub const EVENT: u16 = 0x7e02;
    /// A → B: JSON [`super::Hello`]; B enters RESUMING.
    pub const HELLO: u16 = 0x7f01;
    /// A → B: migration stream bytes.
    pub const DATA: u16 = 0x7f02;
    /// A → B: JSON [`super::SessionInfo`] with the session's fds.
    pub const SESSION: u16 = 0x7f03;
    /// B → A: ready for data.
    pub const READY: u16 = 0x7f10;
    /// B → A: the device runs in B; A must let go.
    pub const RUNNING: u16 = 0x7f11;
    /// B → A: JSON `{"error": ...}`; A resumes.
    pub const ERROR: u16 = 0x7f12;
}

/// A command to a server's control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlCommand {
    /// Hand the device over to the process listening on `to` (its `--incoming` socket).
    Handover {
        /// Incoming control socket of the new process.
        to: String,
        /// Most pre-copy rounds.
        #[serde(default)]
        max_rounds: Option<u32>,
    },
    /// Report the device's state and the last handover's timings.
    Status,
}

/// First message A → B.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// Device model.
    pub model: String,
}

/// A DMA mapping in a handover.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MapEntry {
    /// IOVA.
    pub iova: u64,
    /// Size.
    pub size: u64,
    /// Offset in the fd.
    pub offset: u64,
    /// DMA_MAP flags.
    pub flags: u32,
    /// Index of the fd in the message, if fd-backed.
    pub fd: Option<usize>,
}

/// One interrupt setting in a handover (a one-vector SET_IRQS).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IrqEntry {
    /// IRQ index.
    pub index: u32,
    /// Vector.
    pub vector: u32,
    /// "trigger", "mask" or "unmask".
    pub action: String,
    /// Index of the eventfd in the message, if any.
    pub fd: Option<usize>,
}

/// The client session handed over with the device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Device model.
    pub model: String,
    /// Negotiated capabilities.
    pub negotiated: Option<Negotiated>,
    /// DMA mappings.
    pub maps: Vec<MapEntry>,
    /// Interrupt setup.
    pub irqs: Vec<IrqEntry>,
    /// Index of the client socket fd.
    pub client: Option<usize>,
    /// Index of the listening socket fd.
    pub listener: Option<usize>,
    /// Device backend description and fd indices.
    pub backend: Option<(String, Vec<usize>)>,
    /// When A stopped reading the client (Unix time, ns), to measure the pause.
    pub stopped_at_unix_ns: u64,
    /// Shared BAR memory as (BAR index, fd index): the client mapped these memfds, so the
    /// new process must keep serving the same memory.
    #[serde(default)]
    pub bar_memory: Vec<(usize, usize)>,
}

/// Limits for control frames (stream chunks up to 16 MiB, many fds).
pub fn limits() -> Limits {
    Limits::with_xfer(vfud_protocol::codec::SCM_MAX_FD, 16 << 20)
}

/// Send one control frame.
pub fn send(
    sock: BorrowedFd<'_>,
    k: u16,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ProtocolError> {
    let h = Header {
        msg_id: 0,
        cmd: k,
        msg_size: (16 + payload.len()) as u32,
        flags: 0,
        error_no: 0,
    };
    send_message(sock, &h, &[payload], fds)
}

/// Send a JSON control frame.
pub fn send_json<T: Serialize>(sock: BorrowedFd<'_>, k: u16, v: &T) -> Result<(), ProtocolError> {
    let p = serde_json::to_vec(v).map_err(ProtocolError::InvalidJson)?;
    send(sock, k, &p, &[])
}

/// Receive one control frame on a blocking socket, waiting at most `timeout`.
pub fn recv(
    stream: &UnixStream,
    reader: &mut FrameReader,
    timeout: Duration,
) -> Result<Frame, ProtocolError> {
    stream.set_read_timeout(Some(timeout))?;
    match reader.read_frame(stream.as_fd(), &limits()) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(ProtocolError::Timeout),
        Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(ProtocolError::Timeout)
        }
        Err(e) => Err(e),
    }
}

/// Current Unix time in ns.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Timings of the last handover received (reported by the control socket's status).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HandoverStats {
    pub(crate) stopped_at_ns: u64,
    pub(crate) running_at_ns: u64,
    /// First reply to a request that waited during the handover (or, when none waited, the
    /// moment the device ran again).
    pub(crate) first_reply_at_ns: Option<u64>,
    /// No request was waiting when the new process took over.
    pub(crate) client_idle: bool,
}
