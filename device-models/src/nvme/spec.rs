//! Numbers from the NVMe 1.4 base specification: registers, opcodes, status codes, and
//! the submission/completion entry layouts.

/// Controller register offsets in BAR0 (§3.1).
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// NVM Subsystem Reset (not supported: reads 0).
    pub const NSSR: u64 = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue base (64-bit).
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue base (64-bit).
    pub const ACQ: u64 = 0x30;
    /// First doorbell; SQ y tail at `DOORBELLS + 8y`, CQ y head at `+ 8y + 4` (stride 0).
    pub const DOORBELLS: u64 = 0x1000;
}

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN field.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CC bits a driver may set: EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES.
pub const CC_WRITABLE: u32 = 0x00ff_fff1;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS (controller fatal status).
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST = shutdown processing occurring.
pub const CSTS_SHST_BUSY: u32 = 1 << 2;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHST_DONE: u32 = 2 << 2;
/// CSTS.SHST field.
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// Version 1.4.0.
pub const VERSION: u32 = 0x0001_0400;
/// Largest queue, in entries (CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;
/// Submission queue entry size.
pub const SQE_SIZE: u64 = 64;
/// Completion queue entry size.
pub const CQE_SIZE: u64 = 16;
/// Memory page size (CC.MPS = 0 only).
pub const PAGE: u64 = 4096;
/// Maximum data transfer size as a power of two of pages (MDTS): 128 KiB.
pub const MDTS: u8 = 5;

/// CAP (§3.1.1): MQES, CQR, TO = 7.5 s, CSS = NVM, MPSMIN = MPSMAX = 4 KiB, DSTRD = 0.
pub const CAP: u64 = (MAX_QUEUE_ENTRIES as u64 - 1) | (1 << 16) | (15 << 24) | (1 << 37);

/// Admin opcodes (§5).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Doorbell Buffer Config.
    pub const DBBUF_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes (§6).
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Status field values (SCT << 8 | SC), without the phase bit (§4.6.1.2).
pub mod status {
    /// Successful Completion.
    pub const SUCCESS: u16 = 0x000;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u16 = 0x001;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u16 = 0x002;
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u16 = 0x004;
    /// Internal Error.
    pub const INTERNAL_ERROR: u16 = 0x006;
    /// Command Abort Requested (the target of an Abort that the controller aborted).
    pub const ABORTED_BY_REQUEST: u16 = 0x007;
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: u16 = 0x008;
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: u16 = 0x00b;
    /// PRP Offset Invalid.
    pub const INVALID_PRP_OFFSET: u16 = 0x013;
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: u16 = 0x080;
    /// Completion Queue Invalid.
    pub const INVALID_CQ: u16 = 0x100;
    /// Invalid Queue Identifier.
    pub const INVALID_QID: u16 = 0x101;
    /// Invalid Queue Size.
    pub const INVALID_QSIZE: u16 = 0x102;
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT: u16 = 0x105;
    /// Invalid Interrupt Vector.
    pub const INVALID_VECTOR: u16 = 0x108;
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: u16 = 0x109;
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: u16 = 0x10c;
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: u16 = 0x10d;
    /// Do Not Retry bit of the status field.
    pub const DNR: u16 = 1 << 14;
}

/// A submission queue entry as sixteen dwords.
pub type Sqe = [u32; 16];

/// Field accessors of a submission queue entry.
pub trait SqeFields {
    /// Opcode (CDW0 7:0).
    fn opcode(&self) -> u8;
    /// Command identifier (CDW0 31:16).
    fn cid(&self) -> u16;
    /// PSDT (CDW0 15:14): 0 means PRPs.
    fn psdt(&self) -> u8;
    /// Namespace id.
    fn nsid(&self) -> u32;
    /// PRP entry 1.
    fn prp1(&self) -> u64;
    /// PRP entry 2.
    fn prp2(&self) -> u64;
    /// Command dword `n` (10–15).
    fn cdw(&self, n: usize) -> u32;
    /// CDW10/11 as a 64-bit value (starting LBA).
    fn slba(&self) -> u64;
}

impl SqeFields for Sqe {
    fn opcode(&self) -> u8 {
        self[0] as u8
    }
    fn cid(&self) -> u16 {
        (self[0] >> 16) as u16
    }
    fn psdt(&self) -> u8 {
        ((self[0] >> 14) & 3) as u8
    }
    fn nsid(&self) -> u32 {
        self[1]
    }
    fn prp1(&self) -> u64 {
        u64::from(self[6]) | u64::from(self[7]) << 32
    }
    fn prp2(&self) -> u64 {
        u64::from(self[8]) | u64::from(self[9]) << 32
    }
    fn cdw(&self, n: usize) -> u32 {
        self[n]
    }
    fn slba(&self) -> u64 {
        u64::from(self[10]) | u64::from(self[11]) << 32
    }
}

/// Decode 64 bytes into an [`Sqe`].
pub fn sqe_from_bytes(b: &[u8; 64]) -> Sqe {
    let mut s = [0u32; 16];
    for (i, d) in s.iter_mut().enumerate() {
        *d = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    }
    s
}

/// Encode a completion queue entry (§4.6).
pub fn cqe_bytes(
    result: u32,
    sq_head: u16,
    sqid: u16,
    cid: u16,
    status: u16,
    phase: bool,
) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&result.to_le_bytes());
    b[8..10].copy_from_slice(&sq_head.to_le_bytes());
    b[10..12].copy_from_slice(&sqid.to_le_bytes());
    b[12..14].copy_from_slice(&cid.to_le_bytes());
    let sf = (status << 1) | u16::from(phase);
    b[14..16].copy_from_slice(&sf.to_le_bytes());
    b
}
