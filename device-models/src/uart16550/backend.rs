//! The UART's host side: where guest output goes and guest input comes from.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vfud_server::DeviceError;

use super::{TOKEN_CONN, TOKEN_LISTENER};

/// Where the UART's byte stream goes.
#[derive(Debug)]
pub enum Backend {
    /// A listening UNIX socket and its current connection.
    Socket {
        /// The listener (non-blocking).
        listener: UnixListener,
        /// Path, removed on drop.
        path: PathBuf,
        /// Connected host client.
        conn: Option<UnixStream>,
    },
    /// Output appended to a file.
    File(File),
    /// Output to standard output.
    Stdout,
    /// Nowhere (tests).
    Null,
}

impl Backend {
    /// Parse `socket:PATH`, `file:PATH`, `stdout` or `null`.
    pub fn parse(spec: &str) -> Result<Self, DeviceError> {
        if let Some(p) = spec.strip_prefix("socket:") {
            let path = PathBuf::from(p);
            if path.exists() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(DeviceError::Other(format!("{p} is in use")));
                }
                std::fs::remove_file(&path).map_err(|e| DeviceError::io(p.to_string(), e))?;
            }
            let listener =
                UnixListener::bind(&path).map_err(|e| DeviceError::io(p.to_string(), e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| DeviceError::io(p.to_string(), e))?;
            Ok(Backend::Socket {
                listener,
                path,
                conn: None,
            })
        } else if let Some(p) = spec.strip_prefix("file:") {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| DeviceError::io(p.to_string(), e))?;
            Ok(Backend::File(f))
        } else if spec == "stdout" {
            Ok(Backend::Stdout)
        } else if spec == "null" {
            Ok(Backend::Null)
        } else {
            Err(DeviceError::Other(format!(
                "unknown UART backend {spec:?}: use socket:PATH, file:PATH or stdout"
            )))
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Socket { path, .. } = self {
            // An empty path means another process took the socket over (live handover).
            if !path.as_os_str().is_empty() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Backend {
    /// Whether output can go anywhere now (a socket backend without a client holds it).
    pub(crate) fn connected(&self) -> bool {
        !matches!(self, Backend::Socket { conn: None, .. })
    }

    pub(crate) fn drop_conn(&mut self) {
        if let Backend::Socket { conn, .. } = self {
            *conn = None;
            tracing::info!("uart16550: host client disconnected");
        }
    }

    /// Push `out` to the host as far as it takes it, in as few writes as it allows.
    pub(crate) fn write_out(&mut self, out: &mut VecDeque<u8>) {
        while !out.is_empty() {
            let (a, _) = out.as_slices();
            let r = match self {
                Backend::Socket { conn: Some(c), .. } => c.write(a),
                Backend::Socket { conn: None, .. } => return,
                Backend::File(f) => f.write(a),
                Backend::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write(a).and_then(|n| o.flush().map(|()| n))
                }
                Backend::Null => Ok(a.len()),
            };
            match r {
                Ok(0) => return,
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("uart16550: backend write failed: {e}");
                    self.drop_conn();
                    return;
                }
            }
        }
    }

    /// Read what the host client has sent into `input`, up to `limit` bytes buffered.
    /// Returns true at end of input (the client closed its side).
    pub(crate) fn read_in(&mut self, input: &mut VecDeque<u8>, limit: usize) -> bool {
        let Backend::Socket { conn: Some(c), .. } = self else {
            return false;
        };
        let mut buf = [0u8; 4096];
        while input.len() < limit {
            match c.read(&mut buf) {
                Ok(0) => {
                    self.drop_conn();
                    return true;
                }
                Ok(n) => input.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => {
                    self.drop_conn();
                    return false;
                }
            }
        }
        false
    }

    /// Accept a waiting host client (one at a time). Returns whether one connected.
    pub(crate) fn accept(&mut self) -> Result<bool, DeviceError> {
        let Backend::Socket { listener, conn, .. } = self else {
            return Ok(false);
        };
        let mut accepted = false;
        while let Ok((s, _)) = listener.accept() {
            if conn.is_some() {
                tracing::warn!("uart16550: refusing a second host client");
                continue;
            }
            s.set_nonblocking(true)
                .map_err(|e| DeviceError::io("host client socket", e))?;
            tracing::info!("uart16550: host client connected");
            *conn = Some(s);
            accepted = true;
        }
        Ok(accepted)
    }

    /// Fds to watch.
    pub(crate) fn event_fds(&self) -> Vec<(RawFd, u32)> {
        match self {
            Backend::Socket { listener, conn, .. } => {
                let mut v = vec![(listener.as_raw_fd(), TOKEN_LISTENER)];
                if let Some(c) = conn {
                    v.push((c.as_raw_fd(), TOKEN_CONN));
                }
                v
            }
            _ => Vec::new(),
        }
    }

    /// Describe the socket backend and duplicate its fds for a handover.
    pub(crate) fn export(&self) -> Option<(String, Vec<OwnedFd>)> {
        let Backend::Socket {
            listener,
            path,
            conn,
        } = self
        else {
            return None;
        };
        let mut fds = vec![listener.as_fd().try_clone_to_owned().ok()?];
        if let Some(c) = conn {
            fds.push(c.as_fd().try_clone_to_owned().ok()?);
        }
        Some((format!("socket:{}", path.display()), fds))
    }

    /// A socket backend from a handover's description and fds.
    pub(crate) fn adopt(desc: &str, fds: Vec<OwnedFd>) -> Result<Self, DeviceError> {
        let path = desc
            .strip_prefix("socket:")
            .ok_or_else(|| DeviceError::Other(format!("cannot adopt backend {desc:?}")))?;
        let mut it = fds.into_iter();
        let listener = UnixListener::from(
            it.next()
                .ok_or_else(|| DeviceError::Other("backend listener fd missing".into()))?,
        );
        let conn = it.next().map(UnixStream::from);
        listener
            .set_nonblocking(true)
            .map_err(|e| DeviceError::io("adopted listener", e))?;
        if let Some(c) = &conn {
            c.set_nonblocking(true)
                .map_err(|e| DeviceError::io("adopted host client", e))?;
        }
        Ok(Backend::Socket {
            listener,
            path: PathBuf::from(path),
            conn,
        })
    }

    /// The new process serves the socket now: forget its path so drop leaves it alone.
    pub(crate) fn release(&mut self) {
        if let Backend::Socket { path, .. } = self {
            *path = PathBuf::new();
        }
    }
}
