//! The per-device `mio` event loop: the listening socket, the one client connection, the
//! INTx unmask eventfd, the device's own fds and timer, control sockets for live handover, and
//! a waker for shutdown.
//!
//! One client at a time: a second connection is accepted only to be closed with a log line.
//! When the client goes away its DMA maps and interrupt fds are dropped but the device keeps
//! its state, and a new client may connect (spec "Client Disconnection").

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use serde_json::json;
use vfud_protocol::codec::{send_error, send_message, Frame, FrameReader};
use vfud_protocol::header::MessageKind;
use vfud_protocol::messages::{MigState, Request};
use vfud_protocol::ProtocolError;

use crate::device::Device;
use crate::dispatch::{borrowed, DeviceServer, ServerSettings};
use crate::handover::{self, kind, ControlCommand, Hello, SessionInfo};

const LISTENER: Token = Token(0);
const CLIENT: Token = Token(1);
const WAKER: Token = Token(2);
const INTX_UNMASK: Token = Token(3);
const CONTROL_LISTENER: Token = Token(4);
const CONTROL_BASE: usize = 1 << 20;
const DEVICE_BASE: usize = 16;

/// Lets another thread (the signal handler thread) stop every loop.
#[derive(Clone, Default)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
    wakers: Arc<Mutex<Vec<Arc<Waker>>>>,
}

impl ShutdownHandle {
    /// A fresh handle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask every loop to stop.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Ok(w) = self.wakers.lock() {
            for waker in w.iter() {
                let _ = waker.wake();
            }
        }
    }

    /// Whether shutdown was requested.
    pub fn is_triggered(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn register(&self, w: Arc<Waker>) {
        if let Ok(mut v) = self.wakers.lock() {
            v.push(w);
        }
    }
}

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Socket path.
    pub socket_path: PathBuf,
    /// chmod of the socket file.
    pub socket_mode: Option<u32>,
    /// Server-side settings (capabilities offered, v1 migration region).
    pub settings: ServerSettings,
}

impl ServeOptions {
    /// Defaults for a path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: path.into(),
            socket_mode: None,
            settings: ServerSettings::default(),
        }
    }
}

/// How a serving loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested.
    Shutdown,
    /// The device (and its client) now lives in another process; leave its socket path alone.
    HandedOver,
}

/// Bind `path`, removing a stale socket file only when nothing listens on it.
pub fn bind_socket(path: &Path, mode: Option<u32>) -> io::Result<UnixListener> {
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another server", path.display()),
                ))
            }
            Err(_) => {
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path)?;
            }
        }
    }
    let l = UnixListener::bind(path)?;
    if let Some(m) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))?;
    }
    Ok(l)
}

/// Serve `device` on `opts.socket_path` until `shutdown` triggers.
pub fn serve(
    device: Box<dyn Device>,
    opts: &ServeOptions,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let listener = bind_socket(&opts.socket_path, opts.socket_mode)?;
    let r = serve_listener(device, Some(listener), None, &opts.settings, shutdown);
    if !matches!(r, Ok(Outcome::HandedOver)) {
        let _ = std::fs::remove_file(&opts.socket_path);
    }
    r.map(|_| ())
}

/// Timings of the last handover received.
#[derive(Clone, Copy, Debug, Default)]
struct HandoverStats {
    stopped_at_ns: u64,
    running_at_ns: u64,
    /// First reply to a request that waited during the handover (or, when none waited, the
    /// moment the device ran again).
    first_reply_at_ns: Option<u64>,
    /// No request was waiting when the new process took over.
    client_idle: bool,
}

/// An outgoing handover in progress (this process is A).
struct Outgoing {
    tool: UnixStream,
    peer: UnixStream,
    peer_reader: FrameReader,
    rounds: u32,
    max_rounds: u32,
    bytes: u64,
    draining: bool,
    started: Instant,
}

struct Loop {
    poll: Poll,
    server: DeviceServer,
    listener: Option<UnixListener>,
    control: Option<UnixListener>,
    controls: HashMap<Token, (UnixStream, FrameReader)>,
    next_control: usize,
    registered: HashMap<RawFd, Token>,
    outgoing: Option<Outgoing>,
    paused: bool,
    stats: Option<HandoverStats>,
    /// Counters for `vfud status`.
    counters: crate::stats::Stats,
}

/// Serve on already bound sockets. `listener` may be absent for a process started with
/// `--incoming` (it receives the listener in a handover); `control` is the control socket.
pub fn serve_listener(
    device: Box<dyn Device>,
    listener: Option<UnixListener>,
    control: Option<UnixListener>,
    settings: &ServerSettings,
    shutdown: &ShutdownHandle,
) -> io::Result<Outcome> {
    let server =
        DeviceServer::new(device, settings.clone()).map_err(|e| io::Error::other(e.to_string()))?;
    let name = server.description().name;
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    shutdown.register(waker);
    let mut lp = Loop {
        poll,
        server,
        listener: None,
        control: None,
        controls: HashMap::new(),
        next_control: 0,
        registered: HashMap::new(),
        outgoing: None,
        paused: false,
        stats: None,
        counters: crate::stats::Stats::default(),
    };
    if let Some(l) = listener {
        lp.set_listener(l)?;
    }
    if let Some(c) = control {
        c.set_nonblocking(true)?;
        lp.poll.registry().register(
            &mut SourceFd(&c.as_raw_fd()),
            CONTROL_LISTENER,
            Interest::READABLE,
        )?;
        lp.control = Some(c);
    }
    let mut events = Events::with_capacity(64);
    tracing::info!(device = name, "serving");
    while !shutdown.is_triggered() {
        let (dev_fds, deadline) = lp.server.device_sources();
        lp.sync_registrations(&dev_fds)?;
        let mut timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if lp.outgoing.is_some() {
            timeout = Some(Duration::ZERO);
        }
        match lp.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => lp.accept_clients()?,
                CLIENT => lp.read_client(),
                WAKER => {}
                INTX_UNMASK => lp.server.irqs_mut().on_intx_unmask_event(),
                CONTROL_LISTENER => lp.accept_controls()?,
                Token(t) if t >= CONTROL_BASE => lp.read_control(Token(t)),
                Token(t) if t >= DEVICE_BASE => lp.server.device_event((t - DEVICE_BASE) as u32),
                _ => {}
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            lp.server.device_timer();
        }
        // Socket DMA may have left client bytes unread; epoll is edge-triggered, so read on.
        if lp.drain_deferred() {
            lp.read_client();
        }
        if lp.outgoing.is_some() && lp.handover_step() {
            tracing::info!(device = name, "device handed over; this process lets go");
            lp.server.release_after_handover();
            return Ok(Outcome::HandedOver);
        }
    }
    tracing::info!(device = name, "shutting down");
    Ok(Outcome::Shutdown)
}

impl Loop {
    fn set_listener(&mut self, l: UnixListener) -> io::Result<()> {
        l.set_nonblocking(true)?;
        self.poll.registry().register(
            &mut SourceFd(&l.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        self.listener = Some(l);
        Ok(())
    }

    fn sync_registrations(&mut self, dev_fds: &[(RawFd, u32)]) -> io::Result<()> {
        let mut want: HashMap<RawFd, Token> = dev_fds
            .iter()
            .map(|(fd, t)| (*fd, Token(DEVICE_BASE + *t as usize)))
            .collect();
        if let Some(fd) = self.server.irqs_fd() {
            want.insert(fd, INTX_UNMASK);
        }
        let stale: Vec<RawFd> = self
            .registered
            .iter()
            .filter(|(fd, t)| want.get(fd) != Some(t))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            self.registered.remove(&fd);
        }
        for (fd, t) in want {
            if let std::collections::hash_map::Entry::Vacant(e) = self.registered.entry(fd) {
                self.poll
                    .registry()
                    .register(&mut SourceFd(&fd), t, Interest::READABLE)?;
                e.insert(t);
            }
        }
        Ok(())
    }

    fn accept_clients(&mut self) -> io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.server.client.is_some() {
                        tracing::warn!(
                            device = self.server.description().name,
                            "refusing a second client: this device already has one"
                        );
                        drop(stream);
                        continue;
                    }
                    stream.set_nonblocking(true)?;
                    self.poll.registry().register(
                        &mut SourceFd(&stream.as_raw_fd()),
                        CLIENT,
                        Interest::READABLE,
                    )?;
                    tracing::info!(device = self.server.description().name, "client connected");
                    self.counters.client_connected();
                    self.server.client = Some(crate::dispatch::ClientConn::new(stream, 0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn disconnect(&mut self, why: &str) {
        if let Some(c) = &self.server.client {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
        }
        tracing::info!(
            device = self.server.description().name,
            "client disconnected: {why}"
        );
        self.server.client_gone();
    }

    /// Read and process every complete frame available from the client. While a handover is
    /// stopping the client, finish the frame in hand and read no further.
    fn read_client(&mut self) {
        loop {
            let limits = self.server.limits();
            let paused = self.paused;
            let Some(c) = self.server.client.as_mut() else {
                return;
            };
            if paused && !c.reader.in_progress() {
                return;
            }
            let frame = match c.reader.read_frame(c.stream.as_fd(), &limits) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(ProtocolError::Disconnected) => return self.disconnect("closed by peer"),
                Err(e) => return self.disconnect(&format!("broken frame: {e}")),
            };
            if self.process_frame(frame).is_err() {
                return self.disconnect("send failed");
            }
            let _ = self.drain_deferred();
        }
    }

    /// Run deferred work and any commands it had to set aside. Returns whether socket DMA
    /// happened (client bytes may then be waiting unread).
    fn drain_deferred(&mut self) -> bool {
        let mut dma = false;
        loop {
            dma |= self.server.run_deferred();
            let Some(frame) = self
                .server
                .client
                .as_mut()
                .and_then(|c| c.backlog.pop_front())
            else {
                return dma;
            };
            if self.process_frame(frame).is_err() {
                self.disconnect("send failed");
                return dma;
            }
        }
    }

    /// Decode, dispatch and answer one frame. `Err` only when the socket is unusable.
    fn process_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        let server = &mut self.server;
        let h = frame.header;
        let no_reply = match h.kind() {
            Ok(MessageKind::Command { no_reply }) => no_reply,
            Ok(_) => {
                tracing::debug!(
                    msg_id = h.msg_id,
                    cmd = h.cmd,
                    "unexpected reply from client dropped"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(msg_id = h.msg_id, "bad message type: {e}");
                self.counters.record(h.cmd, false);
                return reply_error(server, &h, e.errno(), false);
            }
        };
        let len = frame.payload.len();
        let result = Request::decode(h.cmd, &frame.payload, frame.fds, &server.limits())
            .map_err(crate::error::RequestError::from)
            .and_then(|req| server.handle(req, len));
        self.counters.record(h.cmd, result.is_ok());
        let r = match result {
            Ok(reply) if !no_reply => {
                let Some(c) = server.client.as_ref() else {
                    return Ok(());
                };
                send_message(
                    c.stream.as_fd(),
                    &h.reply(reply.payload.len()),
                    &[&reply.payload],
                    &borrowed(&reply.fds),
                )
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(msg_id = h.msg_id, cmd = h.cmd, errno = ?e.errno, "request failed: {}", e.message);
                reply_error(server, &h, e.errno, no_reply)
            }
        };
        if let Some(st) = &mut self.stats {
            if st.first_reply_at_ns.is_none() && !no_reply {
                let now = handover::now_ns();
                st.first_reply_at_ns = Some(now);
                tracing::info!(
                    device = self.server.description().name,
                    pause_ms = (now.saturating_sub(st.stopped_at_ns)) as f64 / 1e6,
                    "first reply after handover (the pause the client saw)"
                );
            }
        }
        r
    }

    fn accept_controls(&mut self) -> io::Result<()> {
        let Some(l) = &self.control else {
            return Ok(());
        };
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)?;
                    let t = Token(CONTROL_BASE + self.next_control);
                    self.next_control += 1;
                    self.poll.registry().register(
                        &mut SourceFd(&s.as_raw_fd()),
                        t,
                        Interest::READABLE,
                    )?;
                    self.controls.insert(t, (s, FrameReader::new()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn close_control(&mut self, t: Token) {
        if let Some((s, _)) = self.controls.remove(&t) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&s.as_raw_fd()));
        }
    }

    fn read_control(&mut self, t: Token) {
        loop {
            let Some((s, r)) = self.controls.get_mut(&t) else {
                return;
            };
            let frame = match r.read_frame(s.as_fd(), &handover::limits()) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(_) => return self.close_control(t),
            };
            if let Err(e) = self.control_frame(t, frame) {
                tracing::warn!(device = self.server.description().name, "control: {e}");
                if let Some((s, _)) = self.controls.get(&t) {
                    let _ = handover::send_json(s.as_fd(), kind::ERROR, &json!({ "error": e }));
                }
                if self.server.mig_state() == MigState::Resuming {
                    // A failed incoming handover: forget the partial state.
                    let _ = self.server.handle(Request::DeviceReset, 0);
                }
                return self.close_control(t);
            }
        }
    }

    fn control_frame(&mut self, t: Token, f: Frame) -> Result<(), String> {
        let name = self.server.description().name;
        match f.header.cmd {
            kind::COMMAND => {
                let cmd: ControlCommand =
                    serde_json::from_slice(&f.payload).map_err(|e| e.to_string())?;
                match cmd {
                    ControlCommand::Status => {
                        let st = self.stats.unwrap_or_default();
                        let mut ev = json!({
                            "event": "status",
                            "device": name,
                            "state": format!("{:?}", self.server.mig_state()),
                            "client": self.server.client.is_some(),
                            "handover_stopped_at_ns": st.stopped_at_ns,
                            "handover_running_at_ns": st.running_at_ns,
                            "handover_first_reply_at_ns": st.first_reply_at_ns,
                            "handover_client_idle": st.client_idle,
                        });
                        if let (Some(o), serde_json::Value::Object(more)) =
                            (ev.as_object_mut(), self.counters.report(&self.server))
                        {
                            o.extend(more);
                        }
                        let (s, _) = self.controls.get(&t).ok_or("control gone")?;
                        handover::send_json(s.as_fd(), kind::EVENT, &ev).map_err(|e| e.to_string())
                    }
                    ControlCommand::Handover { to, max_rounds } => {
                        let (s, _) = self.controls.remove(&t).ok_or("control gone")?;
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&s.as_raw_fd()));
                        s.set_nonblocking(false).map_err(|e| e.to_string())?;
                        self.start_handover(s, &to, max_rounds.unwrap_or(10))
                    }
                }
            }
            kind::HELLO => {
                let h: Hello = serde_json::from_slice(&f.payload).map_err(|e| e.to_string())?;
                if h.model != name {
                    return Err(format!("handover of a {} to a {name}", h.model));
                }
                if self.server.client.is_some() {
                    return Err("this process already serves a client".into());
                }
                self.server
                    .set_mig_state(MigState::Resuming)
                    .map_err(|e| e.message)?;
                let (s, _) = self.controls.get(&t).ok_or("control gone")?;
                handover::send(s.as_fd(), kind::READY, &[], &[]).map_err(|e| e.to_string())
            }
            kind::DATA => self
                .server
                .handover_write(&f.payload)
                .map_err(|e| e.message),
            kind::SESSION => {
                let info: SessionInfo =
                    serde_json::from_slice(&f.payload).map_err(|e| e.to_string())?;
                let mut fds: Vec<Option<OwnedFd>> = f.fds.into_iter().map(Some).collect();
                let listener = match info.listener {
                    Some(i) => Some(
                        fds.get_mut(i)
                            .and_then(Option::take)
                            .ok_or("listener fd missing")?,
                    ),
                    None => None,
                };
                // Indices stay valid: the taken listener slot is simply empty.
                self.server
                    .import_session(&info, fds)
                    .map_err(|e| e.message)?;
                if let Some(c) = &self.server.client {
                    self.poll
                        .registry()
                        .register(
                            &mut SourceFd(&c.stream.as_raw_fd()),
                            CLIENT,
                            Interest::READABLE,
                        )
                        .map_err(|e| e.to_string())?;
                }
                if let Some(l) = listener {
                    self.set_listener(UnixListener::from(l))
                        .map_err(|e| e.to_string())?;
                }
                // Did a request wait while nobody read the socket? If not, the client saw no
                // pause at all; the stop→running window bounds what it would have seen.
                let running_at = handover::now_ns();
                let waiting = self.server.client.as_ref().is_some_and(|c| {
                    let mut b = [0u8; 1];
                    matches!(
                        nix::sys::socket::recv(
                            c.stream.as_raw_fd(),
                            &mut b,
                            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                        ),
                        Ok(n) if n > 0
                    )
                });
                self.stats = Some(HandoverStats {
                    stopped_at_ns: info.stopped_at_unix_ns,
                    running_at_ns: running_at,
                    first_reply_at_ns: (!waiting).then_some(running_at),
                    client_idle: !waiting,
                });
                tracing::info!(device = name, "device taken over, running");
                let (s, _) = self.controls.get(&t).ok_or("control gone")?;
                handover::send(s.as_fd(), kind::RUNNING, &[], &[]).map_err(|e| e.to_string())?;
                // The client may have sent requests while nobody read the socket.
                self.read_client();
                Ok(())
            }
            other => Err(format!("unexpected control frame {other:#x}")),
        }
    }

    fn tool_event(&mut self, ev: serde_json::Value) {
        if let Some(o) = &self.outgoing {
            let _ = handover::send_json(o.tool.as_fd(), kind::EVENT, &ev);
        }
    }

    /// Begin handing the device over to the process listening on `to`.
    fn start_handover(
        &mut self,
        tool: UnixStream,
        to: &str,
        max_rounds: u32,
    ) -> Result<(), String> {
        let fail = |tool: &UnixStream, msg: String| {
            let _ = handover::send_json(
                tool.as_fd(),
                kind::EVENT,
                &json!({"event": "error", "message": msg}),
            );
            Ok(())
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
        let ready = handover::send_json(peer.as_fd(), kind::HELLO, &hello)
            .and_then(|()| handover::recv(&peer, &mut peer_reader, Duration::from_secs(10)));
        match ready {
            Ok(f) if f.header.cmd == kind::READY => {}
            Ok(f) => {
                let msg = String::from_utf8_lossy(&f.payload).into_owned();
                return fail(&tool, format!("the new process refused: {msg}"));
            }
            Err(e) => return fail(&tool, format!("the new process did not answer: {e}")),
        }
        if let Err(e) = self.server.set_mig_state(MigState::PreCopy) {
            return fail(&tool, format!("cannot start pre-copy: {}", e.message));
        }
        tracing::info!(device = hello.model, to, "handover started");
        self.outgoing = Some(Outgoing {
            tool,
            peer,
            peer_reader,
            rounds: 0,
            max_rounds,
            bytes: 0,
            draining: false,
            started: Instant::now(),
        });
        Ok(())
    }

    /// One step of an outgoing handover; true once the device runs in the new process.
    fn handover_step(&mut self) -> bool {
        let Some(o) = &mut self.outgoing else {
            return false;
        };
        if !o.draining {
            // Pre-copy while still serving the client: a bounded slice per loop turn.
            let want = 4 << 20;
            let data = match self.server.handover_read(want) {
                Ok(d) => d,
                Err(e) => {
                    return self.abort_handover(format!("reading device state: {}", e.message))
                }
            };
            if !data.is_empty() {
                if let Err(e) = handover::send(o.peer.as_fd(), kind::DATA, &data, &[]) {
                    return self.abort_handover(format!("sending to the new process: {e}"));
                }
                o.bytes += data.len() as u64;
            }
            if data.len() < want {
                o.rounds += 1;
                let (initial, dirty) = self.server.precopy_info().unwrap_or((0, 0));
                let (rounds, bytes) = (o.rounds, o.bytes);
                let done = (initial == 0 && dirty <= 256 * 1024) || rounds >= o.max_rounds;
                if done {
                    o.draining = true;
                    self.paused = true;
                }
                self.tool_event(json!({"event": "round", "round": rounds, "bytes": bytes, "remaining": initial + dirty}));
            }
            return false;
        }
        // Stop: finish the client's message in hand, then read no more from it.
        if self
            .server
            .client
            .as_ref()
            .is_some_and(|c| c.reader.in_progress() || !c.backlog.is_empty())
        {
            return false;
        }
        let stopped_at = handover::now_ns();
        let stop_clock = Instant::now();
        if let Some(c) = &self.server.client {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
        }
        if let Err(e) = self.server.set_mig_state(MigState::StopCopy) {
            return self.abort_handover(format!("stop-copy: {}", e.message));
        }
        let mut stop_bytes = 0u64;
        loop {
            let data = match self.server.handover_read(4 << 20) {
                Ok(d) => d,
                Err(e) => {
                    return self.abort_handover(format!("reading device state: {}", e.message))
                }
            };
            if data.is_empty() {
                break;
            }
            let Some(o) = &mut self.outgoing else {
                return false;
            };
            if let Err(e) = handover::send(o.peer.as_fd(), kind::DATA, &data, &[]) {
                return self.abort_handover(format!("sending to the new process: {e}"));
            }
            stop_bytes += data.len() as u64;
            o.bytes += data.len() as u64;
        }
        let mut fds = Vec::new();
        let mut info = match self.server.export_session(&mut fds) {
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
        let Some(o) = &mut self.outgoing else {
            return false;
        };
        let payload = match serde_json::to_vec(&info) {
            Ok(p) => p,
            Err(e) => return self.abort_handover(format!("session: {e}")),
        };
        let b: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let answer = handover::send(o.peer.as_fd(), kind::SESSION, &payload, &b)
            .and_then(|()| handover::recv(&o.peer, &mut o.peer_reader, Duration::from_secs(20)));
        match answer {
            Ok(f) if f.header.cmd == kind::RUNNING => {
                let switchover = stop_clock.elapsed().as_secs_f64() * 1000.0;
                let ev = json!({
                    "event": "done",
                    "rounds": o.rounds,
                    "bytes": o.bytes,
                    "stop_copy_bytes": stop_bytes,
                    "total_ms": o.started.elapsed().as_secs_f64() * 1000.0,
                    "switchover_ms": switchover,
                    "stopped_at_ns": stopped_at,
                });
                let _ = handover::send_json(o.tool.as_fd(), kind::EVENT, &ev);
                // The new process owns the device, its client and its listener now.
                self.server.client = None;
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
        self.tool_event(json!({"event": "error", "message": why}));
        self.outgoing = None;
        self.paused = false;
        if let Err(e) = self.server.set_mig_state(MigState::Running) {
            tracing::error!(
                "cannot return to RUNNING after a failed handover: {}",
                e.message
            );
        }
        if let Some(c) = &self.server.client {
            let fd = c.stream.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            let _ = self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), CLIENT, Interest::READABLE);
        }
        self.read_client();
        false
    }
}

fn reply_error(
    server: &DeviceServer,
    h: &vfud_protocol::Header,
    errno: nix::errno::Errno,
    no_reply: bool,
) -> Result<(), ProtocolError> {
    if no_reply {
        return Ok(());
    }
    match server.client.as_ref() {
        Some(c) => send_error(c.stream.as_fd(), h, errno),
        None => Ok(()),
    }
}

/// Wait until a server has bound `path` (the file appears at bind time, already listening).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}
