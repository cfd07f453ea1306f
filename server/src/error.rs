//! Error types of the server, one enum per boundary, and their errno mapping.
//!
//! Each layer returns its own enum ([`DmaError`], [`DeviceError`], [`IrqError`],
//! [`MigrationError`], [`HandoverError`]); a request's failure is a [`RequestError`] that wraps
//! them with `#[source]`, and [`RequestError::errno`] is the one place where an error becomes
//! the errno of a vfio-user error reply.

use nix::errno::Errno;
use vfud_protocol::messages::MigState;
use vfud_protocol::ProtocolError;

use crate::migration::stream::StreamError;

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
    /// A DMA_MAP whose address, size or file offset is not page-aligned (`pgsizes` is 4 KiB).
    #[error("DMA map {iova:#x}+{size:#x} at file offset {offset:#x} is not 4 KiB-aligned")]
    Unaligned {
        /// Start IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// File offset.
        offset: u64,
    },
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
    /// The client answered a DMA_READ/DMA_WRITE with an error or a malformed reply.
    #[error("socket DMA failed")]
    Socket(#[source] ProtocolError),
    /// `max_dma_maps` reached.
    #[error("too many DMA mappings (max {0})")]
    TooManyMappings(usize),
    /// The client shrank the file behind an fd-backed mapping; the mapping now reads as
    /// zeroes and discards writes (see `dma::sigbus`).
    #[error("the client truncated the file behind the mapping at IOVA {0:#x}")]
    Revoked(u64),
    /// Dirty bitmaps would exceed [`crate::dma::MAX_DIRTY_BITMAP_BYTES`].
    #[error("dirty logging would need {bytes} bytes of bitmap, above the per-client limit")]
    BitmapBudget {
        /// Bytes that would be needed.
        bytes: usize,
    },
    /// A DMA_LOGGING_REPORT bitmap larger than `max_data_xfer_size`.
    #[error("dirty report of {bytes} bytes exceeds max_data_xfer_size {max}")]
    ReportTooLarge {
        /// Bitmap bytes asked for.
        bytes: u64,
        /// The negotiated limit.
        max: usize,
    },
    /// Socket DMA is under way: the request was sent (or is queued behind the in-flight
    /// limit) and the data is not here yet. The device keeps its progress and returns; it is
    /// run again when the client's reply arrives. Never an error reply to the client.
    #[error("socket DMA in progress; retry when the client has answered")]
    Pending,
}

impl DmaError {
    /// errno for an error reply.
    pub fn errno(&self) -> Errno {
        match self {
            DmaError::MapOverlap { .. } => Errno::EEXIST,
            DmaError::NoSuchMapping { .. } => Errno::ENOENT,
            DmaError::TooManyMappings(_) => Errno::ENOSPC,
            DmaError::Protection { .. } => Errno::EPERM,
            DmaError::Pending => Errno::EAGAIN,
            DmaError::LoggingActive => Errno::EBUSY,
            DmaError::BitmapBudget { .. } => Errno::ENOMEM,
            DmaError::ReportTooLarge { .. } => Errno::E2BIG,
            DmaError::BadReport(_) | DmaError::LoggingInactive | DmaError::Unaligned { .. } => {
                Errno::EINVAL
            }
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
    #[error("guest memory access failed")]
    Dma(#[from] DmaError),
    /// The device does not support migration.
    #[error("device does not support migration")]
    MigrationUnsupported,
    /// Restored state is unusable.
    #[error("invalid device state: {0}")]
    InvalidState(String),
    /// A host resource (backend file or socket, shared memory) failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl DeviceError {
    /// errno for an error reply.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::BadAccess(_) | DeviceError::InvalidState(_) => Errno::EINVAL,
            DeviceError::Dma(e) => e.errno(),
            DeviceError::MigrationUnsupported => Errno::ENOTTY,
            DeviceError::Io { .. } | DeviceError::Other(_) => Errno::EIO,
        }
    }

    /// A host I/O failure with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A SET_IRQS (or interrupt state) the device's layout does not allow.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// The index does not exist.
    #[error("no IRQ index {0}")]
    NoIndex(u32),
    /// Vectors beyond the index's count.
    #[error("vectors {start}..{end} outside index {index} with {count} vectors")]
    OutOfRange {
        /// Index.
        index: u32,
        /// First vector.
        start: u32,
        /// End (exclusive).
        end: u32,
        /// Vectors the index has.
        count: u32,
    },
    /// ERR and REQ take TRIGGER only.
    #[error("ERR/REQ accept TRIGGER only")]
    TriggerOnly,
    /// MASK/UNMASK on an index without the MASKABLE flag.
    #[error("index {0} is not maskable")]
    NotMaskable(u32),
    /// An unmask eventfd outside INTx vector 0.
    #[error("an unmask eventfd is for INTx vector 0 only")]
    UnmaskFdNotIntx,
    /// Mask eventfds are not a thing.
    #[error("mask eventfds are not supported")]
    MaskFd,
    /// A trigger fd that is not an eventfd (the kernel's `eventfd_ctx_fdget` check).
    #[error("fd for IRQ index {index} is not an eventfd ({what})")]
    NotEventfd {
        /// Index.
        index: u32,
        /// What the fd is (its /proc link).
        what: String,
    },
    /// Saved interrupt state that does not fit the device.
    #[error("interrupt state: {0}")]
    BadState(String),
}

/// A migration request that cannot be honoured, or a stream that cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The device has no migration support.
    #[error("device does not support migration")]
    Unsupported,
    /// No arc path between the states (spec: P2P states and ERROR are never targets).
    #[error("no migration transition from {from:?} to {to:?}")]
    NoPath {
        /// Current state.
        from: MigState,
        /// Requested state.
        to: MigState,
    },
    /// MIG_DATA or a v1 register used with no stream in progress.
    #[error("no migration stream in progress")]
    NoStream,
    /// The incoming stream was refused (format, CRC, model).
    #[error("migration stream refused")]
    Stream(#[from] StreamError),
    /// The stream is well formed but does not fit this device.
    #[error("migration stream does not fit this device: {0}")]
    Mismatch(String),
    /// The device refused its saved state.
    #[error("device state refused")]
    Device(#[source] DeviceError),
    /// Applying deferred SET_IRQS at RESUMING→RUNNING failed.
    #[error("applying the deferred SET_IRQS failed")]
    DeferredIrqs(#[source] IrqError),
    /// A v1 migration region access the kernel ABI does not have.
    #[error("v1 migration region: {0}")]
    V1(String),
}

/// A saved image (config space, MSI-X table) whose size does not fit this device.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {got} bytes, the device has {want}")]
pub struct ImageSizeError {
    /// Which image.
    pub what: &'static str,
    /// Its size.
    pub got: usize,
    /// The device's.
    pub want: usize,
}

/// An unknown crash policy name.
#[derive(Debug, thiserror::Error)]
#[error("unknown crash policy {0:?}: use restore or reset")]
pub struct PolicyError(pub String);

/// A live handover that failed on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The peer process sent something unexpected.
    #[error("handover protocol: {0}")]
    Protocol(String),
    /// A control frame failed to decode.
    #[error("bad control message")]
    Json(#[from] serde_json::Error),
    /// The control socket failed.
    #[error("control socket")]
    Socket(#[from] ProtocolError),
    /// An fd operation failed.
    #[error("handover I/O")]
    Io(#[from] std::io::Error),
    /// The device or session could not be adopted.
    #[error("taking over the session failed")]
    Request(#[from] Box<RequestError>),
}

/// A request failed: what the client did wrong, or what the device or server could not do.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Only VERSION is valid before negotiation (spec "Version").
    #[error("VERSION must be the first command")]
    NotNegotiated,
    /// The migration state does not permit the request now (spec: EBUSY while stopped).
    #[error("{what} not allowed in migration state {state:?}")]
    Busy {
        /// The command.
        what: &'static str,
        /// The state.
        state: MigState,
    },
    /// Migration data outside the states that carry it.
    #[error("{what} in state {state:?}")]
    WrongState {
        /// The command.
        what: &'static str,
        /// The state.
        state: MigState,
    },
    /// A region the device does not have.
    #[error("no region {0}")]
    NoRegion(u32),
    /// An access outside a region, or of a size the region does not take.
    #[error("{len} bytes at {offset:#x} outside region {region}")]
    OutOfRange {
        /// Region index.
        region: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A DEVICE_FEATURE the device does not implement.
    #[error("device feature {0:#x} is not supported")]
    UnsupportedFeature(u32),
    /// GET/SET on a feature that does not allow it.
    #[error("feature {0:#x} does not support this operation")]
    FeatureOperation(u32),
    /// A request whose fields are inconsistent in a way no other variant names.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request did not decode.
    #[error("malformed request")]
    Protocol(#[from] ProtocolError),
    /// Guest memory or the DMA table refused.
    #[error("DMA")]
    Dma(#[from] DmaError),
    /// The device model refused.
    #[error("device")]
    Device(#[from] DeviceError),
    /// Interrupt configuration refused.
    #[error("interrupts")]
    Irq(#[from] IrqError),
    /// Migration refused.
    #[error("migration")]
    Migration(#[from] MigrationError),
    /// A host resource failed (duplicating an fd for a reply).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl RequestError {
    /// The errno of the error reply: the only place an error becomes an errno.
    pub fn errno(&self) -> Errno {
        match self {
            RequestError::Busy { .. } => Errno::EBUSY,
            RequestError::UnsupportedFeature(_) => Errno::ENOTTY,
            RequestError::NotNegotiated
            | RequestError::WrongState { .. }
            | RequestError::NoRegion(_)
            | RequestError::OutOfRange { .. }
            | RequestError::FeatureOperation(_)
            | RequestError::Invalid(_)
            | RequestError::Irq(_) => Errno::EINVAL,
            RequestError::Protocol(e) => e.errno(),
            RequestError::Dma(e) => e.errno(),
            RequestError::Device(e) => e.errno(),
            RequestError::Migration(e) => match e {
                MigrationError::Unsupported => Errno::ENOTTY,
                MigrationError::Device(d) => match d.errno() {
                    Errno::ENOTTY => Errno::EINVAL,
                    n => n,
                },
                _ => Errno::EINVAL,
            },
            RequestError::Io { .. } => Errno::EIO,
        }
    }

    /// A request with inconsistent fields.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

/// The whole cause chain of an error on one line (`outer: inner: root`), for logs and
/// for the messages tools show.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_is_by_kind() {
        let busy = RequestError::Busy {
            what: "DMA_MAP",
            state: MigState::Stop,
        };
        assert_eq!(busy.errno(), Errno::EBUSY);
        assert_eq!(
            RequestError::from(DmaError::MapOverlap { iova: 0, size: 1 }).errno(),
            Errno::EEXIST
        );
        assert_eq!(
            RequestError::from(MigrationError::Unsupported).errno(),
            Errno::ENOTTY
        );
        assert_eq!(RequestError::UnsupportedFeature(9).errno(), Errno::ENOTTY);
    }

    #[test]
    fn chain_keeps_the_cause() {
        let e = RequestError::from(DeviceError::from(DmaError::NotMapped(0x1000)));
        assert_eq!(
            chain(&e),
            "device: guest memory access failed: IOVA 0x1000 is not mapped"
        );
    }
}
