//! A small synchronous QMP client (QEMU `docs/interop/qmp-spec.rst`), the one that
//! `vfud qemu-migrate` and the QEMU test harness share.
//!
//! QMP is line-delimited JSON over a UNIX socket: QEMU greets with `{"QMP": {...}}`, the
//! client leaves negotiation mode with `qmp_capabilities`, then each command gets one
//! `{"return": ...}` or `{"error": {"class", "desc"}}`. Asynchronous events (`{"event": ...}`)
//! may arrive at any time, also between a command and its reply; the client keeps them, in
//! order, for [`Qmp::wait_event`] and [`Qmp::events`].
//!
//! Two QEMU facts shape the timeouts:
//! - a QMP socket serves one client at a time; a second client is accepted but gets no
//!   greeting until the first disconnects, so a missing greeting has its own message;
//! - QEMU answers QMP from its main loop, which waits while a vCPU holds the big lock on a
//!   slow vfio-user reply (up to `x-msg-timeout`, 5 s by default): reply deadlines must be
//!   well above that.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Default deadline for each command's reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for the greeting (see the module docs for why it is separate).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// QEMU's error reply to a command (`{"error": {"class": ..., "desc": ...}}`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpCommandError {
    /// Error class, e.g. `GenericError` or `DeviceNotFound`.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

/// A QMP failure: transport, protocol, or QEMU's error reply.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU closed the socket.
    #[error("QEMU closed the QMP socket {}", path.display())]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// QEMU answered the command with an error.
    #[error("QMP {cmd} on {}", path.display())]
    Command {
        /// The command.
        cmd: String,
        /// The socket.
        path: PathBuf,
        /// QEMU's error.
        #[source]
        error: QmpCommandError,
    },
    /// The socket could not be connected.
    #[error("connecting to QMP socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No matching event arrived in time.
    #[error("no QMP event {what} on {} within {timeout:?}", path.display())]
    EventTimeout {
        /// Description of the awaited event.
        what: String,
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        timeout: Duration,
    },
    /// Reading or writing the socket failed (a reply deadline shows as `TimedOut`).
    #[error("QMP socket {}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A line that is not JSON.
    #[error("malformed QMP message {line:?}")]
    Malformed {
        /// The line.
        line: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// No greeting within the deadline: most likely another client holds the socket.
    #[error(
        "no QMP greeting on {} within {timeout:?}: a QMP socket serves one client at a time, \
         is another one connected? (give QEMU another `-qmp unix:PATH,server=on,wait=off`)",
        path.display()
    )]
    NoGreeting {
        /// The socket.
        path: PathBuf,
        /// The greeting deadline.
        timeout: Duration,
    },
    /// The first message was not a QMP greeting.
    #[error("{} is not a QMP socket (greeting {greeting})", path.display())]
    NotQmp {
        /// The socket.
        path: PathBuf,
        /// What came instead.
        greeting: Value,
    },
    /// A message that is neither an event, a return nor an error.
    #[error("unexpected QMP message in reply to {cmd}: {message}")]
    Unexpected {
        /// The command.
        cmd: String,
        /// The message.
        message: Value,
    },
}

impl QmpError {
    /// QEMU's error reply, when that is what this is.
    pub fn command_error(&self) -> Option<&QmpCommandError> {
        match self {
            Self::Command { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether this is a read deadline that passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Io { source, .. } if is_timeout(source))
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A synchronous QMP connection: one command at a time, events kept in arrival order.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    /// Bytes of a line not yet complete when a read deadline passed.
    partial: Vec<u8>,
    reply_timeout: Duration,
    greeting: Value,
    events: Vec<Value>,
}

impl Qmp {
    /// Connect with the default deadlines ([`GREETING_TIMEOUT`], [`REPLY_TIMEOUT`]).
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        Self::connect_with(path, GREETING_TIMEOUT, REPLY_TIMEOUT)
    }

    /// Connect to `path`, read the greeting and leave negotiation mode.
    pub fn connect_with(
        path: &Path,
        greeting_timeout: Duration,
        reply_timeout: Duration,
    ) -> Result<Self, QmpError> {
        let connect_err = |source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let s = UnixStream::connect(path).map_err(connect_err)?;
        s.set_write_timeout(Some(reply_timeout))
            .map_err(connect_err)?;
        let reader = BufReader::new(s.try_clone().map_err(connect_err)?);
        let mut q = Self {
            reader,
            writer: s,
            path: path.to_path_buf(),
            partial: Vec::new(),
            reply_timeout,
            greeting: Value::Null,
            events: Vec::new(),
        };
        let greeting = match q.read_message(Instant::now() + greeting_timeout) {
            Err(e) if e.is_timeout() => {
                return Err(QmpError::NoGreeting {
                    path: path.to_path_buf(),
                    timeout: greeting_timeout,
                })
            }
            r => r?,
        };
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotQmp {
                path: path.to_path_buf(),
                greeting,
            });
        }
        q.greeting = greeting;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The greeting (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Events received and not yet consumed by [`Qmp::wait_event`], oldest first.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Read one message; a deadline that passes is an `Io` error of kind `TimedOut`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.io_err(io::ErrorKind::TimedOut.into()));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| self.io_err(e))?;
            // `read_until` keeps what it read in `partial` even when the deadline interrupts
            // it, so a line split across two reads is not lost.
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => {
                    return Err(QmpError::Closed {
                        path: self.path.clone(),
                    })
                }
                Ok(_) if self.partial.last() == Some(&b'\n') => break,
                // EOF in the middle of a line: the next read reports it.
                Ok(_) => {}
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(&line).map_err(|source| QmpError::Malformed {
            line: String::from_utf8_lossy(&line).trim_end().to_string(),
            source,
        })
    }

    fn io_err(&self, source: io::Error) -> QmpError {
        QmpError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Run `cmd`: the outer error is a transport or protocol failure, the inner one QEMU's
    /// error reply (for callers that expect some commands to fail).
    pub fn try_execute(
        &mut self,
        cmd: &str,
        args: Option<Value>,
    ) -> Result<Result<Value, QmpCommandError>, QmpError> {
        match self.execute(cmd, args) {
            Ok(v) => Ok(Ok(v)),
            Err(QmpError::Command { error, .. }) => Ok(Err(error)),
            Err(e) => Err(e),
        }
    }

    /// Run `cmd` and return its `return` value; events read meanwhile are kept.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| self.io_err(e))?;
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            let mut m = self.read_message(deadline)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    cmd: cmd.to_string(),
                    path: self.path.clone(),
                    error: QmpCommandError {
                        class: s("class"),
                        desc: s("desc"),
                    },
                });
            }
            return Err(QmpError::Unexpected {
                cmd: cmd.to_string(),
                message: m,
            });
        }
    }

    /// Wait until `timeout` for an event for which `matches` holds, looking first at the
    /// events already received; the event returned is removed from [`Qmp::events`].
    /// `what` describes the event in the timeout error.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(&mut matches) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let m = match self.read_message(deadline) {
                Err(e) if e.is_timeout() => {
                    return Err(QmpError::EventTimeout {
                        what: what.to_string(),
                        path: self.path.clone(),
                        timeout,
                    })
                }
                r => r?,
            };
            if m.get("event").is_none() {
                // No command is outstanding, so only events can arrive.
                return Err(QmpError::Unexpected {
                    cmd: format!("(waiting for {what})"),
                    message: m,
                });
            }
            if matches(&m) {
                return Ok(m);
            }
            self.events.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: greets, then answers each request line with the next reply
    /// (which may carry events before it); `after` lines are sent once all are answered.
    fn fake_qmp(replies: Vec<String>, after: Vec<String>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            for reply in std::iter::once(r#"{"return": {}}"#.to_string()).chain(replies) {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                writeln!(w, "{reply}").unwrap();
            }
            for line in after {
                w.write_all(line.as_bytes()).unwrap();
                w.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            // Keep the socket open until the client is done.
            let mut rest = String::new();
            let _ = r.read_line(&mut rest);
        });
        (dir, path)
    }

    #[test]
    fn execute_skips_events_and_returns_error_replies() {
        // Arrange
        let (_dir, path) = fake_qmp(
            vec![
                format!(
                    "{}\n{}",
                    r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                    r#"{"return": {"status": "running", "running": true}}"#
                ),
                r#"{"error": {"class": "GenericError", "desc": "nope"}}"#.to_string(),
            ],
            vec![],
        );

        // Act
        let mut q = Qmp::connect(&path).unwrap();
        let status = q.execute("query-status", None).unwrap();
        let err = q.try_execute("migrate", None).unwrap();

        // Assert
        assert_eq!(status["status"], "running");
        assert_eq!(
            err,
            Err(QmpCommandError {
                class: "GenericError".into(),
                desc: "nope".into()
            })
        );
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.events()[0]["event"], "STOP");
    }

    #[test]
    fn wait_event_finds_kept_events_and_reads_split_lines() {
        // Arrange: an event before a reply, then one sent in two pieces.
        let deleted = r#"{"event": "DEVICE_DELETED", "data": {"device": "u0"}}"#;
        let (_dir, path) = fake_qmp(
            vec![format!("{deleted}\n{}", r#"{"return": {}}"#)],
            vec![
                r#"{"event": "DEVICE_DELETED", "#.to_string(),
                "\"data\": {\"device\": \"d1\"}}\n".to_string(),
            ],
        );
        let mut q = Qmp::connect(&path).unwrap();
        q.execute("device_del", Some(json!({"id": "u0"}))).unwrap();

        // Act
        let first = q
            .wait_event("u0", Duration::from_secs(5), |e| {
                e["data"]["device"] == "u0"
            })
            .unwrap();
        let second = q
            .wait_event("d1", Duration::from_secs(5), |e| {
                e["data"]["device"] == "d1"
            })
            .unwrap();
        let none = q.wait_event("x", Duration::from_millis(100), |_| true);

        // Assert
        assert_eq!(first["event"], "DEVICE_DELETED");
        assert_eq!(second["data"]["device"], "d1");
        assert!(
            matches!(none, Err(QmpError::EventTimeout { .. })),
            "{none:?}"
        );
        assert!(q.events().is_empty());
    }

    #[test]
    fn a_missing_greeting_says_the_socket_may_be_taken() {
        // Arrange: a listener that accepts but never greets.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.sock");
        let _listener = UnixListener::bind(&path).unwrap();

        // Act
        let r = Qmp::connect_with(&path, Duration::from_millis(100), REPLY_TIMEOUT);

        // Assert
        let e = r.err().expect("no greeting must fail");
        assert!(matches!(e, QmpError::NoGreeting { .. }), "{e:?}");
        assert!(e.to_string().contains("one client at a time"), "{e}");
    }
}
