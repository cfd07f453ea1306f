//! Control sockets as the event loop reads them: a tool's commands (status, start a
//! handover: the old process's role is in [`super::outgoing`]) and the new process's role
//! (B): HELLO → RESUMING, DATA → the stream, SESSION → adopt the client and run.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;

use mio::Token;
use serde_json::json;
use vfud_protocol::codec::Frame;
use vfud_protocol::messages::MigState;

use super::{kind, ControlCommand, HandoverStats, Hello, SessionInfo};
use crate::error::{chain, HandoverError};
use crate::event_loop::Loop;

impl Loop {
    /// A control socket is readable.
    pub(crate) fn read_control(&mut self, t: Token) {
        loop {
            let Some((s, r)) = self.controls.get_mut(&t) else {
                return;
            };
            let frame = match r.read_frame(s.as_fd(), &super::limits()) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(_) => return self.close_control(t),
            };
            if let Err(e) = self.control_frame(t, frame) {
                let why = chain(&e);
                tracing::warn!(device = self.server.description().name, "control: {why}");
                if let Some((s, _)) = self.controls.get(&t) {
                    let _ = super::send_json(s.as_fd(), kind::ERROR, &json!({ "error": why }));
                }
                if self.server.mig_state() == MigState::Resuming {
                    // A failed incoming handover: forget the partial state.
                    self.server.abandon();
                }
                return self.close_control(t);
            }
        }
    }

    fn control_stream(&self, t: Token) -> Result<std::os::fd::BorrowedFd<'_>, HandoverError> {
        let (s, _) = self
            .controls
            .get(&t)
            .ok_or_else(|| HandoverError::Protocol("control socket gone".into()))?;
        Ok(s.as_fd())
    }

    fn control_frame(&mut self, t: Token, f: Frame) -> Result<(), HandoverError> {
        let name = self.server.description().name;
        let refuse = |e: crate::error::RequestError| HandoverError::Request(Box::new(e));
        match f.header.cmd {
            kind::COMMAND => match serde_json::from_slice::<ControlCommand>(&f.payload)? {
                ControlCommand::Status => {
                    let st = self.stats.unwrap_or_default();
                    let mut ev = json!({
                        "event": "status",
                        "device": name,
                        "state": format!("{:?}", self.server.mig_state()),
                        "client": self.client.is_some(),
                        "handover_stopped_at_ns": st.stopped_at_ns,
                        "handover_running_at_ns": st.running_at_ns,
                        "handover_first_reply_at_ns": st.first_reply_at_ns,
                        "handover_client_idle": st.client_idle,
                    });
                    let more = self.counters.report(&self.server, self.client.is_some());
                    if let (Some(o), serde_json::Value::Object(more)) = (ev.as_object_mut(), more) {
                        o.extend(more);
                    }
                    Ok(super::send_json(self.control_stream(t)?, kind::EVENT, &ev)?)
                }
                ControlCommand::Handover { to, max_rounds } => {
                    let (s, _) = self
                        .controls
                        .remove(&t)
                        .ok_or_else(|| HandoverError::Protocol("control socket gone".into()))?;
                    self.deregister(std::os::fd::AsRawFd::as_raw_fd(&s));
                    s.set_nonblocking(false)?;
                    self.start_handover(s, &to, max_rounds.unwrap_or(10));
                    Ok(())
                }
            },
            kind::HELLO => {
                let h: Hello = serde_json::from_slice(&f.payload)?;
                if h.model != name {
                    return Err(HandoverError::Protocol(format!(
                        "handover of a {} to a {name}",
                        h.model
                    )));
                }
                if self.client.is_some() {
                    return Err(HandoverError::Protocol(
                        "this process already serves a client".into(),
                    ));
                }
                self.server
                    .set_mig_state(MigState::Resuming)
                    .map_err(refuse)?;
                Ok(super::send(self.control_stream(t)?, kind::READY, &[], &[])?)
            }
            kind::DATA => self.server.handover_write(&f.payload).map_err(refuse),
            kind::SESSION => self.adopt_session(t, f),
            other => Err(HandoverError::Protocol(format!(
                "unexpected control frame {other:#x}"
            ))),
        }
    }

    fn adopt_session(&mut self, t: Token, f: Frame) -> Result<(), HandoverError> {
        let info: SessionInfo = serde_json::from_slice(&f.payload)?;
        let mut fds: Vec<Option<OwnedFd>> = f.fds.into_iter().map(Some).collect();
        let listener = match info.listener {
            Some(i) => Some(
                fds.get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| HandoverError::Protocol("listener fd missing".into()))?,
            ),
            None => None,
        };
        // Indices stay valid: the taken listener slot is simply empty.
        if let Some(c) = self.server.import_session(&info, fds)? {
            self.set_client(c)?;
        }
        if let Some(l) = listener {
            self.set_listener(UnixListener::from(l))?;
        }
        // Did a request wait while nobody read the socket? If not, the client saw no pause
        // at all; the stop→running window bounds what it would have seen.
        let running_at = super::now_ns();
        let waiting = self.client.as_ref().is_some_and(|c| c.has_unread());
        self.stats = Some(HandoverStats {
            stopped_at_ns: info.stopped_at_unix_ns,
            running_at_ns: running_at,
            first_reply_at_ns: (!waiting).then_some(running_at),
            client_idle: !waiting,
        });
        tracing::info!(
            device = self.server.description().name,
            "device taken over, running"
        );
        super::send(self.control_stream(t)?, kind::RUNNING, &[], &[])?;
        self.supervised_adopted();
        // The client may have sent requests while nobody read the socket.
        self.read_client();
        Ok(())
    }

    /// After a handover, the first reply marks the end of the pause the client saw.
    pub(crate) fn note_reply_after_handover(&mut self) {
        if let Some(st) = &mut self.stats {
            if st.first_reply_at_ns.is_none() {
                let now = super::now_ns();
                st.first_reply_at_ns = Some(now);
                tracing::info!(
                    device = self.server.description().name,
                    pause_ms = (now.saturating_sub(st.stopped_at_ns)) as f64 / 1e6,
                    "first reply after handover (the pause the client saw)"
                );
            }
        }
    }
}
