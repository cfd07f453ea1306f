//! The old process's role (A): stream pre-copy rounds while serving the client, then stop
//! at a clean point, send the rest and the session, and let go once B runs the device.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;
use vfud_protocol::codec::FrameReader;
use vfud_protocol::messages::MigState;

use super::{kind, Hello};
use crate::error::chain;
use crate::event_loop::{Loop, CLIENT};

/// Pre-copy bytes per loop turn: small, so a client request waits behind at most this much
/// stream work while the device is still being served.
const PRECOPY_SLICE: usize = 64 << 10;
/// Stop-copy chunk: the client waits for the whole stop anyway, so move big pieces.
const STOP_SLICE: usize = 4 << 20;

/// An outgoing handover in progress.
pub(crate) struct OutgoingHandover {
    tool: UnixStream,
    peer: UnixStream,
    peer_reader: FrameReader,
    rounds: u32,
    max_rounds: u32,
    bytes: u64,
    draining: bool,
    started: Instant,
}

impl OutgoingHandover {
    fn event(&self, ev: &serde_json::Value) {
        let _ = super::send_json(self.tool.as_fd(), kind::EVENT, ev);
    }
}

impl Loop {
    /// Begin handing the device over to the process listening on `to`. Failures are
    /// reported to the tool and leave the device serving as before.
    pub(crate) fn start_handover(&mut self, tool: UnixStream, to: &str, max_rounds: u32) {
        let fail = |tool: &UnixStream, msg: String| {
            let ev = json!({"event": "error", "message": msg});
            let _ = super::send_json(tool.as_fd(), kind::EVENT, &ev);
        };
        if self.outgoing.is_some() {
            return fail(&tool, "a handover is already in progress".into());
        }
        let peer = match UnixStream::connect(to) {
            Ok(p) => p,
            Err(e) => return fail(&tool, format!("cannot reach {to}: {e}")),
        };
        let mut peer_reader = FrameReader::new();
        let hello = Hello {
            model: self.server.description().name.to_string(),
        };
        let ready = super::send_json(peer.as_fd(), kind::HELLO, &hello)
            .and_then(|()| super::recv(&peer, &mut peer_reader, Duration::from_secs(10)));
        match ready {
            Ok(f) if f.header.cmd == kind::READY => {}
            Ok(f) => {
                let msg = String::from_utf8_lossy(&f.payload).into_owned();
                return fail(&tool, format!("the new process refused: {msg}"));
            }
            Err(e) => return fail(&tool, format!("the new process did not answer: {e}")),
        }
        if let Err(e) = self.server.set_mig_state(MigState::PreCopy) {
            return fail(&tool, format!("cannot start pre-copy: {}", chain(&e)));
        }
        tracing::info!(device = hello.model, to, "handover started");
        self.outgoing = Some(OutgoingHandover {
            tool,
            peer,
            peer_reader,
            rounds: 0,
            max_rounds,
            bytes: 0,
            draining: false,
            started: Instant::now(),
        });
    }

    /// One step of an outgoing handover; true once the device runs in the new process.
    pub(crate) fn handover_step(&mut self) -> bool {
        let Some(o) = &mut self.outgoing else {
            return false;
        };
        if !o.draining {
            // Pre-copy while still serving the client: a bounded slice per loop turn.
            let data = match self.server.handover_read(PRECOPY_SLICE) {
                Ok(d) => d,
                Err(e) => {
                    return self.abort_handover(format!("reading device state: {}", chain(&e)))
                }
            };
            let Some(o) = &mut self.outgoing else {
                return false;
            };
            if !data.is_empty() {
                if let Err(e) = super::send(o.peer.as_fd(), kind::DATA, &data, &[]) {
                    return self.abort_handover(format!("sending to the new process: {e}"));
                }
                o.bytes += data.len() as u64;
            }
            if data.len() < PRECOPY_SLICE {
                o.rounds += 1;
                let (initial, dirty) = self.server.precopy_info().unwrap_or((0, 0));
                o.draining = (initial == 0 && dirty <= 256 * 1024) || o.rounds >= o.max_rounds;
                o.event(&json!({"event": "round", "round": o.rounds, "bytes": o.bytes, "remaining": initial + dirty}));
            }
            return false;
        }
        // Stop at a clean point: no frame half read, and no socket DMA awaiting the client's
        // reply (which would otherwise reach the new process, which never asked).
        let half_read = matches!(&self.client, Some(c) if c.in_progress());
        let clean = !half_read && self.server.socket_dma_in_flight() == 0;
        if !clean {
            return false;
        }
        self.stop_and_send()
    }

    fn stop_and_send(&mut self) -> bool {
        let stopped_at = super::now_ns();
        let stop_clock = Instant::now();
        if let Some(c) = &self.client {
            self.deregister(c.raw_fd());
        }
        if let Err(e) = self.server.set_mig_state(MigState::StopCopy) {
            return self.abort_handover(format!("stop-copy: {}", chain(&e)));
        }
        let mut stop_bytes = 0u64;
        loop {
            let data = match self.server.handover_read(STOP_SLICE) {
                Ok(d) => d,
                Err(e) => {
                    return self.abort_handover(format!("reading device state: {}", chain(&e)))
                }
            };
            if data.is_empty() {
                break;
            }
            let Some(o) = &mut self.outgoing else {
                return false;
            };
            if let Err(e) = super::send(o.peer.as_fd(), kind::DATA, &data, &[]) {
                return self.abort_handover(format!("sending to the new process: {e}"));
            }
            stop_bytes += data.len() as u64;
            o.bytes += data.len() as u64;
        }
        let mut fds = Vec::new();
        let mut info = match self.server.export_session(self.client.as_ref(), &mut fds) {
            Ok(i) => i,
            Err(e) => return self.abort_handover(format!("collecting the session: {e}")),
        };
        if let Some(l) = &self.listener {
            match l.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    fds.push(fd);
                    info.listener = Some(fds.len() - 1);
                }
                Err(e) => return self.abort_handover(format!("listener: {e}")),
            }
        }
        info.stopped_at_unix_ns = stopped_at;
        let payload = match serde_json::to_vec(&info) {
            Ok(p) => p,
            Err(e) => return self.abort_handover(format!("session: {e}")),
        };
        let Some(o) = &mut self.outgoing else {
            return false;
        };
        let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let answer = super::send(o.peer.as_fd(), kind::SESSION, &payload, &b)
            .and_then(|()| super::recv(&o.peer, &mut o.peer_reader, Duration::from_secs(20)));
        match answer {
            Ok(f) if f.header.cmd == kind::RUNNING => {
                o.event(&json!({
                    "event": "done",
                    "rounds": o.rounds,
                    "bytes": o.bytes,
                    "stop_copy_bytes": stop_bytes,
                    "total_ms": o.started.elapsed().as_secs_f64() * 1000.0,
                    "switchover_ms": stop_clock.elapsed().as_secs_f64() * 1000.0,
                    "stopped_at_ns": stopped_at,
                }));
                // The new process owns the device, its client and its listener now.
                self.client = None;
                self.listener = None;
                true
            }
            Ok(f) => {
                let msg = String::from_utf8_lossy(&f.payload).into_owned();
                self.abort_handover(format!("the new process failed to take over: {msg}"))
            }
            Err(e) => self.abort_handover(format!("no confirmation from the new process: {e}")),
        }
    }

    /// Go back to serving as if nothing happened.
    fn abort_handover(&mut self, why: String) -> bool {
        tracing::warn!(
            device = self.server.description().name,
            "handover aborted: {why}; resuming"
        );
        if let Some(o) = self.outgoing.take() {
            o.event(&json!({"event": "error", "message": why}));
        }
        if let Err(e) = self.server.set_mig_state(MigState::Running) {
            tracing::error!(
                "cannot return to RUNNING after a failed handover: {}",
                chain(&e)
            );
        }
        if let Some(fd) = self.client.as_ref().map(|c| c.raw_fd()) {
            self.deregister(fd);
            let _ = self.register(fd, CLIENT);
        }
        self.read_client();
        false
    }
}
