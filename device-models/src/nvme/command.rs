//! A command in flight and the NVM command set (Read, Write, Flush, Write Zeroes, Dataset
//! Management) executed on the namespace.
//!
//! A command moves through [`Stage`]s: executed in restartable steps (`Exec`), then its
//! completion entry is written (`Posted`) once its data is in guest memory, then, once the
//! entry itself is there, the interrupt. Asynchronous Event Requests wait `Parked`.

use serde::{Deserialize, Serialize};
use vfud_server::DeviceCtx;

use super::ctrl::Counters;
use super::namespace::{Namespace, LBA_SIZE};
use super::prp::{Prp, Stop};
use super::spec::{io, status, Sqe, SqeFields, MDTS, PAGE};

/// Where a command is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Being executed (its progress is in [`Command::done`]).
    Exec,
    /// An Asynchronous Event Request waiting for an event.
    Parked,
    /// Executed; the completion entry goes out once the data has settled.
    Finish {
        /// Status field (SCT/SC/DNR).
        status: u16,
        /// Command-specific result (DW0).
        result: u32,
    },
    /// The completion entry was written at `slot` of CQ `cqid`; the interrupt follows once
    /// it has settled. `cqe` is kept so a destination can write it again (idempotent).
    Posted {
        /// Completion queue.
        cqid: u16,
        /// Entry index.
        slot: u16,
        /// The entry.
        cqe: [u8; 16],
    },
}

/// One command fetched from a submission queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Submission queue it came from.
    pub sqid: u16,
    /// Completion queue it completes to.
    pub cqid: u16,
    /// The submission queue entry.
    pub sqe: Sqe,
    /// Stage.
    pub stage: Stage,
    /// Data pointer, once resolved.
    #[serde(default)]
    pub prp: Option<Prp>,
    /// Bytes of data moved.
    #[serde(default)]
    pub done: u64,
    /// Data read from the guest so far (small admin/DSM payloads).
    #[serde(default)]
    pub buf: Vec<u8>,
    /// Write the completion entry again before raising the interrupt (set in a saved state:
    /// the source's write may not have reached guest memory).
    #[serde(default)]
    pub rewrite: bool,
}

/// What executing a command achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished with (status, result).
    Done(u16, u32),
    /// The budget of this turn is used up.
    More,
    /// Park it (Asynchronous Event Request).
    Park,
}

/// A failed status with Do Not Retry: none of our failures go away by retrying.
pub fn fail(sc: u16) -> Stop {
    Stop::Status(sc | status::DNR)
}

impl Command {
    /// A freshly fetched command.
    pub fn new(sqid: u16, cqid: u16, sqe: Sqe) -> Self {
        Self {
            sqid,
            cqid,
            sqe,
            stage: Stage::Exec,
            prp: None,
            done: 0,
            buf: Vec::new(),
            rewrite: false,
        }
    }

    /// Forget execution progress, so the command runs again from the start (parking it for
    /// migration: every step is idempotent until the completion entry is written).
    pub fn restart(&mut self) {
        match self.stage {
            Stage::Exec | Stage::Finish { .. } => {
                self.stage = Stage::Exec;
                self.prp = None;
                self.done = 0;
                self.buf.clear();
            }
            Stage::Posted { .. } => self.rewrite = true,
            Stage::Parked => {}
        }
    }

    /// The data pointer for `len` bytes, resolving PRP lists as needed.
    pub fn data(&mut self, len: u64, cx: &mut DeviceCtx<'_>) -> Result<&Prp, Stop> {
        if self.sqe.psdt() != 0 {
            return Err(fail(status::INVALID_FIELD)); // SGLs are not offered (SGLS = 0)
        }
        if self.prp.is_none() {
            self.prp = Some(Prp::new(self.sqe.prp1(), self.sqe.prp2(), len).map_err(dnr)?);
        }
        let prp = self.prp.as_mut().ok_or(Stop::Pending)?;
        prp.resolve(cx).map_err(dnr)?;
        Ok(prp)
    }

    /// Copy `bytes` (padded with zeros or cut to `len`) to the command's data buffer.
    pub fn send(&mut self, bytes: &[u8], len: u64, cx: &mut DeviceCtx<'_>) -> Result<(), Stop> {
        let mut done = self.done;
        let prp = self.data(len, cx)?;
        let mut unlimited = u64::MAX;
        let r = prp.scatter(&mut done, &mut unlimited, cx, |b, off| {
            let off = off as usize;
            b.fill(0);
            if off < bytes.len() {
                let n = (bytes.len() - off).min(b.len());
                b[..n].copy_from_slice(&bytes[off..off + n]);
            }
            Ok(())
        });
        self.done = done;
        r.map(|_| ())
    }

    /// The `len` bytes of the command's data buffer (small payloads).
    pub fn receive(&mut self, len: u64, cx: &mut DeviceCtx<'_>) -> Result<Vec<u8>, Stop> {
        let mut done = self.done;
        let mut got = std::mem::take(&mut self.buf);
        let prp = self.data(len, cx)?;
        let mut unlimited = u64::MAX;
        let r = prp.gather(&mut done, &mut unlimited, cx, |b, _| {
            got.extend_from_slice(b);
            Ok(())
        });
        self.done = done;
        match r {
            Ok(_) => Ok(got),
            Err(e) => {
                self.buf = got;
                Err(e)
            }
        }
    }
}

/// Status stops from PRP handling get Do Not Retry too.
fn dnr(s: Stop) -> Stop {
    match s {
        Stop::Status(sc) => Stop::Status(sc | status::DNR),
        p => p,
    }
}

fn io_error(what: &str, e: std::io::Error) -> Stop {
    tracing::warn!("nvme: backing file {what} failed: {e}");
    fail(status::INTERNAL_ERROR)
}

/// Execute (a step of) an I/O command within `budget` bytes.
pub fn exec_io(
    cmd: &mut Command,
    ns: &Namespace,
    counters: &mut Counters,
    budget: &mut u64,
    cx: &mut DeviceCtx<'_>,
) -> Result<Outcome, Stop> {
    let op = cmd.sqe.opcode();
    let nsid = cmd.sqe.nsid();
    if op == io::FLUSH {
        // NSID 0xffffffff flushes every namespace.
        if nsid != 1 && nsid != u32::MAX {
            return Err(fail(status::INVALID_NAMESPACE));
        }
        ns.flush().map_err(|e| io_error("flush", e))?;
        return Ok(Outcome::Done(status::SUCCESS, 0));
    }
    if nsid != 1 {
        return Err(fail(status::INVALID_NAMESPACE));
    }
    match op {
        io::READ | io::WRITE => rw(cmd, ns, counters, budget, cx),
        io::WRITE_ZEROES => {
            let (slba, nlb) = blocks(cmd, ns)?;
            ns.zero(slba, nlb)
                .map_err(|e| io_error("write zeroes", e))?;
            Ok(Outcome::Done(status::SUCCESS, 0))
        }
        io::DSM => dsm(cmd, ns, cx),
        _ => Err(fail(status::INVALID_OPCODE)),
    }
}

/// Starting LBA and block count (CDW10–12), checked against the namespace.
fn blocks(cmd: &Command, ns: &Namespace) -> Result<(u64, u64), Stop> {
    let (slba, nlb) = (cmd.sqe.slba(), block_count(cmd));
    if !ns.in_range(slba, nlb) {
        return Err(fail(status::LBA_OUT_OF_RANGE));
    }
    Ok((slba, nlb))
}

/// Number of logical blocks (CDW12 bits 15:0 are zero-based).
fn block_count(cmd: &Command) -> u64 {
    u64::from(cmd.sqe.cdw(12) & 0xffff) + 1
}

fn rw(
    cmd: &mut Command,
    ns: &Namespace,
    counters: &mut Counters,
    budget: &mut u64,
    cx: &mut DeviceCtx<'_>,
) -> Result<Outcome, Stop> {
    let write = cmd.sqe.opcode() == io::WRITE;
    let len = block_count(cmd) * LBA_SIZE;
    if len > PAGE << MDTS {
        return Err(fail(status::INVALID_FIELD));
    }
    let (slba, _) = blocks(cmd, ns)?;
    let base = slba * LBA_SIZE;
    let mut done = cmd.done;
    let prp = cmd.data(len, cx)?;
    let finished = if write {
        prp.gather(&mut done, budget, cx, |b, off| {
            ns.write_at(b, base + off).map_err(|e| io_error("write", e))
        })
    } else {
        prp.scatter(&mut done, budget, cx, |b, off| {
            ns.read_at(b, base + off).map_err(|e| io_error("read", e))
        })
    };
    cmd.done = done;
    if !finished? {
        return Ok(Outcome::More);
    }
    if write {
        counters.writes += 1;
        counters.bytes_written += len;
    } else {
        counters.reads += 1;
        counters.bytes_read += len;
    }
    Ok(Outcome::Done(status::SUCCESS, 0))
}

/// Dataset Management: with the Deallocate attribute, punch the ranges out of the file.
fn dsm(cmd: &mut Command, ns: &Namespace, cx: &mut DeviceCtx<'_>) -> Result<Outcome, Stop> {
    let nr = u64::from(cmd.sqe.cdw(10) & 0xff) + 1;
    let deallocate = cmd.sqe.cdw(11) & (1 << 2) != 0;
    if !deallocate {
        // Integral read/write hints are advisory: nothing to do.
        return Ok(Outcome::Done(status::SUCCESS, 0));
    }
    let raw = cmd.receive(nr * 16, cx)?;
    let ranges: Vec<(u64, u64)> = raw
        .chunks_exact(16)
        .map(|r| {
            let len = u32::from_le_bytes([r[4], r[5], r[6], r[7]]);
            let slba = u64::from_le_bytes([r[8], r[9], r[10], r[11], r[12], r[13], r[14], r[15]]);
            (slba, u64::from(len))
        })
        .collect();
    if ranges.iter().any(|&(s, n)| !ns.in_range(s, n)) {
        return Err(fail(status::LBA_OUT_OF_RANGE));
    }
    for (slba, nlb) in ranges {
        if nlb > 0 {
            ns.zero(slba, nlb).map_err(|e| io_error("deallocate", e))?;
        }
    }
    Ok(Outcome::Done(status::SUCCESS, 0))
}
