//! After a crash loop: the supervisor keeps the client's connection and answers every
//! request with a header-only error reply (EIO), so the client neither hangs nor reads
//! all-ones from a silent socket. It frames messages by their header's `msg_size` and
//! looks at nothing else: no payload is parsed, fds that come along are closed.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use anyhow::Result;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vfud_protocol::codec::{send_error, FrameReader, Limits, SCM_MAX_FD};
use vfud_protocol::header::MessageKind;
use vfud_server::ShutdownHandle;

struct Client {
    stream: UnixStream,
    reader: FrameReader,
}

impl Client {
    fn new(stream: UnixStream, unhandled: &[u8]) -> Result<Self> {
        stream.set_nonblocking(true)?;
        let mut reader = FrameReader::new();
        reader.prefill(unhandled);
        Ok(Self { stream, reader })
    }

    /// Answer every whole frame available; false once the connection is unusable.
    fn drain(&mut self, answered: &mut u64) -> bool {
        let limits = Limits::with_xfer(SCM_MAX_FD, 16 << 20);
        loop {
            let f = match self.reader.read_frame(self.stream.as_fd(), &limits) {
                Ok(Some(f)) => f,
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!("failed device: client connection ends: {e}");
                    return false;
                }
            };
            if let Ok(MessageKind::Command { no_reply: false }) = f.header.kind() {
                if send_error(self.stream.as_fd(), &f.header, Errno::EIO).is_err() {
                    return false;
                }
                *answered += 1;
                if answered.is_power_of_two() {
                    tracing::error!(
                        answered = *answered,
                        "failed device (crash loop): request answered with EIO"
                    );
                }
            }
        }
    }
}

/// Answer every request with an error until shutdown. `client` is the connection the dead
/// device processes served and `unhandled` the bytes the last one had read but not handled.
pub(super) fn answer_errors(
    listener: &UnixListener,
    client: Option<OwnedFd>,
    unhandled: &[u8],
    shutdown: &ShutdownHandle,
) -> Result<()> {
    listener.set_nonblocking(true)?;
    let mut client = match client {
        Some(fd) => Some(Client::new(UnixStream::from(fd), unhandled)?),
        None => None,
    };
    let mut answered = 0u64;
    while !shutdown.is_triggered() {
        if let Some(c) = &mut client {
            if !c.drain(&mut answered) {
                client = None;
            }
        }
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(c) = &client {
            fds.push(PollFd::new(c.stream.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        while let Ok((s, _)) = listener.accept() {
            // The old client may have gone without this loop noticing yet.
            if let Some(c) = &mut client {
                if !c.drain(&mut answered) {
                    client = None;
                }
            }
            if client.is_some() {
                tracing::warn!("failed device: refusing a second client");
                continue;
            }
            tracing::error!("a client connected to a failed device: every request gets EIO");
            client = Some(Client::new(s, &[])?);
        }
    }
    Ok(())
}
