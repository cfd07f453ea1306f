//! Protocol errors and their mapping onto reply errno values.

use nix::errno::Errno;

/// Everything that can go wrong while framing, decoding or negotiating a message.
///
/// [`ProtocolError::errno`] is the one place that decides which errno an error reply carries.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// `argsz` in a request is smaller than the fixed part of the command.
    #[error("argsz {argsz} is smaller than the {needed}-byte request")]
    ArgszTooSmall {
        /// The argsz the peer sent.
        argsz: u32,
        /// The smallest acceptable argsz.
        needed: usize,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Disconnected,
    /// A message carried more file descriptors than negotiated or than the command allows.
    #[error("message carries {got} file descriptors, at most {max} allowed")]
    FdCountExceeded {
        /// Number received.
        got: usize,
        /// Allowed number.
        max: usize,
    },
    /// The kernel truncated ancillary data: file descriptors were lost.
    #[error("ancillary data truncated: file descriptors were lost")]
    FdsTruncated,
    /// A field has a value the protocol does not allow.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The VERSION payload's JSON did not parse.
    #[error("invalid capabilities JSON: {0}")]
    InvalidJson(serde_json::Error),
    /// An I/O error on the socket.
    #[error("socket i/o: {0}")]
    Io(std::io::Error),
    /// `msg_size` is smaller than the header.
    #[error("msg_size {0} is smaller than the 16-byte header")]
    MsgSizeTooSmall(u32),
    /// `msg_size` exceeds the maximum message size.
    #[error("msg_size {size} exceeds the {max}-byte limit")]
    MsgTooLarge {
        /// The advertised message size.
        size: u32,
        /// The limit in force.
        max: usize,
    },
    /// A data transfer exceeds the negotiated `max_data_xfer_size`.
    #[error("transfer of {size} bytes exceeds max_data_xfer_size {max}")]
    TransferTooLarge {
        /// Requested size.
        size: u64,
        /// Negotiated limit.
        max: u64,
    },
    /// The payload is shorter than the command needs.
    #[error("{what}: payload has {got} bytes, {needed} needed")]
    PayloadTooShort {
        /// Which structure was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The payload has bytes the command does not define.
    #[error("{what}: payload has {got} bytes, expected {expected}")]
    PayloadLength {
        /// Which structure was being decoded.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The peer answered with an error reply.
    #[error("peer replied with error {0}")]
    Remote(Errno),
    /// The peer answered with a reply that does not match the request.
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
    /// No reply arrived in time.
    #[error("timed out waiting for a reply")]
    Timeout,
    /// The command number is not one this implementation supports (includes the obsolete 14).
    #[error("unsupported command {0}")]
    UnsupportedCommand(u16),
    /// The peer speaks another major version.
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion {
        /// Major version proposed.
        major: u16,
        /// Minor version proposed.
        minor: u16,
    },
}

impl ProtocolError {
    /// The errno to put in an error reply for this error.
    pub fn errno(&self) -> Errno {
        match self {
            Self::UnsupportedCommand(_) => Errno::ENOSYS,
            Self::TransferTooLarge { .. } | Self::MsgTooLarge { .. } => Errno::E2BIG,
            Self::UnsupportedVersion { .. } => Errno::ENOTSUP,
            Self::Remote(e) => *e,
            Self::Io(e) => e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO),
            Self::Timeout => Errno::ETIMEDOUT,
            Self::Disconnected => Errno::ENOTCONN,
            _ => Errno::EINVAL,
        }
    }

    /// Shorthand for an [`ProtocolError::InvalidField`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}

impl From<std::io::Error> for ProtocolError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<Errno> for ProtocolError {
    fn from(e: Errno) -> Self {
        Self::Io(std::io::Error::from(e))
    }
}
