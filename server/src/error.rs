//! Error types of the server, one enum per boundary, and their errno mapping.

use nix::errno::Errno;
use vfud_protocol::ProtocolError;

/// What a guest-memory access can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The access crosses the end of its mapping.
    #[error("access at {iova:#x}+{len:#x} leaves its mapping")]
    CrossesMapping {
        /// Start IOVA.
        iova: u64,
        /// Length.
        len: usize,
    },
    /// A malformed DMA_LOGGING_REPORT.
    #[error("bad dirty report: {0}")]
    BadReport(&'static str),
    /// DMA_LOGGING_START while logging.
    #[error("dirty logging is already active")]
    LoggingActive,
    /// DMA_LOGGING_REPORT/STOP without START.
    #[error("dirty logging is not active")]
    LoggingInactive,
    /// The client disconnected while a socket DMA was in flight.
    #[error("client unavailable for socket DMA")]
    ClientUnavailable,
    /// The mapping failed (mmap of the client's fd).
    #[error("cannot map DMA region: {0}")]
    MapFailed(String),
    /// The new mapping overlaps an existing one.
    #[error("DMA map {iova:#x}+{size:#x} overlaps an existing mapping")]
    MapOverlap {
        /// Start IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// No mapping matches the unmap exactly.
    #[error("no DMA mapping is exactly {iova:#x}+{size:#x}")]
    NoSuchMapping {
        /// Start IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// No mapping covers the address.
    #[error("IOVA {0:#x} is not mapped")]
    NotMapped(u64),
    /// The mapping does not allow this direction.
    #[error("IOVA {iova:#x} is not {access}")]
    Protection {
        /// Address.
        iova: u64,
        /// "readable" or "writable".
        access: &'static str,
    },
    /// A DMA_READ/DMA_WRITE exchange with the client failed.
    #[error("socket DMA failed: {0}")]
    Socket(ProtocolError),
    /// `max_dma_maps` reached.
    #[error("too many DMA mappings (max {0})")]
    TooManyMappings(usize),
    /// Socket DMA is not allowed while a client request is outstanding: the device must do it
    /// from deferred work ([`crate::Device::run`]).
    #[error("socket DMA requested while a client request is outstanding")]
    WouldBlock,
}

impl DmaError {
    /// errno for an error reply.
    pub fn errno(&self) -> Errno {
        match self {
            DmaError::MapOverlap { .. } => Errno::EEXIST,
            DmaError::NoSuchMapping { .. } => Errno::ENOENT,
            DmaError::TooManyMappings(_) => Errno::ENOSPC,
            DmaError::Protection { .. } => Errno::EPERM,
            DmaError::WouldBlock => Errno::EAGAIN,
            DmaError::LoggingActive => Errno::EBUSY,
            DmaError::BadReport(_) | DmaError::LoggingInactive => Errno::EINVAL,
            _ => Errno::EFAULT,
        }
    }
}

/// Errors returned by device models.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Access to an offset or size the device does not implement.
    #[error("bad access: {0}")]
    BadAccess(String),
    /// DMA failed.
    #[error("dma: {0}")]
    Dma(DmaError),
    /// The device does not support migration.
    #[error("device does not support migration")]
    MigrationUnsupported,
    /// Restored state is unusable.
    #[error("invalid device state: {0}")]
    InvalidState(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl DeviceError {
    /// errno for an error reply.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::BadAccess(_) => Errno::EINVAL,
            DeviceError::Dma(e) => e.errno(),
            DeviceError::MigrationUnsupported => Errno::ENOTTY,
            DeviceError::InvalidState(_) => Errno::EINVAL,
            DeviceError::Other(_) => Errno::EIO,
        }
    }
}

impl From<DmaError> for DeviceError {
    fn from(e: DmaError) -> Self {
        Self::Dma(e)
    }
}

/// A request failed; carries the errno for the reply and a message for the log.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// errno to reply with.
    pub errno: Errno,
    /// What went wrong.
    pub message: String,
}

impl RequestError {
    /// A new error.
    pub fn new(errno: Errno, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl From<ProtocolError> for RequestError {
    fn from(e: ProtocolError) -> Self {
        Self::new(e.errno(), e.to_string())
    }
}

impl From<DmaError> for RequestError {
    fn from(e: DmaError) -> Self {
        Self::new(e.errno(), e.to_string())
    }
}

impl From<DeviceError> for RequestError {
    fn from(e: DeviceError) -> Self {
        Self::new(e.errno(), e.to_string())
    }
}
