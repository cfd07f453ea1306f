//! One supervised device: start its device process, keep its snapshots, restart it after a
//! crash with the last snapshot handed over, and give up after a crash loop.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use vfud_protocol::codec::{Frame, FrameReader};
use vfud_protocol::ProtocolError;
use vfud_server::handover::{self as ho, kind, Hello, SessionInfo};
use vfud_server::supervisor::journal::Journal;
use vfud_server::supervisor::{self as sv, Policy, Supervise};
use vfud_server::ShutdownHandle;

use super::{RestartLimit, SuperviseArgs};

/// What `status` on the supervisor's control socket reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// Device spec.
    pub device: String,
    /// `running`, `restarting`, `failed` (crash loop: every request gets an error) or `stopped`.
    pub state: String,
    /// Process id of the current device process.
    pub device_pid: Option<u32>,
    /// Device processes started after crashes.
    pub restarts: u32,
    /// Crash policy.
    pub policy: Option<Policy>,
    /// Snapshots received (session + checkpoint), all device processes together.
    pub snapshots: u64,
    /// The last crash.
    pub last_crash: Option<Crash>,
}

/// One crash, and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct Crash {
    /// How the process ended (`signal 9`, `exit 101`, ...).
    pub how: String,
    /// When the supervisor noticed (Unix time, ns).
    pub at_unix_ns: u64,
    /// Requests handled after the last checkpoint: their effect on device state is lost
    /// (`restore`) — for a UART, bytes it took in after the checkpoint.
    pub requests_after_checkpoint: u64,
    /// Age of the checkpoint the device went back to (ms).
    pub checkpoint_age_ms: u64,
    /// The process died handling a request (answered by its successor).
    pub request_in_progress: bool,
}

/// The last snapshot a device process sent.
struct Snapshot {
    info: SessionInfo,
    payload: Vec<u8>,
    stream_at: usize,
    fds: Vec<OwnedFd>,
}

/// One device under supervision.
pub(super) struct Supervisor {
    spec: String,
    listener: UnixListener,
    journal: Journal,
    policy: Policy,
    checkpoint_ms: u64,
    limit: RestartLimit,
    hang_timeout: Option<Duration>,
    snapshot: Option<Snapshot>,
    crashes: VecDeque<Instant>,
    status: Arc<Mutex<Status>>,
}

const HANDOVER_TIMEOUT: Duration = Duration::from_secs(20);

impl Supervisor {
    pub(super) fn new(spec: &str, listener: UnixListener, a: &SuperviseArgs) -> Result<Self> {
        let journal = Journal::create().map_err(|e| anyhow!("request journal: {e}"))?;
        let status = Status {
            device: spec.to_string(),
            state: "starting".into(),
            policy: Some(a.on_crash),
            ..Status::default()
        };
        Ok(Self {
            spec: spec.to_string(),
            listener,
            journal,
            policy: a.on_crash,
            checkpoint_ms: a.checkpoint_ms,
            limit: a.max_restarts,
            hang_timeout: (a.hang_timeout > 0).then(|| Duration::from_millis(a.hang_timeout)),
            snapshot: None,
            crashes: VecDeque::new(),
            status: Arc::new(Mutex::new(status)),
        })
    }

    pub(super) fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Supervise until shutdown, or until a crash loop ends in the error-answering mode.
    pub(super) fn run(mut self, shutdown: &ShutdownHandle) -> Result<()> {
        let mut generation = 0u32;
        let mut crashed_at = 0u64;
        let mut hung_before = false;
        loop {
            let (mut child, link) = self.spawn(generation)?;
            self.set_status(|s| {
                s.device_pid = Some(child.id());
                s.state = "running".into();
            });
            let mut reader = FrameReader::new();
            let started = self.start(&link, &mut reader, generation, crashed_at, hung_before);
            let hung = match started {
                Ok(()) => self.watch(&link, &mut reader, &mut child, shutdown),
                Err(e) => {
                    tracing::error!(device = self.spec, "starting the device process: {e:#}");
                    let _ = child.kill();
                    None
                }
            };
            if shutdown.is_triggered() {
                stop(&mut child);
                self.set_status(|s| s.state = "stopped".into());
                return Ok(());
            }
            let how = match child.wait() {
                Ok(st) => match (st.signal(), st.code()) {
                    (Some(sig), _) => format!("signal {sig}"),
                    (None, Some(c)) => format!("exit {c}"),
                    _ => "unknown".into(),
                },
                Err(e) => format!("unknown ({e})"),
            };
            hung_before = hung.is_some();
            let how = match hung {
                Some(d) => format!("hung: one request for {} ms, killed ({how})", d.as_millis()),
                None => how,
            };
            crashed_at = ho::now_ns();
            let rec = self.journal.recover();
            let crash = Crash {
                how: how.clone(),
                at_unix_ns: crashed_at,
                requests_after_checkpoint: rec.frames_since_checkpoint,
                checkpoint_age_ms: crashed_at.saturating_sub(rec.checkpoint_unix_ns) / 1_000_000,
                request_in_progress: rec.busy,
            };
            tracing::error!(
                device = self.spec,
                how,
                policy = ?self.policy,
                requests_after_checkpoint = crash.requests_after_checkpoint,
                checkpoint_age_ms = crash.checkpoint_age_ms,
                request_in_progress = crash.request_in_progress,
                "DEVICE PROCESS DIED; restarting it under the same connection"
            );
            self.set_status(|s| {
                s.last_crash = Some(crash);
                s.device_pid = None;
                s.state = "restarting".into();
            });
            let now = Instant::now();
            self.crashes.push_back(now);
            while self
                .crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.limit.window)
            {
                self.crashes.pop_front();
            }
            if self.crashes.len() > self.limit.count {
                return self.give_up(shutdown);
            }
            generation += 1;
            self.set_status(|s| s.restarts = generation);
        }
    }

    /// The snapshot a device process of `generation` is handed (none for the first one).
    fn handed(&self, generation: u32) -> Option<&Snapshot> {
        self.snapshot.as_ref().filter(|_| generation > 0)
    }

    fn spawn(&self, generation: u32) -> Result<(Child, UnixStream)> {
        let (ours, theirs) = UnixStream::pair().context("supervisor link")?;
        let exe = std::env::current_exe().context("locating the vfud binary")?;
        let mut cmd = Command::new(exe);
        cmd.args(["device-process", "--device", &self.spec]);
        // The backend's fds (a UART's listening socket and host connection) are in the
        // snapshot: the new process adopts them rather than bind a path this process holds.
        if self
            .handed(generation)
            .is_some_and(|s| s.info.backend.is_some())
        {
            cmd.arg("--adopt-backend");
        }
        let child = cmd
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            // Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
            // then stops the device process itself.
            .process_group(0)
            .spawn()
            .context("starting a device process")?;
        Ok((child, ours))
    }

    /// Hand the new process the journal and listener, then — after a crash — the last
    /// snapshot, as the old process of a live handover would.
    fn start(
        &self,
        link: &UnixStream,
        reader: &mut FrameReader,
        generation: u32,
        crashed_at: u64,
        hung: bool,
    ) -> Result<()> {
        let sup = Supervise {
            policy: self.policy,
            checkpoint_ms: self.checkpoint_ms,
            generation,
            journal: 0,
            listener: Some(1),
            hung,
        };
        let p = serde_json::to_vec(&sup)?;
        ho::send(
            link.as_fd(),
            sv::kind::SUPERVISE,
            &p,
            &[self.journal.fd(), self.listener.as_fd()],
        )?;
        let Some(s) = self.handed(generation) else {
            return Ok(());
        };
        let hello = Hello {
            model: s.info.model.clone(),
        };
        ho::send_json(link.as_fd(), kind::HELLO, &hello)?;
        expect(link, reader, kind::READY)?;
        for chunk in s.payload[s.stream_at..].chunks(8 << 20) {
            ho::send(link.as_fd(), kind::DATA, chunk, &[])?;
        }
        let mut info = s.info.clone();
        info.listener = None;
        info.stopped_at_unix_ns = crashed_at;
        let b: Vec<BorrowedFd<'_>> = s.fds.iter().map(|f| f.as_fd()).collect();
        ho::send(link.as_fd(), kind::SESSION, &serde_json::to_vec(&info)?, &b)?;
        expect(link, reader, kind::RUNNING)?;
        tracing::info!(
            device = self.spec,
            generation,
            "device restored in a new process"
        );
        Ok(())
    }

    /// Keep the device process's snapshots until it dies (or shutdown), and kill it when the
    /// journal shows one request in progress for longer than the hang timeout. Returns how
    /// long that request had been in progress when the process was killed for it.
    fn watch(
        &mut self,
        link: &UnixStream,
        reader: &mut FrameReader,
        child: &mut Child,
        shutdown: &ShutdownHandle,
    ) -> Option<Duration> {
        let mut busy: Option<(u64, Instant)> = None;
        loop {
            match ho::recv(link, reader, Duration::from_millis(100)) {
                Ok(f) if f.header.cmd == sv::kind::SNAPSHOT => self.keep(f),
                Ok(f) => tracing::debug!(cmd = f.header.cmd, "unexpected frame from the device"),
                Err(ProtocolError::Timeout) => {
                    if shutdown.is_triggered() || matches!(child.try_wait(), Ok(Some(_))) {
                        return None;
                    }
                }
                Err(_) => return None,
            }
            let Some(limit) = self.hang_timeout else {
                continue;
            };
            busy = match (self.journal.in_progress(), busy) {
                (Some(n), Some((m, since))) if n == m => {
                    if since.elapsed() >= limit {
                        tracing::error!(
                            device = self.spec,
                            in_progress_ms = since.elapsed().as_millis() as u64,
                            "DEVICE PROCESS HUNG: one request in progress beyond --hang-timeout; \
                             killing it"
                        );
                        let _ = child.kill();
                        return Some(since.elapsed());
                    }
                    Some((m, since))
                }
                (Some(n), _) => Some((n, Instant::now())),
                (None, _) => None,
            };
        }
    }

    fn keep(&mut self, f: Frame) {
        let stream_at = match sv::decode_snapshot(&f.payload) {
            Ok((info, stream)) => (info, f.payload.len() - stream.len()),
            Err(e) => return tracing::warn!(device = self.spec, "bad snapshot: {e}"),
        };
        self.set_status(|s| s.snapshots += 1);
        self.snapshot = Some(Snapshot {
            info: stream_at.0,
            payload: f.payload,
            stream_at: stream_at.1,
            fds: f.fds,
        });
    }

    /// A crash loop: no more device processes; the connection stays up and every request on
    /// it gets an error reply.
    fn give_up(self, shutdown: &ShutdownHandle) -> Result<()> {
        tracing::error!(
            device = self.spec,
            crashes = self.crashes.len(),
            window_s = self.limit.window.as_secs(),
            "CRASH LOOP: the device process died {} times within {} s; no more restarts. \
             The client's connection stays open and every request on it now gets an error reply \
             (EIO); hot-unplug the device or restart vfud",
            self.crashes.len(),
            self.limit.window.as_secs()
        );
        self.set_status(|s| s.state = "failed".into());
        let rec = self.journal.recover();
        let client = self.snapshot.and_then(|mut s| {
            let i = s.info.client?;
            (i < s.fds.len()).then(|| s.fds.swap_remove(i))
        });
        super::fallback::answer_errors(&self.listener, client, &rec.unhandled, shutdown)
    }
}

fn expect(link: &UnixStream, reader: &mut FrameReader, want: u16) -> Result<()> {
    let deadline = Instant::now() + HANDOVER_TIMEOUT;
    loop {
        let f = ho::recv(
            link,
            reader,
            deadline.saturating_duration_since(Instant::now()),
        )?;
        match f.header.cmd {
            c if c == want => return Ok(()),
            sv::kind::SNAPSHOT => continue,
            _ => bail!(
                "the device process refused the session: {}",
                String::from_utf8_lossy(&f.payload)
            ),
        }
    }
}

/// Stop a device process at shutdown: SIGTERM, then SIGKILL if it lingers.
fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}
