//! The per-device `mio` event loop: the listening socket, the one client connection, the
//! INTx unmask eventfd, the device's own fds and timer, and a waker for shutdown.
//!
//! One client at a time: a second connection is accepted only to be closed with a log line.
//! When the client goes away its DMA maps and interrupt fds are dropped but the device keeps
//! its state, and a new client may connect (spec "Client Disconnection").

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use vfud_protocol::codec::{send_error, send_message, Frame};
use vfud_protocol::header::MessageKind;
use vfud_protocol::messages::Request;
use vfud_protocol::ProtocolError;

use crate::device::Device;
use crate::dispatch::{borrowed, ClientConn, DeviceServer, ServerSettings};

const LISTENER: Token = Token(0);
const CLIENT: Token = Token(1);
const WAKER: Token = Token(2);
const INTX_UNMASK: Token = Token(3);
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
    let r = serve_listener(device, listener, &opts.settings, shutdown);
    let _ = std::fs::remove_file(&opts.socket_path);
    r
}

/// Serve on an already bound listener (socket activation, tests).
pub fn serve_listener(
    device: Box<dyn Device>,
    listener: UnixListener,
    settings: &ServerSettings,
    shutdown: &ShutdownHandle,
) -> io::Result<()> {
    let mut server =
        DeviceServer::new(device, settings.clone()).map_err(|e| io::Error::other(e.to_string()))?;
    let name = server.description().name;
    listener.set_nonblocking(true)?;
    let mut poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    shutdown.register(waker);
    poll.registry().register(
        &mut SourceFd(&listener.as_raw_fd()),
        LISTENER,
        Interest::READABLE,
    )?;
    let mut events = Events::with_capacity(64);
    let mut registered: HashMap<RawFd, Token> = HashMap::new();
    tracing::info!(device = name, "serving");
    while !shutdown.is_triggered() {
        let (dev_fds, deadline) = server.device_sources();
        sync_registrations(&poll, &mut registered, &server, &dev_fds)?;
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_clients(&listener, &poll, &mut server)?,
                CLIENT => read_client(&poll, &mut server),
                WAKER => {}
                INTX_UNMASK => server.irqs_mut().on_intx_unmask_event(),
                Token(t) if t >= DEVICE_BASE => server.device_event((t - DEVICE_BASE) as u32),
                _ => {}
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            server.device_timer();
        }
        drain_deferred(&poll, &mut server);
        // Socket DMA may have left client bytes unread; epoll is edge-triggered, so read on.
        read_client(&poll, &mut server);
    }
    tracing::info!(device = name, "shutting down");
    Ok(())
}

fn sync_registrations(
    poll: &Poll,
    registered: &mut HashMap<RawFd, Token>,
    server: &DeviceServer,
    dev_fds: &[(RawFd, u32)],
) -> io::Result<()> {
    let mut want: HashMap<RawFd, Token> = dev_fds
        .iter()
        .map(|(fd, t)| (*fd, Token(DEVICE_BASE + *t as usize)))
        .collect();
    if let Some(fd) = server.irqs_fd() {
        want.insert(fd, INTX_UNMASK);
    }
    let stale: Vec<RawFd> = registered
        .iter()
        .filter(|(fd, t)| want.get(fd) != Some(t))
        .map(|(fd, _)| *fd)
        .collect();
    for fd in stale {
        let _ = poll.registry().deregister(&mut SourceFd(&fd));
        registered.remove(&fd);
    }
    for (fd, t) in want {
        if let std::collections::hash_map::Entry::Vacant(e) = registered.entry(fd) {
            poll.registry()
                .register(&mut SourceFd(&fd), t, Interest::READABLE)?;
            e.insert(t);
        }
    }
    Ok(())
}

fn accept_clients(
    listener: &UnixListener,
    poll: &Poll,
    server: &mut DeviceServer,
) -> io::Result<()> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if server.client.is_some() {
                    tracing::warn!(
                        device = server.description().name,
                        "refusing a second client: this device already has one"
                    );
                    drop(stream);
                    continue;
                }
                stream.set_nonblocking(true)?;
                poll.registry().register(
                    &mut SourceFd(&stream.as_raw_fd()),
                    CLIENT,
                    Interest::READABLE,
                )?;
                tracing::info!(device = server.description().name, "client connected");
                server.client = Some(ClientConn {
                    stream,
                    reader: Default::default(),
                    backlog: Default::default(),
                    next_id: 0,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn disconnect(poll: &Poll, server: &mut DeviceServer, why: &str) {
    if let Some(c) = &server.client {
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&c.stream.as_raw_fd()));
    }
    tracing::info!(
        device = server.description().name,
        "client disconnected: {why}"
    );
    server.client_gone();
}

/// Read and process every complete frame available from the client.
fn read_client(poll: &Poll, server: &mut DeviceServer) {
    loop {
        let limits = server.limits();
        let Some(c) = server.client.as_mut() else {
            return;
        };
        let frame = match c.reader.read_frame(c.stream.as_fd(), &limits) {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(ProtocolError::Disconnected) => return disconnect(poll, server, "closed by peer"),
            Err(e) => return disconnect(poll, server, &format!("broken frame: {e}")),
        };
        if process_frame(server, frame).is_err() {
            return disconnect(poll, server, "send failed");
        }
        drain_deferred(poll, server);
    }
}

/// Run deferred work and any commands it had to set aside.
fn drain_deferred(poll: &Poll, server: &mut DeviceServer) {
    loop {
        server.run_deferred();
        let Some(frame) = server.client.as_mut().and_then(|c| c.backlog.pop_front()) else {
            return;
        };
        if process_frame(server, frame).is_err() {
            return disconnect(poll, server, "send failed");
        }
    }
}

/// Decode, dispatch and answer one frame. `Err` only when the socket is unusable.
fn process_frame(server: &mut DeviceServer, frame: Frame) -> Result<(), ProtocolError> {
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
            return reply_error(server, &h, e.errno(), false);
        }
    };
    let len = frame.payload.len();
    let result = Request::decode(h.cmd, &frame.payload, frame.fds, &server.limits())
        .map_err(crate::error::RequestError::from)
        .and_then(|req| server.handle(req, len));
    match result {
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
