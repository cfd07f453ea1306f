//! The deferred work of the controller: one bounded turn of fetching submission entries,
//! executing commands, posting completions and raising interrupts, plus shadow doorbells.
//!
//! Each turn moves at most the slice's worth of data, so the event loop answers the client
//! (a config read, a doorbell) in between. Nothing waits for the client: a guest-memory access
//! that is `Pending` leaves the command where it was and the turn goes on with the others.

use std::sync::atomic::{fence, Ordering};

use vfud_server::dma::Iova;
use vfud_server::{DeviceCtx, DmaError};

use super::admin::{self, AdminCtx};
use super::command::{exec_io, Command, Outcome, Stage};
use super::ctrl::db_offset;
use super::prp::Stop;
use super::spec::{self, admin as op, cqe_bytes, status, SqeFields, CQE_SIZE, SQE_SIZE};
use super::Nvme;

/// Most commands in flight at once (fetched and not yet completed).
pub const MAX_IN_FLIGHT: usize = 128;
/// Most entries fetched from one submission queue in one turn.
const FETCH_BURST: usize = 32;

/// What happened to a command in a turn.
enum Fate {
    /// Still in flight.
    Keep,
    /// Completed (or its queue is gone): drop it.
    Done,
}

impl Nvme {
    /// One turn of deferred work. Returns whether anything moved, so the caller runs another
    /// turn; when nothing moved every command waits for the client (a DMA reply, a doorbell).
    pub(super) fn turn(&mut self, cx: &mut DeviceCtx<'_>) -> bool {
        let mut moved = false;
        if self.ctrl.dbbuf.is_some() {
            moved |= self.poll_shadow(cx);
        }
        moved |= self.fetch(cx);
        let mut budget = self.slice;
        let mut i = 0;
        while i < self.inflight.len() {
            let mut cmd = self.inflight[i].clone();
            let before = (cmd.stage.clone(), cmd.done);
            let fate = self.advance(&mut cmd, &mut budget, cx);
            moved |= before != (cmd.stage.clone(), cmd.done);
            match fate {
                Fate::Keep => {
                    self.inflight[i] = cmd;
                    i += 1;
                }
                Fate::Done => {
                    self.inflight.remove(i);
                    moved = true;
                }
            }
        }
        moved
    }

    /// Fetch new submission entries, admin queue first.
    fn fetch(&mut self, cx: &mut DeviceCtx<'_>) -> bool {
        let mut moved = false;
        for qid in 0..self.ctrl.sqs.len() {
            for _ in 0..FETCH_BURST {
                if self.inflight.len() >= MAX_IN_FLIGHT {
                    return moved;
                }
                let Some(sq) = self.ctrl.sqs[qid].as_mut() else {
                    break;
                };
                if sq.head == sq.tail {
                    break;
                }
                let mut raw = [0u8; SQE_SIZE as usize];
                let at = sq.base + u64::from(sq.head) * SQE_SIZE;
                match cx.mem().read(Iova(at), &mut raw) {
                    Ok(()) => {}
                    Err(DmaError::Pending) => break,
                    Err(e) => {
                        tracing::warn!("nvme: cannot fetch from SQ {qid}: {e}; controller fatal");
                        self.ctrl.csts |= spec::CSTS_CFS;
                        return true;
                    }
                }
                sq.head = (sq.head + 1) % sq.size;
                let cqid = sq.cqid;
                let mut cmd = Command::new(qid as u16, cqid, spec::sqe_from_bytes(&raw));
                let aborted = (qid as u16, cmd.sqe.cid());
                if let Some(at) = self.ctrl.aborts.iter().position(|a| *a == aborted) {
                    self.ctrl.aborts.swap_remove(at);
                    cmd.stage = Stage::Finish {
                        status: status::ABORTED_BY_REQUEST,
                        result: 0,
                    };
                }
                self.inflight.push(cmd);
                moved = true;
            }
        }
        moved
    }

    fn advance(&mut self, cmd: &mut Command, budget: &mut u64, cx: &mut DeviceCtx<'_>) -> Fate {
        loop {
            match cmd.stage.clone() {
                Stage::Parked => return Fate::Keep,
                Stage::Exec => {
                    let r = if cmd.sqid == 0 {
                        let parked = self
                            .inflight
                            .iter()
                            .filter(|c| c.stage == Stage::Parked)
                            .count();
                        let mut a = AdminCtx {
                            ctrl: &mut self.ctrl,
                            ns: &self.ns,
                            serial: &self.serial,
                            dbbuf: self.offer_dbbuf,
                            parked_aers: parked,
                        };
                        admin::exec(cmd, &mut a, cx)
                    } else {
                        exec_io(cmd, &self.ns, &mut self.ctrl.counters, budget, cx)
                    };
                    match r {
                        Ok(Outcome::Done(status, result)) => {
                            let mut result = result;
                            if cmd.sqid == 0 && cmd.sqe.opcode() == op::DELETE_SQ {
                                self.abort_queue(cmd.sqe.cdw(10) as u16);
                            }
                            if cmd.sqid == 0 && cmd.sqe.opcode() == op::ABORT {
                                let cdw10 = cmd.sqe.cdw(10);
                                if self.abort_waiting(cdw10 as u16, (cdw10 >> 16) as u16, cx) {
                                    result = 0; // bit 0 clear: aborted
                                }
                            }
                            cmd.stage = Stage::Finish { status, result };
                        }
                        Ok(Outcome::Park) => cmd.stage = Stage::Parked,
                        Ok(Outcome::More) | Err(Stop::Pending) => return Fate::Keep,
                        Err(Stop::Status(status)) => {
                            cmd.stage = Stage::Finish { status, result: 0 }
                        }
                    }
                }
                Stage::Finish { status, result } => {
                    // The data must be in guest memory before the entry that says so.
                    let status = match cx.mem().settle() {
                        Ok(()) => status,
                        Err(DmaError::Pending) => return Fate::Keep,
                        Err(e) => {
                            tracing::warn!("nvme: data of command {} lost: {e}", cmd.sqe.cid());
                            status::DATA_TRANSFER_ERROR | status::DNR
                        }
                    };
                    match self.post(cmd, status, result, cx) {
                        Some(f) => return f,
                        None => continue,
                    }
                }
                Stage::Posted { cqid, slot, cqe } => {
                    if !cmd.rewrite {
                        match cx.mem().settle() {
                            Ok(()) => {}
                            Err(DmaError::Pending) => return Fate::Keep,
                            Err(e) => tracing::warn!("nvme: completion entry write failed: {e}"),
                        }
                    }
                    if cmd.rewrite {
                        if let Some(cq) = self.ctrl.cqs[usize::from(cqid)].as_ref() {
                            let at = Iova(cq.base + u64::from(slot) * CQE_SIZE);
                            match cx.mem().write(at, &cqe) {
                                Err(DmaError::Pending) => return Fate::Keep,
                                Err(e) => tracing::warn!("nvme: cannot rewrite a CQ entry: {e}"),
                                Ok(()) => {}
                            }
                        }
                        cmd.rewrite = false;
                        continue;
                    }
                    if let Some(cq) = self.ctrl.cqs[usize::from(cqid)].as_ref() {
                        if cq.ien {
                            let iv = cq.iv;
                            self.signal(iv, cx);
                        }
                    }
                    return Fate::Done;
                }
            }
        }
    }

    /// Write the completion entry; `None` when it went out (the stage moved on).
    fn post(
        &mut self,
        cmd: &mut Command,
        status: u16,
        result: u32,
        cx: &mut DeviceCtx<'_>,
    ) -> Option<Fate> {
        let cqid = cmd.cqid;
        if self
            .ctrl
            .cqs
            .get(usize::from(cqid))
            .is_none_or(|c| c.is_none())
        {
            return Some(Fate::Done); // the queue is gone: nobody to tell
        }
        if self.ctrl.dbbuf.is_some() && cqid != 0 {
            self.refresh_cq_head(cqid, cx);
        }
        let sq_head = self.ctrl.sqs[usize::from(cmd.sqid)]
            .as_ref()
            .map_or(0, |s| s.head);
        let cq = self.ctrl.cqs[usize::from(cqid)].as_mut()?;
        if cq.full() {
            return Some(Fate::Keep); // wait for the driver to consume entries
        }
        let cqe = cqe_bytes(result, sq_head, cmd.sqid, cmd.sqe.cid(), status, cq.phase);
        let slot = cq.tail;
        match cx
            .mem()
            .write(Iova(cq.base + u64::from(slot) * CQE_SIZE), &cqe)
        {
            Ok(()) => {}
            Err(DmaError::Pending) => return Some(Fate::Keep),
            Err(e) => {
                tracing::warn!("nvme: cannot write to CQ {cqid}: {e}");
                return Some(Fate::Done);
            }
        }
        cq.tail = (cq.tail + 1) % cq.size;
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
        cmd.stage = Stage::Posted { cqid, slot, cqe };
        None
    }

    /// Delete I/O SQ: its commands still executing end "aborted due to SQ deletion".
    fn abort_queue(&mut self, qid: u16) {
        self.ctrl.aborts.retain(|(q, _)| *q != qid);
        for c in self.inflight.iter_mut().filter(|c| c.sqid == qid) {
            if matches!(c.stage, Stage::Exec | Stage::Parked) {
                c.stage = Stage::Finish {
                    status: status::ABORTED_SQ_DELETION,
                    result: 0,
                };
            }
        }
    }

    /// Abort: a command not started yet ends "Command Abort Requested" — one fetched and
    /// waiting (the turn that fetched an Abort fetched the I/O queues' new entries too, and
    /// admin commands run first), or one still in its submission queue, which is remembered
    /// and completed so when fetched. One already moving data runs on and the Abort reports
    /// "not aborted", as the spec allows (NVMe 1.4 §5.1).
    fn abort_waiting(&mut self, sqid: u16, cid: u16, cx: &mut DeviceCtx<'_>) -> bool {
        if self.abort_queued(sqid, cid, cx) {
            return true;
        }
        let target = self.inflight.iter_mut().find(|c| {
            c.sqid == sqid
                && c.sqe.cid() == cid
                && c.stage == Stage::Exec
                && c.done == 0
                && c.prp.is_none()
                && c.buf.is_empty()
        });
        match target {
            Some(c) => {
                c.stage = Stage::Finish {
                    status: status::ABORTED_BY_REQUEST,
                    result: 0,
                };
                true
            }
            None => false,
        }
    }

    /// Whether command `cid` is in SQ `sqid` between head and tail (not fetched); if so it is
    /// remembered in [`super::ctrl::Ctrl::aborts`] (bounded) for `fetch` to complete.
    fn abort_queued(&mut self, sqid: u16, cid: u16, cx: &mut DeviceCtx<'_>) -> bool {
        let Some(sq) = self
            .ctrl
            .sqs
            .get(usize::from(sqid))
            .and_then(|q| q.as_ref())
        else {
            return false;
        };
        if self.ctrl.aborts.len() >= super::ctrl::MAX_ABORTS {
            return false;
        }
        let mut i = sq.head;
        while i != sq.tail {
            let mut dw0 = [0u8; 4];
            let at = Iova(sq.base + u64::from(i) * SQE_SIZE);
            if cx.mem().read(at, &mut dw0).is_err() {
                return false;
            }
            if (u32::from_le_bytes(dw0) >> 16) as u16 == cid {
                self.ctrl.aborts.push((sqid, cid));
                return true;
            }
            i = (i + 1) % sq.size;
        }
        false
    }

    /// Shadow doorbells (Doorbell Buffer Config): take the tails and heads the driver wrote
    /// to memory instead of the doorbell registers, and publish event indexes. The driver
    /// rings a real doorbell only when its new tail passes the event index, i.e. when the
    /// controller has caught up; so after announcing a tail the controller reads the shadow
    /// once more (another turn) before it goes idle.
    fn poll_shadow(&mut self, cx: &mut DeviceCtx<'_>) -> bool {
        let Some(db) = self.ctrl.dbbuf else {
            return false;
        };
        let mut moved = false;
        for qid in 1..self.ctrl.sqs.len() as u16 {
            let Some(sq) = self.ctrl.sqs[usize::from(qid)].as_mut() else {
                continue;
            };
            let Ok(t) = cx.mem().read_u32(Iova(db.dbs + db_offset(qid, false))) else {
                continue;
            };
            if t < u32::from(sq.size) && t as u16 != sq.tail {
                sq.tail = t as u16;
                moved = true;
            }
            if sq.ei != sq.tail
                && cx
                    .mem()
                    .write_u32(Iova(db.eis + db_offset(qid, false)), u32::from(sq.tail))
                    .is_ok()
            {
                sq.ei = sq.tail;
                fence(Ordering::SeqCst);
                moved = true;
            }
        }
        for qid in 1..self.ctrl.cqs.len() as u16 {
            self.refresh_cq_head(qid, cx);
        }
        moved
    }

    /// Read CQ `qid`'s shadow head; when the queue is still full, set its event index so the
    /// driver rings the real doorbell as it consumes the next entry.
    fn refresh_cq_head(&mut self, qid: u16, cx: &mut DeviceCtx<'_>) {
        let (Some(db), Some(cq)) = (self.ctrl.dbbuf, self.ctrl.cqs[usize::from(qid)].as_mut())
        else {
            return;
        };
        let at = Iova(db.dbs + db_offset(qid, true));
        if let Ok(h) = cx.mem().read_u32(at) {
            if h < u32::from(cq.size) {
                cq.head = h as u16;
            }
        }
        if cq.full() {
            let _ = cx
                .mem()
                .write_u32(Iova(db.eis + db_offset(qid, true)), u32::from(cq.head));
            fence(Ordering::SeqCst);
        }
    }
}
