//! systemd socket activation for `vfud serve`: adopt the listening sockets systemd passes
//! (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; fds from 3 upward, `sd_listen_fds(3)`).
//!
//! A device's `--socket` picks its socket either by name, `fd:NAME` (the unit's
//! `FileDescriptorName=`, default the socket unit's name), or by path: a passed socket bound to
//! that path is adopted instead of binding a new one. Adopted socket files belong to systemd,
//! so vfud never removes them on exit.

#![allow(unsafe_code)]

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{getsockname, UnixAddr};

/// First fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The sockets passed to this process, not yet claimed by a device.
#[derive(Debug, Default)]
pub struct Passed {
    sockets: Vec<(String, Option<PathBuf>, UnixListener)>,
}

/// A listening socket for one device, and whether vfud owns (and may remove) its file.
pub struct Acquired {
    /// The socket.
    pub listener: UnixListener,
    /// False for sockets systemd passed: their files are the socket unit's.
    pub owns_path: bool,
}

impl Passed {
    /// Take the sockets passed by systemd, if `LISTEN_PID` names this process, and clear the
    /// variables so that nothing vfud starts inherits them.
    pub fn from_env() -> Result<Self> {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(v);
        }
        let (Some(pid), Some(count)) = (pid, count) else {
            return Ok(Self::default());
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(Self::default());
        }
        let n: RawFd = count
            .parse()
            .with_context(|| format!("LISTEN_FDS={count:?} is not a number"))?;
        let names: Vec<&str> = names.split(':').collect();
        let mut sockets = Vec::new();
        for i in 0..n {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: sd_listen_fds(3): with LISTEN_PID naming this process, fds 3..3+LISTEN_FDS
            // were passed to it and are owned by nobody else in it; vfud opens nothing before
            // this runs at startup.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            nix::fcntl::fcntl(
                &owned,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .with_context(|| format!("passed fd {fd}"))?;
            let path = getsockname::<UnixAddr>(fd)
                .ok()
                .and_then(|a| a.path().map(Path::to_path_buf));
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            tracing::info!(fd, name, path = ?path, "socket passed by systemd");
            sockets.push((name.to_string(), path, UnixListener::from(owned)));
        }
        Ok(Self { sockets })
    }

    /// The socket for `--socket spec`: a passed one named `fd:NAME` or bound to the path, else
    /// a new socket bound at the path.
    pub fn acquire(&mut self, spec: &Path, mode: Option<u32>) -> Result<Acquired> {
        let text = spec.to_string_lossy();
        let pos = if let Some(name) = text.strip_prefix("fd:") {
            let Some(i) = self.sockets.iter().position(|(n, _, _)| n == name) else {
                let have: Vec<&str> = self.sockets.iter().map(|(n, _, _)| n.as_str()).collect();
                bail!("--socket {text}: no socket named {name:?} was passed (LISTEN_FDNAMES has {have:?})");
            };
            Some(i)
        } else {
            let want = std::path::absolute(spec).unwrap_or_else(|_| spec.to_path_buf());
            self.sockets
                .iter()
                .position(|(_, p, _)| p.as_deref() == Some(want.as_path()))
        };
        if let Some(i) = pos {
            let (_, _, listener) = self.sockets.remove(i);
            return Ok(Acquired {
                listener,
                owns_path: false,
            });
        }
        let listener = vfud_server::event_loop::bind_socket(spec, mode)
            .with_context(|| format!("binding {}", spec.display()))?;
        Ok(Acquired {
            listener,
            owns_path: true,
        })
    }

    /// Warn about passed sockets no device claimed (a unit/flags mismatch worth knowing).
    pub fn warn_unclaimed(&self) {
        for (name, path, _) in &self.sockets {
            tracing::warn!(name, path = ?path, "a socket passed by systemd matches no --socket");
        }
    }
}
