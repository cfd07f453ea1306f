//! The per-device `mio` event loop: the listening socket, the one client [`Connection`], the
//! INTx unmask eventfd, the device's own fds and timer, control sockets for live handover
//! (their protocol lives in [`crate::handover`]), and a waker for shutdown.
//!
//! One client at a time: a second connection is accepted only to be closed with a log line.
//! When the client goes away its DMA maps and interrupt fds are dropped but the device keeps
//! its state, and a new client may connect (spec "Client Disconnection").
//!
//! Each turn: wait for events; read and answer every complete client frame (sending the
//! device's socket-DMA requests after each reply); run one slice of deferred device work; and
//! step an outgoing handover. While device work is pending the wait does not block, so a long
//! job advances slice by slice with the client's requests answered in between.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vfud_protocol::codec::{Frame, FrameReader, ReadOutcome};
use vfud_protocol::header::MessageKind;
use vfud_protocol::messages::Request;
use vfud_protocol::ProtocolError;

use crate::connection::Connection;
use crate::device::Device;
use crate::dispatch::{DeviceServer, ServerSettings};
use crate::handover::{HandoverStats, OutgoingHandover};

pub(crate) const LISTENER: Token = Token(0);
pub(crate) const CLIENT: Token = Token(1);
const WAKER: Token = Token(2);
const INTX_UNMASK: Token = Token(3);
const CONTROL_LISTENER: Token = Token(4);
pub(crate) const CONTROL_BASE: usize = 1 << 20;
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

/// Bind `path`, removing a stale socket file only when nothing listens on it. The socket is
/// bound and listening in a private directory (mode 0700) next to `path`, given its mode
/// there, and then renamed into place: a client that sees the path can connect at once, and
/// nobody can reach the socket while it still has the default mode (with `mode` 0600 it is
/// never accessible to other users, not even briefly).
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
    let mut dir = path.as_os_str().to_owned();
    dir.push(format!(".{}.tmp", std::process::id()));
    let dir = PathBuf::from(dir);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let placed = UnixListener::bind(&tmp).and_then(|l| {
        if let Some(m) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m))?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    placed
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

/// One device's loop state.
pub(crate) struct Loop {
    pub(crate) poll: Poll,
    pub(crate) server: DeviceServer,
    pub(crate) client: Option<Connection>,
    pub(crate) listener: Option<UnixListener>,
    control: Option<UnixListener>,
    pub(crate) controls: HashMap<Token, (UnixStream, FrameReader)>,
    pub(crate) next_control: usize,
    registered: HashMap<RawFd, Token>,
    pub(crate) outgoing: Option<OutgoingHandover>,
    pub(crate) stats: Option<HandoverStats>,
    /// Counters for `vfud status`.
    pub(crate) counters: crate::stats::Stats,
    /// Set in a supervised device process ([`crate::supervisor`]).
    pub(crate) sup: Option<crate::supervisor::Supervised>,
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
    serve_inner(device, listener, control, None, settings, shutdown)
}

/// [`serve_listener`], optionally as a supervised device process.
pub(crate) fn serve_inner(
    device: Box<dyn Device>,
    listener: Option<UnixListener>,
    control: Option<UnixListener>,
    sup: Option<crate::supervisor::Supervised>,
    settings: &ServerSettings,
    shutdown: &ShutdownHandle,
) -> io::Result<Outcome> {
    let server = DeviceServer::new(device, settings.clone())
        .map_err(|e| io::Error::other(crate::error::chain(&e)))?;
    let name = server.description().name;
    let mut lp = Loop::new(server)?;
    shutdown.register(Arc::new(Waker::new(lp.poll.registry(), WAKER)?));
    if let Some(l) = listener {
        lp.set_listener(l)?;
    }
    if let Some(c) = control {
        c.set_nonblocking(true)?;
        lp.register(c.as_raw_fd(), CONTROL_LISTENER)?;
        lp.control = Some(c);
    }
    if let Some(s) = sup {
        lp.adopt_supervision(s)?;
    }
    let mut events = Events::with_capacity(64);
    let mut tokens: Vec<Token> = Vec::with_capacity(64);
    tracing::info!(device = name, "serving");
    while !shutdown.is_triggered() {
        let (dev_fds, deadline) = lp.server.device_sources();
        lp.sync_registrations(&dev_fds)?;
        let busy = lp.outgoing.is_some() || lp.server.work_pending();
        let timeout = match busy {
            true => Some(Duration::ZERO),
            false => deadline.map(|d| d.saturating_duration_since(Instant::now())),
        };
        let timeout = lp.supervise_timeout(timeout);
        match lp.poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        tokens.clear();
        tokens.extend(events.iter().map(|ev| ev.token()));
        for &token in &tokens {
            lp.contained("event", |lp| match token {
                LISTENER => lp.accept_clients(),
                CLIENT => lp.read_client(),
                WAKER => {}
                INTX_UNMASK => lp.server.intx_unmask_event(),
                CONTROL_LISTENER => lp.accept_controls(),
                Token(t) if t >= CONTROL_BASE => lp.read_control(Token(t)),
                Token(t) if t >= DEVICE_BASE => lp.server.device_event((t - DEVICE_BASE) as u32),
                _ => {}
            });
        }
        lp.contained("device work", |lp| {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                lp.server.device_timer();
            }
            lp.server.run_deferred();
            lp.flush_requests();
        });
        lp.supervise_turn(!events.is_empty() || lp.server.work_pending());
        if lp.outgoing.is_some() && lp.handover_step() {
            tracing::info!(device = name, "device handed over; this process lets go");
            lp.server.release_after_handover();
            return Ok(Outcome::HandedOver);
        }
    }
    tracing::info!(device = name, "shutting down");
    Ok(Outcome::Shutdown)
}

/// Most control connections open at once (each may buffer a frame of up to 16 MiB).
const MAX_CONTROLS: usize = 8;

impl Loop {
    /// A loop around `server` with nothing registered yet.
    pub(crate) fn new(server: DeviceServer) -> io::Result<Self> {
        Ok(Loop {
            poll: Poll::new()?,
            server,
            client: None,
            listener: None,
            control: None,
            controls: HashMap::new(),
            next_control: 0,
            registered: HashMap::new(),
            outgoing: None,
            stats: None,
            counters: crate::stats::Stats::default(),
            sup: None,
        })
    }

    /// Run one step of the loop with panics contained: a bug that a client's input reaches
    /// costs that client its connection (the device keeps serving the next one) instead of
    /// killing the thread — and with it, in a multi-device process, nothing else either.
    fn contained(&mut self, what: &str, f: impl FnOnce(&mut Self)) {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(self))) {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(
                device = self.server.description().name,
                "internal error during {what} (contained): {msg}"
            );
            if self.client.is_some() {
                self.disconnect("internal error");
            }
        }
    }

    pub(crate) fn register(&self, fd: RawFd, t: Token) -> io::Result<()> {
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), t, Interest::READABLE)
    }

    pub(crate) fn deregister(&self, fd: RawFd) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
    }

    pub(crate) fn set_listener(&mut self, l: UnixListener) -> io::Result<()> {
        l.set_nonblocking(true)?;
        self.register(l.as_raw_fd(), LISTENER)?;
        self.listener = Some(l);
        Ok(())
    }

    /// Adopt a connected client socket (accepted, or received in a handover).
    pub(crate) fn set_client(&mut self, c: Connection) -> io::Result<()> {
        self.register(c.raw_fd(), CLIENT)?;
        self.client = Some(c);
        self.journal_new_stream();
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
            self.deregister(fd);
            self.registered.remove(&fd);
        }
        for (fd, t) in want {
            if !self.registered.contains_key(&fd) {
                self.register(fd, t)?;
                self.registered.insert(fd, t);
            }
        }
        Ok(())
    }

    /// Accept pending connections. Failures (e.g. out of fds under a connection flood) are
    /// logged, never fatal: the device keeps serving and accepts again on the next event.
    fn accept_clients(&mut self) {
        let name = self.server.description().name;
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    // The current client may have left just before this one arrived (a
                    // reconnect): its hang-up is already queued on its socket, so take it
                    // (and anything it sent before) first rather than refuse the newcomer.
                    if self.client.is_some() {
                        self.read_client();
                    }
                    if self.client.is_some() {
                        tracing::warn!(
                            device = name,
                            "refusing a second client: this device already has one"
                        );
                        continue;
                    }
                    // Large payloads (MIG_DATA_WRITE) are received straight into their
                    // buffer, except under a supervisor, whose journal mirrors the reader's
                    // buffered bytes.
                    let direct = self.sup.is_none();
                    let conn = Connection::new(stream).map(|c| c.with_direct_payloads(direct));
                    match conn.and_then(|c| self.set_client(c)) {
                        Ok(()) => {
                            tracing::info!(device = name, "client connected");
                            self.counters.client_connected();
                        }
                        Err(e) => tracing::warn!(device = name, "client not adopted: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(device = name, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    pub(crate) fn disconnect(&mut self, why: &str) {
        if let Some(c) = self.client.take() {
            self.deregister(c.raw_fd());
        }
        tracing::info!(
            device = self.server.description().name,
            "client disconnected: {why}"
        );
        self.server.client_gone();
    }

    /// Read and process every complete frame available from the client.
    pub(crate) fn read_client(&mut self) {
        loop {
            let limits = self.server.limits();
            let Some(c) = self.client.as_mut() else {
                return;
            };
            let frame = match c.read_message(&limits) {
                Ok(Some(ReadOutcome::Frame(f))) => f,
                Ok(Some(ReadOutcome::Oversize(h))) => {
                    // One bad write must not cost the device: its bytes were skipped, so
                    // answer it and carry on (spec: the limits bound what a side receives).
                    tracing::debug!(
                        msg_id = h.msg_id,
                        cmd = h.cmd,
                        size = h.msg_size,
                        "oversize message refused"
                    );
                    let quiet = matches!(h.kind(), Ok(MessageKind::Command { no_reply: true }));
                    if !quiet && c.error(&h, nix::errno::Errno::E2BIG).is_err() {
                        return self.disconnect("send failed");
                    }
                    self.journal_handled();
                    continue;
                }
                Ok(None) => return self.journal_idle(),
                Err(ProtocolError::Disconnected) => return self.disconnect("closed by peer"),
                Err(e) => return self.disconnect(&format!("broken frame: {e}")),
            };
            let Some(frame) = self.journal_take(frame) else {
                continue;
            };
            if self.process_frame(frame).is_err() {
                return self.disconnect("send failed");
            }
            self.journal_handled();
            self.flush_requests();
        }
    }

    /// Send the device's socket-DMA requests (after the reply to the message in hand).
    pub(crate) fn flush_requests(&mut self) {
        let out = self.server.take_outbox();
        if out.is_empty() {
            return;
        }
        if let Some(c) = &self.client {
            if c.send_requests(out).is_err() {
                self.disconnect("send failed");
            }
        }
    }

    /// Decode, dispatch and answer one frame. `Err` only when the socket is unusable.
    fn process_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        let h = frame.header;
        let no_reply = match h.kind() {
            Ok(MessageKind::Command { no_reply }) => no_reply,
            Ok(_) => {
                self.server.client_reply(&frame);
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(msg_id = h.msg_id, "bad message type: {e}");
                self.counters.record(h.cmd, false);
                return self
                    .client
                    .as_ref()
                    .map_or(Ok(()), |c| c.error(&h, e.errno()));
            }
        };
        let len = frame.payload.len();
        let snapshot = self.needs_snapshot(&h, &frame.payload);
        let (req, payload) =
            Request::decode_owned(h.cmd, frame.payload, frame.fds, &self.server.limits());
        if let Some(p) = payload {
            self.give_back(p);
        }
        let result = req
            .map_err(crate::error::RequestError::from)
            .and_then(|req| self.server.handle(req, len));
        self.counters.record(h.cmd, result.is_ok());
        if snapshot && result.is_ok() {
            self.checkpoint_now();
        }
        self.journal_handled();
        let Some(c) = self.client.as_ref() else {
            return Ok(());
        };
        let sent = match result {
            Ok(_) if no_reply => Ok(()),
            Ok(reply) => {
                let sent = c.reply(&h, &reply, self.server.bar_memory());
                self.give_back(reply.payload);
                sent
            }
            Err(e) => {
                let why = crate::error::chain(&e);
                tracing::debug!(msg_id = h.msg_id, cmd = h.cmd, errno = ?e.errno(), "request failed: {why}");
                if no_reply {
                    Ok(())
                } else {
                    c.error(&h, e.errno())
                }
            }
        };
        if !no_reply {
            self.note_reply_after_handover();
        }
        sent
    }

    /// Return a buffer to whichever of the frame reader and the reply builder has none, so
    /// that steady request/reply traffic allocates nothing (`tests/allocations.rs`).
    fn give_back(&mut self, buf: Vec<u8>) {
        match self.client.as_mut() {
            Some(c) if !c.reader().has_spare() => c.reader_mut().recycle(buf),
            _ => self.server.recycle(buf),
        }
    }

    /// Accept control connections, at most [`MAX_CONTROLS`] at once; failures are logged.
    fn accept_controls(&mut self) {
        let Some(l) = &self.control else {
            return;
        };
        loop {
            match l.accept() {
                Ok((_, _)) if self.controls.len() >= MAX_CONTROLS => {
                    tracing::warn!("refusing a control connection: {MAX_CONTROLS} already open");
                }
                Ok((s, _)) => {
                    let t = Token(CONTROL_BASE + self.next_control);
                    self.next_control += 1;
                    let adopted = s
                        .set_nonblocking(true)
                        .and_then(|()| self.register(s.as_raw_fd(), t));
                    match adopted {
                        Ok(()) => {
                            self.controls.insert(t, (s, FrameReader::new()));
                        }
                        Err(e) => tracing::warn!("control connection not adopted: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("accept on the control socket failed: {e}");
                    return;
                }
            }
        }
    }

    pub(crate) fn close_control(&mut self, t: Token) {
        if let Some((s, _)) = self.controls.remove(&t) {
            self.deregister(s.as_raw_fd());
        }
    }
}

/// Wait until a server has bound `path`. The path appears only once the socket listens
/// (see [`bind_socket`]), so a client may connect as soon as this returns true.
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
