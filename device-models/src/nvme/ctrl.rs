//! Controller state: registers, queues, features, shadow doorbells. All of it is migrated.

use serde::{Deserialize, Serialize};

use super::spec::{self, reg, PAGE};

/// A submission queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sq {
    /// Guest address (physically contiguous).
    pub base: u64,
    /// Entries.
    pub size: u16,
    /// Next entry the controller fetches.
    pub head: u16,
    /// Tail written by the driver (doorbell or shadow doorbell).
    pub tail: u16,
    /// Completion queue its commands complete to.
    pub cqid: u16,
    /// Last event index written to the shadow event-index buffer.
    pub ei: u16,
}

/// A completion queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cq {
    /// Guest address (physically contiguous).
    pub base: u64,
    /// Entries.
    pub size: u16,
    /// Head written by the driver.
    pub head: u16,
    /// Next entry the controller writes.
    pub tail: u16,
    /// Phase tag the controller writes now (flips at each wrap).
    pub phase: bool,
    /// Interrupt vector.
    pub iv: u16,
    /// Interrupts enabled.
    pub ien: bool,
}

impl Cq {
    /// No room for another entry.
    pub fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// Entries the driver has not consumed.
    pub fn has_entries(&self) -> bool {
        self.head != self.tail
    }
}

/// Addresses given by Doorbell Buffer Config (shadow doorbells and event indexes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dbbuf {
    /// Shadow doorbell buffer (one page).
    pub dbs: u64,
    /// Event index buffer (one page).
    pub eis: u64,
}

/// Offset of SQ `qid`'s tail (or, with `cq`, CQ `qid`'s head) in the doorbell area and in
/// the shadow buffers (stride 0: 4 bytes each).
pub fn db_offset(qid: u16, cq: bool) -> u64 {
    (2 * u64::from(qid) + u64::from(cq)) * 4
}

/// SMART counters (§5.14.1.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// 512-byte units read, in thousands (rounded up as the spec asks).
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Read commands.
    pub reads: u64,
    /// Write commands.
    pub writes: u64,
}

/// The controller: everything but the namespace and the commands in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ctrl {
    /// CC.
    pub cc: u32,
    /// CSTS.
    pub csts: u32,
    /// AQA.
    pub aqa: u32,
    /// ASQ.
    pub asq: u64,
    /// ACQ.
    pub acq: u64,
    /// Interrupt mask (INTMS/INTMC).
    pub intms: u32,
    /// Submission queues by id (0 = admin).
    pub sqs: Vec<Option<Sq>>,
    /// Completion queues by id.
    pub cqs: Vec<Option<Cq>>,
    /// Feature values set by the driver (id, value).
    pub features: Vec<(u8, u32)>,
    /// Shadow doorbells, when configured.
    pub dbbuf: Option<Dbbuf>,
    /// SMART counters.
    pub counters: Counters,
    /// Commands an Abort named while still in their submission queue (SQ id, command id):
    /// they complete "Command Abort Requested" when fetched.
    #[serde(default)]
    pub aborts: Vec<(u16, u16)>,
}

/// Most aborts of queued commands remembered at once (beyond it an Abort reports "not
/// aborted").
pub const MAX_ABORTS: usize = 64;

impl Ctrl {
    /// Whether INTMS masks vector `iv` (MSI and INTx only: with MSI-X the registers are
    /// not used, NVMe 1.4 §3.1.3).
    pub fn masked(&self, iv: u16) -> bool {
        iv < 32 && self.intms & (1 << iv) != 0
    }

    /// Vectors of interrupt-enabled completion queues that hold unconsumed entries.
    pub fn pending_vectors(&self) -> u32 {
        self.cqs
            .iter()
            .flatten()
            .filter(|c| c.ien && c.has_entries() && c.iv < 32)
            .fold(0, |m, c| m | 1 << c.iv)
    }
}

/// Result of a register write the device must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing more.
    None,
    /// CC.EN went 1 → 0: drop every queue and command.
    Reset,
    /// New work: run.
    Kick,
    /// A completion queue head moved: interrupts may be lowered, posting may resume.
    CqHead,
    /// INTMS set these vectors' mask bits.
    Masked(u32),
    /// INTMC cleared these vectors' mask bits.
    Unmasked(u32),
}

impl Ctrl {
    /// Power-on state for a controller with `io_queues` I/O queue pairs.
    pub fn new(io_queues: u16) -> Self {
        let n = usize::from(io_queues) + 1;
        Self {
            sqs: vec![None; n],
            cqs: vec![None; n],
            features: default_features(),
            ..Self::default()
        }
    }

    /// Whether CC.EN is set and the admin queue is live.
    pub fn ready(&self) -> bool {
        self.csts & CSTS_READY_MASK == spec::CSTS_RDY
    }

    /// Value of a feature (0 if never set).
    pub fn feature(&self, fid: u8) -> u32 {
        self.features
            .iter()
            .find(|(f, _)| *f == fid)
            .map_or(0, |(_, v)| *v)
    }

    /// Store a feature value.
    pub fn set_feature(&mut self, fid: u8, v: u32) {
        match self.features.iter_mut().find(|(f, _)| *f == fid) {
            Some(e) => e.1 = v,
            None => self.features.push((fid, v)),
        }
    }

    /// Read a register (4 or 8 bytes, naturally aligned).
    pub fn read(&self, off: u64, len: usize) -> Option<u64> {
        let v = match (off, len) {
            (reg::CAP, 8) => spec::CAP,
            (reg::CAP, 4) => spec::CAP & 0xffff_ffff,
            (0x04, 4) => spec::CAP >> 32,
            (reg::ASQ, 8) => self.asq,
            (reg::ACQ, 8) => self.acq,
            (_, 4) => u64::from(match off {
                reg::VS => spec::VERSION,
                reg::INTMS | reg::INTMC => self.intms,
                reg::CC => self.cc,
                reg::CSTS => self.csts,
                reg::AQA => self.aqa,
                reg::ASQ => self.asq as u32,
                0x2c => (self.asq >> 32) as u32,
                reg::ACQ => self.acq as u32,
                0x34 => (self.acq >> 32) as u32,
                _ => 0,
            }),
            _ => return None,
        };
        Some(v)
    }

    /// Write a controller register (below the doorbells).
    pub fn write(&mut self, off: u64, v: u64, len: usize) -> Effect {
        let lo = v as u32;
        match (off, len) {
            (reg::ASQ, 8) => self.asq = v & !(PAGE - 1),
            (reg::ACQ, 8) => self.acq = v & !(PAGE - 1),
            (reg::ASQ, 4) => self.asq = (self.asq & !0xffff_ffff) | u64::from(lo) & !(PAGE - 1),
            (0x2c, 4) => self.asq = (self.asq & 0xffff_ffff) | u64::from(lo) << 32,
            (reg::ACQ, 4) => self.acq = (self.acq & !0xffff_ffff) | u64::from(lo) & !(PAGE - 1),
            (0x34, 4) => self.acq = (self.acq & 0xffff_ffff) | u64::from(lo) << 32,
            (reg::AQA, 4) => self.aqa = lo & 0x0fff_0fff,
            (reg::INTMS, 4) => {
                self.intms |= lo;
                return Effect::Masked(lo);
            }
            (reg::INTMC, 4) => {
                self.intms &= !lo;
                return Effect::Unmasked(lo);
            }
            (reg::CC, 4) => return self.write_cc(lo & spec::CC_WRITABLE),
            _ => {} // read-only or reserved: ignored
        }
        Effect::None
    }

    fn write_cc(&mut self, new: u32) -> Effect {
        let old = std::mem::replace(&mut self.cc, new);
        let mut effect = Effect::None;
        if old & spec::CC_EN != 0 && new & spec::CC_EN == 0 {
            self.reset_queues();
            self.csts = 0;
            effect = Effect::Reset;
        } else if old & spec::CC_EN == 0 && new & spec::CC_EN != 0 {
            effect = self.enable();
        }
        if new & spec::CC_SHN_MASK != 0 && old & spec::CC_SHN_MASK == 0 {
            // Completed by the device once no I/O is in flight (see `finish_shutdown`).
            self.csts = (self.csts & !spec::CSTS_SHST_MASK) | spec::CSTS_SHST_BUSY;
            effect = Effect::Kick;
        } else if new & spec::CC_SHN_MASK == 0 {
            self.csts &= !spec::CSTS_SHST_MASK;
        }
        effect
    }

    /// CC.EN 0 → 1: check the configuration and create the admin queues.
    fn enable(&mut self) -> Effect {
        let (sq_entries, cq_entries) = ((self.aqa & 0xfff) + 1, ((self.aqa >> 16) & 0xfff) + 1);
        let css = (self.cc >> 4) & 7;
        let mps = (self.cc >> 7) & 0xf;
        if sq_entries < 2
            || cq_entries < 2
            || css != 0
            || mps != 0
            || self.asq == 0
            || self.acq == 0
        {
            tracing::warn!(
                cc = self.cc,
                aqa = self.aqa,
                "nvme: enabled with an invalid configuration"
            );
            self.csts |= spec::CSTS_CFS;
            return Effect::None;
        }
        self.sqs[0] = Some(Sq {
            base: self.asq,
            size: sq_entries as u16,
            ..Sq::default()
        });
        self.cqs[0] = Some(Cq {
            base: self.acq,
            size: cq_entries as u16,
            phase: true,
            ien: true,
            ..Cq::default()
        });
        self.csts |= spec::CSTS_RDY;
        Effect::Kick
    }

    /// Drop every queue and the state set through admin commands (a controller reset).
    pub fn reset_queues(&mut self) {
        let n = self.sqs.len();
        self.sqs = vec![None; n];
        self.cqs = vec![None; n];
        self.features = default_features();
        self.dbbuf = None;
        self.aborts.clear();
    }

    /// A doorbell write at `off` from the doorbell base; bad doorbells are ignored (the
    /// spec's asynchronous "invalid doorbell" event is not reported).
    pub fn doorbell(&mut self, off: u64, v: u32) -> Effect {
        if !self.ready() || !off.is_multiple_of(4) {
            return Effect::None;
        }
        let qid = (off / 8) as usize;
        let is_cq = off % 8 == 4;
        let v = v as u16;
        if is_cq {
            match self.cqs.get_mut(qid).and_then(|q| q.as_mut()) {
                Some(cq) if v < cq.size => {
                    cq.head = v;
                    Effect::CqHead
                }
                _ => Effect::None,
            }
        } else {
            match self.sqs.get_mut(qid).and_then(|q| q.as_mut()) {
                Some(sq) if v < sq.size => {
                    sq.tail = v;
                    Effect::Kick
                }
                _ => Effect::None,
            }
        }
    }

    /// Whether any interrupt-enabled completion queue holds entries (the INTx level).
    pub fn irq_pending(&self) -> bool {
        self.cqs.iter().flatten().any(|c| c.ien && c.has_entries())
    }

    /// Check a state received from a peer.
    pub fn validate(&self, io_queues: u16) -> Result<(), vfud_server::DeviceError> {
        let n = usize::from(io_queues) + 1;
        if self.sqs.len() != n || self.cqs.len() != n {
            return Err(vfud_server::DeviceError::InvalidState(format!(
                "{} queue slots, this controller has {n}",
                self.sqs.len()
            )));
        }
        let max = spec::MAX_QUEUE_ENTRIES as u16;
        for cq in self.cqs.iter().flatten() {
            if cq.size < 2 || cq.size > max || cq.head >= cq.size || cq.tail >= cq.size {
                return Err(vfud_server::DeviceError::InvalidState(
                    "completion queue with impossible size or pointers".into(),
                ));
            }
            if usize::from(cq.iv) > n {
                return Err(vfud_server::DeviceError::InvalidState(
                    "completion queue with an interrupt vector out of range".into(),
                ));
            }
        }
        for sq in self.sqs.iter().flatten() {
            if sq.size < 2 || sq.size > max || sq.head >= sq.size || sq.tail >= sq.size {
                return Err(vfud_server::DeviceError::InvalidState(
                    "submission queue with impossible size or pointers".into(),
                ));
            }
            if self
                .cqs
                .get(usize::from(sq.cqid))
                .is_none_or(|c| c.is_none())
            {
                return Err(vfud_server::DeviceError::InvalidState(
                    "submission queue bound to a missing completion queue".into(),
                ));
            }
        }
        if self.aborts.len() > MAX_ABORTS {
            return Err(vfud_server::DeviceError::InvalidState(
                "too many pending aborts".into(),
            ));
        }
        if self.ready() && (self.sqs[0].is_none() || self.cqs[0].is_none()) {
            return Err(vfud_server::DeviceError::InvalidState(
                "controller ready without an admin queue".into(),
            ));
        }
        Ok(())
    }
}

/// CSTS bits that make a controller ready: RDY without CFS.
const CSTS_READY_MASK: u32 = spec::CSTS_RDY | spec::CSTS_CFS;

/// Feature values at reset: the volatile write cache is on.
fn default_features() -> Vec<(u8, u32)> {
    vec![(0x06, 1)]
}
